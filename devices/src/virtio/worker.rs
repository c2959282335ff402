//! The thread that serves a device's queues.
//!
//! Each activated device runs one [`QueueWorker`] on its own thread, woken by
//! epoll on the queues' notification eventfds and whatever backend fds the
//! worker adds (a tap, an io_uring, sockets). vCPU threads only signal
//! eventfds; they never run device code. A worker that fails or panics
//! marks the device DEVICE_NEEDS_RESET and idles until it is stopped: a
//! broken device stays a broken device, and the VM keeps running.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::VirtioInterrupt;

/// Token reserved for the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("Queue {queue}: {message}")]
    Queue { queue: u16, message: String },
    #[error("Cannot signal the driver")]
    Interrupt(#[source] io::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The fds a worker waits on.
pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    /// Wakes the worker with `token` when `fd` is ready for `events`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

pub trait QueueWorker: Send + 'static {
    /// Adds the worker's fds to the loop (queue kicks, backend fds).
    fn register(&mut self, events: &EventLoop) -> io::Result<()>;
    /// Handles one ready fd, identified by the token it was added with.
    fn handle(
        &mut self,
        token: u64,
        ready: EventSet,
        events: &EventLoop,
    ) -> Result<(), WorkerError>;
}

/// A running worker; stopping it joins the thread and returns the worker
/// (with its queues) to the device.
pub struct WorkerHandle<W> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<W>>>,
}

impl<W: QueueWorker> WorkerHandle<W> {
    pub fn spawn(
        name: String,
        mut worker: W,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let events = EventLoop {
            epoll: Epoll::new()?,
        };
        events.add(stop_fd.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        worker.register(&events)?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&mut worker, &events)));
            match outcome {
                Ok(Ok(())) => return Some(worker),
                // The log line carries the thread's name (the device).
                Ok(Err(e)) => log::error!("{}; the device needs a reset", error_chain(&e)),
                Err(_) => log::error!("Worker panicked; the device needs a reset"),
            }
            interrupt.set_needs_reset();
            // Idle until the device is reset or the VM goes away. The
            // worker's own fds may stay ready forever, so wait on the
            // stop eventfd alone.
            drop(events);
            let mut pfd = libc::pollfd {
                fd: stop_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            while unsafe { libc::poll(&mut pfd, 1, -1) } <= 0 {}
            None
        })?;
        Ok(WorkerHandle {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread; the worker comes back unless it had failed.
    pub fn stop(mut self) -> Option<W> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<W> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            log::error!("Cannot stop a device worker: {e}");
            return None;
        }
        thread.join().ok().flatten()
    }
}

impl<W> Drop for WorkerHandle<W> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

fn run<W: QueueWorker>(worker: &mut W, events: &EventLoop) -> Result<(), WorkerError> {
    let mut ready = [EpollEvent::default(); 16];
    loop {
        let n = match events.epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(WorkerError::Io {
                    what: "epoll_wait failed".into(),
                    source,
                });
            }
        };
        for event in &ready[..n] {
            if event.data() == STOP_TOKEN {
                return Ok(());
            }
            worker.handle(event.data(), event.event_set(), events)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Flags {
        needs_reset: AtomicUsize,
    }
    impl VirtioInterrupt for Flags {
        fn signal_queue(&self, _: u16) -> io::Result<()> {
            Ok(())
        }
        fn signal_config(&self) -> io::Result<()> {
            Ok(())
        }
        fn set_needs_reset(&self) {
            self.needs_reset.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Counter {
        kick: EventFd,
        seen: Arc<AtomicUsize>,
        panic_on: usize,
    }
    impl QueueWorker for Counter {
        fn register(&mut self, events: &EventLoop) -> io::Result<()> {
            events.add(self.kick.as_raw_fd(), 0, EventSet::IN)
        }
        fn handle(&mut self, token: u64, _: EventSet, _: &EventLoop) -> Result<(), WorkerError> {
            assert_eq!(token, 0);
            let _ = self.kick.read();
            let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.panic_on {
                panic!("injected");
            }
            Ok(())
        }
    }

    fn wait_for(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("condition not reached");
    }

    #[test]
    fn serves_kicks_and_returns_the_worker() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let flags = Arc::new(Flags::default());
        let w = Counter {
            kick: kick.try_clone().unwrap(),
            seen: seen.clone(),
            panic_on: 0,
        };
        let handle = WorkerHandle::spawn("t".into(), w, flags.clone()).unwrap();
        kick.write(1).unwrap();
        wait_for(|| seen.load(Ordering::SeqCst) == 1);
        assert!(handle.stop().is_some());
        assert_eq!(flags.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_worker_marks_needs_reset_and_still_stops() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let flags = Arc::new(Flags::default());
        let w = Counter {
            kick: kick.try_clone().unwrap(),
            seen: seen.clone(),
            panic_on: 1,
        };
        let handle = WorkerHandle::spawn("t".into(), w, flags.clone()).unwrap();
        kick.write(1).unwrap();
        wait_for(|| flags.needs_reset.load(Ordering::SeqCst) == 1);
        assert!(handle.stop().is_none());
    }
}
