//! virtio-net TX, RX and control-queue handling over guest memory built
//! from the input, with a socketpair standing in for the tap.
//!
//! Input: 8 bytes of settings, then the guest memory image (rings at fixed
//! low addresses, so short inputs already reach the descriptors).
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::AtomicU16;

use keel_devices::virtio::net::ctrl::CtrlQueue;
use keel_devices::virtio::net::queue::{MAX_FRAME_LEN, NetCounters, PairConfig, QueuePair};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x1_0000;
/// (descriptor table, avail ring, used ring) of RX, TX and the control queue.
const RINGS: [(u64, u64, u64); 3] = [
    (0x000, 0x100, 0x140),
    (0x200, 0x300, 0x340),
    (0x400, 0x500, 0x540),
];

fn queue(size_byte: u8, ring: (u64, u64, u64), event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(16).ok()?;
    q.set_size(1 << (size_byte % 5));
    q.try_set_desc_table_address(GuestAddress(ring.0)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(ring.1)).ok()?;
    q.try_set_used_ring_address(GuestAddress(ring.2)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (settings, image) = data.split_at(8);
    let flags = settings[0];
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let image = &image[..image.len().min(MEM_SIZE)];
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let event_idx = flags & 1 != 0;
    let (Some(rx), Some(tx), Some(ctrl)) = (
        queue(settings[1], RINGS[0], event_idx),
        queue(settings[2], RINGS[1], event_idx),
        queue(settings[3], RINGS[2], event_idx),
    ) else {
        return;
    };
    let Ok((ours, peer)) = UnixDatagram::pair() else {
        return;
    };
    if ours.set_nonblocking(true).is_err() || peer.set_nonblocking(true).is_err() {
        return;
    }
    // Frames "from the tap": slices of the input's tail.
    let frames = usize::from(settings[4] % 4);
    let len = usize::from(u16::from_le_bytes([settings[5], settings[6]])) % 4096;
    for i in 0..frames {
        let start = image.len().saturating_sub(len * (i + 1));
        let end = (start + len).min(image.len());
        let _ = peer.send(&image[start..end]);
    }
    let config = PairConfig {
        rx_index: 0,
        tx_index: 1,
        mrg_rxbuf: flags & 2 != 0,
        max_rx_frame: if flags & 4 != 0 { MAX_FRAME_LEN } else { 1514 },
    };
    let mut pair = QueuePair::new(ours, rx, tx, config, Arc::new(NetCounters::default()));
    let mut ctrl = CtrlQueue::new(ctrl, 2, Vec::new(), Arc::new(AtomicU16::new(1)), Vec::new());
    for _ in 0..=(settings[7] % 3) {
        let _ = pair.process_tx(&mem);
        let _ = pair.process_rx(&mem);
        let _ = pair.needs_notification(&mem, true);
        let _ = pair.needs_notification(&mem, false);
        let _ = ctrl.process(&mem);
    }
    let mut buf = vec![0u8; 70_000];
    while peer.recv(&mut buf).is_ok() {}
});
