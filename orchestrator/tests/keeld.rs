//! keeld end to end on this host: real keel-vmm processes running Keel's
//! freestanding test guest (the one guest this host's KVM can run), driven
//! through keeld's web API.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Keeld, op_outcome, send, ticks, wait_op};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn vm_lifecycle_create_pause_stop_start_delete_restore_purge() {
    let k = Keeld::start("lifecycle");
    let image = k.tiny_image("tiny");
    assert_eq!(image["status"], "ready");
    assert_eq!(image["size"], 1 << 20);
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "web-1", "image": "tiny", "vcpus": 1, "memory_mib": 128,
               "root_password": "hunter22", "description": "first"}),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    // What the VMM reported, not what was asked.
    assert_eq!(vm["status"], "running", "{vm}");
    assert_eq!(vm["guest_init"]["root_password_set"], true);
    assert!(
        vm.to_string().find("hunter22").is_none(),
        "the password is never shown"
    );
    assert!(!k.vmm_pids().is_empty());
    // The system disk is the image's bytes (from the spare copy made when
    // the image became ready), grown to a whole GiB; a new spare follows.
    let sys = std::fs::read(k.dir.join(format!(
        "data/disks/{}.raw",
        vm["system_disk"].as_str().unwrap()
    )))
    .unwrap();
    assert_eq!(sys.len(), 1 << 30);
    assert!(sys[..1 << 20].iter().all(|&b| b == 0x5a) && sys[1 << 20..].iter().all(|&b| b == 0));
    drop(sys);
    let spare = k.dir.join(format!(
        "data/images/{}.spare",
        image["id"].as_str().unwrap()
    ));
    let start = Instant::now();
    while !spare.exists() {
        assert!(start.elapsed() < BOOT, "no new spare disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    while ticks(&k.serial(&id)) < 3 {
        assert!(start.elapsed() < BOOT, "no TICKs on the serial console");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pause: the guest's counter stops; resume: it goes on.
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/pause"), &json!({}))
            .unwrap(),
    );
    assert_eq!(k.vm(&id)["status"], "paused");
    let paused_at = ticks(&k.serial(&id));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ticks(&k.serial(&id)) <= paused_at + 1,
        "the guest ran while paused"
    );
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/resume"), &json!({}))
            .unwrap(),
    );
    assert_eq!(k.vm(&id)["status"], "running");
    let start = Instant::now();
    while ticks(&k.serial(&id)) < paused_at + 3 {
        assert!(
            start.elapsed() < BOOT,
            "the guest did not run again after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Stop: the power button; this guest ignores it, so keeld forces it
    // off after the stop timeout (2 s in tests).
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/stop"), &json!({}))
            .unwrap(),
    );
    let vm = k.vm(&id);
    assert_eq!(vm["status"], "stopped", "{vm}");
    assert!(vm.get("vmm").is_none());
    assert!(k.vmm_pids().is_empty(), "keel-vmm still runs");
    let events = k.admin.get(&format!("/api/v1/vms/{id}/events")).unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for expected in ["booted", "paused", "resumed", "stop-forced", "stopped"] {
        assert!(kinds.contains(&expected), "no {expected} in {kinds:?}");
    }

    // Start again, reboot.
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/start"), &json!({}))
            .unwrap(),
    );
    assert_eq!(k.vm(&id)["status"], "running");
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/reboot"), &json!({}))
            .unwrap(),
    );
    k.wait_status(&id, "running", BOOT);

    // Rename and describe.
    let r = send(
        &k.admin,
        "PATCH",
        &format!("/api/v1/vms/{id}"),
        Some(json!({"name": "web-2", "description": "renamed"})),
    );
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(
        k.admin.get("/api/v1/vms/web-2").unwrap()["description"],
        "renamed"
    );

    // Delete to the recycle bin: stopped, hidden from the list, restorable.
    let r = send(&k.admin, "DELETE", &format!("/api/v1/vms/{id}"), None);
    assert_eq!(r.status, 202);
    wait_op(&k.admin, &r.body);
    assert!(k.vmm_pids().is_empty());
    let live = k.admin.get("/api/v1/vms").unwrap();
    assert_eq!(live["items"].as_array().unwrap().len(), 0);
    let bin = k.admin.get("/api/v1/vms?deleted=true").unwrap();
    assert_eq!(bin["items"][0]["id"], id.as_str());
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/restore"), &json!({}))
            .unwrap(),
    );
    assert_eq!(
        k.admin.get("/api/v1/vms").unwrap()["items"][0]["id"],
        id.as_str()
    );
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/vms/{id}/start"), &json!({}))
            .unwrap(),
    );
    assert_eq!(k.vm(&id)["status"], "running");

    // Purge: gone for good, its system disk and files too.
    let system_disk = k.vm(&id)["system_disk"].as_str().unwrap().to_string();
    let r = send(
        &k.admin,
        "DELETE",
        &format!("/api/v1/vms/{id}?purge=true"),
        None,
    );
    wait_op(&k.admin, &r.body);
    assert_eq!(
        send(&k.admin, "GET", &format!("/api/v1/vms/{id}"), None).status,
        404
    );
    assert!(!k.dir.join(format!("data/disks/{system_disk}.raw")).exists());
    assert!(!k.dir.join(format!("data/vms/{id}")).exists());
    assert!(k.vmm_pids().is_empty());
}

