//! The 16550 UART on COM1 (port 0x3f8, IRQ 4), built on vm-superio's model.
//!
//! Output goes to any `Write` the VMM hands in (it must not block: the VMM
//! gives a buffered sink); input arrives through [`Serial::enqueue_input`].

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};

use crate::BusDevice;
use crate::interrupt::Interrupt;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const LEN: u64 = 8;

pub type SerialOutput = Box<dyn Write + Send>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

pub struct Serial {
    uart: vm_superio::Serial<Interrupt, NoEvents, SerialOutput>,
}

impl Serial {
    pub fn new(interrupt: Interrupt, output: SerialOutput) -> Self {
        Serial {
            uart: vm_superio::Serial::new(interrupt, output),
        }
    }

    /// Queues bytes the guest will read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }

    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            version: 1,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(
        state: &SerialState,
        interrupt: Interrupt,
        output: SerialOutput,
    ) -> io::Result<Self> {
        let s = SuperioState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&s, interrupt, NoEvents, output)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Serial { uart })
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Ok(register) = u8::try_from(offset) {
            data[0] = self.uart.read(register);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(register) = u8::try_from(offset) else {
            return;
        };
        if let Err(e) = self.uart.write(register, data[0]) {
            log::debug!("serial: write to register {register}: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_receives_and_restores() {
        let sink = Sink::default();
        let mut serial = Serial::new(Interrupt::new().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(serial.enqueue_input(b"ok").unwrap(), 2);
        serial.write(7, &[0x42]); // scratch register
        let restored = Serial::restore(
            &serial.state(),
            Interrupt::new().unwrap(),
            Box::new(sink.clone()),
        )
        .unwrap();
        assert_eq!(restored.state(), serial.state());
        let mut b = [0u8];
        let mut restored = restored;
        restored.read(0, &mut b);
        assert_eq!(b[0], b'o');
        // Registers past the 8 the UART has are ignored, not a panic.
        restored.write(u64::MAX, &[1]);
    }
}
