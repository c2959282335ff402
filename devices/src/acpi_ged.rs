//! The ACPI Generic Event Device (`ACPI0013`): how a HW-reduced ACPI machine,
//! which has no GPE blocks or fixed-event registers, tells the OS that
//! something happened. The VMM sets bits in one event-status register and
//! raises the GED's interrupt; the DSDT's `_EVT` method reads the register
//! (which clears it) and notifies the ACPI device each bit stands for.
//!
//! One register serves every event kind, so hot-plug can reuse this device
//! by adding a bit and a branch in `_EVT` instead of another interrupt.

use std::io;

use crate::BusDevice;
use crate::interrupt::Interrupt;

/// Port I/O base of the event-status register, just past the ACPI platform
/// registers (`acpi_pm`, 0x3c0..0x3c3) so the ACPI ports stay together.
pub const BASE_PORT: u16 = 0x3c4;
pub const LEN: u64 = 4;
/// The legacy IOAPIC pin the GED raises, edge-triggered and active-high as
/// an irqfd pulses it. Nothing else here uses 5 (COM1 has 4, the RTC 8) and
/// no ISA driver probes it; 9 would not do, as Linux programs the FADT's SCI
/// pin level/low whatever the DSDT says.
pub const IRQ: u32 = 5;

/// Event-status bits, one per kind of event. Only the power button is
/// raised today; the others reserve their bit for hot-plug.
pub const POWER_BUTTON: u32 = 1 << 0;
pub const CPU_HOTPLUG: u32 = 1 << 1;
pub const MEMORY_HOTPLUG: u32 = 1 << 2;
pub const PCI_HOTPLUG: u32 = 1 << 3;

pub struct Ged {
    status: u32,
    interrupt: Interrupt,
}

impl Ged {
    pub fn new(interrupt: Interrupt) -> Self {
        Ged {
            status: 0,
            interrupt,
        }
    }

    /// Latches `events` and raises the interrupt. Bits not yet read by the
    /// guest stay set, so events that arrive before `_EVT` runs (or while
    /// the guest has not yet bound its GED driver) are merged, not lost; the
    /// interrupt is raised every time so a later event still gets through
    /// when an earlier edge went unseen.
    pub fn notify(&mut self, events: u32) -> io::Result<()> {
        if events == 0 {
            return Ok(());
        }
        self.status |= events;
        self.interrupt.trigger()
    }

    /// Power-on state: nothing pending. A count left in the eventfd while no
    /// VM was attached is dropped too, or the next VM would take a stray
    /// interrupt the moment its irqfd is registered.
    pub fn reset(&mut self) {
        self.status = 0;
        // Nothing pending is the usual case and reads as WouldBlock.
        let _ = self.interrupt.event().read();
    }
}

impl BusDevice for Ged {
    /// Returns the bytes of the status register the access covers and
    /// clears exactly those, so `_EVT`'s DWord read takes every pending
    /// event at once and no event is cleared without being seen.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.status.to_le_bytes();
        let mut taken = [0u8; 4];
        for (i, out) in data.iter_mut().enumerate() {
            let byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .filter(|&at| at < bytes.len());
            *out = match byte {
                Some(at) => {
                    taken[at] = 0xff;
                    bytes[at]
                }
                None => 0,
            };
        }
        self.status &= !u32::from_le_bytes(taken);
    }

    /// The register is read-only: writes cannot set or clear events.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ged() -> (Ged, Interrupt) {
        let interrupt = Interrupt::new().unwrap();
        let probe = interrupt.try_clone().unwrap();
        (Ged::new(interrupt), probe)
    }

    fn read_status(ged: &mut Ged) -> u32 {
        let mut data = [0u8; 4];
        ged.read(0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn events_accumulate_and_read_clears() {
        let (mut ged, _probe) = ged();
        ged.notify(POWER_BUTTON).unwrap();
        ged.notify(PCI_HOTPLUG).unwrap();
        ged.notify(POWER_BUTTON).unwrap();
        assert_eq!(read_status(&mut ged), POWER_BUTTON | PCI_HOTPLUG);
        assert_eq!(read_status(&mut ged), 0);
    }

    #[test]
    fn notify_raises_the_interrupt_each_time() {
        let (mut ged, probe) = ged();
        assert!(probe.event().read().is_err(), "nothing raised yet");
        ged.notify(POWER_BUTTON).unwrap();
        ged.notify(POWER_BUTTON).unwrap();
        assert_eq!(probe.event().read().unwrap(), 2);
        ged.notify(0).unwrap();
        assert!(probe.event().read().is_err(), "no event, no interrupt");
    }

    #[test]
    fn narrow_reads_clear_only_what_they_return() {
        let (mut ged, _probe) = ged();
        ged.notify(POWER_BUTTON | (1 << 8)).unwrap();
        let mut byte = [0u8];
        ged.read(1, &mut byte);
        assert_eq!(byte[0], 1);
        assert_eq!(read_status(&mut ged), POWER_BUTTON);
    }

    #[test]
    fn guest_garbage_is_harmless() {
        let (mut ged, _probe) = ged();
        ged.notify(POWER_BUTTON).unwrap();
        ged.write(0, &[0xff; 4]);
        ged.write(3, &[0; 8]);
        // Past the register (the bus never sends these, but a wide access
        // from offset 2 or an absurd offset must not panic or clear bits).
        let mut wide = [0xaau8; 8];
        ged.read(2, &mut wide);
        assert_eq!(wide, [0; 8]);
        ged.read(u64::MAX, &mut wide);
        assert_eq!(read_status(&mut ged), POWER_BUTTON);
    }

    #[test]
    fn reset_drops_pending_events_and_interrupts() {
        let (mut ged, probe) = ged();
        ged.notify(POWER_BUTTON).unwrap();
        ged.reset();
        assert_eq!(read_status(&mut ged), 0);
        assert!(probe.event().read().is_err());
    }
}
