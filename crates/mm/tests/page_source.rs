//! ProcessPageSource against real memory of this process: mmap'd buffers, mprotect, munmap,
//! fork, THP, and the core's fault loop on top.
#![cfg(target_os = "linux")]

use std::sync::Arc;

use svmirror_core::testing::TestMirror;
use svmirror_core::{
    AreaKind, CpuPte, Error, Event, FaultRequest, Notifier, NotifierRange, Owner, PAGE_SIZE,
    PageSource, Range, entry, range_fault,
};
use svmirror_mm::{PageSourceFeatures, ProcessPageSource};
use svmirror_testsupport::serial;

mod common;
use common::*;

#[test]
fn the_full_source_uses_this_kernels_mechanisms() {
    let _g = serial();
    let f = ProcessPageSource::new().unwrap().features();
    // This project's machines run Linux 6.18: both ioctls exist.
    assert!(f.procmap_query && f.pagemap_scan, "{f:?}");
    let none = PageSourceFeatures {
        procmap_query: false,
        pagemap_scan: false,
        pfn_visible: false,
    };
    assert_eq!(
        ProcessPageSource::restricted(none).unwrap().features(),
        none
    );
}

#[test]
fn untouched_anonymous_pages_are_none_and_read_fault_maps_the_zero_page() {
    let _g = serial();
    for (name, source) in sources() {
        let m = Mapping::anon(8, RW);
        assert!(
            snap(&source, m.addr(), 8)
                .iter()
                .all(|p| *p == CpuPte::None),
            "{name}"
        );
        source.fault(m.range(), false).unwrap();
        for (i, pte) in snap(&source, m.addr(), 8).into_iter().enumerate() {
            let CpuPte::Present {
                write, zero, order, ..
            } = pte
            else {
                panic!("{name}: page {i} not present: {pte:?}");
            };
            assert!(!write, "{name}: zero page {i} reported writable");
            assert_eq!(zero, sees_zero(&source), "{name}: page {i}");
            assert_eq!(order, 0, "{name}: page {i}");
        }
    }
}

#[test]
fn write_fault_and_cpu_write_give_writable_private_pages() {
    let _g = serial();
    for (name, source) in sources() {
        let faulted = Mapping::anon(4, RW);
        source.fault(faulted.range(), true).unwrap();
        let written = Mapping::anon(4, RW);
        (0..4).for_each(|i| written.write(i, 0xa5));
        // A zero page that gets written becomes a fresh page too.
        let upgraded = Mapping::anon(4, RW);
        source.fault(upgraded.range(), false).unwrap();
        source.fault(upgraded.range(), true).unwrap();
        for m in [&faulted, &written, &upgraded] {
            for pte in snap(&source, m.addr(), 4) {
                let CpuPte::Present {
                    pfn, write, zero, ..
                } = pte
                else {
                    panic!("{name}: not present: {pte:?}");
                };
                assert!(write && !zero, "{name}: {pte:?}");
                assert_eq!(pfn != 0, source.features().pfn_visible, "{name}: {pte:?}");
            }
        }
    }
}

#[test]
fn swapped_out_or_dropped_pages_are_none_again() {
    let _g = serial();
    let source = ProcessPageSource::new().unwrap();
    let m = Mapping::anon(2, RW);
    source.fault(m.range(), true).unwrap();
    m.advise(libc::MADV_DONTNEED);
    assert_eq!(snap(&source, m.addr(), 2), vec![CpuPte::None; 2]);
}

#[test]
fn prot_none_area_is_unreadable_and_faults_are_bad_addresses() {
    let _g = serial();
    for (name, source) in sources() {
        let m = Mapping::anon(2, libc::PROT_NONE);
        let area = source.area(m.addr(), m.range().end()).unwrap();
        assert_eq!(
            area.kind,
            AreaKind::Mapped {
                read: false,
                write: false
            },
            "{name}"
        );
        assert!(area.end >= m.range().end(), "{name}: {area:?}");
        for write in [false, true] {
            let err = source.fault(m.range(), write).unwrap_err();
            assert!(
                matches!(err, Error::BadAddress { addr } if addr == m.addr()),
                "{name}: {err:?}"
            );
        }
    }
}

