//! The thread serving one queue pair (and, for the first pair, the control
//! queue): wakes on the driver's kicks and on the tap fd.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::CtrlQueue;
use super::queue::QueuePair;
use super::tap::Tap;
use crate::GuestMemory;
use crate::virtio::interrupt_watch::{InterruptWatch, used_event};
use crate::virtio::worker::EventLoop;
use crate::virtio::{QueueWorker, VirtioInterrupt, WorkerError};

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const TAP: u64 = 2;
const CTRL_KICK: u64 = 3;
/// The control queue attached or detached this pair's tap queue.
const TAP_CHANGED: u64 = 4;
/// Time to look for queues stalled by a lost interrupt.
const WATCH: u64 = 5;

pub struct PairWorker {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) pair: QueuePair<Arc<Tap>>,
    pub(super) rx_kick: EventFd,
    pub(super) tx_kick: EventFd,
    pub(super) ctrl: Option<(CtrlQueue, EventFd)>,
    tap_changed: EventFd,
    watch: InterruptWatch,
    /// What the tap fd is registered for now.
    tap_events: EventSet,
    /// Whether the tap fd is in the epoll set at all. A detached tap queue
    /// polls as EPOLLERR forever, so it is taken out until something
    /// suggests it may be back.
    tap_registered: bool,
}

fn worker_err(e: impl std::error::Error) -> WorkerError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    WorkerError::Queue { queue: 0, message }
}

/// Drains a kick eventfd; EAGAIN (no kick pending) is fine.
fn drain(kick: &EventFd) {
    let _ = kick.read();
}

impl PairWorker {
    pub(super) fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        pair: QueuePair<Arc<Tap>>,
        kicks: (EventFd, EventFd),
        ctrl: Option<(CtrlQueue, EventFd)>,
        tap_changed: EventFd,
        watch: InterruptWatch,
    ) -> Self {
        PairWorker {
            mem,
            interrupt,
            pair,
            rx_kick: kicks.0,
            tx_kick: kicks.1,
            ctrl,
            tap_changed,
            watch,
            tap_events: EventSet::IN,
            tap_registered: false,
        }
    }

    fn signal(&self, queue: u16) -> Result<(), WorkerError> {
        self.interrupt
            .signal_queue(queue)
            .map_err(WorkerError::Interrupt)
    }

    fn set_tap_events(&mut self, events: &EventLoop, want: EventSet) -> Result<(), WorkerError> {
        if self.tap_registered && want == self.tap_events {
            return Ok(());
        }
        let fd = self.pair.backend.as_raw_fd();
        let done = if self.tap_registered {
            events.modify(fd, TAP, want)
        } else {
            events.add(fd, TAP, want)
        };
        done.map_err(|source| WorkerError::Io {
            what: "Cannot change what the tap fd is polled for".into(),
            source,
        })?;
        self.tap_registered = true;
        self.tap_events = want;
        Ok(())
    }

    fn unregister_tap(&mut self, events: &EventLoop) -> Result<(), WorkerError> {
        if !self.tap_registered {
            return Ok(());
        }
        events
            .remove(self.pair.backend.as_raw_fd())
            .map_err(|source| WorkerError::Io {
                what: "Cannot stop polling the tap fd".into(),
                source,
            })?;
        self.tap_registered = false;
        Ok(())
    }

    /// Interrupts again a queue whose driver missed its interrupt (see
    /// `interrupt_watch`).
    fn resignal_stuck_queues(&mut self) -> Result<(), WorkerError> {
        for (slot, rx) in [(0, true), (1, false)] {
            let (queue, index) = if rx {
                (&self.pair.rx, self.pair.rx_index())
            } else {
                (&self.pair.tx, self.pair.tx_index())
            };
            if !queue.ready() || !queue.event_idx_enabled() {
                continue;
            }
            let Some(used_event) = used_event(queue, &self.mem) else {
                continue;
            };
            if self.watch.stuck(slot, used_event, queue.next_used()) {
                log::debug!(
                    "virtio-net: queue {index}: the driver missed an interrupt (used_event {used_event}, used {}); interrupting again",
                    queue.next_used()
                );
                self.pair.count_resent_interrupt();
                self.signal(index)?;
            }
        }
        Ok(())
    }

    fn run_rx(&mut self, events: &EventLoop) -> Result<(), WorkerError> {
        let out = self.pair.process_rx(&self.mem).map_err(worker_err)?;
        if out.detached {
            self.unregister_tap(events)?;
        }
        if out.used
            && self
                .pair
                .needs_notification(&self.mem, true)
                .map_err(worker_err)?
        {
            self.signal(self.pair.rx_index())?;
        }
        if out.detached {
            return Ok(());
        }
        let mut want = self.tap_events;
        // Out of buffers: stop polling the tap until the driver kicks RX,
        // so a full ring does not spin this thread.
        want.set(EventSet::IN, !out.starved);
        self.set_tap_events(events, want)
    }

    fn run_tx(&mut self, events: &EventLoop) -> Result<(), WorkerError> {
        let out = self.pair.process_tx(&self.mem).map_err(worker_err)?;
        if out.used
            && self
                .pair
                .needs_notification(&self.mem, false)
                .map_err(worker_err)?
        {
            self.signal(self.pair.tx_index())?;
        }
        let mut want = self.tap_events;
        want.set(EventSet::OUT, out.blocked);
        self.set_tap_events(events, want)?;
        if out.more && !out.blocked {
            // Budget spent: come back through epoll so RX gets a turn.
            self.tx_kick.write(1).map_err(|source| WorkerError::Io {
                what: "Cannot requeue the TX kick".into(),
                source,
            })?;
        }
        Ok(())
    }
}

