# keel.test=bench-net: iperf3 (from the bench tools cpio appended to the
# initramfs) against an iperf3 server at keel.net.peer (default
# 192.168.100.1), keel.bench.runtime seconds each way (default 5). Prints:
#   KEEL-BENCH tx_mbps=X rx_mbps=Y   (tx: guest -> host, rx: host -> guest)
ip=$(keel_arg net.ip 192.168.100.2)
peer=$(keel_arg net.peer 192.168.100.1)
runtime=$(keel_arg bench.runtime 5)
keel_wait /sys/class/net/eth0 || echo "KEEL-L2 NO-ETH0"
ip link set lo up
ip addr add "$ip/24" dev eth0
ip link set eth0 up
# The receiver's figure (Mbit/s) of the summary.
rate() {
	iperf3 -c "$peer" -t "$runtime" -O 1 -f m "$@" 2>&1 | awk '/receiver/ {print $7}'
}
n=0
while ! ping -c 1 -W 1 "$peer" >/dev/null 2>&1 && [ $n -lt 10 ]; do
	n=$((n + 1))
done
tx=$(rate)
rx=$(rate -R)
echo "KEEL-BENCH tx_mbps=${tx:-0} rx_mbps=${rx:-0}"
poweroff -f
