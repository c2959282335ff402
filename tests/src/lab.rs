//! Driving the nested lab (`ci/lab`) from Rust tests.
//!
//! Real Linux guests cannot run on this host's KVM, so they boot as L2 guests
//! of keel-vmm inside an L1 Linux that QEMU emulates (see `shared/LAB.md` and
//! `ci/lab`). Each L1 boot costs seconds, so a [`LabSession`] gathers many
//! cases and runs them all in one L1, one after another:
//!
//! ```no_run
//! use keel_tests::lab::{GuestBoot, Kernel, LabSession};
//!
//! let results = LabSession::new()
//!     .smp(2)
//!     .case("bzimage-1cpu", GuestBoot::linux(Kernel::BzImage).cpus(1).memory_mib(512).test("info").command())
//!     .case("pvh-2cpu", GuestBoot::linux(Kernel::Pvh).cpus(2).memory_mib(512).test("info").command())
//!     .run()?;
//! let r = results.get("bzimage-1cpu");
//! assert_eq!(r.status, 0);
//! assert!(r.has_line("KEEL-L2 CPUS 1"));
//! # Ok::<(), keel_tests::lab::LabError>(())
//! ```
//!
//! Inside L1 each case runs as `sh -c CMD` in its own process group, with
//! standard input from `/dev/null` and a timeout (60 s unless said
//! otherwise) after which the whole group is killed. Its output lines, exit
//! status and wall time (L1's monotonic clock) come back in a [`CaseResult`].
//! The paths a case can use in L1: `/keel/bin` (the workspace's release
//! binaries), `/keel/guest` (the guest kit: `bzImage`, `vmlinux`,
//! `initramfs.cpio.gz`, ...), `/keel/qemu` (with [`LabSession::with_qemu`]),
//! `/share` (with [`LabSession::share`]).
//!
//! `ci/lab` builds the release binaries first unless `KEEL_LAB_NO_BUILD=1`.

use std::collections::HashSet;
use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-case timeout when none is given.
pub const DEFAULT_CASE_TIMEOUT_S: u64 = 60;

/// Time allowed on top of the cases' timeouts for L1 to boot and power off.
const L1_OVERHEAD_S: u64 = 180;

/// How many lines of output an error carries.
const ERROR_TAIL_LINES: usize = 30;

/// Which image of the kit's kernel keel-vmm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `/keel/guest/bzImage`, through the Linux boot protocol.
    BzImage,
    /// `/keel/guest/vmlinux`, the ELF kernel, through its PVH entry point.
    Pvh,
}

impl Kernel {
    /// The kernel's path in L1.
    pub fn path(self) -> &'static str {
        match self {
            Kernel::BzImage => "/keel/guest/bzImage",
            Kernel::Pvh => "/keel/guest/vmlinux",
        }
    }
}

/// Which VMM a [`GuestBoot`] runs in L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// keel-vmm (`/keel/bin/keel-vmm`).
    Keel,
    /// QEMU's q35 machine with virtio-pci devices and KVM
    /// (`/keel/qemu/qemu-system-x86_64`, so the session needs
    /// [`LabSession::with_qemu`]): the reference keel-vmm is compared with,
    /// and a check of a test's guest side against a VMM known to work.
    QemuQ35,
}

/// A virtio device given to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GuestDevice {
    Disk {
        path: String,
        readonly: bool,
        direct: bool,
    },
    Net {
        tap: String,
        /// L1's address on the tap and its netmask.
        host_ip: Option<(String, String)>,
    },
    Rng,
    ConsoleFile(String),
    Vsock {
        cid: u32,
        socket: String,
    },
}

/// A VMM command line that boots the kit's kernel and test initramfs.
///
/// The guest runs the initramfs test named by [`GuestBoot::test`]
/// (`tests/guest/initramfs/tests/NAME.sh`: `info`, `poweroff`, `reboot`,
/// `panic`, `blk`, `net`, `rng`, `console`, `vsock`, ...) and prints
/// `KEEL-L2 ...` marker lines on its serial port.
#[derive(Clone, Debug)]
pub struct GuestBoot {
    vmm: Vmm,
    kernel: Kernel,
    initramfs: String,
    cpus: u32,
    max_cpus: Option<u32>,
    memory_mib: u64,
    hotplug_mib: Option<u64>,
    test: String,
    cmdline: Vec<String>,
    serial: String,
    devices: Vec<GuestDevice>,
    vmm_args: Vec<String>,
}

impl GuestBoot {
    /// A Linux guest booting `kernel` with 1 vCPU, 512 MiB, the `info` test
    /// and its serial port on keel-vmm's terminal.
    pub fn linux(kernel: Kernel) -> Self {
        GuestBoot {
            vmm: Vmm::Keel,
            kernel,
            initramfs: "/keel/guest/initramfs.cpio.gz".to_string(),
            cpus: 1,
            max_cpus: None,
            memory_mib: 512,
            hotplug_mib: None,
            test: "info".to_string(),
            cmdline: Vec::new(),
            serial: "tty".to_string(),
            devices: Vec::new(),
            vmm_args: Vec::new(),
        }
    }

