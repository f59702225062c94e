//! range_fault flag semantics against a table of cases, the walk against that table, and the
//! EBUSY / retry / timeout behaviour of the loop.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::notifier::Notifier;
use crate::range::{Event, NotifierRange};
use crate::testing::{ScriptedPageSource, TestMirror, ZERO_PFN};

const OWNER: Owner = Owner(0xd1);
const OTHER: Owner = Owner(0xd2);
const F: u64 = entry::REQ_FAULT;
const W: u64 = entry::REQ_WRITE;
const BASE: u64 = 0x4000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vma {
    Rw,
    Ro,
    ProtNone,
    Hole,
    Io,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pte {
    None,
    Rw,
    Ro,
    Zero,
    Huge,
    DevOwn,
    DevOther,
}

/// What one page must come out as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Output flags (the bits above the frame number), and whether the frame stays the same.
    Flags {
        flags: u64,
        same_pfn: bool,
    },
    Eperm,
    Efault,
    Invalid,
}

use Want::*;

const fn flags(flags: u64, same_pfn: bool) -> Want {
    Flags { flags, same_pfn }
}

const V: u64 = entry::VALID;
const WR: u64 = entry::WRITE;
const HUGE: u64 = 9 << entry::ORDER_SHIFT;

/// The table: (mapping, CPU entry, request) → result. Read faults on anonymous memory map the
/// zero page; write faults map a fresh frame (the scripted source behaves like Linux here).
const TABLE: &[(Vma, Pte, u64, Want)] = &[
    // Not present: report 0, read-fault to the zero page, write-fault to a fresh page.
    (Vma::Rw, Pte::None, 0, flags(0, true)),
    (Vma::Rw, Pte::None, F, flags(V | entry::ZERO, false)),
    (Vma::Rw, Pte::None, F | W, flags(V | WR, false)),
    (Vma::Ro, Pte::None, F, flags(V | entry::ZERO, false)),
    (Vma::Ro, Pte::None, F | W, Eperm),
    // Present and writable: reported as is, never faulted.
    (Vma::Rw, Pte::Rw, 0, flags(V | WR, true)),
    (Vma::Rw, Pte::Rw, F, flags(V | WR, true)),
    (Vma::Rw, Pte::Rw, F | W, flags(V | WR, true)),
    // Present read-only (copy-on-write): a write request breaks the sharing.
    (Vma::Rw, Pte::Ro, 0, flags(V, true)),
    (Vma::Rw, Pte::Ro, F, flags(V, true)),
    (Vma::Rw, Pte::Ro, F | W, flags(V | WR, false)),
    (Vma::Ro, Pte::Ro, F, flags(V, true)),
    (Vma::Ro, Pte::Ro, F | W, Eperm),
    // Zero page: valid, not writable.
    (Vma::Rw, Pte::Zero, 0, flags(V | entry::ZERO, true)),
    (Vma::Rw, Pte::Zero, F, flags(V | entry::ZERO, true)),
    (Vma::Rw, Pte::Zero, F | W, flags(V | WR, false)),
    // Huge page: order reported in every entry.
    (Vma::Rw, Pte::Huge, 0, flags(V | WR | HUGE, true)),
    (Vma::Rw, Pte::Huge, F | W, flags(V | WR | HUGE, true)),
    // Device-private: the caller's own are reported, never faulted; others are absent.
    (
        Vma::Rw,
        Pte::DevOwn,
        0,
        flags(V | WR | entry::DEVICE_PRIVATE, true),
    ),
    (
        Vma::Rw,
        Pte::DevOwn,
        F | W,
        flags(V | WR | entry::DEVICE_PRIVATE, true),
    ),
    (Vma::Rw, Pte::DevOther, 0, flags(0, true)),
    (Vma::Rw, Pte::DevOther, F, flags(V, false)),
    (Vma::Rw, Pte::DevOther, F | W, flags(V | WR, false)),
    (Vma::Ro, Pte::DevOther, F | W, Eperm),
    // No usable mapping: ERROR when only reporting, EFAULT when a fault is asked.
    (Vma::ProtNone, Pte::None, 0, flags(entry::ERROR, true)),
    (Vma::ProtNone, Pte::None, F, Efault),
    (Vma::Hole, Pte::None, 0, flags(entry::ERROR, true)),
    (Vma::Hole, Pte::None, F, Efault),
    (Vma::Io, Pte::None, 0, flags(entry::ERROR, true)),
    (Vma::Io, Pte::None, F | W, Efault),
    // Malformed request.
    (Vma::Rw, Pte::None, W, Invalid),
];

