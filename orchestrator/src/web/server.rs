//! keeld's HTTP server: its own accept loop over hyper's HTTP/1, so that
//! no client can hold connections (and file descriptors) for good.
//!
//! - hyper's `header_read_timeout` (`--header-timeout`) bounds the whole
//!   header block of each request. In hyper 1.12 it starts when the
//!   connection is first polled (so before the first byte too) and again
//!   when a keep-alive connection goes idle; it does not cover request
//!   bodies, upgraded connections (the console's WebSocket) or the time a
//!   handler runs.
//! - [`ClientIo`] (`--client-timeout`) fails a read that has waited that
//!   long without the client sending a byte: stalled bodies, idle
//!   keep-alive connections and WebSockets whose client no longer answers
//!   the console's pings are closed. While a handler works on a request
//!   whose body it has read (a long poll, a response being sent) the
//!   client owes nothing and the clock stands still; a write the client
//!   does not take for that long fails too.
//! - At most `--max-connections-per-source` connections per source address,
//!   and in all the open-file limit less a reserve for the store, the VMs'
//!   sockets and files; a connection over either is closed at once.
//! - `accept` failing (out of file descriptors, an aborted handshake)
//!   pauses the loop briefly instead of ending it or spinning.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// File descriptors kept out of the connections' reach: the store, the
/// VMs' sockets, logs and disks, images being imported.
pub const FD_RESERVE: u64 = 256;
/// Connections keeld serves at least, however low the open-file limit.
pub const MIN_CONNECTIONS: u64 = 64;
/// How long the accept loop pauses after `accept` failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Refused connections and accept errors are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long requests in progress may take to finish when keeld stops (at
/// most the client timeout).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The server's limits (from `keeld serve`'s flags).
#[derive(Clone, Debug)]
pub struct Limits {
    /// The whole header block of a request must arrive within this.
    pub header_timeout: Duration,
    /// A client that sends nothing for this long while keeld waits for it
    /// (or takes nothing of a response) is disconnected.
    pub client_timeout: Duration,
    /// Open connections per source address.
    pub per_source: usize,
    /// Open connections in all.
    pub total: usize,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the soft
/// limit before and after.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses an unlimited soft limit for open files.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target <= before {
        return Ok((before, before));
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads only `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target))
}

/// How many connections fit under an open-file limit of `soft`.
pub fn connection_limit(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(FD_RESERVE).max(MIN_CONNECTIONS)).unwrap_or(usize::MAX)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets
/// the requests in progress finish (for at most [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    log::info!(
        "Connections: at most {} per source address, {} in all",
        limits.per_source,
        limits.total
    );
    let slots = Arc::new(Slots::new(limits.per_source, limits.total));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut refused = Throttled::new();
    let mut failed = Throttled::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_per_connection(&e) {
                        if let Some(n) = failed.tick() {
                            log::warn!("Cannot accept connections ({n} times): {e}");
                        }
                        // Out of file descriptors or memory: the pending
                        // connection stays queued and accept would fail
                        // again at once.
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(n) = refused.tick() {
                    log::warn!(
                        "Refused {n} connections, the last from {}: {why}",
                        peer.ip()
                    );
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(ClientIo::new(stream, limits.client_timeout, slot));
        let activity = io.inner().activity.clone();
        let service = ConnService {
            router: router.clone(),
            peer,
            activity,
        };
        let conn = http.serve_connection(io, service).with_upgrades();
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                log::debug!("Connection from {peer}: {e}");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    // VMs keep running when keeld stops: a restarted keeld re-attaches.
    // Requests in progress may finish, within bounds.
    let grace = SHUTDOWN_GRACE.min(limits.client_timeout);
    let _ = tokio::time::timeout(grace, open_tx.closed()).await;
}

/// Errors of `accept` about the one connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Counts events, and says how many there were at most once per
/// [`LOG_EVERY`].
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn new() -> Self {
        Throttled {
            last: None,
            count: 0,
        }
    }

    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Open connections, per source address and in all.
struct Slots {
    per_source: usize,
    total: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection; its count is given back when dropped (when the
/// socket is closed, after any upgrade).
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn new(per_source: usize, total: usize) -> Self {
        Slots {
            per_source,
            total,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *open;
        if *total >= self.total {
            return Err("too many connections in all");
        }
        let mine = by_source.entry(ip).or_insert(0);
        if *mine >= self.per_source {
            return Err("too many connections from this address (--max-connections-per-source)");
        }
        *mine += 1;
        *total += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_source.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_source.remove(&self.ip);
            }
        }
    }
}

/// What a connection's reads wait for: the client, unless a handler is
/// working on a request whose body it has (then the clock stands still).
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    /// The last time the client sent something or a request ended.
    last: Instant,
    /// Requests read to the end of their body and not yet answered.
    handling: usize,
    /// The read waiting while `handling` is above zero.
    waker: Option<Waker>,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        self.lock().last = Instant::now();
    }
}

/// A client's TCP stream: a read pending for the client timeout without a
/// byte (outside a handler's work) fails with `TimedOut`, as does a write
/// pending that long; the connection's [`Slot`] goes with it.
struct ClientIo {
    stream: TcpStream,
    timeout: Duration,
    activity: Arc<Activity>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    write_pending: bool,
    _slot: Slot,
}

impl ClientIo {
    fn new(stream: TcpStream, timeout: Duration, slot: Slot) -> Self {
        let now = Instant::now();
        ClientIo {
            stream,
            timeout,
            activity: Arc::new(Activity {
                state: Mutex::new(ActivityState {
                    last: now,
                    handling: 0,
                    waker: None,
                }),
            }),
            read_timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            write_timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            write_pending: false,
            _slot: slot,
        }
    }

    fn timed_out(what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, format!("the client {what}"))
    }

    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(result) = write(Pin::new(&mut self.stream), cx) {
            self.write_pending = false;
            return Poll::Ready(result);
        }
        if !self.write_pending {
            self.write_pending = true;
            let deadline = Instant::now() + self.timeout;
            self.write_timer.as_mut().reset(deadline);
        }
        match self.write_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Self::timed_out("took no data"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            this.activity.touch();
            return Poll::Ready(result);
        }
        let deadline = {
            let mut state = this.activity.lock();
            if state.handling > 0 {
                state.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            state.last + this.timeout
        };
        if deadline <= Instant::now() {
            return Poll::Ready(Err(Self::timed_out("sent nothing")));
        }
        if this.read_timer.deadline() != deadline {
            this.read_timer.as_mut().reset(deadline);
        }
        match this.read_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Self::timed_out("sent nothing"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One request's part in [`Activity`]: the end of its body and the end of
/// its answer, in either order.
struct Exchange {
    activity: Arc<Activity>,
    /// (body read, answered)
    done: Mutex<(bool, bool)>,
}

/// Marks its part of an [`Exchange`] done when dropped.
struct Mark {
    exchange: Arc<Exchange>,
    body: bool,
}

impl Drop for Mark {
    fn drop(&mut self) {
        let mut done = self.exchange.done.lock().unwrap_or_else(|e| e.into_inner());
        let (body, answered) = &mut *done;
        let mut state = self.exchange.activity.lock();
        state.last = Instant::now();
        if self.body && !*body {
            *body = true;
            if !*answered {
                state.handling += 1;
            }
        } else if !self.body && !*answered {
            *answered = true;
            if *body {
                state.handling = state.handling.saturating_sub(1);
                if state.handling == 0
                    && let Some(waker) = state.waker.take()
                {
                    waker.wake();
                }
            }
        }
    }
}

/// A body that drops its [`Mark`] when it ends (or is dropped).
struct Tracked<B> {
    inner: B,
    mark: Option<Mark>,
}

impl<B> hyper::body::Body for Tracked<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.mark = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router as one connection's hyper service: each request carries the
/// peer's address (`ConnectInfo`) and its progress is told to the
/// connection's [`ClientIo`].
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let exchange = Arc::new(Exchange {
            activity: self.activity.clone(),
            done: Mutex::new((false, false)),
        });
        let answered = Mark {
            exchange: exchange.clone(),
            body: false,
        };
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ConnectInfo(self.peer));
        let ended = body.is_end_stream();
        let mut body = Tracked {
            inner: body,
            mark: Some(Mark {
                exchange,
                body: true,
            }),
        };
        if ended {
            body.mark = None;
        }
        let req = Request::from_parts(parts, Body::new(body));
        let mut router = self.router.clone();
        Box::pin(async move {
            let response = tower_service::Service::call(&mut router, req).await?;
            Ok(response.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    mark: Some(answered),
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_keeps_a_reserve() {
        assert_eq!(connection_limit(1024), 768);
        assert_eq!(connection_limit(100), 64);
        assert_eq!(connection_limit(65536), 65280);
    }

    #[test]
    fn slots_cap_each_source_and_the_total() {
        let slots = Arc::new(Slots::new(2, 3));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "::ffff:127.0.0.3".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_err(), "per source");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take("10.0.0.1".parse().unwrap()).is_err(), "in all");
        drop(a1);
        let _a3 = slots.take(a).unwrap();
        assert!(slots.take("127.0.0.3".parse().unwrap()).is_err());
    }
}
