//! The host terminal as the guest's console: raw mode while the VM runs
//! (restored on every way out), and keyboard input fed to the UART or, with
//! `--console tty`, to the virtio console through a pipe.
//!
//! `Ctrl-A x` quits keel-vmm; `Ctrl-A Ctrl-A` sends a literal Ctrl-A.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use keel_devices::bus::lock;
use keel_devices::legacy::Serial;

use crate::VmEvent;

const CTRL_A: u8 = 0x01;

static ORIGINAL: OnceLock<libc::termios> = OnceLock::new();

/// Raw mode on stdin while alive; the original settings come back on drop,
/// and on SIGTERM/SIGHUP, which would otherwise leave the terminal unusable.
pub struct RawTerminal;

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin is a terminal and `original` is a valid termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return None;
        }
        let original = *ORIGINAL.get_or_init(|| original);
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host's lines still end right.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid descriptor and termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        for signal in [libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only calls async-signal-safe functions.
            unsafe { libc::signal(signal, restore_and_exit as *const () as libc::sighandler_t) };
        }
        Some(RawTerminal)
    }
}

fn restore() {
    if let Some(original) = ORIGINAL.get() {
        // SAFETY: restores settings read from this same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, original) };
    }
}

extern "C" fn restore_and_exit(signal: libc::c_int) {
    restore();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Feeds stdin to the UART until stdin closes; `Ctrl-A x` asks to quit.
pub fn spawn_input(serial: Arc<Mutex<Serial>>, events: Sender<VmEvent>) -> io::Result<()> {
    spawn_reader(move |bytes| feed(&serial, bytes), events)
}

/// Feeds stdin into `pipe` (the virtio console's input) until stdin
/// closes; `Ctrl-A x` asks to quit. `pipe` must be non-blocking: input the
/// guest does not take within [`PIPE_PATIENCE`] is dropped, so the quit
/// keys keep working whatever the guest does.
pub fn spawn_input_pipe(mut pipe: File, events: Sender<VmEvent>) -> io::Result<()> {
    spawn_reader(move |bytes| feed_pipe(&mut pipe, bytes), events)
}

const PIPE_PATIENCE: Duration = Duration::from_secs(1);

fn feed_pipe(pipe: &mut File, mut bytes: &[u8]) {
    let start = Instant::now();
    while !bytes.is_empty() {
        match pipe.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() > PIPE_PATIENCE {
                    log::debug!(
                        "Console input: the guest is not reading; {} bytes dropped",
                        bytes.len()
                    );
                    return;
                }
                thread::sleep(Duration::from_millis(2));
            }
            // The console is gone: nothing reads the input any more.
            Err(_) => return,
        }
    }
}

fn spawn_reader(
    mut deliver: impl FnMut(&[u8]) + Send + 'static,
    events: Sender<VmEvent>,
) -> io::Result<()> {
    thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 256];
            let mut escape = false;
            let mut out = Vec::with_capacity(buf.len());
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                out.clear();
                for &b in &buf[..n] {
                    match (escape, b) {
                        (false, CTRL_A) => escape = true,
                        (true, b'x' | b'X') => {
                            let _ = events.send(VmEvent::ConsoleQuit);
                            return;
                        }
                        (true, _) => {
                            escape = false;
                            out.push(b);
                        }
                        (false, _) => out.push(b),
                    }
                }
                deliver(&out);
            }
        })?;
    Ok(())
}

/// The UART's FIFO is small: wait for the guest to drain it.
fn feed(serial: &Mutex<Serial>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let taken = lock(serial).enqueue_input(bytes).unwrap_or(0);
        bytes = &bytes[taken..];
        if taken == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both descriptors are new and owned by no one else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn typed_bytes_reach_the_console_pipe() {
        let (mut read, mut write) = pipe();
        feed_pipe(&mut write, b"ls\r");
        let mut got = [0u8; 3];
        read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ls\r");
    }

    #[test]
    fn a_guest_that_reads_nothing_cannot_stall_the_keyboard() {
        let (_read, mut write) = pipe();
        let start = Instant::now();
        // Far more than a pipe holds: the rest is dropped after a while.
        feed_pipe(&mut write, &vec![b'x'; 1 << 20]);
        assert!(start.elapsed() < PIPE_PATIENCE * 3);
    }
}
