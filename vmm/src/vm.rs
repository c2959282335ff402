//! One boot of the virtual machine: the KVM VM with its memory, interrupt
//! controller and vCPUs, loaded with the kernel and ready to run. A guest
//! reset throws this away and builds a new one.

use std::sync::Arc;
use std::sync::mpsc::Sender;

use keel_api::VmConfig;
use kvm_bindings::{CpuId, kvm_clock_data, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::VmEvent;
use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, EntryPoint};
use crate::cpu::cpuid::{Topology, vcpu_cpuid};
use crate::cpu::{CpuError, Vcpu, VcpuError, VcpuThreads};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{self, GuestMemory, MemoryError};

/// Where KVM puts the TSS and identity map it needs on Intel hosts: the
/// top of the 32-bit hole, clear of the IOAPIC and local APIC pages.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("This host's KVM lacks {0:?}, which keel-vmm needs")]
    MissingCapability(Cap),
    #[error("KVM supports at most {max} vCPUs on this host; {requested} requested")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM setup call {what} failed")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot register guest memory with KVM")]
    RegisterMemory(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU {id} failed")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("The kernel loader thread panicked")]
    LoaderPanicked,
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

/// Host-wide facts read once per process.
pub struct Hypervisor {
    pub kvm: Kvm,
    pub supported_cpuid: CpuId,
}

impl Hypervisor {
    pub fn check(&self, config: &VmConfig) -> Result<(), VmError> {
        for cap in [
            Cap::Irqchip,
            Cap::UserMemory,
            Cap::SetTssAddr,
            Cap::Irqfd,
            Cap::ImmediateExit,
        ] {
            if !self.kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(cap));
            }
        }
        let max = self.kvm.get_max_vcpus();
        if usize::from(config.cpus.max_vcpus) > max {
            return Err(VmError::TooManyVcpus {
                requested: config.cpus.max_vcpus,
                max,
            });
        }
        Ok(())
    }
}

pub struct Vm {
    vcpus_created: u8,
    fd: Arc<VmFd>,
    // Must outlive every vCPU: KVM maps it into the guest.
    memory: GuestMemory,
    vcpus: Vec<Vcpu>,
}

impl Vm {
    pub fn new(
        hypervisor: &Hypervisor,
        config: &VmConfig,
        devices: &DeviceManager,
    ) -> Result<Self, VmError> {
        let memory = memory::create_guest_memory(&config.memory)?;
        // Copying the kernel and initramfs into guest memory is the slowest
        // step (tens of MiB); it needs no KVM state, so it runs beside the
        // KVM setup.
        let (fd, entry) = std::thread::scope(|scope| {
            let loading = scope.spawn(|| load_guest_image(config, &memory));
            let fd = create_kvm_vm(hypervisor, devices, &memory);
            let entry = loading.join().unwrap_or(Err(VmError::LoaderPanicked))?;
            Ok::<_, VmError>((fd?, entry))
        })?;

        let topology = Topology {
            cpus: config.cpus.max_vcpus,
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus.boot_vcpus));
        for id in 0..config.cpus.boot_vcpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(id))
                .map_err(|source| VmError::CreateVcpu { id, source })?;
            let vcpu = Vcpu::new(id, vcpu_fd, devices.buses());
            let cpuid = vcpu_cpuid(&hypervisor.supported_cpuid, id, topology);
            vcpu.configure(&cpuid, (id == 0).then_some(entry))?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            vcpus_created: config.cpus.boot_vcpus,
            fd,
            memory,
            vcpus,
        })
    }

    /// Starts the vCPUs. The VM runs until the returned handle is stopped.
    pub fn start(self, events: Sender<VmEvent>) -> Result<RunningVm, VmError> {
        let threads = VcpuThreads::start(self.vcpus, events)?;
        Ok(RunningVm {
            created: self.vcpus_created,
            threads: Some(threads),
            fd: self.fd,
            _memory: self.memory,
            paused_clock: None,
        })
    }
}

/// The kernel, initramfs, boot tables and ACPI tables, written into memory.
fn load_guest_image(config: &VmConfig, memory: &GuestMemory) -> Result<EntryPoint, VmError> {
    let entry = boot::load_payload(memory, &config.payload, config.memory.size)?;
    boot::regs::write_boot_tables(memory, entry)?;
    acpi::write_tables(memory, &config.cpus, &config.memory)?;
    Ok(entry)
}

