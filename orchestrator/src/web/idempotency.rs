//! `Idempotency-Key`: a mutating request sent again with the same key (by
//! the same user) gets the first answer again instead of being run twice.
//! Concurrent requests with one key wait for the first; a key reused for a
//! different request (method, path or body) is refused with 422.
//!
//! Only answers that succeeded (2xx) are kept: a refused request changed
//! nothing, so running it again is harmless, and a caller without the right
//! to act cannot fill the store. Kept answers expire after a day, and each
//! user keeps at most [`MAX_PER_USER`]. An answer that showed a secret
//! once (a new API token) is kept without it; its replay says so.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, Caller};
use crate::keel::Keel;
use crate::model::{IdempotentReply, now};

pub const HEADER: &str = "idempotency-key";
/// Request bodies hashed into the fingerprint are at most this large; a
/// longer one (a streamed upload with a Content-Length) is matched by its
/// length.
const MAX_HASHED_BODY: usize = 1 << 20;
/// Answers kept for replay are at most this large.
const MAX_BODY: usize = 1 << 20;
/// Keys are remembered this long (a client retrying after a day is making
/// a new request).
const KEEP_SECS: u64 = 24 * 3600;
/// How long a repeat waits for the first request with its key to end.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Answers kept per user; the oldest go first.
pub const MAX_PER_USER: usize = 1000;

/// Set by a handler whose answer shows a secret once.
#[derive(Clone, Copy)]
pub struct SecretReply;

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
    let (req, body_part) = match body_for_fingerprint(req).await {
        Ok(split) => split,
        Err(e) => return e.into_response(),
    };
    let fingerprint = {
        let mut h = Sha256::new();
        for part in [
            method.as_bytes(),
            path.as_bytes(),
            caller.user.id.as_bytes(),
        ] {
            h.update(part);
            h.update(b"\n");
        }
        h.update(&body_part);
        hex::encode(h.finalize())
    };
    let lock = keel
        .idempotency_locks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.clone())
        .or_default()
        .clone();
    let response = match tokio::time::timeout(LOCK_WAIT, lock.lock()).await {
        Ok(_guard) => run_once(&keel, req, next, &key, id.clone(), &caller, fingerprint).await,
        Err(_) => ApiError::conflict(format!(
            "A request with Idempotency-Key {key:?} is still running; retry later with the \
             same key to get its answer"
        ))
        .into_response(),
    };
    // The lock goes with its last user, so the map holds only keys in use.
    let mut locks = keel
        .idempotency_locks
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    drop(lock);
    if locks.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
        locks.remove(&id);
    }
    response
}

/// What of the body goes into the fingerprint: the body itself when it is
/// small (and the request carries it on), else its declared length.
async fn body_for_fingerprint(req: Request) -> Result<(Request, Vec<u8>), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > MAX_HASHED_BODY as u64
    {
        return Ok((req, format!("length:{len}").into_bytes()));
    }
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, MAX_HASHED_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "A request with an Idempotency-Key and no Content-Length may carry at most 1 \
                 MiB; give the Content-Length of a larger upload",
            )
        })?;
    let mut fp = b"body:".to_vec();
    fp.extend_from_slice(&bytes);
    Ok((Request::from_parts(parts, Body::from(bytes)), fp))
}

async fn run_once(
    keel: &Keel,
    req: Request,
    next: Next,
    key: &str,
    id: String,
    caller: &Caller,
    fingerprint: String,
) -> Response {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    if let Some(first) = keel.idempotency.get(&id) {
        let same = first.method == method
            && first.path == path
            && (first.fingerprint.is_empty() || first.fingerprint == fingerprint);
        if !same {
            return ApiError::unprocessable(format!(
                "Idempotency-Key {key:?} was used for another request ({} {}, or another \
                 body); use a new key for a different request",
                first.method, first.path
            ))
            .into_response();
        }
        return replay(&first);
    }
    let response = next.run(req).await;
    if !response.status().is_success() {
        return response;
    }
    let secret = response.extensions().get::<SecretReply>().is_some();
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::internal("The answer was too large to keep for replay")
                .into_response();
        }
    };
    let kept = if secret {
        redact(&bytes)
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    forget_old(keel, &caller.user.id);
    let reply = IdempotentReply {
        id,
        user: caller.user.id.clone(),
        method,
        path,
        fingerprint,
        status: parts.status.as_u16(),
        body: kept,
        secret,
        created_at: now(),
    };
    if let Err(e) = keel.idempotency.insert(reply) {
        log::error!("Cannot keep the answer for Idempotency-Key {key:?}: {e}");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The answer without its secret: the top-level `token` (an API token) or
/// `ticket` (a console ticket) goes, and so does any other field that
/// repeats it (a ticket's `path`).
fn redact(bytes: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(mut m)) => {
            let secrets: Vec<String> = ["token", "ticket"]
                .iter()
                .filter_map(|k| m.remove(*k))
                .filter_map(|v| v.as_str().map(str::to_string))
                .filter(|s| !s.is_empty())
                .collect();
            m.retain(|_, v| {
                !v.as_str()
                    .is_some_and(|v| secrets.iter().any(|s| v.contains(s.as_str())))
            });
            serde_json::Value::Object(m).to_string()
        }
        _ => "{}".into(),
    }
}

/// Expired answers go, and the user's oldest past their allowance.
fn forget_old(keel: &Keel, user: &str) {
    let cutoff = now().saturating_sub(KEEP_SECS);
    for old in keel.idempotency.filter(|r| r.created_at < cutoff) {
        let _ = keel.idempotency.remove(&old.id);
    }
    let mut mine = keel.idempotency.filter(|r| r.user == user);
    if mine.len() >= MAX_PER_USER {
        mine.sort_by_key(|r| r.created_at);
        for old in &mine[..=mine.len() - MAX_PER_USER] {
            let _ = keel.idempotency.remove(&old.id);
        }
    }
}

fn replay(first: &IdempotentReply) -> Response {
    if first.secret {
        return ApiError::conflict(format!(
            "This request already succeeded, and its answer showed a secret only once: {}; \
             if the secret was lost, revoke it and make a new one with a new key",
            first.body
        ))
        .into_response();
    }
    let status = StatusCode::from_u16(first.status).unwrap_or(StatusCode::OK);
    let mut response = (status, first.body.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_kept() {
        let kept =
            |bytes: &[u8]| serde_json::from_str::<serde_json::Value>(&redact(bytes)).unwrap();
        let token = br#"{"token":"s3cret","id":"abc","expires_at":0}"#;
        assert_eq!(
            kept(token),
            serde_json::json!({"id": "abc", "expires_at": 0})
        );
        let ticket =
            br#"{"ticket":"t1ck","path":"/api/v1/vms/v/console?ticket=t1ck","expires_in":60}"#;
        assert_eq!(kept(ticket), serde_json::json!({"expires_in": 60}));
        assert_eq!(redact(b"not json"), "{}");
    }
}
