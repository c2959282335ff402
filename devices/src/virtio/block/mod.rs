//! virtio-blk (virtio 1.2 §5.2): a raw disk image as a block device.
//!
//! - [`request`] reads one request out of a descriptor chain, trusting
//!   nothing the guest wrote;
//! - [`io`] opens and locks the image and moves data (io_uring, or blocking
//!   calls when io_uring is unavailable);
//! - [`worker`] serves a queue: pops chains, runs requests, returns them
//!   and signals the driver once per batch.
//!
//! Multi-queue: each queue gets its own worker thread and its own io_uring.
//! Linux maps its blk-mq hardware queues to vCPUs, so separate threads let
//! the queues of a busy guest complete on separate host CPUs with no lock
//! between them (the disk image is shared read-only through an `Arc`, the
//! counters are atomics); a single-queue disk costs one thread, as before.

pub mod io;
pub mod request;
pub mod worker;

use std::path::Path;
use std::sync::{Arc, Mutex};

use keel_api::DiskConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};

use self::io::{DiskError, DiskImage, Uring};
use self::request::{ID_BYTES, SECTOR_SIZE};
pub use self::worker::{BlockCounters, BlockQueue, QueueContext, QueueError};
use self::worker::{BlockWorker, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::{
    ActivateError, Activation, QueueStateSer, VirtioDevice, WorkerHandle, device_type, features,
    read_config_bytes,
};

/// Most data segments per request the driver may use (`seg_max`): as QEMU
/// does, the queue size less the header and the status, so that a chain
/// fits the ring even without indirect descriptors; at most what one
/// request may carry ([`request::MAX_DESCRIPTORS`]).
pub fn seg_max(queue_size: u16) -> u32 {
    (u32::from(queue_size).min(request::MAX_DESCRIPTORS as u32))
        .saturating_sub(2)
        .max(1)
}
/// Size of the config space we expose (up to `write_zeroes_may_unmap` and
/// its padding, virtio 1.2 §5.2.4).
const CONFIG_SIZE: usize = 60;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("Disk {path}: {message}")]
    Config { path: String, message: String },
}

/// A virtio-blk device over a raw image.
pub struct Block {
    id: String,
    disk: Arc<DiskImage>,
    config: [u8; CONFIG_SIZE],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    use_io_uring: bool,
    serial: [u8; ID_BYTES],
    counters: Arc<BlockCounters>,
    workers: Vec<WorkerHandle<BlockWorker>>,
    queue_states: Arc<Mutex<Vec<QueueStateSer>>>,
}

/// Snapshot of a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub version: u32,
    pub id: String,
    pub path: String,
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub avail_features: u64,
    pub acked_features: u64,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The queues the driver enabled (empty while the device is not active).
    pub queues: Vec<QueueStateSer>,
}

