//! virtio-rng (virtio 1.2 §5.4): one queue of device-writable buffers that
//! the device fills from a host entropy source (`/dev/urandom` by default).
//!
//! Bytes go straight from the source into guest memory (no bounce buffer),
//! and each request is capped at [`MAX_REQUEST_BYTES`] so a guest that
//! offers gigabytes of buffer cannot make the worker read gigabytes.
//! A chain with a device-readable descriptor is malformed: it comes back
//! with 0 bytes written.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use keel_api::RngConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryError, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::EventLoop;
use super::{
    ActivateError, Activation, QueueStateSer, QueueWorker, VirtioDevice, VirtioInterrupt,
    WorkerError, WorkerHandle, device_type, features,
};
use crate::GuestMemory;

/// Largest queue the driver may set up.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets, however large its buffers.
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;
/// Chains served per wakeup before the worker lets other events (a stop
/// request) through; it comes back to the rest at once.
const BATCH: usize = 256;
const STATE_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum RngError {
    #[error("Cannot open the entropy source {path}: check --rng src=")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a snapshot records of the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub version: u32,
    pub src: PathBuf,
    pub acked_features: u64,
    /// The request queue as the worker last left it (empty before the
    /// driver activated the device).
    #[serde(default)]
    pub queues: Vec<QueueStateSer>,
}

pub struct Rng {
    src: PathBuf,
    /// Shared with the worker: reads need no exclusive access.
    source: Arc<File>,
    acked_features: u64,
    worker: Option<WorkerHandle<RngWorker>>,
    /// Published by the worker after each batch.
    queue_state: Arc<Mutex<Option<QueueStateSer>>>,
}

impl Rng {
    /// Opens the entropy source named by `config`.
    pub fn new(config: &RngConfig) -> Result<Rng, RngError> {
        let source = File::open(&config.src).map_err(|source| RngError::Open {
            path: config.src.clone(),
            source,
        })?;
        Ok(Rng {
            src: config.src.clone(),
            source: Arc::new(source),
            acked_features: 0,
            worker: None,
            queue_state: Arc::new(Mutex::new(None)),
        })
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take()
            && let Some(worker) = worker.stop()
        {
            *lock(&self.queue_state) = Some(QueueStateSer::from(&worker.queue));
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let Activation {
            memory,
            interrupt,
            mut queues,
            acked_features,
        } = activation;
        let enabled: Vec<u16> = queues.iter().map(|q| q.index).collect();
        let active = match queues.pop() {
            Some(q) if q.index == 0 && queues.is_empty() => q,
            _ => {
                return Err(ActivateError::Queues {
                    enabled,
                    needed: "queue 0 (requestq)".into(),
                });
            }
        };
        let mut queue = active.queue;
        queue.set_event_idx(acked_features & features::RING_EVENT_IDX != 0);
        self.acked_features = acked_features;
        *lock(&self.queue_state) = Some(QueueStateSer::from(&queue));
        let worker = RngWorker {
            memory,
            interrupt: interrupt.clone(),
            queue,
            kick: active.kick,
            source: Source {
                file: self.source.clone(),
                path: self.src.clone(),
                warned_short: false,
            },
            published: self.queue_state.clone(),
        };
        let handle =
            WorkerHandle::spawn("virtio-rng".into(), worker, interrupt).map_err(|source| {
                ActivateError::Worker {
                    device: "virtio-rng",
                    source,
                }
            })?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
        *lock(&self.queue_state) = None;
    }

    fn state(&self) -> serde_json::Value {
        let state = RngState {
            version: STATE_VERSION,
            src: self.src.clone(),
            acked_features: self.acked_features,
            queues: lock(&self.queue_state).iter().cloned().collect(),
        };
        serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const KICK: u64 = 0;

struct RngWorker {
    memory: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
    kick: EventFd,
    source: Source,
    published: Arc<Mutex<Option<QueueStateSer>>>,
}

/// The entropy source as the worker reads it.
struct Source {
    file: Arc<File>,
    path: PathBuf,
    /// A short source (a regular file at its end) is reported once.
    warned_short: bool,
}

/// How a batch ended.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// The driver has nothing more for now; notifications are on.
    Drained,
    /// [`BATCH`] chains were served and more may be waiting.
    Yielded,
}

impl RngWorker {
    /// Serves up to [`BATCH`] chains and signals the driver if it wants to
    /// hear about them (EVENT_IDX).
    fn process(&mut self) -> Result<Batch, WorkerError> {
        let mut served = 0;
        let outcome = loop {
            self.queue
                .disable_notification(&self.memory)
                .map_err(queue_error)?;
            while let Some((head, len)) = self.next_request()? {
                self.queue
                    .add_used(&self.memory, head, len)
                    .map_err(queue_error)?;
                served += 1;
                if served == BATCH {
                    break;
                }
            }
            if served == BATCH {
                break Batch::Yielded;
            }
            if !self
                .queue
                .enable_notification(&self.memory)
                .map_err(queue_error)?
            {
                break Batch::Drained;
            }
        };
        if served > 0 {
            *lock(&self.published) = Some(QueueStateSer::from(&self.queue));
            if self
                .queue
                .needs_notification(&self.memory)
                .map_err(queue_error)?
            {
                self.interrupt
                    .signal_queue(0)
                    .map_err(WorkerError::Interrupt)?;
            }
        }
        Ok(outcome)
    }

    /// Pops and fills the next chain: `(head, bytes written)`. A ring the
    /// driver broke (an available index too far ahead) is an error.
    fn next_request(&mut self) -> Result<Option<(u16, u32)>, WorkerError> {
        let mem = &self.memory;
        let chain = match self.queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => return Err(queue_error(e)),
        };
        let Some(chain) = chain else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut filled: u32 = 0;
        let mut source_done = false;
        let mut last_has_next = false;
        for desc in chain {
            last_has_next = desc.has_next();
            // Every buffer must be device-writable and lie wholly in guest
            // memory, even the parts past the cap that are never written.
            if !desc.is_write_only() {
                log::debug!("Request {head} has a device-readable buffer");
                return Ok(Some((head, 0)));
            }
            if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
                log::debug!(
                    "Request {head} has a buffer outside guest memory ({:#x}+{})",
                    desc.addr().0,
                    desc.len()
                );
                return Ok(Some((head, 0)));
            }
            let want = desc.len().min(MAX_REQUEST_BYTES - filled);
            if want == 0 || source_done {
                continue;
            }
            match self.source.fill(mem, desc.addr(), want as usize)? {
                Fill::Bytes(n) => {
                    // n <= want <= MAX_REQUEST_BYTES - filled.
                    filled += u32::try_from(n).unwrap_or(0);
                    source_done = n < want as usize;
                }
                Fill::BadAddress => return Ok(Some((head, 0))),
            }
        }
        // The walk ended on a descriptor that still points on: a next index
        // outside the table, a loop, or a chain over 4 GiB (the iterator
        // stops at each). The chain is malformed.
        if last_has_next {
            log::debug!("Request {head} is not a well-formed chain");
            return Ok(Some((head, 0)));
        }
        Ok(Some((head, filled)))
    }
}

