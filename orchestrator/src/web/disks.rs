//! Disks with a life of their own: create, attach, detach, grow, clone,
//! delete.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use keel_api::keeld::{Accepted, AttachDisk, CloneDisk, CreateDisk, DiskDetail, ResizeDisk};
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::{find_disk, find_vm};
use super::vms::accepted;
use super::{ApiError, ApiResult, Body, Caller};
use crate::auth::Access;
use crate::control::{disks, operations, vms};
use crate::keel::Keel;
use crate::model::{Disk, DiskStatus, VmStatus, new_id, now, valid_name};
use crate::store::StoreError;

const GIB: u64 = 1 << 30;
const MAX_GIB: u64 = 64 << 10;

#[derive(Deserialize)]
pub struct ProjectParam {
    #[serde(default)]
    project: Option<String>,
}

pub async fn list(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Query(q): Query<ProjectParam>,
) -> ApiResult<Json<Vec<Disk>>> {
    let project = caller.project(&keel, q.project.as_deref(), Access::Read)?;
    let disks = keel.disks.filter(|d| d.project == project);
    Ok(Json(disks.iter().map(|d| (**d).clone()).collect()))
}

pub async fn show(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
) -> ApiResult<Json<DiskDetail>> {
    let disk = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Read)?;
    Ok(Json(DiskDetail {
        allocated_bytes: disks::allocated(&keel, &disk.id),
        disk: (*disk).clone(),
    }))
}

fn check_size(size_gib: u64) -> ApiResult<()> {
    if size_gib == 0 || size_gib > MAX_GIB {
        return Err(ApiError::bad_request(format!(
            "size_gib={size_gib} is out of range: 1 to {MAX_GIB}"
        )));
    }
    Ok(())
}

fn check_new_name(keel: &Keel, project: &str, name: &str) -> ApiResult<()> {
    if !valid_name(name) {
        return Err(ApiError::bad_request(format!(
            "Disk name {name:?} is invalid: use 1-63 lowercase letters, digits and dashes"
        )));
    }
    if keel
        .disks
        .find(|d| d.project == project && d.name == name)
        .is_some()
    {
        return Err(ApiError::conflict(format!(
            "Project {project} already has a disk named {name}"
        )));
    }
    Ok(())
}

pub async fn create(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Body(req): Body<CreateDisk>,
) -> ApiResult<(StatusCode, Json<Accepted<Disk>>)> {
    let project = caller.project(&keel, req.project.as_deref(), Access::Operate)?;
    check_new_name(&keel, &project, &req.name)?;
    check_size(req.size_gib)?;
    crate::quota::check_disks(&keel, &project, req.size_gib * GIB)?;
    let disk = Disk {
        id: new_id("disk"),
        project: project.clone(),
        name: req.name,
        size: req.size_gib * GIB,
        status: DiskStatus::Creating,
        vm: None,
        system: false,
        image: None,
        readonly: req.readonly,
        created_at: now(),
    };
    // The record first: a file is never left without one.
    let disk = keel.disks.insert(disk)?;
    if let Err(e) = disks::create_job(&keel, &disk.id).await {
        disks::remove_file(&keel, &disk.id);
        let _ = keel.disks.remove(&disk.id);
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("{e}; nothing was created"),
        ));
    }
    let disk = keel.disks.get(&disk.id).unwrap_or(disk);
    let op = operations::start_job(
        &keel,
        &project,
        "disk.create",
        &disk.id,
        caller.name(),
        Value::Null,
    )?;
    Ok(accepted(&op, (*disk).clone()))
}

pub async fn remove(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
) -> ApiResult<StatusCode> {
    let disk = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if disk.system {
        return Err(ApiError::conflict(format!(
            "Disk {} is a VM's system disk: it goes when the VM is purged",
            disk.name
        )));
    }
    if let Some(vm) = &disk.vm {
        return Err(ApiError::conflict(format!(
            "Disk {} is attached to VM {vm}; detach it first",
            disk.name
        )));
    }
    // The record first: a crash in between leaves a file that a restarted
    // keeld removes, never a record without its file.
    keel.disks.remove(&disk.id)?;
    disks::remove_file(&keel, &disk.id);
    Ok(StatusCode::NO_CONTENT)
}

