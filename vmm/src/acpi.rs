//! ACPI tables for a HW-reduced ACPI machine: RSDP → XSDT → FADT (→ DSDT)
//! and MADT, written into the BIOS area where a kernel looks for them.
//!
//! The DSDT describes the legacy devices a kernel would otherwise probe for
//! (COM1, the CMOS RTC, pvpanic), the power button behind the Generic Event
//! Device, and the `_S5_` sleep type that, written to the FADT's sleep
//! control register, powers the machine off.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use keel_api::{CpusConfig, MEMORY_HOTPLUG_BLOCK, MemoryConfig};
use keel_devices::pci::hotplug as pci_hotplug;
use keel_devices::{acpi_ged, acpi_pm, acpi_slots, legacy};
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
fn pci_host_bridge(dsdt: &mut Sdt, ram: &MemoryConfig) {
    use acpi_tables::aml::{AddressSpace, AddressSpaceCacheable};
    let mmio64_start = memory::pci_mmio64_start(ram);
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
    let hotplug = PciHotplugAml::new();
    aml::Device::new(
        "\\_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &hotplug],
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

/// ACPI Notify values on a PCI slot: a device appeared, or please eject.
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;

/// Everything under `PCI0` that ACPI PCI hot-plug needs: one device per
/// slot (1–31) with `_ADR`, `_SUN` and `_EJ0`, the hot-plug registers
/// (`pci::hotplug`), `PCEJ` (eject a slot) and `PCNT`, which the GED's
/// `_EVT` calls to notify each slot that changed.
struct PciHotplugAml {
    region: aml::OpRegion<'static>,
    field: aml::Field,
    slots: Vec<SlotAml>,
    pcej_body: (aml::Local, aml::Path),
    pcnt_paths: (aml::Path, aml::Path),
}

struct SlotAml {
    name: String,
    slot: u32,
    adr: u32,
    bit: u32,
}

static HOTPLUG_PORT: u16 = pci_hotplug::BASE_PORT;
static HOTPLUG_LEN: u64 = pci_hotplug::LEN;

impl PciHotplugAml {
    fn new() -> Self {
        let region = aml::OpRegion::new(
            "PHPR".into(),
            aml::OpRegionSpace::SystemIO,
            &HOTPLUG_PORT,
            &HOTPLUG_LEN,
        );
        let field = aml::Field::new(
            "PHPR".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::Preserve,
            vec![
                aml::FieldEntry::Named(*b"PCIU", 32),
                aml::FieldEntry::Named(*b"PCID", 32),
                aml::FieldEntry::Named(*b"B0EJ", 32),
            ],
        );
        let slots = (1..32u32)
            .map(|slot| SlotAml {
                name: format!("S{slot:02X}_"),
                slot,
                adr: slot << 16,
                bit: 1 << slot,
            })
            .collect();
        PciHotplugAml {
            region,
            field,
            slots,
            pcej_body: (aml::Local(0), aml::Path::new("B0EJ")),
            pcnt_paths: (aml::Path::new("PCIU"), aml::Path::new("PCID")),
        }
    }
}

impl Aml for PciHotplugAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        self.region.to_aml_bytes(sink);
        self.field.to_aml_bytes(sink);
        // PCEJ(slot): the guest let the slot's device go.
        let (bit, b0ej) = &self.pcej_body;
        let shift = aml::ShiftLeft::new(bit, &aml::ONE, &aml::Arg(0));
        let store = aml::Store::new(b0ej, bit);
        aml::Method::new("PCEJ".into(), 1, true, vec![&shift, &store]).to_aml_bytes(sink);

        for s in &self.slots {
            let adr = aml::Name::new("_ADR".into(), &s.adr);
            let sun = aml::Name::new("_SUN".into(), &s.slot);
            let call = aml::MethodCall::new("PCEJ".into(), vec![&s.slot]);
            let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
            aml::Device::new(s.name.as_str().into(), vec![&adr, &sun, &ej0]).to_aml_bytes(sink);
        }

        // PCNT: take both bitmaps (reading clears them) and notify each
        // slot: device check for an insertion, eject request for a removal.
        let (up_reg, down_reg) = &self.pcnt_paths;
        let (up, down) = (aml::Local(0), aml::Local(1));
        let take_up = aml::Store::new(&up, up_reg);
        let take_down = aml::Store::new(&down, down_reg);
        let paths: Vec<aml::Path> = self.slots.iter().map(|s| s.name.as_str().into()).collect();
        let up_tests: Vec<aml::And> = self
            .slots
            .iter()
            .map(|s| aml::And::new(&aml::ZERO, &up, &s.bit))
            .collect();
        let down_tests: Vec<aml::And> = self
            .slots
            .iter()
            .map(|s| aml::And::new(&aml::ZERO, &down, &s.bit))
            .collect();
        let up_notify: Vec<aml::Notify> = paths
            .iter()
            .map(|p| aml::Notify::new(p, &NOTIFY_DEVICE_CHECK))
            .collect();
        let down_notify: Vec<aml::Notify> = paths
            .iter()
            .map(|p| aml::Notify::new(p, &NOTIFY_EJECT_REQUEST))
            .collect();
        let mut ifs = Vec::with_capacity(2 * self.slots.len());
        for i in 0..self.slots.len() {
            ifs.push(aml::If::new(&up_tests[i], vec![&up_notify[i]]));
            ifs.push(aml::If::new(&down_tests[i], vec![&down_notify[i]]));
        }
        let mut body: Vec<&dyn Aml> = vec![&take_up, &take_down];
        body.extend(ifs.iter().map(|i| i as &dyn Aml));
        aml::Method::new("PCNT".into(), 0, true, body).to_aml_bytes(sink);
    }
}

