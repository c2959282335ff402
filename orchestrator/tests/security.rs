//! keeld as a hostile tenant and a hostile local user would probe it: one
//! test per finding of the security review (issue 13) that this suite keeps
//! closed. Each comment says what keeld did before the fix. (Findings 6 and
//! 8 are in `security_server.rs` and `security_url_import.rs`, 9 to 12 in
//! `security_accounts.rs`; the 144-call role table is `roles.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Keeld, op_outcome, send, wait_op};
use serde_json::{Value, json};

/// One HTTP request from a chosen local source address (the whole of
/// 127/8 is this host), answered as (status, whole answer text).
fn http_from(port: u16, source: &str, request: &[u8]) -> (u16, String) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn login_request(user: &str, password: &str) -> Vec<u8> {
    let body = json!({"username": user, "password": password}).to_string();
    format!(
        "POST /api/v1/login HTTP/1.1\r\nHost: k\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn images(k: &Keeld) -> usize {
    k.admin
        .get("/api/v1/images")
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

/// Finding 1. Before: any operator imported any host file as root
/// (`/etc/shadow` by `source.path` or `boot.kernel_path`), and the 400s told
/// whether a path existed.
#[test]
fn host_paths_are_for_system_admins_inside_import_dirs() {
    let k = Keeld::start("sec-paths");
    let operator = k.user("op", "default", "operator");
    let inside = k.import_dir().join("disk.raw");
    std::fs::write(&inside, vec![1u8; 4096]).unwrap();
    let kernel = k.guest_kernel();

    for body in [
        json!({"name": "a", "source": {"path": "/etc/shadow"}}),
        json!({"name": "a", "source": {"path": inside}}),
        json!({"name": "a", "source": {"upload": true}, "boot": {"kernel_path": "/etc/shadow"}}),
        json!({"name": "a", "source": {"upload": true}, "boot": {"kernel_path": kernel}}),
    ] {
        let r = send(&operator, "POST", "/api/v1/images", Some(body.clone()));
        assert_eq!(r.status, 403, "operator {body}: {}", r.text);
        assert!(r.text.contains("not allowed"), "{}", r.text);
    }

    // The system admin: only plain paths inside an import dir, no links.
    std::os::unix::fs::symlink("/etc/shadow", k.import_dir().join("shadow")).unwrap();
    std::os::unix::fs::symlink("/etc", k.import_dir().join("etc")).unwrap();
    let traversal = format!("{}/../../../../etc/shadow", k.import_dir().display());
    let data_file = k.dir.join("data/keel.db");
    for path in [
        "/etc/shadow".to_string(),
        traversal,
        k.import_dir().join("shadow").display().to_string(),
        k.import_dir().join("etc/shadow").display().to_string(),
        data_file.display().to_string(),
        "/proc/self/environ".into(),
        "/dev/zero".into(),
    ] {
        for body in [
            json!({"name": "a", "source": {"path": path}}),
            json!({"name": "a", "source": {"upload": true}, "boot": {"kernel_path": path}}),
        ] {
            let r = send(&k.admin, "POST", "/api/v1/images", Some(body));
            assert_eq!(r.status, 403, "admin {path}: {}", r.text);
            assert!(r.text.contains("not allowed"), "{}", r.text);
        }
    }
    // Outside an import dir, a file that exists and one that does not get
    // the same answer.
    let exists = send(
        &k.admin,
        "POST",
        "/api/v1/images",
        Some(json!({"name": "a", "source": {"path": "/etc/hostname"}})),
    );
    let missing = send(
        &k.admin,
        "POST",
        "/api/v1/images",
        Some(json!({"name": "a", "source": {"path": "/etc/no-such-file"}})),
    );
    assert_eq!(exists.status, missing.status);
    assert_eq!(
        exists.text.replace("hostname", "X"),
        missing.text.replace("no-such-file", "X")
    );
    assert_eq!(images(&k), 0, "a refused import left an image record");

    // What is allowed still works.
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "ok", "source": {"path": inside}, "boot": {"kernel_path": kernel}}),
        )
        .unwrap();
    wait_op(&k.admin, &r);
    let img = k.admin.get("/api/v1/images/ok").unwrap();
    assert_eq!(img["status"], "ready", "{img}");
}

