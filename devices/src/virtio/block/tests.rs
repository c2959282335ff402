//! Requests over real descriptor chains (MockSplitQueue) against a
//! temporary image, on both engines; the worker thread; hostile chains.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::io::DiskError;
use super::*;
use crate::GuestMemory;
use crate::virtio::{ActiveQueue, VirtioInterrupt};

const W: u16 = VRING_DESC_F_WRITE as u16;
const QSIZE: u16 = 16;
const USED: u64 = 0x4000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
const DISK_BYTES: usize = 1 << 20;

fn image(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-blk-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0x5a; DISK_BYTES]).unwrap();
    path
}

fn disk_config(path: &std::path::Path) -> DiskConfig {
    DiskConfig {
        path: path.to_path_buf(),
        readonly: false,
        direct: false,
        num_queues: 1,
        queue_size: QSIZE,
        disable_io_uring: false,
        id: Some("t".into()),
        serial: None,
    }
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Which engine a test runs on.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Sync,
    Uring,
}

fn modes() -> Vec<Mode> {
    if io::Uring::probe().is_ok() {
        vec![Mode::Sync, Mode::Uring]
    } else {
        eprintln!("io_uring unavailable here: testing the blocking engine only");
        vec![Mode::Sync]
    }
}

/// A driver's view of one queue: builds chains, and runs them through a
/// BlockQueue until they come back.
struct Driver<'a> {
    mem: &'a GuestMemory,
    vq: MockSplitQueue<'a, GuestMemory>,
    next_desc: u16,
    used_seen: u16,
    used: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        Self::at(mem, 0)
    }

    /// A queue whose rings start at `base`.
    fn at(mem: &'a GuestMemory, base: u64) -> Self {
        Driver {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(base), QSIZE),
            next_desc: 0,
            used_seen: 0,
            used: base + USED,
        }
    }

    /// The queue as the driver set it up. MockSplitQueue places the used
    /// ring over the end of the avail ring (its `used_event`), so move it.
    fn raw_queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q
    }

    fn queue(&self, block: &Block, mode: Mode) -> BlockQueue {
        let q = self.raw_queue();
        match mode {
            Mode::Sync => block.sync_queue(q, block.features()),
            Mode::Uring => {
                let bq = BlockQueue::new_uring(q, block.context(block.features()));
                assert!(bq.uses_io_uring());
                bq
            }
        }
    }

    /// Adds a chain of (addr, len, flags) descriptors.
    fn add(&mut self, parts: &[(u64, u32, u16)]) {
        let n = parts.len() as u16;
        let at = self.alloc(n);
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let more = if i + 1 < n {
                    VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags | more,
                    (at + i + 1) % QSIZE,
                ))
            })
            .collect();
        self.vq.add_desc_chains(&descs, at).unwrap();
    }

    /// Room for `n` descriptors in the table (earlier chains are done).
    fn alloc(&mut self, n: u16) -> u16 {
        let at = if self.next_desc + n > QSIZE {
            0
        } else {
            self.next_desc
        };
        self.next_desc = at + n;
        at
    }

    fn header(&self, t: u32, sector: u64) {
        self.mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs the queue until `n` more used entries appear; returns their
    /// lengths.
    fn run(&mut self, bq: &mut BlockQueue, n: u16) -> Vec<u32> {
        bq.process_queue(self.mem).unwrap();
        for _ in 0..1000 {
            if self.used_idx().wrapping_sub(self.used_seen) >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            bq.process_completions(self.mem).unwrap();
        }
        let mut lens = Vec::new();
        while self.used_seen != self.used_idx() {
            let slot = u64::from(self.used_seen % QSIZE);
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(self.used).unchecked_add(4 + slot * 8 + 4))
                .unwrap();
            lens.push(len);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        assert_eq!(lens.len(), usize::from(n), "requests did not all complete");
        lens
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used).unchecked_add(2))
            .unwrap()
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// One request: header, data (if any), status. Returns (status, used len).
    fn request(
        &mut self,
        bq: &mut BlockQueue,
        t: u32,
        sector: u64,
        data: Option<(u64, u32, u16)>,
    ) -> (u8, u32) {
        self.header(t, sector);
        let mut parts = vec![(HDR, 16, 0)];
        parts.extend(data);
        parts.push((STATUS, 1, W));
        self.add(&parts);
        let lens = self.run(bq, 1);
        (self.status(), lens[0])
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn writes_read_back_and_flush_on_both_engines() {
    for mode in modes() {
        let path = image(&format!("rw-{mode:?}.img"));
        let block = Block::new(&disk_config(&path)).unwrap();
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);

        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_OUT, 10, Some((DATA, 8192, 0)));
        assert_eq!((s, len), (OK, 1), "{mode:?}");

        // Read it back into another buffer, split into two descriptors.
        let back = DATA + 0x1_0000;
        d.header(VIRTIO_BLK_T_IN, 10);
        d.add(&[
            (HDR, 16, 0),
            (back, 4096, W),
            (back + 4096, 4096, W),
            (STATUS, 1, W),
        ]);
        let lens = d.run(&mut bq, 1);
        assert_eq!((d.status(), lens[0]), (OK, 8193), "{mode:?}");
        let mut got = vec![0u8; 8192];
        mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, pattern, "{mode:?}");

        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(s, OK);

        // And the file has it.
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[10 * 512..10 * 512 + 8192], &pattern[..]);
        assert_eq!(file[10 * 512 - 1], 0x5a);

        let c = block.counters();
        assert_eq!(c.write_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(c.read_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(c.write_ops.load(Ordering::Relaxed), 1);
        assert_eq!(c.read_ops.load(Ordering::Relaxed), 1);
        assert_eq!(c.flush_ops.load(Ordering::Relaxed), 1);
        assert_eq!(c.errors.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn a_batch_of_requests_completes() {
    for mode in modes() {
        let path = image(&format!("batch-{mode:?}.img"));
        let block = Block::new(&disk_config(&path)).unwrap();
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);
        // Five reads of one sector each, all in the ring before the kick.
        d.header(VIRTIO_BLK_T_IN, 3);
        for i in 0..5u64 {
            d.add(&[
                (HDR, 16, 0),
                (DATA + i * 512, 512, W),
                (STATUS + 1 + i, 1, W),
            ]);
        }
        let lens = d.run(&mut bq, 5);
        assert_eq!(lens, vec![513; 5], "{mode:?}");
        for i in 0..5u64 {
            let s: u8 = mem.read_obj(GuestAddress(STATUS + 1 + i)).unwrap();
            assert_eq!(s, OK);
        }
        let mut got = vec![0u8; 5 * 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    for mode in modes() {
        let path = image(&format!("discard-{mode:?}.img"));
        let block = Block::new(&disk_config(&path)).unwrap();
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);
        let segment = |at: u64, sector: u64, n: u32, flags: u32| {
            mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
            mem.write_obj(n.to_le(), GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        };
        // Discard sectors 8..16 and 24..32 in one request.
        segment(DATA, 8, 8, 0);
        segment(DATA + 16, 24, 8, 0);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 32, 0)));
        assert_eq!(s, OK, "{mode:?}");
        // Zero sectors 40..41, with and without unmap.
        segment(DATA, 40, 1, 0);
        segment(DATA + 16, 41, 1, 1);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((DATA, 32, 0)));
        assert_eq!(s, OK, "{mode:?}");

        let file = std::fs::read(&path).unwrap();
        let zero = |from: usize, to: usize| file[from * 512..to * 512].iter().all(|&b| b == 0);
        assert!(zero(8, 16) && zero(24, 32) && zero(40, 42));
        assert!(file[16 * 512..24 * 512].iter().all(|&b| b == 0x5a));
        assert_eq!(file.len(), DISK_BYTES, "discard keeps the size");

        // Discard with the unmap flag is refused; so is a segment past the end.
        segment(DATA, 0, 1, 1);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, 0)));
        assert_eq!(s, IOERR);
        segment(DATA, (DISK_BYTES / 512) as u64, 1, 0);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, 0)));
        assert_eq!(s, IOERR);
        segment(DATA, u64::MAX, u32::MAX, 0);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((DATA, 16, 0)));
        assert_eq!(s, IOERR);
        // Too many segments.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16 * 33, 0)));
        assert_eq!(s, IOERR);
    }
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let path = image("ro.img");
    let mut config = disk_config(&path);
    config.readonly = true;
    let block = Block::new(&config).unwrap();
    assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    for mode in modes() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);
        mem.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
        let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, 0)));
        assert_eq!((s, len), (IOERR, 1));
        mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, 0)));
        assert_eq!(s, IOERR);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((DATA, 16, 0)));
        assert_eq!(s, IOERR);
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_IN, 0, Some((DATA, 512, W)));
        assert_eq!(s, OK);
    }
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn out_of_range_and_odd_lengths_fail() {
    let last = (DISK_BYTES / 512) as u64;
    for mode in modes() {
        let path = image(&format!("range-{mode:?}.img"));
        let block = Block::new(&disk_config(&path)).unwrap();
        assert_eq!(block.capacity(), last);
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);
        let cases = [
            (VIRTIO_BLK_T_IN, last, 512, W),
            (VIRTIO_BLK_T_IN, last - 1, 1024, W),
            (VIRTIO_BLK_T_OUT, u64::MAX, 512, 0),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512, 0),
            (VIRTIO_BLK_T_IN, 0, 100, W),
        ];
        for (t, sector, len, flags) in cases {
            let (s, _) = d.request(&mut bq, t, sector, Some((DATA, len, flags)));
            assert_eq!(s, IOERR, "{mode:?} type {t} sector {sector} len {len}");
        }
        // The last sector itself is fine.
        let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_IN, last - 1, Some((DATA, 512, W)));
        assert_eq!((s, len), (OK, 513));
        assert_eq!(
            block.counters().errors.load(Ordering::Relaxed),
            cases.len() as u64
        );
    }
}

