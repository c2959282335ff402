//! First-boot configuration for the guest: a cloud-init NoCloud seed, an
//! ISO 9660 volume labelled `cidata` holding `meta-data` and `user-data`
//! (what Debian's cloud images read), attached as a read-only disk, written
//! by keeld itself ([`super::iso9660`]).

use std::path::Path;

use keel_api::agent::SeedSpec;

/// Quotes a string for YAML (a JSON string is a valid YAML scalar).
fn yaml(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml(instance_id),
        yaml(hostname)
    )
}

pub fn user_data(init: &SeedSpec) -> String {
    let mut out = String::from("#cloud-config\n");
    out.push_str(&format!("hostname: {}\n", yaml(&init.hostname)));
    if let Some(password) = &init.root_password {
        // Root logs in with the password given (console and, where the
        // image allows it, SSH).
        out.push_str("disable_root: false\nssh_pwauth: true\n");
        out.push_str("chpasswd:\n  expire: false\n  users:\n");
        out.push_str(&format!(
            "    - name: root\n      password: {}\n      type: text\n",
            yaml(password)
        ));
    }
    if !init.ssh_authorized_keys.is_empty() {
        out.push_str("users:\n  - default\n  - name: root\n    ssh_authorized_keys:\n");
        for key in &init.ssh_authorized_keys {
            out.push_str(&format!("      - {}\n", yaml(key)));
        }
    }
    out
}

/// Writes the seed ISO for a VM to `iso` (mode 0600: it may hold the root
/// password).
pub fn build(iso: &Path, instance_id: &str, init: &SeedSpec) -> std::io::Result<()> {
    let meta = meta_data(instance_id, &init.hostname);
    let user = user_data(init);
    let image = super::iso9660::build(
        "cidata",
        &[
            ("meta-data", meta.as_bytes()),
            ("user-data", user.as_bytes()),
        ],
    );
    crate::files::write_atomic(iso, &image, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_carries_password_and_keys_quoted() {
        let init = SeedSpec {
            hostname: "web".into(),
            root_password: Some("p\"w: x".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA me@host".into()],
        };
        let text = user_data(&init);
        assert!(text.starts_with("#cloud-config\n"));
        assert!(text.contains("hostname: \"web\""));
        assert!(text.contains(r#"password: "p\"w: x""#));
        assert!(text.contains("- \"ssh-ed25519 AAAA me@host\""));
        assert!(!user_data(&SeedSpec::default()).contains("chpasswd"));
    }

    /// Read back with isoinfo (package genisoimage), an independent reader.
    #[test]
    fn seed_iso_holds_both_files_under_their_names() {
        use std::process::Command;
        if Command::new("isoinfo").arg("--version").output().is_err() {
            panic!("isoinfo (package genisoimage) is needed for this test");
        }
        let dir = std::env::temp_dir().join(format!("keel-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let iso = dir.join("seed.iso");
        let init = SeedSpec {
            hostname: "box".into(),
            root_password: Some("secret".into()),
            ..Default::default()
        };
        build(&iso, "vm-1", &init).unwrap();
        let label = Command::new("isoinfo")
            .arg("-d")
            .arg("-i")
            .arg(&iso)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&label.stdout).contains("Volume id: cidata"));
        let read = |name: &str| {
            let out = Command::new("isoinfo")
                .args(["-J", "-x", name, "-i"])
                .arg(&iso)
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        assert!(read("/user-data").contains("password: \"secret\""));
        // What cloud-init looks for: a filesystem labelled cidata.
        let blkid = Command::new("blkid")
            .args(["-o", "export"])
            .arg(&iso)
            .output()
            .unwrap();
        let blkid = String::from_utf8_lossy(&blkid.stdout);
        assert!(
            blkid.contains("LABEL=cidata") && blkid.contains("TYPE=iso9660"),
            "{blkid}"
        );
        assert!(read("/meta-data").contains("instance-id: \"vm-1\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