    /// Runs the guest under `vmm` instead of keel-vmm.
    pub fn vmm(mut self, vmm: Vmm) -> Self {
        self.vmm = vmm;
        self
    }

    /// Another initramfs (a path in L1) instead of the kit's.
    pub fn initramfs(mut self, path: &str) -> Self {
        self.initramfs = path.to_string();
        self
    }

    /// A virtio-blk disk on raw image `path` (`--disk path=PATH`).
    pub fn disk(mut self, path: &str) -> Self {
        self.devices.push(GuestDevice::Disk {
            path: path.to_string(),
            readonly: false,
            direct: false,
        });
        self
    }

    /// A read-only virtio-blk disk (`--disk path=PATH,readonly=on`).
    pub fn disk_readonly(mut self, path: &str) -> Self {
        self.devices.push(GuestDevice::Disk {
            path: path.to_string(),
            readonly: true,
            direct: false,
        });
        self
    }

    /// A virtio-blk disk opened with O_DIRECT (`--disk path=PATH,direct=on`;
    /// QEMU: `cache=none`).
    pub fn disk_direct(mut self, path: &str) -> Self {
        self.devices.push(GuestDevice::Disk {
            path: path.to_string(),
            readonly: false,
            direct: true,
        });
        self
    }

    /// A virtio-net NIC on tap `tap`, with L1's end at `ip`/`mask`
    /// (`--net tap=TAP,ip=IP,mask=MASK`). For QEMU the command creates the
    /// tap, sets the address and deletes the tap afterwards; QEMU uses no
    /// vhost-net, as keel-vmm does not.
    pub fn net_tap(mut self, tap: &str, ip: &str, mask: &str) -> Self {
        self.devices.push(GuestDevice::Net {
            tap: tap.to_string(),
            host_ip: Some((ip.to_string(), mask.to_string())),
        });
        self
    }

    /// A virtio-rng device reading L1's `/dev/urandom` (`--rng`).
    pub fn rng(mut self) -> Self {
        self.devices.push(GuestDevice::Rng);
        self
    }

    /// The virtio console (the guest's hvc0) into file `path`
    /// (`--console file=PATH`).
    pub fn console_file(mut self, path: &str) -> Self {
        self.devices
            .push(GuestDevice::ConsoleFile(path.to_string()));
        self
    }

    /// A virtio-vsock device with guest CID `cid` whose host side is the
    /// Unix socket `socket` (`--vsock cid=N,socket=PATH`). QEMU uses
    /// vhost-vsock instead: its host side is AF_VSOCK in L1 and `socket` is
    /// not used.
    pub fn vsock(mut self, cid: u32, socket: &str) -> Self {
        self.devices.push(GuestDevice::Vsock {
            cid,
            socket: socket.to_string(),
        });
        self
    }

    /// Boot vCPUs (`--cpus boot=N`).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Maximum vCPUs (`--cpus boot=N,max=M`).
    pub fn max_cpus(mut self, n: u32) -> Self {
        self.max_cpus = Some(n);
        self
    }

    /// Guest memory (`--memory size=NM`).
    /// Room for memory hot-plug (`--memory …,hotplug_size=NM`; keel-vmm).
    pub fn memory_hotplug_mib(mut self, mib: u64) -> Self {
        self.hotplug_mib = Some(mib);
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The initramfs test to run (`keel.test=NAME`).
    pub fn test(mut self, name: &str) -> Self {
        self.test = name.to_string();
        self
    }

    /// Appends words to the kernel command line (after `keel.test=`).
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline.push(extra.to_string());
        self
    }

    /// `--serial` (`tty`, `file=PATH`, `null`, `off`).
    pub fn serial(mut self, serial: &str) -> Self {
        self.serial = serial.to_string();
        self
    }

