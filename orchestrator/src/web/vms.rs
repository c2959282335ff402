//! VMs: create, lifecycle, resize, recycle bin, batch actions.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_api::keeld::{
    Accepted, Batch, BatchResult, BatchResults, CreateVm, Keyed, MakeImage, Page, ResizeMode,
    ResizeVm, ResizedVm, UpdateVm,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::access::{find_image, find_vm, image_usable_in};
use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::Access;
use crate::control::{operations, scheduler, vms};
use crate::keel::Keel;
use crate::model::{
    Disk, DiskStatus, GuestInit, Image, ImageStatus, Operation, PowerState, Vm, VmStatus, new_id,
    now, valid_name,
};
use crate::store::{Log, LogQuery, StoreError};

const GIB: u64 = 1 << 30;
/// The largest disk keeld makes: 64 TiB.
const MAX_DISK_GIB: u64 = 64 << 10;

/// A 202 answer: the operation started and the resource (under its key).
pub fn accepted<T: Keyed + Serialize>(
    op: &Operation,
    resource: T,
) -> (StatusCode, Json<Accepted<T>>) {
    (
        StatusCode::ACCEPTED,
        Json(Accepted {
            operation: op.clone(),
            resource,
        }),
    )
}

/// vCPUs and memory a VM may have at all.
pub fn check_shape(vcpus: u8, memory_mib: u64) -> ApiResult<()> {
    if vcpus == 0 || vcpus > keel_api::vm_config::MAX_VCPUS {
        return Err(ApiError::bad_request(format!(
            "vcpus={vcpus} is out of range: 1 to {}",
            keel_api::vm_config::MAX_VCPUS
        )));
    }
    if !(64..=(16 << 20)).contains(&memory_mib) {
        return Err(ApiError::bad_request(format!(
            "memory_mib={memory_mib} is out of range: 64 MiB to 16 TiB"
        )));
    }
    Ok(())
}

/// Refuses a VM that could never run on this host.
fn check_fits_host(keel: &Keel, vcpus: u8, memory_mib: u64) -> ApiResult<()> {
    let node = crate::control::nodes::node_status(keel);
    scheduler::check_fits_any(&node, vcpus, memory_mib)
        .map_err(|e| ApiError::unprocessable(e.to_string()))
}

#[derive(Deserialize)]
pub struct ListParams {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    status: Option<VmStatus>,
    /// Page size (default 100, at most 1000) and the id to continue after.
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
}

/// Pages kept in the list cache at most (then it starts afresh).
const LIST_CACHE_ENTRIES: usize = 256;

pub async fn list(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Query(q): Query<ListParams>,
) -> ApiResult<Response> {
    let project = caller.project(&keel, q.project.as_deref(), Access::Read)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let after = q.after.unwrap_or_default();
    // A page depends only on the query and the VMs, never on the caller
    // (access was checked above): serve it from the cache while no VM
    // changed.
    let key = format!("{project}\n{}\n{:?}\n{limit}\n{after}", q.deleted, q.status);
    let generation = keel.vms.generation();
    let cache = || keel.vm_list_cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((g, body)) = cache().get(&key)
        && *g == generation
    {
        return Ok(json_bytes(body.clone()));
    }
    let vms = keel.vms.filter(|vm| {
        vm.project == project
            && vm.deleted_at.is_some() == q.deleted
            && q.status.is_none_or(|s| s == vm.status)
            && vm.id.as_str() > after.as_str()
    });
    let page = Page {
        items: vms.iter().take(limit).map(|vm| &**vm).collect(),
        next: (vms.len() > limit).then(|| vms[limit - 1].id.clone()),
    };
    let body = axum::body::Bytes::from(
        serde_json::to_vec(&page).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    let mut cache = cache();
    if cache.len() >= LIST_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(key, (generation, body.clone()));
    Ok(json_bytes(body))
}

fn json_bytes(body: axum::body::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Deserialize)]
pub struct KeyParams {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    purge: bool,
}

pub async fn show(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
) -> ApiResult<Json<Vm>> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Read)?;
    Ok(Json((*vm).clone()))
}

fn name_taken(keel: &Keel, project: &str, name: &str) -> bool {
    keel.vms
        .find(|vm| vm.project == project && vm.name == name && vm.deleted_at.is_none())
        .is_some()
}

