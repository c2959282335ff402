//! The disk service: disks with a life of their own, on the node's storage
//! through the agent.

use std::collections::HashSet;
use std::sync::Arc;

use keel_api::agent::DiskSpec;
use thiserror::Error;

use super::operations::Progress;
use crate::agent::AgentError;
use crate::keel::Keel;
use crate::model::DiskStatus;
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("The disk was deleted")]
    Gone,
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn set_status(keel: &Keel, id: &str, status: DiskStatus) -> Result<(), DiskError> {
    keel.disks.update::<StoreError>(id, |d| {
        d.status = status;
        Ok(())
    })?;
    Ok(())
}

/// `disk.create`: a blank disk for a record made `creating`.
pub async fn create_job(keel: &Keel, id: &str) -> Result<(), DiskError> {
    let disk = keel.disks.get(id).ok_or(DiskError::Gone)?;
    if disk.status != DiskStatus::Creating {
        return Ok(());
    }
    match keel
        .agent
        .create_blank_disk(id.to_string(), disk.size)
        .await
    {
        Ok(()) => set_status(keel, id, DiskStatus::Available),
        Err(e) => {
            let _ = set_status(keel, id, DiskStatus::Error);
            Err(e.into())
        }
    }
}

/// `disk.clone`: a thin copy of `from` into a record made `creating`.
pub async fn clone_job(
    keel: &Keel,
    from: &str,
    to: &str,
    progress: Progress,
) -> Result<(), DiskError> {
    let disk = keel.disks.get(to).ok_or(DiskError::Gone)?;
    if disk.status != DiskStatus::Creating {
        return Ok(());
    }
    let copied = keel
        .agent
        .clone_disk(
            from.to_string(),
            to.to_string(),
            Arc::new(move |pct| progress.set(pct)),
        )
        .await;
    let status = if copied.is_ok() {
        DiskStatus::Available
    } else {
        DiskStatus::Error
    };
    set_status(keel, to, status)?;
    Ok(copied?)
}

/// `disk.attach`: hot-plugged when the VM runs, then recorded in the VM;
/// a failure gives the disk back.
pub async fn attach_job(keel: &Keel, vm: &str, disk: &str, running: bool) -> Result<(), DiskError> {
    let attached = async {
        if running {
            attach(keel, vm, disk).await?;
        }
        keel.vms.update::<StoreError>(vm, |v| {
            v.disks.push(disk.to_string());
            Ok(())
        })?;
        Ok::<_, DiskError>(())
    }
    .await;
    if attached.is_err() {
        let _ = keel.disks.update::<StoreError>(disk, |d| {
            d.vm = None;
            d.status = DiskStatus::Available;
            Ok(())
        });
    }
    attached
}

/// `disk.detach`: the guest lets go of it (when the VM runs), then it is
/// free.
pub async fn detach_job(keel: &Keel, vm: &str, disk: &str, running: bool) -> Result<(), DiskError> {
    if running {
        detach(keel, vm, disk).await?;
    }
    keel.vms.update::<StoreError>(vm, |v| {
        v.disks.retain(|d| d != disk);
        Ok(())
    })?;
    keel.disks.update::<StoreError>(disk, |d| {
        d.vm = None;
        d.status = DiskStatus::Available;
        Ok(())
    })?;
    Ok(())
}

/// `disk.resize`: grown (live through its running VM), then recorded.
pub async fn resize_job(
    keel: &Keel,
    running_vm: Option<&str>,
    disk: &str,
    size: u64,
) -> Result<(), DiskError> {
    grow(keel, running_vm, disk, size).await?;
    keel.disks.update::<StoreError>(disk, |d| {
        d.size = size;
        Ok(())
    })?;
    Ok(())
}

pub async fn attach(keel: &Keel, vm: &str, disk: &str) -> Result<(), DiskError> {
    let readonly = keel.disks.get(disk).is_some_and(|d| d.readonly);
    keel.agent
        .attach_disk(
            vm.to_string(),
            DiskSpec {
                id: disk.to_string(),
                readonly,
            },
        )
        .await?;
    Ok(())
}

pub async fn detach(keel: &Keel, vm: &str, disk: &str) -> Result<(), DiskError> {
    keel.agent
        .detach_disk(vm.to_string(), disk.to_string())
        .await?;
    Ok(())
}

/// Grows a disk: through its running VM (the guest sees the new size), or
/// the file itself.
pub async fn grow(
    keel: &Keel,
    running_vm: Option<&str>,
    disk: &str,
    size: u64,
) -> Result<(), DiskError> {
    let grown = match running_vm {
        Some(vm) => {
            keel.agent
                .resize_disk(vm.to_string(), disk.to_string(), size)
                .await
        }
        None => keel.agent.grow_disk(disk.to_string(), size).await,
    };
    Ok(grown?)
}

/// Bytes the disk occupies on its node.
pub fn allocated(keel: &Keel, disk: &str) -> u64 {
    keel.agent.disk_allocated(disk)
}

pub fn remove_file(keel: &Keel, disk: &str) {
    keel.agent.remove_disk(disk);
}

/// Disk files no record knows (left by a crash between the two): removed.
pub fn remove_unknown_files(keel: &Keel) {
    let known: HashSet<String> = keel
        .disks
        .filter(|_| true)
        .iter()
        .map(|d| d.id.clone())
        .collect();
    let Ok(entries) = std::fs::read_dir(keel.paths.disks()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_suffix(".raw") else {
            continue;
        };
        if id.starts_with("disk-") && !known.contains(id) {
            log::warn!("Removing disk file {name}: no disk record has it");
            keel.agent.remove_disk(id);
        }
    }
}
