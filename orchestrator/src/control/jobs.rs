//! The jobs behind stored operations, and what a restarted keeld does with
//! work a crash cut short: jobs are run again from their records; other
//! operations end `failed` with their resource set right; half-made
//! resources whose request was never answered are removed.

use std::collections::HashSet;
use std::sync::Arc;

use thiserror::Error;

use super::disks::DiskError;
use super::operations::Progress;
use super::vms::VmError;
use super::{disks, vms};
use crate::keel::Keel;
use crate::model::{DiskStatus, ImageStatus, Operation, OperationStatus, VmStatus};
use crate::store::StoreError;

/// Operations whose job can run again after a restart.
pub fn resumable(action: &str) -> bool {
    matches!(
        action,
        "vm.create"
            | "vm.start"
            | "vm.stop"
            | "vm.force-off"
            | "vm.reboot"
            | "vm.pause"
            | "vm.resume"
            | "vm.delete"
            | "vm.purge"
            | "vm.resize"
            | "vm.update"
            | "vm.restore"
            | "disk.create"
            | "disk.clone"
    )
}

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{0} is not a job keeld knows")]
    Unknown(String),
}

/// Runs an operation's job; `resumed` when a restarted keeld picked it up.
pub async fn run(
    keel: &Arc<Keel>,
    op: &Operation,
    progress: Progress,
    resumed: bool,
) -> Result<(), JobError> {
    let target = op.target.as_str();
    match op.action.as_str() {
        "vm.create" => Ok(vms::create_job(keel, target, progress).await?),
        "vm.resize" => {
            let vcpus = op.params["vcpus"]
                .as_u64()
                .and_then(|v| u8::try_from(v).ok());
            let memory_mib = op.params["memory_mib"].as_u64();
            match (op.params["live"].as_bool(), vcpus, memory_mib) {
                (Some(true), Some(vcpus), Some(memory_mib)) => {
                    Ok(vms::resize_job(keel, target, vcpus, memory_mib).await?)
                }
                _ => Ok(()),
            }
        }
        "vm.update" | "vm.restore" => Ok(()),
        "disk.create" => Ok(disks::create_job(keel, target).await?),
        "disk.clone" => {
            let from = op.params["from"].as_str().unwrap_or_default();
            Ok(disks::clone_job(keel, from, target, progress).await?)
        }
        action => match action.strip_prefix("vm.") {
            Some(lifecycle) => Ok(vms::lifecycle_job(keel, target, lifecycle, resumed).await?),
            None => Err(JobError::Unknown(action.to_string())),
        },
    }
}

/// Ends an operation that cannot be resumed: its resource is set right and
/// the message says what to do.
pub fn interrupted(keel: &Keel, op: &Operation) -> String {
    match op.action.as_str() {
        "image.import" | "image.from-vm" => {
            crate::images::interrupted(keel, &op.target);
            "keeld restarted during the import; its partial data was removed: delete the \
             image and import it again"
                .into()
        }
        "disk.attach" => {
            if let Some(disk) = keel.disks.get(&op.target)
                && let Some(vm) = disk.vm.as_ref()
                && !keel.vms.get(vm).is_some_and(|v| v.disks.contains(&disk.id))
            {
                let _ = keel.disks.update::<StoreError>(&disk.id, |d| {
                    d.vm = None;
                    d.status = DiskStatus::Available;
                    Ok(())
                });
            }
            "keeld restarted before the disk was attached; attach it again".into()
        }
        _ => "keeld restarted while this operation ran; check the resource and retry".into(),
    }
}

/// At keeld's start, before jobs resume: removes what a crash left half
/// made of requests that were never answered (a VM or disk recorded but
/// no operation for it), records whose files never came, and files no
/// record knows.
pub fn repair(keel: &Keel) {
    let running: HashSet<(String, String)> = keel
        .operations
        .filter(|op| op.status == OperationStatus::Running)
        .iter()
        .map(|op| (op.action.clone(), op.target.clone()))
        .collect();
    let has_op = |action: &str, target: &str| running.contains(&(action.into(), target.into()));
    for vm in keel.vms.filter(|vm| vm.status == VmStatus::Creating) {
        if has_op("vm.create", &vm.id) {
            continue;
        }
        log::warn!(
            "VM {} ({}): removing a create that was never answered",
            vm.name,
            vm.id
        );
        vms::discard(keel, &vm);
    }
    for disk in keel.disks.filter(|_| true) {
        let owner_gone = disk
            .vm
            .as_ref()
            .is_some_and(|vm| keel.vms.get(vm).is_none());
        let stranded = disk.status == DiskStatus::Creating
            && disk.vm.is_none()
            && !has_op("disk.create", &disk.id)
            && !has_op("disk.clone", &disk.id);
        if (disk.system && owner_gone) || stranded {
            log::warn!(
                "Disk {} ({}): removing a half-made disk",
                disk.name,
                disk.id
            );
            keel.agent.remove_disk(&disk.id);
            let _ = keel.disks.remove(&disk.id);
        } else if owner_gone {
            let _ = keel.disks.update::<StoreError>(&disk.id, |d| {
                d.vm = None;
                d.status = DiskStatus::Available;
                Ok(())
            });
        }
    }
    disks::remove_unknown_files(keel);
    for image in keel.images.filter(|i| i.status == ImageStatus::Importing) {
        if !has_op("image.import", &image.id) && !has_op("image.from-vm", &image.id) {
            crate::images::interrupted(keel, &image.id);
        }
    }
}
