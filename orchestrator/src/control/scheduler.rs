//! Where a VM runs: filter the nodes that can hold it, score the rest. One
//! node today (the one `keeld serve` runs), so the filter is the capacity
//! check; the shape stays when the cluster brings more.

use keel_api::agent::NodeStatus;
use thiserror::Error;

use super::nodes;
use crate::keel::Keel;
use crate::model::Vm;

#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error(
        "Not enough CPU: {allocated} vCPUs allocated, {more} more would exceed {capacity} \
         ({cpus} CPUs x {overcommit} overcommit); stop another VM or raise --cpu-overcommit"
    )]
    Cpu {
        allocated: u64,
        more: u8,
        capacity: u64,
        cpus: u32,
        overcommit: f64,
    },
    #[error(
        "Not enough memory: {allocated_mib} MiB allocated, {more_mib} MiB more would exceed \
         the host's {total_mib} MiB"
    )]
    Memory {
        allocated_mib: u64,
        more_mib: u64,
        total_mib: u64,
    },
    #[error("A VM with {vcpus} vCPUs is bigger than this host ({cpus} CPUs)")]
    TooManyVcpus { vcpus: u8, cpus: u32 },
    #[error("A VM with {memory_mib} MiB of memory is bigger than this host ({total_mib} MiB)")]
    TooMuchMemory { memory_mib: u64, total_mib: u64 },
}

/// Refuses a VM shape no node could ever run.
pub fn check_fits_any(node: &NodeStatus, vcpus: u8, memory_mib: u64) -> Result<(), ScheduleError> {
    if u32::from(vcpus) > node.cpus {
        return Err(ScheduleError::TooManyVcpus {
            vcpus,
            cpus: node.cpus,
        });
    }
    if memory_mib << 20 > node.memory_bytes {
        return Err(ScheduleError::TooMuchMemory {
            memory_mib,
            total_mib: node.memory_bytes >> 20,
        });
    }
    Ok(())
}

/// Picks the node for `vm` to start on: capacity left for its vCPUs
/// within the overcommit ratio, and for its memory.
pub fn place(keel: &Keel, vm: &Vm) -> Result<(), ScheduleError> {
    let summary = nodes::summary(keel);
    // The VM itself is counted already once it is `starting`.
    let (own_vcpus, own_memory) = if nodes::holds_resources(vm.status) && vm.deleted_at.is_none() {
        (u64::from(vm.vcpus), vm.memory_mib << 20)
    } else {
        (0, 0)
    };
    let allocated = summary.vcpus_allocated.saturating_sub(own_vcpus);
    let allocated_memory = summary.memory_allocated_bytes.saturating_sub(own_memory);
    let vcpus = allocated + u64::from(vm.vcpus);
    if vcpus > summary.vcpus_capacity {
        return Err(ScheduleError::Cpu {
            allocated,
            more: vm.vcpus,
            capacity: summary.vcpus_capacity,
            cpus: summary.cpus,
            overcommit: summary.cpu_overcommit,
        });
    }
    let memory = allocated_memory + (vm.memory_mib << 20);
    if memory > summary.memory_bytes {
        return Err(ScheduleError::Memory {
            allocated_mib: allocated_memory >> 20,
            more_mib: vm.memory_mib,
            total_mib: summary.memory_bytes >> 20,
        });
    }
    Ok(())
}
