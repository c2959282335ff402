//! The HW-reduced ACPI platform registers: sleep control/status and the reset
//! register that the FADT points the guest at. Writing S5 to the sleep control
//! register powers the machine off; writing the reset value resets it.

use std::sync::Arc;

use crate::{BusDevice, PlatformEvent, PlatformEvents};

/// Port I/O base of the three one-byte registers.
pub const BASE_PORT: u16 = 0x3c0;
pub const SLEEP_CONTROL_PORT: u16 = BASE_PORT;
pub const SLEEP_STATUS_PORT: u16 = BASE_PORT + 1;
pub const RESET_PORT: u16 = BASE_PORT + 2;
pub const LEN: u64 = 3;
/// What the FADT tells the guest to write to [`RESET_PORT`].
pub const RESET_VALUE: u8 = 0x1;
/// The `_S5_` sleep type the DSDT advertises.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiPlatform {
    events: Arc<dyn PlatformEvents>,
}

impl AcpiPlatform {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        AcpiPlatform { events }
    }
}

impl BusDevice for AcpiPlatform {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake pending. The others read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = data[0];
        match offset {
            0 if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == S5_SLEEP_TYPE {
                    self.events.notify(PlatformEvent::PowerOff);
                } else {
                    log::warn!("Guest asked for unsupported sleep type {sleep_type}; ignored");
                }
            }
            2 if value == RESET_VALUE => self.events.notify(PlatformEvent::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<PlatformEvent>>);
    impl PlatformEvents for Recorder {
        fn notify(&self, event: PlatformEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let rec = Arc::new(Recorder::default());
        let mut pm = AcpiPlatform::new(rec.clone());
        pm.write(0, &[(S5_SLEEP_TYPE << 2)]); // SLP_EN missing: nothing
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported
        pm.write(2, &[0x55]); // wrong reset value
        assert!(rec.0.lock().unwrap().is_empty());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![PlatformEvent::PowerOff, PlatformEvent::Reset]
        );
    }
}
