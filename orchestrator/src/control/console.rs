//! A VM's serial console, from the node that runs it.

pub use crate::agent::ConsoleStream;
use crate::keel::Keel;

/// The last `len` bytes the guest wrote to its serial console.
pub fn serial_tail(keel: &Keel, vm: &str, len: u64) -> Vec<u8> {
    keel.agent.serial_tail(vm, len)
}

/// An interactive session: output from `backlog` bytes before the end.
pub fn open(keel: &Keel, vm: &str, backlog: u64) -> ConsoleStream {
    keel.agent.console(vm, backlog)
}
