//! Transfers: checking a caller's request against the namespace, cutting it into commands,
//! and the PRP entries of one command (Base spec, "Physical Region Page Entry and List").
//! Pure functions of addresses: the unit tests run them without a device.
//!
//! A PRP entry names a memory page by its bus address (here an IOVA); the first may carry an
//! offset into its page, which must be dword aligned (bits 1:0 clear), every later one is page
//! aligned. PRP1 is the first page. A transfer within one page leaves PRP2 unused; one ending
//! in the second page puts that page in PRP2; a longer one makes PRP2 the address of a PRP
//! list: the entries of the second page on, in a page of memory of their own. One list page
//! holds `PAGE / 8` entries; the driver never chains list pages, and cuts transfers so that
//! one suffices ([`MAX_COMMAND_PAGES`]).

use crate::error::{NvmeError, Result};
use crate::regs::{NamespaceInfo, PAGE};

/// PRP entries one list page holds.
pub(crate) const LIST_ENTRIES: u64 = PAGE / 8;
/// Most pages one command's data may touch: PRP1 and a full list.
pub(crate) const MAX_COMMAND_PAGES: u64 = 1 + LIST_ENTRIES;
/// Most bytes one command moves whatever its offset in the first page: the list's pages.
pub(crate) const MAX_COMMAND_BYTES: u64 = LIST_ENTRIES * PAGE;

/// PRP2 of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Prp2 {
    /// The data lies in PRP1's page.
    Unused,
    /// The data ends in the second page: its address.
    Page(u64),
    /// A PRP list: the addresses of the second page on, to be written into a list page whose
    /// address goes in PRP2.
    List(Vec<u64>),
}

/// The PRP entries of one command's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Prps {
    pub(crate) prp1: u64,
    pub(crate) prp2: Prp2,
}

/// The pages (page-aligned virtual addresses) that `[addr, addr + len)` touches; `len > 0`.
pub(crate) fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = addr & !(PAGE - 1);
    let end = addr + len;
    (0..)
        .map(move |i| first + i * PAGE)
        .take_while(move |&p| p < end)
}

/// The PRP entries of `[addr, addr + len)`, `iova` giving each of its pages' bus address.
/// Errors: an empty transfer, a start that is not dword aligned, more pages than one list
/// holds (the driver cuts transfers before this).
pub(crate) fn build(addr: u64, len: u64, mut iova: impl FnMut(u64) -> u64) -> Result<Prps> {
    if len == 0 {
        return Err(NvmeError::EmptyTransfer);
    }
    if addr % 4 != 0 {
        return Err(NvmeError::MisalignedBuffer { addr });
    }
    let end = addr
        .checked_add(len)
        .ok_or(NvmeError::BufferWraps { addr, len })?;
    let npages = end.div_ceil(PAGE) - addr / PAGE;
    if npages > MAX_COMMAND_PAGES {
        return Err(NvmeError::Unsupported {
            what: "a transfer that needs more than one PRP list page",
        });
    }
    let mut it = pages(addr, len);
    let first = it.next().unwrap_or(addr);
    let prp1 = iova(first) + (addr - first);
    let rest: Vec<u64> = it.map(&mut iova).collect();
    let prp2 = match rest.as_slice() {
        [] => Prp2::Unused,
        [one] => Prp2::Page(*one),
        _ => Prp2::List(rest),
    };
    Ok(Prps { prp1, prp2 })
}

/// Checks a transfer of `len` bytes at logical block `lba` from the buffer at `addr`: not
/// empty, whole blocks, inside the namespace, dword aligned. Returns the blocks.
pub(crate) fn check(ns: &NamespaceInfo, lba: u64, addr: u64, len: u64) -> Result<u64> {
    if len == 0 {
        return Err(NvmeError::EmptyTransfer);
    }
    if len % ns.lba_size != 0 {
        return Err(NvmeError::UnalignedLength {
            len,
            lba_size: ns.lba_size,
        });
    }
    let blocks = len / ns.lba_size;
    if lba.checked_add(blocks).is_none_or(|end| end > ns.blocks) {
        return Err(NvmeError::OutOfRange {
            lba,
            blocks,
            capacity: ns.blocks,
        });
    }
    if addr % 4 != 0 {
        return Err(NvmeError::MisalignedBuffer { addr });
    }
    if addr.checked_add(len).is_none() {
        return Err(NvmeError::BufferWraps { addr, len });
    }
    Ok(blocks)
}

/// One command's part of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) lba: u64,
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

