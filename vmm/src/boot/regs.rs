//! The CPU state at a kernel's entry point: the boot GDT, identity-mapped
//! page tables for 64-bit entry, and the register values for either protocol.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::{BootError, EntryPoint};
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Descriptor flags (access byte and the granularity nibble), as in the
/// Linux boot protocol's GDT: 64-bit code, 32-bit code, flat data, busy TSS.
const CODE64_FLAGS: u16 = 0xa09b;
const CODE32_FLAGS: u16 = 0xc09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

/// Present, writable; plus PS (2 MiB page) for the directory entries.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_LARGE_PAGE: u64 = 0x80;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = bit(55) == 1;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn gdt(entry: EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Linux64 { .. } => CODE64_FLAGS,
        EntryPoint::Pvh { .. } => CODE32_FLAGS,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) page tables that
/// identity-map the first GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemory, entry: EntryPoint) -> Result<(), BootError> {
    let write = |value: &[u8], addr: u64| {
        mem.write_slice(value, GuestAddress(addr))
            .map_err(BootError::WriteBootData)
    };
    let gdt: Vec<u8> = gdt(entry).iter().flat_map(|e| e.to_le_bytes()).collect();
    write(&gdt, GDT_START)?;
    write(&0u64.to_le_bytes(), IDT_START)?;
    if let EntryPoint::Linux64 { .. } = entry {
        write(&(PDPT_START | PTE_PRESENT_RW).to_le_bytes(), PML4_START)?;
        write(&(PD_START | PTE_PRESENT_RW).to_le_bytes(), PDPT_START)?;
        let directory: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | PDE_LARGE_PAGE | PTE_PRESENT_RW).to_le_bytes())
            .collect();
        write(&directory, PD_START)?;
    }
    Ok(())
}

pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64 { rip } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh { rip } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// The special registers at entry, starting from the vCPU's reset state.
pub fn boot_sregs(entry: EntryPoint, reset: &kvm_sregs) -> kvm_sregs {
    let table = gdt(entry);
    let code = segment(table[CODE_INDEX as usize], CODE_INDEX);
    let data = segment(table[DATA_INDEX as usize], DATA_INDEX);
    let mut sregs = *reset;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET;
    match entry {
        EntryPoint::Linux64 { .. } => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let code = segment(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!((code.l, code.db, code.present, code.type_), (1, 0, 1, 0xb));
        let code32 = segment(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment(gdt_entry(DATA_FLAGS, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.s, data.unusable), (3, 1, 0));
        assert_eq!(gdt_entry(DATA_FLAGS, 0x1234_5678, 0xfffff) >> 56, 0x12);
    }

    #[test]
    fn long_mode_entry_enables_paging() {
        let s = boot_sregs(EntryPoint::Linux64 { rip: 0 }, &kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        let p = boot_sregs(EntryPoint::Pvh { rip: 0 }, &kvm_sregs::default());
        assert_eq!(p.cr0 & CR0_PG, 0);
        assert_eq!(p.efer, 0);
    }
}
