//! Edge-triggered interrupt lines backed by an eventfd that the VMM wires to
//! a KVM irqfd, so raising an interrupt never leaves the calling thread.

use std::io;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub struct Interrupt {
    event: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Interrupt {
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Interrupt {
            event: self.event.try_clone()?,
        })
    }
}

impl vm_superio::Trigger for Interrupt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        Interrupt::trigger(self)
    }
}