    /// Appends one argument to keel-vmm's command line, as is.
    pub fn vmm_arg(mut self, arg: &str) -> Self {
        self.vmm_args.push(arg.to_string());
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_string(),
            "quiet".to_string(),
            format!("keel.test={}", self.test),
        ];
        words.extend(self.cmdline.iter().cloned());
        words.join(" ")
    }

    /// The shell command that runs the VMM in L1: a plain command for
    /// keel-vmm; for QEMU with a NIC, a list (tap set-up; QEMU; tap removal)
    /// whose status is QEMU's, so put it in parentheses to run it in the
    /// background.
    pub fn command(&self) -> String {
        match self.vmm {
            Vmm::Keel => self.keel_command(),
            Vmm::QemuQ35 => self.qemu_command(),
        }
    }

    fn keel_command(&self) -> String {
        let cpus = match self.max_cpus {
            Some(max) => format!("boot={},max={max}", self.cpus),
            None => format!("boot={}", self.cpus),
        };
        let mut args = vec![
            "/keel/bin/keel-vmm".to_string(),
            "--kernel".to_string(),
            self.kernel.path().to_string(),
            "--initramfs".to_string(),
            self.initramfs.clone(),
            "--cmdline".to_string(),
            self.kernel_cmdline(),
            "--cpus".to_string(),
            cpus,
            "--memory".to_string(),
            match self.hotplug_mib {
                Some(room) => format!("size={}M,hotplug_size={room}M", self.memory_mib),
                None => format!("size={}M", self.memory_mib),
            },
            "--serial".to_string(),
            self.serial.clone(),
        ];
        for device in &self.devices {
            let (option, value) = match device {
                GuestDevice::Disk {
                    path,
                    readonly,
                    direct,
                } => {
                    let mut v = format!("path={path}");
                    if *readonly {
                        v.push_str(",readonly=on");
                    }
                    if *direct {
                        v.push_str(",direct=on");
                    }
                    ("--disk", v)
                }
                GuestDevice::Net { tap, host_ip } => {
                    let mut v = format!("tap={tap}");
                    if let Some((ip, mask)) = host_ip {
                        v.push_str(&format!(",ip={ip},mask={mask}"));
                    }
                    ("--net", v)
                }
                GuestDevice::Rng => ("--rng", "src=/dev/urandom".to_string()),
                GuestDevice::ConsoleFile(path) => ("--console", format!("file={path}")),
                GuestDevice::Vsock { cid, socket } => {
                    ("--vsock", format!("cid={cid},socket={socket}"))
                }
            };
            args.push(option.to_string());
            args.push(value);
        }
        args.extend(self.vmm_args.iter().cloned());
        join_quoted(&args)
    }

    fn qemu_command(&self) -> String {
        let smp = match self.max_cpus {
            Some(max) => format!("{},maxcpus={max}", self.cpus),
            None => self.cpus.to_string(),
        };
        let mut args: Vec<String> = [
            "/keel/qemu/qemu-system-x86_64",
            "-M",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["-m".to_string(), format!("{}M", self.memory_mib)]);
        args.extend(["-smp".to_string(), smp]);
        match self.serial.as_str() {
            "tty" => args.extend(["-serial".to_string(), "stdio".to_string()]),
            "null" => args.extend(["-serial".to_string(), "null".to_string()]),
            "off" => {}
            other => {
                let path = other.strip_prefix("file=").unwrap_or(other);
                args.extend(["-serial".to_string(), format!("file:{path}")]);
            }
        }
        args.extend([
            "-kernel".to_string(),
            self.kernel.path().to_string(),
            "-initrd".to_string(),
            self.initramfs.clone(),
            "-append".to_string(),
            self.kernel_cmdline(),
        ]);
        let mut before = Vec::new();
        let mut after = Vec::new();
        for (i, device) in self.devices.iter().enumerate() {
            match device {
                GuestDevice::Disk {
                    path,
                    readonly,
                    direct,
                } => {
                    let mut drive = format!("file={path},format=raw,if=none,id=disk{i}");
                    drive.push_str(if *direct {
                        ",cache=none,aio=native"
                    } else {
                        ",cache=writeback"
                    });
                    if *readonly {
                        drive.push_str(",readonly=on");
                    }
                    args.extend(["-drive".to_string(), drive]);
                    args.extend([
                        "-device".to_string(),
                        format!("virtio-blk-pci,drive=disk{i}"),
                    ]);
                }
                GuestDevice::Net { tap, host_ip } => {
                    before.push(format!("tunctl -t {} >/dev/null", shell_quote(tap)));
                    if let Some((ip, mask)) = host_ip {
                        before.push(format!(
                            "ip addr add {}/{} dev {}",
                            shell_quote(ip),
                            mask_prefix(mask),
                            shell_quote(tap)
                        ));
                    }
                    before.push(format!("ip link set {} up", shell_quote(tap)));
                    after.push(format!("tunctl -d {} >/dev/null", shell_quote(tap)));
                    args.extend([
                        "-netdev".to_string(),
                        format!("tap,id=net{i},ifname={tap},script=no,downscript=no,vhost=off"),
                        "-device".to_string(),
                        format!("virtio-net-pci,netdev=net{i},romfile="),
                    ]);
                }
                GuestDevice::Rng => args.extend([
                    "-object".to_string(),
                    format!("rng-random,id=rng{i},filename=/dev/urandom"),
                    "-device".to_string(),
                    format!("virtio-rng-pci,rng=rng{i}"),
                ]),
                GuestDevice::ConsoleFile(path) => args.extend([
                    "-device".to_string(),
                    "virtio-serial-pci".to_string(),
                    "-chardev".to_string(),
                    format!("file,id=hvc{i},path={path}"),
                    "-device".to_string(),
                    format!("virtconsole,chardev=hvc{i}"),
                ]),
                GuestDevice::Vsock { cid, .. } => args.extend([
                    "-device".to_string(),
                    format!("vhost-vsock-pci,guest-cid={cid}"),
                ]),
            }
        }
        args.extend(self.vmm_args.iter().cloned());
        let qemu = join_quoted(&args);
        if before.is_empty() {
            return qemu;
        }
        format!(
            "{} && {qemu}; keel_rc=$?; {}; (exit $keel_rc)",
            before.join(" && "),
            after.join("; ")
        )
    }
}

