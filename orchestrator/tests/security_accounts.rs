//! Issue 13, findings 9 to 12: accounts, passwords, image sharing and
//! where tokens may travel. Each test says what keeld did before the fix.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Keeld, keel_cli, send, ticks};
use keel_api::keeld_client::KeeldClient;
use serde_json::{Value, json};

fn login(k: &Keeld, name: &str, password: &str) -> KeeldClient {
    let mut c = k.client();
    c.login(name, password)
        .unwrap_or_else(|e| panic!("{name} logs in: {e}"));
    c
}

fn login_status(k: &Keeld, name: &str, password: &str) -> (u16, String) {
    let r = send(
        &k.client(),
        "POST",
        "/api/v1/login",
        Some(json!({"username": name, "password": password})),
    );
    (r.status, r.body["error"].as_str().unwrap_or("").to_string())
}

fn whoami(c: &KeeldClient) -> u16 {
    send(c, "GET", "/api/v1/whoami", None).status
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn concurrent_creates_of_one_user_name_make_one_user() {
    // Before: the name was checked, then the password hashed, then the user
    // stored; twenty requests at once all passed the check, and twenty users
    // named `dup` were made (each answered 201).
    let k = Keeld::start("acct-dup");
    let barrier = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let admin = k.admin.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = send(
                    &admin,
                    "POST",
                    "/api/v1/users",
                    Some(json!({"name": "dup", "password": "Password-123"})),
                );
                (r.status, r.text)
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let conflicts = answers.iter().filter(|(s, _)| *s == 409).count();
    assert_eq!((created, conflicts), (1, 19), "{answers:#?}");
    let users = k.admin.get("/api/v1/users").unwrap();
    let dups = users
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["name"] == "dup")
        .count();
    assert_eq!(dups, 1, "{users}");
    // The one made has the password asked for.
    login(&k, "dup", "Password-123");
}

#[test]
fn images_are_shared_only_into_the_sharers_projects_and_named_by_owner() {
    // Before: a project admin could share an image into any project that
    // existed (here `default`, where eve has no role), and a VM create in
    // `default` naming `tiny` fell back to an image of that name shared
    // into `default` when the project had none of its own: eve's bytes
    // booted where `tiny` was meant.
    let k = Keeld::start("acct-share");
    k.admin
        .post("/api/v1/projects", &json!({"name": "other"}))
        .unwrap();
    let eve = k.user_with_password("eve", "Password-eve1", "other", "admin");
    let olly = k.user_with_password("olly", "Password-olly1", "default", "operator");

    let r = eve
        .post(
            "/api/v1/images",
            &json!({"name": "tiny", "project": "other", "source": {"upload": true}}),
        )
        .unwrap();
    let id = r["image"]["id"].as_str().unwrap().to_string();
    let bytes = k.dir.join("eve.raw");
    std::fs::write(&bytes, vec![0xe5u8; 64 << 10]).unwrap();
    let up = eve
        .upload(
            &format!("/api/v1/images/{id}/data?project=other"),
            &bytes,
            |_, _| {},
        )
        .unwrap();
    assert_eq!(up.status, 200, "{}", up.text);
    assert_eq!(up.body["status"], "ready", "{}", up.text);

    // Eve is in no role in `default`: she cannot push the image there.
    let share = json!({"projects": ["default"]});
    let r = send(
        &eve,
        "POST",
        &format!("/api/v1/images/{id}/share?project=other"),
        Some(share.clone()),
    );
    assert_eq!(r.status, 404, "{}", r.text);
    let image = eve
        .get(&format!("/api/v1/images/{id}?project=other"))
        .unwrap();
    assert_eq!(image["shared_with"], json!([]), "{image}");

    // The system admin belongs to every project: it may.
    let r = send(
        &k.admin,
        "POST",
        &format!("/api/v1/images/{id}/share?project=other"),
        Some(share),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["shared_with"], json!(["default"]), "{}", r.text);

    // `default` has no image of its own named tiny: the shared one does not
    // stand in for it.
    let vm = |name: &str, image: &str| json!({"name": name, "image": image, "vcpus": 1, "memory_mib": 64, "start": false});
    for c in [&olly, &k.admin] {
        let r = send(c, "POST", "/api/v1/vms", Some(vm("v0", "tiny")));
        assert_eq!(r.status, 404, "{}", r.text);
    }
    // Named by its owner, it is found (what happens next does not matter
    // here: the bytes are not a bootable disk).
    let r = send(&olly, "POST", "/api/v1/vms", Some(vm("v1", "other/tiny")));
    assert_ne!(r.status, 404, "{}", r.text);
    assert!(!r.text.contains("No image"), "{}", r.text);
    if r.status < 300 {
        assert_eq!(r.body["vm"]["image"], id.as_str(), "{}", r.text);
    }

    // With an image of its own named tiny, `tiny` is that one.
    let mine = k.tiny_image("tiny");
    let made = k.create_vm(&olly, vm("v2", "tiny"));
    assert_eq!(made["image"], mine["id"], "{made}");
    assert_ne!(made["image"], id.as_str());
}