#[test]
fn get_id_and_unsupported_types() {
    let path = image("id.img");
    let mut config = disk_config(&path);
    config.serial = Some("SERIAL-1".into());
    let block = Block::new(&config).unwrap();
    let mem = memory();
    let mut d = Driver::new(&mem);
    let mut bq = d.queue(&block, Mode::Sync);
    let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, W)));
    assert_eq!((s, len), (OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"SERIAL-1\0\0\0\0\0\0\0\0\0\0\0\0");
    // A short id buffer gets what fits.
    let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 4, W)));
    assert_eq!((s, len), (OK, 5));

    let (s, len) = d.request(&mut bq, 0x7777, 0, Some((DATA, 512, W)));
    assert_eq!((s, len), (UNSUPP, 1));

    // Without a serial: stable, derived from the path, 20 bytes.
    drop(bq);
    drop(block);
    let a = Block::new(&disk_config(&path)).unwrap().serial();
    let b = Block::new(&disk_config(&path)).unwrap().serial();
    assert_eq!(a, b);
    assert!(a.starts_with(b"keel") && a.iter().all(|&c| c.is_ascii_alphanumeric()));
}

#[test]
fn hostile_chains_fail_cleanly() {
    for mode in modes() {
        let path = image(&format!("hostile-{mode:?}.img"));
        let block = Block::new(&disk_config(&path)).unwrap();
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);

        // Data buffer outside guest memory.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_IN, 0, Some((0xff_0000, 512, W)));
        assert_eq!(s, IOERR);
        // Data buffer straddling the end of memory.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_OUT, 0, Some((0xf_fe00, 1024, 0)));
        assert_eq!(s, IOERR);
        // A huge length.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_IN, 0, Some((DATA, u32::MAX - 511, W)));
        assert_eq!(s, IOERR);
        // Wrong direction: a read into a device-readable buffer.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_IN, 0, Some((DATA, 512, 0)));
        assert_eq!(s, IOERR);
        // Data overlapping the header and status: the guest's own business,
        // served without harm to the host.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_OUT, 0, Some((HDR, 512, 0)));
        assert_eq!(s, OK);

        // No writable byte at all: dropped with a used length of 0.
        d.header(VIRTIO_BLK_T_IN, 0);
        d.add(&[(HDR, 16, 0), (DATA, 512, 0)]);
        assert_eq!(d.run(&mut bq, 1), vec![0]);
        // A status byte outside memory: dropped too.
        d.add(&[(HDR, 16, 0), (DATA, 512, W), (0x20_0000, 1, W)]);
        assert_eq!(d.run(&mut bq, 1), vec![0]);

        // A loop: 3 -> 4 -> 3 ... ends after the queue size.
        let at = d.alloc(3);
        let f = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, f, at + 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, f | W, at + 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, f | W, at + 1)),
        ];
        d.vq.add_desc_chains(&descs, at).unwrap();
        // Cut short: IOERR in its last writable byte.
        assert_eq!(d.run(&mut bq, 1), vec![1]);

        // A complete request whose status descriptor names a next one
        // outside the table.
        d.header(VIRTIO_BLK_T_IN, 0);
        let at = d.alloc(3);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, f, at + 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, f | W, at + 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, f | W, QSIZE)),
        ];
        d.vq.add_desc_chains(&descs, at).unwrap();
        assert_eq!(d.run(&mut bq, 1), vec![1]);
        assert_eq!(d.status(), IOERR);

        // A `next` beyond the table.
        let at = d.alloc(1);
        let descs = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, f, 999))];
        d.vq.add_desc_chains(&descs, at).unwrap();
        assert_eq!(d.run(&mut bq, 1), vec![0]);

        // The queue still serves well-formed requests.
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_IN, 0, Some((DATA, 512, W)));
        assert_eq!(s, OK, "{mode:?}");
    }
}

