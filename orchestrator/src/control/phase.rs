//! A VM's phase: the one function that decides its next `status` (and what
//! that implies for `desired` and the restart policy) from what happened.
//! Everything that changes a VM's status goes through [`transition`].

use keel_api::agent::{ObservedState, VmObserved};

use crate::model::{PowerState, RestartPolicy, Vm, VmStatus};

/// What happened to a VM.
#[derive(Clone, Debug, PartialEq)]
pub enum Input<'a> {
    /// Its disks and seed are ready.
    Provisioned,
    ProvisionFailed(&'a str),
    /// The control plane is about to ask its node to start it.
    StartRequested,
    /// The node could not start it.
    StartFailed(&'a str),
    /// The control plane is about to ask its node to stop it.
    StopRequested,
    /// What its node reports.
    Observed(&'a VmObserved),
    /// No VMM runs it and none should (nothing is starting or stopping it).
    Idle,
}

/// The VM after an input.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub status: VmStatus,
    pub reason: String,
    pub desired: PowerState,
    /// The restart policy asks for the VM to be started again.
    pub restart: bool,
    /// A line for the VM's event log (kind, message).
    pub event: Option<(&'static str, String)>,
}

fn live(status: VmStatus) -> bool {
    matches!(
        status,
        VmStatus::Starting | VmStatus::Running | VmStatus::Paused | VmStatus::Stopping
    )
}

pub fn transition(vm: &Vm, input: &Input) -> Phase {
    let mut next = Phase {
        status: vm.status,
        reason: vm.status_reason.clone(),
        desired: vm.desired,
        restart: false,
        event: None,
    };
    let mut set = |status, reason: &str| {
        next.status = status;
        next.reason = reason.to_string();
    };
    match *input {
        Input::Provisioned if vm.status == VmStatus::Creating => set(VmStatus::Stopped, ""),
        Input::ProvisionFailed(why) if vm.status == VmStatus::Creating => {
            set(VmStatus::Error, why);
            next.desired = PowerState::Stopped;
        }
        Input::Provisioned | Input::ProvisionFailed(_) => {}
        Input::StartRequested if vm.status != VmStatus::Creating => set(VmStatus::Starting, ""),
        Input::StartRequested => {}
        // A start that a stop or delete overtook: not a failure.
        Input::StartFailed(_) if vm.desired == PowerState::Stopped || vm.deleted_at.is_some() => {
            set(VmStatus::Stopped, "");
        }
        Input::StartFailed(why) => {
            set(VmStatus::Error, why);
            next.desired = PowerState::Stopped;
            next.event = Some(("start-failed", why.to_string()));
        }
        Input::StopRequested => {
            if matches!(
                vm.status,
                VmStatus::Running | VmStatus::Paused | VmStatus::Starting
            ) {
                set(VmStatus::Stopping, "");
            }
        }
        Input::Idle => {
            if matches!(vm.status, VmStatus::Starting | VmStatus::Stopping) {
                set(VmStatus::Stopped, "");
            }
        }
        Input::Observed(seen) => match seen.state {
            ObservedState::Starting if vm.status != VmStatus::Stopping => {
                set(VmStatus::Starting, "")
            }
            // `stopping` lasts until the VMM ends, unless a later start
            // took the stop back and nothing is stopping it (a restart).
            ObservedState::Running
                if vm.status != VmStatus::Stopping || vm.desired != PowerState::Stopped =>
            {
                set(VmStatus::Running, "")
            }
            ObservedState::Paused => set(VmStatus::Paused, ""),
            ObservedState::Stopping => set(VmStatus::Stopping, ""),
            ObservedState::Starting | ObservedState::Running => {}
            ObservedState::Absent => {
                // A VMM that vanished without a trace (not `Starting`: a
                // start may be on its way).
                if matches!(
                    vm.status,
                    VmStatus::Running | VmStatus::Paused | VmStatus::Stopping
                ) {
                    ended(
                        vm,
                        false,
                        "keel-vmm is gone (it died while keeld was not watching)",
                        &mut next,
                    );
                }
            }
            ObservedState::Exited => {
                if live(vm.status) {
                    let (clean, reason) = seen
                        .exit
                        .as_ref()
                        .map(|e| (e.clean, e.reason.as_str()))
                        .unwrap_or((false, "keel-vmm ended"));
                    ended(vm, clean, reason, &mut next);
                }
            }
        },
    }
    next
}

/// A VMM ended: `stopped` when asked for or clean, else `error`; the
/// restart policy decides whether it runs again. A stop that a later start
/// overtook (still `stopping`, desired `running`) ends `stopped` with the
/// start still wanted, so the reconciler starts it again.
fn ended(vm: &Vm, clean: bool, reason: &str, next: &mut Phase) {
    let asked_to_stop = vm.desired == PowerState::Stopped
        || vm.deleted_at.is_some()
        || vm.status == VmStatus::Stopping;
    next.restart = !asked_to_stop
        && match vm.restart_policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Never => false,
        };
    if asked_to_stop || clean {
        next.status = VmStatus::Stopped;
        next.reason = if asked_to_stop {
            String::new()
        } else {
            reason.to_string()
        };
        // What the owner asked for last stands when they asked; a guest
        // that powered off by itself stays off (unless `always`).
        if !asked_to_stop && !next.restart {
            next.desired = PowerState::Stopped;
        }
    } else {
        next.status = VmStatus::Error;
        next.reason = reason.to_string();
        if !next.restart {
            // Not to be started again unless someone asks.
            next.desired = PowerState::Stopped;
        }
    }
    next.event = Some(if asked_to_stop {
        ("stopped", "on request".to_string())
    } else if clean {
        ("powered-off", reason.to_string())
    } else {
        ("failed", reason.to_string())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_api::agent::VmExit;

    fn vm(status: VmStatus, desired: PowerState, policy: RestartPolicy) -> Vm {
        Vm {
            id: "vm-1".into(),
            project: "default".into(),
            name: "a".into(),
            description: String::new(),
            flavor: "1c2g".into(),
            vcpus: 1,
            memory_mib: 256,
            image: "img".into(),
            system_disk: "disk".into(),
            disks: vec![],
            restart_policy: policy,
            guest_init: Default::default(),
            desired,
            status,
            status_reason: "old".into(),
            deleted_at: None,
            pending_vcpus: None,
            pending_memory_mib: None,
            restarts: 0,
            created_at: 0,
        }
    }

    fn seen(state: ObservedState, exit: Option<(bool, &str)>) -> VmObserved {
        VmObserved {
            state,
            exit: exit.map(|(clean, reason)| VmExit {
                clean,
                reason: reason.into(),
                seq: 1,
            }),
            ..VmObserved::absent("vm-1")
        }
    }

    #[test]
    fn the_transition_table() {
        use PowerState as D;
        use RestartPolicy as P;
        use VmStatus as S;
        let running = seen(ObservedState::Running, None);
        let starting = seen(ObservedState::Starting, None);
        let paused = seen(ObservedState::Paused, None);
        let absent = seen(ObservedState::Absent, None);
        let clean = seen(ObservedState::Exited, Some((true, "the guest powered off")));
        let crash = seen(
            ObservedState::Exited,
            Some((false, "the guest crashed the VM")),
        );
        // (status, desired, policy, input) -> (status, reason, desired, restart)
        type Row<'a> = (S, D, P, Input<'a>, S, &'a str, D, bool);
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            (S::Creating, D::Running, P::OnFailure, Input::Provisioned, S::Stopped, "", D::Running, false),
            (S::Creating, D::Running, P::OnFailure, Input::ProvisionFailed("no space"), S::Error, "no space", D::Stopped, false),
            (S::Running, D::Running, P::OnFailure, Input::Provisioned, S::Running, "old", D::Running, false),
            (S::Stopped, D::Running, P::OnFailure, Input::StartRequested, S::Starting, "", D::Running, false),
            (S::Creating, D::Running, P::OnFailure, Input::StartRequested, S::Creating, "old", D::Running, false),
            (S::Starting, D::Running, P::Always, Input::StartFailed("no CPU"), S::Error, "no CPU", D::Stopped, false),
            (S::Stopping, D::Stopped, P::OnFailure, Input::StartFailed("VMM gone"), S::Stopped, "", D::Stopped, false),
            (S::Running, D::Stopped, P::OnFailure, Input::StopRequested, S::Stopping, "", D::Stopped, false),
            (S::Stopped, D::Stopped, P::OnFailure, Input::StopRequested, S::Stopped, "old", D::Stopped, false),
            (S::Starting, D::Running, P::OnFailure, Input::Observed(&running), S::Running, "", D::Running, false),
            (S::Stopping, D::Stopped, P::OnFailure, Input::Observed(&running), S::Stopping, "old", D::Stopped, false),
            (S::Stopping, D::Stopped, P::OnFailure, Input::Observed(&starting), S::Stopping, "old", D::Stopped, false),
            (S::Running, D::Paused, P::OnFailure, Input::Observed(&paused), S::Paused, "", D::Paused, false),
            (S::Running, D::Running, P::OnFailure, Input::Observed(&starting), S::Starting, "", D::Running, false),
            // The guest powered off by itself: stopped, no restart unless
            // the policy is `always`.
            (S::Running, D::Running, P::OnFailure, Input::Observed(&clean), S::Stopped, "the guest powered off", D::Stopped, false),
            (S::Running, D::Running, P::Always, Input::Observed(&clean), S::Stopped, "the guest powered off", D::Running, true),
            // A crash: error, restarted unless the policy is `never`.
            (S::Running, D::Running, P::OnFailure, Input::Observed(&crash), S::Error, "the guest crashed the VM", D::Running, true),
            (S::Running, D::Running, P::Never, Input::Observed(&crash), S::Error, "the guest crashed the VM", D::Stopped, false),
            // Asked to stop: stopped whatever the exit was.
            (S::Stopping, D::Stopped, P::Always, Input::Observed(&crash), S::Stopped, "", D::Stopped, false),
            // A start came while it stopped: stopped, and still wanted running.
            (S::Stopping, D::Running, P::OnFailure, Input::Observed(&clean), S::Stopped, "", D::Running, false),
            // A stop that nothing carries on (keeld restarted) and a start took back.
            (S::Stopping, D::Running, P::OnFailure, Input::Observed(&running), S::Running, "", D::Running, false),
            // An exit already applied (status not live) changes nothing.
            (S::Error, D::Running, P::OnFailure, Input::Observed(&crash), S::Error, "old", D::Running, false),
            (S::Stopped, D::Stopped, P::OnFailure, Input::Observed(&clean), S::Stopped, "old", D::Stopped, false),
            // A VMM gone without a trace.
            (S::Running, D::Running, P::OnFailure, Input::Observed(&absent), S::Error, "keel-vmm is gone (it died while keeld was not watching)", D::Running, true),
            (S::Starting, D::Running, P::OnFailure, Input::Observed(&absent), S::Starting, "old", D::Running, false),
            (S::Stopped, D::Stopped, P::OnFailure, Input::Observed(&absent), S::Stopped, "old", D::Stopped, false),
            // Nothing runs it and nothing should.
            (S::Stopping, D::Stopped, P::OnFailure, Input::Idle, S::Stopped, "", D::Stopped, false),
            (S::Error, D::Stopped, P::OnFailure, Input::Idle, S::Error, "old", D::Stopped, false),
        ];
        for (i, (status, desired, policy, input, want, reason, want_desired, restart)) in
            table.into_iter().enumerate()
        {
            let next = transition(&vm(status, desired, policy), &input);
            assert_eq!(
                (
                    next.status,
                    next.reason.as_str(),
                    next.desired,
                    next.restart
                ),
                (want, reason, want_desired, restart),
                "row {i}: {status:?} {desired:?} {policy:?} {input:?}"
            );
        }
    }

    #[test]
    fn a_vm_in_the_recycle_bin_is_never_restarted() {
        let mut v = vm(
            VmStatus::Running,
            PowerState::Running,
            RestartPolicy::Always,
        );
        v.deleted_at = Some(1);
        let crash = seen(ObservedState::Exited, Some((false, "boom")));
        let next = transition(&v, &Input::Observed(&crash));
        assert_eq!(next.status, VmStatus::Stopped);
        assert!(!next.restart);
        assert_eq!(next.event.unwrap().0, "stopped");
    }
}
