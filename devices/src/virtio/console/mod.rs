//! virtio-console (virtio 1.2 §5.3) with a single port: the guest's `hvc0`.
//!
//! - transmitq (queue 1): bytes the guest writes go to the output the VMM
//!   gave (a non-blocking buffered writer: a slow terminal must not stall
//!   the worker). Each chain is capped at [`MAX_TX_CHAIN_BYTES`].
//! - receiveq (queue 0): when the VMM gave an input fd (a terminal, a pipe,
//!   a socket), bytes readable on it are read straight into the guest's
//!   receive buffers. The worker only ever reads as many bytes as the fd
//!   reports ready (`FIONREAD`), so it never blocks on the fd and never
//!   needs to make it non-blocking (stdin often shares its open file with
//!   stdout). With no receive buffers left it stops watching the fd until
//!   the driver kicks receiveq; typed input waits in the host's buffer.
//! - config space: `cols`, `rows` (offered with VIRTIO_CONSOLE_F_SIZE when
//!   the VMM knows them), `max_nr_ports` = 1, and `emerg_wr`
//!   (VIRTIO_CONSOLE_F_EMERG_WRITE): a write outputs one character at once,
//!   even before the driver set up any queue.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryError, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::EventLoop;
use super::{
    ActivateError, Activation, ActiveQueue, QueueStateSer, QueueWorker, VirtioDevice,
    VirtioInterrupt, WorkerError, WorkerHandle, device_type, features,
};
use crate::GuestMemory;

/// Console feature bits (virtio 1.2 §5.3.3).
pub mod console_features {
    /// `cols` and `rows` in the config space are valid.
    pub const SIZE: u64 = 1 << 0;
    /// Several ports and a control queue pair (not offered).
    pub const MULTIPORT: u64 = 1 << 1;
    /// `emerg_wr` outputs a character.
    pub const EMERG_WRITE: u64 = 1 << 2;
}

/// Largest queue the driver may set up.
pub const QUEUE_SIZE: u16 = 256;
pub const RECEIVEQ: u16 = 0;
pub const TRANSMITQ: u16 = 1;
/// Bytes of one transmit chain that reach the output; the rest of an
/// oversized chain is dropped (Linux sends at most a page or 32 KiB).
pub const MAX_TX_CHAIN_BYTES: usize = 64 << 10;
/// The copy buffer between guest memory and the output, reused.
const TX_CHUNK: usize = 4096;
/// Chains served per wakeup before the worker lets other events (a stop
/// request) through; it comes back to the rest at once.
const BATCH: usize = 256;
const CONFIG_LEN: usize = 12;
const EMERG_WR_OFFSET: u64 = 8;
const STATE_VERSION: u32 = 1;

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const INPUT: u64 = 2;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("Cannot read the console input's flags")]
    InputFlags(#[source] io::Error),
    #[error("The console input is open write-only; give a readable terminal, pipe or socket")]
    InputNotReadable,
    #[error(
        "The console input cannot be polled (a regular file?); give a terminal, pipe or socket"
    )]
    InputNotPollable(#[source] io::Error),
}

/// What a snapshot records of the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub version: u32,
    pub acked_features: u64,
    pub cols: u16,
    pub rows: u16,
    /// Whether the host feeds input to the guest.
    pub input: bool,
    /// receiveq and transmitq as the worker last left them (empty before
    /// the driver activated the device).
    #[serde(default)]
    pub queues: Vec<QueueStateSer>,
}

type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

pub struct Console {
    output: SharedOutput,
    input: Option<Arc<File>>,
    /// (cols, rows) when the VMM knows the terminal's size.
    size: Option<(u16, u16)>,
    acked_features: u64,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    worker: Option<WorkerHandle<ConsoleWorker>>,
    /// Published by the worker after each batch.
    queue_state: Arc<Mutex<Vec<QueueStateSer>>>,
    /// Times the worker woke up (tests watch for busy loops).
    wakeups: Arc<AtomicU64>,
}

