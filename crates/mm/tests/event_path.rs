//! Regression tests against the real kernel for the event-path defects of issue 15 that are
//! about what the event path records: expectations that outlived the SVM API call and swallowed
//! later real events (defect 4), the API mremap invalidating a range that still exists when it
//! grows in place (defect 7), and mappings another userfaultfd owns mirrored silently without
//! events (defect 5). The monitor's failures and pages brought back from a device are in
//! `bring_back.rs`, the madvise hold (defect 8) in `madvise_hold.rs`.
//!
//! Every test here was run on the code before the fixes (c326c91) and the failure it gave there
//! is quoted in its documentation.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use svmirror_core::testing::TestMirror;
use svmirror_core::{Error, Event, Owner, PageSource, Range};
use svmirror_mm::{MmError, ProcessMm, Unregistrable};
use svmirror_testsupport::serial;

#[path = "support/fixture.rs"]
mod fixture;
use fixture::*;

/// A plain munmap of the whole buffer (made after an SVM API call on it) must reach the
/// mirror as one `Unmap` and take every entry away.
fn assert_plain_munmap_reaches_the_mirror(f: &Fixture, why: &str) {
    assert_eq!(sys_munmap(f.buf.start(), f.buf.len()), 0);
    let got = invalidations(&f.mirror, 1);
    assert_eq!(got, vec![(f.buf, Event::Unmap)], "{why}");
    assert!(
        f.mirror.table.lock().entries.is_empty(),
        "the device kept entries for unmapped pages"
    );
}

/// Defect 4 (issue 15): an SVM API call whose syscall fails leaves no expectation behind.
///
/// `ProcessMm::mremap` of the buffer to 100 TiB with `may_move`: the kernel refuses it in place
/// and then moving (ENOMEM both times: no room, no memory to account it), after the call
/// recorded the REMAP and UNMAP it expected of the move (a final ENOMEM shows the move was
/// tried: any other error in place is returned at once). The program then munmaps the buffer with plain libc: the mirror
/// (faulted in again after the failed call) must get that `Unmap` and lose its entries.
///
/// Seen failing on the old code (c326c91): `assertion `left == right` failed: the munmap after a
/// failed API mremap reached the mirror`, `left: []`,
/// `right: [(0x210000000000..0x210000004000, Unmap)]` (the leftover UNMAP expectation, kept up
/// to one second, swallowed the real event).
#[test]
fn a_failed_api_mremap_leaves_no_expectation_behind() {
    let _s = serial();
    let f = fixture_far(4, 0x2100_0000_0000);
    // SAFETY: nothing in Rust refers into the buffer; the call fails and moves nothing.
    let e = unsafe { f.mm.mremap(f.buf, 100 << 40, true) }.unwrap_err();
    assert!(
        matches!(&e, MmError::Syscall { source, .. } if source.raw_os_error() == Some(libc::ENOMEM)),
        "{e:?}"
    );
    f.refault_and_forget();
    assert_plain_munmap_reaches_the_mirror(
        &f,
        "the munmap after a failed API mremap reached the mirror",
    );
}

/// Defect 4 (issue 15): an SVM API mremap that may move but grows in place (so the kernel sends
/// neither the REMAP nor the UNMAP a move would) leaves no expectation behind.
///
/// After `ProcessMm::mremap(buf, 2 * len, true)` grew the buffer in place, the program munmaps
/// the old range with plain libc: the mirror (faulted in again, for the old code's sake, which
/// had invalidated it) must get that `Unmap` and lose its entries.
///
/// Seen failing on the old code (c326c91): `assertion `left == right` failed: the munmap after
/// an API mremap that grew in place reached the mirror`, `left: []`,
/// `right: [(0x220000000000..0x220000002000, Unmap)]`.
#[test]
fn an_api_mremap_grown_in_place_leaves_no_expectation_behind() {
    let _s = serial();
    let f = fixture_far(2, 0x2200_0000_0000);
    // SAFETY: nothing in Rust refers into the buffer; there is room after it, so it grows in
    // place.
    let grown = unsafe { f.mm.mremap(f.buf, 2 * f.buf.len(), true) }.unwrap();
    assert_eq!(
        grown,
        Range::with_len(f.buf.start(), 2 * f.buf.len()).unwrap(),
        "grew in place"
    );
    f.refault_and_forget();
    assert_plain_munmap_reaches_the_mirror(
        &f,
        "the munmap after an API mremap that grew in place reached the mirror",
    );
    assert_eq!(sys_munmap(f.buf.end(), f.buf.len()), 0);
}

