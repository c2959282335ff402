//! Checking a descriptor chain before a device trusts it.
//!
//! virtio-queue's chain iterator stops quietly when a chain loops, points
//! past the table, or has an unreadable or malformed indirect table; to a
//! device that looks like a short, valid chain. [`checked_descriptors`]
//! turns those cases, and buffers that run outside guest RAM, into errors
//! so the device fails the request instead of acting on part of it.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory as _, Permissions};

use crate::GuestMemory;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("Descriptor chain is empty")]
    Empty,
    #[error(
        "Descriptor chain ends early: it loops, links past the table, or has an invalid indirect table"
    )]
    Truncated,
    #[error("Buffer {addr:#x}+{len:#x} lies outside guest RAM")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("A device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
}

/// Collects the chain's descriptors into `out` (cleared first, reused to
/// avoid an allocation per request) after checking the whole chain.
pub fn checked_descriptors<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    out.clear();
    let mut seen_writable = false;
    for desc in chain {
        let writable = desc.is_write_only();
        if seen_writable && !writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        if desc.len() > 0 {
            let permission = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(desc.addr(), desc.len() as usize, permission)
                || desc.addr().checked_add(u64::from(desc.len())).is_none()
            {
                return Err(ChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
        }
        out.push(desc);
    }
    match out.last() {
        None => Err(ChainError::Empty),
        Some(last) if last.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(()),
    }
}

/// Whether `[addr, addr + len)` is guest RAM (for devices that check
/// buffers one by one).
pub fn in_memory(mem: &GuestMemory, addr: GuestAddress, len: usize) -> bool {
    len == 0 || mem.check_range(addr, len, Permissions::Read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn run(descs: &[(u64, u32, u16, u16)]) -> Result<usize, ChainError> {
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
            .collect();
        // Unlike build_desc_chain, this keeps the `next` fields as given.
        let chain = vq.build_multiple_desc_chains(&raw).unwrap();
        let mut out = Vec::new();
        checked_descriptors(chain, &mem, &mut out).map(|_| out.len())
    }

    #[test]
    fn good_chain_passes() {
        assert_eq!(
            run(&[
                (0x1000, 16, NEXT, 1),
                (0x2000, 512, NEXT | WRITE, 2),
                (0x3000, 1, WRITE, 0)
            ]),
            Ok(3)
        );
    }

    #[test]
    fn bad_chains_fail() {
        // build_desc_chain links descriptor i to i+1; override `next` to loop.
        assert_eq!(
            run(&[(0x1000, 16, NEXT, 1), (0x2000, 16, NEXT, 0)]),
            Err(ChainError::Truncated)
        );
        assert_eq!(run(&[(0x1000, 16, NEXT, 99)]), Err(ChainError::Truncated));
        assert!(matches!(
            run(&[(0xff000, 0x2000, 0, 0)]),
            Err(ChainError::OutsideMemory { .. })
        ));
        assert!(matches!(
            run(&[(u64::MAX - 1, 16, 0, 0)]),
            Err(ChainError::OutsideMemory { .. })
        ));
        assert_eq!(
            run(&[(0x1000, 16, NEXT | WRITE, 1), (0x2000, 16, 0, 0)]),
            Err(ChainError::ReadableAfterWritable)
        );
    }
}
