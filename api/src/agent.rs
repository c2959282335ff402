//! The node-agent protocol: what keeld's control plane asks of the agent on
//! a node (a [`VmSpec`] to run, actions on it) and what the agent reports
//! back ([`VmObserved`], [`NodeStatus`]). Plain serializable data with no
//! references into either side, so the agent can move to another host.

use serde::{Deserialize, Serialize};

/// A disk as the agent attaches it: by id in the node's storage.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    #[serde(default)]
    pub readonly: bool,
}

/// Everything the agent needs to run a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The image whose kernel (and initramfs) boot the VM.
    pub image: String,
    #[serde(default)]
    pub initramfs: bool,
    #[serde(default)]
    pub cmdline: String,
    /// The system disk first, then data disks in attach order.
    pub disks: Vec<DiskSpec>,
}

/// A lifecycle call on a running VM.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Reboot,
    Pause,
    Resume,
}

/// What a VM's VMM is doing, as its node sees it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// No VMM, and none has run since the agent started.
    Absent,
    /// A VMM runs; the guest is not up yet (or is rebooting).
    Starting,
    Running,
    Paused,
    /// The guest was asked to power off.
    Stopping,
    /// The VMM ended; [`VmObserved::exit`] says how.
    Exited,
}

/// How a VMM ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmExit {
    /// The guest powered off (or the VMM was told to quit), not a crash.
    pub clean: bool,
    pub reason: String,
    /// Counts the VM's exits on this node, so one exit is acted on once.
    pub seq: u64,
}

/// One VM on a node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmObserved {
    pub vm: String,
    pub state: ObservedState,
    /// Room the running VMM has for resizes without a reboot.
    #[serde(default)]
    pub max_vcpus: u8,
    #[serde(default)]
    pub max_memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<VmExit>,
}

impl VmObserved {
    pub fn absent(vm: &str) -> Self {
        VmObserved {
            vm: vm.to_string(),
            state: ObservedState::Absent,
            max_vcpus: 0,
            max_memory_mib: 0,
            exit: None,
        }
    }

    /// A VMM process is running for the VM.
    pub fn has_vmm(&self) -> bool {
        matches!(
            self.state,
            ObservedState::Starting
                | ObservedState::Running
                | ObservedState::Paused
                | ObservedState::Stopping
        )
    }
}

/// A node's capacity and what runs on it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
}

/// First-boot configuration the agent writes into a VM's cloud-init seed.
/// The root password travels only here, never into keeld's store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeedSpec {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password: Option<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// A line for a VM's event log, from its VMM or from the agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentEvent {
    pub vm: String,
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_observations_survive_the_wire() {
        let spec = VmSpec {
            id: "vm-1".into(),
            vcpus: 2,
            memory_mib: 512,
            image: "img-1".into(),
            initramfs: true,
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskSpec {
                id: "disk-1".into(),
                readonly: false,
            }],
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&text).unwrap(), spec);
        let seen = VmObserved {
            exit: Some(VmExit {
                clean: false,
                reason: "the guest crashed the VM".into(),
                seq: 3,
            }),
            state: ObservedState::Exited,
            ..VmObserved::absent("vm-1")
        };
        let text = serde_json::to_string(&seen).unwrap();
        assert!(text.contains(r#""state":"exited""#), "{text}");
        assert_eq!(serde_json::from_str::<VmObserved>(&text).unwrap(), seen);
        assert!(!seen.has_vmm());
    }
}
