//! Who is calling and what they may touch.
//!
//! A resource in a project the caller has no role in is answered 404, as if
//! it did not exist (nothing crosses projects but shared images); a
//! resource they can see but not change is 403.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, ApiResult};
use crate::auth::{self, Access};
use crate::keel::{DEFAULT_PROJECT, Keel};
use crate::model::{Disk, Image, User, Vm, now};

/// The authenticated user of a request.
#[derive(Clone)]
pub struct Caller {
    pub user: Arc<User>,
    /// The id of the token used (to end a session).
    pub token: String,
}

/// Finds the bearer token (only ever in the `Authorization` header: a
/// token in a URL ends up in logs and histories; browsers open consoles
/// with a ticket instead, see [`crate::auth::tickets`]) and puts the
/// [`Caller`] in the request.
pub async fn authenticate(State(keel): State<Arc<Keel>>, mut req: Request, next: Next) -> Response {
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    if let Some(secret) = secret {
        let id = auth::token_id(secret.trim());
        if let Some(token) = keel.tokens.get(&id)
            && (token.expires_at == 0 || token.expires_at > now())
            && let Some(user) = keel.users.get(&token.user)
        {
            req.extensions_mut().insert(Caller { user, token: id });
        }
    }
    next.run(req).await
}

/// The address a request came from, when the server recorded it.
pub struct Source(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Source(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Log in first: send `Authorization: Bearer TOKEN` with a token from POST \
                 /api/v1/login or an API token",
            )
        })
    }
}

impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned())
    }
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// Refuses unless the caller has `access` in `project`.
    pub fn require(&self, project: &str, access: Access) -> ApiResult<()> {
        if auth::allowed(&self.user, project, access) {
            return Ok(());
        }
        if auth::role_in(&self.user, project).is_some() {
            Err(ApiError::forbidden(format!(
                "Your role in project {project} does not allow this ({access:?} needed); ask \
                 a project admin"
            )))
        } else {
            Err(ApiError::forbidden(format!(
                "You are not a member of project {project}"
            )))
        }
    }

    pub fn require_system_admin(&self) -> ApiResult<()> {
        if self.user.system_admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "Only system administrators may do this",
            ))
        }
    }

    /// The project a request names (`?project=`, or a body field), else
    /// `default`, checked for `access`.
    pub fn project(&self, keel: &Keel, named: Option<&str>, access: Access) -> ApiResult<String> {
        let project = named.unwrap_or(DEFAULT_PROJECT);
        if keel.projects.get(project).is_none() {
            return Err(ApiError::not_found(format!("No project {project}")));
        }
        self.require(project, access)?;
        Ok(project.to_string())
    }

    fn sees(&self, project: &str) -> bool {
        auth::allowed(&self.user, project, Access::Read)
    }
}

/// Checks what the caller may do with a resource found by id (or by name
/// within a project); hides what they cannot see.
fn visible<T>(
    caller: &Caller,
    found: Option<Arc<T>>,
    project_of: impl Fn(&T) -> &str,
    access: Access,
    what: &str,
    key: &str,
) -> ApiResult<Arc<T>> {
    match found {
        Some(item) if caller.sees(project_of(&item)) => {
            caller.require(project_of(&item), access)?;
            Ok(item)
        }
        _ => Err(ApiError::not_found(format!("No {what} {key}"))),
    }
}

pub fn find_vm(
    keel: &Keel,
    caller: &Caller,
    key: &str,
    project: Option<&str>,
    access: Access,
) -> ApiResult<Arc<Vm>> {
    let p = project.unwrap_or(DEFAULT_PROJECT);
    // A live VM by that name first, then one in the recycle bin.
    let found = keel.vms.get(key).or_else(|| {
        keel.vms
            .find(|vm| vm.project == p && vm.name == key && vm.deleted_at.is_none())
            .or_else(|| keel.vms.find(|vm| vm.project == p && vm.name == key))
    });
    visible(caller, found, |vm| &vm.project, access, "VM", key)
}

pub fn find_disk(
    keel: &Keel,
    caller: &Caller,
    key: &str,
    project: Option<&str>,
    access: Access,
) -> ApiResult<Arc<Disk>> {
    let p = project.unwrap_or(DEFAULT_PROJECT);
    let found = keel
        .disks
        .get(key)
        .or_else(|| keel.disks.find(|d| d.project == p && d.name == key));
    visible(caller, found, |d| &d.project, access, "disk", key)
}

/// Images: the owner project's members, and (to read and use) members of
/// the projects it is shared with. A name means the image of that name in
/// the caller's project (`?project=`, default `default`) and nothing else:
/// a shared image is named `OWNER-PROJECT/NAME` (or by id), so an image
/// shared into a project can never stand in for one its members expect by
/// name.
pub fn find_image(
    keel: &Keel,
    caller: &Caller,
    key: &str,
    project: Option<&str>,
    access: Access,
) -> ApiResult<Arc<Image>> {
    let p = project.unwrap_or(DEFAULT_PROJECT);
    let image = match key.split_once('/') {
        Some((owner, name)) => keel.images.find(|i| i.project == owner && i.name == name),
        None => keel
            .images
            .get(key)
            .or_else(|| keel.images.find(|i| i.name == key && i.project == p)),
    };
    let Some(image) = image else {
        return Err(ApiError::not_found(format!("No image {key}")));
    };
    if caller.sees(&image.project) {
        caller.require(&image.project, access)?;
        return Ok(image);
    }
    let shared_to_caller = image.shared_with.iter().any(|s| caller.sees(s));
    if shared_to_caller {
        if access == Access::Read {
            return Ok(image);
        }
        return Err(ApiError::forbidden(format!(
            "Image {key} is shared with your project: you may use it, not change it"
        )));
    }
    Err(ApiError::not_found(format!("No image {key}")))
}

/// Whether `project` may boot VMs from `image`.
pub fn image_usable_in(image: &Image, project: &str) -> bool {
    image.project == project || image.shared_with.iter().any(|s| s == project)
}