impl Console {
    /// A console writing the guest's output to `output`, and feeding it
    /// `input` when given. `output` should not block for long (the VMM
    /// passes its buffered console writer); `input` must be pollable.
    pub fn new(
        output: Box<dyn Write + Send>,
        input: Option<OwnedFd>,
    ) -> Result<Console, ConsoleError> {
        let input = match input {
            Some(fd) => {
                check_input(&fd)?;
                Some(Arc::new(File::from(fd)))
            }
            None => None,
        };
        Ok(Console {
            output: Arc::new(Mutex::new(output)),
            input,
            size: None,
            acked_features: 0,
            interrupt: None,
            worker: None,
            queue_state: Arc::new(Mutex::new(Vec::new())),
            wakeups: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Tells the guest the terminal's size (offers VIRTIO_CONSOLE_F_SIZE).
    pub fn with_size(mut self, cols: u16, rows: u16) -> Self {
        self.size = Some((cols, rows));
        self
    }

    /// The terminal was resized: updates `cols`/`rows` and, if the driver
    /// uses them, tells it. Does nothing unless the device was created
    /// [`with_size`](Self::with_size) (the feature cannot appear later).
    pub fn resize(&mut self, cols: u16, rows: u16) {
        if self.size.is_none() {
            return;
        }
        self.size = Some((cols, rows));
        if self.acked_features & console_features::SIZE != 0
            && let Some(interrupt) = &self.interrupt
            && let Err(e) = interrupt.signal_config()
        {
            log::warn!("virtio-console: cannot signal a size change: {e}");
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let (cols, rows) = self.size.unwrap_or((0, 0));
        let mut c = [0u8; CONFIG_LEN];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        // emerg_wr (8..12) is write-only and reads as 0.
        c
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take()
            && let Some(worker) = worker.stop()
        {
            worker.publish();
        }
    }
}

/// The input must be readable and work with epoll.
fn check_input(fd: &OwnedFd) -> Result<(), ConsoleError> {
    // SAFETY: F_GETFL only reads the flags of a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(ConsoleError::InputFlags(io::Error::last_os_error()));
    }
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(ConsoleError::InputNotReadable);
    }
    let epoll = Epoll::new().map_err(ConsoleError::InputNotPollable)?;
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map_err(ConsoleError::InputNotPollable)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn name(&self) -> &'static str {
        "virtio-console"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let size = if self.size.is_some() {
            console_features::SIZE
        } else {
            0
        };
        features::COMMON | console_features::EMERG_WRITE | size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only emerg_wr is writable; the character is its low byte. The
        // driver may use it before negotiating anything (§5.3.5).
        if offset == EMERG_WR_OFFSET
            && let Some(&c) = data.first()
        {
            let mut out = lock(&self.output);
            if out.write_all(&[c]).and_then(|()| out.flush()).is_err() {
                log::debug!("virtio-console: emergency write lost");
            }
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let Activation {
            memory,
            interrupt,
            queues,
            acked_features,
        } = activation;
        let enabled: Vec<u16> = queues.iter().map(|q| q.index).collect();
        let (rx, tx) = match split_queues(queues) {
            Some(pair) => pair,
            None => {
                return Err(ActivateError::Queues {
                    enabled,
                    needed: "queues 0 and 1 (receiveq, transmitq)".into(),
                });
            }
        };
        let event_idx = acked_features & features::RING_EVENT_IDX != 0;
        let mut worker = ConsoleWorker {
            memory,
            interrupt: interrupt.clone(),
            rx: rx.queue,
            rx_kick: rx.kick,
            tx: tx.queue,
            tx_kick: tx.kick,
            input: self.input.clone().map(|file| Input {
                file,
                state: InputState::Watched,
            }),
            transmitter: Transmitter::new(self.output.clone()),
            published: self.queue_state.clone(),
            wakeups: self.wakeups.clone(),
        };
        worker.rx.set_event_idx(event_idx);
        worker.tx.set_event_idx(event_idx);
        worker.publish();
        self.acked_features = acked_features;
        self.interrupt = Some(interrupt.clone());
        let handle =
            WorkerHandle::spawn("virtio-console".into(), worker, interrupt).map_err(|source| {
                ActivateError::Worker {
                    device: "virtio-console",
                    source,
                }
            })?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
        self.interrupt = None;
        lock(&self.queue_state).clear();
    }

    fn state(&self) -> serde_json::Value {
        let (cols, rows) = self.size.unwrap_or((0, 0));
        let state = ConsoleState {
            version: STATE_VERSION,
            acked_features: self.acked_features,
            cols,
            rows,
            input: self.input.is_some(),
            queues: lock(&self.queue_state).clone(),
        };
        serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
    }
}

/// Exactly receiveq and transmitq, in that order.
fn split_queues(queues: Vec<ActiveQueue>) -> Option<(ActiveQueue, ActiveQueue)> {
    if queues.len() != 2 {
        return None;
    }
    let mut rx = None;
    let mut tx = None;
    for q in queues {
        match q.index {
            RECEIVEQ => rx = Some(q),
            TRANSMITQ => tx = Some(q),
            _ => return None,
        }
    }
    Some((rx?, tx?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputState {
    /// In the epoll set: readable input wakes the worker.
    Watched,
    /// The guest has no receive buffers: out of the epoll set until it
    /// kicks receiveq.
    Parked,
    /// The input reached its end (hang-up, closed pipe).
    Closed,
}

struct Input {
    file: Arc<File>,
    state: InputState,
}

/// How a batch ended.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// Nothing more to do for now.
    Drained,
    /// [`BATCH`] chains were served and more may be waiting.
    Yielded,
    /// Input is waiting but the guest has no receive buffers.
    NoBuffers,
    /// The input has ended.
    InputClosed,
}

struct ConsoleWorker {
    memory: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    rx_kick: EventFd,
    tx: Queue,
    tx_kick: EventFd,
    input: Option<Input>,
    transmitter: Transmitter,
    published: Arc<Mutex<Vec<QueueStateSer>>>,
    wakeups: Arc<AtomicU64>,
}

/// Copies transmit buffers to the output.
struct Transmitter {
    output: SharedOutput,
    /// Reused for every copy.
    buf: Box<[u8]>,
    /// Bytes of oversized transmit chains that were dropped.
    dropped: u64,
}

impl Transmitter {
    fn new(output: SharedOutput) -> Self {
        Transmitter {
            output,
            buf: vec![0u8; TX_CHUNK].into_boxed_slice(),
            dropped: 0,
        }
    }

    /// Copies one chain's device-readable bytes to the output, in order.
    /// Device-writable descriptors have nothing to send and are skipped. A
    /// malformed chain (a buffer outside guest memory, a chain that does not
    /// end) sends nothing.
    fn send(&mut self, memory: &GuestMemory, chain: DescriptorChain<&GuestMemory>) {
        let head = chain.head_index();
        if !well_formed(memory, &chain, Permissions::Read) {
            log::debug!("Transmit request {head} is malformed; dropped");
            return;
        }
        let mut out = lock(&self.output);
        let mut sent = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                continue;
            }
            let len = desc.len() as usize;
            let take = len.min(MAX_TX_CHAIN_BYTES - sent);
            if take < len {
                if self.dropped == 0 {
                    log::warn!(
                        "A transmit request larger than {MAX_TX_CHAIN_BYTES} bytes was cut short"
                    );
                }
                self.dropped = self.dropped.saturating_add((len - take) as u64);
            }
            let mut done = 0;
            while done < take {
                let n = (take - done).min(self.buf.len());
                let Some(addr) = desc.addr().0.checked_add(done as u64) else {
                    return;
                };
                if let Err(e) = memory.read_slice(&mut self.buf[..n], GuestAddress(addr)) {
                    log::debug!("Transmit request {head}: {e}");
                    return;
                }
                if out.write_all(&self.buf[..n]).is_err() {
                    log::debug!("Output lost");
                }
                done += n;
            }
            sent += take;
        }
        let _ = out.flush();
    }
}

fn queue_error(queue: u16) -> impl Fn(virtio_queue::Error) -> WorkerError {
    move |e| WorkerError::Queue {
        queue,
        message: e.to_string(),
    }
}

/// Pops the next chain; a ring the driver broke (an available index too
/// far ahead) is an error rather than an endless "more is available".
fn pop<'m>(
    queue: &mut Queue,
    memory: &'m GuestMemory,
    index: u16,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, WorkerError> {
    match queue.iter(memory) {
        Ok(mut iter) => Ok(iter.next()),
        Err(e) => Err(queue_error(index)(e)),
    }
}

impl ConsoleWorker {
    fn publish(&self) {
        *lock(&self.published) = vec![QueueStateSer::from(&self.rx), QueueStateSer::from(&self.tx)];
    }

    fn signal(&mut self, index: u16) -> Result<(), WorkerError> {
        let queue = if index == RECEIVEQ {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if queue
            .needs_notification(&self.memory)
            .map_err(queue_error(index))?
        {
            self.interrupt
                .signal_queue(index)
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }

    /// Sends up to [`BATCH`] transmit chains to the output.
    fn process_tx(&mut self) -> Result<Batch, WorkerError> {
        let mut served = 0;
        let outcome = loop {
            self.tx
                .disable_notification(&self.memory)
                .map_err(queue_error(TRANSMITQ))?;
            let memory = &self.memory;
            while let Some(chain) = pop(&mut self.tx, memory, TRANSMITQ)? {
                let head = chain.head_index();
                self.transmitter.send(memory, chain);
                self.tx
                    .add_used(memory, head, 0)
                    .map_err(queue_error(TRANSMITQ))?;
                served += 1;
                if served == BATCH {
                    break;
                }
            }
            if served == BATCH {
                break Batch::Yielded;
            }
            if !self
                .tx
                .enable_notification(&self.memory)
                .map_err(queue_error(TRANSMITQ))?
            {
                break Batch::Drained;
            }
        };
        if served > 0 {
            self.publish();
            self.signal(TRANSMITQ)?;
        }
        Ok(outcome)
    }

    /// Moves readable input into receive buffers, as much as both allow
    /// (up to [`BATCH`] buffers).
    fn deliver_input(&mut self) -> Result<Batch, WorkerError> {
        let Some(input) = &self.input else {
            return Ok(Batch::Drained);
        };
        let file = input.file.clone();
        let mut pending = match bytes_ready(&file) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("Input failed, no more input: {e}");
                return Ok(Batch::InputClosed);
            }
        };
        if pending == 0 {
            // Woken (readable or hung up) with nothing to read: the end of
            // the input. A hang-up with bytes still buffered delivers them
            // first, and ends on the next wakeup.
            return Ok(Batch::InputClosed);
        }
        let mut served = 0;
        let outcome = loop {
            if served == BATCH {
                break Batch::Yielded;
            }
            self.rx
                .disable_notification(&self.memory)
                .map_err(queue_error(RECEIVEQ))?;
            let Some(chain) = pop(&mut self.rx, &self.memory, RECEIVEQ)? else {
                if self
                    .rx
                    .enable_notification(&self.memory)
                    .map_err(queue_error(RECEIVEQ))?
                {
                    continue;
                }
                break Batch::NoBuffers;
            };
            let head = chain.head_index();
            let n = receive(&self.memory, &file, chain, pending)?;
            self.rx
                .add_used(&self.memory, head, u32::try_from(n).unwrap_or(u32::MAX))
                .map_err(queue_error(RECEIVEQ))?;
            served += 1;
            pending -= n.min(pending);
            if pending == 0 {
                // Anything that arrived meanwhile wakes epoll again.
                break Batch::Drained;
            }
        };
        if served > 0 {
            self.publish();
            self.signal(RECEIVEQ)?;
        }
        Ok(outcome)
    }
}

/// Whether every buffer of the chain that the device would use (`access`:
/// Read for device-readable ones, Write for device-writable ones) lies
/// wholly in guest memory, and the chain ends properly: a walk that stops
/// on a descriptor still flagged NEXT met a loop, a next index outside the
/// table or a chain over 4 GiB.
fn well_formed(
    memory: &GuestMemory,
    chain: &DescriptorChain<&GuestMemory>,
    access: Permissions,
) -> bool {
    let mut last_has_next = false;
    let in_memory = chain.clone().all(|d| {
        last_has_next = d.has_next();
        let used = d.is_write_only() == (access == Permissions::Write);
        !used || memory.check_range(d.addr(), d.len() as usize, access)
    });
    in_memory && !last_has_next
}

/// Bytes the fd can give without blocking.
fn bytes_ready(file: &File) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer given, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Reads at most `limit` bytes from `file` into the chain's buffers, which
/// must all be device-writable and inside guest memory (else the chain gets
/// nothing, and the input stays for the next one). Returns the bytes
/// written.
fn receive(
    memory: &GuestMemory,
    file: &File,
    chain: DescriptorChain<&GuestMemory>,
    limit: usize,
) -> Result<usize, WorkerError> {
    let head = chain.head_index();
    let writable = chain.clone().all(|d| d.is_write_only());
    if !writable || !well_formed(memory, &chain, Permissions::Write) {
        log::debug!("Receive buffer {head} is malformed; left empty");
        return Ok(0);
    }
    let mut done = 0usize;
    for desc in chain {
        if done == limit {
            break;
        }
        let want = (desc.len() as usize).min(limit - done);
        // Checked again: the guest may have rewritten the descriptor.
        if !desc.is_write_only() || !memory.check_range(desc.addr(), want, Permissions::Write) {
            break;
        }
        match memory.read_volatile_from(desc.addr(), &mut &*file, want) {
            Ok(n) => {
                done += n;
                if n < want {
                    break;
                }
            }
            Err(GuestMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(GuestMemoryError::IOError(source)) => {
                return Err(WorkerError::Io {
                    what: "Cannot read the console input".into(),
                    source,
                });
            }
            Err(_) => break,
        }
    }
    Ok(done)
}

impl QueueWorker for ConsoleWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.add(self.rx_kick.as_raw_fd(), RX_KICK, EventSet::IN)?;
        events.add(self.tx_kick.as_raw_fd(), TX_KICK, EventSet::IN)?;
        if let Some(input) = &self.input {
            events.add(input.file.as_raw_fd(), INPUT, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(
        &mut self,
        token: u64,
        _ready: EventSet,
        events: &EventLoop,
    ) -> Result<(), WorkerError> {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        let rearm = |kick: &EventFd| {
            kick.write(1).map_err(|source| WorkerError::Io {
                what: "Cannot re-arm a virtio-console queue".into(),
                source,
            })
        };
        match token {
            TX_KICK => {
                let _ = self.tx_kick.read();
                if self.process_tx()? == Batch::Yielded {
                    rearm(&self.tx_kick)?;
                }
            }
            RX_KICK => {
                let _ = self.rx_kick.read();
                // New receive buffers: watch the input again.
                if let Some(input) = &mut self.input
                    && input.state == InputState::Parked
                {
                    events
                        .add(input.file.as_raw_fd(), INPUT, EventSet::IN)
                        .map_err(|source| WorkerError::Io {
                            what: "Cannot watch the console input".into(),
                            source,
                        })?;
                    input.state = InputState::Watched;
                }
            }
            INPUT => {
                let next = match self.deliver_input()? {
                    Batch::Drained | Batch::Yielded => InputState::Watched,
                    Batch::NoBuffers => InputState::Parked,
                    Batch::InputClosed => InputState::Closed,
                };
                if let Some(input) = &mut self.input
                    && next != InputState::Watched
                    && input.state == InputState::Watched
                {
                    if next == InputState::Closed {
                        log::info!("The input has ended");
                    }
                    events
                        .remove(input.file.as_raw_fd())
                        .map_err(|source| WorkerError::Io {
                            what: "Cannot stop watching the console input".into(),
                            source,
                        })?;
                    input.state = next;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const MEM: u64 = 0x40_0000;
    const BUF: u64 = 0x10_0000;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x8000;

    #[derive(Default)]
    struct Irq {
        queue: [std::sync::atomic::AtomicUsize; 2],
        config: std::sync::atomic::AtomicUsize,
        needs_reset: std::sync::atomic::AtomicUsize,
    }
    impl VirtioInterrupt for Irq {
        fn signal_queue(&self, q: u16) -> io::Result<()> {
            self.queue[usize::from(q)].fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn signal_config(&self) -> io::Result<()> {
            self.config.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_needs_reset(&self) {
            self.needs_reset.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Sink {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn pipe() -> (OwnedFd, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// A driver-side queue: chains are lists of (addr, len, device-writable).
    struct Ring<'a> {
        mock: MockSplitQueue<'a, GuestMemory>,
        next: u16,
    }
    impl<'a> Ring<'a> {
        fn new(mem: &'a GuestMemory, at: u64) -> Self {
            Ring {
                mock: MockSplitQueue::create(mem, GuestAddress(at), 16),
                next: 0,
            }
        }
        fn add(&mut self, descs: &[(u64, u32, bool)]) {
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, write))| {
                    let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    SplitDescriptor::new(addr, len, flags, self.next + i as u16 + 1).into()
                })
                .collect();
            self.mock.add_desc_chains(&raw, self.next).unwrap();
            self.next += descs.len() as u16;
        }
        fn queue(&self) -> Queue {
            self.mock.create_queue().unwrap()
        }
        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.mock.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        }
        fn used_idx(&self) -> u16 {
            self.mock.used().idx().load()
        }
    }

    struct Setup {
        mem: GuestMemory,
        sink: Sink,
        irq: Arc<Irq>,
    }
    impl Setup {
        fn new() -> Self {
            Setup {
                mem: memory(),
                sink: Sink::default(),
                irq: Arc::new(Irq::default()),
            }
        }
        fn worker(&self, rx: Queue, tx: Queue, input: Option<OwnedFd>) -> ConsoleWorker {
            let console = Console::new(Box::new(self.sink.clone()), input).unwrap();
            ConsoleWorker {
                memory: self.mem.clone(),
                interrupt: self.irq.clone(),
                rx,
                rx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                tx,
                tx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                input: console.input.clone().map(|file| Input {
                    file,
                    state: InputState::Watched,
                }),
                transmitter: Transmitter::new(console.output.clone()),
                published: Arc::new(Mutex::new(Vec::new())),
                wakeups: Arc::new(AtomicU64::new(0)),
            }
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn transmits_bytes_in_order_across_chains() {
        let s = Setup::new();
        s.mem.write_slice(b"hello, ", GuestAddress(BUF)).unwrap();
        s.mem
            .write_slice(b"wor", GuestAddress(BUF + 0x100))
            .unwrap();
        s.mem
            .write_slice(b"XXXX", GuestAddress(BUF + 0x180))
            .unwrap();
        s.mem
            .write_slice(b"ld\n", GuestAddress(BUF + 0x200))
            .unwrap();
        s.mem.write_slice(b"$ ", GuestAddress(BUF + 0x300)).unwrap();
        let rx = Ring::new(&s.mem, RX_RING);
        let mut tx = Ring::new(&s.mem, TX_RING);
        tx.add(&[(BUF, 7, false)]);
        // A writable descriptor in a transmit chain has nothing to send.
        tx.add(&[
            (BUF + 0x100, 3, false),
            (BUF + 0x180, 4, true),
            (BUF + 0x200, 3, false),
        ]);
        tx.add(&[(BUF + 0x300, 2, false)]);
        let mut w = s.worker(rx.queue(), tx.queue(), None);
        assert_eq!(w.process_tx().unwrap(), Batch::Drained);
        assert_eq!(s.sink.bytes(), b"hello, world\n$ ");
        assert_eq!(tx.used_idx(), 3);
        assert_eq!(tx.used(1), (1, 0));
        assert_eq!(s.irq.queue[1].load(Ordering::SeqCst), 1);
    }

    #[test]
    fn hostile_transmit_chains_fail_alone() {
        let s = Setup::new();
        s.mem.write_slice(b"ok", GuestAddress(BUF)).unwrap();
        let rx = Ring::new(&s.mem, RX_RING);
        let mut tx = Ring::new(&s.mem, TX_RING);
        tx.add(&[(MEM + 0x1000, 16, false)]);
        tx.add(&[(u64::MAX - 1, 16, false)]);
        // 4 GiB claimed, past the end of memory: malformed, nothing sent.
        tx.add(&[(0, u32::MAX, false)]);
        // 3 MiB, all in memory: only MAX_TX_CHAIN_BYTES are sent.
        tx.add(&[(0, 3 << 20, false)]);
        // A writable descriptor is not checked against memory: it is
        // skipped, as in any transmit chain.
        tx.add(&[(BUF, 2, false), (MEM + 0x1000, 16, true)]);
        let mut w = s.worker(rx.queue(), tx.queue(), None);
        w.process_tx().unwrap();
        assert_eq!(tx.used_idx(), 5);
        let out = s.sink.bytes();
        assert_eq!(out.len(), MAX_TX_CHAIN_BYTES + 2);
        assert_eq!(&out[MAX_TX_CHAIN_BYTES..], b"ok");
        assert_eq!(w.transmitter.dropped, (3 << 20) - MAX_TX_CHAIN_BYTES as u64);
    }

    #[test]
    fn a_transmit_loop_ends() {
        let s = Setup::new();
        s.mem.write_slice(b"ab", GuestAddress(BUF)).unwrap();
        let rx = Ring::new(&s.mem, RX_RING);
        let tx = Ring::new(&s.mem, TX_RING);
        let f = VRING_DESC_F_NEXT as u16;
        let t = tx.mock.desc_table();
        t.store(0, SplitDescriptor::new(BUF, 2, f, 1).into())
            .unwrap();
        t.store(1, SplitDescriptor::new(BUF, 2, f, 0).into())
            .unwrap();
        tx.mock.avail().ring().ref_at(0).unwrap().store(0);
        tx.mock.avail().idx().store(1);
        let mut w = s.worker(rx.queue(), tx.queue(), None);
        w.process_tx().unwrap();
        assert_eq!(tx.used_idx(), 1);
        assert_eq!(s.sink.bytes(), b"");
    }

    #[test]
    fn a_broken_avail_index_is_an_error_not_a_hang() {
        let s = Setup::new();
        let rx = Ring::new(&s.mem, RX_RING);
        let tx = Ring::new(&s.mem, TX_RING);
        tx.mock.avail().idx().store(999);
        let mut w = s.worker(rx.queue(), tx.queue(), None);
        assert!(w.process_tx().is_err());
    }

    #[test]
    fn emergency_write_outputs_one_character() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()), None).unwrap();
        assert_ne!(c.features() & console_features::EMERG_WRITE, 0);
        assert_eq!(c.features() & console_features::MULTIPORT, 0);
        c.write_config(EMERG_WR_OFFSET, &u32::from(b'K').to_le_bytes());
        c.write_config(EMERG_WR_OFFSET, b"e");
        // Writes elsewhere change nothing.
        c.write_config(0, &[9, 9, 9, 9]);
        c.write_config(9, b"x");
        c.write_config(EMERG_WR_OFFSET, &[]);
        assert_eq!(sink.bytes(), b"Ke");
        let mut cfg = [0xffu8; 12];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn size_is_offered_only_when_known() {
        let c = Console::new(Box::new(io::sink()), None).unwrap();
        assert_eq!(c.features() & console_features::SIZE, 0);
        let mut c = c.with_size(132, 43);
        assert_ne!(c.features() & console_features::SIZE, 0);
        let mut cfg = [0u8; 4];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [132, 0, 43, 0]);
        c.resize(80, 25);
        let mut rows = [0u8; 2];
        c.read_config(2, &mut rows);
        assert_eq!(u16::from_le_bytes(rows), 25);
    }

    #[test]
    fn input_is_delivered_to_receive_buffers() {
        let s = Setup::new();
        let (read, mut write) = pipe();
        write.write_all(b"hello").unwrap();
        let mut rx = Ring::new(&s.mem, RX_RING);
        let tx = Ring::new(&s.mem, TX_RING);
        rx.add(&[(BUF, 3, true)]);
        // A read-only receive buffer gets nothing and loses no input.
        rx.add(&[(BUF + 0x100, 8, false)]);
        rx.add(&[(BUF + 0x200, 1, true), (BUF + 0x300, 16, true)]);
        rx.add(&[(BUF + 0x400, 16, true)]);
        let mut w = s.worker(rx.queue(), tx.queue(), Some(read));
        assert_eq!(w.deliver_input().unwrap(), Batch::Drained);
        assert_eq!(rx.used_idx(), 3);
        assert_eq!(rx.used(0), (0, 3));
        assert_eq!(rx.used(1), (1, 0));
        assert_eq!(rx.used(2), (2, 2));
        let mut got = [0u8; 3];
        s.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"hel");
        s.mem
            .read_slice(&mut got[..1], GuestAddress(BUF + 0x200))
            .unwrap();
        s.mem
            .read_slice(&mut got[1..2], GuestAddress(BUF + 0x300))
            .unwrap();
        assert_eq!(&got[..2], b"lo");
        assert_eq!(s.irq.queue[0].load(Ordering::SeqCst), 1);

        // More input than buffers: the rest waits for the guest.
        write.write_all(&[b'z'; 40]).unwrap();
        assert_eq!(w.deliver_input().unwrap(), Batch::NoBuffers);
        assert_eq!(rx.used(3), (4, 16));
        drop(write);
        let mut rest = Vec::new();
        let mut file = w.input.as_ref().unwrap().file.try_clone().unwrap();
        file.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 24);
    }

    #[test]
    fn a_closed_input_is_reported() {
        let s = Setup::new();
        let (read, write) = pipe();
        drop(write);
        let rx = Ring::new(&s.mem, RX_RING);
        let tx = Ring::new(&s.mem, TX_RING);
        let mut w = s.worker(rx.queue(), tx.queue(), Some(read));
        assert_eq!(w.deliver_input().unwrap(), Batch::InputClosed);
    }

    #[test]
    fn the_input_must_be_readable_and_pollable() {
        let (_read, write) = pipe();
        let err = Console::new(Box::new(io::sink()), Some(OwnedFd::from(write)))
            .err()
            .unwrap();
        assert!(matches!(err, ConsoleError::InputNotReadable), "{err}");
        let file = File::open("/proc/self/exe").unwrap();
        let err = Console::new(Box::new(io::sink()), Some(OwnedFd::from(file)))
            .err()
            .unwrap();
        assert!(matches!(err, ConsoleError::InputNotPollable(_)), "{err}");
    }

    fn activate(c: &mut Console, s: &Setup, rx: &Ring, tx: &Ring) -> (EventFd, EventFd) {
        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        c.activate(Activation {
            memory: s.mem.clone(),
            interrupt: s.irq.clone(),
            // Order does not matter.
            queues: vec![
                ActiveQueue {
                    index: TRANSMITQ,
                    queue: tx.queue(),
                    kick: tx_kick.try_clone().unwrap(),
                },
                ActiveQueue {
                    index: RECEIVEQ,
                    queue: rx.queue(),
                    kick: rx_kick.try_clone().unwrap(),
                },
            ],
            acked_features: features::COMMON,
        })
        .unwrap();
        (rx_kick, tx_kick)
    }

    #[test]
    fn without_receive_buffers_the_worker_sleeps_until_kicked() {
        let s = Setup::new();
        let (read, mut write) = pipe();
        let mut rx = Ring::new(&s.mem, RX_RING);
        let tx = Ring::new(&s.mem, TX_RING);
        let mut c = Console::new(Box::new(s.sink.clone()), Some(read)).unwrap();
        let (rx_kick, _tx_kick) = activate(&mut c, &s, &rx, &tx);
        write.write_all(b"typed early").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // One wakeup for the input, then silence: no busy loop on
        // readable input the guest cannot take.
        let wakeups = c.wakeups.load(Ordering::Relaxed);
        assert!(wakeups <= 2, "{wakeups} wakeups without buffers");
        rx.add(&[(BUF, 64, true)]);
        rx_kick.write(1).unwrap();
        wait_for("input delivered", || rx.used_idx() == 1);
        assert_eq!(rx.used(0), (0, 11));
        let mut got = [0u8; 11];
        s.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"typed early");
        // The writer closing ends input without spinning either.
        drop(write);
        std::thread::sleep(Duration::from_millis(50));
        let before = c.wakeups.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.wakeups.load(Ordering::Relaxed), before);
        c.reset();
        assert_eq!(s.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn activation_transmits_and_reports_state() {
        let s = Setup::new();
        s.mem.write_slice(b"hvc0\n", GuestAddress(BUF)).unwrap();
        let rx = Ring::new(&s.mem, RX_RING);
        let mut tx = Ring::new(&s.mem, TX_RING);
        let mut c = Console::new(Box::new(s.sink.clone()), None)
            .unwrap()
            .with_size(80, 24);
        let (_rx_kick, tx_kick) = activate(&mut c, &s, &rx, &tx);
        tx.add(&[(BUF, 5, false)]);
        tx_kick.write(1).unwrap();
        wait_for("output", || s.sink.bytes() == b"hvc0\n");
        wait_for("published", || {
            let st: ConsoleState = serde_json::from_value(c.state()).unwrap();
            st.queues.len() == 2 && st.queues[1].next_used == 1
        });
        let state: ConsoleState = serde_json::from_value(c.state()).unwrap();
        assert_eq!((state.version, state.cols, state.rows), (1, 80, 24));
        assert_eq!(state.acked_features, features::COMMON);
        c.resize(100, 30);
        // SIZE was not acked: no config interrupt.
        assert_eq!(s.irq.config.load(Ordering::SeqCst), 0);
        c.reset();
        let state: ConsoleState = serde_json::from_value(c.state()).unwrap();
        assert!(state.queues.is_empty());
    }

    #[test]
    fn activation_needs_both_queues() {
        let s = Setup::new();
        let mut c = Console::new(Box::new(io::sink()), None).unwrap();
        let err = c
            .activate(Activation {
                memory: s.mem.clone(),
                interrupt: s.irq.clone(),
                queues: Vec::new(),
                acked_features: features::COMMON,
            })
            .err()
            .unwrap();
        assert!(matches!(err, ActivateError::Queues { .. }));
    }
}
