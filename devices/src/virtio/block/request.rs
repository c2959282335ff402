//! One virtio-blk request, read out of a descriptor chain (virtio 1.2 §5.2.6).
//!
//! A request is a device-readable part (the 16-byte header, then the data
//! of a write or the segments of a discard) followed by a device-writable
//! part (the data of a read or the id, then one status byte). The driver
//! may cut those parts into descriptors as it likes (§2.7.4), so the parser
//! treats each part as a byte stream: the header is the first 16 readable
//! bytes wherever they lie, the status is the last writable byte.
//!
//! Nothing here trusts the guest: every descriptor was copied out of guest
//! memory once (the guest cannot change it under us), lengths are summed in
//! u64, and every address is checked against guest memory before use. A
//! malformed request becomes a [`ParseFailure`]: answered with IOERR when
//! there is a status byte to write, dropped when there is none.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of the request header (type, reserved, sector).
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes segment (sector, num_sectors, flags).
pub const DISCARD_SEGMENT_SIZE: u64 = 16;
/// Length of the id a GET_ID request returns.
pub const ID_BYTES: usize = 20;
/// Most descriptors a chain may have (header, data, status). Longer chains
/// (an indirect table can hold 65535) are returned unanswered (used length
/// 0): their status byte lies beyond what we are willing to read.
pub const MAX_DESCRIPTORS: usize = 1024;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// Whether the request changes the disk.
    pub fn writes(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

#[derive(Debug, Error)]
pub enum RequestError {
    #[error("The chain has no device-writable byte for the status")]
    NoStatus,
    #[error("The status byte at {0:#x} is outside guest memory")]
    StatusOutOfRange(u64),
    #[error("The chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error(
        "The chain ends at a descriptor whose next one cannot be followed (out of the table, a loop, or past 4 GiB)"
    )]
    CutShort,
    #[error("A device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("The chain has {0} device-readable bytes, fewer than the 16-byte header")]
    ShortHeader(u64),
    #[error("Cannot read the request header at {0:#x}")]
    HeaderUnreadable(u64),
    #[error(
        "{request:?} request with {readable} device-readable data bytes and {writable} device-writable ones"
    )]
    WrongDirection {
        request: RequestType,
        readable: u64,
        writable: u64,
    },
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("Sectors {sector}+{sectors} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("The buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    BadBuffer { addr: u64, len: u64 },
    #[error("The request needs more than {0} I/O vectors")]
    TooManyVectors(usize),
    #[error("The disk is read-only")]
    ReadOnly,
    #[error(
        "Discard/write-zeroes data of {0} bytes is not a whole number of 16-byte segments, or holds more than the device allows"
    )]
    BadSegments(u64),
    #[error("Discard/write-zeroes segment flags {0:#x} are not supported")]
    SegmentFlags(u32),
    #[error("Discard/write-zeroes segment of {0} sectors is larger than the device allows")]
    SegmentTooLarge(u32),
    #[error("I/O error on the disk image")]
    Io(#[source] std::io::Error),
}

/// A piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// A structurally valid request. Its data buffers are in
/// [`Parser::data`] until the next parse.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub head: u16,
    pub request_type: RequestType,
    pub sector: u64,
    /// Bytes of data (read or written, id space, discard segments).
    pub data_len: u64,
    pub status: GuestAddress,
}

impl Request {
    /// Checks an IN or OUT request against the disk: whole sectors, within
    /// its capacity, no writes to a read-only disk.
    pub fn check_rw(&self, capacity: u64, read_only: bool) -> Result<(), RequestError> {
        if read_only && self.request_type.writes() {
            return Err(RequestError::ReadOnly);
        }
        if !self.data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength(self.data_len));
        }
        check_range(self.sector, self.data_len >> SECTOR_SHIFT, capacity)
    }
}

/// Checks that `sectors` sectors from `sector` lie on a disk of `capacity`.
pub fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// A request that cannot be served.
#[derive(Debug)]
pub struct ParseFailure {
    pub head: u16,
    /// Where to write VIRTIO_BLK_S_IOERR; `None` when the chain has no
    /// usable status byte, and is returned with a used length of 0.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// Parses chains with buffers it keeps from one request to the next, so
/// that the hot path does not allocate.
#[derive(Default)]
pub struct Parser {
    descs: Vec<Desc>,
    /// The data buffers of the last request parsed.
    pub data: Vec<Segment>,
}

impl Parser {
    pub fn new() -> Self {
        Parser {
            descs: Vec::with_capacity(64),
            data: Vec::with_capacity(64),
        }
    }

