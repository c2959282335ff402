//! Image bytes from an http:// or https:// URL.
//!
//! keeld runs as root on a node many tenants share, so a URL must not be a
//! way into the node itself: the host is resolved once, every address it
//! resolves to is checked (loopback, unspecified, link-local, multicast,
//! broadcast and this node's own addresses are refused unless a system
//! admin allows them with `--url-import-allow`), and the connection goes
//! to a checked address (no second lookup a DNS answer could change).
//! Redirects are not followed. Every step must make progress within
//! `--url-import-timeout`; the declared length is checked against the
//! project's quota and the free space before anything is written, and
//! again as the bytes arrive; deleting the image stops its download.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::Sink;
use crate::control::operations::Progress;
use crate::keel::Keel;
use crate::quota::QuotaError;
use crate::store::StoreError;

/// How often (in bytes received) the quota and free space are checked
/// again during a download.
const CHECK_EVERY: u64 = 4 << 20;

/// The longest `POST /api/v1/images` waits to resolve a URL's host.
const CREATE_RESOLVE_WAIT: Duration = Duration::from_secs(10);

/// Why a URL import was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{0}: not an http:// or https:// URL")]
    NotHttp(String),
    #[error("{0}: user names and passwords in URLs are not supported")]
    UserInfo(String),
    #[error("{0}: no ] after the IPv6 address")]
    NoBracket(String),
    #[error("{url}: {inside:?} is not an IPv6 address")]
    BadIpv6 { url: String, inside: String },
    #[error("{url}: unexpected {after:?} after the IPv6 address")]
    AfterIpv6 { url: String, after: String },
    #[error("{0}: put an IPv6 address in brackets: [addr]")]
    Unbracketed(String),
    #[error("{url}: {host:?} is not a host name or address")]
    BadHost { url: String, host: String },
    #[error("{0}: no host")]
    NoHost(String),
    #[error("{url}: bad port {port:?}")]
    BadPort { url: String, port: String },
    #[error("{0}: the path has characters a URL may not hold; percent-encode them")]
    BadPath(String),
    #[error("{url}: not allowed: {denied}")]
    NotAllowed { url: String, denied: AddressDenied },
    #[error("{url}: not allowed: {host} resolves to {denied}")]
    ResolvesToDenied {
        url: String,
        host: String,
        denied: AddressDenied,
    },
    #[error("Cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot resolve {0}: no addresses")]
    NoAddresses(String),
    #[error("{url}: cannot connect: {errors}")]
    Connect { url: String, errors: String },
    #[error(
        "{url}: timed out {what} (no progress for {secs} s; a system admin sets this with \
         keeld serve --url-import-timeout)"
    )]
    TimedOut {
        url: String,
        what: String,
        secs: f64,
    },
    #[error("The download stopped: the image was deleted")]
    Deleted,
    #[error("{url}")]
    ServerName {
        url: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("{url}: the TLS handshake failed")]
    Handshake {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "No trusted root certificates on this host ({0}); install the CA certificates or \
         point SSL_CERT_FILE at them"
    )]
    NoRoots(String),
    #[error("TLS")]
    Tls(#[source] rustls::Error),
    #[error("TLS: {0}")]
    TlsSetup(String),
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}")]
    Request {
        url: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error(
        "{url}: the server redirects ({status}) to {location}; keeld does not follow \
         redirects: import from that URL instead"
    )]
    Redirect {
        url: String,
        status: hyper::StatusCode,
        location: String,
    },
    #[error("{url}: the server answered {status}")]
    Status {
        url: String,
        status: hyper::StatusCode,
    },
    #[error("{url}: the download failed")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: the server sent more than the {total} bytes it declared")]
    TooMuch { url: String, total: u64 },
    #[error("{url}: the download was cut short ({got} of {total} bytes)")]
    Short { url: String, got: u64, total: u64 },
    #[error("{url}")]
    Room {
        url: String,
        #[source]
        source: QuotaError,
    },
    #[error(transparent)]
    Write(Box<super::ImportError>),
}

/// An address URL imports may not reach, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AddressDenied {
    pub ip: IpAddr,
    pub kind: &'static str,
}

impl fmt::Display for AddressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ip}, {kind}, which URL imports may not reach; a system admin can allow it with \
             `keeld serve --url-import-allow {ip}` (or an address block)",
            ip = self.ip,
            kind = self.kind
        )
    }
}

