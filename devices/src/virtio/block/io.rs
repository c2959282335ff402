//! The disk image behind a virtio-blk device: opening and locking it, and
//! the two ways to move data — io_uring, or blocking calls on the worker
//! thread when io_uring is unavailable.
//!
//! Data moves straight between the file and guest memory (the iovecs point
//! into the guest's RAM mapping); nothing is copied through a bounce
//! buffer. With `direct=on` the image is opened with O_DIRECT, which needs
//! buffers and lengths aligned to the logical block size: requests that
//! are not (a guest may use 512-byte-aligned buffers on a host disk with
//! 4 KiB sectors) go through a second, buffered descriptor of the same
//! file instead of failing. The kernel keeps the two coherent.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::{IoUring, Probe, opcode};
use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::request::SECTOR_SIZE;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("Disk image {0} does not exist; check the path=… of --disk")]
    NotFound(PathBuf),
    #[error("Cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "Cannot open disk image {0} with direct=on: its filesystem does not support O_DIRECT; use direct=off"
    )]
    DirectUnsupported(PathBuf),
    #[error(
        "Disk image {path} is in use by another process (it holds a {held} lock on the file); stop that VM first, or open the disk with readonly=on in every VM that shares it"
    )]
    InUse { path: PathBuf, held: &'static str },
    #[error("Cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot find the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Disk image {0} is smaller than one 512-byte sector")]
    Empty(PathBuf),
    #[error(
        "Cannot resize disk image {path} to {bytes} bytes: it is {current} bytes; it can only grow, in multiples of 512, and not when read-only"
    )]
    BadResize {
        path: PathBuf,
        bytes: u64,
        current: u64,
    },
    #[error("Cannot grow disk image {path}")]
    Grow {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open, locked raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    /// With O_DIRECT: a buffered descriptor of the same file, for requests
    /// whose buffers O_DIRECT cannot take.
    buffered: Option<File>,
    path: PathBuf,
    /// Changes only when the image grows (`vm.resize-disk`).
    sectors: AtomicU64,
    read_only: bool,
}

