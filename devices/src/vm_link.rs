//! What devices ask of the hypervisor: interrupt routes and doorbells.
//!
//! Devices outlive any one KVM VM (a guest reset builds a new one), so
//! these registrations are standing orders: the VMM applies them to the
//! current VM and again to every VM built after a reset.

use std::io;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

pub trait VmLink: Send + Sync {
    /// A fresh GSI for an MSI route.
    fn allocate_gsi(&self) -> io::Result<u32>;
    /// Writing `fd` raises `gsi` (KVM irqfd).
    fn add_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
    /// Undoes [`add_irqfd`](Self::add_irqfd) and drops `gsi`'s route (the
    /// device is unplugged).
    fn remove_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
    /// Points `gsi` at `msg`, or at nothing.
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
    /// A guest write of any value and width to `addr` signals `fd` inside
    /// KVM, without an exit to the VMM (KVM ioeventfd).
    fn add_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    fn remove_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}
