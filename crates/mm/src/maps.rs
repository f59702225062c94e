//! Finding the mapping (VMA) at an address.
//!
//! The PROCMAP_QUERY ioctl on /proc/self/maps (Linux 6.11+) asks the kernel for the VMA covering
//! an address, or the next one above it, without formatting the whole file. Where the kernel
//! lacks it (the ioctl answers ENOTTY or EINVAL) we read and parse /proc/self/maps instead, and
//! /proc/self/smaps when a hugetlb page size is needed.
//!
//! Neither interface shows `VM_IO`/`VM_PFNMAP`, so I/O areas are judged by name: `[vvar]`,
//! `[vvar_vclock]`, `[vsyscall]`, and mappings of device files under /dev other than /dev/zero.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use svmirror_core::PAGE_SIZE;

use crate::error::MmError;
use crate::uapi::{self, ProcmapQuery};

const MAPS: &str = "/proc/self/maps";
const SMAPS: &str = "/proc/self/smaps";

/// Longest VMA name we ask PROCMAP_QUERY for (the kernel's own limit, `PATH_MAX`).
const NAME_MAX: usize = 4096;

/// One VMA: as much of it as a page source needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `VM_READ`.
    pub read: bool,
    /// `VM_WRITE`.
    pub write: bool,
    /// A shared mapping (`VM_MAYSHARE`): writes reach the backing object, no copy-on-write.
    pub shared: bool,
    /// An I/O or PFN-map area, judged by name.
    pub io: bool,
    /// The kernel's page size for the VMA (larger than 4 KiB for hugetlb), where the mechanism
    /// reports it; `None` from /proc/self/maps, which does not.
    pub page_size: Option<u64>,
}

