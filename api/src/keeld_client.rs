//! A blocking client for keeld's web API (what the `keel` CLI and the tests
//! use): JSON requests with a bearer token, `Idempotency-Key` when asked,
//! streamed uploads, and waiting on operations.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeeldError {
    #[error("{0:?} is not a server address; give http://HOST:PORT")]
    BadServer(String),
    #[error("Cannot reach keeld at {server}: is `keeld serve` running there?")]
    Connect {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("The connection to keeld failed")]
    Io(#[source] io::Error),
    #[error("keeld's answer is not valid HTTP: {0}")]
    Http(String),
    #[error("keeld answered {status}: {message}")]
    Server { status: u16, message: String },
    #[error("Operation {id} failed: {message}")]
    OperationFailed { id: String, message: String },
    #[error("Operation {id} did not finish within {timeout:?}")]
    OperationTimeout { id: String, timeout: Duration },
    #[error("Cannot read {path}")]
    File {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// An answer: status and JSON body (`Null` when empty or not JSON; the
/// text is kept in `text`).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// The body, or the server's error as [`KeeldError::Server`].
    pub fn ok(self) -> Result<Value, KeeldError> {
        if self.status < 300 {
            return Ok(self.body);
        }
        let message = self.body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(self.text);
        Err(KeeldError::Server {
            status: self.status,
            message,
        })
    }
}

#[derive(Clone, Debug)]
pub struct KeeldClient {
    host: String,
    token: Option<String>,
    timeout: Duration,
}

impl KeeldClient {
    /// `server`: `http://HOST:PORT` (or `HOST:PORT`).
    pub fn new(server: &str) -> Result<Self, KeeldError> {
        let host = server
            .strip_prefix("http://")
            .unwrap_or(server)
            .trim_end_matches('/')
            .to_string();
        if host.is_empty() || host.contains('/') || !host.contains(':') {
            return Err(KeeldError::BadServer(server.to_string()));
        }
        Ok(KeeldClient {
            host,
            token: None,
            timeout: Duration::from_secs(60),
        })
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn server(&self) -> String {
        format!("http://{}", self.host)
    }

    fn connect(&self) -> Result<TcpStream, KeeldError> {
        let stream = TcpStream::connect(&self.host).map_err(|source| KeeldError::Connect {
            server: self.host.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(KeeldError::Io)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn head(&self, method: &str, path: &str, headers: &[(&str, &str)], length: u64) -> String {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {length}\r\n",
            self.host
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    /// One request; any status is returned as a [`Reply`].
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, KeeldError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !body.is_empty() {
            all.push(("Content-Type", "application/json"));
        }
        let mut stream = self.connect()?;
        let mut wire = self
            .head(method, path, &all, body.len() as u64)
            .into_bytes();
        wire.extend_from_slice(body.as_bytes());
        stream.write_all(&wire).map_err(KeeldError::Io)?;
        read_reply(stream)
    }

    pub fn get(&self, path: &str) -> Result<Value, KeeldError> {
        self.send("GET", path, None, &[])?.ok()
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, KeeldError> {
        self.send("POST", path, Some(body), &[])?.ok()
    }

    /// Streams a file as the body of a PUT, calling `progress(sent, total)`.
    pub fn upload(
        &self,
        path: &str,
        file: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Reply, KeeldError> {
        let file_err = |source| KeeldError::File {
            path: file.display().to_string(),
            source,
        };
        let mut src = std::fs::File::open(file).map_err(file_err)?;
        let total = src.metadata().map_err(file_err)?.len();
        let mut stream = self.connect()?;
        let head = self.head(
            "PUT",
            path,
            &[("Content-Type", "application/octet-stream")],
            total,
        );
        stream.write_all(head.as_bytes()).map_err(KeeldError::Io)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(file_err)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n]).map_err(KeeldError::Io)?;
            sent += n as u64;
            progress(sent, total);
        }
        read_reply(stream)
    }

    /// Logs in and keeps the session token.
    pub fn login(&mut self, user: &str, password: &str) -> Result<Value, KeeldError> {
        let reply = self.post(
            "/api/v1/login",
            &serde_json::json!({"username": user, "password": password}),
        )?;
        self.token = reply["token"].as_str().map(str::to_string);
        Ok(reply)
    }

    /// Polls an operation until it ends, calling `progress(percent)`;
    /// a failed operation is an error carrying its message.
    pub fn wait_operation(
        &self,
        id: &str,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<Value, KeeldError> {
        let start = Instant::now();
        loop {
            let op = self.get(&format!("/api/v1/operations/{id}?wait=1"))?;
            progress(op["progress"].as_u64().unwrap_or(0));
            match op["status"].as_str() {
                Some("succeeded") => return Ok(op),
                Some("failed") => {
                    return Err(KeeldError::OperationFailed {
                        id: id.to_string(),
                        message: op["error"].as_str().unwrap_or("").to_string(),
                    });
                }
                _ => {}
            }
            if start.elapsed() > timeout {
                return Err(KeeldError::OperationTimeout {
                    id: id.to_string(),
                    timeout,
                });
            }
        }
    }
}

fn read_reply(stream: TcpStream) -> Result<Reply, KeeldError> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(KeeldError::Io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| KeeldError::Http(format!("bad status line {line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(KeeldError::Io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut raw = Vec::new();
    match (chunked, length) {
        (false, Some(n)) => {
            raw.resize(n, 0);
            reader.read_exact(&mut raw).map_err(KeeldError::Io)?;
        }
        (true, _) => loop {
            line.clear();
            reader.read_line(&mut line).map_err(KeeldError::Io)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| KeeldError::Http(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let at = raw.len();
            raw.resize(at + size, 0);
            reader.read_exact(&mut raw[at..]).map_err(KeeldError::Io)?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).map_err(KeeldError::Io)?;
        },
        (false, None) => {
            reader.read_to_end(&mut raw).map_err(KeeldError::Io)?;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply { status, body, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            KeeldClient::new("http://127.0.0.1:8080/").unwrap().server(),
            "http://127.0.0.1:8080"
        );
        assert!(KeeldClient::new("127.0.0.1:8080").is_ok());
        assert!(KeeldClient::new("http://host").is_err());
        assert!(KeeldClient::new("http://h:1/x").is_err());
    }

    #[test]
    fn server_errors_carry_the_message() {
        let r = Reply {
            status: 404,
            body: serde_json::json!({"error": "No VM x"}),
            text: String::new(),
        };
        let e = r.ok().unwrap_err();
        assert_eq!(e.to_string(), "keeld answered 404: No VM x");
    }
}
