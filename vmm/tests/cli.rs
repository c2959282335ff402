//! Bad input on the command line: one clear line, exit status 1, nothing
//! started.

mod common;

use std::time::Duration;

use common::keel_vmm;
use keel_tests::freestanding::guest_elf;

/// Asserts keel-vmm refuses `args` with one line containing `expect`, exit
/// status 1 and no guest output; returns that line.
fn rejects(args: &[&str], expect: &str) -> String {
    let run = keel_vmm(args, Duration::from_secs(10));
    assert_eq!(run.status, Some(1), "{args:?}: {}", run.stderr);
    assert!(run.stdout.is_empty(), "{args:?} started a guest");
    let lines: Vec<_> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {}", run.stderr);
    assert!(lines[0].starts_with("keel-vmm: "), "{}", lines[0]);
    assert!(lines[0].contains(expect), "{args:?}: {}", lines[0]);
    assert!(!run.stderr.contains("panicked"));
    lines[0].to_string()
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
    rejects(
        &["--kernel", guest(), "--serial", "tty", "--console", "tty"],
        "both want the terminal",
    );
}

/// A scratch disk image, removed on drop.
struct ScratchDisk(std::path::PathBuf);

impl ScratchDisk {
    fn new(name: &str) -> ScratchDisk {
        let path = std::env::temp_dir().join(format!("keel-{name}-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        ScratchDisk(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn missing_disk_file() {
    let path = "/nonexistent/keel-disk.img";
    rejects(
        &["--kernel", guest(), "--disk", &format!("path={path}")],
        path,
    );
}

/// A keel-vmm that holds `disk` open for writing, with its guest halted;
/// killed on drop.
struct HaltedVm(std::process::Child);

impl HaltedVm {
    fn start(disk: &str) -> HaltedVm {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        use std::sync::mpsc;

        let mut child = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
            .args(["--kernel", guest(), "--cmdline", "keel.mode=halt"])
            .args(["--disk", &format!("path={disk}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel-vmm");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("KEEL-GUEST HALT") {
                    let _ = tx.send(());
                }
            }
        });
        let vm = HaltedVm(child);
        // The devices (and the disk's lock) exist before the guest runs.
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the first keel-vmm did not boot its guest to HALT");
        vm
    }
}

impl Drop for HaltedVm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn disk_already_in_use_by_another_vm() {
    let disk = ScratchDisk::new("disk-in-use");
    let first = HaltedVm::start(disk.path());
    rejects(
        &[
            "--kernel",
            guest(),
            "--disk",
            &format!("path={}", disk.path()),
        ],
        disk.path(),
    );
    drop(first);
    // Once the first VM is gone the disk is free again.
    let run = keel_vmm(
        &[
            "--kernel",
            guest(),
            "--cmdline",
            "keel.mode=poweroff",
            "--disk",
            &format!("path={}", disk.path()),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

#[test]
fn bad_mac() {
    for mac in ["zz:00:00:00:00:00", "52:54:00:12:34", "01:00:5e:00:00:01"] {
        rejects(
            &[
                "--kernel",
                guest(),
                "--net",
                &format!("tap=keelbad0,mac={mac}"),
            ],
            mac,
        );
    }
}

/// `lo` exists and is not a TAP: opening it as one fails, and the line says
/// which interface.
#[test]
fn tap_that_cannot_be_created() {
    let line = rejects(&["--kernel", guest(), "--net", "tap=lo"], "lo");
    assert!(line.to_lowercase().contains("tap"), "{line}");
}

#[test]
fn unknown_device_keys() {
    let disk = ScratchDisk::new("unknown-key");
    let disk = format!("path={},bogus=1", disk.path());
    for (option, value) in [
        ("--disk", disk.as_str()),
        ("--net", "tap=keelbad0,bogus=1"),
        ("--rng", "src=/dev/urandom,bogus=1"),
        ("--vsock", "cid=3,socket=/tmp/keel-bogus.sock,bogus=1"),
    ] {
        rejects(&["--kernel", guest(), option, value], "unknown key 'bogus'");
    }
}
