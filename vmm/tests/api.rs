//! The REST API on this host's KVM, with the freestanding guest counting
//! `TICK`s on its serial port: lifecycle, pause/resume, the event monitor,
//! careless clients, and requests shaped exactly like ch-remote's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use keel_api::client::{ClientError, VmmClient};
use keel_api::vmm_api::{Endpoint, VmState};
use keel_api::{ConsoleConfig, ConsoleOutputMode, PayloadConfig, VmConfig};
use keel_tests::freestanding::{Mode, guest_elf, parse_report};

/// A keel-vmm process serving its API in a scratch directory.
struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Vmm {
    fn start(name: &str, extra: &[&str]) -> Vmm {
        let dir = std::env::temp_dir().join(format!("keel-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = format!("path={}", dir.join("api.sock").display());
        let events = format!("path={}", dir.join("events.jsonl").display());
        let child = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
            .args(["--api-socket", &socket, "--event-monitor", &events])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel-vmm");
        let vmm = Vmm { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(vmm.socket()).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            thread::sleep(Duration::from_millis(5));
        }
        vmm
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    fn client(&self) -> VmmClient {
        let client = VmmClient::connect(&self.socket()).expect("connect");
        client.set_timeout(Some(Duration::from_secs(30))).unwrap();
        client
    }

    /// The guest's serial output so far, parsed.
    fn last_tick(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.serial()).unwrap_or_default();
        parse_report(&text).last_tick
    }

    fn wait_for_tick_above(&self, n: Option<u64>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = self.last_tick()
                && Some(t) > n
            {
                return t;
            }
            assert!(Instant::now() < deadline, "the guest stopped ticking");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn events(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join("events.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).expect("one JSON object per line");
                (
                    v["source"].as_str().unwrap().to_string(),
                    v["event"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a new tap (`pattern` like "name%d") the way Cloud Hypervisor's
/// clients do before passing it: TAP, no packet info, virtio-net header.
fn open_tap(pattern: &str) -> (std::fs::File, String) {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(pattern.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF takes a struct ifreq, which `req` is.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    (file, String::from_utf8(name).unwrap())
}

fn tick_config(serial: &Path) -> VmConfig {
    VmConfig {
        cpus: Default::default(),
        memory: keel_api::MemoryConfig {
            size: 64 << 20,
            ..Default::default()
        },
        payload: PayloadConfig {
            kernel: Some(guest_elf().to_path_buf()),
            initramfs: None,
            cmdline: Some(Mode::Tick.cmdline()),
        },
        serial: ConsoleConfig {
            file: Some(serial.to_path_buf()),
            mode: ConsoleOutputMode::File,
        },
        console: ConsoleConfig::mode(ConsoleOutputMode::Off),
        disks: Vec::new(),
        net: Vec::new(),
        rng: None,
        vsock: None,
    }
}

fn status_of(result: Result<(), ClientError>) -> u16 {
    match result {
        Ok(()) => 204,
        Err(ClientError::Server { status, .. }) => status,
        Err(e) => panic!("not an HTTP answer: {e}"),
    }
}

#[test]
fn lifecycle_pause_resume_and_events() {
    let mut vmm = Vmm::start("lifecycle", &[]);
    let mut api = vmm.client();
    assert_eq!(api.ping().unwrap().pid, i64::from(vmm.child.id()));

    // Nothing created yet: 404 for what needs a VM.
    assert_eq!(status_of(api.info().map(drop)), 404);
    assert_eq!(status_of(api.action(Endpoint::VmBoot)), 404);
    assert_eq!(status_of(api.action(Endpoint::VmPause)), 404);

    // A disk and a vsock device: after vm.shutdown their image lock and
    // socket must be let go, or the next vm.boot could not take them again.
    let mut config = tick_config(&vmm.serial());
    let disk = vmm.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    config
        .disks
        .push(keel_api::DiskConfig::parse(&format!("path={}", disk.display())).unwrap());
    let vsock_path = vmm.dir.join("vsock.sock");
    config.vsock = Some(
        keel_api::VsockConfig::parse(&format!("cid=3,socket={}", vsock_path.display())).unwrap(),
    );
    api.create(&config).unwrap();
    config.assign_device_ids();
    assert_eq!(status_of(api.create(&config)), 405);
    assert_eq!(api.info().unwrap().state, VmState::Created);
    // Not booted: pausing or shutting down is the wrong state.
    assert_eq!(status_of(api.action(Endpoint::VmPause)), 405);
    assert_eq!(status_of(api.action(Endpoint::VmShutdown)), 405);

    api.action(Endpoint::VmBoot).unwrap();
    assert_eq!(status_of(api.action(Endpoint::VmBoot)), 405);
    let info = api.info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config, config);
    assert_eq!(info.memory_actual_size, 64 << 20);
    assert_eq!(status_of(api.action(Endpoint::VmResume)), 405);
    let running = vmm.wait_for_tick_above(Some(2));

    // Paused: the counter stops, and continues after resume.
    api.action(Endpoint::VmPause).unwrap();
    assert_eq!(api.info().unwrap().state, VmState::Paused);
    assert_eq!(status_of(api.action(Endpoint::VmPause)), 405);
    let at_pause = vmm.last_tick().unwrap();
    assert!(at_pause >= running);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(vmm.last_tick(), Some(at_pause), "ticks while paused");
    api.action(Endpoint::VmResume).unwrap();
    assert_eq!(api.info().unwrap().state, VmState::Running);
    vmm.wait_for_tick_above(Some(at_pause + 2));

    // Reboot: the guest starts over (a second READY, ticks from 0).
    api.action(Endpoint::VmReboot).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while parse_report(&std::fs::read_to_string(vmm.serial()).unwrap()).boots < 2 {
        assert!(Instant::now() < deadline, "no second boot after vm.reboot");
        thread::sleep(Duration::from_millis(20));
    }

    // Shut down keeps the configuration; boot starts it again.
    api.action(Endpoint::VmShutdown).unwrap();
    assert_eq!(api.info().unwrap().state, VmState::Shutdown);
    assert!(
        !vsock_path.exists(),
        "the vsock socket is removed at shutdown"
    );
    assert_eq!(status_of(api.action(Endpoint::VmShutdown)), 405);
    assert_eq!(status_of(api.action(Endpoint::VmPowerButton)), 405);
    api.action(Endpoint::VmBoot).unwrap();
    assert_eq!(api.info().unwrap().state, VmState::Running);

    api.action(Endpoint::VmDelete).unwrap();
    assert_eq!(status_of(api.info().map(drop)), 404);
    api.shutdown_vmm().unwrap();
    assert_eq!(vmm.wait_exit(), Some(0));
    assert!(!vmm.socket().exists(), "the socket file is removed at exit");

    let events: Vec<String> = vmm
        .events()
        .into_iter()
        .map(|(source, event)| format!("{source}:{event}"))
        .collect();
    let expected = [
        "vmm:starting",
        "vm:created",
        "vm:booting",
        "vm:booted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:rebooting",
        "vm:rebooted",
        "vm:shutdown",
        "vm:booting",
        "vm:booted",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    assert_eq!(events, expected);
}

#[test]
fn boots_from_the_command_line_and_serves_counters() {
    let dir = std::env::temp_dir().join(format!("keel-api-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = guest_elf().to_str().unwrap().to_string();
    let disk_arg = format!("path={},id=data", disk.display());
    let vmm = Vmm::start(
        "counters",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            &Mode::Tick.cmdline(),
            "--memory",
            "size=64M,hotplug_size=256M",
            "--cpus",
            "boot=1,max=2",
            "--disk",
            &disk_arg,
            "--rng",
            "--serial",
            "null",
        ],
    );
    let mut api = vmm.client();
    let info = api.info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.disks[0].id.as_deref(), Some("data"));
    let node = &info.device_tree["data"];
    assert!(
        node.pci_bdf
            .as_deref()
            .is_some_and(|b| b.starts_with("0000:00:")),
        "{node:?}"
    );
    assert!(info.device_tree.contains_key("__rng"));
    let counters = api.counters().unwrap();
    let disk_counters = &counters["data"];
    for key in ["read_bytes", "read_ops", "write_bytes", "write_ops"] {
        assert!(disk_counters.contains_key(key), "{counters:?}");
    }
    // vCPUs up to max: the new one is created and started at once (this
    // guest never brings it online); past max, or memory, is refused.
    let cpus = |n: u8| keel_api::vmm_api::VmResize {
        desired_vcpus: Some(n),
        ..Default::default()
    };
    api.resize(&cpus(2)).unwrap();
    assert_eq!(api.info().unwrap().config.cpus.boot_vcpus, 2);
    assert!(matches!(
        api.resize(&cpus(3)),
        Err(ClientError::Server { status: 400, .. })
    ));
    // Memory grows in 128 MiB blocks within hotplug_size, and never shrinks.
    let ram = |bytes: u64| keel_api::vmm_api::VmResize {
        desired_ram: Some(bytes),
        ..Default::default()
    };
    api.resize(&ram((64 + 128) << 20)).unwrap();
    let info = api.info().unwrap();
    assert_eq!(info.memory_actual_size, (64 + 128) << 20);
    assert_eq!(info.config.memory.hotplugged_size, Some(128 << 20));
    for bad in [64 << 20, (64 + 100) << 20, (64 + 384) << 20] {
        assert!(
            matches!(
                api.resize(&ram(bad)),
                Err(ClientError::Server { status: 400, .. })
            ),
            "{bad}"
        );
    }
    api.resize(&cpus(1)).unwrap();

    // A running disk grows; shrinking or an unknown id is refused.
    let resize = |id: &str, size: u64| keel_api::vmm_api::VmResizeDisk {
        id: id.to_string(),
        desired_size: size,
    };
    api.resize_disk(&resize("data", 2 << 20)).unwrap();
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 20);
    assert!(matches!(
        api.resize_disk(&resize("data", 1 << 20)),
        Err(ClientError::Server { status: 400, .. })
    ));
    assert!(matches!(
        api.resize_disk(&resize("nope", 4 << 20)),
        Err(ClientError::Server { status: 404, .. })
    ));

    // Hot-plug into the running VM: the VMM places the disk and answers
    // with its PCI address (this guest has no ACPI to notice it).
    let second = dir.join("second.img");
    std::fs::write(&second, vec![0u8; 1 << 20]).unwrap();
    let added = api
        .add_disk(
            &keel_api::DiskConfig::parse(&format!("path={},id=hot", second.display())).unwrap(),
        )
        .unwrap()
        .expect("a hot-plug answers with the device");
    assert_eq!(added.id, "hot");
    assert!(added.bdf.starts_with("0000:00:"), "{added:?}");
    let info = api.info().unwrap();
    assert_eq!(
        info.device_tree["hot"].pci_bdf.as_deref(),
        Some(added.bdf.as_str())
    );
    assert_eq!(info.config.disks.len(), 2);
    let again = api.add_disk(
        &keel_api::DiskConfig::parse(&format!("path={},id=hot", second.display())).unwrap(),
    );
    assert!(
        matches!(again, Err(ClientError::Server { status: 409, .. })),
        "{again:?}"
    );
    // Removal waits for the guest to eject; unknown ids are 404.
    api.remove_device("hot").unwrap();
    assert!(matches!(
        api.remove_device("nothing"),
        Err(ClientError::Server { status: 404, .. })
    ));
    assert!(matches!(
        api.remove_device("__rng"),
        Err(ClientError::Server { status: 404, .. })
    ));
    // A NIC on a tap the client opened and passed with the request, as
    // Cloud Hypervisor's clients do; something that is not a tap is refused.
    let (tap, tap_name) = open_tap("ktapifd%d");
    let nic = keel_api::NetConfig::parse("id=fdnet").unwrap();
    let added = api
        .add_net(&nic, &[std::os::fd::AsRawFd::as_raw_fd(&tap)])
        .unwrap()
        .expect("a hot-plugged NIC answers with its address");
    assert_eq!(added.id, "fdnet");
    let info = api.info().unwrap();
    let net = info
        .config
        .net
        .iter()
        .find(|n| n.id.as_deref() == Some("fdnet"))
        .unwrap();
    assert_eq!(net.tap.as_deref(), Some(tap_name.as_str()));
    let file = std::fs::File::open(&disk).unwrap();
    let nic = keel_api::NetConfig::parse("id=notatap").unwrap();
    let refused = api.add_net(&nic, &[std::os::fd::AsRawFd::as_raw_fd(&file)]);
    assert!(
        matches!(&refused, Err(ClientError::Server { status: 500, messages }) if messages.iter().any(|m| m.contains("not a TAP"))),
        "{refused:?}"
    );

    let vfio = keel_api::vmm_api::DeviceConfig {
        path: "/sys/bus/pci/devices/0000:00:05.0".into(),
        iommu: false,
        pci_segment: 0,
        id: None,
    };
    assert!(matches!(
        api.add_device(&vfio),
        Err(ClientError::Server { status: 501, .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes raw bytes and reads one response (status, body) the way
/// ch-remote does: until Content-Length is satisfied.
fn raw_exchange(socket: &Path, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    read_response(&mut stream)
}

fn read_response(stream: &mut UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((head, at)) = keel_api::http::parse_response_head(&buf).unwrap()
            && buf.len() >= at + head.content_length
        {
            let body = String::from_utf8_lossy(&buf[at..at + head.content_length]).into_owned();
            return (head.status, body);
        }
        let n = match stream.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        };
        assert!(
            n > 0,
            "closed before a full answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn requests_shaped_like_ch_remote_succeed() {
    let vmm = Vmm::start("ch-remote", &[]);
    let socket = vmm.socket();
    let config = serde_json::to_string(&tick_config(&vmm.serial())).unwrap();
    // ch-remote: request line, Host, Accept, Content-Length, no Content-Type.
    let put = |cmd: &str, body: Option<&str>| {
        let mut req = format!("PUT /api/v1/{cmd} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        raw_exchange(&socket, req.as_bytes())
    };
    let get = |cmd: &str| {
        raw_exchange(
            &socket,
            format!("GET /api/v1/{cmd} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
                .as_bytes(),
        )
    };
    let (status, body) = get("vmm.ping");
    assert_eq!(status, 200);
    assert!(body.contains("\"version\""), "{body}");
    assert_eq!(put("vm.create", Some(&config)).0, 204);
    assert_eq!(put("vm.boot", None).0, 204);
    let (status, body) = get("vm.info");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(
        info["config"]["payload"]["kernel"],
        guest_elf().to_str().unwrap()
    );
    assert_eq!(put("vm.pause", None).0, 204);
    let (status, body) = put("vm.pause", None);
    assert_eq!(status, 405);
    let messages: Vec<String> = serde_json::from_str(&body).expect("a JSON array of messages");
    assert!(messages[0].contains("Paused"), "{messages:?}");
    assert_eq!(put("vm.resume", None).0, 204);
    assert_eq!(get("vm.counters").0, 200);
    // curl's shape for a large body: Expect: 100-continue first.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = r#"{"desired_vcpus":1}"#;
    write!(
        stream,
        "PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut stream).0, 204);
    assert_eq!(put("vm.shutdown", None).0, 204);
    assert_eq!(put("vmm.shutdown", None).0, 204);
}

#[test]
fn careless_and_hostile_clients_get_clean_answers() {
    let vmm = Vmm::start("careless", &[]);
    let socket = vmm.socket();
    let mut api = vmm.client();
    api.create(&tick_config(&vmm.serial())).unwrap();
    api.action(Endpoint::VmBoot).unwrap();
    let before = vmm.wait_for_tick_above(Some(1));

    // A client that sends half a request and stalls holds only itself.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled.write_all(b"PUT /api/v1/vm.pau").unwrap();
    let started_stall = Instant::now();

    let cases: &[(&[u8], u16)] = &[
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400),
        (b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n", 404),
        (b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n", 405),
        (b"GET /api/v1/vm.info HTTP/9.9\r\n\r\n", 505),
        (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        (b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 22\r\n\r\n{\"desired_vcpus\":\"x\"}!", 400),
        (b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 24\r\n\r\n{\"path\":\"/x\",\"what\":1}  ", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ];
    for (request, want) in cases {
        let (status, body) = raw_exchange(&socket, request);
        assert_eq!(
            status,
            *want,
            "{:?} -> {body}",
            String::from_utf8_lossy(request)
        );
        if status != 204 {
            let messages: Vec<String> = serde_json::from_str(&body).expect("JSON error body");
            assert!(!messages.is_empty() && !messages[0].is_empty());
        }
    }

    // An oversized body is refused from its head: 4 MiB announced.
    let mut big = UnixStream::connect(&socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    big.write_all(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            4 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    // Some of the body goes out before the VMM answers and closes.
    let _ = big.write_all(&vec![b' '; 64 << 10]);
    assert_eq!(read_response(&mut big).0, 413);

    // 100 clients at once, 10 requests each.
    let workers: Vec<_> = (0..100)
        .map(|_| {
            let socket = socket.clone();
            thread::spawn(move || {
                let mut client = VmmClient::connect(&socket).unwrap();
                client.set_timeout(Some(Duration::from_secs(60))).unwrap();
                for _ in 0..10 {
                    assert_eq!(client.info().unwrap().state, VmState::Running);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent client failed");
    }

    // The stalled client is answered 408 once its time is up.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (status, _) = read_response(&mut stalled);
    assert_eq!(status, 408);
    assert!(started_stall.elapsed() >= Duration::from_secs(9));

    // The guest kept running throughout, and the API still answers.
    vmm.wait_for_tick_above(Some(before + 5));
    assert_eq!(api.info().unwrap().state, VmState::Running);
}

#[test]
fn bad_api_options_are_one_line_errors() {
    let vmm = Vmm::start("in-use", &[]);
    let socket = format!("path={}", vmm.socket().display());
    for (args, needle) in [
        (vec!["--api-socket", socket.as_str()], "in use"),
        (vec!["--api-socket", "fd=1"], "fd must be"),
        (vec!["--api-socket", "path="], "expected path=PATH or fd=N"),
        (
            vec!["--api-socket", "/tmp/x.sock", "--event-monitor", "fd=77"],
            "fd 77 is not open",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
