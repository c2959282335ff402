//! The REST API against a booted Debian guest in the nested lab, driven
//! from L1 with the `keel` CLI: pause/resume (the guest's counter and clock
//! stop), disk hot-plug (read whole in the guest), live disk growth, hot
//! removal (the image file is closed), NIC hot-plug (it carries pings) and
//! removal (the tap is released), vCPU hot-plug and removal (`nproc`), the
//! power button (the guest sees the key press), and the event monitor's
//! lines. The guest's side is
//! `tests/guest/initramfs/tests/api.sh`.

use keel_tests::lab::{CaseResult, GuestBoot, Kernel, LabResults, LabSession};

const HOT_MIB: u64 = 4;
/// How long L1 keeps the VM paused.
const PAUSE_S: u64 = 3;

fn l1_script(vmm_command: &str) -> String {
    format!(
        r#"cd /tmp
S=/tmp/api.sock; SER=/tmp/api-serial; EV=/tmp/api-events
rm -f $S $SER $EV
dd if=/dev/urandom of=/tmp/hot.img bs=1M count={HOT_MIB} 2>/dev/null
echo "KEEL-L1 HOT-SUM $(sha256sum </tmp/hot.img | cut -d' ' -f1)"
{vmm_command} --api-socket path=$S --event-monitor path=$EV &
vmm=$!
wait_serial() {{
	n=0
	while ! grep -q "$1" $SER 2>/dev/null && [ $n -lt $(($2 * 10)) ]; do sleep 0.1; n=$((n + 1)); done
	grep -q "$1" $SER
}}
k() {{ keel vmm --socket $S "$@"; }}
wait_serial "KEEL-L2 API-READY" 90 || echo "KEEL-L1 NO-READY"
echo "KEEL-L1 PING $(k ping)"
echo "KEEL-L1 STATE $(k info | sed -n 's/^state: *//p')"
sleep 1
k pause && echo "KEEL-L1 PAUSED"
echo "KEEL-L1 STATE $(k info | sed -n 's/^state: *//p')"
# Let the console thread write what the guest printed before the pause.
sleep 0.5
last=$(grep "KEEL-L2 TICK" $SER | tail -1)
echo "KEEL-L1 PAUSED-AFTER $last"
before=$(grep -c "KEEL-L2 TICK" $SER)
sleep {PAUSE_S}
echo "KEEL-L1 TICKS-WHILE-PAUSED $(($(grep -c "KEEL-L2 TICK" $SER) - before))"
k resume && echo "KEEL-L1 RESUMED"
echo "KEEL-L1 STATE $(k info | sed -n 's/^state: *//p')"

k add-disk path=/tmp/hot.img,id=hot && echo "KEEL-L1 ADDED-DISK"
wait_serial "KEEL-L2 HOT-DISK " 60
echo "KEEL-L1 COUNTERS $(k --json counters | tr -d ' \n')"
k resize-disk --disk hot --size 8M && echo "KEEL-L1 RESIZED"
wait_serial "KEEL-L2 HOT-DISK-SIZE" 40
echo "KEEL-L1 FILE-SIZE $(wc -c </tmp/hot.img)"
k remove-device hot && echo "KEEL-L1 REMOVE-REQUESTED"
wait_serial "KEEL-L2 HOT-DISK-GONE" 40
sleep 1
echo "KEEL-L1 OPEN-HOT-IMG $(ls -l /proc/$vmm/fd 2>/dev/null | grep -c hot.img)"

k add-net tap=kt1,ip=192.168.101.1,mask=255.255.255.0,id=hotnet && echo "KEEL-L1 ADDED-NET"
wait_serial "KEEL-L2 HOT-NET " 90
k remove-device hotnet && echo "KEEL-L1 REMOVE-REQUESTED"
wait_serial "KEEL-L2 HOT-NET-GONE" 40
sleep 1
if ip link show kt1 >/dev/null 2>&1; then echo "KEEL-L1 TAP-AFTER present"; else echo "KEEL-L1 TAP-AFTER gone"; fi

k resize --cpus 2 && echo "KEEL-L1 RESIZED-CPUS 2"
wait_serial "KEEL-L2 NPROC " 90
k resize --cpus 1 && echo "KEEL-L1 RESIZED-CPUS 1"
wait_serial "KEEL-L2 NPROC-AFTER" 90

wait_serial "KEEL-L2 MEMTOTAL-BEFORE" 30
k resize --memory 768M && echo "KEEL-L1 RESIZED-MEMORY 768M"
wait_serial "KEEL-L2 MEMTOTAL-AFTER" 90
echo "KEEL-L1 MEMORY-ACTUAL $(k info | sed -n 's/^memory: *//p')"

wait_serial "KEEL-L2 WAIT-POWER-BUTTON" 40
sleep 1
k power-button && echo "KEEL-L1 PRESSED"
wait $vmm
echo "KEEL-L1 VMM-EXIT $?"
sed 's/^/KEEL-L1 EVENT /' $EV
cat $SER
"#
    )
}