    /// Reads one request out of `chain`.
    pub fn parse<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemory,
    ) -> Result<Request, ParseFailure>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.descs.clear();
        self.data.clear();
        let head = chain.head_index();
        let mut readable: u64 = 0;
        let mut writable: u64 = 0;
        let mut last_writable: Option<(GuestAddress, u32)> = None;
        let mut too_many = false;
        let mut misordered = false;
        // The iteration is bounded: the chain stops after as many
        // descriptors as its table has (at most 65535), and on any
        // descriptor it cannot read.
        // The chain iterator stops quietly on a descriptor it cannot
        // follow (a `next` outside the table, a loop cut off at the table
        // size, an unreadable entry): a last descriptor that still says
        // NEXT marks a chain that was cut short.
        let mut cut_short = false;
        for d in chain {
            cut_short = d.has_next();
            if d.len() == 0 {
                continue;
            }
            if d.is_write_only() {
                writable += u64::from(d.len());
                last_writable = Some((d.addr(), d.len()));
            } else {
                if last_writable.is_some() {
                    misordered = true;
                }
                readable += u64::from(d.len());
            }
            if self.descs.len() == MAX_DESCRIPTORS {
                // Stop reading: an indirect table may hold 65535 entries,
                // and walking them all for every chain is the guest's way
                // to burn our CPU. The status byte is past the limit.
                too_many = true;
                break;
            }
            self.descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
        }
        if too_many {
            return Err(ParseFailure {
                head,
                status: None,
                error: RequestError::TooManyDescriptors,
            });
        }

        let Some((addr, len)) = last_writable else {
            return Err(ParseFailure {
                head,
                status: None,
                error: RequestError::NoStatus,
            });
        };
        let status = match addr.checked_add(u64::from(len) - 1) {
            Some(s) if mem.address_in_range(s) => s,
            _ => {
                return Err(ParseFailure {
                    head,
                    status: None,
                    error: RequestError::StatusOutOfRange(
                        addr.raw_value().wrapping_add(u64::from(len) - 1),
                    ),
                });
            }
        };
        let fail = |error| ParseFailure {
            head,
            status: Some(status),
            error,
        };
        if cut_short {
            return Err(fail(RequestError::CutShort));
        }
        if misordered {
            return Err(fail(RequestError::ReadableAfterWritable));
        }
        if readable < HEADER_SIZE {
            return Err(fail(RequestError::ShortHeader(readable)));
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        self.read_header(mem, &mut header).map_err(fail)?;
        let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let request_type = RequestType::from_raw(raw_type);

        let readable_data = readable - HEADER_SIZE;
        let writable_data = writable - 1;
        let wrong_direction = || {
            fail(RequestError::WrongDirection {
                request: request_type,
                readable: readable_data,
                writable: writable_data,
            })
        };
        let data_len = match request_type {
            RequestType::In | RequestType::GetId => {
                if readable_data != 0 {
                    return Err(wrong_direction());
                }
                self.collect(true, 0, writable_data);
                writable_data
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                if writable_data != 0 {
                    return Err(wrong_direction());
                }
                self.collect(false, HEADER_SIZE, readable);
                readable_data
            }
            RequestType::Flush => {
                if readable_data != 0 || writable_data != 0 {
                    return Err(wrong_direction());
                }
                0
            }
            RequestType::Unsupported(_) => 0,
        };
        Ok(Request {
            head,
            request_type,
            sector,
            data_len,
            status,
        })
    }

    fn read_header(&self, mem: &GuestMemory, header: &mut [u8]) -> Result<(), RequestError> {
        let mut filled = 0;
        for d in self.descs.iter().filter(|d| !d.writable) {
            if filled == header.len() {
                break;
            }
            let n = header.len().min(filled + d.len as usize) - filled;
            mem.read_slice(&mut header[filled..filled + n], d.addr)
                .map_err(|_| RequestError::HeaderUnreadable(d.addr.raw_value()))?;
            filled += n;
        }
        Ok(())
    }

