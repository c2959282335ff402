//! Guest buffers of one descriptor chain, and copies between them and host
//! sockets without an intermediate buffer.
//!
//! A chain is walked once into two reusable lists of (address, length)
//! segments, every segment checked against guest memory; the rest of the
//! device only ever touches guest memory through these segments.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::packet::{HDR_SIZE, PacketHeader};
use crate::GuestMemory;
use crate::virtio::chain::checked_descriptors;

/// One guest buffer.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The buffers of a descriptor chain, split by direction. Reused from
/// chain to chain so that serving a queue does not allocate.
#[derive(Default)]
pub struct ChainBufs {
    descs: Vec<Descriptor>,
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    pub readable_len: usize,
    pub writable_len: usize,
    /// The chain loops or links past its table, a buffer lies outside
    /// guest memory, a readable buffer follows a writable one, or the
    /// lengths overflow: the chain is unusable.
    pub malformed: bool,
}

impl ChainBufs {
    /// Walks and checks `chain`.
    pub fn load(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.malformed = checked_descriptors(chain, mem, &mut self.descs).is_err();
        for desc in &self.descs {
            let len = desc.len();
            if len == 0 {
                continue;
            }
            let seg = Seg {
                addr: desc.addr(),
                len,
            };
            let (segs, total) = if desc.is_write_only() {
                (&mut self.writable, &mut self.writable_len)
            } else {
                (&mut self.readable, &mut self.readable_len)
            };
            segs.push(seg);
            match total.checked_add(len as usize) {
                Some(n) => *total = n,
                None => self.malformed = true,
            }
        }
    }
}

/// Calls `f` on the guest memory covering `[offset, offset + len)` of
/// `segs`, slice by slice, until `f` does less than a whole slice. Returns
/// the bytes done; an error is returned only when nothing was done.
fn for_each_slice<F>(
    mem: &GuestMemory,
    segs: &[Seg],
    mut offset: usize,
    mut len: usize,
    mut f: F,
) -> io::Result<usize>
where
    F: FnMut(&VolatileSlice<'_, ()>) -> io::Result<usize>,
{
    let mut done = 0usize;
    for seg in segs {
        if len == 0 {
            break;
        }
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = (seg_len - offset).min(len);
        let addr = GuestAddress(seg.addr.0.wrapping_add(offset as u64));
        offset = 0;
        len -= n;
        for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
            let slice = match slice {
                Ok(s) => s,
                Err(e) if done == 0 => return Err(io::Error::other(e)),
                Err(_) => return Ok(done),
            };
            match f(&slice) {
                Ok(k) => {
                    done += k;
                    if k < slice.len() {
                        return Ok(done);
                    }
                }
                Err(e) if done == 0 => return Err(e),
                Err(_) => return Ok(done),
            }
        }
    }
    Ok(done)
}

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Sends `data` on a non-blocking socket; never raises SIGPIPE.
pub fn send_bytes(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes; the kernel
    // only reads from it.
    check(unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Bytes of a guest packet's payload (device-readable buffers).
pub struct GuestBytes<'a> {
    pub mem: &'a GuestMemory,
    pub segs: &'a [Seg],
    pub offset: usize,
    pub len: usize,
}

impl GuestBytes<'_> {
    /// Sends the payload from byte `skip` on to the socket until it would
    /// block. Returns the bytes sent.
    pub fn send_to(&self, fd: RawFd, skip: usize) -> io::Result<usize> {
        if skip >= self.len {
            return Ok(0);
        }
        for_each_slice(
            self.mem,
            self.segs,
            self.offset + skip,
            self.len - skip,
            |s| {
                let guard = s.ptr_guard();
                // SAFETY: the volatile slice covers `s.len()` bytes of mapped
                // guest memory that stay mapped while `guard` lives; the
                // kernel only reads them, and no Rust reference is made.
                check(unsafe {
                    libc::send(
                        fd,
                        guard.as_ptr().cast::<libc::c_void>(),
                        s.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                })
            },
        )
    }

    /// Appends the payload from byte `skip` on to `dst`.
    pub fn append_to(&self, skip: usize, dst: &mut Vec<u8>) -> bool {
        if skip >= self.len {
            return true;
        }
        let start = dst.len();
        let want = self.len - skip;
        dst.resize(start + want, 0);
        let got = copy_from_guest(self.mem, self.segs, self.offset + skip, &mut dst[start..]);
        if got != want {
            dst.truncate(start);
            return false;
        }
        true
    }
}

/// Copies guest bytes at `offset` of `segs` into `out`; returns how many.
pub fn copy_from_guest(mem: &GuestMemory, segs: &[Seg], offset: usize, out: &mut [u8]) -> usize {
    let mut at = 0usize;
    for_each_slice(mem, segs, offset, out.len(), |s| {
        let n = s.len();
        s.copy_to(&mut out[at..at + n]);
        at += n;
        Ok(n)
    })
    .unwrap_or(0)
}

/// A device-writable receive buffer: a packet header followed by payload.
pub struct GuestSink<'a> {
    pub mem: &'a GuestMemory,
    pub segs: &'a [Seg],
    pub len: usize,
}

impl GuestSink<'_> {
    /// Room for payload after the header.
    pub fn payload_room(&self) -> usize {
        self.len.saturating_sub(HDR_SIZE)
    }

    pub fn write_header(&self, hdr: &PacketHeader) -> bool {
        let bytes = hdr.to_bytes();
        let mut at = 0usize;
        let done = for_each_slice(self.mem, self.segs, 0, HDR_SIZE, |s| {
            let n = s.len();
            s.copy_from(&bytes[at..at + n]);
            at += n;
            Ok(n)
        });
        matches!(done, Ok(HDR_SIZE))
    }

    /// Receives at most `max` bytes from a non-blocking socket straight into
    /// the payload area. `Ok(0)` means end of stream.
    pub fn recv_from(&self, fd: RawFd, max: usize) -> io::Result<usize> {
        let max = max.min(self.payload_room());
        if max == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        for_each_slice(self.mem, self.segs, HDR_SIZE, max, |s| {
            let guard = s.ptr_guard_mut();
            // SAFETY: the volatile slice covers `s.len()` bytes of mapped
            // guest memory, writable, that stay mapped while `guard` lives;
            // the kernel writes at most that many bytes and no Rust
            // reference to them exists.
            // A short read (end of stream included) ends the walk.
            check(unsafe {
                libc::recv(
                    fd,
                    guard.as_ptr().cast::<libc::c_void>(),
                    s.len(),
                    libc::MSG_DONTWAIT,
                )
            })
        })
    }
}