#[test]
fn idempotency_key_creates_one_vm() {
    let k = Keeld::start("idem");
    k.tiny_image("tiny");
    let body =
        json!({"name": "once", "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": false});
    let threads: Vec<_> = (0..5)
        .map(|_| {
            let c = k.admin.clone();
            let body = body.clone();
            std::thread::spawn(move || {
                c.send(
                    "POST",
                    "/api/v1/vms",
                    Some(&body),
                    &[("Idempotency-Key", "create-once-1")],
                )
                .unwrap()
            })
        })
        .collect();
    let replies: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &replies {
        assert_eq!(r.status, 202, "{}", r.text);
        assert_eq!(r.body["vm"]["id"], replies[0].body["vm"]["id"]);
        assert_eq!(
            r.body["operation"]["id"],
            replies[0].body["operation"]["id"]
        );
    }
    wait_op(&k.admin, &replies[0].body);
    assert_eq!(
        k.admin.get("/api/v1/vms").unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Without the key the same body is a second request: the name is taken.
    assert_eq!(
        send(&k.admin, "POST", "/api/v1/vms", Some(body.clone())).status,
        409
    );
    // The key for a different request is refused.
    let other = k
        .admin
        .send(
            "POST",
            "/api/v1/disks",
            Some(&json!({"name": "d", "size_gib": 1})),
            &[("Idempotency-Key", "create-once-1")],
        )
        .unwrap();
    assert_eq!(other.status, 422, "{}", other.text);
}

#[test]
fn bad_input_is_refused_and_nothing_is_half_created() {
    let k = Keeld::start("badinput");
    k.tiny_image("tiny");
    let cases = [
        (json!({"name": "Bad_Name", "image": "tiny"}), 400, "invalid"),
        (json!({"name": "-x", "image": "tiny"}), 400, "invalid"),
        (json!({"name": "ok", "image": "nope"}), 404, "No image nope"),
        (
            json!({"name": "ok", "image": "tiny", "flavor": "99c"}),
            400,
            "No flavor 99c",
        ),
        (
            json!({"name": "ok", "image": "tiny", "vcpus": 0, "memory_mib": 128}),
            400,
            "vcpus=0",
        ),
        (
            json!({"name": "ok", "image": "tiny", "vcpus": -1, "memory_mib": 128}),
            400,
            "Invalid request body",
        ),
        (
            json!({"name": "ok", "image": "tiny", "vcpus": 1, "memory_mib": 1}),
            400,
            "memory_mib=1",
        ),
        (
            json!({"name": "ok", "image": "tiny", "vcpus": 200, "memory_mib": 128}),
            422,
            "bigger than this host",
        ),
        (
            json!({"name": "ok", "image": "tiny", "vcpus": 1, "memory_mib": 16u64 << 20}),
            422,
            "bigger than this host",
        ),
        (
            json!({"name": "ok", "image": "tiny", "disk_gib": 1u64 << 40}),
            400,
            "out of range",
        ),
        (
            json!({"name": "ok", "image": "tiny", "data_disks": [{"size_gib": 0}]}),
            400,
            "out of range",
        ),
        (
            json!({"name": "ok", "image": "tiny", "colour": "red"}),
            400,
            "unknown field",
        ),
        (
            json!({"name": "ok", "image": "tiny", "ssh_authorized_keys": ["hello"]}),
            400,
            "OpenSSH",
        ),
    ];
    for (body, status, needle) in cases {
        let r = send(&k.admin, "POST", "/api/v1/vms", Some(body.clone()));
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(
            r.body["error"].as_str().unwrap_or("").contains(needle),
            "{body}: {}",
            r.text
        );
    }
    let r = k
        .admin
        .send(
            "POST",
            "/api/v1/vms",
            None,
            &[("Content-Type", "application/json")],
        )
        .unwrap();
    assert_eq!(r.status, 400);
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/disks",
        Some(json!({"name": "d", "size_gib": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/images",
        Some(json!({"name": "i", "source": {"path": k.import_dir().join("no-such-file")}})),
    );
    assert_eq!(r.status, 403, "{}", r.text);
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/images",
        Some(json!({"name": "i", "source": {"url": "ftp://x/y"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    // Nothing half-created.
    assert_eq!(
        k.admin.get("/api/v1/vms").unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        k.admin
            .get("/api/v1/disks")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        k.admin
            .get("/api/v1/images")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        std::fs::read_dir(k.dir.join("data/disks")).unwrap().count(),
        0
    );
}

#[test]
fn image_checksum_upload_and_http_import() {
    // The test serves the image itself, on loopback: allowed by the admin.
    let k = Keeld::start_with("images", &["--url-import-allow", "127.0.0.0/8"]);
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let file = k.import_dir().join("src.raw");
    std::fs::write(&file, &data).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };

    // A wrong checksum fails the import and leaves no bytes behind.
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "bad", "source": {"path": file}, "sha256": "0".repeat(64)}),
        )
        .unwrap();
    let op = op_outcome(&k.admin, &r);
    assert_eq!(op["status"], "failed");
    assert!(
        op["error"].as_str().unwrap().contains("Checksum mismatch"),
        "{op}"
    );
    assert_eq!(
        k.admin.get("/api/v1/images/bad").unwrap()["status"],
        "error"
    );
    let image_files = || {
        std::fs::read_dir(k.dir.join("data/images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(image_files().is_empty(), "{:?}", image_files());

    // The right one: ready, the bytes intact.
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "good", "source": {"path": file}, "sha256": sha}),
        )
        .unwrap();
    wait_op(&k.admin, &r);
    let img = k.admin.get("/api/v1/images/good").unwrap();
    assert_eq!(
        (
            img["status"].as_str(),
            img["sha256"].as_str(),
            img["progress"].as_u64()
        ),
        (Some("ready"), Some(sha.as_str()), Some(100))
    );
    let id = img["id"].as_str().unwrap();
    assert_eq!(
        std::fs::read(k.dir.join(format!("data/images/{id}.raw"))).unwrap(),
        data
    );

    // From a local http server.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = data.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                served.len()
            );
            let _ = s.write_all(&served);
        }
    });
    let r = k.admin.post("/api/v1/images", &json!({"name": "web", "source": {"url": format!("http://127.0.0.1:{port}/disk.raw")}, "sha256": sha})).unwrap();
    wait_op(&k.admin, &r);
    assert_eq!(
        k.admin.get("/api/v1/images/web").unwrap()["sha256"],
        sha.as_str()
    );

    // A streamed upload.
    let created = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "up", "source": {"upload": true}}),
        )
        .unwrap();
    let up_id = created["image"]["id"].as_str().unwrap().to_string();
    let mut seen = 0;
    let reply = k
        .admin
        .upload(&format!("/api/v1/images/{up_id}/data"), &file, |sent, _| {
            seen = sent
        })
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(seen, data.len() as u64);
    assert_eq!(reply.body["status"], "ready");
    assert_eq!(reply.body["sha256"], sha.as_str());

    // An upload cut half-way: no usable image, its space given back.
    let created = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "cut", "source": {"upload": true}}),
        )
        .unwrap();
    let cut_id = created["image"]["id"].as_str().unwrap().to_string();
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", k.port)).unwrap();
        write!(s, "PUT /api/v1/images/{cut_id}/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n", k.admin.token().unwrap(), 64 << 20).unwrap();
        s.write_all(&vec![1u8; 8 << 20]).unwrap();
        // Dropped here: the client goes away with 56 MiB unsent.
    }
    let start = Instant::now();
    loop {
        let img = k.admin.get(&format!("/api/v1/images/{cut_id}")).unwrap();
        if img["status"] == "error" {
            assert!(
                img["status_reason"].as_str().unwrap().contains("cut short"),
                "{img}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cut upload still {img}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!k.dir.join(format!("data/images/{cut_id}.partial")).exists());
    assert!(!k.dir.join(format!("data/images/{cut_id}.raw")).exists());
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "x", "image": "cut"})),
    );
    assert_eq!(r.status, 409, "{}", r.text);

    // qcow2 through qemu-img, when it is installed (CI installs it).
    let qcow = k.import_dir().join("src.qcow2");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&file)
        .arg(&qcow)
        .status()
        .expect("qemu-img (package qemu-utils) is needed for this test");
    assert!(converted.success());
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "q", "format": "qcow2", "source": {"path": qcow}}),
        )
        .unwrap();
    wait_op(&k.admin, &r);
    let q = k.admin.get("/api/v1/images/q").unwrap();
    assert_eq!(
        std::fs::read(
            k.dir
                .join(format!("data/images/{}.raw", q["id"].as_str().unwrap()))
        )
        .unwrap(),
        data
    );
    // Declared raw but it is qcow2: refused.
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "q2", "source": {"path": qcow}}),
        )
        .unwrap();
    assert_eq!(op_outcome(&k.admin, &r)["status"], "failed");
}

