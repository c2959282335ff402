//! The control loop: owns the VM's lifecycle and answers the API.
//!
//! Everything that changes the VM arrives on one channel — requests from
//! the API socket, and what the guest and its vCPUs report (reset, power
//! off, panic, crash) — and is handled here in order, on one thread, so no
//! two changes ever race.
//!
//! States follow Cloud Hypervisor's: nothing → Created (`vm.create`) →
//! Running ⇄ Paused → Shutdown (`vm.shutdown`), and back to nothing with
//! `vm.delete`. A guest that powers itself off, panics or crashes ends the
//! VMM process, as it does Cloud Hypervisor's.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use keel_api::ConsoleOutputMode;
use keel_api::http::Response;
use keel_api::vmm_api::{VmInfo, VmResize, VmResizeDisk, VmState};
use keel_api::{MEMORY_HOTPLUG_BLOCK, VmConfig};
use keel_devices::PlatformEvent;

use crate::api::{ApiAction, ApiRequest, Published};
use crate::cpu::VcpuStop;
use crate::device_manager::{DeviceManager, HotplugDevice, Hotplugged};
use crate::event_monitor::EventMonitor;
use crate::terminal;
use crate::vm::{Hypervisor, RunningVm, Vm};
use crate::{Error, EventSender, Outcome, VmEvent};
use keel_api::events::EventKind;

/// A booted VM: its devices and its vCPUs.
struct Booted {
    config: VmConfig,
    devices: DeviceManager,
    /// None only between a reset's teardown and the next boot.
    vm: Option<RunningVm>,
    boots: u32,
    _raw_terminal: Option<terminal::RawTerminal>,
}

enum Machine {
    Empty,
    Created(Box<VmConfig>),
    Running(Box<Booted>),
    Shutdown(Box<VmConfig>),
}

impl Machine {
    fn config(&self) -> Option<&VmConfig> {
        match self {
            Machine::Empty => None,
            Machine::Created(c) | Machine::Shutdown(c) => Some(c),
            Machine::Running(b) => Some(&b.config),
        }
    }
}

pub struct Control {
    published: Arc<Published>,
    hypervisor: Hypervisor,
    tx: Sender<VmEvent>,
    rx: Receiver<VmEvent>,
    machine: Machine,
    monitor: EventMonitor,
}

/// What handling one event decided.
enum Next {
    Continue,
    Exit(Outcome),
}

fn error_chain(err: &dyn std::error::Error) -> Vec<String> {
    let mut messages = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        messages.push(cause.to_string());
        source = cause.source();
    }
    messages
}

fn status(code: u16, message: impl Into<String>) -> Response {
    Response::error(code, &[message.into()])
}

fn not_created() -> Response {
    status(404, "The VM is not created; PUT vm.create first")
}

fn wrong_state(what: &str, state: VmState) -> Response {
    status(405, format!("Cannot {what}: the VM is {state:?}"))
}

impl Control {
    pub fn new(
        hypervisor: Hypervisor,
        tx: Sender<VmEvent>,
        rx: Receiver<VmEvent>,
        monitor: EventMonitor,
        published: Arc<Published>,
    ) -> Self {
        monitor.vmm(EventKind::Starting);
        Control {
            published,
            hypervisor,
            tx,
            rx,
            machine: Machine::Empty,
            monitor,
        }
    }

    fn state(&self) -> Option<VmState> {
        Some(match &self.machine {
            Machine::Empty => return None,
            Machine::Created(_) => VmState::Created,
            Machine::Shutdown(_) => VmState::Shutdown,
            Machine::Running(b) if b.vm.as_ref().is_some_and(RunningVm::is_paused) => {
                VmState::Paused
            }
            Machine::Running(_) => VmState::Running,
        })
    }

    /// Creates and boots `config` (the command line's VM).
    pub fn create_and_boot(&mut self, mut config: VmConfig) -> Result<(), Error> {
        config.assign_device_ids();
        self.machine = Machine::Created(Box::new(config));
        let booted = self.boot();
        self.publish();
        booted
    }

