//! Device tests: a driver written against guest memory (split rings laid
//! out by `MockSplitQueue`), the device on its worker thread, and real Unix
//! sockets in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::muxer::CONN_BUF_SIZE;
use super::packet::*;
use super::*;
use crate::GuestMemory;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX_BUF: u32 = 4096 + HDR_SIZE as u32;

#[derive(Default)]
struct Irq {
    signals: [AtomicUsize; 3],
    needs_reset: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, q: u16) -> io::Result<()> {
        self.signals[q as usize].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// The driver side of one split queue, by raw writes to guest memory.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    kick: EventFd,
}

impl DriverQueue {
    fn write_desc(&mut self, mem: &GuestMemory, addr: u64, len: u32, flags: u16, next: u16) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QSIZE;
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
        i
    }

    /// Makes a chain of (addr, len, writable) buffers available.
    fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if writable { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            let next = (self.next_desc + 1) % QSIZE;
            self.write_desc(mem, addr, len, flags, next);
        }
        self.publish(mem, first);
        first
    }

    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Next used element (head, len), waiting up to `timeout`.
    fn wait_used(&mut self, mem: &GuestMemory, timeout: Duration) -> Option<(u32, u32)> {
        let end = Instant::now() + timeout;
        while self.used_idx(mem) == self.used_seen {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % QSIZE));
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = mem.read_obj(at).unwrap();
        let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
        Some((id, len))
    }
}

struct Harness {
    dir: PathBuf,
    mem: GuestMemory,
    dev: Vsock,
    irq: Arc<Irq>,
    rx: DriverQueue,
    tx: DriverQueue,
    /// Where each rx descriptor's buffer lives, by head index.
    rx_bufs: Vec<u64>,
    next_data: u64,
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const DATA_BASE: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x400_0000;

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = temp_dir(name);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let config = VsockConfig {
            cid: GUEST_CID,
            socket: dir.join("v.sock"),
            id: None,
        };
        let mut dev = Vsock::new(&config).unwrap();
        let irq = Arc::new(Irq::default());
        let mut queues = Vec::new();
        let mut drivers = Vec::new();
        for i in 0..3u16 {
            let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * u64::from(i)), QSIZE);
            let mut queue: Queue = mock.create_queue().unwrap();
            queue.set_event_idx(false);
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            drivers.push(DriverQueue {
                desc: mock.desc_table_addr().0,
                avail: mock.avail_addr().0,
                used: mock.used_addr().0,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                kick: kick.try_clone().unwrap(),
            });
            queues.push(ActiveQueue {
                index: i,
                queue,
                kick,
            });
        }
        dev.activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues,
            acked_features: dev.features(),
        })
        .unwrap();
        let mut it = drivers.into_iter();
        let rx = it.next().unwrap();
        let tx = it.next().unwrap();
        Harness {
            dir,
            mem,
            dev,
            irq,
            rx,
            tx,
            rx_bufs: vec![0; QSIZE as usize],
            next_data: DATA_BASE,
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_data;
        self.next_data += u64::from(len).next_multiple_of(64);
        if self.next_data > MEM_SIZE as u64 - 0x10_0000 {
            self.next_data = DATA_BASE;
        }
        a
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.alloc(RX_BUF);
            let head = self.rx.add_chain(&self.mem, &[(addr, RX_BUF, true)]);
            self.rx_bufs[head as usize] = addr;
        }
    }

    /// Waits for the next packet the device gives the guest.
    fn recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        self.recv_within(Duration::from_secs(5))
    }

    fn recv_within(&mut self, t: Duration) -> Option<(PacketHeader, Vec<u8>)> {
        let (head, len) = self.rx.wait_used(&self.mem, t)?;
        let addr = self.rx_bufs[head as usize];
        let mut raw = [0u8; HDR_SIZE];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = PacketHeader::from_bytes(&raw);
        assert_eq!(len as usize, HDR_SIZE + hdr.len as usize, "used length");
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
            .unwrap();
        Some((hdr, data))
    }

    fn no_packet(&mut self) {
        assert_eq!(self.recv_within(Duration::from_millis(100)), None);
    }

    /// Sends a packet as one readable header descriptor plus one payload
    /// descriptor, and waits until the device has consumed it.
    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) {
        let h = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        let mut bufs = vec![(h, HDR_SIZE as u32, false)];
        if !payload.is_empty() {
            let p = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            bufs.push((p, payload.len() as u32, false));
        }
        self.send_chain(&bufs);
    }

    fn send_chain(&mut self, bufs: &[(u64, u32, bool)]) {
        self.tx.add_chain(&self.mem, bufs);
        self.tx
            .wait_used(&self.mem, Duration::from_secs(5))
            .expect("the device did not consume a tx packet");
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("v.sock")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// A host-initiated connection to guest port 1234, established.
fn host_connect(h: &mut Harness, guest_port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(h.socket()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let (req, _) = h.recv().expect("no OP_REQUEST");
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.src_cid, HOST_CID);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert_eq!(req.dst_port, guest_port);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    assert!(req.src_port >= 1 << 30);
    let local = req.src_port;
    h.send(guest_hdr(OP_RESPONSE, guest_port, local), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));
    (host, local)
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut h = Harness::new("host-init");
    h.post_rx(16);
    let (mut host, local) = host_connect(&mut h, 1234);

    host.write_all(b"hello guest").unwrap();
    let (pkt, data) = h.recv().unwrap();
    assert_eq!(pkt.op, OP_RW);
    assert_eq!((pkt.src_port, pkt.dst_port), (local, 1234));
    assert_eq!(data, b"hello guest");

    let mut rw = guest_hdr(OP_RW, 1234, local);
    rw.len = 11;
    h.send(rw, b"hello host!");
    assert_eq!(read_exact_timeout(&mut host, 11), b"hello host!");

    // The guest resets: the host sees the end of the stream.
    h.send(guest_hdr(OP_RST, 1234, local), &[]);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
    assert!(h.irq.signals[0].load(Ordering::SeqCst) > 0);
}

