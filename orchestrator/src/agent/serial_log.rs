//! A VM's serial output on disk: `serial.log`, which keel-vmm appends to
//! (its stdout, O_APPEND), rotated into `serial.log.1` so a chatty guest
//! cannot fill the disk, and read back across rotations.
//!
//! Rotation loses and repeats nothing: the head of `serial.log` (whole
//! filesystem blocks) is copied to `serial.log.1`, then cut from the live
//! file with `FALLOC_FL_COLLAPSE_RANGE`, which the kernel orders against
//! the VMM's appends, so every byte is in exactly one of the two files.
//! Readers in this process take a shared lock that rotation takes
//! exclusively, and count positions from the first byte ever written
//! (`base`: the bytes cut so far), so a console session follows the output
//! across any rotation it is not two rotations behind.
//! Where the filesystem cannot collapse ranges (tmpfs), rotation copies and
//! truncates instead, and what the VMM writes between the two is lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, RwLock};

use super::process::VmFiles;

/// Per VM dir: the bytes cut from the head of its serial.log so far.
static BASES: LazyLock<RwLock<HashMap<PathBuf, u64>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

fn base(files: &VmFiles, bases: &HashMap<PathBuf, u64>) -> u64 {
    bases.get(&files.dir).copied().unwrap_or(0)
}

/// Forgets a VM dir that is being removed.
pub fn forget(files: &VmFiles) {
    BASES
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&files.dir);
}

/// Rotates `serial.log` when it is over `max` bytes. Returns whether it
/// rotated.
pub fn rotate(files: &VmFiles, max: u64) -> std::io::Result<bool> {
    let path = files.serial();
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if meta.len() <= max {
        return Ok(false);
    }
    let mut bases = BASES.write().unwrap_or_else(|p| p.into_inner());
    let size = file.metadata()?.len();
    // Whole blocks, and short of the end (the kernel requires both).
    let block = meta.blksize().max(512);
    let cut = (size - 1) / block * block;
    if cut == 0 {
        return Ok(false);
    }
    copy_head(&file, cut, &files.serial_old())?;
    // SAFETY: fallocate on our own descriptor; no memory is passed.
    let collapsed = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_COLLAPSE_RANGE,
            0,
            cut as libc::off_t,
        )
    } == 0;
    let cut = if collapsed {
        cut
    } else {
        // No collapse here: copy all and start the file afresh.
        copy_head(&file, size, &files.serial_old())?;
        file.set_len(0)?;
        size
    };
    *bases.entry(files.dir.clone()).or_insert(0) += cut;
    Ok(true)
}

/// Writes the first `len` bytes of `file` to `to`, through a copy beside
/// it and a rename, so nobody sees it half written.
fn copy_head(file: &File, len: u64, to: &Path) -> std::io::Result<()> {
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let mut src = file.try_clone()?;
    src.seek(SeekFrom::Start(0))?;
    let copied = std::io::copy(&mut src.take(len), &mut out)?;
    if copied != len {
        return Err(std::io::Error::other(format!(
            "serial.log shrank while it was rotated ({copied} of {len} bytes)"
        )));
    }
    std::fs::rename(&tmp, to)
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

/// Bytes `[from, to)` of a file (fewer if it is shorter).
fn range(path: &Path, from: u64, to: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = file.take(to.saturating_sub(from)).read_to_end(&mut buf);
    }
    buf
}

/// The last `len` bytes of the VM's serial output, across the last
/// rotation.
pub fn serial_tail(files: &VmFiles, len: u64) -> Vec<u8> {
    let _reading = BASES.read().unwrap_or_else(|p| p.into_inner());
    let size = std::fs::metadata(files.serial()).map_or(0, |m| m.len());
    tail_ending_at(files, size, len)
}

/// The `len` bytes before offset `end` of serial.log, reaching back into
/// serial.log.1 when serial.log is shorter (with rotation held off).
fn tail_ending_at(files: &VmFiles, end: u64, len: u64) -> Vec<u8> {
    let current = range(&files.serial(), end.saturating_sub(len), end);
    let missing = len.saturating_sub(current.len() as u64);
    if missing == 0 {
        return current;
    }
    let (mut out, _) = tail(&files.serial_old(), missing);
    out.extend_from_slice(&current);
    out
}

/// Follows the serial output from a position, across rotations.
pub struct Reader {
    files: VmFiles,
    /// The next byte to read, counted from the first ever written.
    at: u64,
}

