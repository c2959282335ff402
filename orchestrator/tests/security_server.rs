//! keeld's HTTP server under abuse: slow and stalled clients, floods of
//! half-sent requests from one source, a low open-file limit.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{Keeld, ticks};
use serde_json::json;

/// The per-source cap keeld starts with (`--max-connections-per-source`).
const PER_SOURCE: usize = 128;

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to `to` from the local address `from` (any port).
fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: a plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr_in(SocketAddrV4::new(from, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
    if unsafe { libc::bind(fd_of(&fd), (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let remote = sockaddr_in(to);
    // SAFETY: as above.
    if unsafe { libc::connect(fd_of(&fd), (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

fn fd_of(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// RLIMIT_NOFILE (soft, hard) of this process.
fn nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

/// Lets this test process open `n` descriptors.
fn allow_open_files(n: u64) {
    let (soft, hard) = nofile();
    if soft >= n {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: hard.max(n),
    };
    // SAFETY: setrlimit reads only `lim`.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(
        rc,
        0,
        "cannot raise this test's open file limit to {n}: {}",
        std::io::Error::last_os_error()
    );
}

/// Whether keeld has closed this connection (EOF or reset) — without
/// waiting; a connection keeld holds has nothing to read.
fn closed_by_keeld(mut s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An answer (an error status): read on to see if it closed.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Reads until keeld closes the connection; returns when that was seen,
/// or None if it stayed open until `limit`.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(Instant::now()),
        }
    }
    None
}

/// Reads one whole response (its head and `Content-Length` body) from a
/// kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed before the response ended: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Times a call; panics if it took longer than `limit`.
fn within<T>(what: &str, limit: Duration, f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < limit, "{what} took {took:?}");
    (out, took)
}

/// Half-sent requests: headers cut off, and a body cut off.
fn half_headers() -> &'static [u8] {
    b"GET /api/v1/whoami HTTP/1.1\r\nHost: keeld\r\nX-Slow: "
}

fn half_body(token: &str) -> Vec<u8> {
    format!(
        "POST /api/v1/projects HTTP/1.1\r\nHost: keeld\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"name\": \"slow"
    )
    .into_bytes()
}

#[test]
fn slowloris_from_one_source_does_not_lock_out_others() {
    const FLOOD: usize = 2000;
    allow_open_files(FLOOD as u64 + 1024);
    // A systemd-like soft limit, no room to raise it: the caps must do the
    // work, not the timeouts (set far beyond the test's length).
    let mut k = Keeld::start_with_nofile(
        "slowloris",
        &["--header-timeout", "300", "--client-timeout", "300"],
        (1024, 1024),
    );
    let token = k.admin.token().unwrap().to_string();
    let keeld = SocketAddrV4::new(Ipv4Addr::LOCALHOST, k.port);
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let start = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    let mut refused = 0;
    for i in 0..FLOOD {
        match connect_from(attacker, keeld) {
            Ok(mut s) => {
                let half = if i % 2 == 0 {
                    half_headers().to_vec()
                } else {
                    half_body(&token)
                };
                // keeld may have closed it already.
                let _ = s.write_all(&half);
                flood.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    let opened = start.elapsed();

    // While all of them are open, others are served, reads and writes.
    let (me, whoami) = within("whoami during the flood", Duration::from_secs(3), || {
        k.admin.get("/api/v1/whoami").unwrap()
    });
    assert_eq!(me["name"], "admin", "{me}");
    let (project, create) = within(
        "creating a project during the flood",
        Duration::from_secs(3),
        || {
            k.admin
                .post("/api/v1/projects", &json!({"name": "during-flood"}))
                .unwrap()
        },
    );
    assert_eq!(project["name"], "during-flood", "{project}");

    // keeld keeps at most its per-source cap of them and closed the rest.
    let mut held = FLOOD;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(10) {
        held = flood.iter().filter(|s| !closed_by_keeld(s)).count();
        if held <= PER_SOURCE {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{FLOOD} half-sent requests from {attacker} (opened in {opened:?}, {refused} refused at \
         connect): keeld holds {held}, closed {}; whoami took {whoami:?}, a project creation \
         {create:?}",
        flood.len() - held
    );
    assert!(
        held <= PER_SOURCE,
        "{held} connections from one source held"
    );
    // The held ones are kept (no timeout has fired): the cap did this.
    assert!(held >= PER_SOURCE / 2, "only {held} held");
    within("whoami with the flood held", Duration::from_secs(3), || {
        k.admin.get("/api/v1/whoami").unwrap()
    });

    // The flood ends: keeld lives on, and the source may connect again.
    drop(flood);
    std::thread::sleep(Duration::from_millis(500));
    let child = k.child.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "keeld exited");
    within("whoami after the flood", Duration::from_secs(3), || {
        k.admin.get("/api/v1/whoami").unwrap()
    });
    let mut again = connect_from(attacker, keeld).unwrap();
    again
        .write_all(b"GET /api/v1/whoami HTTP/1.1\r\nHost: keeld\r\n\r\n")
        .unwrap();
    let answer = read_response(&mut again);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// Opens the three kinds of stalled connection and asserts keeld closes
/// each within `limit` (but not at once: the timeout did it).
fn assert_stalled_connections_closed(k: &Keeld, limit: Duration) {
    let addr = SocketAddr::from(([127, 0, 0, 1], k.port));
    let token = k.admin.token().unwrap().to_string();
    let mut headers = TcpStream::connect(addr).unwrap();
    headers.write_all(half_headers()).unwrap();
    let headers_sent = Instant::now();
    let mut body = TcpStream::connect(addr).unwrap();
    let mut partial = half_body(&token);
    partial.extend_from_slice(&[b'x'; 2000]);
    body.write_all(&partial).unwrap();
    let body_sent = Instant::now();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(
        format!(
            "GET /api/v1/whoami HTTP/1.1\r\nHost: keeld\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = read_response(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.to_ascii_lowercase().contains("connection: close"));
    let idle_since = Instant::now();

    for (what, stream, since) in [
        ("half-sent headers", &mut headers, headers_sent),
        ("a half-sent body", &mut body, body_sent),
        ("an idle kept-alive connection", &mut idle, idle_since),
    ] {
        let closed = wait_closed(stream, limit + Duration::from_secs(1))
            .unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        let after = closed - since;
        eprintln!("{what}: closed after {after:?}");
        assert!(after <= limit, "{what}: closed after {after:?}");
        assert!(
            after >= Duration::from_millis(1500),
            "{what}: closed after {after:?}, before any timeout"
        );
    }
}

#[test]
fn stalled_requests_and_idle_connections_are_closed() {
    let k = Keeld::start_with(
        "timeouts",
        &["--header-timeout", "2", "--client-timeout", "3"],
    );
    assert_stalled_connections_closed(&k, Duration::from_secs(5));
    // keeld still serves.
    k.admin.get("/api/v1/whoami").unwrap();
}

#[test]
fn client_timeout_alone_closes_stalled_connections() {
    // hyper's header timeout out of the way: keeld's own read timeout
    // closes them all, before the first byte, mid-headers, mid-body, idle.
    let k = Keeld::start_with(
        "clienttimeout",
        &["--header-timeout", "600", "--client-timeout", "3"],
    );
    let mut silent = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], k.port))).unwrap();
    let connected = Instant::now();
    assert_stalled_connections_closed(&k, Duration::from_secs(5));
    let closed = wait_closed(&mut silent, Duration::from_secs(1)).expect("a silent connection");
    assert!(closed - connected <= Duration::from_secs(5) + Duration::from_secs(1));
}

#[test]
fn open_file_limit_is_raised_at_start() {
    let (_, own_hard) = nofile();
    let hard = if own_hard > 1024 && own_hard != libc::RLIM_INFINITY {
        own_hard
    } else {
        65536
    };
    let k = Keeld::start_with_nofile("nofile", &[], (1024, hard));
    let pid = k.child.as_ref().unwrap().id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    assert_eq!(numbers[0], hard.to_string(), "{line}");
    assert_eq!(numbers[1], hard.to_string(), "{line}");
    assert!(
        k.log()
            .contains(&format!("Open file limit: {hard} (was 1024)")),
        "{}",
        k.log()
    );
}

type Console = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Reads a console for `how_long`; returns the output seen, or the error
/// that ended the session.
fn read_for(ws: &mut Console, how_long: Duration) -> Result<String, String> {
    let until = Instant::now() + how_long;
    let mut seen = String::new();
    while Instant::now() < until {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(tungstenite::Message::Close(_)) => return Err(format!("closed: {seen}")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(seen)
}

#[test]
fn console_stays_open_past_the_client_timeout() {
    let k = Keeld::start_with("consoleping", &["--client-timeout", "3"]);
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "c", "image": "tiny", "vcpus": 1, "memory_mib": 64}),
    );
    let id = vm["id"].as_str().unwrap();
    let open = || {
        let mut ws = common::open_console(&k, &k.admin, id);
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        ws
    };
    // One client reads (so tungstenite answers keeld's pings), one does not.
    let mut live = open();
    let mut dead = open();
    let start = Instant::now();
    let seen = read_for(&mut live, Duration::from_secs(8)).expect("the console stayed open");
    assert!(ticks(&seen) > 0, "no output: {seen:?}");
    assert!(start.elapsed() >= Duration::from_secs(8));
    // Keys still go through, and output still comes.
    live.send(tungstenite::Message::Text("keys\n".into()))
        .unwrap();
    let after = read_for(&mut live, Duration::from_secs(1)).expect("still open");
    assert!(ticks(&after) > 0, "no output after 8 s: {after:?}");
    // The client that never answered was disconnected (what it was sent
    // before is still buffered, then the end).
    let ended = read_for(&mut dead, Duration::from_secs(5));
    assert!(
        ended.is_err(),
        "a console that answers no pings stayed open"
    );
    let _ = live.close(None);
}

#[test]
fn a_long_poll_outlives_the_client_timeout() {
    // An import from a server that stalls: its operation runs on.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in server.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n");
                let _ = s.write_all(&[0u8; 4096]);
                std::thread::sleep(Duration::from_secs(30));
            });
        }
    });
    let k = Keeld::start_with(
        "longpoll",
        &["--client-timeout", "3", "--url-import-allow", "127.0.0.1"],
    );
    let reply = k
        .admin
        .post(
            "/api/v1/images",
            &json!({"name": "slow", "source": {"url": format!("http://127.0.0.1:{port}/disk.raw")}}),
        )
        .unwrap();
    let id = reply["operation"]["id"].as_str().unwrap();
    // The client waits for keeld, not keeld for the client: the handler
    // may take longer than the client timeout.
    let start = Instant::now();
    let op = k
        .admin
        .get(&format!("/api/v1/operations/{id}?wait=6"))
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(5), "{op}");
    assert_eq!(op["status"], "running", "{op}");
}