/// Finding 2. Before: a user with no role in `default` imported
/// `/proc/<keel-vmm pid>/fd/N` and got that project's VM disk and its
/// cloud-init seed with the root password. Even with `--import-dir /`,
/// every such path is refused, to another project's admin and to the
/// system admin alike.
#[test]
fn another_projects_vmm_fds_cannot_be_imported() {
    let k = Keeld::start_with("sec-procfd", &["--import-dir", "/"]);
    k.admin
        .post("/api/v1/projects", &json!({"name": "other"}))
        .unwrap();
    let stranger = k.user("eve", "other", "admin");
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "v", "image": "tiny", "vcpus": 1, "memory_mib": 64,
               "root_password": "Root-secret-1"}),
    );
    k.wait_status(
        vm["id"].as_str().unwrap(),
        "running",
        Duration::from_secs(60),
    );
    let pids = k.vmm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let pid = pids[0];
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    assert!(fds.len() > 3, "{fds:?}");
    let mut paths = fds.clone();
    paths.push(format!("/proc/{pid}/root/etc/shadow"));
    paths.push(format!("/proc/{pid}/environ"));
    for (who, client) in [("stranger", &stranger), ("system admin", &k.admin)] {
        for path in &paths {
            for project in ["other", "default"] {
                let r = send(
                    client,
                    "POST",
                    "/api/v1/images",
                    Some(json!({"name": "grab", "project": project, "source": {"path": path}})),
                );
                assert!(
                    r.status == 403 || (who == "stranger" && project == "default"),
                    "{who} importing {path} into {project}: {} {}",
                    r.status,
                    r.text
                );
                assert!(r.status >= 400, "{who} {path}: {}", r.text);
            }
        }
    }
    println!(
        "refused {} paths of keel-vmm {pid} for two callers",
        paths.len()
    );
    assert_eq!(images(&k), 1, "only the tiny image exists");
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Finding 3. Before: each login ran a 19 MiB Argon2 with no bound and the
/// memory stayed: 128 concurrent wrong logins left keeld at 10.5 GB. Now
/// at most one check per CPU runs, others wait briefly or get 429, and the
/// buffers are reused: keeld's peak RSS stays under 300 MiB, and other
/// requests are answered throughout.
#[test]
fn a_login_flood_keeps_memory_bounded_and_others_served() {
    let k = Keeld::start("sec-flood");
    let pid = k.child.as_ref().unwrap().id();
    let before = rss_kib(pid, "VmRSS:");
    let port = k.port;
    let mut statuses = std::collections::BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for round in 0..2 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(129));
        let mut floods = Vec::new();
        for n in 0..128u32 {
            let barrier = barrier.clone();
            // Each from its own address: the per-source throttle does not
            // cut the flood short, so the password pool is what bounds it.
            let source = format!("127.0.{}.{}", 1 + round, 2 + n);
            floods.push(std::thread::spawn(move || {
                barrier.wait();
                http_from(
                    port,
                    &source,
                    &login_request(&format!("nobody{n}"), "wrong-1"),
                )
                .0
            }));
        }
        barrier.wait();
        let start = Instant::now();
        while floods.iter().any(|t| !t.is_finished()) {
            let t = Instant::now();
            let r = send(&k.admin, "GET", "/api/v1/whoami", None);
            assert_eq!(r.status, 200, "during the flood: {}", r.text);
            slowest = slowest.max(t.elapsed());
            assert!(start.elapsed() < Duration::from_secs(120), "flood stuck");
            std::thread::sleep(Duration::from_millis(50));
        }
        for t in floods {
            *statuses.entry(t.join().unwrap()).or_insert(0) += 1;
        }
    }
    let peak = rss_kib(pid, "VmHWM:");
    let after = rss_kib(pid, "VmRSS:");
    println!(
        "login flood 2 x 128: answers {statuses:?}; keeld RSS {} MiB before, peak {} MiB, {} MiB \
         after; slowest other request {slowest:?}",
        before / 1024,
        peak / 1024,
        after / 1024
    );
    assert!(peak < 300 * 1024, "peak RSS {} MiB", peak / 1024);
    assert!(
        statuses.keys().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.get(&401).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(slowest < Duration::from_secs(3), "{slowest:?}");
}

