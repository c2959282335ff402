# keel.test=rng: virtio-rng through /dev/hwrng.
#   KEEL-L2 RNG-CURRENT <the kernel's current hwrng>
#   KEEL-L2 RNG-BYTES <bytes read of 4096>
#   KEEL-L2 RNG-DISTINCT <distinct byte values among them>
keel_wait /sys/class/misc/hw_random/rng_current
read -r current </sys/class/misc/hw_random/rng_current 2>/dev/null
echo "KEEL-L2 RNG-CURRENT ${current:-none}"
dd if=/dev/hwrng of=/tmp/rng bs=4096 count=1 iflag=fullblock 2>/dev/null
echo "KEEL-L2 RNG-BYTES $(wc -c </tmp/rng)"
echo "KEEL-L2 RNG-DISTINCT $(od -An -v -tx1 /tmp/rng | tr -s ' ' '\n' | grep -v '^$' | sort -u | wc -l)"
poweroff -f