#[test]
fn keeld_killed_vms_keep_running_and_are_reattached() {
    let k0 = Keeld::start("resilience");
    let mut k = k0;
    k.tiny_image("tiny");
    let mut ids = Vec::new();
    for i in 0..5 {
        let vm = k.create_vm(
            &k.admin,
            json!({"name": format!("vm{i}"), "image": "tiny", "vcpus": 1, "memory_mib": 64}),
        );
        assert_eq!(vm["status"], "running");
        ids.push(vm["id"].as_str().unwrap().to_string());
    }
    let pids = k.vmm_pids();
    assert_eq!(pids.len(), 5);
    k.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.vmm_pids(), pids, "VMs died with keeld");
    let before: Vec<usize> = ids.iter().map(|id| ticks(&k.serial(id))).collect();
    std::thread::sleep(Duration::from_millis(300));
    for (id, b) in ids.iter().zip(&before) {
        assert!(
            ticks(&k.serial(id)) > *b,
            "VM {id} stopped running without keeld"
        );
    }
    let out = k.spawn();
    assert!(!out.contains("created user admin"));
    assert!(out.contains("re-attached"), "{out}");
    for id in &ids {
        assert_eq!(k.vm(id)["status"], "running");
    }
    // Stop them all in one batch, through the new keeld.
    let r = k
        .admin
        .post(
            "/api/v1/vms/batch",
            &json!({"action": "force-off", "vms": ids}),
        )
        .unwrap();
    for res in r["results"].as_array().unwrap() {
        wait_op(&k.admin, res);
    }
    for id in &ids {
        assert_eq!(k.vm(id)["status"], "stopped");
    }
    assert!(k.vmm_pids().is_empty());
}