/// The lifecycle endpoints, from an empty VMM: vm.create (a JSON
/// VmConfig), vm.boot, vm.add-vsock (hot-plugged), vm.reboot, vm.shutdown,
/// vm.boot again, vm.delete and vmm.shutdown, with vm.info's state between.
fn lifecycle_script() -> String {
    r#"cd /tmp
S=/tmp/life.sock; SER=/tmp/life-serial
rm -f $S $SER
cat >/tmp/life.json <<JSON
{"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":268435456},
 "payload":{"kernel":"/keel/guest/bzImage","initramfs":"/keel/guest/initramfs.cpio.gz",
            "cmdline":"console=ttyS0 quiet keel.test=idle"},
 "serial":{"mode":"File","file":"/tmp/life-serial"},"console":{"mode":"Off"}}
JSON
/keel/bin/keel-vmm --api-socket path=$S &
vmm=$!
k() { keel vmm --socket $S "$@"; }
boots() { b=$(grep -c "KEEL-L2 IDLE-BOOT" $SER 2>/dev/null); echo "${b:-0}"; }
wait_boots() {
	n=0
	while [ "$(boots)" -lt "$1" ] && [ $n -lt 900 ]; do sleep 0.1; n=$((n + 1)); done
	echo "KEEL-L1 BOOTS $(boots)"
}
state() { echo "KEEL-L1 STATE $(k info 2>&1 | sed -n 's/^state: *//p')"; }
n=0; while [ ! -S $S ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
k info >/dev/null 2>&1 || echo "KEEL-L1 INFO-BEFORE-CREATE refused"
k create /tmp/life.json && echo "KEEL-L1 CREATED"
state
k boot && echo "KEEL-L1 BOOTED"
wait_boots 1
state
k add-vsock cid=3,socket=/tmp/life-vsock.sock,id=hotvsock && echo "KEEL-L1 ADDED-VSOCK"
n=0; while ! grep -q "KEEL-L2 VSOCK-DEVICE" $SER && [ $n -lt 900 ]; do sleep 0.1; n=$((n + 1)); done
k reboot && echo "KEEL-L1 REBOOTED"
wait_boots 2
k shutdown && echo "KEEL-L1 SHUT-DOWN"
state
k boot && echo "KEEL-L1 BOOTED-AGAIN"
wait_boots 3
k delete && echo "KEEL-L1 DELETED"
k info >/dev/null 2>&1 || echo "KEEL-L1 INFO-AFTER-DELETE refused"
k shutdown-vmm && echo "KEEL-L1 VMM-SHUTDOWN"
wait $vmm
echo "KEEL-L1 VMM-EXIT $?"
cat $SER
"#
    .to_string()
}

fn value<'a>(case: &'a CaseResult, prefix: &str) -> &'a str {
    case.value(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", case.output()))
}

