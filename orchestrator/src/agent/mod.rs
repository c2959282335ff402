//! The node agent: runs one keel-vmm per VM and drives it only through the
//! typed client in `keel_api`. It moves each VM toward what its owner asked
//! (`Vm::desired`) and records what the VMM reports (`Vm::status`).

mod monitor;
pub mod process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_api::vmm_api::{Endpoint, VmResize, VmResizeDisk};
use keel_api::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, DiskConfig, MEMORY_HOTPLUG_BLOCK, MemoryConfig,
    PayloadConfig, VmConfig,
};

use crate::keel::Keel;
use crate::model::{PowerState, Vm, VmStatus, VmmProcess};
use crate::node;
use crate::store::StoreError;
use process::VmFiles;

/// How long an API call to a VMM may take.
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new keel-vmm may take to start serving its API.
const VMM_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to let go of a hot-unplugged disk.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Agent {
    /// One action at a time per VM.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Devices each VM's guest has let go of (from `device-removed`).
    removed: Mutex<HashMap<String, Vec<String>>>,
}

impl Agent {
    fn lock(&self, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm.to_string())
            .or_default()
            .clone()
    }

    fn note_removed(&self, vm: &str, device: &str) {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm.to_string())
            .or_default()
            .push(device.to_string());
    }

    fn take_removed(&self, vm: &str, device: &str) -> bool {
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let list = removed.entry(vm.to_string()).or_default();
        match list.iter().position(|d| d == device) {
            Some(i) => {
                list.remove(i);
                true
            }
            None => false,
        }
    }
}

pub fn files(keel: &Keel, vm: &str) -> VmFiles {
    VmFiles {
        dir: keel.paths.vm_dir(vm),
    }
}

/// Updates a VM's record; a VM that is gone is not an error here.
pub fn set_vm(keel: &Keel, id: &str, change: impl FnOnce(&mut Vm)) -> Option<Arc<Vm>> {
    let result = keel.vms.update::<StoreError>(id, |vm| {
        change(vm);
        Ok(())
    });
    match result {
        Ok(vm) => vm,
        Err(e) => {
            log::error!("Cannot record the state of VM {id}: {e}");
            None
        }
    }
}

fn set_status(keel: &Keel, id: &str, status: VmStatus, reason: &str) {
    set_vm(keel, id, |vm| {
        vm.status = status;
        vm.status_reason = reason.to_string();
    });
}

/// The VmConfig keel-vmm gets for a VM.
pub fn vm_config(keel: &Keel, vm: &Vm) -> Result<VmConfig, String> {
    let image = keel
        .images
        .get(&vm.image)
        .ok_or_else(|| format!("The VM's image {} no longer exists", vm.image))?;
    image.boot.kernel.as_ref().ok_or_else(|| {
        format!(
            "Image {} has no kernel to boot; keel-vmm boots images with a kernel until its \
             firmware lands",
            image.name
        )
    })?;
    let kernel_path = keel.paths.image_file(&image.id, "kernel");
    let initramfs = image
        .boot
        .initramfs
        .as_ref()
        .map(|_| keel.paths.image_file(&image.id, "initramfs"));
    let disk = |id: &str, readonly: bool, path| DiskConfig {
        path,
        readonly,
        direct: false,
        num_queues: 1,
        queue_size: 256,
        disable_io_uring: false,
        id: Some(id.to_string()),
        serial: Some(id.to_string()),
    };
    let mut disks = vec![disk(
        &vm.system_disk,
        false,
        keel.paths.disk(&vm.system_disk),
    )];
    for id in &vm.disks {
        let readonly = keel.disks.get(id).is_some_and(|d| d.readonly);
        disks.push(disk(id, readonly, keel.paths.disk(id)));
    }
    let seed = files(keel, &vm.id).seed();
    if seed.exists() {
        disks.push(disk("cidata", true, seed));
    }
    // Room to hot-plug up to the host's CPUs and as much memory again, so
    // that resizes within that need no reboot.
    let max_vcpus = vm.vcpus.max(node::host_cpus().min(254) as u8);
    let size = vm.memory_mib << 20;
    let room = size.div_ceil(MEMORY_HOTPLUG_BLOCK) * MEMORY_HOTPLUG_BLOCK;
    Ok(VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vm.vcpus,
            max_vcpus,
        },
        memory: MemoryConfig {
            size,
            hotplug_size: Some(room.min(keel_api::vm_config::MAX_MEMORY_HOTPLUG)),
            hotplugged_size: None,
        },
        payload: PayloadConfig {
            kernel: Some(kernel_path),
            initramfs,
            cmdline: Some(image.boot.cmdline.clone()),
        },
        serial: ConsoleConfig::mode(ConsoleOutputMode::Tty),
        console: ConsoleConfig::mode(ConsoleOutputMode::Off),
        disks,
        net: vec![],
        rng: Some(keel_api::RngConfig {
            src: "/dev/urandom".into(),
        }),
        vsock: None,
    })
}

