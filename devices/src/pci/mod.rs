//! PCI: one root bus (segment 0, bus 0) behind a host bridge, reached
//! through the legacy 0xCF8/0xCFC ports and ECAM, with memory BARs placed
//! on the MMIO bus and MSI-X for interrupts. No INTx: every Keel device
//! interrupts through MSI-X.

pub mod config;
pub mod hotplug;
pub mod msix;
pub mod root;

use std::sync::{Arc, Mutex};

pub use config::{Bar, BarMove, PciConfig, PciIdentity};
pub use root::{ConfigIo, ConfigMmio, PciError, PciSegment};

/// A PCI function as the root bus sees it.
pub trait PciDevice: Send {
    /// Reads configuration space at byte `offset` (0..4096).
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space; returns the BAR move the write caused.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove>;
    /// Register access at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The memory BARs and where they are now.
    fn bars(&self) -> Vec<(usize, Bar)>;
    /// The bus moved BAR `bar` from `old` to `new` (doorbells follow).
    fn bar_moved(&mut self, _bar: usize, _old: u64, _new: u64) {}
    /// Power-on state (the machine was reset); returns BARs to move back.
    fn reset(&mut self) -> Vec<BarMove>;
    /// Versioned state for snapshots.
    fn state(&self) -> serde_json::Value;
    /// The device is leaving the bus (hot-unplug): stop it and let go of
    /// its doorbells and interrupt routes.
    fn unplug(&mut self) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;