    /// Puts the bytes `start..end` of the readable or writable stream into
    /// [`Parser::data`].
    fn collect(&mut self, writable: bool, start: u64, end: u64) {
        let mut pos: u64 = 0;
        for d in self.descs.iter().filter(|d| d.writable == writable) {
            let len = u64::from(d.len);
            let (lo, hi) = (pos.max(start), (pos + len).min(end));
            if lo < hi {
                // `lo - pos` < len ≤ u32::MAX, and the address wraps only
                // for buffers the memory check will refuse anyway.
                self.data.push(Segment {
                    addr: GuestAddress(d.addr.raw_value().wrapping_add(lo - pos)),
                    len: (hi - lo) as u32,
                });
            }
            pos += len;
            if pos >= end {
                break;
            }
        }
    }
}

/// Reads the discard / write-zeroes segments of the request just parsed
/// into `out`, returning how many there are. `out.len()` is the most the
/// device accepts.
pub fn read_discard_segments(
    mem: &GuestMemory,
    data: &[Segment],
    data_len: u64,
    out: &mut [[u8; DISCARD_SEGMENT_SIZE as usize]],
) -> Result<usize, RequestError> {
    if data_len == 0
        || !data_len.is_multiple_of(DISCARD_SEGMENT_SIZE)
        || data_len / DISCARD_SEGMENT_SIZE > out.len() as u64
    {
        return Err(RequestError::BadSegments(data_len));
    }
    let count = (data_len / DISCARD_SEGMENT_SIZE) as usize;
    let mut index = 0;
    let mut offset = 0usize;
    for s in data {
        let mut addr = s.addr;
        let mut left = s.len as usize;
        while left > 0 {
            let n = left.min(DISCARD_SEGMENT_SIZE as usize - offset);
            let dst = &mut out[index][offset..offset + n];
            mem.read_slice(dst, addr)
                .map_err(|_| RequestError::BadBuffer {
                    addr: addr.raw_value(),
                    len: n as u64,
                })?;
            offset += n;
            left -= n;
            addr = GuestAddress(addr.raw_value().wrapping_add(n as u64));
            if offset == DISCARD_SEGMENT_SIZE as usize {
                offset = 0;
                index += 1;
            }
        }
    }
    Ok(count)
}

/// One decoded discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl DiscardSegment {
    pub fn decode(raw: &[u8; DISCARD_SEGMENT_SIZE as usize]) -> Self {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[0..8]);
        DiscardSegment {
            sector: u64::from_le_bytes(sector),
            num_sectors: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
        }
    }
}

/// Writes `bytes` into the writable data buffers of a request, returning
/// how many fit.
pub fn write_to_buffers(
    mem: &GuestMemory,
    data: &[Segment],
    bytes: &[u8],
) -> Result<usize, RequestError> {
    let mut written = 0;
    for s in data {
        if written == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - written);
        mem.write_slice(&bytes[written..written + n], s.addr)
            .map_err(|_| RequestError::BadBuffer {
                addr: s.addr.raw_value(),
                len: n as u64,
            })?;
        written += n;
    }
    Ok(written)
}

