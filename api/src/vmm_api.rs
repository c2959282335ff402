//! The keel-vmm REST API: its endpoints and the JSON bodies they take and
//! give, shaped like Cloud Hypervisor's (`cloud-hypervisor.yaml`) so its
//! clients work unchanged. `api/openapi/keel-vmm.yaml` documents the same.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::VmConfig;

/// Every endpoint lives under this prefix.
pub const API_PREFIX: &str = "/api/v1/";

/// What an API request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmDelete,
    VmAddDisk,
    VmAddNet,
    VmAddVsock,
    VmAddDevice,
    VmRemoveDevice,
    VmResize,
    VmResizeDisk,
}

/// Each endpoint, its HTTP method and its name under [`API_PREFIX`].
pub const ENDPOINTS: &[(Endpoint, &str, &str)] = &[
    (Endpoint::VmmPing, "GET", "vmm.ping"),
    (Endpoint::VmmShutdown, "PUT", "vmm.shutdown"),
    (Endpoint::VmCreate, "PUT", "vm.create"),
    (Endpoint::VmBoot, "PUT", "vm.boot"),
    (Endpoint::VmInfo, "GET", "vm.info"),
    (Endpoint::VmCounters, "GET", "vm.counters"),
    (Endpoint::VmPause, "PUT", "vm.pause"),
    (Endpoint::VmResume, "PUT", "vm.resume"),
    (Endpoint::VmShutdown, "PUT", "vm.shutdown"),
    (Endpoint::VmReboot, "PUT", "vm.reboot"),
    (Endpoint::VmPowerButton, "PUT", "vm.power-button"),
    (Endpoint::VmDelete, "PUT", "vm.delete"),
    (Endpoint::VmAddDisk, "PUT", "vm.add-disk"),
    (Endpoint::VmAddNet, "PUT", "vm.add-net"),
    (Endpoint::VmAddVsock, "PUT", "vm.add-vsock"),
    (Endpoint::VmAddDevice, "PUT", "vm.add-device"),
    (Endpoint::VmRemoveDevice, "PUT", "vm.remove-device"),
    (Endpoint::VmResize, "PUT", "vm.resize"),
    (Endpoint::VmResizeDisk, "PUT", "vm.resize-disk"),
];

/// Why a request matches no endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No such path: 404.
    UnknownPath,
    /// The path exists with another method: 405.
    WrongMethod { allowed: &'static str },
}

impl Endpoint {
    /// The endpoint for `method` and a full request path.
    pub fn route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
        let name = path
            .strip_prefix(API_PREFIX)
            .ok_or(RouteError::UnknownPath)?;
        let (endpoint, allowed, _) = ENDPOINTS
            .iter()
            .find(|(_, _, n)| *n == name)
            .ok_or(RouteError::UnknownPath)?;
        if *allowed == method {
            Ok(*endpoint)
        } else {
            Err(RouteError::WrongMethod { allowed })
        }
    }

    pub fn method(self) -> &'static str {
        self.entry().1
    }

    /// The full request path.
    pub fn path(self) -> String {
        format!("{API_PREFIX}{}", self.entry().2)
    }

    fn entry(self) -> &'static (Endpoint, &'static str, &'static str) {
        // Every variant is listed once in ENDPOINTS (tested below).
        ENDPOINTS
            .iter()
            .find(|(e, _, _)| *e == self)
            .unwrap_or(&ENDPOINTS[0])
    }
}

/// `GET vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// The VM's lifecycle state, as `vm.info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

/// A device in `vm.info`'s device tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// `GET vm.info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    /// Guest RAM in bytes, hot-plugged memory included.
    pub memory_actual_size: u64,
    #[serde(default)]
    pub device_tree: BTreeMap<String, DeviceNode>,
}

/// `GET vm.counters`: per device id, per counter name, a value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// `PUT vm.resize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

/// `PUT vm.resize-disk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResizeDisk {
    pub id: String,
    pub desired_size: u64,
}

/// `PUT vm.remove-device`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// `PUT vm.add-device` (VFIO passthrough).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub path: std::path::PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// What a hot-plug answers: the new device's id and PCI address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_listed_once_and_routes_to_itself() {
        let mut seen = std::collections::HashSet::new();
        for (endpoint, method, name) in ENDPOINTS {
            assert!(seen.insert(*endpoint), "{endpoint:?} listed twice");
            assert_eq!(endpoint.method(), *method);
            assert_eq!(endpoint.path(), format!("/api/v1/{name}"));
            assert_eq!(Endpoint::route(method, &endpoint.path()), Ok(*endpoint));
        }
        assert_eq!(seen.len(), 19);
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        assert_eq!(
            Endpoint::route("GET", "/api/v1/vm.nope"),
            Err(RouteError::UnknownPath)
        );
        assert_eq!(
            Endpoint::route("GET", "/vm.info"),
            Err(RouteError::UnknownPath)
        );
        assert_eq!(
            Endpoint::route("PUT", "/api/v1/vm.info"),
            Err(RouteError::WrongMethod { allowed: "GET" })
        );
    }

    /// The OpenAPI document lists exactly the routes served: every
    /// `paths:` entry with its one method, and nothing else.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc = include_str!("../openapi/keel-vmm.yaml");
        let mut documented = std::collections::BTreeSet::new();
        let mut path: Option<&str> = None;
        let mut in_paths = false;
        for line in doc.lines() {
            if line == "paths:" {
                in_paths = true;
                continue;
            }
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = false;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(p);
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                && !m.starts_with(' ')
            {
                let p = path.expect("a method outside a path");
                documented.insert((m.to_ascii_uppercase(), p.to_string()));
            }
        }
        let served: std::collections::BTreeSet<_> = ENDPOINTS
            .iter()
            .map(|(_, m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn resize_refuses_unknown_fields() {
        assert!(serde_json::from_str::<VmResize>(r#"{"desired_vcpus":2}"#).is_ok());
        let err = serde_json::from_str::<VmResize>(r#"{"desired_cpus":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