fn area_kind(v: Vma) -> Option<AreaKind> {
    match v {
        Vma::Rw => Some(AreaKind::Mapped {
            read: true,
            write: true,
        }),
        Vma::Ro => Some(AreaKind::Mapped {
            read: true,
            write: false,
        }),
        Vma::ProtNone => Some(AreaKind::Mapped {
            read: false,
            write: false,
        }),
        Vma::Io => Some(AreaKind::Io),
        Vma::Hole => None,
    }
}

/// Frame number given to the scripted pre-existing page at `addr`.
fn pfn_for(addr: u64) -> u64 {
    0x100_0000 + (addr >> PAGE_SHIFT)
}

fn cpu_pte(p: Pte, addr: u64) -> CpuPte {
    let pfn = pfn_for(addr);
    match p {
        Pte::None => CpuPte::None,
        Pte::Rw => CpuPte::Present {
            pfn,
            write: true,
            zero: false,
            order: 0,
        },
        Pte::Ro => CpuPte::Present {
            pfn,
            write: false,
            zero: false,
            order: 0,
        },
        Pte::Zero => CpuPte::Present {
            pfn: ZERO_PFN,
            write: false,
            zero: true,
            order: 0,
        },
        Pte::Huge => CpuPte::Present {
            pfn,
            write: true,
            zero: false,
            order: 9,
        },
        Pte::DevOwn => CpuPte::DevicePrivate {
            pfn,
            owner: OWNER,
            write: true,
        },
        Pte::DevOther => CpuPte::DevicePrivate {
            pfn,
            owner: OTHER,
            write: true,
        },
    }
}

/// Scripts one page per case at consecutive addresses (a page of each case's mapping kind).
fn script(cases: &[(Vma, Pte, u64)]) -> ScriptedPageSource {
    let src = ScriptedPageSource::new();
    for (i, &(vma, pte, _)) in cases.iter().enumerate() {
        let addr = BASE + ((i as u64) << PAGE_SHIFT);
        if let Some(kind) = area_kind(vma) {
            src.map_area(Range::with_len(addr, PAGE_SIZE).unwrap(), kind);
            if pte != Pte::None {
                src.set_pte(addr, cpu_pte(pte, addr));
            }
        }
    }
    src
}

fn check(addr: u64, pte: Pte, got: u64, want: Want) -> Result<(), String> {
    let Flags { flags, same_pfn } = want else {
        return Err(format!("{addr:#x}: wanted {want:?}, got entry {got:#x}"));
    };
    if got & !entry::PFN_MASK != flags {
        return Err(format!(
            "{addr:#x} ({pte:?}): flags {:#x}, want {flags:#x}",
            got & !entry::PFN_MASK
        ));
    }
    if flags & V != 0 {
        let before = match pte {
            Pte::Zero => ZERO_PFN,
            _ => pfn_for(addr),
        };
        let same = entry::pfn(got) == before;
        let zero_fault = flags & entry::ZERO != 0 && pte == Pte::None;
        if same != same_pfn && !zero_fault {
            return Err(format!(
                "{addr:#x} ({pte:?}): pfn {:#x}, same={same}, want same={same_pfn}",
                entry::pfn(got)
            ));
        }
    }
    Ok(())
}

/// Runs range_fault over the cases, one page each, with per-page requests through the mask.
fn run(cases: &[(Vma, Pte, u64)]) -> (Result<FaultStats>, Vec<u64>) {
    let src = script(cases);
    let range = Range::with_len(BASE, (cases.len() as u64) << PAGE_SHIFT).unwrap();
    let n = Notifier::new();
    let sub = n.insert(range, Arc::new(TestMirror::new(OWNER))).unwrap();
    let mut entries: Vec<u64> = cases.iter().map(|c| c.2).collect();
    let mut req = FaultRequest {
        range,
        entries: &mut entries,
        default_flags: 0,
        pfn_flags_mask: F | W,
        dev_private_owner: Some(OWNER),
    };
    let seq = sub.read_begin().unwrap();
    let res = range_fault(&sub, seq, &src, &mut req);
    (res, entries)
}

#[test]
fn each_table_case_on_a_single_page() {
    for &(vma, pte, req, want) in TABLE {
        let (res, entries) = run(&[(vma, pte, req)]);
        match (want, res) {
            (Eperm, Err(Error::WriteToReadOnly { addr })) => assert_eq!(addr, BASE),
            (Efault, Err(Error::BadAddress { addr })) => assert_eq!(addr, BASE),
            (Invalid, Err(Error::InvalidRequest { addr })) => assert_eq!(addr, BASE),
            (Flags { .. }, Ok(_)) => {
                if let Err(e) = check(BASE, pte, entries[0], want) {
                    panic!("case {vma:?} {pte:?} req {req:#x}: {e}");
                }
            }
            (want, got) => panic!("case {vma:?} {pte:?} req {req:#x}: want {want:?}, got {got:?}"),
        }
    }
}

