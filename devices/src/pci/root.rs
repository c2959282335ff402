//! The root bus: 32 slots (function 0 only), the host bridge in slot 0,
//! and the two ways to reach configuration space.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::config::{CONFIG_SPACE_SIZE, PciConfig, PciIdentity};
use super::{Bar, BarMove, PciDevice, SharedPciDevice};
use crate::bus::{Bus, BusDevice, BusError, lock};

pub const NUM_SLOTS: usize = 32;
/// ECAM gives each function 4 KiB; bus 0 needs 1 MiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;

#[derive(Debug, Error)]
pub enum PciError {
    #[error("All {NUM_SLOTS} PCI slots are in use")]
    NoFreeSlot,
    #[error("Cannot map BAR {bar} of slot {slot} at {addr:#x}")]
    MapBar {
        slot: usize,
        bar: usize,
        addr: u64,
        #[source]
        source: BusError,
    },
}

/// A BAR's window on the MMIO bus.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// Slot 0: the host bridge, configuration space only.
struct HostBridge {
    config: PciConfig,
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        self.config.write(offset, data)
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn bars(&self) -> Vec<(usize, Bar)> {
        Vec::new()
    }
    fn reset(&mut self) -> Vec<BarMove> {
        self.config.reset()
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.config.state()).unwrap_or_default()
    }
}

pub struct PciSegment {
    slots: Vec<Option<SharedPciDevice>>,
    mmio: Arc<Bus>,
}

impl PciSegment {
    pub fn new(mmio: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; NUM_SLOTS];
        let bridge = HostBridge {
            config: PciConfig::new(PciIdentity {
                // Red Hat's PCIe host bridge ID: no OS applies quirks to it.
                vendor_id: 0x1b36,
                device_id: 0x0008,
                revision: 0,
                class_code: 0x06_00_00,
                subsystem_vendor_id: 0x1b36,
                subsystem_id: 0,
            }),
        };
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        PciSegment { slots, mmio }
    }

    /// Puts `device` in the first free slot and its BARs on the MMIO bus.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<usize, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        let bars = lock(&device).bars();
        for (i, (bar, b)) in bars.iter().enumerate() {
            let region = BarRegion {
                device: device.clone(),
                bar: *bar,
            };
            if let Err(source) = self
                .mmio
                .insert(Arc::new(Mutex::new(region)), b.addr, b.size)
            {
                for (_, placed) in &bars[..i] {
                    self.mmio.remove(placed.addr);
                }
                return Err(PciError::MapBar {
                    slot,
                    bar: *bar,
                    addr: b.addr,
                    source,
                });
            }
        }
        self.slots[slot] = Some(device);
        Ok(slot)
    }

    /// Takes the device out of `slot` (hot-unplug): its BARs leave the
    /// MMIO bus and it is stopped. Slot 0, the host bridge, stays.
    pub fn remove(&mut self, slot: usize) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        let device = self.slots.get_mut(slot)?.take()?;
        let mut locked = lock(&device);
        for (_, bar) in locked.bars() {
            self.mmio.remove(bar.addr);
        }
        locked.unplug();
        drop(locked);
        Some(device)
    }

    /// Takes every function off the bus (the VM is gone for good): each is
    /// stopped and dropped here, unless someone else still holds it.
    pub fn clear(&mut self) {
        for slot in 1..self.slots.len() {
            self.remove(slot);
        }
    }

    /// Whether `slot` holds a device.
    pub fn occupied(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(Option::is_some)
    }

    fn device(&self, slot: usize, function: usize) -> Option<SharedPciDevice> {
        if function != 0 {
            return None;
        }
        self.slots.get(slot)?.clone()
    }

    pub fn read(&self, slot: usize, function: usize, offset: usize, data: &mut [u8]) {
        match self.device(slot, function) {
            Some(device) => lock(&device).read_config(offset, data),
            // No function here: reads float high.
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, slot: usize, function: usize, offset: usize, data: &[u8]) {
        let Some(device) = self.device(slot, function) else {
            return;
        };
        // The device lock is released before the bus moves: a vCPU in the
        // middle of a BAR access takes the bus lock, then the device lock.
        let moved = lock(&device).write_config(offset, data);
        if let Some(m) = moved {
            self.apply_move(&device, slot, m);
        }
    }

    fn apply_move(&self, device: &SharedPciDevice, slot: usize, m: BarMove) {
        match self.mmio.relocate(m.old, m.new) {
            Ok(()) => lock(device).bar_moved(m.bar, m.old, m.new),
            Err(e) => log::warn!(
                "PCI slot {slot}: guest moved BAR {} from {:#x} to {:#x}, which cannot be mapped ({e}); \
                 accesses at the new address go nowhere",
                m.bar,
                m.old,
                m.new
            ),
        }
    }

    /// Machine reset: every function back to its power-on state and BARs
    /// back where the VMM placed them.
    pub fn reset(&self) {
        for (slot, device) in self.slots.iter().enumerate() {
            let Some(device) = device else { continue };
            let moves = lock(device).reset();
            for m in moves {
                self.apply_move(device, slot, m);
            }
        }
    }
}

