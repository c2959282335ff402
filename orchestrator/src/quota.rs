//! Room for new things: a project's quota and the host's free space.
//!
//! Every create or growth (VMs, vCPUs, memory, disks, image bytes) asks here
//! first, so a request that cannot fit is refused before anything is
//! written: 422 when it is over the project's quota, 507 when the file
//! system cannot hold it.

use std::path::Path;

use thiserror::Error;

use crate::keel::Keel;
use crate::model::{ImageStatus, Quota};

const GIB: u64 = 1 << 30;
/// Space kept free on the data dir's file system for the store, logs and
/// VMs' files: a disk or image may not take the last 2 %, or 256 MiB.
const RESERVE_PERCENT: u64 = 2;
const RESERVE_MIN: u64 = 256 << 20;

#[derive(Debug, Error, PartialEq)]
pub enum QuotaError {
    #[error(
        "Project {project} is over its {what} quota: {used} in use + {asked} asked > {limit}; \
         free some or ask a system admin to raise the quota"
    )]
    Exceeded {
        project: String,
        what: &'static str,
        used: u64,
        asked: u64,
        limit: u64,
    },
    #[error(
        "Not enough space on the host for {asked} bytes: {free} bytes free on {path} (keeld \
         keeps {reserve} bytes free); free space or make it smaller"
    )]
    NoSpace {
        path: String,
        asked: u64,
        free: u64,
        reserve: u64,
    },
}

/// What a project holds now, in the units of [`Quota`].
pub use keel_api::keeld::Usage;

pub fn usage(keel: &Keel, project: &str) -> Usage {
    let mut u = Usage::default();
    for vm in keel
        .vms
        .filter(|vm| vm.project == project && vm.deleted_at.is_none())
    {
        u.vms += 1;
        u.vcpus += u64::from(vm.vcpus.max(vm.pending_vcpus.unwrap_or(0)));
        u.memory_mib += vm.memory_mib.max(vm.pending_memory_mib.unwrap_or(0));
    }
    let disk_bytes: u64 = keel
        .disks
        .filter(|d| d.project == project)
        .iter()
        .map(|d| d.size)
        .sum();
    u.disk_gib = disk_bytes.div_ceil(GIB);
    let image_bytes: u64 = keel
        .images
        .filter(|i| i.project == project && i.status != ImageStatus::Error)
        .iter()
        .map(|i| i.size.max(i.reserved))
        .sum();
    u.image_gib = image_bytes.div_ceil(GIB);
    u
}

fn quota_of(keel: &Keel, project: &str) -> Quota {
    keel.projects
        .get(project)
        .map(|p| p.quota.clone())
        .unwrap_or_default()
}

fn within(
    project: &str,
    what: &'static str,
    used: u64,
    asked: u64,
    limit: Option<u64>,
) -> Result<(), QuotaError> {
    match limit {
        Some(limit) if used.saturating_add(asked) > limit => Err(QuotaError::Exceeded {
            project: project.to_string(),
            what,
            used,
            asked,
            limit,
        }),
        _ => Ok(()),
    }
}

/// Room in `project` for `vms` more VMs with `vcpus` and `memory_mib` more.
pub fn check_vms(
    keel: &Keel,
    project: &str,
    vms: u64,
    vcpus: u64,
    memory_mib: u64,
) -> Result<(), QuotaError> {
    let q = quota_of(keel, project);
    let u = usage(keel, project);
    within(project, "VM", u.vms, vms, q.vms)?;
    within(project, "vCPU", u.vcpus, vcpus, q.vcpus)?;
    within(
        project,
        "memory (MiB)",
        u.memory_mib,
        memory_mib,
        q.memory_mib,
    )
}

/// Room in `project`'s quota and on the host for `bytes` more of disks.
pub fn check_disks(keel: &Keel, project: &str, bytes: u64) -> Result<(), QuotaError> {
    let q = quota_of(keel, project);
    let u = usage(keel, project);
    within(
        project,
        "disk (GiB)",
        u.disk_gib,
        bytes.div_ceil(GIB),
        q.disk_gib,
    )?;
    // Disks live on the node: its agent says how much room there is.
    let node = keel.agent.node_status();
    room(
        &keel.paths.disks(),
        node.disk_bytes,
        node.disk_available_bytes,
        bytes,
    )
}

/// Room in `project`'s quota and on the host for an image of `bytes`
/// (`image` is the record being filled, already counted by its
/// reservation, so it is left out).
pub fn check_image(keel: &Keel, project: &str, image: &str, bytes: u64) -> Result<(), QuotaError> {
    let q = quota_of(keel, project);
    let own = keel
        .images
        .get(image)
        .map(|i| i.size.max(i.reserved))
        .unwrap_or(0);
    let u = usage(keel, project);
    let used = u.image_gib.saturating_sub(own.div_ceil(GIB));
    within(
        project,
        "image (GiB)",
        used,
        bytes.div_ceil(GIB),
        q.image_gib,
    )?;
    check_space(&keel.paths.images(), bytes)
}

/// Whether the file system holding `dir` has `bytes` free beyond keeld's
/// reserve.
pub fn check_space(dir: &Path, bytes: u64) -> Result<(), QuotaError> {
    let (total, free) = crate::files::disk_space(dir);
    room(dir, total, free, bytes)
}

fn room(dir: &Path, total: u64, free: u64, bytes: u64) -> Result<(), QuotaError> {
    let reserve = (total / 100 * RESERVE_PERCENT).max(RESERVE_MIN.min(total / 4));
    if bytes.saturating_add(reserve) > free {
        return Err(QuotaError::NoSpace {
            path: dir.display().to_string(),
            asked: bytes,
            free,
            reserve,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_what_is_used_and_asked() {
        assert!(within("p", "VM", 2, 1, Some(3)).is_ok());
        assert!(within("p", "VM", 2, 1, None).is_ok());
        let e = within("p", "VM", 3, 1, Some(3)).unwrap_err();
        assert!(e.to_string().contains("over its VM quota"), "{e}");
        assert!(within("p", "VM", u64::MAX, 1, Some(3)).is_err());
    }

    #[test]
    fn space_is_checked_against_the_file_system() {
        let tmp = std::env::temp_dir();
        assert!(check_space(&tmp, 1 << 20).is_ok());
        let e = check_space(&tmp, u64::MAX / 2).unwrap_err();
        assert!(matches!(e, QuotaError::NoSpace { .. }), "{e}");
    }
}
