//! The node agent in keeld's own process (`keeld serve`): VMMs, disks and
//! seeds on this host, under the data dir.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use keel_api::agent::{
    AgentEvent, DiskSpec, NodeStatus, ObservedState, SeedSpec, VmAction, VmExit, VmObserved, VmSpec,
};
use keel_api::vmm_api::{Endpoint, VmResize, VmResizeDisk, VmState};
use keel_api::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, DiskConfig, MEMORY_HOTPLUG_BLOCK, MemoryConfig,
    PayloadConfig, VmConfig,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::process::{self, VmFiles};
use super::spares::Spares;
use super::{
    AgentError, AgentFuture, AgentResult, ConsoleStream, NodeAgent, ProgressFn, console, host,
    monitor, seed,
};
use crate::files;
use crate::paths::Paths;

/// How long an API call to a VMM may take.
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new keel-vmm may take to start serving its API.
const VMM_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to let go of a hot-unplugged disk.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Event log lines kept for the control plane before the oldest go.
const MAX_EVENTS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// The keel-vmm binary.
    pub vmm_binary: PathBuf,
    /// How long `stop` waits for the guest after the power button.
    pub stop_timeout: Duration,
    /// Serial output kept per file before `serial.log` is rotated.
    pub serial_log_max: u64,
}