#[test]
fn vmm_killed_by_hand_is_an_error_with_a_reason_and_the_policy_decides() {
    let k = Keeld::start("vmmdeath");
    k.tiny_image("tiny");
    let never = k.create_vm(&k.admin, json!({"name": "never", "image": "tiny", "vcpus": 1, "memory_mib": 64, "restart_policy": "never"}));
    let pid = k.vmm_pid(never["id"].as_str().unwrap());
    // SAFETY: kills the test's own VMM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let vm = k.wait_status(never["id"].as_str().unwrap(), "error", BOOT);
    assert!(
        vm["status_reason"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{vm}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        k.vm(never["id"].as_str().unwrap())["status"],
        "error",
        "restarted despite `never`"
    );

    let again = k.create_vm(
        &k.admin,
        json!({"name": "again", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
    );
    let id = again["id"].as_str().unwrap();
    let pid = k.vmm_pid(id);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    k.wait_status(id, "error", BOOT);
    // on-failure: back within the backoff.
    let vm = k.wait_status(id, "running", BOOT);
    assert_ne!(k.vmm_pid(id), pid);
    assert_eq!(vm["restarts"], 1);

    // A guest that powers itself off is stopped, not restarted (on-failure).
    k.image_with("oneshot", "keel.mode=poweroff");
    let vm = k
        .admin
        .post(
            "/api/v1/vms",
            &json!({"name": "oneshot", "image": "oneshot", "vcpus": 1, "memory_mib": 64}),
        )
        .unwrap();
    let vid = vm["vm"]["id"].as_str().unwrap();
    let _ = op_outcome(&k.admin, &vm);
    let vm = k.wait_status(vid, "stopped", BOOT);
    assert_eq!(vm["desired"], "stopped");
    assert!(
        vm["status_reason"]
            .as_str()
            .unwrap()
            .contains("powered off"),
        "{vm}"
    );
}

#[test]
fn vmm_that_dies_at_start_is_an_error_with_its_last_words() {
    let dir = std::env::temp_dir().join(format!("keeld-test-dying-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmm = dir.join("dying-vmm");
    std::fs::write(
        &vmm,
        "#!/bin/sh\necho 'keel-vmm: --memory: not enough host memory' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let k = Keeld::start_with_vmm("badvmm", &[], vmm);
    k.tiny_image("tiny");
    let started = Instant::now();
    let reply = k
        .admin
        .post(
            "/api/v1/vms",
            &json!({"name": "doomed", "image": "tiny", "vcpus": 1, "memory_mib": 64, "restart_policy": "never"}),
        )
        .unwrap();
    let id = reply["vm"]["id"].as_str().unwrap().to_string();
    let _ = op_outcome(&k.admin, &reply);
    let vm = k.wait_status(&id, "error", BOOT);
    // Known at once from the closed socket, not after the start timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let reason = vm["status_reason"].as_str().unwrap();
    assert!(reason.contains("keel-vmm exited at start"), "{vm}");
    assert!(reason.contains("not enough host memory"), "{vm}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serial_log_is_rotated_and_read_across_the_rotation() {
    let k = Keeld::start_with("serialrot", &["--serial-log-max-mib", "1"]);
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "chatty", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
    );
    let id = vm["id"].as_str().unwrap();
    let start = Instant::now();
    while ticks(&k.serial(id)) < 1 {
        assert!(start.elapsed() < BOOT, "no TICK: {}", k.serial(id));
        std::thread::sleep(Duration::from_millis(50));
    }
    // A console session open across the rotation, as a browser opens it:
    // with a single-use ticket.
    let ticket = k
        .admin
        .post(&format!("/api/v1/vms/{id}/console/ticket"), &json!({}))
        .unwrap();
    let url = format!(
        "ws://127.0.0.1:{}{}",
        k.port,
        ticket["path"].as_str().unwrap()
    );
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    // A burst of output past the 1 MiB limit, as a chatty guest would write.
    let dir = k.dir.join(format!("data/vms/{id}"));
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("serial.log"))
        .unwrap();
    log.write_all(b"MARK-OLD\n").unwrap();
    log.write_all(&b"burst of serial output\n".repeat(70_000))
        .unwrap();
    log.write_all(b"MARK-END\n").unwrap();
    drop(log);
    // Rotated: serial.log.1 holds the head, serial.log was cut down.
    let start = Instant::now();
    while !dir.join("serial.log.1").exists()
        || std::fs::metadata(dir.join("serial.log")).unwrap().len() >= 1 << 20
    {
        assert!(start.elapsed() < BOOT, "serial.log was not rotated");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every byte is in exactly one of the two files, in order.
    let mut both = std::fs::read_to_string(dir.join("serial.log.1")).unwrap();
    both.push_str(&std::fs::read_to_string(dir.join("serial.log")).unwrap());
    assert_eq!(both.matches("MARK-OLD\n").count(), 1);
    assert_eq!(both.matches("MARK-END\n").count(), 1);
    assert_eq!(both.matches("burst of serial output\n").count(), 70_000);
    let (old_at, end_at) = (
        both.find("MARK-OLD").unwrap(),
        both.find("MARK-END").unwrap(),
    );
    assert!(old_at < end_at);
    // keel-vmm goes on writing after what was kept.
    let start = Instant::now();
    while ticks(&k.serial(id)) < 1 {
        assert!(start.elapsed() < BOOT, "no TICK after the rotation");
        std::thread::sleep(Duration::from_millis(50));
    }
    let current = std::fs::read(dir.join("serial.log")).unwrap();
    assert!(current.len() < 1 << 20, "{}", current.len());
    assert_ne!(current[0], 0, "a hole where the old output was");
    // The console saw the burst's end (read from serial.log.1 if the
    // rotation came before the session caught up) and goes on after it.
    let mut seen = Vec::new();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < BOOT, "the console lost the burst's end");
        if let tungstenite::Message::Binary(b) = ws.read().unwrap() {
            seen.extend_from_slice(&b);
        }
        let text = String::from_utf8_lossy(&seen);
        if text
            .find("MARK-END\n")
            .is_some_and(|at| ticks(&text[at..]) > 0)
        {
            break;
        }
    }
    let _ = ws.close(None);
    // The API's tail spans both files.
    // (The guest ticks fast: leave room for what it writes meanwhile.)
    let bytes = current.len() + (512 << 10);
    let tail = send(
        &k.admin,
        "GET",
        &format!("/api/v1/vms/{id}/serial?bytes={bytes}"),
        None,
    );
    assert!(
        tail.text.contains("MARK-END\n") && tail.text.contains("TICK"),
        "{}",
        &tail.text[tail.text.len().saturating_sub(300)..]
    );
}

#[test]
fn ten_vms_created_in_parallel_all_run() {
    let k = Keeld::start("parallel");
    k.tiny_image("tiny");
    let threads: Vec<_> = (0..10)
        .map(|i| {
            let c = k.admin.clone();
            std::thread::spawn(move || {
                c.post("/api/v1/vms", &json!({"name": format!("p{i}"), "image": "tiny", "vcpus": 1, "memory_mib": 64})).unwrap()
            })
        })
        .collect();
    for t in threads {
        let reply = t.join().unwrap();
        wait_op(&k.admin, &reply);
    }
    let list = k.admin.get("/api/v1/vms").unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    assert!(items.iter().all(|vm| vm["status"] == "running"), "{list}");
    assert_eq!(k.vmm_pids().len(), 10);
    let node = k.admin.get("/api/v1/node").unwrap();
    assert_eq!(node["vms_by_status"]["running"], 10);
    assert_eq!(node["vcpus_allocated"], 10);
    let metrics = send(&k.admin, "GET", "/metrics", None).text;
    assert!(
        metrics.contains("keel_vms{status=\"running\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("keel_vcpus_allocated 10"));
}

#[test]
fn disks_attach_grow_clone_detach() {
    let k = Keeld::start("disks");
    k.tiny_image("tiny");
    let vm = k.create_vm(&k.admin, json!({"name": "host", "image": "tiny", "vcpus": 1, "memory_mib": 64, "data_disks": [{"size_gib": 2}]}));
    let vm_id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["disks"].as_array().unwrap().len(), 1);
    let r = k
        .admin
        .post("/api/v1/disks", &json!({"name": "extra", "size_gib": 1}))
        .unwrap();
    let disk = r["disk"]["id"].as_str().unwrap().to_string();
    let path = k.dir.join(format!("data/disks/{disk}.raw"));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
    // Hot-plug: the running VMM has it on its PCI bus.
    wait_op(
        &k.admin,
        &k.admin
            .post(
                &format!("/api/v1/disks/{disk}/attach"),
                &json!({"vm": "host"}),
            )
            .unwrap(),
    );
    let mut vmm =
        keel_api::client::VmmClient::connect(&k.dir.join(format!("data/vms/{vm_id}/api.sock")))
            .unwrap();
    let info = vmm.info().unwrap();
    assert!(
        info.config
            .disks
            .iter()
            .any(|d| d.id.as_deref() == Some(disk.as_str())),
        "{:?}",
        info.config.disks
    );
    assert_eq!(
        k.admin.get(&format!("/api/v1/disks/{disk}")).unwrap()["status"],
        "in_use"
    );
    // Grown live through the VMM.
    wait_op(
        &k.admin,
        &k.admin
            .post(
                &format!("/api/v1/disks/{disk}/resize"),
                &json!({"size_gib": 2}),
            )
            .unwrap(),
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 30);
    assert_eq!(
        send(
            &k.admin,
            "POST",
            &format!("/api/v1/disks/{disk}/resize"),
            Some(json!({"size_gib": 1}))
        )
        .status,
        400
    );
    // Busy disks cannot be deleted or cloned.
    assert_eq!(
        send(&k.admin, "DELETE", &format!("/api/v1/disks/{disk}"), None).status,
        409
    );
    assert_eq!(
        send(
            &k.admin,
            "POST",
            &format!("/api/v1/disks/{disk}/clone"),
            Some(json!({"name": "c"}))
        )
        .status,
        409
    );
    // Stop, detach, clone, delete.
    wait_op(
        &k.admin,
        &k.admin
            .post("/api/v1/vms/host/force-off", &json!({}))
            .unwrap(),
    );
    wait_op(
        &k.admin,
        &k.admin
            .post(&format!("/api/v1/disks/{disk}/detach"), &json!({}))
            .unwrap(),
    );
    assert_eq!(
        k.admin.get(&format!("/api/v1/disks/{disk}")).unwrap()["status"],
        "available"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(b"marker")
        .unwrap();
    let r = k
        .admin
        .post(
            &format!("/api/v1/disks/{disk}/clone"),
            &json!({"name": "copy"}),
        )
        .unwrap();
    wait_op(&k.admin, &r);
    let copy = r["disk"]["id"].as_str().unwrap();
    let copied = std::fs::read(k.dir.join(format!("data/disks/{copy}.raw"))).unwrap();
    assert_eq!(&copied[..6], b"marker");
    assert_eq!(copied.len(), 2 << 30);
    assert_eq!(
        send(&k.admin, "DELETE", &format!("/api/v1/disks/{disk}"), None).status,
        204
    );
    assert!(!path.exists());
    // The system disk goes only with its VM.
    let sys = k.vm(&vm_id)["system_disk"].as_str().unwrap().to_string();
    assert_eq!(
        send(&k.admin, "DELETE", &format!("/api/v1/disks/{sys}"), None).status,
        409
    );
    // An image from the stopped VM's system disk.
    let r = k
        .admin
        .post("/api/v1/vms/host/image", &json!({"name": "snap"}))
        .unwrap();
    wait_op(&k.admin, &r);
    let snap = k.admin.get("/api/v1/images/snap").unwrap();
    assert_eq!(snap["status"], "ready");
    let from_snap = k.create_vm(
        &k.admin,
        json!({"name": "clone", "image": "snap", "vcpus": 1, "memory_mib": 64}),
    );
    assert_eq!(from_snap["status"], "running");
}

#[test]
fn serial_console_over_websocket() {
    let k = Keeld::start("console");
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "c", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
    );
    let id = vm["id"].as_str().unwrap();
    let mut ws = common::open_console(&k, &k.admin, id);
    let mut seen = String::new();
    let start = Instant::now();
    while ticks(&seen) < 5 {
        assert!(
            start.elapsed() < BOOT,
            "no TICKs over the console: {seen:?}"
        );
        if let tungstenite::Message::Binary(b) = ws.read().unwrap() {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    ws.send(tungstenite::Message::Text("keys\n".into()))
        .unwrap();
    let _ = ws.close(None);
    let tail = send(
        &k.admin,
        "GET",
        &format!("/api/v1/vms/{id}/serial?bytes=200"),
        None,
    );
    assert!(
        tail.text.contains("TICK") && tail.text.len() <= 200,
        "{}",
        tail.text
    );
    // Without a token: refused.
    let url = format!("ws://127.0.0.1:{}/api/v1/vms/{id}/console", k.port);
    assert!(tungstenite::connect(url).is_err());
}

#[test]
fn every_documented_route_is_served() {
    let k = Keeld::start("routes");
    let doc = send(&k.admin, "GET", "/api/v1/openapi.json", None).body;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 30);
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "nothing-here")
                .replace("{user}", "nobody");
            let r = k
                .admin
                .send(&method.to_uppercase(), &concrete, None, &[])
                .unwrap();
            assert_ne!(r.status, 405, "{method} {path}");
            assert!(
                !r.text.contains("No such path"),
                "{method} {path}: {}",
                r.text
            );
        }
    }
    let r = send(&k.admin, "GET", "/api/v1/nope", None);
    assert_eq!(r.status, 404);
}
