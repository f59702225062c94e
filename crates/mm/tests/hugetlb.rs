//! ProcessMm on hugetlbfs, where the kernel offers huge pages: a mirrored 2 MiB hugetlb page
//! reports order 9 with contiguous frames, and munmap and madvise(DONTNEED) of one 2 MiB page
//! each give exactly one invalidation of that page, with the right reason. Where the kernel
//! offers none even after reserving some, the test proves that instead: the MAP_HUGETLB mmap
//! fails.

use std::io;
use std::sync::Arc;

use svmirror_core::testing::TestMirror;
use svmirror_core::{Event, Owner, PAGE_SIZE, Range, entry};
use svmirror_mm::ProcessMm;
use svmirror_testsupport::hugetlb::{HUGE_2M, HugetlbPool, POOL_2M, available_2m, map_2m};

#[path = "support/fixture.rs"]
mod fixture;
use fixture::invalidations;

const HUGE: u64 = HUGE_2M;
/// Pages of `PAGE_SIZE` in one huge page.
const PER_HUGE: u64 = HUGE / PAGE_SIZE;

/// How many huge pages the test tries to have available.
const WANT_FREE: u64 = 4;

/// A private anonymous hugetlb mapping of 2 MiB pages, unmapped on drop where still mapped.
struct HugeMap {
    range: Range,
    /// Which of the huge pages are still mapped.
    mapped: Vec<bool>,
}

impl HugeMap {
    fn new(pages: u64) -> io::Result<HugeMap> {
        Ok(HugeMap {
            range: map_2m(pages * HUGE)?,
            mapped: vec![true; pages as usize],
        })
    }

    fn page(&self, i: u64) -> Range {
        Range::with_len(self.range.start() + i * HUGE, HUGE).unwrap()
    }

    fn unmap(&mut self, i: u64) -> io::Result<()> {
        let r = self.page(i);
        // SAFETY: the mapping is test memory that no Rust object lives in or refers into.
        if unsafe { libc::munmap(r.start() as *mut libc::c_void, r.len() as usize) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.mapped[i as usize] = false;
        Ok(())
    }

    fn dontneed(&self, i: u64) -> io::Result<()> {
        let r = self.page(i);
        // SAFETY: as for `unmap`: dropping the contents of test memory affects no Rust object.
        let rc = unsafe {
            libc::madvise(
                r.start() as *mut libc::c_void,
                r.len() as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for HugeMap {
    fn drop(&mut self) {
        for i in 0..self.mapped.len() as u64 {
            if self.mapped[i as usize] {
                let _ = self.unmap(i);
            }
        }
    }
}

#[test]
fn hugetlb_pages_give_one_invalidation_per_event() {
    // Dropped last: the pool shrinks back only once the pages are unmapped. Growing it is
    // best effort: without huge pages the test proves the mmap fails instead.
    let _pool = HugetlbPool::grow(WANT_FREE)
        .inspect(|pool| println!("hugetlb: pool grown: {:?}", pool.resized()))
        .inspect_err(|e| println!("hugetlb: {e:?}"))
        .ok();
    let free = available_2m();
    let mm = ProcessMm::new().expect("userfaultfd available");
    // Dropped first, while the monitor still reads the UNMAP events its munmap causes.
    let mut map = match HugeMap::new(2) {
        Ok(map) => map,
        Err(e) => {
            // Unavailable: prove it, rather than pass without checking anything.
            let no_hugetlb = !std::path::Path::new(POOL_2M).exists();
            let expected = if no_hugetlb {
                [libc::ENOMEM, libc::ENOSYS, libc::EINVAL].as_slice()
            } else {
                [libc::ENOMEM].as_slice()
            };
            assert!(
                e.raw_os_error().is_some_and(|c| expected.contains(&c)),
                "MAP_HUGETLB failed with {e}, not for want of huge pages"
            );
            assert!(
                free < 2,
                "{free} huge pages are free, yet a 4 MiB MAP_HUGETLB mmap failed: {e}"
            );
            println!(
                "hugetlb: not available ({free} free 2 MiB pages even after trying to reserve \
                 {WANT_FREE}; MAP_HUGETLB fails with {e}): the scenario was checked as unavailable"
            );
            return;
        }
    };
    println!(
        "hugetlb: available ({free} free 2 MiB pages), mapped {}",
        map.range
    );
    let range = map.range;
    assert_eq!(
        range.start() % HUGE,
        0,
        "hugetlb mappings are 2 MiB aligned"
    );

    let mirror = Arc::new(TestMirror::new(Owner(0x4a9e)));
    let sub = mm.notifier().insert(range, mirror.clone()).unwrap();
    mirror.fault(&sub, &mm, range, true).unwrap();
    {
        let table = mirror.table.lock();
        assert_eq!(
            table.entries.len() as u64,
            range.pages(),
            "every page mapped"
        );
        for i in 0..2 {
            let base = map.page(i).start();
            let es: Vec<u64> = (0..PER_HUGE)
                .map(|k| table.entries[&(base + k * PAGE_SIZE)])
                .collect();
            for (k, &e) in es.iter().enumerate() {
                assert_eq!(entry::order(e), 9, "entry {k} of huge page {i}: {e:#x}");
                assert!(entry::is_writable(e), "entry {k} of huge page {i}: {e:#x}");
            }
            let first = entry::pfn(es[0]);
            println!("hugetlb: huge page {i} at frame {first:#x} (0: frames hidden)");
            if first == 0 {
                // Frame numbers hidden (no CAP_SYS_ADMIN): hidden for every page.
                assert!(
                    es.iter().all(|&e| entry::pfn(e) == 0),
                    "huge page {i}: some frames hidden, some not"
                );
            } else {
                assert_eq!(
                    first % PER_HUGE,
                    0,
                    "huge page {i} starts at frame {first:#x}"
                );
                for (k, &e) in es.iter().enumerate() {
                    assert_eq!(
                        entry::pfn(e),
                        first + k as u64,
                        "huge page {i}: frame of page {k} not contiguous"
                    );
                }
            }
        }
        assert!(table.invalidations.is_empty(), "{:?}", table.invalidations);
    }

    // munmap of the second huge page: one Unmap of exactly it.
    let second = map.page(1);
    map.unmap(1).unwrap();
    assert_eq!(invalidations(&mirror, 1), vec![(second, Event::Unmap)]);
    assert_eq!(
        mirror.table.lock().entries.len() as u64,
        PER_HUGE,
        "the first huge page is still mirrored"
    );

    // madvise(DONTNEED) of the first: one Clear of exactly it.
    let first = map.page(0);
    map.dontneed(0).unwrap();
    assert_eq!(
        invalidations(&mirror, 2),
        vec![(second, Event::Unmap), (first, Event::Clear)]
    );
    assert!(mirror.table.lock().entries.is_empty());
    let stats = mm.stats();
    assert_eq!(
        (stats.unmap_events, stats.remove_events),
        (1, 1),
        "{stats:?}"
    );
    drop(sub);
}
