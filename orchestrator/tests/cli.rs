//! The `keel` CLI against a real keeld: login, images (with an upload),
//! VMs, disks, errors.

mod common;

use common::{Keeld, keel_cli, keel_vmm};

#[test]
fn keel_cli_drives_keeld() {
    let k = Keeld::start("cli");
    let _ = keel_vmm();
    let password = std::fs::read_to_string(k.dir.join("data/initial-admin-password")).unwrap();
    let (rc, out, err) = keel_cli(&k, &["login"], &[("KEEL_PASSWORD", password.trim())]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("Logged in"), "{out}");
    let (rc, _, err) = keel_cli(&k, &["login"], &[("KEEL_PASSWORD", "wrong")]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("401") && err.contains("Wrong user name or password"),
        "{err}"
    );

    let disk = k.dir.join("disk.raw");
    std::fs::write(&disk, vec![7u8; 2 << 20]).unwrap();
    let guest = k.guest_kernel().display().to_string();
    let (rc, out, err) = keel_cli(
        &k,
        &[
            "image",
            "import",
            "tiny",
            "--upload",
            disk.to_str().unwrap(),
            "--kernel",
            &guest,
            "--cmdline",
            "keel.mode=tick",
        ],
        &[],
    );
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("tiny") && out.contains("ready") && out.contains("2097152 bytes"),
        "{out}"
    );

    let (rc, out, err) = keel_cli(
        &k,
        &[
            "vm",
            "create",
            "box",
            "--image",
            "tiny",
            "--vcpus",
            "1",
            "--memory",
            "64",
            "--password",
            "pw",
        ],
        &[],
    );
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("box") && out.contains("running"), "{out}");
    let (rc, out, _) = keel_cli(&k, &["vm", "list"], &[]);
    assert_eq!(rc, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with("box"))
        .unwrap_or_default();
    assert!(row.contains("running") && row.contains(" 64 "), "{out}");
    let (rc, out, _) = keel_cli(&k, &["vm", "serial", "box"], &[]);
    assert_eq!(rc, 0);
    assert!(out.contains("KEEL-GUEST"), "{out}");
    let (rc, out, err) = keel_cli(&k, &["vm", "force-off", "box"], &[]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.trim(), "box: stopped");
    let (rc, _, err) = keel_cli(&k, &["disk", "create", "data", "--size-gib", "1"], &[]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = keel_cli(&k, &["disk", "attach", "data", "box"], &[]);
    assert_eq!(rc, 0, "{err}");
    let (_, out, _) = keel_cli(&k, &["disk", "list", "--json"], &[]);
    let disks: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        disks
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "data" && d["status"] == "in_use"),
        "{out}"
    );
    let (rc, _, err) = keel_cli(&k, &["vm", "delete", "box", "--purge"], &[]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = keel_cli(&k, &["vm", "show", "box"], &[]);
    assert_eq!(rc, 1);
    assert_eq!(err.trim(), "keel: keeld answered 404: No VM box");
    let (rc, _, err) = keel_cli(&k, &["vm", "create", "Bad", "--image", "tiny"], &[]);
    assert_eq!(rc, 1);
    assert!(err.contains("400") && err.contains("invalid"), "{err}");
}
