//! Follows one keel-vmm: its event monitor lines become what the agent
//! observes of the VM and lines in its event log; its end (seen through a
//! pidfd, not by polling) is reported with how it ended.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use keel_api::agent::ObservedState;
use keel_api::events::{EventKind, EventSource, VmmEvent, VmmExit};
use tokio::io::unix::AsyncFd;

use super::local::LocalAgent;
use super::process::{self, VmFiles};

/// How often new event lines are looked for while the VMM runs.
const POLL: Duration = Duration::from_millis(100);
/// How often the serial log's size is checked against its limit.
const SERIAL_CHECK: Duration = Duration::from_secs(5);

/// Watches the VM's keel-vmm on a task of its own until it ends. `child` is
/// given when this keeld started it (then its exit status is known).
pub fn watch(
    agent: Arc<LocalAgent>,
    vm: String,
    child: Option<Child>,
    pidfd: Arc<AsyncFd<OwnedFd>>,
) {
    tokio::spawn(async move {
        let code = follow(&agent, &vm, child, &pidfd).await;
        let (clean, reason) = outcome(&agent.files(&vm), code);
        agent.ended(&vm, clean, reason);
    });
}

/// Reads events until the process is gone; returns its exit code when
/// known (a signal is 128 + its number).
async fn follow(
    agent: &Arc<LocalAgent>,
    vm: &str,
    child: Option<Child>,
    pidfd: &AsyncFd<OwnedFd>,
) -> Option<i32> {
    let files = agent.files(vm);
    // A VMM found again after a keeld restart: its past events are in the
    // log already (or were missed); its state came from vm.info.
    let mut offset = if child.is_none() {
        std::fs::metadata(files.events())
            .map(|m| m.len())
            .unwrap_or(0)
    } else {
        0
    };
    let mut partial = String::new();
    let mut serial_checked = tokio::time::Instant::now();
    loop {
        if serial_checked.elapsed() >= SERIAL_CHECK {
            serial_checked = tokio::time::Instant::now();
            let (vm_files, max) = (agent.files(vm), agent.config.serial_log_max);
            let rotated =
                tokio::task::spawn_blocking(move || super::serial_log::rotate(&vm_files, max))
                    .await;
            if let Ok(Err(e)) = rotated {
                log::warn!("VM {vm}: cannot rotate its serial log: {e}");
            }
        }
        read_events(agent, vm, &files.events(), &mut offset, &mut partial);
        tokio::select! {
            _ = process::wait_pidfd(pidfd) => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    read_events(agent, vm, &files.events(), &mut offset, &mut partial);
    let mut child = child?;
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        // The pidfd said it ended: reaping it cannot block for long.
        _ => tokio::task::spawn_blocking(move || child.wait())
            .await
            .ok()?
            .ok()?,
    };
    status.code().or(status.signal().map(|s| 128 + s))
}

fn read_events(
    agent: &LocalAgent,
    vm: &str,
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
                apply(agent, vm, whole.trim_end());
            }
        }
    }
}

/// One event from the VMM: what it says the VM is doing now, and a line in
/// the log.
fn apply(agent: &LocalAgent, vm: &str, line: &str) {
    let Some(event) = VmmEvent::parse(line) else {
        log::debug!("VM {vm}: unreadable event line {line:?}");
        return;
    };
    let device = event.device_id().unwrap_or("");
    agent.event(vm, &event.name(), device);
    if event.source != EventSource::Vm {
        return;
    }
    let state = match event.event {
        EventKind::Booting | EventKind::Rebooting => ObservedState::Starting,
        EventKind::Booted | EventKind::Resumed | EventKind::Rebooted => ObservedState::Running,
        EventKind::Paused => ObservedState::Paused,
        EventKind::DeviceRemoved => {
            agent.note_removed(vm, device);
            return;
        }
        _ => return,
    };
    agent.update(vm, |t| {
        // `stopping` lasts until the process ends.
        if t.state != ObservedState::Stopping || state == ObservedState::Paused {
            t.state = state;
        }
    });
}

/// How a VMM that ended while no keeld watched it ended, from its files;
/// `None` when it never ran.
pub fn outcome_from_files(files: &VmFiles, code: Option<i32>) -> Option<(bool, String)> {
    let ran = std::fs::metadata(files.events()).is_ok_and(|m| m.len() > 0);
    ran.then(|| outcome(files, code))
}

/// How a keel-vmm's life ended, from its exit code (when known) and what it
/// last wrote.
fn outcome(files: &VmFiles, code: Option<i32>) -> (bool, String) {
    let words = process::last_words(files);
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
