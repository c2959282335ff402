//! The API socket's HTTP server: one thread, epoll, non-blocking sockets.
//!
//! One thread serves every connection, so a slow or stalled client costs a
//! buffer, not a thread, and a new connection costs no thread start. Reads
//! (`vmm.ping`, `vm.info`, `vm.counters`) are answered here from what the
//! control loop publishes ([`Published`]); everything that changes the VM
//! goes to the control loop, whose answer comes back through a queue and an
//! eventfd, so a long `vm.boot` never holds up other clients.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use keel_api::http::{self, HttpError, RequestHead, Response};
use keel_api::vmm_api::{Endpoint, RouteError, VmCounters, VmmPingResponse};
use keel_devices::virtio::pci::VirtioPciDevice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{ApiRequest, decode};
use crate::VmEvent;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a client may take to finish a request it started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most file descriptors taken with one request (tap queues).
const MAX_FDS: usize = 16;
/// Bytes buffered from a client whose request is with the control loop
/// (pipelined requests) before the server stops reading from it.
const MAX_PIPELINED: usize = 64 * 1024;

/// Connections accepted per wake-up.
const ACCEPT_BATCH: usize = 8;

const LISTENER: u64 = u64::MAX;
const REPLIES: u64 = u64::MAX - 1;

/// What the control loop publishes for the server to answer reads with.
#[derive(Default)]
pub struct Published {
    /// `vm.info`'s JSON; None while no VM is created.
    pub info: RwLock<Option<Vec<u8>>>,
    /// The running devices whose counters `vm.counters` reads, by id.
    pub counters: RwLock<Vec<(String, Arc<Mutex<VirtioPciDevice>>)>>,
}

impl Published {
    fn counters_json(&self) -> Vec<u8> {
        let sources = self.counters.read().unwrap_or_else(|p| p.into_inner());
        let mut all = VmCounters::new();
        for (id, device) in sources.iter() {
            let counters = keel_devices::bus::lock(device).counters();
            if !counters.is_empty() {
                let named = counters.into_iter().map(|(k, n)| (k.to_string(), n));
                all.insert(id.clone(), named.collect());
            }
        }
        serde_json::to_vec(&all).unwrap_or_default()
    }
}

/// Answers from the control loop, and the eventfd that wakes the server.
pub struct Replies {
    queue: Mutex<Vec<(u64, Response)>>,
    wake: EventFd,
}

/// Where the control loop sends one request's answer.
#[derive(Debug)]
pub struct Responder {
    token: u64,
    replies: Arc<Replies>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replies")
    }
}

impl Responder {
    pub fn send(self, response: Response) {
        self.replies
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.token, response));
        // The server drains the queue on wake-up; a failed write means the
        // counter is saturated, which still wakes it.
        let _ = self.replies.wake.write(1);
    }
}

/// Starts serving `listener`; requests that change the VM go to the
/// control loop on `events`.
pub fn start(
    listener: UnixListener,
    events: Sender<VmEvent>,
    published: Arc<Published>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    let replies = Arc::new(Replies {
        queue: Mutex::new(Vec::new()),
        wake: EventFd::new(EFD_NONBLOCK)?,
    });
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        replies.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, REPLIES),
    )?;
    let mut server = Server {
        epoll,
        listener,
        events,
        published,
        replies,
        conns: HashMap::new(),
        next_token: 0,
    };
    thread::Builder::new()
        .name("api".into())
        .spawn(move || server.run())
        .map(drop)
}

struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    fds: Vec<OwnedFd>,
    output: Vec<u8>,
    /// A request is with the control loop.
    waiting: bool,
    /// Close once the output is written.
    closing: bool,
    keep_alive: bool,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
    /// Signalled once the current answer is written (`vmm.shutdown`).
    written: Option<SyncSender<()>>,
    /// When the connection last went idle or started a request.
    since: Instant,
    interest: EventSet,
}

