//! virtio-net tests: the data path over a socketpair with hostile chains,
//! and the real thing on host TAP devices (needs root and /dev/net/tun;
//! every tap is created with a unique name and vanishes with its fds).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::queue::{MAX_CHAIN_LEN, NetQueueError};
use super::*;
use crate::GuestMemory;
use crate::virtio::VirtioInterrupt;

const QSIZE: u16 = 16;
const RXQ: u64 = 0x0;
const TXQ: u64 = 0x1_0000;
const BUFS: u64 = 0x4_0000;
const MEM_SIZE: usize = 0x20_0000;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// (address, length, device-writable)
type D = (u64, u32, bool);

/// Puts one chain at descriptor index `at` and makes it available.
fn add_chain(q: &MockSplitQueue<GuestMemory>, at: u16, descs: &[D]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let last = i + 1 == descs.len();
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, at + i as u16 + 1))
        })
        .collect();
    q.add_desc_chains(&raw, at).unwrap();
}

/// Used element `i`: (id, len).
fn used(mem: &GuestMemory, q: &MockSplitQueue<GuestMemory>, i: u64) -> (u32, u32) {
    let base = q.used_addr().0 + 4 + 8 * i;
    (
        mem.read_obj::<u32>(GuestAddress(base)).unwrap(),
        mem.read_obj::<u32>(GuestAddress(base + 4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemory, q: &MockSplitQueue<GuestMemory>) -> u16 {
    mem.read_obj::<u16>(GuestAddress(q.used_addr().0 + 2))
        .unwrap()
}

fn pair_config(mrg: bool, max_rx_frame: usize) -> PairConfig {
    PairConfig {
        rx_index: 0,
        tx_index: 1,
        mrg_rxbuf: mrg,
        max_rx_frame,
    }
}

struct Rig<'m, B> {
    rxq: MockSplitQueue<'m, GuestMemory>,
    txq: MockSplitQueue<'m, GuestMemory>,
    pair: QueuePair<B>,
    counters: Arc<NetCounters>,
}

fn rig<B: AsRawFd>(mem: &GuestMemory, backend: B, cfg: PairConfig) -> Rig<'_, B> {
    let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(mem, GuestAddress(TXQ), QSIZE);
    let counters = Arc::new(NetCounters::default());
    let pair = QueuePair::new(
        backend,
        rxq.create_queue::<Queue>().unwrap(),
        txq.create_queue::<Queue>().unwrap(),
        cfg,
        counters.clone(),
    );
    Rig {
        rxq,
        txq,
        pair,
        counters,
    }
}

fn socketpair() -> (UnixDatagram, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn mac_is_stable_local_and_unicast() {
    let a = derive_mac("tap0", 0);
    assert_eq!(a, derive_mac("tap0", 0));
    assert_ne!(a, derive_mac("tap0", 1));
    assert_ne!(a, derive_mac("tap1", 0));
    for (name, i) in [("", 0), ("x", 7), ("keel-long-name", 3)] {
        let m = derive_mac(name, i);
        assert_eq!(m.0[0] & 0x02, 0x02, "{m} not locally administered");
        assert_eq!(m.0[0] & 0x01, 0, "{m} is multicast");
    }
}

#[test]
fn offloads_follow_guest_features() {
    assert_eq!(tap_offloads(0), 0);
    // TSO without checksum offload makes no sense: nothing.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    let all = bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(
        tap_offloads(all),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        libc::TUN_F_CSUM
    );
}

#[test]
fn bad_configs_are_refused_before_any_tap_is_touched() {
    let base = NetConfig::parse("tap=ktcfg0").unwrap();
    let cases = [
        NetConfig {
            num_queues: 3,
            ..base.clone()
        },
        NetConfig {
            queue_size: 100,
            ..base.clone()
        },
        NetConfig {
            mac: Some(MacAddr([1, 2, 3, 4, 5, 6])),
            ..base.clone()
        },
        NetConfig {
            tap: Some("a/b".into()),
            ..base.clone()
        },
        NetConfig {
            mask: Some("255.255.255.0".parse().unwrap()),
            ..base.clone()
        },
    ];
    for c in cases {
        match Net::new(&c, 0) {
            Err(NetError::Config(m)) => assert!(m.contains("net"), "{m}"),
            Err(e) => panic!("{c:?}: wrong error {e}"),
            Ok(_) => panic!("{c:?} accepted"),
        }
    }
    assert!(NetConfig::parse("tap=x,mac=zz:00:00:00:00:00").is_err());
    assert!(NetConfig::parse("tap=x,ip=300.1.1.1").is_err());
    assert!(NetConfig::parse("tap=x,bogus=1").is_err());
}

#[test]
fn tx_sends_each_chain_as_one_datagram() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    // Header and frame in separate descriptors, then in one.
    let f1 = frame(100, 1);
    mem.write_slice(&[0u8; 12], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&f1, GuestAddress(BUFS + 0x100)).unwrap();
    add_chain(&r.txq, 0, &[(BUFS, 12, false), (BUFS + 0x100, 100, false)]);
    let f2 = frame(60, 2);
    let mut hdr_and_frame = vec![0u8; 12];
    hdr_and_frame.extend_from_slice(&f2);
    mem.write_slice(&hdr_and_frame, GuestAddress(BUFS + 0x1000))
        .unwrap();
    add_chain(&r.txq, 2, &[(BUFS + 0x1000, 72, false)]);

    let out = r.pair.process_tx(&mem).unwrap();
    assert!(out.used && !out.blocked);
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(n, 112);
    assert_eq!(&buf[12..n], &f1[..]);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[12..n], &f2[..]);
    assert_eq!(used_idx(&mem, &r.txq), 2);
    assert_eq!(used(&mem, &r.txq, 0), (0, 0));
    assert_eq!(used(&mem, &r.txq, 1), (2, 0));
    let c = r.counters.snapshot();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (2, 160, 0));
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_queue_goes_on() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    // Shorter than the header.
    add_chain(&r.txq, 0, &[(BUFS, 8, false)]);
    // A device-writable descriptor in a TX chain.
    add_chain(&r.txq, 1, &[(BUFS, 12, false), (BUFS + 0x100, 50, true)]);
    // More than 64 KiB of frame.
    add_chain(&r.txq, 3, &[(BUFS, MAX_CHAIN_LEN as u32 + 1, false)]);
    // Outside guest memory.
    add_chain(&r.txq, 4, &[(MEM_SIZE as u64 - 4, 64, false)]);
    // Zero-length descriptors only.
    add_chain(&r.txq, 5, &[(BUFS, 0, false), (BUFS, 0, false)]);
    // A loop: 7 -> 8 -> 7 ...
    r.txq
        .desc_table()
        .store(
            7,
            RawDescriptor::from(SplitDescriptor::new(BUFS, 12, VRING_DESC_F_NEXT as u16, 8)),
        )
        .unwrap();
    r.txq
        .desc_table()
        .store(
            8,
            RawDescriptor::from(SplitDescriptor::new(BUFS, 12, VRING_DESC_F_NEXT as u16, 7)),
        )
        .unwrap();
    // Make head 7 available by hand.
    let avail = r.txq.avail_addr().0;
    let idx = mem.read_obj::<u16>(GuestAddress(avail + 2)).unwrap();
    mem.write_obj(7u16, GuestAddress(avail + 4 + 2 * u64::from(idx)))
        .unwrap();
    mem.write_obj(idx + 1, GuestAddress(avail + 2)).unwrap();
    // A good one after all that.
    let f = frame(40, 9);
    mem.write_slice(&[0u8; 12], GuestAddress(BUFS + 0x2000))
        .unwrap();
    mem.write_slice(&f, GuestAddress(BUFS + 0x2000 + 12))
        .unwrap();
    add_chain(&r.txq, 10, &[(BUFS + 0x2000, 52, false)]);

    r.pair.process_tx(&mem).unwrap();
    assert_eq!(used_idx(&mem, &r.txq), 7);
    for i in 0..7 {
        assert_eq!(used(&mem, &r.txq, i).1, 0);
    }
    let mut buf = [0u8; 128];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[12..n], &f[..]);
    assert!(peer.recv(&mut buf).is_err(), "a dropped chain was sent");
    let c = r.counters.snapshot();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 6));
}