#[test]
fn write_fault_on_read_only_mapping_is_refused_at_the_first_read_only_page() {
    let _g = serial();
    for (name, source) in sources() {
        let ro = Mapping::anon(2, libc::PROT_READ);
        assert_eq!(
            source.area(ro.addr(), ro.range().end()).unwrap().kind,
            AreaKind::Mapped {
                read: true,
                write: false
            }
        );
        let err = source.fault(ro.range(), true).unwrap_err();
        assert!(
            matches!(err, Error::WriteToReadOnly { addr } if addr == ro.addr()),
            "{name}: {err:?}"
        );
        // Reading is fine: zero pages, read-only.
        source.fault(ro.range(), false).unwrap();
        assert!(
            snap(&source, ro.addr(), 2)
                .iter()
                .all(|p| matches!(p, CpuPte::Present { write: false, .. })),
            "{name}"
        );

        // Two writable pages, then two read-only ones: the error names the third page.
        let mixed = Mapping::anon(4, RW);
        mixed.protect(2, 2, libc::PROT_READ);
        let err = source.fault(mixed.range(), true).unwrap_err();
        assert!(
            matches!(err, Error::WriteToReadOnly { addr } if addr == mixed.page(2)),
            "{name}: {err:?}"
        );
        assert!(matches!(err.errno(), libc::EPERM));
        // The pages before it did come in.
        assert!(
            snap(&source, mixed.addr(), 2)
                .iter()
                .all(|p| matches!(p, CpuPte::Present { write: true, .. })),
            "{name}"
        );
    }
}