struct Server {
    epoll: Epoll,
    listener: UnixListener,
    events: Sender<VmEvent>,
    published: Arc<Published>,
    replies: Arc<Replies>,
    conns: HashMap<u64, Conn>,
    next_token: u64,
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Server {
    fn run(&mut self) {
        let mut ready = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(500, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API server: epoll failed ({e}); the API stops");
                    return;
                }
            };
            for event in &ready[..n] {
                match event.data() {
                    LISTENER => self.accept(),
                    REPLIES => self.take_replies(),
                    token => self.serve(token, event.event_set()),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        // A few per wake-up: connections already open get their turn before
        // a stream of new ones (the listener stays ready in epoll).
        for _ in 0..ACCEPT_BATCH {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if is_would_block(&e) => return,
                Err(e) => {
                    // EMFILE and friends: leave the rest queued for now.
                    log::warn!("API socket: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                let busy = Response::error(
                    503,
                    &[format!(
                        "{MAX_CONNECTIONS} API connections are open; close one and retry"
                    )],
                );
                let _ = stream.write_all(&busy.encode(false));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let added = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            );
            if added.is_err() {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    input: Vec::new(),
                    fds: Vec::new(),
                    output: Vec::new(),
                    waiting: false,
                    closing: false,
                    keep_alive: true,
                    continued: false,
                    written: None,
                    since: Instant::now(),
                    interest: EventSet::IN,
                },
            );
            // Clients write their request right after connecting: serving
            // it now saves a trip through epoll.
            self.serve(token, EventSet::IN);
        }
    }

    fn take_replies(&mut self) {
        let _ = self.replies.wake.read();
        let answers =
            std::mem::take(&mut *self.replies.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (token, response) in answers {
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.waiting = false;
                conn.output
                    .extend_from_slice(&response.encode(conn.keep_alive));
                if !conn.keep_alive {
                    conn.closing = true;
                }
                self.flush(token);
            }
        }
    }

    fn serve(&mut self, token: u64, ready: EventSet) {
        if ready.contains(EventSet::IN) || ready.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if !self.read(token) {
                self.close(token);
                return;
            }
            self.process(token);
        }
        if ready.contains(EventSet::OUT) {
            self.flush(token);
        }
    }