#[test]
fn host_connection_refused_by_guest_is_closed() {
    let mut h = Harness::new("refused");
    h.post_rx(4);
    let mut host = UnixStream::connect(h.socket()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = h.recv().unwrap();
    assert_eq!(req.op, OP_REQUEST);
    h.send(guest_hdr(OP_RST, 77, req.src_port), &[]);
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn an_unanswered_host_connect_times_out() {
    let mut h = Harness::new("timeout");
    h.post_rx(4);
    let mut host = UnixStream::connect(h.socket()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 88\n").unwrap();
    let (req, _) = h.recv().unwrap();
    assert_eq!(req.op, OP_REQUEST);
    let start = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    let (rst, _) = h.recv().unwrap();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 88));
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mut h = Harness::new("badline");
    h.post_rx(4);
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'A'; 40]] {
        let mut host = UnixStream::connect(h.socket()).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(line).unwrap();
        let mut b = [0u8; 8];
        // Closed: end of stream, or a reset when unread bytes were left.
        match host.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    h.no_packet();
}

#[test]
fn data_after_the_connect_line_waits_for_the_guest() {
    let mut h = Harness::new("early-data");
    h.post_rx(8);
    let mut host = UnixStream::connect(h.socket()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 5\nearly bytes").unwrap();
    let (req, _) = h.recv().unwrap();
    assert_eq!(req.op, OP_REQUEST);
    h.no_packet();
    h.send(guest_hdr(OP_RESPONSE, 5, req.src_port), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
    let (pkt, data) = h.recv().unwrap();
    assert_eq!(pkt.op, OP_RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut h = Harness::new("guest-init");
    let mut name = h.socket().into_os_string();
    name.push("_5000");
    let listener = UnixListener::bind(&name).unwrap();
    h.post_rx(16);
    h.send(guest_hdr(OP_REQUEST, 40000, 5000), &[]);
    let (resp, _) = h.recv().unwrap();
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 40000));
    assert_eq!(resp.dst_cid, GUEST_CID);
    let (mut host, _) = listener.accept().unwrap();

    let mut rw = guest_hdr(OP_RW, 40000, 5000);
    rw.len = 4;
    h.send(rw, b"ping");
    assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (pkt, data) = h.recv().unwrap();
    assert_eq!((pkt.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // The host closes: the guest is told neither side will send.
    drop(host);
    let (sd, _) = h.recv().unwrap();
    assert_eq!(sd.op, OP_SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_BOTH);
    h.send(guest_hdr(OP_RST, 40000, 5000), &[]);
    // The connection is gone: data on it is answered with an RST.
    let mut rw = guest_hdr(OP_RW, 40000, 5000);
    rw.len = 1;
    h.send(rw, b"x");
    assert_eq!(h.recv().unwrap().0.op, OP_RST);
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut h = Harness::new("no-listener");
    h.post_rx(4);
    h.send(guest_hdr(OP_REQUEST, 40001, 6000), &[]);
    let (rst, _) = h.recv().unwrap();
    assert_eq!(rst.op, OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, 40001));
}

#[test]
fn guest_shutdown_both_after_data_flushes_then_resets() {
    let mut h = Harness::new("guest-shutdown");
    h.post_rx(8);
    let (mut host, local) = host_connect(&mut h, 9);
    let mut rw = guest_hdr(OP_RW, 9, local);
    rw.len = 3;
    h.send(rw, b"bye");
    let mut sd = guest_hdr(OP_SHUTDOWN, 9, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_eq!(read_exact_timeout(&mut host, 3), b"bye");
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);
}

#[test]
fn half_closes_keep_the_other_direction_open() {
    let mut h = Harness::new("half-close");
    h.post_rx(16);
    let (mut host, local) = host_connect(&mut h, 15);

    // The guest will send no more: the host reads the end of the stream
    // and can still answer.
    let mut sd = guest_hdr(OP_SHUTDOWN, 15, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    host.write_all(b"answer").unwrap();
    let (pkt, data) = h.recv().unwrap();
    assert_eq!((pkt.op, data.as_slice()), (OP_RW, &b"answer"[..]));

    // The host will send no more either. Both directions of the host
    // socket are now shut, which it reports as a hang-up: the guest is
    // told (SEND, then possibly RCV too) and answers with an RST.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (pkt, _) = h.recv().unwrap();
    assert_eq!(pkt.op, OP_SHUTDOWN);
    assert_ne!(pkt.flags & SHUTDOWN_SEND, 0);
    if pkt.flags != SHUTDOWN_BOTH {
        let (pkt, _) = h.recv().unwrap();
        assert_eq!((pkt.op, pkt.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    }
    h.send(guest_hdr(OP_RST, 15, local), &[]);
    h.no_packet();
}

#[test]
fn host_half_close_leaves_the_guest_sending() {
    let mut h = Harness::new("host-half-close");
    h.post_rx(16);
    let (mut host, local) = host_connect(&mut h, 16);
    host.write_all(b"last words").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (pkt, data) = h.recv().unwrap();
    assert_eq!((pkt.op, data.as_slice()), (OP_RW, &b"last words"[..]));
    let (pkt, _) = h.recv().unwrap();
    assert_eq!((pkt.op, pkt.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let mut rw = guest_hdr(OP_RW, 16, local);
    rw.len = 5;
    h.send(rw, b"reply");
    assert_eq!(read_exact_timeout(&mut host, 5), b"reply");
    // The host closes for good: the guest hears the rest.
    drop(host);
    let (pkt, _) = h.recv().unwrap();
    assert_eq!((pkt.op, pkt.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new("credit-rx");
    h.post_rx(32);
    let mut name = h.socket().into_os_string();
    name.push("_7000");
    let listener = UnixListener::bind(&name).unwrap();
    let mut req = guest_hdr(OP_REQUEST, 41000, 7000);
    req.buf_alloc = 1000;
    h.send(req, &[]);
    assert_eq!(h.recv().unwrap().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 3000]).unwrap();

    let mut got = 0usize;
    while got < 1000 {
        let (pkt, data) = h.recv().expect("the device stopped short of the credit");
        assert_eq!(pkt.op, OP_RW);
        got += data.len();
    }
    h.no_packet();
    assert_eq!(got, 1000, "the device sent past the guest's credit");

    // The guest consumed 1000 bytes: 1000 more may come.
    let mut cu = guest_hdr(OP_CREDIT_UPDATE, 41000, 7000);
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 1000;
    h.send(cu, &[]);
    let mut more = 0usize;
    while more < 1000 {
        let (pkt, data) = h.recv().expect("no data after a credit update");
        assert_eq!(pkt.op, OP_RW);
        more += data.len();
    }
    h.no_packet();
    assert_eq!(more, 1000);
}

#[test]
fn guest_to_host_credit_is_bounded_and_enforced() {
    let mut h = Harness::new("credit-tx");
    h.post_rx(64);
    let (host, local) = host_connect(&mut h, 11);
    // The host never reads. Send 64 KiB packets until the device resets
    // the connection; it must have accepted at least its advertised credit.
    let chunk = vec![0x5au8; MAX_PKT_PAYLOAD as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..200 {
        let mut rw = guest_hdr(OP_RW, 11, local);
        rw.len = chunk.len() as u32;
        h.send(rw, &chunk);
        sent += chunk.len();
        if let Some((pkt, _)) = h.recv_within(Duration::from_millis(5)) {
            if pkt.op == OP_RST {
                reset = true;
                break;
            }
            // A credit update would mean the host read something.
            assert_ne!(pkt.op, OP_RW);
        }
    }
    assert!(reset, "a guest overrunning its credit was not reset");
    assert!(sent > CONN_BUF_SIZE as usize);
    drop(host);
}

#[test]
fn credit_update_follows_forwarded_bytes() {
    let mut h = Harness::new("credit-update");
    h.post_rx(16);
    let (mut host, local) = host_connect(&mut h, 12);
    let chunk = vec![1u8; 32 * 1024];
    let mut rw = guest_hdr(OP_RW, 12, local);
    rw.len = chunk.len() as u32;
    for _ in 0..3 {
        h.send(rw, &chunk);
    }
    let _ = read_exact_timeout(&mut host, 3 * chunk.len());
    let (pkt, _) = h.recv().unwrap();
    assert_eq!(pkt.op, OP_CREDIT_UPDATE);
    assert_eq!(pkt.buf_alloc, CONN_BUF_SIZE);
    assert!(pkt.fwd_cnt >= CONN_BUF_SIZE / 4);
    // A credit request is answered with the exact count.
    h.send(guest_hdr(OP_CREDIT_REQUEST, 12, local), &[]);
    let (pkt, _) = h.recv().unwrap();
    assert_eq!(pkt.op, OP_CREDIT_UPDATE);
    assert_eq!(pkt.fwd_cnt, 3 * 32 * 1024);
}

#[test]
fn hostile_packets_fail_alone() {
    let mut h = Harness::new("hostile");
    h.post_rx(64);
    let (mut host, local) = host_connect(&mut h, 13);

    // Wrong CIDs: dropped without an answer.
    let mut p = guest_hdr(OP_RW, 13, local);
    p.src_cid = 99;
    h.send(p, &[]);
    let mut p = guest_hdr(OP_REQUEST, 13, 5);
    p.dst_cid = 7;
    h.send(p, &[]);
    h.no_packet();

    // An RST for nothing is not answered; other packets for nothing are.
    h.send(guest_hdr(OP_RST, 1, 2), &[]);
    h.no_packet();
    h.send(guest_hdr(OP_CREDIT_UPDATE, 1, 2), &[]);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);

    // Unknown op, unknown type, and op 0.
    for (op, ty) in [(99u16, TYPE_STREAM), (OP_RW, 2), (0, TYPE_STREAM)] {
        let mut p = guest_hdr(op, 500, 600);
        p.type_ = ty;
        h.send(p, &[]);
        let (r, _) = h.recv().unwrap();
        assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 600, 500));
    }

    // Header shorter than 44 bytes; empty chain: dropped.
    let a = h.alloc(64);
    h.send_chain(&[(a, 20, false)]);
    h.no_packet();

    // len larger than the chain, and larger than 64 KiB.
    let mut p = guest_hdr(OP_RW, 700, 800);
    p.len = 100;
    h.send(p, &[1, 2, 3]);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);
    let mut p = guest_hdr(OP_RW, 700, 800);
    p.len = MAX_PKT_PAYLOAD + 1;
    let big = vec![0u8; MAX_PKT_PAYLOAD as usize + 1];
    h.send(p, &big);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);

    // A writable descriptor in a tx chain, and a buffer outside memory.
    let hdr_at = h.alloc(64);
    h.mem
        .write_slice(
            &guest_hdr(OP_REQUEST, 900, 901).to_bytes(),
            GuestAddress(hdr_at),
        )
        .unwrap();
    let w = h.alloc(64);
    h.send_chain(&[(hdr_at, HDR_SIZE as u32, false), (w, 64, true)]);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);
    h.send_chain(&[(hdr_at, HDR_SIZE as u32, false), (u64::MAX - 10, 64, false)]);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);

    // A descriptor loop: the chain is cut, the header still parses.
    let i =
        h.tx.write_desc(&h.mem, hdr_at, HDR_SIZE as u32, F_NEXT, h.tx.next_desc);
    h.tx.publish(&h.mem, i);
    h.tx.wait_used(&h.mem, Duration::from_secs(5)).unwrap();
    while h.recv_within(Duration::from_millis(100)).is_some() {}

    // A RESPONSE for an established connection resets it.
    h.send(guest_hdr(OP_RESPONSE, 13, local), &[]);
    assert_eq!(h.recv().unwrap().0.op, OP_RST);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);

    // The device still serves: a fresh host connection works.
    let (mut host2, local2) = host_connect(&mut h, 14);
    host2.write_all(b"still here").unwrap();
    let (pkt, data) = h.recv().unwrap();
    assert_eq!((pkt.op, pkt.src_port), (OP_RW, local2));
    assert_eq!(data, b"still here");
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn hostile_rx_buffers_are_returned_empty() {
    let mut h = Harness::new("hostile-rx");
    // Readable, too short for a header, outside memory, looping.
    let r = h.alloc(64);
    h.rx.add_chain(&h.mem, &[(r, 64, false)]);
    h.rx.add_chain(&h.mem, &[(r, 10, true)]);
    h.rx.add_chain(&h.mem, &[(u64::MAX - 100, 4096, true)]);
    h.rx.add_chain(&h.mem, &[(r, 40, true), (r, 64, false)]);
    // Something for the guest: an RST for a packet on no connection.
    h.send(guest_hdr(OP_CREDIT_UPDATE, 3, 4), &[]);
    for _ in 0..4 {
        let (_, len) = h.rx.wait_used(&h.mem, Duration::from_secs(5)).unwrap();
        assert_eq!(len, 0);
    }
    h.post_rx(4);
    let (rst, _) = h.recv().unwrap();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 4, 3));
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn a_broken_avail_ring_needs_reset_and_spares_the_process() {
    let mut h = Harness::new("bad-avail");
    // avail idx 1000 ahead of next_avail in a 256-entry ring.
    h.mem
        .write_obj(1000u16, GuestAddress(h.tx.avail + 2))
        .unwrap();
    h.tx.kick.write(1).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while h.irq.needs_reset.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < end, "NEEDS_RESET not set");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.dev.reset();
}

