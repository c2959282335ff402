//! vCPUs: their CPUID, their register state, and one thread each.

pub mod cpuid;
pub mod state;
pub mod vcpu;

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
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

/// What the control loop asks of the vCPU threads: keep running, park
/// (pause), or end.
#[derive(Default)]
pub struct RunControl {
    stop: AtomicBool,
    pause: AtomicBool,
    /// How many vCPU threads are parked.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl RunControl {
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn parked(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread outside KVM_RUN: blocks while the VM is
    /// paused (and not being stopped).
    pub fn park_while_paused(&self) {
        if !self.pause.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.parked();
        *parked += 1;
        self.changed.notify_all();
        while self.pause.load(Ordering::Acquire) && !self.should_stop() {
            parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
    }

    fn wake(&self) {
        let _guard = self.parked();
        self.changed.notify_all();
    }
}

/// The running vCPU threads of one boot of a VM.
pub struct VcpuThreads {
    control: Arc<RunControl>,
    threads: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU. A vCPU that ends the VM reports why on
    /// `events`; the VM's control loop then stops the others.
    pub fn start(vcpus: Vec<Vcpu>, events: Sender<VmEvent>) -> Result<Self, CpuError> {
        install_kick_handler()?;
        let mut running = VcpuThreads {
            control: Arc::new(RunControl::default()),
            threads: Vec::with_capacity(vcpus.len()),
        };
        for vcpu in vcpus {
            running.spawn(vcpu, events.clone())?;
        }
        Ok(running)
    }

    /// Starts one more vCPU (CPU hot-plug). It runs paused if the VM is.
    pub fn spawn(&mut self, mut vcpu: Vcpu, events: Sender<VmEvent>) -> Result<(), CpuError> {
        let id = vcpu.id();
        let control = self.control.clone();
        let thread = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // A bug in exit handling must end the VM with a report, not
                // leave it running one vCPU short.
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| vcpu.run(&control)))
                    .unwrap_or_else(|_| {
                        Some(VcpuStop::Unexpected("the vCPU thread panicked".into()))
                    });
                if let Some(reason) = outcome {
                    // The receiver outlives every boot; a send can only fail
                    // while the process is already exiting.
                    let _ = events.send(VmEvent::VcpuStopped { id, reason });
                }
            })
            .map_err(|source| CpuError::Spawn { id, source })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Stops every vCPU and waits for its thread. A vCPU may be inside
    /// KVM_RUN (running or halted): it is kicked with a signal until it
    /// notices the stop flag, which also covers a kick that lands just
    /// before it enters KVM_RUN.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Parks every vCPU outside KVM_RUN and returns once all are parked
    /// (or have ended). Kicks are repeated, as for [`stop`](Self::stop),
    /// because one that lands just before KVM_RUN is lost.
    pub fn pause(&self) {
        self.control.pause.store(true, Ordering::Release);
        loop {
            let ended = self.threads.iter().filter(|t| t.is_finished()).count();
            let parked = *self.control.parked();
            if parked + ended >= self.threads.len() {
                return;
            }
            for thread in &self.threads {
                if !thread.is_finished() {
                    let _ = thread.kill(kick_signal());
                }
            }
            let guard = self.control.parked();
            let _ = self
                .control
                .changed
                .wait_timeout(guard, Duration::from_micros(500));
        }
    }

    pub fn resume(&self) {
        self.control.pause.store(false, Ordering::Release);
        self.control.wake();
    }

    fn stop_and_join(&mut self) {
        self.control.stop.store(true, Ordering::Release);
        self.control.wake();
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
