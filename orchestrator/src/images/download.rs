//! Image bytes from an http URL.

use std::path::Path;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use super::Sink;
use crate::keel::Keel;
use crate::operations::Progress;

/// `http://host[:port]/path` → (host, port, path).
pub fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    if url.starts_with("https://") {
        return Err(format!(
            "{url}: https is not supported yet; download the file and import it by path or \
             upload it"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url}: bad port {p:?}"))?,
        ),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host.to_string(), port, path.to_string()))
}

pub(super) async fn download(
    keel: &Keel,
    id: &str,
    url: &str,
    to: &Path,
    op: &Progress,
) -> Result<(u64, String), String> {
    let (host, port, path) = parse_http_url(url)?;
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("Cannot connect to {host}:{port}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get(&path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::USER_AGENT, "keeld")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: the server answered {}", response.status()));
    }
    let total = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut sink = Sink::create(to, total).await?;
    let body = response.body_mut();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{url}: the download failed: {e}"))?;
        if let Some(chunk) = frame.data_ref() {
            sink.write(chunk, keel, id, Some(op)).await?;
        }
    }
    if let Some(total) = total
        && sink.written != total
    {
        return Err(format!(
            "{url}: the download was cut short ({} of {total} bytes)",
            sink.written
        ));
    }
    sink.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://10.0.0.1:8000/a/b.img").unwrap(),
            ("10.0.0.1".into(), 8000, "/a/b.img".into())
        );
        assert_eq!(
            parse_http_url("http://host").unwrap(),
            ("host".into(), 80, "/".into())
        );
        assert!(
            parse_http_url("https://host/x")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_http_url("ftp://host/x").is_err());
        assert!(parse_http_url("http://:80/x").is_err());
        assert!(parse_http_url("http://h:99999/x").is_err());
    }

}
