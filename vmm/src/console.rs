//! Host side of the guest's consoles: a writer that never blocks the vCPU
//! thread (bytes go to a buffer a dedicated thread drains to the terminal or
//! file), so a slow terminal slows nothing but its own output.
//!
//! A UART hands over one byte per VM exit; waking the writer for each would
//! cost a futex wake and a write(2) per byte. It is woken per line instead,
//! and a partial line (a shell prompt) follows within [`PARTIAL_LINE_DELAY`].

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Beyond this many undelivered bytes, new output is dropped (and counted)
/// rather than making the guest wait.
const MAX_PENDING: usize = 4 << 20;
/// Pending output this large is delivered without waiting for a newline.
const EAGER_BYTES: usize = 4096;
const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// A whole line (or a lot) is waiting: deliver now.
    urgent: bool,
    closed: bool,
    dropped: u64,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `Write` end handed to a device.
#[derive(Clone)]
pub struct BufferedWriter {
    shared: Arc<Shared>,
}

impl Write for BufferedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + buf.len() > MAX_PENDING {
            pending.dropped += buf.len() as u64;
        } else {
            // Wake the writer when output starts (to time a partial line)
            // and when a line is complete.
            let was_empty = pending.bytes.is_empty();
            pending.bytes.extend_from_slice(buf);
            let complete = buf.contains(&b'\n') || pending.bytes.len() >= EAGER_BYTES;
            if complete && !pending.urgent {
                pending.urgent = true;
                self.shared.ready.notify_one();
            } else if was_empty {
                self.shared.ready.notify_one();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A console output stream and the thread that delivers it.
pub struct ConsoleOutput {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleOutput {
    pub fn new(mut sink: Box<dyn Write + Send>) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let thread = thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                let mut batch = Vec::new();
                loop {
                    {
                        let mut pending = worker.lock();
                        while !pending.urgent && !pending.closed {
                            if pending.bytes.is_empty() {
                                pending = worker
                                    .ready
                                    .wait(pending)
                                    .unwrap_or_else(|p| p.into_inner());
                            } else {
                                // A partial line: give it a moment to complete.
                                pending = worker
                                    .ready
                                    .wait_timeout(pending, PARTIAL_LINE_DELAY)
                                    .map(|(p, _)| p)
                                    .unwrap_or_else(|p| p.into_inner().0);
                                break;
                            }
                        }
                        pending.urgent = false;
                        if pending.bytes.is_empty() {
                            if pending.dropped > 0 {
                                log::warn!("Console output lost {} bytes", pending.dropped);
                            }
                            return;
                        }
                        std::mem::swap(&mut batch, &mut pending.bytes);
                    }
                    if sink.write_all(&batch).and_then(|()| sink.flush()).is_err() {
                        // The reader went away (closed terminal, full disk):
                        // keep draining so the guest never notices.
                        log::debug!("Console output could not be written");
                    }
                    batch.clear();
                }
            })?;
        Ok(ConsoleOutput {
            shared,
            thread: Some(thread),
        })
    }

    pub fn writer(&self) -> BufferedWriter {
        BufferedWriter {
            shared: self.shared.clone(),
        }
    }

    /// Delivers everything written so far and stops the thread.
    pub fn finish(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn everything_written_is_delivered_on_finish() {
        let sink = Sink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone())).unwrap();
        let mut w = out.writer();
        for i in 0..10_000u32 {
            w.write_all(&i.to_le_bytes()).unwrap();
        }
        out.finish();
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 40_000);
        assert_eq!(&got[4..8], &1u32.to_le_bytes());
    }

    #[test]
    fn a_partial_line_is_delivered_without_a_newline() {
        let sink = Sink::default();
        let out = ConsoleOutput::new(Box::new(sink.clone())).unwrap();
        // Let the writer thread go idle first.
        std::thread::sleep(std::time::Duration::from_millis(20));
        out.writer().write_all(b"login: ").unwrap();
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() {
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"login: ");
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_writer() {
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_millis(50));
                Err(io::Error::other("stuck"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = ConsoleOutput::new(Box::new(Stuck)).unwrap();
        let mut w = out.writer();
        let start = std::time::Instant::now();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..16 {
            w.write_all(&chunk).unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_millis(500));
        drop(out);
    }
}