impl QueueWorker for PairWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.add(self.rx_kick.as_raw_fd(), RX_KICK, EventSet::IN)?;
        events.add(self.tx_kick.as_raw_fd(), TX_KICK, EventSet::IN)?;
        events.add(self.pair.backend.as_raw_fd(), TAP, self.tap_events)?;
        self.tap_registered = true;
        events.add(self.tap_changed.as_raw_fd(), TAP_CHANGED, EventSet::IN)?;
        events.add(self.watch.fd(), WATCH, EventSet::IN)?;
        if let Some((_, kick)) = &self.ctrl {
            events.add(kick.as_raw_fd(), CTRL_KICK, EventSet::IN)?;
        }
        // Frames the driver queued before the worker existed.
        self.tx_kick.write(1)
    }

    fn handle(
        &mut self,
        token: u64,
        ready: EventSet,
        events: &EventLoop,
    ) -> Result<(), WorkerError> {
        match token {
            RX_KICK | TAP_CHANGED => {
                drain(if token == RX_KICK {
                    &self.rx_kick
                } else {
                    &self.tap_changed
                });
                // New buffers, or a tap queue attached again: poll the tap
                // and fill the buffers now.
                let want = self.tap_events | EventSet::IN;
                self.set_tap_events(events, want)?;
                self.run_rx(events)
            }
            TX_KICK => {
                drain(&self.tx_kick);
                self.run_tx(events)
            }
            TAP => {
                if ready.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    // A detached queue (or a deleted interface): stop
                    // polling it; kicks and the control queue bring it back.
                    return self.unregister_tap(events);
                }
                if ready.contains(EventSet::OUT) {
                    self.run_tx(events)?;
                }
                if ready.contains(EventSet::IN) && self.tap_events.contains(EventSet::IN) {
                    self.run_rx(events)?;
                }
                Ok(())
            }
            WATCH => {
                self.watch.clear();
                self.resignal_stuck_queues()
            }
            CTRL_KICK => {
                let Some((ctrl, kick)) = &mut self.ctrl else {
                    return Ok(());
                };
                drain(kick);
                let index = ctrl.index;
                if ctrl.process(&self.mem).map_err(worker_err)?
                    && ctrl
                        .queue
                        .needs_notification(&self.mem)
                        .map_err(worker_err)?
                {
                    self.signal(index)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
