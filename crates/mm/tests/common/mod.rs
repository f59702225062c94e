//! Helpers shared by the integration tests: mmap'd regions, forked children, THP regions, and
//! the set of page sources each scenario runs on. The tests change this process's address
//! space: each takes svmirror-testsupport's `serial()` first, so that one test's mmap cannot
//! land in another's hole, and no fork happens while another test holds a lock.

use svmirror_core::{CpuPte, PAGE_SIZE, PageSource, Range};
use svmirror_mm::{PageSourceFeatures, ProcessPageSource};
use svmirror_testsupport::volatile;

pub const PAGE: usize = PAGE_SIZE as usize;

/// An mmap'd region, unmapped on drop. Its memory is touched only through raw pointers.
pub struct Mapping {
    pub ptr: *mut libc::c_void,
    pub len: usize,
}

impl Mapping {
    pub fn new(pages: usize, prot: i32, flags: i32) -> Mapping {
        let len = pages * PAGE;
        // SAFETY: a new mapping at an address the kernel picks; it aliases nothing.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
        Mapping { ptr, len }
    }

    /// Private anonymous memory without THP, so that faults give base pages.
    pub fn anon(pages: usize, prot: i32) -> Mapping {
        let m = Mapping::new(pages, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        m.advise(libc::MADV_NOHUGEPAGE);
        m
    }

    pub fn advise(&self, advice: i32) {
        // SAFETY: advice about this mapping only; none used here changes its contents.
        assert_eq!(unsafe { libc::madvise(self.ptr, self.len, advice) }, 0);
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn page(&self, i: usize) -> u64 {
        self.addr() + (i * PAGE) as u64
    }

    pub fn range(&self) -> Range {
        Range::with_len(self.addr(), self.len as u64).unwrap()
    }

    pub fn pages(&self, first: usize, n: usize) -> Range {
        Range::with_len(self.page(first), (n * PAGE) as u64).unwrap()
    }

    /// Pointer to the start of page `i`.
    pub fn at(&self, i: usize) -> *mut u8 {
        self.ptr.cast::<u8>().wrapping_add(i * PAGE)
    }

    /// CPU write of one byte to page `i`.
    pub fn write(&self, i: usize, value: u8) {
        assert!(i * PAGE < self.len);
        // SAFETY: inside this writable mapping, which nothing else references.
        unsafe { volatile::write(self.at(i) as u64, value) };
    }

    pub fn protect(&self, first: usize, n: usize, prot: i32) {
        // SAFETY: changes the protection of pages of this mapping only.
        let rc = unsafe { libc::mprotect(self.at(first).cast(), n * PAGE, prot) };
        assert_eq!(rc, 0);
    }

    pub fn unmap_page(&self, i: usize) {
        // SAFETY: unmaps one page of this mapping; nothing refers to it. Unmapping it again in
        // drop is harmless.
        let rc = unsafe { libc::munmap(self.at(i).cast(), PAGE) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the region this value created.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

pub const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// The real source, and ones restricted to the fallbacks, so each scenario runs on every
/// mechanism this kernel can exercise.
pub fn sources() -> Vec<(&'static str, ProcessPageSource)> {
    let fallback = PageSourceFeatures {
        procmap_query: false,
        pagemap_scan: false,
        pfn_visible: true,
    };
    let hidden = PageSourceFeatures {
        procmap_query: false,
        pagemap_scan: true,
        pfn_visible: false,
    };
    vec![
        ("full", ProcessPageSource::new().unwrap()),
        ("fallback", ProcessPageSource::restricted(fallback).unwrap()),
        ("no-pfn", ProcessPageSource::restricted(hidden).unwrap()),
    ]
}

pub fn snap(source: &ProcessPageSource, addr: u64, pages: usize) -> Vec<CpuPte> {
    let mut out = vec![CpuPte::None; pages];
    source.snapshot(addr, &mut out).unwrap();
    out
}

/// Whether this source can recognise the zero page.
pub fn sees_zero(source: &ProcessPageSource) -> bool {
    let f = source.features();
    f.pagemap_scan || f.pfn_visible
}

pub fn pfn_of(pte: CpuPte) -> u64 {
    match pte {
        CpuPte::Present { pfn, .. } => pfn,
        other => panic!("not present: {other:?}"),
    }
}

/// A forked child that sleeps on a pipe until released; released and reaped on drop, also
/// when an assertion fails first.
pub struct Child {
    pid: libc::pid_t,
    release: libc::c_int,
}

impl Child {
    pub fn fork() -> Child {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child runs only async-signal-safe calls (read, _exit) before exiting.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut byte = 0u8;
            // SAFETY: reads one byte into a local of the child; async-signal-safe.
            unsafe { libc::read(fds[0], std::ptr::from_mut(&mut byte).cast(), 1) };
            // SAFETY: ends the child at once, running no destructors or atexit handlers.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: the parent no longer needs the read end.
        unsafe { libc::close(fds[0]) };
        Child {
            pid,
            release: fds[1],
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let byte = 1u8;
        // SAFETY: writes one byte from a local to the pipe this value owns, then closes it.
        unsafe { libc::write(self.release, std::ptr::from_ref(&byte).cast(), 1) };
        // SAFETY: closes the write end this value owns.
        unsafe { libc::close(self.release) };
        let mut status = 0;
        // SAFETY: reaps the child this value forked.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The THP mode the kernel runs in: the bracketed word of
/// /sys/kernel/mm/transparent_hugepage/enabled, or "never" without THP support.
pub fn thp_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| Some(s.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .unwrap_or_else(|| "never".to_owned())
}

/// `AnonHugePages` of the VMA containing `addr`, from /proc/self/smaps, in bytes.
pub fn anon_huge_bytes(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split(' ').next().unwrap_or("");
        if let Some((s, e)) = head.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                inside = s <= addr && addr < e;
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                return kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1024;
            }
        }
    }
    0
}

/// A 2 MiB-aligned, 2 MiB region asking for THP, inside a 4 MiB mapping.
pub struct HugeRegion {
    _mapping: Mapping,
    pub start: u64,
}

pub const HUGE: u64 = 2 << 20;
pub const HUGE_PAGES: usize = (HUGE / PAGE_SIZE) as usize;

impl HugeRegion {
    pub fn new() -> HugeRegion {
        let m = Mapping::new(2 * HUGE_PAGES, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        let start = m.addr().next_multiple_of(HUGE);
        // SAFETY: advice about the aligned 2 MiB inside the mapping; it changes no contents.
        let rc = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                HUGE as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        assert_eq!(rc, 0);
        HugeRegion { _mapping: m, start }
    }

    pub fn range(&self) -> Range {
        Range::with_len(self.start, HUGE).unwrap()
    }

    pub fn write_all(&self) {
        for i in 0..HUGE_PAGES as u64 {
            // SAFETY: inside the writable mapping this region owns.
            unsafe { volatile::write(self.start + i * PAGE_SIZE, 3u8) };
        }
    }
}
