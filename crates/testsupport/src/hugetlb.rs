//! The 2 MiB hugetlb pool, for tests of huge pages: grown to what a test needs and shrunk back
//! to its old size when the test ends (also when it fails), and private mappings of its pages.
//!
//! Growing the pool writes `vm.nr_hugepages` (or the 2 MiB pool's own `nr_hugepages` where
//! 2 MiB is not the default huge page size), which needs root.

use std::io;
use std::path::{Path, PathBuf};

use svmirror_core::Range;

/// The size of a page of the 2 MiB pool (a PMD).
pub const HUGE_2M: u64 = 2 << 20;

/// The 2 MiB pool's sysfs directory; missing where the kernel has no such pool.
pub const POOL_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The default pool's size.
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Why the pool could not be made ready for a test.
#[derive(Debug, thiserror::Error)]
pub enum HugetlbError {
    /// The file that sizes the pool could not be read (no hugetlb support) or did not hold a
    /// number.
    #[error("cannot read the 2 MiB hugetlb pool size from {}", path.display())]
    ReadSize {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The pool could not be resized (not root, or the kernel refused).
    #[error("cannot grow the 2 MiB hugetlb pool in {} from {from} to {to} pages", path.display())]
    Grow {
        /// The file that sizes the pool.
        path: PathBuf,
        /// Its size before.
        from: u64,
        /// The size asked for.
        to: u64,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The pool grew, but the kernel found fewer free huge pages than asked for (memory too
    /// fragmented); it was shrunk back.
    #[error("only {available} of {want} 2 MiB hugetlb pages available after growing the pool")]
    Short {
        /// Pages asked for.
        want: u64,
        /// Pages available after growing.
        available: u64,
    },
}

fn read_u64(path: &Path) -> io::Result<u64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// 2 MiB pages that a new MAP_HUGETLB mapping can have: free and not reserved by a mapping (a
/// reserved page counts as free in `free_hugepages`, but only its mapping may take it). 0 where
/// the kernel has no 2 MiB pool.
pub fn available_2m() -> u64 {
    let pool = Path::new(POOL_2M);
    let free = read_u64(&pool.join("free_hugepages")).unwrap_or(0);
    let resv = read_u64(&pool.join("resv_hugepages")).unwrap_or(0);
    free.saturating_sub(resv)
}

/// The file that sizes the 2 MiB pool: `vm.nr_hugepages` where 2 MiB is the default huge page
/// size (as on x86-64), else the pool's own.
fn pool_size_file() -> PathBuf {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let default_2m = meminfo
        .lines()
        .any(|l| l.starts_with("Hugepagesize:") && l.split_whitespace().nth(1) == Some("2048"));
    if default_2m {
        PathBuf::from(NR_HUGEPAGES)
    } else {
        Path::new(POOL_2M).join("nr_hugepages")
    }
}

/// The 2 MiB pool as a test needs it. Where the test grew it, dropping this writes the old size
/// back (a failure to is printed, not raised: a drop cannot fail the test). Drop it after the
/// mappings that use the pages.
#[derive(Debug)]
#[must_use = "the pool shrinks back when this is dropped"]
pub struct HugetlbPool {
    /// The file that sizes the pool and its size before the test, if the test grew it.
    restore: Option<(PathBuf, u64)>,
}

impl HugetlbPool {
    /// Asks for `want` pages to be available ([`available_2m`]), growing the pool by the
    /// shortfall where they are not. Succeeds once the pool was resized, even when the kernel
    /// found fewer pages than asked for (check [`available_2m`]); fails where it could not be
    /// read or resized, having changed nothing.
    pub fn grow(want: u64) -> Result<HugetlbPool, HugetlbError> {
        let available = available_2m();
        if available >= want {
            return Ok(HugetlbPool { restore: None });
        }
        let path = pool_size_file();
        let from = read_u64(&path).map_err(|source| HugetlbError::ReadSize {
            path: path.clone(),
            source,
        })?;
        let to = from.saturating_add(want - available);
        if let Err(source) = std::fs::write(&path, to.to_string()) {
            return Err(HugetlbError::Grow {
                path,
                from,
                to,
                source,
            });
        }
        Ok(HugetlbPool {
            restore: Some((path, from)),
        })
    }

    /// Makes sure `want` pages are available, growing the pool where they are not: as
    /// [`grow`](HugetlbPool::grow), and also fails (with the pool shrunk back) where fewer are
    /// available afterwards. For tests that must not pass without huge pages.
    pub fn reserve(want: u64) -> Result<HugetlbPool, HugetlbError> {
        let pool = HugetlbPool::grow(want)?;
        let available = available_2m();
        if available < want {
            drop(pool);
            return Err(HugetlbError::Short { want, available });
        }
        Ok(pool)
    }

    /// The file that sizes the pool and the size it goes back to, where this grew it.
    pub fn resized(&self) -> Option<(&Path, u64)> {
        self.restore.as_ref().map(|(p, old)| (p.as_path(), *old))
    }
}

impl Drop for HugetlbPool {
    fn drop(&mut self) {
        if let Some((path, old)) = &self.restore {
            if let Err(e) = std::fs::write(path, old.to_string()) {
                eprintln!("could not restore {} to {old}: {e}", path.display());
            }
        }
    }
}

/// A new private anonymous read-write mapping of `len` bytes of 2 MiB hugetlb pages
/// (`MAP_HUGETLB | MAP_HUGE_2MB`), at an address the kernel picks. The caller unmaps it.
/// `len` must be a non-zero multiple of [`HUGE_2M`]. Fails as the mmap does where the pool has
/// too few pages (ENOMEM).
pub fn map_2m(len: u64) -> io::Result<Range> {
    if len == 0 || len % HUGE_2M != 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let size = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a new mapping at an address the kernel picks; it replaces nothing. The result is
    // checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Range::with_len(p as u64, len).map_err(|e| {
        // SAFETY: unmaps the mapping just made, which nothing refers to.
        unsafe { libc::munmap(p, size) };
        io::Error::new(io::ErrorKind::InvalidData, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_size() -> u64 {
        read_u64(&pool_size_file()).expect("this machine has a 2 MiB hugetlb pool")
    }

    #[test]
    fn asking_for_no_pages_changes_nothing() {
        let _s = crate::serial();
        let before = pool_size();
        let grown = HugetlbPool::grow(0).unwrap();
        let reserved = HugetlbPool::reserve(0).unwrap();
        assert!(grown.resized().is_none() && reserved.resized().is_none());
        drop((grown, reserved));
        assert_eq!(pool_size(), before);
    }

    #[test]
    fn a_grown_pool_goes_back_to_its_old_size_on_drop() {
        let _s = crate::serial();
        let before = pool_size();
        let want = available_2m() + 1;
        let pool = HugetlbPool::grow(want).expect("the pool grows (run as root)");
        let (path, old) = pool.resized().expect("the pool was short by one page");
        assert_eq!((path, old), (pool_size_file().as_path(), before));
        // Grown by the shortfall (unless the kernel found no page for it).
        assert!(
            pool_size() == before + 1 || available_2m() < want,
            "{} pages, {before} before",
            pool_size()
        );
        drop(pool);
        assert_eq!(pool_size(), before);
    }

    #[test]
    fn reserve_gives_the_pages_or_fails_with_the_pool_back_as_it_was() {
        let _s = crate::serial();
        let before = pool_size();
        let want = available_2m() + 2;
        match HugetlbPool::reserve(want) {
            Ok(pool) => {
                assert!(available_2m() >= want);
                let range = map_2m(2 * HUGE_2M).expect("two reserved pages map");
                assert_eq!(range.start() % HUGE_2M, 0, "{range}");
                // SAFETY: the first word of the fresh read-write mapping, which nothing else
                // refers to.
                unsafe { crate::volatile::write::<u64>(range.start(), 7) };
                // SAFETY: as above, for a read.
                assert_eq!(unsafe { crate::volatile::read::<u64>(range.start()) }, 7);
                // SAFETY: unmaps the mapping made above; nothing refers into it.
                let rc = unsafe { libc::munmap(range.start() as *mut _, range.len() as usize) };
                assert_eq!(rc, 0);
                drop(pool);
            }
            Err(HugetlbError::Short { want: w, available }) => {
                assert_eq!(w, want);
                assert!(available < want);
            }
            Err(e) => panic!("reserving as root: {e:?}"),
        }
        assert_eq!(pool_size(), before);
    }

    #[test]
    fn map_2m_refuses_a_length_that_is_not_whole_huge_pages() {
        for len in [0, 4096, HUGE_2M + 4096] {
            let e = map_2m(len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{len:#x}");
        }
    }
}