/// The VMA lookup of one process, by PROCMAP_QUERY or by parsing.
pub(crate) struct Maps {
    /// /proc/self/maps: the PROCMAP_QUERY target, or the text we parse.
    maps: File,
    /// /proc/self/smaps, opened only when parsing (for hugetlb page sizes).
    smaps: Option<File>,
    /// Whether PROCMAP_QUERY is used.
    query: bool,
    /// Text buffer for parsing; the lock also keeps two parses from interleaving their reads.
    text: Mutex<Vec<u8>>,
    /// The x86-64 vsyscall page: listed in /proc/self/maps but never found by PROCMAP_QUERY
    /// (it is the gate area, not a VMA).
    gate: Option<Vma>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps")
            .field("query", &self.query)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl Maps {
    /// Opens /proc/self/maps and decides on the mechanism: PROCMAP_QUERY if `use_query` and the
    /// kernel has it, parsing otherwise.
    pub(crate) fn open(use_query: bool) -> Result<Self, MmError> {
        let maps = File::open(MAPS).map_err(|source| MmError::Open { path: MAPS, source })?;
        let mut this = Maps {
            maps,
            smaps: None,
            query: false,
            text: Mutex::new(Vec::new()),
            gate: None,
        };
        if use_query {
            // Any address will do: the answer for it says whether the ioctl exists.
            let probe = 0u8;
            match this.query(std::ptr::from_ref(&probe) as u64) {
                Ok(_) => this.query = true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {}
                Err(source) => {
                    return Err(MmError::Probe {
                        mechanism: "PROCMAP_QUERY",
                        source,
                    });
                }
            }
        }
        if this.query {
            this.gate = this
                .parse_find(GATE_START)?
                .filter(|v| v.start == GATE_START);
        } else {
            this.smaps = Some(File::open(SMAPS).map_err(|source| MmError::Open {
                path: SMAPS,
                source,
            })?);
        }
        Ok(this)
    }

    /// Whether PROCMAP_QUERY is in use.
    pub(crate) fn uses_query(&self) -> bool {
        self.query
    }

    /// The VMA covering `addr`, or else the first one above it; `None` if there is none.
    pub(crate) fn find(&self, addr: u64) -> Result<Option<Vma>, MmError> {
        if !self.query {
            return self.parse_find(addr);
        }
        let found = self
            .query(addr)
            .map_err(|source| MmError::Query { addr, source })?;
        Ok(match (found, &self.gate) {
            // Every VMA lies below the gate area, so it is "next" only when nothing else is.
            (None, Some(gate)) if addr < gate.end => Some(gate.clone()),
            (found, _) => found,
        })
    }

    /// The kernel's page size for `vma`: what the lookup reported, or else the `KernelPageSize`
    /// line of /proc/self/smaps, or else the base page size.
    pub(crate) fn page_size(&self, vma: &Vma) -> Result<u64, MmError> {
        if let Some(size) = vma.page_size {
            return Ok(size);
        }
        let Some(smaps) = &self.smaps else {
            return Ok(PAGE_SIZE);
        };
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        read_all(smaps, &mut text).map_err(|source| MmError::ReadMaps {
            path: SMAPS,
            source,
        })?;
        Ok(smaps_page_size(&text, vma.start).unwrap_or(PAGE_SIZE))
    }

    /// One PROCMAP_QUERY: `Ok(None)` when no VMA covers or follows `addr`.
    fn query(&self, addr: u64) -> io::Result<Option<Vma>> {
        let mut name = [0u8; NAME_MAX];
        let mut q = ProcmapQuery {
            size: size_of::<ProcmapQuery>() as u64,
            query_flags: uapi::PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
            query_addr: addr,
            vma_name_size: NAME_MAX as u32,
            vma_name_addr: name.as_mut_ptr() as u64,
            ..ProcmapQuery::default()
        };
        // SAFETY: PROCMAP_QUERY takes one `struct procmap_query`, which `ProcmapQuery` lays out;
        // the name buffer it points to is `name`, live and `vma_name_size` bytes long, and the
        // build-id buffer is absent (address and size 0).
        let mut rc = unsafe { uapi::ioctl_rw(&self.maps, uapi::PROCMAP_QUERY, &mut q) };
        if matches!(&rc, Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG)) {
            // A name longer than PATH_MAX is no device path: ask again without it.
            q.vma_name_size = 0;
            q.vma_name_addr = 0;
            // SAFETY: as above, now with no buffers at all.
            rc = unsafe { uapi::ioctl_rw(&self.maps, uapi::PROCMAP_QUERY, &mut q) };
        }
        match rc {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let name_len = (q.vma_name_size as usize).saturating_sub(1).min(NAME_MAX);
        Ok(Some(Vma {
            start: q.vma_start,
            end: q.vma_end,
            read: q.vma_flags & uapi::PROCMAP_QUERY_VMA_READABLE != 0,
            write: q.vma_flags & uapi::PROCMAP_QUERY_VMA_WRITABLE != 0,
            shared: q.vma_flags & uapi::PROCMAP_QUERY_VMA_SHARED != 0,
            io: is_io_name(&name[..name_len]),
            page_size: Some(q.vma_page_size).filter(|&s| s >= PAGE_SIZE),
        }))
    }

    /// The extent of the VMA covering `addr` if it is private anonymous memory of 4 KiB pages
    /// that can be read (where the monitor's reader may map the zero page: `mark_absent`);
    /// `None` for any other VMA, for no VMA, and when PROCMAP_QUERY is not in use (parsing
    /// /proc/self/maps allocates, which the reader must not). No allocation.
    pub(crate) fn private_anon_at(&self, addr: u64) -> Option<(u64, u64)> {
        if !self.query {
            return None;
        }
        let mut q = ProcmapQuery {
            size: size_of::<ProcmapQuery>() as u64,
            query_flags: 0,
            query_addr: addr,
            ..ProcmapQuery::default()
        };
        // SAFETY: PROCMAP_QUERY takes one `struct procmap_query`, which `ProcmapQuery` lays out;
        // it names no buffers (name and build-id sizes and addresses 0).
        unsafe { uapi::ioctl_rw(&self.maps, uapi::PROCMAP_QUERY, &mut q) }.ok()?;
        let f = q.vma_flags;
        (f & uapi::PROCMAP_QUERY_VMA_READABLE != 0
            && f & uapi::PROCMAP_QUERY_VMA_SHARED == 0
            && q.inode == 0
            && q.dev_major == 0
            && q.dev_minor == 0
            && q.vma_page_size == PAGE_SIZE)
            .then_some((q.vma_start, q.vma_end))
    }

    /// Reads /proc/self/maps and returns the VMA covering `addr` or the first above it.
    fn parse_find(&self, addr: u64) -> Result<Option<Vma>, MmError> {
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        read_all(&self.maps, &mut text)
            .map_err(|source| MmError::ReadMaps { path: MAPS, source })?;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = MapsLine::parse(line).ok_or_else(|| MmError::ParseMaps {
                line: String::from_utf8_lossy(line).into_owned(),
            })?;
            if parsed.end > addr {
                return Ok(Some(parsed.vma()));
            }
        }
        Ok(None)
    }

    /// Every VMA /proc/self/maps lists, parsed (for tests that compare the mechanisms).
    #[cfg(test)]
    pub(crate) fn parse_all(&self) -> Result<Vec<Vma>, MmError> {
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        read_all(&self.maps, &mut text)
            .map_err(|source| MmError::ReadMaps { path: MAPS, source })?;
        text.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                MapsLine::parse(line)
                    .map(|l| l.vma())
                    .ok_or_else(|| MmError::ParseMaps {
                        line: String::from_utf8_lossy(line).into_owned(),
                    })
            })
            .collect()
    }
}

