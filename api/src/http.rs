//! The HTTP/1.1 subset spoken on a VMM's API socket, both ways: parsing a
//! request head (server) and a response (client), and writing either.
//!
//! Parsing works on bytes already read, so the server decides how to read
//! (timeouts, file descriptors passed with the first bytes) and the parser
//! can be fuzzed on its own. Limits are part of the protocol here: a head
//! larger than [`MAX_HEAD_LEN`] or a body larger than [`MAX_BODY_LEN`] is
//! refused before it is buffered.

use std::fmt::Write as _;

use thiserror::Error;

/// Largest request or response head (request line and headers).
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Largest body accepted: a VM configuration is a few KiB.
pub const MAX_BODY_LEN: usize = 1024 * 1024;
/// Most header lines in one head.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("the request head is larger than {MAX_HEAD_LEN} bytes")]
    HeadTooLarge,
    #[error("the body is {0} bytes; at most {MAX_BODY_LEN} are accepted")]
    BodyTooLarge(usize),
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    #[error("HTTP version {0} is not supported (HTTP/1.0 and HTTP/1.1 are)")]
    Version(String),
    #[error("Transfer-Encoding {0} is not supported; send Content-Length")]
    TransferEncoding(String),
}

impl HttpError {
    /// The status a server answers this with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::Malformed(_) => 400,
            HttpError::Version(_) => 505,
            HttpError::TransferEncoding(_) => 501,
        }
    }
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

/// A request line and the headers the API cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The target without its query string.
    pub path: String,
    pub content_length: usize,
    /// `Expect: 100-continue`: the client waits for a 100 before the body.
    pub expect_continue: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// Where the head ends (the index just past its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A head's first line and its `name: value` headers.
type SplitHead<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// Splits a head into its first line and its headers.
fn split_head(head: &[u8]) -> Result<SplitHead<'_>, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| malformed("the head is not UTF-8"))?;
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line without ':': {line:?}")))?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(malformed(format!("bad header name {name:?}")));
        }
        headers.push((name, value.trim()));
    }
    Ok((first, headers))
}

fn parse_length(value: &str) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!(
            "Content-Length {value:?} is not a number"
        )));
    }
    // More digits than usize holds is certainly too large.
    value
        .parse()
        .map_err(|_| HttpError::BodyTooLarge(usize::MAX))
}

/// Parses a request head from the start of `buf`. `Ok(None)`: the head is
/// not complete yet, read more. `Ok(Some((head, n)))`: the body starts at
/// `buf[n]`.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let Some(end) = head_end(buf) else {
        if buf.len() > MAX_HEAD_LEN {
            return Err(HttpError::HeadTooLarge);
        }
        return Ok(None);
    };
    if end > MAX_HEAD_LEN {
        return Err(HttpError::HeadTooLarge);
    }
    let (first, headers) = split_head(&buf[..end])?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(format!("bad request line {first:?}")));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed(format!("bad method {method:?}")));
    }
    if !target.starts_with('/') {
        return Err(malformed(format!("bad request target {target:?}")));
    }
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        other => return Err(HttpError::Version(other.to_string())),
    };
    let mut content_length = None;
    let mut expect_continue = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_length(value)?;
            if content_length.is_some_and(|l| l != len) {
                return Err(malformed("conflicting Content-Length headers"));
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("identity") {
                return Err(HttpError::TransferEncoding(value.to_string()));
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY_LEN {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Some((
        RequestHead {
            method: method.to_string(),
            path,
            content_length,
            expect_continue,
            keep_alive,
        },
        end,
    )))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A response: a status and, unless it is 204, a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: Vec::new(),
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response { status, body }
    }

    /// An error: Cloud Hypervisor's body, a JSON array of messages from
    /// the outermost error to its root cause.
    pub fn error(status: u16, messages: &[String]) -> Self {
        let body = serde_json::to_vec(messages).unwrap_or_default();
        Response { status, body }
    }

    /// The bytes on the wire. The reason phrase is empty, as Cloud
    /// Hypervisor writes it: its `ch-remote` takes everything between
    /// `HTTP/1.1 ` and the first `\r` as the status code.
    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} \r\n", self.status);
        head.push_str("Server: keel-vmm\r\n");
        if self.status != 204 && self.status >= 200 {
            let _ = write!(
                head,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                self.body.len()
            );
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut out = head.into_bytes();
        if self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A request on the wire, as a client sends it.
pub fn encode_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: usize,
    pub keep_alive: bool,
}

