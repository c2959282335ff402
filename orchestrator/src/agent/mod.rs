//! The node agent: everything keeld does on a host. It runs one keel-vmm
//! per VM (driven only through the typed client in `keel_api`), keeps the
//! node's disks, seeds and spares, and reports what each VMM is doing.
//!
//! The control plane talks to it only through [`NodeAgent`], with the
//! serializable types of `keel_api::agent`: it hands over a `VmSpec` and
//! reads back `VmObserved`. The agent never reads keeld's store or the
//! control plane's state, so a remote agent on another host can take its
//! place behind the same trait.

pub mod console;
mod host;
mod iso9660;
mod local;
mod monitor;
pub mod process;
mod seed;
mod serial_log;
mod spares;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use keel_api::agent::{AgentEvent, DiskSpec, NodeStatus, SeedSpec, VmAction, VmObserved, VmSpec};
use thiserror::Error;

pub use console::ConsoleStream;
pub use local::{AgentConfig, LocalAgent};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("VM {vm} is not running")]
    NotRunning { vm: String },
    /// Why a VMM could not be started (its last words included).
    #[error("{reason}")]
    Start { reason: String },
    #[error("keel-vmm of VM {vm} refused {call}")]
    Vmm {
        vm: String,
        call: &'static str,
        #[source]
        source: process::ProcessError,
    },
    #[error(
        "The guest did not release disk {disk} within {secs} s (is the guest's ACPI hot-plug \
         driver loaded?); it will be detached when it does, or at the next stop"
    )]
    DetachTimeout { disk: String, secs: u64 },
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;
pub type AgentFuture<'a, T> = Pin<Box<dyn Future<Output = AgentResult<T>> + Send + 'a>>;
/// Progress of a long storage task, 0..=100 (called on the agent's side).
pub type ProgressFn = Arc<dyn Fn(u8) + Send + Sync>;

/// What the control plane may ask of a node.
pub trait NodeAgent: Send + Sync {
    /// Runs the VM (a no-op when its VMM already runs). Returns once the
    /// VMM accepted the boot; the observation says when the guest is up.
    fn start(&self, spec: VmSpec) -> AgentFuture<'_, ()>;
    /// The ACPI power button, then after the stop timeout (or at once with
    /// `force`) the VMM is told to quit, or killed. Returns once it ended.
    fn stop(&self, vm: String, force: bool) -> AgentFuture<'_, ()>;
    fn action(&self, vm: String, action: VmAction) -> AgentFuture<'_, ()>;
    /// Live vCPU and memory resize, within the room the VMM was given.
    fn resize(&self, vm: String, vcpus: u8, memory_mib: u64) -> AgentFuture<'_, ()>;
    fn attach_disk(&self, vm: String, disk: DiskSpec) -> AgentFuture<'_, ()>;
    /// Hot-unplug: returns once the guest let go of the disk.
    fn detach_disk(&self, vm: String, disk: String) -> AgentFuture<'_, ()>;
    fn resize_disk(&self, vm: String, disk: String, size: u64) -> AgentFuture<'_, ()>;

    /// What the VM's VMM is doing now.
    fn observed(&self, vm: &str) -> VmObserved;
    /// Every VM this node has a VMM (or the end of one) for.
    fn observed_all(&self) -> Vec<VmObserved>;
    /// Moves whenever an observation changes: wait on it, do not poll.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Event log lines from VMMs and from the agent, in order (bounded; the
    /// control plane takes them once).
    fn take_events(&self) -> Vec<AgentEvent>;
    fn node_status(&self) -> NodeStatus;

    /// A system disk: a thin copy of the image, grown to `size`.
    fn create_system_disk(
        &self,
        image: String,
        disk: String,
        size: u64,
        progress: ProgressFn,
    ) -> AgentFuture<'_, ()>;
    /// A blank (sparse) disk of `size` bytes; an existing one is kept and
    /// set to that size.
    fn create_blank_disk(&self, disk: String, size: u64) -> AgentFuture<'_, ()>;
    fn grow_disk(&self, disk: String, size: u64) -> AgentFuture<'_, ()>;
    fn clone_disk(&self, from: String, to: String, progress: ProgressFn) -> AgentFuture<'_, ()>;
    fn remove_disk(&self, disk: &str);
    /// Whether the disk's file exists.
    fn disk_exists(&self, disk: &str) -> bool;
    /// Bytes the disk occupies on the host.
    fn disk_allocated(&self, disk: &str) -> u64;
    /// Writes the VM's cloud-init seed.
    fn write_seed(&self, vm: String, seed: SeedSpec) -> AgentFuture<'_, ()>;
    /// Removes the VM's files (its VMM must have ended).
    fn remove_vm_files(&self, vm: &str);
    /// An image became ready: a spare system disk is prepared for it.
    fn image_ready(&self, image: &str);
    fn image_removed(&self, image: &str);

    /// The last `len` bytes the guest wrote to its serial console.
    fn serial_tail(&self, vm: &str, len: u64) -> Vec<u8>;
    /// An interactive console: the serial output from `backlog` bytes
    /// before its end, and a way to type.
    fn console(&self, vm: &str, backlog: u64) -> ConsoleStream;
}
