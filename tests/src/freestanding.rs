//! Keel's freestanding test guest: a few KiB of 32-bit C and assembly, booted
//! through the PVH ABI (sources in `tests/guest/freestanding/`, built by
//! `build.rs`), and a parser for what it prints on COM1.
//!
//! The guest prints one line per fact, each starting with `KEEL-GUEST `:
//!
//! | Line | Meaning |
//! |------|---------|
//! | `READY` | First thing after entry; only the stack is set up. |
//! | `MEM <addr> <size> <type>` | One `hvm_start_info` memory map entry (hex, hex, decimal). |
//! | `MEMTOTAL <KiB>` | Sum of the type 1 (RAM) entries. |
//! | `CMDLINE <text>` | The command line, when `cmdline_paddr` is not 0. |
//! | `ACPI <sig> <addr> <len>` | A table whose checksum held: RSDP, RSDT/XSDT, each table they list, DSDT. |
//! | `CPU apic=<id>` | An enabled Local APIC or Local x2APIC in the MADT. |
//! | `CPUS <n>` | How many. |
//! | `POWEROFF` | About to write S5 to PM1a_CNT or the sleep control register. |
//! | `REBOOTING` / `SECOND-BOOT` | `keel.mode=reboot`, before the reset and after it (CMOS byte 0x40 kept). |
//! | `TRIPLEFAULT` / `HALT` / `SPIN` | The other modes, after the report. |
//! | `ERROR <reason>` | Something was wrong; the guest then triple-faults (or halts if a poweroff did not happen). |
//!
//! The guest runs on the boot CPU only. Its mode comes from `keel.mode=` on
//! the command line (see [`Mode`]).

use std::error::Error;
use std::fmt;
use std::path::Path;

/// What every line of the guest's starts with.
pub const LINE_PREFIX: &str = "KEEL-GUEST ";

/// The guest's kernel image: an ELF64 file with a PVH note, loaded at 1 MiB.
pub fn guest_elf() -> &'static Path {
    Path::new(env!("KEEL_FREESTANDING_GUEST"))
}

/// What the guest does after its report, chosen with `keel.mode=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Power off through the FADT and the DSDT's `_S5_` (the default).
    Poweroff,
    /// Reset through the FADT's reset register (or the i8042) with a mark in
    /// CMOS NVRAM byte 0x40; after the reset, report `SECOND-BOOT` and power
    /// off.
    Reboot,
    /// Load an empty IDT and fault: the CPU shuts down.
    TripleFault,
    /// `cli; hlt` forever.
    Halt,
    /// Loop forever without exits.
    Spin,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Poweroff => "poweroff",
            Mode::Reboot => "reboot",
            Mode::TripleFault => "triplefault",
            Mode::Halt => "halt",
            Mode::Spin => "spin",
        }
    }

    /// The kernel command line that selects this mode.
    pub fn cmdline(self) -> String {
        format!("keel.mode={}", self.as_str())
    }
}

/// An ACPI table the guest found and checksummed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    pub signature: String,
    pub address: u64,
    pub length: u32,
}

/// One line of the guest's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    Ready,
    Mem { addr: u64, size: u64, kind: u32 },
    MemTotalKib(u64),
    Cmdline(String),
    Acpi(AcpiTable),
    Cpu { apic_id: u32 },
    Cpus(u32),
    Poweroff,
    Rebooting,
    SecondBoot,
    TripleFault,
    Halt,
    Spin,
    Error(String),
}

/// A line that starts like the guest's but does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine(pub String);

impl fmt::Display for MalformedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Malformed guest line {:?}", self.0)
    }
}

impl Error for MalformedLine {}

/// Parses one line of serial output. `None` when it is not the guest's (no
/// `KEEL-GUEST ` in it); the prefix may follow other output on the same line,
/// as firmware messages without a newline do.
pub fn parse_line(line: &str) -> Option<Result<GuestLine, MalformedLine>> {
    let start = line.find(LINE_PREFIX)?;
    let body = line[start + LINE_PREFIX.len()..].trim_end();
    Some(parse_body(body).ok_or_else(|| MalformedLine(body.to_string())))
}

