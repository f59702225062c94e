//! ProcessMm without privilege: the test binary re-executes itself as `nobody` (uid/gid 65534,
//! no supplementary groups, hence no capabilities) and runs [`unprivileged_child`] there, which
//! checks how the userfaultfd is opened, that events still produce exactly one invalidation, and
//! the documented limit of `UFFD_USER_MODE_ONLY`: a fault the kernel itself takes on a page that
//! lives on a device fails with EFAULT, while a CPU touch still brings the page back.

use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use svmirror_core::testing::TestMirror;
use svmirror_core::{Event, Owner};
use svmirror_mm::{ProcessMm, Protection, UffdAccess};
use svmirror_testsupport::{MONITOR_WAIT, POLL, poll_until};

#[path = "support/fixture.rs"]
mod fixture;
use fixture::{PAGE, invalidations, page, read_byte, sys_madvise, sys_munmap, write_byte};

#[path = "support/vram.rs"]
mod vram;
use vram::FakeVram;

/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Set in the environment of the re-executed binary: only then does the child test run.
const CHILD_ENV: &str = "SVMIRROR_PRIVILEGE_CHILD";

/// The child test's name, as the harness's `--exact` filter wants it.
const CHILD_TEST: &str = "unprivileged_child";

/// Printed by the child when every check passed, so the parent knows the checks ran (a filter
/// that matched nothing would also exit 0).
const CHILD_DONE: &str = "svmirror-privilege: all unprivileged checks passed";

#[test]
fn unprivileged_path_works_as_nobody() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test drops privilege and so must start as root (as it does here and in CI)"
    );
    let exe = std::env::current_exe().expect("the test binary's path");
    let copy = if reachable_by_others(&exe) {
        None
    } else {
        Some(TempCopy::new(&exe))
    };
    let run = copy.as_ref().map_or(exe.as_path(), |c| c.exe.as_path());
    println!("running {} as uid/gid {NOBODY}", run.display());

    let mut cmd = Command::new(run);
    cmd.args([
        "--exact",
        CHILD_TEST,
        "--include-ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD_ENV, "1")
    .env("RUST_BACKTRACE", "1")
    .current_dir("/");
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setgroups, setgid, setuid, reading errno); it allocates
    // nothing and touches no lock.
    unsafe {
        cmd.pre_exec(drop_privilege);
    }
    let out = cmd.output().expect("spawning the test binary as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!(
        "child {} exited with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        run.display(),
        out.status
    );
    assert!(out.status.success(), "{shown}");
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child test did not run: {shown}"
    );
    assert!(
        stdout.contains(CHILD_DONE),
        "the checks did not finish: {shown}"
    );
    // Shown with --nocapture: what the unprivileged process saw.
    for line in stdout.lines() {
        if let Some(i) = line.find("svmirror-privilege:") {
            println!("{}", &line[i..]);
        }
    }
}

