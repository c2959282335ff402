//! keeld with real Debian VMs, in the nested lab (on a host with VT-x/AMD-V
//! the same script runs directly): the default Debian image
//! (`ci/debian-image`) imported, a VM created with a root password reaches a
//! login prompt on its serial console and the password logs in; stop
//! (the guest powers off on the ACPI button), start, delete, restore; a disk
//! hot-attached to the running VM is seen by the guest; an image imported
//! from an http server; 10 VMs created in parallel all run.

use std::path::PathBuf;
use std::process::Command;

use keel_tests::lab::{LabSession, repo_root};

/// Runs in L1. Marker lines start with `KEEL-KEELD`.
const SCRIPT: &str = r##"
set -u
export KEEL_SERVER=http://127.0.0.1:8080 XDG_CONFIG_HOME=/tmp/cfg
mark() { echo "KEEL-KEELD $*"; }
ms() { read -r up _ </proc/uptime; echo $((${up%.*} * 1000 + 1${up#*.}0 - 1000)); }
D=/share
mkdir -p /tmp/keel
# 11 one-vCPU VMs at most on 2 CPUs: overcommit 8.
keeld serve --data-dir /tmp/keel --listen 127.0.0.1:8080 --stop-timeout 90 --cpu-overcommit 8 \
	--import-dir $D --import-dir /keel/guest --url-import-allow 127.0.0.0/8 -v >/tmp/keeld.log 2>&1 &
n=0; while ! grep -q serving /tmp/keeld.log && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
KEEL_PASSWORD=$(cat /tmp/keel/initial-admin-password) keel login >/dev/null && mark LOGIN-OK
keel image import debian-12 --path $D/rootfs.raw --kernel $D/vmlinuz --initramfs $D/initrd.img \
	--cmdline "$(cat $D/cmdline)" --os-type linux --os-version debian-12 && mark IMAGE-OK

# wait_serial VM TEXT SECONDS [FROM_BYTE]
wait_serial() {
	n=0
	while [ $n -lt $(($3 * 5)) ]; do
		keel vm serial "$1" 2>/dev/null | tail -c +${4:-0} | grep -q "$2" && return 0
		sleep 0.2; n=$((n + 1))
	done
	return 1
}
serial_len() { keel vm serial "$1" 2>/dev/null | wc -c; }

# console VM CMD: logs in as root on the serial console and runs CMD.
console() {
	rm -f /tmp/keys; mkfifo /tmp/keys
	keel console "$1" </tmp/keys >/tmp/console.out 2>&1 &
	cpid=$!
	exec 3>/tmp/keys
	from=$(serial_len "$1")
	sleep 1; printf '\n' >&3
	wait_serial "$1" "login:" 60 "$from" || mark NO-LOGIN-PROMPT-FOR-CONSOLE
	printf 'root\n' >&3
	wait_serial "$1" "Password:" 30 "$from" && printf 'test-pass\n' >&3
	wait_serial "$1" "# " 60 "$from" || mark NO-SHELL
	printf '%s\n' "$2" >&3
	sleep 1
	printf 'exit\n' >&3
	exec 3>&-
	sleep 0.5; kill $cpid 2>/dev/null; wait $cpid 2>/dev/null
}

t0=$(ms)
keel vm create d1 --image debian-12 --vcpus 1 --memory 512 --password test-pass >/dev/null && mark CREATED
mark STATUS $(keel vm show d1 --json | sed 's/.*"status":"\([a-z]*\)".*/\1/')
if wait_serial d1 "login:" 240; then mark LOGIN-PROMPT-MS $(($(ms) - t0)); else mark NO-LOGIN-PROMPT; keel vm serial d1 | tail -20; fi
console d1 'echo "LOGGED-IN-$((6*7)) $(hostname)"'
keel vm serial d1 | grep -o 'LOGGED-IN-42 [a-z0-9-]*' | tail -1 | sed 's/^/KEEL-KEELD /'

# A disk hot-attached to the running guest.
keel disk create data --size-gib 1 >/dev/null && keel disk attach data d1 && mark ATTACHED
sleep 3
console d1 'echo "DISKS $(cat /sys/block/vd*/size | tr "\n" " ")"'
keel vm serial d1 | grep -o 'DISKS [0-9 ]*' | tail -1 | sed 's/^/KEEL-KEELD /'

# Stop: the guest powers off on the ACPI power button (not forced).
t1=$(ms)
keel vm stop d1 && mark STOPPED-MS $(($(ms) - t1))
keel vm events d1 | grep -q stop-forced && mark STOP-WAS-FORCED
keel vm start d1 >/dev/null && mark STARTED $(keel vm show d1 --json | sed 's/.*"status":"\([a-z]*\)".*/\1/')
from=$(serial_len d1)
wait_serial d1 "login:" 240 "$from" && mark LOGIN-PROMPT-AGAIN
keel vm force-off d1 >/dev/null
keel vm delete d1 && mark DELETED $(keel vm list | grep -c '^d1 ')
keel vm restore d1 && mark RESTORED $(keel vm list | grep -c '^d1 ')

# Import over http from a server in L1: the freestanding guest, halted once
# booted (guests that spin would share L1's two emulated CPUs with keeld).
mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/small.raw bs=1M count=2 2>/dev/null
sum=$(sha256sum /tmp/www/small.raw | cut -d' ' -f1)
busybox httpd -p 127.0.0.1:8000 -h /tmp/www
keel image import web --url http://127.0.0.1:8000/small.raw --sha256 $sum \
	--kernel /keel/guest/freestanding/keel-test-guest.elf --cmdline keel.mode=halt >/dev/null && mark HTTP-IMAGE-OK

# 10 VMs created in parallel (only these are waited for: keeld and httpd
# are children of this shell too).
t2=$(ms)
pids=
for i in 0 1 2 3 4 5 6 7 8 9; do
	keel vm create p$i --image web --vcpus 1 --memory 64 >/dev/null 2>&1 &
	pids="$pids $!"
done
wait $pids
mark PARALLEL-RUNNING $(keel vm list | grep -c '^p[0-9] .*running') $(($(ms) - t2))
kill %1 2>/dev/null
mark DONE
"##;

fn debian_image() -> PathBuf {
    let out = Command::new(repo_root().join("ci/debian-image"))
        .output()
        .expect("run ci/debian-image");
    assert!(
        out.status.success(),
        "ci/debian-image failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

#[test]
fn keeld_runs_debian_vms_in_the_lab() {
    let image = debian_image();
    let share = std::env::temp_dir().join(format!("keel-lab-keeld-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).unwrap();
    for f in ["rootfs.raw", "vmlinuz", "initrd.img", "cmdline"] {
        // Hard links: the share is copied into L1's disk anyway.
        let (from, to) = (image.join(f), share.join(f));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let results = LabSession::new()
        .smp(2)
        .memory_mib(6144)
        .share(&share)
        .case_with_timeout("keeld", SCRIPT, 1500)
        .run()
        .expect("the lab session ran");
    let _ = std::fs::remove_dir_all(&share);
    let r = results.get("keeld");
    let out = r.output();
    let has = |m: &str| r.has_line(&format!("KEEL-KEELD {m}"));
    let value = |m: &str| r.value(&format!("KEEL-KEELD {m} ")).map(str::to_string);
    for m in [
        "LOGIN-OK",
        "IMAGE-OK",
        "CREATED",
        "STATUS running",
        "ATTACHED",
        "LOGIN-PROMPT-AGAIN",
        "HTTP-IMAGE-OK",
        "DONE",
    ] {
        assert!(has(m), "no {m} in:\n{out}");
    }
    let prompt_ms: u64 = value("LOGIN-PROMPT-MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no login prompt:\n{out}"));
    eprintln!("keeld create -> login prompt: {prompt_ms} ms (nested lab)");
    // The password given at create reached the guest (cloud-init), and so
    // did the hostname.
    assert_eq!(value("LOGGED-IN-42").as_deref(), Some("d1"), "{out}");
    // vda (system, 1+ GiB), vdb (the seed), vdc: the 1 GiB disk attached live.
    let disks = value("DISKS").unwrap_or_else(|| panic!("no DISKS line:\n{out}"));
    assert!(
        disks.split_whitespace().any(|s| s == "2097152"),
        "the attached disk is not seen: {disks}\n{out}"
    );
    assert!(value("STOPPED-MS").is_some(), "{out}");
    assert!(
        !has("STOP-WAS-FORCED"),
        "the guest ignored the power button:\n{out}"
    );
    assert_eq!(value("STARTED").as_deref(), Some("running"), "{out}");
    assert_eq!(value("DELETED").as_deref(), Some("0"), "{out}");
    assert_eq!(value("RESTORED").as_deref(), Some("1"), "{out}");
    let parallel = value("PARALLEL-RUNNING").unwrap_or_default();
    assert!(
        parallel.starts_with("10 "),
        "not all 10 parallel VMs run: {parallel}\n{out}"
    );
}
