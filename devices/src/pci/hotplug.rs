//! ACPI PCI hot-plug: the registers the DSDT's slot methods use to learn
//! which slots changed and to eject a device.
//!
//! The VMM marks a slot "up" (a device was inserted) or "down" (it asks
//! the guest to let a device go) and raises the GED's PCI hot-plug event;
//! `_EVT` calls `\_SB_.PCI0.PCNT`, which reads both bitmaps (reading
//! clears them) and notifies each slot: device check for up, eject request
//! for down. The guest's acpiphp then scans the new slot, or releases the
//! device and calls the slot's `_EJ0`, which writes the slot's bit to the
//! eject register: only then does the VMM take the device away.

use std::sync::Arc;

use crate::{BusDevice, PlatformEvent, PlatformEvents};

/// Port I/O base of the three 32-bit registers, after the GED's.
pub const BASE_PORT: u16 = 0x3c8;
pub const LEN: u64 = 12;
/// Slots inserted since the last read (read clears).
pub const UP_OFFSET: u64 = 0;
/// Slots whose device the VMM wants removed (read clears).
pub const DOWN_OFFSET: u64 = 4;
/// Written by `_EJ0` with the bit of the slot the guest released.
pub const EJECT_OFFSET: u64 = 8;

pub struct PciHotplug {
    up: u32,
    down: u32,
    events: Arc<dyn PlatformEvents>,
}

impl PciHotplug {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        PciHotplug {
            up: 0,
            down: 0,
            events,
        }
    }

    /// A device was put in `slot` (0–31).
    pub fn inserted(&mut self, slot: usize) {
        if let Some(bit) = bit(slot) {
            self.up |= bit;
            self.down &= !bit;
        }
    }

    /// The VMM wants the device in `slot` gone.
    pub fn eject_requested(&mut self, slot: usize) {
        if let Some(bit) = bit(slot) {
            self.down |= bit;
            self.up &= !bit;
        }
    }

    /// Power-on state: nothing pending.
    pub fn reset(&mut self) {
        self.up = 0;
        self.down = 0;
    }
}

fn bit(slot: usize) -> Option<u32> {
    (slot < 32).then(|| 1u32 << slot)
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The DSDT reads each register as one DWord; other accesses see 0
        // and clear nothing.
        if data.len() != 4 {
            return;
        }
        let value = match offset {
            UP_OFFSET => std::mem::take(&mut self.up),
            DOWN_OFFSET => std::mem::take(&mut self.down),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != EJECT_OFFSET || data.len() != 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        let slots = u32::from_le_bytes(bytes);
        // Slot 0 is the host bridge: never ejectable, whatever is written.
        for slot in 1..32u8 {
            if slots & (1 << slot) != 0 {
                self.events.notify(PlatformEvent::PciEject(slot));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::Recorder;

    fn read(h: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        h.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bitmaps_read_once_and_eject_reports_slots() {
        let rec = Arc::new(Recorder::default());
        let mut h = PciHotplug::new(rec.clone());
        h.inserted(3);
        h.inserted(5);
        h.eject_requested(5);
        h.inserted(99);
        assert_eq!(read(&mut h, UP_OFFSET), 1 << 3);
        assert_eq!(read(&mut h, UP_OFFSET), 0);
        assert_eq!(read(&mut h, DOWN_OFFSET), 1 << 5);
        assert_eq!(read(&mut h, DOWN_OFFSET), 0);
        // Odd widths neither read nor clear.
        h.inserted(4);
        let mut two = [0u8; 2];
        h.read(UP_OFFSET, &mut two);
        assert_eq!(two, [0, 0]);
        assert_eq!(read(&mut h, UP_OFFSET), 1 << 4);

        h.write(EJECT_OFFSET, &((1u32 << 5) | 1 | (1 << 31)).to_le_bytes());
        h.write(EJECT_OFFSET, &[0xff]);
        h.write(UP_OFFSET, &u32::MAX.to_le_bytes());
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![PlatformEvent::PciEject(5), PlatformEvent::PciEject(31)]
        );
    }
}
