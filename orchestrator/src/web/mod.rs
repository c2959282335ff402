//! keeld's web API: JSON under `/api/v1`, one module per resource.
//!
//! Every request passes three layers before its handler: `auth` (the
//! bearer token becomes a [`Caller`]), `audit` (mutating calls are
//! recorded with who, what, result and source address) and `idempotency`
//! (a repeated `Idempotency-Key` gets the first answer again). The routes
//! are one table ([`routes`]) from which both the router and the OpenAPI
//! document are built, so the two cannot disagree.

mod access;
mod audit;
mod auth_api;
mod console;
mod disks;
mod idempotency;
mod images;
mod misc;
mod openapi;
pub mod server;
mod vms;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};

use keel_api::keeld::{
    Accepted, AttachDisk, AuditEntry, Batch, BatchResults, ChangePassword, CloneDisk,
    ConsoleTicket, CreateDisk, CreateFlavor, CreateImage, CreateProject, CreateToken, CreateUser,
    CreateVm, Disk, DiskDetail, Flavor, Image, ImageCreated, Login, MakeImage, NewToken,
    NodeSummary, Operation, Page, Project, Quota, QuotaReport, ResetPassword, ResizeDisk, ResizeVm,
    ResizedVm, SetMember, ShareImage, TokenInfo, UpdateVm, UserInfo, Vm, VmEvent,
};
use openapi::{list_of, of};

use crate::keel::Keel;
use crate::store::StoreError;

pub use access::Caller;
pub use openapi::openapi_document;

/// An error answer: a status and a message saying what was wrong and what
/// to do, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => ApiError::conflict(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<crate::quota::QuotaError> for ApiError {
    fn from(e: crate::quota::QuotaError) -> Self {
        match e {
            crate::quota::QuotaError::Exceeded { .. } => ApiError::unprocessable(e.to_string()),
            crate::quota::QuotaError::NoSpace { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(keel_api::keeld::ErrorReply {
                error: self.message,
            }),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// JSON bodies whose rejection (malformed, unknown field, wrong type) is
/// answered as `{"error": ...}` with the serde message.
pub struct Body<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiError::new(
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                },
                format!("Invalid request body: {}", rejection.body_text()),
            )),
        }
    }
}

/// One route: method, path (axum syntax, `{param}`), what it does, its
/// handler, and for the OpenAPI document the `keel_api::keeld` types of
/// its request body and of its answers.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub handler: MethodRouter<Arc<Keel>>,
    pub body: Content,
    /// The answers when it works (errors are `ErrorReply`s).
    pub replies: Vec<Reply>,
}

/// What a request or an answer carries.
pub enum Content {
    None,
    Json(openapi::BodySchema),
    Text,
    Bytes,
}

/// An answer a route gives when it works.
pub struct Reply {
    pub status: u16,
    pub content: Content,
}

fn r(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    handler: MethodRouter<Arc<Keel>>,
) -> Route {
    Route {
        method,
        path,
        summary,
        handler,
        body: Content::None,
        replies: Vec::new(),
    }
}

impl Route {
    /// Its request body: JSON of the schema `body` gives.
    fn takes(mut self, body: openapi::BodySchema) -> Self {
        self.body = Content::Json(body);
        self
    }

    /// Its request body: bytes, streamed.
    fn takes_bytes(mut self) -> Self {
        self.body = Content::Bytes;
        self
    }

    fn reply(mut self, status: u16, content: Content) -> Self {
        self.replies.push(Reply { status, content });
        self
    }

    /// 200 with JSON.
    fn ok(self, body: openapi::BodySchema) -> Self {
        self.reply(200, Content::Json(body))
    }

    /// 200 with text.
    fn ok_text(self) -> Self {
        self.reply(200, Content::Text)
    }

    /// 201 with JSON.
    fn created(self, body: openapi::BodySchema) -> Self {
        self.reply(201, Content::Json(body))
    }

    /// 202 with JSON: an operation started.
    fn accepted(self, body: openapi::BodySchema) -> Self {
        self.reply(202, Content::Json(body))
    }