/// Defect 4 (issue 15): the REMAP handler expects no UNMAP the kernel may not send.
///
/// A plain libc `mremap(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP)` moves the buffer's
/// pages away and leaves the old range mapped (empty), so the kernel sends a REMAP and no UNMAP.
/// The mirror gets the `Unmap` of the old range from the REMAP; it then faults the (still mapped)
/// old range in again, and the program munmaps it: that real `Unmap` must reach the mirror.
///
/// Seen failing on the old code (c326c91): `assertion `left == right` failed: the munmap of the
/// range a DONTUNMAP remap left behind reached the mirror`, `left: []`,
/// `right: [(0x230000000000..0x230000004000, Unmap)]` (the REMAP handler had recorded an UNMAP
/// of the old range, which swallowed this one).
#[test]
fn a_dontunmap_remap_leaves_no_expectation_behind() {
    let _s = serial();
    let f = fixture_far(4, 0x2300_0000_0000);
    let dst = Range::with_len(0x2380_0000_0000, f.buf.len()).unwrap();
    assert_eq!(
        sys_mmap(
            dst.start(),
            dst.len(),
            libc::PROT_NONE,
            libc::MAP_FIXED_NOREPLACE
        ),
        dst.start(),
        "a free destination"
    );
    // SAFETY: nothing in Rust refers into either range; the destination is our own reservation,
    // which MREMAP_FIXED replaces.
    let p = unsafe {
        libc::mremap(
            f.buf.start() as *mut _,
            f.buf.len() as usize,
            f.buf.len() as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
            dst.start() as *mut libc::c_void,
        )
    };
    assert_eq!(p as u64, dst.start(), "{}", std::io::Error::last_os_error());
    assert_eq!(
        invalidations(&f.mirror, 1),
        vec![(f.buf, Event::Unmap)],
        "the REMAP took the old range from the mirror"
    );
    f.refault_and_forget();
    assert_plain_munmap_reaches_the_mirror(
        &f,
        "the munmap of the range a DONTUNMAP remap left behind reached the mirror",
    );
    assert_eq!(sys_munmap(dst.start(), dst.len()), 0);
}

