# keel.test=blk: virtio-blk disks holding ext4 file systems (vda, vdb, ...).
# Each disk is mounted and the sha256 of every file on it is printed:
#   KEEL-L2 DISK <disk> <512-byte sectors> ro=<0|1>
#   KEEL-L2 FILE <disk> /<path> <sha256>
# keel.blk.write=DISK: mount DISK read-write, write new files, sync, then
# drop the caches and read them back from the device:
#   KEEL-L2 WROTE <disk> /<path> <sha256>     what was written
#   KEEL-L2 REREAD <disk> /<path> <sha256>    what came back
# keel.blk.ro=DISK: DISK must refuse writes:
#   KEEL-L2 RO-WRITE <disk> refused|accepted   a direct write to the device
#   KEEL-L2 RO-MOUNT <disk> rw|ro|failed       mount -o rw
#   KEEL-L2 RO-CREATE <disk> refused|accepted  creating a file
# Ends with KEEL-L2 BLK-DONE and powers off.
write_disk=$(keel_arg blk.write "")
ro_disk=$(keel_arg blk.ro "")

keel_wait /sys/block/vda || echo "KEEL-L2 NO-DISK"
mount_mode() {
	# The mount options of $1 in /proc/mounts: rw or ro.
	while read -r _ mnt _ opts _; do
		if [ "$mnt" = "$1" ]; then
			echo "${opts%%,*}"
			return
		fi
	done </proc/mounts
	echo failed
}
checksum_tree() {
	# FILE lines for every regular file under mount point $2 of disk $1.
	(cd "$2" && find . -path ./lost+found -prune -o -type f -print) | sort | while read -r f; do
		f=${f#.}
		echo "KEEL-L2 FILE $1 $f $(sha256sum <"$2$f" | cut -d' ' -f1)"
	done
}

for sys in /sys/block/vd*; do
	[ -e "$sys" ] || continue
	d=${sys##*/}
	read -r sectors <"$sys/size"
	read -r ro <"$sys/ro"
	echo "KEEL-L2 DISK $d $sectors ro=$ro"
	m=/mnt/$d
	mkdir -p "$m"
	if [ "$d" = "$ro_disk" ]; then
		if dd if=/dev/zero of="/dev/$d" bs=4096 count=1 seek=16 conv=notrunc,fsync oflag=direct 2>/dev/null; then
			echo "KEEL-L2 RO-WRITE $d accepted"
		else
			echo "KEEL-L2 RO-WRITE $d refused"
		fi
		mount -t ext4 -o rw "/dev/$d" "$m" 2>/dev/null
		echo "KEEL-L2 RO-MOUNT $d $(mount_mode "$m")"
		[ "$(mount_mode "$m")" = failed ] && mount -t ext4 -o ro,noload "/dev/$d" "$m"
		if { echo x >"$m/keel-ro-probe"; } 2>/dev/null && sync; then
			echo "KEEL-L2 RO-CREATE $d accepted"
		else
			echo "KEEL-L2 RO-CREATE $d refused"
		fi
	elif [ "$d" = "$write_disk" ]; then
		mount -t ext4 -o rw "/dev/$d" "$m" || echo "KEEL-L2 MOUNT-FAILED $d"
	else
		mount -t ext4 -o ro,noload "/dev/$d" "$m" || echo "KEEL-L2 MOUNT-FAILED $d"
	fi
	checksum_tree "$d" "$m"
	if [ "$d" = "$write_disk" ]; then
		mkdir -p "$m/new"
		# An odd size (several requests, a partial last block) and a large
		# file (many requests in flight).
		dd if=/dev/urandom of="$m/new/small" bs=1000 count=77 2>/dev/null
		dd if=/dev/urandom of="$m/new/big" bs=1M count=24 2>/dev/null
		sync
		for f in /new/small /new/big; do
			echo "KEEL-L2 WROTE $d $f $(sha256sum <"$m$f" | cut -d' ' -f1)"
		done
		umount "$m"
		echo 3 >/proc/sys/vm/drop_caches
		mount -t ext4 -o ro "/dev/$d" "$m"
		for f in /new/small /new/big; do
			echo "KEEL-L2 REREAD $d $f $(sha256sum <"$m$f" | cut -d' ' -f1)"
		done
	fi
	umount "$m" 2>/dev/null
done
sync
echo "KEEL-L2 BLK-DONE"
poweroff -f