/// Resolves the data buffers to host iovecs (a buffer may span guest
/// memory regions). Fails when a buffer is not wholly in guest memory or
/// when more than `max` vectors would be needed.
pub fn to_iovecs(
    mem: &GuestMemory,
    data: &[Segment],
    out: &mut Vec<libc::iovec>,
    max: usize,
) -> Result<(), RequestError> {
    out.clear();
    for s in data {
        let bad = || RequestError::BadBuffer {
            addr: s.addr.raw_value(),
            len: u64::from(s.len),
        };
        let mut covered = 0usize;
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|_| bad())?;
            if out.len() == max {
                return Err(RequestError::TooManyVectors(max));
            }
            covered += slice.len();
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        if covered != s.len as usize {
            return Err(bad());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemory, addr: u64, t: u32, sector: u64) {
        mem.write_obj(t.to_le(), GuestAddress(addr)).unwrap();
        mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn parse(
        mem: &GuestMemory,
        descs: &[RawDescriptor],
    ) -> (Result<Request, ParseFailure>, Vec<Segment>) {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut p = Parser::new();
        let r = p.parse(chain, mem);
        (r, p.data.clone())
    }

    #[test]
    fn parses_a_three_descriptor_read() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 7);
        let (r, data) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 1024, W),
                desc(0x3000, 1, W),
            ],
        );
        let r = r.unwrap();
        assert_eq!(r.request_type, RequestType::In);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x3000));
        assert_eq!(
            data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 1024
            }]
        );
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mem = memory();
        // A write whose header and data are one descriptor, and a read
        // whose data and status are one descriptor.
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 1);
        let (r, data) = parse(&mem, &[desc(0x1000, 16 + 512, 0), desc(0x3000, 1, W)]);
        let r = r.unwrap();
        assert_eq!(r.data_len, 512);
        assert_eq!(
            data,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );

        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 1);
        let (r, data) = parse(
            &mem,
            &[desc(0x1000, 8, 0), desc(0x1008, 8, 0), desc(0x2000, 513, W)],
        );
        let r = r.unwrap();
        assert_eq!(r.sector, 1);
        assert_eq!(r.status, GuestAddress(0x2200));
        assert_eq!(
            data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
    }

    #[test]
    fn no_writable_byte_means_no_status() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (r, _) = parse(&mem, &[desc(0x1000, 16, 0), desc(0x2000, 512, 0)]);
        let e = r.unwrap_err();
        assert!(e.status.is_none());
        // A zero-length writable descriptor does not count.
        let (r, _) = parse(&mem, &[desc(0x1000, 16, 0), desc(0x2000, 0, W)]);
        assert!(r.unwrap_err().status.is_none());
    }

    #[test]
    fn status_outside_memory_is_dropped() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (r, _) = parse(&mem, &[desc(0x1000, 16, 0), desc(0x10_0000, 1, W)]);
        assert!(matches!(
            r.unwrap_err().error,
            RequestError::StatusOutOfRange(_)
        ));
        let (r, _) = parse(&mem, &[desc(0x1000, 16, 0), desc(u64::MAX, 2, W)]);
        assert!(r.unwrap_err().status.is_none());
    }

    #[test]
    fn malformed_chains_fail_with_a_status() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        // Short header.
        let (r, _) = parse(&mem, &[desc(0x1000, 8, 0), desc(0x3000, 1, W)]);
        assert!(matches!(r.unwrap_err().error, RequestError::ShortHeader(8)));
        // Header outside memory.
        let (r, _) = parse(&mem, &[desc(0xff_fff8, 16, 0), desc(0x3000, 1, W)]);
        let e = r.unwrap_err();
        assert_eq!(e.status, Some(GuestAddress(0x3000)));
        assert!(matches!(e.error, RequestError::HeaderUnreadable(_)));
        // Readable after writable.
        let (r, _) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, W),
                desc(0x2200, 512, 0),
                desc(0x3000, 1, W),
            ],
        );
        assert!(matches!(
            r.unwrap_err().error,
            RequestError::ReadableAfterWritable
        ));
        // A read with device-readable data.
        let (r, _) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, 0),
                desc(0x3000, 1, W),
            ],
        );
        assert!(matches!(
            r.unwrap_err().error,
            RequestError::WrongDirection { .. }
        ));
        // A write with device-writable data.
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let (r, _) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, W),
                desc(0x3000, 1, W),
            ],
        );
        assert!(matches!(
            r.unwrap_err().error,
            RequestError::WrongDirection { .. }
        ));
        // A flush with data.
        header(&mem, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let (r, _) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, 0),
                desc(0x3000, 1, W),
            ],
        );
        assert!(matches!(
            r.unwrap_err().error,
            RequestError::WrongDirection { .. }
        ));
    }

    #[test]
    fn unknown_types_parse_as_unsupported() {
        let mem = memory();
        header(&mem, 0x1000, 0x1234, 0);
        let (r, _) = parse(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 4096, 0),
                desc(0x3000, 1, W),
            ],
        );
        assert_eq!(r.unwrap().request_type, RequestType::Unsupported(0x1234));
    }

    #[test]
    fn a_descriptor_loop_ends() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        // 0 -> 1 -> 2 -> 1 -> 2 ...
        let f = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x1000, 16, f, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x2000, 512, f | W, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x3000, 1, f | W, 1)),
        ];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let mut p = Parser::new();
        // The chain is cut after 16 descriptors; it fails, and its last
        // writable byte takes the error.
        let e = p.parse(chain, &mem).unwrap_err();
        assert!(matches!(e.error, RequestError::CutShort));
        assert_eq!(e.status, Some(GuestAddress(0x2000 + 511)));
    }

    #[test]
    fn a_next_outside_the_table_fails() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        let f = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x1000, 16, f, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x2000, 512, f | W, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x3000, 1, f | W, 16)),
        ];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let e = Parser::new().parse(chain, &mem).unwrap_err();
        assert!(matches!(e.error, RequestError::CutShort));
        assert_eq!(e.status, Some(GuestAddress(0x3000)));
    }

    #[test]
    fn an_indirect_table_too_long_fails() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        // An indirect table of 2000 descriptors at 0x8000: the header, then
        // one-byte writable buffers.
        let table = 0x8000u64;
        let n = 2000u16;
        for i in 0..n {
            let (addr, len, flags) = if i == 0 {
                (0x1000, 16, 0)
            } else {
                (0x40000 + u64::from(i), 1, W)
            };
            let flags = if i + 1 < n {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            let d = SplitDescriptor::new(addr, len, flags, i + 1);
            mem.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }
        let chain = vq
            .build_desc_chain(&[desc(table, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16)])
            .unwrap();
        let mut p = Parser::new();
        let e = p.parse(chain, &mem).unwrap_err();
        assert!(matches!(e.error, RequestError::TooManyDescriptors));
        assert_eq!(e.status, None);
    }

    #[test]
    fn iovecs_refuse_buffers_outside_memory() {
        let mem = memory();
        let mut iov = Vec::new();
        let ok = [Segment {
            addr: GuestAddress(0x1000),
            len: 0x1000,
        }];
        to_iovecs(&mem, &ok, &mut iov, 8).unwrap();
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 0x1000);
        let bad = [Segment {
            addr: GuestAddress(0xf_f000),
            len: 0x2000,
        }];
        assert!(to_iovecs(&mem, &bad, &mut iov, 8).is_err());
        let wrap = [Segment {
            addr: GuestAddress(u64::MAX - 10),
            len: 0x2000,
        }];
        assert!(to_iovecs(&mem, &wrap, &mut iov, 8).is_err());
        let many = [ok[0]; 9];
        assert!(matches!(
            to_iovecs(&mem, &many, &mut iov, 8),
            Err(RequestError::TooManyVectors(8))
        ));
    }

    #[test]
    fn discard_segments_may_be_split_across_buffers() {
        let mem = memory();
        let mut raw = [0u8; 32];
        raw[0..8].copy_from_slice(&5u64.to_le_bytes());
        raw[8..12].copy_from_slice(&3u32.to_le_bytes());
        raw[16..24].copy_from_slice(&9u64.to_le_bytes());
        raw[24..28].copy_from_slice(&1u32.to_le_bytes());
        raw[28..32].copy_from_slice(&1u32.to_le_bytes());
        mem.write_slice(&raw[..10], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&raw[10..], GuestAddress(0x2000)).unwrap();
        let data = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 10,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 22,
            },
        ];
        let mut out = [[0u8; 16]; 4];
        assert_eq!(read_discard_segments(&mem, &data, 32, &mut out).unwrap(), 2);
        assert_eq!(
            DiscardSegment::decode(&out[0]),
            DiscardSegment {
                sector: 5,
                num_sectors: 3,
                flags: 0
            }
        );
        assert_eq!(
            DiscardSegment::decode(&out[1]),
            DiscardSegment {
                sector: 9,
                num_sectors: 1,
                flags: 1
            }
        );
        assert!(read_discard_segments(&mem, &data, 31, &mut out).is_err());
        assert!(read_discard_segments(&mem, &data, 0, &mut out).is_err());
        let mut small = [[0u8; 16]; 1];
        assert!(read_discard_segments(&mem, &data, 32, &mut small).is_err());
    }
}
