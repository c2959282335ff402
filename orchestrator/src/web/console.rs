//! The VM's serial console: its output as kept in `serial.log`, and an
//! interactive session over a WebSocket (output streamed from the log, keys
//! written to the VMM's console FIFO).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use keel_api::keeld::ConsoleTicket;
use serde::Deserialize;

use super::access::find_vm;
use super::idempotency::SecretReply;
use super::{ApiError, ApiResult, Caller};
use crate::auth::{Access, tickets};
use crate::control::console::{self, ConsoleStream};
use crate::keel::Keel;

/// What a new console session is shown of the past.
const BACKLOG: u64 = 16 << 10;

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
    let bytes = console::serial_tail(&keel, &vm.id, q.bytes.unwrap_or(64 << 10).min(16 << 20));
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
        Json(ConsoleTicket {
            path: format!("/api/v1/vms/{}/console?ticket={secret}", vm.id),
            ticket: secret,
            expires_in: tickets::TTL.as_secs(),
        }),
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
    let stream = console::open(&keel, &vm.id, BACKLOG);
    // Pings make a live client answer before keeld's client timeout.
    let ping_every = keel.config.client_timeout / 3;
    Ok(upgrade.on_upgrade(move |socket| session(socket, stream, ping_every)))
}

async fn session(socket: WebSocket, mut console: ConsoleStream, ping_every: Duration) {
    let (mut tx, mut rx) = socket.split();
    let output = async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        loop {
            tokio::select! {
                chunk = console.output.recv() => {
                    let Some(chunk) = chunk else { return };
                    if tx.send(Message::Binary(chunk.into())).await.is_err() {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if tx.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
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
            if console.input.send(bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = keys => {}
    }
}