    /// Reads what the client sent (and descriptors passed with it). False:
    /// the connection is over.
    fn read(&mut self, token: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&token) else {
            return false;
        };
        let mut chunk = [0u8; 8192];
        loop {
            if conn.waiting && conn.input.len() > MAX_PIPELINED {
                return true;
            }
            let mut fds = [-1 as RawFd; MAX_FDS];
            let mut iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }];
            // SAFETY: the iovec points at `chunk`, which may take any bytes.
            let got = unsafe { conn.stream.recv_with_fds(&mut iov, &mut fds) };
            match got {
                Ok((0, _)) => {
                    // The client is done sending; an answer still owed is
                    // written before the connection closes.
                    if conn.waiting || !conn.output.is_empty() {
                        conn.closing = true;
                        return true;
                    }
                    return false;
                }
                Ok((n, nfds)) => {
                    for fd in &fds[..nfds.min(MAX_FDS)] {
                        // SAFETY: the kernel just installed these for us.
                        conn.fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
                    }
                    if conn.input.is_empty() {
                        conn.since = Instant::now();
                    }
                    conn.input.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => return true,
                Err(_) => return false,
            }
        }
    }

    /// Handles every complete request buffered, one at a time.
    fn process(&mut self, token: u64) {
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            if conn.waiting || conn.closing || conn.input.is_empty() {
                break;
            }
            let (head, start) = match http::parse_request_head(&conn.input) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(e) => {
                    self.refuse(token, &e);
                    return;
                }
            };
            if conn.input.len() < start + head.content_length {
                if head.expect_continue && !conn.continued {
                    conn.continued = true;
                    conn.output
                        .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    self.flush(token);
                }
                break;
            }
            let end = start + head.content_length;
            let body: Vec<u8> = conn.input[start..end].to_vec();
            conn.input.drain(..end);
            conn.continued = false;
            conn.keep_alive = head.keep_alive;
            conn.since = Instant::now();
            let fds = std::mem::take(&mut conn.fds);
            match self.answer(token, &head, &body, fds) {
                Some(response) => self.respond(token, response),
                None => {
                    if let Some(conn) = self.conns.get_mut(&token) {
                        conn.waiting = true;
                    }
                }
            }
        }
        self.update_interest(token);
    }

    fn refuse(&mut self, token: u64, e: &HttpError) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.keep_alive = false;
            conn.input.clear();
        }
        self.respond(token, Response::error(e.status(), &[e.to_string()]));
    }

    fn respond(&mut self, token: u64, response: Response) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.output
            .extend_from_slice(&response.encode(conn.keep_alive));
        if !conn.keep_alive {
            conn.closing = true;
        }
        self.flush(token);
    }

    /// Routes and decodes a request; reads are answered at once, the rest
    /// goes to the control loop (None: the answer will come back there).
    fn answer(
        &mut self,
        token: u64,
        head: &RequestHead,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Option<Response> {
        let endpoint = match Endpoint::route(&head.method, &head.path) {
            Ok(e) => e,
            Err(RouteError::UnknownPath) => {
                return Some(Response::error(
                    404,
                    &[format!("No endpoint {}", head.path)],
                ));
            }
            Err(RouteError::WrongMethod { allowed }) => {
                let message = format!("{} takes {allowed}, not {}", head.path, head.method);
                return Some(Response::error(405, &[message]));
            }
        };
        match endpoint {
            Endpoint::VmmPing => return Some(ping()),
            Endpoint::VmInfo | Endpoint::VmCounters => {
                let info = self
                    .published
                    .info
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                let Some(info) = info.as_ref() else {
                    return Some(Response::error(
                        404,
                        &["The VM is not created; PUT vm.create first".to_string()],
                    ));
                };
                return Some(if endpoint == Endpoint::VmInfo {
                    Response::json(200, info.clone())
                } else {
                    Response::json(200, self.published.counters_json())
                });
            }
            _ => {}
        }
        let action = match decode(endpoint, body, fds) {
            Ok(Some(action)) => action,
            Ok(None) => return Some(ping()),
            Err(response) => return Some(response),
        };
        let (written_tx, written) = mpsc::sync_channel(1);
        let request = ApiRequest {
            action,
            reply: Responder {
                token,
                replies: self.replies.clone(),
            },
            written,
        };
        if self.events.send(VmEvent::Api(request)).is_err() {
            return Some(Response::error(
                503,
                &["The VMM is shutting down".to_string()],
            ));
        }
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.written = Some(written_tx);
        }
        None
    }

    /// Writes what can be written now; closes a finished closing
    /// connection.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        while !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(0) => {
                    self.close(token);
                    return;
                }
                Ok(n) => {
                    conn.output.drain(..n);
                }
                Err(e) if is_would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(token);
                    return;
                }
            }
        }
        if conn.output.is_empty() {
            if let Some(written) = conn.written.take() {
                let _ = written.send(());
            }
            if conn.closing {
                self.close(token);
                return;
            }
            // Pipelined requests waited for this answer.
            if !conn.waiting && !conn.input.is_empty() {
                self.process(token);
                return;
            }
        }
        self.update_interest(token);
    }

    fn update_interest(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut want = EventSet::empty();
        let backlogged = conn.waiting && conn.input.len() > MAX_PIPELINED;
        if !conn.closing && !backlogged {
            want |= EventSet::IN;
        }
        if !conn.output.is_empty() {
            want |= EventSet::OUT;
        }
        if want != conn.interest {
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(want, token),
            );
            conn.interest = want;
        }
    }

    fn close(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Answers 408 to clients that stalled mid-request, and drops idle
    /// connections.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut stalled = Vec::new();
        let mut idle = Vec::new();
        for (token, conn) in &self.conns {
            if conn.waiting || !conn.output.is_empty() {
                continue;
            }
            let age = now.duration_since(conn.since);
            if !conn.input.is_empty() && age > REQUEST_TIMEOUT {
                stalled.push(*token);
            } else if conn.input.is_empty() && age > IDLE_TIMEOUT {
                idle.push(*token);
            }
        }
        for token in stalled {
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.keep_alive = false;
                conn.input.clear();
            }
            let message = format!(
                "The request was not completed within {} s",
                REQUEST_TIMEOUT.as_secs()
            );
            self.respond(token, Response::error(408, &[message]));
        }
        for token in idle {
            self.close(token);
        }
    }
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
