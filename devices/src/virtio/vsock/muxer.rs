//! The host side of virtio-vsock: Unix sockets, the connection table and
//! credit-based flow control.
//!
//! Addressing follows Firecracker's and Cloud Hypervisor's "hybrid vsock":
//!
//! - A host process connects to the device's socket and writes
//!   `CONNECT <port>\n`. The muxer picks a free local port, sends the guest
//!   an OP_REQUEST from (CID 2, local port) to `port`, and when the guest
//!   answers OP_RESPONSE writes `OK <local port>\n` to the host process;
//!   from then on the Unix stream carries the connection's bytes. A refusal
//!   (OP_RST) or no answer within [`CONNECT_TIMEOUT`] closes it.
//! - A guest connection to (CID 2, port P) becomes a connection to the Unix
//!   socket `<socket>_P`: OP_RESPONSE when that connect succeeds, OP_RST
//!   when it fails.
//!
//! Every host fd is non-blocking and lives in the muxer's own epoll, whose
//! fd the queue worker waits on. Nothing is buffered without bound: data
//! from the host goes straight from the socket into the guest's receive
//! buffers, only as far as the guest's advertised credit allows; data from
//! the guest goes straight to the socket, and what the socket does not take
//! waits in a per-connection buffer of at most [`CONN_BUF_SIZE`] bytes — the
//! credit Keel advertises, which only grows as bytes reach the host socket.
//! A guest that sends beyond its credit has its connection reset.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::guest_io::{GuestBytes, GuestSink, send_bytes};
use super::packet::*;

/// Receive buffer space Keel advertises per connection (`buf_alloc`), and
/// the most guest bytes it holds for a host socket that is not reading.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told its new credit.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// Most live connections (plus host connections still sending CONNECT).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections that have not finished their CONNECT line.
const MAX_PENDING_HOST: usize = 64;
/// Most RSTs waiting for a guest receive buffer; more are dropped.
const MAX_RST_BACKLOG: usize = 1024;
/// Longest `CONNECT <port>\n` line accepted.
const CONNECT_LINE_MAX: usize = 32;
/// Local ports for host-initiated connections start here (as Firecracker's).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long the guest has to answer a host-initiated OP_REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection waits for the guest's OP_RST, or for the
/// host to take the guest's last bytes.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_FD_TOKEN: u64 = 2;

/// Control packets a connection owes the guest.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_SHUTDOWN: u8 = 4;
const P_CREDIT_UPDATE: u8 = 8;

/// A connection, named by its two ports; the CIDs are always the host's
/// and the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host-side port (CID 2).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: OP_REQUEST sent (or about to be), no answer yet.
    LocalInit,
    Established,
    /// Waiting for the guest's OP_RST after a SHUTDOWN with both flags
    /// (either side's), or for the host to drain the last guest bytes.
    Closing,
}

