//! Device models for keel-vmm.
//!
//! Devices know nothing of the VM lifecycle: they see register accesses
//! through [`BusDevice`], raise interrupts through an [`interrupt::Interrupt`]
//! and report machine-level requests (power off, reset, panic) through a
//! [`PlatformEvents`] sink owned by the VMM.

pub mod acpi_ged;
pub mod acpi_pm;
pub mod acpi_slots;
pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod virtio;
pub mod vm_link;

pub use bus::{Bus, BusDevice, BusError};

/// Guest RAM as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// A machine-level request a device makes on the guest's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest asked to be switched off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse).
    Reset,
    /// The guest's kernel reported a panic (pvpanic).
    GuestPanic,
    /// The guest released the device in this PCI slot (ACPI `_EJ0`).
    PciEject(u8),
    /// The guest took this CPU offline and ejected it (ACPI `_EJ0`).
    CpuEject(u8),
}

/// Receives [`PlatformEvent`]s; the VMM decides what they mean.
pub trait PlatformEvents: Send + Sync {
    fn notify(&self, event: PlatformEvent);
}