pub async fn create(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateVm>,
) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
    let project = caller.project(&keel, req.project.as_deref(), Access::Operate)?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "VM name {:?} is invalid: use 1-63 lowercase letters, digits and dashes, not at \
             either end",
            req.name
        )));
    }
    if name_taken(&keel, &project, &req.name) {
        return Err(ApiError::conflict(format!(
            "Project {project} already has a VM named {}",
            req.name
        )));
    }
    let image = find_image(&keel, &caller, &req.image, Some(&project), Access::Read)?;
    if !image_usable_in(&image, &project) {
        return Err(ApiError::not_found(format!(
            "No image {} in project {project}",
            req.image
        )));
    }
    if image.status != ImageStatus::Ready {
        return Err(ApiError::conflict(format!(
            "Image {} is not ready ({:?}{}); wait for its import or import it again",
            image.name,
            image.status,
            if image.status_reason.is_empty() {
                String::new()
            } else {
                format!(": {}", image.status_reason)
            }
        )));
    }
    let flavor_name = req
        .flavor
        .clone()
        .or_else(|| image.default_flavor.clone())
        .unwrap_or_else(|| "1c2g".into());
    let (vcpus, memory_mib) = match (req.vcpus, req.memory_mib) {
        (Some(v), Some(m)) => (v, m),
        (v, m) => {
            let flavor = keel.flavors.get(&flavor_name).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "No flavor {flavor_name}; GET /api/v1/flavors lists them"
                ))
            })?;
            (v.unwrap_or(flavor.vcpus), m.unwrap_or(flavor.memory_mib))
        }
    };
    check_shape(vcpus, memory_mib)?;
    check_fits_host(&keel, vcpus, memory_mib)?;
    let image_gib = image.size.div_ceil(GIB).max(image.min_disk_gib);
    let disk_gib = req.disk_gib.unwrap_or(image_gib);
    if disk_gib < image_gib {
        return Err(ApiError::bad_request(format!(
            "disk_gib={disk_gib} is smaller than image {} needs ({image_gib} GiB)",
            image.name
        )));
    }
    for size in std::iter::once(disk_gib).chain(req.data_disks.iter().map(|d| d.size_gib)) {
        if size == 0 || size > MAX_DISK_GIB {
            return Err(ApiError::bad_request(format!(
                "A disk of {size} GiB is out of range: 1 GiB to {MAX_DISK_GIB} GiB"
            )));
        }
    }
    crate::quota::check_vms(&keel, &project, 1, u64::from(vcpus), memory_mib)?;
    let disk_bytes = req.data_disks.iter().fold(disk_gib * GIB, |sum, d| {
        sum.saturating_add(d.size_gib * GIB)
    });
    crate::quota::check_disks(&keel, &project, disk_bytes)?;
    for (i, d) in req.data_disks.iter().enumerate() {
        if let Some(name) = &d.name
            && !valid_name(name)
        {
            return Err(ApiError::bad_request(format!(
                "data_disks[{i}].name {name:?} is invalid"
            )));
        }
    }
    let hostname = req.hostname.clone().unwrap_or_else(|| req.name.clone());
    if !valid_name(&hostname) {
        return Err(ApiError::bad_request(format!(
            "hostname {hostname:?} is invalid: a DNS label"
        )));
    }
    if req
        .root_password
        .as_ref()
        .is_some_and(|p| p.is_empty() || p.len() > 256)
    {
        return Err(ApiError::bad_request(
            "root_password must be 1 to 256 characters",
        ));
    }
    if req
        .ssh_authorized_keys
        .iter()
        .any(|k| !k.starts_with("ssh-") && !k.starts_with("ecdsa-"))
    {
        return Err(ApiError::bad_request(
            "ssh_authorized_keys must be OpenSSH public keys (ssh-ed25519 AAAA..., ssh-rsa ...)",
        ));
    }

    let vm_id = new_id("vm");
    let system = Disk {
        id: new_id("disk"),
        project: project.clone(),
        name: format!("{}-system", req.name),
        size: disk_gib * GIB,
        status: DiskStatus::Creating,
        vm: Some(vm_id.clone()),
        system: true,
        image: Some(image.id.clone()),
        readonly: false,
        created_at: now(),
    };
    let data: Vec<Disk> = req
        .data_disks
        .iter()
        .enumerate()
        .map(|(i, d)| Disk {
            id: new_id("disk"),
            project: project.clone(),
            name: d
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-data{}", req.name, i + 1)),
            size: d.size_gib * GIB,
            status: DiskStatus::Creating,
            vm: Some(vm_id.clone()),
            system: false,
            image: None,
            readonly: false,
            created_at: now(),
        })
        .collect();
    let start = req.start.unwrap_or(true);
    let vm = Vm {
        id: vm_id.clone(),
        project: project.clone(),
        name: req.name,
        description: req.description,
        flavor: flavor_name,
        vcpus,
        memory_mib,
        image: image.id.clone(),
        system_disk: system.id.clone(),
        disks: data.iter().map(|d| d.id.clone()).collect(),
        restart_policy: req.restart_policy,
        guest_init: GuestInit {
            hostname: Some(hostname),
            root_password_set: req.root_password.is_some(),
            legacy_root_password: None,
            ssh_authorized_keys: req.ssh_authorized_keys,
        },
        desired: if start {
            PowerState::Running
        } else {
            PowerState::Stopped
        },
        status: VmStatus::Creating,
        status_reason: String::new(),
        deleted_at: None,
        pending_vcpus: None,
        pending_memory_mib: None,
        restarts: 0,
        created_at: now(),
    };
    // The records first, then the seed (the password lives only there),
    // then the operation: a crash before it leaves records that a
    // restarted keeld removes (the request was never answered).
    keel.disks.insert(system)?;
    for d in data {
        keel.disks.insert(d)?;
    }
    let vm = keel.vms.insert(vm)?;
    if let Err(e) = vms::write_seed(&keel, &vm, req.root_password).await {
        vms::discard(&keel, &vm);
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("{e}; nothing was created"),
        ));
    }
    let op = operations::start_job(
        &keel,
        &project,
        "vm.create",
        &vm_id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*vm).clone()))
}