#[test]
fn passwords_can_be_changed_and_reset() {
    // Before: there was no way to change a password at all (POST
    // /api/v1/password and PUT /api/v1/users/{name}/password were not
    // served), no policy beyond 8 characters, and the first admin password
    // stayed in DATA/initial-admin-password for good.
    let mut k = Keeld::start("acct-passwd");
    let old = "Password-123";
    let new = "Changed-pass-456";
    let alice = k.user_with_password("alice", old, "default", "viewer");
    let other_session = login(&k, "alice", old);
    assert_eq!(whoami(&other_session), 200);

    // (b) The policy: length, and kinds of characters.
    let change = |c: &KeeldClient, current: &str, new: &str| {
        send(
            c,
            "POST",
            "/api/v1/password",
            Some(json!({"current_password": current, "new_password": new})),
        )
    };
    let r = change(&alice, old, "Ab-1234");
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("10 to 1024 characters"), "{}", r.text);
    let r = change(&alice, old, "onlylowercaseletters");
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text
            .contains("lowercase letters, uppercase letters, digits"),
        "{}",
        r.text
    );
    // (c) The current password must be right.
    let r = change(&alice, "Wrong-pass-999", new);
    assert_eq!(r.status, 401, "{}", r.text);

    // (a) A change: the old password stops working, so do the user's other
    // sessions; the one that made the change goes on.
    let r = change(&alice, old, new);
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(login_status(&k, "alice", old).0, 401);
    let fresh = login(&k, "alice", new);
    assert_eq!(whoami(&fresh), 200);
    assert_eq!(whoami(&other_session), 401);
    assert_eq!(whoami(&alice), 200);

    // (d) A reset by a system admin: the user must choose a new password
    // before logging in, which works without a token.
    let r = send(
        &k.admin,
        "PUT",
        "/api/v1/users/alice/password",
        Some(json!({"password": "Reset-pass-1"})),
    );
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(whoami(&alice), 401, "a reset ends every session");
    let (status, error) = login_status(&k, "alice", "Reset-pass-1");
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("set a new one"), "{error}");
    let r = send(
        &k.client(),
        "POST",
        "/api/v1/password",
        Some(json!({
            "username": "alice",
            "current_password": "Reset-pass-1",
            "new_password": "Chosen-pass-789",
        })),
    );
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(whoami(&login(&k, "alice", "Chosen-pass-789")), 200);
    // A reset by anyone but a system admin is refused.
    let alice = login(&k, "alice", "Chosen-pass-789");
    let r = send(
        &alice,
        "PUT",
        "/api/v1/users/admin/password",
        Some(json!({"password": "Reset-pass-1"})),
    );
    assert_eq!(r.status, 403, "{}", r.text);

    // (e) Once the admin has a password of their own, the printed first one
    // is gone from the data dir.
    let seed = k.dir.join("data/initial-admin-password");
    let first = std::fs::read_to_string(&seed).unwrap().trim().to_string();
    let r = change(&k.admin, &first, "Admin-pass-2024");
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(!seed.exists(), "{} is still there", seed.display());
    assert_eq!(whoami(&k.admin), 200);
    assert_eq!(login_status(&k, "admin", &first).0, 401);
    // keeld started again does not bring it back.
    k.kill9();
    k.spawn();
    assert!(!seed.exists());
    assert_eq!(whoami(&login(&k, "admin", "Admin-pass-2024")), 200);

    // (f) `keel passwd`, logged in: the saved session goes on working.
    let (rc, out, err) = keel_cli(
        &k,
        &["login", "--user", "alice"],
        &[("KEEL_PASSWORD", "Chosen-pass-789")],
    );
    assert_eq!(rc, 0, "{out}{err}");
    let (rc, out, err) = keel_cli(
        &k,
        &["passwd"],
        &[
            ("KEEL_PASSWORD", "Chosen-pass-789"),
            ("KEEL_NEW_PASSWORD", "Cli-pass-2024"),
        ],
    );
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("Password changed"), "{out}{err}");
    assert_eq!(whoami(&login(&k, "alice", "Cli-pass-2024")), 200);
    assert_eq!(login_status(&k, "alice", "Chosen-pass-789").0, 401);
    let (rc, out, err) = keel_cli(&k, &["node"], &[]);
    assert_eq!(rc, 0, "the saved session still works: {out}{err}");
    // A wrong current password: one line, exit 1.
    let (rc, out, err) = keel_cli(
        &k,
        &["passwd"],
        &[
            ("KEEL_PASSWORD", "Not-the-pass-1"),
            ("KEEL_NEW_PASSWORD", "Cli-pass-2025"),
        ],
    );
    assert_eq!(rc, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    // Not logged in, with --user: an admin-reset password is replaced.
    let r = send(
        &k.admin,
        "PUT",
        "/api/v1/users/alice/password",
        Some(json!({"password": "Reset-pass-2"})),
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let nowhere = k.dir.join("cli-none");
    let nowhere = nowhere.to_str().unwrap();
    let (rc, out, err) = keel_cli(
        &k,
        &["passwd", "--user", "alice"],
        &[
            ("XDG_CONFIG_HOME", nowhere),
            ("KEEL_PASSWORD", "Reset-pass-2"),
            ("KEEL_NEW_PASSWORD", "After-reset-1"),
        ],
    );
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("Password changed"), "{out}{err}");
    assert_eq!(whoami(&login(&k, "alice", "After-reset-1")), 200);
}

