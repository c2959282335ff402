//! vCPUs: their CPUID, their register state, and one thread each.

pub mod cpuid;
pub mod state;
pub mod vcpu;

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

pub use vcpu::{Buses, Vcpu, VcpuError, VcpuStop};

use crate::VmEvent;

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("Cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("Cannot start the thread for vCPU {id}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does
/// nothing: being interrupted (EINTR) is the whole point.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), CpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), ignore_kick));
    result.map_err(CpuError::SignalHandler)
}

/// The running vCPU threads of one boot of a VM.
pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU. A vCPU that ends the VM reports why on
    /// `events`; the VM's control loop then stops the others.
    pub fn start(vcpus: Vec<Vcpu>, events: Sender<VmEvent>) -> Result<Self, CpuError> {
        install_kick_handler()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut running = VcpuThreads {
            stop: stop.clone(),
            threads: Vec::with_capacity(vcpus.len()),
        };
        for mut vcpu in vcpus {
            let id = vcpu.id();
            let stop = stop.clone();
            let events = events.clone();
            let thread = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A bug in exit handling must end the VM with a report,
                    // not leave it running one vCPU short.
                    let outcome = panic::catch_unwind(AssertUnwindSafe(|| vcpu.run(&stop)))
                        .unwrap_or_else(|_| {
                            Some(VcpuStop::Unexpected("the vCPU thread panicked".into()))
                        });
                    if let Some(reason) = outcome {
                        // The receiver outlives every boot; a send can only
                        // fail while the process is already exiting.
                        let _ = events.send(VmEvent::VcpuStopped { id, reason });
                    }
                })
                .map_err(|source| CpuError::Spawn { id, source })?;
            running.threads.push(thread);
        }
        Ok(running)
    }

    /// Stops every vCPU and waits for its thread. A vCPU may be inside
    /// KVM_RUN (running or halted): it is kicked with a signal until it
    /// notices the stop flag, which also covers a kick that lands just
    /// before it enters KVM_RUN.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let mut kicks = 0u32;
            while !thread.is_finished() {
                let _ = thread.kill(kick_signal());
                kicks += 1;
                thread::sleep(Duration::from_micros(200));
            }
            log::debug!("{:?} stopped after {kicks} kick(s)", thread.thread().name());
            let _ = thread.join();
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