/// Capacity left for `vm` to start: vCPUs within the overcommit ratio,
/// memory within what the host has.
fn check_capacity(keel: &Keel, vm: &Vm) -> Result<(), String> {
    let summary = node::summary(keel);
    let vcpus = summary.vcpus_allocated + u64::from(vm.vcpus);
    if vcpus > summary.vcpus_capacity {
        return Err(format!(
            "Not enough CPU: {} vCPUs allocated, {} more would exceed {} ({} CPUs x {} \
             overcommit); stop another VM or raise --cpu-overcommit",
            summary.vcpus_allocated,
            vm.vcpus,
            summary.vcpus_capacity,
            summary.cpus,
            summary.cpu_overcommit
        ));
    }
    let memory = summary.memory_allocated_bytes + (vm.memory_mib << 20);
    if memory > summary.memory_bytes {
        return Err(format!(
            "Not enough memory: {} MiB allocated, {} MiB more would exceed the host's {} MiB",
            summary.memory_allocated_bytes >> 20,
            vm.memory_mib,
            summary.memory_bytes >> 20
        ));
    }
    Ok(())
}

/// Starts a VM's keel-vmm and boots it. Returns once the VMM accepted the
/// boot; the monitor reports `running` when the VMM says it booted.
pub async fn start(keel: &Arc<Keel>, id: &str) -> Result<(), String> {
    let lock = keel.agent.lock(id);
    let _guard = lock.lock().await;
    let vm = keel.vms.get(id).ok_or_else(|| format!("No VM {id}"))?;
    if vm.vmm.as_ref().is_some_and(process::alive) {
        return Ok(());
    }
    // Flavor changes made while it was stopped take effect now.
    let vm = set_vm(keel, id, |vm| {
        vm.desired = PowerState::Running;
        if let Some(v) = vm.pending_vcpus.take() {
            vm.vcpus = v;
        }
        if let Some(m) = vm.pending_memory_mib.take() {
            vm.memory_mib = m;
        }
    })
    .ok_or_else(|| format!("No VM {id}"))?;
    let result = boot(keel, &vm).await;
    if let Err(reason) = &result {
        set_vm(keel, id, |vm| {
            vm.status = VmStatus::Error;
            vm.status_reason = reason.clone();
            vm.vmm = None;
        });
        keel.event(id, "start-failed", reason);
    }
    result
}

async fn boot(keel: &Arc<Keel>, vm: &Vm) -> Result<(), String> {
    check_capacity(keel, vm)?;
    let config = vm_config(keel, vm)?;
    let max_vcpus = config.cpus.max_vcpus;
    let max_memory_mib = (config.memory.size + config.memory.hotplug_size.unwrap_or(0)) >> 20;
    let files = files(keel, &vm.id);
    let mut child = process::spawn(&keel.config.vmm_binary, &files)?;
    let pid = child.id() as i32;
    let start_ticks = process::start_ticks(pid).unwrap_or(0);
    set_vm(keel, &vm.id, |v| {
        v.status = VmStatus::Starting;
        v.status_reason = String::new();
        v.vmm = Some(VmmProcess {
            pid,
            start_ticks,
            max_vcpus,
            max_memory_mib,
        });
    });
    keel.event(&vm.id, "starting", &format!("keel-vmm pid {pid}"));
    // The first request waits in the socket's backlog while keel-vmm starts.
    let booted = process::with_client(
        files.socket(),
        VMM_START_TIMEOUT + VMM_CALL_TIMEOUT,
        move |c| {
            c.create(&config)?;
            c.action(Endpoint::VmBoot)
        },
    )
    .await;
    if let Err(e) = booted {
        // A VMM that reset the connection is on its way out: its socket
        // closes a moment before it can be reaped.
        let e = match process::exited_within(&mut child, Duration::from_millis(500)).await {
            Some(status) => format!("keel-vmm exited at start ({status})"),
            None => e,
        };
        let _ = child.kill();
        let _ = child.wait();
        let words = process::last_words(&files);
        return Err(if words.is_empty() {
            e
        } else {
            format!("{e}: {words}")
        });
    }
    monitor::watch(keel.clone(), vm.id.clone(), Some(child));
    Ok(())
}