    /// Serves events until the VMM should exit.
    pub fn run(mut self) -> Outcome {
        let outcome = loop {
            // `self.tx` keeps the channel open, so recv cannot fail.
            let Ok(event) = self.rx.recv() else {
                break Outcome::Quit;
            };
            let next = match event {
                VmEvent::Api(request) => self.api(request),
                other => {
                    let next = self.guest_event(other);
                    self.publish();
                    next
                }
            };
            if let Next::Exit(outcome) = next {
                break outcome;
            }
        };
        self.shutdown_vm();
        self.monitor.vmm(EventKind::Shutdown);
        outcome
    }

    fn boot(&mut self) -> Result<(), Error> {
        let config = match std::mem::replace(&mut self.machine, Machine::Empty) {
            Machine::Created(c) | Machine::Shutdown(c) => c,
            other => {
                self.machine = other;
                return Ok(());
            }
        };
        self.monitor.vm(EventKind::Booting);
        match self.start(&config) {
            Ok((devices, vm, raw)) => {
                self.machine = Machine::Running(Box::new(Booted {
                    config: *config,
                    devices,
                    vm: Some(vm),
                    boots: 1,
                    _raw_terminal: raw,
                }));
                self.monitor.vm(EventKind::Booted);
                Ok(())
            }
            Err(e) => {
                self.machine = Machine::Created(config);
                Err(e)
            }
        }
    }

    fn start(
        &self,
        config: &VmConfig,
    ) -> Result<(DeviceManager, RunningVm, Option<terminal::RawTerminal>), Error> {
        config.validate()?;
        self.hypervisor.check(config)?;
        let mut devices = DeviceManager::new(config, Arc::new(EventSender(self.tx.clone())))?;
        // The terminal's keys go to whichever console has it (validate()
        // lets only one have it).
        let raw = match (config.serial.mode, devices.serial()) {
            (ConsoleOutputMode::Tty, Some(serial)) => {
                terminal::spawn_input(serial, self.tx.clone()).map_err(Error::ConsoleInput)?;
                terminal::RawTerminal::enable()
            }
            _ => match devices.take_console_input() {
                Some(pipe) => {
                    terminal::spawn_input_pipe(pipe, self.tx.clone())
                        .map_err(Error::ConsoleInput)?;
                    terminal::RawTerminal::enable()
                }
                None => None,
            },
        };
        let vm = Vm::new(&self.hypervisor, config, &devices)?;
        log::info!("Boot 1: starting {} vCPU(s)", config.cpus.boot_vcpus);
        let running = vm.start(self.tx.clone())?;
        Ok((devices, running, raw))
    }

    /// Resets the running machine and boots it again in place (a guest
    /// reset, or `vm.reboot`).
    fn reboot(&mut self) -> Result<(), Error> {
        let Machine::Running(booted) = &mut self.machine else {
            return Ok(());
        };
        self.monitor.vm(EventKind::Rebooting);
        if let Some(vm) = booted.vm.take() {
            vm.stop();
        }
        booted.devices.reset();
        booted.devices.reset_cpus(booted.config.cpus.boot_vcpus);
        // Requests raised by the old boot's devices are moot now.
        drain_platform_events(&self.rx, &self.tx);
        booted.boots += 1;
        log::info!(
            "Boot {}: starting {} vCPU(s)",
            booted.boots,
            booted.config.cpus.boot_vcpus
        );
        let vm = Vm::new(&self.hypervisor, &booted.config, &booted.devices)?;
        booted.vm = Some(vm.start(self.tx.clone())?);
        self.monitor.vm(EventKind::Rebooted);
        Ok(())
    }