#[test]
fn an_impossible_avail_index_is_an_error_not_a_spin() {
    let mem = memory();
    let (ours, _peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    mem.write_obj(QSIZE + 5, GuestAddress(r.txq.avail_addr().0 + 2))
        .unwrap();
    assert!(matches!(
        r.pair.process_tx(&mem),
        Err(NetQueueError::AvailIndex { .. })
    ));
    mem.write_obj(QSIZE + 5, GuestAddress(r.rxq.avail_addr().0 + 2))
        .unwrap();
    assert!(r.pair.process_rx(&mem).is_err());
}

#[test]
fn rx_fills_one_chain_per_frame_without_mergeable_buffers() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    add_chain(&r.rxq, 0, &[(BUFS, 10, true), (BUFS + 0x100, 2000, true)]);
    add_chain(&r.rxq, 2, &[(BUFS + 0x1000, 2000, true)]);
    let mut d = vec![0u8; 12];
    let f = frame(300, 3);
    d.extend_from_slice(&f);
    peer.send(&d).unwrap();
    peer.send(&d[..100]).unwrap();

    let out = r.pair.process_rx(&mem).unwrap();
    // Both buffers used: the ring is empty, so the tap is left alone.
    assert!(out.used && out.starved);
    assert_eq!(used_idx(&mem, &r.rxq), 2);
    assert_eq!(used(&mem, &r.rxq, 0), (0, 312));
    assert_eq!(used(&mem, &r.rxq, 1), (2, 100));
    // num_buffers (header bytes 10..12) lands in the second descriptor.
    let mut got = vec![0u8; 302];
    mem.read_slice(&mut got, GuestAddress(BUFS + 0x100))
        .unwrap();
    assert_eq!(&got[..2], &1u16.to_le_bytes());
    assert_eq!(&got[2..], &f[..]);
    let c = r.counters.snapshot();
    assert_eq!((c.rx_frames, c.rx_bytes), (2, 300 + 88));

    // Out of buffers with a frame waiting: starved, nothing consumed.
    peer.send(&d).unwrap();
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.starved && !out.used);
    // A new buffer: the frame goes there.
    add_chain(&r.rxq, 3, &[(BUFS + 0x2000, 2000, true)]);
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.used);
    assert_eq!(used(&mem, &r.rxq, 2), (3, 312));
}

