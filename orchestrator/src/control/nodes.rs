//! Nodes: capacity (as the node's agent reports it), what is allocated on
//! it, and Prometheus metrics. One node today: the one `keeld serve` runs.

use std::collections::BTreeMap;
use std::fmt::Write;

pub use keel_api::keeld::NodeSummary;

use crate::keel::Keel;
use crate::model::VmStatus;

/// Whether a VM's resources count against the host.
pub fn holds_resources(status: VmStatus) -> bool {
    !matches!(
        status,
        VmStatus::Stopped | VmStatus::Error | VmStatus::Creating
    )
}

/// The node's capacity, as its agent reports it.
pub fn node_status(keel: &Keel) -> keel_api::agent::NodeStatus {
    keel.agent.node_status()
}

pub fn summary(keel: &Keel) -> NodeSummary {
    let node = keel.agent.node_status();
    let cpus = node.cpus;
    let mut by_status = BTreeMap::new();
    let (mut vcpus, mut memory) = (0u64, 0u64);
    let vms = keel.vms.filter(|vm| vm.deleted_at.is_none());
    for vm in &vms {
        let status = serde_json::to_value(vm.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *by_status.entry(status).or_insert(0) += 1;
        if holds_resources(vm.status) {
            vcpus += u64::from(vm.vcpus);
            memory += vm.memory_mib << 20;
        }
    }
    NodeSummary {
        hostname: node.hostname,
        cpus,
        memory_bytes: node.memory_bytes,
        memory_available_bytes: node.memory_available_bytes,
        disk_bytes: node.disk_bytes,
        disk_available_bytes: node.disk_available_bytes,
        cpu_overcommit: keel.config.cpu_overcommit,
        vcpus_allocated: vcpus,
        vcpus_capacity: (f64::from(cpus) * keel.config.cpu_overcommit) as u64,
        memory_allocated_bytes: memory,
        vms_by_status: by_status,
        vms_total: vms.len() as u64,
        images: keel.images.len() as u64,
        disks: keel.disks.len() as u64,
    }
}

/// The Prometheus text exposition of the node and its VMs.
pub fn metrics(keel: &Keel) -> String {
    let s = summary(keel);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge("keel_node_cpus", "Host CPUs.", f64::from(s.cpus));
    gauge(
        "keel_node_memory_bytes",
        "Host memory.",
        s.memory_bytes as f64,
    );
    gauge(
        "keel_node_memory_available_bytes",
        "Host memory available.",
        s.memory_available_bytes as f64,
    );
    gauge(
        "keel_node_disk_available_bytes",
        "Free space under the data dir.",
        s.disk_available_bytes as f64,
    );
    gauge(
        "keel_vcpus_allocated",
        "vCPUs of VMs that are not stopped.",
        s.vcpus_allocated as f64,
    );
    gauge(
        "keel_vcpus_capacity",
        "Host CPUs times the overcommit ratio.",
        s.vcpus_capacity as f64,
    );
    gauge(
        "keel_memory_allocated_bytes",
        "Memory of VMs that are not stopped.",
        s.memory_allocated_bytes as f64,
    );
    gauge("keel_images", "Images.", s.images as f64);
    gauge("keel_disks", "Disks.", s.disks as f64);
    let _ = writeln!(out, "# HELP keel_vms VMs by status.\n# TYPE keel_vms gauge");
    for (status, n) in &s.vms_by_status {
        let _ = writeln!(out, "keel_vms{{status=\"{status}\"}} {n}");
    }
    out
}
