//! Host TAP devices: opening or creating them through `/dev/net/tun`,
//! the virtio-net header and offload settings, and the host side's
//! IPv4 address.
//!
//! Every queue pair gets its own fd on the same interface (IFF_MULTI_QUEUE
//! when there is more than one pair). The fds are non-blocking: the queue
//! workers poll them and never block.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header every frame
/// carries between Keel and the tap.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, Error)]
pub enum TapError {
    #[error(
        "Cannot open {TUN_PATH} for tap {tap}: load the tun module (modprobe tun) and run keel-vmm with CAP_NET_ADMIN or as root"
    )]
    OpenTun {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot attach to or create tap {tap}: {hint}")]
    SetIff {
        tap: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("Tap {tap}: the kernel refused {what}")]
    Ioctl {
        tap: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Tap {tap}: cannot open an AF_INET socket to configure the interface")]
    Socket {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("Tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/')")]
    Name(String),
    #[error(
        "The file descriptor passed for a tap is not a TAP opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR ({0}); open it that way (as for Cloud Hypervisor)"
    )]
    NotATap(String),
}

/// One fd on a TAP interface (one queue of a multi-queue tap).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) || bytes.contains(&b'/') {
        return Err(TapError::Name(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs an ioctl that takes a pointer argument.
///
/// # Safety
/// `arg` must be the type the ioctl `request` expects on `fd`.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` matches `request`.
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why TUNSETIFF on `name` failed, and what to do about it.
fn set_iff_hint(name: &str, multi_queue: bool, err: &io::Error) -> String {
    let wanted = if multi_queue {
        "mode tap vnet_hdr multi_queue"
    } else {
        "mode tap vnet_hdr"
    };
    let sys = std::path::Path::new("/sys/class/net").join(name);
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            return "permission denied; run keel-vmm with CAP_NET_ADMIN or as the tap's owner"
                .into();
        }
        Some(libc::EBUSY) => {
            return "it is in use by another process (a single-queue tap has one user)".into();
        }
        _ => {}
    }
    if !sys.exists() {
        return "the kernel would not create it; check CAP_NET_ADMIN".into();
    }
    let Ok(flags) = std::fs::read_to_string(sys.join("tun_flags")) else {
        return "an interface of that name exists and is not a TAP; give a TAP's name or a new name"
            .into();
    };
    let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    let kind = if flags & i64::from(libc::IFF_TAP) == 0 {
        "a TUN (layer 3) device"
    } else if flags & i64::from(libc::IFF_MULTI_QUEUE) != 0 {
        "a multi-queue TAP"
    } else {
        "a single-queue TAP"
    };
    format!(
        "it exists as {kind}; recreate it with `ip tuntap add {name} {wanted}` or give another name"
    )
}