/// Stops a VM: the ACPI power button, then (after the configured timeout,
/// or at once with `force`) the VMM is told to shut down, or killed.
pub async fn stop(keel: &Arc<Keel>, id: &str, force: bool) -> Result<(), String> {
    let lock = keel.agent.lock(id);
    let _guard = lock.lock().await;
    let vm = set_vm(keel, id, |vm| vm.desired = PowerState::Stopped)
        .ok_or_else(|| format!("No VM {id}"))?;
    let Some(vmm) = vm.vmm.clone().filter(process::alive) else {
        set_vm(keel, id, |vm| {
            vm.vmm = None;
            if vm.status != VmStatus::Error {
                vm.status = VmStatus::Stopped;
            }
        });
        return Ok(());
    };
    let socket = files(keel, id).socket();
    if !force {
        set_status(keel, id, VmStatus::Stopping, "");
        // A paused guest cannot see the button.
        if vm.status == VmStatus::Paused {
            let _ = process::with_client(socket.clone(), VMM_CALL_TIMEOUT, |c| {
                c.action(Endpoint::VmResume)
            })
            .await;
        }
        let pressed = process::with_client(socket.clone(), VMM_CALL_TIMEOUT, |c| {
            c.action(Endpoint::VmPowerButton)
        })
        .await;
        if pressed.is_ok() && wait_exit(&vmm, keel.config.stop_timeout).await {
            wait_recorded(keel, id).await;
            return Ok(());
        }
        keel.event(
            id,
            "stop-forced",
            "the guest did not power off after the power button",
        );
    }
    let _ = process::with_client(socket, Duration::from_secs(3), |c| c.shutdown_vmm()).await;
    if !wait_exit(&vmm, Duration::from_secs(5)).await {
        // SAFETY: kill sends a signal; the pid was checked to be this VM's
        // keel-vmm (pid and start time) just above.
        unsafe { libc::kill(vmm.pid, libc::SIGKILL) };
        wait_exit(&vmm, Duration::from_secs(5)).await;
    }
    wait_recorded(keel, id).await;
    Ok(())
}

