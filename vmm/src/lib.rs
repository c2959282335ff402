//! keel-vmm: a virtual machine monitor on KVM and the rust-vmm crates.
//!
//! [`run_vmm`] boots a VM from a [`VmConfig`] and/or serves the REST API,
//! and drives the VM until the guest powers off, crashes, or the user
//! quits; a guest reset boots it again in the same process. The lifecycle
//! lives in [`control`].

pub mod acpi;
pub mod api;
pub mod boot;
pub mod console;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod event_monitor;
pub mod logger;
pub mod memory;
pub mod terminal;
pub mod vm;
pub mod vm_link;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};

use keel_api::{ConfigError, VmConfig};
use keel_devices::{PlatformEvent, PlatformEvents};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use thiserror::Error;

use control::Control;
use cpu::VcpuStop;
use device_manager::DeviceError;
use event_monitor::EventMonitor;
use vm::{Hypervisor, VmError};

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
    #[error("Cannot start the API server thread")]
    ApiThread(#[source] std::io::Error),
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
    /// A request from the API socket.
    Api(api::ApiRequest),
}

/// How the VMM's life ended.
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
    /// The user quit from the console, or asked the API (`vmm.shutdown`).
    Quit,
    /// The guest reset and the VM could not be built again.
    BootFailed(String),
}

struct EventSender(Sender<VmEvent>);

impl PlatformEvents for EventSender {
    fn notify(&self, event: PlatformEvent) {
        // The receiver lives as long as the VMM; nothing to do if it is gone.
        let _ = self.0.send(VmEvent::Platform(event));
    }
}

/// What the VMM process is asked to do.
pub struct VmmOptions {
    /// A VM to create and boot at once (the command line's `--kernel` …).
    pub config: Option<VmConfig>,
    /// Serve the REST API here (`--api-socket`).
    pub api: Option<UnixListener>,
    pub events: EventMonitor,
}

/// Runs the VMM: boots the command line's VM, if any, serves the API, if
/// any, and returns when the VMM should exit.
pub fn run_vmm(options: VmmOptions) -> Result<Outcome, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)?;
    let hypervisor = Hypervisor {
        kvm,
        supported_cpuid,
    };
    let (tx, rx) = mpsc::channel();
    let published = Arc::new(api::Published::default());
    let mut control = Control::new(
        hypervisor,
        tx.clone(),
        rx,
        options.events,
        published.clone(),
    );
    if let Some(config) = options.config {
        control.create_and_boot(config)?;
    }
    if let Some(listener) = options.api {
        api::server::start(listener, tx, published).map_err(Error::ApiThread)?;
    }
    Ok(control.run())
}

/// Boots the VM and runs it to the end of its life (no API).
pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    run_vmm(VmmOptions {
        config: Some(config.clone()),
        api: None,
        events: EventMonitor::none(),
    })
}