/// `KEEL-L2 TICK <n> <centiseconds>` lines: (n, guest uptime in cs).
fn ticks(case: &CaseResult) -> Vec<(u64, u64)> {
    case.lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("KEEL-L2 TICK "))
        .filter_map(|rest| {
            let (n, up) = rest.split_once(' ')?;
            Some((n.parse().ok()?, up.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn api_drives_a_debian_guest() {
    let guest = GuestBoot::linux(Kernel::BzImage)
        .memory_mib(512)
        .memory_hotplug_mib(512)
        .max_cpus(2)
        .test("api")
        .serial("file=/tmp/api-serial");
    let results: LabResults = LabSession::new()
        .smp(2)
        .case_with_timeout("api", l1_script(&guest.command()), 420)
        .case_with_timeout("lifecycle", lifecycle_script(), 300)
        .run()
        .expect("the lab ran");
    lifecycle_checks(results.get("lifecycle"));
    let case = results.get("api");
    let out = case.output();
    assert!(!case.timed_out, "timed out:\n{out}");
    assert!(!case.has_line("KEEL-L1 NO-READY"), "{out}");
    assert!(
        value(case, "KEEL-L1 PING").starts_with("keel-vmm "),
        "{out}"
    );

    // Pause: no ticks while paused, Paused in vm.info, and the guest's
    // clock did not count the pause.
    let states: Vec<&str> = case
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("KEEL-L1 STATE "))
        .collect();
    assert_eq!(states, ["Running", "Paused", "Running"], "{out}");
    assert_eq!(value(case, "KEEL-L1 TICKS-WHILE-PAUSED"), "0", "{out}");
    let paused_after: u64 = value(case, "KEEL-L1 PAUSED-AFTER KEEL-L2 TICK")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("the last tick before the pause");
    let ticks = ticks(case);
    let up = |n: u64| ticks.iter().find(|(i, _)| *i == n).map(|(_, u)| *u);
    let (Some(before), Some(after)) = (up(paused_after), up(paused_after + 1)) else {
        panic!("no ticks around the pause:\n{out}");
    };
    // Ticks are 0.2 s apart; the pause lasted PAUSE_S seconds of L1 time.
    let gap_cs = after.saturating_sub(before);
    assert!(
        gap_cs < PAUSE_S * 100 / 2,
        "the guest's clock ran {gap_cs} cs across a {PAUSE_S} s pause:\n{out}"
    );

    // Disk hot-plug: the guest read exactly the host's bytes.
    assert!(case.has_line("KEEL-L1 ADDED-DISK"), "{out}");
    let hot = value(case, "KEEL-L2 HOT-DISK vda");
    let sum = value(case, "KEEL-L1 HOT-SUM");
    assert_eq!(hot, format!("{} {sum}", HOT_MIB << 20), "{out}");
    let counters: serde_json::Value =
        serde_json::from_str(value(case, "KEEL-L1 COUNTERS")).expect("counters are JSON");
    assert!(
        counters["hot"]["read_bytes"].as_u64().unwrap_or(0) >= HOT_MIB << 20,
        "{out}"
    );
    // Growth seen live, then removal: the guest lets go and the VMM closes
    // the image.
    assert_eq!(value(case, "KEEL-L2 HOT-DISK-SIZE"), "16384", "{out}");
    assert_eq!(
        value(case, "KEEL-L1 FILE-SIZE"),
        (8u64 << 20).to_string(),
        "{out}"
    );
    assert_eq!(value(case, "KEEL-L2 HOT-DISK-GONE"), "yes", "{out}");
    assert_eq!(value(case, "KEEL-L1 OPEN-HOT-IMG"), "0", "{out}");

    // NIC hot-plug carries traffic; removal releases the tap.
    assert_eq!(value(case, "KEEL-L2 HOT-NET eth0 PING"), "3/3", "{out}");
    assert_eq!(value(case, "KEEL-L2 HOT-NET-GONE"), "yes", "{out}");
    assert_eq!(value(case, "KEEL-L1 TAP-AFTER"), "gone", "{out}");

    // vCPU hot-plug: the guest brought the new CPU online, and let it go
    // when asked.
    assert_eq!(value(case, "KEEL-L2 NPROC"), "2", "{out}");
    assert_eq!(value(case, "KEEL-L2 NPROC-AFTER"), "1", "{out}");

    // Memory hot-plug: 256 MiB more, onlined by the guest.
    let kib = |prefix: &str| -> u64 { value(case, prefix).parse().unwrap_or(0) };
    let grown = kib("KEEL-L2 MEMTOTAL-AFTER").saturating_sub(kib("KEEL-L2 MEMTOTAL-BEFORE"));
    assert_eq!(grown, 256 << 10, "MemTotal grew by {grown} KiB:\n{out}");
    assert_eq!(value(case, "KEEL-L1 MEMORY-ACTUAL"), "768 MiB", "{out}");

    // The power button reached the guest, which then powered off.
    assert!(case.has_line("KEEL-L1 PRESSED"), "{out}");
    assert!(case.has_line("KEEL-L2 POWER-BUTTON"), "{out}");
    assert!(case.has_line("KEEL-L1 VMM-EXIT 0"), "{out}");

    // The event monitor saw it all, in order.
    let events: Vec<String> = case
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("KEEL-L1 EVENT "))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("an event is JSON");
            let id = v["properties"]["id"].as_str().unwrap_or("");
            format!(
                "{}:{}{}",
                v["source"].as_str().unwrap_or(""),
                v["event"].as_str().unwrap_or(""),
                if id.is_empty() {
                    String::new()
                } else {
                    format!(":{id}")
                }
            )
        })
        .collect();
    let expected = [
        "vmm:starting",
        "vm:booting",
        "vm:booted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:device-added:hot",
        "vm:device-removed:hot",
        "vm:device-added:hotnet",
        "vm:device-removed:hotnet",
        "vm:shutdown",
        "vmm:shutdown",
    ];
    assert_eq!(events, expected, "{out}");
}

/// What the lifecycle case must show.
fn lifecycle_checks(case: &CaseResult) {
    let out = case.output();
    assert!(!case.timed_out, "lifecycle timed out:\n{out}");
    for line in [
        "KEEL-L1 INFO-BEFORE-CREATE refused",
        "KEEL-L1 CREATED",
        "KEEL-L1 BOOTED",
        "KEEL-L1 ADDED-VSOCK",
        "KEEL-L2 VSOCK-DEVICE yes",
        "KEEL-L1 REBOOTED",
        "KEEL-L1 SHUT-DOWN",
        "KEEL-L1 BOOTED-AGAIN",
        "KEEL-L1 DELETED",
        "KEEL-L1 INFO-AFTER-DELETE refused",
        "KEEL-L1 VMM-SHUTDOWN",
        "KEEL-L1 VMM-EXIT 0",
    ] {
        assert!(case.has_line(line), "no {line:?}:\n{out}");
    }
    let states: Vec<&str> = case
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("KEEL-L1 STATE "))
        .collect();
    assert_eq!(states, ["Created", "Running", "Shutdown"], "{out}");
    let boots: Vec<&str> = case
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("KEEL-L1 BOOTS "))
        .collect();
    assert_eq!(
        boots,
        ["1", "2", "3"],
        "a reboot and a boot after shutdown:\n{out}"
    );
}