    /// Stops a running VM; its configuration stays (state Shutdown).
    fn shutdown_vm(&mut self) {
        if let Machine::Running(booted) = std::mem::replace(&mut self.machine, Machine::Empty) {
            let Booted {
                config,
                mut devices,
                vm,
                ..
            } = *booted;
            if let Some(vm) = vm {
                vm.stop();
            }
            devices.finish();
            self.machine = Machine::Shutdown(Box::new(config));
            self.monitor.vm(EventKind::Shutdown);
        }
    }

    fn guest_event(&mut self, event: VmEvent) -> Next {
        if !matches!(self.machine, Machine::Running(_)) {
            // Left over from a VM that is no longer running.
            return Next::Continue;
        }
        let event = match event {
            VmEvent::VcpuStopped {
                reason: VcpuStop::Platform(event),
                ..
            } => VmEvent::Platform(event),
            other => other,
        };
        log::debug!("Control event: {event:?}");
        match event {
            VmEvent::Platform(PlatformEvent::Reset) => {
                log::info!("Guest reset: booting again");
                match self.reboot() {
                    Ok(()) => Next::Continue,
                    Err(e) => {
                        log::error!(
                            "Cannot boot again after a reset: {}",
                            error_chain(&e).join(": ")
                        );
                        Next::Exit(Outcome::BootFailed(error_chain(&e).join(": ")))
                    }
                }
            }
            VmEvent::Platform(PlatformEvent::CpuEject(id)) => {
                log::info!("The guest ejected CPU {id}");
                Next::Continue
            }
            VmEvent::Platform(PlatformEvent::PciEject(slot)) => {
                self.ejected(slot);
                Next::Continue
            }
            VmEvent::Platform(PlatformEvent::PowerOff) => Next::Exit(Outcome::PoweredOff),
            VmEvent::Platform(PlatformEvent::GuestPanic) => {
                self.monitor.vm(EventKind::Panic);
                Next::Exit(Outcome::GuestPanicked)
            }
            VmEvent::VcpuStopped { id, reason } => {
                Next::Exit(Outcome::Crashed { vcpu: id, reason })
            }
            VmEvent::ConsoleQuit => Next::Exit(Outcome::Quit),
            VmEvent::Api(_) => Next::Continue,
        }
    }

    fn api(&mut self, request: ApiRequest) -> Next {
        let ApiRequest {
            action,
            reply,
            written,
        } = request;
        let exit = matches!(action, ApiAction::ShutdownVmm);
        let response = self.answer(action);
        // Published before the answer goes out, so the client's next
        // vm.info already sees the change.
        self.publish();
        // The client may have gone; the action happened all the same.
        reply.send(response);
        if exit {
            // Let the answer reach the client before the process ends.
            let _ = written.recv_timeout(Duration::from_secs(1));
            Next::Exit(Outcome::Quit)
        } else {
            Next::Continue
        }
    }

