//! Port 0x80, where firmware and kernels write POST codes and which Linux
//! uses as a short I/O delay. Writes are kept (for debugging) and cost nothing.

use serde::{Deserialize, Serialize};

use crate::BusDevice;

pub const PORT: u16 = 0x80;

#[derive(Default)]
pub struct DebugPort {
    last_code: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugPortState {
    pub version: u32,
    pub last_code: u8,
}

impl DebugPort {
    pub fn state(&self) -> DebugPortState {
        DebugPortState {
            version: 1,
            last_code: self.last_code,
        }
    }

    pub fn restore(state: &DebugPortState) -> Self {
        DebugPort {
            last_code: state.last_code,
        }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.last_code);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.last_code = data[0];
        log::trace!("POST code {:#04x}", self.last_code);
    }
}