#[test]
fn rx_merges_small_buffers_and_returns_the_unused_ones() {
    let mem = memory();
    let (ours, peer) = socketpair();
    // Largest frame 1500: 1512 bytes of room are gathered before reading.
    let mut r = rig(&mem, ours, pair_config(true, 1500));
    for i in 0..5u16 {
        add_chain(&r.rxq, i, &[(BUFS + u64::from(i) * 0x1000, 512, true)]);
    }
    let mut d = vec![0u8; 12];
    let f = frame(900, 4);
    d.extend_from_slice(&f);
    peer.send(&d).unwrap();
    r.pair.process_rx(&mem).unwrap();
    // 912 bytes: two chains used, the third (gathered) given back.
    assert_eq!(used_idx(&mem, &r.rxq), 1 + 1);
    assert_eq!(used(&mem, &r.rxq, 0), (0, 512));
    assert_eq!(used(&mem, &r.rxq, 1), (1, 400));
    assert_eq!(r.pair.rx_next_avail(), 2);
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(BUFS + 10)).unwrap(),
        2,
        "num_buffers"
    );
    let mut got = vec![0u8; 900];
    mem.read_slice(&mut got[..500], GuestAddress(BUFS + 12))
        .unwrap();
    mem.read_slice(&mut got[500..], GuestAddress(BUFS + 0x1000))
        .unwrap();
    assert_eq!(got, f);

    // Three chains left (1536 bytes) is enough; two would not be.
    peer.send(&d).unwrap();
    r.pair.process_rx(&mem).unwrap();
    assert_eq!(used_idx(&mem, &r.rxq), 4);
    assert_eq!(r.pair.rx_next_avail(), 4);
    peer.send(&d).unwrap();
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.starved, "one 512-byte buffer must not take a frame");
    assert_eq!(r.pair.rx_next_avail(), 4);
}

