//! One vCPU and the loop its thread runs: enter the guest, handle the exit,
//! repeat, until the VM stops it or the guest does something that ends the VM.

use std::sync::Arc;

use keel_devices::{Bus, PlatformEvent};
use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, kvm_fpu};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use super::RunControl;
use super::state::*;
use crate::boot::EntryPoint;
use crate::boot::regs::{boot_regs, boot_sregs};

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed")]
    Ioctl {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "vCPU {id}: KVM accepted only {set} of {total} MSRs (first refused: {first_refused:#x})"
    )]
    Msrs {
        id: u8,
        set: usize,
        total: usize,
        first_refused: u32,
    },
    #[error("vCPU state version {0} is not supported")]
    StateVersion(u32),
}

/// Why a vCPU ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// A platform request raised by the vCPU itself (KVM system events).
    Platform(PlatformEvent),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { rip: Option<u64> },
    /// KVM could not emulate or continue the guest.
    InternalError { rip: Option<u64> },
    /// Hardware refused to enter the guest.
    FailedEntry { reason: u64 },
    /// KVM_RUN itself failed.
    RunFailed(String),
    /// An exit this VMM does not expect.
    Unexpected(String),
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rip = |rip: &Option<u64>| rip.map_or_else(String::new, |r| format!(" at RIP {r:#x}"));
        match self {
            VcpuStop::Platform(e) => write!(f, "platform event {e:?}"),
            VcpuStop::TripleFault { rip: r } => {
                write!(f, "the guest triple-faulted{} (KVM_EXIT_SHUTDOWN)", rip(r))
            }
            VcpuStop::InternalError { rip: r } => write!(
                f,
                "KVM reported an internal error{} (KVM_EXIT_INTERNAL_ERROR)",
                rip(r)
            ),
            VcpuStop::FailedEntry { reason } => write!(
                f,
                "the CPU refused to enter the guest (KVM_EXIT_FAIL_ENTRY, reason {reason:#x})"
            ),
            VcpuStop::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
            VcpuStop::Unexpected(e) => write!(f, "unexpected exit {e}"),
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(VcpuStop),
}

