//! keel-api-latency: latency of one API request against a VMM's Unix
//! socket (keel-vmm's or Cloud Hypervisor's), from N concurrent clients.
//!
//!   keel-api-latency --socket PATH --path /api/v1/vm.info [--clients N]
//!                    [--requests M] [--warmup W] [--label L]
//!
//! Each client opens a fresh connection per request, as ch-remote and most
//! clients do, writes a GET, and reads the whole answer (Content-Length).
//! Prints one line: `LATENCY <label> clients=N requests=T p50_us=.. p99_us=..
//! max_us=.. errors=E`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    socket: String,
    path: String,
    clients: usize,
    requests: usize,
    warmup: usize,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        socket: String::new(),
        path: "/api/v1/vm.info".into(),
        clients: 1,
        requests: 2000,
        warmup: 100,
        label: "vmm".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => a.socket = value()?,
            "--path" => a.path = value()?,
            "--label" => a.label = value()?,
            "--clients" => a.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--requests" => {
                a.requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?
            }
            "--warmup" => a.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.socket.is_empty() || a.clients == 0 {
        return Err(
            "usage: keel-api-latency --socket PATH [--path P] [--clients N] [--requests M]".into(),
        );
    }
    Ok(a)
}

/// One request on a fresh connection; the time from connect to the last
/// byte of the answer, or None if it failed.
fn one(socket: &str, request: &[u8]) -> Option<Duration> {
    let start = Instant::now();
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return None;
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return Some(start.elapsed());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keel-api-latency: {e}");
            std::process::exit(1);
        }
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        args.path
    )
    .into_bytes();
    let request = Arc::new(request);
    let barrier = Arc::new(Barrier::new(args.clients));
    let per_client = args.requests.div_ceil(args.clients);
    let workers: Vec<_> = (0..args.clients)
        .map(|_| {
            let (socket, request, barrier) =
                (args.socket.clone(), request.clone(), barrier.clone());
            let warmup = args.warmup;
            thread::spawn(move || {
                for _ in 0..warmup {
                    let _ = one(&socket, &request);
                }
                barrier.wait();
                let mut times = Vec::with_capacity(per_client);
                let mut errors = 0usize;
                for _ in 0..per_client {
                    match one(&socket, &request) {
                        Some(t) => times.push(t),
                        None => errors += 1,
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (times, e) = w.join().unwrap_or_default();
        all.extend(times);
        errors += e;
    }
    all.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "LATENCY {} path={} clients={} requests={} p50_us={:.1} p99_us={:.1} max_us={:.1} errors={}",
        args.label,
        args.path,
        args.clients,
        all.len(),
        us(percentile(&all, 0.50)),
        us(percentile(&all, 0.99)),
        us(all.last().copied().unwrap_or_default()),
        errors
    );
    if errors > 0 {
        std::process::exit(2);
    }
}
