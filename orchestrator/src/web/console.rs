//! The VM's serial console: its output as kept in `serial.log`, and an
//! interactive session over a WebSocket (output streamed from the log, keys
//! written to the VMM's console FIFO).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::access::find_vm;
use super::idempotency::SecretReply;
use super::{ApiError, ApiResult, Caller};
use crate::agent;
use crate::agent::process::{VmFiles, serial_tail, tail};
use crate::auth::{Access, tickets};
use crate::keel::Keel;

/// What a new console session is shown of the past.
const BACKLOG: u64 = 16 << 10;
const POLL: Duration = Duration::from_millis(30);

#[derive(Deserialize)]
pub struct Params {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    bytes: Option<u64>,
    /// A console ticket, for browsers (which cannot send a header).
    #[serde(default)]
    ticket: Option<String>,
}

pub async fn serial_log(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> ApiResult<Response> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Read)?;
    let bytes = serial_tail(
        &agent::files(&keel, &vm.id),
        q.bytes.unwrap_or(64 << 10).min(16 << 20),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

/// A ticket that opens this VM's console once, within a minute, as the
/// caller: `GET vms/{id}/console?ticket=...`.
pub async fn ticket(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> ApiResult<Response> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    let Some(secret) = keel
        .console_tickets
        .issue(&caller.user.id, &vm.id, Instant::now())
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many console tickets outstanding; try again in a minute",
        ));
    };
    let mut response = (
        StatusCode::CREATED,
        Json(json!({
            "ticket": secret,
            "expires_in": tickets::TTL.as_secs(),
            "path": format!("/api/v1/vms/{}/console?ticket={secret}", vm.id),
        })),
    )
        .into_response();
    response.extensions_mut().insert(SecretReply);
    Ok(response)
}

pub async fn websocket(
    State(keel): State<Arc<Keel>>,
    caller: Option<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Params>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let unauthenticated = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Open the console with `Authorization: Bearer TOKEN`, or with ?ticket= from POST \
             /api/v1/vms/{id}/console/ticket (single use, 60 s)",
        )
    };
    let (caller, ticket_vm) = match (caller, &q.ticket) {
        (Some(caller), _) => (caller, None),
        (None, Some(secret)) => {
            let (user, vm) = keel
                .console_tickets
                .redeem(secret, Instant::now())
                .ok_or_else(unauthenticated)?;
            let user = keel.users.get(&user).ok_or_else(unauthenticated)?;
            (
                Caller {
                    user,
                    token: String::new(),
                },
                Some(vm),
            )
        }
        (None, None) => return Err(unauthenticated()),
    };
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if ticket_vm.is_some_and(|t| t != vm.id) {
        return Err(unauthenticated());
    }
    let files = agent::files(&keel, &vm.id);
    // Pings make a live client answer before keeld's client timeout.
    let ping_every = keel.config.client_timeout / 3;
    Ok(upgrade.on_upgrade(move |socket| session(socket, files, ping_every)))
}

/// Keys for the VMM's terminal: its escape key (Ctrl-A) is doubled, so a
/// web user types a literal Ctrl-A and cannot quit the VMM.
pub fn escape_keys(keys: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len());
    for &b in keys {
        out.push(b);
        if b == 0x01 {
            out.push(0x01);
        }
    }
    out
}

async fn session(socket: WebSocket, files: VmFiles, ping_every: Duration) {
    let (serial, input) = (files.serial(), files.console_in());
    let (mut tx, mut rx) = socket.split();
    let (backlog, mut offset) = tail(&serial, BACKLOG);
    if !backlog.is_empty() && tx.send(Message::Binary(backlog.into())).await.is_err() {
        return;
    }
    let output = async move {
        let mut pinged = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(POLL).await;
            if pinged.elapsed() >= ping_every {
                pinged = tokio::time::Instant::now();
                if tx.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            let size = std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0);
            if size < offset {
                // Rotated: what came after `offset` is at the end of the
                // old file.
                let old = files.serial_old();
                let rest = std::fs::metadata(&old).map(|m| m.len()).unwrap_or(0);
                let (chunk, _) = tail(&old, rest.saturating_sub(offset));
                if !chunk.is_empty() && tx.send(Message::Binary(chunk.into())).await.is_err() {
                    return;
                }
                offset = 0;
            }
            if size > offset {
                let (chunk, _) = tail(&serial, size - offset);
                offset = size;
                if tx.send(Message::Binary(chunk.into())).await.is_err() {
                    return;
                }
            }
        }
    };
    let keys = async move {
        while let Some(Ok(msg)) = rx.next().await {
            let bytes = match msg {
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Binary(b) => b.to_vec(),
                Message::Close(_) => return,
                _ => continue,
            };
            // Non-blocking: with no VMM reading (the VM is off) the keys
            // are dropped instead of hanging the session.
            let fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&input);
            if let Ok(mut fifo) = fifo {
                let _ = fifo.write_all(&escape_keys(&bytes));
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = keys => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_is_doubled() {
        assert_eq!(escape_keys(b"ab\x01x"), b"ab\x01\x01x");
        assert_eq!(escape_keys(b""), b"");
    }
}