impl From<GuestBoot> for String {
    fn from(boot: GuestBoot) -> String {
        boot.command()
    }
}

fn join_quoted(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The prefix length of a dotted netmask (`255.255.255.0` → 24); what is
/// not one counts its set bits.
fn mask_prefix(mask: &str) -> u32 {
    mask.split('.')
        .filter_map(|o| o.parse::<u8>().ok())
        .map(u8::count_ones)
        .sum()
}

/// Quotes `s` for a POSIX shell, leaving plain words as they are.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=,:+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    command: String,
    timeout_s: u64,
}

/// Cases to run in one L1 boot of the nested lab.
#[derive(Clone, Debug)]
pub struct LabSession {
    smp: u32,
    memory_mib: Option<u64>,
    with_qemu: bool,
    share: Option<PathBuf>,
    timeout_s: Option<u64>,
    case_timeout_s: u64,
    cases: Vec<Case>,
    nonce: String,
}

impl Default for LabSession {
    fn default() -> Self {
        Self::new()
    }
}

impl LabSession {
    /// An empty session: L1 with 2 vCPUs and ci/lab's default memory.
    pub fn new() -> Self {
        LabSession {
            smp: 2,
            memory_mib: None,
            with_qemu: false,
            share: None,
            timeout_s: None,
            case_timeout_s: DEFAULT_CASE_TIMEOUT_S,
            cases: Vec::new(),
            nonce: make_nonce(),
        }
    }

