//! The hypervisor side of [`keel_devices::vm_link::VmLink`]: GSI routes,
//! irqfds and ioeventfds, kept as standing orders and applied to whichever
//! KVM VM is current (a guest reset builds a new one).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_devices::vm_link::{MsiMessage, VmLink};
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; GSIs above them are free for MSI routes.
const IOAPIC_PINS: u32 = 24;
/// KVM's routing table limit (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4095;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("Cannot register irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot register the doorbell at {addr:#x}")]
    Ioevent {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_GSI_ROUTING failed")]
    Routing(#[source] kvm_ioctls::Error),
}

impl From<LinkError> for io::Error {
    fn from(e: LinkError) -> Self {
        io::Error::other(e)
    }
}

#[derive(Default)]
struct Inner {
    vm: Option<Arc<VmFd>>,
    next_gsi: u32,
    /// Legacy lines wired at device creation (COM1's IRQ 4 …).
    irqfds: Vec<(u32, EventFd)>,
    routes: BTreeMap<u32, MsiMessage>,
    ioevents: Vec<(u64, EventFd)>,
}

#[derive(Default)]
pub struct KvmLink {
    inner: Mutex<Inner>,
}

impl KvmLink {
    pub fn new() -> Self {
        KvmLink {
            inner: Mutex::new(Inner {
                next_gsi: IOAPIC_PINS,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies every standing registration to a newly created VM. MSI
    /// routes start empty: the devices were reset with the machine, and the
    /// guest programs its vectors again.
    pub fn attach(&self, vm: Arc<VmFd>) -> Result<(), LinkError> {
        let mut inner = self.lock();
        inner.routes.clear();
        for (gsi, fd) in &inner.irqfds {
            vm.register_irqfd(fd, *gsi)
                .map_err(|source| LinkError::Irqfd { gsi: *gsi, source })?;
        }
        for (addr, fd) in &inner.ioevents {
            vm.register_ioevent(fd, &IoEventAddress::Mmio(*addr), NoDatamatch)
                .map_err(|source| LinkError::Ioevent {
                    addr: *addr,
                    source,
                })?;
        }
        set_routing(&vm, &inner.routes)?;
        inner.vm = Some(vm);
        Ok(())
    }

    /// Lets go of the VM (it is being torn down).
    pub fn detach(&self) {
        self.lock().vm = None;
    }
}

/// The whole routing table: the legacy pins as KVM sets them up by default
/// (PIC for GSIs 0–15, IOAPIC for 0–23), then one entry per MSI route.
fn set_routing(vm: &VmFd, routes: &BTreeMap<u32, MsiMessage>) -> Result<(), LinkError> {
    let mut entries = Vec::with_capacity(40 + routes.len());
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (gsi, msg) in routes {
        let mut e = kvm_irq_routing_entry {
            gsi: *gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.address as u32;
        e.u.msi.address_hi = (msg.address >> 32) as u32;
        e.u.msi.data = msg.data;
        entries.push(e);
    }
    let routing = KvmIrqRouting::from_entries(&entries)
        .map_err(|_| LinkError::Routing(kvm_ioctls::Error::new(libc::E2BIG)))?;
    vm.set_gsi_routing(&routing).map_err(LinkError::Routing)
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

impl VmLink for KvmLink {
    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut inner = self.lock();
        if inner.next_gsi > MAX_GSI {
            return Err(io::Error::other("all GSIs are in use"));
        }
        let gsi = inner.next_gsi;
        inner.next_gsi += 1;
        Ok(gsi)
    }

    fn add_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(vm) = &inner.vm {
            vm.register_irqfd(fd, gsi)
                .map_err(|source| LinkError::Irqfd { gsi, source })?;
        }
        inner.irqfds.push((gsi, fd.try_clone()?));
        Ok(())
    }

    fn remove_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(vm) = &inner.vm {
            vm.unregister_irqfd(fd, gsi)
                .map_err(|source| LinkError::Irqfd { gsi, source })?;
        }
        inner.irqfds.retain(|(g, _)| *g != gsi);
        if inner.routes.remove(&gsi).is_some()
            && let Some(vm) = &inner.vm
        {
            set_routing(vm, &inner.routes)?;
        }
        Ok(())
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut inner = self.lock();
        let changed = match msg {
            Some(m) => inner.routes.insert(gsi, m) != Some(m),
            None => inner.routes.remove(&gsi).is_some(),
        };
        if changed && let Some(vm) = &inner.vm {
            set_routing(vm, &inner.routes)?;
        }
        Ok(())
    }

    fn add_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(vm) = &inner.vm {
            vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| LinkError::Ioevent { addr, source })?;
        }
        inner.ioevents.push((addr, fd.try_clone()?));
        Ok(())
    }

    fn remove_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(vm) = &inner.vm {
            vm.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| LinkError::Ioevent { addr, source })?;
        }
        // One doorbell per address: KVM refuses a second one there anyway.
        inner.ioevents.retain(|(a, _)| *a != addr);
        Ok(())
    }
}