#[test]
fn a_bogus_avail_index_breaks_the_queue_not_the_process() {
    let path = image("avail.img");
    let block = Block::new(&disk_config(&path)).unwrap();
    let mem = memory();
    let d = Driver::new(&mem);
    let mut bq = d.queue(&block, Mode::Sync);
    // avail.idx 1000 ahead of next_avail with a 16-entry ring.
    mem.write_obj(1000u16, d.vq.avail_addr().unchecked_add(2))
        .unwrap();
    assert!(bq.process_queue(&mem).is_err());
}

#[test]
fn config_space_and_features() {
    let path = image("config.img");
    let mut config = disk_config(&path);
    config.num_queues = 4;
    let block = Block::new(&config).unwrap();
    let mut b8 = [0u8; 8];
    block.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), (DISK_BYTES / 512) as u64);
    let mut b2 = [0u8; 2];
    block.read_config(34, &mut b2);
    assert_eq!(u16::from_le_bytes(b2), 4);
    let mut b4 = [0u8; 4];
    block.read_config(20, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512);
    block.read_config(12, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), u32::from(QSIZE) - 2);
    assert_eq!(seg_max(1024), 1022);
    assert_eq!(seg_max(32768), 1022);
    block.read_config(1000, &mut b4);
    assert_eq!(b4, [0; 4]);
    let f = block.features();
    for bit in [
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(f & features::COMMON, features::COMMON);
    assert_eq!(block.queue_max_sizes(), &[QSIZE; 4]);
    let state = block.state();
    assert_eq!(state["version"], 1);
    assert_eq!(state["num_queues"], 4);

    config.num_queues = 1;
    drop(block);
    assert_eq!(
        Block::new(&config).unwrap().features() & (1 << VIRTIO_BLK_F_MQ),
        0
    );
}