    fn answer(&mut self, action: ApiAction) -> Response {
        let Some(state) = self.state() else {
            return match action {
                ApiAction::Create(config) => {
                    let mut config = *config;
                    config.assign_device_ids();
                    self.machine = Machine::Created(Box::new(config));
                    self.monitor.vm(EventKind::Created);
                    Response::no_content()
                }
                ApiAction::ShutdownVmm | ApiAction::Delete => Response::no_content(),
                _ => not_created(),
            };
        };
        match action {
            ApiAction::ShutdownVmm => {
                self.shutdown_vm();
                Response::no_content()
            }
            ApiAction::Create(_) => status(
                405,
                format!("The VM is already created ({state:?}); PUT vm.delete first"),
            ),
            ApiAction::Boot => match state {
                VmState::Created | VmState::Shutdown => match self.boot() {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::error(500, &error_chain(&e)),
                },
                _ => wrong_state("boot", state),
            },
            ApiAction::Info => self.info(state),
            ApiAction::Counters => {
                let counters = match &self.machine {
                    Machine::Running(b) => b.devices.counters(),
                    _ => Default::default(),
                };
                Response::json(200, serde_json::to_vec(&counters).unwrap_or_default())
            }
            ApiAction::Pause => match (&mut self.machine, state) {
                (Machine::Running(b), VmState::Running) => {
                    self.monitor.vm(EventKind::Pausing);
                    match b.vm.as_mut().map_or(Ok(()), RunningVm::pause) {
                        Ok(()) => {
                            self.monitor.vm(EventKind::Paused);
                            Response::no_content()
                        }
                        Err(e) => Response::error(500, &error_chain(&e)),
                    }
                }
                _ => wrong_state("pause", state),
            },
            ApiAction::Resume => match (&mut self.machine, state) {
                (Machine::Running(b), VmState::Paused) => {
                    self.monitor.vm(EventKind::Resuming);
                    match b.vm.as_mut().map_or(Ok(()), RunningVm::resume) {
                        Ok(()) => {
                            self.monitor.vm(EventKind::Resumed);
                            Response::no_content()
                        }
                        Err(e) => Response::error(500, &error_chain(&e)),
                    }
                }
                _ => wrong_state("resume", state),
            },
            ApiAction::Shutdown => match state {
                VmState::Running | VmState::Paused => {
                    self.shutdown_vm();
                    Response::no_content()
                }
                _ => wrong_state("shut down", state),
            },
            ApiAction::Reboot => match state {
                VmState::Running | VmState::Paused => match self.reboot() {
                    Ok(()) => Response::no_content(),
                    Err(e) => {
                        let response = Response::error(500, &error_chain(&e));
                        self.shutdown_vm();
                        response
                    }
                },
                _ => wrong_state("reboot", state),
            },
            ApiAction::PowerButton => match (&self.machine, state) {
                (Machine::Running(b), VmState::Running) => match b.devices.power_button() {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::error(500, &error_chain(&e)),
                },
                _ => wrong_state("press the power button", state),
            },
            ApiAction::Delete => {
                self.shutdown_vm();
                self.machine = Machine::Empty;
                self.monitor.vm(EventKind::Deleted);
                Response::no_content()
            }
            ApiAction::AddDisk(disk) => {
                self.add_device(state, disk.id.clone(), Vec::new(), |c| c.disks.push(disk))
            }
            ApiAction::AddNet(mut net, fds) => {
                net.fds = None;
                if !fds.is_empty() && !matches!(self.machine, Machine::Running(_)) {
                    return status(
                        400,
                        "Tap file descriptors can be passed to a running VM only (hot-plug); give a VM that is not running its tap by name",
                    );
                }
                self.add_device(state, net.id.clone(), fds, |c| c.net.push(net))
            }
            ApiAction::AddVsock(vsock) => {
                if self.machine.config().is_some_and(|c| c.vsock.is_some()) {
                    return status(409, "The VM already has a vsock device");
                }
                self.add_device(state, vsock.id.clone(), Vec::new(), |c| {
                    c.vsock = Some(vsock)
                })
            }
            ApiAction::AddDevice(_) => {
                status(501, "VFIO passthrough is not supported yet (vm.add-device)")
            }
            ApiAction::RemoveDevice(id) => match &self.machine {
                Machine::Running(b) if !b.config.device_ids().contains(&id.as_str()) => {
                    status(404, format!("No disk, NIC or vsock device with id '{id}'"))
                }
                Machine::Running(b) => match b.devices.request_unplug(&id) {
                    // The device goes when the guest ejects it.
                    Ok(true) => Response::no_content(),
                    Ok(false) => status(404, format!("No hot-pluggable device with id '{id}'")),
                    Err(e) => Response::error(500, &error_chain(&e)),
                },
                _ => self.cold_remove(state, &id),
            },
            ApiAction::Resize(resize) => self.cold_resize(state, resize),
            ApiAction::ResizeDisk(resize) => self.resize_disk(state, resize),
        }
    }

