//! Serving one virtio-blk queue: popping chains, running their requests on
//! the disk, returning them to the used ring and signalling the driver once
//! per batch.
//!
//! [`BlockQueue::process_queue`] is the one entry point for new requests,
//! shared by the worker thread and the fuzzer. With io_uring, reads, writes
//! and flushes are submitted in one batch and finish in
//! [`BlockQueue::process_completions`] when the ring's eventfd fires; the
//! other requests (GET_ID, discard, write-zeroes, errors) and all requests
//! of the synchronous engine finish inline.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, squeue, types};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::io::{DiskImage, Uring, advance_iovecs};
use super::request::{
    DISCARD_SEGMENT_SIZE, DiscardSegment, ID_BYTES, ParseFailure, Parser, Request, RequestError,
    RequestType, SECTOR_SHIFT, check_range, read_discard_segments, to_iovecs, write_to_buffers,
};
use crate::GuestMemory;
use crate::virtio::worker::EventLoop;
use crate::virtio::{QueueStateSer, QueueWorker, VirtioInterrupt, WorkerError};

/// Most I/O vectors one request may use (the kernel's UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;
/// Most requests in flight on io_uring per queue. Bounds the memory a
/// guest can pin with huge queues; further chains wait in the avail ring.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most segments in one discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: usize = 32;
/// Most sectors in one discard / write-zeroes segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("The queue is broken (bad avail or used ring)")]
    Ring(#[source] virtio_queue::Error),
    #[error("The avail index announces chains whose ring entries cannot be read")]
    Stuck,
    #[error("io_uring failed")]
    Uring(#[source] io::Error),
}

/// What the device has done, for the API and for tests. Relaxed atomics:
/// the counters are statistics, not synchronisation.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_bytes: AtomicU64,
    pub read_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    /// Requests answered with IOERR or UNSUPP, or dropped.
    pub errors: AtomicU64,
}

impl BlockCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a queue needs to know about its device.
pub struct QueueContext {
    pub disk: Arc<DiskImage>,
    pub counters: Arc<BlockCounters>,
    pub id: [u8; ID_BYTES],
    /// Whether write-zeroes may deallocate (the driver acked WRITE_ZEROES
    /// and the device offers write_zeroes_may_unmap).
    pub may_unmap: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// A request in flight on io_uring. Its iovecs stay put (the kernel reads
/// them) until its completion is reaped.
struct Slot {
    head: u16,
    status: GuestAddress,
    op: Op,
    offset: u64,
    len: u64,
    iovecs: Vec<libc::iovec>,
    /// First vector with bytes still to move (after short transfers).
    start: usize,
    /// Submitted on the buffered fd (after O_DIRECT refused it).
    buffered: bool,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory, which the
// queue keeps mapped (it owns a `GuestMemory` clone) for as long as it
// lives; they are only dereferenced by the kernel.
unsafe impl Send for Slot {}

/// How requests reach the disk.
enum Engine {
    Sync {
        iovecs: Vec<libc::iovec>,
    },
    Uring {
        uring: Box<Uring>,
        slots: Vec<Slot>,
        free: Vec<u16>,
        /// Chains are waiting in the avail ring for a free slot.
        stalled: bool,
        /// Entries pushed but not yet submitted.
        unsubmitted: bool,
    },
}

// SAFETY: see `Slot`; the sync engine's iovecs are scratch space, only
// meaningful during one call.
unsafe impl Send for Engine {}

/// One virtio-blk queue and the engine that serves it.
pub struct BlockQueue {
    queue: Queue,
    ctx: QueueContext,
    parser: Parser,
    engine: Engine,
    /// Used buffers added since the driver was last considered for a
    /// notification.
    completed: bool,
}

impl BlockQueue {
    /// A queue served by blocking calls on the calling thread.
    pub fn new_sync(queue: Queue, ctx: QueueContext) -> Self {
        BlockQueue {
            queue,
            ctx,
            parser: Parser::new(),
            engine: Engine::Sync {
                iovecs: Vec::with_capacity(64),
            },
            completed: false,
        }
    }