/// AML already encoded (a device built on its own).
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// A container of hot-pluggable slots backed by `acpi_slots` registers:
/// `\_SB_.CPUS` (one processor device per possible vCPU) or `\_SB_.MHPC`
/// (one memory device per block of hot-pluggable memory). Inside it:
/// `SSTA(n)` (a slot's `_STA`: 0xF when enabled), `SPEJ(n)` (`_EJ0`: the
/// guest let it go) and `SSCN`, which the GED's `_EVT` calls to notify each
/// slot being inserted (device check) or removed (eject request). The names
/// are the same in both containers; each has its own scope.
struct HotplugSlotsAml {
    path: &'static str,
    hid: &'static str,
    port: u16,
    /// Slot devices are named this letter and three hex digits.
    prefix: char,
    /// The slot devices, already encoded, by slot number.
    devices: Vec<Encoded>,
}

impl HotplugSlotsAml {
    /// One slot device: its `_HID`, `_UID`, a `_STA` that asks `SSTA`, an
    /// `_EJ0` when `ejectable`, and `extra` objects (`_MAT`, `_CRS`).
    fn slot_device(
        name: &str,
        hid: &'static str,
        uid: u32,
        ejectable: bool,
        extra: &[&dyn Aml],
    ) -> Encoded {
        let hid = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let call = aml::MethodCall::new("SSTA".into(), vec![&uid]);
        let ret = aml::Return::new(&call);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&ret]);
        let eject = aml::MethodCall::new("SPEJ".into(), vec![&uid]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid_name, &sta];
        if ejectable {
            children.push(&ej0);
        }
        children.extend_from_slice(extra);
        let mut bytes = Vec::new();
        aml::Device::new(name.into(), children).to_aml_bytes(&mut bytes);
        Encoded(bytes)
    }

    /// `\_SB_.CPUS`: processor devices `C000`… with `_MAT` (their local
    /// APIC entry, marked enabled: `_STA` says whether they are there).
    fn cpus(max: u8) -> Self {
        let devices = (0..u32::from(max))
            .map(|i| {
                let entry = vec![MADT_LOCAL_APIC, 8, i as u8, i as u8, 1, 0, 0, 0];
                let mat = aml::BufferData::new(entry);
                let mat = aml::Name::new("_MAT".into(), &mat);
                Self::slot_device(&format!("C{i:03X}"), "ACPI0007", i, true, &[&mat])
            })
            .collect();
        HotplugSlotsAml {
            path: "\\_SB_.CPUS",
            hid: "ACPI0010",
            port: acpi_slots::CPU_PORT,
            prefix: 'C',
            devices,
        }
    }

    /// `\_SB_.MHPC`: memory devices `M000`… (`PNP0C80`), one per block of
    /// the hot-plug room, each with its address range in `_CRS`.
    fn memory(ram: &MemoryConfig) -> Self {
        use acpi_tables::aml::{AddressSpace, AddressSpaceCacheable};
        let base = memory::hotplug_base(ram.size);
        let devices = (0..ram.hotplug_blocks() as u64)
            .map(|i| {
                let start = base + i * MEMORY_HOTPLUG_BLOCK;
                let range = AddressSpace::<u64>::new_memory(
                    AddressSpaceCacheable::Cacheable,
                    true,
                    start,
                    start + MEMORY_HOTPLUG_BLOCK - 1,
                    None,
                );
                let crs = aml::ResourceTemplate::new(vec![&range]);
                let crs = aml::Name::new("_CRS".into(), &crs);
                Self::slot_device(&format!("M{i:03X}"), "PNP0C80", i as u32, false, &[&crs])
            })
            .collect();
        HotplugSlotsAml {
            path: "\\_SB_.MHPC",
            hid: "PNP0A06",
            port: acpi_slots::MEMORY_PORT,
            prefix: 'M',
            devices,
        }
    }
}