/// Cuts a checked transfer into commands of at most `max` bytes (a multiple of the block size).
pub(crate) fn split(lba: u64, addr: u64, len: u64, lba_size: u64, max: u64) -> Vec<Piece> {
    let max = (max / lba_size).max(1) * lba_size;
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(max);
        out.push(Piece {
            lba: lba + done / lba_size,
            addr: addr + done,
            len: n,
        });
        done += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bus address unlike the virtual one, so a test sees which is used.
    fn bus(va: u64) -> u64 {
        va + 0x1_0000_0000
    }

    const NS: NamespaceInfo = NamespaceInfo {
        nsid: 1,
        blocks: 1000,
        lba_size: 512,
        metadata: 0,
    };

    #[test]
    fn a_transfer_within_one_page_leaves_prp2_unused() {
        let p = build(0x10_0200, 512, bus).unwrap();
        assert_eq!(p.prp1, bus(0x10_0200));
        assert_eq!(p.prp2, Prp2::Unused);
        let whole = build(0x10_0000, PAGE, bus).unwrap();
        assert_eq!(whole.prp2, Prp2::Unused);
    }

    #[test]
    fn a_transfer_straddling_two_pages_puts_the_second_in_prp2() {
        let p = build(0x10_0e00, 1024, bus).unwrap();
        assert_eq!(p.prp1, bus(0x10_0e00));
        assert_eq!(p.prp2, Prp2::Page(bus(0x10_1000)));
        // Two whole pages, page aligned: still no list.
        let p = build(0x10_0000, 2 * PAGE, bus).unwrap();
        assert_eq!(p.prp2, Prp2::Page(bus(0x10_1000)));
    }

    #[test]
    fn a_transfer_over_two_pages_gets_a_list_of_every_page_after_the_first() {
        // 8 KiB starting 512 bytes into a page touches three pages.
        let p = build(0x10_0200, 2 * PAGE, bus).unwrap();
        assert_eq!(p.prp1, bus(0x10_0200));
        assert_eq!(p.prp2, Prp2::List(vec![bus(0x10_1000), bus(0x10_2000)]));
        // Pages of a buffer need not be contiguous in bus space.
        let scattered = |va: u64| (va >> 12) * 0x10_0000;
        let p = build(0x3000, 3 * PAGE, scattered).unwrap();
        assert_eq!(p.prp1, 0x30_0000);
        assert_eq!(p.prp2, Prp2::List(vec![0x40_0000, 0x50_0000]));
    }

    #[test]
    fn the_largest_command_fills_one_list_page_exactly() {
        let p = build(0x10_0004, MAX_COMMAND_BYTES, bus).unwrap();
        let Prp2::List(list) = p.prp2 else {
            panic!("no list")
        };
        assert_eq!(list.len() as u64, LIST_ENTRIES);
        assert_eq!(*list.last().unwrap(), bus(0x10_0000 + LIST_ENTRIES * PAGE));
        assert!(matches!(
            build(0x10_0004, MAX_COMMAND_BYTES + PAGE, bus),
            Err(NvmeError::Unsupported { .. })
        ));
    }

    #[test]
    fn empty_and_misaligned_buffers_are_typed_errors() {
        assert!(matches!(
            build(0x1000, 0, bus),
            Err(NvmeError::EmptyTransfer)
        ));
        assert!(matches!(
            build(0x1001, 512, bus),
            Err(NvmeError::MisalignedBuffer { addr: 0x1001 })
        ));
        assert!(matches!(
            build(u64::MAX - 3, 512, bus),
            Err(NvmeError::BufferWraps { .. })
        ));
    }

    #[test]
    fn requests_are_checked_against_the_namespace() {
        assert_eq!(check(&NS, 0, 0x1000, 4096).unwrap(), 8);
        assert_eq!(check(&NS, 999, 0x1000, 512).unwrap(), 1);
        assert!(matches!(
            check(&NS, 0, 0x1000, 0),
            Err(NvmeError::EmptyTransfer)
        ));
        assert!(matches!(
            check(&NS, 0, 0x1000, 513),
            Err(NvmeError::UnalignedLength {
                len: 513,
                lba_size: 512
            })
        ));
        assert!(matches!(
            check(&NS, 999, 0x1000, 1024),
            Err(NvmeError::OutOfRange {
                lba: 999,
                blocks: 2,
                capacity: 1000
            })
        ));
        assert!(matches!(
            check(&NS, u64::MAX, 0x1000, 512),
            Err(NvmeError::OutOfRange { .. })
        ));
        assert!(matches!(
            check(&NS, 0, 0x1002, 512),
            Err(NvmeError::MisalignedBuffer { .. })
        ));
        assert!(matches!(
            check(&NS, 0, u64::MAX - 511, 1024),
            Err(NvmeError::BufferWraps { .. })
        ));
    }

    #[test]
    fn transfers_are_cut_at_whole_blocks() {
        let p = split(10, 0x1000, 5 * 512, 512, 1100);
        assert_eq!(
            p,
            vec![
                Piece {
                    lba: 10,
                    addr: 0x1000,
                    len: 1024
                },
                Piece {
                    lba: 12,
                    addr: 0x1400,
                    len: 1024
                },
                Piece {
                    lba: 14,
                    addr: 0x1800,
                    len: 512
                },
            ]
        );
        assert_eq!(split(0, 0x1000, 512, 512, 100).len(), 1);
    }

    #[test]
    fn pages_cover_the_range() {
        assert_eq!(pages(0x1ffc, 8).collect::<Vec<_>>(), vec![0x1000, 0x2000]);
        assert_eq!(pages(0x2000, 4096).collect::<Vec<_>>(), vec![0x2000]);
    }
}