    /// A queue served by its own io_uring; by blocking calls when the
    /// ring cannot be set up.
    pub fn new_uring(queue: Queue, ctx: QueueContext) -> Self {
        let slots = usize::from(queue.size()).clamp(1, MAX_IN_FLIGHT);
        // The ring has a submission entry per slot and twice that many
        // completion entries, and a slot has at most one operation in
        // flight, so neither can overflow.
        let uring = match Uring::new(slots as u32) {
            Ok(uring) => uring,
            Err(e) => {
                log::warn!(
                    "virtio-blk {}: io_uring setup failed ({e}); using blocking I/O",
                    ctx.disk.path().display()
                );
                return Self::new_sync(queue, ctx);
            }
        };
        BlockQueue {
            queue,
            ctx,
            parser: Parser::new(),
            engine: Engine::Uring {
                uring: Box::new(uring),
                slots: (0..slots)
                    .map(|_| Slot {
                        head: 0,
                        status: GuestAddress(0),
                        op: Op::Flush,
                        offset: 0,
                        len: 0,
                        iovecs: Vec::new(),
                        start: 0,
                        buffered: false,
                    })
                    .collect(),
                free: (0..slots as u16).rev().collect(),
                stalled: false,
                unsubmitted: false,
            },
            completed: false,
        }
    }

    /// Whether the queue runs on io_uring.
    pub fn uses_io_uring(&self) -> bool {
        matches!(self.engine, Engine::Uring { .. })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The eventfd io_uring completions signal, if the queue uses io_uring.
    pub fn completion_fd(&self) -> Option<&EventFd> {
        match &self.engine {
            Engine::Uring { uring, .. } => Some(&uring.eventfd),
            Engine::Sync { .. } => None,
        }
    }

    /// Serves every chain in the avail ring (as many as fit in flight).
    /// Returns whether the driver should be notified of used buffers.
    pub fn process_queue(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        self.pop_all(mem)?;
        self.submit()?;
        self.notification(mem)
    }

    /// Finishes the io_uring requests that completed, then serves chains
    /// that were waiting for a free slot. Returns whether the driver should
    /// be notified.
    pub fn process_completions(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if let Engine::Uring { uring, .. } = &self.engine {
            // Reset the eventfd before reaping, so a completion that lands
            // after the reap wakes us again.
            let _ = uring.eventfd.read();
        }
        self.reap(mem)?;
        if let Engine::Uring { stalled, free, .. } = &mut self.engine
            && *stalled
            && !free.is_empty()
        {
            *stalled = false;
            self.pop_all(mem)?;
        }
        self.submit()?;
        self.notification(mem)
    }

    fn notification(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if !std::mem::take(&mut self.completed) {
            return Ok(false);
        }
        self.queue.needs_notification(mem).map_err(QueueError::Ring)
    }

    fn has_room(&mut self) -> bool {
        match &mut self.engine {
            Engine::Sync { .. } => true,
            Engine::Uring { free, stalled, .. } => {
                if free.is_empty() {
                    *stalled = true;
                }
                !free.is_empty()
            }
        }
    }

    fn pop_all(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        let mut empty_rounds = 0;
        loop {
            // With EVENT_IDX this stops the driver's kicks while we drain
            // the ring; the re-enable below catches chains added meanwhile.
            self.queue
                .disable_notification(mem)
                .map_err(QueueError::Ring)?;
            let mut popped = false;
            while self.has_room() {
                let chain = self.queue.iter(mem).map_err(QueueError::Ring)?.next();
                let Some(chain) = chain else { break };
                popped = true;
                match self.parser.parse(chain, mem) {
                    Ok(request) => self.start(mem, request)?,
                    Err(failure) => self.fail_parse(mem, failure)?,
                }
            }
            if let Engine::Uring { stalled: true, .. } = self.engine {
                // Kicks stay off until completions free a slot.
                return Ok(());
            }
            if !self
                .queue
                .enable_notification(mem)
                .map_err(QueueError::Ring)?
            {
                return Ok(());
            }
            // The avail index says there is more. Once may be a chain that
            // arrived just now; twice in a row with nothing popped means
            // its ring entries cannot be read, and looping would spin.
            if popped {
                empty_rounds = 0;
            } else {
                empty_rounds += 1;
                if empty_rounds > 1 {
                    return Err(QueueError::Stuck);
                }
            }
        }
    }

    fn fail_parse(&mut self, mem: &GuestMemory, failure: ParseFailure) -> Result<(), QueueError> {
        log::debug!("virtio-blk: request {}: {}", failure.head, failure.error);
        match failure.status {
            Some(status) => self.complete(mem, failure.head, status, VIRTIO_BLK_S_IOERR as u8, 0),
            None => {
                BlockCounters::add(&self.ctx.counters.errors, 1);
                self.add_used(mem, failure.head, 0)
            }
        }
    }

    /// Writes the status byte and returns the chain with `data` bytes
    /// written before the status.
    fn complete(
        &mut self,
        mem: &GuestMemory,
        head: u16,
        status: GuestAddress,
        code: u8,
        data: u64,
    ) -> Result<(), QueueError> {
        if code != VIRTIO_BLK_S_OK as u8 {
            BlockCounters::add(&self.ctx.counters.errors, 1);
        }
        let len = match mem.write_obj(code, status) {
            // `data` is at most the chain's length, below 4 GiB.
            Ok(()) => u32::try_from(data.saturating_add(1)).unwrap_or(u32::MAX),
            Err(_) => 0,
        };
        self.add_used(mem, head, len)
    }

    fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        self.queue
            .add_used(mem, head, len)
            .map_err(QueueError::Ring)?;
        self.completed = true;
        Ok(())
    }

