# keel.test=bench-blk: fio on /dev/vda (the disk under test), fio itself on
# /dev/vdb (ext4 from ci/guest-kit --bench, read-only). keel.bench.runtime
# seconds per job (default 5). Prints one line:
#   KEEL-BENCH seqwrite_mbps=X seqread_mbps=Y randread_iops=Z
runtime=$(keel_arg bench.runtime 5)
keel_wait /sys/block/vdb || echo "KEEL-L2 NO-TOOLS-DISK"
mkdir -p /tools
mount -t ext4 -o ro,noload /dev/vdb /tools || echo "KEEL-L2 TOOLS-MOUNT-FAILED"
job() {
	# job NAME RW BS IODEPTH: prints the fio terse (v3) line.
	/tools/fio --name="$1" --filename=/dev/vda --rw="$2" --bs="$3" --iodepth="$4" \
		--direct=1 --ioengine=libaio --size=1G --runtime="$runtime" --time_based \
		--ramp_time=1 --norandommap --randrepeat=0 --output-format=terse --terse-version=3
}
# Terse v3: field 7 read KiB/s, 8 read IOPS, 48 write KiB/s.
w=$(job seqwrite write 1M 8 | awk -F';' '{printf "%.1f", $48 * 1024 / 1e6}')
r=$(job seqread read 1M 8 | awk -F';' '{printf "%.1f", $7 * 1024 / 1e6}')
i=$(job randread randread 4k 32 | awk -F';' '{printf "%d", $8}')
echo "KEEL-BENCH seqwrite_mbps=$w seqread_mbps=$r randread_iops=$i"
umount /tools
poweroff -f
