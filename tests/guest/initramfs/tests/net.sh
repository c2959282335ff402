# keel.test=net: virtio-net. Configures eth0 (keel.net.ip, default
# 192.168.100.2/24), pings the host side (keel.net.peer, default
# 192.168.100.1), then moves keel.net.mib MiB (default 100) each way over TCP
# with keel-vsock's TCP modes: to PEER:5000 (a listener there must wait for
# EOF), then from PEER:5001.
#   KEEL-L2 NET-MAC <mac>
#   KEEL-L2 PING <replies>/3
#   KEEL-L2 NET-TX <bytes> <sha256>    what the guest sent
#   KEEL-L2 NET-RX <bytes> <sha256>    what it received
ip=$(keel_arg net.ip 192.168.100.2)
peer=$(keel_arg net.peer 192.168.100.1)
mib=$(keel_arg net.mib 100)

keel_wait /sys/class/net/eth0 || echo "KEEL-L2 NO-ETH0"
read -r mac </sys/class/net/eth0/address
echo "KEEL-L2 NET-MAC $mac"
ip link set lo up
ip addr add "$ip/24" dev eth0
ip link set eth0 up
replies=$(ping -c 3 -W 3 "$peer" 2>/dev/null | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
echo "KEEL-L2 PING ${replies:-0}/3"

mkfifo /tmp/hold /tmp/tx-copy /tmp/rx-copy
# keel-vsock moves TCP data in 64 KiB pieces (busybox nc's small ones cost
# an exit each few KiB in the nested lab). Sending: random data, hashed on
# its way out; at its end the helper half-closes and waits for the peer.
sha256sum </tmp/tx-copy >/tmp/tx-sum &
hash=$!
dd if=/dev/urandom bs=1M count="$mib" iflag=fullblock 2>/dev/null | tee /tmp/tx-copy |
	keel-vsock tcp-connect "$peer" 5000 >/dev/null || echo "KEEL-L2 NET-TX-FAILED"
wait $hash
echo "KEEL-L2 NET-TX $((mib * 1048576)) $(cut -d' ' -f1 /tmp/tx-sum)"
# Receiving: the helper's stdin must stay open (it half-closes when stdin
# ends), so it is a FIFO held open until the transfer is over.
sha256sum </tmp/rx-copy >/tmp/rx-sum &
hash=$!
keel-vsock tcp-connect "$peer" 5001 </tmp/hold | tee /tmp/rx-copy | wc -c >/tmp/rx-bytes &
pid=$!
exec 3>/tmp/hold
wait $pid
exec 3>&-
wait $hash
echo "KEEL-L2 NET-RX $(cat /tmp/rx-bytes) $(cut -d' ' -f1 /tmp/rx-sum)"
poweroff -f
