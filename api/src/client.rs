//! A typed, blocking client for one keel-vmm's (or Cloud Hypervisor's) API
//! socket. One connection, kept alive across requests.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::http::{self, HttpError};
use crate::vmm_api::{
    DeviceConfig, Endpoint, PciDeviceInfo, VmCounters, VmInfo, VmRemoveDevice, VmResize,
    VmResizeDisk, VmmPingResponse,
};
use crate::{DiskConfig, NetConfig, VmConfig, VsockConfig};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "Cannot connect to the API socket {path}: is keel-vmm running with --api-socket there?"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The API connection failed")]
    Io(#[source] io::Error),
    #[error("Cannot send file descriptors with the request")]
    SendFds(#[source] vmm_sys_util::errno::Error),
    #[error("The VMM closed the connection before answering")]
    Closed,
    #[error("The VMM's answer is not valid HTTP")]
    Http(#[source] HttpError),
    #[error("{}", server_message(*.status, .messages))]
    Server { status: u16, messages: Vec<String> },
    #[error("Cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    #[error("Unexpected answer body: {body}")]
    Decode {
        body: String,
        #[source]
        source: serde_json::Error,
    },
}

fn server_message(status: u16, messages: &[String]) -> String {
    let mut line = format!("the VMM answered {status} {}", http::reason(status));
    for m in messages {
        line.push_str(": ");
        line.push_str(m);
    }
    line
}

/// A read that a signal interrupted is tried again.
fn read_retrying(stream: &mut UnixStream, buf: &mut [u8]) -> Result<usize, ClientError> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(ClientError::Io),
        }
    }
}

pub struct VmmClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl VmmClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(VmmClient {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Gives up on an answer after `timeout` (none by default: a boot may
    /// take a while).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)
    }

    /// Sends a request and returns the status and body of its answer,
    /// whatever the status.
    pub fn raw(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let wire = http::encode_request(method, path, body);
        if fds.is_empty() {
            self.stream.write_all(&wire).map_err(ClientError::Io)?;
        } else {
            // The descriptors travel with the first bytes, as Cloud
            // Hypervisor's server expects them.
            let sent = self
                .stream
                .send_with_fds(&[&wire[..]], fds)
                .map_err(ClientError::SendFds)?;
            self.stream
                .write_all(&wire[sent..])
                .map_err(ClientError::Io)?;
        }
        self.read_response()
    }

    fn read_response(&mut self) -> Result<(u16, Vec<u8>), ClientError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((head, at)) =
                http::parse_response_head(&self.buf).map_err(ClientError::Http)?
            {
                // A 100 Continue is an interim answer: the real one follows.
                if head.status == 100 {
                    self.buf.drain(..at);
                    continue;
                }
                while self.buf.len() < at + head.content_length {
                    let n = read_retrying(&mut self.stream, &mut chunk)?;
                    if n == 0 {
                        return Err(ClientError::Closed);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let body = self.buf[at..at + head.content_length].to_vec();
                self.buf.drain(..at + head.content_length);
                return Ok((head.status, body));
            }
            let n = read_retrying(&mut self.stream, &mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Calls `endpoint`; an error status becomes [`ClientError::Server`].
    pub fn call(
        &mut self,
        endpoint: Endpoint,
        body: Option<&[u8]>,
        fds: &[RawFd],
    ) -> Result<Vec<u8>, ClientError> {
        let (status, body) = self.raw(endpoint.method(), &endpoint.path(), body, fds)?;
        if status >= 300 {
            let messages = serde_json::from_slice::<Vec<String>>(&body)
                .unwrap_or_else(|_| vec![String::from_utf8_lossy(&body).into_owned()]);
            return Err(ClientError::Server { status, messages });
        }
        Ok(body)
    }

    fn call_json<T: Serialize>(
        &mut self,
        endpoint: Endpoint,
        body: &T,
        fds: &[RawFd],
    ) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        self.call(endpoint, Some(&body), fds)
    }

    fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|source| ClientError::Decode {
            body: String::from_utf8_lossy(body).into_owned(),
            source,
        })
    }

    /// A hot-plug's answer: the device's PCI address, or nothing when it
    /// was added to a VM that is not running.
    fn decode_added(body: &[u8]) -> Result<Option<PciDeviceInfo>, ClientError> {
        if body.is_empty() {
            Ok(None)
        } else {
            Self::decode(body).map(Some)
        }
    }

    pub fn ping(&mut self) -> Result<VmmPingResponse, ClientError> {
        let body = self.call(Endpoint::VmmPing, None, &[])?;
        Self::decode(&body)
    }

    pub fn shutdown_vmm(&mut self) -> Result<(), ClientError> {
        self.call(Endpoint::VmmShutdown, None, &[]).map(drop)
    }

    pub fn create(&mut self, config: &VmConfig) -> Result<(), ClientError> {
        self.call_json(Endpoint::VmCreate, config, &[]).map(drop)
    }

    pub fn info(&mut self) -> Result<VmInfo, ClientError> {
        let body = self.call(Endpoint::VmInfo, None, &[])?;
        Self::decode(&body)
    }

    pub fn counters(&mut self) -> Result<VmCounters, ClientError> {
        let body = self.call(Endpoint::VmCounters, None, &[])?;
        Self::decode(&body)
    }

    /// The lifecycle actions that take no body: boot, pause, resume,
    /// shutdown, reboot, power-button, delete.
    pub fn action(&mut self, endpoint: Endpoint) -> Result<(), ClientError> {
        self.call(endpoint, None, &[]).map(drop)
    }

    pub fn add_disk(&mut self, disk: &DiskConfig) -> Result<Option<PciDeviceInfo>, ClientError> {
        let body = self.call_json(Endpoint::VmAddDisk, disk, &[])?;
        Self::decode_added(&body)
    }

    /// Adds a NIC; `fds` are open tap queues passed to the VMM instead of a
    /// tap name.
    pub fn add_net(
        &mut self,
        net: &NetConfig,
        fds: &[RawFd],
    ) -> Result<Option<PciDeviceInfo>, ClientError> {
        let body = self.call_json(Endpoint::VmAddNet, net, fds)?;
        Self::decode_added(&body)
    }

    pub fn add_vsock(&mut self, vsock: &VsockConfig) -> Result<Option<PciDeviceInfo>, ClientError> {
        let body = self.call_json(Endpoint::VmAddVsock, vsock, &[])?;
        Self::decode_added(&body)
    }

    pub fn add_device(
        &mut self,
        device: &DeviceConfig,
    ) -> Result<Option<PciDeviceInfo>, ClientError> {
        let body = self.call_json(Endpoint::VmAddDevice, device, &[])?;
        Self::decode_added(&body)
    }

    pub fn remove_device(&mut self, id: &str) -> Result<(), ClientError> {
        let body = VmRemoveDevice { id: id.to_string() };
        self.call_json(Endpoint::VmRemoveDevice, &body, &[])
            .map(drop)
    }

    pub fn resize(&mut self, resize: &VmResize) -> Result<(), ClientError> {
        self.call_json(Endpoint::VmResize, resize, &[]).map(drop)
    }

    pub fn resize_disk(&mut self, resize: &VmResizeDisk) -> Result<(), ClientError> {
        self.call_json(Endpoint::VmResizeDisk, resize, &[])
            .map(drop)
    }
}
