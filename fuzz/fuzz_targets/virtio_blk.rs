//! virtio-blk request processing on guest memory built from the input: the
//! descriptor table, the avail ring and every buffer are the fuzzer's, and
//! the device serves them (synchronously, the same `process_queue` the
//! worker thread runs) against a 64 KiB memfd disk. Nothing may panic.
//!
//! Input: 16 bytes of setup, then guest memory from address 0.
//!   [0]     queue size: 2 << ([0] % 8)            (2..=256)
//!   [1]     bit 0: EVENT_IDX, bit 1: read-only disk, bit 2: serve twice,
//!           bit 3: force avail.idx = next_avail + [2] % (size + 1),
//!           bit 4: ring addresses from [4..16] instead of the default,
//!           bit 5: keep descriptor addresses within guest memory (& 0x1ffff)
//!   [3]     next_avail / next_used start
//!   [4..16] desc table, avail ring, used ring addresses (u32 each)
#![no_main]

use std::cell::RefCell;
use std::ffi::CString;
use std::path::PathBuf;

use keel_api::DiskConfig;
use keel_devices::GuestMemory;
use keel_devices::virtio::VirtioDevice;
use keel_devices::virtio::block::Block;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const DISK_BYTES: i64 = 64 * 1024;
const SETUP: usize = 16;
/// Guest RAM: two adjacent regions (a buffer may span them) and one
/// beyond a hole.
const REGIONS: [(GuestAddress, usize); 3] = [
    (GuestAddress(0), 0x8000),
    (GuestAddress(0x8000), 0x8000),
    (GuestAddress(0x2_0000), 0x1000),
];
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

struct Disks {
    rw: Block,
    ro: Block,
}

fn memfd_path() -> PathBuf {
    let name = CString::new("keel-fuzz-blk").unwrap_or_default();
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is ours.
    assert_eq!(unsafe { libc::ftruncate(fd, DISK_BYTES) }, 0);
    // The fd stays open for the life of the process; the device reopens it
    // through /proc.
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

fn disk(path: PathBuf, readonly: bool) -> Block {
    let config = DiskConfig {
        path,
        readonly,
        direct: false,
        num_queues: 1,
        queue_size: 256,
        disable_io_uring: true,
        id: Some("fuzz".into()),
        serial: None,
    };
    Block::new(&config).expect("cannot open the fuzz disk")
}

thread_local! {
    static DISKS: RefCell<Option<Disks>> = const { RefCell::new(None) };
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < SETUP {
        return;
    }
    let setup = &data[..SETUP];
    let image = &data[SETUP..];
    let size: u16 = 2 << (setup[0] % 8);
    let flags = setup[1];

    let Ok(mem) = GuestMemory::from_ranges(&REGIONS) else {
        return;
    };
    let n = image.len().min(0x1_0000);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return;
    }
    if flags & 0x20 != 0 {
        for i in 0..u64::from(size) {
            let at = GuestAddress(DESC + 16 * i);
            if let Ok(addr) = mem.read_obj::<u64>(at) {
                let _ = mem.write_obj(addr & 0x1_ffff, at);
            }
        }
    }
    let (desc, avail, used) = if flags & 0x10 != 0 {
        (
            u64::from(u32_at(setup, 4)),
            u64::from(u32_at(setup, 8)),
            u64::from(u32_at(setup, 12)),
        )
    } else {
        (DESC, AVAIL, USED)
    };
    let start = u16::from(setup[3]);
    if flags & 0x08 != 0 {
        let idx = start.wrapping_add(u16::from(setup[2]) % (size + 1));
        let _ = mem.write_obj(idx, GuestAddress(avail.wrapping_add(2)));
    }

    let Ok(mut queue) = Queue::new(256) else {
        return;
    };
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_next_avail(start);
    queue.set_next_used(start);
    queue.set_ready(true);

    DISKS.with(|disks| {
        let mut disks = disks.borrow_mut();
        // Two files: the read-write disk's lock keeps any other open out.
        let disks = disks.get_or_insert_with(|| Disks {
            rw: disk(memfd_path(), false),
            ro: disk(memfd_path(), true),
        });
        let block = if flags & 0x02 != 0 {
            &disks.ro
        } else {
            &disks.rw
        };
        let mut features = block.features();
        if flags & 0x01 == 0 {
            features &= !keel_devices::virtio::features::RING_EVENT_IDX;
        }
        let mut bq = block.sync_queue(queue, features);
        let _ = bq.process_queue(&mem);
        if flags & 0x04 != 0 {
            let _ = bq.process_queue(&mem);
        }
    });
});