/// Parses a response head from the start of `buf`, as
/// [`parse_request_head`] does a request's.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let Some(end) = head_end(buf) else {
        if buf.len() > MAX_HEAD_LEN {
            return Err(HttpError::HeadTooLarge);
        }
        return Ok(None);
    };
    let (first, headers) = split_head(&buf[..end])?;
    let mut parts = first.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Version(version.to_string()));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| malformed(format!("bad status line {first:?}")))?;
    let mut content_length = 0;
    let mut keep_alive = version == "HTTP/1.1";
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            content_length = parse_length(value)?;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    if content_length > MAX_BODY_LEN {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    Ok(Some((
        ResponseHead {
            status,
            content_length,
            keep_alive,
        },
        end,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a reply the way Cloud Hypervisor v53's `api_client` does:
    /// the status is the text from `HTTP/1.1 ` to the first CR, trimmed;
    /// `Content-Length: ` is found by exact spelling; without it the body
    /// is absent.
    fn parse_like_ch_remote(raw: &str) -> Result<(u16, Option<String>), String> {
        let at = raw.find("HTTP/1.1").ok_or("missing protocol")?;
        let line_end = at + raw[at..].find('\r').ok_or("no CR")?;
        let status = raw[at + "HTTP/1.1 ".len()..line_end]
            .trim()
            .parse::<u16>()
            .map_err(|e| format!("Error parsing HTTP status code: {e}"))?;
        let head_end = raw.find("\r\n\r\n").ok_or("no end of headers")? + 4;
        let length = match raw.find("Content-Length: ") {
            Some(o) => {
                let value =
                    &raw[o + "Content-Length: ".len()..o + raw[o..].find('\r').ok_or("no CR")?];
                Some(value.trim().parse::<usize>().map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let body = length.map(|n| raw[head_end..head_end + n].to_string());
        Ok((status, body))
    }

    #[test]
    fn replies_parse_the_way_ch_remote_parses_them() {
        for (status, body) in [
            (200, br#"{"build_version":"keel"}"#.to_vec()),
            (204, Vec::new()),
            (400, br#"["bad","worse"]"#.to_vec()),
            (404, b"[]".to_vec()),
            (500, br#"["boom"]"#.to_vec()),
        ] {
            for keep_alive in [true, false] {
                let raw = Response {
                    status,
                    body: body.clone(),
                }
                .encode(keep_alive);
                let raw = String::from_utf8(raw).unwrap();
                let (parsed, parsed_body) = parse_like_ch_remote(&raw).unwrap();
                assert_eq!(parsed, status, "{raw:?}");
                if status == 204 {
                    assert_eq!(parsed_body, None, "{raw:?}");
                } else {
                    assert_eq!(parsed_body.as_deref().map(str::as_bytes), Some(&body[..]));
                }
                assert!(
                    raw.starts_with(&format!("HTTP/1.1 {status} \r\n")),
                    "{raw:?}"
                );
            }
        }
        // What keel-vmm wrote before: the reason phrase broke ch-remote.
        assert!(parse_like_ch_remote("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn ch_remote_shaped_request_parses() {
        // What ch-remote writes: no Content-Type, Content-Length after Accept.
        let raw = b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 19\r\n\r\n{\"desired_vcpus\":2}";
        let (head, at) = parse_request_head(raw).unwrap().unwrap();
        assert_eq!(head.method, "PUT");
        assert_eq!(head.path, "/api/v1/vm.resize");
        assert_eq!(head.content_length, 19);
        assert!(head.keep_alive);
        assert_eq!(&raw[at..], b"{\"desired_vcpus\":2}");
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(
            parse_request_head(b"GET /api/v1/vm.info HTTP/1.1\r\n"),
            Ok(None)
        );
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let big = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_LEN + 1
        );
        assert_eq!(
            parse_request_head(big.as_bytes()),
            Err(HttpError::BodyTooLarge(MAX_BODY_LEN + 1))
        );
        let huge = b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(matches!(
            parse_request_head(huge),
            Err(HttpError::BodyTooLarge(_))
        ));
        let endless = vec![b'a'; MAX_HEAD_LEN + 1];
        assert_eq!(parse_request_head(&endless), Err(HttpError::HeadTooLarge));
        for bad in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"get /x HTTP/1.1\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1 extra\r\n\r\n",
            b"GET /x HTTP/1.1\r\nno-colon\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET /x HTTP/1.1\r\n\xff: x\r\n\r\n",
        ] {
            assert_eq!(
                parse_request_head(bad).map_err(|e| e.status()),
                Err(400),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_request_head(b"GET /x HTTP/2.0\r\n\r\n").map_err(|e| e.status()),
            Err(505)
        );
        assert_eq!(
            parse_request_head(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .map_err(|e| e.status()),
            Err(501)
        );
    }

    #[test]
    fn connection_and_expect_headers() {
        let (h, _) = parse_request_head(
            b"PUT /x?y=1 HTTP/1.1\r\nconnection: close\r\nEXPECT: 100-continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive && h.expect_continue);
        assert_eq!(h.path, "/x");
        let (h, _) = parse_request_head(b"GET /x HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::json(200, b"{\"a\":1}".to_vec());
        let wire = r.encode(true);
        let (head, at) = parse_response_head(&wire).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&wire[at..at + head.content_length], b"{\"a\":1}");
        let wire = Response::no_content().encode(false);
        let (head, at) = parse_response_head(&wire).unwrap().unwrap();
        assert_eq!(
            (head.status, head.content_length, head.keep_alive),
            (204, 0, false)
        );
        assert_eq!(at, wire.len());
        let wire = Response::error(405, &["no".into(), "because".into()]).encode(true);
        let (_, at) = parse_response_head(&wire).unwrap().unwrap();
        assert_eq!(&wire[at..], b"[\"no\",\"because\"]");
    }

    #[test]
    fn requests_round_trip() {
        let wire = encode_request("PUT", "/api/v1/vm.create", Some(b"{}"));
        let (head, at) = parse_request_head(&wire).unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.content_length), ("PUT", 2));
        assert_eq!(&wire[at..], b"{}");
    }
}