proptest! {
    /// Any sequence of table cases, walked as one range (across batch boundaries, fault runs and
    /// restarts), gives every page the table's answer; an error is the first erring page's.
    #[test]
    fn walk_agrees_with_the_table(picks in proptest::collection::vec(0..TABLE.len(), 1..200)) {
        let cases: Vec<(Vma, Pte, u64)> = picks.iter().map(|&i| (TABLE[i].0, TABLE[i].1, TABLE[i].2)).collect();
        let (res, entries) = run(&cases);
        let first_err = picks.iter().position(|&i| !matches!(TABLE[i].3, Flags { .. }));
        match first_err {
            None => {
                prop_assert!(res.is_ok(), "{res:?}");
                for (i, &p) in picks.iter().enumerate() {
                    let addr = BASE + ((i as u64) << PAGE_SHIFT);
                    if let Err(e) = check(addr, TABLE[p].1, entries[i], TABLE[p].3) {
                        return Err(TestCaseError::fail(e));
                    }
                }
            }
            Some(i) => {
                let addr = BASE + ((i as u64) << PAGE_SHIFT);
                let ok = match (TABLE[picks[i]].3, &res) {
                    (Eperm, Err(Error::WriteToReadOnly { addr: a })) => *a == addr,
                    (Efault, Err(Error::BadAddress { addr: a })) => *a == addr,
                    (Invalid, Err(Error::InvalidRequest { addr: a })) => *a == addr,
                    _ => false,
                };
                prop_assert!(ok, "page {i}: want {:?}, got {res:?}", TABLE[picks[i]].3);
            }
        }
    }
}

fn anon(src: &ScriptedPageSource, range: Range) {
    src.map_area(
        range,
        AreaKind::Mapped {
            read: true,
            write: true,
        },
    );
}

#[test]
fn one_fault_pass_for_a_whole_unpopulated_range() {
    let src = ScriptedPageSource::new();
    let range = Range::with_len(BASE, 300 * PAGE_SIZE).unwrap();
    anon(&src, range);
    let n = Notifier::new();
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    let stats = m.fault(&sub, &src, range, true).unwrap();
    assert_eq!(stats.faults, 1, "one contiguous run, one fault call");
    assert_eq!(stats.passes, 2);
    assert_eq!(m.table.lock().entries.len(), 300);
}

#[test]
fn busy_when_seq_moved_before_the_walk_leaves_input_untouched() {
    let src = ScriptedPageSource::new();
    let range = Range::with_len(BASE, 4 * PAGE_SIZE).unwrap();
    anon(&src, range);
    let n = Notifier::new();
    let sub = n.insert(range, Arc::new(TestMirror::new(OWNER))).unwrap();
    let seq = sub.read_begin().unwrap();
    n.invalidate_range_start(NotifierRange::new(range, Event::Clear))
        .unwrap()
        .end();
    let mut entries = [F; 4];
    let mut req = FaultRequest {
        range,
        entries: &mut entries,
        default_flags: 0,
        pfn_flags_mask: F | W,
        dev_private_owner: None,
    };
    assert!(matches!(
        range_fault(&sub, seq, &src, &mut req),
        Err(Error::Busy { .. })
    ));
    assert_eq!(entries, [F; 4], "not walked: still input");
    assert_eq!(src.fault_count(), 0);
}

/// A page source that runs an invalidation from inside its fault (the CPU changed while we
/// faulted), to make the seq move mid-walk.
struct RacingSource<'a> {
    inner: ScriptedPageSource,
    notifier: &'a Notifier,
    races_left: std::cell::Cell<u32>,
}

impl PageSource for RacingSource<'_> {
    fn area(&self, addr: u64, limit: u64) -> Result<Area> {
        self.inner.area(addr, limit)
    }
    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<()> {
        self.inner.snapshot(addr, out)
    }
    fn fault(&self, range: Range, write: bool) -> Result<()> {
        self.inner.fault(range, write)?;
        if self.races_left.get() > 0 {
            self.races_left.set(self.races_left.get() - 1);
            // The CPU drops the pages again (MADV_DONTNEED) right after we faulted them.
            let inv = self
                .notifier
                .invalidate_range_start(NotifierRange::new(range, Event::Clear))?;
            self.inner.clear(range);
            inv.end();
        }
        Ok(())
    }
}