impl Aml for HotplugSlotsAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid = aml::Name::new("_HID".into(), &self.hid);
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let len = acpi_slots::LEN;
        let region = aml::OpRegion::new(
            "SREG".into(),
            aml::OpRegionSpace::SystemIO,
            &self.port,
            &len,
        );
        let selector = aml::Field::new(
            "SREG".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::WriteAsZeroes,
            vec![aml::FieldEntry::Named(*b"SSEL", 32)],
        );
        // Flags: writing one bit writes the others as zero, so
        // acknowledging "inserting" cannot also acknowledge "removing".
        let flags = aml::Field::new(
            "SREG".into(),
            aml::FieldAccessType::Byte,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::WriteAsZeroes,
            vec![
                aml::FieldEntry::Reserved(32),
                aml::FieldEntry::Named(*b"SPEN", 1),
                aml::FieldEntry::Named(*b"SINS", 1),
                aml::FieldEntry::Named(*b"SRMV", 1),
                aml::FieldEntry::Named(*b"SEJ0", 1),
            ],
        );
        let lock = aml::Mutex::new("SLCK".into(), 0);
        let (ssel, spen, sins, srmv, sej0) = (
            aml::Path::new("SSEL"),
            aml::Path::new("SPEN"),
            aml::Path::new("SINS"),
            aml::Path::new("SRMV"),
            aml::Path::new("SEJ0"),
        );
        let acquire = aml::Acquire::new("SLCK".into(), 0xffff);
        let release = aml::Release::new("SLCK".into());

        // SSTA(slot): 0xF when enabled, else 0.
        let select = aml::Store::new(&ssel, &aml::Arg(0));
        let status = aml::Local(0);
        let none = aml::Store::new(&status, &aml::ZERO);
        let present = aml::Store::new(&status, &0xfu8);
        let enabled = aml::Equal::new(&spen, &aml::ONE);
        let if_enabled = aml::If::new(&enabled, vec![&present]);
        let ret = aml::Return::new(&status);
        let ssta = aml::Method::new(
            "SSTA".into(),
            1,
            true,
            vec![&acquire, &select, &none, &if_enabled, &release, &ret],
        );
        // SPEJ(slot): the guest let it go.
        let eject = aml::Store::new(&sej0, &aml::ONE);
        let spej = aml::Method::new(
            "SPEJ".into(),
            1,
            true,
            vec![&acquire, &select, &eject, &release],
        );

        // SSCN: every slot's pending insert or removal becomes a Notify.
        let ids: Vec<u32> = (0..self.devices.len() as u32).collect();
        let paths: Vec<aml::Path> = ids
            .iter()
            .map(|i| format!("{}{i:03X}", self.prefix).as_str().into())
            .collect();
        let selects: Vec<aml::Store> = ids.iter().map(|i| aml::Store::new(&ssel, i)).collect();
        let inserting = aml::Equal::new(&sins, &aml::ONE);
        let removing = aml::Equal::new(&srmv, &aml::ONE);
        let ack_insert = aml::Store::new(&sins, &aml::ONE);
        let ack_remove = aml::Store::new(&srmv, &aml::ONE);
        let checks: Vec<aml::Notify> = paths
            .iter()
            .map(|p| aml::Notify::new(p, &NOTIFY_DEVICE_CHECK))
            .collect();
        let ejects: Vec<aml::Notify> = paths
            .iter()
            .map(|p| aml::Notify::new(p, &NOTIFY_EJECT_REQUEST))
            .collect();
        let mut ifs = Vec::with_capacity(ids.len() * 2);
        for i in 0..ids.len() {
            ifs.push(aml::If::new(&inserting, vec![&checks[i], &ack_insert]));
            ifs.push(aml::If::new(&removing, vec![&ejects[i], &ack_remove]));
        }
        let mut scan: Vec<&dyn Aml> = vec![&acquire];
        for i in 0..ids.len() {
            scan.push(&selects[i]);
            scan.push(&ifs[2 * i]);
            scan.push(&ifs[2 * i + 1]);
        }
        scan.push(&release);
        let sscn = aml::Method::new("SSCN".into(), 0, true, scan);

        let mut children: Vec<&dyn Aml> = vec![
            &hid, &uid, &region, &selector, &flags, &lock, &ssta, &spej, &sscn,
        ];
        children.extend(self.devices.iter().map(|d| d as &dyn Aml));
        aml::Device::new(self.path.into(), children).to_aml_bytes(sink);
    }
}

