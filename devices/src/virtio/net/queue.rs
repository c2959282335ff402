//! The virtio-net data path: one receive and one transmit queue over one
//! backend fd (a tap queue; a socketpair in tests and fuzzing).
//!
//! TX gathers a chain's guest buffers (virtio-net header + frame) into an
//! iovec of host pointers and `writev`s it; RX `readv`s straight into the
//! guest's buffers. Nothing is copied and nothing is allocated per frame:
//! the iovec and chain lists are scratch vectors reused across frames.
//!
//! A malformed chain (writable descriptors in TX, read-only ones in RX, a
//! TX chain shorter than the header, more than 64 KiB of frame, a loop,
//! an address outside guest memory) is completed with length 0 and
//! counted as dropped; the queue keeps going. A malformed ring (an avail
//! index the driver could not have written) is an error: the worker stops
//! and the device asks for a reset.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use super::tap::VNET_HDR_LEN;
use crate::GuestMemory;

/// Largest frame (without the virtio-net header) a chain may carry: a
/// 64 KiB GSO super-frame plus its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest chain: header plus frame.
pub const MAX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Most iovec entries a chain (or the chains of one received frame) may
/// need: UIO_MAXIOV (1024) less one for the RX overflow byte.
const MAX_IOVECS: usize = 1023;
/// Frames handled per wake-up before the worker looks at its other fds.
const BUDGET: usize = 256;
/// Byte offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

#[derive(Debug, Error)]
pub enum NetQueueError {
    #[error(
        "Queue {queue}: the driver's avail index {avail} is {pending} entries ahead of the device (queue size {size})"
    )]
    AvailIndex {
        queue: u16,
        avail: u16,
        pending: u16,
        size: u16,
    },
    #[error("Queue {queue}: the ring is not in guest memory")]
    Ring {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("Reading a frame from the tap failed")]
    Read(#[source] io::Error),
}

/// Traffic counters, shared with whoever reports them (the API, later).
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    /// Interrupts sent again because the driver missed one.
    pub interrupts_resent: AtomicU64,
}

/// A plain copy of [`NetCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetCountersSnapshot {
    pub rx_bytes: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub interrupts_resent: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCountersSnapshot {
            rx_bytes: l(&self.rx_bytes),
            rx_frames: l(&self.rx_frames),
            rx_dropped: l(&self.rx_dropped),
            tx_bytes: l(&self.tx_bytes),
            tx_frames: l(&self.tx_frames),
            tx_dropped: l(&self.tx_dropped),
            interrupts_resent: l(&self.interrupts_resent),
        }
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// Why a chain was dropped (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadChain {
    WrongDirection,
    TooLong,
    TooShort,
    BadAddress,
    TooManyDescriptors,
    Unterminated,
}

/// Scratch iovecs. They hold host pointers into guest memory only between
/// building a readv/writev and making it; they are cleared before the
/// next chain.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are never dereferenced by this type; they are
// rebuilt from the worker's own guest memory mapping before every use.
unsafe impl Send for IoVecs {}

/// A chain gathered for RX: its head, how many bytes it holds, and where
/// its iovecs start in the scratch vector.
#[derive(Clone, Copy)]
struct RxChain {
    head: u16,
    capacity: usize,
    first_iov: usize,
}

/// What a round of RX left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxOutcome {
    /// Used buffers were added (the driver may need an interrupt).
    pub used: bool,
    /// The driver has no receive buffers: stop polling the backend until it
    /// posts some (its kick re-enables it).
    pub starved: bool,
    /// The budget ran out with frames possibly still pending.
    pub more: bool,
    /// The backend has no interface behind it (a tap queue detached
    /// because the driver uses fewer pairs): nothing to read until it is
    /// attached again.
    pub detached: bool,
}

/// What a round of TX left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    pub used: bool,
    /// The backend refused with EAGAIN; wait for it to become writable.
    pub blocked: bool,
    pub more: bool,
}

/// Receive and transmit queues of one pair, with the fd they move frames
/// through.
pub struct QueuePair<B> {
    pub backend: B,
    pub rx: Queue,
    pub tx: Queue,
    rx_index: u16,
    tx_index: u16,
    mrg_rxbuf: bool,
    /// With mergeable buffers: gather chains until they hold this much
    /// before reading, so no frame is truncated.
    rx_needed: usize,
    counters: Arc<NetCounters>,
    iov: IoVecs,
    rx_chains: Vec<RxChain>,
    /// One byte past the guest's buffers on every read: a frame that
    /// reaches it did not fit (the tap truncates silently).
    overflow: Box<[u8; 1]>,
}

