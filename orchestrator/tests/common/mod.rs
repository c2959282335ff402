//! A keeld of its own for each test: a fresh data dir, a free port, the
//! freestanding test guest as the image's kernel (it runs on this host's
//! KVM), and clean-up of every keel-vmm it started.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_api::keeld_client::{KeeldClient, Reply};
use serde_json::{Value, json};

/// The password of the users tests make with [`Keeld::user`].
pub const USER_PASSWORD: &str = "Password-123";

pub fn keel_vmm() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_VMM") {
        return PathBuf::from(p);
    }
    let keeld = Path::new(env!("CARGO_BIN_EXE_keeld"));
    let beside = keeld.with_file_name("keel-vmm");
    if beside.exists() {
        return beside;
    }
    let release = keeld
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("release").join("keel-vmm"))
        .unwrap_or_default();
    assert!(
        release.exists(),
        "keel-vmm is not built: run `cargo build --bins` (or set KEEL_VMM)"
    );
    release
}

pub struct Keeld {
    pub dir: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub admin: KeeldClient,
    pub extra_args: Vec<String>,
    /// The VMM binary keeld runs (keel-vmm unless a test says otherwise).
    pub vmm: PathBuf,
    /// RLIMIT_NOFILE (soft, hard) keeld starts with, when a test sets it.
    pub nofile: Option<(u64, u64)>,
    /// Environment variables keeld starts with besides the test's own.
    pub env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Keeld {
    pub fn start(name: &str) -> Keeld {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Keeld {
        Self::start_with_vmm(name, extra, keel_vmm())
    }

    pub fn start_with_vmm(name: &str, extra: &[&str], vmm: PathBuf) -> Keeld {
        let dir = std::env::temp_dir().join(format!("keeld-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut k = Keeld {
            dir,
            port: free_port(),
            child: None,
            admin: KeeldClient::new("http://127.0.0.1:1").unwrap(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            vmm,
            nofile: None,
            env: Vec::new(),
        };
        std::fs::create_dir_all(k.import_dir()).unwrap();
        let out = k.spawn();
        assert!(out.contains("created user admin"), "first start: {out}");
        let password = std::fs::read_to_string(k.dir.join("data/initial-admin-password"))
            .unwrap()
            .trim()
            .to_string();
        assert!(out.contains(&password), "the password is printed once");
        let mut admin = k.client();
        admin.login("admin", &password).unwrap();
        k.admin = admin;
        k
    }

    /// Starts the keeld process and waits until it serves; returns what it
    /// printed up to then.
    pub fn spawn(&mut self) -> String {
        let log = self.dir.join("keeld.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
        let mut command = Command::new(env!("CARGO_BIN_EXE_keeld"));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child's own limits.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--import-dir")
            .arg(self.import_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--vmm")
            .arg(&self.vmm)
            .args(["--stop-timeout", "2", "--cpu-overcommit", "16", "-v"])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run keeld");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text[before.min(text.len())..].contains("keeld: serving") {
                return text[before..].to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "keeld did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The directory keeld may import host files from (`--import-dir`).
    pub fn import_dir(&self) -> PathBuf {
        self.dir.join("import")
    }

    /// The freestanding guest, copied into the import directory.
    pub fn guest_kernel(&self) -> PathBuf {
        let to = self.import_dir().join("guest.elf");
        if !to.exists() {
            std::fs::copy(keel_tests::freestanding::guest_elf(), &to).unwrap();
        }
        to
    }

    /// A user with `role` in `project` (no project when it is empty),
    /// logged in with `password`.
    pub fn user_with_password(
        &self,
        name: &str,
        password: &str,
        project: &str,
        role: &str,
    ) -> KeeldClient {
        let r = send(
            &self.admin,
            "POST",
            "/api/v1/users",
            Some(json!({"name": name, "password": password})),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        if !project.is_empty() {
            let r = send(
                &self.admin,
                "PUT",
                &format!("/api/v1/projects/{project}/members/{name}"),
                Some(json!({"role": role})),
            );
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let mut c = self.client();
        c.login(name, password)
            .unwrap_or_else(|e| panic!("{name} logs in: {e}"));
        c
    }

    /// A user with `role` in `project`, password [`USER_PASSWORD`].
    pub fn user(&self, name: &str, project: &str, role: &str) -> KeeldClient {
        self.user_with_password(name, USER_PASSWORD, project, role)
    }

    pub fn client(&self) -> KeeldClient {
        KeeldClient::new(&format!("http://127.0.0.1:{}", self.port)).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keeld.log")).unwrap_or_default()
    }

    /// An image whose "kernel" is the freestanding guest, ticking forever.
    pub fn tiny_image(&self, name: &str) -> Value {
        self.image_with(name, "keel.mode=tick")
    }

    pub fn image_with(&self, name: &str, cmdline: &str) -> Value {
        let disk = self.import_dir().join(format!("{name}.raw"));
        std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
        let kernel = self.guest_kernel();
        let reply = self
            .admin
            .post(
                "/api/v1/images",
                &json!({
                    "name": name,
                    "source": {"path": disk},
                    "boot": {
                        "kernel_path": kernel,
                        "cmdline": cmdline,
                    },
                }),
            )
            .unwrap();
        wait_op(&self.admin, &reply);
        self.admin.get(&format!("/api/v1/images/{name}")).unwrap()
    }

    pub fn create_vm(&self, client: &KeeldClient, body: Value) -> Value {
        let reply = client.post("/api/v1/vms", &body).unwrap();
        wait_op(client, &reply);
        client
            .get(&format!(
                "/api/v1/vms/{}",
                reply["vm"]["id"].as_str().unwrap()
            ))
            .unwrap()
    }

    pub fn vm(&self, id: &str) -> Value {
        self.admin.get(&format!("/api/v1/vms/{id}")).unwrap()
    }

    /// Waits for a VM's status.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let vm = self.vm(id);
            if vm["status"] == status {
                return vm;
            }
            assert!(
                start.elapsed() < timeout,
                "VM {id} is {} ({}), not {status}",
                vm["status"],
                vm["status_reason"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn serial(&self, vm: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("data/vms/{vm}/serial.log")))
            .unwrap_or_default()
    }

    /// The pid of the keel-vmm running VM `id`: the VMM writes it into the
    /// lock it holds in the VM's directory.
    pub fn vmm_pid(&self, id: &str) -> i32 {
        let lock = self.dir.join(format!("data/vms/{id}/vmm.lock"));
        let text = std::fs::read_to_string(&lock).unwrap_or_default();
        let pid = text.trim().parse().unwrap_or(0);
        assert!(pid > 0, "no keel-vmm pid in {}", lock.display());
        pid
    }

    /// The keel-vmm processes serving this keeld's VMs.
    pub fn vmm_pids(&self) -> Vec<i32> {
        let data = self.dir.join("data").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'));
            let cmd = String::from_utf8_lossy(&cmd);
            let argv0 = cmd.split('\0').next().unwrap_or("");
            if !zombie && argv0.ends_with("keel-vmm") && cmd.contains(&data) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stops keeld and starts it again (same data dir, same admin session)
    /// with these environment variables.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// A keeld started with RLIMIT_NOFILE (soft, hard): set up as
    /// [`Keeld::start_with`] does, then started again under that limit.
    pub fn start_with_nofile(name: &str, extra: &[&str], nofile: (u64, u64)) -> Keeld {
        let mut k = Self::start_with(name, extra);
        k.kill9();
        k.nofile = Some(nofile);
        k.spawn();
        k
    }
}

impl Drop for Keeld {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.vmm_pids() {
            // SAFETY: kill only sends a signal to this test's own VMMs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for the operation in a 202 answer; panics with its error if it
/// failed.
pub fn wait_op(client: &KeeldClient, reply: &Value) -> Value {
    let id = reply["operation"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no operation in {reply}"));
    client
        .wait_operation(id, Duration::from_secs(120), |_| {})
        .unwrap_or_else(|e| panic!("operation {id}: {e}"))
}

/// Waits for an operation and returns it whatever its outcome.
pub fn op_outcome(client: &KeeldClient, reply: &Value) -> Value {
    let id = reply["operation"]["id"].as_str().unwrap();
    let start = Instant::now();
    loop {
        let op = client
            .get(&format!("/api/v1/operations/{id}?wait=1"))
            .unwrap();
        if op["status"] != "running" || start.elapsed() > Duration::from_secs(120) {
            return op;
        }
    }
}

pub fn send(client: &KeeldClient, method: &str, path: &str, body: Option<Value>) -> Reply {
    client.send(method, path, body.as_ref(), &[]).unwrap()
}

pub fn ticks(serial: &str) -> usize {
    serial.lines().filter(|l| l.contains("TICK")).count()
}

/// Runs the `keel` CLI (built beside keeld) against this keeld with its own
/// config dir; returns (status, stdout, stderr).
pub fn keel_cli(k: &Keeld, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let keel = Path::new(env!("CARGO_BIN_EXE_keeld")).with_file_name("keel");
    assert!(
        keel.exists(),
        "the keel CLI is not built: run `cargo build --bins`"
    );
    let out = Command::new(keel)
        .args(args)
        .env("XDG_CONFIG_HOME", k.dir.join("cli-config"))
        .env("KEEL_SERVER", format!("http://127.0.0.1:{}", k.port))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run keel");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A console WebSocket, as tungstenite gives it.
pub type Console = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// Opens VM `id`'s console as `client`, its token in the header.
pub fn open_console(k: &Keeld, client: &KeeldClient, id: &str) -> Console {
    let url = format!("ws://127.0.0.1:{}/api/v1/vms/{id}/console", k.port);
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token().unwrap())
            .parse()
            .unwrap(),
    );
    tungstenite::connect(request).unwrap().0
}