/// ACPI's Notify value for "status changed"; on a power button, a press.
const NOTIFY_STATUS_CHANGED: u8 = 0x80;

/// The power button and the Generic Event Device that signals it: HW-reduced
/// ACPI has no fixed power-button event, so the GED's interrupt runs `_EVT`,
/// which takes the pending events from the status register (reading clears
/// them) and notifies the device each bit stands for. Hot-plug events get
/// their own bit and `If` in `_EVT`.
fn generic_event_device(dsdt: &mut Sdt) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("\\_SB_.PWRB".into(), vec![&hid, &uid]).to_aml_bytes(dsdt);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, acpi_ged::IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let region = aml::OpRegion::new(
        "GREG".into(),
        aml::OpRegionSpace::SystemIO,
        &acpi_ged::BASE_PORT,
        &acpi_ged::LEN,
    );
    // One DWord access, so a single read takes (and clears) every event.
    let field = aml::Field::new(
        "GREG".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![aml::FieldEntry::Named(*b"GSTA", 32)],
    );
    let status = aml::Path::new("GSTA");
    let events = aml::Local(0);
    let take_events = aml::Store::new(&events, &status);
    let pressed = aml::And::new(&aml::ZERO, &events, &acpi_ged::POWER_BUTTON);
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &NOTIFY_STATUS_CHANGED);
    let power_button = aml::If::new(&pressed, vec![&notify]);
    let pci_changed = aml::And::new(&aml::ZERO, &events, &acpi_ged::PCI_HOTPLUG);
    let pcnt = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let pci_hotplug = aml::If::new(&pci_changed, vec![&pcnt]);
    let cpu_changed = aml::And::new(&aml::ZERO, &events, &acpi_ged::CPU_HOTPLUG);
    let cscn = aml::MethodCall::new("\\_SB_.CPUS.SSCN".into(), vec![]);
    let cpu_hotplug = aml::If::new(&cpu_changed, vec![&cscn]);
    let memory_changed = aml::And::new(&aml::ZERO, &events, &acpi_ged::MEMORY_HOTPLUG);
    let mscn = aml::MethodCall::new("\\_SB_.MHPC.SSCN".into(), vec![]);
    let memory_hotplug = aml::If::new(&memory_changed, vec![&mscn]);
    // Arg0 is the interrupt number; with one interrupt there is nothing to
    // tell apart. Serialized: a second interrupt must not read the register
    // while the first is still acting on what it read.
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![
            &take_events,
            &power_button,
            &pci_hotplug,
            &cpu_hotplug,
            &memory_hotplug,
        ],
    );
    aml::Device::new(
        "\\_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(dsdt);
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

fn dsdt(ram: &MemoryConfig, cpus: &CpusConfig) -> Sdt {
    use legacy::{cmos, pvpanic, serial};
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    pci_host_bridge(&mut dsdt, ram);
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
    generic_event_device(&mut dsdt);
    HotplugSlotsAml::cpus(cpus.max_vcpus).to_aml_bytes(&mut dsdt);
    if ram.hotplug_blocks() > 0 {
        HotplugSlotsAml::memory(ram).to_aml_bytes(&mut dsdt);
    }
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
pub fn write_tables(
    mem: &GuestMemory,
    cpus: &CpusConfig,
    ram: &MemoryConfig,
) -> Result<u64, AcpiError> {
    let align = |addr: u64| (addr + 15) & !15;
    let mut next = align(RSDP_START + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };

    let dsdt = dsdt(ram, cpus);
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
    fn test_memory() -> keel_api::MemoryConfig {
        keel_api::MemoryConfig {
            size: 512 << 20,
            hotplug_size: Some(1 << 30),
            hotplugged_size: None,
        }
    }

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
        let dsdt = dsdt(
            &test_memory(),
            &CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 4,
            },
        );
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

    /// Whether `body` has a Device op (after its PkgLength) named `path`.
    fn has_device(body: &[u8], path: &[u8]) -> bool {
        (0..body.len().saturating_sub(2)).any(|i| {
            body[i..].starts_with(&[0x5b, 0x82])
                && body
                    .get(i + 3 + usize::from(body[i + 2] >> 6)..)
                    .is_some_and(|rest| rest.starts_with(path))
        })
    }

    #[test]
    fn dsdt_has_a_hotplug_slot_per_pci_slot() {
        let dsdt = dsdt(
            &test_memory(),
            &CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 4,
            },
        );
        let body = dsdt.as_slice();
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        for slot in 1..32 {
            let name = format!("S{slot:02X}_");
            assert!(has_device(body, name.as_bytes()), "no slot device {name}");
        }
        assert!(!has_device(body, b"S00_"), "slot 0 is the host bridge");
        for name in [
            &b"PCNT"[..],
            b"PCEJ",
            b"PCIU",
            b"PCID",
            b"B0EJ",
            b"_EJ0",
            b"_SUN",
        ] {
            assert!(find(name), "{}", String::from_utf8_lossy(name));
        }
        // The GED's _EVT calls PCNT.
        assert!(find(b"\\/\x03_SB_PCI0PCNT"));
    }

    /// When iasl is installed (.ci/run installs it), the DSDT must
    /// disassemble without errors.
    #[test]
    fn dsdt_disassembles_with_iasl() {
        let Ok(status) = std::process::Command::new("iasl").arg("-v").output() else {
            eprintln!("iasl not installed: structure checked by the other tests only");
            return;
        };
        assert!(status.status.success());
        let dir = std::env::temp_dir().join(format!("keel-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join("dsdt.dat");
        std::fs::write(
            &table,
            dsdt(
                &test_memory(),
                &CpusConfig {
                    boot_vcpus: 1,
                    max_vcpus: 4,
                },
            )
            .as_slice(),
        )
        .unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&table)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        assert!(dsl.contains("Method (PCNT"), "{dsl}");
        assert!(dsl.contains("Notify (S1F, 0x03)"), "{dsl}");
        // CPU hot-plug: one processor device per possible vCPU (4 here).
        assert!(dsl.contains("Device (C003)"), "{dsl}");
        assert!(!dsl.contains("Device (C004)"), "{dsl}");
        assert!(dsl.contains("Method (SSCN"), "{dsl}");
        assert!(dsl.contains("\\_SB.CPUS.SSCN ()"), "{dsl}");
        // Memory hot-plug: 1 GiB of room, eight 128 MiB blocks at 4 GiB.
        assert!(dsl.contains("Device (M007)"), "{dsl}");
        assert!(!dsl.contains("Device (M008)"), "{dsl}");
        assert!(dsl.contains("\\_SB.MHPC.SSCN ()"), "{dsl}");
        assert!(dsl.contains("0x0000000100000000"), "{dsl}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dsdt_has_the_power_button_behind_the_ged() {
        let dsdt = dsdt(
            &test_memory(),
            &CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 4,
            },
        );
        let body = dsdt.as_slice();
        let find = |needle: &[u8]| body.windows(needle.len()).position(|w| w == needle);
        assert!(has_device(body, b"\\\x2e_SB_GED_"));
        assert!(has_device(body, b"\\\x2e_SB_PWRB"));
        let mut pwrb_hid = Vec::new();
        aml::EISAName::new("PNP0C0C").to_aml_bytes(&mut pwrb_hid);
        assert!(find(&pwrb_hid).is_some());
        assert!(find(b"ACPI0013\0").is_some());
        // Extended IRQ descriptor: consumer, edge, active-high, one IRQ.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&acpi_ged::IRQ.to_le_bytes());
        assert!(find(&irq).is_some());
        // OperationRegion (GREG, SystemIO, port, length).
        let [lo, hi] = acpi_ged::BASE_PORT.to_le_bytes();
        let region = [0x5b, 0x80, b'G', b'R', b'E', b'G', 1, 0x0b, lo, hi, 0x0a, 4];
        assert!(find(&region).is_some());
        // Notify (\_SB_.PWRB, 0x80), inside _EVT.
        let notify = b"\x86\\\x2e_SB_PWRB\x0a";
        let notify_at = find(notify).unwrap();
        assert_eq!(body[notify_at + notify.len()], NOTIFY_STATUS_CHANGED);
        assert!(find(b"_EVT").is_some_and(|evt| evt < notify_at));
    }

    #[test]
    fn rsdp_points_at_xsdt_that_lists_the_tables() {
        let ram = MemoryConfig {
            size: 16 << 20,
            ..Default::default()
        };
        let mem = crate::memory::create_guest_memory(&ram).unwrap();
        let rsdp = write_tables(&mem, &CpusConfig::default(), &ram).unwrap();
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