    /// L1's vCPUs (`ci/lab --smp`).
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }

    /// L1's memory (`ci/lab --mem`).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// Puts QEMU into L1 under `/keel/qemu` (`ci/lab --with-qemu`).
    pub fn with_qemu(mut self) -> Self {
        self.with_qemu = true;
        self
    }

    /// Mounts `dir` read-write at `/share` in L1; changes come back to `dir`.
    pub fn share(mut self, dir: impl Into<PathBuf>) -> Self {
        self.share = Some(dir.into());
        self
    }

    /// Limit for the whole ci/lab run; by default the cases' timeouts plus
    /// time for L1 to boot.
    pub fn timeout_secs(mut self, secs: u64) -> Self {
        self.timeout_s = Some(secs);
        self
    }

    /// Timeout of the cases added after this call (60 s by default).
    pub fn case_timeout_secs(mut self, secs: u64) -> Self {
        self.case_timeout_s = secs;
        self
    }

    /// Adds a case: `command` (e.g. [`GuestBoot::command`]) run in L1.
    pub fn case(mut self, name: &str, command: impl Into<String>) -> Self {
        self.cases.push(Case {
            name: name.to_string(),
            command: command.into(),
            timeout_s: self.case_timeout_s,
        });
        self
    }

    /// Adds a case running any shell command line in L1.
    pub fn case_cmd(self, name: &str, shell: &str) -> Self {
        self.case(name, shell)
    }

    /// Adds a case with its own timeout.
    pub fn case_with_timeout(mut self, name: &str, command: impl Into<String>, secs: u64) -> Self {
        self.cases.push(Case {
            name: name.to_string(),
            command: command.into(),
            timeout_s: secs,
        });
        self
    }

    /// The script the session runs in L1.
    pub fn script(&self) -> String {
        let n = &self.nonce;
        let mut s = format!(
            r#"N={n}
# Milliseconds of L1's monotonic clock into now_ms, without forking.
keel_now() {{
	if [ -r /proc/timer_list ]; then
		{{ read -r _; read -r _; read -r _ _ ns _; }} </proc/timer_list
		now_ms=$((ns / 1000000))
	else
		read -r up _ </proc/uptime
		now_ms=$((${{up%.*}} * 1000 + 1${{up#*.}}0 - 1000))
	fi
}}
# keel_case INDEX TIMEOUT_S COMMAND: runs COMMAND in its own process group,
# killing the group after TIMEOUT_S seconds.
keel_case() {{
	echo "KEEL-CASE-BEGIN $N $1"
	rm -f /tmp/keel-case-timeout
	keel_now
	t0=$now_ms
	setsid sh -c "$3" </dev/null &
	pid=$!
	setsid sh -c "sleep $2; : >/tmp/keel-case-timeout; kill -KILL -$pid" </dev/null >/dev/null 2>&1 &
	wd=$!
	wait $pid
	rc=$?
	keel_now
	kill -KILL -$wd 2>/dev/null
	wait $wd 2>/dev/null
	to=0
	[ -e /tmp/keel-case-timeout ] && to=1
	echo "KEEL-CASE-END $N $1 $rc $((now_ms - t0)) $to"
}}
"#
        );
        for (i, case) in self.cases.iter().enumerate() {
            s.push_str(&format!(
                "keel_case {i} {} {}\n",
                case.timeout_s,
                shell_quote(&case.command)
            ));
        }
        s.push_str("echo \"KEEL-SESSION-END $N\"\n");
        s
    }

    /// The ci/lab arguments for this session (after the program name).
    pub fn lab_args(&self, no_build: bool) -> Vec<String> {
        let mut args = Vec::new();
        if no_build {
            args.push("--no-build".to_string());
        }
        args.push("--smp".to_string());
        args.push(self.smp.to_string());
        if let Some(mib) = self.memory_mib {
            args.push("--mem".to_string());
            args.push(format!("{mib}M"));
        }
        if self.with_qemu {
            args.push("--with-qemu".to_string());
        }
        if let Some(dir) = &self.share {
            args.push("--share".to_string());
            args.push(dir.display().to_string());
        }
        let timeout = self
            .timeout_s
            .unwrap_or_else(|| self.cases.iter().map(|c| c.timeout_s).sum::<u64>() + L1_OVERHEAD_S);
        args.push("--timeout".to_string());
        args.push(timeout.to_string());
        // Every case prints its markers, and a silent case is killed at its
        // own timeout: a longer silence means L1 itself froze.
        let longest_case = self.cases.iter().map(|c| c.timeout_s).max().unwrap_or(0);
        args.push("--idle-timeout".to_string());
        args.push((longest_case + 30).to_string());
        args.push("--".to_string());
        args.push(self.script());
        args
    }

    /// Runs every case in one ci/lab invocation.
    ///
    /// Fails when ci/lab or L1 fails (build, boot, timeout) or a case's
    /// result is missing; a case that fails is a result, not an error.
    pub fn run(&self) -> Result<LabResults, LabError> {
        let mut names = HashSet::new();
        for case in &self.cases {
            if !names.insert(case.name.as_str()) {
                return Err(LabError::DuplicateCase(case.name.clone()));
            }
        }
        let lab = repo_root().join("ci").join("lab");
        let no_build = std::env::var("KEEL_LAB_NO_BUILD").is_ok_and(|v| v == "1");
        let run_lab = || {
            Command::new(&lab)
                .args(self.lab_args(no_build))
                .current_dir(repo_root())
                .output()
                .map_err(|source| LabError::Spawn {
                    program: lab.clone(),
                    source,
                })
        };
        let mut output = run_lab()?;
        // The one known infrastructure flake: L1 itself freezes (ci/lab says
        // so). Run the session again, once, in a fresh L1; anything else
        // that fails is reported as it is.
        if String::from_utf8_lossy(&output.stdout).contains("ci/lab: L1 froze") {
            eprintln!(
                "--- L1 froze (known nested-SVM-under-TCG flake), running the session again ---\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
            output = run_lab()?;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Shown by the test harness when the test fails.
        eprintln!("--- ci/lab stderr ---\n{stderr}--- ci/lab stdout ---\n{stdout}---");
        let mut results = self.parse(&stdout, output.status.code())?;
        results.l1_boot_ms = parse_l1_boot_ms(&stderr);
        Ok(results)
    }

    /// Parses ci/lab's stdout for this session's cases.
    pub fn parse(&self, stdout: &str, lab_status: Option<i32>) -> Result<LabResults, LabError> {
        let begin = format!("KEEL-CASE-BEGIN {} ", self.nonce);
        let end = format!("KEEL-CASE-END {} ", self.nonce);
        let session_end = format!("KEEL-SESSION-END {}", self.nonce);
        let all: Vec<&str> = stdout.lines().collect();
        let tail = || tail_lines(&all);

        let mut results: Vec<Option<CaseResult>> = vec![None; self.cases.len()];
        let mut current: Option<(usize, Vec<String>)> = None;
        let mut finished = false;
        for raw in &all {
            let line = raw.trim_end_matches('\r');
            if let Some(pos) = line.find(&begin) {
                let index = parse_index(&line[pos + begin.len()..], self.cases.len())
                    .ok_or_else(|| LabError::Parse(format!("bad begin marker: {line}")))?;
                current = Some((index, Vec::new()));
                continue;
            }
            if let Some(pos) = line.find(&end) {
                let (index, mut lines) = current
                    .take()
                    .ok_or_else(|| LabError::Parse(format!("end marker outside a case: {line}")))?;
                if pos > 0 {
                    // The case's last line had no newline.
                    lines.push(line[..pos].to_string());
                }
                let fields: Vec<&str> = line[pos + end.len()..].split_whitespace().collect();
                let parsed = match fields.as_slice() {
                    [i, status, ms, to] => Some((
                        i.parse::<usize>().ok(),
                        status.parse::<i32>().ok(),
                        ms.parse::<u64>().ok(),
                        *to == "1",
                    )),
                    _ => None,
                };
                let Some((Some(i), Some(status), Some(elapsed_ms), timed_out)) = parsed else {
                    return Err(LabError::Parse(format!("bad end marker: {line}")));
                };
                if i != index {
                    return Err(LabError::Parse(format!(
                        "end marker of case {i} inside case {index}"
                    )));
                }
                results[index] = Some(CaseResult {
                    name: self.cases[index].name.clone(),
                    status,
                    lines,
                    elapsed_ms,
                    timed_out,
                });
                continue;
            }
            if line.contains(&session_end) {
                finished = true;
                continue;
            }
            if let Some((_, lines)) = current.as_mut() {
                lines.push(line.to_string());
            }
        }

        if lab_status != Some(0) || !finished {
            return Err(LabError::Lab {
                status: lab_status,
                tail: tail(),
            });
        }
        let mut cases = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(r) => cases.push(r),
                None => {
                    return Err(LabError::MissingCase {
                        name: self.cases[i].name.clone(),
                        tail: tail(),
                    });
                }
            }
        }
        Ok(LabResults {
            cases,
            l1_boot_ms: None,
        })
    }
}

fn parse_index(s: &str, len: usize) -> Option<usize> {
    let i = s.split_whitespace().next()?.parse::<usize>().ok()?;
    (i < len).then_some(i)
}

fn tail_lines(all: &[&str]) -> Vec<String> {
    let start = all.len().saturating_sub(ERROR_TAIL_LINES);
    all[start..].iter().map(|l| l.to_string()).collect()
}

/// ci/lab's "L1 exec -> command start X s" on stderr, in ms.
fn parse_l1_boot_ms(stderr: &str) -> Option<u64> {
    let marker = "L1 exec -> command start ";
    stderr.lines().rev().find_map(|line| {
        let rest = &line[line.find(marker)? + marker.len()..];
        let secs: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some((secs * 1000.0).round() as u64)
    })
}

/// A marker no guest output will contain by chance.
fn make_nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64 finaliser
    let mut z = mixed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

/// The repository root (the parent of the `tests` crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// What one case did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Exit status of its command (128 + signal when killed, e.g. 137 after
    /// its timeout).
    pub status: i32,
    /// Its output (stdout and stderr, and the guest's serial console for
    /// `--serial tty`), line by line.
    pub lines: Vec<String>,
    /// Wall time of the command in L1, in milliseconds.
    pub elapsed_ms: u64,
    /// Whether the case's timeout killed it.
    pub timed_out: bool,
}

impl CaseResult {
    /// Whether some line, trimmed, is exactly `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l.trim() == line)
    }

    /// The first line (trimmed) that starts with `prefix`.
    pub fn line_starting(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with(prefix))
    }

    /// What follows `prefix` on the first line starting with it, trimmed:
    /// `value("KEEL-L2 MEMTOTAL")` → `Some("481180")`.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.line_starting(prefix).map(|l| l[prefix.len()..].trim())
    }

    /// Index of the first line that is exactly `line` (trimmed).
    pub fn position(&self, line: &str) -> Option<usize> {
        self.lines.iter().position(|l| l.trim() == line)
    }

    /// How many lines are exactly `line` (trimmed).
    pub fn count(&self, line: &str) -> usize {
        self.lines.iter().filter(|l| l.trim() == line).count()
    }

    /// The whole output, for assertion messages.
    pub fn output(&self) -> String {
        self.lines.join("\n")
    }
}

