//! Host files a system admin names in a request (an image to import, a
//! kernel to boot), opened so that nothing else can be reached through them.
//!
//! A path is allowed only inside an import directory (`keeld serve
//! --import-dir`), written plainly (absolute, no `.` or `..`), never under
//! `/proc`, `/sys`, `/dev` or keeld's data dir, and it is opened one
//! component at a time from the import directory with `O_NOFOLLOW`, so no
//! symbolic link anywhere on the way is followed. What is opened must be a
//! regular file. The file handle, not the path, goes on to the import, so
//! the file cannot be swapped after the check.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Trees no import may read from, whatever the import directories are.
const NEVER: [&str; 3] = ["/proc", "/sys", "/dev"];

#[derive(Debug, Error)]
pub enum HostFileError {
    /// Says nothing about whether the file exists.
    #[error(
        "{what} {path}: not allowed: host paths must be plain absolute paths inside an import \
         directory (keeld serve --import-dir), not under /proc, /sys, /dev or keeld's data \
         dir, with no symbolic links; otherwise upload the file or give a URL"
    )]
    NotAllowed { what: String, path: String },
    #[error("{what} {path}: not allowed: a symbolic link on the way (links are never followed)")]
    Symlink { what: String, path: String },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: String, path: String },
    #[error("Cannot open {what} {path}")]
    Open {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where host files may come from.
#[derive(Clone, Debug, Default)]
pub struct ImportRoots {
    /// Canonical import directories.
    dirs: Vec<PathBuf>,
    /// Canonical trees never read: keeld's data dir.
    denied: Vec<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ImportDirError {
    #[error("--import-dir {path}: {source}")]
    Missing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--import-dir {path} lies under {under}, which keeld never imports from")]
    Denied { path: String, under: String },
}

impl ImportRoots {
    /// Checks the configured directories once at start.
    pub fn new(dirs: &[PathBuf], data_dir: &Path) -> Result<Self, ImportDirError> {
        let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let mut out = ImportRoots {
            dirs: Vec::new(),
            denied: vec![data],
        };
        for dir in dirs {
            let canon = std::fs::canonicalize(dir).map_err(|source| ImportDirError::Missing {
                path: dir.display().to_string(),
                source,
            })?;
            if let Some(under) = out.denied_root(&canon) {
                return Err(ImportDirError::Denied {
                    path: dir.display().to_string(),
                    under: under.display().to_string(),
                });
            }
            out.dirs.push(canon);
        }
        Ok(out)
    }

    fn denied_root(&self, path: &Path) -> Option<PathBuf> {
        NEVER
            .iter()
            .map(PathBuf::from)
            .chain(self.denied.iter().cloned())
            .find(|root| path.starts_with(root))
    }

    /// Opens `path` for reading under the rules above. `what` names the
    /// field in errors (`source.path`).
    pub fn open(&self, what: &str, path: &Path) -> Result<File, HostFileError> {
        let not_allowed = || HostFileError::NotAllowed {
            what: what.to_string(),
            path: path.display().to_string(),
        };
        // Components() would drop a `.`: look at the bytes themselves.
        let plain = path.is_absolute()
            && path
                .as_os_str()
                .as_bytes()
                .split(|&b| b == b'/')
                .all(|name| name != b"." && name != b"..");
        if !plain || self.denied_root(path).is_some() {
            return Err(not_allowed());
        }
        let Some((root, rest)) = self
            .dirs
            .iter()
            .find_map(|d| path.strip_prefix(d).ok().map(|rest| (d, rest)))
        else {
            return Err(not_allowed());
        };
        let names: Vec<&std::ffi::OsStr> = rest.iter().collect();
        let Some((last, dirs)) = names.split_last() else {
            return Err(not_allowed());
        };
        let io = |source: std::io::Error| match source.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => HostFileError::Symlink {
                what: what.to_string(),
                path: path.display().to_string(),
            },
            _ => HostFileError::Open {
                what: what.to_string(),
                path: path.display().to_string(),
                source,
            },
        };
        let mut dir = open_at(None, root.as_os_str(), libc::O_DIRECTORY).map_err(io)?;
        for name in dirs {
            dir = open_at(Some(&dir), name, libc::O_DIRECTORY | libc::O_NOFOLLOW).map_err(io)?;
        }
        // O_NONBLOCK: a FIFO put there must not hang the open.
        let fd = open_at(Some(&dir), last, libc::O_NOFOLLOW | libc::O_NONBLOCK).map_err(io)?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(HostFileError::NotAFile {
                what: what.to_string(),
                path: path.display().to_string(),
            });
        }
        Ok(file)
    }
}

