//! The VM service: what the control plane does to VMs. Requests record the
//! owner's intent (`desired`, the recycle bin) and the status it implies at
//! once; the reconciler and the jobs below carry it out through the node
//! agent; every status change goes through [`phase::transition`].

use std::sync::Arc;
use std::time::Duration;

use keel_api::MEMORY_HOTPLUG_BLOCK;
use keel_api::agent::{DiskSpec, SeedSpec, VmAction, VmObserved, VmSpec};
use thiserror::Error;

use super::operations::Progress;
use super::phase::{self, Input, Phase};
use super::scheduler::{self, ScheduleError};
use crate::agent::AgentError;
use crate::keel::Keel;
use crate::model::{DiskStatus, PowerState, Vm, VmStatus};
use crate::store::StoreError;

/// How long a create or start waits for the guest to come up.
pub const BOOT_WAIT: Duration = Duration::from_secs(120);
/// How long a stop waits beyond the configured stop timeout.
const STOP_SLACK: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum VmError {
    #[error("The VM was deleted")]
    Gone,
    #[error("The VM's image {0} no longer exists")]
    ImageGone(String),
    #[error(
        "Image {0} has no kernel to boot; keel-vmm boots images with a kernel until its \
         firmware lands"
    )]
    NoKernel(String),
    #[error("The record of disk {0} is missing")]
    DiskRecordMissing(String),
    #[error("The VM is still running")]
    StillRunning,
    #[error("Unknown action {0}")]
    UnknownAction(String),
    /// The VM went `error` while it was waited for: its reason.
    #[error("{0}")]
    Failed(String),
    #[error("A later request changed the VM's course before it was {0}")]
    Superseded(&'static str),
    #[error("The VM is {status:?}, not {want}, after the wait")]
    TimedOut {
        status: VmStatus,
        want: &'static str,
    },
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Feeds one input to the VM's phase and writes what changed, in one
/// step under the collection's lock (so a request that changed `desired`
/// meanwhile is never written over). Returns the record as written and
/// whether the restart policy asks for a restart; `None` when the VM is
/// gone.
pub fn transition(keel: &Keel, id: &str, input: Input) -> Option<(Arc<Vm>, bool)> {
    let current = keel.vms.get(id)?;
    let unchanged = |vm: &Vm, next: &Phase| {
        vm.status == next.status
            && vm.status_reason == next.reason
            && vm.desired == next.desired
            && !next.restart
            && next.event.is_none()
    };
    if unchanged(&current, &phase::transition(&current, &input)) {
        return Some((current, false));
    }
    let mut applied: Option<Phase> = None;
    let result = keel.vms.update::<StoreError>(id, |vm| {
        let next = phase::transition(vm, &input);
        vm.status = next.status;
        vm.status_reason = next.reason.clone();
        vm.desired = next.desired;
        if next.restart {
            vm.restarts += 1;
        }
        applied = Some(next);
        Ok(())
    });
    let vm = match result {
        Ok(vm) => vm?,
        Err(e) => {
            log::error!("Cannot record the state of VM {id}: {e}");
            return None;
        }
    };
    let next = applied?;
    if let Some((kind, message)) = &next.event {
        log::info!("VM {} ({id}): {kind}: {message}", vm.name);
        keel.event(id, kind, message);
    }
    Some((vm, next.restart))
}

/// Records the owner's wish; for a start or stop, the status it implies.
pub fn set_desired(keel: &Keel, id: &str, desired: PowerState) -> Option<Arc<Vm>> {
    let vm = keel
        .vms
        .update::<StoreError>(id, |vm| {
            vm.desired = desired;
            Ok(())
        })
        .ok()??;
    let changed = match desired {
        PowerState::Running if !keel.agent.observed(id).has_vmm() => {
            transition(keel, id, Input::StartRequested)
        }
        PowerState::Stopped => transition(keel, id, Input::StopRequested),
        _ => None,
    };
    Some(changed.map_or(vm, |(vm, _)| vm))
}

/// What the node needs to run the VM.
pub fn spec(keel: &Keel, vm: &Vm) -> Result<VmSpec, VmError> {
    let image = keel
        .images
        .get(&vm.image)
        .ok_or_else(|| VmError::ImageGone(vm.image.clone()))?;
    if image.boot.kernel.is_none() {
        return Err(VmError::NoKernel(image.name.clone()));
    }
    let mut disks = vec![DiskSpec {
        id: vm.system_disk.clone(),
        readonly: false,
    }];
    for id in &vm.disks {
        disks.push(DiskSpec {
            id: id.clone(),
            readonly: keel.disks.get(id).is_some_and(|d| d.readonly),
        });
    }
    Ok(VmSpec {
        id: vm.id.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        image: image.id.clone(),
        initramfs: image.boot.initramfs.is_some(),
        cmdline: image.boot.cmdline.clone(),
        disks,
    })
}

/// Starts the VM on its node, on a task: flavor changes made while it was
/// stopped take effect, the scheduler checks capacity, the agent boots it.
/// A failure leaves it `error` with the reason (and no retry).
pub fn spawn_start(keel: &Arc<Keel>, id: &str) {
    if !keel.reconciler.claim(id) {
        return;
    }
    let keel = keel.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let result = start(&keel, &id).await;
        if let Err(why) = result {
            transition(&keel, &id, Input::StartFailed(&keel_api::error_chain(&why)));
        }
        keel.reconciler.release(&id);
    });
}

