//! `keel vmm --socket PATH <command>`: drives one keel-vmm (or Cloud
//! Hypervisor) through its API socket, with ch-remote's argument syntax.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use keel_api::client::{ClientError, VmmClient};
use keel_api::options::parse_size;
use keel_api::vmm_api::{DeviceConfig, Endpoint, PciDeviceInfo, VmInfo, VmResize, VmResizeDisk};
use keel_api::{DiskConfig, NetConfig, VmConfig, VsockConfig};

#[derive(Subcommand)]
pub enum VmmCommand {
    /// Check that the VMM answers.
    Ping,
    /// Create the VM from a JSON VmConfig file ('-' reads stdin).
    Create {
        file: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Show the VM's configuration, state and devices.
    Info,
    /// Show per-device counters.
    Counters,
    Pause,
    Resume,
    /// Stop the VM (its configuration stays; boot starts it again).
    Shutdown,
    /// Reset the VM.
    Reboot,
    /// Press the ACPI power button (the guest shuts down cleanly).
    PowerButton,
    /// Shut down and forget the VM.
    Delete,
    /// Stop the VMM process.
    ShutdownVmm,
    /// Add a disk: path=FILE[,readonly=on][,direct=on][,id=NAME]...
    AddDisk {
        disk: String,
    },
    /// Add a NIC: tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,id=NAME]...
    AddNet {
        net: String,
    },
    /// Add a vsock device: cid=N,socket=PATH[,id=NAME]
    AddVsock {
        vsock: String,
    },
    /// Pass a host device through: path=/sys/bus/pci/devices/...[,id=NAME]
    AddDevice {
        device: String,
    },
    /// Remove a device by id.
    RemoveDevice {
        id: String,
    },
    /// Change vCPUs and/or memory.
    Resize {
        #[arg(long, value_name = "N")]
        cpus: Option<u8>,
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
        #[arg(long, value_name = "SIZE")]
        balloon: Option<String>,
    },
    /// Grow a disk.
    ResizeDisk {
        #[arg(long, value_name = "ID")]
        disk: String,
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Input(String),
}

fn size(what: &str, value: &str) -> Result<u64, Error> {
    parse_size(value).ok_or_else(|| {
        Error::Input(format!(
            "{what} {value}: expected a size such as 512M or 2G"
        ))
    })
}

fn read_config(file: &Path) -> Result<VmConfig, Error> {
    let mut text = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(file).map(|t| text = t)
    };
    read.map_err(|e| Error::Input(format!("cannot read {}: {e}", file.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{} is not a valid VmConfig: {e}", file.display())))
}

fn print_added(json: bool, added: Option<PciDeviceInfo>) {
    match (json, added) {
        (true, Some(info)) => println!("{}", serde_json::to_string(&info).unwrap_or_default()),
        (false, Some(info)) => println!("{} at {}", info.id, info.bdf),
        (_, None) => {}
    }
}

fn print_info(info: &VmInfo) {
    let c = &info.config;
    println!("state:   {:?}", info.state);
    println!("vcpus:   {} (max {})", c.cpus.boot_vcpus, c.cpus.max_vcpus);
    println!("memory:  {} MiB", info.memory_actual_size >> 20);
    if let Some(kernel) = &c.payload.kernel {
        println!("kernel:  {}", kernel.display());
    }
    if let Some(cmdline) = &c.payload.cmdline {
        println!("cmdline: {cmdline}");
    }
    let bdf = |id: &Option<String>| {
        id.as_ref()
            .and_then(|id| info.device_tree.get(id))
            .and_then(|n| n.pci_bdf.clone())
            .unwrap_or_else(|| "-".into())
    };
    let name = |id: &Option<String>| id.clone().unwrap_or_else(|| "-".into());
    for d in &c.disks {
        let ro = if d.readonly { " (read-only)" } else { "" };
        println!(
            "disk:    {:<10} {:<13} {}{ro}",
            name(&d.id),
            bdf(&d.id),
            d.path.display()
        );
    }
    for n in &c.net {
        println!(
            "net:     {:<10} {:<13} tap {}",
            name(&n.id),
            bdf(&n.id),
            n.tap.as_deref().unwrap_or("-")
        );
    }
    if let Some(v) = &c.vsock {
        println!(
            "vsock:   {:<10} {:<13} cid {} socket {}",
            name(&v.id),
            bdf(&v.id),
            v.cid,
            v.socket.display()
        );
    }
}

pub fn run(socket: &Path, json: bool, command: VmmCommand) -> Result<(), Error> {
    let mut client = VmmClient::connect(socket)?;
    let input = |e: keel_api::ConfigError| Error::Input(e.to_string());
    match command {
        VmmCommand::Ping => {
            let ping = client.ping()?;
            if json {
                println!("{}", serde_json::to_string(&ping).unwrap_or_default());
            } else {
                println!("keel-vmm {} (pid {})", ping.version, ping.pid);
            }
        }
        VmmCommand::Create { file } => client.create(&read_config(&file)?)?,
        VmmCommand::Boot => client.action(Endpoint::VmBoot)?,
        VmmCommand::Pause => client.action(Endpoint::VmPause)?,
        VmmCommand::Resume => client.action(Endpoint::VmResume)?,
        VmmCommand::Shutdown => client.action(Endpoint::VmShutdown)?,
        VmmCommand::Reboot => client.action(Endpoint::VmReboot)?,
        VmmCommand::PowerButton => client.action(Endpoint::VmPowerButton)?,
        VmmCommand::Delete => client.action(Endpoint::VmDelete)?,
        VmmCommand::ShutdownVmm => client.shutdown_vmm()?,
        VmmCommand::Info => {
            let info = client.info()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).unwrap_or_default()
                );
            } else {
                print_info(&info);
            }
        }
        VmmCommand::Counters => {
            let counters = client.counters()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&counters).unwrap_or_default()
                );
            } else {
                for (device, values) in counters {
                    let line: Vec<String> =
                        values.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("{device}: {}", line.join(" "));
                }
            }
        }
        VmmCommand::AddDisk { disk } => {
            let disk = DiskConfig::parse(&disk).map_err(input)?;
            print_added(json, client.add_disk(&disk)?);
        }
        VmmCommand::AddNet { net } => {
            let net = NetConfig::parse(&net).map_err(input)?;
            print_added(json, client.add_net(&net, &[])?);
        }
        VmmCommand::AddVsock { vsock } => {
            let vsock = VsockConfig::parse(&vsock).map_err(input)?;
            print_added(json, client.add_vsock(&vsock)?);
        }
        VmmCommand::AddDevice { device } => {
            let values = keel_api::options::OptionValues::parse(&device, &["path", "id", "iommu"])
                .map_err(|e| Error::Input(format!("add-device {device}: {e}")))?;
            let path = values
                .get("path")
                .ok_or_else(|| Error::Input("add-device needs path=SYSFS_PATH".into()))?;
            let config = DeviceConfig {
                path: PathBuf::from(path),
                iommu: values.get("iommu") == Some("on"),
                pci_segment: 0,
                id: values.get("id").map(str::to_string),
            };
            print_added(json, client.add_device(&config)?);
        }
        VmmCommand::RemoveDevice { id } => client.remove_device(&id)?,
        VmmCommand::Resize {
            cpus,
            memory,
            balloon,
        } => {
            let resize = VmResize {
                desired_vcpus: cpus,
                desired_ram: memory.map(|m| size("--memory", &m)).transpose()?,
                desired_balloon: balloon.map(|b| size("--balloon", &b)).transpose()?,
            };
            if resize == VmResize::default() {
                return Err(Error::Input(
                    "resize needs --cpus, --memory or --balloon".into(),
                ));
            }
            client.resize(&resize)?;
        }
        VmmCommand::ResizeDisk { disk, size: s } => {
            let resize = VmResizeDisk {
                id: disk,
                desired_size: size("--size", &s)?,
            };
            client.resize_disk(&resize)?;
        }
    }
    Ok(())
}
