//! The pvpanic device (QEMU's ACPI `QEMU0001` at port 0x505): a panicking
//! guest kernel writes here, so the VMM can report the panic instead of
//! silently rebooting or hanging.

use std::sync::Arc;

use crate::{BusDevice, PlatformEvent, PlatformEvents};

pub const PORT: u16 = 0x505;
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    events: Arc<dyn PlatformEvents>,
}

impl PvPanic {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        PvPanic { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device understands.
        data.fill(0);
        data[0] = PANICKED | CRASH_LOADED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data[0] & PANICKED != 0 {
            self.events.notify(PlatformEvent::GuestPanic);
        } else if data[0] & CRASH_LOADED != 0 {
            log::warn!("Guest kernel crashed and is running its crash kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::Recorder;

    #[test]
    fn panicked_bit_is_reported() {
        let rec = Arc::new(Recorder::default());
        let mut dev = PvPanic::new(rec.clone());
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], 3);
        dev.write(0, &[CRASH_LOADED]);
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(0, &[PANICKED]);
        assert_eq!(*rec.0.lock().unwrap(), vec![PlatformEvent::GuestPanic]);
    }
}