/// Waits for the monitor to record the end of the VM's VMM, so that a stop
/// that returns leaves the VM `stopped`, not still `stopping`.
async fn wait_recorded(keel: &Keel, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while keel.vms.get(id).is_some_and(|vm| vm.vmm.is_some())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the process to end (the monitor records how).
async fn wait_exit(vmm: &VmmProcess, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while process::alive(vmm) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The VM's VMM socket, if it is running.
fn running_socket(keel: &Keel, id: &str) -> Result<std::path::PathBuf, String> {
    let vm = keel.vms.get(id).ok_or_else(|| format!("No VM {id}"))?;
    match &vm.vmm {
        Some(vmm) if process::alive(vmm) => Ok(files(keel, id).socket()),
        _ => Err(format!("VM {} is not running", vm.name)),
    }
}

/// A lifecycle call on a running VM: reboot, pause, resume.
pub async fn action(keel: &Arc<Keel>, id: &str, endpoint: Endpoint) -> Result<(), String> {
    let lock = keel.agent.lock(id);
    let _guard = lock.lock().await;
    let socket = running_socket(keel, id)?;
    match endpoint {
        Endpoint::VmPause => {
            set_vm(keel, id, |vm| vm.desired = PowerState::Paused);
        }
        Endpoint::VmResume => {
            set_vm(keel, id, |vm| vm.desired = PowerState::Running);
        }
        _ => {}
    }
    process::with_client(socket, VMM_CALL_TIMEOUT, move |c| c.action(endpoint)).await
}

/// Whether a resize fits in the room the running VMM was given (memory
/// grows in 128 MiB blocks and never shrinks while it runs).
pub fn hot_resizable(vm: &Vm, vcpus: u8, memory_mib: u64) -> bool {
    let Some(vmm) = &vm.vmm else {
        return false;
    };
    let block_mib = MEMORY_HOTPLUG_BLOCK >> 20;
    vcpus <= vmm.max_vcpus
        && memory_mib >= vm.memory_mib
        && memory_mib <= vmm.max_memory_mib
        && (memory_mib - vm.memory_mib).is_multiple_of(block_mib)
}

pub async fn resize(keel: &Arc<Keel>, id: &str, vcpus: u8, memory_mib: u64) -> Result<(), String> {
    let socket = running_socket(keel, id)?;
    let resize = VmResize {
        desired_vcpus: Some(vcpus),
        desired_ram: Some(memory_mib << 20),
        ..Default::default()
    };
    process::with_client(socket, VMM_CALL_TIMEOUT, move |c| c.resize(&resize)).await?;
    set_vm(keel, id, |vm| {
        vm.vcpus = vcpus;
        vm.memory_mib = memory_mib;
    });
    Ok(())
}

/// Hot-plugs a disk into a running VM.
pub async fn attach_disk(keel: &Arc<Keel>, vm: &str, disk: &str) -> Result<(), String> {
    let lock = keel.agent.lock(vm);
    let _guard = lock.lock().await;
    let socket = running_socket(keel, vm)?;
    let readonly = keel.disks.get(disk).is_some_and(|d| d.readonly);
    let config = DiskConfig {
        path: keel.paths.disk(disk),
        readonly,
        direct: false,
        num_queues: 1,
        queue_size: 256,
        disable_io_uring: false,
        id: Some(disk.to_string()),
        serial: Some(disk.to_string()),
    };
    process::with_client(socket, VMM_CALL_TIMEOUT, move |c| c.add_disk(&config))
        .await
        .map(|_| ())
}

/// Asks a running VM's guest to let a disk go and waits until it has.
pub async fn detach_disk(keel: &Arc<Keel>, vm: &str, disk: &str) -> Result<(), String> {
    let lock = keel.agent.lock(vm);
    let _guard = lock.lock().await;
    let socket = running_socket(keel, vm)?;
    keel.agent.take_removed(vm, disk);
    let id = disk.to_string();
    process::with_client(socket, VMM_CALL_TIMEOUT, move |c| c.remove_device(&id)).await?;
    let deadline = tokio::time::Instant::now() + DETACH_TIMEOUT;
    while !keel.agent.take_removed(vm, disk) {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "The guest did not release disk {disk} within {DETACH_TIMEOUT:?} (is the \
                 guest's ACPI hot-plug driver loaded?); it will be detached when it does, or \
                 at the next stop"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Grows a disk attached to a running VM; the guest sees the new size.
pub async fn resize_disk(keel: &Arc<Keel>, vm: &str, disk: &str, size: u64) -> Result<(), String> {
    let socket = running_socket(keel, vm)?;
    let resize = VmResizeDisk {
        id: disk.to_string(),
        desired_size: size,
    };
    process::with_client(socket, VMM_CALL_TIMEOUT, move |c| c.resize_disk(&resize)).await
}

/// At keeld's start: finds the keel-vmm processes that kept running and
/// watches them again; records the end of those that died meanwhile;
/// starts VMs whose owners want them running.
pub async fn recover(keel: &Arc<Keel>) {
    for vm in keel.vms.filter(|_| true) {
        match &vm.vmm {
            Some(vmm) if process::alive(vmm) => {
                log::info!(
                    "VM {} ({}): re-attached to keel-vmm pid {}",
                    vm.name,
                    vm.id,
                    vmm.pid
                );
                keel.event(&vm.id, "reattached", &format!("keel-vmm pid {}", vmm.pid));
                monitor::watch(keel.clone(), vm.id.clone(), None);
            }
            Some(_) => monitor::ended(keel, &vm.id, None).await,
            None => {
                if vm.deleted_at.is_none()
                    && vm.desired == PowerState::Running
                    && matches!(vm.status, VmStatus::Running | VmStatus::Starting)
                {
                    let keel = keel.clone();
                    let id = vm.id.clone();
                    tokio::spawn(async move {
                        let _ = start(&keel, &id).await;
                    });
                }
            }
        }
    }
}