/// The legacy configuration mechanism: an address register at 0xCF8 and a
/// data window at 0xCFC–0xCFF.
pub struct ConfigIo {
    segment: Arc<Mutex<PciSegment>>,
    address: u32,
}

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

impl ConfigIo {
    pub fn new(segment: Arc<Mutex<PciSegment>>) -> Self {
        ConfigIo {
            segment,
            address: 0,
        }
    }

    /// (slot, function, register offset) the address register selects,
    /// if it selects bus 0 with the enable bit set.
    fn target(&self, data_offset: u64) -> Option<(usize, usize, usize)> {
        let a = self.address;
        if a & CONFIG_ADDRESS_ENABLE == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let slot = (a >> 11 & 0x1f) as usize;
        let function = (a >> 8 & 0x7) as usize;
        let offset = (a & 0xfc) as usize + data_offset as usize;
        Some((slot, function, offset))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match self.target(offset - 4) {
            Some((slot, function, reg)) if (offset - 4) as usize + data.len() <= 4 => {
                lock(&self.segment).read(slot, function, reg, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only full-width writes reach the address register; byte
            // writes to 0xCF9 (the PC reset control) are ignored.
            if offset == 0 && data.len() == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        if let Some((slot, function, reg)) = self.target(offset - 4)
            && (offset - 4) as usize + data.len() <= 4
        {
            lock(&self.segment).write(slot, function, reg, data);
        }
    }
}

/// ECAM (PCIe enhanced configuration access) for bus 0: 4 KiB per function.
pub struct ConfigMmio {
    segment: Arc<Mutex<PciSegment>>,
}

impl ConfigMmio {
    pub fn new(segment: Arc<Mutex<PciSegment>>) -> Self {
        ConfigMmio { segment }
    }

    fn target(offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        let reg = (offset & 0xfff) as usize;
        // One access stays inside one dword, as PCIe requires.
        if reg % 4 + len > 4 || offset >= ECAM_BUS_SIZE {
            return None;
        }
        Some((
            (offset >> 15 & 0x1f) as usize,
            (offset >> 12 & 0x7) as usize,
            reg,
        ))
    }
}

impl BusDevice for ConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((slot, function, reg)) if reg >= CONFIG_SPACE_SIZE => {
                // Extended space of a present function: no capabilities.
                if lock(&self.segment).device(slot, function).is_some() {
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
            }
            Some((slot, function, reg)) => lock(&self.segment).read(slot, function, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((slot, function, reg)) = Self::target(offset, data.len())
            && reg < CONFIG_SPACE_SIZE
        {
            lock(&self.segment).write(slot, function, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy {
        config: PciConfig,
        bar_writes: Vec<(u64, u8)>,
        moved_to: Option<u64>,
    }

    impl PciDevice for Dummy {
        fn read_config(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
            self.config.write(offset, data)
        }
        fn read_bar(&mut self, _: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, _: usize, offset: u64, data: &[u8]) {
            self.bar_writes.push((offset, data[0]));
        }
        fn bars(&self) -> Vec<(usize, Bar)> {
            self.config.bars().collect()
        }
        fn bar_moved(&mut self, _: usize, _: u64, new: u64) {
            self.moved_to = Some(new);
        }
        fn reset(&mut self) -> Vec<BarMove> {
            self.config.reset()
        }
        fn state(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<PciSegment>>, Arc<Mutex<Dummy>>) {
        let mmio = Arc::new(Bus::new());
        let segment = Arc::new(Mutex::new(PciSegment::new(mmio.clone())));
        let mut config = PciConfig::new(PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class_code: 0xff0000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        config
            .add_memory_bar(0, 0xc000_0000, 0x1000, false, false)
            .unwrap();
        let dummy = Arc::new(Mutex::new(Dummy {
            config,
            bar_writes: Vec::new(),
            moved_to: None,
        }));
        let slot = segment.lock().unwrap().add(dummy.clone()).unwrap();
        assert_eq!(slot, 1);
        (mmio, segment, dummy)
    }

    fn cf8(io: &mut ConfigIo, slot: u32, reg: u32) {
        io.write(0, &(CONFIG_ADDRESS_ENABLE | slot << 11 | reg).to_le_bytes());
    }

    #[test]
    fn config_through_ports_and_ecam_agree() {
        let (_mmio, segment, _) = setup();
        let mut io = ConfigIo::new(segment.clone());
        let mut ecam = ConfigMmio::new(segment);
        let mut a = [0u8; 4];
        cf8(&mut io, 1, 0);
        io.read(4, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x1044_1af4);
        let mut b = [0u8; 4];
        ecam.read(1 << 15, &mut b);
        assert_eq!(a, b);
        // Host bridge in slot 0, nothing in slot 2 or function 1.
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        ecam.read(2 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(1 << 15 | 1 << 12, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Byte read of the device ID's high byte through 0xCFF.
        let mut one = [0u8; 1];
        io.read(7, &mut one);
        assert_eq!(one[0], 0x10);
        // Disabled address register: nothing there.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut a);
        assert_eq!(a, [0xff; 4]);
    }

    #[test]
    fn bars_are_mapped_and_follow_the_guest() {
        let (mmio, segment, dummy) = setup();
        let mut b = [0u8; 1];
        assert!(mmio.read(0xc000_0010, &mut b));
        assert_eq!(b[0], 0x10);
        let mut ecam = ConfigMmio::new(segment.clone());
        ecam.write(1 << 15 | 0x10, &0xd000_0000u32.to_le_bytes());
        assert!(!mmio.read(0xc000_0010, &mut b));
        assert!(mmio.read(0xd000_0010, &mut b));
        assert_eq!(dummy.lock().unwrap().moved_to, Some(0xd000_0000));
        segment.lock().unwrap().reset();
        assert!(mmio.read(0xc000_0010, &mut b));
        assert!(mmio.write(0xc000_0004, &[7]));
        assert_eq!(dummy.lock().unwrap().bar_writes, vec![(4, 7)]);
    }

    #[test]
    fn hostile_config_accesses() {
        let (mmio, segment, _) = setup();
        let mut ecam = ConfigMmio::new(segment.clone());
        let mut io = ConfigIo::new(segment);
        for off in (0..(4u64 << 15)).step_by(61) {
            ecam.write(off, &[0xff, 0xff]);
            ecam.write(off, &[0xa5; 4]);
            let mut d = [0u8; 8];
            ecam.read(off, &mut d);
        }
        for addr in [u32::MAX, 0x8000_0000, 0x80ff_ffff, 0x8000_08fc] {
            io.write(0, &addr.to_le_bytes());
            io.write(5, &[0xff; 2]);
            io.write(6, &[0xff; 4]);
            let mut d = [0u8; 4];
            io.read(4, &mut d);
        }
        // The BAR got moved to garbage or stayed; the bus still works.
        let mut b = [0u8; 1];
        let _ = mmio.read(0xc000_0000, &mut b);
    }
}
