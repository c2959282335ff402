//! The disk service: disks with a life of their own, on the node's storage
//! through the agent.

use std::collections::HashSet;
use std::sync::Arc;

use keel_api::agent::DiskSpec;

use super::operations::Progress;
use crate::keel::Keel;
use crate::model::DiskStatus;
use crate::store::StoreError;

fn chain(e: &crate::agent::AgentError) -> String {
    crate::files::chain(e)
}

fn set_status(keel: &Keel, id: &str, status: DiskStatus) -> Result<(), String> {
    keel.disks
        .update::<StoreError>(id, |d| {
            d.status = status;
            Ok(())
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `disk.create`: a blank disk for a record made `creating`.
pub async fn create_job(keel: &Keel, id: &str) -> Result<(), String> {
    let disk = keel.disks.get(id).ok_or("The disk was deleted")?;
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
            Err(chain(&e))
        }
    }
}

/// `disk.clone`: a thin copy of `from` into a record made `creating`.
pub async fn clone_job(
    keel: &Keel,
    from: &str,
    to: &str,
    progress: Progress,
) -> Result<(), String> {
    let disk = keel.disks.get(to).ok_or("The disk was deleted")?;
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
    copied.map_err(|e| chain(&e))
}

pub async fn attach(keel: &Keel, vm: &str, disk: &str) -> Result<(), String> {
    let readonly = keel.disks.get(disk).is_some_and(|d| d.readonly);
    keel.agent
        .attach_disk(
            vm.to_string(),
            DiskSpec {
                id: disk.to_string(),
                readonly,
            },
        )
        .await
        .map_err(|e| chain(&e))
}

pub async fn detach(keel: &Keel, vm: &str, disk: &str) -> Result<(), String> {
    keel.agent
        .detach_disk(vm.to_string(), disk.to_string())
        .await
        .map_err(|e| chain(&e))
}

/// Grows a disk: through its running VM (the guest sees the new size), or
/// the file itself.
pub async fn grow(
    keel: &Keel,
    running_vm: Option<&str>,
    disk: &str,
    size: u64,
) -> Result<(), String> {
    let grown = match running_vm {
        Some(vm) => {
            keel.agent
                .resize_disk(vm.to_string(), disk.to_string(), size)
                .await
        }
        None => keel.agent.grow_disk(disk.to_string(), size).await,
    };
    grown.map_err(|e| chain(&e))
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