    /// Refreshes what the API server answers `vm.info` and `vm.counters`
    /// with, after anything that may have changed them.
    fn publish(&self) {
        let info = self.state().and_then(|state| {
            let response = self.info(state);
            (response.status == 200).then_some(response.body)
        });
        let counters = match &self.machine {
            Machine::Running(b) => b.devices.counter_sources(),
            _ => Vec::new(),
        };
        *self
            .published
            .info
            .write()
            .unwrap_or_else(|p| p.into_inner()) = info;
        *self
            .published
            .counters
            .write()
            .unwrap_or_else(|p| p.into_inner()) = counters;
    }

    fn info(&self, state: VmState) -> Response {
        let Some(config) = self.machine.config() else {
            return not_created();
        };
        let device_tree = match &self.machine {
            Machine::Running(b) => b.devices.device_tree(),
            _ => Default::default(),
        };
        let info = VmInfo {
            config: config.clone(),
            state,
            memory_actual_size: config.memory.total(),
            device_tree,
        };
        Response::json(200, serde_json::to_vec(&info).unwrap_or_default())
    }

    /// The configuration of a VM that is not running, to change before its
    /// next boot; a running one answers 501 until hot-plug exists.
    fn cold_config(&mut self, state: VmState, what: &str) -> Result<&mut VmConfig, Response> {
        match &mut self.machine {
            Machine::Created(c) | Machine::Shutdown(c) => Ok(c),
            _ => Err(status(
                501,
                format!(
                    "Cannot {what} while the VM is {state:?}: hot-plug is not supported yet; \
                     shut the VM down, change it, and boot it again"
                ),
            )),
        }
    }

    /// Adds a disk, NIC or vsock device: to the configuration of a VM
    /// that is not running, or hot-plugged into a running one (answered
    /// with its PCI address).
    fn add_device(
        &mut self,
        state: VmState,
        id: Option<String>,
        fds: Vec<OwnedFd>,
        add: impl FnOnce(&mut VmConfig),
    ) -> Response {
        let Machine::Running(booted) = &mut self.machine else {
            return self.cold_add(state, id, add);
        };
        if let Some(id) = &id
            && booted.config.device_ids().contains(&id.as_str())
        {
            return status(409, format!("A device with id '{id}' already exists"));
        }
        let mut changed = booted.config.clone();
        add(&mut changed);
        changed.assign_device_ids();
        if let Err(e) = changed.validate() {
            return status(400, e.to_string());
        }
        let old_ids = booted.config.device_ids();
        let Some(new_id) = changed
            .device_ids()
            .into_iter()
            .find(|id| !old_ids.contains(id))
            .map(str::to_string)
        else {
            return status(500, "The new device has no id");
        };
        let named = |id: &Option<String>| id.as_deref() == Some(new_id.as_str());
        let device = if let Some(d) = changed.disks.iter().find(|d| named(&d.id)) {
            HotplugDevice::Disk(d)
        } else if let Some(i) = changed.net.iter().position(|n| named(&n.id)) {
            HotplugDevice::Net(&changed.net[i], i, fds)
        } else if let Some(v) = changed.vsock.as_ref().filter(|v| named(&v.id)) {
            HotplugDevice::Vsock(v)
        } else {
            return status(500, "The new device is not in the configuration");
        };
        match booted.devices.hotplug(device) {
            Ok(Hotplugged { info, tap }) => {
                // A NIC on passed fds: record its tap's name, so that a
                // later boot can open it.
                let nic = changed.net.iter_mut().find(|n| named(&n.id));
                if let (Some(net), Some(tap)) = (nic, tap) {
                    net.tap = Some(tap);
                }
                booted.config = changed;
                self.monitor.device(EventKind::DeviceAdded, &info.id);
                Response::json(200, serde_json::to_vec(&info).unwrap_or_default())
            }
            Err(e) => Response::error(500, &error_chain(&e)),
        }
    }