async fn start(keel: &Arc<Keel>, id: &str) -> Result<(), VmError> {
    let vm = keel
        .vms
        .update::<StoreError>(id, |vm| {
            if let Some(v) = vm.pending_vcpus.take() {
                vm.vcpus = v;
            }
            if let Some(m) = vm.pending_memory_mib.take() {
                vm.memory_mib = m;
            }
            Ok(())
        })?
        .ok_or(VmError::Gone)?;
    let vm = transition(keel, id, Input::StartRequested).map_or(vm, |(vm, _)| vm);
    scheduler::place(keel, &vm)?;
    let spec = spec(keel, &vm)?;
    Ok(keel.agent.start(spec).await?)
}

/// Stops the VM on its node, on a task (the power button, then force).
pub fn spawn_stop(keel: &Arc<Keel>, id: &str, force: bool) {
    if !keel.reconciler.claim(id) {
        return;
    }
    let keel = keel.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        transition(&keel, &id, Input::StopRequested);
        if let Err(e) = keel.agent.stop(id.clone(), force).await {
            log::warn!("VM {id}: stop: {e}");
        }
        keel.reconciler.release(&id);
    });
}

/// Waits for the VM to reach a status in `want` (named `want_name`)
/// while `still_wanted` holds (a later request may change the owner's
/// mind); `error` ends the wait with its reason.
pub async fn wait_status(
    keel: &Keel,
    id: &str,
    want: &[VmStatus],
    want_name: &'static str,
    timeout: Duration,
    still_wanted: impl Fn(&Vm) -> bool,
) -> Result<(), VmError> {
    let vm = keel
        .vms
        .wait_for(id, timeout, |vm| {
            want.contains(&vm.status) || vm.status == VmStatus::Error || !still_wanted(vm)
        })
        .await
        .ok_or(VmError::Gone)?;
    if want.contains(&vm.status) {
        Ok(())
    } else if vm.status == VmStatus::Error {
        Err(VmError::Failed(vm.status_reason.clone()))
    } else if !still_wanted(&vm) {
        Err(VmError::Superseded(want_name))
    } else {
        Err(VmError::TimedOut {
            status: vm.status,
            want: want_name,
        })
    }
}

fn wants_running(vm: &Vm) -> bool {
    vm.desired != PowerState::Stopped && vm.deleted_at.is_none()
}

fn wants_stopped(vm: &Vm) -> bool {
    vm.desired == PowerState::Stopped || vm.deleted_at.is_some()
}

async fn wait_running(keel: &Keel, id: &str) -> Result<(), VmError> {
    wait_status(
        keel,
        id,
        &[VmStatus::Running],
        "running",
        BOOT_WAIT,
        wants_running,
    )
    .await
}

