//! Follows one keel-vmm: its event monitor lines become the VM's status and
//! event log; its end becomes `stopped` or `error` (with the reason from its
//! log), and a restart when the VM's restart policy asks for one.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use keel_api::events::{EventKind, EventSource, VmmEvent, VmmExit};
use keel_api::vmm_api::VmState;

use super::{files, process, set_vm};
use crate::keel::Keel;
use crate::model::{PowerState, RestartPolicy, VmStatus};

const POLL: Duration = Duration::from_millis(100);
/// How often the serial log's size is checked against its limit.
const SERIAL_CHECK: Duration = Duration::from_secs(5);

/// Watches the VM's keel-vmm on a task of its own until it ends. `child` is
/// given when this keeld started it (then its exit status is known).
pub fn watch(keel: Arc<Keel>, id: String, child: Option<Child>) {
    tokio::spawn(async move {
        let code = follow(&keel, &id, child).await;
        ended(&keel, &id, code).await;
    });
}

/// Reads events until the process is gone; returns its exit code when
/// known (a signal is 128 + its number).
async fn follow(keel: &Arc<Keel>, id: &str, mut child: Option<Child>) -> Option<i32> {
    let files = files(keel, id);
    // A VMM found again after a keeld restart: its past events are in the
    // log already (or were missed); its state now comes from vm.info.
    let mut offset = if child.is_none() {
        current_state(keel, id).await;
        std::fs::metadata(files.events())
            .map(|m| m.len())
            .unwrap_or(0)
    } else {
        0
    };
    let mut partial = String::new();
    let process = keel.vms.get(id).and_then(|vm| vm.vmm.clone());
    let mut serial_checked = tokio::time::Instant::now();
    loop {
        if serial_checked.elapsed() >= SERIAL_CHECK {
            serial_checked = tokio::time::Instant::now();
            let (vm_files, max) = (super::files(keel, id), keel.config.serial_log_max);
            let rotated =
                tokio::task::spawn_blocking(move || process::rotate_serial(&vm_files, max)).await;
            if let Ok(Err(e)) = rotated {
                log::warn!("VM {id}: cannot rotate its serial log: {e}");
            }
        }
        read_events(keel, id, &files.events(), &mut offset, &mut partial);
        let gone = match child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => {
                    read_events(keel, id, &files.events(), &mut offset, &mut partial);
                    return status.code().or(status.signal().map(|s| 128 + s));
                }
                Ok(None) => false,
                Err(_) => true,
            },
            None => !process.as_ref().is_some_and(process::alive),
        };
        if gone {
            read_events(keel, id, &files.events(), &mut offset, &mut partial);
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sets the VM's status from what its VMM says now.
async fn current_state(keel: &Keel, id: &str) {
    let socket = files(keel, id).socket();
    let info = process::with_client(socket, Duration::from_secs(5), |c| c.info()).await;
    let status = match info.map(|i| i.state) {
        Ok(VmState::Running) => VmStatus::Running,
        Ok(VmState::Paused) => VmStatus::Paused,
        Ok(VmState::Created) => VmStatus::Starting,
        Ok(VmState::Shutdown) => VmStatus::Stopping,
        Err(e) => {
            log::warn!("VM {id}: its VMM does not answer vm.info: {e}");
            return;
        }
    };
    set_vm(keel, id, |vm| {
        if vm.status != VmStatus::Stopping {
            vm.status = status;
        }
    });
}

fn read_events(
    keel: &Keel,
    id: &str,
    path: &std::path::Path,
    offset: &mut u64,
    partial: &mut String,
) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return;
    };
    if file.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut reader = BufReader::new(file);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                *offset += n as u64;
                if !line.ends_with('\n') {
                    // Half a line: keep it for the next read.
                    partial.push_str(&line);
                    return;
                }
                let whole = std::mem::take(partial) + &line;
                apply(keel, id, whole.trim_end());
            }
        }
    }
}

