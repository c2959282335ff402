//! Times repeated boots of a VMM command: exec → first output line holding
//! a marker, exec → exit, and the process's peak RSS. Used by `ci/bench-boot`
//! on the host and inside the lab (where there is no Python), so both sides
//! of every comparison are measured by the same code.
//!
//! ```text
//! keel-boot-timer --label keel --marker 'KEEL-GUEST READY' --runs 20 -- keel-vmm ...
//! ```
//! Prints one `BENCH label=… metric=… runs=… min=… median=… max=…` line per
//! metric (times in ms, RSS in KiB), and `FAIL …` lines for failed runs.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

struct Options {
    label: String,
    marker: String,
    runs: usize,
    timeout: Duration,
    /// Also print each run (`RAW …` lines) so several invocations can be pooled.
    raw: bool,
    command: Vec<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        label: "vmm".into(),
        marker: String::new(),
        runs: 20,
        timeout: Duration::from_secs(60),
        raw: false,
        command: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--label" => options.label = value("--label")?,
            "--marker" => options.marker = value("--marker")?,
            "--runs" => {
                options.runs = value("--runs")?
                    .parse()
                    .map_err(|_| "--runs needs a number")?
            }
            "--timeout-s" => {
                let secs: u64 = value("--timeout-s")?
                    .parse()
                    .map_err(|_| "--timeout-s needs a number")?;
                options.timeout = Duration::from_secs(secs);
            }
            "--raw" => options.raw = true,
            "--" => {
                options.command = args.collect();
                break;
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.marker.is_empty() || options.command.is_empty() {
        return Err(
            "usage: keel-boot-timer [--label L] --marker TEXT [--runs N] [--timeout-s S] [--raw] -- CMD..."
                .into(),
        );
    }
    Ok(options)
}

struct Sample {
    marker_ms: f64,
    exit_ms: f64,
    rss_kib: f64,
}

fn run_once(options: &Options) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(&options.command[0])
        .args(&options.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", options.command[0]))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let marker = options.marker.clone();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut seen = false;
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if !seen && String::from_utf8_lossy(&line).contains(&marker) {
                seen = true;
                let _ = tx.send(start.elapsed());
            }
            line.clear();
        }
    });
    // Block in wait4 on a helper thread rather than polling: inside the lab
    // every timer wakeup is emulated and steals time from the guest.
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid buffer for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child, with valid out-pointers.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        let _ = done_tx.send((reaped, status, usage.ru_maxrss));
    });
    let (status, rss_kib) = match done_rx.recv_timeout(options.timeout) {
        Ok((reaped, status, rss)) if reaped == pid => (status, rss),
        Ok(_) => return Err("wait4 failed".into()),
        Err(_) => {
            // SAFETY: signals our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
            return Err(format!("timed out after {:?}", options.timeout));
        }
    };
    let exit = start.elapsed();
    let status = std::process::ExitStatus::from_raw(status);
    let marker = rx
        .recv_timeout(Duration::from_secs(1))
        .map_err(|_| format!("no line with '{}' (exit {status})", options.marker))?;
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    Ok(Sample {
        marker_ms: marker.as_secs_f64() * 1e3,
        exit_ms: exit.as_secs_f64() * 1e3,
        rss_kib: rss_kib as f64,
    })
}

fn summary(label: &str, metric: &str, mut values: Vec<f64>) {
    if values.is_empty() {
        return;
    }
    values.sort_by(f64::total_cmp);
    let median = if values.len() % 2 == 1 {
        values[values.len() / 2]
    } else {
        (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
    };
    println!(
        "BENCH label={label} metric={metric} runs={} min={:.2} median={:.2} max={:.2}",
        values.len(),
        values[0],
        median,
        values[values.len() - 1]
    );
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("keel-boot-timer: {e}");
            return ExitCode::from(2);
        }
    };
    let mut samples = Vec::new();
    for run in 0..options.runs {
        match run_once(&options) {
            Ok(sample) => {
                if options.raw {
                    println!(
                        "RAW label={} marker_ms={:.3} exit_ms={:.3} peak_rss_kib={}",
                        options.label, sample.marker_ms, sample.exit_ms, sample.rss_kib
                    );
                }
                samples.push(sample)
            }
            Err(e) => println!("FAIL label={} run={run} {e}", options.label),
        }
    }
    let label = &options.label;
    summary(
        label,
        "marker_ms",
        samples.iter().map(|s| s.marker_ms).collect(),
    );
    summary(
        label,
        "exit_ms",
        samples.iter().map(|s| s.exit_ms).collect(),
    );
    summary(
        label,
        "peak_rss_kib",
        samples.iter().map(|s| s.rss_kib).collect(),
    );
    if samples.len() == options.runs {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
