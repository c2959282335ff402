//! The vsock queue worker: moves packets between the virtqueues and the
//! [`Muxer`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::guest_io::{ChainBufs, GuestBytes, GuestSink, copy_from_guest};
use super::muxer::{Muxer, RxFill};
use super::packet::{HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD, PacketHeader};
use crate::GuestMemory;
use crate::virtio::worker::EventLoop;
use crate::virtio::{ActiveQueue, QueueWorker, VirtioInterrupt, WorkerError};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
const MUXER_TOKEN: u64 = 3;

/// Counters for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Packets dropped without an answer (no header, wrong CIDs).
    pub dropped: u64,
    /// Packets answered with an RST because they were malformed.
    pub rejected: u64,
}

pub struct VsockWorker {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    /// rx, tx and, when the driver enabled it, event.
    pub(super) queues: Vec<ActiveQueue>,
    pub(super) guest_cid: u64,
    pub(super) muxer: Muxer,
    bufs: ChainBufs,
    pub stats: WorkerStats,
}

fn queue_error(queue: u16, e: virtio_queue::Error) -> WorkerError {
    WorkerError::Queue {
        queue,
        message: e.to_string(),
    }
}

/// Pops the next available chain; a corrupt available ring is an error.
fn pop<'m>(
    q: &mut ActiveQueue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, WorkerError> {
    let index = q.index;
    let mut iter = q.queue.iter(mem).map_err(|e| queue_error(index, e))?;
    Ok(iter.next())
}

impl VsockWorker {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
        guest_cid: u64,
        muxer: Muxer,
    ) -> Self {
        VsockWorker {
            mem,
            interrupt,
            queues,
            guest_cid,
            muxer,
            bufs: ChainBufs::default(),
            stats: WorkerStats::default(),
        }
    }

    pub fn queue_states(&self) -> impl Iterator<Item = &Queue> {
        self.queues.iter().map(|q| &q.queue)
    }

    fn signal(&mut self, qi: usize) -> Result<(), WorkerError> {
        let q = &mut self.queues[qi];
        let index = q.index;
        if q.queue
            .needs_notification(&self.mem)
            .map_err(|e| queue_error(index, e))?
        {
            self.interrupt
                .signal_queue(index)
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }

    /// Serves every packet the driver has posted on the tx queue.
    pub fn process_tx(&mut self) -> Result<(), WorkerError> {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let q = &mut self.queues[TX_QUEUE];
            let index = q.index;
            q.queue
                .disable_notification(&mem)
                .map_err(|e| queue_error(index, e))?;
            while let Some(chain) = pop(&mut self.queues[TX_QUEUE], &mem)? {
                let head = chain.head_index();
                self.bufs.load(&mem, chain);
                self.handle_tx_chain(&mem);
                self.queues[TX_QUEUE]
                    .queue
                    .add_used(&mem, head, 0)
                    .map_err(|e| queue_error(index, e))?;
                used = true;
            }
            if !self.queues[TX_QUEUE]
                .queue
                .enable_notification(&mem)
                .map_err(|e| queue_error(index, e))?
            {
                break;
            }
        }
        if used {
            self.signal(TX_QUEUE)?;
        }
        Ok(())
    }

    fn handle_tx_chain(&mut self, mem: &GuestMemory) {
        let bufs = &self.bufs;
        let mut raw = [0u8; HDR_SIZE];
        if bufs.readable_len < HDR_SIZE
            || copy_from_guest(mem, &bufs.readable, 0, &mut raw) != HDR_SIZE
        {
            self.stats.dropped += 1;
            return;
        }
        let hdr = PacketHeader::from_bytes(&raw);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            // Nobody to answer: the address is not one this device serves.
            self.stats.dropped += 1;
            return;
        }
        let payload_room = bufs.readable_len - HDR_SIZE;
        if bufs.malformed
            || bufs.writable_len > 0
            || hdr.len > MAX_PKT_PAYLOAD
            || hdr.len as usize > payload_room
        {
            self.stats.rejected += 1;
            self.muxer.reject(&hdr);
            return;
        }
        let payload = GuestBytes {
            mem,
            segs: &bufs.readable,
            offset: HDR_SIZE,
            len: hdr.len as usize,
        };
        self.muxer.handle_guest_packet(&hdr, &payload);
    }

    /// Fills rx buffers with whatever the muxer has for the guest.
    pub fn process_rx(&mut self) -> Result<(), WorkerError> {
        let mem = self.mem.clone();
        let index = self.queues[RX_QUEUE].index;
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(chain) = pop(&mut self.queues[RX_QUEUE], &mem)? else {
                // Out of buffers: ask for a kick when the driver adds some.
                if self.queues[RX_QUEUE]
                    .queue
                    .enable_notification(&mem)
                    .map_err(|e| queue_error(index, e))?
                {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            self.bufs.load(&mem, chain);
            let bufs = &self.bufs;
            let len = if bufs.malformed || bufs.readable_len > 0 || bufs.writable_len < HDR_SIZE {
                // Unusable: give it back empty.
                self.stats.dropped += 1;
                0
            } else {
                let sink = GuestSink {
                    mem: &mem,
                    segs: &bufs.writable,
                    len: bufs.writable_len,
                };
                match self.muxer.fill_rx(&sink) {
                    RxFill::Packet(n) => n,
                    RxFill::NoRoom => 0,
                    RxFill::Nothing => {
                        self.queues[RX_QUEUE].queue.go_to_previous_position();
                        break;
                    }
                }
            };
            self.queues[RX_QUEUE]
                .queue
                .add_used(&mem, head, len)
                .map_err(|e| queue_error(index, e))?;
            used = true;
        }
        if used {
            self.signal(RX_QUEUE)?;
        }
        Ok(())
    }

    /// Handles whatever the host sockets have ready.
    pub fn process_host_events(&mut self) -> Result<(), WorkerError> {
        self.muxer.process_events().map_err(Self::muxer_error)
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    fn muxer_error(e: io::Error) -> WorkerError {
        WorkerError::Io {
            what: "Host socket poll failed".into(),
            source: e,
        }
    }
}

impl QueueWorker for VsockWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        let tokens = [RX_TOKEN, TX_TOKEN, EVENT_TOKEN];
        for (q, token) in self.queues.iter().zip(tokens) {
            events.add(q.kick.as_raw_fd(), token, EventSet::IN)?;
        }
        events.add(self.muxer.as_raw_fd(), MUXER_TOKEN, EventSet::IN)
    }

    fn handle(
        &mut self,
        token: u64,
        _ready: EventSet,
        _events: &EventLoop,
    ) -> Result<(), WorkerError> {
        match token {
            RX_TOKEN | TX_TOKEN | EVENT_TOKEN => {
                if let Some(q) = self.queues.get(token as usize) {
                    // A failed read only means no kick was pending.
                    let _ = q.kick.read();
                }
                if token == TX_TOKEN {
                    self.process_tx()?;
                }
            }
            MUXER_TOKEN => self.process_host_events()?,
            _ => return Ok(()),
        }
        self.process_rx()
    }
}
