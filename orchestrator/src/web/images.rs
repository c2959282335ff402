//! Images: import (path, URL, upload), list, share, delete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use keel_api::keeld::{CreateImage, ImageCreated, ShareImage};
use serde::Deserialize;

use super::access::find_image;
use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::Access;
use crate::control::operations::{self, Progress};
use crate::images::{self, Source};
use crate::keel::Keel;
use crate::model::{BootSpec, Image, ImageFormat, ImageStatus, new_id, now, valid_name};
use crate::store::StoreError;

#[derive(Deserialize)]
pub struct ListParams {
    #[serde(default)]
    project: Option<String>,
}

pub async fn list(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Query(q): Query<ListParams>,
) -> ApiResult<Json<Vec<Image>>> {
    let project = caller.project(&keel, q.project.as_deref(), Access::Read)?;
    let images = keel
        .images
        .filter(|i| i.project == project || i.shared_with.contains(&project));
    Ok(Json(images.iter().map(|i| (**i).clone()).collect()))
}

pub async fn show(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<ListParams>,
) -> ApiResult<Json<Image>> {
    let image = find_image(&keel, &caller, &id, q.project.as_deref(), Access::Read)?;
    Ok(Json((*image).clone()))
}

pub fn check_new_name(keel: &Keel, project: &str, name: &str) -> ApiResult<()> {
    if !valid_name(name) {
        return Err(ApiError::bad_request(format!(
            "Image name {name:?} is invalid: use 1-63 lowercase letters, digits and dashes"
        )));
    }
    if keel
        .images
        .find(|i| i.project == project && i.name == name)
        .is_some()
    {
        return Err(ApiError::conflict(format!(
            "Project {project} already has an image named {name}"
        )));
    }
    Ok(())
}

/// Opens a host file a request names: system admins only, and only where
/// [`crate::host_files`] allows.
fn open_host_file(keel: &Keel, caller: &Caller, what: &str, path: &Path) -> ApiResult<File> {
    caller.require_system_admin().map_err(|_| {
        ApiError::forbidden(format!(
            "{what}: not allowed: only system administrators may import host files; upload \
             the image (source.upload) or give a URL"
        ))
    })?;
    keel.import_roots
        .open(what, path)
        .map_err(|e| ApiError::forbidden(e.to_string()))
}

pub async fn create(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateImage>,
) -> ApiResult<(StatusCode, Json<ImageCreated>)> {
    let project = caller.project(&keel, req.project.as_deref(), Access::Operate)?;
    check_new_name(&keel, &project, &req.name)?;
    let source = match (&req.source.path, &req.source.url, req.source.upload) {
        (Some(p), None, false) => {
            let file = open_host_file(&keel, &caller, "source.path", p)?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            crate::quota::check_image(&keel, &project, "", size)?;
            Some(Source::File(file))
        }
        (None, Some(u), false) => {
            images::check_url(&keel, u)
                .await
                .map_err(|e| ApiError::bad_request(keel_api::error_chain(&e)))?;
            Some(Source::Url(u.clone()))
        }
        (None, None, true) => None,
        _ => {
            return Err(ApiError::bad_request(
                "source: give exactly one of path, url or upload=true",
            ));
        }
    };
    if let Some(sha) = &req.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::bad_request("sha256 must be 64 hex digits"));
    }
    if let Some(f) = &req.default_flavor
        && keel.flavors.get(f).is_none()
    {
        return Err(ApiError::bad_request(format!("No flavor {f}")));
    }
    if req.min_disk_gib > 64 << 10 {
        return Err(ApiError::bad_request("min_disk_gib is larger than 64 TiB"));
    }
    let mut boot = BootSpec::default();
    let mut boot_files = Vec::new();
    if let Some(b) = &req.boot {
        if let Some(k) = &b.kernel_path {
            boot_files.push((
                "kernel",
                open_host_file(&keel, &caller, "boot.kernel_path", k)?,
            ));
            boot.kernel = Some(k.display().to_string());
        }
        if let Some(i) = &b.initramfs_path {
            let file = open_host_file(&keel, &caller, "boot.initramfs_path", i)?;
            boot_files.push(("initramfs", file));
            boot.initramfs = Some(i.display().to_string());
        }
        if b.cmdline.len() > 2048 {
            return Err(ApiError::bad_request(
                "boot.cmdline is longer than 2048 bytes",
            ));
        }
        boot.cmdline = b.cmdline.clone();
    }
    let image = keel.images.insert(Image {
        id: new_id("img"),
        project: project.clone(),
        name: req.name,
        source_format: req.format.unwrap_or(ImageFormat::Raw),
        status: ImageStatus::Importing,
        status_reason: if source.is_none() {
            "waiting for the upload".into()
        } else {
            String::new()
        },
        size: 0,
        progress: 0,
        reserved: 0,
        sha256: req.sha256.clone().unwrap_or_default(),
        os_type: req.os_type,
        os_version: req.os_version,
        default_flavor: req.default_flavor,
        min_disk_gib: req.min_disk_gib,
        boot,
        shared_with: vec![],
        created_at: now(),
    })?;
    // The boot files are small: copy them now, so a bad one fails the call.
    for (what, file) in boot_files {
        if let Err(e) = images::copy_boot_file(&keel, &image.id, what, file) {
            for what in ["kernel", "initramfs"] {
                let _ = std::fs::remove_file(keel.paths.image_file(&image.id, what));
            }
            let _ = keel.images.remove(&image.id);
            return Err(ApiError::bad_request(keel_api::error_chain(&e)));
        }
    }
    let Some(source) = source else {
        return Ok((
            StatusCode::CREATED,
            Json(ImageCreated {
                operation: None,
                image: (*image).clone(),
            }),
        ));
    };
    let k = keel.clone();
    let id = image.id.clone();
    let sha = req.sha256;
    let op = operations::start(
        &keel,
        &project,
        "image.import",
        &image.id,
        caller.name(),
        move |op| images::import(k, id, source, sha, op),
    )?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ImageCreated {
            operation: Some((*op).clone()),
            image: (*image).clone(),
        }),
    ))
}

