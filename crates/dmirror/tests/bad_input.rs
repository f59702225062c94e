//! Bad input to the dmirror device gets a typed error with the kernel's errno, never a panic
//! and never silent success: commands with bad ranges or buffers, and commands on a device whose
//! address space is gone. Each test names the variant it expects.

use std::sync::Arc;

use svmirror_core::MirrorError;
use svmirror_core::{PAGE_SIZE, Range};
use svmirror_dmirror::{Dmirror, DmirrorCmd, DmirrorError};
use svmirror_mm::{ProcessMm, Protection};

const PAGE: u64 = PAGE_SIZE;

#[test]
fn commands_on_a_released_address_space_fail() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    // SAFETY: test memory is touched through raw pointers only.
    let dev = unsafe { Dmirror::open(mm.clone()) }.unwrap();
    // One whole fault window (32 pages, aligned), so the device maps nothing of a neighbouring
    // mapping the kernel may have merged with this one.
    let window = 32 * PAGE;
    let whole = mm
        .mmap_anonymous(2 * window, Protection::READ_WRITE)
        .unwrap();
    let buf = Range::with_len(whole.start().next_multiple_of(window), window).unwrap();
    let mut m = vec![0u8; 4 * PAGE as usize];
    dev.read(buf.start(), 4, &mut m).unwrap();
    assert!(dev.mirror().pins().live() > 0);

    // The address space goes away (its monitor dies): every mapping is torn down, and every
    // command that needs the address space fails with a typed error (ESRCH), not a hang.
    mm.inject_monitor_failure();
    assert_eq!(dev.mirror().pins().live(), 0, "released pins");
    let released = |e: &DmirrorError| e.errno() == libc::ESRCH;
    let e = dev.read(buf.start(), 4, &mut m).unwrap_err();
    assert!(released(&e), "{e:?}");
    let e = dev.write(buf.start(), 4, &m).unwrap_err();
    assert!(released(&e), "{e:?}");
    let mut snap = vec![0u8; 4];
    let e = dev.snapshot(buf.start(), 4, &mut snap).unwrap_err();
    assert!(released(&e), "{e:?}");
    let e = dev.migrate_to_dev(buf.start(), 4, &mut m).unwrap_err();
    assert!(
        matches!(
            e,
            DmirrorError::Mirror(MirrorError::Core { .. }) | DmirrorError::Mm { .. }
        ),
        "{e:?}"
    );
    let e = dev.exclusive(buf.start(), 4, &mut m).unwrap_err();
    assert!(
        matches!(
            e,
            DmirrorError::Mirror(MirrorError::Core { .. }) | DmirrorError::Mm { .. }
        ),
        "{e:?}"
    );
    drop(dev);
    // SAFETY: nothing refers into the buffer.
    unsafe { libc::munmap(whole.start() as *mut libc::c_void, whole.len() as usize) };
}

#[test]
fn dmirror_commands_reject_bad_ranges() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    // SAFETY: test memory is touched through raw pointers only.
    let dev = unsafe { Dmirror::open(mm) }.unwrap();
    let mut m = vec![0u8; 4 * PAGE as usize];
    let invalid = |r: Result<DmirrorCmd, DmirrorError>| {
        let e = r.unwrap_err();
        assert!(matches!(e, DmirrorError::InvalidCommand { .. }), "{e:?}");
        assert_eq!(e.errno(), libc::EINVAL);
    };
    let base = 0x10_0000_0000;
    invalid(dev.read(base + 1, 1, &mut m));
    invalid(dev.read(base, 0, &mut m));
    invalid(dev.read(base, 5, &mut m)); // buffer too small
    invalid(dev.read(!(PAGE - 1), 1, &mut m));
    invalid(dev.write(base, u64::MAX, &m));
    invalid(dev.snapshot(base, 0, &mut m));
    invalid(dev.migrate_to_dev(base + 7, 1, &mut m));
    invalid(dev.migrate_to_sys(base, 0));
    invalid(dev.exclusive(base, 0, &mut m));
    invalid(dev.check_exclusive(base + 3, 1));
    invalid(dev.flags(1 << 9));
    // Unmapped memory: EFAULT.
    let e = dev.read(base, 1, &mut m).unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT, "{e:?}");
}
