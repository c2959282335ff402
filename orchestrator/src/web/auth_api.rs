//! Login, tokens, users, projects and their members.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_api::keeld::{
    ChangePassword, CreateProject, CreateToken, CreateUser, Login, NewToken, QuotaReport,
    ResetPassword, SetMember, TokenInfo, UserInfo,
};

use super::access::Source;
use super::audit::AuditUser;
use super::idempotency::SecretReply;
use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::password::PasswordError;
use crate::auth::throttle::Wait;
use crate::auth::{self, Access};
use crate::keel::{DEFAULT_PROJECT, Keel};
use crate::model::{Membership, Project, Quota, Token, TokenKind, User, new_id, now, valid_name};
use crate::store::StoreError;

/// A user as shown: no password hash.
pub fn user_view(user: &User) -> UserInfo {
    UserInfo {
        id: user.id.clone(),
        name: user.name.clone(),
        system_admin: user.system_admin,
        memberships: user.memberships.clone(),
        created_at: user.created_at,
    }
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

fn too_many(wait: Duration, message: String) -> Response {
    let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).into_response();
    if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn password_error(e: PasswordError) -> Response {
    match e {
        PasswordError::Busy => too_many(
            Duration::from_secs(1),
            "Too many password checks at once; try again in a second".into(),
        ),
        e => ApiError::internal(e.to_string()).into_response(),
    }
}

/// Checks a user name and password against the throttle and the store:
/// the user, or the answer to give instead. Every failure is counted.
async fn check_password(
    keel: &Keel,
    username: &str,
    password: &str,
    source: Option<IpAddr>,
) -> Result<Arc<User>, Response> {
    if let Err(Wait(wait)) = keel.login_throttle.check(username, source, Instant::now()) {
        return Err(too_many(
            wait,
            format!(
                "Too many failed logins for this account or from this address; try again in {} \
                 s (a system admin can reset the password)",
                wait.as_secs().max(1)
            ),
        ));
    }
    let user = keel.users.find(|u| u.name == username);
    // Verify against a hash even for an unknown user, so timing does not
    // tell which names exist.
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(dummy_hash);
    let ok = keel
        .passwords
        .verify(password.to_string(), hash)
        .await
        .map_err(password_error)?;
    match (ok, user) {
        (true, Some(user)) => {
            keel.login_throttle.succeeded(username);
            Ok(user)
        }
        _ => {
            keel.login_throttle.failed(username, source, Instant::now());
            Err(
                ApiError::new(StatusCode::UNAUTHORIZED, "Wrong user name or password")
                    .into_response(),
            )
        }
    }
}

/// Whether the user must set a new password before logging in.
fn password_expired(keel: &Keel, user: &User) -> Option<String> {
    auth::password::expired(user, keel.config.password_max_age, now())
}

pub async fn login(
    State(keel): State<Arc<Keel>>,
    Source(source): Source,
    Body(req): Body<Login>,
) -> Response {
    let audited: String = req.username.chars().take(64).collect();
    let mut response = match login_inner(&keel, source, req).await {
        Ok(json) => json.into_response(),
        Err(r) => r,
    };
    response.extensions_mut().insert(AuditUser(audited));
    response
}

async fn login_inner(
    keel: &Arc<Keel>,
    source: Option<IpAddr>,
    req: Login,
) -> Result<Json<NewToken>, Response> {
    let user = check_password(keel, &req.username, &req.password, source).await?;
    if let Some(why) = password_expired(keel, &user) {
        return Err(ApiError::forbidden(format!(
            "{why} with `keel passwd` (POST /api/v1/password with username, current_password \
             and new_password)"
        ))
        .into_response());
    }
    // Sessions that ended are forgotten as new ones begin.
    let now = now();
    for old in keel
        .tokens
        .filter(|t| t.expires_at != 0 && t.expires_at <= now)
    {
        let _ = keel.tokens.remove(&old.id);
    }
    let ttl = keel.config.session_ttl.as_secs().max(1);
    let token =
        issue(keel, &user, TokenKind::Session, "login", ttl).map_err(|e| e.into_response())?;
    Ok(Json(token))
}

/// Sets a new password; works without a token (an expired password cannot
/// log in), so it checks the current password under the login throttle.
/// The user's other sessions end.
pub async fn change_password(
    State(keel): State<Arc<Keel>>,
    Source(source): Source,
    caller: Option<Caller>,
    Body(req): Body<ChangePassword>,
) -> Response {
    let Some(username) = req
        .username
        .clone()
        .or_else(|| caller.as_ref().map(|c| c.user.name.clone()))
    else {
        return ApiError::bad_request("Give username (or log in first)").into_response();
    };
    let audited: String = username.chars().take(64).collect();
    let mut response = match change_inner(&keel, source, caller, &username, req).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    };
    response.extensions_mut().insert(AuditUser(audited));
    response
}