fn require_live(vm: &Vm) -> ApiResult<()> {
    if vm.deleted_at.is_some() {
        return Err(ApiError::conflict(format!(
            "VM {} is in the recycle bin; restore it first",
            vm.name
        )));
    }
    if vm.status == VmStatus::Creating {
        return Err(ApiError::conflict(format!(
            "VM {} is still being created",
            vm.name
        )));
    }
    Ok(())
}

/// Runs a lifecycle action as an operation.
async fn lifecycle(
    keel: Arc<Keel>,
    caller: Caller,
    key: String,
    project: Option<String>,
    action: &'static str,
) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
    let vm = find_vm(&keel, &caller, &key, project.as_deref(), Access::Operate)?;
    require_live(&vm)?;
    let running = vms::running(&keel, &vm.id);
    match action {
        "start" => {}
        "reboot" | "pause" if !running || vm.status == VmStatus::Paused && action == "pause" => {
            return Err(ApiError::conflict(format!(
                "VM {} is {:?}; {action} needs a running VM",
                vm.name, vm.status
            )));
        }
        "resume" if vm.status != VmStatus::Paused => {
            return Err(ApiError::conflict(format!(
                "VM {} is {:?}, not paused",
                vm.name, vm.status
            )));
        }
        _ => {}
    }
    // The intent is stored before the answer: the reconciler acts on it,
    // and a restarted keeld finds it.
    let desired = match action {
        "start" | "resume" => Some(PowerState::Running),
        "stop" | "force-off" => Some(PowerState::Stopped),
        "pause" => Some(PowerState::Paused),
        _ => None,
    };
    let vm = match desired {
        Some(d) => vms::set_desired(&keel, &vm.id, d).unwrap_or(vm),
        None => vm,
    };
    let op = operations::start_job(
        &keel,
        &vm.project,
        &format!("vm.{action}"),
        &vm.id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*vm).clone()))
}

macro_rules! lifecycle_handler {
    ($name:ident, $action:expr) => {
        pub async fn $name(
            State(keel): State<Arc<Keel>>,
            caller: Caller,
            Path(id): Path<String>,
            Query(q): Query<KeyParams>,
        ) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
            lifecycle(keel, caller, id, q.project, $action).await
        }
    };
}

lifecycle_handler!(start, "start");
lifecycle_handler!(stop, "stop");
lifecycle_handler!(force_off, "force-off");
lifecycle_handler!(reboot, "reboot");
lifecycle_handler!(pause, "pause");
lifecycle_handler!(resume, "resume");

pub async fn update(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
    Body(req): Body<UpdateVm>,
) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if let Some(name) = &req.name {
        if !valid_name(name) {
            return Err(ApiError::bad_request(format!(
                "VM name {name:?} is invalid"
            )));
        }
        if *name != vm.name && name_taken(&keel, &vm.project, name) {
            return Err(ApiError::conflict(format!(
                "Project {} already has a VM named {name}",
                vm.project
            )));
        }
    }
    if req.description.as_ref().is_some_and(|d| d.len() > 4096) {
        return Err(ApiError::bad_request(
            "description is longer than 4096 bytes",
        ));
    }
    let updated = keel
        .vms
        .update::<StoreError>(&vm.id, |v| {
            if let Some(name) = req.name {
                v.name = name;
            }
            if let Some(d) = req.description {
                v.description = d;
            }
            if let Some(p) = req.restart_policy {
                v.restart_policy = p;
            }
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The VM was deleted"))?;
    let op = operations::start_job(
        &keel,
        &vm.project,
        "vm.update",
        &vm.id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*updated).clone()))
}