/// Linux without mergeable buffers posts "big packets" chains (a header
/// descriptor and 17 pages): more room than any one frame needs, which is
/// not a reason to refuse them.
#[test]
fn rx_takes_chains_larger_than_a_frame() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, MAX_CHAIN_LEN));
    let mut chain = vec![(BUFS, 12, true)];
    chain.extend((0..9u64).map(|i| (BUFS + 0x2000 * (i + 1), 0x2000, true)));
    assert!(chain.iter().map(|c| c.1 as usize).sum::<usize>() > MAX_CHAIN_LEN);
    add_chain(&r.rxq, 0, &chain);
    let mut d = vec![0u8; 12];
    let f = frame(1000, 9);
    d.extend_from_slice(&f);
    peer.send(&d).unwrap();
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.used);
    assert_eq!(used(&mem, &r.rxq, 0), (0, 1012));
    let mut got = vec![0u8; 1000];
    mem.read_slice(&mut got, GuestAddress(BUFS + 0x2000))
        .unwrap();
    assert_eq!(got, f);
}

#[test]
fn hostile_rx_chains_are_dropped() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    // A read-only descriptor in RX.
    add_chain(&r.rxq, 0, &[(BUFS, 12, true), (BUFS + 0x100, 100, false)]);
    // Too small for the header.
    add_chain(&r.rxq, 2, &[(BUFS, 4, true)]);
    // Outside memory.
    add_chain(&r.rxq, 3, &[(u64::MAX - 8, 100, true)]);
    // Absurdly long.
    add_chain(&r.rxq, 4, &[(BUFS, u32::MAX, true)]);
    add_chain(&r.rxq, 5, &[(BUFS + 0x1000, 2000, true)]);
    let mut d = vec![0u8; 12];
    d.extend_from_slice(&frame(64, 5));
    peer.send(&d).unwrap();
    r.pair.process_rx(&mem).unwrap();
    assert_eq!(used_idx(&mem, &r.rxq), 5);
    for i in 0..4 {
        assert_eq!(used(&mem, &r.rxq, i).1, 0);
    }
    assert_eq!(used(&mem, &r.rxq, 4), (5, 76));
    assert_eq!(r.counters.snapshot().rx_dropped, 4);
}

// ---- Real TAP devices ----

static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

fn unique_tap() -> String {
    let n = TAP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("kt{}x{n}", std::process::id() % 100_000)
}

fn quiet_ipv6(name: &str) {
    // Keep the kernel's own IPv6 chatter off the test's interface.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}")).exists()
}

/// An AF_PACKET socket on `name`: the host's side of the wire.
fn packet_socket(name: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(ifindex > 0);
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    fd
}

const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6]; // broadcast
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend(frame(len - 14, seed));
    f
}

/// Waits for a frame with the test ethertype on `fd`.
fn recv_test_frame(fd: &OwnedFd) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 70000];
    while Instant::now() < deadline {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && buf[12..14] == TEST_ETHERTYPE {
            return buf[..n as usize].to_vec();
        }
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("no test frame arrived");
}

fn send_frame(fd: &OwnedFd, f: &[u8]) {
    // SAFETY: f is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
}

fn open_test_tap() -> Arc<Tap> {
    let name = unique_tap();
    let tap = Tap::open(Some(&name), false).unwrap();
    quiet_ipv6(&name);
    tap.set_up().unwrap();
    Arc::new(tap)
}

#[test]
fn tap_tx_frame_reaches_the_host_interface() {
    let tap = open_test_tap();
    let sock = packet_socket(tap.name());
    let mem = memory();
    let mut r = rig(&mem, tap.clone(), pair_config(false, 1514));
    let f = test_frame(200, 7);
    mem.write_slice(&[0u8; 12], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&f, GuestAddress(BUFS + 0x100)).unwrap();
    add_chain(&r.txq, 0, &[(BUFS, 12, false), (BUFS + 0x100, 200, false)]);
    let out = r.pair.process_tx(&mem).unwrap();
    assert!(out.used);
    assert_eq!(recv_test_frame(&sock), f);
    assert_eq!(r.counters.snapshot().tx_frames, 1);
    let name = tap.name().to_string();
    drop(r);
    drop(tap);
    assert!(!link_exists(&name), "tap {name} outlived its fds");
}

