# keel.test=idle: a guest that stays up for the host to drive (lab_api's
# lifecycle case): it reports each boot, then whether a vsock device appears
# (hot-plugged with vm.add-vsock), then idles.
#   KEEL-L2 IDLE-BOOT
#   KEEL-L2 VSOCK-DEVICE <yes|no>
echo "KEEL-L2 IDLE-BOOT"
n=0
while [ $n -lt 600 ]; do
	for d in /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*; do
		[ -e "$d" ] && break 2
	done
	sleep 0.1
	n=$((n + 1))
done
if [ $n -lt 600 ]; then echo "KEEL-L2 VSOCK-DEVICE yes"; else echo "KEEL-L2 VSOCK-DEVICE no"; fi
while :; do sleep 60; done
