//! A VM's interactive serial console on its node: the guest's output as it
//! lands in `serial.log` (across rotations), and keys written to the VMM's
//! console FIFO. Handed to the control plane as two bounded channels, so a
//! remote agent can serve the same thing over the network.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use tokio::sync::mpsc;

use super::process::VmFiles;
use super::serial_log::Reader;

/// How often the log is looked at for new output.
const POLL: Duration = Duration::from_millis(30);
/// Chunks in flight each way before the producer waits.
const DEPTH: usize = 64;

pub struct ConsoleStream {
    /// The guest's output; ends when the session is dropped.
    pub output: mpsc::Receiver<Vec<u8>>,
    /// Keys to type.
    pub input: mpsc::Sender<Vec<u8>>,
}

/// Keys for the VMM's terminal: its escape key (Ctrl-A) is doubled, so a
/// web user types a literal Ctrl-A and cannot quit the VMM.
pub fn escape_keys(keys: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len());
    for &b in keys {
        out.push(b);
        if b == 0x01 {
            out.push(0x01);
        }
    }
    out
}

pub fn open(files: VmFiles, backlog: u64) -> ConsoleStream {
    let (out_tx, output) = mpsc::channel(DEPTH);
    let (input, mut in_rx) = mpsc::channel::<Vec<u8>>(DEPTH);
    let fifo = files.console_in();
    tokio::spawn(async move {
        while let Some(keys) = in_rx.recv().await {
            // Non-blocking: with no VMM reading (the VM is off) the keys
            // are dropped instead of hanging the session.
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo);
            if let Ok(mut fifo) = opened {
                let _ = fifo.write_all(&escape_keys(&keys));
            }
        }
    });
    tokio::spawn(async move {
        let (mut reader, first) = Reader::new(files, backlog);
        if !first.is_empty() && out_tx.send(first).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = out_tx.closed() => return,
            }
            let chunk = reader.poll();
            if !chunk.is_empty() && out_tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    ConsoleStream { output, input }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_is_doubled() {
        assert_eq!(escape_keys(b"ab\x01x"), b"ab\x01\x01x");
        assert_eq!(escape_keys(b""), b"");
    }
}
