//! MSI-X: the vector table and pending-bit array a function exposes in a
//! BAR, and delivery of its vectors through KVM irqfds.
//!
//! Each vector owns a GSI whose route follows what the guest programs in
//! the table. Masking is checked here, in userspace, at trigger time: a
//! masked vector sets its pending bit instead, and fires when unmasked.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::vm_link::{MsiMessage, VmLink};

pub const ENTRY_SIZE: u64 = 16;
/// Most vectors one function may have (the PCI limit).
pub const MAX_VECTORS: u16 = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

impl Default for MsixState {
    fn default() -> Self {
        MsixState {
            version: 1,
            table: Vec::new(),
            pba: Vec::new(),
            enabled: false,
            function_masked: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub version: u32,
    pub table: Vec<MsixEntry>,
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

pub struct Msix {
    table: Vec<MsixEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Vector>,
    link: Arc<dyn VmLink>,
}

impl Msix {
    /// `count` vectors, each with its own GSI and irqfd registered now.
    pub fn new(count: u16, link: Arc<dyn VmLink>) -> io::Result<Self> {
        let count = count.clamp(1, MAX_VECTORS);
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = link.allocate_gsi()?;
            let irqfd = EventFd::new(EFD_NONBLOCK)?;
            link.add_irqfd(gsi, &irqfd)?;
            vectors.push(Vector { gsi, irqfd });
        }
        let mut msix = Msix {
            table: Vec::new(),
            pba: Vec::new(),
            enabled: false,
            function_masked: false,
            vectors,
            link,
        };
        msix.reset();
        Ok(msix)
    }

    pub fn count(&self) -> u16 {
        self.vectors.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        u64::from(self.count()) * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        u64::from(self.count()).div_ceil(64) * 8
    }

    /// Power-on state: disabled, every vector masked, nothing pending.
    pub fn reset(&mut self) {
        let n = self.vectors.len();
        self.table = vec![
            MsixEntry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
            n
        ];
        self.pba = vec![0; n.div_ceil(64)];
        self.enabled = false;
        self.function_masked = false;
        for v in &self.vectors {
            if let Err(e) = self.link.set_msi_route(v.gsi, None) {
                log::warn!("Cannot clear MSI route {}: {e}", v.gsi);
            }
        }
    }

    /// The message-control bits the guest may write, as the capability
    /// holds them (enable, function mask).
    pub fn control_bits(&self) -> u16 {
        (if self.enabled { CONTROL_ENABLE } else { 0 })
            | (if self.function_masked {
                CONTROL_FUNCTION_MASK
            } else {
                0
            })
    }

    /// The guest wrote the message-control register.
    pub fn set_control(&mut self, control: u16) {
        let was_live = self.live();
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if !was_live && self.live() {
            for i in 0..self.table.len() {
                self.refresh(i);
            }
        }
    }

    fn live(&self) -> bool {
        self.enabled && !self.function_masked
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = self.table[index];
        let fields = [e.address_lo, e.address_hi, e.data, e.control];
        let value = if data.len() == 8 {
            u64::from(fields[field]) | u64::from(fields[field + 1]) << 32
        } else {
            u64::from(fields[field])
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let was_masked = self.table[index].masked();
        let entry = &mut self.table[index];
        let mut set = |field: usize, v: u32| match field {
            0 => entry.address_lo = v,
            1 => entry.address_hi = v,
            2 => entry.data = v,
            _ => entry.control = v & VECTOR_MASKED,
        };
        set(field, value as u32);
        if data.len() == 8 {
            set(field + 1, (value >> 32) as u32);
        }
        let masked = self.table[index].masked();
        if !masked && (was_masked || field < 3) {
            self.refresh(index);
        }
    }

    /// Table entry and dword field for an access: 4- or 8-byte aligned
    /// accesses only, as the PCI spec requires; others are dropped.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let index = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (index < self.table.len()).then_some((index, (offset % ENTRY_SIZE / 4) as usize))
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let mut bytes = Vec::with_capacity(self.pba.len() * 8);
        for word in &self.pba {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        crate::virtio::read_config_bytes(&bytes, offset, data);
    }

    /// Re-points the vector's route and delivers a pending interrupt.
    fn refresh(&mut self, index: usize) {
        if self.table[index].masked() {
            return;
        }
        let msg = self.table[index].message();
        if let Err(e) = self.link.set_msi_route(self.vectors[index].gsi, Some(msg)) {
            log::warn!("Cannot route MSI-X vector {index}: {e}");
        }
        if self.live() && self.take_pending(index) {
            let _ = self.vectors[index].irqfd.write(1);
        }
    }

    fn take_pending(&mut self, index: usize) -> bool {
        let (word, bit) = (index / 64, index % 64);
        let pending = self.pba[word] & (1 << bit) != 0;
        self.pba[word] &= !(1 << bit);
        pending
    }

    /// Lets go of every vector's irqfd and route (hot-unplug). The
    /// function is disabled; triggers do nothing from now on.
    pub fn release(&mut self) {
        self.enabled = false;
        for v in &self.vectors {
            if let Err(e) = self.link.remove_irqfd(v.gsi, &v.irqfd) {
                log::warn!("Cannot remove the irqfd of GSI {}: {e}", v.gsi);
            }
        }
    }

    /// Raises vector `index`. Out-of-range vectors are ignored; a masked
    /// vector becomes pending. Returns whether the interrupt was sent.
    pub fn trigger(&mut self, index: u16) -> io::Result<bool> {
        let i = usize::from(index);
        if i >= self.table.len() || !self.enabled {
            return Ok(false);
        }
        if self.function_masked || self.table[i].masked() {
            self.pba[i / 64] |= 1 << (i % 64);
            return Ok(false);
        }
        self.vectors[i].irqfd.write(1)?;
        Ok(true)
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            version: 1,
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Records what a device asked of the hypervisor.
    #[derive(Default)]
    pub struct FakeLink {
        next_gsi: AtomicU32,
        pub routes: Mutex<BTreeMap<u32, Option<MsiMessage>>>,
        pub irqfds: Mutex<BTreeMap<u32, EventFd>>,
        pub ioevents: Mutex<Vec<u64>>,
    }

    impl VmLink for FakeLink {
        fn allocate_gsi(&self) -> io::Result<u32> {
            Ok(24 + self.next_gsi.fetch_add(1, Ordering::SeqCst))
        }
        fn add_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
            self.irqfds.lock().unwrap().insert(gsi, fd.try_clone()?);
            Ok(())
        }
        fn remove_irqfd(&self, gsi: u32, _fd: &EventFd) -> io::Result<()> {
            self.irqfds.lock().unwrap().remove(&gsi);
            self.routes.lock().unwrap().remove(&gsi);
            Ok(())
        }
        fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, msg);
            Ok(())
        }
        fn add_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().push(addr);
            Ok(())
        }
        fn remove_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut v = self.ioevents.lock().unwrap();
            if let Some(p) = v.iter().position(|a| *a == addr) {
                v.remove(p);
            }
            Ok(())
        }
    }

    impl FakeLink {
        pub fn fired(&self, gsi: u32) -> bool {
            self.irqfds.lock().unwrap()[&gsi].read().is_ok()
        }
    }

    fn w32(m: &mut Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    #[test]
    fn program_unmask_and_fire() {
        let link = Arc::new(FakeLink::default());
        let mut m = Msix::new(2, link.clone()).unwrap();
        assert_eq!(m.table_size(), 32);
        assert!(!m.trigger(0).unwrap(), "disabled");
        m.set_control(CONTROL_ENABLE);
        w32(&mut m, 0, 0xfee0_0000);
        w32(&mut m, 8, 0x41);
        assert!(!m.trigger(0).unwrap(), "still masked");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        // Unmasking routes the vector and delivers the pending interrupt.
        w32(&mut m, 12, 0);
        assert_eq!(
            link.routes.lock().unwrap()[&24],
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        assert!(link.fired(24));
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(m.trigger(0).unwrap());
        // Function mask holds everything back.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(!m.trigger(0).unwrap());
        m.set_control(CONTROL_ENABLE);
        assert!(link.fired(24));
        assert!(!m.trigger(7).unwrap(), "no such vector");
    }

    #[test]
    fn odd_accesses_are_dropped() {
        let link = Arc::new(FakeLink::default());
        let mut m = Msix::new(1, link).unwrap();
        m.write_table(1, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        m.write_table(16, &[0; 4]);
        m.write_table(u64::MAX - 3, &[0; 4]);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "still masked");
        let mut q = [0u8; 8];
        m.read_table(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 32);
    }
}