    /// The guest released a hot-unplugged device: it leaves the bus and the
    /// configuration.
    fn ejected(&mut self, slot: u8) {
        let Machine::Running(booted) = &mut self.machine else {
            return;
        };
        let Some(id) = booted.devices.unplugged(slot) else {
            log::warn!("The guest ejected PCI slot {slot}, which holds nothing removable");
            return;
        };
        let config = &mut booted.config;
        config
            .disks
            .retain(|d| d.id.as_deref() != Some(id.as_str()));
        config.net.retain(|n| n.id.as_deref() != Some(id.as_str()));
        if config.vsock.as_ref().and_then(|v| v.id.as_deref()) == Some(id.as_str()) {
            config.vsock = None;
        }
        log::info!("Device {id} removed (the guest ejected slot {slot})");
        self.monitor.device(EventKind::DeviceRemoved, &id);
    }

    fn cold_add(
        &mut self,
        state: VmState,
        id: Option<String>,
        add: impl FnOnce(&mut VmConfig),
    ) -> Response {
        let config = match self.cold_config(state, "add a device") {
            Ok(c) => c,
            Err(r) => return r,
        };
        if let Some(id) = &id
            && config.device_ids().contains(&id.as_str())
        {
            return status(409, format!("A device with id '{id}' already exists"));
        }
        let mut changed = config.clone();
        add(&mut changed);
        changed.assign_device_ids();
        if let Err(e) = changed.validate() {
            return status(400, e.to_string());
        }
        let added: Vec<String> = changed
            .device_ids()
            .into_iter()
            .filter(|id| !config.device_ids().contains(id))
            .map(str::to_string)
            .collect();
        *config = changed;
        for id in added {
            self.monitor.device(EventKind::DeviceAdded, &id);
        }
        Response::no_content()
    }

    fn cold_remove(&mut self, state: VmState, id: &str) -> Response {
        let config = match self.cold_config(state, "remove a device") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let before = config.device_ids().len();
        config.disks.retain(|d| d.id.as_deref() != Some(id));
        config.net.retain(|n| n.id.as_deref() != Some(id));
        if config.vsock.as_ref().and_then(|v| v.id.as_deref()) == Some(id) {
            config.vsock = None;
        }
        if config.device_ids().len() == before {
            return status(404, format!("No device with id '{id}'"));
        }
        self.monitor.device(EventKind::DeviceRemoved, id);
        Response::no_content()
    }

    fn cold_resize(&mut self, state: VmState, resize: VmResize) -> Response {
        if resize.desired_balloon.is_some() {
            return status(501, "There is no balloon device (desired_balloon)");
        }
        if let Machine::Running(_) = self.machine {
            return self.live_resize(resize);
        }
        let config = match self.cold_config(state, "resize") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let mut changed = config.clone();
        if let Some(vcpus) = resize.desired_vcpus {
            changed.cpus.boot_vcpus = vcpus;
            changed.cpus.max_vcpus = changed.cpus.max_vcpus.max(vcpus);
        }
        if let Some(ram) = resize.desired_ram {
            changed.memory.size = ram;
        }
        if let Err(e) = changed.validate() {
            return status(400, e.to_string());
        }
        *config = changed;
        Response::no_content()
    }