#[test]
fn unmapped_middle_page_is_a_hole_up_to_the_next_mapping() {
    let _g = serial();
    for (name, source) in sources() {
        let m = Mapping::anon(3, RW);
        m.write(0, 1);
        m.write(2, 1);
        m.unmap_page(1);
        let limit = m.range().end();

        let first = source.area(m.page(0), limit).unwrap();
        assert_eq!(first.end, m.page(1), "{name}");
        assert!(matches!(
            first.kind,
            AreaKind::Mapped {
                read: true,
                write: true
            }
        ));

        let hole = source.area(m.page(1), limit).unwrap();
        assert_eq!(hole.kind, AreaKind::Hole, "{name}");
        assert_eq!(hole.end, m.page(2), "{name}");

        // The limit clamps both kinds of answer.
        let half = source.area(m.page(0), m.page(0) + PAGE_SIZE).unwrap();
        assert_eq!(half.end, m.page(1), "{name}");
        let clamped = source.area(m.page(2), m.page(2) + PAGE_SIZE).unwrap();
        assert_eq!(clamped.end, m.page(2) + PAGE_SIZE, "{name}");

        // Snapshot across the hole; faults into it are bad addresses at the hole.
        let ptes = snap(&source, m.addr(), 3);
        assert!(
            matches!(ptes[0], CpuPte::Present { write: true, .. }),
            "{name}"
        );
        assert_eq!(ptes[1], CpuPte::None, "{name}");
        assert!(
            matches!(ptes[2], CpuPte::Present { write: true, .. }),
            "{name}"
        );
        let err = source.fault(m.range(), false).unwrap_err();
        assert!(
            matches!(err, Error::BadAddress { addr } if addr == m.page(1)),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn fault_past_the_end_of_a_file_is_a_bad_address_at_the_first_page_past_it() {
    let _g = serial();
    // SAFETY: creates a new anonymous file from a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"svmirror-mm-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: sizes the file this test just created to one page.
    assert_eq!(unsafe { libc::ftruncate(fd, PAGE_SIZE as i64) }, 0);
    // SAFETY: maps 3 pages of the file at an address the kernel picks; it aliases nothing.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), 3 * PAGE, RW, libc::MAP_SHARED, fd, 0) };
    assert_ne!(ptr, libc::MAP_FAILED);
    let m = Mapping { ptr, len: 3 * PAGE };
    // SAFETY: the mapping keeps the file alive; the descriptor is no longer needed.
    unsafe { libc::close(fd) };
    for (name, source) in sources() {
        let area = source.area(m.addr(), m.range().end()).unwrap();
        assert_eq!(
            area.kind,
            AreaKind::Mapped {
                read: true,
                write: true
            },
            "{name}"
        );
        for write in [false, true] {
            let err = source.fault(m.range(), write).unwrap_err();
            assert!(
                matches!(err, Error::BadAddress { addr } if addr == m.page(1)),
                "{name}: {err:?}"
            );
        }
        // Page 0 came in: a shared page, writable after the write fault.
        let ptes = snap(&source, m.addr(), 3);
        assert!(
            matches!(
                ptes[0],
                CpuPte::Present {
                    write: true,
                    zero: false,
                    ..
                }
            ),
            "{name}"
        );
        assert_eq!(ptes[1..], [CpuPte::None; 2], "{name}");
    }
}

#[test]
fn vvar_is_an_io_area() {
    let _g = serial();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let vvar = maps
        .lines()
        .find(|l| l.ends_with("[vvar]"))
        .expect("[vvar] is mapped");
    let (start, rest) = vvar.split_once('-').unwrap();
    let start = u64::from_str_radix(start, 16).unwrap();
    let end = u64::from_str_radix(rest.split_once(' ').unwrap().0, 16).unwrap();
    for (name, source) in sources() {
        let area = source.area(start, end).unwrap();
        assert_eq!(
            area,
            svmirror_core::Area {
                end,
                kind: AreaKind::Io
            },
            "{name}"
        );
        let err = source
            .fault(Range::new(start, end).unwrap(), false)
            .unwrap_err();
        assert!(matches!(err, Error::BadAddress { .. }), "{name}: {err:?}");
        assert!(snap(&source, start, 1).iter().all(|p| *p == CpuPte::None));
    }
}

#[test]
fn one_source_serves_several_threads() {
    let _g = serial();
    let source = Arc::new(ProcessPageSource::new().unwrap());
    let m = Mapping::anon(64, RW);
    let range = m.range();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let source = Arc::clone(&source);
            std::thread::spawn(move || {
                let quarter =
                    Range::with_len(range.start() + t * 16 * PAGE_SIZE, 16 * PAGE_SIZE).unwrap();
                source.fault(quarter, t % 2 == 0).unwrap();
                let mut out = [CpuPte::None; 16];
                source.snapshot(quarter.start(), &mut out).unwrap();
                out.iter()
                    .all(|p| matches!(p, CpuPte::Present { write, .. } if *write == (t % 2 == 0)))
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap());
    }
    assert!(format!("{source:?}").len() < 400, "Debug stays short");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let _g = serial();
    let source = ProcessPageSource::new().unwrap();
    assert!(matches!(
        source.area(0x1000, 0x1000),
        Err(Error::EmptyRange { .. })
    ));
    assert!(matches!(
        source.area(0x1000, 0x1800),
        Err(Error::UnalignedRange { .. })
    ));
    let mut one = [CpuPte::None];
    assert!(matches!(
        source.snapshot(0x800, &mut one),
        Err(Error::UnalignedRange { .. })
    ));
    source.snapshot(0x800, &mut []).unwrap();
    // Kernel addresses and the top of the address space: no mapping a device may use.
    let kernel = Range::with_len(0xffff_8000_0000_0000, 4 * PAGE_SIZE).unwrap();
    assert_eq!(
        source.area(kernel.start(), kernel.end()).unwrap().kind,
        AreaKind::Hole
    );
    assert!(matches!(
        source.fault(kernel, true),
        Err(Error::BadAddress { .. })
    ));
    let top = Range::new(u64::MAX - 2 * PAGE_SIZE + 1, u64::MAX - PAGE_SIZE + 1).unwrap();
    assert!(source.area(top.start(), top.end()).is_ok());
    assert!(matches!(
        source.fault(top, false),
        Err(Error::BadAddress { .. })
    ));
    let mut many = [CpuPte::None; 4];
    source
        .snapshot(top.start() - 2 * PAGE_SIZE, &mut many[..3])
        .unwrap();
    assert!(many.iter().all(|p| *p == CpuPte::None));
}

#[test]
fn fork_leaves_private_pages_copy_on_write_until_written_again() {
    let _g = serial();
    for (name, source) in sources() {
        let private = Mapping::anon(3, RW);
        (0..3).for_each(|i| private.write(i, 7));
        let shared = Mapping::new(1, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS);
        shared.write(0, 7);
        let before = snap(&source, private.addr(), 3);
        assert!(
            before
                .iter()
                .all(|p| matches!(p, CpuPte::Present { write: true, .. }))
        );

        let child = Child::fork();
        for (i, pte) in snap(&source, private.addr(), 3).into_iter().enumerate() {
            assert!(
                matches!(
                    pte,
                    CpuPte::Present {
                        write: false,
                        zero: false,
                        ..
                    }
                ),
                "{name}: page {i} shared with the child must be read-only: {pte:?}"
            );
            assert_eq!(
                pfn_of(pte),
                pfn_of(before[i]),
                "{name}: still the same page"
            );
        }
        // A shared mapping stays writable: parent and child write the same page.
        assert!(
            matches!(
                snap(&source, shared.addr(), 1)[0],
                CpuPte::Present { write: true, .. }
            ),
            "{name}"
        );

        // The parent writes page 0 (CPU) and write-faults page 1: both get their own copy.
        private.write(0, 8);
        source.fault(private.pages(1, 1), true).unwrap();
        let after = snap(&source, private.addr(), 3);
        for i in 0..2 {
            assert!(
                matches!(after[i], CpuPte::Present { write: true, .. }),
                "{name}: page {i}: {:?}",
                after[i]
            );
            if source.features().pfn_visible {
                assert_ne!(
                    pfn_of(after[i]),
                    pfn_of(before[i]),
                    "{name}: page {i} copied"
                );
            }
        }
        assert!(
            matches!(after[2], CpuPte::Present { write: false, .. }),
            "{name}"
        );
        drop(child);
    }
}

#[test]
fn fully_written_thp_region_reports_order_9_when_the_kernel_gave_a_thp() {
    let _g = serial();
    let mode = thp_mode();
    let region = HugeRegion::new();
    region.write_all();
    let got_thp = anon_huge_bytes(region.start) >= HUGE;
    if mode == "never" {
        assert!(!got_thp, "THP disabled yet AnonHugePages counts one");
    }
    eprintln!("THP mode {mode}, THP given: {got_thp}");
    for (name, source) in sources() {
        let ptes = snap(&source, region.start, HUGE_PAGES);
        let expected = if got_thp && source.features().pagemap_scan {
            9
        } else {
            0
        };
        let mut pfns = Vec::new();
        for (i, pte) in ptes.into_iter().enumerate() {
            let CpuPte::Present {
                pfn,
                write,
                zero,
                order,
            } = pte
            else {
                panic!("{name}: page {i} not present: {pte:?}");
            };
            assert!(write && !zero, "{name}: page {i}: {pte:?}");
            assert_eq!(order, expected, "{name}: page {i}");
            pfns.push(pfn);
        }
        if got_thp && source.features().pfn_visible {
            assert_eq!(pfns[0] % HUGE_PAGES as u64, 0, "{name}: head frame aligned");
            assert!(
                pfns.windows(2).all(|w| w[1] == w[0] + 1),
                "{name}: contiguous frames"
            );
        }
    }
}

#[test]
fn read_faulted_thp_region_is_zero_and_read_only() {
    let _g = serial();
    let region = HugeRegion::new();
    let never = thp_mode() == "never";
    for (name, source) in sources() {
        source.fault(region.range(), false).unwrap();
        for (i, pte) in snap(&source, region.start, HUGE_PAGES)
            .into_iter()
            .enumerate()
        {
            let CpuPte::Present {
                write, zero, order, ..
            } = pte
            else {
                panic!("{name}: page {i} not present: {pte:?}");
            };
            assert!(!write, "{name}: page {i}: {pte:?}");
            // The huge zero page (order 9) when THP is on and the kernel has one to give, else
            // base zero pages. PAGEMAP_SCAN flags both on this kernel (6.18); kernels before
            // the 2025 `is_huge_zero_pmd` fix flag only the base one.
            assert!(
                order == 0 || (order == 9 && !never),
                "{name}: page {i}: {pte:?}"
            );
            if source.features().pagemap_scan {
                assert!(zero, "{name}: page {i}: {pte:?}");
            }
        }
    }
}

#[test]
fn core_fault_loop_mirrors_a_real_buffer_writable() {
    let _g = serial();
    for (name, source) in sources() {
        let m = Mapping::anon(40, RW);
        (0..40).step_by(3).for_each(|i| m.write(i, 1));
        m.protect(0, 40, libc::PROT_READ);
        m.protect(0, 40, RW);
        let notifier = Notifier::new();
        let mirror = Arc::new(TestMirror::new(Owner(1)));
        let sub = notifier.insert(m.range(), mirror.clone()).unwrap();

        let stats = mirror.fault(&sub, &source, m.range(), true).unwrap();
        assert!(stats.faults >= 1, "{name}: untouched pages needed a fault");
        for i in 0..40 {
            let e = mirror
                .entry(m.page(i))
                .unwrap_or_else(|| panic!("{name}: page {i}"));
            assert!(entry::is_writable(e), "{name}: page {i}: {e:#x}");
            assert_eq!(e & entry::ZERO, 0, "{name}: page {i}");
            assert_eq!(entry::order(e), 0, "{name}: page {i}");
        }
        // Faulting again finds everything writable: one pass, no fault.
        let again = mirror.fault(&sub, &source, m.range(), true).unwrap();
        assert_eq!((again.passes, again.faults), (1, 0), "{name}");

        // munmap through the notifier: the device loses its entries first.
        let inv = notifier
            .invalidate_range_start(NotifierRange::new(m.range(), Event::Unmap))
            .unwrap();
        assert!(mirror.entry(m.page(0)).is_none(), "{name}");
        drop(m);
        inv.end();
        sub.remove().unwrap();
    }
}

#[test]
fn core_snapshot_of_a_mixed_range_marks_holes_and_prot_none_as_errors() {
    let _g = serial();
    for (name, source) in sources() {
        // Page 0 written, 1 read-faulted (zero), 2 untouched, 3 unmapped, 4 PROT_NONE.
        let m = Mapping::anon(5, RW);
        m.write(0, 1);
        source.fault(m.pages(1, 1), false).unwrap();
        m.unmap_page(3);
        m.protect(4, 1, libc::PROT_NONE);
        let notifier = Notifier::new();
        let sub = notifier
            .insert(m.range(), Arc::new(TestMirror::new(Owner(2))))
            .unwrap();
        let mut entries = [0u64; 5];
        let seq = sub.read_begin().unwrap();
        range_fault(
            &sub,
            seq,
            &source,
            &mut FaultRequest::snapshot(m.range(), &mut entries),
        )
        .unwrap();
        assert!(entry::is_writable(entries[0]), "{name}: {:#x}", entries[0]);
        assert!(
            entry::is_valid(entries[1]) && !entry::is_writable(entries[1]),
            "{name}"
        );
        assert_eq!(entries[1] & entry::ZERO != 0, sees_zero(&source), "{name}");
        assert_eq!(entries[2], 0, "{name}");
        assert_eq!(entries[3], entry::ERROR, "{name}");
        assert_eq!(entries[4], entry::ERROR, "{name}");

        // Asking for faults: the hole stops it with EFAULT at the hole.
        let seq = sub.read_begin().unwrap();
        let err = range_fault(
            &sub,
            seq,
            &source,
            &mut FaultRequest::fault_all(m.range(), &mut entries, false),
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::BadAddress { addr } if addr == m.page(3)),
            "{name}: {err:?}"
        );
        sub.remove().unwrap();
    }
}
