//! ACPI tables for a HW-reduced ACPI machine: RSDP → XSDT → FADT (→ DSDT)
//! and MADT, written into the BIOS area where a kernel looks for them.
//!
//! The DSDT describes the legacy devices a kernel would otherwise probe for
//! (COM1, the CMOS RTC, pvpanic) and the `_S5_` sleep type that, written to
//! the FADT's sleep control register, powers the machine off.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use keel_api::CpusConfig;
use keel_devices::{acpi_pm, legacy};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::layout::{HIMEM_START, RSDP_START};
use crate::memory::{self, GuestMemory};

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEELVMM ";
const OEM_REVISION: u32 = 1;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
    #[error("Cannot write ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

// FADT fields (ACPI 6.5, table 5.9), by byte offset.
const FADT_LEN: u32 = 276;
const FADT_DSDT: usize = 40;
const FADT_SCI_INT: usize = 46;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const FADT_SLEEP_STATUS_REG: usize = 256;
const FADT_HYPERVISOR_ID: usize = 268;

const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture: no VGA. The 8042 flag stays clear so kernels skip
/// keyboard probing; the controller is still there for its reset line.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LAPIC_ENABLED: u32 = 1 << 0;
const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

/// An ISA device under `\_SB_` with a hardware ID and its resources.
fn isa_device(dsdt: &mut Sdt, path: &str, hid: &dyn Aml, resources: &[&dyn Aml]) {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let hid = aml::Name::new("_HID".into(), hid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(path.into(), vec![&hid, &crs]).to_aml_bytes(dsdt);
}

/// The PCI host bridge: segment 0, bus 0, its configuration ports and the
/// windows the OS may place BARs in.
fn pci_host_bridge(dsdt: &mut Sdt, mem_size: u64) {
    use acpi_tables::aml::{AddressSpace, AddressSpaceCacheable};
    let mmio64_start = memory::pci_mmio64_start(mem_size);
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        memory::PCI_MMIO32_START as u32,
        (memory::PCI_MMIO32_START + memory::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + memory::PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![
        &bus,
        &config_ports,
        &io_low,
        &io_high,
        &mmio32,
        &mmio64,
    ]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(
        "\\_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    )
    .to_aml_bytes(dsdt);
    // ECAM is a motherboard resource: reserved for the bridge, not free.
    let ecam = aml::Memory32Fixed::new(
        false,
        memory::PCI_ECAM_START as u32,
        memory::PCI_ECAM_RESERVED as u32,
    );
    isa_device(
        dsdt,
        "\\_SB_.MRES",
        &aml::EISAName::new("PNP0C02"),
        &[&ecam],
    );
}

/// MCFG: where ECAM for segment 0, bus 0 lives.
fn mcfg() -> Sdt {
    let mut mcfg = Sdt::new(*b"MCFG", 44, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.append_slice(&memory::PCI_ECAM_START.to_le_bytes());
    // Segment 0, buses 0..=0, reserved.
    mcfg.append_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    mcfg.update_checksum();
    mcfg
}

fn dsdt(mem_size: u64) -> Sdt {
    use legacy::{cmos, pvpanic, serial};
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    pci_host_bridge(&mut dsdt, mem_size);
    isa_device(
        &mut dsdt,
        "\\_SB_.COM1",
        &aml::EISAName::new("PNP0501"),
        &[
            &aml::IO::new(serial::COM1_PORT, serial::COM1_PORT, 1, serial::LEN as u8),
            &aml::Interrupt::new(true, true, false, false, serial::COM1_IRQ),
        ],
    );
    isa_device(
        &mut dsdt,
        "\\_SB_.RTC_",
        &aml::EISAName::new("PNP0B00"),
        &[
            &aml::IO::new(cmos::BASE_PORT, cmos::BASE_PORT, 1, cmos::LEN as u8),
            &aml::Interrupt::new(true, true, false, false, cmos::IRQ),
        ],
    );
    isa_device(
        &mut dsdt,
        "\\_SB_.PEVT",
        &"QEMU0001",
        &[&aml::IO::new(pvpanic::PORT, pvpanic::PORT, 1, 1)],
    );
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&acpi_pm::S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", FADT_LEN, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    fadt.write_u32(FADT_DSDT, dsdt_addr as u32);
    fadt.write_u16(FADT_SCI_INT, 9);
    fadt.write_u16(FADT_IAPC_BOOT_ARCH, IAPC_BOOT_ARCH_VGA_NOT_PRESENT);
    fadt.write_u32(FADT_FLAGS, FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP);
    fadt.write(
        FADT_RESET_REG,
        GenericAddress::io_port_address::<u8>(acpi_pm::RESET_PORT),
    );
    fadt.write_u8(FADT_RESET_VALUE, acpi_pm::RESET_VALUE);
    fadt.write_u8(FADT_MINOR_VERSION, 5);
    fadt.write_u64(FADT_X_DSDT, dsdt_addr);
    fadt.write(
        FADT_SLEEP_CONTROL_REG,
        GenericAddress::io_port_address::<u8>(acpi_pm::SLEEP_CONTROL_PORT),
    );
    fadt.write(
        FADT_SLEEP_STATUS_REG,
        GenericAddress::io_port_address::<u8>(acpi_pm::SLEEP_STATUS_PORT),
    );
    fadt.write_bytes(FADT_HYPERVISOR_ID, b"KEELVMM\0");
    fadt
}

fn madt(cpus: &CpusConfig) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus.max_vcpus {
        let flags = if id < cpus.boot_vcpus {
            LAPIC_ENABLED
        } else {
            LAPIC_ONLINE_CAPABLE
        };
        // Type, length, ACPI processor UID, APIC ID, flags.
        madt.append_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        madt.append_slice(&flags.to_le_bytes());
    }
    // Type, length, IOAPIC ID, reserved, address, GSI base.
    madt.append_slice(&[MADT_IO_APIC, 12, 0, 0]);
    madt.append_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 (the timer) arrives on IOAPIC pin 2, as on every PC.
    madt.append_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, 0]);
    madt.append_slice(&2u32.to_le_bytes());
    madt.append_slice(&0u16.to_le_bytes());
    // NMI on LINT1 of every processor (UID 0xff).
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt.update_checksum();
    madt
}

fn xsdt(entries: &[u64]) -> Sdt {
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for entry in entries {
        xsdt.append_slice(&entry.to_le_bytes());
    }
    xsdt.update_checksum();
    xsdt
}

/// Writes the tables at [`RSDP_START`] and returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, cpus: &CpusConfig, mem_size: u64) -> Result<u64, AcpiError> {
    let align = |addr: u64| (addr + 15) & !15;
    let mut next = align(RSDP_START + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };

    let dsdt = dsdt(mem_size);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cpus);
    let madt_addr = place(madt.len());
    let mcfg = mcfg();
    let mcfg_addr = place(mcfg.len());
    let xsdt = xsdt(&[fadt_addr, madt_addr, mcfg_addr]);
    let xsdt_addr = place(xsdt.len());
    if next > HIMEM_START {
        return Err(AcpiError::TooLarge(next - RSDP_START));
    }

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut rsdp_bytes = Vec::with_capacity(Rsdp::len());
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    for (bytes, addr) in [
        (rsdp_bytes.as_slice(), RSDP_START),
        (dsdt.as_slice(), dsdt_addr),
        (fadt.as_slice(), fadt_addr),
        (madt.as_slice(), madt_addr),
        (mcfg.as_slice(), mcfg_addr),
        (xsdt.as_slice(), xsdt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 4,
        };
        let madt = madt(&cpus);
        assert!(checksum_ok(madt.as_slice()));
        let enabled = madt.as_slice()[44..]
            .chunks(8)
            .take(4)
            .filter(|e| e[0] == MADT_LOCAL_APIC && e[4] & 1 == 1)
            .count();
        assert_eq!(enabled, 2);
        let dsdt = dsdt(512 << 20);
        assert!(checksum_ok(dsdt.as_slice()));
        assert!(dsdt.as_slice().windows(4).any(|w| w == b"PCI0"));
        let mcfg = mcfg();
        assert!(checksum_ok(mcfg.as_slice()));
        assert_eq!(mcfg.len(), 60);
        let body = dsdt.as_slice();
        let s5 = body.windows(4).position(|w| w == b"_S5_").unwrap();
        // PackageOp, length, 4 elements, BytePrefix 5.
        assert_eq!(body[s5 + 4], 0x12);
        assert_eq!(&body[s5 + 6..s5 + 9], &[4, 0x0a, acpi_pm::S5_SLEEP_TYPE]);
        let fadt = fadt(0x1234);
        assert!(checksum_ok(fadt.as_slice()));
        assert_eq!(fadt.len(), FADT_LEN as usize);
    }

    #[test]
    fn rsdp_points_at_xsdt_that_lists_the_tables() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let rsdp = write_tables(&mem, &CpusConfig::default(), 16 << 20).unwrap();
        let mut head = [0u8; 36];
        mem.read_slice(&mut head, GuestAddress(rsdp)).unwrap();
        assert_eq!(&head[..8], b"RSD PTR ");
        assert!(checksum_ok(&head[..20]) && checksum_ok(&head));
        let xsdt_addr = u64::from_le_bytes(head[24..32].try_into().unwrap());
        let mut xsdt = [0u8; 52];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sig = [0u8; 4];
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        mem.read_slice(&mut sig, GuestAddress(fadt_addr)).unwrap();
        assert_eq!(&sig, b"FACP");
    }
}
