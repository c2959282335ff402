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
//! | `TICK <n>` | `keel.mode=tick`: a counter, about every 25 ms, forever. |
//! | `VIRTIO <what>` | `keel.mode=virtio` and `hostile`: a virtio-pci device found (`pci 00:01.0 blk`) or a well-behaved request's result (`rng ok`, `blk sector0 <checksum>`, `blk write ok`, `blk id <id>`, `blk capacity <sectors>`, `console ok`), then `done`. |
//! | `HOSTILE <dev>.<attack> <outcome>` | `keel.mode=hostile`: one attack on one device and what came of it (see [`hostile_outcome_acceptable`]); `<dev>.final` is a well-behaved request after all attacks. |
//! | `HOSTILE done` | The hostile run finished. |
//! | `ERROR <reason>` | Something was wrong; the guest then triple-faults (or halts if a poweroff did not happen). |
//!
//! The guest runs on the boot CPU only. Its mode comes from `keel.mode=` on
//! the command line (see [`Mode`]).
//!
//! Its virtio-pci driver (`virtio.c`) enumerates bus 0 through 0xCF8/0xCFC,
//! assigns BARs that read 0, negotiates VERSION_1 only, leaves MSI-X
//! disabled and polls one split virtqueue of 8 entries per device, every
//! poll bounded by the TSC.

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
    /// Print `TICK <n>` about every 25 ms, forever (a running counter).
    Tick,
    /// Drive every virtio-pci device with well-behaved requests (`VIRTIO`
    /// lines), then power off.
    Virtio,
    /// The `Virtio` requests, then malformed requests and register garbage
    /// on every device (`HOSTILE` lines), then power off.
    Hostile,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Poweroff => "poweroff",
            Mode::Reboot => "reboot",
            Mode::TripleFault => "triplefault",
            Mode::Halt => "halt",
            Mode::Spin => "spin",
            Mode::Tick => "tick",
            Mode::Virtio => "virtio",
            Mode::Hostile => "hostile",
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
    Tick(u64),
    Virtio(String),
    Hostile { name: String, outcome: String },
    HostileDone,
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
        "TICK" => GuestLine::Tick(args.next()?.parse().ok()?),
        "VIRTIO" if !rest.is_empty() => return Some(GuestLine::Virtio(rest.to_string())),
        "HOSTILE" if rest == "done" => return Some(GuestLine::HostileDone),
        "HOSTILE" => GuestLine::Hostile {
            name: args.next().filter(|n| n.contains('.'))?.to_string(),
            outcome: args.next()?.to_string(),
        },
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
    /// The last `TICK` counter seen.
    pub last_tick: Option<u64>,
    /// The bodies of the `VIRTIO` lines, in order.
    pub virtio: Vec<String>,
    /// `(name, outcome)` of each `HOSTILE` line but the last, in order.
    pub hostile: Vec<(String, String)>,
    /// `HOSTILE done`: the hostile run came to its end.
    pub hostile_done: bool,
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
            GuestLine::Tick(n) => self.last_tick = Some(n),
            GuestLine::Virtio(body) => self.virtio.push(body),
            GuestLine::Hostile { name, outcome } => self.hostile.push((name, outcome)),
            GuestLine::HostileDone => self.hostile_done = true,
            GuestLine::Error(reason) => self.errors.push(reason),
        }
    }

    /// The first table with this signature (`"APIC"`, `"FACP"`, ...).
    pub fn acpi_table(&self, signature: &str) -> Option<&AcpiTable> {
        self.acpi_tables.iter().find(|t| t.signature == signature)
    }

    /// What followed `what ` in the first `VIRTIO` line that starts so:
    /// `virtio_result("blk sector0")` is the checksum, `virtio_result("rng")`
    /// is `ok` when the rng gave 16 bytes not all zero.
    pub fn virtio_result(&self, what: &str) -> Option<&str> {
        self.virtio.iter().find_map(|l| {
            l.strip_prefix(what)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::trim)
        })
    }

    /// The `HOSTILE` lines whose outcome is not acceptable.
    pub fn hostile_failures(&self) -> Vec<&(String, String)> {
        self.hostile
            .iter()
            .filter(|(name, outcome)| !hostile_outcome_acceptable(name, outcome))
            .collect()
    }

    /// The guest started, reported without errors and asked for poweroff.
    pub fn is_clean_poweroff(&self) -> bool {
        self.ready && self.poweroff && self.errors.is_empty()
    }
}