impl Source {
    /// Reads up to `len` bytes from the source into guest memory at `addr`.
    fn fill(
        &mut self,
        memory: &GuestMemory,
        addr: GuestAddress,
        len: usize,
    ) -> Result<Fill, WorkerError> {
        if !memory.check_range(addr, len, Permissions::Write) {
            return Ok(Fill::BadAddress);
        }
        let mut done = 0;
        while done < len {
            let at = addr.0.wrapping_add(done as u64);
            match memory.read_volatile_from(GuestAddress(at), &mut &*self.file, len - done) {
                Ok(0) => {
                    if !self.warned_short {
                        self.warned_short = true;
                        log::warn!(
                            "{} returned no more data; the guest gets short reads",
                            self.path.display()
                        );
                    }
                    break;
                }
                Ok(n) => done += n,
                Err(GuestMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    break;
                }
                Err(GuestMemoryError::IOError(source)) => {
                    return Err(WorkerError::Io {
                        what: format!("Cannot read the entropy source {}", self.path.display()),
                        source,
                    });
                }
                // The range was checked; memory cannot shrink under a
                // running worker, but stay safe if it did.
                Err(_) => return Ok(Fill::BadAddress),
            }
        }
        Ok(Fill::Bytes(done))
    }
}

enum Fill {
    Bytes(usize),
    BadAddress,
}

fn queue_error(e: virtio_queue::Error) -> WorkerError {
    WorkerError::Queue {
        queue: 0,
        message: e.to_string(),
    }
}

