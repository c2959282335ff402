//! Virtio devices, independent of how the guest reaches them.
//!
//! A device implements [`VirtioDevice`]: it advertises features, a config
//! space and its queues, and is handed live queues on activation. It knows
//! nothing of PCI: the transport ([`pci`]) owns the registers the guest
//! programs, the notification eventfds and the interrupt vectors, so an MMIO
//! transport or a vhost-user backend could host the same device.

pub mod block;
pub mod chain;
pub mod console;
pub mod interrupt_watch;
pub mod net;
pub mod pci;
pub mod queue_state;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use queue_state::QueueStateSer;
pub use worker::{QueueWorker, WorkerError, WorkerHandle};

use crate::GuestMemory;

/// Device types (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// Feature bits every device shares (virtio 1.2 §6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const ACCESS_PLATFORM: u64 = 1 << 33;

    /// What every Keel device offers on top of its own features.
    pub const COMMON: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// How a device tells the driver that something happened. The transport
/// decides what that means (an MSI-X vector, the ISR register).
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue`.
    fn signal_queue(&self, queue: u16) -> io::Result<()>;
    /// The device's configuration space changed.
    fn signal_config(&self) -> io::Result<()>;
    /// The device hit an error it cannot recover from without a reset
    /// (a malformed ring, a worker that panicked): sets DEVICE_NEEDS_RESET
    /// and tells the driver.
    fn set_needs_reset(&self);
}

/// A queue the driver has set up and enabled, with the eventfd the driver's
/// notifications arrive on.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub memory: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("The driver enabled queue set {enabled:?}, the device needs {needed}")]
    Queues { enabled: Vec<u16>, needed: String },
    #[error("Cannot start the {device} worker thread")]
    Worker {
        device: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {message}")]
    Backend {
        device: &'static str,
        message: String,
    },
}

pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// A short name for logs and errors ("virtio-blk").
    fn name(&self) -> &'static str;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Every feature the device offers, [`features::COMMON`] included.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Reads past its end
    /// see zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; most devices ignore this.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues (the driver set DRIVER_OK).
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them (the driver wrote status 0
    /// or the VM was reset). The device can be activated again.
    fn reset(&mut self);
    /// The device's own state, versioned, for snapshots and migration.
    fn state(&self) -> serde_json::Value;
    /// Grows the device's backing store to `bytes` (`vm.resize-disk`) and
    /// updates its configuration space; the transport then tells the
    /// driver its configuration changed.
    fn resize(&mut self, _bytes: u64) -> Result<(), String> {
        Err(format!("{} cannot be resized", self.name()))
    }
    /// Live statistics by name, for the API's `vm.counters`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Reads `data.len()` bytes at `offset` from a device's config bytes,
/// zero-filling whatever lies past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut b = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 4, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
