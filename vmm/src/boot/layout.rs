//! Where boot-time structures live in guest memory (all below 1 MiB, except
//! the kernel itself, which goes to 1 MiB, and the initramfs, which goes to
//! the top of low RAM).

/// Boot GDT and an empty IDT.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the stack a 64-bit Linux entry starts with.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables for the 64-bit entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS read-only area where a kernel scans for the ACPI RSDP.
pub const BIOS_AREA_START: u64 = 0xe0000;
pub const RSDP_START: u64 = BIOS_AREA_START;
/// The x86 reset vector (F000:FFF0 in real mode), where firmware would be.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where the kernel is loaded, and where high memory starts.
pub const HIMEM_START: u64 = 0x100000;

/// e820 / PVH memory map entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