/// The buses a vCPU's port and MMIO accesses are dispatched to.
#[derive(Clone)]
pub struct Buses {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// Handles one exit. Unclaimed reads see all ones and unclaimed writes are
/// dropped, as on a PC bus: a guest probing for absent hardware is normal.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &Buses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.io.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.io.write(u64::from(port), data) {
                log::trace!("write to unclaimed port {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::trace!("write to unclaimed MMIO {addr:#x}");
            }
        }
        // Interrupted by a kick, or halted without an in-kernel LAPIC to wait in.
        VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => return ExitAction::Stop(VcpuStop::TripleFault { rip: None }),
        VcpuExit::InternalError => {
            return ExitAction::Stop(VcpuStop::InternalError { rip: None });
        }
        VcpuExit::FailEntry(reason, _cpu) => {
            return ExitAction::Stop(VcpuStop::FailedEntry { reason });
        }
        VcpuExit::SystemEvent(kind, _) => {
            let event = match kind {
                KVM_SYSTEM_EVENT_RESET => PlatformEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => PlatformEvent::GuestPanic,
                _ => PlatformEvent::PowerOff,
            };
            return ExitAction::Stop(VcpuStop::Platform(event));
        }
        other => return ExitAction::Stop(VcpuStop::Unexpected(format!("{other:?}"))),
    }
    ExitAction::Continue
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    buses: Buses,
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd, buses: Buses) -> Self {
        Vcpu { id, fd, buses }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    fn ioctl<T>(
        &self,
        what: &'static str,
        result: Result<T, kvm_ioctls::Error>,
    ) -> Result<T, VcpuError> {
        result.map_err(|source| VcpuError::Ioctl {
            id: self.id,
            what,
            source,
        })
    }

    /// Sets up CPUID, MSRs, FPU and local APIC; the boot vCPU also gets the
    /// kernel's entry state. The others wait for INIT/SIPI in the kernel.
    pub fn configure(&self, cpuid: &CpuId, entry: Option<EntryPoint>) -> Result<(), VcpuError> {
        self.ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(cpuid))?;
        self.set_boot_msrs()?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.ioctl("KVM_SET_FPU", self.fd.set_fpu(&fpu))?;
        self.set_lint()?;
        if let Some(entry) = entry {
            let reset = self.ioctl("KVM_GET_SREGS", self.fd.get_sregs())?;
            self.ioctl(
                "KVM_SET_SREGS",
                self.fd.set_sregs(&boot_sregs(entry, &reset)),
            )?;
            self.ioctl("KVM_SET_REGS", self.fd.set_regs(&boot_regs(entry)))?;
        }
        Ok(())
    }

    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        const MISC_ENABLE_FAST_STRING: u64 = 1;
        const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
        let entries = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
        ];
        let msrs = msr_list(&entries).ok_or(VcpuError::Msrs {
            id: self.id,
            set: 0,
            total: entries.len(),
            first_refused: entries[0].0,
        })?;
        let set = self.ioctl("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                total: entries.len(),
                first_refused: entries[set].0,
            });
        }
        Ok(())
    }

    /// LINT0 delivers ExtINT (the legacy PIC), LINT1 delivers NMIs.
    fn set_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_MODE_EXTINT: u32 = 0x7;
        const DELIVERY_MODE_NMI: u32 = 0x4;
        let mut lapic = self.ioctl("KVM_GET_LAPIC", self.fd.get_lapic())?;
        for (offset, mode) in [
            (APIC_LVT0, DELIVERY_MODE_EXTINT),
            (APIC_LVT1, DELIVERY_MODE_NMI),
        ] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.ioctl("KVM_SET_LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Captures the vCPU's state. The vCPU must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mut msrs = msr_list(&SAVED_MSRS.iter().map(|&m| (m, 0)).collect::<Vec<_>>()).ok_or(
            VcpuError::Msrs {
                id: self.id,
                set: 0,
                total: SAVED_MSRS.len(),
                first_refused: SAVED_MSRS[0],
            },
        )?;
        let read = self.ioctl("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            id: self.id,
            cpuid: self
                .ioctl(
                    "KVM_GET_CPUID2",
                    self.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
                )?
                .as_slice()
                .to_vec(),
            regs: self.ioctl("KVM_GET_REGS", self.fd.get_regs())?,
            sregs: self.ioctl("KVM_GET_SREGS", self.fd.get_sregs())?,
            xsave: self.ioctl("KVM_GET_XSAVE", self.fd.get_xsave())?,
            xcrs: self.ioctl("KVM_GET_XCRS", self.fd.get_xcrs())?,
            lapic: self.ioctl("KVM_GET_LAPIC", self.fd.get_lapic())?,
            mp_state: self.ioctl("KVM_GET_MP_STATE", self.fd.get_mp_state())?,
            events: self.ioctl("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?,
            msrs: msrs.as_slice()[..read].to_vec(),
        })
    }

    /// Loads state captured by [`Vcpu::save_state`].
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.version != VCPU_STATE_VERSION {
            return Err(VcpuError::StateVersion(state.version));
        }
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::StateVersion(0))?;
        self.ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        self.ioctl("KVM_SET_SREGS", self.fd.set_sregs(&state.sregs))?;
        self.ioctl("KVM_SET_REGS", self.fd.set_regs(&state.regs))?;
        // SAFETY: the xsave buffer came from KVM_GET_XSAVE on a vCPU of the
        // same kind, so its size is the one KVM expects.
        self.ioctl("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&state.xsave) })?;
        self.ioctl("KVM_SET_XCRS", self.fd.set_xcrs(&state.xcrs))?;
        self.ioctl("KVM_SET_LAPIC", self.fd.set_lapic(&state.lapic))?;
        self.ioctl("KVM_SET_MP_STATE", self.fd.set_mp_state(state.mp_state))?;
        self.ioctl(
            "KVM_SET_VCPU_EVENTS",
            self.fd.set_vcpu_events(&state.events),
        )?;
        let msrs = kvm_bindings::Msrs::from_entries(&state.msrs)
            .map_err(|_| VcpuError::StateVersion(state.version))?;
        self.ioctl("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        Ok(())
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    /// Logs where the vCPU stood when the VM died, for the bug report.
    fn log_crash_state(&self) {
        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            log::error!(
                "vCPU {} at CS {:#x} (base {:#x}) RIP {:#x} RSP {:#x} RFLAGS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
                self.id,
                s.cs.selector,
                s.cs.base,
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            );
        }
    }

    /// Runs the guest until told to stop or an exit ends the VM; parks
    /// while the VM is paused.
    pub fn run(&mut self, control: &RunControl) -> Option<VcpuStop> {
        while !control.should_stop() {
            control.park_while_paused();
            if control.should_stop() {
                break;
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.buses),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Stop(VcpuStop::RunFailed(e.to_string())),
            };
            if let ExitAction::Stop(reason) = action {
                if matches!(
                    reason,
                    VcpuStop::TripleFault { .. } | VcpuStop::InternalError { .. }
                ) {
                    self.log_crash_state();
                }
                return Some(match reason {
                    VcpuStop::TripleFault { .. } => VcpuStop::TripleFault { rip: self.rip() },
                    VcpuStop::InternalError { .. } => VcpuStop::InternalError { rip: self.rip() },
                    other => other,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use keel_devices::Bus;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    use super::*;
    use crate::cpu::cpuid::{Topology, vcpu_cpuid};

    fn vcpu(kvm: &Kvm, vm: &kvm_ioctls::VmFd, id: u8) -> Vcpu {
        let buses = Buses {
            io: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
        };
        Vcpu::new(id, vm.create_vcpu(u64::from(id)).unwrap(), buses).with_cpuid(kvm)
    }

    impl Vcpu {
        fn with_cpuid(self, kvm: &Kvm) -> Self {
            let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
            let cpuid = vcpu_cpuid(&supported, self.id, Topology { cpus: 2 });
            self.configure(
                &cpuid,
                (self.id == 0).then_some(EntryPoint::Pvh { rip: 0x1234 }),
            )
            .unwrap();
            self
        }
    }

    #[test]
    fn state_survives_serialization_into_another_vcpu() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let source = vcpu(&kvm, &vm, 0);
        let state = source.save_state().unwrap();
        assert_eq!(state.regs.rip, 0x1234);
        assert_eq!(state.regs.rbx, crate::boot::layout::PVH_INFO_START);
        let json = serde_json::to_string(&state).unwrap();
        let loaded: VcpuState = serde_json::from_str(&json).unwrap();

        let other_vm = kvm.create_vm().unwrap();
        other_vm.create_irq_chip().unwrap();
        let target = Vcpu::new(
            0,
            other_vm.create_vcpu(0).unwrap(),
            Buses {
                io: Arc::new(Bus::new()),
                mmio: Arc::new(Bus::new()),
            },
        );
        target.restore_state(&loaded).unwrap();
        let again = target.save_state().unwrap();
        assert_eq!(again.regs.rip, 0x1234);
        assert_eq!(again.sregs.cs.selector, state.sregs.cs.selector);
        assert_eq!(again.sregs.cr0, state.sregs.cr0);
        assert_eq!(again.lapic.regs[..], state.lapic.regs[..]);
        assert_eq!(again.cpuid.len(), state.cpuid.len());

        let mut old = loaded;
        old.version = VCPU_STATE_VERSION + 1;
        assert!(matches!(
            target.restore_state(&old),
            Err(VcpuError::StateVersion(_))
        ));
    }
}
