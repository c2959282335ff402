# keel.test=vsock: virtio-vsock echo, both ways of setting up a connection.
# 1. The guest connects to the host (CID 2) port keel.vsock.connect (default
#    1234), where an echo server must be waiting, sends 1 MiB and reads it
#    back.
# 2. The guest listens on port keel.vsock.listen (default 5678) and echoes
#    one connection from the host ("KEEL-VSOCK LISTENING <port>" says when).
#   KEEL-L2 VSOCK-G2H-SENT <bytes> <sha256>
#   KEEL-L2 VSOCK-G2H-BACK <bytes> <sha256>
#   KEEL-L2 VSOCK-H2G <status>  (then keel-vsock's "KEEL-VSOCK ECHOED <bytes>")
port_out=$(keel_arg vsock.connect 1234)
port_in=$(keel_arg vsock.listen 5678)
keel_wait /dev/vsock || echo "KEEL-L2 NO-VSOCK"
dd if=/dev/urandom of=/tmp/v bs=4096 count=256 2>/dev/null
echo "KEEL-L2 VSOCK-G2H-SENT $(wc -c </tmp/v) $(sha256sum </tmp/v | cut -d' ' -f1)"
keel-vsock connect 2 "$port_out" </tmp/v >/tmp/v2 || echo "KEEL-L2 VSOCK-G2H-FAILED"
echo "KEEL-L2 VSOCK-G2H-BACK $(wc -c </tmp/v2) $(sha256sum </tmp/v2 | cut -d' ' -f1)"
keel-vsock echo "$port_in"
echo "KEEL-L2 VSOCK-H2G $?"
poweroff -f