/// Start of the x86-64 vsyscall page (`VSYSCALL_ADDR`); nothing else is mapped that high.
const GATE_START: u64 = 0xffff_ffff_ff60_0000;

/// Reads all of a /proc text file into `buf`. These are seq files: `read_at` from offset 0
/// restarts the listing, and each later offset continues it.
fn read_all(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    const GROW: usize = 64 * 1024;
    buf.clear();
    let mut offset = 0u64;
    loop {
        let len = buf.len();
        if buf.capacity() - len < GROW / 4 {
            buf.reserve(GROW);
        }
        buf.resize(buf.capacity(), 0);
        let read = file.read_at(&mut buf[len..], offset);
        match read {
            Ok(0) => {
                buf.truncate(len);
                return Ok(());
            }
            Ok(n) => {
                buf.truncate(len + n);
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => {
                buf.truncate(len);
                return Err(e);
            }
        }
    }
}

/// One line of /proc/PID/maps:
/// `start-end perms offset major:minor inode [name]`, the name padded to a column.
#[derive(Debug, PartialEq, Eq)]
struct MapsLine<'a> {
    start: u64,
    end: u64,
    perms: [u8; 4],
    name: &'a [u8],
}

impl<'a> MapsLine<'a> {
    fn parse(line: &'a [u8]) -> Option<Self> {
        let mut fields = line.splitn(6, |&b| b == b' ');
        let (start, end) = split_once(fields.next()?, b'-')?;
        let perms: [u8; 4] = fields.next()?.try_into().ok()?;
        let _offset = fields.next()?;
        let _dev = fields.next()?;
        let _inode = fields.next()?;
        let name = fields.next().unwrap_or_default().trim_ascii_start();
        let line = MapsLine {
            start: hex(start)?,
            end: hex(end)?,
            perms,
            name,
        };
        (line.start < line.end).then_some(line)
    }

    fn vma(&self) -> Vma {
        Vma {
            start: self.start,
            end: self.end,
            read: self.perms[0] == b'r',
            write: self.perms[1] == b'w',
            shared: self.perms[3] == b's',
            io: is_io_name(self.name),
            page_size: None,
        }
    }
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = s.iter().position(|&b| b == sep)?;
    Some((&s[..at], &s[at + 1..]))
}

