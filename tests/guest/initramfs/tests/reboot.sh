# keel.test=reboot: reboot once, then power off. CMOS NVRAM byte 0x40 counts
# the boots: the VMM keeps CMOS across a guest reset, as real hardware does.
# keel-cmos does the port I/O (the cloud kernel has no /dev/port).
case "$(keel-cmos 0x40)" in
00)
	keel-cmos 0x40 0x5a
	echo KEEL-L2 REBOOTING
	reboot -f
	;;
5a)
	keel-cmos 0x40 0
	echo KEEL-L2 SECOND-BOOT
	poweroff -f
	;;
*)
	echo "KEEL-L2 CMOS-UNEXPECTED $(keel-cmos 0x40)"
	poweroff -f
	;;
esac
