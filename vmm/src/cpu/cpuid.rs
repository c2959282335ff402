//! Per-vCPU CPUID, derived from what KVM supports on this host: each vCPU
//! gets its own APIC ID and a consistent topology (one socket, one thread per
//! core, `max_vcpus` cores), and the guest learns it runs under KVM.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x80000001 ECX: legacy multi-core (AMD).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// Logical processors in the package (boot and hot-pluggable).
    pub cpus: u8,
}

impl Topology {
    /// Bits of the APIC ID that number the cores.
    fn core_bits(&self) -> u32 {
        u32::from(self.cpus.max(1) - 1)
            .checked_ilog2()
            .map_or(0, |l| l + 1)
    }
}

/// The CPUID table for vCPU `apic_id`, built from KVM's supported table.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, topology: Topology) -> CpuId {
    let mut cpuid = supported.clone();
    let id = u32::from(apic_id);
    let count = u32::from(topology.cpus.max(1));
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, id, count, topology.core_bits());
    }
    cpuid
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    match entry.function {
        0x1 => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        // Deterministic cache parameters: cores per package sharing each level.
        0x4 => {
            entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
            // One thread per core shares L1/L2; the whole package shares L3.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & !0x03ff_c000) | ((sharing & 0xfff) << 14);
        }
        // Extended topology (Intel x2APIC and v2).
        0xb | 0x1f => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x8000_0001 => {
            if count > 1 {
                entry.ecx |= EXT1_ECX_CMP_LEGACY;
            } else {
                entry.ecx &= !EXT1_ECX_CMP_LEGACY;
            }
        }
        // AMD: cores per package and how many APIC ID bits number them.
        0x8000_0008 => {
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        // AMD extended APIC ID and compute unit (one thread per unit).
        0x8000_001e => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let supported = CpuId::from_entries(&[
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x8000_0008, 0),
        ])
        .unwrap();
        let cpuid = vcpu_cpuid(&supported, 3, Topology { cpus: 4 });
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
        assert_eq!(e[3].ecx >> 8, 0);
        assert_eq!(e[4].ecx & 0xff, 3);
        assert_eq!(Topology { cpus: 1 }.core_bits(), 0);
        assert_eq!(Topology { cpus: 2 }.core_bits(), 1);
        assert_eq!(Topology { cpus: 5 }.core_bits(), 3);
    }
}