pub async fn resize(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
    Body(req): Body<ResizeVm>,
) -> ApiResult<(StatusCode, Json<Accepted<ResizedVm>>)> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    require_live(&vm)?;
    let (mut vcpus, mut memory_mib) = (vm.vcpus, vm.memory_mib);
    if let Some(f) = &req.flavor {
        let flavor = keel
            .flavors
            .get(f)
            .ok_or_else(|| ApiError::bad_request(format!("No flavor {f}")))?;
        (vcpus, memory_mib) = (flavor.vcpus, flavor.memory_mib);
    }
    vcpus = req.vcpus.unwrap_or(vcpus);
    memory_mib = req.memory_mib.unwrap_or(memory_mib);
    check_shape(vcpus, memory_mib)?;
    check_fits_host(&keel, vcpus, memory_mib)?;
    crate::quota::check_vms(
        &keel,
        &vm.project,
        0,
        u64::from(vcpus).saturating_sub(u64::from(vm.vcpus.max(vm.pending_vcpus.unwrap_or(0)))),
        memory_mib.saturating_sub(vm.memory_mib.max(vm.pending_memory_mib.unwrap_or(0))),
    )?;
    let seen = vms::observed(&keel, &vm.id);
    let running = seen.has_vmm();
    let hot = running && vms::hot_resizable(&vm, &seen, vcpus, memory_mib);
    let flavor = req.flavor.clone();
    let updated = keel
        .vms
        .update::<StoreError>(&vm.id, |v| {
            if let Some(f) = flavor {
                v.flavor = f;
            }
            if running && !hot {
                v.pending_vcpus = Some(vcpus);
                v.pending_memory_mib = Some(memory_mib);
            } else if !running {
                v.vcpus = vcpus;
                v.memory_mib = memory_mib;
            }
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The VM was deleted"))?;
    let op = operations::start_job(
        &keel,
        &vm.project,
        "vm.resize",
        &vm.id,
        caller.name(),
        json!({"live": hot, "vcpus": vcpus, "memory_mib": memory_mib}),
    )?;
    let resize = if hot {
        ResizeMode::Live
    } else if running {
        ResizeMode::AtNextBoot
    } else {
        ResizeMode::Done
    };
    Ok(accepted(
        &op,
        ResizedVm {
            vm: (*updated).clone(),
            resize,
        },
    ))
}

pub async fn remove(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if vm.status == VmStatus::Creating {
        return Err(ApiError::conflict(format!(
            "VM {} is still being created",
            vm.name
        )));
    }
    // Into the recycle bin at once (its name is free again), stopped by
    // the reconciler; a purge then removes it.
    let vm = keel
        .vms
        .update::<StoreError>(&vm.id, |v| {
            v.deleted_at.get_or_insert_with(now);
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The VM was purged"))?;
    let vm = vms::set_desired(&keel, &vm.id, PowerState::Stopped).unwrap_or(vm);
    let op = operations::start_job(
        &keel,
        &vm.project,
        if q.purge { "vm.purge" } else { "vm.delete" },
        &vm.id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*vm).clone()))
}

pub async fn restore(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
) -> ApiResult<(StatusCode, Json<Accepted<Vm>>)> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if vm.deleted_at.is_none() {
        return Err(ApiError::conflict(format!(
            "VM {} is not in the recycle bin",
            vm.name
        )));
    }
    if name_taken(&keel, &vm.project, &vm.name) {
        return Err(ApiError::conflict(format!(
            "Another VM is named {} now; rename it first",
            vm.name
        )));
    }
    crate::quota::check_vms(&keel, &vm.project, 1, u64::from(vm.vcpus), vm.memory_mib)?;
    let restored = keel
        .vms
        .update::<StoreError>(&vm.id, |v| {
            v.deleted_at = None;
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found("The VM was purged"))?;
    let op = operations::start_job(
        &keel,
        &vm.project,
        "vm.restore",
        &vm.id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*restored).clone()))
}