    /// Resizes a running VM: vCPUs through ACPI CPU hot-plug (added ones
    /// start at once and the guest brings them online; removed ones go when
    /// the guest ejects them); memory through ACPI memory hot-plug (added
    /// in 128 MiB blocks within `hotplug_size`, never taken away).
    fn live_resize(&mut self, resize: VmResize) -> Response {
        let Machine::Running(booted) = &mut self.machine else {
            return status(500, "The VM is not running");
        };
        if let Some(ram) = resize.desired_ram {
            let memory = &booted.config.memory;
            let room = memory.hotplug_size.unwrap_or(0);
            if ram < memory.total() {
                return status(
                    400,
                    format!(
                        "desired_ram {ram} is less than the {} bytes the guest has; memory is only added",
                        memory.total()
                    ),
                );
            }
            let plugged = ram - memory.size;
            if plugged > room || !plugged.is_multiple_of(MEMORY_HOTPLUG_BLOCK) {
                return status(
                    400,
                    format!(
                        "desired_ram {ram} must be the boot size {} plus a multiple of 128 MiB, at most hotplug_size ({room}) more",
                        memory.size
                    ),
                );
            }
            if plugged > memory.hotplugged_size.unwrap_or(0) {
                if let Err(e) = booted.devices.plug_memory(plugged) {
                    return Response::error(500, &error_chain(&e));
                }
                booted.config.memory.hotplugged_size = Some(plugged);
            }
        }
        let Some(want) = resize.desired_vcpus else {
            return Response::no_content();
        };
        let max = booted.config.cpus.max_vcpus;
        if want == 0 || want > max {
            return status(
                400,
                format!("desired_vcpus {want} is out of range: 1 to max_vcpus ({max})"),
            );
        }
        let have = booted.devices.enabled_cpus();
        let buses = booted.devices.buses();
        for id in have..want {
            let Some(vm) = booted.vm.as_mut() else { break };
            if let Err(e) = vm.add_vcpu(&self.hypervisor, id, max, buses.clone(), self.tx.clone()) {
                return Response::error(500, &error_chain(&e));
            }
            if let Err(e) = booted.devices.cpu_changed(id, true) {
                return Response::error(500, &error_chain(&e));
            }
        }
        for id in (want..have).rev() {
            if let Err(e) = booted.devices.cpu_changed(id, false) {
                return Response::error(500, &error_chain(&e));
            }
        }
        booted.config.cpus.boot_vcpus = want;
        Response::no_content()
    }

    fn resize_disk(&mut self, state: VmState, resize: VmResizeDisk) -> Response {
        if let Machine::Running(b) = &self.machine {
            let is_disk = b
                .config
                .disks
                .iter()
                .any(|d| d.id.as_deref() == Some(resize.id.as_str()));
            if !is_disk {
                return status(404, format!("No disk with id '{}'", resize.id));
            }
            return match b.devices.resize_disk(&resize.id, resize.desired_size) {
                Ok(true) => Response::no_content(),
                Ok(false) => status(404, format!("No disk with id '{}'", resize.id)),
                Err(message) => status(400, message),
            };
        }
        let config = match self.cold_config(state, "resize a disk") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let Some(disk) = config
            .disks
            .iter()
            .find(|d| d.id.as_deref() == Some(resize.id.as_str()))
        else {
            return status(404, format!("No disk with id '{}'", resize.id));
        };
        if disk.readonly {
            return status(400, format!("Disk '{}' is read-only", resize.id));
        }
        match grow_file(&disk.path, resize.desired_size) {
            Ok(()) => Response::no_content(),
            Err(message) => status(400, message),
        }
    }
}

/// Grows a disk image to `size` bytes; shrinking would cut off data a
/// guest may use, so it is refused.
fn grow_file(path: &std::path::Path, size: u64) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("Cannot open {}: {e}", path.display()))?;
    let current = file
        .metadata()
        .map_err(|e| format!("Cannot stat {}: {e}", path.display()))?
        .len();
    if size < current {
        return Err(format!(
            "{} is {current} bytes; shrinking to {size} is not supported",
            path.display()
        ));
    }
    if !size.is_multiple_of(512) {
        return Err(format!("{size} is not a multiple of 512 bytes"));
    }
    file.set_len(size)
        .map_err(|e| format!("Cannot grow {}: {e}", path.display()))
}

/// Drops queued platform events (the reset or power-off requests of a boot
/// that is over); API requests stay queued, in order.
fn drain_platform_events(rx: &Receiver<VmEvent>, tx: &Sender<VmEvent>) {
    let mut keep = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let VmEvent::Api(_) = event {
            keep.push(event);
        }
    }
    for event in keep {
        let _ = tx.send(event);
    }
}