/// The KVM VM with its memory, interrupt controller and device interrupts.
fn create_kvm_vm(
    hypervisor: &Hypervisor,
    devices: &DeviceManager,
    memory: &GuestMemory,
) -> Result<Arc<VmFd>, VmError> {
    let fd = Arc::new(create_vm_retrying(&hypervisor.kvm)?);
    let setup = |what| move |source| VmError::Setup { what, source };
    // Memory first: once the in-kernel irqchip exists, KVM waits for an
    // RCU grace period on every memslot change (~5 ms here, 0.3 ms before).
    register_memory(&fd, memory)?;
    fd.set_tss_address(TSS_ADDRESS)
        .map_err(setup("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        .map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    devices.attach(fd.clone(), memory)?;
    Ok(fd)
}

/// KVM_CREATE_VM, again when it is interrupted: registering the VM's MMU
/// notifier gives up with EINTR while this thread has a signal or io_uring
/// task work pending (a disk's io_uring set up just before does that).
fn create_vm_retrying(kvm: &Kvm) -> Result<VmFd, VmError> {
    const ATTEMPTS: u32 = 100;
    let mut attempt = 1;
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR && attempt < ATTEMPTS => attempt += 1,
            result => return result.map_err(VmError::CreateVm),
        }
    }
}

fn register_memory(fd: &VmFd, memory: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::RegisterMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // VM (and so every vCPU) keeps alive until after the VM fd is closed.
        unsafe { fd.set_user_memory_region(region) }.map_err(VmError::RegisterMemory)?;
    }
    Ok(())
}

pub struct RunningVm {
    /// vCPUs created so far (0..created); hot-plug adds the next ones.
    created: u8,
    threads: Option<VcpuThreads>,
    // Dropped after the threads are joined (field order).
    fd: Arc<VmFd>,
    _memory: GuestMemory,
    /// The guest's kvmclock when it was paused.
    paused_clock: Option<kvm_clock_data>,
}

impl RunningVm {
    /// Parks the vCPUs and freezes the guest's clock: after
    /// [`resume`](Self::resume) the guest sees no time pass.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.paused_clock.is_some() {
            return Ok(());
        }
        if let Some(threads) = &self.threads {
            threads.pause();
        }
        let clock = self.fd.get_clock().map_err(|source| VmError::Setup {
            what: "KVM_GET_CLOCK",
            source,
        })?;
        self.paused_clock = Some(clock);
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        let Some(mut clock) = self.paused_clock.take() else {
            return Ok(());
        };
        // Only the clock value: no realtime or host-TSC correction, which
        // would move it forward by the pause.
        clock.flags = 0;
        let set = self.fd.set_clock(&clock).map_err(|source| VmError::Setup {
            what: "KVM_SET_CLOCK",
            source,
        });
        if let Some(threads) = &self.threads {
            threads.resume();
        }
        set
    }

    pub fn is_paused(&self) -> bool {
        self.paused_clock.is_some()
    }

    /// Creates and starts vCPU `id` (CPU hot-plug); it waits for the
    /// guest's INIT/SIPI like any application processor. A vCPU that
    /// already exists (hot-removed, then added again) is left as it is:
    /// KVM cannot destroy one, and the guest brings it back the same way.
    pub fn add_vcpu(
        &mut self,
        hypervisor: &Hypervisor,
        id: u8,
        max: u8,
        buses: crate::cpu::Buses,
        events: Sender<VmEvent>,
    ) -> Result<(), VmError> {
        if id < self.created {
            return Ok(());
        }
        let Some(threads) = self.threads.as_mut() else {
            return Ok(());
        };
        let vcpu_fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VmError::CreateVcpu { id, source })?;
        let vcpu = Vcpu::new(id, vcpu_fd, buses);
        let cpuid = vcpu_cpuid(&hypervisor.supported_cpuid, id, Topology { cpus: max });
        vcpu.configure(&cpuid, None)?;
        threads.spawn(vcpu, events)?;
        self.created = id + 1;
        Ok(())
    }

    /// Stops the vCPUs and releases the VM. KVM lets an irqfd's eventfd
    /// serve one VM at a time, so the old VM must be gone before a reset
    /// builds the next one.
    pub fn stop(mut self) {
        if let Some(threads) = self.threads.take() {
            threads.stop();
        }
    }
}
