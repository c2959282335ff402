//! ACPI hot-plug slots: the registers behind the DSDT's processor devices
//! (CPU hot-plug) and memory devices (memory hot-plug).
//!
//! The guest selects a slot (a CPU, or a block of hot-pluggable memory) by
//! writing its number to the selector, then reads or acknowledges that
//! slot's flags: enabled (its `_STA`), inserting and removing (the VMM's
//! requests, which the GED's event makes the DSDT's scan method turn into
//! device-check and eject-request notifications), and eject (written by
//! `_EJ0` once the guest has let the slot go; CPUs only).

use std::sync::Arc;

use crate::{BusDevice, PlatformEvent, PlatformEvents};

/// Port I/O bases: a 32-bit selector, then one flags byte.
pub const CPU_PORT: u16 = 0x3d8;
pub const MEMORY_PORT: u16 = 0x0a00;
pub const LEN: u64 = 8;
pub const SELECTOR_OFFSET: u64 = 0;
pub const FLAGS_OFFSET: u64 = 4;

/// Flags-byte bits.
pub const ENABLED: u8 = 1 << 0;
pub const INSERTING: u8 = 1 << 1;
pub const REMOVING: u8 = 1 << 2;
pub const EJECT: u8 = 1 << 3;

/// What the slots stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// vCPUs: slot 0, the boot CPU, never goes; eject is reported.
    Cpu,
    /// Blocks of hot-pluggable memory: added only (no unplug).
    Memory,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    enabled: bool,
    inserting: bool,
    removing: bool,
}

pub struct AcpiSlots {
    kind: SlotKind,
    slots: Vec<Slot>,
    selected: usize,
    events: Arc<dyn PlatformEvents>,
}

impl AcpiSlots {
    /// `count` slots, the first `enabled` of them enabled.
    pub fn new(
        kind: SlotKind,
        enabled: usize,
        count: usize,
        events: Arc<dyn PlatformEvents>,
    ) -> Self {
        let mut slots = vec![Slot::default(); count];
        for slot in slots.iter_mut().take(enabled) {
            slot.enabled = true;
        }
        AcpiSlots {
            kind,
            slots,
            selected: 0,
            events,
        }
    }

    /// Slot `id` was added: it is enabled and the guest is to be told.
    pub fn insert(&mut self, id: usize) {
        if let Some(slot) = self.slots.get_mut(id) {
            slot.enabled = true;
            slot.inserting = true;
            slot.removing = false;
        }
    }

    /// The VMM wants slot `id` gone; it goes when the guest ejects it.
    pub fn request_removal(&mut self, id: usize) {
        if let Some(slot) = self.slots.get_mut(id) {
            slot.removing = true;
            slot.inserting = false;
        }
    }

    /// Slots the guest has (enabled).
    pub fn enabled(&self) -> usize {
        self.slots.iter().filter(|c| c.enabled).count()
    }

    pub fn is_enabled(&self, id: usize) -> bool {
        self.slots.get(id).is_some_and(|c| c.enabled)
    }

    /// Back to the boot state with the first `enabled` slots enabled
    /// (machine reset).
    pub fn reset(&mut self, enabled: usize) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            *slot = Slot {
                enabled: i < enabled,
                ..Default::default()
            };
        }
        self.selected = 0;
    }
}

impl BusDevice for AcpiSlots {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 4) => {
                data.copy_from_slice(&(self.selected as u32).to_le_bytes());
            }
            (FLAGS_OFFSET, 1) => {
                if let Some(slot) = self.slots.get(self.selected) {
                    let mut flags = 0;
                    if slot.enabled {
                        flags |= ENABLED;
                    }
                    if slot.inserting {
                        flags |= INSERTING;
                    }
                    if slot.removing {
                        flags |= REMOVING;
                    }
                    data[0] = flags;
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // Out of range selects nothing: flags read 0, writes do nothing.
                self.selected = u32::from_le_bytes(b) as usize;
            }
            (FLAGS_OFFSET, 1) => {
                let selected = self.selected;
                let Some(slot) = self.slots.get_mut(selected) else {
                    return;
                };
                // Inserting and removing are acknowledged by writing 1.
                if data[0] & INSERTING != 0 {
                    slot.inserting = false;
                }
                if data[0] & REMOVING != 0 {
                    slot.removing = false;
                }
                // The boot CPU never goes; memory is never unplugged.
                if data[0] & EJECT != 0
                    && self.kind == SlotKind::Cpu
                    && selected != 0
                    && slot.enabled
                {
                    slot.enabled = false;
                    if let Ok(id) = u8::try_from(selected) {
                        self.events.notify(PlatformEvent::CpuEject(id));
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::Recorder;

    fn select(h: &mut AcpiSlots, id: u32) {
        h.write(SELECTOR_OFFSET, &id.to_le_bytes());
    }

    fn flags(h: &mut AcpiSlots) -> u8 {
        let mut b = [0u8];
        h.read(FLAGS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn insert_acknowledge_remove_eject() {
        let rec = Arc::new(Recorder::default());
        let mut h = AcpiSlots::new(SlotKind::Cpu, 1, 4, rec.clone());
        select(&mut h, 0);
        assert_eq!(flags(&mut h), ENABLED);
        select(&mut h, 2);
        assert_eq!(flags(&mut h), 0);
        h.insert(2);
        assert_eq!(flags(&mut h), ENABLED | INSERTING);
        h.write(FLAGS_OFFSET, &[INSERTING]);
        assert_eq!(flags(&mut h), ENABLED);
        assert_eq!(h.enabled(), 2);
        h.request_removal(2);
        assert_eq!(flags(&mut h), ENABLED | REMOVING);
        h.write(FLAGS_OFFSET, &[REMOVING]);
        h.write(FLAGS_OFFSET, &[EJECT]);
        assert_eq!(flags(&mut h), 0);
        assert_eq!(*rec.0.lock().unwrap(), vec![PlatformEvent::CpuEject(2)]);
        // The boot CPU cannot be ejected; out-of-range selectors are inert.
        select(&mut h, 0);
        h.write(FLAGS_OFFSET, &[EJECT]);
        assert_eq!(flags(&mut h), ENABLED);
        select(&mut h, 999);
        h.write(FLAGS_OFFSET, &[EJECT | INSERTING]);
        assert_eq!(flags(&mut h), 0);
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        h.reset(1);
        assert_eq!(h.enabled(), 1);
    }

    #[test]
    fn memory_blocks_plug_but_never_eject() {
        let rec = Arc::new(Recorder::default());
        let mut h = AcpiSlots::new(SlotKind::Memory, 0, 4, rec.clone());
        h.insert(1);
        select(&mut h, 1);
        assert_eq!(flags(&mut h), ENABLED | INSERTING);
        h.write(FLAGS_OFFSET, &[EJECT]);
        assert_eq!(flags(&mut h), ENABLED | INSERTING);
        assert!(rec.0.lock().unwrap().is_empty());
    }
}
