//! A type-0 PCI configuration space: the 256-byte header with per-bit write
//! masks, BARs with sizing and relocation, and a capability list.
//!
//! The guest may write anything anywhere; the masks decide what sticks, so
//! read-only identity registers stay what the device says they are.

use serde::{Deserialize, Serialize};

/// Bytes of conventional configuration space (ECAM exposes 4 KiB; the rest
/// reads as zero, which means "no extended capabilities").
pub const CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_POINTER: usize = 0x34;
const FIRST_CAPABILITY: usize = 0x40;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u32 = 1 << 20;

const BAR_MEM_64BIT: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// PCI capability IDs.
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

/// The identity of a function, fixed at creation.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class, subclass and programming interface.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
    /// Where the VMM placed it; a reset puts it back here.
    pub initial_addr: u64,
}

/// A BAR the guest moved to a new address; the bus must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is out of range or already used")]
    BarUnavailable(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment { addr: u64, size: u64 },
    #[error("No room for a {0}-byte capability in configuration space")]
    CapabilitySpace(usize),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PciConfigState {
    pub version: u32,
    pub regs: Vec<u32>,
    pub bars: Vec<Option<Bar>>,
}

pub struct PciConfig {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    initial: [u32; NUM_REGS],
    bars: [Option<Bar>; NUM_BARS],
    /// Where the next capability goes, and the offset of the last one.
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfig {
    pub fn new(id: PciIdentity) -> Self {
        let mut c = PciConfig {
            regs: [0; NUM_REGS],
            writable: [0; NUM_REGS],
            initial: [0; NUM_REGS],
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        c.regs[0] = u32::from(id.device_id) << 16 | u32::from(id.vendor_id);
        c.regs[2] = id.class_code << 8 | u32::from(id.revision);
        c.regs[11] = u32::from(id.subsystem_id) << 16 | u32::from(id.subsystem_vendor_id);
        // Command: memory decoding, bus mastering, INTx disable are the
        // driver's to set. Status bits are read-only here.
        c.writable[COMMAND_REG] =
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        // Cache line size and latency timer are scratch registers.
        c.writable[3] = 0x0000_ffff;
        // Interrupt line is scratch for the OS; interrupt pin 0 = no INTx.
        c.writable[15] = 0x0000_00ff;
        c.initial = c.regs;
        c
    }

    /// Adds a memory BAR of `size` bytes at `addr` (already allocated).
    pub fn add_memory_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        is_64bit: bool,
        prefetchable: bool,
    ) -> Result<(), ConfigError> {
        let slots = if is_64bit { 2 } else { 1 };
        if index + slots > NUM_BARS
            || self.bars[index].is_some()
            || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit))
            || (is_64bit && self.bars[index + 1].is_some())
        {
            return Err(ConfigError::BarUnavailable(index));
        }
        if size < 16 || !size.is_power_of_two() || (!is_64bit && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        if !addr.is_multiple_of(size) || (!is_64bit && addr + size > 1 << 32) {
            return Err(ConfigError::BarAlignment { addr, size });
        }
        let flags = if is_64bit { BAR_MEM_64BIT } else { 0 }
            | if prefetchable { BAR_PREFETCHABLE } else { 0 };
        let mask = !(size - 1);
        self.regs[BAR0_REG + index] = (addr as u32 & 0xffff_fff0) | flags;
        self.writable[BAR0_REG + index] = mask as u32 & 0xffff_fff0;
        if is_64bit {
            self.regs[BAR0_REG + index + 1] = (addr >> 32) as u32;
            self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar {
            addr,
            size,
            is_64bit,
            prefetchable,
            initial_addr: addr,
        });
        self.initial = self.regs;
        Ok(())
    }

    /// Appends a capability. `body` starts after the ID and next-pointer
    /// bytes; `writable` gives per-byte write masks for the body (missing
    /// bytes are read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_capability;
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.set_byte(offset, id, 0);
        self.set_byte(offset + 1, 0, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b, writable.get(i).copied().unwrap_or(0));
        }
        match self.last_capability {
            Some(last) => self.set_byte(last + 1, offset as u8, 0),
            None => {
                self.set_byte(CAPABILITY_POINTER, offset as u8, 0);
                self.regs[1] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        self.initial = self.regs;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8, writable: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
        self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(writable) << shift;
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at byte `offset` (any width, any alignment
    /// inside one register; beyond the header reads as zero).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i);
            *b = (self.read_reg(o / 4) >> ((o % 4) * 8)) as u8;
        }
    }

    /// Writes `data` at byte `offset` through the write masks. Returns the
    /// BAR move this write caused, if any.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        if data.is_empty() || offset >= CONFIG_SPACE_SIZE {
            return None;
        }
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        if shift + data.len() * 8 > 32 {
            // Accesses never straddle registers on real buses.
            return None;
        }
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (i * 8);
        }
        let byte_mask = if data.len() >= 4 {
            u32::MAX
        } else {
            ((1u32 << (data.len() * 8)) - 1) << shift
        };
        let value = value << shift;
        let mask = byte_mask & self.writable[reg];
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self.bar_written(reg - BAR0_REG, value | !byte_mask == u32::MAX);
        }
        None
    }

    /// After a write to BAR register `index`: follow the guest's new address
    /// unless it was sizing the BAR (writing all ones).
    fn bar_written(&mut self, index: usize, sizing: bool) -> Option<BarMove> {
        if sizing {
            return None;
        }
        // A write to the high half of a 64-bit BAR belongs to the BAR below.
        let (bar_index, bar) = match self.bars[index] {
            Some(bar) => (index, bar),
            None if index > 0 => match self.bars[index - 1] {
                Some(bar) if bar.is_64bit => (index - 1, bar),
                _ => return None,
            },
            None => return None,
        };
        let low = u64::from(self.regs[BAR0_REG + bar_index] & 0xffff_fff0);
        let high = if bar.is_64bit {
            u64::from(self.regs[BAR0_REG + bar_index + 1]) << 32
        } else {
            0
        };
        let new = high | low;
        // Half-programmed (the other half still all ones) is not a move.
        if new == bar.addr || new & !(bar.size - 1) != new || new.checked_add(bar.size).is_none() {
            return None;
        }
        if self.regs[BAR0_REG + bar_index] | 0xf == u32::MAX
            || (bar.is_64bit && self.regs[BAR0_REG + bar_index + 1] == u32::MAX)
        {
            return None;
        }
        self.bars[bar_index] = Some(Bar { addr: new, ..bar });
        Some(BarMove {
            bar: bar_index,
            old: bar.addr,
            new,
            len: bar.size,
        })
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    pub fn bars(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    /// Back to power-on values; returns the BARs that move back to where
    /// the VMM placed them.
    pub fn reset(&mut self) -> Vec<BarMove> {
        self.regs = self.initial;
        let mut moves = Vec::new();
        for (i, slot) in self.bars.iter_mut().enumerate() {
            if let Some(bar) = slot
                && bar.addr != bar.initial_addr
            {
                moves.push(BarMove {
                    bar: i,
                    old: bar.addr,
                    new: bar.initial_addr,
                    len: bar.size,
                });
                bar.addr = bar.initial_addr;
            }
        }
        moves
    }

    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            version: 1,
            regs: self.regs.to_vec(),
            bars: self.bars.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        let mut c = PciConfig::new(PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: 0x018000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        c.add_memory_bar(0, 0xc000_0000, 0x4000, false, false)
            .unwrap();
        c
    }

    fn read32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = config();
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x018000);
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = config();
        assert_eq!(c.write(0x10, &[0xff; 4]), None);
        assert_eq!(read32(&c, 0x10), 0xffff_c000);
        // Restoring the original address is not a move.
        assert_eq!(c.write(0x10, &0xc000_0000u32.to_le_bytes()), None);
        let mv = c.write(0x10, &0xd000_0000u32.to_le_bytes()).unwrap();
        assert_eq!((mv.old, mv.new, mv.len), (0xc000_0000, 0xd000_0000, 0x4000));
        assert_eq!(c.bar(0).unwrap().addr, 0xd000_0000);
        // Reset puts it back.
        let moves = c.reset();
        assert_eq!(moves.len(), 1);
        assert_eq!(read32(&c, 0x10), 0xc000_0000);
    }

    #[test]
    fn bar_64bit_pairs() {
        let mut c = PciConfig::new(PciIdentity {
            vendor_id: 1,
            device_id: 2,
            revision: 0,
            class_code: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        c.add_memory_bar(2, 0x10_0000_0000, 0x10_0000, true, true)
            .unwrap();
        assert!(
            c.add_memory_bar(3, 0xc000_0000, 0x1000, false, false)
                .is_err()
        );
        c.write(0x18, &[0xff; 4]);
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(read32(&c, 0x18), 0xfff0_000c);
        assert_eq!(read32(&c, 0x1c), 0xffff_ffff);
        assert_eq!(c.write(0x18, &0u32.to_le_bytes()), None);
        let mv = c.write(0x1c, &0x20u32.to_le_bytes()).unwrap();
        assert_eq!(mv.new, 0x20_0000_0000);
    }

    #[test]
    fn capabilities_chain_and_masks() {
        let mut c = config();
        let a = c.add_capability(CAP_ID_VENDOR, &[1, 2, 3], &[]).unwrap();
        let b = c
            .add_capability(CAP_ID_MSIX, &[0, 0x80, 0, 0], &[0, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        let mut p = [0u8; 1];
        c.read(0x34, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x48);
        assert_ne!(read32(&c, 4) & STATUS_CAPABILITIES, 0);
        // Only the masked bits of the message-control high byte stick.
        c.write(0x4b, &[0xff]);
        c.read(0x4b, &mut p);
        assert_eq!(p[0], 0xc0);
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let mut c = config();
        for off in 0..300usize {
            c.write(off, &[0xa5]);
            c.write(off, &[0xa5, 0x5a, 0xff, 0x00]);
            let mut b = [0u8; 8];
            c.read(off, &mut b);
        }
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert!(c.add_capability(1, &[0; 300], &[]).is_err());
    }
}
