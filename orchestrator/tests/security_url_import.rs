//! Image import from a URL on a node many tenants share: no way into the
//! node's own services (loopback, link-local, its own addresses) unless an
//! admin allows it, timeouts on stalled servers, deletion stops a
//! download, sizes are checked before anything is written, https with
//! certificate checks.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Keeld, send};
use keel_api::keeld_client::{KeeldClient, Reply};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `POST /api/v1/images` from `url`.
fn import(client: &KeeldClient, name: &str, url: &str) -> Reply {
    send(
        client,
        "POST",
        "/api/v1/images",
        Some(json!({"name": name, "source": {"url": url}})),
    )
}

/// An import that must be refused at once, saying why and what an admin
/// can do.
fn assert_refused(client: &KeeldClient, name: &str, url: &str) {
    let start = Instant::now();
    let r = import(client, name, url);
    assert_eq!(r.status, 400, "{url}: {}", r.text);
    assert!(
        r.text.contains("not allowed") && r.text.contains("--url-import-allow"),
        "{url}: {}",
        r.text
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{url}: slow refusal"
    );
    let images = client.get("/api/v1/images").unwrap();
    assert!(
        !images.as_array().unwrap().iter().any(|i| i["name"] == name),
        "{url}: an image record was made: {images}"
    );
}

/// Waits until an operation ends; panics after `limit`.
fn op_ends(client: &KeeldClient, reply: &Value, limit: Duration) -> (Value, Duration) {
    let id = reply["operation"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no operation in {reply}"));
    let start = Instant::now();
    loop {
        let op = client.get(&format!("/api/v1/operations/{id}")).unwrap();
        if op["status"] != "running" {
            return (op, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "operation {id} still runs after {limit:?}: {op}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn image(client: &KeeldClient, id: &str) -> Value {
    client.get(&format!("/api/v1/images/{id}")).unwrap()
}

fn partial(k: &Keeld, id: &str) -> PathBuf {
    k.dir.join("data/images").join(format!("{id}.partial"))
}

/// Reads a request's head.
fn read_request(s: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") && got.len() < 16 << 10 {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An HTTP server on 127.0.0.1 running `serve` for each connection (on its
/// own thread); returns its port.
fn server(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(s));
        }
    });
    port
}

/// Answers with `head` (and `body`), then holds the connection open
/// without sending more.
fn stalling(head: &'static str, body: &'static [u8]) -> u16 {
    server(move |mut s| {
        read_request(&mut s);
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
        std::thread::sleep(Duration::from_secs(300));
    })
}

/// Accepts connections and never answers.
fn silent() -> u16 {
    server(|s| {
        std::thread::sleep(Duration::from_secs(300));
        drop(s);
    })
}

/// An address of this host's that is not loopback or link-local.
fn own_address() -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "inet" || w[0] == "inet6")
        .filter_map(|w| w[1].split('/').next()?.parse::<std::net::IpAddr>().ok())
        .find(|ip| match ip {
            std::net::IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            std::net::IpAddr::V6(v6) => !v6.is_loopback() && v6.segments()[0] & 0xffc0 != 0xfe80,
        })
        .map(|ip| match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        })
}

#[test]
fn internal_addresses_are_refused_without_an_allow_rule() {
    let k = Keeld::start("url-ssrf");
    let operator = k.user("op", "default", "operator");
    let metrics = format!("http://127.0.0.1:{}/metrics", k.port);
    assert_refused(&operator, "metrics", &metrics);
    assert_refused(&k.admin, "metrics", &metrics);
    assert_refused(
        &operator,
        "metadata",
        "http://169.254.169.254/latest/meta-data",
    );
    assert_refused(
        &operator,
        "by-name",
        &format!("http://localhost:{}/", k.port),
    );
    assert_refused(&operator, "v6", &format!("http://[::1]:{}/metrics", k.port));
    assert_refused(
        &operator,
        "mapped",
        &format!("http://[::ffff:127.0.0.1]:{}/metrics", k.port),
    );
    assert_refused(
        &operator,
        "zero",
        &format!("http://0.0.0.0:{}/metrics", k.port),
    );
    assert_refused(
        &operator,
        "https",
        &format!("https://127.0.0.1:{}/", k.port),
    );
    match own_address() {
        Some(ip) => assert_refused(&operator, "own", &format!("http://{ip}:{}/metrics", k.port)),
        None => eprintln!(
            "SKIPPED the node's own address: this host has no address other than loopback \
             and link-local ones (`ip -o addr show`)"
        ),
    }
    let r = import(&operator, "mirror", "http://192.0.2.1:1/x?y#z");
    assert_ne!(
        r.status, 400,
        "an ordinary address is not refused: {}",
        r.text
    );
}

