//! Helpers of the guest scenarios: raw memory access, /proc and kernel-log readers, the test
//! environment, and the way out of QEMU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use svmirror_core::{PAGE_SIZE, Range};
use svmirror_edu::EduDevice;
use svmirror_mm::{ProcessMm, Protection};
use svmirror_vfio::{MapperConfig, VfioContainer, VfioMapper};

use crate::Res;

pub(crate) fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// As [`err`], with the error's sources after it.
pub(crate) fn chain<E: std::error::Error>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| {
        let mut s = format!("{what}: {e}");
        let mut src = e.source();
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    }
}

/// Writes `len` bytes of `byte` at `addr` (memory a device may write: raw pointers only).
pub(crate) fn fill(addr: u64, len: u64, byte: u8) {
    // SAFETY: the callers pass memory this process maps read-write; no reference covers it.
    unsafe { std::ptr::write_bytes(addr as *mut u8, byte, len as usize) };
}

/// Writes a pattern derived from `seed` at `addr`.
pub(crate) fn pattern(addr: u64, len: u64, seed: u8) -> Vec<u8> {
    let v: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    // SAFETY: as in `fill`; `v` is a separate allocation.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), addr as *mut u8, v.len()) };
    v
}

/// Copies `len` bytes at `addr` out through a raw pointer.
pub(crate) fn read(addr: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    // SAFETY: as in `fill`; `v` is a separate allocation.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), v.len()) };
    v
}

/// A field of /proc/self/status in bytes.
pub(crate) fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The kernel log, as `dmesg` prints it.
fn kernel_log() -> String {
    // SAFETY: SYSLOG_ACTION_SIZE_BUFFER takes no buffer.
    let size = unsafe { libc::klogctl(10, std::ptr::null_mut(), 0) };
    if size <= 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: SYSLOG_ACTION_READ_ALL writes at most `size` bytes into `buf`.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), size) };
    if n <= 0 {
        return String::new();
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

/// The kernel log's DMAR fault lines.
pub(crate) fn dmar_faults() -> Vec<String> {
    kernel_log()
        .lines()
        .filter(|l| l.contains("DMAR") && l.contains("fault addr"))
        .map(str::to_owned)
        .collect()
}

/// Waits until the kernel will print the next DMAR fault. drivers/iommu/intel/dmar.c
/// `dmar_fault` prints under one ratelimit (DEFAULT_RATELIMIT_INTERVAL, 5 s, burst 10; each
/// fault takes two messages or more) and clears a fault it may not print without a word, so a
/// scenario that expects a fault line soon after earlier faults can find none. 5 s after the
/// last DMAR message printed, the window that message was in has ended.
pub(crate) fn wait_for_dmar_ratelimit() {
    let stamp = |l: &str| -> Option<f64> {
        let open = l.find('[')?;
        let close = open + l[open..].find(']')?;
        l[open + 1..close].trim().parse().ok()
    };
    let Some(last) = kernel_log()
        .lines()
        .filter(|l| l.contains("DMAR:"))
        .filter_map(stamp)
        .next_back()
    else {
        return;
    };
    let now: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let left = last + 5.05 - now;
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// Waits until the kernel logs a DMAR fault at `iova`'s page beyond the first `before` lines.
pub(crate) fn expect_dmar_fault(before: usize, iova: u64, kind: &str) -> Result<String, String> {
    let want = format!("fault addr 0x{:x}", iova & !(PAGE_SIZE - 1));
    let started = Instant::now();
    loop {
        let lines = dmar_faults();
        if let Some(l) = lines
            .iter()
            .skip(before)
            .find(|l| l.contains(&want) && l.contains(kind))
        {
            return Ok(l.clone());
        }
        if started.elapsed() > Duration::from_secs(3) {
            return Err(format!(
                "no DMAR fault `{kind}` at {want} logged; new lines: {:?}",
                &lines[before.min(lines.len())..]
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `cond` holds (an event handled by the monitor thread).
pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Res {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > Duration::from_secs(3) {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub(crate) struct Env {
    pub(crate) mm: Arc<ProcessMm>,
    pub(crate) container: Arc<VfioContainer>,
    pub(crate) edu: EduDevice,
}

impl Env {
    pub(crate) fn open() -> Result<Env, String> {
        let mm = Arc::new(ProcessMm::new().map_err(err("ProcessMm::new (userfaultfd)"))?);
        let container = Arc::new(
            VfioContainer::new(None).map_err(err("opening /dev/vfio/vfio (is vfio loaded?)"))?,
        );
        let path = EduDevice::find().map_err(err("finding edu"))?;
        let edu = EduDevice::open(&path, container.clone()).map_err(err("opening edu"))?;
        Ok(Env { mm, container, edu })
    }

    pub(crate) fn buffer(&self, len: u64) -> Result<Range, String> {
        // 2 MiB-aligned so chunk boundaries fall where the tests expect them.
        let r = self
            .mm
            .mmap_anonymous(len + (2 << 20), Protection::READ_WRITE)
            .map_err(err("mmap"))?;
        let start = r.start().next_multiple_of(2 << 20);
        let head = Range::new(r.start(), start).ok();
        let tail = Range::new(start + len, r.end()).ok();
        for x in [head, tail].into_iter().flatten() {
            // SAFETY: the slack around the aligned buffer is ours and never used.
            unsafe { self.mm.munmap(x) }.map_err(err("trim"))?;
        }
        Ok(Range::with_len(start, len).expect("buffer"))
    }

    pub(crate) fn mapper(&self, buf: Range, config: MapperConfig) -> Result<VfioMapper, String> {
        // SAFETY: the tests touch their buffers through raw pointers only.
        unsafe {
            VfioMapper::new(
                self.mm.notifier(),
                self.mm.clone(),
                self.container.clone(),
                buf,
                config,
            )
        }
        .map_err(err("VfioMapper::new"))
    }

    pub(crate) fn dma_avail(&self, m: &VfioMapper) -> Result<u32, String> {
        m.query_iommu_info()
            .map_err(err("GET_INFO"))?
            .dma_avail
            .ok_or_else(|| "kernel does not report dma_avail".to_owned())
    }
}

/// The I/O port of QEMU's `isa-debug-exit` device (`iobase=0xf4`).
pub(crate) const QEMU_EXIT_PORT: u16 = 0xf4;

/// Ends the guest through `isa-debug-exit`: QEMU exits with `(code << 1) | 1`.
pub(crate) fn qemu_exit(code: u32) -> ! {
    // Only inside QEMU: on real hardware the port may belong to something else.
    let in_qemu =
        std::fs::read_to_string("/sys/class/dmi/id/sys_vendor").is_ok_and(|v| v.trim() == "QEMU");
    #[cfg(target_arch = "x86_64")]
    if in_qemu {
        // SAFETY: asks for access to one I/O port range; changes nothing else.
        let rc = unsafe { libc::ioperm(QEMU_EXIT_PORT.into(), 4, 1) };
        if rc == 0 {
            // SAFETY: the port belongs to QEMU's debug-exit device, which ends the machine;
            // the process may access it after `ioperm`.
            unsafe {
                std::arch::asm!("out dx, eax", in("dx") QEMU_EXIT_PORT, in("eax") code);
            }
        }
    }
    eprintln!("--qemu-exit {code}: no isa-debug-exit device answered");
    std::process::exit(2);
}

impl Env {
    pub(crate) fn dma_avail_now(&self) -> Result<u32, String> {
        let buf = self.buffer(PAGE_SIZE)?;
        let m = self.mapper(buf, MapperConfig::default())?;
        self.dma_avail(&m)
    }
}