/// The results of a [`LabSession`], in the order the cases were added.
#[derive(Clone, Debug)]
pub struct LabResults {
    cases: Vec<CaseResult>,
    /// L1 exec → the session's script starting, as ci/lab measured it.
    pub l1_boot_ms: Option<u64>,
}

impl LabResults {
    /// The result of case `name`.
    ///
    /// # Panics
    /// If no case has that name (a mistake in the test).
    pub fn get(&self, name: &str) -> &CaseResult {
        match self.try_get(name) {
            Some(r) => r,
            None => panic!(
                "no lab case named {name:?}; cases: {:?}",
                self.cases.iter().map(|c| &c.name).collect::<Vec<_>>()
            ),
        }
    }

    /// The result of case `name`, if there is one.
    pub fn try_get(&self, name: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// All results, in the order the cases were added.
    pub fn cases(&self) -> &[CaseResult] {
        &self.cases
    }
}

/// Why a lab session produced no results.
#[derive(Debug)]
pub enum LabError {
    /// Two cases share a name.
    DuplicateCase(String),
    /// ci/lab could not be started.
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// ci/lab failed (build, L1 boot, timeout) or the session did not finish.
    Lab {
        status: Option<i32>,
        tail: Vec<String>,
    },
    /// A case never reported its end.
    MissingCase { name: String, tail: Vec<String> },
    /// The output had a malformed marker.
    Parse(String),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::DuplicateCase(name) => write!(f, "Two lab cases are named {name:?}"),
            LabError::Spawn { program, .. } => write!(f, "Cannot run {}", program.display()),
            LabError::Lab { status, tail } => {
                let why = match status {
                    Some(0) => "finished without the session's end marker".to_string(),
                    Some(124) => "timed out".to_string(),
                    Some(125) => "failed (L1 did not boot or died)".to_string(),
                    Some(s) => format!("exited with status {s}"),
                    None => "was killed by a signal".to_string(),
                };
                write!(f, "ci/lab {why}; last lines:\n{}", tail.join("\n"))
            }
            LabError::MissingCase { name, tail } => write!(
                f,
                "Lab case {name:?} reported no result; last lines:\n{}",
                tail.join("\n")
            ),
            LabError::Parse(msg) => write!(f, "Cannot parse the lab output: {msg}"),
        }
    }
}