pub async fn attach(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
    Body(req): Body<AttachDisk>,
) -> ApiResult<(StatusCode, Json<Accepted<Disk>>)> {
    let disk = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    let vm = find_vm(
        &keel,
        &caller,
        &req.vm,
        Some(&disk.project),
        Access::Operate,
    )?;
    if vm.project != disk.project {
        return Err(ApiError::bad_request(
            "The disk and the VM are in different projects",
        ));
    }
    if disk.vm.is_some() || disk.status != DiskStatus::Available {
        return Err(ApiError::conflict(format!(
            "Disk {} is {:?}{}",
            disk.name,
            disk.status,
            disk.vm
                .as_ref()
                .map(|v| format!(" (VM {v})"))
                .unwrap_or_default()
        )));
    }
    if vm.deleted_at.is_some() || vm.status == VmStatus::Creating {
        return Err(ApiError::conflict(format!(
            "VM {} cannot take disks now",
            vm.name
        )));
    }
    let running = vms::running(&keel, &vm.id);
    let k = keel.clone();
    let (disk_id, vm_id) = (disk.id.clone(), vm.id.clone());
    // Claim the disk now so two attaches cannot race.
    keel.disks.update::<StoreError>(&disk.id, |d| {
        d.vm = Some(vm_id.clone());
        d.status = DiskStatus::InUse;
        Ok(())
    })?;
    let op = operations::start(
        &keel,
        &vm.project,
        "disk.attach",
        &disk.id,
        caller.name(),
        move |_| async move { disks::attach_job(&k, &vm_id, &disk_id, running).await },
    )?;
    Ok(accepted(&op, (*disk).clone()))
}

pub async fn detach(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
) -> ApiResult<(StatusCode, Json<Accepted<Disk>>)> {
    let disk = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    if disk.system {
        return Err(ApiError::conflict("A system disk cannot be detached"));
    }
    let Some(vm_id) = disk.vm.clone() else {
        return Err(ApiError::conflict(format!(
            "Disk {} is not attached",
            disk.name
        )));
    };
    let running = vms::running(&keel, &vm_id);
    let k = keel.clone();
    let disk_id = disk.id.clone();
    let op = operations::start(
        &keel,
        &disk.project,
        "disk.detach",
        &disk.id,
        caller.name(),
        move |_| async move { disks::detach_job(&k, &vm_id, &disk_id, running).await },
    )?;
    Ok(accepted(&op, (*disk).clone()))
}

pub async fn resize(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
    Body(req): Body<ResizeDisk>,
) -> ApiResult<(StatusCode, Json<Accepted<Disk>>)> {
    let disk = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    check_size(req.size_gib)?;
    let size = req.size_gib * GIB;
    if size < disk.size {
        return Err(ApiError::bad_request(format!(
            "Disks only grow: {} GiB is smaller than its {} GiB",
            req.size_gib,
            disk.size / GIB
        )));
    }
    crate::quota::check_disks(&keel, &disk.project, size - disk.size)?;
    let running_vm = disk.vm.clone().filter(|vm| vms::running(&keel, vm));
    let k = keel.clone();
    let disk_id = disk.id.clone();
    let op = operations::start(
        &keel,
        &disk.project,
        "disk.resize",
        &disk.id,
        caller.name(),
        move |_| async move { disks::resize_job(&k, running_vm.as_deref(), &disk_id, size).await },
    )?;
    Ok(accepted(&op, (*disk).clone()))
}

pub async fn clone_disk(
    State(keel): State<Arc<Keel>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ProjectParam>,
    Body(req): Body<CloneDisk>,
) -> ApiResult<(StatusCode, Json<Accepted<Disk>>)> {
    let source = find_disk(&keel, &caller, &id, q.project.as_deref(), Access::Operate)?;
    check_new_name(&keel, &source.project, &req.name)?;
    let in_running_vm = source.vm.as_ref().is_some_and(|vm| vms::running(&keel, vm));
    if in_running_vm {
        return Err(ApiError::conflict(format!(
            "Disk {} is in use by a running VM; stop it (or detach the disk) for a \
             consistent copy",
            source.name
        )));
    }
    crate::quota::check_disks(&keel, &source.project, source.size)?;
    let copy = keel.disks.insert(Disk {
        id: new_id("disk"),
        project: source.project.clone(),
        name: req.name,
        size: source.size,
        status: DiskStatus::Creating,
        vm: None,
        system: false,
        image: source.image.clone(),
        readonly: source.readonly,
        created_at: now(),
    })?;
    let op = operations::start_job(
        &keel,
        &source.project,
        "disk.clone",
        &copy.id,
        caller.name(),
        json!({ "from": source.id }),
    )?;
    Ok(accepted(&op, (*copy).clone()))
}