struct Connection {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    pending: u8,
    in_worklist: bool,
    /// The epoll interest now registered; `None` when not registered.
    registered: Option<EventSet>,
    /// The host socket may have bytes for the guest.
    readable: bool,
    host_eof: bool,
    host_hup: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags already sent to the guest.
    shut_sent: u32,
    /// Guest bytes the host socket has not taken yet, from `tx_head` on.
    tx_buf: Vec<u8>,
    tx_head: usize,
    /// Leading bytes of `tx_buf` that are Keel's (`OK <port>\n`), not the
    /// guest's, and so do not count towards `fwd_cnt`.
    tx_preamble: usize,
    /// Guest bytes written to the host socket (our `fwd_cnt`).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            pending: 0,
            in_worklist: false,
            registered: None,
            readable: false,
            host_eof: false,
            host_hup: false,
            guest_shut: 0,
            shut_sent: 0,
            tx_buf: Vec::new(),
            tx_head: 0,
            tx_preamble: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            deadline: None,
        }
    }

    fn tx_pending(&self) -> usize {
        self.tx_buf.len() - self.tx_head
    }

    /// Guest data bytes held (the preamble excluded).
    fn tx_data_pending(&self) -> usize {
        self.tx_pending() - self.tx_preamble
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_rx_data(&self) -> bool {
        self.state == ConnState::Established
            && self.readable
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn has_rx_work(&self) -> bool {
        self.pending != 0 || self.wants_rx_data()
    }

    /// The shutdown flags the guest should know about now.
    fn shutdown_flags(&self) -> u32 {
        let mut flags = 0;
        if self.host_eof || self.host_hup {
            flags |= SHUTDOWN_SEND;
        }
        if self.host_hup {
            flags |= SHUTDOWN_RCV;
        }
        flags
    }

    fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            // A hung-up socket is always ready: stop watching it. What it
            // still holds is read through the worklist.
            return None;
        }
        let mut ev = EventSet::empty();
        if self.state != ConnState::LocalInit
            && !self.readable
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
        {
            ev |= EventSet::IN;
        }
        if self.tx_pending() > 0 {
            ev |= EventSet::OUT;
        }
        // HUP and ERR are always reported.
        Some(ev)
    }

    fn header(
        &mut self,
        guest_cid: u64,
        key: ConnKey,
        op: u16,
        len: u32,
        flags: u32,
    ) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Writes held guest bytes to the host socket. `Err` means the socket is
    /// broken and the connection must go.
    fn flush(&mut self) -> io::Result<()> {
        while self.tx_pending() > 0 {
            match send_bytes(self.stream.as_raw_fd(), &self.tx_buf[self.tx_head..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    let preamble = n.min(self.tx_preamble);
                    self.tx_preamble -= preamble;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - preamble) as u32);
                    self.tx_head += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.tx_pending() == 0 {
            // Keep the capacity for the next burst.
            self.tx_buf.clear();
            self.tx_head = 0;
        } else if self.tx_head >= self.tx_buf.len() / 2 {
            self.tx_buf.drain(..self.tx_head);
            self.tx_head = 0;
        }
        self.note_forwarded();
        Ok(())
    }

    fn note_forwarded(&mut self) {
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }
}

/// A host process that connected to the socket and has not finished its
/// `CONNECT <port>\n` line.
struct PendingHost {
    stream: UnixStream,
    line: [u8; CONNECT_LINE_MAX],
    len: usize,
}

enum Endpoint {
    Pending(PendingHost),
    Conn(ConnKey),
}

/// What [`Muxer::fill_rx`] put in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RxFill {
    /// A packet of this many bytes (header included).
    Packet(u32),
    /// The buffer cannot hold what is due (no room for payload): the buffer
    /// is returned empty.
    NoRoom,
    /// Nothing to send after all.
    Nothing,
}

/// Counters for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    pub dropped_rsts: u64,
    pub credit_violations: u64,
}

pub struct Muxer {
    guest_cid: u64,
    socket: PathBuf,
    listener: Arc<UnixListener>,
    listener_paused: bool,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    endpoints: HashMap<u64, Endpoint>,
    pending_hosts: usize,
    next_token: u64,
    next_local_port: u32,
    worklist: VecDeque<ConnKey>,
    rsts: VecDeque<ConnKey>,
    events: Vec<EpollEvent>,
    pub stats: MuxerStats,
}

