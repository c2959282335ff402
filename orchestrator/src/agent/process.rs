//! One keel-vmm process: how it is started, found again and talked to.
//!
//! Each VM's files live in `<data>/vms/<id>/`: `api.sock` (the VMM's API),
//! `events.jsonl` (its event monitor), `vmm.log` (its log and last words),
//! `serial.log` (everything the guest wrote to COM1) and `console.in` (a
//! FIFO the VMM reads as its terminal: the web console writes keys there).
//! The VMM runs in its own process group with none of keeld's descriptors
//! but one: `vmm.lock`, which keeld locks (flock) before it starts the VMM,
//! the VMM writes its pid into before exec, and the VMM holds until it
//! ends. So a VM dir has at most one keel-vmm, even across a `kill -9` of
//! keeld at any point of a start, and a new keeld finds every live one.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_api::client::{ClientError, VmmClient};

pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// The serial output before the last rotation ([`super::serial_log`]).
    pub fn serial_old(&self) -> PathBuf {
        self.dir.join("serial.log.1")
    }
    pub fn console_in(&self) -> PathBuf {
        self.dir.join("console.in")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
    /// Held (flock) by the VM's keel-vmm for its whole life; holds its pid.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("vmm.lock")
    }
}

/// The pid of the keel-vmm that holds the VM's lock, if one does (0 while
/// one is being started and has not written its pid yet).
pub fn lock_holder(files: &VmFiles) -> Option<i32> {
    let mut file = File::open(files.lock()).ok()?;
    // SAFETY: flock on a descriptor we own; a conflicting lock held by the
    // VMM's open file makes this fail with EWOULDBLOCK.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        // Free: nobody runs this VM. (Closing the file drops our lock.)
        return None;
    }
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    Some(text.trim().parse().unwrap_or(0))
}