fn stop_wait(keel: &Keel) -> Duration {
    keel.config.stop_timeout + STOP_SLACK
}

/// Waits until no VMM runs the VM.
async fn wait_stopped(keel: &Keel, id: &str) -> Result<(), VmError> {
    let done = wait_status(
        keel,
        id,
        &[VmStatus::Stopped],
        "stopped",
        stop_wait(keel),
        wants_stopped,
    )
    .await;
    match done {
        // A VM in error has no VMM either: for a stop, that is done too.
        Ok(()) | Err(VmError::Failed(_)) if !keel.agent.observed(id).has_vmm() => Ok(()),
        Ok(()) | Err(VmError::Failed(_)) => Err(VmError::StillRunning),
        Err(e) => Err(e),
    }
}

/// The node's view of the VM.
pub fn observed(keel: &Keel, id: &str) -> VmObserved {
    keel.agent.observed(id)
}

/// Whether the VM's VMM runs.
pub fn running(keel: &Keel, id: &str) -> bool {
    keel.agent.observed(id).has_vmm()
}

/// Whether a resize fits in the room the running VMM was given (memory
/// grows in 128 MiB blocks and never shrinks while it runs).
pub fn hot_resizable(vm: &Vm, seen: &VmObserved, vcpus: u8, memory_mib: u64) -> bool {
    if !seen.has_vmm() {
        return false;
    }
    let block_mib = MEMORY_HOTPLUG_BLOCK >> 20;
    vcpus <= seen.max_vcpus
        && memory_mib >= vm.memory_mib
        && memory_mib <= seen.max_memory_mib
        && (memory_mib - vm.memory_mib).is_multiple_of(block_mib)
}

/// Writes the VM's cloud-init seed on its node (before its disks: the
/// root password is never stored, so the seed is made while the request
/// holds it).
pub async fn write_seed(
    keel: &Keel,
    vm: &Vm,
    root_password: Option<String>,
) -> Result<(), VmError> {
    let seed = SeedSpec {
        hostname: vm
            .guest_init
            .hostname
            .clone()
            .unwrap_or_else(|| vm.name.clone()),
        root_password,
        ssh_authorized_keys: vm.guest_init.ssh_authorized_keys.clone(),
    };
    Ok(keel.agent.write_seed(vm.id.clone(), seed).await?)
}

/// Removes a VM whose create was never answered: its records first, then
/// its disks and files (a file left by a crash in between is removed at
/// the next start).
pub fn discard(keel: &Keel, vm: &Vm) {
    for disk in std::iter::once(&vm.system_disk).chain(&vm.disks) {
        let _ = keel.disks.remove(disk);
        keel.agent.remove_disk(disk);
    }
    let _ = keel.vms.remove(&vm.id);
    keel.agent.remove_vm_files(&vm.id);
}

/// Makes a new VM's disks (the system disk a thin copy of its image,
/// blank data disks). Safe to run again after a crash: disks still
/// `creating` are made afresh.
async fn provision(keel: &Keel, id: &str, progress: &Progress) -> Result<(), VmError> {
    let vm = keel.vms.get(id).ok_or(VmError::Gone)?;
    let ids: Vec<String> = std::iter::once(vm.system_disk.clone())
        .chain(vm.disks.iter().cloned())
        .collect();
    for disk_id in ids {
        let Some(disk) = keel.disks.get(&disk_id) else {
            return Err(VmError::DiskRecordMissing(disk_id));
        };
        if disk.status != DiskStatus::Creating {
            continue;
        }
        if disk.system {
            let p = progress.clone();
            keel.agent
                .create_system_disk(
                    vm.image.clone(),
                    disk.id.clone(),
                    disk.size,
                    Arc::new(move |pct| p.set(pct)),
                )
                .await?;
        } else {
            keel.agent
                .create_blank_disk(disk.id.clone(), disk.size)
                .await?;
        }
        keel.disks.update::<StoreError>(&disk.id, |d| {
            d.status = DiskStatus::InUse;
            Ok(())
        })?;
    }
    progress.set(90);
    Ok(())
}