async fn change_inner(
    keel: &Arc<Keel>,
    source: Option<IpAddr>,
    caller: Option<Caller>,
    username: &str,
    req: ChangePassword,
) -> Result<(), Response> {
    let user = check_password(keel, username, &req.current_password, source).await?;
    if req.new_password == req.current_password {
        return Err(
            ApiError::bad_request("The new password must differ from the current one")
                .into_response(),
        );
    }
    keel.config
        .password_policy
        .check(&req.new_password)
        .map_err(|e| ApiError::bad_request(e.to_string()).into_response())?;
    let keep = caller.filter(|c| c.user.id == user.id).map(|c| c.token);
    set_password(keel, &user, req.new_password, false, keep.as_deref()).await?;
    if user.name == "admin" {
        // The printed first password is no longer the admin's.
        let _ = std::fs::remove_file(keel.paths.admin_password());
    }
    Ok(())
}

/// Stores a new password hash and ends the user's sessions (but `keep`).
async fn set_password(
    keel: &Keel,
    user: &User,
    password: String,
    must_change: bool,
    keep: Option<&str>,
) -> Result<(), Response> {
    let hash = keel
        .passwords
        .hash(password)
        .await
        .map_err(password_error)?;
    keel.users
        .update::<StoreError>(&user.id, |u| {
            u.password_hash = hash;
            u.password_changed_at = now();
            u.must_change_password = must_change;
            Ok(())
        })
        .map_err(|e| ApiError::from(e).into_response())?
        .ok_or_else(|| ApiError::not_found("The user was deleted").into_response())?;
    for t in keel.tokens.filter(|t| {
        t.user == user.id && t.kind == TokenKind::Session && Some(t.id.as_str()) != keep
    }) {
        let _ = keel.tokens.remove(&t.id);
    }
    keel.login_throttle.clear_user(&user.name);
    Ok(())
}