/// Checksum the guest reports for a sector (`VIRTIO blk sector0`): over its
/// little-endian dwords, `sum = sum.rotate_left(5) ^ dword`.
pub fn sector_checksum(sector: &[u8]) -> u32 {
    sector.chunks_exact(4).fold(0, |sum, d| {
        sum.rotate_left(5) ^ u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    })
}

/// What `keel.mode=virtio` writes to sector 1 of the first virtio-blk disk
/// (and reads back): dword `i` is `0x4b45454c ^ i * 0x9e3779b9`.
pub fn written_sector() -> Vec<u8> {
    (0..128u32)
        .flat_map(|i| (0x4b45454c ^ i.wrapping_mul(0x9e3779b9)).to_le_bytes())
        .collect()
}

/// Transmit queues (console, net, vsock) have no error status: a consumed
/// request is all the guest can see.
const TRANSMIT_DEVICES: [&str; 3] = ["console", "net", "vsock"];

/// Attacks whose request is legal, or that are register garbage with no
/// request of their own, so that completing fine (`ok`) is right too.
const MAY_SUCCEED: [&str; 11] = [
    "overlap",
    "status-in-data",
    "notify-bad",
    "live-requeue",
    "features-late",
    "status-games",
    "qsize-npot",
    "qsize-big",
    "qsize-zero",
    "cfg-garbage",
    "bar-garbage",
];