fn parse_body(body: &str) -> Option<GuestLine> {
    let (word, rest) = body.split_once(' ').unwrap_or((body, ""));
    let mut args = rest.split_ascii_whitespace();
    let line = match word {
        "READY" => GuestLine::Ready,
        "MEM" => GuestLine::Mem {
            addr: parse_hex(args.next()?)?,
            size: parse_hex(args.next()?)?,
            kind: args.next()?.parse().ok()?,
        },
        "MEMTOTAL" => GuestLine::MemTotalKib(args.next()?.parse().ok()?),
        // Everything after the space, which may be nothing.
        "CMDLINE" => return Some(GuestLine::Cmdline(rest.to_string())),
        "ACPI" => GuestLine::Acpi(AcpiTable {
            signature: args.next().filter(|s| s.len() == 4)?.to_string(),
            address: parse_hex(args.next()?)?,
            length: args.next()?.parse().ok()?,
        }),
        "CPU" => GuestLine::Cpu {
            apic_id: args.next()?.strip_prefix("apic=")?.parse().ok()?,
        },
        "CPUS" => GuestLine::Cpus(args.next()?.parse().ok()?),
        "POWEROFF" => GuestLine::Poweroff,
        "REBOOTING" => GuestLine::Rebooting,
        "SECOND-BOOT" => GuestLine::SecondBoot,
        "TRIPLEFAULT" => GuestLine::TripleFault,
        "HALT" => GuestLine::Halt,
        "SPIN" => GuestLine::Spin,
        "ERROR" => return Some(GuestLine::Error(rest.to_string())),
        _ => return None,
    };
    args.next().is_none().then_some(line)
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// Everything the guest said. The facts about the machine describe its
/// latest boot (each `READY` starts afresh); the events and errors gather
/// over all boots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// The guest started at least once.
    pub ready: bool,
    /// How many times it started: 2 after a reboot.
    pub boots: u32,
    /// `(addr, size, type)` of each memory map entry, in the order given.
    pub memory: Vec<(u64, u64, u32)>,
    pub memtotal_kib: Option<u64>,
    pub cmdline: Option<String>,
    /// RSDP first, then the root table, the tables it lists, the DSDT.
    pub acpi_tables: Vec<AcpiTable>,
    pub apic_ids: Vec<u32>,
    pub cpus: Option<u32>,
    pub poweroff: bool,
    pub rebooting: bool,
    pub second_boot: bool,
    pub triple_fault: bool,
    pub halt: bool,
    pub spin: bool,
    /// The guest's `ERROR` reasons and any malformed lines.
    pub errors: Vec<String>,
}

impl GuestReport {
    /// Adds one line of serial output; other output is ignored.
    pub fn feed(&mut self, line: &str) {
        match parse_line(line) {
            None => {}
            Some(Err(e)) => self.errors.push(e.to_string()),
            Some(Ok(line)) => self.apply(line),
        }
    }

    fn apply(&mut self, line: GuestLine) {
        match line {
            GuestLine::Ready => {
                self.ready = true;
                self.boots += 1;
                self.memory.clear();
                self.memtotal_kib = None;
                self.cmdline = None;
                self.acpi_tables.clear();
                self.apic_ids.clear();
                self.cpus = None;
            }
            GuestLine::Mem { addr, size, kind } => self.memory.push((addr, size, kind)),
            GuestLine::MemTotalKib(kib) => self.memtotal_kib = Some(kib),
            GuestLine::Cmdline(cmdline) => self.cmdline = Some(cmdline),
            GuestLine::Acpi(table) => self.acpi_tables.push(table),
            GuestLine::Cpu { apic_id } => self.apic_ids.push(apic_id),
            GuestLine::Cpus(n) => self.cpus = Some(n),
            GuestLine::Poweroff => self.poweroff = true,
            GuestLine::Rebooting => self.rebooting = true,
            GuestLine::SecondBoot => self.second_boot = true,
            GuestLine::TripleFault => self.triple_fault = true,
            GuestLine::Halt => self.halt = true,
            GuestLine::Spin => self.spin = true,
            GuestLine::Error(reason) => self.errors.push(reason),
        }
    }

    /// The first table with this signature (`"APIC"`, `"FACP"`, ...).
    pub fn acpi_table(&self, signature: &str) -> Option<&AcpiTable> {
        self.acpi_tables.iter().find(|t| t.signature == signature)
    }

    /// The guest started, reported without errors and asked for poweroff.
    pub fn is_clean_poweroff(&self) -> bool {
        self.ready && self.poweroff && self.errors.is_empty()
    }
}

