//! The API socket's HTTP server: one thread accepting, one per connection.
//!
//! A thread per connection keeps a slow or stalled client from delaying
//! anyone else; the cap on connections and the read timeouts bound what
//! careless clients can hold. Requests are decoded here and handed to the
//! control loop, which answers through a channel; a request the control
//! loop never answers (it is gone) gets a 503.

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::thread;
use std::time::Duration;

use keel_api::http::{self, HttpError, RequestHead, Response};
use keel_api::vmm_api::{Endpoint, RouteError, VmmPingResponse};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{ApiRequest, decode};
use crate::VmEvent;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to finish a request it started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most file descriptors taken with one request (tap queues).
const MAX_FDS: usize = 16;

/// Starts serving `listener`; requests go to the control loop on `events`.
pub fn start(listener: UnixListener, events: Sender<VmEvent>) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || accept_loop(listener, events, active))
        .map(drop)
}

fn accept_loop(listener: UnixListener, events: Sender<VmEvent>, active: Arc<AtomicUsize>) {
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                // EMFILE and friends: give the process a moment to recover.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let busy = Response::error(
                503,
                &[format!(
                    "{MAX_CONNECTIONS} API connections are open; close one and retry"
                )],
            );
            let _ = stream.write_all(&busy.encode(false));
            continue;
        }
        let events = events.clone();
        let guard = ActiveGuard(active.clone());
        let spawned = thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _guard = guard;
                Connection::new(stream).serve(&events);
            });
        if let Err(e) = spawned {
            log::warn!("API socket: cannot start a connection thread: {e}");
        }
    }
}

/// Counts a connection as open until its thread ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Why a connection stops reading requests.
enum ReadEnd {
    /// The client closed (or went idle too long) between requests.
    Closed,
    /// Answer this, then close.
    Refuse(Response),
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            buf: Vec::with_capacity(4096),
            fds: Vec::new(),
        }
    }

    fn serve(mut self, events: &Sender<VmEvent>) {
        loop {
            let (head, body) = match self.read_request() {
                Ok(request) => request,
                Err(ReadEnd::Closed) => return,
                Err(ReadEnd::Refuse(response)) => {
                    let _ = self.stream.write_all(&response.encode(false));
                    return;
                }
            };
            let fds = std::mem::take(&mut self.fds);
            let (response, written) = answer(&head, &body, fds, events);
            let sent = self.stream.write_all(&response.encode(head.keep_alive));
            if let Some(written) = written {
                let _ = written.send(());
            }
            if sent.is_err() || !head.keep_alive {
                return;
            }
        }
    }

    /// Reads more bytes (and any descriptors sent with them). Ok(0) is EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let mut fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        }];
        // SAFETY: the iovec points at `chunk`, which may take any bytes.
        let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for fd in &fds[..nfds.min(MAX_FDS)] {
            // SAFETY: the kernel just installed these descriptors for us.
            self.fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read_request(&mut self) -> Result<(RequestHead, Vec<u8>), ReadEnd> {
        let refuse = |e: HttpError| ReadEnd::Refuse(Response::error(e.status(), &[e.to_string()]));
        let timed_out = || {
            ReadEnd::Refuse(Response::error(
                408,
                &[format!(
                    "The request was not completed within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )],
            ))
        };
        let (head, start) = loop {
            if let Some(parsed) = http::parse_request_head(&self.buf).map_err(refuse)? {
                break parsed;
            }
            let timeout = if self.buf.is_empty() {
                IDLE_TIMEOUT
            } else {
                REQUEST_TIMEOUT
            };
            let _ = self.stream.set_read_timeout(Some(timeout));
            match self.fill() {
                Ok(0) if self.buf.is_empty() => return Err(ReadEnd::Closed),
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) && self.buf.is_empty() => return Err(ReadEnd::Closed),
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        };
        if head.expect_continue && self.buf.len() < start + head.content_length {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let _ = self.stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        while self.buf.len() < start + head.content_length {
            match self.fill() {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
        let end = start + head.content_length;
        let body = self.buf[start..end].to_vec();
        // Pipelined bytes of the next request stay in the buffer.
        self.buf.drain(..end);
        Ok((head, body))
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn ping() -> Response {
    let ping = VmmPingResponse {
        build_version: env!("CARGO_PKG_VERSION").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: i64::from(std::process::id()),
        features: Vec::new(),
    };
    Response::json(200, serde_json::to_vec(&ping).unwrap_or_default())
}

/// Routes, decodes and hands a request to the control loop. The sender,
/// when there is one, is to be signalled once the answer is written.
fn answer(
    head: &RequestHead,
    body: &[u8],
    fds: Vec<OwnedFd>,
    events: &Sender<VmEvent>,
) -> (Response, Option<SyncSender<()>>) {
    let endpoint = match Endpoint::route(&head.method, &head.path) {
        Ok(e) => e,
        Err(RouteError::UnknownPath) => {
            let message = format!("No endpoint {}", head.path);
            return (Response::error(404, &[message]), None);
        }
        Err(RouteError::WrongMethod { allowed }) => {
            let message = format!("{} takes {allowed}, not {}", head.path, head.method);
            return (Response::error(405, &[message]), None);
        }
    };
    let action = match decode(endpoint, body, fds) {
        Ok(Some(action)) => action,
        Ok(None) => return (ping(), None),
        Err(response) => return (response, None),
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let (written_tx, written) = mpsc::sync_channel(1);
    let gone = || Response::error(503, &["The VMM is shutting down".to_string()]);
    let request = ApiRequest {
        action,
        reply,
        written,
    };
    if events.send(VmEvent::Api(request)).is_err() {
        return (gone(), None);
    }
    (answer.recv().unwrap_or_else(|_| gone()), Some(written_tx))
}
