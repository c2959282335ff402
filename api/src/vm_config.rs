//! The VM configuration, shaped like Cloud Hypervisor's `VmConfig` so the same
//! JSON documents (and the same command-line option strings) drive either VMM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device_config::{DiskConfig, NetConfig, RngConfig, VsockConfig};
use crate::options::{OptionError, OptionValues};

/// Highest vCPU count: APIC IDs and ACPI processor UIDs are 8-bit in the MADT
/// entries we emit, and 255 is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{option} {value}: {source}")]
    Option {
        option: &'static str,
        value: String,
        #[source]
        source: OptionError,
    },
    #[error("--cpus: boot={0} is invalid; at least 1 vCPU is needed")]
    NoBootVcpus(u64),
    #[error("--cpus: boot={boot} is larger than max={max}; max must be at least boot")]
    BootAboveMax { boot: u64, max: u64 },
    #[error("--cpus: {0} vCPUs requested; at most {MAX_VCPUS} are supported")]
    TooManyVcpus(u64),
    #[error("--memory: size=0 is invalid; give a size such as size=512M")]
    ZeroMemory,
    #[error("--memory: size={0} bytes is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    #[error("--memory: hotplug_size={0} bytes must be a multiple of 128 MiB and at most 64 GiB")]
    HotplugSize(u64),
    #[error(
        "--memory: hotplugged_size={plugged} must be a multiple of 128 MiB within hotplug_size={room}"
    )]
    HotpluggedSize { plugged: u64, room: u64 },
    #[error("Device id '{0}' is used twice; every device needs its own id")]
    DuplicateId(String),
    #[error("--kernel is required: give the path of a bzImage or an ELF vmlinux")]
    MissingKernel,
    #[error("--{option}: {message}")]
    Device {
        option: &'static str,
        message: String,
    },
    #[error("--{option} {value}: expected off, null, tty or file=PATH")]
    BadConsoleMode { option: &'static str, value: String },
    #[error(
        "--serial tty and --console tty both want the terminal; give only one of them tty \
         (e.g. --serial null, or --console off)"
    )]
    DoubleTty,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

impl CpusConfig {
    /// Parses `boot=N[,max=M]`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let wrap = |source| ConfigError::Option {
            option: "cpus",
            value: value.to_string(),
            source,
        };
        let values = OptionValues::parse(value, &["boot", "max"]).map_err(wrap)?;
        let boot = values.get_u64("boot").map_err(wrap)?.unwrap_or(1);
        let max = values.get_u64("max").map_err(wrap)?.unwrap_or(boot);
        let config = CpusConfig {
            boot_vcpus: u8::try_from(boot).map_err(|_| ConfigError::TooManyVcpus(boot))?,
            max_vcpus: u8::try_from(max).map_err(|_| ConfigError::TooManyVcpus(max))?,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let (boot, max) = (u64::from(self.boot_vcpus), u64::from(self.max_vcpus));
        if boot == 0 {
            return Err(ConfigError::NoBootVcpus(boot));
        }
        if boot > max {
            return Err(ConfigError::BootAboveMax { boot, max });
        }
        if self.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(max));
        }
        Ok(())
    }
}

/// Hot-pluggable memory comes and goes in blocks this large (Linux's memory
/// block size on x86-64).
pub const MEMORY_HOTPLUG_BLOCK: u64 = 128 << 20;
/// The most memory that can be hot-plugged (512 blocks).
pub const MAX_MEMORY_HOTPLUG: u64 = 64 << 30;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM at boot, in bytes.
    pub size: u64,
    /// Room for memory hot-plug (`vm.resize desired_ram`), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// How much of that is plugged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            hotplug_size: None,
            hotplugged_size: None,
        }
    }
}