/// A descriptor that refers to process `pid` for as long as it is open
/// (pidfd): signals through it never reach a process that reused the pid,
/// and it reads ready when the process ends.
pub fn pidfd(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process a pidfd refers to.
pub fn pidfd_signal(pidfd: &std::os::fd::OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for `pid`, registered with the runtime so it can be awaited.
pub fn watch_pid(pid: i32) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    let fd = pidfd(pid)?;
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and
    // the same descriptor) for as long as it lives.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Waits (without polling) until the process behind `pidfd` has ended.
pub async fn wait_pidfd(pidfd: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>) {
    // A pidfd reads ready once its process is gone; an error means the
    // same for our purpose.
    let _ = pidfd.readable().await;
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("Cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Another keel-vmm runs this VM (pid {pid}); stop it first")]
    Busy { pid: i32 },
    #[error("Cannot run {binary}")]
    Run {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("The VMM call panicked: {0}")]
    Panicked(String),
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> ProcessError {
    ProcessError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn mkfifo(path: &Path) -> Result<(), ProcessError> {
    if path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        io_err(
            "create the console FIFO",
            path,
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo reads only it.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io_err(
            "create the console FIFO",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The descriptor keel-vmm gets its API socket on.
const API_SOCKET_FD: i32 = 3;

/// The lowest descriptor number the VMM's copy of the lock may take (above
/// the API socket's 3, so moving that cannot close it).
const LOCK_FD_MIN: i32 = 10;

/// Writes `n` in decimal at the start of `fd`, truncating the rest, with
/// only async-signal-safe calls (it runs between fork and exec).
fn write_pid(fd: i32, n: i32) -> std::io::Result<()> {
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut n = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // SAFETY: plain syscalls on a descriptor the child owns and a stack
    // buffer that outlives them.
    unsafe {
        if libc::ftruncate(fd, 0) != 0
            || libc::pwrite(fd, digits[at..].as_ptr().cast(), digits.len() - at, 0) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts keel-vmm for a VM (empty: the VM comes with `vm.create`). Returns
/// the child, already in its own process group and holding the VM's lock.
/// Refuses when another keel-vmm holds it.
pub fn spawn(binary: &Path, files: &VmFiles) -> Result<std::process::Child, ProcessError> {
    std::fs::create_dir_all(&files.dir).map_err(|e| io_err("create", &files.dir, e))?;
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(files.lock())
        .map_err(|e| io_err("open", &files.lock(), e))?;
    let lock_fd = lock.as_raw_fd();
    // SAFETY: flock on the descriptor we just opened.
    if unsafe { libc::flock(lock_fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ProcessError::Busy {
            pid: lock_holder(files).unwrap_or(0),
        });
    }
    let _ = std::fs::remove_file(files.socket());
    File::create(files.events()).map_err(|e| io_err("create", &files.events(), e))?;
    mkfifo(&files.console_in())?;
    // Read-write, so the FIFO never reads as closed while writers come and
    // go (the web console, a restarted keeld).
    let stdin = OpenOptions::new()
        .read(true)
        .write(true)
        .open(files.console_in())
        .map_err(|e| io_err("open", &files.console_in(), e))?;
    let append = |path: PathBuf| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))
    };
    let serial = append(files.serial())?;
    let log = append(files.log())?;
    // keeld binds the API socket and hands it over (`fd=`): its first
    // request can go at once and waits in the backlog until the VMM serves
    // it, with no polling for the socket to appear. keeld's copy closes
    // when this returns, so a VMM that dies at start resets that request.
    let listener =
        UnixListener::bind(files.socket()).map_err(|e| io_err("bind", &files.socket(), e))?;
    // Like every file keeld makes: its own, 0600 (the umask gave 0700).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(files.socket(), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("chmod", &files.socket(), e))?;
    }
    let listener_fd = listener.as_raw_fd();
    let mut command = std::process::Command::new(binary);
    command
        .arg("--api-socket")
        .arg(format!("fd={API_SOCKET_FD}"))
        .arg("--event-monitor")
        .arg(format!("path={}", files.events().display()))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(serial))
        .stderr(Stdio::from(log))
        .process_group(0);
    // SAFETY: runs in the child between fork and exec, calling only
    // async-signal-safe functions on descriptors the child owns.
    unsafe {
        command.pre_exec(move || {
            // The VMM's own copy of the lock (F_DUPFD clears close-on-exec):
            // the lock lives as long as the VMM, whatever becomes of keeld.
            let held = libc::fcntl(lock_fd, libc::F_DUPFD, LOCK_FD_MIN);
            if held < 0 {
                return Err(std::io::Error::last_os_error());
            }
            write_pid(held, libc::getpid())?;
            let moved = if listener_fd == API_SOCKET_FD {
                // dup2 onto itself would leave close-on-exec set.
                libc::fcntl(listener_fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(listener_fd, API_SOCKET_FD)
            };
            if moved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ProcessError::Run {
        binary: binary.display().to_string(),
        source,
    });
    // keeld's copy closes here; the VMM's keeps the lock.
    drop(lock);
    child
}

/// The last thing keel-vmm said (its final error line, if it left one).
pub fn last_words(files: &VmFiles) -> String {
    let text = std::fs::read_to_string(files.log()).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.starts_with("keel-vmm:") || l.contains("ERROR"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

/// Runs `f` with a client connected to the VM's API socket, off the async
/// runtime (the client is blocking).
pub async fn with_client<T: Send + 'static>(
    socket: PathBuf,
    timeout: Duration,
    f: impl FnOnce(&mut VmmClient) -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ProcessError> {
    tokio::task::spawn_blocking(move || {
        let mut client = VmmClient::connect(&socket)?;
        client.set_timeout(Some(timeout))?;
        Ok(f(&mut client)?)
    })
    .await
    .map_err(|e| ProcessError::Panicked(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_holds_the_lock_with_its_pid_and_a_second_start_is_refused() {
        let dir = std::env::temp_dir().join(format!("keel-vmm-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = VmFiles { dir: dir.clone() };
        assert_eq!(lock_holder(&files), None, "no lock file: nobody");
        // A script that ignores its arguments and sleeps stands in for
        // keel-vmm.
        let script = dir.with_extension("sh");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // Another test forking while the script was being written can
        // hold it open a moment (ETXTBSY): try again then.
        let mut child = (0..100)
            .find_map(|_| match spawn(&script, &files) {
                Err(ProcessError::Run { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                }
                other => Some(other),
            })
            .unwrap()
            .unwrap();
        let pid = child.id() as i32;
        // The pid is written before exec, so it is there once spawn returns.
        assert_eq!(lock_holder(&files), Some(pid));
        let second = spawn(&script, &files).unwrap_err().to_string();
        assert!(second.contains(&format!("pid {pid}")), "{second}");
        let fd = pidfd(pid).unwrap();
        pidfd_signal(&fd, libc::SIGKILL).unwrap();
        child.wait().unwrap();
        // A probe's own lock can be held a moment longer by a process
        // another test forks meanwhile (until it execs): allow a second.
        let t0 = std::time::Instant::now();
        while lock_holder(&files).is_some() && t0.elapsed() < std::time::Duration::from_secs(1) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(lock_holder(&files), None, "the lock ends with the VMM");
        let mut again = spawn(&script, &files).unwrap();
        again.kill().unwrap();
        again.wait().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&script);
    }
}
