# keel.test=api: what the guest sees while L1 drives keel-vmm's REST API
# (vmm/tests/lab_api.rs). Each step waits for the host's action, reports,
# and moves on; a step that times out reports so and the next one runs.
#   KEEL-L2 TICK <n> <uptime-centiseconds>   every 0.2 s until the NIC step
#   KEEL-L2 HOT-DISK <dev> <bytes> <sha256>  a hot-plugged disk, read whole
#   KEEL-L2 HOT-DISK-SIZE <sectors>          after vm.resize-disk
#   KEEL-L2 HOT-DISK-GONE <yes|no>           after vm.remove-device
#   KEEL-L2 HOT-NET <iface> PING <n>/3       a hot-plugged NIC, configured
#   KEEL-L2 HOT-NET-GONE <yes|no>
#   KEEL-L2 NPROC <n> / NPROC-AFTER <n>      after vm.resize to 2 vCPUs, then 1
#   KEEL-L2 MEMTOTAL-BEFORE/AFTER <KiB>      around vm.resize desired_ram
#   KEEL-L2 POWER-BUTTON                     the button was pressed
insmod /lib/modules/kernel/drivers/acpi/button.ko 2>/dev/null
insmod /lib/modules/kernel/drivers/input/evdev.ko 2>/dev/null

# wait_for TEST SECONDS: polls TEST (a shell condition) every 0.1 s.
wait_for() {
	n=0
	while ! eval "$1" && [ $n -lt $(($2 * 10)) ]; do
		sleep 0.1
		n=$((n + 1))
	done
	eval "$1"
}

# A running counter with the guest's own clock, for pause/resume.
(
	i=0
	while [ ! -e /tmp/stop-ticks ]; do
		read -r up _ </proc/uptime
		echo "KEEL-L2 TICK $i ${up%.*}${up#*.}"
		i=$((i + 1))
		sleep 0.2
	done
) &
echo "KEEL-L2 API-READY"

# 1. A disk appears (no disks at boot, so it is vda).
if wait_for '[ -e /sys/block/vda ]' 60; then
	size=$(($(cat /sys/block/vda/size) * 512))
	echo "KEEL-L2 HOT-DISK vda $size $(sha256sum </dev/vda | cut -d' ' -f1)"
else
	echo "KEEL-L2 HOT-DISK none"
fi
# 2. It grows to 8 MiB.
wait_for '[ "$(cat /sys/block/vda/size 2>/dev/null)" = 16384 ]' 30
echo "KEEL-L2 HOT-DISK-SIZE $(cat /sys/block/vda/size 2>/dev/null)"
# 3. It goes.
if wait_for '[ ! -e /sys/block/vda ]' 30; then gone=yes; else gone=no; fi
echo "KEEL-L2 HOT-DISK-GONE $gone"
: >/tmp/stop-ticks

# 4. A NIC appears and carries traffic.
ip link set lo up
if wait_for '[ -e /sys/class/net/eth0 ]' 60; then
	ip addr add 192.168.101.2/24 dev eth0
	ip link set eth0 up
	replies=$(ping -c 3 -W 3 192.168.101.1 2>/dev/null | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
	echo "KEEL-L2 HOT-NET eth0 PING ${replies:-0}/3"
else
	echo "KEEL-L2 HOT-NET none"
fi
if wait_for '[ ! -e /sys/class/net/eth0 ]' 30; then gone=yes; else gone=no; fi
echo "KEEL-L2 HOT-NET-GONE $gone"

# 5. A second vCPU appears; the guest brings it online. Then it goes.
if wait_for '[ -e /sys/devices/system/cpu/cpu1/online ]' 60; then
	echo 1 >/sys/devices/system/cpu/cpu1/online
fi
wait_for '[ "$(nproc)" = 2 ]' 20
echo "KEEL-L2 NPROC $(nproc)"
wait_for '[ "$(nproc)" = 1 ]' 60
echo "KEEL-L2 NPROC-AFTER $(nproc)"

# 6. Memory is plugged in: online the new blocks, MemTotal grows.
read -r _ before _ </proc/meminfo
echo "KEEL-L2 MEMTOTAL-BEFORE $before"
wait_for 'grep -q offline /sys/devices/system/memory/memory*/state 2>/dev/null' 60
for state in /sys/devices/system/memory/memory*/state; do
	grep -q offline "$state" && echo online >"$state" 2>/dev/null
done
read -r _ after _ </proc/meminfo
echo "KEEL-L2 MEMTOTAL-AFTER $after"

# 7. The power button: its input device reports a key press.
event=""
for dev in /sys/class/input/event*; do
	[ -e "$dev/device/name" ] || continue
	case "$(cat "$dev/device/name")" in
	"Power Button") event=/dev/input/${dev##*/} ;;
	esac
done
echo "KEEL-L2 WAIT-POWER-BUTTON ${event:-none}"
if [ -n "$event" ]; then
	# One input_event (24 bytes) is enough: a press.
	dd if="$event" of=/dev/null bs=24 count=1 2>/dev/null && echo "KEEL-L2 POWER-BUTTON"
fi
poweroff -f
