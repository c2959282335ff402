//! This host's capacity, read from the kernel.

use keel_api::agent::NodeStatus;

pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// (MemTotal, MemAvailable) in bytes.
pub fn memory() -> (u64, u64) {
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The node's capacity, with free space measured under `storage`.
pub fn status(storage: &std::path::Path) -> NodeStatus {
    let (memory_bytes, memory_available_bytes) = memory();
    let (disk_bytes, disk_available_bytes) = crate::files::disk_space(storage);
    NodeStatus {
        hostname: hostname(),
        cpus: cpus(),
        memory_bytes,
        memory_available_bytes,
        disk_bytes,
        disk_available_bytes,
    }
}
