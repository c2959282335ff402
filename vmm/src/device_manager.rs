//! Builds the machine's devices, puts them on the buses and wires their
//! interrupts. Devices live as long as the process: a guest reset gets a
//! fresh VM (memory, vCPUs, interrupt controller) but keeps its devices, so
//! the CMOS NVRAM and the console survive a reboot as they would on a PC,
//! and disks, taps and sockets stay open.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use keel_api::vmm_api::{DeviceNode, PciDeviceInfo, VmCounters};
use keel_api::{
    ConsoleConfig, ConsoleOutputMode, DiskConfig, MEMORY_HOTPLUG_BLOCK, NetConfig, VmConfig,
    VsockConfig,
};
use keel_devices::acpi_slots::{self, AcpiSlots, SlotKind};
use keel_devices::interrupt::Interrupt;
use keel_devices::legacy::{self, Cmos, DebugPort, I8042, PvPanic, Serial};
use keel_devices::pci::hotplug::{self as pci_hotplug, PciHotplug};
use keel_devices::pci::root::{CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BUS_SIZE};
use keel_devices::pci::{ConfigIo, ConfigMmio, PciError, PciSegment};
use keel_devices::virtio::VirtioDevice;
use keel_devices::virtio::pci::{BAR_SIZE, TransportError, VirtioPciDevice};
use keel_devices::vm_link::VmLink;
use keel_devices::{Bus, BusError, PlatformEvents, acpi_ged, acpi_pm, bus::SharedDevice};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::console::ConsoleOutput;
use crate::cpu::Buses;
use crate::memory::{self, GuestMemory};
use crate::vm_link::{KvmLink, LinkError};

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("Cannot open serial output file {path}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create an interrupt eventfd")]
    Interrupt(#[source] io::Error),
    #[error("Cannot start the console output thread")]
    ConsoleThread(#[source] io::Error),
    #[error("Cannot place {name} on the I/O bus")]
    Bus {
        name: &'static str,
        #[source]
        source: BusError,
    },
    #[error("Cannot raise the ACPI event interrupt")]
    AcpiEvent(#[source] io::Error),
    #[error("Cannot connect IRQ {gsi} to KVM")]
    Irqfd {
        gsi: u32,
        #[source]
        source: io::Error,
    },
    #[error("Cannot connect the devices to the new VM")]
    Link(#[from] LinkError),
    #[error("No room left in the PCI MMIO window for {0}")]
    BarSpace(&'static str),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Rng(#[from] keel_devices::virtio::rng::RngError),
    #[error(transparent)]
    Block(#[from] keel_devices::virtio::block::BlockError),
    #[error(transparent)]
    Net(#[from] keel_devices::virtio::net::NetError),
    #[error(transparent)]
    Vsock(#[from] keel_devices::virtio::vsock::VsockError),
    #[error("Cannot open console output file {path}")]
    ConsoleFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create the pipe that carries terminal input to the virtio console")]
    ConsolePipe(#[source] io::Error),
    #[error(transparent)]
    Console(#[from] keel_devices::virtio::console::ConsoleError),
}

/// A virtio device on the PCI bus, by the id the API knows it by.
struct VirtioSlot {
    id: String,
    slot: usize,
    /// Where the VMM placed BAR 0 (the guest may have moved it since).
    bar: vm_allocator::RangeInclusive,
    transport: Arc<Mutex<VirtioPciDevice>>,
}

pub struct DeviceManager {
    buses: Buses,
    link: Arc<KvmLink>,
    serial: Option<Arc<Mutex<Serial>>>,
    serial_output: Option<ConsoleOutput>,
    ged: Arc<Mutex<acpi_ged::Ged>>,
    hotplug: Arc<Mutex<PciHotplug>>,
    cpus: Arc<Mutex<AcpiSlots>>,
    memory_blocks: Arc<Mutex<AcpiSlots>>,
    /// The current VM's memory, which a hot-plugged device starts with.
    memory: Mutex<Option<GuestMemory>>,
    pci: Arc<Mutex<PciSegment>>,
    bar_space: AddressAllocator,
    virtio: Vec<VirtioSlot>,
    console_output: Option<ConsoleOutput>,
    /// With `--console tty`: where the terminal's keystrokes go (the other
    /// end is the virtio console's input).
    console_input: Option<File>,
}

impl DeviceManager {
    pub fn new(config: &VmConfig, events: Arc<dyn PlatformEvents>) -> Result<Self, DeviceError> {
        let io = Bus::new();
        let link = Arc::new(KvmLink::new());
        let insert = |name, device: SharedDevice, port: u16, len| {
            io.insert(device, u64::from(port), len)
                .map_err(|source| DeviceError::Bus { name, source })
        };

        let serial_sink = sink(&config.serial)
            .map_err(|(path, source)| DeviceError::SerialFile { path, source })?;
        let (serial, serial_output) = match serial_sink {
            Some(sink) => {
                let interrupt = Interrupt::new().map_err(DeviceError::Interrupt)?;
                let gsi = legacy::serial::COM1_IRQ;
                link.add_irqfd(gsi, interrupt.event())
                    .map_err(|source| DeviceError::Irqfd { gsi, source })?;
                let (writer, output): (Box<dyn Write + Send>, _) = match sink {
                    Sink::Discard => (Box::new(io::sink()), None),
                    Sink::Deliver(to) => {
                        let output = ConsoleOutput::new(to).map_err(DeviceError::ConsoleThread)?;
                        (Box::new(output.writer()), Some(output))
                    }
                };
                let serial = Arc::new(Mutex::new(Serial::new(interrupt, writer)));
                insert(
                    "the COM1 UART",
                    serial.clone(),
                    legacy::serial::COM1_PORT,
                    legacy::serial::LEN,
                )?;
                (Some(serial), output)
            }
            None => (None, None),
        };

        insert(
            "the i8042 controller",
            Arc::new(Mutex::new(I8042::new(events.clone()))),
            legacy::i8042::BASE_PORT,
            legacy::i8042::LEN,
        )?;
        insert(
            "the CMOS RTC",
            Arc::new(Mutex::new(Cmos::new())),
            legacy::cmos::BASE_PORT,
            legacy::cmos::LEN,
        )?;
        insert(
            "the POST code port",
            Arc::new(Mutex::new(DebugPort::default())),
            legacy::debug_port::PORT,
            1,
        )?;
        insert(
            "the pvpanic device",
            Arc::new(Mutex::new(PvPanic::new(events.clone()))),
            legacy::pvpanic::PORT,
            1,
        )?;
        insert(
            "the ACPI platform registers",
            Arc::new(Mutex::new(acpi_pm::AcpiPlatform::new(events.clone()))),
            acpi_pm::BASE_PORT,
            acpi_pm::LEN,
        )?;
        let interrupt = Interrupt::new().map_err(DeviceError::Interrupt)?;
        let gsi = acpi_ged::IRQ;
        link.add_irqfd(gsi, interrupt.event())
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        let ged = Arc::new(Mutex::new(acpi_ged::Ged::new(interrupt)));
        insert(
            "the ACPI Generic Event Device",
            ged.clone(),
            acpi_ged::BASE_PORT,
            acpi_ged::LEN,
        )?;
        let cpus = Arc::new(Mutex::new(AcpiSlots::new(
            SlotKind::Cpu,
            usize::from(config.cpus.boot_vcpus),
            usize::from(config.cpus.max_vcpus),
            events.clone(),
        )));
        insert(
            "the CPU hot-plug registers",
            cpus.clone(),
            acpi_slots::CPU_PORT,
            acpi_slots::LEN,
        )?;
        let plugged = config.memory.hotplugged_size.unwrap_or(0) / MEMORY_HOTPLUG_BLOCK;
        let memory_blocks = Arc::new(Mutex::new(AcpiSlots::new(
            SlotKind::Memory,
            plugged as usize,
            config.memory.hotplug_blocks(),
            events.clone(),
        )));
        insert(
            "the memory hot-plug registers",
            memory_blocks.clone(),
            acpi_slots::MEMORY_PORT,
            acpi_slots::LEN,
        )?;
        let hotplug = Arc::new(Mutex::new(PciHotplug::new(events.clone())));
        insert(
            "the PCI hot-plug registers",
            hotplug.clone(),
            pci_hotplug::BASE_PORT,
            pci_hotplug::LEN,
        )?;

        let mmio = Arc::new(Bus::new());
        let pci = Arc::new(Mutex::new(PciSegment::new(mmio.clone())));
        insert(
            "the PCI configuration ports",
            Arc::new(Mutex::new(ConfigIo::new(pci.clone()))),
            CONFIG_IO_PORT,
            CONFIG_IO_LEN,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(ConfigMmio::new(pci.clone()))),
            memory::PCI_ECAM_START,
            ECAM_BUS_SIZE,
        )
        .map_err(|source| DeviceError::Bus {
            name: "PCI ECAM",
            source,
        })?;
        let bar_space = AddressAllocator::new(memory::PCI_MMIO32_START, memory::PCI_MMIO32_SIZE)
            .map_err(|_| DeviceError::BarSpace("the PCI window"))?;

        let mut manager = DeviceManager {
            buses: Buses {
                io: Arc::new(io),
                mmio,
            },
            link,
            serial,
            serial_output,
            ged,
            hotplug,
            cpus,
            memory_blocks,
            memory: Mutex::new(None),
            pci,
            bar_space,
            virtio: Vec::new(),
            console_output: None,
            console_input: None,
        };
        for (id, device) in virtio_devices(config)? {
            manager.add_virtio(id, device)?;
        }
        manager.add_console(&config.console)?;
        Ok(manager)
    }

    /// Puts a virtio device on the PCI bus behind its own transport;
    /// returns its slot.
    fn add_virtio(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
    ) -> Result<usize, DeviceError> {
        let name = device.name();
        let range = self
            .bar_space
            .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| DeviceError::BarSpace(name))?;
        let link: Arc<dyn VmLink> = self.link.clone();
        let transport = Arc::new(Mutex::new(VirtioPciDevice::new(
            device,
            range.start(),
            link,
        )?));
        let slot = keel_devices::bus::lock(&self.pci).add(transport.clone())?;
        log::info!(
            "{name} {id} at PCI 00:{slot:02x}.0, BAR0 {:#x}",
            range.start()
        );
        if let Some(memory) = lock_memory(&self.memory).as_ref() {
            keel_devices::bus::lock(&transport).set_memory(memory.clone());
        }
        self.virtio.push(VirtioSlot {
            id,
            slot,
            bar: range,
            transport,
        });
        Ok(slot)
    }

    /// The virtio console (`--console`), the guest's hvc0. With `tty` its
    /// input comes from the terminal through a pipe
    /// ([`take_console_input`](Self::take_console_input)), and the guest
    /// learns the terminal's size.
    fn add_console(&mut self, config: &ConsoleConfig) -> Result<(), DeviceError> {
        use keel_devices::virtio::console::Console;
        let Some(sink) =
            sink(config).map_err(|(path, source)| DeviceError::ConsoleFile { path, source })?
        else {
            return Ok(());
        };
        let output: Box<dyn Write + Send> = match sink {
            Sink::Discard => Box::new(io::sink()),
            Sink::Deliver(to) => {
                let output = ConsoleOutput::new(to).map_err(DeviceError::ConsoleThread)?;
                let writer = output.writer();
                self.console_output = Some(output);
                Box::new(writer)
            }
        };
        let console = if config.mode == ConsoleOutputMode::Tty {
            let (read, write) = input_pipe().map_err(DeviceError::ConsolePipe)?;
            self.console_input = Some(write);
            let console = Console::new(output, Some(read))?;
            match terminal_size() {
                Some((cols, rows)) => console.with_size(cols, rows),
                None => console,
            }
        } else {
            Console::new(output, None)?
        };
        self.add_virtio(CONSOLE_ID.to_string(), Box::new(console))
            .map(drop)
    }

    /// The write end of the virtio console's input (`--console tty`), for
    /// the thread that reads the terminal.
    pub fn take_console_input(&mut self) -> Option<File> {
        self.console_input.take()
    }

    pub fn buses(&self) -> Buses {
        self.buses.clone()
    }

    pub fn serial(&self) -> Option<Arc<Mutex<Serial>>> {
        self.serial.clone()
    }

    /// Connects the devices to a newly created VM: interrupt lines,
    /// doorbells and guest memory.
    pub fn attach(&self, vm: Arc<VmFd>, memory: &GuestMemory) -> Result<(), DeviceError> {
        self.link.attach(vm)?;
        for v in &self.virtio {
            keel_devices::bus::lock(&v.transport).set_memory(memory.clone());
        }
        *lock_memory(&self.memory) = Some(memory.clone());
        Ok(())
    }

    /// Hot-plugs a disk, NIC or vsock device into the running VM: it is put
    /// in a free slot and the guest is told through ACPI (the GED's PCI
    /// event), which makes it scan the slot.
    pub fn hotplug(&mut self, device: HotplugDevice<'_>) -> Result<Hotplugged, DeviceError> {
        let mut tap = None;
        let (id, virtio): NamedDevice = match device {
            HotplugDevice::Disk(disk) => (
                disk.id.clone().unwrap_or_default(),
                Box::new(keel_devices::virtio::block::Block::new(disk)?),
            ),
            HotplugDevice::Net(net, index, fds) => {
                let nic = keel_devices::virtio::net::Net::with_taps(net, index, fds)?;
                tap = Some(nic.tap_name().to_string());
                (net.id.clone().unwrap_or_default(), Box::new(nic))
            }
            HotplugDevice::Vsock(vsock) => (
                vsock.id.clone().unwrap_or_default(),
                Box::new(keel_devices::virtio::vsock::Vsock::new(vsock)?),
            ),
        };
        let slot = self.add_virtio(id.clone(), virtio)?;
        keel_devices::bus::lock(&self.hotplug).inserted(slot);
        keel_devices::bus::lock(&self.ged)
            .notify(acpi_ged::PCI_HOTPLUG)
            .map_err(DeviceError::AcpiEvent)?;
        Ok(Hotplugged {
            info: PciDeviceInfo { id, bdf: bdf(slot) },
            tap,
        })
    }

    /// The machine is about to boot again with `boot` vCPUs (its count
    /// after any resize).
    pub fn reset_cpus(&self, boot: u8) {
        keel_devices::bus::lock(&self.cpus).reset(usize::from(boot));
    }

    /// Plugs in hot-pluggable memory up to `plugged` bytes of the room
    /// (blocks already in stay; memory is never taken away) and tells the
    /// guest through the GED's memory event.
    pub fn plug_memory(&self, plugged: u64) -> Result<(), DeviceError> {
        let blocks = (plugged / MEMORY_HOTPLUG_BLOCK) as usize;
        let mut slots = keel_devices::bus::lock(&self.memory_blocks);
        for block in slots.enabled()..blocks {
            slots.insert(block);
        }
        drop(slots);
        keel_devices::bus::lock(&self.ged)
            .notify(acpi_ged::MEMORY_HOTPLUG)
            .map_err(DeviceError::AcpiEvent)
    }

    /// CPUs the guest has now.
    pub fn enabled_cpus(&self) -> u8 {
        u8::try_from(keel_devices::bus::lock(&self.cpus).enabled()).unwrap_or(u8::MAX)
    }

    /// Tells the guest CPU `id` was added (its vCPU already runs) or that
    /// it should let it go; the GED's CPU event makes it look.
    pub fn cpu_changed(&self, id: u8, added: bool) -> Result<(), DeviceError> {
        let mut cpus = keel_devices::bus::lock(&self.cpus);
        if added {
            cpus.insert(usize::from(id));
        } else {
            cpus.request_removal(usize::from(id));
        }
        drop(cpus);
        keel_devices::bus::lock(&self.ged)
            .notify(acpi_ged::CPU_HOTPLUG)
            .map_err(DeviceError::AcpiEvent)
    }

    /// Grows the running disk `id` to `bytes`; the guest is told through a
    /// configuration-change interrupt. `Ok(false)`: no such device.
    pub fn resize_disk(&self, id: &str, bytes: u64) -> Result<bool, String> {
        let Some(v) = self.virtio.iter().find(|v| v.id == id) else {
            return Ok(false);
        };
        keel_devices::bus::lock(&v.transport).resize(bytes)?;
        Ok(true)
    }

    /// Asks the guest to release the device `id`; it goes when the guest
    /// ejects it ([`unplugged`](Self::unplugged)). False: no such device.
    pub fn request_unplug(&self, id: &str) -> Result<bool, DeviceError> {
        let Some(v) = self.virtio.iter().find(|v| v.id == id) else {
            return Ok(false);
        };
        keel_devices::bus::lock(&self.hotplug).eject_requested(v.slot);
        keel_devices::bus::lock(&self.ged)
            .notify(acpi_ged::PCI_HOTPLUG)
            .map_err(DeviceError::AcpiEvent)?;
        Ok(true)
    }

    /// The guest ejected `slot`: the device leaves the bus, its BAR space
    /// is freed and, once dropped here, its file or tap is closed. Returns
    /// its id.
    pub fn unplugged(&mut self, slot: u8) -> Option<String> {
        let slot = usize::from(slot);
        let index = self.virtio.iter().position(|v| v.slot == slot)?;
        let removed = self.virtio.remove(index);
        keel_devices::bus::lock(&self.pci).remove(slot);
        if let Err(e) = self.bar_space.free(&removed.bar) {
            log::warn!("Cannot free the BAR space of {}: {e}", removed.id);
        }
        Some(removed.id)
    }

    /// Presses the ACPI power button: a guest that handles it (systemd-logind,
    /// acpid) shuts down cleanly; one that does not, or has not booted far
    /// enough to, ignores it, so the press is only a request.
    pub fn power_button(&self) -> Result<(), DeviceError> {
        keel_devices::bus::lock(&self.ged)
            .notify(acpi_ged::POWER_BUTTON)
            .map_err(DeviceError::AcpiEvent)
    }

    /// The machine was reset or switched off: every device back to its
    /// power-on state (queue workers stopped), the old VM let go.
    pub fn reset(&self) {
        keel_devices::bus::lock(&self.ged).reset();
        keel_devices::bus::lock(&self.hotplug).reset();

        keel_devices::bus::lock(&self.pci).reset();
        self.link.detach();
    }

    /// The devices `vm.counters` reads, by id (the API server reads them
    /// without the control loop).
    pub fn counter_sources(&self) -> Vec<(String, Arc<Mutex<VirtioPciDevice>>)> {
        self.virtio
            .iter()
            .map(|v| (v.id.clone(), v.transport.clone()))
            .collect()
    }

    /// Each device's live statistics (`vm.counters`), by device id.
    pub fn counters(&self) -> VmCounters {
        let mut all = VmCounters::new();
        for v in &self.virtio {
            let counters = keel_devices::bus::lock(&v.transport).counters();
            if !counters.is_empty() {
                let named = counters.into_iter().map(|(k, n)| (k.to_string(), n));
                all.insert(v.id.clone(), named.collect());
            }
        }
        all
    }

    /// The devices by id with their PCI addresses (`vm.info`).
    pub fn device_tree(&self) -> BTreeMap<String, DeviceNode> {
        self.virtio
            .iter()
            .map(|v| {
                let node = DeviceNode {
                    id: v.id.clone(),
                    pci_bdf: Some(bdf(v.slot)),
                    ..Default::default()
                };
                (v.id.clone(), node)
            })
            .collect()
    }

    /// Stops every device and delivers all pending console output.
    pub fn finish(&mut self) {
        self.reset();
        for output in [&mut self.serial_output, &mut self.console_output] {
            if let Some(output) = output.as_mut() {
                output.finish();
            }
        }
        // The PCI segment and the MMIO bus point at each other (ECAM on the
        // bus, BARs placed by the segment): break the cycle so the devices
        // are dropped now — disk images closed and unlocked, taps released,
        // vsock sockets removed — and a later vm.boot can open them again.
        keel_devices::bus::lock(&self.pci).clear();
        self.virtio.clear();
        self.buses.mmio.clear();
        self.buses.io.clear();
    }
}

/// What a hot-plug placed: the device's id and PCI address, and for a NIC
/// its tap's name (found from the fds when those were passed).
pub struct Hotplugged {
    pub info: PciDeviceInfo,
    pub tap: Option<String>,
}

/// A device to hot-plug, from its configuration.
pub enum HotplugDevice<'a> {
    Disk(&'a DiskConfig),
    /// A NIC, its index among the VM's NICs (its default MAC follows it),
    /// and tap queues passed with the request (or none: open `tap=`).
    Net(&'a NetConfig, usize, Vec<OwnedFd>),
    Vsock(&'a VsockConfig),
}

fn bdf(slot: usize) -> String {
    format!("0000:00:{slot:02x}.0")
}

fn lock_memory(m: &Mutex<Option<GuestMemory>>) -> std::sync::MutexGuard<'_, Option<GuestMemory>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ids of the devices a configuration cannot name (Cloud Hypervisor's).
const RNG_ID: &str = "__rng";
const CONSOLE_ID: &str = "__console";

type NamedDevice = (String, Box<dyn VirtioDevice>);

/// The virtio devices the configuration asks for, in PCI slot order, with
/// their ids (unnamed ones as [`VmConfig::assign_device_ids`] names them).
fn virtio_devices(config: &VmConfig) -> Result<Vec<NamedDevice>, DeviceError> {
    let mut config = config.clone();
    config.assign_device_ids();
    let id = |id: &Option<String>| id.clone().unwrap_or_default();
    let mut devices: Vec<NamedDevice> = Vec::new();
    if let Some(rng) = &config.rng {
        let rng = keel_devices::virtio::rng::Rng::new(rng)?;
        devices.push((RNG_ID.to_string(), Box::new(rng)));
    }
    for disk in &config.disks {
        let block = keel_devices::virtio::block::Block::new(disk)?;
        devices.push((id(&disk.id), Box::new(block)));
    }
    for (index, net) in config.net.iter().enumerate() {
        let nic = keel_devices::virtio::net::Net::new(net, index)?;
        devices.push((id(&net.id), Box::new(nic)));
    }
    if let Some(vsock) = &config.vsock {
        let device = keel_devices::virtio::vsock::Vsock::new(vsock)?;
        devices.push((id(&vsock.id), Box::new(device)));
    }
    Ok(devices)
}

enum Sink {
    Discard,
    Deliver(Box<dyn Write + Send>),
}

/// Where a console's output goes (`--serial`, `--console`); a file that
/// cannot be opened comes back with its path.
fn sink(config: &ConsoleConfig) -> Result<Option<Sink>, (PathBuf, io::Error)> {
    Ok(match config.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Sink::Discard),
        ConsoleOutputMode::Tty => Some(Sink::Deliver(Box::new(io::stdout()))),
        ConsoleOutputMode::File => {
            let path = config.file.clone().unwrap_or_default();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| (path, source))?;
            Some(Sink::Deliver(Box::new(file)))
        }
    })
}

/// A pipe for terminal input: (read end for the device, non-blocking write
/// end for the terminal thread, so a guest that reads nothing cannot stall
/// the quit keys).
fn input_pipe() -> io::Result<(OwnedFd, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by no one else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFL on a descriptor we own.
    if unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((read, write))
}

/// The terminal's size (columns, rows), when stdout is one.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: a zeroed winsize is a valid buffer for TIOCGWINSZ to fill.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer given.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}