#[test]
fn busy_mid_walk_keeps_walked_output_and_unwalked_input() {
    let n = Notifier::new();
    let range = Range::with_len(BASE, 4 * PAGE_SIZE).unwrap();
    let src = RacingSource {
        inner: ScriptedPageSource::new(),
        notifier: &n,
        races_left: 1.into(),
    };
    anon(&src.inner, range);
    src.inner
        .populate(Range::with_len(BASE, 2 * PAGE_SIZE).unwrap(), true);
    let sub = n.insert(range, Arc::new(TestMirror::new(OWNER))).unwrap();
    let mut entries = [F; 4];
    let mut req = FaultRequest {
        range,
        entries: &mut entries,
        default_flags: 0,
        pfn_flags_mask: F,
        dev_private_owner: None,
    };
    let seq = sub.read_begin().unwrap();
    assert!(matches!(
        range_fault(&sub, seq, &src, &mut req),
        Err(Error::Busy { .. })
    ));
    assert!(
        entry::is_writable(entries[0]) && entry::is_writable(entries[1]),
        "walked: output"
    );
    assert_eq!(&entries[2..], &[F, F], "after the fault: input");
}

#[test]
fn fault_loop_retries_after_a_race_and_programs_current_entries() {
    let n = Notifier::new();
    let range = Range::with_len(BASE, 4 * PAGE_SIZE).unwrap();
    let src = RacingSource {
        inner: ScriptedPageSource::new(),
        notifier: &n,
        races_left: 2.into(),
    };
    anon(&src.inner, range);
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    let stats = m.fault(&sub, &src, range, true).unwrap();
    assert_eq!(stats.retries, 2);
    for i in 0..4u64 {
        let addr = BASE + i * PAGE_SIZE;
        let CpuPte::Present { pfn, .. } = src.inner.pte(addr) else {
            panic!("not faulted")
        };
        assert_eq!(
            entry::pfn(m.entry(addr).unwrap()),
            pfn,
            "device entry matches the CPU"
        );
    }
}

/// A source whose every snapshot races an invalidation.
struct AlwaysRacing<'a>(ScriptedPageSource, &'a Notifier);

impl PageSource for AlwaysRacing<'_> {
    fn area(&self, addr: u64, limit: u64) -> Result<Area> {
        self.0.area(addr, limit)
    }
    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<()> {
        let r = Range::with_len(addr, PAGE_SIZE)?;
        self.1
            .invalidate_range_start(NotifierRange::new(r, Event::ProtectionPage))?
            .end();
        self.0.snapshot(addr, out)
    }
    fn fault(&self, range: Range, write: bool) -> Result<()> {
        self.0.fault(range, write)
    }
}

#[test]
fn fault_loop_times_out_when_it_always_races() {
    let n = Notifier::new();
    let range = Range::with_len(BASE, PAGE_SIZE).unwrap();
    let src = AlwaysRacing(ScriptedPageSource::new(), &n);
    anon(&src.0, range);
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    let mut entries = [0u64; 1];
    let mut req = FaultRequest::fault_all(range, &mut entries, false);
    let e = fault_and_program(
        &sub,
        &m.table,
        &src,
        &mut req,
        Duration::from_millis(20),
        |_, _| (),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Timeout { retries, .. } if retries > 0),
        "{e}"
    );
    assert_eq!(e.errno(), 16);
}

/// The prepare step runs with no lock held, once per pass; what a raced pass prepared is
/// undone under the update lock, and only the last pass's work reaches `program`.
#[test]
fn prepared_work_of_a_raced_pass_is_undone_and_the_last_one_programmed() {
    let n = Notifier::new();
    let range = Range::with_len(BASE, 2 * PAGE_SIZE).unwrap();
    let src = ScriptedPageSource::new();
    anon(&src, range);
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    let mut entries = [0u64; 2];
    let mut req = FaultRequest::fault_all(range, &mut entries, true);
    let prepared = std::cell::RefCell::new(Vec::new());
    let undone = std::cell::RefCell::new(Vec::new());
    let ((programmed, pass_entries), stats) = fault_prepare_and_program(
        &sub,
        &m.table,
        &src,
        &mut req,
        DEFAULT_FAULT_TIMEOUT,
        FaultSteps {
            prepare: |r: &FaultRequest<'_>| {
                // No lock held: the lock-order check would panic here otherwise.
                crate::context::might_fault("test prepare");
                let mut p = prepared.borrow_mut();
                p.push(r.entries.to_vec());
                if p.len() <= 2 {
                    // An invalidation lands while the first two passes prepare.
                    n.invalidate_range_start(NotifierRange::new(range, Event::ProtectionPage))
                        .unwrap()
                        .end();
                }
                p.len()
            },
            undo: |_: &mut UpdateGuard<'_, _>, pass| undone.borrow_mut().push(pass),
            program: |_: &mut UpdateGuard<'_, _>, r: &FaultRequest<'_>, pass| {
                (pass, r.entries.to_vec())
            },
        },
    )
    .unwrap();
    assert_eq!(stats.retries, 2);
    assert_eq!(*undone.borrow(), vec![1, 2], "the raced passes were undone");
    assert_eq!(programmed, 3, "the last pass was programmed");
    assert_eq!(prepared.borrow()[2], pass_entries, "with its own entries");
    assert!(pass_entries.iter().all(|&e| entry::is_writable(e)));
}

