//! Types shared by keel-vmm, keeld and their clients.
//!
//! The VM configuration follows Cloud Hypervisor's `VmConfig` JSON shape so the
//! same documents can drive either VMM; [`options`] parses the command-line
//! form (`--cpus boot=2,max=4`) into the same types.

pub mod agent;
pub mod client;
pub mod device_config;
pub mod events;
pub mod http;
pub mod keeld;
pub mod keeld_client;
pub mod options;
pub mod request;
pub mod vm_config;
pub mod vmm_api;

pub use device_config::{DiskConfig, MacAddr, NetConfig, RngConfig, VsockConfig};
pub use vm_config::{
    ConfigError, ConsoleConfig, ConsoleOutputMode, CpusConfig, MEMORY_HOTPLUG_BLOCK, MemoryConfig,
    PayloadConfig, VmConfig,
};

/// An error and its causes on one line (`outer: inner: root`): how every
/// Keel binary prints an error.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
