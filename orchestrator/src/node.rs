//! The host: its capacity, what is allocated on it, and Prometheus metrics.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::keel::Keel;
use crate::model::VmStatus;

#[derive(Clone, Debug, Serialize)]
pub struct NodeSummary {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
    pub cpu_overcommit: f64,
    /// vCPUs of VMs that are not stopped.
    pub vcpus_allocated: u64,
    pub vcpus_capacity: u64,
    pub memory_allocated_bytes: u64,
    pub vms_by_status: BTreeMap<String, u64>,
    pub vms_total: u64,
    pub images: u64,
    pub disks: u64,
}

pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// (MemTotal, MemAvailable) in bytes.
pub fn host_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub fn disk_space(path: &std::path::Path) -> (u64, u64) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether a VM's resources count against the host.
pub fn holds_resources(status: VmStatus) -> bool {
    !matches!(
        status,
        VmStatus::Stopped | VmStatus::Error | VmStatus::Creating
    )
}

pub fn summary(keel: &Keel) -> NodeSummary {
    let cpus = host_cpus();
    let (memory_bytes, memory_available_bytes) = host_memory();
    let (disk_bytes, disk_available_bytes) = disk_space(keel.data_dir());
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
        hostname: hostname(),
        cpus,
        memory_bytes,
        memory_available_bytes,
        disk_bytes,
        disk_available_bytes,
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