/// Parses the guest's whole serial output.
pub fn parse_report(output: &str) -> GuestReport {
    let mut report = GuestReport::default();
    for line in output.lines() {
        report.feed(line);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2 (`-M q35 -smp 2 -m 256`) printed, SeaBIOS and all.
    const Q35_POWEROFF: &str =
        "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r
\r
Booting from ROM..KEEL-GUEST READY
KEEL-GUEST MEM 0x0 0x9fc00 1
KEEL-GUEST MEM 0x9fc00 0x400 2
KEEL-GUEST MEM 0xf0000 0x10000 2
KEEL-GUEST MEM 0x100000 0xfedf000 1
KEEL-GUEST MEM 0xffdf000 0x21000 2
KEEL-GUEST MEM 0xfd00000000 0x300000000 2
KEEL-GUEST MEMTOTAL 261627
KEEL-GUEST CMDLINE keel.mode=poweroff
KEEL-GUEST ACPI RSDP 0xf59e0 20
KEEL-GUEST ACPI RSDT 0xffe233c 56
KEEL-GUEST ACPI FACP 0xffe212c 244
KEEL-GUEST ACPI APIC 0xffe2220 128
KEEL-GUEST ACPI DSDT 0xffe0040 8428
KEEL-GUEST CPU apic=0
KEEL-GUEST CPU apic=1
KEEL-GUEST CPUS 2
KEEL-GUEST POWEROFF
";

    #[test]
    fn parses_a_poweroff_run() {
        let r = parse_report(Q35_POWEROFF);
        assert!(r.is_clean_poweroff(), "{r:?}");
        assert_eq!(r.boots, 1);
        assert_eq!(r.memory.len(), 6);
        assert_eq!(r.memory[0], (0, 0x9fc00, 1));
        assert_eq!(r.memory[5], (0xfd_0000_0000, 0x3_0000_0000, 2));
        assert_eq!(r.memtotal_kib, Some(261627));
        assert_eq!(r.cmdline.as_deref(), Some("keel.mode=poweroff"));
        assert_eq!(r.cpus, Some(2));
        assert_eq!(r.apic_ids, [0, 1]);
        let sigs: Vec<_> = r.acpi_tables.iter().map(|t| t.signature.as_str()).collect();
        assert_eq!(sigs, ["RSDP", "RSDT", "FACP", "APIC", "DSDT"]);
        assert_eq!(
            r.acpi_table("DSDT"),
            Some(&AcpiTable {
                signature: "DSDT".into(),
                address: 0xffe0040,
                length: 8428
            })
        );
        assert!(!r.rebooting && !r.second_boot && !r.triple_fault && !r.halt && !r.spin);
    }

    #[test]
    fn a_reboot_keeps_events_and_restarts_facts() {
        let out = "KEEL-GUEST READY\n\
                   KEEL-GUEST MEM 0x0 0x1000 1\n\
                   KEEL-GUEST CPU apic=0\n\
                   KEEL-GUEST CPUS 1\n\
                   KEEL-GUEST REBOOTING\n\
                   KEEL-GUEST READY\n\
                   KEEL-GUEST MEM 0x0 0x2000 1\n\
                   KEEL-GUEST CPU apic=0\n\
                   KEEL-GUEST CPUS 1\n\
                   KEEL-GUEST SECOND-BOOT\n\
                   KEEL-GUEST POWEROFF\n";
        let r = parse_report(out);
        assert_eq!(r.boots, 2);
        assert!(r.rebooting && r.second_boot && r.is_clean_poweroff());
        assert_eq!(r.memory, [(0, 0x2000, 1)]);
        assert_eq!(r.apic_ids, [0]);
    }

    #[test]
    fn errors_survive_a_reboot() {
        let r = parse_report(
            "KEEL-GUEST READY\nKEEL-GUEST ERROR no MADT\nKEEL-GUEST READY\nKEEL-GUEST POWEROFF",
        );
        assert_eq!(r.errors, ["no MADT"]);
        assert!(r.poweroff && !r.is_clean_poweroff());
    }

    #[test]
    fn modes_and_their_lines() {
        for (mode, line, check) in [
            (
                Mode::TripleFault,
                "TRIPLEFAULT",
                (|r| r.triple_fault) as fn(&GuestReport) -> bool,
            ),
            (Mode::Halt, "HALT", |r| r.halt),
            (Mode::Spin, "SPIN", |r| r.spin),
        ] {
            let r = parse_report(&format!(
                "KEEL-GUEST READY\nKEEL-GUEST CMDLINE {}\nKEEL-GUEST {line}\n",
                mode.cmdline()
            ));
            assert!(check(&r), "{mode:?}");
            assert_eq!(r.cmdline, Some(format!("keel.mode={}", mode.as_str())));
        }
    }

    #[test]
    fn nothing_from_the_guest() {
        assert_eq!(parse_report(""), GuestReport::default());
        assert!(!parse_report("SeaBIOS\nBooting from ROM..\n").ready);
        assert!(parse_line("Linux version 6.1").is_none());
    }

    #[test]
    fn odd_but_valid_lines() {
        // An empty command line, CRLF line ends, an x2APIC id.
        let r = parse_report("KEEL-GUEST CMDLINE \r\nKEEL-GUEST CPU apic=300\r\n");
        assert_eq!(r.cmdline.as_deref(), Some(""));
        assert_eq!(r.apic_ids, [300]);
        assert_eq!(
            parse_line("KEEL-GUEST CMDLINE console=ttyS0  keel.mode=halt"),
            Some(Ok(GuestLine::Cmdline(
                "console=ttyS0  keel.mode=halt".into()
            )))
        );
        assert_eq!(
            parse_line("KEEL-GUEST ERROR unknown keel.mode nope"),
            Some(Ok(GuestLine::Error("unknown keel.mode nope".into())))
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        for body in [
            "MEM 0x0 0x1000",
            "MEM 0 0x1000 1",
            "MEM 0x0 0x1000 1 extra",
            "MEMTOTAL",
            "ACPI APIC2 0x1000 10",
            "ACPI APIC 0x1000 -1",
            "CPU 0",
            "CPUS two",
            "READY NOW",
            "WHATEVER",
        ] {
            let line = format!("{LINE_PREFIX}{body}");
            assert_eq!(parse_line(&line), Some(Err(MalformedLine(body.into()))));
            let r = parse_report(&line);
            assert_eq!(r.errors.len(), 1, "{body}");
            assert!(r.errors[0].contains(body), "{}", r.errors[0]);
        }
    }

    /// Boots the guest under QEMU's software emulator (its PVH loader and
    /// ACPI tables stand in for Keel's): checks the guest against a second
    /// implementation of the same ABIs. QEMU is a test dependency (.ci/run
    /// installs it); without it these tests fail rather than pass unchecked.
    fn boot_in_qemu(machine: &str, mode: Mode, reboot: bool) -> (GuestReport, bool) {
        use std::io::Read;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            machine,
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-serial", "stdio", "-monitor", "none", "-m", "256", "-smp", "2",
        ])
        .arg("-kernel")
        .arg(guest_elf())
        .args(["-append", &mode.cmdline()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if !reboot {
            cmd.arg("-no-reboot");
        }
        let mut child = cmd
            .spawn()
            .expect("qemu-system-x86_64 (apt install qemu-system-x86) runs these tests");
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            stdout.read_to_string(&mut out).map(|_| out)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = reader.join().unwrap().unwrap();
        (parse_report(&out), exited)
    }

    #[test]
    fn qemu_q35_poweroff_through_pm1a() {
        let (r, exited) = boot_in_qemu("q35", Mode::Poweroff, false);
        assert!(exited && r.is_clean_poweroff(), "{r:?}");
        assert_eq!((r.cpus, r.apic_ids.as_slice()), (Some(2), &[0, 1][..]));
        assert!(
            r.memory
                .iter()
                .any(|&(addr, _, kind)| addr == 0x100000 && kind == 1)
        );
        assert!(r.acpi_table("FACP").is_some() && r.acpi_table("DSDT").is_some());
    }

    #[test]
    fn qemu_microvm_poweroff_through_sleep_control() {
        let (r, exited) = boot_in_qemu("microvm,acpi=on", Mode::Poweroff, false);
        assert!(exited && r.is_clean_poweroff(), "{r:?}");
        assert_eq!(r.cpus, Some(2));
        assert!(r.acpi_table("XSDT").is_some());
    }

    #[test]
    fn qemu_q35_reboot_keeps_cmos() {
        let (r, exited) = boot_in_qemu("q35", Mode::Reboot, true);
        assert!(exited && r.is_clean_poweroff(), "{r:?}");
        assert!(r.rebooting && r.second_boot && r.boots == 2, "{r:?}");
    }

    #[test]
    fn qemu_q35_triple_fault() {
        let (r, exited) = boot_in_qemu("q35", Mode::TripleFault, false);
        assert!(exited && r.triple_fault && r.errors.is_empty(), "{r:?}");
        assert!(!r.poweroff);
    }

    /// The image is what PVH loaders expect: ELF64, loaded at 1 MiB, and a
    /// PT_NOTE with the Xen PHYS32_ENTRY note pointing at the entry.
    #[test]
    fn guest_image_shape() {
        let elf = std::fs::read(guest_elf()).unwrap();
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());

        assert!(elf.len() < 8192, "the guest grew to {} bytes", elf.len());
        assert_eq!(&elf[..5], b"\x7fELF\x02", "not ELF64");
        let entry = u64_at(24);
        let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
        assert_eq!(phentsize, 56);

        let mut load_at = Vec::new();
        let mut pvh_entry = None;
        for i in 0..phnum as usize {
            let ph = phoff + i * phentsize;
            let (kind, offset, paddr, filesz) = (
                u32_at(ph),
                u64_at(ph + 8) as usize,
                u64_at(ph + 24),
                u64_at(ph + 32),
            );
            match kind {
                1 if filesz > 0 => load_at.push(paddr),
                4 => {
                    // namesz, descsz, type, "Xen\0", desc
                    assert_eq!((u32_at(offset), u32_at(offset + 8)), (4, 18));
                    assert_eq!(&elf[offset + 12..offset + 16], b"Xen\0");
                    pvh_entry = Some(u64::from(u32_at(offset + 16)));
                }
                _ => {}
            }
        }
        assert_eq!(load_at, [0x100000]);
        assert_eq!(pvh_entry, Some(entry));
    }
}
