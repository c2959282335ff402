//! The i8042 keyboard controller, reduced to what a guest without a keyboard
//! needs: its command/status protocol answers sanely, and command 0xFE pulses
//! the CPU reset line, the oldest way a PC kernel reboots.
//!
//! Inserted at port 0x60 with length 5, so offset 0 is the data port and
//! offset 4 the command/status port; offset 1 (0x61, "system control port
//! B") reads as zero.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, PlatformEvent, PlatformEvents};

pub const BASE_PORT: u16 = 0x60;
pub const LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
/// Output port bit 0 is the (active low) CPU reset line.
const OUTPUT_PORT_RESET_RELEASED: u8 = 1 << 0;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub version: u32,
    pub status: u8,
    pub config: u8,
    pub output: Option<u8>,
    pub pending_command: Option<u8>,
}

pub struct I8042 {
    events: Arc<dyn PlatformEvents>,
    status: u8,
    config: u8,
    output: Option<u8>,
    /// A command that takes its argument from the next data-port write.
    pending_command: Option<u8>,
}

impl I8042 {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        I8042 {
            events,
            status: STATUS_SYSTEM_FLAG,
            config: 0,
            output: None,
            pending_command: None,
        }
    }

    pub fn state(&self) -> I8042State {
        I8042State {
            version: 1,
            status: self.status,
            config: self.config,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    pub fn restore(events: Arc<dyn PlatformEvents>, state: &I8042State) -> Self {
        I8042 {
            events,
            status: state.status,
            config: state.config,
            output: state.output,
            pending_command: state.pending_command,
        }
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CONFIG => self.respond(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.respond(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.respond(0),
            CMD_READ_OUTPUT_PORT => self.respond(OUTPUT_PORT_RESET_RELEASED),
            CMD_PULSE_RESET => self.events.notify(PlatformEvent::Reset),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            other => log::debug!("i8042: ignoring command {other:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONFIG) => self.config = value,
            Some(CMD_WRITE_OUTPUT_PORT) if value & OUTPUT_PORT_RESET_RELEASED == 0 => {
                self.events.notify(PlatformEvent::Reset)
            }
            // Bytes meant for a keyboard that is not there.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => self.output.take().unwrap_or(0),
            COMMAND => {
                let full = if self.output.is_some() {
                    STATUS_OUTPUT_FULL
                } else {
                    0
                };
                self.status | full
            }
            _ => 0,
        };
        data.fill(0);
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            DATA => self.data(data[0]),
            COMMAND => self.command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::Recorder;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_requests_a_reset() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(*rec.0.lock().unwrap(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn config_byte_round_trips_and_self_test_passes() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CONFIG]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), 0x47);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        let restored = I8042::restore(rec.clone(), &dev.state());
        assert_eq!(restored.state(), dev.state());
        assert!(rec.0.lock().unwrap().is_empty());
    }
}