    /// 204.
    fn no_content(self) -> Self {
        self.reply(204, Content::None)
    }
}

/// Every route keeld serves.
pub fn routes() -> Vec<Route> {
    vec![
        r(
            "GET",
            "/api/v1/openapi.json",
            "This document",
            get(openapi::serve),
        )
        .ok(openapi::document),
        r(
            "GET",
            "/metrics",
            "Prometheus metrics of the node and its VMs",
            get(misc::metrics),
        )
        .ok_text(),
        r(
            "POST",
            "/api/v1/login",
            "Log in with a password; answers a session token",
            post(auth_api::login),
        )
        .takes(of::<Login>)
        .ok(of::<NewToken>),
        r(
            "POST",
            "/api/v1/logout",
            "End the session of the token used",
            post(auth_api::logout),
        )
        .no_content(),
        r(
            "POST",
            "/api/v1/password",
            "Change a password (yours, or give username: works with an expired one)",
            post(auth_api::change_password),
        )
        .takes(of::<ChangePassword>)
        .no_content(),
        r(
            "GET",
            "/api/v1/whoami",
            "The caller and their roles",
            get(auth_api::whoami),
        )
        .ok(of::<UserInfo>),
        r(
            "GET",
            "/api/v1/tokens",
            "The caller's API tokens",
            get(auth_api::list_tokens),
        )
        .ok(list_of::<TokenInfo>),
        r(
            "POST",
            "/api/v1/tokens",
            "Make an API token for scripts (shown once)",
            post(auth_api::create_token),
        )
        .takes(of::<CreateToken>)
        .created(of::<NewToken>),
        r(
            "DELETE",
            "/api/v1/tokens/{id}",
            "Revoke an API token",
            delete(auth_api::delete_token),
        )
        .no_content(),
        r(
            "GET",
            "/api/v1/users",
            "Users (system admins)",
            get(auth_api::list_users),
        )
        .ok(list_of::<UserInfo>),
        r(
            "POST",
            "/api/v1/users",
            "Create a user (system admins)",
            post(auth_api::create_user),
        )
        .takes(of::<CreateUser>)
        .created(of::<UserInfo>),
        r(
            "DELETE",
            "/api/v1/users/{id}",
            "Delete a user (system admins)",
            delete(auth_api::delete_user),
        )
        .no_content(),
        r(
            "PUT",
            "/api/v1/users/{id}/password",
            "Reset a user's password and lift a lockout (system admins)",
            put(auth_api::reset_password),
        )
        .takes(of::<ResetPassword>)
        .no_content(),
        r(
            "GET",
            "/api/v1/projects",
            "Projects the caller belongs to",
            get(auth_api::list_projects),
        )
        .ok(list_of::<Project>),
        r(
            "POST",
            "/api/v1/projects",
            "Create a project (system admins)",
            post(auth_api::create_project),
        )
        .takes(of::<CreateProject>)
        .created(of::<Project>),
        r(
            "DELETE",
            "/api/v1/projects/{id}",
            "Delete an empty project (system admins)",
            delete(auth_api::delete_project),
        )
        .no_content(),
        r(
            "GET",
            "/api/v1/projects/{id}/quota",
            "A project's quota and what it uses",
            get(auth_api::get_quota),
        )
        .ok(of::<QuotaReport>),
        r(
            "PUT",
            "/api/v1/projects/{id}/quota",
            "Set a project's quota (system admins)",
            put(auth_api::set_quota),
        )
        .takes(of::<Quota>)
        .ok(of::<QuotaReport>),
        r(
            "PUT",
            "/api/v1/projects/{id}/members/{user}",
            "Give a user a role in a project (project admins)",
            put(auth_api::set_member),
        )
        .takes(of::<SetMember>)
        .ok(of::<UserInfo>),
        r(
            "DELETE",
            "/api/v1/projects/{id}/members/{user}",
            "Take a user out of a project (project admins)",
            delete(auth_api::remove_member),
        )
        .no_content(),
        r("GET", "/api/v1/flavors", "Flavors", get(misc::list_flavors)).ok(list_of::<Flavor>),
        r(
            "POST",
            "/api/v1/flavors",
            "Add a flavor (system admins)",
            post(misc::create_flavor),
        )
        .takes(of::<CreateFlavor>)
        .created(of::<Flavor>),
        r(
            "DELETE",
            "/api/v1/flavors/{id}",
            "Remove a flavor (system admins)",
            delete(misc::delete_flavor),
        )
        .no_content(),
        r(
            "GET",
            "/api/v1/node",
            "Host capacity, allocation and VM counts",
            get(misc::node),
        )
        .ok(of::<NodeSummary>),
        r(
            "GET",
            "/api/v1/audit",
            "The audit log (system admins)",
            get(misc::audit),
        )
        .ok(list_of::<AuditEntry>),
        r(
            "GET",
            "/api/v1/operations",
            "Operations of a project",
            get(misc::list_operations),
        )
        .ok(list_of::<Operation>),
        r(
            "GET",
            "/api/v1/operations/{id}",
            "One operation; ?wait=SECONDS waits for its end",
            get(misc::get_operation),
        )
        .ok(of::<Operation>),
        r(
            "GET",
            "/api/v1/images",
            "Images of a project and those shared with it",
            get(images::list),
        )
        .ok(list_of::<Image>),
        r(
            "POST",
            "/api/v1/images",
            "Import an image from a path or URL, or create one to upload",
            post(images::create),
        )
        .takes(of::<CreateImage>)
        .accepted(of::<ImageCreated>)
        .created(of::<ImageCreated>),
        r("GET", "/api/v1/images/{id}", "One image", get(images::show)).ok(of::<Image>),
        r(
            "DELETE",
            "/api/v1/images/{id}",
            "Delete an image no VM uses",
            delete(images::remove),
        )
        .no_content(),
        r(
            "PUT",
            "/api/v1/images/{id}/data",
            "Upload an image's bytes (streamed)",
            put(images::upload),
        )
        .takes_bytes()
        .ok(of::<Image>),
        r(
            "POST",
            "/api/v1/images/{id}/share",
            "Share an image with other projects",
            post(images::share),
        )
        .takes(of::<ShareImage>)
        .ok(of::<Image>),
        r(
            "GET",
            "/api/v1/disks",
            "Disks of a project",
            get(disks::list),
        )
        .ok(list_of::<Disk>),
        r(
            "POST",
            "/api/v1/disks",
            "Create a blank disk",
            post(disks::create),
        )
        .takes(of::<CreateDisk>)
        .accepted(of::<Accepted<Disk>>),
        r("GET", "/api/v1/disks/{id}", "One disk", get(disks::show)).ok(of::<DiskDetail>),
        r(
            "DELETE",
            "/api/v1/disks/{id}",
            "Delete a detached disk",
            delete(disks::remove),
        )
        .no_content(),
        r(
            "POST",
            "/api/v1/disks/{id}/attach",
            "Attach a disk to a VM (hot-plug when it runs)",
            post(disks::attach),
        )
        .takes(of::<AttachDisk>)
        .accepted(of::<Accepted<Disk>>),
        r(
            "POST",
            "/api/v1/disks/{id}/detach",
            "Detach a disk (hot-unplug when its VM runs)",
            post(disks::detach),
        )
        .accepted(of::<Accepted<Disk>>),
        r(
            "POST",
            "/api/v1/disks/{id}/resize",
            "Grow a disk (live when its VM runs)",
            post(disks::resize),
        )
        .takes(of::<ResizeDisk>)
        .accepted(of::<Accepted<Disk>>),
        r(
            "POST",
            "/api/v1/disks/{id}/clone",
            "Copy a disk",
            post(disks::clone_disk),
        )
        .takes(of::<CloneDisk>)
        .accepted(of::<Accepted<Disk>>),
        r(
            "GET",
            "/api/v1/vms",
            "VMs of a project (?deleted=true: the recycle bin)",
            get(vms::list),
        )
        .ok(of::<Page<Vm>>),
        r(
            "POST",
            "/api/v1/vms",
            "Create a VM from an image and a flavor",
            post(vms::create),
        )
        .takes(of::<CreateVm>)
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/batch",
            "Start, stop, force off or delete several VMs",
            post(vms::batch),
        )
        .takes(of::<Batch>)
        .accepted(of::<BatchResults>),
        r("GET", "/api/v1/vms/{id}", "One VM", get(vms::show)).ok(of::<Vm>),
        r(
            "PATCH",
            "/api/v1/vms/{id}",
            "Rename or describe a VM, change its restart policy",
            patch(vms::update),
        )
        .takes(of::<UpdateVm>)
        .accepted(of::<Accepted<Vm>>),
        r(
            "DELETE",
            "/api/v1/vms/{id}",
            "Stop a VM and move it to the recycle bin (?purge=true: delete for good)",
            delete(vms::remove),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/restore",
            "Bring a VM back from the recycle bin",
            post(vms::restore),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/start",
            "Start a VM",
            post(vms::start),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/stop",
            "ACPI power button, then force off after the stop timeout",
            post(vms::stop),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/force-off",
            "Power a VM off at once",
            post(vms::force_off),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/reboot",
            "Reset a running VM",
            post(vms::reboot),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/pause",
            "Pause a running VM",
            post(vms::pause),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/resume",
            "Resume a paused VM",
            post(vms::resume),
        )
        .accepted(of::<Accepted<Vm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/resize",
            "Change vCPUs and memory (live where the VMM can)",
            post(vms::resize),
        )
        .takes(of::<ResizeVm>)
        .accepted(of::<Accepted<ResizedVm>>),
        r(
            "POST",
            "/api/v1/vms/{id}/image",
            "Create an image from a stopped VM's system disk",
            post(vms::make_image),
        )
        .takes(of::<MakeImage>)
        .accepted(of::<Accepted<Image>>),
        r(
            "GET",
            "/api/v1/vms/{id}/events",
            "A VM's lifecycle events",
            get(vms::events),
        )
        .ok(list_of::<VmEvent>),
        r(
            "GET",
            "/api/v1/vms/{id}/serial",
            "The end of a VM's serial console output",
            get(console::serial_log),
        )
        .ok_text(),
        r(
            "POST",
            "/api/v1/vms/{id}/console/ticket",
            "A single-use ticket (60 s) to open the console from a browser",
            post(console::ticket),
        )
        .created(of::<ConsoleTicket>),
        r(
            "GET",
            "/api/v1/vms/{id}/console",
            "The serial console, interactive, over a WebSocket (bearer token or ?ticket=)",
            get(console::websocket),
        )
        .reply(101, Content::None),
    ]
}

/// The whole service.
pub fn router(keel: Arc<Keel>) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<Arc<Keel>>> = BTreeMap::new();
    for route in routes() {
        let merged = match by_path.remove(route.path) {
            Some(existing) => existing.merge(route.handler),
            None => route.handler,
        };
        by_path.insert(route.path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    router
        .fallback(|| async { ApiError::not_found("No such path; see /api/v1/openapi.json") })
        .layer(axum::middleware::from_fn_with_state(
            keel.clone(),
            idempotency::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            keel.clone(),
            audit::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            keel.clone(),
            access::authenticate,
        ))
        .with_state(keel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_once() {
        let doc = openapi_document();
        let paths = doc["paths"].as_object().unwrap();
        let mut seen = std::collections::HashSet::new();
        for route in routes() {
            assert!(
                seen.insert((route.method, route.path)),
                "{} {} twice",
                route.method,
                route.path
            );
            let op = &paths[route.path][route.method.to_lowercase()];
            assert!(
                op.is_object(),
                "{} {} missing from the document",
                route.method,
                route.path
            );
        }
        let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(
            documented,
            seen.len(),
            "the document has routes keeld does not serve"
        );
    }
}
