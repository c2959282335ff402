//! Guest RAM: where it lives in the guest's physical address space and how it
//! is backed on the host.
//!
//! RAM fills the space below the 32-bit MMIO hole (3 GiB – 4 GiB, where the
//! IOAPIC, the local APICs and PCI windows live) and continues above 4 GiB.

use std::fs;

use keel_api::MemoryConfig;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit hole for devices; RAM below it is "low memory".
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// The 32-bit hole, from the bottom: PCI BARs, then PCI configuration
/// space (ECAM), then the IOAPIC and local APIC pages at 0xFEC00000+.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM for bus 0 (1 MiB); the 256 MiB a full segment would use are
/// reserved so more buses can come later.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_RESERVED: u64 = 0x1000_0000;
/// 64-bit BARs go above RAM, in a window this large.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Where hot-pluggable memory starts for `mem_size` bytes of boot RAM: the
/// first 1 GiB boundary above the end of RAM (and above 4 GiB).
pub fn hotplug_base(mem_size: u64) -> u64 {
    let ram_end = match ram_ranges(mem_size).last() {
        Some((start, len)) => start.0 + *len as u64,
        None => MMIO_HOLE_END,
    };
    ram_end.max(MMIO_HOLE_END).next_multiple_of(1 << 30)
}

/// Where the 64-bit PCI window starts: the first 1 GiB boundary above RAM
/// and the room left for hot-pluggable memory.
pub fn pci_mmio64_start(memory: &MemoryConfig) -> u64 {
    (hotplug_base(memory.size) + memory.hotplug_size.unwrap_or(0)).next_multiple_of(1 << 30)
}

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error(
        "Guest memory of {requested_mib} MiB is more than this host can back \
         ({available_mib} MiB of RAM and swap); give a smaller --memory size"
    )]
    TooLarge {
        requested_mib: u64,
        available_mib: u64,
    },
    #[error("Could not map {size_mib} MiB of guest memory")]
    Mmap {
        size_mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// End of RAM below the hole (exclusive).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// RAM plus swap: the most this host could ever back, whatever it overcommits.
fn host_backing_limit() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// Maps guest RAM, and the room for hot-pluggable memory (mapped and given
/// to KVM now, so devices and vCPUs never see memory appear; the guest
/// learns of it through ACPI when it is plugged in). Pages are populated
/// lazily, so this is cheap, but a size the host could never back is
/// refused here rather than failing later with the guest half-booted.
pub fn create_guest_memory(memory: &MemoryConfig) -> Result<GuestMemory, MemoryError> {
    let room = memory.hotplug_size.unwrap_or(0);
    let size = memory.size + room;
    if let Some(limit) = host_backing_limit()
        && size > limit
    {
        return Err(MemoryError::TooLarge {
            requested_mib: size >> 20,
            available_mib: limit >> 20,
        });
    }
    let mut ranges = ram_ranges(memory.size);
    if room > 0 {
        ranges.push((GuestAddress(hotplug_base(memory.size)), room as usize));
    }
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Mmap {
        size_mib: size >> 20,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(big[1], (GuestAddress(1 << 32), 1 << 30));
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn hotplug_room_sits_above_ram_and_below_the_64_bit_window() {
        let memory = MemoryConfig {
            size: 512 << 20,
            hotplug_size: Some(1 << 30),
            hotplugged_size: None,
        };
        assert_eq!(hotplug_base(memory.size), 1 << 32);
        assert_eq!(pci_mmio64_start(&memory), 5 << 30);
        let mem = create_guest_memory(&memory).unwrap();
        use vm_memory::GuestMemoryBackend;
        assert!(mem.address_in_range(GuestAddress((1 << 32) + (1 << 30) - 1)));
        assert!(!mem.address_in_range(GuestAddress(1 << 31)));
        // 4 GiB + 1 GiB of RAM: the room starts at the next 1 GiB boundary.
        assert_eq!(hotplug_base(4 << 30), 5 << 30);
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let size = |size| MemoryConfig {
            size,
            ..Default::default()
        };
        let err = create_guest_memory(&size(1 << 50)).unwrap_err();
        assert!(matches!(err, MemoryError::TooLarge { .. }), "{err}");
        assert!(create_guest_memory(&size(16 << 20)).is_ok());
    }
}