impl DiskImage {
    /// Opens `path` (read-only or read-write, with O_DIRECT when `direct`)
    /// and takes an OFD lock on it: a write lock for read-write, a read
    /// lock for read-only, so that two VMs can share an image read-only but
    /// never write one another's.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        let open = |direct: bool| {
            let mut options = OpenOptions::new();
            options.read(true).write(!read_only);
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            options.open(path).map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => DiskError::NotFound(path.to_path_buf()),
                _ if direct && source.raw_os_error() == Some(libc::EINVAL) => {
                    DiskError::DirectUnsupported(path.to_path_buf())
                }
                _ => DiskError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })
        };
        let mut file = open(direct)?;
        lock(&file, path, read_only)?;
        let buffered = if direct { Some(open(false)?) } else { None };

        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes < SECTOR_SIZE {
            return Err(DiskError::Empty(path.to_path_buf()));
        }
        if bytes % SECTOR_SIZE != 0 {
            log::warn!(
                "Disk image {} is {bytes} bytes, not a multiple of 512; the guest sees the first {} bytes",
                path.display(),
                bytes / SECTOR_SIZE * SECTOR_SIZE
            );
        }
        Ok(DiskImage {
            file,
            buffered,
            path: path.to_path_buf(),
            sectors: AtomicU64::new(bytes / SECTOR_SIZE),
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Acquire)
    }

    /// Grows the image to `bytes`; requests see the new end from now on.
    pub fn grow(&self, bytes: u64) -> Result<(), DiskError> {
        let current = self.sectors() * SECTOR_SIZE;
        if self.read_only || bytes < current || !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadResize {
                path: self.path.clone(),
                bytes,
                current,
            });
        }
        self.file.set_len(bytes).map_err(|source| DiskError::Grow {
            path: self.path.clone(),
            source,
        })?;
        self.sectors.store(bytes / SECTOR_SIZE, Ordering::Release);
        Ok(())
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the image is opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// The descriptor to move `iovecs` at `offset` through: the O_DIRECT
    /// one when everything is aligned for it, else the buffered one.
    pub fn fd_for(&self, iovecs: &[libc::iovec], offset: u64) -> RawFd {
        match &self.buffered {
            Some(buffered) if !direct_aligned(iovecs, offset) => buffered.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        }
    }

    /// The descriptor that takes any alignment.
    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads the whole of `iovecs` from `offset`, blocking.
    pub fn read_sync(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.rw_sync(iovecs, offset, false)
    }

    /// Writes the whole of `iovecs` at `offset`, blocking.
    pub fn write_sync(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.rw_sync(iovecs, offset, true)
    }

    fn rw_sync(&self, iovecs: &mut [libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        let mut fd = self.fd_for(iovecs, offset);
        let mut offset = offset;
        let mut start = 0;
        while start < iovecs.len() {
            let iov = &iovecs[start..];
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let count = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
            // SAFETY: `iov` are valid iovecs over guest memory (checked by
            // `to_iovecs`) that outlive the call; the kernel only accesses
            // the ranges they describe.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), count, off)
                } else {
                    libc::preadv(fd, iov.as_ptr(), count, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    Some(libc::EINVAL) if fd != self.buffered_fd() => {
                        // O_DIRECT refused the alignment: use the buffered fd.
                        fd = self.buffered_fd();
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the disk image ended early (was it truncated?)",
                ));
            }
            let n = n as usize;
            offset += n as u64;
            start = advance_iovecs(iovecs, start, n);
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush_sync(&self) -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    /// A filesystem that cannot punch holes ignores the hint.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Zeroes `len` bytes at `offset`, deallocating them when `unmap`
    /// allows it; falls back to writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        self.write_zero_bytes(offset, len)
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let fd = self.buffered_fd();
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: ZEROS is a static buffer of at least n bytes.
            let done = unsafe { libc::pwrite(fd, ZEROS.as_ptr().cast(), n, off) };
            if done < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if done == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            offset += done as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Whether O_DIRECT can take these buffers at this offset (512-byte
/// alignment of addresses, lengths and offset; a host disk with larger
/// sectors refuses with EINVAL, and the request is retried buffered).
pub fn direct_aligned(iovecs: &[libc::iovec], offset: u64) -> bool {
    let mask = SECTOR_SIZE as usize - 1;
    offset.is_multiple_of(SECTOR_SIZE)
        && iovecs
            .iter()
            .all(|v| (v.iov_base as usize) & mask == 0 && v.iov_len & mask == 0)
}

/// Drops `n` transferred bytes from the front of `iovecs[start..]`,
/// shortening the first partly transferred vector; returns the index of
/// the first vector with bytes left.
pub fn advance_iovecs(iovecs: &mut [libc::iovec], mut start: usize, mut n: usize) -> usize {
    while start < iovecs.len() && n >= iovecs[start].iov_len {
        n -= iovecs[start].iov_len;
        start += 1;
    }
    if start < iovecs.len() && n > 0 {
        let v = &mut iovecs[start];
        // The pointer stays within the buffer: n < iov_len.
        v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
        v.iov_len -= n;
    }
    start
}

fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), DiskError> {
    // SAFETY: an all-zero flock is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file
    // SAFETY: `fl` is a valid flock for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            // Ask who holds it, to say which kind of lock is in the way.
            // SAFETY: as above.
            let mut probe: libc::flock = unsafe { std::mem::zeroed() };
            probe.l_type = libc::F_WRLCK as libc::c_short;
            probe.l_whence = libc::SEEK_SET as libc::c_short;
            // SAFETY: `probe` is a valid flock for the duration of the call.
            let got = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
            let held = if got == 0 && probe.l_type == libc::F_RDLCK as libc::c_short {
                "read"
            } else {
                "write"
            };
            Err(DiskError::InUse {
                path: path.to_path_buf(),
                held,
            })
        }
        _ => Err(DiskError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An io_uring with its completion eventfd.
pub struct Uring {
    pub ring: IoUring,
    pub eventfd: EventFd,
}

impl Uring {
    /// A ring of `entries` submission entries whose completions signal an
    /// eventfd; fails when the kernel lacks io_uring or the operations the
    /// device uses.
    ///
    /// The ring is made on a short-lived thread of its own: the kernel ties
    /// a ring to the task that creates it, and tearing the ring down later
    /// queues task work on that task, which makes its next interruptible
    /// system call fail with EINTR — KVM_CREATE_VM on the main thread after
    /// the startup probe, KVM_RUN on a vCPU thread that activated the disk.
    /// A thread that has exited takes that work with it.
    pub fn new(entries: u32) -> io::Result<Self> {
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("io_uring setup".into())
                .spawn_scoped(s, move || Uring::create(entries))
                .and_then(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(io::Error::other("io_uring setup panicked")))
                })
        })
    }

    fn create(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries.next_power_of_two().max(8))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for op in [
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
        ] {
            if !probe.is_supported(op) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks operation {op}"),
                ));
            }
        }
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring { ring, eventfd })
    }

    /// Whether this host can run the device on io_uring.
    pub fn probe() -> io::Result<()> {
        Uring::new(8).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn temp_image(name: &str, bytes: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keel-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0u8; bytes]).unwrap();
        path
    }

    #[test]
    fn missing_image_names_the_file() {
        let e = DiskImage::open(Path::new("/nonexistent/disk.img"), false, false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/disk.img") && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn a_second_writer_is_refused_with_a_clear_message() {
        let path = temp_image("lock-rw.img", 4096);
        let first = DiskImage::open(&path, false, false).unwrap();
        let e = DiskImage::open(&path, false, false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("in use by another process"), "{msg}");
        // A reader is refused too while a writer holds it.
        assert!(matches!(
            DiskImage::open(&path, true, false),
            Err(DiskError::InUse { .. })
        ));
        drop(first);
        // The lock goes with the file.
        DiskImage::open(&path, false, false).unwrap();
    }

    #[test]
    fn two_readers_share_an_image() {
        let path = temp_image("lock-ro.img", 4096);
        let a = DiskImage::open(&path, true, false).unwrap();
        let b = DiskImage::open(&path, true, false).unwrap();
        assert!(a.read_only() && b.read_only());
        let e = DiskImage::open(&path, false, false).unwrap_err();
        assert!(e.to_string().contains("read lock"), "{e}");
    }

    #[test]
    fn capacity_rounds_down_and_tiny_images_are_refused() {
        let path = temp_image("odd.img", 4096 + 100);
        assert_eq!(DiskImage::open(&path, true, false).unwrap().sectors(), 8);
        let path = temp_image("tiny.img", 100);
        assert!(matches!(
            DiskImage::open(&path, true, false),
            Err(DiskError::Empty(_))
        ));
    }

    #[test]
    fn advance_iovecs_skips_and_trims() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut v = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        assert_eq!(advance_iovecs(&mut v, 0, 3), 0);
        assert_eq!(v[0].iov_len, 5);
        assert_eq!(advance_iovecs(&mut v, 0, 5), 1);
        assert_eq!(advance_iovecs(&mut v, 1, 8), 2);
    }

    #[test]
    fn sync_io_round_trips_and_zeroes() {
        let path = temp_image("sync.img", 64 * 1024);
        let disk = DiskImage::open(&path, false, false).unwrap();
        let mut data = vec![0xabu8; 4096];
        let mut iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        disk.write_sync(&mut iov, 8192).unwrap();
        disk.flush_sync().unwrap();
        let mut back = vec![0u8; 4096];
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        disk.read_sync(&mut iov, 8192).unwrap();
        assert_eq!(back, data);
        disk.write_zeroes(8192, 1024, false).unwrap();
        disk.discard(9216, 1024).unwrap();
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        disk.read_sync(&mut iov, 8192).unwrap();
        assert!(back[..2048].iter().all(|&b| b == 0));
        assert!(back[2048..].iter().all(|&b| b == 0xab));
        // Reading past the end fails instead of returning short.
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        assert!(disk.read_sync(&mut iov, 62 * 1024).is_err());
    }
}
