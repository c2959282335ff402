//! Running the keel-vmm binary from tests, with a hard deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub struct Run {
    /// Exit status; `None` if it was killed at the deadline.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// When each stdout line arrived, from exec.
    pub line_times: Vec<(Duration, String)>,
    /// Exec to exit.
    pub elapsed: Duration,
}

impl Run {
    pub fn line_time(&self, needle: &str) -> Option<Duration> {
        self.line_times
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }
}

pub fn keel_vmm(args: &[&str], deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-vmm");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((start.elapsed(), line));
        }
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    reader.join().expect("stdout reader");
    let line_times: Vec<_> = rx.try_iter().collect();
    let stdout = line_times.iter().map(|(_, l)| format!("{l}\n")).collect();
    Run {
        status,
        stdout,
        stderr: err_reader.join().expect("stderr reader"),
        line_times,
        elapsed,
    }
}