/// Defect 7 (issue 15): `ProcessMm::mremap` growing in place (with `may_move`) invalidates
/// nothing: every page that existed is still there, at the same address.
///
/// Checks, as soon as the call returns (the API's invalidations are made inside the call, and
/// growing in place raises no userfaultfd event), that the mirror saw no invalidation and kept
/// all its entries.
///
/// Seen failing on the old code (c326c91): `assertion `left == right` failed: growing in place
/// invalidated nothing`, `left: [(0x240000000000..0x240000002000, Unmap)]`, `right: []`.
#[test]
fn an_api_mremap_growing_in_place_invalidates_nothing() {
    let _s = serial();
    let f = fixture_far(2, 0x2400_0000_0000);
    // SAFETY: nothing in Rust refers into the buffer; there is room after it.
    let grown = unsafe { f.mm.mremap(f.buf, 2 * f.buf.len(), true) }.unwrap();
    assert_eq!(
        grown,
        Range::with_len(f.buf.start(), 2 * f.buf.len()).unwrap(),
        "grew in place"
    );
    let t = f.mirror.table.lock();
    assert_eq!(
        t.invalidations,
        vec![],
        "growing in place invalidated nothing"
    );
    assert_eq!(
        t.entries.len() as u64,
        f.buf.pages(),
        "the mirror kept its entries"
    );
    drop(t);
    assert_eq!(sys_munmap(grown.start(), grown.len()), 0);
}

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// Maps `pages` private anonymous pages at `hint`, all populated, and registers them with a
/// userfaultfd of their own (MISSING mode), as another library in the process might. Returns
/// that userfaultfd (closing it ends the registration) and the range.
fn foreign_uffd_mapping(pages: u64, hint: u64) -> (OwnedFd, Range) {
    let len = pages * PAGE;
    let addr = sys_mmap(
        hint,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_FIXED_NOREPLACE,
    );
    assert_eq!(addr, hint, "address {hint:#x} is free in a test process");
    // Populated before it is registered: nothing ever faults on the foreign userfaultfd, which
    // nobody reads.
    for i in 0..pages {
        write_byte(addr + i * PAGE, 1);
    }
    // SAFETY: userfaultfd takes its flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: the syscall just returned this fd to us and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: 0xAA,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    let mut reg = UffdioRegister {
        start: addr,
        len,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`, which `reg` is;
    // the range is our own fresh mapping.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister,
        )
    };
    assert_eq!(
        rc,
        0,
        "UFFDIO_REGISTER: {}",
        std::io::Error::last_os_error()
    );
    (fd, Range::with_len(addr, len).unwrap())
}

/// Defect 5 (issue 15): a mapping another userfaultfd owns (UFFDIO_REGISTER answers EBUSY) is
/// never mirrored without events unless the caller chose that.
///
/// With the default policy (`Unregistrable::Refuse`) a device fault there fails with
/// `Error::Source` holding `MmError::Register` (EBUSY), the mirror gets no entry, and
/// `MmStats::unregistrable` counts it once (a second lookup, through `area`, is refused again
/// without counting twice). With `Unregistrable::MirrorWithoutEvents` a fault on another such
/// mapping is mirrored and counted in `unregistrable` and `mirrored_without_events`.
///
/// Seen failing on the old code (c326c91; adapted: `Unregistrable`, `set_unregistrable` and the
/// new counters did not exist, so the test stopped after the first check there): `a mapping
/// another userfaultfd owns is refused to devices by default: Ok(FaultStats { passes: 1, faults:
/// 0, retries: 0 })`. The old `ensure_registered` took EBUSY for a raced mapping change, logged
/// it, recorded and counted nothing, and the mapping was mirrored without events.
#[test]
fn a_mapping_another_userfaultfd_owns_is_refused_unless_chosen() {
    let _s = serial();
    let mm = ProcessMm::new().expect("userfaultfd available");
    assert_eq!(mm.unregistrable(), Unregistrable::Refuse, "the default");
    let (_other_a, a) = foreign_uffd_mapping(2, 0x2500_0000_0000);
    let mirror_a = Arc::new(TestMirror::new(Owner(0xa)));
    let sub_a = mm.notifier().insert(a, mirror_a.clone()).unwrap();
    let e = mirror_a.fault(&sub_a, &mm, a, true);
    let e = match e {
        Err(e) => e,
        Ok(s) => {
            panic!("a mapping another userfaultfd owns is refused to devices by default: Ok({s:?})")
        }
    };
    let Error::Source { source, .. } = &e else {
        panic!("a typed registration error: {e}");
    };
    assert!(
        matches!(
            source.downcast_ref::<MmError>(),
            Some(MmError::Register { range, source })
                if *range == a && source.raw_os_error() == Some(libc::EBUSY)
        ),
        "MmError::Register with EBUSY over the mapping: {source}"
    );
    assert!(mirror_a.table.lock().entries.is_empty(), "nothing mirrored");
    let stats = mm.stats();
    assert_eq!((stats.unregistrable, stats.mirrored_without_events), (1, 0));
    // Refused again from the record, not counted again.
    assert!(mm.area(a.start(), a.end()).is_err(), "refused again");
    assert_eq!(mm.stats().unregistrable, 1);

    mm.set_unregistrable(Unregistrable::MirrorWithoutEvents);
    let (_other_b, b) = foreign_uffd_mapping(2, 0x2600_0000_0000);
    let mirror_b = Arc::new(TestMirror::new(Owner(0xb)));
    let sub_b = mm.notifier().insert(b, mirror_b.clone()).unwrap();
    mirror_b
        .fault(&sub_b, &mm, b, true)
        .expect("mirrored without events, by the caller's choice");
    assert_eq!(mirror_b.table.lock().entries.len() as u64, b.pages());
    let stats = mm.stats();
    assert_eq!((stats.unregistrable, stats.mirrored_without_events), (2, 1));
    drop((sub_a, sub_b));
    assert_eq!(sys_munmap(a.start(), a.len()), 0);
    assert_eq!(sys_munmap(b.start(), b.len()), 0);
}

/// A refusal is not remembered past its mapping (found while writing the defect 5 test).
///
/// A mapping another userfaultfd owns is refused (as it should be). A mapping svmirror could
/// not register sends it no event when it goes, so after the program munmaps it and maps
/// fresh, ordinary anonymous memory at the same address, nothing tells svmirror the refusal no
/// longer applies. `ensure_registered` therefore never answers from a refusal record: a device
/// fault on the fresh mapping registers it, and its munmap reaches the mirror.
///
/// Seen failing when refusals were answered from `Book::refused`: "a fresh mapping where a
/// refused one was is registered: Err(Source { .., source: Register { .., source: Os { code:
/// 22, kind: InvalidInput, .. } } })" (and with `Unregistrable::MirrorWithoutEvents` the fresh
/// mapping was mirrored without events, uncounted).
#[test]
fn a_refusal_record_does_not_outlive_its_mapping() {
    let _s = serial();
    let mm = ProcessMm::new().expect("userfaultfd available");
    let (other, a) = foreign_uffd_mapping(2, 0x2700_0000_0000);
    let mirror = Arc::new(TestMirror::new(Owner(0xc)));
    let sub = mm.notifier().insert(a, mirror.clone()).unwrap();
    assert!(mirror.fault(&sub, &mm, a, true).is_err(), "refused");
    // The other userfaultfd goes, and so does its mapping; fresh memory takes the address.
    drop(other);
    assert_eq!(sys_munmap(a.start(), a.len()), 0);
    let p = sys_mmap(
        a.start(),
        a.len(),
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_FIXED_NOREPLACE,
    );
    assert_eq!(p, a.start());
    let r = mirror.fault(&sub, &mm, a, true);
    assert!(
        r.is_ok(),
        "a fresh mapping where a refused one was is registered: {r:?}"
    );
    assert_eq!(mm.stats().registrations, 1);
    assert_eq!(sys_munmap(a.start(), a.len()), 0);
    assert_eq!(invalidations(&mirror, 1), vec![(a, Event::Unmap)]);
    assert!(mirror.table.lock().entries.is_empty());
}