/// A malformed `--url-import-allow` block.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CidrError {
    #[error("{0:?} is not an address block: give one as 127.0.0.0/8 or fd00::/8")]
    Address(String),
    #[error("{0}: the prefix length must be 0 to {1}")]
    Prefix(String, u8),
    #[error("{given}: the address has bits set past the prefix; did you mean {base}/{prefix}?")]
    HostBits {
        given: String,
        base: IpAddr,
        prefix: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A URL an image may be imported from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: Scheme,
    /// A DNS name (lowercase) or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    fn default_port(&self) -> u16 {
        match self.scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// The `Host` header: brackets around an IPv6 address, the port when
    /// it is not the scheme's.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// `http[s]://host[:port][/path][?query]` (an IPv6 host in brackets).
pub fn parse_http_url(url: &str) -> Result<HttpUrl, DownloadError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("https://") {
        (Scheme::Https, &url[8..])
    } else if lower.starts_with("http://") {
        (Scheme::Http, &url[7..])
    } else {
        return Err(DownloadError::NotHttp(url.into()));
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(DownloadError::UserInfo(url.into()));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (inside, after) = bracketed
            .split_once(']')
            .ok_or_else(|| DownloadError::NoBracket(url.into()))?;
        let ip = inside
            .parse::<Ipv6Addr>()
            .map_err(|_| DownloadError::BadIpv6 {
                url: url.into(),
                inside: inside.into(),
            })?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| DownloadError::AfterIpv6 {
                        url: url.into(),
                        after: p.into(),
                    })?,
            ),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err(DownloadError::Unbracketed(url.into()));
        }
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err(DownloadError::BadHost {
                url: url.into(),
                host: host.into(),
            });
        }
        (host.to_ascii_lowercase(), port)
    };
    if host.is_empty() {
        return Err(DownloadError::NoHost(url.into()));
    }
    let default = match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let port = match port {
        None => default,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(DownloadError::BadPort {
                    url: url.into(),
                    port: p.into(),
                });
            }
        },
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if path.parse::<hyper::Uri>().is_err() {
        return Err(DownloadError::BadPath(url.into()));
    }
    Ok(HttpUrl {
        scheme,
        host,
        port,
        path,
    })
}

/// An address block URL imports may reach although the deny list refuses
/// it (`keeld serve --url-import-allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `addr/prefix`, or one address.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(CidrError::Prefix(s.to_string(), max)),
            },
        };
        let cidr = Cidr { addr, prefix };
        let base = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if base != addr {
            return Err(CidrError::HostBits {
                given: s.to_string(),
                base,
                prefix,
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) or
/// IPv4-compatible (`::a.b.c.d`) IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    (s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback())
        .then(|| Ipv4Addr::from(u128::from(ip) as u32))
}

/// Why URL imports may not reach `ip` (what kind of address it is), if
/// they may not.
fn denied_kind(ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
    let kind = match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.octets()[0] == 0 {
                Some("an unspecified (\"this network\") address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if v4.is_multicast() {
                Some("a multicast address")
            } else if v4.is_broadcast() {
                Some("a broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("an unspecified address")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else {
                embedded_v4(v6).and_then(|v4| denied_kind(IpAddr::V4(v4), &[]))
            }
        }
    };
    kind.or_else(|| {
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        (own.contains(&ip) || v4.is_some_and(|v4| own.contains(&v4)))
            .then_some("one of this node's own addresses")
    })
}

/// Whether URL imports may reach `ip`: not a denied kind, or inside one of
/// the admin's `allow` blocks.
pub fn check_address(ip: IpAddr, allow: &[Cidr], own: &[IpAddr]) -> Result<(), AddressDenied> {
    let Some(kind) = denied_kind(ip, own) else {
        return Ok(());
    };
    let v4 = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    if allow
        .iter()
        .any(|c| c.contains(ip) || v4.is_some_and(|v4| c.contains(v4)))
    {
        return Ok(());
    }
    Err(AddressDenied { ip, kind })
}

/// The addresses of this node's network interfaces.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        log::warn!(
            "Cannot list this node's addresses: {}",
            std::io::Error::last_os_error()
        );
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is an entry of the list getifaddrs returned; its
        // address, when present, is a sockaddr of the family it names.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn check_addresses(
    keel: &Keel,
    url: &str,
    host: &str,
    addrs: &[SocketAddr],
) -> Result<(), DownloadError> {
    let own = own_addresses();
    for a in addrs {
        check_address(a.ip(), &keel.config.url_import_allow, &own).map_err(|denied| {
            if host.parse::<IpAddr>().is_ok() {
                DownloadError::NotAllowed {
                    url: url.into(),
                    denied,
                }
            } else {
                DownloadError::ResolvesToDenied {
                    url: url.into(),
                    host: host.into(),
                    denied,
                }
            }
        })?;
    }
    Ok(())
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, DownloadError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| DownloadError::Resolve {
            host: host.into(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DownloadError::NoAddresses(host.into()));
    }
    Ok(addrs)
}

