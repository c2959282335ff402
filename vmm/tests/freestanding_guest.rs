//! Boots Keel's freestanding test guest on this host's KVM: it reports the
//! memory map, the CPUs in the MADT and the ACPI tables it parsed, then
//! powers off, reboots or faults as asked.

mod common;

use std::time::Duration;

use common::keel_vmm;
use keel_tests::freestanding::{Mode, guest_elf, parse_report};

const DEADLINE: Duration = Duration::from_secs(20);

fn boot(mode: Mode, extra: &[&str]) -> common::Run {
    let kernel = guest_elf().to_str().expect("utf-8 path");
    let cmdline = mode.cmdline();
    let mut args = vec!["--kernel", kernel, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    keel_vmm(&args, DEADLINE)
}

/// RAM the guest should see for `size` bytes: all of it but the 384 KiB
/// legacy hole between 640 KiB and 1 MiB.
fn expected_kib(size: u64) -> u64 {
    (size - (0x100000 - 0x9fc00)) / 1024
}

#[test]
fn powers_off_with_one_vcpu_and_512_mib() {
    let run = boot(
        Mode::Poweroff,
        &["--cpus", "boot=1", "--memory", "size=512M"],
    );
    let report = parse_report(&run.stdout);
    assert_eq!(run.status, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(report.is_clean_poweroff(), "{report:?}");
    assert_eq!(report.cpus, Some(1));
    assert_eq!(report.memtotal_kib, Some(expected_kib(512 << 20)));
    for table in ["XSDT", "FACP", "APIC", "DSDT"] {
        assert!(report.acpi_table(table).is_some(), "no {table}: {report:?}");
    }
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    let poweroff = run.line_time("KEEL-GUEST POWEROFF").expect("poweroff line");
    assert!(
        run.elapsed - poweroff < Duration::from_secs(1),
        "exit took {:?} after poweroff",
        run.elapsed - poweroff
    );
}

#[test]
fn madt_lists_each_boot_vcpu_with_its_apic_id() {
    let run = boot(Mode::Poweroff, &["--cpus", "boot=2,max=4"]);
    let report = parse_report(&run.stdout);
    assert_eq!(run.status, Some(0), "{}{}", run.stdout, run.stderr);
    assert_eq!(report.cpus, Some(2), "{report:?}");
    assert_eq!(report.apic_ids, vec![0, 1]);
}

#[test]
fn memory_above_the_mmio_hole_is_in_the_memory_map() {
    let run = boot(Mode::Poweroff, &["--memory", "size=4G"]);
    let report = parse_report(&run.stdout);
    assert_eq!(run.status, Some(0), "{}{}", run.stdout, run.stderr);
    assert_eq!(report.memtotal_kib, Some(expected_kib(4 << 30)));
    let high = report.memory.iter().find(|(addr, _, _)| *addr == 1 << 32);
    assert_eq!(high, Some(&(1 << 32, 1 << 30, 1)), "{:?}", report.memory);
}

#[test]
fn reboot_boots_again_and_keeps_cmos_nvram() {
    let run = boot(Mode::Reboot, &[]);
    let report = parse_report(&run.stdout);
    assert_eq!(run.status, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(report.rebooting && report.second_boot, "{report:?}");
    assert_eq!(report.boots, 2);
    assert!(report.poweroff);
}

#[test]
fn triple_fault_is_reported_with_a_nonzero_status() {
    let run = boot(Mode::TripleFault, &[]);
    assert_eq!(run.status, Some(2), "{}{}", run.stdout, run.stderr);
    // The last line is the one-line verdict; the register dump before it is
    // what a developer needs to find the faulting code.
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("triple-faulted"), "{}", run.stderr);
    assert!(run.stderr.contains("RIP 0x"), "{}", run.stderr);
}

#[test]
fn serial_output_can_go_to_a_file_or_nowhere() {
    let dir = std::env::temp_dir().join(format!("keel-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("serial.log");
    let serial = format!("file={}", file.display());
    let run = boot(Mode::Poweroff, &["--serial", &serial]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(parse_report(&logged).is_clean_poweroff(), "{logged}");

    let run = boot(Mode::Poweroff, &["--serial", "off"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_halted_guest_keeps_running_until_stopped() {
    let run = keel_vmm(
        &[
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--cmdline",
            &Mode::Halt.cmdline(),
        ],
        Duration::from_secs(2),
    );
    assert_eq!(run.status, None, "a halted guest must not end the VM");
    assert!(parse_report(&run.stdout).halt);
}