type Console = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Opens a console WebSocket at `path`; the HTTP status it was refused
/// with.
fn open_console(k: &Keeld, path: &str) -> Result<Console, u16> {
    let url = format!("ws://127.0.0.1:{}{path}", k.port);
    match tungstenite::connect(url) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// Reads a console until it shows `n` TICK lines.
fn read_ticks(ws: &mut Console, n: usize) -> String {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let start = Instant::now();
    let mut seen = String::new();
    while ticks(&seen) < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no TICKs over the console: {seen:?}"
        );
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(tungstenite::Message::Close(_)) => panic!("closed: {seen:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}: {seen:?}"),
        }
    }
    seen
}

#[test]
fn tokens_stay_out_of_urls_and_consoles_open_with_tickets() {
    // Before: `?access_token=TOKEN` authenticated any request (so session
    // tokens landed in proxy logs and browser histories), there were no
    // console tickets, API tokens never expired, and an Idempotency-Key
    // replay showed a one-time secret again.
    let k = Keeld::start("acct-tickets");
    let token = k.admin.token().unwrap().to_string();
    let anon = k.client();
    let r = send(
        &anon,
        "GET",
        &format!("/api/v1/whoami?access_token={token}"),
        None,
    );
    assert_eq!(r.status, 401, "{}", r.text);

    k.tiny_image("tiny");
    let a = k.create_vm(
        &k.admin,
        json!({"name": "a", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
    );
    let a = a["id"].as_str().unwrap().to_string();
    let b = k.create_vm(
        &k.admin,
        json!({"name": "b", "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false}),
    );
    let b = b["id"].as_str().unwrap().to_string();

    // A token in the console's URL is not a way in.
    let refused = open_console(&k, &format!("/api/v1/vms/{a}/console?access_token={token}"));
    assert_eq!(refused.err(), Some(401));

    // A ticket opens it, once.
    let ticket = |vm: &str| -> Value {
        let r = send(
            &k.admin,
            "POST",
            &format!("/api/v1/vms/{vm}/console/ticket"),
            None,
        );
        assert_eq!(r.status, 201, "{}", r.text);
        r.body
    };
    let t = ticket(&a);
    let secret = t["ticket"].as_str().unwrap();
    let path = t["path"].as_str().unwrap();
    assert_eq!(t["expires_in"], 60, "{t}");
    assert_eq!(path, format!("/api/v1/vms/{a}/console?ticket={secret}"));
    let mut ws = open_console(&k, path).expect("the ticket opens the console");
    read_ticks(&mut ws, 2);
    let _ = ws.close(None);
    assert_eq!(open_console(&k, path).err(), Some(401), "used once only");
    assert_eq!(
        open_console(&k, &format!("/api/v1/vms/{a}/console?ticket=made-up")).err(),
        Some(401)
    );
    // A ticket for A does not open B.
    let t = ticket(&a);
    let secret = t["ticket"].as_str().unwrap();
    let on_b = format!("/api/v1/vms/{b}/console?ticket={secret}");
    assert_eq!(open_console(&k, &on_b).err(), Some(401));
    // A user without the right to the VM gets no ticket.
    k.admin
        .post("/api/v1/projects", &json!({"name": "other"}))
        .unwrap();
    let stranger = k.user_with_password("stranger", "Password-123", "other", "admin");
    let r = send(
        &stranger,
        "POST",
        &format!("/api/v1/vms/{a}/console/ticket"),
        None,
    );
    assert_eq!(r.status, 404, "{}", r.text);

    // API tokens expire when asked to.
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "ci", "expires_in_days": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let expires = r.body["expires_at"].as_u64().unwrap();
    let want = unix_now() + 86400;
    assert!(expires.abs_diff(want) <= 60, "{expires} vs {want}");
    let ci = k.client().with_token(r.body["token"].as_str().unwrap());
    assert_eq!(whoami(&ci), 200);
    let r = send(
        &k.admin,
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "x", "expires_in_days": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text);

    // A ticket asked for again with the same Idempotency-Key: the secret is
    // not shown a second time.
    let ask = || {
        k.admin
            .send(
                "POST",
                &format!("/api/v1/vms/{a}/console/ticket"),
                None,
                &[("Idempotency-Key", "console-1")],
            )
            .unwrap()
    };
    let first = ask();
    assert_eq!(first.status, 201, "{}", first.text);
    let secret = first.body["ticket"].as_str().unwrap();
    let again = ask();
    assert_eq!(again.status, 409, "{}", again.text);
    assert!(!again.text.contains(secret), "{}", again.text);
    // The first answer's ticket still works.
    let mut ws = open_console(&k, first.body["path"].as_str().unwrap())
        .expect("the first ticket opens the console");
    read_ticks(&mut ws, 1);
    let _ = ws.close(None);
}