/// Drops to nobody: supplementary groups first, then the gid, then the uid (after which the
/// others could no longer be changed). Runs between fork and exec.
fn drop_privilege() -> io::Result<()> {
    // SAFETY: setgroups(0, NULL) clears the supplementary groups and reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setgid takes its argument by value.
    if unsafe { libc::setgid(NOBODY) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setuid takes its argument by value.
    if unsafe { libc::setuid(NOBODY) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a process that is neither the owner nor in the group can execute `exe`: every
/// ancestor directory searchable by others, the file readable and executable by others.
fn reachable_by_others(exe: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode());
    let Ok(file) = mode(exe) else {
        return false;
    };
    if file & 0o005 != 0o005 {
        return false;
    }
    exe.ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
        .all(|d| mode(d).is_ok_and(|m| m & 0o001 != 0))
}

/// A copy of the test binary in a fresh directory under /tmp, both mode 0755, removed on drop.
struct TempCopy {
    dir: PathBuf,
    exe: PathBuf,
}

impl TempCopy {
    fn new(exe: &Path) -> TempCopy {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = PathBuf::from(format!(
            "/tmp/svmirror-privilege-{}-{nanos}",
            std::process::id()
        ));
        // Not recursive: the directory must be new, so nobody else controls what is in it.
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .expect("a fresh directory under /tmp");
        // The umask may have taken bits away.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = TempCopy {
            exe: dir.join(exe.file_name().expect("the test binary has a file name")),
            dir,
        };
        std::fs::copy(exe, &copy.exe).expect("copying the test binary");
        std::fs::set_permissions(&copy.exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            reachable_by_others(&copy.exe),
            "{} is still not reachable by others",
            copy.exe.display()
        );
        copy
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- the child: runs as nobody ----

/// `read(2)` from `fd` into test memory at `addr`: the kernel writes there, the CPU does not.
fn sys_read(fd: i32, addr: u64, len: usize) -> io::Result<usize> {
    // SAFETY: `addr` is test memory mapped read-write (or a page svmirror has migrated to a
    // device, whose fault the kernel either serves or fails with EFAULT); no Rust object
    // lives there.
    let n = unsafe { libc::read(fd, addr as *mut libc::c_void, len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe, both ends closed on drop.
struct Pipe {
    read: i32,
    write: i32,
}

impl Pipe {
    fn new() -> Pipe {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the two-element array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        Pipe {
            read: fds[0],
            write: fds[1],
        }
    }

    fn put(&self, data: &[u8]) {
        // SAFETY: writes `data.len()` bytes from a live slice to our own pipe.
        let n = unsafe { libc::write(self.write, data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize, "{}", io::Error::last_os_error());
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: closes an fd this pipe owns, once.
        unsafe { libc::close(self.read) };
        // SAFETY: as above.
        unsafe { libc::close(self.write) };
    }
}

/// The first line of /proc/self/status starting with `key`, its value trimmed.
fn status_field(key: &str) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("{key} in /proc/self/status"))
}

/// Whether the plain userfaultfd syscall (without `UFFD_USER_MODE_ONLY`) is refused.
fn plain_syscall_refused() -> bool {
    // SAFETY: the userfaultfd syscall takes flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us; closed once.
        unsafe { libc::close(fd as i32) };
        return false;
    }
    let e = io::Error::last_os_error();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "userfaultfd: {e}");
    true
}

macro_rules! say {
    ($($t:tt)*) => {{
        println!("svmirror-privilege: {}", format_args!($($t)*));
        let _ = io::stdout().flush();
    }};
}

#[test]
#[ignore = "run as nobody by unprivileged_path_works_as_nobody"]
fn unprivileged_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        println!(
            "{CHILD_TEST}: only runs re-executed as nobody by unprivileged_path_works_as_nobody"
        );
        return;
    }

    // Really unprivileged, or this test proves nothing.
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    // SAFETY: nor has geteuid.
    let euid = unsafe { libc::geteuid() };
    // SAFETY: nor has getgid.
    let gid = unsafe { libc::getgid() };
    // SAFETY: nor has getegid.
    let egid = unsafe { libc::getegid() };
    let ids = [uid, euid, gid, egid];
    assert_eq!(ids, [NOBODY; 4], "uid, euid, gid, egid");
    assert_eq!(
        status_field("CapEff:"),
        "0000000000000000",
        "no capabilities"
    );
    assert_eq!(status_field("Groups:"), "", "no supplementary groups");

    // (b) How the userfaultfd is opened: the best this process can actually get.
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok();
    let refused = plain_syscall_refused();
    assert_eq!(
        refused,
        sysctl != "1",
        "the plain syscall is refused exactly when vm.unprivileged_userfaultfd is not 1 \
         (sysctl {sysctl:?})"
    );
    let expected = if dev {
        UffdAccess::DevUserfaultfd
    } else if !refused {
        UffdAccess::Syscall
    } else {
        UffdAccess::UserModeOnly
    };

    // (a) ProcessMm works unprivileged.
    let mm = ProcessMm::new().expect("ProcessMm::new as nobody");
    let features = mm.features();
    say!(
        "vm.unprivileged_userfaultfd={sysctl:?}, /dev/userfaultfd usable: {dev}, access: {:?}, \
         features: {:?}",
        features.access,
        features.uffd_feature_names
    );
    assert_eq!(features.access, expected, "{features:?}");
    for needed in ["EVENT_UNMAP", "EVENT_REMOVE", "EVENT_REMAP"] {
        assert!(
            features.uffd_feature_names.contains(&needed),
            "{features:?}"
        );
    }

    // (c) Events are unaffected: munmap of mirrored pages gives exactly one Unmap.
    {
        let buf = mm.mmap_anonymous(4 * PAGE, Protection::READ_WRITE).unwrap();
        assert_eq!(
            sys_madvise(buf.start(), buf.len(), libc::MADV_NOHUGEPAGE),
            0
        );
        for i in 0..4 {
            write_byte(buf.start() + i * PAGE, 1 + i as u8);
        }
        let mirror = Arc::new(TestMirror::new(Owner(0x5eed)));
        let sub = mm.notifier().insert(buf, mirror.clone()).unwrap();
        mirror.fault(&sub, &mm, buf, true).unwrap();
        assert_eq!(mirror.table.lock().entries.len(), 4);
        let part = page(buf, 1, 2);
        assert_eq!(sys_munmap(part.start(), part.len()), 0);
        assert_eq!(invalidations(&mirror, 1), vec![(part, Event::Unmap)]);
        assert_eq!(
            mirror.table.lock().entries.len(),
            2,
            "only the unmapped pages are gone"
        );
        assert_eq!(mm.stats().unmap_events, 1);
        drop(sub);
        assert_eq!(sys_munmap(buf.start(), buf.len()), 0);
        // The monitor handles an event after the munmap has returned: let it finish with this
        // buffer before a new mapping can take its addresses.
        poll_until(MONITOR_WAIT, POLL, || mm.stats().unmap_events >= 2);
        assert_eq!(mm.stats().unmap_events, 2);
        say!("munmap as nobody: one Unmap invalidation of {part}");
    }

    // (d) Pages on a device: what the kernel itself touches there.
    let buf = mm.mmap_anonymous(3 * PAGE, Protection::READ_WRITE).unwrap();
    assert_eq!(
        sys_madvise(buf.start(), buf.len(), libc::MADV_NOHUGEPAGE),
        0
    );
    for i in 0..3 {
        write_byte(buf.start() + i * PAGE + 5, 0x40 + i as u8);
    }
    // A device mirrors the buffer, then migrates it into its memory.
    let mirror = Arc::new(TestMirror::new(Owner(0x5eed)));
    let sub = mm.notifier().insert(buf, mirror.clone()).unwrap();
    mirror.fault(&sub, &mm, buf, true).unwrap();
    assert_eq!(mirror.table.lock().entries.len(), 3);
    let vram = Arc::new(FakeVram::default());
    assert_eq!(mm.migrate_to_device(buf, vram.clone()).unwrap(), 3);
    assert!(
        mirror.table.lock().entries.is_empty(),
        "the other device lost the range"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vram.len(), 3, "all three pages on the device");
    let (p0, p1) = (buf.start(), buf.start() + PAGE);
    let pipe = Pipe::new();
    let msg = *b"written by the kernel";
    pipe.put(&msg);
    let missing_before = mm.stats().missing_faults;
    let got = sys_read(pipe.read, p0, msg.len());
    if expected == UffdAccess::UserModeOnly {
        // The kernel's own fault on the missing page never reaches the monitor.
        let e = got.expect_err("read(2) into a page on the device must fail with user-mode-only");
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        assert_eq!(
            mm.stats().missing_faults,
            missing_before,
            "the monitor saw no fault"
        );
        assert!(vram.holds(p0), "the page is still on the device");
        say!("read(2) into a migrated page with user-mode-only: {e}");
    } else {
        // Full access: the monitor serves the kernel's fault like a CPU touch.
        assert_eq!(got.unwrap(), msg.len());
        assert!(!vram.holds(p0), "the page came back to serve the read");
        say!("read(2) into a migrated page with {expected:?}: served");
    }

    // A CPU touch of another migrated page still brings it back with its data.
    assert!(vram.holds(p1));
    assert_eq!(read_byte(p1 + 5), 0x41);
    assert!(!vram.holds(p1), "the CPU touch brought the page back");
    assert!(mm.stats().missing_faults > missing_before);

    if expected == UffdAccess::UserModeOnly {
        // The failed read neither lost the page's data nor consumed the pipe's: once the CPU has
        // brought the page back, the same read succeeds.
        assert_eq!(read_byte(p0 + 5), 0x40);
        assert!(!vram.holds(p0));
        assert_eq!(sys_read(pipe.read, p0, msg.len()).unwrap(), msg.len());
    } else {
        assert_eq!(read_byte(p0 + 5), msg[5]);
    }
    for (i, &b) in msg.iter().enumerate() {
        assert_eq!(read_byte(p0 + i as u64), b);
    }
    assert_eq!(
        read_byte(p0 + 5 + PAGE * 2),
        0x42,
        "a CPU touch brings the third page back too"
    );
    assert!(!vram.holds(p0 + 2 * PAGE));
    drop(sub);
    assert_eq!(sys_munmap(buf.start(), buf.len()), 0);

    say!("CPU touches of migrated pages brought them back with their data");
    println!("{CHILD_DONE}");
}
