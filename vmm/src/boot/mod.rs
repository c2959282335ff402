//! Loading a kernel into guest memory and preparing the state it expects at
//! its entry point: the Linux 64-bit boot protocol for a bzImage (or an ELF
//! vmlinux without a PVH note), and PVH for an ELF with one.

pub mod layout;
mod linux;
mod pvh;
pub mod regs;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use keel_api::PayloadConfig;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};
use layout::*;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("No kernel given: give the path of a bzImage or an ELF vmlinux")]
    NoKernel,
    #[error("Cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a bzImage nor an ELF vmlinux: give a Linux kernel image")]
    NotAKernel { path: PathBuf },
    #[error("Cannot load kernel {path} into {mem_mib} MiB of guest memory")]
    LoadKernel {
        path: PathBuf,
        mem_mib: u64,
        #[source]
        source: loader::Error,
    },
    #[error("Kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("Cannot open initramfs {path}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Initramfs {path} ({size_mib} MiB) does not fit between the kernel (ending at \
         {kernel_end:#x}) and {top:#x}; give more --memory"
    )]
    InitramfsTooLarge {
        path: PathBuf,
        size_mib: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("Cannot read initramfs {path} into guest memory")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("Guest memory too small for the boot structures")]
    WriteBootData(#[source] vm_memory::GuestMemoryError),
}

/// The mode and state the boot vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode, RSI = zero page (Linux 64-bit boot protocol).
    Linux64 { rip: u64 },
    /// 32-bit protected mode without paging, EBX = `hvm_start_info` (PVH).
    Pvh { rip: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Initramfs {
    addr: u64,
    size: u64,
}

/// Loads the payload into `mem` and returns where the boot vCPU starts.
pub fn load_payload(
    mem: &GuestMemory,
    payload: &PayloadConfig,
    mem_size: u64,
) -> Result<EntryPoint, BootError> {
    let kernel_path = payload.kernel.as_deref().ok_or(BootError::NoKernel)?;
    let mut kernel = File::open(kernel_path).map_err(|source| BootError::OpenKernel {
        path: kernel_path.to_path_buf(),
        source,
    })?;
    let loaded = load_kernel(mem, kernel_path, &mut kernel, mem_size)?;

    let cmdline = payload.cmdline.as_deref().unwrap_or("");
    let max = match &loaded {
        Loaded::BzImage(result) => linux::cmdline_limit(result),
        _ => CMDLINE_MAX_SIZE,
    };
    write_cmdline(mem, cmdline, max)?;

    let initramfs = match &payload.initramfs {
        Some(path) => {
            let limit = match &loaded {
                Loaded::BzImage(result) => linux::initrd_addr_max(result),
                _ => u64::MAX,
            };
            Some(load_initramfs(mem, path, mem_size, limit, loaded.end())?)
        }
        None => None,
    };

    write_reset_stub(mem)?;
    let memory_map = memory_map(mem_size);
    match loaded {
        Loaded::Pvh(entry, _) => {
            pvh::write_start_info(mem, &memory_map, initramfs)?;
            Ok(EntryPoint::Pvh { rip: entry })
        }
        Loaded::BzImage(result) => {
            linux::write_zero_page(mem, result.setup_header, &memory_map, initramfs, cmdline)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
            Ok(EntryPoint::Linux64 {
                rip: result.kernel_load.0 + 0x200,
            })
        }
        Loaded::Elf64(result) => {
            linux::write_zero_page(mem, None, &memory_map, initramfs, cmdline)?;
            Ok(EntryPoint::Linux64 {
                rip: result.kernel_load.0,
            })
        }
    }
}

enum Loaded {
    BzImage(KernelLoaderResult),
    Elf64(KernelLoaderResult),
    Pvh(u64, KernelLoaderResult),
}

impl Loaded {
    /// End of the memory the kernel occupies while it boots: a bzImage
    /// decompresses itself in place and needs `init_size` bytes.
    fn end(&self) -> u64 {
        match self {
            Loaded::BzImage(r) => {
                let init_size = r.setup_header.map_or(0, |h| u64::from(h.init_size));
                (r.kernel_load.0 + init_size).max(r.kernel_end)
            }
            Loaded::Elf64(r) | Loaded::Pvh(_, r) => r.kernel_end,
        }
    }
}

fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
    kernel: &mut File,
    mem_size: u64,
) -> Result<Loaded, BootError> {
    let load_error = |source| BootError::LoadKernel {
        path: path.to_path_buf(),
        mem_mib: mem_size >> 20,
        source,
    };
    match Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            return Ok(match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Loaded::Pvh(entry.0, result),
                _ => Loaded::Elf64(result),
            });
        }
        // Too short or wrong magic: not an ELF, maybe a bzImage.
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => {}
        Err(e) => return Err(load_error(e)),
    }
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: path.to_path_buf(),
            source,
        })?;
    match BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(Loaded::BzImage(result)),
        Err(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage
            | loader::bzimage::Error::ReadBzImageHeader
            | loader::bzimage::Error::Underflow,
        )) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(load_error(e)),
    }
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    // The limit counts the terminating NUL.
    let max = max.min(CMDLINE_MAX_SIZE);
    if cmdline.len() >= max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    let addr = GuestAddress(CMDLINE_START);
    mem.write_slice(cmdline.as_bytes(), addr)
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(BootError::WriteBootData)
}

