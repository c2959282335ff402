//! ACPI CPU hot-plug: the registers behind the DSDT's processor devices.
//!
//! The guest selects a CPU by writing its number to the selector, then
//! reads or acknowledges that CPU's flags: enabled (its `_STA`), inserting
//! and removing (the VMM's requests, which the GED's CPU event makes the
//! DSDT's `CSCN` turn into device-check and eject-request notifications),
//! and eject (written by `_EJ0` once the guest has taken the CPU offline).

use std::sync::Arc;

use crate::{BusDevice, PlatformEvent, PlatformEvents};

/// Port I/O base: a 32-bit selector, then one flags byte.
pub const BASE_PORT: u16 = 0x3d8;
pub const LEN: u64 = 8;
pub const SELECTOR_OFFSET: u64 = 0;
pub const FLAGS_OFFSET: u64 = 4;

/// Flags-byte bits.
pub const ENABLED: u8 = 1 << 0;
pub const INSERTING: u8 = 1 << 1;
pub const REMOVING: u8 = 1 << 2;
pub const EJECT: u8 = 1 << 3;

#[derive(Clone, Copy, Default)]
struct CpuSlot {
    enabled: bool,
    inserting: bool,
    removing: bool,
}

pub struct CpuHotplug {
    cpus: Vec<CpuSlot>,
    selected: usize,
    events: Arc<dyn PlatformEvents>,
}

impl CpuHotplug {
    /// `max` CPUs, the first `boot` of them enabled.
    pub fn new(boot: u8, max: u8, events: Arc<dyn PlatformEvents>) -> Self {
        let mut cpus = vec![CpuSlot::default(); usize::from(max)];
        for cpu in cpus.iter_mut().take(usize::from(boot)) {
            cpu.enabled = true;
        }
        CpuHotplug {
            cpus,
            selected: 0,
            events,
        }
    }

    /// CPU `id` was added: it is enabled and the guest is to be told.
    pub fn insert(&mut self, id: u8) {
        if let Some(cpu) = self.cpus.get_mut(usize::from(id)) {
            cpu.enabled = true;
            cpu.inserting = true;
            cpu.removing = false;
        }
    }

    /// The VMM wants CPU `id` gone; it goes when the guest ejects it.
    pub fn request_removal(&mut self, id: u8) {
        if let Some(cpu) = self.cpus.get_mut(usize::from(id)) {
            cpu.removing = true;
            cpu.inserting = false;
        }
    }

    /// CPUs the guest has (enabled).
    pub fn enabled(&self) -> usize {
        self.cpus.iter().filter(|c| c.enabled).count()
    }

    pub fn is_enabled(&self, id: u8) -> bool {
        self.cpus.get(usize::from(id)).is_some_and(|c| c.enabled)
    }

    /// Back to the boot state with `boot` CPUs (machine reset).
    pub fn reset(&mut self, boot: u8) {
        for (i, cpu) in self.cpus.iter_mut().enumerate() {
            *cpu = CpuSlot {
                enabled: i < usize::from(boot),
                ..Default::default()
            };
        }
        self.selected = 0;
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 4) => {
                data.copy_from_slice(&(self.selected as u32).to_le_bytes());
            }
            (FLAGS_OFFSET, 1) => {
                if let Some(cpu) = self.cpus.get(self.selected) {
                    let mut flags = 0;
                    if cpu.enabled {
                        flags |= ENABLED;
                    }
                    if cpu.inserting {
                        flags |= INSERTING;
                    }
                    if cpu.removing {
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
                let Some(cpu) = self.cpus.get_mut(selected) else {
                    return;
                };
                // Inserting and removing are acknowledged by writing 1.
                if data[0] & INSERTING != 0 {
                    cpu.inserting = false;
                }
                if data[0] & REMOVING != 0 {
                    cpu.removing = false;
                }
                // The boot CPU never goes.
                if data[0] & EJECT != 0 && selected != 0 && cpu.enabled {
                    cpu.enabled = false;
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

    fn select(h: &mut CpuHotplug, id: u32) {
        h.write(SELECTOR_OFFSET, &id.to_le_bytes());
    }

    fn flags(h: &mut CpuHotplug) -> u8 {
        let mut b = [0u8];
        h.read(FLAGS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn insert_acknowledge_remove_eject() {
        let rec = Arc::new(Recorder::default());
        let mut h = CpuHotplug::new(1, 4, rec.clone());
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
}
