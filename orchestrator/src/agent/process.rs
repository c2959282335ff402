//! One keel-vmm process: how it is started, found again and talked to.
//!
//! Each VM's files live in `<data>/vms/<id>/`: `api.sock` (the VMM's API),
//! `events.jsonl` (its event monitor), `vmm.log` (its log and last words),
//! `serial.log` (everything the guest wrote to COM1) and `console.in` (a
//! FIFO the VMM reads as its terminal: the web console writes keys there).
//! The VMM runs in its own process group with none of keeld's descriptors,
//! so it outlives keeld; a new keeld finds it again by pid and start time.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_api::client::{ClientError, VmmClient};

use crate::model::VmmProcess;

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
    /// The serial output before the last rotation ([`rotate_serial`]).
    pub fn serial_old(&self) -> PathBuf {
        self.dir.join("serial.log.1")
    }
    pub fn console_in(&self) -> PathBuf {
        self.dir.join("console.in")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("Cannot {what} {}: {e}", path.display())
}

fn mkfifo(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("Bad path {}", path.display()))?;
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

/// Rotates `serial.log` when it is over `max` bytes (to `serial.log.1`, so a
/// chatty guest cannot fill the disk). keel-vmm holds it open
/// with O_APPEND, so the file is copied and then truncated in place (its
/// next write lands at offset 0, no hole); what it writes between the two
/// steps is lost, a few bytes at most. Returns whether it rotated.
pub fn rotate_serial(files: &VmFiles, max: u64) -> std::io::Result<bool> {
    let path = files.serial();
    match std::fs::metadata(&path) {
        Ok(m) if m.len() > max => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    // Copied beside, then renamed: a reader (the console, the API's tail)
    // never sees a half-copied serial.log.1.
    let old = files.serial_old();
    let mut copying = old.clone().into_os_string();
    copying.push(".tmp");
    std::fs::copy(&path, &copying)?;
    std::fs::rename(&copying, &old)?;
    OpenOptions::new().write(true).open(&path)?.set_len(0)?;
    Ok(true)
}

/// The last `len` bytes of the VM's serial output, across the last
/// rotation.
pub fn serial_tail(files: &VmFiles, len: u64) -> Vec<u8> {
    let (current, _) = tail(&files.serial(), len);
    let missing = len.saturating_sub(current.len() as u64);
    if missing == 0 {
        return current;
    }
    let (mut out, _) = tail(&files.serial_old(), missing);
    out.extend_from_slice(&current);
    out
}

/// The last `len` bytes of a file, and the length it had.
pub fn tail(path: &Path, len: u64) -> (Vec<u8>, u64) {
    let Ok(mut file) = File::open(path) else {
        return (Vec::new(), 0);
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = size.saturating_sub(len);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_ok() {
        let _ = file.take(size - from).read_to_end(&mut buf);
    }
    (buf, size)
}

/// The descriptor keel-vmm gets its API socket on.
const API_SOCKET_FD: i32 = 3;

/// Starts keel-vmm for a VM (empty: the VM comes with `vm.create`). Returns
/// the child, already in its own process group.
pub fn spawn(binary: &Path, files: &VmFiles) -> Result<std::process::Child, String> {
    std::fs::create_dir_all(&files.dir).map_err(|e| io_err("create", &files.dir, e))?;
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
    command
        .spawn()
        .map_err(|e| format!("Cannot run {}: {e}", binary.display()))
}

/// The start time of a process in clock ticks since boot (field 22 of
/// /proc/PID/stat), or None when there is no such (live) process.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3); a zombie is as good as gone.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The child's exit status, if it exits within `grace`.
pub async fn exited_within(
    child: &mut std::process::Child,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the recorded process is still the VM's keel-vmm.
pub fn alive(process: &VmmProcess) -> bool {
    start_ticks(process.pid) == Some(process.start_ticks)
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
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        let mut client = VmmClient::connect(&socket).map_err(|e| e.to_string())?;
        client
            .set_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        f(&mut client).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("The VMM call panicked: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn serial_log_rotates_in_place_and_the_tail_spans_both_files() {
        let dir = std::env::temp_dir().join(format!("keel-serial-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = VmFiles { dir: dir.clone() };
        // Opened as keel-vmm's stdout is: append, held across the rotation.
        let mut vmm = OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.serial())
            .unwrap();
        vmm.write_all(b"0123456789").unwrap();
        assert!(!rotate_serial(&files, 10).unwrap(), "at the limit: kept");
        vmm.write_all(b"abcdef").unwrap();
        assert!(rotate_serial(&files, 10).unwrap());
        assert_eq!(
            std::fs::read(files.serial_old()).unwrap(),
            b"0123456789abcdef"
        );
        vmm.write_all(b"XYZ").unwrap();
        // No hole: the next write went to the start of the emptied file.
        assert_eq!(std::fs::read(files.serial()).unwrap(), b"XYZ");
        assert_eq!(serial_tail(&files, 6), b"defXYZ");
        assert_eq!(serial_tail(&files, 2), b"YZ");
        assert_eq!(serial_tail(&files, 100), b"0123456789abcdefXYZ");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_start_ticks_are_stable_and_a_dead_pid_has_none() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).unwrap();
        assert_eq!(start_ticks(me), Some(t));
        assert!(alive(&VmmProcess {
            pid: me,
            start_ticks: t,
            ..Default::default()
        }));
        assert!(!alive(&VmmProcess {
            pid: me,
            start_ticks: t + 1,
            ..Default::default()
        }));
        assert_eq!(start_ticks(i32::MAX), None);
    }
}