/// Settings a [`QueuePair`] takes from negotiation.
#[derive(Clone, Copy, Debug)]
pub struct PairConfig {
    pub rx_index: u16,
    pub tx_index: u16,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub mrg_rxbuf: bool,
    /// The largest frame the backend may deliver (MTU + link headers, or
    /// [`MAX_FRAME_LEN`] with guest GSO).
    pub max_rx_frame: usize,
}

/// Takes the next chain, refusing an avail index the driver cannot have
/// written (more entries than the queue has); without that check a bad
/// index would spin the worker forever.
fn pop<'m>(
    q: &mut Queue,
    index: u16,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, NetQueueError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|source| NetQueueError::Ring {
            queue: index,
            source,
        })?;
    let pending = (avail - Wrapping(q.next_avail())).0;
    if pending == 0 {
        return Ok(None);
    }
    if pending > q.size() {
        return Err(NetQueueError::AvailIndex {
            queue: index,
            avail: avail.0,
            pending,
            size: q.size(),
        });
    }
    match q.pop_descriptor_chain(mem) {
        Some(chain) => Ok(Some(chain)),
        None => Err(NetQueueError::Ring {
            queue: index,
            source: virtio_queue::Error::InvalidAvailRingIndex,
        }),
    }
}

fn ring_err(queue: u16) -> impl Fn(virtio_queue::Error) -> NetQueueError {
    move |source| NetQueueError::Ring { queue, source }
}

