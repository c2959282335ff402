//! The freestanding test guest's virtio-pci driver against keel-vmm's
//! devices on this host's KVM: first well-behaved requests
//! (`keel.mode=virtio`), then a hostile guest (`keel.mode=hostile`) that
//! sends malformed descriptor chains and garbage register writes to every
//! device. Each device must fail the request, ignore it or set
//! DEVICE_NEEDS_RESET; after a reset it must serve again; keel-vmm must
//! neither crash nor hang and must exit 0 when the guest powers off.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Run, keel_vmm};
use keel_tests::freestanding::{
    GuestReport, Mode, guest_elf, parse_report, sector_checksum, written_sector,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// Sectors in the test disk.
const DISK_SECTORS: usize = 64;

/// A scratch directory with a disk image whose every dword differs.
struct Scratch {
    dir: PathBuf,
    disk: PathBuf,
    console: PathBuf,
    image: Vec<u8>,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("keel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image: Vec<u8> = (0..(DISK_SECTORS * 512 / 4) as u32)
            .flat_map(|i| (i.wrapping_mul(0x0100_0193) ^ 0xdead_beef).to_le_bytes())
            .collect();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, &image).unwrap();
        Scratch {
            console: dir.join("console.txt"),
            disk,
            dir,
            image,
        }
    }

    fn disk_arg(&self) -> String {
        format!("path={}", self.disk.display())
    }

    fn console_arg(&self) -> String {
        format!("file={}", self.console.display())
    }

    fn console_output(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn boot(mode: Mode, devices: &[&str]) -> (Run, GuestReport) {
    let kernel = guest_elf().to_str().expect("utf-8 path");
    let cmdline = mode.cmdline();
    let mut args = vec!["--kernel", kernel, "--cmdline", &cmdline];
    args.extend_from_slice(devices);
    let run = keel_vmm(&args, DEADLINE);
    let report = parse_report(&run.stdout);
    (run, report)
}

/// keel-vmm ran to the guest's poweroff and exited 0, with no panic.
fn assert_clean_exit(run: &Run, report: &GuestReport) {
    let all = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.status, Some(0), "keel-vmm did not exit 0:\n{all}");
    assert!(!run.stderr.contains("panicked"), "{all}");
    assert!(report.is_clean_poweroff(), "{report:?}\n{all}");
}

/// The hostile run reached its end and every line has an acceptable
/// outcome; returns the attacked devices' names.
fn assert_survived(run: &Run, report: &GuestReport) -> Vec<String> {
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(report.hostile_done, "no HOSTILE done:\n{all}");
    let failures = report.hostile_failures();
    assert!(
        failures.is_empty(),
        "unacceptable outcomes {failures:?}:\n{all}"
    );
    assert!(
        !report
            .hostile
            .iter()
            .any(|(_, outcome)| outcome == "timeout"),
        "{all}"
    );
    let mut devices: Vec<String> = report
        .hostile
        .iter()
        .filter_map(|(name, _)| name.strip_suffix(".final").map(str::to_string))
        .collect();
    devices.sort();
    devices
}

/// How many attacks the guest made on `device`.
fn attacks_on(report: &GuestReport, device: &str) -> usize {
    let prefix = format!("{device}.");
    report
        .hostile
        .iter()
        .filter(|(name, _)| name.starts_with(&prefix) && !name.ends_with(".final"))
        .count()
}

fn sector0_checksum(image: &[u8]) -> String {
    format!("{:#x}", sector_checksum(&image[..512]))
}

#[test]
fn well_behaved_requests_on_blk_rng_and_console() {
    let s = Scratch::new("virtio");
    let (disk, console) = (s.disk_arg(), s.console_arg());
    let (run, report) = boot(
        Mode::Virtio,
        &["--disk", &disk, "--rng", "--console", &console],
    );
    assert_clean_exit(&run, &report);
    let all = format!("{}{}", run.stdout, run.stderr);

    assert_eq!(report.virtio_result("rng"), Some("ok"), "{all}");
    let expected = sector0_checksum(&s.image);
    assert_eq!(
        report.virtio_result("blk sector0"),
        Some(expected.as_str()),
        "{all}"
    );
    let capacity = DISK_SECTORS.to_string();
    assert_eq!(
        report.virtio_result("blk capacity"),
        Some(capacity.as_str()),
        "{all}"
    );
    assert_eq!(report.virtio_result("blk write"), Some("ok"), "{all}");
    assert!(report.virtio_result("blk id").is_some(), "{all}");
    assert_eq!(report.virtio_result("console"), Some("ok"), "{all}");
    assert!(report.virtio.iter().any(|l| l == "done"), "{all}");

    // The guest's write reached the file; the rest of it is untouched.
    let after = std::fs::read(&s.disk).unwrap();
    assert_eq!(after.len(), s.image.len());
    assert_eq!(after[512..1024], written_sector()[..], "sector 1");
    assert_eq!(after[..512], s.image[..512], "sector 0 changed");
    assert_eq!(after[1024..], s.image[1024..], "sectors 2.. changed");
    assert!(
        s.console_output().contains("hello from virtio-console"),
        "console file: {:?}",
        s.console_output()
    );
}

/// Runs the hostile guest against one set of devices.
fn hostile(name: &str, devices: &[&str]) -> (Run, GuestReport, Vec<String>) {
    let (run, report) = boot(Mode::Hostile, devices);
    assert_clean_exit(&run, &report);
    let attacked = assert_survived(&run, &report);
    assert!(!attacked.is_empty(), "{name}: no device attacked");
    for device in &attacked {
        assert!(
            attacks_on(&report, device) >= 20,
            "{name}: few attacks on {device}"
        );
    }
    (run, report, attacked)
}

#[test]
fn hostile_guest_against_rng() {
    let (_, _, attacked) = hostile("rng", &["--rng"]);
    assert_eq!(attacked, ["rng"]);
}

#[test]
fn hostile_guest_against_blk() {
    let s = Scratch::new("hostile-blk");
    let disk = s.disk_arg();
    let (run, report, attacked) = hostile("blk", &["--disk", &disk]);
    assert_eq!(attacked, ["blk"]);
    let expected = sector0_checksum(&s.image);
    assert_eq!(
        report.virtio_result("blk sector0"),
        Some(expected.as_str()),
        "{}",
        run.stdout
    );
    // Only sector 1 may have been written (well-behaved, then attacks that
    // write to it); no attack reached anything else.
    let after = std::fs::read(&s.disk).unwrap();
    assert_eq!(after.len(), s.image.len(), "the disk changed size");
    assert_eq!(after[..512], s.image[..512], "sector 0 changed");
    assert_eq!(after[1024..], s.image[1024..], "sectors 2.. changed");
}

#[test]
fn hostile_guest_against_console() {
    let s = Scratch::new("hostile-console");
    let console = s.console_arg();
    let (_, _, attacked) = hostile("console", &["--console", &console]);
    assert_eq!(attacked, ["console"]);
    assert!(s.console_output().contains("hello from virtio-console"));
}

/// virtio-net on a TAP this test creates (keel-vmm needs CAP_NET_ADMIN, as
/// the lab and CI have): the guest's transmit queue is attacked; frames it
/// sends go out on the tap, which is down.
#[test]
fn hostile_guest_against_net() {
    let tap = format!("tap=kh{}", std::process::id() % 100_000);
    let (_, _, attacked) = hostile("net", &["--net", &tap]);
    assert_eq!(attacked, ["net"]);
}

#[test]
fn hostile_guest_against_vsock() {
    let s = Scratch::new("hostile-vsock");
    let vsock = format!("cid=3,socket={}", s.dir.join("v.sock").display());
    let (_, _, attacked) = hostile("vsock", &["--vsock", &vsock]);
    assert_eq!(attacked, ["vsock"]);
}

/// All devices at once: attacks on one must not disturb the others, which
/// serve well-behaved requests at the end (`<dev>.final`).
#[test]
fn hostile_guest_against_every_device_at_once() {
    let s = Scratch::new("hostile-all");
    let (disk, console) = (s.disk_arg(), s.console_arg());
    let vsock = format!("cid=3,socket={}", s.dir.join("v.sock").display());
    let (run, report, attacked) = hostile(
        "all",
        &[
            "--disk",
            &disk,
            "--rng",
            "--console",
            &console,
            "--vsock",
            &vsock,
        ],
    );
    assert_eq!(
        attacked,
        ["blk", "console", "rng", "vsock"],
        "{}",
        run.stdout
    );
    for device in ["blk", "console", "rng", "vsock"] {
        let name = format!("{device}.final");
        assert!(
            report.hostile.iter().any(|(n, _)| *n == name),
            "no {name}: {}",
            run.stdout
        );
    }
    let after = std::fs::read(&s.disk).unwrap();
    assert_eq!(after[..512], s.image[..512], "sector 0 changed");
}