/// `vm.create`: provisions the VM, then (unless made stopped) waits for it
/// to run. Resumed as it is after a restart.
pub async fn create_job(keel: &Arc<Keel>, id: &str, progress: Progress) -> Result<(), VmError> {
    let vm = keel.vms.get(id).ok_or(VmError::Gone)?;
    if vm.status == VmStatus::Creating {
        if let Err(why) = provision(keel, id, &progress).await {
            transition(
                keel,
                id,
                Input::ProvisionFailed(&keel_api::error_chain(&why)),
            );
            return Err(why);
        }
        // Stopped and ready: the reconciler starts it if its owner still
        // wants it running (desired was set at the request; a later stop
        // or delete is left alone).
        transition(keel, id, Input::Provisioned);
    }
    let vm = keel.vms.get(id).ok_or(VmError::Gone)?;
    if vm.desired == PowerState::Stopped || vm.deleted_at.is_some() {
        return Ok(());
    }
    // Started here rather than on the reconciler's next pass: the same
    // start (a second one finds the VM busy), one hop sooner.
    if vm.status == VmStatus::Stopped && !running(keel, id) {
        spawn_start(keel, id);
    }
    match wait_running(keel, id).await {
        // Made; a later request stopped (or deleted) it before it ran.
        Ok(()) | Err(VmError::Superseded(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The lifecycle jobs (`vm.start`, `vm.stop`, ...). `resumed`: picked up
/// again after a keeld restart, when the intent is stored already.
pub async fn lifecycle_job(
    keel: &Arc<Keel>,
    id: &str,
    action: &str,
    resumed: bool,
) -> Result<(), VmError> {
    let agent_action =
        |a| async move { Ok::<_, VmError>(keel.agent.action(id.to_string(), a).await?) };
    match action {
        "start" => wait_running(keel, id).await,
        "stop" | "delete" => wait_stopped(keel, id).await,
        "force-off" => {
            keel.agent.stop(id.to_string(), true).await?;
            wait_stopped(keel, id).await
        }
        "reboot" if resumed => wait_running(keel, id).await,
        "reboot" => agent_action(VmAction::Reboot).await,
        "pause" => {
            if !resumed {
                agent_action(VmAction::Pause).await?;
            }
            wait_status(keel, id, &[VmStatus::Paused], "paused", BOOT_WAIT, |vm| {
                vm.desired == PowerState::Paused && vm.deleted_at.is_none()
            })
            .await
        }
        "resume" => {
            if !resumed {
                agent_action(VmAction::Resume).await?;
            }
            wait_running(keel, id).await
        }
        "purge" => {
            wait_stopped(keel, id).await?;
            purge(keel, id)
        }
        _ => Err(VmError::UnknownAction(action.to_string())),
    }
}

/// `vm.resize` of a running VM within its VMM's room.
pub async fn resize_job(keel: &Keel, id: &str, vcpus: u8, memory_mib: u64) -> Result<(), VmError> {
    keel.agent.resize(id.to_string(), vcpus, memory_mib).await?;
    keel.vms.update::<StoreError>(id, |vm| {
        vm.vcpus = vcpus;
        vm.memory_mib = memory_mib;
        Ok(())
    })?;
    Ok(())
}

/// Deletes a stopped VM for good: its system disk and files go; its data
/// disks are detached and kept.
fn purge(keel: &Keel, id: &str) -> Result<(), VmError> {
    let Some(vm) = keel.vms.get(id) else {
        // Purged before a restart: done.
        return Ok(());
    };
    if keel.agent.observed(id).has_vmm() {
        return Err(VmError::StillRunning);
    }
    for disk in &vm.disks {
        let _ = keel.disks.update::<StoreError>(disk, |d| {
            d.vm = None;
            d.status = DiskStatus::Available;
            Ok(())
        });
    }
    // The record goes before the file: a crash in between leaves a file
    // that a restarted keeld removes, never a record without its file.
    keel.disks.remove(&vm.system_disk)?;
    keel.agent.remove_disk(&vm.system_disk);
    keel.agent.remove_vm_files(id);
    keel.vms.remove(id)?;
    keel.event(id, "purged", "");
    Ok(())
}