/// Appends host iovecs for every descriptor of `chain` to `iov`; all must
/// be writable (`writable`) or all readable. Returns the chain's length.
fn gather(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, BadChain> {
    let mut total = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(BadChain::WrongDirection);
        }
        let len = desc.len() as usize;
        total = total.saturating_add(len);
        // A frame to send is at most a header and a 64 KiB frame; a receive
        // buffer may be larger (Linux's "big packets" chains are 17 pages
        // and a header): only what a frame needs of it gets written.
        if !writable && total > MAX_CHAIN_LEN {
            return Err(BadChain::TooLong);
        }
        if len == 0 {
            continue;
        }
        for slice in mem.get_slices(desc.addr(), len) {
            let slice = slice.map_err(|_| BadChain::BadAddress)?;
            if iov.len() >= MAX_IOVECS {
                return Err(BadChain::TooManyDescriptors);
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    // The chain iterator stops silently at a loop, a next index past the
    // table, or an unreadable descriptor: the last descriptor it gave
    // still says "next".
    if last_has_next {
        return Err(BadChain::Unterminated);
    }
    Ok(total)
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
    )
}

impl<B: AsRawFd> QueuePair<B> {
    pub fn new(
        backend: B,
        rx: Queue,
        tx: Queue,
        config: PairConfig,
        counters: Arc<NetCounters>,
    ) -> Self {
        let rx_needed = if config.mrg_rxbuf {
            VNET_HDR_LEN + config.max_rx_frame.min(MAX_FRAME_LEN)
        } else {
            0
        };
        QueuePair {
            backend,
            rx,
            tx,
            rx_index: config.rx_index,
            tx_index: config.tx_index,
            mrg_rxbuf: config.mrg_rxbuf,
            rx_needed,
            counters,
            iov: IoVecs(Vec::with_capacity(MAX_IOVECS + 1)),
            rx_chains: Vec::with_capacity(64),
            overflow: Box::new([0]),
        }
    }

    pub fn rx_index(&self) -> u16 {
        self.rx_index
    }

    pub fn tx_index(&self) -> u16 {
        self.tx_index
    }

    fn fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// Sends every frame the driver has queued, up to the budget.
    pub fn process_tx(&mut self, mem: &GuestMemory) -> Result<TxOutcome, NetQueueError> {
        let qi = self.tx_index;
        let mut out = TxOutcome::default();
        let mut done = 0usize;
        'outer: loop {
            self.tx.disable_notification(mem).map_err(ring_err(qi))?;
            while let Some(chain) = pop(&mut self.tx, qi, mem)? {
                let head = chain.head_index();
                self.iov.0.clear();
                match gather(mem, chain, false, &mut self.iov.0) {
                    Ok(len) if len < VNET_HDR_LEN => self.drop_tx(head, BadChain::TooShort),
                    Ok(len) => {
                        // SAFETY: every iovec points into guest memory that
                        // `mem` keeps mapped for the duration of the call.
                        let n = unsafe {
                            libc::writev(
                                self.fd(),
                                self.iov.0.as_ptr(),
                                self.iov.0.len() as libc::c_int,
                            )
                        };
                        self.iov.0.clear();
                        if n < 0 {
                            let e = io::Error::last_os_error();
                            if would_block(&e) {
                                self.tx.set_next_avail(self.tx.next_avail().wrapping_sub(1));
                                out.blocked = true;
                                break 'outer;
                            }
                            log::debug!("virtio-net: tap refused a frame: {e}");
                            bump(&self.counters.tx_dropped, 1);
                        } else {
                            bump(&self.counters.tx_frames, 1);
                            bump(&self.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                        }
                    }
                    Err(why) => {
                        self.iov.0.clear();
                        self.drop_tx(head, why)
                    }
                }
                self.tx.add_used(mem, head, 0).map_err(ring_err(qi))?;
                out.used = true;
                done += 1;
                if done >= BUDGET {
                    out.more = true;
                    break 'outer;
                }
            }
            if !self.tx.enable_notification(mem).map_err(ring_err(qi))? {
                break;
            }
        }
        Ok(out)
    }

    fn drop_tx(&self, head: u16, why: BadChain) {
        log::debug!("virtio-net: dropping TX chain {head}: {why:?}");
        bump(&self.counters.tx_dropped, 1);
    }

    /// Whether the driver wants an interrupt for queue `index` now.
    pub fn needs_notification(
        &mut self,
        mem: &GuestMemory,
        rx: bool,
    ) -> Result<bool, NetQueueError> {
        let (q, qi) = if rx {
            (&mut self.rx, self.rx_index)
        } else {
            (&mut self.tx, self.tx_index)
        };
        q.needs_notification(mem).map_err(ring_err(qi))
    }

    /// Gathers receive chains for one frame into the scratch vectors.
    /// Returns false when there are none.
    fn gather_rx(&mut self, mem: &GuestMemory) -> Result<bool, NetQueueError> {
        let qi = self.rx_index;
        self.iov.0.clear();
        self.rx_chains.clear();
        let mut capacity = 0usize;
        while let Some(chain) = pop(&mut self.rx, qi, mem)? {
            let head = chain.head_index();
            let first_iov = self.iov.0.len();
            let bad = match gather(mem, chain, true, &mut self.iov.0) {
                Ok(len) if len < VNET_HDR_LEN => Some(BadChain::TooShort),
                Ok(len) => {
                    self.rx_chains.push(RxChain {
                        head,
                        capacity: len,
                        first_iov,
                    });
                    capacity += len;
                    None
                }
                Err(why) => Some(why),
            };
            if let Some(why) = bad {
                self.iov.0.truncate(first_iov);
                if self.rx_chains.is_empty() {
                    log::debug!("virtio-net: dropping RX chain {head}: {why:?}");
                    bump(&self.counters.rx_dropped, 1);
                    self.rx.add_used(mem, head, 0).map_err(ring_err(qi))?;
                    continue;
                }
                // Keep the gathered chains contiguous in the ring: leave
                // the bad one for the next frame and read into what we
                // have.
                self.rewind_rx(1);
                return Ok(true);
            }
            if !self.mrg_rxbuf || capacity >= self.rx_needed {
                break;
            }
        }
        if self.rx_chains.is_empty() {
            return Ok(false);
        }
        // A ring full of small buffers is all the room there will be.
        let ring_full = self.rx_chains.len() >= usize::from(self.rx.size());
        if self.mrg_rxbuf && capacity < self.rx_needed && !ring_full {
            // Not enough room for the largest frame: wait for more buffers
            // rather than truncate one.
            self.rewind_rx(self.rx_chains.len());
            self.rx_chains.clear();
            return Ok(false);
        }
        Ok(true)
    }

    /// Enables RX kicks so that the driver's next added buffer notifies
    /// us (with EVENT_IDX: avail_event = the current avail index, past
    /// any buffers we left in the ring as too few). Returns whether buffers
    /// were added meanwhile.
    fn arm_rx_kick(&mut self, mem: &GuestMemory) -> Result<bool, NetQueueError> {
        let qi = self.rx_index;
        let saved = self.rx.next_avail();
        let avail = self
            .rx
            .avail_idx(mem, Ordering::Acquire)
            .map_err(ring_err(qi))?;
        self.rx.set_next_avail(avail.0);
        let more = self.rx.enable_notification(mem);
        self.rx.set_next_avail(saved);
        more.map_err(ring_err(qi))
    }

    fn rewind_rx(&mut self, chains: usize) {
        let back = u16::try_from(chains).unwrap_or(u16::MAX);
        self.rx
            .set_next_avail(self.rx.next_avail().wrapping_sub(back));
    }

    /// Writes `value` at byte `offset` of the first chain's buffers.
    fn write_hdr_u16(&self, offset: usize, value: u16) {
        let Some(first) = self.rx_chains.first() else {
            return;
        };
        let bytes = value.to_le_bytes();
        let end = self
            .rx_chains
            .get(1)
            .map_or(self.iov.0.len(), |c| c.first_iov);
        let mut pos = 0usize;
        for v in &self.iov.0[first.first_iov..end] {
            for (i, b) in bytes.iter().enumerate() {
                let at = offset + i;
                if at >= pos && at < pos + v.iov_len {
                    // SAFETY: `at - pos` is inside this iovec, which points
                    // into mapped guest memory the driver gave us to write.
                    unsafe {
                        std::ptr::write_volatile(v.iov_base.cast::<u8>().add(at - pos), *b);
                    }
                }
            }
            pos += v.iov_len;
            if pos >= offset + bytes.len() {
                break;
            }
        }
    }

    /// Moves frames from the backend into the driver's receive buffers
    /// until the backend is drained, the driver runs out of buffers, or the
    /// budget is spent.
    pub fn process_rx(&mut self, mem: &GuestMemory) -> Result<RxOutcome, NetQueueError> {
        let qi = self.rx_index;
        let mut out = RxOutcome::default();
        let mut done = 0usize;
        // While there are buffers the driver need not kick RX; running out
        // re-arms the kick (arm_rx_kick).
        self.rx.disable_notification(mem).map_err(ring_err(qi))?;
        loop {
            if done >= BUDGET {
                out.more = true;
                break;
            }
            if !self.gather_rx(mem)? {
                // Ask for a kick when the driver adds buffers; if some
                // raced in, go on.
                done += 1;
                if self.arm_rx_kick(mem)? {
                    continue;
                }
                out.starved = true;
                break;
            }
            self.iov.0.push(libc::iovec {
                iov_base: self.overflow.as_mut_ptr().cast(),
                iov_len: 1,
            });
            // SAFETY: every iovec points into guest memory that `mem` keeps
            // mapped, in writable descriptors the driver gave us, except
            // the last, which is `self.overflow`.
            let n = unsafe {
                libc::readv(
                    self.fd(),
                    self.iov.0.as_ptr(),
                    self.iov.0.len() as libc::c_int,
                )
            };
            self.iov.0.pop();
            if n < 0 {
                let e = io::Error::last_os_error();
                self.rewind_rx(self.rx_chains.len());
                self.rx_chains.clear();
                self.iov.0.clear();
                if would_block(&e) {
                    break;
                }
                if e.raw_os_error() == Some(libc::EBADFD) {
                    out.detached = true;
                    break;
                }
                return Err(NetQueueError::Read(e));
            }
            let n = n as usize;
            done += 1;
            let capacity: usize = self.rx_chains.iter().map(|c| c.capacity).sum();
            if n < VNET_HDR_LEN || n > capacity {
                // Not a frame the backend should hand us, or one too big
                // for the buffers: give them back and drop the frame.
                bump(&self.counters.rx_dropped, 1);
                self.rewind_rx(self.rx_chains.len());
                self.rx_chains.clear();
                self.iov.0.clear();
                continue;
            }
            let mut left = n;
            let mut used_chains = 0usize;
            for c in &self.rx_chains {
                if left == 0 {
                    break;
                }
                let len = left.min(c.capacity);
                left -= len;
                used_chains += 1;
            }
            let num_buffers = u16::try_from(used_chains).unwrap_or(u16::MAX);
            self.write_hdr_u16(NUM_BUFFERS_OFFSET, num_buffers);
            let mut left = n;
            for i in 0..used_chains {
                let c = self.rx_chains[i];
                let len = left.min(c.capacity);
                left -= len;
                self.rx
                    .add_used(mem, c.head, len as u32)
                    .map_err(ring_err(qi))?;
            }
            self.rewind_rx(self.rx_chains.len() - used_chains);
            self.rx_chains.clear();
            self.iov.0.clear();
            out.used = true;
            bump(&self.counters.rx_frames, 1);
            bump(&self.counters.rx_bytes, (n - VNET_HDR_LEN) as u64);
        }
        Ok(out)
    }

    pub fn count_resent_interrupt(&self) {
        bump(&self.counters.interrupts_resent, 1);
    }

    /// The next avail position of the RX queue (for tests).
    pub fn rx_next_avail(&self) -> u16 {
        self.rx.next_avail()
    }
}