/// A system admin sets another user's password (and lifts a lockout).
pub async fn reset_password(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(req): Body<ResetPassword>,
) -> Result<StatusCode, Response> {
    caller
        .require_system_admin()
        .map_err(IntoResponse::into_response)?;
    let user = find_user(&keel, &id).map_err(IntoResponse::into_response)?;
    keel.config
        .password_policy
        .check(&req.password)
        .map_err(|e| ApiError::bad_request(e.to_string()).into_response())?;
    set_password(
        &keel,
        &user,
        req.password,
        req.must_change.unwrap_or(true),
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn logout(State(keel): State<Arc<Keel>>, caller: Caller) -> ApiResult<StatusCode> {
    keel.tokens.remove(&caller.token)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn whoami(caller: Caller) -> Json<UserInfo> {
    Json(user_view(&caller.user))
}

pub async fn create_token(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateToken>,
) -> ApiResult<Response> {
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "Token name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    let ttl = match req.expires_in_days {
        None => 0,
        Some(days @ 1..=3650) => u64::from(days) * 86400,
        Some(_) => {
            return Err(ApiError::bad_request(
                "expires_in_days must be 1 to 3650 (leave it out for a token that does not expire)",
            ));
        }
    };
    let token = issue(&keel, &caller.user, TokenKind::Api, &req.name, ttl)?;
    let mut response = (StatusCode::CREATED, Json(token)).into_response();
    // Shown once: never kept for an Idempotency-Key replay.
    response.extensions_mut().insert(SecretReply);
    Ok(response)
}

pub async fn list_tokens(State(keel): State<Arc<Keel>>, caller: Caller) -> Json<Vec<TokenInfo>> {
    let tokens = keel
        .tokens
        .filter(|t| t.user == caller.user.id && t.kind == TokenKind::Api)
        .iter()
        .map(|t| TokenInfo {
            id: t.id.clone(),
            name: t.name.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
        })
        .collect();
    Json(tokens)
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

pub async fn list_users(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
) -> ApiResult<Json<Vec<UserInfo>>> {
    caller.require_system_admin()?;
    let users = keel
        .users
        .filter(|_| true)
        .iter()
        .map(|u| user_view(u))
        .collect();
    Ok(Json(users))
}

pub async fn create_user(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserInfo>)> {
    caller.require_system_admin()?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "User name {:?} is invalid: use 1-63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    keel.config
        .password_policy
        .check(&req.password)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let taken = req.name.clone();
    let exists = || ApiError::conflict(format!("User {taken} exists"));
    if keel.users.find(|u| u.name == req.name).is_some() {
        return Err(exists());
    }
    // The name is taken under the store's lock before the slow hash (with
    // an empty hash, which no password matches), so concurrent requests
    // for one name are answered 409 at once instead of queueing for the
    // hash workers (and being refused 429 when they are busy).
    let name = req.name.clone();
    let user = keel
        .users
        .insert_unique(
            User {
                id: new_id("user"),
                name: req.name,
                password_hash: String::new(),
                system_admin: req.system_admin,
                memberships: vec![],
                created_at: now(),
                password_changed_at: now(),
                must_change_password: false,
            },
            |u| u.name == name,
        )?
        .map_err(|_| exists())?;
    let hash = match keel.passwords.hash(req.password.clone()).await {
        Ok(hash) => hash,
        Err(e) => {
            let _ = keel.users.remove(&user.id);
            return Err(match e {
                PasswordError::Busy => ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
                e => ApiError::internal(e.to_string()),
            });
        }
    };
    let user = keel
        .users
        .update::<StoreError>(&user.id, |u| {
            u.password_hash = hash;
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The user was deleted"))?;
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

pub async fn list_projects(State(keel): State<Arc<Keel>>, caller: Caller) -> Json<Vec<Project>> {
    let projects = keel
        .projects
        .filter(|p| auth::role_in(&caller.user, &p.id).is_some());
    Json(projects.iter().map(|p| (**p).clone()).collect())
}

pub async fn create_project(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateProject>,
) -> ApiResult<(StatusCode, Json<Project>)> {
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
    Ok((StatusCode::CREATED, Json((*project).clone())))
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

pub async fn set_member(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
    Body(req): Body<SetMember>,
) -> ApiResult<Json<UserInfo>> {
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

pub async fn get_quota(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<QuotaReport>> {
    let project = caller.project(&keel, Some(&id), Access::Read)?;
    let quota = keel
        .projects
        .get(&project)
        .map(|p| p.quota.clone())
        .unwrap_or_default();
    Ok(Json(QuotaReport {
        usage: crate::quota::usage(&keel, &project),
        project,
        quota,
    }))
}

pub async fn set_quota(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(quota): Body<Quota>,
) -> ApiResult<Json<QuotaReport>> {
    caller.require_system_admin()?;
    let updated = keel
        .projects
        .update::<StoreError>(&id, |p| {
            p.quota = quota;
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found(format!("No project {id}")))?;
    Ok(Json(QuotaReport {
        project: updated.id.clone(),
        quota: updated.quota.clone(),
        usage: crate::quota::usage(&keel, &updated.id),
    }))
}
