//! Flavors, operations, the node summary, metrics and the audit log.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use keel_api::keeld::{CreateFlavor, NodeSummary};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::Access;
use crate::control::nodes;
use crate::keel::Keel;
use crate::model::{Flavor, Operation, valid_name};
use crate::store::{Log, LogQuery};

pub async fn metrics(State(keel): State<Arc<Keel>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        nodes::metrics(&keel),
    )
}

pub async fn node(State(keel): State<Arc<Keel>>, _caller: Caller) -> Json<NodeSummary> {
    Json(nodes::summary(&keel))
}

pub async fn list_flavors(State(keel): State<Arc<Keel>>, _caller: Caller) -> Json<Vec<Flavor>> {
    Json(
        keel.flavors
            .filter(|_| true)
            .iter()
            .map(|f| (**f).clone())
            .collect(),
    )
}

pub async fn create_flavor(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateFlavor>,
) -> ApiResult<(StatusCode, Json<Flavor>)> {
    caller.require_system_admin()?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "Flavor name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    super::vms::check_shape(req.vcpus, req.memory_mib)?;
    if keel.flavors.get(&req.name).is_some() {
        return Err(ApiError::conflict(format!("Flavor {} exists", req.name)));
    }
    let flavor = keel.flavors.insert(Flavor {
        id: req.name,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
    })?;
    Ok((StatusCode::CREATED, Json((*flavor).clone())))
}

pub async fn delete_flavor(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_system_admin()?;
    match keel.flavors.remove(&id)? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::not_found(format!("No flavor {id}"))),
    }
}

#[derive(Deserialize)]
pub struct LogParams {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: usize,
    #[serde(default)]
    user: Option<String>,
}

pub async fn audit(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Query(q): Query<LogParams>,
) -> ApiResult<Json<Value>> {
    caller.require_system_admin()?;
    let entries = keel.store.read(
        Log::Audit,
        &LogQuery {
            subject: q.user,
            after: q.after,
            limit: if q.limit == 0 {
                1000
            } else {
                q.limit.min(10_000)
            },
        },
    )?;
    let out: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut body = e.body;
            body["seq"] = json!(e.seq);
            body
        })
        .collect();
    Ok(Json(json!(out)))
}

#[derive(Deserialize)]
pub struct ProjectParam {
    #[serde(default)]
    pub project: Option<String>,
}

pub async fn list_operations(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Query(q): Query<ProjectParam>,
) -> ApiResult<Json<Vec<Operation>>> {
    let project = caller.project(&keel, q.project.as_deref(), Access::Read)?;
    let ops = keel.operations.filter(|op| op.project == project);
    Ok(Json(ops.iter().map(|op| (**op).clone()).collect()))
}

#[derive(Deserialize)]
pub struct WaitParam {
    #[serde(default)]
    wait: Option<u64>,
}

pub async fn get_operation(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<WaitParam>,
) -> ApiResult<Json<Operation>> {
    let op = keel
        .operations
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("No operation {id}")))?;
    if crate::auth::role_in(&caller.user, &op.project).is_none() {
        return Err(ApiError::not_found(format!("No operation {id}")));
    }
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(300));
    let op = crate::control::operations::wait(&keel, &id, wait)
        .await
        .ok_or_else(|| ApiError::not_found(format!("No operation {id}")))?;
    Ok(Json((*op).clone()))
}
