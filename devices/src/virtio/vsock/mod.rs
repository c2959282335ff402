//! virtio-vsock (virtio 1.2 §5.10) with a Unix-socket host side.
//!
//! The guest sees a stream-socket transport to CID 2; the host sees one
//! Unix socket, with the same `CONNECT <port>` handshake as Cloud
//! Hypervisor and Firecracker (see [`muxer`] for the protocol and its
//! limits). Queues: rx (0), tx (1), event (2); config space: the guest's
//! CID (le64).
//!
//! Live connections are not migratable: they are host sockets. The state
//! holds the CID, the negotiated features and the queues; after a restore
//! every connection is gone, which the guest learns from the
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET the device will send on the event
//! queue.

mod guest_io;
pub mod muxer;
pub mod packet;
mod worker;

#[cfg(test)]
mod tests;

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_api::VsockConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, Activation, ActiveQueue, QueueStateSer, VirtioDevice, VirtioInterrupt,
    WorkerHandle, device_type, features, read_config_bytes,
};
use crate::GuestMemory;
use muxer::Muxer;
pub use worker::{VsockWorker, WorkerStats};

/// VIRTIO_VSOCK_F_STREAM: stream sockets (the only kind Keel serves).
pub const F_STREAM: u64 = 1 << 0;

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Lowest CID a guest may have (0–2 are reserved).
const MIN_GUEST_CID: u64 = 3;

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("Vsock cid={0} is reserved or too large; guest CIDs run from 3 to 4294967294")]
    Cid(u64),
    #[error(
        "The directory of the vsock socket {} does not exist; create it or choose another path",
        .0.display()
    )]
    SocketDirMissing(PathBuf),
    #[error(
        "The vsock socket {} is in use by a running listener (another VM?); stop it or choose another path",
        .0.display()
    )]
    SocketInUse(PathBuf),
    #[error(
        "{} exists and is not a Unix socket; Keel will not replace it: remove it or choose another path",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error("Cannot inspect the vsock socket path {}", .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot remove the stale vsock socket {}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on the vsock socket {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The device's state for snapshots. Live connections are host sockets and
/// are not part of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub version: u32,
    pub guest_cid: u64,
    pub acked_features: u64,
    /// The queues when the device was last stopped (empty while it has
    /// never run): stop the device before taking its state.
    pub queues: Vec<QueueStateSer>,
}

pub const VSOCK_STATE_VERSION: u32 = 1;

pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    listener: Arc<UnixListener>,
    /// (device, inode) of the socket file we created, so that dropping the
    /// device removes our socket and never someone else's.
    socket_id: Option<(u64, u64)>,
    config: [u8; 8],
    acked_features: u64,
    worker: Option<WorkerHandle<VsockWorker>>,
    queues: Vec<QueueStateSer>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("socket", &self.socket)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

/// Makes room for a listener at `path`: refuses a live one or a non-socket,
/// removes a stale socket file.
fn clear_socket_path(path: &Path) -> Result<(), VsockError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(VsockError::SocketDirMissing(path.to_path_buf()));
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(VsockError::Inspect {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(VsockError::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(VsockError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Vsock {
    /// Binds the host socket at `config.socket` (a stale socket file there is
    /// replaced). The device serves nothing until the driver activates it;
    /// host processes that connect before then wait in the backlog.
    pub fn new(config: &VsockConfig) -> Result<Vsock, VsockError> {
        if config.cid < MIN_GUEST_CID || config.cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(config.cid));
        }
        let path = config.socket.clone();
        clear_socket_path(&path)?;
        let bind_err = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let socket_id = fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        Ok(Vsock {
            cid: config.cid,
            socket: path,
            listener: Arc::new(listener),
            socket_id,
            config: config.cid.to_le_bytes(),
            acked_features: 0,
            worker: None,
            queues: Vec::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    fn stop_worker(&mut self) {
        if let Some(handle) = self.worker.take()
            && let Some(worker) = handle.stop()
        {
            self.queues = worker.queue_states().map(QueueStateSer::from).collect();
        }
    }

    /// A worker over `rx` and `tx` that the caller drives itself, on its
    /// own thread (fuzzing): `process_tx`, `process_host_events`,
    /// `process_rx`. It shares the device's host socket.
    pub fn sync_worker(
        &self,
        memory: GuestMemory,
        rx: Queue,
        tx: Queue,
    ) -> io::Result<VsockWorker> {
        let muxer = Muxer::new(self.cid, &self.socket, self.listener.clone())?;
        let queues = vec![
            ActiveQueue {
                index: 0,
                queue: rx,
                kick: EventFd::new(EFD_NONBLOCK)?,
            },
            ActiveQueue {
                index: 1,
                queue: tx,
                kick: EventFd::new(EFD_NONBLOCK)?,
            },
        ];
        Ok(VsockWorker::new(
            memory,
            Arc::new(NoInterrupt),
            queues,
            self.cid,
            muxer,
        ))
    }

    pub fn vsock_state(&self) -> VsockState {
        VsockState {
            version: VSOCK_STATE_VERSION,
            guest_cid: self.cid,
            acked_features: self.acked_features,
            queues: self.queues.clone(),
        }
    }
}

/// For [`Vsock::sync_worker`]: nobody to tell.
struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::COMMON | F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let Activation {
            memory,
            interrupt,
            mut queues,
            acked_features,
        } = activation;
        queues.sort_by_key(|q| q.index);
        let enabled: Vec<u16> = queues.iter().map(|q| q.index).collect();
        if enabled != [0, 1] && enabled != [0, 1, 2] {
            return Err(ActivateError::Queues {
                enabled,
                needed: "rx (0) and tx (1), and optionally event (2)".into(),
            });
        }
        let muxer =
            Muxer::new(self.cid, &self.socket, self.listener.clone()).map_err(|source| {
                ActivateError::Worker {
                    device: "virtio-vsock",
                    source,
                }
            })?;
        let worker = VsockWorker::new(memory, interrupt.clone(), queues, self.cid, muxer);
        let handle =
            WorkerHandle::spawn("virtio-vsock".into(), worker, interrupt).map_err(|source| {
                ActivateError::Worker {
                    device: "virtio-vsock",
                    source,
                }
            })?;
        self.acked_features = acked_features;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker's muxer closes every host connection.
        self.stop_worker();
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.vsock_state()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        // Remove the socket file only if it is still the one we bound.
        if let Some(id) = self.socket_id
            && let Ok(m) = fs::symlink_metadata(&self.socket)
            && (m.dev(), m.ino()) == id
        {
            let _ = fs::remove_file(&self.socket);
        }
    }
}