/// Imports one of keeld's own files (a VM's disk) as the bytes of an
/// existing image record.
pub async fn import_own_file(
    keel: Arc<Keel>,
    id: String,
    path: PathBuf,
    op: Progress,
) -> Result<(), images::ImportError> {
    let file = File::open(&path).map_err(images::ImportError::Read)?;
    images::import(keel, id, Source::File(file), None, op).await
}

pub async fn upload(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<ListParams>,
    req: Request,
) -> ApiResult<Json<Image>> {
    let image = find_image(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    let waiting =
        image.status == ImageStatus::Importing && image.status_reason == "waiting for the upload";
    if !waiting {
        return Err(ApiError::conflict(format!(
            "Image {} is not waiting for an upload (it is {:?}); create an image with \
             source.upload=true",
            image.name, image.status
        )));
    }
    keel.images.update::<StoreError>(&image.id, |img| {
        img.status_reason = "uploading".into();
        Ok(())
    })?;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = length
        && let Err(e) = crate::quota::check_image(&keel, &image.project, &image.id, length)
    {
        keel.images.update::<StoreError>(&image.id, |img| {
            img.status_reason = "waiting for the upload".into();
            Ok(())
        })?;
        return Err(e.into());
    }
    keel.images.update::<StoreError>(&image.id, |img| {
        img.reserved = length.unwrap_or(0);
        Ok(())
    })?;
    let sha = (!image.sha256.is_empty()).then(|| image.sha256.clone());
    let stream = req.into_body().into_data_stream();
    let uploaded = images::upload(
        keel.clone(),
        image.id.clone(),
        &image.project,
        stream,
        length,
        sha,
    )
    .await;
    let _ = keel.images.update::<StoreError>(&image.id, |img| {
        img.reserved = 0;
        Ok(())
    });
    match uploaded {
        Ok(()) => {}
        Err(images::UploadError::Room(e)) => return Err(e.into()),
        Err(images::UploadError::Failed(e)) => {
            return Err(ApiError::bad_request(keel_api::error_chain(&e)));
        }
    }
    let image = keel
        .images
        .get(&image.id)
        .ok_or_else(|| ApiError::not_found("The image was deleted during its upload"))?;
    Ok(Json((*image).clone()))
}

pub async fn share(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<ListParams>,
    Body(req): Body<ShareImage>,
) -> ApiResult<Json<Image>> {
    let image = find_image(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    // Only into projects the caller belongs to (ones it is shared with
    // already may stay); others are not told apart from missing ones.
    for p in &req.projects {
        let kept = image.shared_with.contains(p);
        let member = crate::auth::role_in(&caller.user, p).is_some();
        if keel.projects.get(p).is_none() || !(kept || member) {
            return Err(ApiError::not_found(format!(
                "No project {p} among yours: an image is shared only into projects you \
                 belong to"
            )));
        }
    }
    let updated = keel
        .images
        .update::<StoreError>(&image.id, |img| {
            img.shared_with = req.projects.clone();
            img.shared_with.sort();
            img.shared_with.dedup();
            img.shared_with.retain(|p| *p != img.project);
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The image was deleted"))?;
    Ok(Json((*updated).clone()))
}

pub async fn remove(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<ListParams>,
) -> ApiResult<StatusCode> {
    let image = find_image(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if let Some(vm) = keel.vms.find(|vm| vm.image == image.id) {
        return Err(ApiError::conflict(format!(
            "VM {} (project {}) boots from image {}; purge it first",
            vm.name, vm.project, image.name
        )));
    }
    if image.status == ImageStatus::Importing && image.status_reason == "uploading" {
        return Err(ApiError::conflict("The image is being uploaded"));
    }
    crate::control::images::removed(&keel, &image.id);
    for what in ["raw", "partial", "converting", "kernel", "initramfs"] {
        let _ = std::fs::remove_file(keel.paths.image_file(&image.id, what));
    }
    keel.images.remove(&image.id)?;
    // After the record is gone, so a download that starts now sees it.
    images::cancel_download(&image.id);
    Ok(StatusCode::NO_CONTENT)
}
