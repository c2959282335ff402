//! The PC devices a stock kernel expects to find at fixed ports.

pub mod cmos;
pub mod debug_port;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use cmos::Cmos;
pub use debug_port::DebugPort;
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::Serial;
