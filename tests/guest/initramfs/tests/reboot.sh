# keel.test=reboot: reboot once, then power off. CMOS NVRAM byte 0x40 counts
# the boots: the VMM keeps CMOS across a guest reset, as real hardware does.
#
# keel-cmos does the port I/O (the cloud kernel has no /dev/port). Where it
# cannot (in the lab, an L2 under QEMU's pc/q35 machines gets SIGSEGV on
# user-space port I/O), /dev/nvram is tried: it is offset by 14 and refuses
# to work unless the BIOS checksum at CMOS 0x2e is right.
# (The braces send the shell's own "Segmentation fault" to /dev/null too.)
cmos_get() {
	{ v=$(keel-cmos 0x40); } 2>/dev/null && echo "$v" && return
	nvram_ready && dd if=/dev/nvram bs=1 skip=50 count=1 2>/dev/null | od -An -tx1 | tr -d ' '
}
cmos_set() {
	{ keel-cmos 0x40 "0x$1"; } 2>/dev/null && return
	# shellcheck disable=SC2059 # the format is the byte
	nvram_ready && printf "\\$(printf %o "0x$1")" | dd of=/dev/nvram bs=1 seek=50 conv=notrunc 2>/dev/null
}
nvram_ready() {
	[ -c /dev/nvram ] || insmod /lib/modules/kernel/drivers/char/nvram.ko 2>/dev/null
	[ -c /dev/nvram ]
}

case "$(cmos_get)" in
00)
	if cmos_set 5a; then
		echo KEEL-L2 REBOOTING
		reboot -f
	fi
	echo KEEL-L2 CMOS-UNAVAILABLE
	;;
5a)
	cmos_set 00
	echo KEEL-L2 SECOND-BOOT
	;;
'')
	echo KEEL-L2 CMOS-UNAVAILABLE
	;;
*)
	echo "KEEL-L2 CMOS-UNEXPECTED $(cmos_get)"
	;;
esac
poweroff -f