impl Reader {
    /// A reader positioned `backlog` bytes before the end; returns those
    /// bytes too.
    pub fn new(files: VmFiles, backlog: u64) -> (Reader, Vec<u8>) {
        let bases = BASES.read().unwrap_or_else(|p| p.into_inner());
        let base = base(&files, &bases);
        let size = std::fs::metadata(files.serial()).map_or(0, |m| m.len());
        let out = tail_ending_at(&files, size, backlog);
        drop(bases);
        (
            Reader {
                files,
                at: base + size,
            },
            out,
        )
    }

    /// What was written since the last call.
    pub fn poll(&mut self) -> Vec<u8> {
        let bases = BASES.read().unwrap_or_else(|p| p.into_inner());
        let base = base(&self.files, &bases);
        let mut out = Vec::new();
        if self.at < base {
            // Rotated since: the rest of what we had not read is at the
            // end of serial.log.1, which holds [base - its length, base).
            let old = self.files.serial_old();
            let old_len = std::fs::metadata(&old).map_or(0, |m| m.len());
            let old_start = base.saturating_sub(old_len);
            let from = self.at.max(old_start) - old_start;
            out = range(&old, from, old_len);
            self.at = base;
        }
        let size = std::fs::metadata(self.files.serial()).map_or(0, |m| m.len());
        let from = self.at - base;
        if size > from {
            out.extend(range(&self.files.serial(), from, size));
        }
        self.at = base + size.max(from);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn vm_files(name: &str) -> VmFiles {
        let dir = std::env::temp_dir().join(format!("keel-serial-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        VmFiles { dir }
    }

    /// A guest writing as fast as it can while the log rotates over and
    /// over: the reader gets every line once, in order, and the two files
    /// hold the newest output with nothing missing between them.
    #[test]
    fn nothing_is_lost_or_repeated_across_rotations_under_load() {
        let files = vm_files("load");
        let stop = Arc::new(AtomicBool::new(false));
        let mut vmm = OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.serial())
            .unwrap();
        let (reader, backlog) = Reader::new(
            VmFiles {
                dir: files.dir.clone(),
            },
            1 << 20,
        );
        assert!(backlog.is_empty());
        let mut reader = reader;
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // One write per line, as the VMM's serial port does.
                    vmm.write_all(format!("line {n:08}\n").as_bytes()).unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut got = Vec::new();
        let mut rotations = 0;
        while rotations < 200 {
            if rotate(&files, 16 << 10).unwrap() {
                rotations += 1;
            }
            got.extend(reader.poll());
        }
        stop.store(true, Ordering::Relaxed);
        let lines = writer.join().unwrap();
        got.extend(reader.poll());
        let text = String::from_utf8(got).unwrap();
        let mut expected = 0u64;
        for line in text.lines() {
            assert_eq!(line, format!("line {expected:08}"), "after line {expected}");
            expected += 1;
        }
        assert_eq!(expected, lines, "every line written was read");
        // The files: serial.log.1 then serial.log continue each other (the
        // cut is block-aligned, so the oldest line kept may be partial).
        let both = serial_tail(&files, u64::MAX);
        let both = String::from_utf8(both).unwrap();
        let mut kept = both.lines().skip(1);
        let first: u64 = kept.next().unwrap()[5..].parse().unwrap();
        let mut count = 1;
        for (i, line) in kept.enumerate() {
            assert_eq!(line, format!("line {:08}", first + 1 + i as u64));
            count += 1;
        }
        assert_eq!(first + count, lines, "the files end with the last line");
        std::fs::remove_dir_all(&files.dir).unwrap();
    }

    #[test]
    fn small_logs_are_kept_and_the_tail_spans_both_files() {
        let files = vm_files("small");
        let mut vmm = OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.serial())
            .unwrap();
        vmm.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate(&files, 100).unwrap(), "at the limit: kept");
        let block = std::fs::metadata(files.serial()).unwrap().blksize();
        vmm.write_all(&vec![b'b'; block as usize + 50]).unwrap();
        assert!(rotate(&files, 100).unwrap());
        let old = std::fs::read(files.serial_old()).unwrap();
        let live = std::fs::read(files.serial()).unwrap();
        assert_eq!(old.len() + live.len(), 150 + block as usize);
        vmm.write_all(b"XYZ").unwrap();
        assert!(std::fs::read(files.serial()).unwrap().ends_with(b"bbXYZ"));
        assert_eq!(serial_tail(&files, 5), b"bbXYZ");
        let all = serial_tail(&files, u64::MAX);
        assert_eq!(&all[..100], &[b'a'; 100][..]);
        assert!(all.ends_with(b"bXYZ"));
        std::fs::remove_dir_all(&files.dir).unwrap();
    }
}
