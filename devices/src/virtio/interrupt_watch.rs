//! A guard against lost queue interrupts.
//!
//! With VIRTIO_F_EVENT_IDX the device interrupts only when its used index
//! passes the driver's `used_event`; if that one interrupt is lost on its
//! way into the guest, the driver never moves `used_event` again and the
//! queue stalls for good. Nested virtualization has been seen to lose
//! interrupts (in the lab: the guest stops consuming a queue while
//! `used_event` lags the used index, under any VMM). So a worker checks its
//! queues now and then: one whose `used_event` has not moved since the last
//! check while the device has used entries past it is interrupted again.
//! An extra interrupt is harmless: the driver finds nothing new, or the
//! work it missed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::timerfd::TimerFd;

use crate::GuestMemory;

/// How often queues are checked.
pub const PERIOD: Duration = Duration::from_millis(500);

pub struct InterruptWatch {
    timer: TimerFd,
    /// Per queue: `used_event` at the previous check.
    last: Vec<Option<u16>>,
}

impl InterruptWatch {
    /// Watches `queues` queues; the timer starts now.
    pub fn new(queues: usize) -> io::Result<Self> {
        let mut timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        timer.reset(PERIOD, Some(PERIOD))?;
        Ok(InterruptWatch {
            timer,
            last: vec![None; queues],
        })
    }

    /// The fd that becomes readable every [`PERIOD`].
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Consumes the timer's expirations.
    pub fn clear(&mut self) {
        // Nothing to read (a spurious wake-up) is fine.
        let _ = self.timer.wait();
    }

    /// Records queue `i`'s state and says whether it looks stuck: the
    /// driver asked to be interrupted at `used_event`, the device is past
    /// it (`next_used`), and the driver has not moved since the last check.
    pub fn stuck(&mut self, i: usize, used_event: u16, next_used: u16) -> bool {
        let Some(last) = self.last.get_mut(i) else {
            return false;
        };
        let stalled = *last == Some(used_event) && used_event != next_used;
        *last = Some(used_event);
        stalled
    }
}

/// The driver's `used_event` for `queue`: the u16 after the avail ring's
/// entries (virtio 1.2 §2.7.6). None when the ring is not in memory.
pub fn used_event(queue: &Queue, mem: &GuestMemory) -> Option<u16> {
    let offset = 4 + 2 * u64::from(queue.size());
    let addr = GuestAddress(queue.avail_ring()).checked_add(offset)?;
    mem.load::<u16>(addr, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns, with flags read back from it.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_stuck_only_when_the_driver_has_not_moved() {
        let mut w = InterruptWatch::new(2).unwrap();
        // First sight: nothing to compare with.
        assert!(!w.stuck(0, 5, 9));
        // The driver did not move and entries wait past its event: stuck.
        assert!(w.stuck(0, 5, 9));
        // It moved: fine.
        assert!(!w.stuck(0, 9, 12));
        // It caught up with the device: fine however long it stays.
        assert!(!w.stuck(1, 7, 7));
        assert!(!w.stuck(1, 7, 7));
        assert!(!w.stuck(7, 0, 1), "unknown queues are never stuck");
    }
}