/// One event from the VMM: the status it implies, and a line in the log.
fn apply(keel: &Keel, id: &str, line: &str) {
    let Some(event) = VmmEvent::parse(line) else {
        log::debug!("VM {id}: unreadable event line {line:?}");
        return;
    };
    let device = event.device_id().unwrap_or("");
    keel.event(id, &event.name(), device);
    if event.source != EventSource::Vm {
        return;
    }
    let status = match event.event {
        EventKind::Booting | EventKind::Rebooting => Some(VmStatus::Starting),
        EventKind::Booted | EventKind::Resumed | EventKind::Rebooted => Some(VmStatus::Running),
        EventKind::Paused => Some(VmStatus::Paused),
        EventKind::DeviceRemoved => {
            keel.agent.note_removed(id, device);
            None
        }
        _ => None,
    };
    if let Some(status) = status {
        set_vm(keel, id, |vm| {
            // `stopping` lasts until the process ends.
            if vm.status != VmStatus::Stopping || status == VmStatus::Paused {
                vm.status = status;
                vm.status_reason.clear();
            }
        });
    }
}

/// How a keel-vmm's life ended, from its exit code (when known) and what it
/// last wrote.
fn outcome(keel: &Keel, id: &str, code: Option<i32>) -> (bool, String) {
    let files = files(keel, id);
    let words = process::last_words(&files);
    let events: Vec<VmmEvent> = std::fs::read_to_string(files.events())
        .unwrap_or_default()
        .lines()
        .filter_map(VmmEvent::parse)
        .collect();
    let panicked = events
        .iter()
        .any(|e| e.source == EventSource::Vm && e.event == EventKind::Panic);
    let shut_down = events
        .iter()
        .any(|e| e.source == EventSource::Vmm && e.event == EventKind::Shutdown);
    let explain = |what: &str| {
        if words.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {words}")
        }
    };
    match code.map(|c| (c, VmmExit::from_code(c))) {
        Some((_, Some(VmmExit::Clean))) => (true, "the guest powered off".into()),
        Some((_, Some(VmmExit::GuestPanicked))) => (false, explain("the guest kernel panicked")),
        Some((_, Some(VmmExit::GuestCrashed))) => (false, explain("the guest crashed the VM")),
        Some((_, Some(VmmExit::BadInput))) => {
            (false, explain("keel-vmm refused the VM's configuration"))
        }
        Some((c, None)) if c > 128 => (
            false,
            explain(&format!("keel-vmm was killed by signal {}", c - 128)),
        ),
        Some((c, None)) => (false, explain(&format!("keel-vmm exited with status {c}"))),
        None if panicked => (false, explain("the guest kernel panicked")),
        None if shut_down => (true, "the guest powered off".into()),
        None => (
            false,
            explain(
                "keel-vmm ended unexpectedly (killed, or it died while keeld was not watching)",
            ),
        ),
    }
}

/// Records the end of a VM's keel-vmm and restarts it if its policy says so.
pub async fn ended(keel: &Arc<Keel>, id: &str, code: Option<i32>) {
    let Some(vm) = keel.vms.get(id) else {
        return;
    };
    let (clean, reason) = outcome(keel, id, code);
    let asked_to_stop = vm.desired == PowerState::Stopped || vm.deleted_at.is_some();
    let restart = !asked_to_stop
        && match vm.restart_policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Never => false,
        };
    set_vm(keel, id, |vm| {
        vm.vmm = None;
        if asked_to_stop || clean {
            vm.status = VmStatus::Stopped;
            vm.status_reason = if asked_to_stop {
                String::new()
            } else {
                reason.clone()
            };
            if !restart {
                vm.desired = PowerState::Stopped;
            }
        } else {
            vm.status = VmStatus::Error;
            vm.status_reason = reason.clone();
        }
        if restart {
            vm.restarts += 1;
        }
    });
    let (kind, reason) = if asked_to_stop {
        ("stopped", "on request".to_string())
    } else if clean {
        ("powered-off", reason)
    } else {
        ("failed", reason)
    };
    log::info!("VM {} ({id}): {kind}: {reason}", vm.name);
    keel.event(id, kind, &reason);
    if restart {
        // Back off on a VM that keeps failing: 1 s, 2 s, ... up to 30 s.
        let delay = Duration::from_secs(u64::from(vm.restarts.min(29)) + 1);
        let keel = keel.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let still_wanted = keel
                .vms
                .get(&id)
                .is_some_and(|vm| vm.desired == PowerState::Running && vm.vmm.is_none());
            if still_wanted {
                keel.event(&id, "restarting", "restart policy");
                let _ = super::start(&keel, &id).await;
            }
        });
    }
}