    fn start(&mut self, mem: &GuestMemory, request: Request) -> Result<(), QueueError> {
        let result = match request.request_type {
            RequestType::In | RequestType::Out => self.start_rw(mem, &request),
            RequestType::Flush => self.start_flush(&request),
            RequestType::GetId => {
                let written = write_to_buffers(mem, &self.parser.data, &self.ctx.id);
                return match written {
                    Ok(n) => self.complete(
                        mem,
                        request.head,
                        request.status,
                        VIRTIO_BLK_S_OK as u8,
                        n as u64,
                    ),
                    Err(e) => self.fail(mem, &request, e),
                };
            }
            RequestType::Discard | RequestType::WriteZeroes => self.discard(mem, &request),
            RequestType::Unsupported(t) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                return self.complete(
                    mem,
                    request.head,
                    request.status,
                    VIRTIO_BLK_S_UNSUPP as u8,
                    0,
                );
            }
        };
        match result {
            // Submitted to io_uring; finishes on completion.
            Ok(None) => Ok(()),
            Ok(Some(data)) => self.complete(
                mem,
                request.head,
                request.status,
                VIRTIO_BLK_S_OK as u8,
                data,
            ),
            Err(e) => self.fail(mem, &request, e),
        }
    }

    fn fail(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
        e: RequestError,
    ) -> Result<(), QueueError> {
        log::debug!(
            "virtio-blk: {:?} request {}: {e}",
            request.request_type,
            request.head
        );
        self.complete(
            mem,
            request.head,
            request.status,
            VIRTIO_BLK_S_IOERR as u8,
            0,
        )
    }

