//! An address bus (port I/O or MMIO): a sorted map of non-overlapping ranges,
//! each served by one device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device reachable through register reads and writes.
///
/// `offset` is relative to the start of the range the device was inserted at;
/// `data.len()` is the access width (1, 2, 4 or 8 bytes as the guest chose).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("no device starts at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices can be added, removed and moved while vCPUs use the bus (PCI
/// BAR relocation, hot-plug): the map sits behind a read-write lock that is
/// never held while a device runs, so a device may itself change the bus.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, (Range, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The only candidates for overlap: the last range starting below `end`.
        if let Some((_, (other, _))) = devices.range(..end).next_back()
            && other.base + other.len > base
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    /// Takes the device at `base` off the bus.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        devices.remove(&base).map(|(_, device)| device)
    }

    /// Takes every device off the bus. Devices that point back at the bus
    /// (PCI configuration space does, to place BARs) would otherwise keep
    /// each other alive after the VM is gone.
    pub fn clear(&self) {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        devices.clear();
    }

    /// Moves the device at `old` to `new`; on overlap it stays where it was.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let (range, device) = {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            let (range, device) = devices.get(&old).ok_or(BusError::NotFound(old))?;
            (*range, device.clone())
        };
        self.remove(old);
        if let Err(e) = self.insert(device.clone(), new, range.len) {
            // Put it back; the slot was ours a moment ago.
            let _ = self.insert(device, old, range.len);
            return Err(e);
        }
        Ok(())
    }

    /// The device covering `[addr, addr + width)` and the offset of `addr` in it.
    fn resolve(&self, addr: u64, width: usize) -> Option<(SharedDevice, u64)> {
        // Devices may rely on at least one byte of data.
        if width == 0 {
            return None;
        }
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let (_, (range, device)) = devices.range(..=addr).next_back()?;
        let offset = addr - range.base;
        let end = offset.checked_add(width as u64)?;
        (end <= range.len).then(|| (device.clone(), offset))
    }

    /// Reads from the device at `addr`; `false` if nothing is there (the
    /// caller decides what an unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if an earlier holder panicked: a device's registers
/// stay meaningful, and one broken access must not take down every vCPU.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn echo(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn routes_by_range() {
        let bus = Bus::new();
        bus.insert(echo(10), 0x3f8, 8).unwrap();
        bus.insert(echo(20), 0x60, 1).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.write(0x60, &[7]));
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x61, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        // An access that starts inside but runs past the end is not claimed.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
        assert!(!bus.read(u64::MAX, &mut w));
        assert!(!bus.write(0x3f8, &[]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        bus.insert(echo(0), 0x70, 2).unwrap();
        assert!(matches!(
            bus.insert(echo(0), 0x71, 1),
            Err(BusError::Overlap { other: 0x70, .. })
        ));
        assert!(matches!(
            bus.insert(echo(0), 0x60, 0x20),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(echo(0), 0x72, 1).is_ok());
        assert!(bus.insert(echo(0), 0x6f, 1).is_ok());
        assert!(bus.insert(echo(0), 0x100, 0).is_err());
        assert!(bus.insert(echo(0), u64::MAX, 2).is_err());
    }

    #[test]
    fn relocates_and_removes() {
        let bus = Bus::new();
        bus.insert(echo(1), 0x1000, 0x10).unwrap();
        bus.insert(echo(2), 0x2000, 0x10).unwrap();
        assert!(bus.relocate(0x1000, 0x2008).is_err(), "overlap");
        let mut b = [0u8; 1];
        assert!(bus.read(0x1000, &mut b), "stayed put");
        bus.relocate(0x1000, 0x3000).unwrap();
        assert!(!bus.read(0x1000, &mut b));
        assert!(bus.read(0x3001, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.remove(0x3000).is_some());
        assert!(!bus.read(0x3001, &mut b));
        assert_eq!(
            bus.relocate(0x3000, 0x4000),
            Err(BusError::NotFound(0x3000))
        );
    }
}
