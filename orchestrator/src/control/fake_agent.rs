//! A node agent for unit tests of the control plane: it runs nothing,
//! records what it was asked, and reports what the test tells it to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_api::agent::{
    AgentEvent, DiskSpec, NodeStatus, ObservedState, SeedSpec, VmAction, VmExit, VmObserved, VmSpec,
};
use tokio::sync::watch;

use crate::agent::{AgentFuture, ConsoleStream, NodeAgent, ProgressFn};

#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Start(String),
    Stop { vm: String, force: bool },
}

pub struct FakeAgent {
    pub calls: Mutex<Vec<Call>>,
    observed: Mutex<HashMap<String, VmObserved>>,
    changed: watch::Sender<u64>,
    /// Started VMs report `running` at once.
    pub boots: bool,
}

impl FakeAgent {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeAgent {
            calls: Mutex::new(Vec::new()),
            observed: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            boots: true,
        })
    }

    /// What the node reports for `vm` from now on.
    pub fn report(&self, vm: &str, state: ObservedState, exit: Option<(bool, &str, u64)>) {
        self.observed.lock().unwrap().insert(
            vm.to_string(),
            VmObserved {
                vm: vm.to_string(),
                state,
                max_vcpus: 2,
                max_memory_mib: 1024,
                exit: exit.map(|(clean, reason, seq)| VmExit {
                    clean,
                    reason: reason.into(),
                    seq,
                }),
            },
        );
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
}

impl NodeAgent for FakeAgent {
    fn start(&self, spec: VmSpec) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            self.call(Call::Start(spec.id.clone()));
            if self.boots {
                self.report(&spec.id, ObservedState::Running, None);
            }
            Ok(())
        })
    }

    fn stop(&self, vm: String, force: bool) -> AgentFuture<'_, ()> {
        Box::pin(async move {
            self.call(Call::Stop {
                vm: vm.clone(),
                force,
            });
            let seq = self
                .observed
                .lock()
                .unwrap()
                .get(&vm)
                .and_then(|o| o.exit.as_ref().map(|e| e.seq))
                .unwrap_or(0);
            self.report(&vm, ObservedState::Exited, Some((true, "stopped", seq + 1)));
            Ok(())
        })
    }

    fn action(&self, _vm: String, _action: VmAction) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn resize(&self, _vm: String, _vcpus: u8, _memory_mib: u64) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn attach_disk(&self, _vm: String, _disk: DiskSpec) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn detach_disk(&self, _vm: String, _disk: String) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn resize_disk(&self, _vm: String, _disk: String, _size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn observed(&self, vm: &str) -> VmObserved {
        self.observed
            .lock()
            .unwrap()
            .get(vm)
            .cloned()
            .unwrap_or_else(|| VmObserved::absent(vm))
    }

    fn observed_all(&self) -> Vec<VmObserved> {
        self.observed.lock().unwrap().values().cloned().collect()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn take_events(&self) -> Vec<AgentEvent> {
        Vec::new()
    }

    fn node_status(&self) -> NodeStatus {
        NodeStatus {
            hostname: "fake".into(),
            cpus: 8,
            memory_bytes: 16 << 30,
            memory_available_bytes: 16 << 30,
            disk_bytes: 1 << 40,
            disk_available_bytes: 1 << 40,
        }
    }

    fn create_system_disk(
        &self,
        _image: String,
        _disk: String,
        _size: u64,
        _progress: ProgressFn,
    ) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn create_blank_disk(&self, _disk: String, _size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn grow_disk(&self, _disk: String, _size: u64) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn clone_disk(&self, _from: String, _to: String, _progress: ProgressFn) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn remove_disk(&self, _disk: &str) {}

    fn disk_exists(&self, _disk: &str) -> bool {
        true
    }

    fn disk_allocated(&self, _disk: &str) -> u64 {
        0
    }

    fn write_seed(&self, _vm: String, _seed: SeedSpec) -> AgentFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn remove_vm_files(&self, _vm: &str) {}

    fn image_ready(&self, _image: &str) {}

    fn image_removed(&self, _image: &str) {}

    fn serial_tail(&self, _vm: &str, _len: u64) -> Vec<u8> {
        Vec::new()
    }

    fn console(&self, _vm: &str, _backlog: u64) -> ConsoleStream {
        let (_out_tx, output) = tokio::sync::mpsc::channel(1);
        let (input, _in_rx) = tokio::sync::mpsc::channel(1);
        ConsoleStream { output, input }
    }
}