impl Tap {
    /// Opens the tap `name` (created when it does not exist) or, with no
    /// name, creates one the kernel names from `keel%d`. `multi_queue` asks
    /// for IFF_MULTI_QUEUE so several fds can share the interface.
    pub fn open(name: Option<&str>, multi_queue: bool) -> Result<Tap, TapError> {
        let shown = name.unwrap_or("keel%d").to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                tap: shown.clone(),
                source,
            })?;
        let mut req = ifreq_for(&shown)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF takes a struct ifreq, which `req` is.
        unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req) }.map_err(|source| {
            TapError::SetIff {
                tap: shown.clone(),
                hint: set_iff_hint(&shown, multi_queue, &source),
                source,
            }
        })?;
        let tap = Tap {
            file,
            name: name_of(&req),
        };
        let mut size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
        unsafe { ioctl_ptr(tap.fd(), libc::TUNSETVNETHDRSZ, &mut size) }
            .map_err(|e| tap.ioctl_error("the virtio-net header size (TUNSETVNETHDRSZ)", e))?;
        // No offloads until the driver accepts some.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Takes a tap queue someone else opened and passed us (`vm.add-net`
    /// with SCM_RIGHTS): it must be a TAP with a virtio-net header.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills a struct ifreq, which `req` is.
        unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNGETIFF, &mut req) }
            .map_err(|e| TapError::NotATap(e.to_string()))?;
        // SAFETY: TUNGETIFF set the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted {
            return Err(TapError::NotATap(format!("its flags are {flags:#x}")));
        }
        // SAFETY: fcntl on the fd we now own.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above, with the flags just read.
        if fl < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0
        {
            return Err(TapError::NotATap(io::Error::last_os_error().to_string()));
        }
        let tap = Tap {
            file,
            name: name_of(&req),
        };
        let mut size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
        unsafe { ioctl_ptr(tap.fd(), libc::TUNSETVNETHDRSZ, &mut size) }
            .map_err(|e| tap.ioctl_error("the virtio-net header size (TUNSETVNETHDRSZ)", e))?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name (as the kernel chose it when created from a
    /// pattern).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ioctl_error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            tap: self.name.clone(),
            what,
            source,
        }
    }

    /// Tells the tap which offloads the guest can take (TUN_F_* bits): what
    /// the kernel may hand us without segmenting or checksumming first.
    pub fn set_offload(&self, tun_flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, tun_flags as libc::c_ulong) } < 0 {
            return Err(self.ioctl_error(
                "the offload settings (TUNSETOFFLOAD)",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Attaches this queue to the interface (it receives traffic) or
    /// detaches it (the kernel steers nothing to it). Multi-queue taps only.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut req = ifreq_for(&self.name)?;
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE takes a struct ifreq.
        unsafe { ioctl_ptr(self.fd(), libc::TUNSETQUEUE, &mut req) }
            .map_err(|e| self.ioctl_error("to attach or detach a queue (TUNSETQUEUE)", e))
    }

    fn inet_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(TapError::Socket {
                tap: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sets the host side's IPv4 address (and netmask) on the interface.
    pub fn set_ipv4(&self, ip: Ipv4Addr, mask: Option<Ipv4Addr>) -> Result<(), TapError> {
        let sock = self.inet_socket()?;
        let set = |request: libc::Ioctl, addr: Ipv4Addr, what: &'static str| {
            let mut req = ifreq_for(&self.name)?;
            // SAFETY: sockaddr_in is plain old data and fits in ifru_addr
            // (both 16 bytes); all zeros is a valid value.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
            // SAFETY: as above; the union member is a sockaddr of the same size.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&sin as *const libc::sockaddr_in).cast::<u8>(),
                    (&mut req.ifr_ifru.ifru_addr as *mut libc::sockaddr).cast::<u8>(),
                    std::mem::size_of::<libc::sockaddr_in>(),
                );
            }
            // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK take a struct ifreq.
            unsafe { ioctl_ptr(sock.as_raw_fd(), request, &mut req) }
                .map_err(|e| self.ioctl_error(what, e))
        };
        set(libc::SIOCSIFADDR, ip, "the IPv4 address (SIOCSIFADDR)")?;
        if let Some(mask) = mask {
            set(libc::SIOCSIFNETMASK, mask, "the netmask (SIOCSIFNETMASK)")?;
        }
        Ok(())
    }

    /// Brings the interface up (IFF_UP | IFF_RUNNING) unless it already is.
    pub fn set_up(&self) -> Result<(), TapError> {
        let sock = self.inet_socket()?;
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: SIOCGIFFLAGS takes a struct ifreq.
        unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) }
            .map_err(|e| self.ioctl_error("to report its flags (SIOCGIFFLAGS)", e))?;
        // SAFETY: SIOCGIFFLAGS filled ifru_flags.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if flags & want == want {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | want;
        // SAFETY: SIOCSIFFLAGS takes a struct ifreq.
        unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) }
            .map_err(|e| self.ioctl_error("to bring the link up (SIOCSIFFLAGS)", e))
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> Result<u32, TapError> {
        let sock = self.inet_socket()?;
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: SIOCGIFMTU takes a struct ifreq.
        unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) }
            .map_err(|e| self.ioctl_error("to report its MTU (SIOCGIFMTU)", e))?;
        // SAFETY: SIOCGIFMTU filled ifru_mtu.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        Ok(u32::try_from(mtu).unwrap_or(0))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}
