//! The audit log: every mutating call — who, what, which resource, the
//! result, the source address and the time.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::Caller;
use crate::keel::Keel;
use crate::model::now;
use crate::store::Log;

/// Who an unauthenticated call was about (the user name a login tried),
/// set by its handler on the response for the audit log.
#[derive(Clone)]
pub struct AuditUser(pub String);

pub async fn layer(State(keel): State<Arc<Keel>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let user = req
        .extensions()
        .get::<Caller>()
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| "-".into());
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let response = next.run(req).await;
    let user = match response.extensions().get::<AuditUser>() {
        Some(AuditUser(named)) if user == "-" => named.clone(),
        _ => user,
    };
    let status = response.status().as_u16();
    // The resource is the path's segment after the collection name.
    let resource = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .take(2)
        .collect::<Vec<_>>()
        .join("/");
    let entry = serde_json::json!({
        "time": now(),
        "user": user,
        "method": method.as_str(),
        "path": path,
        "resource": resource,
        "status": status,
        "result": if status < 400 { "ok" } else { "refused" },
        "source": source,
    });
    if let Err(e) = keel.store.append(Log::Audit, &user, &entry) {
        log::error!("Cannot write the audit log: {e}");
    }
    response
}