    /// Runs or submits a read or write. `Ok(Some(n))`: done, `n` bytes for
    /// the driver; `Ok(None)`: in flight.
    fn start_rw(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
    ) -> Result<Option<u64>, RequestError> {
        let disk = &self.ctx.disk;
        request.check_rw(disk.sectors(), disk.read_only())?;
        let offset = request.sector << SECTOR_SHIFT;
        let read = request.request_type == RequestType::In;
        let counters = &self.ctx.counters;
        match &mut self.engine {
            Engine::Sync { iovecs } => {
                to_iovecs(mem, &self.parser.data, iovecs, MAX_IOVECS)?;
                if read {
                    disk.read_sync(iovecs, offset).map_err(RequestError::Io)?;
                    BlockCounters::add(&counters.read_bytes, request.data_len);
                    BlockCounters::add(&counters.read_ops, 1);
                    Ok(Some(request.data_len))
                } else {
                    disk.write_sync(iovecs, offset).map_err(RequestError::Io)?;
                    BlockCounters::add(&counters.write_bytes, request.data_len);
                    BlockCounters::add(&counters.write_ops, 1);
                    Ok(Some(0))
                }
            }
            Engine::Uring {
                uring,
                slots,
                free,
                unsubmitted,
                ..
            } => {
                let Some(&index) = free.last() else {
                    // has_room() guarantees a slot.
                    return Err(RequestError::Io(io::Error::from(io::ErrorKind::WouldBlock)));
                };
                let slot = &mut slots[usize::from(index)];
                to_iovecs(mem, &self.parser.data, &mut slot.iovecs, MAX_IOVECS)?;
                if slot.iovecs.is_empty() {
                    // Nothing to move.
                    return Ok(Some(0));
                }
                free.pop();
                slot.head = request.head;
                slot.status = request.status;
                slot.op = if read { Op::Read } else { Op::Write };
                slot.offset = offset;
                slot.len = request.data_len;
                slot.start = 0;
                slot.buffered = false;
                push(uring, disk, slot, index)?;
                *unsubmitted = true;
                Ok(None)
            }
        }
    }

    fn start_flush(&mut self, request: &Request) -> Result<Option<u64>, RequestError> {
        let disk = &self.ctx.disk;
        BlockCounters::add(&self.ctx.counters.flush_ops, 1);
        match &mut self.engine {
            Engine::Sync { .. } => {
                disk.flush_sync().map_err(RequestError::Io)?;
                Ok(Some(0))
            }
            Engine::Uring {
                uring,
                slots,
                free,
                unsubmitted,
                ..
            } => {
                let Some(index) = free.pop() else {
                    return Err(RequestError::Io(io::Error::from(io::ErrorKind::WouldBlock)));
                };
                let slot = &mut slots[usize::from(index)];
                slot.head = request.head;
                slot.status = request.status;
                slot.op = Op::Flush;
                slot.iovecs.clear();
                slot.start = 0;
                slot.len = 0;
                push(uring, disk, slot, index)?;
                *unsubmitted = true;
                Ok(None)
            }
        }
    }

