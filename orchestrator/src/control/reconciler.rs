//! The reconciler: compares what each VM's owner asked for (`desired`, the
//! recycle bin) with what its node reports, writes the VM's status through
//! [`phase::transition`], and acts: starts VMs that should run (the restart
//! policy's restarts with a growing delay), stops VMs that should not, and
//! stops VMMs no VM record wants. It wakes on every change of the VMs or of
//! the agent's observations (watch channels), and once a second for
//! restarts that come due.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_api::agent::{ObservedState, VmObserved};
use tokio::time::Instant;

use super::phase::Input;
use super::vms;
use crate::keel::Keel;
use crate::model::{PowerState, Vm, VmStatus};

/// How often due restarts are looked for when nothing else happens.
const TICK: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Reconciler {
    /// VMs with a start or stop in flight: left alone until it ends.
    busy: Mutex<HashSet<String>>,
    /// The last VMM exit applied per VM (its `seq`), so each is applied once.
    applied: Mutex<HashMap<String, u64>>,
    /// Restarts the restart policy asked for, and when they are due.
    restart_at: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reconciler {
    /// Marks `vm` busy; false when it already was.
    pub fn claim(&self, vm: &str) -> bool {
        lock(&self.busy).insert(vm.to_string())
    }

    pub fn release(&self, vm: &str) {
        lock(&self.busy).remove(vm);
    }

    fn is_busy(&self, vm: &str) -> bool {
        lock(&self.busy).contains(vm)
    }
}

/// Runs the reconciler for as long as keeld runs.
pub fn spawn(keel: Arc<Keel>) {
    tokio::spawn(async move {
        let mut agent = keel.agent.subscribe();
        let mut vms = keel.vms.subscribe();
        loop {
            agent.borrow_and_update();
            vms.borrow_and_update();
            pass(&keel);
            tokio::select! {
                _ = agent.changed() => {}
                _ = vms.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    });
}

/// One comparison of everything desired with everything observed.
pub fn pass(keel: &Arc<Keel>) {
    for event in keel.agent.take_events() {
        keel.event(&event.vm, &event.kind, &event.message);
    }
    let all = keel.vms.filter(|_| true);
    let mut known = HashSet::new();
    for vm in &all {
        known.insert(vm.id.as_str());
        let seen = keel.agent.observed(&vm.id);
        let vm = observe(keel, vm, &seen);
        act(keel, &vm, &seen);
    }
    // What is kept per VM goes with the VM.
    lock(&keel.reconciler.applied).retain(|id, _| known.contains(id.as_str()));
    lock(&keel.reconciler.restart_at).retain(|id, _| known.contains(id.as_str()));
    for seen in keel.agent.observed_all() {
        if seen.has_vmm() && !known.contains(seen.vm.as_str()) && keel.reconciler.claim(&seen.vm) {
            log::warn!("VM {}: stopping a keel-vmm no VM record wants", seen.vm);
            let keel = keel.clone();
            tokio::spawn(async move {
                let _ = keel.agent.stop(seen.vm.clone(), true).await;
                keel.reconciler.release(&seen.vm);
            });
        }
    }
}

/// Applies what the node reports to the VM's status.
fn observe(keel: &Keel, vm: &Arc<Vm>, seen: &VmObserved) -> Arc<Vm> {
    if seen.state == ObservedState::Exited {
        let seq = seen.exit.as_ref().map_or(0, |e| e.seq);
        let mut applied = lock(&keel.reconciler.applied);
        if applied.get(&vm.id).is_some_and(|&s| s >= seq) {
            return vm.clone();
        }
        applied.insert(vm.id.clone(), seq);
    } else if seen.state == ObservedState::Absent && keel.reconciler.is_busy(&vm.id) {
        // A start is on its way.
        return vm.clone();
    }
    let Some((vm, restart)) = vms::transition(keel, &vm.id, Input::Observed(seen)) else {
        return vm.clone();
    };
    if restart {
        // 1 s, 2 s, ... up to 30 s for a VM that keeps failing.
        let delay = Duration::from_secs(u64::from(vm.restarts.saturating_sub(1).min(29)) + 1);
        lock(&keel.reconciler.restart_at).insert(vm.id.clone(), Instant::now() + delay);
    }
    vm
}

fn act(keel: &Arc<Keel>, vm: &Vm, seen: &VmObserved) {
    if vm.status == VmStatus::Creating || keel.reconciler.is_busy(&vm.id) {
        return;
    }
    let wants_stop = vm.desired == PowerState::Stopped || vm.deleted_at.is_some();
    if seen.has_vmm() {
        if wants_stop && seen.state != ObservedState::Stopping {
            vms::spawn_stop(keel, &vm.id, false);
        }
        return;
    }
    if wants_stop {
        // Nothing runs and nothing should: a status still saying
        // otherwise (a VMM that never got going) is set right.
        vms::transition(keel, &vm.id, Input::Idle);
        return;
    }
    let due = {
        let mut restarts = lock(&keel.reconciler.restart_at);
        match restarts.get(&vm.id) {
            Some(at) if *at > Instant::now() => false,
            Some(_) => {
                restarts.remove(&vm.id);
                true
            }
            None => true,
        }
    };
    if due {
        vms::spawn_start(keel, &vm.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_api::agent::ObservedState;

    use super::*;
    use crate::control::fake_agent::{Call, FakeAgent};
    use crate::control::{jobs, operations};
    use crate::keel::Config;
    use crate::model::{
        BootSpec, Disk, DiskStatus, Image, ImageFormat, ImageStatus, Operation, OperationStatus,
        PowerState, RestartPolicy, Vm, VmStatus,
    };

    fn data_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keel-reconciler-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn open(dir: &std::path::Path, agent: Arc<FakeAgent>) -> Arc<Keel> {
        Keel::open(Config::new(dir.to_path_buf()), agent).unwrap().0
    }

    fn add_image(keel: &Keel) {
        keel.images
            .insert(Image {
                id: "img-1".into(),
                project: "default".into(),
                name: "tiny".into(),
                source_format: ImageFormat::Raw,
                status: ImageStatus::Ready,
                status_reason: String::new(),
                size: 1 << 20,
                progress: 100,
                reserved: 0,
                sha256: String::new(),
                os_type: String::new(),
                os_version: String::new(),
                default_flavor: None,
                min_disk_gib: 1,
                boot: BootSpec {
                    kernel: Some("kernel".into()),
                    initramfs: None,
                    cmdline: String::new(),
                },
                shared_with: vec![],
                created_at: 0,
            })
            .unwrap();
    }

    fn add_vm(keel: &Keel, id: &str, status: VmStatus, desired: PowerState, policy: RestartPolicy) {
        keel.vms
            .insert(Vm {
                id: id.into(),
                project: "default".into(),
                name: id.into(),
                description: String::new(),
                flavor: "1c2g".into(),
                vcpus: 1,
                memory_mib: 256,
                image: "img-1".into(),
                system_disk: format!("disk-{id}"),
                disks: vec![],
                restart_policy: policy,
                guest_init: Default::default(),
                desired,
                status,
                status_reason: String::new(),
                deleted_at: None,
                pending_vcpus: None,
                pending_memory_mib: None,
                restarts: 0,
                created_at: 0,
            })
            .unwrap();
    }

    /// Lets the tasks the reconciler spawned run until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn status(keel: &Keel, id: &str) -> VmStatus {
        keel.vms.get(id).unwrap().status
    }

    #[tokio::test]
    async fn a_vm_that_died_is_restarted_by_its_policy_after_a_delay() {
        let dir = data_dir("died");
        let agent = FakeAgent::new();
        let keel = open(&dir, agent.clone());
        add_image(&keel);
        add_vm(
            &keel,
            "vm-a",
            VmStatus::Running,
            PowerState::Running,
            RestartPolicy::OnFailure,
        );
        agent.report("vm-a", ObservedState::Running, None);
        pass(&keel);
        assert_eq!(status(&keel, "vm-a"), VmStatus::Running);
        assert!(agent.calls().is_empty(), "{:?}", agent.calls());

        agent.report(
            "vm-a",
            ObservedState::Exited,
            Some((false, "the guest crashed the VM", 1)),
        );
        pass(&keel);
        let vm = keel.vms.get("vm-a").unwrap();
        assert_eq!(vm.status, VmStatus::Error);
        assert_eq!(vm.status_reason, "the guest crashed the VM");
        assert_eq!(vm.restarts, 1);
        // Not at once: after the back-off (1 s for the first restart).
        pass(&keel);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(agent.calls().is_empty(), "{:?}", agent.calls());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        pass(&keel);
        until("the restart", || {
            agent.calls() == vec![Call::Start("vm-a".into())]
        })
        .await;
        pass(&keel);
        assert_eq!(status(&keel, "vm-a"), VmStatus::Running);
        // The same exit is applied once: no second restart.
        pass(&keel);
        assert_eq!(keel.vms.get("vm-a").unwrap().restarts, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_vmm_no_vm_wants_is_stopped() {
        let dir = data_dir("ghost");
        let agent = FakeAgent::new();
        let keel = open(&dir, agent.clone());
        agent.report("vm-ghost", ObservedState::Running, None);
        pass(&keel);
        until("the stop", || {
            agent.calls()
                == vec![Call::Stop {
                    vm: "vm-ghost".into(),
                    force: true,
                }]
        })
        .await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_vm_wanted_stopped_but_running_is_stopped() {
        let dir = data_dir("unwanted");
        let agent = FakeAgent::new();
        let keel = open(&dir, agent.clone());
        add_image(&keel);
        add_vm(
            &keel,
            "vm-b",
            VmStatus::Running,
            PowerState::Stopped,
            RestartPolicy::Always,
        );
        agent.report("vm-b", ObservedState::Running, None);
        pass(&keel);
        until("the stop", || {
            agent.calls()
                == vec![Call::Stop {
                    vm: "vm-b".into(),
                    force: false,
                }]
        })
        .await;
        pass(&keel);
        assert_eq!(status(&keel, "vm-b"), VmStatus::Stopped);
        // Stopped as asked: `always` does not start it again.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        pass(&keel);
        assert_eq!(agent.calls().len(), 1, "{:?}", agent.calls());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// keeld killed after it accepted a create (the VM `creating`, its
    /// operation running): the next keeld resumes the job and the create
    /// ends `running`, its operation `succeeded`.
    #[tokio::test]
    async fn a_create_accepted_before_a_restart_ends_running() {
        let dir = data_dir("resume");
        {
            let keel = open(&dir, FakeAgent::new());
            add_image(&keel);
            keel.disks
                .insert(Disk {
                    id: "disk-vm-c".into(),
                    project: "default".into(),
                    name: "c-system".into(),
                    size: 1 << 30,
                    status: DiskStatus::Creating,
                    vm: Some("vm-c".into()),
                    system: true,
                    image: Some("img-1".into()),
                    readonly: false,
                    created_at: 0,
                })
                .unwrap();
            add_vm(
                &keel,
                "vm-c",
                VmStatus::Creating,
                PowerState::Running,
                RestartPolicy::OnFailure,
            );
            keel.operations
                .insert(Operation {
                    id: "op-1".into(),
                    project: "default".into(),
                    action: "vm.create".into(),
                    target: "vm-c".into(),
                    status: OperationStatus::Running,
                    progress: 0,
                    error: String::new(),
                    user: "admin".into(),
                    created_at: 0,
                    finished_at: 0,
                    params: serde_json::Value::Null,
                })
                .unwrap();
            // keeld dies here: nothing ran the job.
        }
        let agent = FakeAgent::new();
        let keel = open(&dir, agent.clone());
        // What `keeld serve` does at start.
        jobs::repair(&keel);
        operations::resume(&keel);
        spawn(keel.clone());
        let op = operations::wait(&keel, "op-1", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
        assert_eq!(status(&keel, "vm-c"), VmStatus::Running);
        assert_eq!(
            keel.disks.get("disk-vm-c").unwrap().status,
            DiskStatus::InUse
        );
        assert_eq!(agent.calls(), vec![Call::Start("vm-c".into())]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
