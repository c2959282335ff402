//! keel-vmm's event monitor stream (`--event-monitor`) and exit statuses,
//! typed once for the VMM that writes them and for keeld that reads them.
//! The JSON shape is Cloud Hypervisor's: one object per line,
//! `{"timestamp":{"secs":1,"nanos":5},"source":"vm","event":"booted","properties":null}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Time since the VMM started.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timestamp {
    pub secs: u64,
    pub nanos: u32,
}

/// Who raised an event.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventSource {
    Vmm,
    Vm,
    VirtioDevice,
    /// A source this reader does not know (a newer VMM, or Cloud Hypervisor).
    #[serde(other)]
    Other,
}

/// What happened.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The VMM process started (source `vmm`).
    Starting,
    /// The VMM is exiting (source `vmm`), or the guest powered off (`vm`).
    Shutdown,
    Created,
    Booting,
    Booted,
    Rebooting,
    Rebooted,
    Pausing,
    Paused,
    Resuming,
    Resumed,
    Deleted,
    /// The guest kernel panicked (pvpanic).
    Panic,
    /// A device was hot-plugged; `properties.id` names it.
    DeviceAdded,
    /// The guest let go of a hot-unplugged device; `properties.id` names it.
    DeviceRemoved,
    /// An event this reader does not know.
    #[serde(other)]
    Other,
}

/// One line of the event stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmEvent {
    #[serde(default)]
    pub timestamp: Timestamp,
    pub source: EventSource,
    pub event: EventKind,
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
}

impl VmmEvent {
    /// The device an event names (`properties.id`).
    pub fn device_id(&self) -> Option<&str> {
        self.properties.as_ref()?.get("id").map(String::as_str)
    }

    /// Reads one line; `None` for anything that is not an event.
    pub fn parse(line: &str) -> Option<VmmEvent> {
        serde_json::from_str(line).ok()
    }

    /// The event's name as it is spelled on the wire (`device-removed`).
    pub fn name(&self) -> String {
        serde_json::to_value(self.event)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// How keel-vmm's process ends, as its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest powered off, or the VMM was told to shut down.
    Clean,
    /// The command line, a configuration or the API's first request was
    /// refused before a guest ran.
    BadInput,
    /// The guest crashed the VM (a triple fault, an unhandled exit).
    GuestCrashed,
    /// The guest kernel panicked (pvpanic).
    GuestPanicked,
}

impl VmmExit {
    pub const fn code(self) -> u8 {
        match self {
            VmmExit::Clean => 0,
            VmmExit::BadInput => 1,
            VmmExit::GuestCrashed => 2,
            VmmExit::GuestPanicked => 3,
        }
    }

    /// The meaning of an exit status; `None` for one keel-vmm never uses
    /// (a signal, a crash of the VMM itself).
    pub fn from_code(code: i32) -> Option<VmmExit> {
        [
            VmmExit::Clean,
            VmmExit::BadInput,
            VmmExit::GuestCrashed,
            VmmExit::GuestPanicked,
        ]
        .into_iter()
        .find(|e| i32::from(e.code()) == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_cloud_hypervisors_spelling() {
        let line = r#"{"timestamp":{"secs":1,"nanos":5},"source":"vm","event":"device-removed","properties":{"id":"disk1"}}"#;
        let event = VmmEvent::parse(line).unwrap();
        assert_eq!(event.source, EventSource::Vm);
        assert_eq!(event.event, EventKind::DeviceRemoved);
        assert_eq!(event.device_id(), Some("disk1"));
        assert_eq!(event.name(), "device-removed");
        assert_eq!(serde_json::to_string(&event).unwrap(), line);
    }

    #[test]
    fn unknown_events_and_sources_are_other_not_errors() {
        let event =
            VmmEvent::parse(r#"{"source":"virtio-device","event":"activated","properties":null}"#)
                .unwrap();
        assert_eq!(event.source, EventSource::VirtioDevice);
        assert_eq!(event.event, EventKind::Other);
        let event = VmmEvent::parse(r#"{"source":"gpu","event":"panic"}"#).unwrap();
        assert_eq!(event.source, EventSource::Other);
        assert_eq!(event.event, EventKind::Panic);
        assert!(VmmEvent::parse("not json").is_none());
        assert!(VmmEvent::parse(r#"{"event":"panic"}"#).is_none());
    }

    #[test]
    fn exit_codes_round_trip() {
        for exit in [
            VmmExit::Clean,
            VmmExit::BadInput,
            VmmExit::GuestCrashed,
            VmmExit::GuestPanicked,
        ] {
            assert_eq!(VmmExit::from_code(i32::from(exit.code())), Some(exit));
        }
        assert_eq!(VmmExit::from_code(137), None);
        assert_eq!(VmmExit::from_code(-1), None);
    }
}