#[test]
fn tap_rx_frame_lands_in_guest_buffers() {
    let tap = open_test_tap();
    let sock = packet_socket(tap.name());
    let mem = memory();
    let mut r = rig(&mem, tap.clone(), pair_config(true, 1514));
    for i in 0..4u16 {
        add_chain(&r.rxq, i, &[(BUFS + u64::from(i) * 0x1000, 1536, true)]);
    }
    let f = test_frame(1000, 8);
    send_frame(&sock, &f);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    while !found && Instant::now() < deadline {
        r.pair.process_rx(&mem).unwrap();
        for i in 0..u64::from(used_idx(&mem, &r.rxq)) {
            let (id, len) = used(&mem, &r.rxq, i);
            if len as usize != 12 + f.len() {
                continue;
            }
            let mut got = vec![0u8; f.len()];
            mem.read_slice(&mut got, GuestAddress(BUFS + u64::from(id) * 0x1000 + 12))
                .unwrap();
            found = got == f;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(found, "the frame sent on the host never reached the guest");
    assert!(r.counters.snapshot().rx_frames >= 1);
}

#[test]
fn net_creates_a_kernel_named_tap_and_sets_the_host_address() {
    let cfg = NetConfig {
        tap: None,
        mac: None,
        ip: Some("10.213.77.1".parse().unwrap()),
        mask: Some("255.255.255.0".parse().unwrap()),
        num_queues: 2,
        queue_size: 256,
        id: Some("nettest".into()),
        fds: None,
    };
    let net = Net::new(&cfg, 3).unwrap();
    let name = net.tap_name().to_string();
    assert!(name.starts_with("keel"), "{name}");
    assert!(link_exists(&name));
    let out = std::process::Command::new("ip")
        .args(["-4", "addr", "show", "dev", &name])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("10.213.77.1/24"), "{text}");
        assert!(text.contains("UP"), "{text}");
    }
    assert_eq!(net.mac(), derive_mac("nettest", 3));
    let mut cfg_bytes = [0u8; 10];
    net.read_config(0, &mut cfg_bytes);
    assert_eq!(&cfg_bytes[..6], &net.mac().0);
    assert_eq!(u16::from_le_bytes([cfg_bytes[6], cfg_bytes[7]]), 1);
    assert_eq!(u16::from_le_bytes([cfg_bytes[8], cfg_bytes[9]]), 1);
    assert_eq!(net.features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    drop(net);
    assert!(!link_exists(&name));
}

#[test]
fn a_tap_with_incompatible_flags_gives_an_error_naming_it() {
    let name = unique_tap();
    let _held = Tap::open(Some(&name), false).unwrap();
    // A multi-queue open of a single-queue tap.
    let cfg = NetConfig::parse(&format!("tap={name},num_queues=4")).unwrap();
    let Err(e) = Net::new(&cfg, 0) else {
        panic!("attached to an incompatible tap");
    };
    let msg = e.to_string();
    assert!(
        msg.contains(&name) && msg.contains("single-queue TAP") && msg.contains("multi_queue"),
        "{msg}"
    );
}

#[test]
fn multi_queue_tap_offers_mq_and_switches_pairs() {
    let name = unique_tap();
    let cfg = NetConfig::parse(&format!("tap={name},num_queues=6,queue_size=64")).unwrap();
    let net = Net::new(&cfg, 0).unwrap();
    assert_eq!(net.taps.len(), 3);
    assert_ne!(net.features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_ne!(net.features() & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(net.queue_max_sizes().len(), 7);
    let mut pairs = [0u8; 2];
    net.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 3);
    set_active_pairs(&net.taps, 1).unwrap();
    set_active_pairs(&net.taps, 1).unwrap();
    set_active_pairs(&net.taps, 3).unwrap();
    set_active_pairs(&net.taps, 2).unwrap();
}

#[derive(Default)]
struct Irq {
    queue: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _: u16) -> io::Result<()> {
        self.queue.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

fn active(mock: &MockSplitQueue<GuestMemory>, index: u16) -> (ActiveQueue, EventFd) {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    (
        ActiveQueue {
            index,
            queue: mock.create_queue::<Queue>().unwrap(),
            kick: kick.try_clone().unwrap(),
        },
        kick,
    )
}

#[test]
fn activated_device_moves_frames_both_ways_on_its_worker() {
    let name = unique_tap();
    let cfg = NetConfig::parse(&format!("tap={name},queue_size=16")).unwrap();
    quiet_ipv6(&name);
    let mut net = Net::new(&cfg, 0).unwrap();
    quiet_ipv6(&name);
    let sock = packet_socket(&name);
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);
    let (rx, rx_kick) = active(&rxq, 0);
    let (tx, tx_kick) = active(&txq, 1);
    let irq = Arc::new(Irq::default());
    let acked = net.features();
    net.activate(Activation {
        memory: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![rx, tx],
        acked_features: acked,
    })
    .unwrap();

    // TX: the guest queues a frame and kicks.
    let f = test_frame(500, 11);
    mem.write_slice(&[0u8; 12], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&f, GuestAddress(BUFS + 12)).unwrap();
    add_chain(&txq, 0, &[(BUFS, 512, false)]);
    tx_kick.write(1).unwrap();
    assert_eq!(recv_test_frame(&sock), f);

    // RX: the guest posts buffers and kicks; the host sends a frame.
    for i in 0..8u16 {
        add_chain(
            &rxq,
            i,
            &[(BUFS + 0x1000 * (u64::from(i) + 1), 0x1000, true)],
        );
    }
    // Mergeable buffers with guest TSO want 64 KiB of room: post more.
    for i in 8..16u16 {
        add_chain(
            &rxq,
            i,
            &[(BUFS + 0x10000 * (u64::from(i) - 6), 0x10000, true)],
        );
    }
    rx_kick.write(1).unwrap();
    let g = test_frame(700, 12);
    send_frame(&sock, &g);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    while !found && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        for i in 0..u64::from(used_idx(&mem, &rxq)) {
            let (id, len) = used(&mem, &rxq, i);
            if len as usize == 12 + g.len() {
                let base = if id < 8 {
                    BUFS + 0x1000 * (u64::from(id) + 1)
                } else {
                    BUFS + 0x10000 * (u64::from(id) - 6)
                };
                let mut got = vec![0u8; g.len()];
                mem.read_slice(&mut got, GuestAddress(base + 12)).unwrap();
                found |= got == g;
            }
        }
    }
    assert!(found, "the host's frame never reached the guest");
    // The used entry is visible a moment before the worker interrupts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while irq.queue.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(irq.queue.load(Ordering::SeqCst) >= 2);
    assert_eq!(irq.needs_reset.load(Ordering::SeqCst), 0);
    let state = net.state();
    assert_eq!(state["version"], 1);
    assert_eq!(state["tap"], name.as_str());
    net.reset();
}

#[test]
fn the_kernel_accepts_every_offload_set_we_derive() {
    let tap = Tap::open(Some(&unique_tap()), false).unwrap();
    let guest = [
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
    ];
    for mask in 0..(1u32 << guest.len()) {
        let acked = guest
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .fold(0u64, |a, (_, f)| a | bit(*f));
        tap.set_offload(tap_offloads(acked))
            .unwrap_or_else(|e| panic!("features {acked:#x}: {e}"));
    }
}

#[test]
fn a_starved_rx_queue_asks_for_the_next_buffer_with_event_idx() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(true, 1500));
    r.pair.rx.set_event_idx(true);
    // One 512-byte buffer cannot take a 1500-byte frame: left in the ring.
    add_chain(&r.rxq, 0, &[(BUFS, 512, true)]);
    let mut d = vec![0u8; 12];
    d.extend_from_slice(&frame(100, 6));
    peer.send(&d).unwrap();
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.starved && !out.used);
    assert_eq!(r.pair.rx_next_avail(), 0);
    // avail_event (after the used ring) points past the buffer we left, so
    // the driver's next buffer kicks us.
    let avail_event = GuestAddress(r.rxq.used_addr().0 + 4 + 8 * u64::from(QSIZE));
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);
    for i in 1..3u16 {
        add_chain(&r.rxq, i, &[(BUFS + u64::from(i) * 0x1000, 512, true)]);
    }
    let out = r.pair.process_rx(&mem).unwrap();
    assert!(out.used);
    assert_eq!(used(&mem, &r.rxq, 0), (0, 112));
    assert_eq!(r.pair.rx_next_avail(), 1);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_not_truncated() {
    let tap = open_test_tap();
    let sock = packet_socket(tap.name());
    let mem = memory();
    let mut r = rig(&mem, tap.clone(), pair_config(false, 1514));
    add_chain(&r.rxq, 0, &[(BUFS, 100, true)]);
    send_frame(&sock, &test_frame(500, 13));
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.counters.snapshot().rx_dropped == 0 && Instant::now() < deadline {
        r.pair.process_rx(&mem).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(r.counters.snapshot().rx_dropped >= 1);
    for i in 0..u64::from(used_idx(&mem, &r.rxq)) {
        assert!(used(&mem, &r.rxq, i).1 <= 100);
    }
}

#[test]
fn a_frame_that_exactly_fits_is_delivered_one_byte_more_is_dropped() {
    let mem = memory();
    let (ours, peer) = socketpair();
    let mut r = rig(&mem, ours, pair_config(false, 1514));
    add_chain(&r.rxq, 0, &[(BUFS, 100, true)]);
    peer.send(&frame(101, 1)).unwrap();
    r.pair.process_rx(&mem).unwrap();
    assert_eq!(used_idx(&mem, &r.rxq), 0);
    assert_eq!(
        r.pair.rx_next_avail(),
        0,
        "the buffer goes back to the ring"
    );
    assert_eq!(r.counters.snapshot().rx_dropped, 1);
    peer.send(&frame(100, 1)).unwrap();
    r.pair.process_rx(&mem).unwrap();
    assert_eq!(used(&mem, &r.rxq, 0), (0, 100));
}

/// How many of this process's threads have a name starting with `prefix`,
/// and the CPU time (clock ticks) they used so far.
fn thread_ticks(prefix: &str) -> (usize, u64) {
    let (mut threads, mut total) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        threads += 1;
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: utime and stime are the
        // 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        total += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    }
    (threads, total)
}

#[test]
fn multi_queue_device_sets_pairs_over_the_control_queue_without_spinning() {
    let name = unique_tap();
    let cfg = NetConfig::parse(&format!("tap={name},num_queues=6,queue_size=16")).unwrap();
    let mut net = Net::new(&cfg, 0).unwrap();
    quiet_ipv6(&name);
    let sock = packet_socket(&name);
    let mem = memory();
    let rings: Vec<MockSplitQueue<GuestMemory>> = (0..7u64)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x2_0000 + i * 0x1000), QSIZE))
        .collect();
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    for (i, ring) in rings.iter().enumerate() {
        let (q, k) = active(ring, i as u16);
        queues.push(q);
        kicks.push(k);
    }
    let irq = Arc::new(Irq::default());
    let acked = net.features();
    assert_ne!(acked & bit(VIRTIO_NET_F_MQ), 0);
    net.activate(Activation {
        memory: mem.clone(),
        interrupt: irq.clone(),
        queues,
        acked_features: acked,
    })
    .unwrap();

    // Two of three pairs: class MQ (4), command VQ_PAIRS_SET (0), 2 pairs.
    let cmd = BUFS;
    mem.write_slice(&[4, 0, 2, 0], GuestAddress(cmd)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(cmd + 0x100)).unwrap();
    add_chain(
        &rings[6],
        0,
        &[(cmd, 2, false), (cmd + 2, 2, false), (cmd + 0x100, 1, true)],
    );
    kicks[6].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while used_idx(&mem, &rings[6]) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(used(&mem, &rings[6], 0), (0, 1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(cmd + 0x100)).unwrap(), 0);
    assert_eq!(net.state()["active_queue_pairs"], 2);
    // A pair count the device does not have is refused.
    mem.write_slice(&[4, 0, 9, 0], GuestAddress(cmd)).unwrap();
    add_chain(
        &rings[6],
        3,
        &[(cmd, 2, false), (cmd + 2, 2, false), (cmd + 0x100, 1, true)],
    );
    kicks[6].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while used_idx(&mem, &rings[6]) == 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(cmd + 0x100)).unwrap(), 1);

    // The detached third queue must not keep its worker busy.
    let (threads, before) = thread_ticks(&name);
    assert_eq!(threads, 3, "one worker per pair");
    std::thread::sleep(Duration::from_millis(500));
    let spent = thread_ticks(&name).1 - before;
    assert!(spent < 10, "workers used {spent} ticks in 0.5 s while idle");

    // Traffic still flows on the second pair's transmit queue.
    let f = test_frame(300, 21);
    mem.write_slice(&[0u8; 12], GuestAddress(BUFS + 0x1000))
        .unwrap();
    mem.write_slice(&f, GuestAddress(BUFS + 0x1000 + 12))
        .unwrap();
    add_chain(&rings[3], 0, &[(BUFS + 0x1000, 312, false)]);
    kicks[3].write(1).unwrap();
    assert_eq!(recv_test_frame(&sock), f);
    assert_eq!(irq.needs_reset.load(Ordering::SeqCst), 0);
    net.reset();
}
