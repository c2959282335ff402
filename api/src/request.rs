//! Decoding an API request: which endpoint, and its body checked and
//! parsed into the action the VMM's control loop performs. Kept apart from
//! the socket so it can be fuzzed and shared.

use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;

use crate::http::Response;
use crate::vmm_api::{DeviceConfig, Endpoint, VmRemoveDevice, VmResize, VmResizeDisk};
use crate::{DiskConfig, NetConfig, VmConfig, VsockConfig};

/// What a decoded request asks the control loop to do.
#[derive(Debug)]
pub enum ApiAction {
    ShutdownVmm,
    Create(Box<VmConfig>),
    Boot,
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    Delete,
    AddDisk(DiskConfig),
    /// A NIC, and the tap queue fds that came with the request (if any).
    AddNet(NetConfig, Vec<OwnedFd>),
    AddVsock(VsockConfig),
    AddDevice(DeviceConfig),
    RemoveDevice(String),
    Resize(VmResize),
    ResizeDisk(VmResizeDisk),
}

/// A 400 answer naming what was wrong with the body.
fn bad_request(endpoint: Endpoint, what: impl std::fmt::Display) -> Response {
    Response::error(
        400,
        &[format!(
            "Invalid body for {}: {what}",
            endpoint
                .path()
                .trim_start_matches(crate::vmm_api::API_PREFIX)
        )],
    )
}

fn json<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(bad_request(endpoint, "a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(endpoint, e))
}

/// Decodes a request's body for `endpoint`. `Ok(None)` is `vmm.ping`,
/// which the server answers itself. Every configuration is validated here,
/// so the control loop only sees well-formed ones.
pub fn decode(
    endpoint: Endpoint,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Option<ApiAction>, Response> {
    let invalid = |e: crate::ConfigError| bad_request(endpoint, e);
    let action = match endpoint {
        Endpoint::VmmPing => return Ok(None),
        Endpoint::VmmShutdown => ApiAction::ShutdownVmm,
        Endpoint::VmCreate => {
            let config: VmConfig = json(endpoint, body)?;
            config.validate().map_err(invalid)?;
            ApiAction::Create(Box::new(config))
        }
        Endpoint::VmBoot => ApiAction::Boot,
        Endpoint::VmInfo => ApiAction::Info,
        Endpoint::VmCounters => ApiAction::Counters,
        Endpoint::VmPause => ApiAction::Pause,
        Endpoint::VmResume => ApiAction::Resume,
        Endpoint::VmShutdown => ApiAction::Shutdown,
        Endpoint::VmReboot => ApiAction::Reboot,
        Endpoint::VmPowerButton => ApiAction::PowerButton,
        Endpoint::VmDelete => ApiAction::Delete,
        Endpoint::VmAddDisk => {
            let disk: DiskConfig = json(endpoint, body)?;
            disk.validate().map_err(invalid)?;
            ApiAction::AddDisk(disk)
        }
        Endpoint::VmAddNet => {
            let net: NetConfig = json(endpoint, body)?;
            net.validate().map_err(invalid)?;
            ApiAction::AddNet(net, fds)
        }
        Endpoint::VmAddVsock => {
            let vsock: VsockConfig = json(endpoint, body)?;
            vsock.validate().map_err(invalid)?;
            ApiAction::AddVsock(vsock)
        }
        Endpoint::VmAddDevice => ApiAction::AddDevice(json(endpoint, body)?),
        Endpoint::VmRemoveDevice => {
            let VmRemoveDevice { id } = json(endpoint, body)?;
            ApiAction::RemoveDevice(id)
        }
        Endpoint::VmResize => ApiAction::Resize(json(endpoint, body)?),
        Endpoint::VmResizeDisk => ApiAction::ResizeDisk(json(endpoint, body)?),
    };
    Ok(Some(action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(endpoint: Endpoint, body: &str) -> u16 {
        match decode(endpoint, body.as_bytes(), Vec::new()) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    #[test]
    fn bodies_are_checked_before_the_control_loop_sees_them() {
        assert_eq!(status(Endpoint::VmCreate, ""), 400);
        assert_eq!(status(Endpoint::VmCreate, "{"), 400);
        assert_eq!(status(Endpoint::VmCreate, "[]"), 400);
        // Unknown field, wrong type, missing kernel.
        assert_eq!(
            status(
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"cpu":{}}"#
            ),
            400
        );
        assert_eq!(
            status(
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":"two","max_vcpus":2}}"#
            ),
            400
        );
        assert_eq!(status(Endpoint::VmCreate, r#"{"payload":{}}"#), 400);
        assert_eq!(
            status(Endpoint::VmCreate, r#"{"payload":{"kernel":"/k"}}"#),
            200
        );
        assert_eq!(
            status(Endpoint::VmAddDisk, r#"{"path":"/d","bogus":1}"#),
            400
        );
        assert_eq!(status(Endpoint::VmRemoveDevice, r#"{"id":3}"#), 400);
        assert_eq!(status(Endpoint::VmResize, r#"{"desired_vcpus":-1}"#), 400);
        // Bodiless actions ignore a body, as Cloud Hypervisor does.
        assert_eq!(status(Endpoint::VmPause, "junk"), 200);
    }

    #[test]
    fn create_error_names_the_problem() {
        let Err(r) = decode(
            Endpoint::VmCreate,
            br#"{"payload":{"kernel":"/k"},"cpu":{}}"#,
            Vec::new(),
        ) else {
            panic!("accepted an unknown field");
        };
        let body = String::from_utf8(r.body).unwrap();
        assert!(
            body.contains("vm.create") && body.contains("unknown field `cpu`"),
            "{body}"
        );
    }
}
