# keel.test=poweroff: power off at once.
echo KEEL-L2 POWEROFF
poweroff -f
