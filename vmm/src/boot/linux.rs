//! The zero page (`boot_params`) of the Linux x86 boot protocol.

use linux_loader::loader::KernelLoaderResult;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::{BootError, Initramfs, MemoryMapEntry};
use crate::memory::GuestMemory;

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader, which kernels accept from any loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Before boot protocol 2.03 the initrd had to end below this.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// How long a command line (with its NUL) the kernel accepts.
pub fn cmdline_limit(result: &KernelLoaderResult) -> usize {
    match result.setup_header {
        Some(hdr) if hdr.version >= 0x0206 => hdr.cmdline_size as usize + 1,
        _ => 256,
    }
}

/// Highest address the initramfs may occupy.
pub fn initrd_addr_max(result: &KernelLoaderResult) -> u64 {
    match result.setup_header {
        Some(hdr) if hdr.version >= 0x0203 && hdr.initrd_addr_max != 0 => {
            u64::from(hdr.initrd_addr_max)
        }
        _ => LEGACY_INITRD_ADDR_MAX,
    }
}

pub fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    memory_map: &[MemoryMapEntry],
    initramfs: Option<Initramfs>,
    cmdline: &str,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.addr as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
    }
    params.acpi_rsdp_addr = RSDP_START;
    for (slot, entry) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = memory_map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::WriteBootData)
}
