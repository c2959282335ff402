//! `Idempotency-Key`: a mutating request sent again with the same key (by
//! the same user) gets the first answer again instead of being run twice.
//! Concurrent requests with one key wait for the first; a key reused for a
//! different request is refused.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, Caller};
use crate::keel::Keel;
use crate::model::{IdempotentReply, now};

pub const HEADER: &str = "idempotency-key";
/// Answers kept for replay are at most this large.
const MAX_BODY: usize = 1 << 20;
/// Keys are remembered this long (a client retrying after a day is making
/// a new request).
const KEEP_SECS: u64 = 24 * 3600;

pub async fn layer(State(keel): State<Arc<Keel>>, req: Request, next: Next) -> Response {
    let mutating = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let key = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let caller = req.extensions().get::<Caller>().cloned();
    let (Some(key), Some(caller), true) = (key, caller, mutating) else {
        return next.run(req).await;
    };
    if key.is_empty() || key.len() > 255 {
        return ApiError::bad_request("Idempotency-Key must be 1 to 255 characters")
            .into_response();
    }
    let id = hex::encode(Sha256::digest(format!("{}\n{key}", caller.user.id)));
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let lock = keel
        .idempotency_locks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.clone())
        .or_default()
        .clone();
    let _guard = lock.lock().await;
    if let Some(first) = keel.idempotency.get(&id) {
        if first.method != method || first.path != path {
            return ApiError::unprocessable(format!(
                "Idempotency-Key {key:?} was used for {} {}; use a new key for a different \
                 request",
                first.method, first.path
            ))
            .into_response();
        }
        return replay(&first);
    }
    let response = next.run(req).await;
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::internal("The answer was too large to keep for replay")
                .into_response();
        }
    };
    // Server errors may be transient: a retry with the same key runs again.
    if !parts.status.is_server_error() {
        let reply = IdempotentReply {
            id,
            method,
            path,
            status: parts.status.as_u16(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
            created_at: now(),
        };
        let cutoff = now().saturating_sub(KEEP_SECS);
        for old in keel.idempotency.filter(|r| r.created_at < cutoff) {
            let _ = keel.idempotency.remove(&old.id);
        }
        if let Err(e) = keel.idempotency.insert(reply) {
            log::error!("Cannot keep the answer for Idempotency-Key {key:?}: {e}");
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn replay(first: &IdempotentReply) -> Response {
    let status = StatusCode::from_u16(first.status).unwrap_or(StatusCode::OK);
    let mut response = (status, first.body.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
