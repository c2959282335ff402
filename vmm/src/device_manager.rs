//! Builds the machine's devices, puts them on the buses and wires their
//! interrupts. Devices live as long as the process: a guest reset gets a
//! fresh VM (memory, vCPUs, interrupt controller) but keeps its devices, so
//! the CMOS NVRAM and the console survive a reboot as they would on a PC.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use keel_api::{ConsoleOutputMode, VmConfig};
use keel_devices::interrupt::Interrupt;
use keel_devices::legacy::{self, Cmos, DebugPort, I8042, PvPanic, Serial};
use keel_devices::{Bus, BusError, PlatformEvents, acpi_pm, bus::SharedDevice};
use kvm_ioctls::VmFd;
use thiserror::Error;

use crate::console::ConsoleOutput;
use crate::cpu::Buses;

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
    #[error("Cannot connect IRQ {gsi} to KVM")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct DeviceManager {
    buses: Buses,
    serial: Option<Arc<Mutex<Serial>>>,
    /// Interrupt lines to connect to each new VM: (GSI, eventfd).
    interrupts: Vec<(u32, Interrupt)>,
    serial_output: Option<ConsoleOutput>,
}

impl DeviceManager {
    pub fn new(config: &VmConfig, events: Arc<dyn PlatformEvents>) -> Result<Self, DeviceError> {
        let mut io = Bus::new();
        let mut interrupts = Vec::new();
        let mut insert = |name, device: SharedDevice, port: u16, len| {
            io.insert(device, u64::from(port), len)
                .map_err(|source| DeviceError::Bus { name, source })
        };

        let (serial, serial_output) = match serial_sink(config)? {
            Some(sink) => {
                let interrupt = Interrupt::new().map_err(DeviceError::Interrupt)?;
                interrupts.push((
                    legacy::serial::COM1_IRQ,
                    interrupt.try_clone().map_err(DeviceError::Interrupt)?,
                ));
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
            Arc::new(Mutex::new(acpi_pm::AcpiPlatform::new(events))),
            acpi_pm::BASE_PORT,
            acpi_pm::LEN,
        )?;

        Ok(DeviceManager {
            buses: Buses {
                io: Arc::new(io),
                mmio: Arc::new(Bus::new()),
            },
            serial,
            interrupts,
            serial_output,
        })
    }

    pub fn buses(&self) -> Buses {
        self.buses.clone()
    }

    pub fn serial(&self) -> Option<Arc<Mutex<Serial>>> {
        self.serial.clone()
    }

    /// Connects the devices' interrupt lines to a newly created VM.
    pub fn attach(&self, vm: &VmFd) -> Result<(), DeviceError> {
        for (gsi, interrupt) in &self.interrupts {
            vm.register_irqfd(interrupt.event(), *gsi)
                .map_err(|source| DeviceError::Irqfd { gsi: *gsi, source })?;
        }
        Ok(())
    }

    /// Delivers all pending console output.
    pub fn finish(&mut self) {
        if let Some(output) = self.serial_output.as_mut() {
            output.finish();
        }
    }
}

enum Sink {
    Discard,
    Deliver(Box<dyn Write + Send>),
}

fn serial_sink(config: &VmConfig) -> Result<Option<Sink>, DeviceError> {
    Ok(match config.serial.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Sink::Discard),
        ConsoleOutputMode::Tty => Some(Sink::Deliver(Box::new(io::stdout()))),
        ConsoleOutputMode::File => {
            let path = config.serial.file.clone().unwrap_or_default();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| DeviceError::SerialFile { path, source })?;
            Some(Sink::Deliver(Box::new(file)))
        }
    })
}