#[test]
fn fault_loop_restores_inputs_before_retrying() {
    let n = Notifier::new();
    let range = Range::with_len(BASE, 2 * PAGE_SIZE).unwrap();
    let src = RacingSource {
        inner: ScriptedPageSource::new(),
        notifier: &n,
        races_left: 1.into(),
    };
    anon(&src.inner, range);
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    // Only the second page asks for a fault; after the retry the first must still only report.
    let mut entries = [0, F | W];
    let mut req = FaultRequest {
        range,
        entries: &mut entries,
        default_flags: 0,
        pfn_flags_mask: F | W,
        dev_private_owner: None,
    };
    let (out, stats) = fault_and_program(
        &sub,
        &m.table,
        &src,
        &mut req,
        DEFAULT_FAULT_TIMEOUT,
        |_, r| r.entries.to_vec(),
    )
    .unwrap();
    assert_eq!(stats.retries, 1);
    assert_eq!(out[0], 0, "first page was never asked to fault");
    assert_eq!(src.inner.pte(BASE), CpuPte::None);
    assert!(entry::is_writable(out[1]));
}

#[test]
fn range_outside_the_subscription_is_refused() {
    let src = ScriptedPageSource::new();
    let n = Notifier::new();
    let sub = n
        .insert(
            Range::with_len(BASE, PAGE_SIZE).unwrap(),
            Arc::new(TestMirror::new(OWNER)),
        )
        .unwrap();
    let range = Range::with_len(BASE, 2 * PAGE_SIZE).unwrap();
    let mut entries = [0u64; 2];
    let seq = sub.read_begin().unwrap();
    let e = range_fault(
        &sub,
        seq,
        &src,
        &mut FaultRequest::snapshot(range, &mut entries),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutsideSubscription { .. }), "{e}");
}

#[test]
fn wrong_entry_count_is_refused() {
    let src = ScriptedPageSource::new();
    let n = Notifier::new();
    let range = Range::with_len(BASE, 2 * PAGE_SIZE).unwrap();
    let sub = n.insert(range, Arc::new(TestMirror::new(OWNER))).unwrap();
    let mut entries = [0u64; 3];
    let seq = sub.read_begin().unwrap();
    let e = range_fault(
        &sub,
        seq,
        &src,
        &mut FaultRequest::snapshot(range, &mut entries),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::EntryCount {
                expected: 2,
                got: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_source_that_never_brings_the_page_in_is_an_error_not_a_hang() {
    let src = ScriptedPageSource::new();
    let range = Range::with_len(BASE, PAGE_SIZE).unwrap();
    anon(&src, range);
    src.set_faults_do_nothing(true);
    let n = Notifier::new();
    let m = Arc::new(TestMirror::new(OWNER));
    let sub = n.insert(range, m.clone()).unwrap();
    let e = m.fault(&sub, &src, range, false).unwrap_err();
    assert!(matches!(e, Error::NoProgress { addr: BASE }), "{e}");
}

#[test]
fn huge_page_order_is_reported_even_when_it_extends_past_the_range() {
    let src = ScriptedPageSource::new();
    let huge = Range::with_len(BASE, 512 * PAGE_SIZE).unwrap();
    anon(&src, huge);
    src.map_huge(BASE, 9, true);
    let n = Notifier::new();
    let sub = n.insert(huge, Arc::new(TestMirror::new(OWNER))).unwrap();
    let range = Range::with_len(BASE + 10 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let mut entries = [0u64; 2];
    let seq = sub.read_begin().unwrap();
    range_fault(
        &sub,
        seq,
        &src,
        &mut FaultRequest::snapshot(range, &mut entries),
    )
    .unwrap();
    assert!(
        entries
            .iter()
            .all(|&e| entry::order(e) == 9 && entry::is_writable(e))
    );
    assert_eq!(entry::pfn(entries[1]), entry::pfn(entries[0]) + 1);
}
