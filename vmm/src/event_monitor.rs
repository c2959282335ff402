//! `--event-monitor`: lifecycle and device events as JSON, one object per
//! line, shaped like Cloud Hypervisor's:
//! `{"timestamp":{"secs":1,"nanos":5},"source":"vm","event":"booted","properties":null}`.
//! The timestamp counts from the VMM's start.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keel_api::events::{EventKind, EventSource, Timestamp};
use serde::Serialize;

/// [`keel_api::events::VmmEvent`]'s shape, borrowing its properties.
#[derive(Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: EventSource,
    event: EventKind,
    properties: Option<&'a BTreeMap<String, String>>,
}

pub struct EventMonitor {
    start: Instant,
    out: Option<Mutex<File>>,
}

impl EventMonitor {
    /// No monitor: events are dropped.
    pub fn none() -> Self {
        EventMonitor {
            start: Instant::now(),
            out: None,
        }
    }

    /// Appends to `path`, creating it.
    pub fn to_path(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::to_file(file))
    }

    /// Writes to an inherited descriptor (`fd=N`).
    ///
    /// # Safety
    /// `fd` must be open and owned by nobody else in this process.
    pub unsafe fn to_fd(fd: i32) -> Self {
        // SAFETY: the caller hands over sole ownership of the open fd.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::to_file(File::from(owned))
    }

    fn to_file(file: File) -> Self {
        EventMonitor {
            start: Instant::now(),
            out: Some(Mutex::new(file)),
        }
    }

    /// Records `event` from `source`.
    pub fn emit(
        &self,
        source: EventSource,
        event: EventKind,
        properties: Option<&BTreeMap<String, String>>,
    ) {
        let Some(out) = &self.out else {
            return;
        };
        let elapsed: Duration = self.start.elapsed();
        let record = Event {
            timestamp: Timestamp {
                secs: elapsed.as_secs(),
                nanos: elapsed.subsec_nanos(),
            },
            source,
            event,
            properties,
        };
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        // One write per line, so a reader never sees half an event.
        let mut file = out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line) {
            log::warn!("Cannot write to the event monitor: {e}");
        }
    }

    pub fn vm(&self, event: EventKind) {
        self.emit(EventSource::Vm, event, None);
    }

    /// The VMM process itself starting or shutting down.
    pub fn vmm(&self, event: EventKind) {
        self.emit(EventSource::Vmm, event, None);
    }

    /// A device event with its id (`device-added`, `device-removed`).
    pub fn device(&self, event: EventKind, id: &str) {
        let props = BTreeMap::from([("id".to_string(), id.to_string())]);
        self.emit(EventSource::Vm, event, Some(&props));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_object_per_line() {
        let path = std::env::temp_dir().join(format!("keel-events-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let monitor = EventMonitor::to_path(&path).unwrap();
        monitor.vmm(EventKind::Starting);
        monitor.vm(EventKind::Booted);
        monitor.device(EventKind::DeviceAdded, "_disk0");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["source"], "vmm");
        assert_eq!(lines[0]["properties"], serde_json::Value::Null);
        assert_eq!(lines[1]["event"], "booted");
        assert!(lines[1]["timestamp"]["nanos"].is_u64());
        assert_eq!(lines[2]["properties"]["id"], "_disk0");
        std::fs::remove_file(&path).unwrap();
    }
}