    /// Discard and write-zeroes run inline: fallocate is a metadata
    /// operation, and keeping them out of the ring keeps one operation per
    /// slot.
    fn discard(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
    ) -> Result<Option<u64>, RequestError> {
        let disk = &self.ctx.disk;
        if disk.read_only() {
            return Err(RequestError::ReadOnly);
        }
        let mut raw = [[0u8; DISCARD_SEGMENT_SIZE as usize]; MAX_DISCARD_SEGMENTS];
        let count = read_discard_segments(mem, &self.parser.data, request.data_len, &mut raw)?;
        let write_zeroes = request.request_type == RequestType::WriteZeroes;
        let allowed_flags = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        // Check every segment before touching the disk.
        for r in &raw[..count] {
            let s = DiscardSegment::decode(r);
            if s.flags & !allowed_flags != 0 {
                return Err(RequestError::SegmentFlags(s.flags));
            }
            if s.num_sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::SegmentTooLarge(s.num_sectors));
            }
            check_range(s.sector, u64::from(s.num_sectors), disk.sectors())?;
        }
        for r in &raw[..count] {
            let s = DiscardSegment::decode(r);
            let (offset, len) = (
                s.sector << SECTOR_SHIFT,
                u64::from(s.num_sectors) << SECTOR_SHIFT,
            );
            if write_zeroes {
                let unmap = self.ctx.may_unmap && s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                disk.write_zeroes(offset, len, unmap)
                    .map_err(RequestError::Io)?;
            } else {
                disk.discard(offset, len).map_err(RequestError::Io)?;
            }
        }
        let counter = if write_zeroes {
            &self.ctx.counters.write_zeroes_ops
        } else {
            &self.ctx.counters.discard_ops
        };
        BlockCounters::add(counter, 1);
        Ok(Some(0))
    }

    fn submit(&mut self) -> Result<(), QueueError> {
        if let Engine::Uring {
            uring, unsubmitted, ..
        } = &mut self.engine
            && std::mem::take(unsubmitted)
        {
            loop {
                match uring.ring.submit() {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        // Completions must be reaped first; the eventfd
                        // is already ready and brings us back.
                        *unsubmitted = true;
                        break;
                    }
                    Err(e) => return Err(QueueError::Uring(e)),
                }
            }
        }
        Ok(())
    }

    fn reap(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        loop {
            let Engine::Uring { uring, .. } = &mut self.engine else {
                return Ok(());
            };
            let Some(cqe) = uring.ring.completion().next() else {
                return Ok(());
            };
            self.finish(mem, cqe.user_data(), cqe.result())?;
        }
    }

    /// Handles one completion: resubmits what is left of a short transfer,
    /// or retries on the buffered fd, or returns the chain.
    fn finish(&mut self, mem: &GuestMemory, user_data: u64, result: i32) -> Result<(), QueueError> {
        let Engine::Uring {
            uring,
            slots,
            free,
            unsubmitted,
            ..
        } = &mut self.engine
        else {
            return Ok(());
        };
        let Some(slot) = usize::try_from(user_data)
            .ok()
            .and_then(|i| slots.get_mut(i))
        else {
            log::error!("virtio-blk: io_uring completion for unknown request {user_data}");
            return Ok(());
        };
        let index = user_data as u16;
        let disk = &self.ctx.disk;
        let code = if result >= 0 {
            let n = result as usize;
            if slot.op == Op::Flush {
                Some(VIRTIO_BLK_S_OK as u8)
            } else if n == 0 && slot.start < slot.iovecs.len() {
                log::debug!("virtio-blk: the disk image ended early (was it truncated?)");
                Some(VIRTIO_BLK_S_IOERR as u8)
            } else {
                slot.start = advance_iovecs(&mut slot.iovecs, slot.start, n);
                if slot.start < slot.iovecs.len() {
                    slot.offset += n as u64;
                    None
                } else {
                    Some(VIRTIO_BLK_S_OK as u8)
                }
            }
        } else {
            match -result {
                libc::EINTR | libc::EAGAIN => None,
                libc::EINVAL if disk.direct() && !slot.buffered && slot.op != Op::Flush => {
                    slot.buffered = true;
                    None
                }
                errno => {
                    log::debug!(
                        "virtio-blk: {:?} at {:#x}: {}",
                        slot.op,
                        slot.offset,
                        io::Error::from_raw_os_error(errno)
                    );
                    Some(VIRTIO_BLK_S_IOERR as u8)
                }
            }
        };
        let Some(code) = code else {
            // Resubmit the rest.
            push(uring, disk, slot, index).map_err(|e| match e {
                RequestError::Io(e) => QueueError::Uring(e),
                other => QueueError::Uring(io::Error::other(other.to_string())),
            })?;
            *unsubmitted = true;
            return Ok(());
        };
        let (head, status, op, len) = (slot.head, slot.status, slot.op, slot.len);
        free.push(index);
        let counters = &self.ctx.counters;
        let data = if code == VIRTIO_BLK_S_OK as u8 {
            match op {
                Op::Read => {
                    BlockCounters::add(&counters.read_bytes, len);
                    BlockCounters::add(&counters.read_ops, 1);
                    len
                }
                Op::Write => {
                    BlockCounters::add(&counters.write_bytes, len);
                    BlockCounters::add(&counters.write_ops, 1);
                    0
                }
                Op::Flush => 0,
            }
        } else {
            0
        };
        self.complete(mem, head, status, code, data)
    }

    /// Waits for every request in flight, without touching the rings: the
    /// kernel must be done with guest memory before the queue (and its hold
    /// on that memory) goes away.
    fn drain(&mut self) {
        let Engine::Uring {
            uring, slots, free, ..
        } = &mut self.engine
        else {
            return;
        };
        let _ = uring.ring.submit();
        while free.len() < slots.len() {
            if let Err(e) = uring.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                log::error!("virtio-blk: cannot wait for requests in flight: {e}");
                return;
            }
            for cqe in uring.ring.completion() {
                if let Ok(i) = u16::try_from(cqe.user_data())
                    && usize::from(i) < slots.len()
                    && !free.contains(&i)
                {
                    free.push(i);
                }
            }
        }
    }
}