impl Block {
    /// Opens and locks `config.path` and builds the device. Fails with a
    /// message naming the file when it is missing, cannot be opened, or is
    /// in use by another VM.
    pub fn new(config: &DiskConfig) -> Result<Self, BlockError> {
        let config_error = |message: String| BlockError::Config {
            path: config.path.display().to_string(),
            message,
        };
        if config.num_queues == 0 {
            return Err(config_error("num_queues must be at least 1".into()));
        }
        if config.queue_size < 2 || !config.queue_size.is_power_of_two() {
            return Err(config_error(format!(
                "queue_size={} must be a power of two, at least 2",
                config.queue_size
            )));
        }
        let disk = DiskImage::open(&config.path, config.readonly, config.direct)?;

        let use_io_uring = !config.disable_io_uring
            && match Uring::probe() {
                Ok(()) => true,
                Err(e) => {
                    log::warn!(
                        "Disk {}: io_uring is unavailable ({e}); using blocking I/O on the device thread",
                        config.path.display()
                    );
                    false
                }
            };

        let mut avail_features = features::COMMON
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_TOPOLOGY;
        if config.num_queues > 1 {
            avail_features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if config.readonly {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let id = config.id.clone().unwrap_or_else(|| {
            config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into())
        });
        Ok(Block {
            id,
            config: config_space(disk.sectors(), config.num_queues, config.queue_size),
            serial: serial(config.serial.as_deref(), &config.path),
            disk: Arc::new(disk),
            avail_features,
            acked_features: 0,
            queue_sizes: vec![config.queue_size; usize::from(config.num_queues)],
            use_io_uring,
            counters: Arc::new(BlockCounters::default()),
            workers: Vec::new(),
            queue_states: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// The device's I/O counters, live.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Whether queues are served on io_uring (else by blocking calls).
    pub fn uses_io_uring(&self) -> bool {
        self.use_io_uring
    }

    /// The 20 bytes GET_ID returns.
    pub fn serial(&self) -> [u8; ID_BYTES] {
        self.serial
    }

    fn context(&self, acked_features: u64) -> QueueContext {
        QueueContext {
            disk: self.disk.clone(),
            counters: self.counters.clone(),
            id: self.serial,
            may_unmap: acked_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }

    /// A queue served by blocking calls on the caller's thread, as
    /// `activate` builds for each queue (without io_uring): for the fuzzer
    /// and tests, which drive [`BlockQueue::process_queue`] themselves.
    pub fn sync_queue(&self, mut queue: Queue, acked_features: u64) -> BlockQueue {
        queue.set_event_idx(acked_features & features::RING_EVENT_IDX != 0);
        BlockQueue::new_sync(queue, self.context(acked_features))
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            // Dropping the returned worker drains its io_uring.
            drop(w.stop());
        }
    }
}

/// The config space (virtio 1.2 §5.2.4), little-endian.
fn config_space(sectors: u64, num_queues: u16, queue_size: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &sectors.to_le_bytes()); // capacity
    put(8, &0u32.to_le_bytes()); // size_max (not offered)
    put(12, &seg_max(queue_size).to_le_bytes()); // seg_max
    // 16..20: geometry (not offered)
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    // topology: 4 KiB physical blocks, so the guest aligns its I/O to pages.
    put(24, &[3]); // physical_block_exp: 2^3 logical blocks
    put(25, &[0]); // alignment_offset
    put(26, &8u16.to_le_bytes()); // min_io_size, in logical blocks
    put(28, &0u32.to_le_bytes()); // opt_io_size
    // 32: writeback, 33: unused
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

/// The GET_ID answer: the configured serial, else an id derived from the
/// image's path (stable across runs), zero-padded to 20 bytes.
fn serial(configured: Option<&str>, path: &Path) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    match configured {
        Some(s) => {
            if s.len() > ID_BYTES {
                log::warn!(
                    "Disk serial {s:?} is longer than {ID_BYTES} bytes; the guest sees its first {ID_BYTES}"
                );
            }
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        None => {
            let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            // FNV-1a: stable across runs and Rust versions, unlike the
            // standard hasher.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in canonical.as_os_str().as_encoded_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            let s = format!("keel{h:016x}");
            id.copy_from_slice(s.as_bytes());
        }
    }
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_workers();
        let Activation {
            memory,
            interrupt,
            queues,
            acked_features,
        } = activation;
        let enabled: Vec<u16> = queues.iter().map(|q| q.index).collect();
        let num_queues = self.queue_sizes.len();
        if queues.is_empty()
            || queues.len() > num_queues
            || queues.iter().any(|q| usize::from(q.index) >= num_queues)
        {
            return Err(ActivateError::Queues {
                enabled,
                needed: format!("1 to {num_queues} of queues 0..{num_queues}"),
            });
        }
        let acked_features = acked_features & self.avail_features;
        self.acked_features = acked_features;
        let states: Vec<QueueStateSer> = queues
            .iter()
            .map(|q| QueueStateSer::from(&q.queue))
            .collect();
        *self.queue_states.lock().unwrap_or_else(|e| e.into_inner()) = states;

        let mut workers = Vec::with_capacity(queues.len());
        for (slot, q) in queues.into_iter().enumerate() {
            let mut queue = q.queue;
            queue.set_event_idx(acked_features & features::RING_EVENT_IDX != 0);
            if !queue.is_valid(&memory) {
                return Err(ActivateError::Backend {
                    device: self.name(),
                    message: format!("queue {} lies outside guest memory", q.index),
                });
            }
            let ctx = self.context(acked_features);
            let block_queue = if self.use_io_uring {
                BlockQueue::new_uring(queue, ctx)
            } else {
                BlockQueue::new_sync(queue, ctx)
            };
            let worker = BlockWorker {
                index: q.index,
                queue: block_queue,
                kick: q.kick,
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                states: self.queue_states.clone(),
                slot,
            };
            let handle = WorkerHandle::spawn(
                format!("virtio-blk {} q{}", self.id, q.index),
                worker,
                interrupt.clone(),
            )
            .map_err(|source| ActivateError::Worker {
                device: self.name(),
                source,
            })?;
            workers.push(handle);
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
        self.queue_states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn resize(&mut self, bytes: u64) -> Result<(), String> {
        self.disk.grow(bytes).map_err(|e| e.to_string())?;
        self.config[..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        vec![
            ("read_bytes", l(&c.read_bytes)),
            ("read_ops", l(&c.read_ops)),
            ("write_bytes", l(&c.write_bytes)),
            ("write_ops", l(&c.write_ops)),
            ("flush_ops", l(&c.flush_ops)),
            ("discard_ops", l(&c.discard_ops)),
            ("write_zeroes_ops", l(&c.write_zeroes_ops)),
            ("errors", l(&c.errors)),
        ]
    }

    fn state(&self) -> serde_json::Value {
        let state = BlockState {
            version: 1,
            id: self.id.clone(),
            path: self.disk.path().display().to_string(),
            capacity_sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            num_queues: self.queue_sizes.len() as u16,
            queue_size: self.queue_sizes.first().copied().unwrap_or(0),
            queues: self
                .queue_states
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
        };
        serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests;