impl Error for LabError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            LabError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> LabSession {
        let mut s = LabSession::new()
            .case("a", "echo a")
            .case_cmd("b", "echo 'b c'");
        s.nonce = "n0".to_string();
        s
    }

    #[test]
    fn guest_boot_command() {
        let cmd = GuestBoot::linux(Kernel::Pvh)
            .cpus(2)
            .memory_mib(256)
            .test("reboot")
            .cmdline("panic=-1")
            .command();
        assert_eq!(
            cmd,
            "/keel/bin/keel-vmm --kernel /keel/guest/vmlinux --initramfs /keel/guest/initramfs.cpio.gz \
             --cmdline 'console=ttyS0 quiet keel.test=reboot panic=-1' --cpus boot=2 \
             --memory size=256M --serial tty"
        );
        let cmd = GuestBoot::linux(Kernel::BzImage)
            .max_cpus(4)
            .serial("file=/tmp/s")
            .vmm_arg("--console")
            .vmm_arg("off")
            .command();
        assert!(cmd.starts_with("/keel/bin/keel-vmm --kernel /keel/guest/bzImage "));
        assert!(cmd.contains("--cpus boot=1,max=4 --memory size=512M"));
        assert!(cmd.ends_with("--serial file=/tmp/s --console off"));
    }

    #[test]
    fn guest_boot_devices() {
        let boot = GuestBoot::linux(Kernel::BzImage)
            .test("blk")
            .disk("/share/a.img")
            .disk_readonly("/share/b.img")
            .disk_direct("/share/c.img")
            .net_tap("kt0", "192.168.100.1", "255.255.255.0")
            .rng()
            .console_file("/tmp/hvc")
            .vsock(3, "/tmp/v.sock");
        let keel = boot.command();
        assert!(
            keel.ends_with(
                "--serial tty --disk path=/share/a.img --disk path=/share/b.img,readonly=on \
                 --disk path=/share/c.img,direct=on \
                 --net tap=kt0,ip=192.168.100.1,mask=255.255.255.0 --rng src=/dev/urandom \
                 --console file=/tmp/hvc --vsock cid=3,socket=/tmp/v.sock"
            ),
            "{keel}"
        );
        let qemu = boot.clone().vmm(Vmm::QemuQ35).command();
        assert!(
            qemu.starts_with(
                "tunctl -t kt0 >/dev/null && ip addr add 192.168.100.1/24 dev kt0 && \
                 ip link set kt0 up && /keel/qemu/qemu-system-x86_64 -M q35 -accel kvm -cpu host "
            ),
            "{qemu}"
        );
        for part in [
            "-m 512M -smp 1 -serial stdio -kernel /keel/guest/bzImage \
             -initrd /keel/guest/initramfs.cpio.gz -append 'console=ttyS0 quiet keel.test=blk'",
            "-drive file=/share/a.img,format=raw,if=none,id=disk0,cache=writeback \
             -device virtio-blk-pci,drive=disk0",
            "-drive file=/share/b.img,format=raw,if=none,id=disk1,cache=writeback,readonly=on",
            "-drive file=/share/c.img,format=raw,if=none,id=disk2,cache=none,aio=native",
            "-netdev tap,id=net3,ifname=kt0,script=no,downscript=no,vhost=off \
             -device virtio-net-pci,netdev=net3,romfile=",
            "-object rng-random,id=rng4,filename=/dev/urandom -device virtio-rng-pci,rng=rng4",
            "-device virtio-serial-pci -chardev file,id=hvc5,path=/tmp/hvc \
             -device virtconsole,chardev=hvc5",
            "-device vhost-vsock-pci,guest-cid=3; keel_rc=$?; tunctl -d kt0 >/dev/null; (exit $keel_rc)",
        ] {
            assert!(qemu.contains(part), "{part}\n{qemu}");
        }
        let plain = GuestBoot::linux(Kernel::Pvh)
            .vmm(Vmm::QemuQ35)
            .serial("file=/tmp/s")
            .initramfs("/tmp/i.gz")
            .command();
        assert!(
            plain.starts_with("/keel/qemu/qemu-system-x86_64 "),
            "{plain}"
        );
        assert!(
            plain.contains(" -serial file:/tmp/s -kernel /keel/guest/vmlinux -initrd /tmp/i.gz ")
        );
        assert_eq!(mask_prefix("255.255.255.0"), 24);
        assert_eq!(mask_prefix("255.255.0.0"), 16);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc"), "abc");
        assert_eq!(shell_quote("size=512M"), "size=512M");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(x)"), "'$(x)'");
    }

    #[test]
    fn script_runs_each_case() {
        let s = session().case_with_timeout("slow", "sleep 1", 5).script();
        assert!(s.starts_with("N=n0\n"));
        assert!(s.contains("keel_case 0 60 'echo a'\n"));
        assert!(s.contains(r"keel_case 1 60 'echo '\''b c'\'''"));
        assert!(s.contains("keel_case 2 5 'sleep 1'\n"));
        assert!(s.ends_with("echo \"KEEL-SESSION-END $N\"\n"));
    }

    #[test]
    fn lab_args() {
        let s = session()
            .smp(1)
            .memory_mib(2048)
            .with_qemu()
            .share("/tmp/x");
        let args = s.lab_args(true);
        assert_eq!(
            &args[..args.len() - 1],
            [
                "--no-build",
                "--smp",
                "1",
                "--mem",
                "2048M",
                "--with-qemu",
                "--share",
                "/tmp/x",
                "--timeout",
                "300",
                "--idle-timeout",
                "90",
                "--",
            ]
        );
        assert_eq!(args.last(), Some(&s.script()));
        let args = session().timeout_secs(7).lab_args(false);
        assert_eq!(&args[..4], ["--smp", "2", "--timeout", "7"]);
    }

    const OUTPUT: &str = "noise before\n\
        KEEL-CASE-BEGIN n0 0\n\
        a\r\n\
        KEEL-L2 CPUS 1  \n\
        KEEL-CASE-END n0 0 0 2345 0\n\
        KEEL-CASE-BEGIN n0 1\n\
        no newlineKEEL-CASE-END n0 1 137 60012 1\n\
        KEEL-SESSION-END n0\n";

    #[test]
    fn parses_cases() {
        let r = session().parse(OUTPUT, Some(0)).unwrap();
        let a = r.get("a");
        assert_eq!(a.status, 0);
        assert_eq!(a.elapsed_ms, 2345);
        assert!(!a.timed_out);
        assert_eq!(a.lines, ["a", "KEEL-L2 CPUS 1  "]);
        assert!(a.has_line("KEEL-L2 CPUS 1"));
        assert!(!a.has_line("KEEL-L2 CPUS"));
        assert_eq!(a.value("KEEL-L2 CPUS"), Some("1"));
        assert_eq!(a.position("KEEL-L2 CPUS 1"), Some(1));
        assert_eq!(a.count("a"), 1);
        let b = r.get("b");
        assert_eq!(b.status, 137);
        assert!(b.timed_out);
        assert_eq!(b.lines, ["no newline"]);
        assert_eq!(r.cases().len(), 2);
        assert!(r.try_get("c").is_none());
    }

    #[test]
    fn other_nonces_are_output() {
        let out = OUTPUT.replace("KEEL-L2 CPUS 1", "KEEL-CASE-END zz 0 0 1 0");
        let r = session().parse(&out, Some(0)).unwrap();
        assert!(r.get("a").has_line("KEEL-CASE-END zz 0 0 1 0"));
    }

    #[test]
    fn lab_failure_is_an_error() {
        let out = "KEEL-CASE-BEGIN n0 0\nci/lab: timed out after 300 s (...)\n";
        match session().parse(out, Some(124)) {
            Err(LabError::Lab { status, tail }) => {
                assert_eq!(status, Some(124));
                assert_eq!(
                    tail.last().map(String::as_str),
                    Some("ci/lab: timed out after 300 s (...)")
                );
            }
            other => panic!("{other:?}"),
        }
        let err = session().parse(out, Some(124)).unwrap_err().to_string();
        assert!(err.starts_with("ci/lab timed out; last lines:\n"), "{err}");
    }

    #[test]
    fn missing_session_end_is_an_error() {
        let out = OUTPUT.replace("KEEL-SESSION-END n0\n", "");
        assert!(matches!(
            session().parse(&out, Some(0)),
            Err(LabError::Lab {
                status: Some(0),
                ..
            })
        ));
    }

    #[test]
    fn missing_case_is_an_error() {
        let out = "KEEL-CASE-BEGIN n0 0\nKEEL-CASE-END n0 0 0 1 0\nKEEL-SESSION-END n0\n";
        match session().parse(out, Some(0)) {
            Err(LabError::MissingCase { name, .. }) => assert_eq!(name, "b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_markers_are_errors() {
        for out in [
            "KEEL-CASE-BEGIN n0 7\n",
            "KEEL-CASE-END n0 0 0 1 0\n",
            "KEEL-CASE-BEGIN n0 0\nKEEL-CASE-END n0 0 x 1 0\n",
            "KEEL-CASE-BEGIN n0 0\nKEEL-CASE-END n0 1 0 1 0\n",
        ] {
            assert!(
                matches!(session().parse(out, Some(0)), Err(LabError::Parse(_))),
                "{out}"
            );
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let s = LabSession::new().case("x", "true").case("x", "false");
        assert!(matches!(s.run(), Err(LabError::DuplicateCase(n)) if n == "x"));
    }

    #[test]
    fn l1_boot_time() {
        let stderr = "ci/lab: L1 up: exec -> command start 3.95 s\n\
                      ci/lab: timings: L1 exec -> command start 3.95 s, command 0.06 s\n";
        assert_eq!(parse_l1_boot_ms(stderr), Some(3950));
        assert_eq!(parse_l1_boot_ms("nothing"), None);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(LabSession::new().nonce, "");
        assert_eq!(make_nonce().len(), 16);
    }

    #[test]
    fn repo_root_has_ci_lab() {
        assert!(repo_root().join("ci").join("lab").exists());
    }
}