impl Drop for BlockQueue {
    fn drop(&mut self) {
        self.drain();
    }
}

/// Queues one slot's operation (what is left of it) on the ring.
fn push(uring: &mut Uring, disk: &DiskImage, slot: &Slot, index: u16) -> Result<(), RequestError> {
    let entry: squeue::Entry = match slot.op {
        Op::Flush => opcode::Fsync::new(types::Fd(disk.fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Read | Op::Write => {
            let iov = &slot.iovecs[slot.start..];
            let fd = if slot.buffered {
                disk.buffered_fd()
            } else {
                disk.fd_for(iov, slot.offset)
            };
            // At most MAX_IOVECS vectors.
            let n = iov.len() as u32;
            if slot.op == Op::Read {
                opcode::Readv::new(types::Fd(fd), iov.as_ptr(), n)
                    .offset(slot.offset)
                    .build()
            } else {
                opcode::Writev::new(types::Fd(fd), iov.as_ptr(), n)
                    .offset(slot.offset)
                    .build()
            }
        }
    };
    let entry = entry.user_data(u64::from(index));
    // SAFETY: the entry points at the slot's iovecs and, through them, at
    // guest memory; both stay valid and unmoved until its completion is
    // reaped (the slot is not reused before, and the queue drains the ring
    // before it drops its memory).
    let pushed = unsafe { uring.ring.submission().push(&entry) };
    if pushed.is_err() {
        // Cannot happen: the ring has an entry per slot. Submit and retry.
        uring.ring.submit().map_err(RequestError::Io)?;
        // SAFETY: as above.
        unsafe { uring.ring.submission().push(&entry) }
            .map_err(|_| RequestError::Io(io::Error::other("io_uring submission queue is full")))?;
    }
    Ok(())
}

/// Epoll tokens of a queue worker.
const KICK: u64 = 0;
const COMPLETION: u64 = 1;

/// The thread serving one queue.
pub struct BlockWorker {
    pub index: u16,
    pub queue: BlockQueue,
    pub kick: EventFd,
    pub memory: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Where the queue's state is published after each batch, for
    /// `Block::state` while the worker runs.
    pub states: Arc<Mutex<Vec<QueueStateSer>>>,
    pub slot: usize,
}

impl BlockWorker {
    fn publish(&self) {
        if let Ok(mut states) = self.states.lock()
            && let Some(s) = states.get_mut(self.slot)
        {
            *s = QueueStateSer::from(self.queue.queue());
        }
    }
}

impl QueueWorker for BlockWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.add(self.kick.as_raw_fd(), KICK, EventSet::IN)?;
        if let Some(fd) = self.queue.completion_fd() {
            events.add(fd.as_raw_fd(), COMPLETION, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, _: EventSet, _: &EventLoop) -> Result<(), WorkerError> {
        let queue_error = |e: QueueError| WorkerError::Queue {
            queue: self.index,
            message: error_chain(&e),
        };
        let notify = match token {
            KICK => {
                let _ = self.kick.read();
                self.queue.process_queue(&self.memory)
            }
            COMPLETION => self.queue.process_completions(&self.memory),
            _ => return Ok(()),
        }
        .map_err(queue_error)?;
        if notify {
            self.interrupt
                .signal_queue(self.index)
                .map_err(WorkerError::Interrupt)?;
        }
        self.publish();
        Ok(())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