pub async fn batch(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<Batch>,
) -> ApiResult<(StatusCode, Json<BatchResults>)> {
    if !matches!(
        req.action.as_str(),
        "start" | "stop" | "force-off" | "delete"
    ) {
        return Err(ApiError::bad_request(format!(
            "action {:?}: expected start, stop, force-off or delete",
            req.action
        )));
    }
    if req.vms.is_empty() || req.vms.len() > 1000 {
        return Err(ApiError::bad_request("vms: give 1 to 1000 VMs"));
    }
    let mut results = Vec::new();
    for key in req.vms {
        let outcome = if req.action == "delete" {
            remove(
                State(keel.clone()),
                caller.clone(),
                Path(key.clone()),
                Query(KeyParams {
                    project: req.project.clone(),
                    purge: false,
                }),
            )
            .await
        } else {
            let action = match req.action.as_str() {
                "start" => "start",
                "stop" => "stop",
                _ => "force-off",
            };
            lifecycle(
                keel.clone(),
                caller.clone(),
                key.clone(),
                req.project.clone(),
                action,
            )
            .await
        };
        results.push(match outcome {
            Ok((_, Json(accepted))) => BatchResult {
                vm: key,
                operation: Some(accepted.operation),
                status: None,
                error: None,
            },
            Err(e) => BatchResult {
                vm: key,
                operation: None,
                status: Some(e.status.as_u16()),
                error: Some(e.message),
            },
        });
    }
    Ok((StatusCode::ACCEPTED, Json(BatchResults { results })))
}

pub async fn make_image(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<KeyParams>,
    Body(req): Body<MakeImage>,
) -> ApiResult<(StatusCode, Json<Accepted<Image>>)> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if vm.status != VmStatus::Stopped || vms::running(&keel, &vm.id) {
        return Err(ApiError::conflict(format!(
            "VM {} is {:?}; stop it first so its disk is consistent",
            vm.name, vm.status
        )));
    }
    super::images::check_new_name(&keel, &vm.project, &req.name)?;
    let source = keel
        .images
        .get(&vm.image)
        .ok_or_else(|| ApiError::conflict("The VM's image is gone: its boot files with it"))?;
    let disk = keel
        .disks
        .get(&vm.system_disk)
        .ok_or_else(|| ApiError::internal("The VM's system disk record is missing"))?;
    crate::quota::check_image(&keel, &vm.project, "", disk.size)?;
    let image = keel.images.insert(Image {
        id: new_id("img"),
        project: vm.project.clone(),
        name: req.name,
        source_format: crate::model::ImageFormat::Raw,
        status: ImageStatus::Importing,
        status_reason: String::new(),
        size: disk.size,
        progress: 0,
        reserved: 0,
        sha256: String::new(),
        os_type: source.os_type.clone(),
        os_version: source.os_version.clone(),
        default_flavor: source.default_flavor.clone(),
        min_disk_gib: disk.size.div_ceil(GIB),
        boot: source.boot.clone(),
        shared_with: vec![],
        created_at: now(),
    })?;
    let k = keel.clone();
    let (image_id, source_id, disk_id) = (image.id.clone(), source.id.clone(), disk.id.clone());
    let op = operations::start(
        &keel,
        &vm.project,
        "image.from-vm",
        &image.id,
        caller.name(),
        move |op| async move {
            let result = async {
                for what in ["kernel", "initramfs"] {
                    if let Ok(from) = std::fs::File::open(k.paths.image_file(&source_id, what)) {
                        crate::images::copy_boot_file(&k, &image_id, what, from)?;
                    }
                }
                super::images::import_own_file(
                    k.clone(),
                    image_id.clone(),
                    k.paths.disk(&disk_id),
                    op,
                )
                .await
            }
            .await;
            if let Err(e) = &result {
                let _ = k.images.update::<StoreError>(&image_id, |img| {
                    img.status = ImageStatus::Error;
                    img.status_reason = keel_api::error_chain(e);
                    Ok(())
                });
            }
            result
        },
    )?;
    Ok(accepted(&op, (*image).clone()))
}

#[derive(Deserialize)]
pub struct EventParams {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: usize,
}

pub async fn events(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<EventParams>,
) -> ApiResult<Json<Value>> {
    let vm = find_vm(&keel, &caller, &id, q.project.as_deref(), Access::Read)?;
    let entries = keel.store.read(
        Log::Event,
        &LogQuery {
            subject: Some(vm.id.clone()),
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
            let mut b = e.body;
            b["seq"] = json!(e.seq);
            b
        })
        .collect();
    Ok(Json(json!(out)))
}