impl MemoryConfig {
    /// Parses `size=512M[,hotplug_size=2G]`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let wrap = |source| ConfigError::Option {
            option: "memory",
            value: value.to_string(),
            source,
        };
        let values = OptionValues::parse(value, &["size", "hotplug_size"]).map_err(wrap)?;
        let size = values
            .get_size("size")
            .map_err(wrap)?
            .unwrap_or(MemoryConfig::default().size);
        let hotplug_size = values.get_size("hotplug_size").map_err(wrap)?;
        let config = MemoryConfig {
            size,
            hotplug_size,
            hotplugged_size: None,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.size == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if !self.size.is_multiple_of(4096) {
            return Err(ConfigError::UnalignedMemory(self.size));
        }
        let room = self.hotplug_size.unwrap_or(0);
        if !room.is_multiple_of(MEMORY_HOTPLUG_BLOCK) || room > MAX_MEMORY_HOTPLUG {
            return Err(ConfigError::HotplugSize(room));
        }
        let plugged = self.hotplugged_size.unwrap_or(0);
        if !plugged.is_multiple_of(MEMORY_HOTPLUG_BLOCK) || plugged > room {
            return Err(ConfigError::HotpluggedSize { plugged, room });
        }
        Ok(())
    }

    /// RAM the guest has now: the boot size and what was plugged in.
    pub fn total(&self) -> u64 {
        self.size + self.hotplugged_size.unwrap_or(0)
    }

    /// Blocks of hot-pluggable memory: how many there is room for.
    pub fn hotplug_blocks(&self) -> usize {
        (self.hotplug_size.unwrap_or(0) / MEMORY_HOTPLUG_BLOCK) as usize
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Where a console's output goes (Cloud Hypervisor's `ConsoleOutputMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Tty,
    File,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    #[serde(default)]
    pub file: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
}

impl ConsoleConfig {
    pub fn mode(mode: ConsoleOutputMode) -> Self {
        ConsoleConfig { file: None, mode }
    }

    /// Parses `off`, `null`, `tty` or `file=PATH` for the option named `option`.
    pub fn parse(option: &'static str, value: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadConsoleMode {
            option,
            value: value.to_string(),
        };
        match value {
            "off" => Ok(Self::mode(ConsoleOutputMode::Off)),
            "null" => Ok(Self::mode(ConsoleOutputMode::Null)),
            "tty" => Ok(Self::mode(ConsoleOutputMode::Tty)),
            _ => {
                let values = OptionValues::parse(value, &["file"]).map_err(|_| bad())?;
                let file = values
                    .get("file")
                    .filter(|f| !f.is_empty())
                    .ok_or_else(bad)?;
                Ok(ConsoleConfig {
                    file: Some(PathBuf::from(file)),
                    mode: ConsoleOutputMode::File,
                })
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub rng: Option<RngConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::mode(ConsoleOutputMode::Tty)
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::mode(ConsoleOutputMode::Off)
}

impl VmConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        self.memory.validate()?;
        if self.payload.kernel.is_none() {
            return Err(ConfigError::MissingKernel);
        }
        // One terminal, one reader of its keyboard (Cloud Hypervisor refuses
        // this too).
        if self.serial.mode == ConsoleOutputMode::Tty && self.console.mode == ConsoleOutputMode::Tty
        {
            return Err(ConfigError::DoubleTty);
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        for net in &self.net {
            net.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        let mut ids = std::collections::BTreeSet::new();
        let named = self.disks.iter().filter_map(|d| d.id.as_ref());
        let named = named.chain(self.net.iter().filter_map(|n| n.id.as_ref()));
        for id in named.chain(self.vsock.iter().filter_map(|v| v.id.as_ref())) {
            if !ids.insert(id) {
                return Err(ConfigError::DuplicateId(id.clone()));
            }
        }
        Ok(())
    }
}

impl VmConfig {
    /// Every device id in use (named by the user or by
    /// [`assign_device_ids`](Self::assign_device_ids)).
    pub fn device_ids(&self) -> Vec<&str> {
        let disks = self.disks.iter().filter_map(|d| d.id.as_deref());
        let nets = self.net.iter().filter_map(|n| n.id.as_deref());
        let vsock = self.vsock.iter().filter_map(|v| v.id.as_deref());
        disks.chain(nets).chain(vsock).collect()
    }

    /// Names every unnamed disk, NIC and vsock device the way Cloud
    /// Hypervisor does (`_disk0`, `_net1`, `_vsock2`: a prefix and a
    /// counter), so that `vm.info` shows, and `vm.remove-device` takes, an
    /// id for each.
    pub fn assign_device_ids(&mut self) {
        let mut taken: std::collections::BTreeSet<String> =
            self.device_ids().into_iter().map(str::to_string).collect();
        let mut counter = 0u32;
        let mut next = |prefix: &str| loop {
            let id = format!("{prefix}{counter}");
            counter += 1;
            if taken.insert(id.clone()) {
                return id;
            }
        };
        for disk in &mut self.disks {
            if disk.id.is_none() {
                disk.id = Some(next("_disk"));
            }
        }
        for net in &mut self.net {
            if net.id.is_none() {
                net.id = Some(next("_net"));
            }
        }
        if let Some(vsock) = &mut self.vsock
            && vsock.id.is_none()
        {
            vsock.id = Some(next("_vsock"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus() {
        assert_eq!(
            CpusConfig::parse("boot=2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2
            }
        );
        assert_eq!(CpusConfig::parse("boot=2,max=4").unwrap().max_vcpus, 4);
        assert_eq!(
            CpusConfig::parse("boot=0").unwrap_err(),
            ConfigError::NoBootVcpus(0)
        );
        assert_eq!(
            CpusConfig::parse("boot=4,max=2").unwrap_err(),
            ConfigError::BootAboveMax { boot: 4, max: 2 }
        );
        assert_eq!(
            CpusConfig::parse("boot=300").unwrap_err(),
            ConfigError::TooManyVcpus(300)
        );
        let err = CpusConfig::parse("boot=x").unwrap_err().to_string();
        assert!(
            err.contains("--cpus boot=x") && err.contains("unsigned integer"),
            "{err}"
        );
        let err = CpusConfig::parse("cores=2").unwrap_err().to_string();
        assert!(err.contains("unknown key 'cores'"), "{err}");
    }

    #[test]
    fn memory() {
        assert_eq!(MemoryConfig::parse("size=512M").unwrap().size, 512 << 20);
        assert_eq!(
            MemoryConfig::parse("size=0").unwrap_err(),
            ConfigError::ZeroMemory
        );
        assert_eq!(
            MemoryConfig::parse("size=1000").unwrap_err(),
            ConfigError::UnalignedMemory(1000)
        );
        assert!(MemoryConfig::parse("size=lots").is_err());
    }

    #[test]
    fn consoles() {
        assert_eq!(
            ConsoleConfig::parse("serial", "tty").unwrap().mode,
            ConsoleOutputMode::Tty
        );
        let file = ConsoleConfig::parse("serial", "file=/tmp/x").unwrap();
        assert_eq!(file.file, Some(PathBuf::from("/tmp/x")));
        assert!(ConsoleConfig::parse("serial", "pty").is_err());
        assert!(ConsoleConfig::parse("serial", "file=").is_err());
    }

    #[test]
    fn only_one_console_may_have_the_terminal() {
        let json =
            r#"{"payload":{"kernel":"/k"},"serial":{"mode":"Tty"},"console":{"mode":"Tty"}}"#;
        let mut config: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.validate(), Err(ConfigError::DoubleTty));
        config.serial = ConsoleConfig::mode(ConsoleOutputMode::Null);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn json_matches_cloud_hypervisor_shape() {
        let json = r#"{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":536870912},
            "payload":{"kernel":"/k","cmdline":"console=ttyS0"},
            "serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#;
        let config: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert!(config.validate().is_ok());
        let bad = r#"{"payload":{"kernel":"/k"},"bogus":1}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
    }
}
