# keel.test=panic: make the kernel panic (boot with panic=-1 to reboot, or
# with a pvpanic device to have the VMM see it). /proc/sysrq-trigger works
# whatever kernel.sysrq says.
echo KEEL-L2 PANICKING
echo c >/proc/sysrq-trigger
# Without CONFIG_MAGIC_SYSRQ: PID 1 exiting panics the kernel too.
exit 1
