//! The virtio-net control queue (offered with multi-queue): the driver
//! chooses how many queue pairs it uses; Keel attaches that many tap
//! queues and detaches the rest, so the kernel steers no traffic to a
//! queue the driver does not serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError};
use crate::GuestMemory;

#[derive(Debug, Error)]
pub enum CtrlError {
    #[error("Control queue {queue}: the ring is not in guest memory")]
    Ring {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error(
        "Control queue {queue}: the driver's avail index is {pending} entries ahead (size {size})"
    )]
    AvailIndex { queue: u16, pending: u16, size: u16 },
}

/// The control queue and what its commands act on.
pub struct CtrlQueue {
    pub queue: Queue,
    pub index: u16,
    /// One tap fd per queue pair.
    taps: Vec<Arc<Tap>>,
    /// Pairs the driver uses now (shared with the device for its state).
    active_pairs: Arc<AtomicU16>,
    /// One per pair: tells its worker the tap queue was attached or
    /// detached.
    tap_changed: Vec<EventFd>,
}

/// Attaches the first `pairs` tap queues and detaches the others. A queue
/// already in the wanted state makes the kernel answer EINVAL, which is
/// fine.
pub fn set_active_pairs(taps: &[Arc<Tap>], pairs: usize) -> Result<(), TapError> {
    if taps.len() < 2 {
        return Ok(());
    }
    // Attach first so the interface never has zero queues.
    for tap in taps.iter().take(pairs) {
        lenient(tap.set_queue_attached(true))?;
    }
    for tap in taps.iter().skip(pairs) {
        lenient(tap.set_queue_attached(false))?;
    }
    Ok(())
}

fn lenient(r: Result<(), TapError>) -> Result<(), TapError> {
    match r {
        Err(TapError::Ioctl { ref source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            Ok(())
        }
        r => r,
    }
}

impl CtrlQueue {
    pub fn new(
        queue: Queue,
        index: u16,
        taps: Vec<Arc<Tap>>,
        active: Arc<AtomicU16>,
        tap_changed: Vec<EventFd>,
    ) -> Self {
        CtrlQueue {
            queue,
            index,
            taps,
            active_pairs: active,
            tap_changed,
        }
    }

    /// Answers every command the driver queued. Returns whether used
    /// buffers were added.
    pub fn process(&mut self, mem: &GuestMemory) -> Result<bool, CtrlError> {
        let qi = self.index;
        let ring = |source| CtrlError::Ring { queue: qi, source };
        let mut used = false;
        loop {
            self.queue.disable_notification(mem).map_err(ring)?;
            loop {
                let avail = self.queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?;
                let pending = avail.0.wrapping_sub(self.queue.next_avail());
                if pending == 0 {
                    break;
                }
                if pending > self.queue.size() {
                    return Err(CtrlError::AvailIndex {
                        queue: qi,
                        pending,
                        size: self.queue.size(),
                    });
                }
                let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                    return Err(ring(virtio_queue::Error::InvalidAvailRingIndex));
                };
                let head = chain.head_index();
                let written = self.command(mem, chain);
                self.queue.add_used(mem, head, written).map_err(ring)?;
                used = true;
            }
            if !self.queue.enable_notification(mem).map_err(ring)? {
                break;
            }
        }
        Ok(used)
    }

    /// Runs one command; returns how many bytes were written (the ack).
    fn command(
        &mut self,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            log::debug!("virtio-net: malformed control chain");
            return 0;
        };
        let ack = match reader.read_obj::<[u8; 2]>() {
            Ok([class, cmd]) => self.run(u32::from(class), u32::from(cmd), &mut reader),
            Err(_) => VIRTIO_NET_ERR,
        };
        // The ack is the last writable byte; anything before it is skipped.
        let room = writer.available_bytes();
        if room == 0 {
            return 0;
        }
        let mut tail = match writer.split_at(room - 1) {
            Ok(t) => t,
            Err(_) => return 0,
        };
        match tail.write_obj(ack as u8) {
            Ok(()) => room as u32,
            Err(_) => 0,
        }
    }

    fn run(&mut self, class: u32, cmd: u32, reader: &mut Reader<'_>) -> u32 {
        match (class, cmd) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                let Ok(pairs) = reader.read_obj::<u16>() else {
                    return VIRTIO_NET_ERR;
                };
                let pairs = u16::from_le(pairs);
                if pairs == 0 || usize::from(pairs) > self.taps.len() {
                    return VIRTIO_NET_ERR;
                }
                match set_active_pairs(&self.taps, usize::from(pairs)) {
                    Ok(()) => {
                        self.active_pairs.store(pairs, Ordering::Relaxed);
                        for evt in &self.tap_changed {
                            let _ = evt.write(1);
                        }
                        VIRTIO_NET_OK
                    }
                    Err(e) => {
                        log::warn!("virtio-net: cannot use {pairs} queue pairs: {e}");
                        VIRTIO_NET_ERR
                    }
                }
            }
            // Receive filtering: the tap hands us everything anyway, so
            // any mode the driver asks for is already satisfied.
            (VIRTIO_NET_CTRL_RX, _) => VIRTIO_NET_OK,
            _ => VIRTIO_NET_ERR,
        }
    }
}
