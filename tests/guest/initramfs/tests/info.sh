# keel.test=info: what the guest sees of its CPUs, memory and kernel.
echo "KEEL-L2 CPUS $(nproc)"
read -r online </sys/devices/system/cpu/online
echo "KEEL-L2 ONLINE $online"
while read -r key kb _; do
	if [ "$key" = MemTotal: ]; then
		echo "KEEL-L2 MEMTOTAL $kb"
		break
	fi
done </proc/meminfo
read -r release </proc/sys/kernel/osrelease
echo "KEEL-L2 KERNEL $release"
poweroff -f