fn open_at(
    dir: Option<&OwnedFd>,
    name: &std::ffi::OsStr,
    flags: libc::c_int,
) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let c = CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a valid NUL-terminated name and `at` an open directory
    // fd (or AT_FDCWD); openat returns a new fd that we own.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags | libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(name: &str) -> (PathBuf, ImportRoots) {
        let d = std::env::temp_dir().join(format!("keel-hostfiles-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("import/sub")).unwrap();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::write(d.join("import/sub/disk.raw"), b"disk").unwrap();
        std::fs::write(d.join("secret"), b"secret").unwrap();
        std::fs::write(d.join("data/keel.db"), b"db").unwrap();
        let roots = ImportRoots::new(&[d.join("import")], &d.join("data")).unwrap();
        let d = std::fs::canonicalize(d).unwrap();
        (d, roots)
    }

    #[test]
    fn only_plain_paths_inside_an_import_dir_open() {
        let (d, roots) = setup("plain");
        let mut f = roots.open("p", &d.join("import/sub/disk.raw")).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "disk");
        for bad in [
            d.join("secret"),
            d.join("import/../secret"),
            d.join("import/./sub/disk.raw"),
            PathBuf::from("import/sub/disk.raw"),
            PathBuf::from("/etc/shadow"),
            PathBuf::from("/proc/self/environ"),
            d.join("data/keel.db"),
        ] {
            let e = roots.open("p", &bad).unwrap_err();
            assert!(
                matches!(e, HostFileError::NotAllowed { .. }),
                "{bad:?}: {e}"
            );
        }
        // Whether a file outside exists is not told.
        let a = roots.open("p", &d.join("secret")).unwrap_err().to_string();
        let b = roots.open("p", &d.join("nothing")).unwrap_err().to_string();
        assert_eq!(a.replace("secret", "X"), b.replace("nothing", "X"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn links_are_never_followed() {
        let (d, roots) = setup("links");
        std::os::unix::fs::symlink(d.join("secret"), d.join("import/link")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("import/dirlink")).unwrap();
        let e = roots.open("p", &d.join("import/link")).unwrap_err();
        assert!(matches!(e, HostFileError::Symlink { .. }), "{e}");
        let e = roots
            .open("p", &d.join("import/dirlink/secret"))
            .unwrap_err();
        assert!(matches!(e, HostFileError::Symlink { .. }), "{e}");
        // A directory or a FIFO is not an image.
        assert!(matches!(
            roots.open("p", &d.join("import/sub")).unwrap_err(),
            HostFileError::NotAFile { .. }
        ));
        let fifo = CString::new(d.join("import/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path for mkfifo.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            roots.open("p", &d.join("import/fifo")).unwrap_err(),
            HostFileError::NotAFile { .. }
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn import_dirs_inside_denied_trees_are_refused() {
        let (d, _) = setup("denied");
        assert!(ImportRoots::new(&[PathBuf::from("/proc")], &d.join("data")).is_err());
        assert!(ImportRoots::new(&[d.join("data")], &d.join("data")).is_err());
        assert!(ImportRoots::new(&[d.join("missing")], &d.join("data")).is_err());
        // `/` is allowed as a root, but /proc and the data dir stay closed.
        let roots = ImportRoots::new(&[PathBuf::from("/")], &d.join("data")).unwrap();
        assert!(roots.open("p", Path::new("/proc/self/status")).is_err());
        assert!(roots.open("p", &d.join("data/keel.db")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
