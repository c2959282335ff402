//! The PVH boot ABI's `hvm_start_info`, module list and memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::{BootError, Initramfs, MemoryMapEntry};
use crate::memory::GuestMemory;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

pub fn write_start_info(
    mem: &GuestMemory,
    memory_map: &[MemoryMapEntry],
    initramfs: Option<Initramfs>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: RSDP_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memory_map.len() as u32,
        ..Default::default()
    };
    if let Some(initramfs) = initramfs {
        let module = hvm_modlist_entry {
            paddr: initramfs.addr,
            size: initramfs.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::WriteBootData)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, entry) in memory_map.iter().enumerate() {
        let table_entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        let addr = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(table_entry, GuestAddress(addr))
            .map_err(BootError::WriteBootData)?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::WriteBootData)
}