/// What `POST /api/v1/images` checks of a URL before it answers: its form
/// and, when the host resolves in time, its addresses (the download checks
/// them again, and reports a host that does not resolve).
pub async fn check_url(keel: &Keel, url: &str) -> Result<(), DownloadError> {
    let parsed = parse_http_url(url)?;
    let wait = keel.config.url_import_timeout.min(CREATE_RESOLVE_WAIT);
    if let Ok(Ok(addrs)) = tokio::time::timeout(wait, resolve(&parsed.host, parsed.port)).await {
        check_addresses(keel, url, &parsed.host, &addrs)?;
    }
    Ok(())
}

/// The downloads running, by image, with what stops each.
static DOWNLOADS: Mutex<BTreeMap<String, Arc<Notify>>> = Mutex::new(BTreeMap::new());

/// Stops the download into image `id` if one runs: called once the image's
/// record is gone.
pub fn cancel(id: &str) {
    let downloads = DOWNLOADS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(stop) = downloads.get(id) {
        stop.notify_one();
    }
}

/// A download's entry in [`DOWNLOADS`], removed when the download ends.
struct Registered(String);

impl Drop for Registered {
    fn drop(&mut self) {
        DOWNLOADS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// Aborts a spawned task when dropped (a connection nobody reads any more).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits on the network: within the timeout, and no longer than the
/// image exists.
struct Waits<'a> {
    url: &'a str,
    timeout: Duration,
    stop: &'a Notify,
}

impl Waits<'_> {
    async fn on<T>(&self, what: &str, step: impl Future<Output = T>) -> Result<T, DownloadError> {
        tokio::select! {
            biased;
            () = self.stop.notified() => Err(DownloadError::Deleted),
            done = tokio::time::timeout(self.timeout, step) => {
                done.map_err(|_| DownloadError::TimedOut {
                    url: self.url.into(),
                    what: what.into(),
                    secs: self.timeout.as_secs_f64(),
                })
            }
        }
    }
}

