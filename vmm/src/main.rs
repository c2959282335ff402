//! The keel-vmm command line, compatible with cloud-hypervisor's options.

use std::path::PathBuf;
use std::process::ExitCode;

use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use keel_api::events::VmmExit;
use keel_api::{
    ConfigError, ConsoleConfig, ConsoleOutputMode, CpusConfig, DiskConfig, MemoryConfig, NetConfig,
    PayloadConfig, RngConfig, VmConfig, VsockConfig,
};
use keel_vmm::event_monitor::EventMonitor;
use keel_vmm::{Outcome, VmmOptions};

/// Exit statuses (documented in docs/keel-vmm.md), typed in `keel_api` so
/// keeld reads them with the same meaning.
const EXIT_BAD_INPUT: u8 = VmmExit::BadInput.code();
const EXIT_GUEST_CRASHED: u8 = VmmExit::GuestCrashed.code();
const EXIT_GUEST_PANICKED: u8 = VmmExit::GuestPanicked.code();

#[derive(Parser, Debug)]
#[command(
    name = "keel-vmm",
    version,
    about = "Keel's virtual machine monitor: boots a Linux kernel on KVM",
    after_help = "Serial console keys: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A."
)]
struct Cli {
    /// Kernel to boot: a bzImage, or an ELF vmlinux (PVH entry if it has one).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE")]
    cmdline: Option<String>,
    /// vCPUs at boot and at most.
    #[arg(long, value_name = "boot=N[,max=M]", default_value = "boot=1")]
    cpus: String,
    /// Guest RAM (K/M/G suffixes), and room for memory hot-plug.
    #[arg(
        long,
        value_name = "size=SIZE[,hotplug_size=SIZE]",
        default_value = "size=512M"
    )]
    memory: String,
    /// Where the COM1 UART goes [default: tty, or null with --console tty].
    #[arg(long, value_name = "off|null|tty|file=PATH")]
    serial: Option<String>,
    /// Where the virtio console (the guest's hvc0) goes.
    #[arg(long, value_name = "off|null|tty|file=PATH", default_value = "off")]
    console: String,
    /// A virtio-blk disk backed by a raw image; repeat for more disks.
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME][,serial=S]"
    )]
    disk: Vec<String>,
    /// A virtio-net NIC on a host TAP device; repeat for more NICs.
    #[arg(
        long,
        value_name = "tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,num_queues=N][,queue_size=N][,id=NAME]"
    )]
    net: Vec<String>,
    /// A virtio-rng entropy device reading from the given source.
    #[arg(long, value_name = "src=PATH", num_args = 0..=1, default_missing_value = "src=/dev/urandom")]
    rng: Option<String>,
    /// A virtio-vsock device; the host side is a Unix socket.
    #[arg(long, value_name = "cid=N,socket=PATH[,id=NAME]")]
    vsock: Option<String>,
    /// More log output; repeat for more (-v warnings, -vv info, -vvv debug).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
    /// Write the log here instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Serve the REST API (Cloud Hypervisor's) on this Unix socket. Without
    /// --kernel, wait for vm.create and vm.boot.
    #[arg(long, value_name = "path=PATH|fd=N")]
    api_socket: Option<String>,
    /// Write lifecycle and device events here, one JSON object per line.
    #[arg(long, value_name = "path=PATH|fd=N")]
    event_monitor: Option<String>,
}

/// `path=PATH` or `fd=N` (a bare path is taken as `path=`).
enum Endpoint {
    Path(PathBuf),
    Fd(i32),
}

fn parse_endpoint(option: &str, value: &str) -> Result<Endpoint, String> {
    let bad = || format!("--{option} {value}: expected path=PATH or fd=N");
    if let Some(path) = value.strip_prefix("path=") {
        if path.is_empty() || path.contains(',') {
            return Err(bad());
        }
        return Ok(Endpoint::Path(PathBuf::from(path)));
    }
    if let Some(fd) = value.strip_prefix("fd=") {
        return fd
            .parse::<i32>()
            .ok()
            .filter(|fd| *fd >= 3)
            .map(Endpoint::Fd)
            .ok_or_else(|| format!("--{option} {value}: fd must be an open descriptor >= 3"));
    }
    if value.is_empty() || value.contains('=') {
        return Err(bad());
    }
    Ok(Endpoint::Path(PathBuf::from(value)))
}

