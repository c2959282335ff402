//! Disk image files: thin copies, blank sparse files, growth.
//!
//! A thin copy is a reflink (`FICLONE`: instant, shares blocks on btrfs and
//! XFS) where the filesystem can, else a sparse copy that skips the source's
//! holes (`SEEK_DATA`/`SEEK_HOLE`), so a 20 GiB image with 1 GiB of data
//! costs 1 GiB and the time to copy it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FileError {
    #[error("Cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot copy {from} to {to}")]
    Copy {
        from: String,
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot resize {path} to {size} bytes")]
    Resize {
        path: String,
        size: u64,
        #[source]
        source: io::Error,
    },
}

const FICLONE: libc::c_ulong = 0x4004_9409;
const CHUNK: usize = 1 << 20;

/// Creates `to` (which must not exist) as a thin copy of `from`, calling
/// `progress(done, total)` as bytes are copied (never for a reflink).
pub fn thin_copy(
    from: &Path,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), FileError> {
    let copy_err = |source| FileError::Copy {
        from: from.display().to_string(),
        to: to.display().to_string(),
        source,
    };
    let src = File::open(from).map_err(|source| FileError::Open {
        path: from.display().to_string(),
        source,
    })?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|source| FileError::Open {
            path: to.display().to_string(),
            source,
        })?;
    // SAFETY: FICLONE takes the source fd as its argument and touches no
    // memory of ours; both fds are open for the duration of the call.
    let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0;
    if cloned {
        return Ok(());
    }
    let total = src.metadata().map_err(copy_err)?.len();
    sparse_copy(&src, &dst, total, &mut progress).map_err(copy_err)?;
    dst.set_len(total).map_err(copy_err)?;
    dst.sync_all().map_err(copy_err)
}

fn seek_data(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own; no memory is involved.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

fn sparse_copy(
    src: &File,
    dst: &File,
    total: u64,
    progress: &mut impl FnMut(u64, u64),
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < total {
        let Some(data) = seek_data(src, at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek_data(src, data, libc::SEEK_HOLE)?.unwrap_or(total);
        let mut pos = data;
        while pos < hole {
            let want = ((hole - pos) as usize).min(CHUNK);
            let n = src.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                break;
            }
            // Zero blocks inside a data extent stay holes in the copy.
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], pos)?;
            }
            pos += n as u64;
            progress(pos, total);
        }
        at = hole;
    }
    progress(total, total);
    Ok(())
}

/// Creates an empty (sparse) file of `size` bytes; `to` must not exist.
/// A size the file system refuses leaves no file behind.
pub fn create_blank(to: &Path, size: u64) -> Result<(), FileError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|source| FileError::Open {
            path: to.display().to_string(),
            source,
        })?;
    file.set_len(size).map_err(|source| {
        let _ = std::fs::remove_file(to);
        FileError::Resize {
            path: to.display().to_string(),
            size,
            source,
        }
    })
}

/// An error and its causes on one line (shared by every Keel binary).
pub use keel_api::error_chain as chain;

/// Grows a file to `size` bytes (the new part reads as zeros).
pub fn grow(path: &Path, size: u64) -> Result<(), FileError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| FileError::Open {
            path: path.display().to_string(),
            source,
        })?;
    file.set_len(size).map_err(|source| FileError::Resize {
        path: path.display().to_string(),
        size,
        source,
    })
}

/// Bytes the file really occupies on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Reads a whole small file's first bytes (format sniffing).
pub fn read_head(path: &Path, len: usize) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Makes a tree keeld's alone: directories 0700, everything else 0600
/// (what an older keeld or a wider umask left is tightened at start).
/// Symbolic links are left alone, never followed.
pub fn restrict_tree(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.permissions().mode() & 0o7777 != want {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(root)? {
            restrict_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// Appends nothing but moves to the end: for tailing logs.
pub fn len_of(file: &mut File) -> io::Result<u64> {
    file.seek(SeekFrom::End(0))
}

/// (size, available) of the filesystem holding `path`, in bytes.
pub fn disk_space(path: &Path) -> (u64, u64) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keel-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn thin_copy_keeps_data_and_holes() {
        let d = tmpdir("copy");
        let src = d.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst = d.join("dst");
        let mut calls = 0;
        thin_copy(&src, &dst, |_, _| calls += 1).unwrap();
        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len(), 64 << 20);
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[out.len() - 4..], b"tail");
        assert!(out[4..out.len() - 4].iter().all(|&b| b == 0));
        // Sparse: far less than 64 MiB allocated (a reflink allocates nothing).
        assert!(allocated_bytes(&dst) < 8 << 20, "{}", allocated_bytes(&dst));
        // The target must not exist.
        assert!(thin_copy(&src, &dst, |_, _| {}).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn blank_and_grow() {
        let d = tmpdir("blank");
        let p = d.join("disk");
        create_blank(&p, 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        assert!(allocated_bytes(&p) < 1 << 20);
        grow(&p, 2 << 30).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30);
        assert!(create_blank(&p, 1).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