/// Puts the initramfs at the top of low RAM (below `limit`), page aligned, as
/// bootloaders do: as far as possible from the kernel decompressing itself.
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    mem_size: u64,
    limit: u64,
    kernel_end: u64,
) -> Result<Initramfs, BootError> {
    let open_error = |source| BootError::OpenInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let top = memory::low_ram_end(mem_size).min(limit.saturating_add(1));
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size_mib: size >> 20,
        kernel_end,
        top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::ReadInitramfs {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Initramfs { addr, size })
}

/// There is no firmware, but kernels still jump to the reset vector to
/// reboot: Linux on a HW-reduced ACPI machine tries EFI, then "BIOS" (real
/// mode, F000:FFF0) before the ACPI reset register. What sits there asks
/// for a reset the way the FADT says to, so every such path ends in a reset.
fn write_reset_stub(mem: &GuestMemory) -> Result<(), BootError> {
    let [port_lo, port_hi] = keel_devices::acpi_pm::RESET_PORT.to_le_bytes();
    let stub = [
        0xb0,
        keel_devices::acpi_pm::RESET_VALUE, // mov al, RESET_VALUE
        0xba,
        port_lo,
        port_hi, // mov dx, RESET_PORT
        0xee,    // out dx, al
        0xf4,    // hlt
        0xeb,
        0xfd, // jmp back to hlt
    ];
    mem.write_slice(&stub, GuestAddress(RESET_VECTOR))
        .map_err(BootError::WriteBootData)
}

/// A memory map entry shared by the e820 table and the PVH memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let low_end = memory::low_ram_end(mem_size);
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: BIOS_AREA_START,
            size: HIMEM_START - BIOS_AREA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(MemoryMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    // PCI configuration space must be marked reserved, or Linux will not
    // use ECAM ("MMCONFIG ... not reserved in ACPI motherboard resources").
    map.push(MemoryMapEntry {
        addr: memory::PCI_ECAM_START,
        size: memory::PCI_ECAM_RESERVED,
        kind: E820_RESERVED,
    });
    if mem_size > low_end {
        map.push(MemoryMapEntry {
            addr: memory::MMIO_HOLE_END,
            size: mem_size - low_end,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_exactly() {
        for size in [64 << 20, 512 << 20, 3 << 30, 6 << 30] {
            let ram: u64 = memory_map(size)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, size - (HIMEM_START - EBDA_START), "size {size}");
        }
        let big = memory_map(6 << 30);
        assert_eq!(big.last().unwrap().addr, 1 << 32);
    }

    #[test]
    fn rejects_non_kernels_and_bad_cmdlines() {
        let mem = memory::create_guest_memory(&keel_api::MemoryConfig {
            size: 64 << 20,
            ..Default::default()
        })
        .unwrap();
        let dir = std::env::temp_dir().join(format!("keel-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x5au8; 4096]).unwrap();
        let payload = PayloadConfig {
            kernel: Some(junk.clone()),
            ..Default::default()
        };
        let err = load_payload(&mem, &payload, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let payload = PayloadConfig {
            kernel: Some(empty),
            ..Default::default()
        };
        assert!(load_payload(&mem, &payload, 64 << 20).is_err());
        let payload = PayloadConfig {
            kernel: Some(dir.join("missing")),
            ..Default::default()
        };
        let err = load_payload(&mem, &payload, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE), CMDLINE_MAX_SIZE),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b", CMDLINE_MAX_SIZE),
            Err(BootError::CmdlineNul)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
