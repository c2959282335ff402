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