/// Whether a `HOSTILE <dev>.<attack> <outcome>` line shows a device that
/// defended itself. The guest's outcomes: `error` (completed with an error
/// status; for rng, nothing written), `needs-reset` (DEVICE_NEEDS_RESET),
/// `ignored` (no answer within the guest's short bound), `ok` (completed
/// fine), `done` (a transmit queue consumed it), `timeout` and `broken` (after
/// a reset the device failed a well-behaved request: never acceptable).
/// `<dev>.final` must be `ok` (`done` for transmit devices).
pub fn hostile_outcome_acceptable(name: &str, outcome: &str) -> bool {
    let (device, attack) = name.split_once('.').unwrap_or((name, ""));
    let transmit = TRANSMIT_DEVICES.contains(&device);
    if attack == "final" {
        return outcome == "ok" || (transmit && outcome == "done");
    }
    match outcome {
        "error" | "needs-reset" | "ignored" => true,
        "done" => transmit,
        "ok" => MAY_SUCCEED.contains(&attack),
        _ => false,
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
    fn virtio_and_hostile_lines() {
        let r = parse_report(
            "KEEL-GUEST VIRTIO pci 00:01.0 blk\n\
             KEEL-GUEST VIRTIO blk sector0 0xe936013\n\
             KEEL-GUEST VIRTIO rng ok\n\
             KEEL-GUEST HOSTILE blk.loop needs-reset\n\
             KEEL-GUEST HOSTILE blk.overlap ok\n\
             KEEL-GUEST HOSTILE rng.addr-max ok\n\
             KEEL-GUEST HOSTILE console.loop done\n\
             KEEL-GUEST HOSTILE rng.wrong-dir timeout\n\
             KEEL-GUEST HOSTILE blk.final ok\n\
             KEEL-GUEST HOSTILE done\n",
        );
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.virtio_result("blk sector0"), Some("0xe936013"));
        assert_eq!(r.virtio_result("rng"), Some("ok"));
        assert_eq!(r.virtio_result("pci 00:01.0"), Some("blk"));
        assert_eq!(r.virtio_result("net"), None);
        assert_eq!(r.hostile.len(), 6);
        assert!(r.hostile_done);
        let failed: Vec<_> = r
            .hostile_failures()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(failed, ["rng.addr-max", "rng.wrong-dir"]);
        for bad in [
            "HOSTILE blk.loop",
            "HOSTILE loop ok",
            "HOSTILE blk.loop ok extra",
            "VIRTIO",
        ] {
            let r = parse_report(&format!("{LINE_PREFIX}{bad}\n"));
            assert_eq!(r.errors.len(), 1, "{bad}");
        }
    }

    #[test]
    fn hostile_outcomes() {
        for (name, outcome, acceptable) in [
            ("blk.loop", "error", true),
            ("blk.loop", "ignored", true),
            ("blk.loop", "needs-reset", true),
            ("blk.loop", "ok", false),
            ("blk.loop", "done", false),
            ("console.loop", "done", true),
            ("blk.overlap", "ok", true),
            ("blk.cfg-garbage", "ok", true),
            ("blk.cfg-garbage", "timeout", false),
            ("blk.loop", "broken", false),
            ("blk.final", "ok", true),
            ("blk.final", "error", false),
            ("console.final", "done", true),
            ("rng.final", "ignored", false),
        ] {
            assert_eq!(
                hostile_outcome_acceptable(name, outcome),
                acceptable,
                "{name} {outcome}"
            );
        }
    }

    #[test]
    fn checksums_and_patterns() {
        assert_eq!(sector_checksum(&[]), 0);
        assert_eq!(sector_checksum(&[1, 0, 0, 0, 2, 0, 0, 0]), (1 << 5) ^ 2);
        let sector = written_sector();
        assert_eq!(sector.len(), 512);
        assert_eq!(sector[..4], 0x4b45454cu32.to_le_bytes());
        assert_eq!(sector[4..8], (0x4b45454cu32 ^ 0x9e3779b9).to_le_bytes());
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
        boot_in_qemu_with(machine, mode, reboot, &[])
    }

    fn boot_in_qemu_with(
        machine: &str,
        mode: Mode,
        reboot: bool,
        extra: &[String],
    ) -> (GuestReport, bool) {
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
        .args(extra)
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

    /// The virtio-pci driver against QEMU's modern-only virtio-rng, -blk and
    /// -console (QEMU leaves BARs unassigned without firmware: the guest
    /// assigns them).
    #[test]
    fn qemu_q35_virtio_devices() {
        let dir = std::env::temp_dir().join(format!("keel-qemu-virtio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        let console = dir.join("console.txt");
        let image: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 512) as u8).collect();
        std::fs::write(&disk, &image).unwrap();
        let extra: Vec<String> = [
            "-device",
            "virtio-rng-pci,disable-legacy=on",
            "-drive",
            &format!("if=none,id=d0,format=raw,file={}", disk.display()),
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,serial=keel-qemu",
            "-device",
            "virtio-serial-pci,disable-legacy=on",
            "-chardev",
            &format!("file,id=c0,path={}", console.display()),
            "-device",
            "virtconsole,chardev=c0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (r, exited) = boot_in_qemu_with("q35", Mode::Virtio, false, &extra);
        assert!(exited && r.is_clean_poweroff(), "{r:?}");
        let sum = format!("{:#x}", sector_checksum(&image[..512]));
        assert_eq!(r.virtio_result("blk sector0"), Some(sum.as_str()), "{r:?}");
        assert_eq!(r.virtio_result("blk capacity"), Some("8"), "{r:?}");
        assert_eq!(r.virtio_result("blk write"), Some("ok"), "{r:?}");
        assert_eq!(r.virtio_result("blk id"), Some("keel-qemu"), "{r:?}");
        assert_eq!(r.virtio_result("rng"), Some("ok"), "{r:?}");
        assert_eq!(r.virtio_result("console"), Some("ok"), "{r:?}");
        assert!(r.virtio.iter().any(|l| l == "done"), "{r:?}");
        let after = std::fs::read(&disk).unwrap();
        assert_eq!(after[512..1024], written_sector()[..]);
        let out = std::fs::read_to_string(&console).unwrap();
        assert!(out.contains("hello from virtio-console"), "{out:?}");
        std::fs::remove_dir_all(&dir).unwrap();
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

        assert!(elf.len() < 16384, "the guest grew to {} bytes", elf.len());
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
