# keel.test=console: writes to virtio-console (/dev/hvc0) a line with the
# token keel.token= and 200 numbered lines, then powers off.
#   KEEL-L2 HVC0 present|absent
#   KEEL-L2 HVC-WRITTEN <lines>
token=$(keel_arg token none)
if keel_wait /dev/hvc0; then
	echo "KEEL-L2 HVC0 present"
	{
		echo "KEEL-HVC $token"
		i=1
		while [ $i -le 200 ]; do
			echo "KEEL-HVC-LINE $i"
			i=$((i + 1))
		done
	} >/dev/hvc0
	echo "KEEL-L2 HVC-WRITTEN 201"
else
	echo "KEEL-L2 HVC0 absent"
fi
poweroff -f