/// Binds the API socket. A socket file left by a VMM that is gone is
/// replaced; one that a live VMM answers on is not.
fn api_listener(value: &str) -> Result<(UnixListener, Option<PathBuf>), String> {
    match parse_endpoint("api-socket", value)? {
        Endpoint::Fd(fd) => {
            // SAFETY: the user handed this descriptor to keel-vmm to own.
            let listener = unsafe { UnixListener::from_raw_fd(fd) };
            Ok((listener, None))
        }
        Endpoint::Path(path) => {
            if path.exists() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(format!(
                        "--api-socket: {} is in use by a running VMM; choose another path",
                        path.display()
                    ));
                }
                let _ = std::fs::remove_file(&path);
            }
            let listener = UnixListener::bind(&path)
                .map_err(|e| format!("--api-socket: cannot bind {}: {e}", path.display()))?;
            Ok((listener, Some(path)))
        }
    }
}

fn event_monitor(value: &str) -> Result<EventMonitor, String> {
    match parse_endpoint("event-monitor", value)? {
        Endpoint::Path(path) => EventMonitor::to_path(&path)
            .map_err(|e| format!("--event-monitor: cannot open {}: {e}", path.display())),
        Endpoint::Fd(fd) => {
            // SAFETY: fcntl on any integer is harmless; it only checks.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("--event-monitor: fd {fd} is not open"));
            }
            // SAFETY: the descriptor is open and was handed to keel-vmm.
            Ok(unsafe { EventMonitor::to_fd(fd) })
        }
    }
}

impl Cli {
    fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        let console = ConsoleConfig::parse("console", &self.console)?;
        // The terminal goes to one console only: the virtio console when it
        // asks for it, else the UART. Both explicitly on tty is refused.
        let serial = match (&self.serial, console.mode) {
            (Some(serial), _) => ConsoleConfig::parse("serial", serial)?,
            (None, ConsoleOutputMode::Tty) => ConsoleConfig::mode(ConsoleOutputMode::Null),
            (None, _) => ConsoleConfig::mode(ConsoleOutputMode::Tty),
        };
        let config = VmConfig {
            cpus: CpusConfig::parse(&self.cpus)?,
            memory: MemoryConfig::parse(&self.memory)?,
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            serial,
            console,
            disks: self
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_, _>>()?,
            net: self
                .net
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_, _>>()?,
            rng: self.rng.as_deref().map(RngConfig::parse).transpose()?,
            vsock: self.vsock.as_deref().map(VsockConfig::parse).transpose()?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// One line for a command-line error, naming the option.
fn usage_error(err: &clap::Error) -> String {
    let context = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(s)) => s.join(", "),
        _ => String::new(),
    };
    match err.kind() {
        ErrorKind::UnknownArgument => format!(
            "unknown option '{}'; run keel-vmm --help for the options",
            context(ContextKind::InvalidArg)
        ),
        ErrorKind::InvalidValue | ErrorKind::NoEquals => format!(
            "option '{}' needs a value",
            context(ContextKind::InvalidArg)
        ),
        ErrorKind::ArgumentConflict => format!(
            "option '{}' is given more than once",
            context(ContextKind::InvalidArg)
        ),
        _ => err
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid command line")
            .trim_start_matches("error: ")
            .to_string(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("keel-vmm: {}", usage_error(&err));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    // With an API socket and no kernel, the VM comes later (vm.create).
    let config = if cli.api_socket.is_some() && cli.kernel.is_none() {
        None
    } else {
        match cli.vm_config() {
            Ok(config) => Some(config),
            Err(err) => {
                eprintln!("keel-vmm: {err}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    };
    let events = match cli.event_monitor.as_deref().map(event_monitor).transpose() {
        Ok(events) => events.unwrap_or_else(EventMonitor::none),
        Err(err) => {
            eprintln!("keel-vmm: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let (api, socket_path) = match cli.api_socket.as_deref().map(api_listener).transpose() {
        Ok(Some((listener, path))) => (Some(listener), path),
        Ok(None) => (None, None),
        Err(err) => {
            eprintln!("keel-vmm: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    if let Err(err) = keel_vmm::logger::init(cli.verbose, cli.log_file.as_deref()) {
        eprintln!("keel-vmm: cannot open log file: {err}");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let outcome = keel_vmm::run_vmm(VmmOptions {
        config,
        api,
        events,
    });
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    match outcome {
        Ok(Outcome::PoweredOff | Outcome::Quit) => ExitCode::SUCCESS,
        Ok(Outcome::GuestPanicked) => {
            eprintln!("keel-vmm: the guest kernel panicked (reported through pvpanic)");
            ExitCode::from(EXIT_GUEST_PANICKED)
        }
        Ok(Outcome::Crashed { vcpu, reason }) => {
            eprintln!("keel-vmm: vCPU {vcpu} stopped the VM: {reason}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Ok(Outcome::BootFailed(why)) => {
            eprintln!("keel-vmm: cannot boot the VM again after a reset: {why}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(err) => {
            eprintln!("keel-vmm: {}", keel_api::error_chain(&err));
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}
