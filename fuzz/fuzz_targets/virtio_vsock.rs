//! virtio-vsock packet handling on guest memory built from the input: the
//! tx ring, its descriptors and every packet are the fuzzer's; the device
//! serves them (synchronously, the same `process_tx` / `process_rx` the
//! worker thread runs) against real Unix sockets: the device's own socket
//! (a host process may connect and send `CONNECT 5\n` first) and listeners
//! for guest ports 1 and 2. Nothing may panic; no fd may leak.
//!
//! Input: 16 bytes of setup, then guest memory from address 0.
//!   [0]     tx queue size: 2 << ([0] % 5)          (2..=32)
//!   [1]     bit 0: EVENT_IDX, bit 1: force tx avail.idx = [3] + [2] % (size + 1),
//!           bit 2: a host process connects first (CONNECT 5, then [8..16]),
//!           bit 3: serve twice, bit 4: keep tx descriptor addresses within
//!           guest memory (& 0x1ffff), bit 5: rx ring from the input instead
//!           of 16 well-formed 4 KiB buffers
//!   [3]     tx next_avail / next_used start
//!   [8..16] bytes the host processes write
//!
//! Guest memory: [0, 0x10000) and [0x10000, 0x20000) (a buffer may span
//! both); tx desc 0x0, avail 0x200, used 0x300; rx desc 0x400, avail 0x600,
//! used 0x700 (size 16); rx buffers from 0x10000.
#![no_main]

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use keel_api::VsockConfig;
use keel_devices::GuestMemory;
use keel_devices::virtio::VirtioDevice;
use keel_devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SETUP: usize = 16;
const REGIONS: [(GuestAddress, usize); 2] = [
    (GuestAddress(0), 0x1_0000),
    (GuestAddress(0x1_0000), 0x1_0000),
];
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x200;
const TX_USED: u64 = 0x300;
const RX_DESC: u64 = 0x400;
const RX_AVAIL: u64 = 0x600;
const RX_USED: u64 = 0x700;
const RX_SIZE: u16 = 16;
const RX_BUF: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 4096 + 44;

struct Host {
    _dir: PathBuf,
    vsock: Vsock,
    socket: PathBuf,
    ports: Vec<UnixListener>,
}

fn make_host() -> Host {
    let dir = std::env::temp_dir().join(format!("keel-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the fuzz socket directory");
    let socket = dir.join("v.sock");
    let vsock = Vsock::new(&VsockConfig {
        cid: 3,
        socket: socket.clone(),
        id: None,
    })
    .expect("cannot bind the fuzz vsock socket");
    let ports = [1, 2]
        .iter()
        .map(|p| {
            let l = UnixListener::bind(dir.join(format!("v.sock_{p}")))
                .expect("cannot bind a guest port socket");
            l.set_nonblocking(true).expect("non-blocking listener");
            l
        })
        .collect();
    Host {
        _dir: dir,
        vsock,
        socket,
        ports,
    }
}

thread_local! {
    static HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
}

fn queue(
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    start: u16,
    event_idx: bool,
) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

/// 16 well-formed, device-writable receive buffers.
fn sane_rx_ring(mem: &GuestMemory) {
    for i in 0..u64::from(RX_SIZE) {
        let at = GuestAddress(RX_DESC + 16 * i);
        let _ = mem.write_obj(RX_BUF + i * u64::from(RX_BUF_LEN), at);
        let _ = mem.write_obj(RX_BUF_LEN, GuestAddress(at.0 + 8));
        let _ = mem.write_obj(2u16, GuestAddress(at.0 + 12)); // VRING_DESC_F_WRITE
        let _ = mem.write_obj(0u16, GuestAddress(at.0 + 14));
        let _ = mem.write_obj(i as u16, GuestAddress(RX_AVAIL + 4 + 2 * i));
    }
    let _ = mem.write_obj(0u16, GuestAddress(RX_AVAIL));
    let _ = mem.write_obj(RX_SIZE, GuestAddress(RX_AVAIL + 2));
}

fuzz_target!(|data: &[u8]| {
    if data.len() < SETUP {
        return;
    }
    let setup = &data[..SETUP];
    let image = &data[SETUP..];
    let size: u16 = 2 << (setup[0] % 5);
    let flags = setup[1];
    let event_idx = flags & 0x01 != 0;

    let Ok(mem) = GuestMemory::from_ranges(&REGIONS) else {
        return;
    };
    let n = image.len().min(0x1_0000);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return;
    }
    if flags & 0x10 != 0 {
        for i in 0..u64::from(size) {
            let at = GuestAddress(TX_DESC + 16 * i);
            if let Ok(addr) = mem.read_obj::<u64>(at) {
                let _ = mem.write_obj(addr & 0x1_ffff, at);
            }
        }
    }
    let start = u16::from(setup[3]);
    if flags & 0x02 != 0 {
        let idx = start.wrapping_add(u16::from(setup[2]) % (size + 1));
        let _ = mem.write_obj(idx, GuestAddress(TX_AVAIL + 2));
    }
    if flags & 0x20 == 0 {
        sane_rx_ring(&mem);
    }
    let Some(tx) = queue(size, TX_DESC, TX_AVAIL, TX_USED, start, event_idx) else {
        return;
    };
    let rx_start = if flags & 0x20 == 0 { 0 } else { start };
    let Some(rx) = queue(RX_SIZE, RX_DESC, RX_AVAIL, RX_USED, rx_start, event_idx) else {
        return;
    };

    HOST.with(|host| {
        let mut host = host.borrow_mut();
        let host = host.get_or_insert_with(make_host);
        let _ = host.vsock.features();
        let Ok(mut worker) = host.vsock.sync_worker(mem.clone(), rx, tx) else {
            return;
        };
        let mut streams = Vec::new();
        if flags & 0x04 != 0
            && let Ok(mut s) = UnixStream::connect(&host.socket)
        {
            let _ = s.set_nonblocking(true);
            let _ = s.write_all(b"CONNECT 5\n");
            let _ = s.write_all(&setup[8..16]);
            streams.push(s);
            let _ = worker.process_host_events();
        }
        let rounds = if flags & 0x08 != 0 { 2 } else { 1 };
        for _ in 0..rounds {
            let _ = worker.process_tx();
            // Guest connections to ports 1 and 2 land here: answer them.
            for l in &host.ports {
                while let Ok((mut s, _)) = l.accept() {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write_all(&setup[8..16]);
                    streams.push(s);
                }
            }
            let _ = worker.process_host_events();
            let _ = worker.process_rx();
        }
        // Dropping the worker closes every connection it made.
        drop(worker);
        drop(streams);
    });
});
