//! Login, tokens, users, projects and their members.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::{self, Access};
use crate::keel::{DEFAULT_PROJECT, Keel};
use crate::model::{Membership, Project, Role, Token, TokenKind, User, new_id, now, valid_name};
use crate::store::StoreError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    username: String,
    password: String,
}

#[derive(Serialize)]
struct NewToken {
    token: String,
    id: String,
    expires_at: u64,
    user: Value,
}

/// A user as shown: no password hash.
pub fn user_view(user: &User) -> Value {
    json!({
        "id": user.id,
        "name": user.name,
        "system_admin": user.system_admin,
        "memberships": user.memberships,
        "created_at": user.created_at,
    })
}

fn issue(keel: &Keel, user: &User, kind: TokenKind, name: &str, ttl: u64) -> ApiResult<NewToken> {
    let secret = auth::random_hex(32).map_err(|e| ApiError::internal(e.to_string()))?;
    let id = auth::token_id(&secret);
    let expires_at = if ttl == 0 { 0 } else { now() + ttl };
    keel.tokens.insert(Token {
        id: id.clone(),
        user: user.id.clone(),
        kind,
        name: name.to_string(),
        created_at: now(),
        expires_at,
    })?;
    Ok(NewToken {
        token: secret,
        id,
        expires_at,
        user: user_view(user),
    })
}

/// A hash of nothing in particular, checked for unknown user names.
fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| auth::hash_password("keel-dummy").unwrap_or_default())
        .clone()
}

pub async fn login(
    State(keel): State<Arc<Keel>>,
    Body(req): Body<Login>,
) -> ApiResult<Json<Value>> {
    let user = keel.users.find(|u| u.name == req.username);
    // Verify against a hash even for an unknown user, so timing does not
    // tell which names exist.
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(dummy_hash);
    let password = req.password.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let user = match (ok, user) {
        (true, Some(user)) => user,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Wrong user name or password",
            ));
        }
    };
    // Sessions that ended are forgotten as new ones begin.
    let now = now();
    for old in keel
        .tokens
        .filter(|t| t.expires_at != 0 && t.expires_at <= now)
    {
        let _ = keel.tokens.remove(&old.id);
    }
    let ttl = keel.config.session_ttl.as_secs().max(1);
    let token = issue(&keel, &user, TokenKind::Session, "login", ttl)?;
    Ok(Json(serde_json::to_value(token).unwrap_or_default()))
}

pub async fn logout(State(keel): State<Arc<Keel>>, caller: Caller) -> ApiResult<StatusCode> {
    keel.tokens.remove(&caller.token)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn whoami(caller: Caller) -> Json<Value> {
    Json(user_view(&caller.user))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    name: String,
}

pub async fn create_token(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "Token name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    let token = issue(&keel, &caller.user, TokenKind::Api, &req.name, 0)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(token).unwrap_or_default()),
    ))
}

pub async fn list_tokens(State(keel): State<Arc<Keel>>, caller: Caller) -> Json<Value> {
    let tokens: Vec<Value> = keel
        .tokens
        .filter(|t| t.user == caller.user.id && t.kind == TokenKind::Api)
        .iter()
        .map(|t| json!({"id": t.id, "name": t.name, "created_at": t.created_at}))
        .collect();
    Json(json!(tokens))
}

pub async fn delete_token(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    match keel.tokens.get(&id) {
        Some(t) if t.user == caller.user.id || caller.user.system_admin => {
            keel.tokens.remove(&id)?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::not_found(format!("No token {id}"))),
    }
}

pub async fn list_users(State(keel): State<Arc<Keel>>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_system_admin()?;
    let users: Vec<Value> = keel
        .users
        .filter(|_| true)
        .iter()
        .map(|u| user_view(u))
        .collect();
    Ok(Json(json!(users)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    name: String,
    password: String,
    #[serde(default)]
    system_admin: bool,
}

pub async fn create_user(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateUser>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_system_admin()?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "User name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    if req.password.len() < 8 || req.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "The password must be 8 to 1024 characters",
        ));
    }
    if keel.users.find(|u| u.name == req.name).is_some() {
        return Err(ApiError::conflict(format!("User {} exists", req.name)));
    }
    let password = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let user = keel.users.insert(User {
        id: new_id("user"),
        name: req.name,
        password_hash: hash,
        system_admin: req.system_admin,
        memberships: vec![],
        created_at: now(),
    })?;
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}

fn find_user(keel: &Keel, key: &str) -> ApiResult<Arc<User>> {
    keel.users
        .get(key)
        .or_else(|| keel.users.find(|u| u.name == key))
        .ok_or_else(|| ApiError::not_found(format!("No user {key}")))
}

pub async fn delete_user(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_system_admin()?;
    let user = find_user(&keel, &id)?;
    if user.id == caller.user.id {
        return Err(ApiError::conflict("You cannot delete yourself"));
    }
    for token in keel.tokens.filter(|t| t.user == user.id) {
        keel.tokens.remove(&token.id)?;
    }
    keel.users.remove(&user.id)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_projects(State(keel): State<Arc<Keel>>, caller: Caller) -> Json<Value> {
    let projects = keel
        .projects
        .filter(|p| auth::role_in(&caller.user, &p.id).is_some());
    Json(json!(projects))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    name: String,
    #[serde(default)]
    description: String,
}

pub async fn create_project(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateProject>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_system_admin()?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "Project name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    if keel.projects.get(&req.name).is_some() {
        return Err(ApiError::conflict(format!("Project {} exists", req.name)));
    }
    let project = keel.projects.insert(Project {
        id: req.name.clone(),
        name: req.name,
        description: req.description,
        quota: Default::default(),
        created_at: now(),
    })?;
    Ok((StatusCode::CREATED, Json(json!(*project))))
}

pub async fn delete_project(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_system_admin()?;
    if keel.projects.get(&id).is_none() {
        return Err(ApiError::not_found(format!("No project {id}")));
    }
    if id == DEFAULT_PROJECT {
        return Err(ApiError::conflict("The default project cannot be deleted"));
    }
    let used = keel.vms.find(|v| v.project == id).is_some()
        || keel.images.find(|i| i.project == id).is_some()
        || keel.disks.find(|d| d.project == id).is_some();
    if used {
        return Err(ApiError::conflict(format!(
            "Project {id} still has VMs, images or disks; delete them first"
        )));
    }
    for user in keel
        .users
        .filter(|u| u.memberships.iter().any(|m| m.project == id))
    {
        keel.users.update::<StoreError>(&user.id, |u| {
            u.memberships.retain(|m| m.project != id);
            Ok(())
        })?;
    }
    keel.projects.remove(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    role: Role,
}

pub async fn set_member(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
    Body(req): Body<SetMember>,
) -> ApiResult<Json<Value>> {
    let project = caller.project(&keel, Some(&project), Access::Manage)?;
    let user = find_user(&keel, &user)?;
    let updated = keel
        .users
        .update::<StoreError>(&user.id, |u| {
            u.memberships.retain(|m| m.project != project);
            u.memberships.push(Membership {
                project: project.clone(),
                role: req.role,
            });
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The user was deleted"))?;
    Ok(Json(user_view(&updated)))
}

pub async fn remove_member(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let project = caller.project(&keel, Some(&project), Access::Manage)?;
    let user = find_user(&keel, &user)?;
    keel.users.update::<StoreError>(&user.id, |u| {
        u.memberships.retain(|m| m.project != project);
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}