#[test]
fn new_checks_the_socket_path() {
    let dir = temp_dir("paths");
    let cfg = |p: PathBuf| VsockConfig {
        cid: 3,
        socket: p,
        id: None,
    };
    let missing = Vsock::new(&cfg(dir.join("nodir/v.sock"))).unwrap_err();
    assert!(
        matches!(missing, VsockError::SocketDirMissing(_)),
        "{missing}"
    );

    let file = dir.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let e = Vsock::new(&cfg(file.clone())).unwrap_err();
    assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
    assert!(file.exists());

    let sock = dir.join("v.sock");
    let first = Vsock::new(&cfg(sock.clone())).unwrap();
    let e = Vsock::new(&cfg(sock.clone())).unwrap_err();
    assert!(matches!(e, VsockError::SocketInUse(_)), "{e}");
    drop(first);
    assert!(!sock.exists(), "the device leaves its socket behind");

    // A stale socket file (its listener is gone) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let dev = Vsock::new(&cfg(sock.clone())).unwrap();
    assert!(UnixStream::connect(&sock).is_ok());

    let e = Vsock::new(&cfg(dir.join("x.sock")).clone());
    assert!(e.is_ok());
    assert!(matches!(
        Vsock::new(&VsockConfig {
            cid: 2,
            socket: dir.join("y.sock"),
            id: None
        }),
        Err(VsockError::Cid(2))
    ));
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_features_and_state() {
    let dir = temp_dir("state");
    let mut dev = Vsock::new(&VsockConfig {
        cid: 0x1_0000_0003 & 0xffff_ffff,
        socket: dir.join("v.sock"),
        id: None,
    })
    .unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_ne!(dev.features() & F_STREAM, 0);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    let mut b = [0xffu8; 4];
    dev.read_config(8, &mut b);
    assert_eq!(b, [0; 4]);

    let state: VsockState = serde_json::from_value(dev.state()).unwrap();
    assert_eq!(state.version, VSOCK_STATE_VERSION);
    assert_eq!(state.guest_cid, 3);
    dev.reset();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn activation_needs_rx_and_tx() {
    let dir = temp_dir("activate");
    let mut dev = Vsock::new(&VsockConfig {
        cid: 3,
        socket: dir.join("v.sock"),
        id: None,
    })
    .unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let e = dev.activate(Activation {
        memory: mem.clone(),
        interrupt: Arc::new(Irq::default()),
        queues: vec![ActiveQueue {
            index: 1,
            queue: mock.create_queue().unwrap(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        acked_features: 0,
    });
    assert!(e.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reset_closes_host_connections_and_keeps_queue_state() {
    let mut h = Harness::new("reset");
    h.post_rx(8);
    let (mut host, _) = host_connect(&mut h, 20);
    h.dev.reset();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    let state = h.dev.vsock_state();
    assert_eq!(state.queues.len(), 3);
    assert!(state.queues[0].next_used > 0);
    assert_eq!(state.acked_features, h.dev.features());
}
