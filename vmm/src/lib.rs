//! keel-vmm: a virtual machine monitor on KVM and the rust-vmm crates.
//!
//! [`run`] boots a VM from a [`VmConfig`] and drives it until the guest
//! powers off, crashes, or the user quits; a guest reset boots it again in
//! the same process.

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod device_manager;
pub mod logger;
pub mod memory;
pub mod terminal;
pub mod vm;
pub mod vm_link;

use std::sync::Arc;
use std::sync::mpsc::{self, Sender};

use keel_api::{ConfigError, ConsoleOutputMode, VmConfig};
use keel_devices::{PlatformEvent, PlatformEvents};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use thiserror::Error;

use cpu::VcpuStop;
use device_manager::{DeviceError, DeviceManager};
use vm::{Hypervisor, Vm, VmError};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Cannot open /dev/kvm: is KVM enabled on this host, and may this user use it?")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("Cannot start the console input thread")]
    ConsoleInput(#[source] std::io::Error),
}

/// Something the control loop must react to.
#[derive(Debug)]
pub enum VmEvent {
    Platform(PlatformEvent),
    VcpuStopped {
        id: u8,
        reason: VcpuStop,
    },
    /// The user typed the quit sequence on the serial console.
    ConsoleQuit,
}

/// How a VM's life ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    PoweredOff,
    /// The guest kernel reported a panic through pvpanic.
    GuestPanicked,
    /// The guest stopped in a way a real machine would not survive.
    Crashed {
        vcpu: u8,
        reason: VcpuStop,
    },
    /// The user quit from the console.
    Quit,
}

struct EventSender(Sender<VmEvent>);

impl PlatformEvents for EventSender {
    fn notify(&self, event: PlatformEvent) {
        // The receiver lives as long as the VM; nothing to do if it is gone.
        let _ = self.0.send(VmEvent::Platform(event));
    }
}

/// Boots the VM and runs it to the end of its life.
pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    config.validate()?;
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)?;
    let hypervisor = Hypervisor {
        kvm,
        supported_cpuid,
    };
    hypervisor.check(config)?;

    let (events_tx, events) = mpsc::channel();
    let mut devices = DeviceManager::new(config, Arc::new(EventSender(events_tx.clone())))?;
    // The terminal's keys go to whichever console has it (validate() lets
    // only one have it).
    let _raw_terminal = match (config.serial.mode, devices.serial()) {
        (ConsoleOutputMode::Tty, Some(serial)) => {
            terminal::spawn_input(serial, events_tx.clone()).map_err(Error::ConsoleInput)?;
            terminal::RawTerminal::enable()
        }
        _ => match devices.take_console_input() {
            Some(pipe) => {
                terminal::spawn_input_pipe(pipe, events_tx.clone()).map_err(Error::ConsoleInput)?;
                terminal::RawTerminal::enable()
            }
            None => None,
        },
    };

    let mut boots = 0u32;
    let outcome = loop {
        let vm = Vm::new(&hypervisor, config, &devices)?;
        boots += 1;
        log::info!("Boot {boots}: starting {} vCPU(s)", config.cpus.boot_vcpus);
        let running = vm.start(events_tx.clone())?;
        // The sender half lives in `events_tx`, so this cannot disconnect.
        let Ok(event) = events.recv() else {
            break Outcome::Quit;
        };
        log::debug!("Control event: {event:?}");
        running.stop();
        devices.reset();
        let event = match event {
            VmEvent::VcpuStopped {
                reason: VcpuStop::Platform(event),
                ..
            } => VmEvent::Platform(event),
            other => other,
        };
        match event {
            VmEvent::Platform(PlatformEvent::Reset) => {
                log::info!("Guest reset: booting again");
                // Requests raised by the old boot's vCPUs are moot now.
                while events.try_recv().is_ok() {}
            }
            VmEvent::Platform(PlatformEvent::PowerOff) => break Outcome::PoweredOff,
            VmEvent::Platform(PlatformEvent::GuestPanic) => break Outcome::GuestPanicked,
            VmEvent::VcpuStopped { id, reason } => break Outcome::Crashed { vcpu: id, reason },
            VmEvent::ConsoleQuit => break Outcome::Quit,
        }
    };
    devices.finish();
    Ok(outcome)
}
