//! Bad input on the command line: one clear line, exit status 1, nothing
//! started.

mod common;

use std::time::Duration;

use common::keel_vmm;
use keel_tests::freestanding::guest_elf;

fn rejects(args: &[&str], expect: &str) {
    let run = keel_vmm(args, Duration::from_secs(10));
    assert_eq!(run.status, Some(1), "{args:?}: {}", run.stderr);
    assert!(run.stdout.is_empty(), "{args:?} started a guest");
    let lines: Vec<_> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {}", run.stderr);
    assert!(lines[0].starts_with("keel-vmm: "), "{}", lines[0]);
    assert!(lines[0].contains(expect), "{args:?}: {}", lines[0]);
    assert!(!run.stderr.contains("panicked"));
}

fn guest() -> &'static str {
    guest_elf().to_str().unwrap()
}

#[test]
fn missing_or_bogus_kernel() {
    rejects(&["--kernel", "/nonexistent/bzImage"], "Cannot open kernel");
    rejects(
        &["--kernel", "/etc/hostname"],
        "neither a bzImage nor an ELF",
    );
    rejects(&["--cpus", "boot=1"], "--kernel is required");
    let dir = std::env::temp_dir();
    rejects(
        &["--kernel", guest(), "--initramfs", "/nonexistent/initrd"],
        "Cannot open initramfs",
    );
    rejects(&["--kernel", dir.to_str().unwrap()], "kernel");
}

#[test]
fn impossible_cpus_and_memory() {
    rejects(&["--kernel", guest(), "--memory", "size=0"], "size=0");
    rejects(&["--kernel", guest(), "--memory", "size=lots"], "--memory");
    rejects(&["--kernel", guest(), "--cpus", "boot=0"], "boot=0");
    rejects(&["--kernel", guest(), "--cpus", "boot=4,max=2"], "max=2");
    rejects(&["--kernel", guest(), "--cpus", "boot=1,cores=2"], "cores");
    rejects(&["--kernel", guest(), "--cpus", "boot=255"], "at most");
}

#[test]
fn more_memory_than_the_host_can_back() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let size = format!("size={}G", total_kib / (1 << 20) * 2 + 64);
    rejects(
        &["--kernel", guest(), "--memory", &size],
        "more than this host can back",
    );
}

#[test]
fn initramfs_larger_than_guest_memory() {
    let path = std::env::temp_dir().join(format!("keel-big-initrd-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 20).unwrap();
    rejects(
        &[
            "--kernel",
            guest(),
            "--memory",
            "size=32M",
            "--initramfs",
            path.to_str().unwrap(),
        ],
        "does not fit",
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unknown_or_malformed_options() {
    rejects(
        &["--kernel", guest(), "--bogus"],
        "unknown option '--bogus'",
    );
    rejects(&["--kernel"], "--kernel");
    rejects(&["--kernel", guest(), "--serial", "pty"], "--serial");
    rejects(&["--kernel", guest(), "--console", "file="], "--console");
}
