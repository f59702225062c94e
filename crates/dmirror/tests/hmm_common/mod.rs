//! Helpers shared by the ports of the kernel's hmm selftests (`hmm_*.rs`): the environment (the
//! process's address space and its pinned-page count), buffers, int access through raw
//! pointers, and forking. The test lock and the hugetlb pool come from svmirror-testsupport:
//! every test takes `serial()` first, since each opens the process's userfaultfd monitor and
//! the snapshot test depends on the address-space layout.
#![allow(dead_code)]

use std::sync::Arc;

use svmirror_core::{PAGE_SIZE, Range};
use svmirror_dmirror::Dmirror;
use svmirror_mm::{
    Advice, ProcessMm, Protection, VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes,
};
use svmirror_testsupport::volatile;

/// The kernel tests' HMM_BUFFER_SIZE in pages.
pub const NPAGES: u64 = 1024;
/// The kernel tests' NTIMES.
pub const NTIMES: u32 = 10;
pub const PAGE: u64 = PAGE_SIZE;
pub const INTS_PER_PAGE: u64 = PAGE / 4;
/// The PMD size: a transparent or hugetlb huge page.
pub const TWO_MEG: u64 = 2 << 20;

/// The process's address space and the pinned bytes before the test.
pub struct Env {
    pub mm: Arc<ProcessMm>,
    pub pinned: u64,
}

impl Env {
    pub fn new() -> Env {
        let pinned = vm_pinned_bytes().unwrap();
        Env {
            mm: Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)")),
            pinned,
        }
    }

    /// The kernel's `hmm_open`.
    pub fn open(&self) -> Dmirror {
        // SAFETY: test buffers are touched by the CPU through raw pointers only.
        unsafe { Dmirror::open(self.mm.clone()) }.unwrap()
    }

    /// A private anonymous buffer of `npages`, without huge pages.
    pub fn buffer(&self, npages: u64, prot: Protection) -> Range {
        let r = self.mm.mmap_anonymous(npages * PAGE, prot).unwrap();
        // SAFETY: advice only; no contents change.
        unsafe { self.mm.madvise(r, Advice::NoHugePage) }.unwrap();
        r
    }

    /// The kernel tests' THP buffer: `2 * size` mapped with `prot`, and the `size`-aligned
    /// `size` bytes inside it advised with `advice`. Returns (whole mapping, aligned part).
    pub fn aligned_buffer(&self, size: u64, prot: Protection, advice: Advice) -> (Range, Range) {
        let whole = self.mm.mmap_anonymous(2 * size, prot).unwrap();
        let map = Range::with_len(whole.start().next_multiple_of(size), size).unwrap();
        // SAFETY: advice only; no contents change.
        unsafe { self.mm.madvise(map, advice) }.unwrap();
        (whole, map)
    }

    /// munmap through the SVM API.
    pub fn unmap(&self, r: Range) {
        // SAFETY: test buffers hold no Rust objects and nothing refers into them.
        unsafe { self.mm.munmap(r) }.unwrap();
    }

    /// Checks that every pin is gone: call after dropping the devices.
    pub fn check_unpinned(&self) {
        assert_eq!(
            settled_vm_pinned_bytes(self.pinned, VM_PIN_SETTLE).unwrap(),
            self.pinned,
            "pins leaked"
        );
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// A shared anonymous read-write mapping of `npages`.
pub fn shared_buffer(npages: u64) -> Range {
    // SAFETY: a new mapping at an address the kernel picks; it replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (npages * PAGE) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    Range::with_len(p as u64, npages * PAGE).unwrap()
}

/// A plain munmap, behind svmirror's back: seen through the userfaultfd UNMAP event.
pub fn raw_munmap(r: Range) {
    // SAFETY: test buffers hold no Rust objects and nothing refers into them.
    let rc = unsafe { libc::munmap(r.start() as *mut libc::c_void, r.len() as usize) };
    assert_eq!(rc, 0, "munmap {r}: {}", std::io::Error::last_os_error());
}

pub fn write_int(r: Range, i: u64, v: u32) {
    // SAFETY: `i` indexes an int of the mapped, writable test buffer `r`, which Rust code
    // touches only through raw pointers.
    unsafe { volatile::write(r.start() + i * 4, v) }
}

pub fn read_int(r: Range, i: u64) -> u32 {
    // SAFETY: as for `write_int`, for a readable buffer.
    unsafe { volatile::read(r.start() + i * 4) }
}

/// Fills `r` with its int indices (the kernel tests' `ptr[i] = i`).
pub fn fill_ints(r: Range) {
    for i in 0..ints(r) {
        write_int(r, i, i as u32);
    }
}

/// Checks that every int of `r` holds `f(i)`.
pub fn check_ints(r: Range, what: &str, f: impl Fn(u64) -> u32) {
    for i in 0..ints(r) {
        let v = read_int(r, i);
        assert_eq!(v, f(i), "{what}: int {i}");
    }
}

pub fn ints(r: Range) -> u64 {
    r.len() / 4
}

/// A host buffer (the kernel tests' `buffer->mirror`) of `npages`.
pub fn mirror_buf(npages: u64) -> Vec<u8> {
    vec![0; (npages * PAGE) as usize]
}

pub fn mirror_int(m: &[u8], i: u64) -> u32 {
    let i = i as usize * 4;
    u32::from_ne_bytes(m[i..i + 4].try_into().unwrap())
}

pub fn set_mirror_int(m: &mut [u8], i: u64, v: u32) {
    let i = i as usize * 4;
    m[i..i + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Checks that the first `n` ints of the mirror buffer hold `f(i)`.
pub fn check_mirror(m: &[u8], n: u64, what: &str, f: impl Fn(u64) -> u32) {
    for i in 0..n {
        assert_eq!(mirror_int(m, i), f(i), "{what}: mirror int {i}");
    }
}

/// Forks. The child runs `child` and leaves with `_exit`: 0 if it returned, 1 if it panicked
/// (its message goes to stderr, as the harness's output capture does not reach a child).
/// Returns the child's pid in the parent.
///
/// The test process has threads (the harness's, the userfaultfd monitor): the child must not
/// touch what they may have held locked at the fork, nor drop anything of the parent's (the
/// parent's `ProcessMm` would wait for a monitor thread the child does not have). It may
/// allocate (glibc makes malloc safe across fork) and open its own address space and devices.
pub fn fork(child: impl FnOnce()) -> libc::pid_t {
    // SAFETY: the child only runs `child` (see above) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)) {
            Ok(()) => 0,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".to_owned());
                let line = format!("child failed: {msg}\n");
                // SAFETY: writes our own buffer to stderr.
                unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
                1
            }
        };
        // SAFETY: leaves the child without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid` and returns its wait status.
pub fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    status
}

/// Waits for `pid` and checks that it exited with status 0.
pub fn wait_ok(pid: libc::pid_t) {
    let status = wait(pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed (wait status {status:#x}; its message is on stderr)"
    );
}