/// One VM's VMM as this agent knows it.
pub(super) struct Tracked {
    pub state: ObservedState,
    pub max_vcpus: u8,
    pub max_memory_mib: u64,
    pub exit: Option<VmExit>,
    pub exits: u64,
    /// The live VMM (a pidfd: signals never reach a reused pid).
    pub pidfd: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl Tracked {
    fn new() -> Self {
        Tracked {
            state: ObservedState::Absent,
            max_vcpus: 0,
            max_memory_mib: 0,
            exit: None,
            exits: 0,
            pidfd: None,
        }
    }

    fn observed(&self, vm: &str) -> VmObserved {
        VmObserved {
            vm: vm.to_string(),
            state: self.state,
            max_vcpus: self.max_vcpus,
            max_memory_mib: self.max_memory_mib,
            exit: self.exit.clone(),
        }
    }
}

pub struct LocalAgent {
    pub(super) config: AgentConfig,
    pub(super) paths: Paths,
    vms: Mutex<HashMap<String, Tracked>>,
    /// One lifecycle call at a time per VM.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Devices each VM's guest has let go of (from `device-removed`).
    removed: Mutex<HashMap<String, Vec<String>>>,
    changed: watch::Sender<u64>,
    events: Mutex<VecDeque<AgentEvent>>,
    spares: Arc<Spares>,
    this: Weak<LocalAgent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalAgent {
    pub fn new(config: AgentConfig) -> Arc<Self> {
        let paths = Paths::new(&config.data_dir);
        Arc::new_cyclic(|this| LocalAgent {
            spares: Spares::new(paths.clone()),
            paths,
            config,
            vms: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            removed: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            events: Mutex::new(VecDeque::new()),
            this: this.clone(),
        })
    }

    pub(super) fn files(&self, vm: &str) -> VmFiles {
        VmFiles {
            dir: self.paths.vm_dir(vm),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Changes what is known of a VM and wakes the watchers.
    pub(super) fn update(&self, vm: &str, change: impl FnOnce(&mut Tracked)) {
        change(
            lock(&self.vms)
                .entry(vm.to_string())
                .or_insert_with(Tracked::new),
        );
        self.bump();
    }

    /// Records the end of the VM's VMM.
    pub(super) fn ended(&self, vm: &str, clean: bool, reason: String) {
        self.update(vm, |t| {
            t.exits += 1;
            t.state = ObservedState::Exited;
            t.pidfd = None;
            t.exit = Some(VmExit {
                clean,
                reason,
                seq: t.exits,
            });
        });
    }

    pub(super) fn event(&self, vm: &str, kind: &str, message: &str) {
        {
            let mut events = lock(&self.events);
            if events.len() >= MAX_EVENTS {
                events.pop_front();
            }
            events.push_back(AgentEvent {
                vm: vm.to_string(),
                kind: kind.to_string(),
                message: message.to_string(),
            });
        }
        self.bump();
    }

    pub(super) fn note_removed(&self, vm: &str, device: &str) {
        lock(&self.removed)
            .entry(vm.to_string())
            .or_default()
            .push(device.to_string());
        self.bump();
    }

    fn take_removed(&self, vm: &str, device: &str) -> bool {
        let mut removed = lock(&self.removed);
        let list = removed.entry(vm.to_string()).or_default();
        match list.iter().position(|d| d == device) {
            Some(i) => {
                list.remove(i);
                true
            }
            None => false,
        }
    }

    fn vm_lock(&self, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(vm.to_string()).or_default().clone()
    }

    fn pidfd(&self, vm: &str) -> Option<Arc<AsyncFd<OwnedFd>>> {
        lock(&self.vms).get(vm).and_then(|t| t.pidfd.clone())
    }

    /// The VM's API socket, when its VMM runs.
    fn running_socket(&self, vm: &str) -> AgentResult<PathBuf> {
        match self.pidfd(vm) {
            Some(_) => Ok(self.files(vm).socket()),
            None => Err(AgentError::NotRunning { vm: vm.to_string() }),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        vm: &str,
        call: &'static str,
        f: impl FnOnce(&mut keel_api::client::VmmClient) -> Result<T, keel_api::client::ClientError>
        + Send
        + 'static,
    ) -> AgentResult<T> {
        let socket = self.running_socket(vm)?;
        process::with_client(socket, VMM_CALL_TIMEOUT, f)
            .await
            .map_err(|source| AgentError::Vmm {
                vm: vm.to_string(),
                call,
                source,
            })
    }

    /// Waits until the VM's VMM has ended (as recorded by its monitor).
    async fn wait_ended(&self, vm: &str, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if self.pidfd(vm).is_none() {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.pidfd(vm).is_none();
            }
        }
    }

    /// The VmConfig keel-vmm gets for a spec.
    fn vm_config(&self, spec: &VmSpec) -> VmConfig {
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
        let mut disks: Vec<DiskConfig> = spec
            .disks
            .iter()
            .map(|d| disk(&d.id, d.readonly, self.paths.disk(&d.id)))
            .collect();
        let seed = self.files(&spec.id).seed();
        if seed.exists() {
            disks.push(disk("cidata", true, seed));
        }
        // Room to hot-plug up to the host's CPUs and as much memory again,
        // so that resizes within that need no reboot.
        let max_vcpus = spec.vcpus.max(host::cpus().min(254) as u8);
        let size = spec.memory_mib << 20;
        let room = size.div_ceil(MEMORY_HOTPLUG_BLOCK) * MEMORY_HOTPLUG_BLOCK;
        VmConfig {
            cpus: CpusConfig {
                boot_vcpus: spec.vcpus,
                max_vcpus,
            },
            memory: MemoryConfig {
                size,
                hotplug_size: Some(room.min(keel_api::vm_config::MAX_MEMORY_HOTPLUG)),
                hotplugged_size: None,
            },
            payload: PayloadConfig {
                kernel: Some(self.paths.image_file(&spec.image, "kernel")),
                initramfs: spec
                    .initramfs
                    .then(|| self.paths.image_file(&spec.image, "initramfs")),
                cmdline: Some(spec.cmdline.clone()),
            },
            serial: ConsoleConfig::mode(ConsoleOutputMode::Tty),
            console: ConsoleConfig::mode(ConsoleOutputMode::Off),
            disks,
            net: vec![],
            rng: Some(keel_api::RngConfig {
                src: "/dev/urandom".into(),
            }),
            vsock: None,
        }
    }

    async fn boot(&self, spec: &VmSpec) -> AgentResult<()> {
        let id = spec.id.as_str();
        let config = self.vm_config(spec);
        let max_vcpus = config.cpus.max_vcpus;
        let max_memory_mib = (config.memory.size + config.memory.hotplug_size.unwrap_or(0)) >> 20;
        let files = self.files(id);
        let kernel = self.paths.image_file(&spec.image, "kernel");
        if !kernel.exists() {
            return Err(AgentError::Start {
                reason: format!(
                    "The kernel of image {} is missing on this node ({})",
                    spec.image,
                    kernel.display()
                ),
            });
        }
        let mut child =
            process::spawn(&self.config.vmm_binary, &files).map_err(|e| AgentError::Start {
                reason: keel_api::error_chain(&e),
            })?;
        let pid = child.id() as i32;
        let pidfd =
            process::watch_pid(pid).map_err(AgentError::io(format!("watch keel-vmm pid {pid}")))?;
        let pidfd = Arc::new(pidfd);
        self.update(id, |t| {
            t.state = ObservedState::Starting;
            t.max_vcpus = max_vcpus;
            t.max_memory_mib = max_memory_mib;
            t.pidfd = Some(pidfd.clone());
        });
        self.event(id, "starting", &format!("keel-vmm pid {pid}"));
        // The first request waits in the socket's backlog while keel-vmm
        // starts.
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
            let _ = tokio::time::timeout(Duration::from_millis(500), pidfd.readable()).await;
            let e = match child.try_wait() {
                Ok(Some(status)) => format!("keel-vmm exited at start ({status})"),
                _ => keel_api::error_chain(&e),
            };
            let _ = child.kill();
            let _ = child.wait();
            self.update(id, |t| {
                t.state = ObservedState::Absent;
                t.pidfd = None;
            });
            let words = process::last_words(&files);
            return Err(AgentError::Start {
                reason: if words.is_empty() {
                    e
                } else {
                    format!("{e}: {words}")
                },
            });
        }
        if let Some(this) = self.this.upgrade() {
            monitor::watch(this, id.to_string(), Some(child), pidfd);
        }
        Ok(())
    }

    /// At keeld's start: every VM dir whose keel-vmm still runs (it holds
    /// the VM's lock) is watched again; one that never got a running guest
    /// (keeld died while starting it) is stopped; the end of those that
    /// died meanwhile is reported.
    pub async fn recover(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(self.paths.vms()) else {
            return;
        };
        for entry in dirs.flatten() {
            let vm = entry.file_name().to_string_lossy().to_string();
            let files = self.files(&vm);
            match process::lock_holder(&files) {
                Some(pid) if pid > 0 => self.adopt(&vm, pid).await,
                Some(_) => log::warn!("VM {vm}: a keel-vmm holds its lock but wrote no pid"),
                None => {
                    if let Some((clean, reason)) = monitor::outcome_from_files(&files, None) {
                        self.ended(&vm, clean, reason);
                    }
                }
            }
        }
    }

    async fn adopt(self: &Arc<Self>, vm: &str, pid: i32) {
        let Ok(pidfd) = process::watch_pid(pid) else {
            return;
        };
        let pidfd = Arc::new(pidfd);
        let socket = self.files(vm).socket();
        let info = process::with_client(socket, Duration::from_secs(5), |c| c.info()).await;
        let state = match info.as_ref().map(|i| i.state) {
            Ok(VmState::Running) => ObservedState::Running,
            Ok(VmState::Paused) => ObservedState::Paused,
            _ => {
                // Spawned but never booted, or shutting down: nobody can
                // use it, and its VM may be started anew.
                log::warn!("VM {vm}: stopping keel-vmm pid {pid}, found without a running guest");
                let _ = process::pidfd_signal(pidfd.get_ref(), libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), pidfd.readable()).await;
                self.event(
                    vm,
                    "orphan-stopped",
                    &format!("keel-vmm pid {pid} had no running guest after keeld restarted"),
                );
                self.update(vm, |t| t.state = ObservedState::Absent);
                return;
            }
        };
        let (max_vcpus, max_memory_mib) = info
            .map(|i| {
                (
                    i.config.cpus.max_vcpus,
                    (i.config.memory.size + i.config.memory.hotplug_size.unwrap_or(0)) >> 20,
                )
            })
            .unwrap_or((0, 0));
        log::info!("VM {vm}: re-attached to keel-vmm pid {pid}");
        self.event(vm, "reattached", &format!("keel-vmm pid {pid}"));
        self.update(vm, |t| {
            t.state = state;
            t.max_vcpus = max_vcpus;
            t.max_memory_mib = max_memory_mib;
            t.pidfd = Some(pidfd.clone());
        });
        monitor::watch(self.clone(), vm.to_string(), None, pidfd);
    }

    async fn stop_vm(&self, vm: &str, force: bool) -> AgentResult<()> {
        // A forced stop does not wait behind a graceful one in progress.
        let vm_lock = self.vm_lock(vm);
        let _guard = if force {
            None
        } else {
            Some(vm_lock.lock().await)
        };
        let Some(pidfd) = self.pidfd(vm) else {
            return Ok(());
        };
        let socket = self.files(vm).socket();
        if !force {
            let paused = lock(&self.vms)
                .get(vm)
                .is_some_and(|t| t.state == ObservedState::Paused);
            self.update(vm, |t| t.state = ObservedState::Stopping);
            // A paused guest cannot see the button.
            if paused {
                let _ = process::with_client(socket.clone(), VMM_CALL_TIMEOUT, |c| {
                    c.action(Endpoint::VmResume)
                })
                .await;
            }
            let pressed = process::with_client(socket.clone(), VMM_CALL_TIMEOUT, |c| {
                c.action(Endpoint::VmPowerButton)
            })
            .await;
            if pressed.is_ok() && self.wait_ended(vm, self.config.stop_timeout).await {
                return Ok(());
            }
            self.event(
                vm,
                "stop-forced",
                "the guest did not power off after the power button",
            );
        }
        let _ = process::with_client(socket, Duration::from_secs(3), |c| c.shutdown_vmm()).await;
        if !self.wait_ended(vm, Duration::from_secs(5)).await {
            let _ = process::pidfd_signal(pidfd.get_ref(), libc::SIGKILL);
            self.wait_ended(vm, Duration::from_secs(5)).await;
        }
        Ok(())
    }
}

impl NodeAgent for LocalAgent {
    fn start(&self, spec: VmSpec) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let lock = self.vm_lock(&spec.id);
            let _guard = lock.lock().await;
            if self.pidfd(&spec.id).is_some() {
                return Ok(());
            }
            self.boot(&spec).await
        })
    }

    fn stop(&self, vm: String, force: bool) -> AgentFuture<'_, ()> {
        Box::pin(async move { self.stop_vm(&vm, force).await })
    }

    fn action(&self, vm: String, action: VmAction) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let lock = self.vm_lock(&vm);
            let _guard = lock.lock().await;
            let (endpoint, name) = match action {
                VmAction::Reboot => (Endpoint::VmReboot, "vm.reboot"),
                VmAction::Pause => (Endpoint::VmPause, "vm.pause"),
                VmAction::Resume => (Endpoint::VmResume, "vm.resume"),
            };
            self.call(&vm, name, move |c| c.action(endpoint)).await
        })
    }

    fn resize(&self, vm: String, vcpus: u8, memory_mib: u64) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let resize = VmResize {
                desired_vcpus: Some(vcpus),
                desired_ram: Some(memory_mib << 20),
                ..Default::default()
            };
            self.call(&vm, "vm.resize", move |c| c.resize(&resize))
                .await
        })
    }

    fn attach_disk(&self, vm: String, disk: DiskSpec) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let lock = self.vm_lock(&vm);
            let _guard = lock.lock().await;
            let config = DiskConfig {
                path: self.paths.disk(&disk.id),
                readonly: disk.readonly,
                direct: false,
                num_queues: 1,
                queue_size: 256,
                disable_io_uring: false,
                id: Some(disk.id.clone()),
                serial: Some(disk.id.clone()),
            };
            self.call(&vm, "vm.add-disk", move |c| c.add_disk(&config))
                .await
                .map(|_| ())
        })
    }

    fn detach_disk(&self, vm: String, disk: String) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let lock = self.vm_lock(&vm);
            let _guard = lock.lock().await;
            self.take_removed(&vm, &disk);
            let mut rx = self.changed.subscribe();
            let id = disk.clone();
            self.call(&vm, "vm.remove-device", move |c| c.remove_device(&id))
                .await?;
            let deadline = tokio::time::Instant::now() + DETACH_TIMEOUT;
            while !self.take_removed(&vm, &disk) {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return Err(AgentError::DetachTimeout {
                        disk,
                        secs: DETACH_TIMEOUT.as_secs(),
                    });
                }
            }
            Ok(())
        })
    }

    fn resize_disk(&self, vm: String, disk: String, size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let resize = VmResizeDisk {
                id: disk,
                desired_size: size,
            };
            self.call(&vm, "vm.resize-disk", move |c| c.resize_disk(&resize))
                .await
        })
    }

    fn observed(&self, vm: &str) -> VmObserved {
        lock(&self.vms)
            .get(vm)
            .map(|t| t.observed(vm))
            .unwrap_or_else(|| VmObserved::absent(vm))
    }

    fn observed_all(&self) -> Vec<VmObserved> {
        lock(&self.vms)
            .iter()
            .map(|(vm, t)| t.observed(vm))
            .collect()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn take_events(&self) -> Vec<AgentEvent> {
        lock(&self.events).drain(..).collect()
    }

    fn node_status(&self) -> NodeStatus {
        host::status(self.paths.root())
    }

    fn create_system_disk(
        &self,
        image: String,
        disk: String,
        size: u64,
        progress: ProgressFn,
    ) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let from = self.paths.image_disk(&image);
            let to = self.paths.disk(&disk);
            // A copy a crash interrupted starts again.
            let _ = std::fs::remove_file(&to);
            let spare = self.spares.take(&image, &to);
            tokio::task::spawn_blocking(move || {
                if !spare {
                    files::thin_copy(&from, &to, |done, total| {
                        progress((done * 80 / total.max(1)) as u8)
                    })?;
                }
                if size > std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0) {
                    files::grow(&to, size)?;
                }
                Ok::<_, files::FileError>(())
            })
            .await
            .map_err(|e| AgentError::Io {
                what: "copy the system disk".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
            Ok(())
        })
    }

    fn create_blank_disk(&self, disk: String, size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let path = self.paths.disk(&disk);
            let _ = std::fs::remove_file(&path);
            files::create_blank(&path, size)?;
            Ok(())
        })
    }

    fn grow_disk(&self, disk: String, size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            files::grow(&self.paths.disk(&disk), size)?;
            Ok(())
        })
    }

    fn clone_disk(&self, from: String, to: String, progress: ProgressFn) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let (from, to) = (self.paths.disk(&from), self.paths.disk(&to));
            let _ = std::fs::remove_file(&to);
            tokio::task::spawn_blocking(move || {
                files::thin_copy(&from, &to, |done, total| {
                    progress((done * 99 / total.max(1)) as u8)
                })
            })
            .await
            .map_err(|e| AgentError::Io {
                what: "clone the disk".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
            Ok(())
        })
    }

    fn remove_disk(&self, disk: &str) {
        let _ = std::fs::remove_file(self.paths.disk(disk));
    }

    fn disk_exists(&self, disk: &str) -> bool {
        self.paths.disk(disk).exists()
    }

    fn disk_allocated(&self, disk: &str) -> u64 {
        files::allocated_bytes(&self.paths.disk(disk))
    }

    fn write_seed(&self, vm: String, spec: SeedSpec) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            let files = self.files(&vm);
            std::fs::create_dir_all(&files.dir)
                .map_err(AgentError::io(format!("create {}", files.dir.display())))?;
            seed::build(&files.seed(), &vm, &spec).map_err(AgentError::io(format!(
                "write the cloud-init seed {}",
                files.seed().display()
            )))
        })
    }

    fn remove_vm_files(&self, vm: &str) {
        super::serial_log::forget(&self.files(vm));
        let _ = std::fs::remove_dir_all(self.paths.vm_dir(vm));
        lock(&self.vms).remove(vm);
        lock(&self.removed).remove(vm);
        lock(&self.locks).remove(vm);
        self.bump();
    }

    fn image_ready(&self, image: &str) {
        self.spares.ensure(image);
    }

    fn image_removed(&self, image: &str) {
        self.spares.remove(image);
    }

    fn serial_tail(&self, vm: &str, len: u64) -> Vec<u8> {
        super::serial_log::serial_tail(&self.files(vm), len)
    }

    fn console(&self, vm: &str, backlog: u64) -> ConsoleStream {
        console::open(self.files(vm), backlog)
    }
}