pub(super) async fn download(
    keel: &Keel,
    id: &str,
    url: &str,
    to: &Path,
    op: &Progress,
) -> Result<(u64, String), DownloadError> {
    let stop = Arc::new(Notify::new());
    DOWNLOADS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id.to_string(), stop.clone());
    let _registered = Registered(id.to_string());
    // `remove` drops the record before it cancels: a deletion that came
    // before the registration shows here.
    let Some(image) = keel.images.get(id) else {
        return Err(DownloadError::Deleted);
    };
    let waits = Waits {
        url,
        timeout: keel.config.url_import_timeout,
        stop: &stop,
    };
    let parsed = parse_http_url(url)?;
    let addrs = waits
        .on("resolving the host", resolve(&parsed.host, parsed.port))
        .await??;
    check_addresses(keel, url, &parsed.host, &addrs)?;
    let mut errors = Vec::new();
    let mut stream = None;
    for addr in &addrs {
        match waits
            .on("connecting", tokio::net::TcpStream::connect(addr))
            .await?
        {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    let Some(stream) = stream else {
        return Err(DownloadError::Connect {
            url: url.into(),
            errors: errors.join("; "),
        });
    };
    let fetch = Fetch {
        keel,
        id,
        project: &image.project,
        url,
        parsed: &parsed,
        waits: &waits,
        to,
        op,
    };
    match parsed.scheme {
        Scheme::Http => fetch.over(stream).await,
        Scheme::Https => {
            let config = tls_config().await?;
            let name =
                rustls::pki_types::ServerName::try_from(parsed.host.clone()).map_err(|source| {
                    DownloadError::ServerName {
                        url: url.into(),
                        source,
                    }
                })?;
            let tls = waits
                .on(
                    "in the TLS handshake",
                    tokio_rustls::TlsConnector::from(config).connect(name, stream),
                )
                .await?
                .map_err(|source| DownloadError::Handshake {
                    url: url.into(),
                    source,
                })?;
            fetch.over(tls).await
        }
    }
}

/// The TLS client settings: the system's trusted roots (or those of
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`), http/1.1.
async fn tls_config() -> Result<Arc<rustls::ClientConfig>, DownloadError> {
    tokio::task::spawn_blocking(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(DownloadError::NoRoots(errors.join("; ")));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(DownloadError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    })
    .await
    .map_err(|e| DownloadError::TlsSetup(e.to_string()))?
}

/// The HTTP exchange of one download, over a connected stream.
struct Fetch<'a> {
    keel: &'a Keel,
    id: &'a str,
    project: &'a str,
    url: &'a str,
    parsed: &'a HttpUrl,
    waits: &'a Waits<'a>,
    to: &'a Path,
    op: &'a Progress,
}

impl Fetch<'_> {
    async fn over<S>(&self, stream: S) -> Result<(u64, String), DownloadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let url = self.url;
        let (mut sender, conn) = self
            .waits
            .on(
                "in the HTTP handshake",
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
            )
            .await?
            .map_err(|source| DownloadError::Http {
                url: url.into(),
                source,
            })?;
        let _conn = AbortOnDrop(
            tokio::spawn(async move {
                let _ = conn.await;
            })
            .abort_handle(),
        );
        let request = hyper::Request::get(&self.parsed.path)
            .header(hyper::header::HOST, self.parsed.authority())
            .header(hyper::header::USER_AGENT, "keeld")
            .body(Empty::<Bytes>::new())
            .map_err(|source| DownloadError::Request {
                url: url.into(),
                source,
            })?;
        let mut response = self
            .waits
            .on("waiting for the response", sender.send_request(request))
            .await?
            .map_err(|source| DownloadError::Http {
                url: url.into(),
                source,
            })?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(no Location given)");
            return Err(DownloadError::Redirect {
                url: url.into(),
                status,
                location: location.into(),
            });
        }
        if !status.is_success() {
            return Err(DownloadError::Status {
                url: url.into(),
                status,
            });
        }
        let total = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Counted against the quota from now on, by concurrent imports too.
        let mut next_check = 0;
        if let Some(total) = total {
            self.reserve(total);
            self.room(total, total)?;
            next_check = CHECK_EVERY;
        }
        let mut sink = Sink::create(self.to, total)
            .await
            .map_err(|e| DownloadError::Write(Box::new(e)))?;
        let body = response.body_mut();
        while let Some(frame) = self.waits.on("reading the data", body.frame()).await? {
            let frame = frame.map_err(|source| DownloadError::Body {
                url: url.into(),
                source,
            })?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            let after = sink.written + chunk.len() as u64;
            if let Some(total) = total
                && after > total
            {
                return Err(DownloadError::TooMuch {
                    url: url.into(),
                    total,
                });
            }
            if after > next_check {
                match total {
                    // What is left must still fit (other imports and disks
                    // take space too).
                    Some(total) => self.room(total, total - sink.written)?,
                    None => {
                        let upto = after + CHECK_EVERY;
                        self.reserve(upto);
                        self.room(upto, upto - sink.written)?;
                    }
                }
                next_check = after + CHECK_EVERY;
            }
            sink.write(chunk, self.keel, self.id, Some(self.op))
                .await
                .map_err(|e| DownloadError::Write(Box::new(e)))?;
        }
        if let Some(total) = total
            && sink.written != total
        {
            return Err(DownloadError::Short {
                url: url.into(),
                got: sink.written,
                total,
            });
        }
        sink.finish()
            .await
            .map_err(|e| DownloadError::Write(Box::new(e)))
    }

    /// Records that the import will take `bytes`.
    fn reserve(&self, bytes: u64) {
        let _ = self.keel.images.update::<StoreError>(self.id, |img| {
            img.reserved = bytes;
            Ok(())
        });
    }

    /// Whether an image of `size` bytes fits the project's quota, with
    /// `to_come` of them still to be written on the host's file system.
    fn room(&self, size: u64, to_come: u64) -> Result<(), DownloadError> {
        let checked = match crate::quota::check_image(self.keel, self.project, self.id, size) {
            // The quota allows it; what is written already takes space.
            Err(QuotaError::NoSpace { .. }) if to_come < size => {
                crate::quota::check_space(&self.keel.paths.images(), to_come)
            }
            other => other,
        };
        checked.map_err(|source| DownloadError::Room {
            url: self.url.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(scheme: Scheme, host: &str, port: u16, path: &str) -> HttpUrl {
        HttpUrl {
            scheme,
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn urls() {
        use Scheme::*;
        assert_eq!(
            parse_http_url("http://10.0.0.1:8000/a/b.img").unwrap(),
            url(Http, "10.0.0.1", 8000, "/a/b.img")
        );
        assert_eq!(
            parse_http_url("http://host").unwrap(),
            url(Http, "host", 80, "/")
        );
        assert_eq!(
            parse_http_url("https://Example.COM/x?y=1#frag").unwrap(),
            url(Https, "example.com", 443, "/x?y=1")
        );
        assert_eq!(
            parse_http_url("HTTPS://h:8443?q").unwrap(),
            url(Https, "h", 8443, "/?q")
        );
        assert_eq!(
            parse_http_url("http://[::1]:8080/disk.raw").unwrap(),
            url(Http, "::1", 8080, "/disk.raw")
        );
        assert_eq!(
            parse_http_url("https://[2001:DB8::1]").unwrap(),
            url(Https, "2001:db8::1", 443, "/")
        );
        assert!(parse_http_url("ftp://host/x").is_err());
        assert!(parse_http_url("http://:80/x").is_err());
        assert!(parse_http_url("http://h:99999/x").is_err());
        assert!(parse_http_url("http://h:0/x").is_err());
        assert!(parse_http_url("http://h:/x").is_err());
        assert!(parse_http_url("http://::1/x").is_err());
        assert!(parse_http_url("http://[::1/x").is_err());
        assert!(parse_http_url("http://[::1]x/x").is_err());
        assert!(parse_http_url("http://[zz]/x").is_err());
        assert!(parse_http_url("http://user:pw@h/x").is_err());
        assert!(parse_http_url("http://h/a b").is_err());
        assert!(parse_http_url("http://h\r\nX: y/").is_err());
    }

    #[test]
    fn host_headers() {
        let a = |s| parse_http_url(s).unwrap().authority();
        assert_eq!(a("http://h/x"), "h");
        assert_eq!(a("http://h:8080/x"), "h:8080");
        assert_eq!(a("https://h:443/x"), "h");
        assert_eq!(a("https://h:80/x"), "h:80");
        assert_eq!(a("http://[::1]:8080/"), "[::1]:8080");
        assert_eq!(a("http://[::1]/"), "[::1]");
    }

    #[test]
    fn address_blocks() {
        let c: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(c.contains("127.1.2.3".parse().unwrap()));
        assert!(!c.contains("128.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        assert!(!c.contains("fe80::1".parse().unwrap()));
        let one: Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(one.to_string(), "10.1.2.3/32");
        assert!(one.contains("10.1.2.3".parse().unwrap()));
        assert!(!one.contains("10.1.2.4".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("255.255.255.255".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("::1".parse().unwrap()));
        assert!(
            "127.0.0.1/8"
                .parse::<Cidr>()
                .unwrap_err()
                .to_string()
                .contains("127.0.0.0/8")
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("localhost/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
    }

    #[test]
    fn denied_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let own = [ip("192.0.2.7"), ip("2001:db8::7")];
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::169.254.169.254",
            "192.0.2.7",
            "::ffff:192.0.2.7",
            "2001:db8::7",
        ] {
            let e = check_address(ip(bad), &[], &own).unwrap_err().to_string();
            assert!(e.contains("--url-import-allow"), "{bad}: {e}");
        }
        for good in [
            "93.184.216.34",
            "10.0.0.1",
            "192.168.1.1",
            "2606:2800:220:1::1",
            "fd00::1",
            "fec0::1",
            "::ffff:93.184.216.34",
        ] {
            assert!(check_address(ip(good), &[], &own).is_ok(), "{good}");
        }
        let allow: Vec<Cidr> = vec!["127.0.0.0/8".parse().unwrap(), "fe80::/10".parse().unwrap()];
        assert!(check_address(ip("127.0.0.1"), &allow, &own).is_ok());
        assert!(check_address(ip("::ffff:127.0.0.1"), &allow, &own).is_ok());
        assert!(check_address(ip("fe80::1"), &allow, &own).is_ok());
        assert!(check_address(ip("::1"), &allow, &own).is_err());
        assert!(check_address(ip("169.254.169.254"), &allow, &own).is_err());
        let e = check_address(ip("169.254.169.254"), &[], &own)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a link-local address"), "{e}");
        let e = check_address(ip("192.0.2.7"), &[], &own)
            .unwrap_err()
            .to_string();
        assert!(e.contains("this node's own"), "{e}");
    }

    #[test]
    fn own_addresses_include_loopback() {
        let own = own_addresses();
        assert!(own.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{own:?}");
    }
}