impl Muxer {
    pub fn new(guest_cid: u64, socket: &Path, listener: Arc<UnixListener>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        let timer = TimerFd::new()?;
        // Reading a timer that was re-armed after it fired must not block
        // the worker.
        // SAFETY: fcntl on an fd we own, with flags we just read back.
        let flags = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
                < 0
        {
            return Err(io::Error::last_os_error());
        }
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            socket: socket.to_path_buf(),
            listener,
            listener_paused: false,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            endpoints: HashMap::new(),
            pending_hosts: 0,
            next_token: FIRST_FD_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            worklist: VecDeque::new(),
            rsts: VecDeque::new(),
            events: vec![EpollEvent::default(); 32],
            stats: MuxerStats::default(),
        })
    }

    /// The fd the worker waits on: readable when a host socket, the
    /// listener or the timer needs attention.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.worklist.is_empty()
    }

    /// Handles whatever the host side has ready; never blocks.
    pub fn process_events(&mut self) -> io::Result<()> {
        loop {
            let n = match self.epoll.wait(0, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for i in 0..n {
                let ev = self.events[i];
                match ev.data() {
                    LISTENER_TOKEN => self.accept_all(),
                    TIMER_TOKEN => self.on_timer(),
                    token => self.on_fd_event(token, ev.event_set()),
                }
            }
            if n < self.events.len() {
                return Ok(());
            }
        }
    }

    fn alloc_token(&mut self) -> u64 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_FD_TOKEN);
            if !self.endpoints.contains_key(&t) {
                return t;
            }
        }
    }

    fn full(&self) -> bool {
        self.conns.len() + self.pending_hosts >= MAX_CONNECTIONS
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.full() || self.pending_hosts >= MAX_PENDING_HOST {
                        log::warn!("Too many connections; refusing a host connection");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("Cannot make a host connection non-blocking: {e}");
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        log::warn!("Cannot watch a host connection: {e}");
                        continue;
                    }
                    self.pending_hosts += 1;
                    self.endpoints.insert(
                        token,
                        Endpoint::Pending(PendingHost {
                            stream,
                            line: [0; CONNECT_LINE_MAX],
                            len: 0,
                        }),
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or similar: stop watching the listener for
                    // a while rather than spin on it.
                    log::warn!("Cannot accept a host connection: {e}");
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Delete,
                            self.listener.as_raw_fd(),
                            EpollEvent::default(),
                        )
                        .is_ok()
                    {
                        self.listener_paused = true;
                        self.arm_timer();
                    }
                    return;
                }
            }
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = Duration::from_millis(500);
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::warn!("Cannot arm the connection timer: {e}"),
        }
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        if self.listener_paused {
            let ok = self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    self.listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
                )
                .is_ok();
            self.listener_paused = !ok;
        }
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            log::debug!("Connection {key:?} timed out");
            self.kill(key, true);
        }
        let waiting = self.listener_paused || self.conns.values().any(|c| c.deadline.is_some());
        if !waiting {
            if let Err(e) = self.timer.clear() {
                log::warn!("Cannot stop the connection timer: {e}");
            }
            self.timer_armed = false;
        }
    }

    fn set_deadline(&mut self, key: ConnKey, after: Duration) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.deadline = Some(Instant::now() + after);
            self.arm_timer();
        }
    }

    fn on_fd_event(&mut self, token: u64, ready: EventSet) {
        match self.endpoints.get_mut(&token) {
            Some(Endpoint::Pending(_)) => self.on_pending_host(token, ready),
            Some(Endpoint::Conn(key)) => {
                let key = *key;
                self.on_conn_event(key, ready);
            }
            None => {}
        }
    }

    fn drop_pending(&mut self, token: u64) {
        if let Some(Endpoint::Pending(p)) = self.endpoints.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.pending_hosts -= 1;
        }
    }

    /// Reads the `CONNECT <port>\n` line; a good one becomes a connection
    /// in `LocalInit`, with an OP_REQUEST due to the guest.
    fn on_pending_host(&mut self, token: u64, ready: EventSet) {
        let step = match self.endpoints.get_mut(&token) {
            Some(Endpoint::Pending(p)) => read_connect_line(p, ready),
            _ => return,
        };
        let port = match step {
            LineStep::Wait => return,
            LineStep::Fail => {
                self.drop_pending(token);
                return;
            }
            LineStep::Done(port) => port,
        };
        let local_port = self.alloc_local_port();
        let (Some(port), Some(local_port)) = (port, local_port) else {
            log::debug!("Bad CONNECT line from a host process, or no free local port");
            self.drop_pending(token);
            return;
        };
        let Some(Endpoint::Pending(p)) = self.endpoints.remove(&token) else {
            return;
        };
        self.pending_hosts -= 1;
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::new(p.stream, token, ConnState::LocalInit);
        conn.registered = Some(EventSet::IN);
        conn.pending = P_REQUEST;
        self.endpoints.insert(token, Endpoint::Conn(key));
        self.conns.insert(key, conn);
        self.set_deadline(key, CONNECT_TIMEOUT);
        self.refresh(key);
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match self.next_local_port.checked_add(1) {
                Some(p) => p,
                None => FIRST_LOCAL_PORT,
            };
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn on_conn_event(&mut self, key: ConnKey, ready: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if ready.contains(EventSet::IN) {
            conn.readable = true;
        }
        if ready.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if conn.state == ConnState::LocalInit {
                // The host process gave up before the guest answered.
                self.kill(key, true);
                return;
            }
            conn.host_hup = true;
            conn.readable = true;
            if conn.host_eof || conn.guest_shut & SHUTDOWN_RCV != 0 {
                conn.pending |= P_SHUTDOWN;
            }
        }
        // After a hang-up, held guest bytes can only fail: find out now.
        let flush = ready.contains(EventSet::OUT) || (conn.host_hup && conn.tx_pending() > 0);
        if flush && !self.flush_conn(key) {
            return;
        }
        self.refresh(key);
    }

    /// Flushes held guest bytes; after the last one, acts on the guest's
    /// shutdown. Returns false when the connection is gone.
    fn flush_conn(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        if let Err(e) = conn.flush() {
            log::debug!("Host socket of {key:?} failed: {e}");
            self.kill(key, true);
            return false;
        }
        if conn.tx_pending() == 0 {
            if conn.guest_shut == SHUTDOWN_BOTH {
                self.kill(key, true);
                return false;
            }
            if conn.guest_shut & SHUTDOWN_SEND != 0 {
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        true
    }

    /// Brings a connection's epoll interest and worklist entry up to date.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.interest();
        if want != conn.registered {
            let fd = conn.stream.as_raw_fd();
            let res = match (conn.registered, want) {
                (None, Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, conn.token))
                }
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(ev, conn.token),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    log::warn!("Cannot watch the host socket of {key:?}: {e}");
                    self.kill(key, true);
                    return;
                }
            }
        }
        if conn.has_rx_work() && !conn.in_worklist {
            conn.in_worklist = true;
            self.worklist.push_back(key);
        }
    }

    /// Closes a connection's host side and forgets it; optionally tells the
    /// guest with an OP_RST.
    fn kill(&mut self, key: ConnKey, send_rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.endpoints.remove(&conn.token);
            if conn.in_worklist {
                // Keeps the worklist bounded by the live connections, even
                // when the guest opens and resets connections without ever
                // posting receive buffers.
                self.worklist.retain(|k| *k != key);
            }
        }
        if send_rst {
            self.queue_rst(key);
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rsts.len() >= MAX_RST_BACKLOG {
            self.stats.dropped_rsts += 1;
            return;
        }
        self.rsts.push_back(key);
    }

    /// Answers a packet Keel will not handle: resets its connection, if any,
    /// and tells the guest (never in answer to an RST).
    pub fn reject(&mut self, hdr: &PacketHeader) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        self.kill(key, hdr.op != OP_RST);
    }

    /// Handles one packet from the guest. The caller has checked the CIDs
    /// and that `payload` holds `hdr.len` readable bytes.
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &GuestBytes<'_>) {
        if hdr.type_ != TYPE_STREAM || !hdr.op_is_known() {
            self.reject(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.queue_rst(key);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE => {
                if conn.state != ConnState::LocalInit {
                    self.kill(key, true);
                    return;
                }
                conn.state = ConnState::Established;
                conn.deadline = None;
                let line = format!("OK {}\n", key.local_port);
                conn.tx_buf.extend_from_slice(line.as_bytes());
                conn.tx_preamble = line.len();
                if !self.flush_conn(key) {
                    return;
                }
            }
            OP_RST => {
                self.kill(key, false);
                return;
            }
            OP_SHUTDOWN => {
                conn.guest_shut |= hdr.flags & SHUTDOWN_BOTH;
                if conn.guest_shut == SHUTDOWN_BOTH {
                    conn.state = ConnState::Closing;
                    self.set_deadline(key, CLOSE_TIMEOUT);
                }
                // Acts at once when nothing is held.
                if !self.flush_conn(key) {
                    return;
                }
            }
            OP_RW => {
                if conn.state != ConnState::Established || conn.guest_shut & SHUTDOWN_SEND != 0 {
                    self.kill(key, true);
                    return;
                }
                if !self.guest_data(key, payload) {
                    return;
                }
            }
            OP_CREDIT_REQUEST => conn.pending |= P_CREDIT_UPDATE,
            // OP_CREDIT_UPDATE: the credit fields were taken above.
            _ => {}
        }
        self.refresh(key);
    }

    /// Forwards an OP_RW payload. Returns false when the connection is gone.
    fn guest_data(&mut self, key: ConnKey, payload: &GuestBytes<'_>) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        let len = payload.len;
        if len == 0 {
            return true;
        }
        if conn.host_hup {
            // The host process is gone: nobody will read these bytes.
            self.kill(key, true);
            return false;
        }
        if conn.tx_data_pending() + len > CONN_BUF_SIZE as usize {
            log::debug!("Guest overran its credit on {key:?}");
            self.stats.credit_violations += 1;
            self.kill(key, true);
            return false;
        }
        let mut sent = 0;
        if conn.tx_pending() == 0 {
            match payload.send_to(conn.stream.as_raw_fd(), 0) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::debug!("Host socket of {key:?} failed: {e}");
                    self.kill(key, true);
                    return false;
                }
            }
            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(sent as u32);
            conn.note_forwarded();
        }
        if sent < len && !payload.append_to(sent, &mut conn.tx_buf) {
            self.kill(key, true);
            return false;
        }
        true
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the guest has lost
            // track of it. Reset both.
            self.kill(key, true);
            return;
        }
        if self.full() {
            // Guest-triggered: not worth a warning per packet.
            log::debug!(
                "Too many connections; refusing guest port {}",
                key.peer_port
            );
            self.queue_rst(key);
            return;
        }
        let mut path = OsString::from(self.socket.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("Guest connect to {}: {e}", Path::new(&path).display());
                self.queue_rst(key);
                return;
            }
        };
        let token = self.alloc_token();
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.pending = P_RESPONSE;
        self.endpoints.insert(token, Endpoint::Conn(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// Puts the next packet due to the guest into `sink`.
    pub fn fill_rx(&mut self, sink: &GuestSink<'_>) -> RxFill {
        if let Some(key) = self.rsts.pop_front() {
            let hdr = PacketHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..PacketHeader::default()
            };
            return if sink.write_header(&hdr) {
                RxFill::Packet(HDR_SIZE as u32)
            } else {
                RxFill::NoRoom
            };
        }
        while let Some(key) = self.worklist.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.in_worklist {
                continue;
            }
            let fill = self.conn_packet(key, sink);
            let Some(conn) = self.conns.get_mut(&key) else {
                // Killed while reading: its RST is queued.
                if let RxFill::Nothing = fill {
                    return self.fill_rx(sink);
                }
                return fill;
            };
            conn.in_worklist = false;
            self.refresh(key);
            match fill {
                RxFill::Nothing => continue,
                other => return other,
            }
        }
        RxFill::Nothing
    }

    fn conn_packet(&mut self, key: ConnKey, sink: &GuestSink<'_>) -> RxFill {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return RxFill::Nothing;
        };
        let control = |conn: &mut Connection, op: u16, flags: u32| {
            let hdr = conn.header(guest_cid, key, op, 0, flags);
            if sink.write_header(&hdr) {
                RxFill::Packet(HDR_SIZE as u32)
            } else {
                RxFill::NoRoom
            }
        };
        if conn.pending & P_REQUEST != 0 {
            conn.pending &= !P_REQUEST;
            return control(conn, OP_REQUEST, 0);
        }
        if conn.pending & P_RESPONSE != 0 {
            conn.pending &= !P_RESPONSE;
            return control(conn, OP_RESPONSE, 0);
        }
        if conn.wants_rx_data() && sink.payload_room() > 0 {
            let max = conn.peer_credit().min(MAX_PKT_PAYLOAD) as usize;
            match sink.recv_from(conn.stream.as_raw_fd(), max) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.readable = false;
                    conn.pending |= P_SHUTDOWN;
                }
                Ok(n) => {
                    let hdr = conn.header(guest_cid, key, OP_RW, n as u32, 0);
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                    if !sink.write_header(&hdr) {
                        // Cannot happen: the sink was checked for room.
                        self.kill(key, true);
                        return RxFill::NoRoom;
                    }
                    return RxFill::Packet((HDR_SIZE + n) as u32);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    conn.readable = false;
                }
                Err(e) => {
                    log::debug!("Host socket of {key:?} failed: {e}");
                    self.kill(key, true);
                    return RxFill::Nothing;
                }
            }
        }
        if conn.pending & P_SHUTDOWN != 0 {
            conn.pending &= !P_SHUTDOWN;
            let flags = conn.shutdown_flags() | conn.shut_sent;
            if flags != conn.shut_sent {
                conn.shut_sent = flags;
                if flags == SHUTDOWN_BOTH {
                    conn.state = ConnState::Closing;
                    conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    self.arm_timer();
                }
                let Some(conn) = self.conns.get_mut(&key) else {
                    return RxFill::Nothing;
                };
                return control(conn, OP_SHUTDOWN, flags);
            }
        }
        if conn.pending & P_CREDIT_UPDATE != 0 {
            return control(conn, OP_CREDIT_UPDATE, 0);
        }
        if conn.wants_rx_data() {
            // Data is due but this buffer has no room past the header.
            return RxFill::NoRoom;
        }
        RxFill::Nothing
    }
}