impl QueueWorker for RngWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.add(self.kick.as_raw_fd(), KICK, EventSet::IN)
    }

    fn handle(&mut self, token: u64, _: EventSet, _: &EventLoop) -> Result<(), WorkerError> {
        if token != KICK {
            return Ok(());
        }
        // Nothing to read after a spurious wakeup; that is fine.
        let _ = self.kick.read();
        if self.process()? == Batch::Yielded {
            // Come back for the rest after anything else that is ready.
            self.kick.write(1).map_err(|source| WorkerError::Io {
                what: "Cannot re-arm the virtio-rng queue".into(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const MEM: u64 = 0x40_0000;
    const BUF: u64 = 0x10_0000;

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

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// A source file holding `len` bytes 0, 1, 2, … (mod 251).
    fn pattern_source(len: usize) -> (tempfile::Path, RngConfig) {
        let path = tempfile::path("rng");
        let mut f = File::create(&path.0).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        let cfg = RngConfig {
            src: path.0.clone(),
        };
        (path, cfg)
    }

    mod tempfile {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicUsize, Ordering};
        pub struct Path(pub PathBuf);
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn path(tag: &str) -> Path {
            static N: AtomicUsize = AtomicUsize::new(0);
            Path(std::env::temp_dir().join(format!(
                "keel-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            )))
        }
    }

    /// Appends chains to the mock's descriptor table: each chain is a list
    /// of (addr, len, device-writable).
    struct Chains<'a> {
        mock: MockSplitQueue<'a, GuestMemory>,
        next: u16,
    }
    impl<'a> Chains<'a> {
        fn new(mem: &'a GuestMemory) -> Self {
            Chains {
                mock: MockSplitQueue::new(mem, 16),
                next: 0,
            }
        }
        fn add(&mut self, descs: &[(u64, u32, bool)]) {
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, write))| {
                    let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                    let index = self.next + i as u16;
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    SplitDescriptor::new(addr, len, flags, index + 1).into()
                })
                .collect();
            self.mock.add_desc_chains(&raw, self.next).unwrap();
            self.next += descs.len() as u16;
        }
        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.mock.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        }
        fn used_idx(&self) -> u16 {
            self.mock.used().idx().load()
        }
    }

    fn worker(cfg: &RngConfig, mem: &GuestMemory, queue: Queue) -> (RngWorker, Arc<Irq>) {
        let rng = Rng::new(cfg).unwrap();
        let irq = Arc::new(Irq::default());
        let w = RngWorker {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            source: Source {
                file: rng.source.clone(),
                path: cfg.src.clone(),
                warned_short: false,
            },
            published: Arc::new(Mutex::new(None)),
        };
        (w, irq)
    }

    #[test]
    fn a_missing_source_is_named() {
        let err = Rng::new(&RngConfig {
            src: "/nonexistent/keel-rng".into(),
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/keel-rng"), "{err}");
    }

    #[test]
    fn fills_exactly_the_writable_bytes() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
        let mut chains = Chains::new(&mem);
        // Two writable descriptors: 10 and 7 bytes, with a gap between.
        chains.add(&[(BUF, 10, true), (BUF + 32, 7, true)]);
        let (mut w, irq) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        assert_eq!(w.process().unwrap(), Batch::Drained);
        assert_eq!(chains.used_idx(), 1);
        assert_eq!(chains.used(0), (0, 17));
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        let expect: Vec<u8> = (0..17u8).collect();
        assert_eq!(&got[..10], &expect[..10]);
        assert_eq!(&got[10..32], &[0xee; 22]);
        assert_eq!(&got[32..39], &expect[10..17]);
        assert_eq!(&got[39..], &[0xee; 25]);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn huge_requests_are_capped() {
        let (_f, cfg) = pattern_source(1 << 20);
        let mem = memory();
        let mut chains = Chains::new(&mem);
        // 3 MiB of buffer in one chain: only the first 64 KiB are filled.
        chains.add(&[(BUF, 1 << 20, true), (BUF + (1 << 20), 2 << 20, true)]);
        // 4 GiB claimed, running far past the end of memory: malformed,
        // although the capped part would fit.
        chains.add(&[(BUF, u32::MAX, true)]);
        // Past the cap, a buffer outside memory still fails the request.
        chains.add(&[(BUF, 1 << 20, true), (MEM, 16, true)]);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used(0), (0, MAX_REQUEST_BYTES));
        assert_eq!(chains.used(1), (2, 0));
        assert_eq!(chains.used(2), (3, 0));
    }

    #[test]
    fn read_only_descriptors_fail_the_request() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        let mut chains = Chains::new(&mem);
        chains.add(&[(BUF, 16, false)]);
        chains.add(&[(BUF, 16, true), (BUF + 16, 16, false)]);
        chains.add(&[(BUF, 8, true)]);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used_idx(), 3);
        assert_eq!(chains.used(0), (0, 0));
        assert_eq!(chains.used(1), (1, 0));
        // The next, well-formed request is served as usual.
        assert_eq!(chains.used(2), (3, 8));
    }

    #[test]
    fn hostile_chains_fail_alone() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        let mut chains = Chains::new(&mem);
        // Outside guest memory; straddling its end; zero length.
        chains.add(&[(MEM + 0x1000, 16, true)]);
        chains.add(&[(MEM - 8, 16, true)]);
        chains.add(&[(BUF, 0, true)]);
        chains.add(&[(u64::MAX - 4, 16, true)]);
        chains.add(&[(BUF, 4, true)]);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used_idx(), 5);
        for i in 0..4 {
            assert_eq!(chains.used(i).1, 0, "chain {i}");
        }
        assert_eq!(chains.used(4), (4, 4));
    }

    #[test]
    fn a_descriptor_loop_ends() {
        let (_f, cfg) = pattern_source(1 << 20);
        let mem = memory();
        let chains = Chains::new(&mem);
        // Descriptor 0 -> 1 -> 0 -> …
        let d0 = SplitDescriptor::new(BUF, 100, (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16, 1);
        let d1 = SplitDescriptor::new(BUF, 100, (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16, 0);
        chains.mock.desc_table().store(0, d0.into()).unwrap();
        chains.mock.desc_table().store(1, d1.into()).unwrap();
        chains.mock.avail().ring().ref_at(0).unwrap().store(0);
        chains.mock.avail().idx().store(1);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used_idx(), 1);
        // The queue's 16-descriptor limit stops the walk on a descriptor
        // that still has NEXT: the request fails.
        assert_eq!(chains.used(0), (0, 0));
    }

    #[test]
    fn a_next_index_outside_the_table_fails_the_request() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        let chains = Chains::new(&mem);
        let flags = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
        let d0 = SplitDescriptor::new(BUF, 16, flags, 16);
        chains.mock.desc_table().store(0, d0.into()).unwrap();
        chains.mock.avail().ring().ref_at(0).unwrap().store(0);
        chains.mock.avail().idx().store(1);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used(0), (0, 0));
    }

    #[test]
    fn a_broken_avail_index_is_an_error_not_a_hang() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        let chains = Chains::new(&mem);
        chains.mock.avail().idx().store(1000);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        assert!(w.process().is_err());
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let (_f, cfg) = pattern_source(4096);
        let mem = memory();
        let mut chains = Chains::new(&mem);
        chains.add(&[(BUF, 4, true)]);
        chains.add(&[(BUF, 4, true)]);
        let mut queue: Queue = chains.mock.create_queue().unwrap();
        queue.set_event_idx(true);
        // used_event (after the avail ring) = 5: the driver wants to hear
        // only once the sixth buffer is used.
        let used_event = chains.mock.avail_addr().0 + 4 + 2 * 16;
        mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
        let (mut w, irq) = worker(&cfg, &mem, queue);
        w.process().unwrap();
        assert_eq!(chains.used_idx(), 2);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 0);
        // Used ring's avail_event tells the driver where to kick next.
        let avail_event = chains.mock.used_addr().0 + 4 + 8 * 16;
        assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 2);
    }

    #[test]
    fn a_short_source_gives_short_reads() {
        let (_f, cfg) = pattern_source(5);
        let mem = memory();
        let mut chains = Chains::new(&mem);
        chains.add(&[(BUF, 16, true)]);
        chains.add(&[(BUF, 16, true)]);
        let (mut w, _) = worker(&cfg, &mem, chains.mock.create_queue().unwrap());
        w.process().unwrap();
        assert_eq!(chains.used(0), (0, 5));
        assert_eq!(chains.used(1), (1, 0));
    }

    #[test]
    fn activation_serves_kicks_on_the_worker_thread() {
        let mem = memory();
        let mut chains = Chains::new(&mem);
        for _ in 0..3 {
            chains.add(&[(BUF, 32, true)]);
        }
        let mut rng = Rng::new(&RngConfig::default()).unwrap();
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        let irq = Arc::new(Irq::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        rng.activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![super::super::ActiveQueue {
                index: 0,
                queue: chains.mock.create_queue().unwrap(),
                kick: kick.try_clone().unwrap(),
            }],
            acked_features: features::COMMON,
        })
        .unwrap();
        kick.write(1).unwrap();
        for _ in 0..500 {
            if chains.used_idx() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(chains.used_idx(), 3);
        assert_eq!(chains.used(2), (2, 32));
        rng.reset();
        let state: RngState = serde_json::from_value(rng.state()).unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(state.src, PathBuf::from("/dev/urandom"));
        assert_eq!(irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn activation_needs_exactly_the_request_queue() {
        let mem = memory();
        let mut rng = Rng::new(&RngConfig::default()).unwrap();
        let err = rng
            .activate(Activation {
                memory: mem,
                interrupt: Arc::new(Irq::default()),
                queues: Vec::new(),
                acked_features: features::COMMON,
            })
            .err()
            .unwrap();
        assert!(matches!(err, ActivateError::Queues { .. }));
    }
}