/// Finding 4. Before: 100 wrong passwords in a row at 34/s, then the right
/// one was accepted, and failed logins were audited without the user name.
#[test]
fn guessing_a_password_locks_the_account_and_is_audited() {
    let k = Keeld::start("sec-brute");
    let _bob = k.user("bob", "default", "viewer");
    let mut answers = std::collections::BTreeMap::new();
    let mut retry_after = None;
    let start = Instant::now();
    // A patient guesser: it waits out each short delay it is given.
    for _ in 0..100 {
        let (status, text) = http_from(k.port, "127.0.0.5", &login_request("bob", "guess-123"));
        *answers.entry(status).or_insert(0) += 1;
        if status == 429 {
            retry_after = text
                .lines()
                .find_map(|l| l.strip_prefix("retry-after: "))
                .map(|s| s.trim().parse::<u64>().unwrap());
            if let Some(wait @ 1..=5) = retry_after {
                std::thread::sleep(Duration::from_secs(wait));
            }
        }
    }
    println!(
        "100 wrong passwords in {:?}: {answers:?}, Retry-After {retry_after:?}",
        start.elapsed()
    );
    assert!(answers.get(&401).copied().unwrap_or(0) <= 5, "{answers:?}");
    assert!(answers.get(&429).copied().unwrap_or(0) >= 95, "{answers:?}");
    // Locked: 15 minutes by default.
    assert!(retry_after.is_some_and(|s| s > 10 * 60), "{retry_after:?}");
    // The right password is refused too, from anywhere.
    let (status, _) = http_from(
        k.port,
        "127.0.0.6",
        &login_request("bob", common::USER_PASSWORD),
    );
    assert_eq!(status, 429);
    // Other accounts are not locked.
    let mut c = k.client();
    assert!(c.login("admin", &admin_password(&k)).is_ok());
    // A source guessing at many accounts is slowed as well.
    let mut last = 0;
    for n in 0..25 {
        last = http_from(k.port, "127.0.0.7", &login_request(&format!("u{n}"), "x")).0;
    }
    assert_eq!(last, 429, "a source guessing 25 accounts");
    // An admin's reset lifts the lockout.
    let r = send(
        &k.admin,
        "PUT",
        "/api/v1/users/bob/password",
        Some(json!({"password": "Fresh-pass-1", "must_change": false})),
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let (status, text) = http_from(k.port, "127.0.0.8", &login_request("bob", "Fresh-pass-1"));
    assert_eq!(status, 200, "{text}");
    // Audited with the attempted name and the source.
    let audit = k.admin.get("/api/v1/audit?limit=10000").unwrap();
    let failed: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/api/v1/login" && e["status"] != 200)
        .collect();
    assert!(
        failed
            .iter()
            .any(|e| e["user"] == "bob" && e["source"] == "127.0.0.5" && e["status"] == 401),
        "{failed:?}"
    );
    assert!(
        failed
            .iter()
            .any(|e| e["user"] == "bob" && e["status"] == 429)
    );
}

fn admin_password(k: &Keeld) -> String {
    std::fs::read_to_string(k.dir.join("data/initial-admin-password"))
        .unwrap()
        .trim()
        .to_string()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Finding 5. Before: data dir 0755, `keel.db*` 0644, imported images 0644,
/// kernels 0755, `events.jsonl` 0644; VM root passwords in the VM record;
/// a never-expiring token secret in a stored idempotent reply (in the WAL).
#[test]
fn every_file_keeld_makes_is_its_own_and_no_secret_is_stored() {
    let k = Keeld::start("sec-modes");
    // Sources that anyone may read: keeld's copies must not be.
    let kernel = k.guest_kernel();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o755)).unwrap();
    let disk = k.import_dir().join("tiny.raw");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "tiny", "source": {"path": disk},
                    "boot": {"kernel_path": kernel, "cmdline": "keel.mode=tick"}}),
        )
        .unwrap();
    wait_op(&k.admin, &r);
    // A full lifecycle: VM with a root password, a data disk attached and
    // detached, stop, an image from it, an upload, a token.
    let root_password = "Root-Secret-4711";
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "v", "image": "tiny", "vcpus": 1, "memory_mib": 64,
               "root_password": root_password}),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["guest_init"]["root_password_set"], true, "{vm}");
    assert!(vm["guest_init"].get("root_password").is_none(), "{vm}");
    k.wait_status(&id, "running", Duration::from_secs(60));
    let r = k
        .admin
        .post("/api/v1/disks", &json!({"name": "d", "size_gib": 1}))
        .unwrap();
    wait_op(&k.admin, &r);
    let r = k
        .admin
        .post("/api/v1/disks/d/attach", &json!({"vm": id}))
        .unwrap();
    wait_op(&k.admin, &r);
    let r = k
        .admin
        .post(&format!("/api/v1/vms/{id}/stop"), &json!({}))
        .unwrap();
    op_outcome(&k.admin, &r);
    k.wait_status(&id, "stopped", Duration::from_secs(60));
    let r = k
        .admin
        .post(&format!("/api/v1/vms/{id}/image"), &json!({"name": "snap"}))
        .unwrap();
    wait_op(&k.admin, &r);
    let r = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "up", "source": {"upload": true}}),
        )
        .unwrap();
    let up = r["image"]["id"].as_str().unwrap().to_string();
    let file = k.dir.join("upload.raw");
    std::fs::write(&file, vec![3u8; 64 << 10]).unwrap();
    let reply = k
        .admin
        .upload(&format!("/api/v1/images/{up}/data"), &file, |_, _| {})
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let r = k
        .admin
        .send(
            "POST",
            "/api/v1/tokens",
            Some(&json!({"name": "script"})),
            &[("Idempotency-Key", "token-once")],
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    let token = r.body["token"].as_str().unwrap().to_string();
    // Its replay does not show the secret again.
    let again = k
        .admin
        .send(
            "POST",
            "/api/v1/tokens",
            Some(&json!({"name": "script"})),
            &[("Idempotency-Key", "token-once")],
        )
        .unwrap();
    assert_eq!(again.status, 409, "{}", again.text);
    assert!(!again.text.contains(&token));

    // Walk everything under the data dir.
    let mut wrong = Vec::new();
    let mut seen = 0;
    let mut stack = vec![k.dir.join("data")];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        seen += 1;
        if mode != want {
            wrong.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    println!("{seen} paths under the data dir checked");
    assert!(seen > 15, "{seen}");
    assert!(wrong.is_empty(), "wrong modes: {wrong:#?}");

    // The password and the token are nowhere in the store's files (the
    // 0600 seed holds the password for cloud-init).
    for name in ["keel.db", "keel.db-wal", "keel.db-shm"] {
        let bytes = std::fs::read(k.dir.join("data").join(name)).unwrap_or_default();
        assert!(
            !contains(&bytes, root_password),
            "{name} holds the root password"
        );
        assert!(!contains(&bytes, &token), "{name} holds a token secret");
    }
    let seed = std::fs::read(k.dir.join(format!("data/vms/{id}/seed.iso"))).unwrap();
    assert!(contains(&seed, root_password));
    assert!(!k.log().contains(root_password));
}

/// Finding 7. Before: an `Idempotency-Key` reused with a different body
/// replayed the first answer (a 2 GiB disk request came back as the
/// earlier 1 GiB one); a viewer's unique keys on a 403-ing POST were all
/// stored (24k replies, +19 MB in 10 s).
#[test]
fn idempotency_keys_are_bound_to_the_request_and_kept_only_for_successes() {
    let k = Keeld::start("sec-idem");
    let viewer = k.user("view", "default", "viewer");
    let key = [("Idempotency-Key", "disk-1")];
    let first = k
        .admin
        .send(
            "POST",
            "/api/v1/disks",
            Some(&json!({"name": "a", "size_gib": 1})),
            &key,
        )
        .unwrap();
    assert_eq!(first.status, 202, "{}", first.text);
    let same = k
        .admin
        .send(
            "POST",
            "/api/v1/disks",
            Some(&json!({"name": "a", "size_gib": 1})),
            &key,
        )
        .unwrap();
    assert_eq!(same.status, 202);
    assert_eq!(same.body["disk"]["id"], first.body["disk"]["id"]);
    let other = k
        .admin
        .send(
            "POST",
            "/api/v1/disks",
            Some(&json!({"name": "a", "size_gib": 2})),
            &key,
        )
        .unwrap();
    assert_eq!(other.status, 422, "{}", other.text);
    assert!(other.text.contains("another request"), "{}", other.text);
    // The same key of another user is another key.
    let theirs = viewer
        .send(
            "POST",
            "/api/v1/disks",
            Some(&json!({"name": "b", "size_gib": 1})),
            &key,
        )
        .unwrap();
    assert_eq!(theirs.status, 403, "{}", theirs.text);

    // Refused calls with fresh keys store nothing.
    let db = k.dir.join("data/keel.db");
    let stored = || -> i64 {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type='table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let table = tables
            .iter()
            .find(|t| t.as_str() == "records" || t.as_str() == "resources")
            .unwrap_or_else(|| panic!("tables: {tables:?}"));
        conn.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE kind = 'idempotency'"),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let before = stored();
    for n in 0..300 {
        let key = format!("k{n}");
        let r = viewer
            .send(
                "POST",
                "/api/v1/disks",
                Some(&json!({"name": format!("x{n}"), "size_gib": 1})),
                &[("Idempotency-Key", &key)],
            )
            .unwrap();
        assert_eq!(r.status, 403);
    }
    assert_eq!(stored(), before, "refused requests' answers were stored");
    assert_eq!(before, 1, "one success stored");
}

/// Finding 13. Before: no per-project limits; at 94 % full a disk and a VM
/// were still created; `size_gib: 65536` gave a 500 and left an orphan
/// file; a disk-full upload got a reset connection.
#[test]
fn quotas_and_a_full_file_system_are_answered_and_leave_nothing_behind() {
    let k = Keeld::start("sec-quota");
    k.tiny_image("tiny");
    let disks_dir = k.dir.join("data/disks");
    let count = |d: &Path| std::fs::read_dir(d).unwrap().count();
    // Too big for the file system: 507, no file, no record.
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/disks",
        Some(json!({"name": "huge", "size_gib": 65536})),
    );
    assert_eq!(r.status, 507, "{}", r.text);
    assert!(r.text.contains("Not enough space"), "{}", r.text);
    assert_eq!(count(&disks_dir), 0);
    assert!(
        k.admin
            .get("/api/v1/disks")
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Quotas: 1 VM, 2 vCPUs, 3 GiB of disks.
    let r = send(
        &k.admin,
        "PUT",
        "/api/v1/projects/default/quota",
        Some(json!({"vms": 1, "vcpus": 2, "disk_gib": 3})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let vm = json!({"name": "a", "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false});
    k.create_vm(&k.admin, vm);
    let disks_before = count(&disks_dir);
    for (body, what) in [
        (
            json!({"name": "b", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
            "VM quota",
        ),
        (
            json!({"name": "b", "image": "tiny", "vcpus": 1, "memory_mib": 64,
                "data_disks": [{"size_gib": 5}]}),
            "quota",
        ),
    ] {
        let r = send(&k.admin, "POST", "/api/v1/vms", Some(body));
        assert_eq!(r.status, 422, "{}", r.text);
        assert!(r.text.contains(what), "{}", r.text);
    }
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/disks",
        Some(json!({"name": "big", "size_gib": 3})),
    );
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("disk (GiB) quota"), "{}", r.text);
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/vms/a/resize",
        Some(json!({"vcpus": 4, "memory_mib": 64})),
    );
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(
        count(&disks_dir),
        disks_before,
        "a refused create left files"
    );
    assert_eq!(
        k.admin.get("/api/v1/vms").unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let q = k.admin.get("/api/v1/projects/default/quota").unwrap();
    assert_eq!(q["usage"]["vms"], 1, "{q}");
    assert_eq!(q["quota"]["vcpus"], 2, "{q}");

    // A full file system under the images: an upload is answered 507, not
    // reset, with a declared length and without one, and leaves no bytes.
    let images_dir = k.dir.join("data/images");
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=160m",
            "keel-test",
            images_dir.to_str().unwrap(),
        ])
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(images_dir.clone());
    let new_upload = |name: &str| -> String {
        let r = k
            .admin
            .post(
                "/api/v1/images",
                &json!({"name": name, "source": {"upload": true}}),
            )
            .unwrap();
        r["image"]["id"].as_str().unwrap().to_string()
    };
    let token = k.admin.token().unwrap().to_string();
    // Declared 1 GiB: refused before a byte is read.
    let id = new_upload("declared");
    let (status, text) = http_from(
        k.port,
        "127.0.0.1",
        format!(
            "PUT /api/v1/images/{id}/data HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
            1u64 << 30
        )
        .as_bytes(),
    );
    assert_eq!(status, 507, "{text}");
    // Undeclared (chunked): it fills up, then the answer comes.
    let id = new_upload("chunked");
    let socket = std::net::TcpStream::connect(("127.0.0.1", k.port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = socket.try_clone().unwrap();
    write!(
        writer,
        "PUT /api/v1/images/{id}/data HTTP/1.1\r\nHost: k\r\nConnection: close\r\nAuthorization: \
         Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    let mut sent = 0;
    // 300 MiB into 160 MiB: the write fails, the rest is drained.
    for _ in 0..300 {
        if write!(writer, "{:x}\r\n", chunk.len()).is_err()
            || writer.write_all(&chunk).is_err()
            || writer.write_all(b"\r\n").is_err()
        {
            break;
        }
        sent += 1;
    }
    let _ = writer.write_all(b"0\r\n\r\n");
    let mut text = String::new();
    let mut reader = socket;
    let read = reader.read_to_string(&mut text);
    println!("chunked upload: {sent} MiB sent; read {read:?}");
    assert!(text.starts_with("HTTP/1.1 507"), "{read:?}: {text}");
    assert!(text.contains("Not enough space"), "{text}");
    let img = k.admin.get(&format!("/api/v1/images/{id}")).unwrap();
    assert_eq!(img["status"], "error", "{img}");
    let left: Vec<_> = std::fs::read_dir(&images_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| {
            !n.to_string_lossy().ends_with(".raw") && !n.to_string_lossy().ends_with(".kernel")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Finding 5, for installations made before the fix: a root password in a
/// VM record and a token secret in a kept idempotent reply are removed
/// from every file of the store when keeld starts.
#[test]
fn secrets_an_older_keeld_stored_are_scrubbed_at_start() {
    let mut k = Keeld::start("sec-scrub");
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "old", "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false}),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    k.kill9();
    let (password, secret) = ("Legacy-Root-Secret-77", "0123456789abcdef".repeat(4));
    let db = k.dir.join("data/keel.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let body: String = conn
            .query_row(
                "SELECT body FROM records WHERE kind = 'vm' AND id = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        let mut body: Value = serde_json::from_str(&body).unwrap();
        body["guest_init"]["root_password"] = json!(password);
        conn.execute(
            "UPDATE records SET body = ?1 WHERE kind = 'vm' AND id = ?2",
            [body.to_string(), id.clone()],
        )
        .unwrap();
        // What an older keeld kept for `POST /tokens` with a key.
        let reply = json!({"id": "r1", "method": "POST", "path": "/api/v1/tokens", "status": 201,
                           "body": json!({"token": secret, "id": "t"}).to_string(),
                           "created_at": 4102444800u64});
        conn.execute(
            "INSERT INTO records (kind, id, version, body) VALUES ('idempotency', 'r1', 1, ?1)",
            [reply.to_string()],
        )
        .unwrap();
    }
    let out = k.spawn();
    assert!(
        out.contains("Removed 1 root passwords and 1 token secrets"),
        "{out}"
    );
    let shown = k.vm(&id);
    assert_eq!(shown["guest_init"]["root_password_set"], true, "{shown}");
    for name in ["keel.db", "keel.db-wal", "keel.db-shm"] {
        let bytes = std::fs::read(k.dir.join("data").join(name)).unwrap_or_default();
        assert!(
            !contains(&bytes, password),
            "{name} still holds the root password"
        );
        assert!(
            !contains(&bytes, &secret),
            "{name} still holds the token secret"
        );
    }
}