enum LineStep {
    /// The line is not complete yet.
    Wait,
    /// The host process went away or sent too much.
    Fail,
    /// A complete line, and the port it names if it is well formed.
    Done(Option<u32>),
}

/// Reads what the host process sent of its CONNECT line, never past the
/// newline (what follows is connection data).
fn read_connect_line(p: &mut PendingHost, ready: EventSet) -> LineStep {
    let fd = p.stream.as_raw_fd();
    let room = CONNECT_LINE_MAX - p.len;
    let mut peek = [0u8; CONNECT_LINE_MAX];
    // SAFETY: `peek` is valid for writes of `room <= CONNECT_LINE_MAX` bytes.
    let n = unsafe {
        libc::recv(
            fd,
            peek.as_mut_ptr().cast(),
            room,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        let transient =
            e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted;
        if transient && !ready.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            return LineStep::Wait;
        }
        return LineStep::Fail;
    }
    let n = n as usize;
    if n == 0 {
        // Closed before finishing the line.
        return LineStep::Fail;
    }
    let newline = peek[..n].iter().position(|&b| b == b'\n');
    let take = newline.map_or(n, |i| i + 1);
    let start = p.len;
    // SAFETY: `p.line[start..]` has `room >= take` bytes of space.
    let got = unsafe {
        libc::recv(
            fd,
            p.line[start..].as_mut_ptr().cast(),
            take,
            libc::MSG_DONTWAIT,
        )
    };
    if got != take as isize {
        return LineStep::Fail;
    }
    p.len += take;
    if newline.is_some() {
        LineStep::Done(parse_connect(&p.line[..p.len]))
    } else if p.len == CONNECT_LINE_MAX {
        LineStep::Fail
    } else {
        LineStep::Wait
    }
}

/// Parses `CONNECT <port>\n`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("CONNECT ")?;
    let port = rest.strip_suffix('\n')?.trim_end_matches('\r');
    port.parse().ok()
}

/// Connects to a Unix stream socket without blocking: a listener whose
/// backlog is full refuses instead of stalling the worker.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is empty, too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed it.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234\n"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect(b"connect 1\n"), None);
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT 1"), None);
        assert_eq!(parse_connect(b"\xff\n"), None);
    }

    #[test]
    fn nonblocking_connect_refuses_missing_and_overlong_paths() {
        assert!(connect_nonblocking(Path::new("/nonexistent/keel-vsock_1")).is_err());
        let long = "x".repeat(200);
        assert!(connect_nonblocking(Path::new(&long)).is_err());
    }
}