#[test]
fn a_missing_or_busy_image_is_a_clear_error() {
    let e = Block::new(&disk_config(std::path::Path::new("/no/such/disk.raw")))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/no/such/disk.raw"), "{e}");
    let path = image("busy.img");
    let _first = Block::new(&disk_config(&path)).unwrap();
    let e = Block::new(&disk_config(&path)).err().unwrap();
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

#[derive(Default)]
struct CountingInterrupt {
    queue_signals: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, _: u16) -> std::io::Result<()> {
        self.queue_signals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn the_worker_serves_kicks_and_survives_reset() {
    for disable_io_uring in [true, false] {
        let path = image(&format!("worker-{disable_io_uring}.img"));
        let mut config = disk_config(&path);
        config.disable_io_uring = disable_io_uring;
        let mut block = Block::new(&config).unwrap();
        let mem = memory();
        let mut d = Driver::new(&mem);
        for round in 0..2 {
            let interrupt = Arc::new(CountingInterrupt::default());
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut queue = d.raw_queue();
            queue.set_next_avail(d.used_seen);
            queue.set_next_used(d.used_seen);
            block
                .activate(Activation {
                    memory: mem.clone(),
                    interrupt: interrupt.clone(),
                    queues: vec![ActiveQueue {
                        index: 0,
                        queue,
                        kick: kick.try_clone().unwrap(),
                    }],
                    acked_features: block.features(),
                })
                .unwrap();
            d.header(VIRTIO_BLK_T_IN, round);
            d.add(&[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)]);
            // EVENT_IDX: ask for an interrupt when this request is used.
            let used_event = d.vq.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
            mem.write_obj(d.used_seen, used_event).unwrap();
            kick.write(1).unwrap();
            for _ in 0..2000 {
                if d.used_idx() != d.used_seen && interrupt.queue_signals.load(Ordering::SeqCst) > 0
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                d.used_idx(),
                d.used_seen.wrapping_add(1),
                "io_uring off: {disable_io_uring}"
            );
            d.used_seen = d.used_idx();
            assert_eq!(d.status(), OK);
            assert!(
                interrupt.queue_signals.load(Ordering::SeqCst) >= 1,
                "round {round}, io_uring off: {disable_io_uring}"
            );
            let state = block.state();
            assert_eq!(state["queues"].as_array().map(|q| q.len()), Some(1));
            block.reset();
            assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
        }
    }
}

#[test]
fn activation_refuses_bad_queue_sets() {
    let path = image("activate.img");
    let mut block = Block::new(&disk_config(&path)).unwrap();
    let mem = memory();
    let d = Driver::new(&mem);
    let interrupt = Arc::new(CountingInterrupt::default());
    let act = |index: u16, queues: usize| Activation {
        memory: mem.clone(),
        interrupt: interrupt.clone(),
        queues: (0..queues)
            .map(|_| ActiveQueue {
                index,
                queue: d.raw_queue(),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect(),
        acked_features: 0,
    };
    assert!(block.activate(act(0, 0)).is_err());
    assert!(block.activate(act(1, 1)).is_err());
    assert!(block.activate(act(0, 2)).is_err());
    block.activate(act(0, 1)).unwrap();
    block.reset();
}

#[test]
fn an_unreadable_avail_ring_does_not_spin() {
    let path = image("stuck.img");
    let block = Block::new(&disk_config(&path)).unwrap();
    let mem = memory();
    let d = Driver::new(&mem);
    let mut q = d.raw_queue();
    // flags and idx are the last 4 bytes of memory; the ring lies beyond.
    let avail = 0x10_0000 - 4;
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    let mut bq = block.sync_queue(q, block.features());
    assert!(matches!(bq.process_queue(&mem), Err(QueueError::Stuck)));
}

#[test]
fn direct_io_takes_aligned_and_unaligned_buffers() {
    for mode in modes() {
        let path = image(&format!("direct-{mode:?}.img"));
        let mut config = disk_config(&path);
        config.direct = true;
        let block = match Block::new(&config) {
            Ok(b) => b,
            Err(BlockError::Disk(DiskError::DirectUnsupported(_))) => {
                eprintln!("O_DIRECT unsupported on {}: skipped", path.display());
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut bq = d.queue(&block, mode);
        // 4 KiB-aligned buffer (O_DIRECT fd), then one 8 bytes off (the
        // buffered fd), then a 512-byte-aligned one on a 4 KiB boundary.
        for (i, offset) in [0u64, 8, 512].into_iter().enumerate() {
            let pattern: Vec<u8> = (0..4096u32).map(|b| (b as u8) ^ (i as u8 + 1)).collect();
            let buf = DATA + 0x2000 * i as u64 + offset;
            mem.write_slice(&pattern, GuestAddress(buf)).unwrap();
            let sector = 8 * i as u64;
            let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_OUT, sector, Some((buf, 4096, 0)));
            assert_eq!(s, OK, "{mode:?} write {i}");
            let back = 0x6_0000 + offset;
            let (s, len) = d.request(&mut bq, VIRTIO_BLK_T_IN, sector, Some((back, 4096, W)));
            assert_eq!((s, len), (OK, 4097), "{mode:?} read {i}");
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(back)).unwrap();
            assert_eq!(got, pattern, "{mode:?} round trip {i}");
        }
        let (s, _) = d.request(&mut bq, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(s, OK);
    }
}

#[test]
fn each_queue_of_a_multi_queue_disk_is_served() {
    let path = image("mq.img");
    let mut config = disk_config(&path);
    config.num_queues = 2;
    let mut block = Block::new(&config).unwrap();
    let mem = memory();
    let mut drivers = [Driver::at(&mem, 0), Driver::at(&mem, 0x9_0000)];
    let interrupt = Arc::new(CountingInterrupt::default());
    let kicks = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    block
        .activate(Activation {
            memory: mem.clone(),
            interrupt: interrupt.clone(),
            queues: (0..2)
                .map(|i| ActiveQueue {
                    index: i as u16,
                    queue: drivers[i].raw_queue(),
                    kick: kicks[i].try_clone().unwrap(),
                })
                .collect(),
            acked_features: block.features(),
        })
        .unwrap();
    for (i, d) in drivers.iter_mut().enumerate() {
        d.header(VIRTIO_BLK_T_IN, i as u64);
        d.add(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
        kicks[i].write(1).unwrap();
        for _ in 0..2000 {
            if d.used_idx() != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(d.used_idx(), 1, "queue {i}");
        assert_eq!(d.status(), OK);
    }
    assert_eq!(block.state()["queues"].as_array().map(|q| q.len()), Some(2));
    assert_eq!(block.counters().read_ops.load(Ordering::Relaxed), 2);
    block.reset();
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn a_disk_grows_and_its_capacity_follows() {
    let path = image("grow");
    let mut block = Block::new(&disk_config(&path)).unwrap();
    let before = block.capacity();
    let capacity = |b: &Block| {
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        u64::from_le_bytes(c)
    };
    assert_eq!(capacity(&block), before);
    let bytes = (before + 8) * 512;
    block.resize(bytes).unwrap();
    assert_eq!(block.capacity(), before + 8);
    assert_eq!(capacity(&block), before + 8);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
    // Shrinking and odd sizes are refused, and change nothing.
    assert!(block.resize(bytes - 512).is_err());
    assert!(block.resize(bytes + 100).is_err());
    assert_eq!(capacity(&block), before + 8);
}
