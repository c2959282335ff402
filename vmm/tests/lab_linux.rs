//! Real Debian kernels booted by keel-vmm as L2 guests in the nested lab
//! (ci/lab; on a host with VT-x/AMD-V they run directly). One L1 serves all
//! the cases, since starting it costs seconds.

use keel_tests::lab::{CaseResult, GuestBoot, Kernel, LabSession};

fn linux(kernel: Kernel, cpus: u32, test: &str) -> GuestBoot {
    GuestBoot::linux(kernel)
        .cpus(cpus)
        .memory_mib(512)
        .test(test)
}

fn assert_sees(case: &CaseResult, cpus: u32) {
    assert_eq!(case.status, 0, "{}: {}", case.name, case.output());
    assert_eq!(case.count("KEEL-L2 USERSPACE"), 1, "{}", case.output());
    assert_eq!(case.value("KEEL-L2 CPUS"), Some(cpus.to_string().as_str()));
    let online = if cpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", cpus - 1)
    };
    assert_eq!(case.value("KEEL-L2 ONLINE"), Some(online.as_str()));
    let memtotal: u64 = case
        .value("KEEL-L2 MEMTOTAL")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}: no MemTotal: {}", case.name, case.output()));
    // MemTotal is RAM less what the kernel keeps for itself (its image,
    // page structures): most of the 512 MiB, never more.
    assert!(
        (512 * 1024 * 9 / 10..=512 * 1024).contains(&memtotal),
        "{}: MemTotal {memtotal} kB for a 512 MiB guest",
        case.name
    );
}

#[test]
fn debian_kernels_boot_power_off_reboot_and_report_panics() {
    let poweroff = linux(Kernel::BzImage, 1, "poweroff").command();
    let results = LabSession::new()
        .smp(2)
        .case("bzimage-1cpu", linux(Kernel::BzImage, 1, "info"))
        .case("bzimage-2cpu", linux(Kernel::BzImage, 2, "info"))
        .case("pvh-1cpu", linux(Kernel::Pvh, 1, "info"))
        .case("pvh-2cpu", linux(Kernel::Pvh, 2, "info"))
        .case_cmd(
            "poweroff",
            &format!(
                "/keel/bin/keel-boot-timer --marker 'KEEL-L2 POWEROFF' --runs 1 --raw \
                 --timeout-s 60 -- {poweroff}"
            ),
        )
        .case("reboot-bzimage", linux(Kernel::BzImage, 2, "reboot"))
        .case("reboot-pvh", linux(Kernel::Pvh, 1, "reboot"))
        .case(
            "panic",
            linux(Kernel::BzImage, 1, "panic").cmdline("panic=-1"),
        )
        .run()
        .expect("the lab ran");

    for (name, cpus) in [
        ("bzimage-1cpu", 1),
        ("bzimage-2cpu", 2),
        ("pvh-1cpu", 1),
        ("pvh-2cpu", 2),
    ] {
        assert_sees(results.get(name), cpus);
    }

    // keel-vmm exits 0 within 1 s of the guest's poweroff.
    let poweroff = results.get("poweroff");
    assert_eq!(poweroff.status, 0, "{}", poweroff.output());
    let raw = poweroff
        .line_starting("RAW ")
        .unwrap_or_else(|| panic!("no timing: {}", poweroff.output()));
    let field = |name: &str| -> f64 {
        raw.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {raw}"))
    };
    let latency = field("exit_ms=") - field("marker_ms=");
    assert!(
        (0.0..1000.0).contains(&latency),
        "exit {latency:.0} ms after poweroff"
    );

    // A guest reboot boots the same VM again in the same process; the
    // second boot sees the CMOS mark the first one left.
    for name in ["reboot-bzimage", "reboot-pvh"] {
        let reboot = results.get(name);
        assert_eq!(reboot.status, 0, "{name}: {}", reboot.output());
        assert_eq!(reboot.count("KEEL-L2 USERSPACE"), 2, "{}", reboot.output());
        let first = reboot.position("KEEL-L2 REBOOTING").expect("rebooting");
        let second = reboot.position("KEEL-L2 SECOND-BOOT").expect("second boot");
        assert!(first < second);
    }

    // A panic with panic=-1 ends keel-vmm with status 3 and a clear line,
    // instead of rebooting forever.
    let panic = results.get("panic");
    assert_eq!(panic.status, 3, "{}", panic.output());
    assert_eq!(panic.count("KEEL-L2 USERSPACE"), 1, "{}", panic.output());
    assert!(
        panic
            .lines
            .iter()
            .any(|l| l.contains("keel-vmm: the guest kernel panicked")),
        "{}",
        panic.output()
    );
}