fn hex(s: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// The `KernelPageSize` of the VMA starting at `start`, from /proc/self/smaps text.
fn smaps_page_size(text: &[u8], start: u64) -> Option<u64> {
    let mut in_vma = false;
    for line in text.split(|&b| b == b'\n') {
        if let Some(header) = MapsLine::parse(line) {
            in_vma = header.start == start;
        } else if in_vma {
            if let Some(rest) = line.strip_prefix(b"KernelPageSize:") {
                let kb = std::str::from_utf8(rest).ok()?.trim().strip_suffix("kB")?;
                return kb.trim().parse::<u64>().ok()?.checked_mul(1024);
            }
        }
    }
    None
}

/// Whether a VMA with this name is an I/O or PFN-map area (see the module docs).
pub(crate) fn is_io_name(name: &[u8]) -> bool {
    if matches!(name, b"[vvar]" | b"[vvar_vclock]" | b"[vsyscall]") {
        return true;
    }
    // A VFIO device's BAR mapped through the group interface: the device fd is an anonymous
    // inode (drivers/vfio/group.c opens it with `anon_inode_getfile("[vfio-device]", ..)`),
    // and the mapping is VM_IO | VM_PFNMAP, which userfaultfd refuses (EINVAL). Through the
    // cdev interface it is /dev/vfio/devices/vfioN, a character device, below.
    if name.starts_with(b"anon_inode:[vfio-device]") {
        return true;
    }
    if !name.starts_with(b"/dev/") {
        return false;
    }
    // Shared anonymous memory is named after /dev/zero; files on tmpfs or hugetlbfs mounted
    // under /dev (/dev/shm, /dev/hugepages) are ordinary memory, and stat tells them apart.
    let (path, deleted) = match name.strip_suffix(b" (deleted)") {
        Some(path) => (path, true),
        None => (name, false),
    };
    if path == b"/dev/zero" {
        return false;
    }
    match std::fs::metadata(Path::new(OsStr::from_bytes(path))) {
        Ok(meta) => meta.file_type().is_char_device() || meta.file_type().is_block_device(),
        // A deleted name is a file that was unlinked (shm, memfd-like): memory. Anything else we
        // cannot look at is treated as a device, the safe side.
        Err(_) => !deleted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_mapping_line() {
        let line = b"7f0000001000-7f0000003000 r-xp 00001000 fd:01 1234                       /usr/lib/libc.so.6";
        let l = MapsLine::parse(line).unwrap();
        assert_eq!((l.start, l.end), (0x7f00_0000_1000, 0x7f00_0000_3000));
        assert_eq!(l.name, b"/usr/lib/libc.so.6");
        let v = l.vma();
        assert!(v.read && !v.write && !v.shared && !v.io);
    }

    #[test]
    fn parses_an_anonymous_line_without_name() {
        let l = MapsLine::parse(b"1000-2000 rw-s 00000000 00:00 0 ").unwrap();
        assert_eq!(l.name, b"");
        assert!(l.vma().shared && l.vma().write);
    }

    #[test]
    fn names_with_spaces_are_kept_whole() {
        let l =
            MapsLine::parse(b"1000-2000 rw-s 00000000 00:01 7     /dev/zero (deleted)").unwrap();
        assert_eq!(l.name, b"/dev/zero (deleted)");
        assert!(!l.vma().io);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(MapsLine::parse(b"").is_none());
        assert!(MapsLine::parse(b"zz-2000 rw-p 0 00:00 0").is_none());
        assert!(MapsLine::parse(b"2000-1000 rw-p 0 00:00 0").is_none());
        assert!(MapsLine::parse(b"1000-2000 rw 0 00:00 0").is_none());
        assert!(MapsLine::parse(b"KernelPageSize:        4 kB").is_none());
    }

    #[test]
    fn io_names() {
        assert!(is_io_name(b"[vvar]"));
        assert!(is_io_name(b"[vvar_vclock]"));
        assert!(is_io_name(b"[vsyscall]"));
        assert!(is_io_name(b"/dev/null"));
        assert!(is_io_name(b"anon_inode:[vfio-device]"));
        assert!(!is_io_name(b"anon_inode:[eventfd]"));
        assert!(!is_io_name(b"/dev/zero"));
        assert!(!is_io_name(b"/dev/zero (deleted)"));
        assert!(!is_io_name(b"/dev/shm/gone (deleted)"));
        assert!(!is_io_name(b"[heap]"));
        assert!(!is_io_name(b"[vdso]"));
        assert!(!is_io_name(b""));
    }

    #[test]
    fn smaps_kernel_page_size_of_the_right_vma() {
        let text = b"1000-2000 rw-p 00000000 00:00 0 \nKernelPageSize:        4 kB\n\
                     200000-400000 rw-p 00000000 00:10 5      /anon_hugepage (deleted)\n\
                     Size:               2048 kB\nKernelPageSize:     2048 kB\nVmFlags: rd wr\n";
        assert_eq!(smaps_page_size(text, 0x1000), Some(4096));
        assert_eq!(smaps_page_size(text, 0x20_0000), Some(2 << 20));
        assert_eq!(smaps_page_size(text, 0x5000), None);
    }

    #[test]
    fn query_and_parse_agree_on_every_vma() {
        let query = Maps::open(true).unwrap();
        if !query.uses_query() {
            eprintln!("PROCMAP_QUERY not available; nothing to compare");
            return;
        }
        let parse = Maps::open(false).unwrap();
        let mut checked = 0;
        let mut io = 0;
        for listed in parse.parse_all().unwrap() {
            // Other tests map and unmap memory in parallel threads, so the two lookups may see
            // different address spaces: retry a few times before calling it a disagreement.
            let mut last = None;
            for _ in 0..5 {
                let q = query.find(listed.start).unwrap();
                let p = parse.find(listed.start).unwrap();
                let key = |v: &Option<Vma>| {
                    v.as_ref()
                        .map(|v| (v.start, v.end, v.read, v.write, v.shared, v.io))
                };
                if key(&q) == key(&p) {
                    last = None;
                    io += usize::from(q.is_some_and(|v| v.io));
                    break;
                }
                last = Some((q, p));
            }
            assert!(last.is_none(), "at {:#x}: {last:?}", listed.start);
            checked += 1;
        }
        assert!(io > 0, "[vvar] is an I/O area in both");
        assert!(checked > 3);
    }

    #[test]
    fn find_reports_the_next_vma_for_a_hole_in_both_mechanisms() {
        for use_query in [true, false] {
            let maps = Maps::open(use_query).unwrap();
            let first = maps.find(0).unwrap().expect("some VMA exists");
            assert!(first.start > 0, "nothing is mapped at address 0");
            assert!(maps.find(first.start - PAGE_SIZE).unwrap() == Some(first.clone()));
        }
    }
}
