# What the guest sees on its PCI bus: one line per function, then the
# devices the drivers made of them. For quick checks of new devices.
for d in /sys/bus/pci/devices/*; do
	[ -e "$d" ] || continue
	read -r v <"$d/vendor"
	read -r p <"$d/device"
	drv=none
	[ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
	echo "KEEL-L2 PCI ${d##*/} $v:$p $drv"
done
if [ -e /dev/hwrng ]; then
	n=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n' | wc -c)
	echo "KEEL-L2 HWRNG $(cat /sys/class/misc/hw_random/rng_current) hexchars=$n"
fi
for b in /sys/block/vd*; do
	[ -e "$b" ] && echo "KEEL-L2 DISK ${b##*/} $(cat "$b/size") ro=$(cat "$b/ro")"
done
for n in /sys/class/net/eth*; do
	[ -e "$n" ] && echo "KEEL-L2 NIC ${n##*/} $(cat "$n/address")"
done
[ -e /dev/hvc0 ] && echo "KEEL-L2 HVC0 present"
grep -i -E "pci|mmconf|ecam" /proc/iomem | sed 's/^/KEEL-L2 IOMEM /'
dmesg | grep -i -E "fatal|error|fail|mmconfig|ECAM" | head -20 | sed 's/^/KEEL-L2 DMESG /'
echo "KEEL-L2 PCI-DONE"