/// Runs `keeld serve` with these arguments, which must make it stop at
/// once; returns what it printed on stderr.
fn keeld_refuses(dir: &Path, args: &[&str]) -> String {
    let err_file = dir.join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keeld"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keeld started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(!status.success(), "{args:?}: {err}");
    err
}

#[test]
fn bad_allow_rules_stop_keeld_from_starting() {
    let dir = std::env::temp_dir().join(format!("keeld-test-url-allow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (bad, why) in [
        ("127.0.0.1/8", "did you mean 127.0.0.0/8"),
        ("10.0.0.0/33", "0 to 32"),
        ("::/200", "0 to 128"),
        ("localhost", "not an address block"),
    ] {
        let err = keeld_refuses(&dir, &["--url-import-allow", bad]);
        assert!(
            err.contains("--url-import-allow") && err.contains(why),
            "{bad}: {err}"
        );
    }
    let err = keeld_refuses(&dir, &["--url-import-timeout", "0"]);
    assert!(err.contains("--url-import-timeout must be"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stalled_servers_time_out() {
    let k = Keeld::start_with(
        "url-stall",
        &[
            "--url-import-allow",
            "127.0.0.0/8",
            "--url-import-timeout",
            "2",
        ],
    );
    let body_stalls = stalling(
        "HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n",
        &[7u8; 1000],
    );
    let headers_stall = silent();
    let a = import(
        &k.admin,
        "body-stalls",
        &format!("http://127.0.0.1:{body_stalls}/disk.raw"),
    );
    let b = import(
        &k.admin,
        "never-answers",
        &format!("http://127.0.0.1:{headers_stall}/disk.raw"),
    );
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(b.status, 202, "{}", b.text);
    for r in [&a.body, &b.body] {
        let (op, took) = op_ends(&k.admin, r, Duration::from_secs(10));
        assert_eq!(op["status"], "failed", "{op}");
        let error = op["error"].as_str().unwrap();
        assert!(error.contains("timed out"), "{error}");
        assert!(took < Duration::from_secs(6), "took {took:?}");
        let id = r["image"]["id"].as_str().unwrap();
        let img = image(&k.admin, id);
        assert_eq!(img["status"], "error", "{img}");
        assert!(
            img["status_reason"].as_str().unwrap().contains("timed out"),
            "{img}"
        );
        assert!(!partial(&k, id).exists());
    }
}

#[test]
fn deleting_an_image_stops_its_download() {
    let k = Keeld::start_with("url-delete", &["--url-import-allow", "127.0.0.0/8"]);
    let body_stalls = stalling(
        "HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n",
        &[7u8; 65536],
    );
    let headers_stall = silent();
    let a = import(
        &k.admin,
        "body-stalls",
        &format!("http://127.0.0.1:{body_stalls}/disk.raw"),
    );
    let b = import(
        &k.admin,
        "never-answers",
        &format!("http://127.0.0.1:{headers_stall}/disk.raw"),
    );
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(b.status, 202, "{}", b.text);
    let a_id = a.body["image"]["id"].as_str().unwrap();
    let b_id = b.body["image"]["id"].as_str().unwrap();
    // The first one is writing its bytes.
    let start = Instant::now();
    while !partial(&k, a_id).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no partial file");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    for (r, id) in [(&a.body, a_id), (&b.body, b_id)] {
        let d = send(&k.admin, "DELETE", &format!("/api/v1/images/{id}"), None);
        assert_eq!(d.status, 204, "{}", d.text);
        let (op, _) = op_ends(&k.admin, r, Duration::from_secs(2));
        assert_eq!(op["status"], "failed", "{op}");
        assert!(
            op["error"]
                .as_str()
                .unwrap()
                .contains("the image was deleted"),
            "{op}"
        );
        assert!(!partial(&k, id).exists(), "{id}.partial remains");
    }
    let left: Vec<_> = std::fs::read_dir(k.dir.join("data/images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Sets the default project's image quota.
fn set_image_quota(k: &Keeld, gib: u64) {
    let r = send(
        &k.admin,
        "PUT",
        "/api/v1/projects/default/quota",
        Some(json!({"image_gib": gib})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn sizes_are_checked_before_writing() {
    let k = Keeld::start_with("url-size", &["--url-import-allow", "127.0.0.0/8"]);
    // 2^50 bytes: more than this host's disk.
    let huge = stalling(
        "HTTP/1.1 200 OK\r\nContent-Length: 1125899906842624\r\n\r\n",
        &[7u8; 65536],
    );
    let r = import(&k.admin, "huge", &format!("http://127.0.0.1:{huge}/x"));
    assert_eq!(r.status, 202, "{}", r.text);
    let (op, took) = op_ends(&k.admin, &r.body, Duration::from_secs(5));
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("Not enough space"), "{error}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let id = r.body["image"]["id"].as_str().unwrap();
    assert!(!partial(&k, id).exists());
    let img = image(&k.admin, id);
    assert_eq!(img["status"], "error", "{img}");
    assert_eq!(img["reserved"].as_u64().unwrap_or(0), 0, "{img}");

    // A quota of 1 GiB: an import in progress counts with what it declared.
    set_image_quota(&k, 1);
    let two_gib = stalling(
        "HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n",
        &[7u8; 4096],
    );
    let r = import(
        &k.admin,
        "two-gib",
        &format!("http://127.0.0.1:{two_gib}/x"),
    );
    let (op, _) = op_ends(&k.admin, &r.body, Duration::from_secs(5));
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("over its image (GiB) quota"), "{error}");
    let id = r.body["image"]["id"].as_str().unwrap();
    assert!(!partial(&k, id).exists());

    // 600 MiB declared and reserved (the space it takes is checked, but
    // nothing is written: the server stalls).
    let big = stalling(
        "HTTP/1.1 200 OK\r\nContent-Length: 629145600\r\n\r\n",
        &[7u8; 4096],
    );
    let first = import(&k.admin, "first", &format!("http://127.0.0.1:{big}/x"));
    let first_id = first.body["image"]["id"].as_str().unwrap();
    let start = Instant::now();
    while image(&k.admin, first_id)["reserved"] != 629145600 {
        let img = image(&k.admin, first_id);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no reservation: {img}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // 600 MiB more: alone it would fit, with the first one it does not.
    let second = import(&k.admin, "second", &format!("http://127.0.0.1:{big}/x"));
    let (op, _) = op_ends(&k.admin, &second.body, Duration::from_secs(5));
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("over its image (GiB) quota"), "{error}");
    let d = send(
        &k.admin,
        "DELETE",
        &format!("/api/v1/images/{first_id}"),
        None,
    );
    assert_eq!(d.status, 204, "{}", d.text);
}

#[test]
fn redirects_are_not_followed() {
    let k = Keeld::start_with("url-redirect", &["--url-import-allow", "127.0.0.0/8"]);
    let port = server(|mut s| {
        read_request(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/\r\n\
              Content-Length: 0\r\n\r\n",
        );
    });
    let r = import(&k.admin, "moved", &format!("http://127.0.0.1:{port}/x"));
    assert_eq!(r.status, 202, "{}", r.text);
    let (op, _) = op_ends(&k.admin, &r.body, Duration::from_secs(10));
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(
        error.contains("redirects") && error.contains("http://169.254.169.254/latest/"),
        "{error}"
    );
}

/// Runs the openssl CLI (it makes the test's certificates).
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI makes the test's certificates: install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate it signed for 127.0.0.1 and
/// localhost: (CA certificate, server certificate, server key) PEM files.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-subj",
        "/CN=keel test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "1",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// An https server on 127.0.0.1 serving `data` at every path.
fn https_server(cert: &Path, key: &Path, data: Arc<Vec<u8>>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    server(move |s| {
        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, s);
        if read_request(&mut tls).is_empty() {
            return;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        let _ = tls.write_all(head.as_bytes());
        let _ = tls.write_all(&data);
        tls.conn.send_close_notify();
        let _ = tls.flush();
    })
}

#[test]
fn https_imports_check_the_certificate() {
    let mut k = Keeld::start_with("url-https", &["--url-import-allow", "127.0.0.0/8"]);
    let (ca, cert, key) = certificates(&k.dir);
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sha = hex::encode(Sha256::digest(&data));
    let port = https_server(&cert, &key, Arc::new(data));
    let url = format!("https://127.0.0.1:{port}/disk.raw");

    // The certificate is not one keeld trusts.
    let r = import(&k.admin, "untrusted", &url);
    assert_eq!(r.status, 202, "{}", r.text);
    let (op, _) = op_ends(&k.admin, &r.body, Duration::from_secs(20));
    assert_eq!(op["status"], "failed", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");

    k.restart_with_env(&[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    let r = import(&k.admin, "trusted", &url);
    assert_eq!(r.status, 202, "{}", r.text);
    let (op, _) = op_ends(&k.admin, &r.body, Duration::from_secs(20));
    assert_eq!(op["status"], "succeeded", "{op}");
    let img = image(&k.admin, r.body["image"]["id"].as_str().unwrap());
    assert_eq!(img["status"], "ready", "{img}");
    assert_eq!(img["size"], 1 << 20, "{img}");
    assert_eq!(img["sha256"], sha, "{img}");
    assert_eq!(img["reserved"].as_u64().unwrap_or(0), 0, "{img}");
}
