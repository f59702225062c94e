//! The NVMe scenarios: svmirror-nvme driving QEMU's `nvme` device (backed by a scratch image
//! that `cargo xtask vfio-vm` fills with a known pattern) through VFIO, with DMA straight into
//! ordinary `Vec<u8>`s at their own addresses, mapped on demand by a mapper that mirrors the
//! whole user address space.

use std::sync::Arc;
use std::time::Instant;

use svmirror_core::{Event, PAGE_SIZE, Range};
use svmirror_mm::{ProcessMm, Protection};
use svmirror_nvme::{Nvme, NvmeConfig, NvmeDevice};
use svmirror_vfio::{IovaMode, MapperConfig, VfioContainer, VfioMapper};

use crate::Res;
use crate::support::{
    chain, dmar_faults, err, expect_dmar_fault, fill, read, status_bytes, wait_for_dmar_ratelimit,
};

/// The image xtask makes: 8 MiB, 512-byte sectors, sector `n` holding `n` (u64, little
/// endian) 64 times. Keep in step with `xtask/src/vfio_vm/image.rs` (`write_nvme_image`).
const IMAGE_BYTES: u64 = 8 << 20;
/// The sector of the pattern.
const SECTOR: u64 = 512;
/// The serial xtask gives the device.
const SERIAL: &str = "svmirror-nvme0";
/// The user address space the mappers mirror.
const USER_START: u64 = 4096;
const USER_END: u64 = 1 << 47;

/// What sector `s` of the image holds.
fn expected(s: u64) -> [u8; SECTOR as usize] {
    let mut out = [0u8; SECTOR as usize];
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// Checks that `buf` holds the image's sectors from byte offset `at`; says where it differs.
fn check_pattern(buf: &[u8], at: u64) -> Res {
    for (i, sector) in buf.chunks(SECTOR as usize).enumerate() {
        let s = at / SECTOR + i as u64;
        if sector != &expected(s)[..sector.len()] {
            return Err(format!(
                "sector {s} differs from the image: starts {:02x?}",
                &sector[..16.min(sector.len())]
            ));
        }
    }
    Ok(())
}

/// The NVMe controller, started with a mapper over the whole user address space of a
/// `ProcessMm` of its own. Opened once the edu scenarios' [`Env`](crate::support::Env) is
/// gone: a mapper fault walks every mapping in its 2 MiB chunk, and fails on a device mapping
/// (edu's BAR) that userfaultfd cannot register.
struct NvmeEnv {
    // Field order is drop order: these handles on the mappers first, so that the controller's
    // are the last ones and its drop (reset, then its fields in order) unmaps everything
    // before its device detaches the group from the container (type1 refuses unmaps after
    // that); then the container, the mm.
    mappers: Vec<Arc<VfioMapper>>,
    nvme: Nvme,
    _container: Arc<VfioContainer>,
    mm: Arc<ProcessMm>,
}

impl NvmeEnv {
    fn open() -> Result<NvmeEnv, String> {
        // glibc's mmap threshold is dynamic: the first free of an mmapped block raises it, and
        // the next block of that size comes from the heap, at another address. Fixed, a freed
        // 2 MiB buffer's address is reused by the next one, as the reuse scenario needs.
        // SAFETY: mallopt changes only the allocator's tuning.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
        let mm = Arc::new(ProcessMm::new().map_err(err("ProcessMm::new (userfaultfd)"))?);
        let path = NvmeDevice::find().map_err(err("finding the NVMe controller"))?;
        let container = Arc::new(VfioContainer::new(None).map_err(err("opening /dev/vfio/vfio"))?);
        let dev = NvmeDevice::open(&path, container.clone()).map_err(chain("opening NVMe"))?;
        let new_mapper = |range: Range, iova: IovaMode| {
            let config = MapperConfig {
                iova,
                ..MapperConfig::default()
            };
            // SAFETY: the scenarios hand the device only buffers they lend it for the duration
            // of a command (`Nvme::read`/`write` borrow them), and touch nothing else it may
            // write.
            unsafe { VfioMapper::new(mm.notifier(), mm.clone(), container.clone(), range, config) }
        };
        // One identity mapper per usable IOVA range (the MSI window cuts user space in two),
        // so that IOVA = the process address everywhere, as `svmirror run` does.
        let user = Range::new(USER_START, USER_END).expect("user space");
        let probe = new_mapper(user, IovaMode::Auto).map_err(chain("VfioMapper::new"))?;
        let ranges: Vec<Range> = if probe.is_identity() {
            vec![user]
        } else {
            probe
                .iommu_info()
                .iova_ranges
                .iter()
                .filter_map(|&(first, last)| {
                    let start = first.checked_next_multiple_of(2 << 20)?.max(USER_START);
                    let end = last.saturating_add(1).min(USER_END) & !((2 << 20) - 1);
                    Range::new(start, end).ok()
                })
                .collect()
        };
        drop(probe);
        let mut mappers = Vec::new();
        for r in ranges {
            let m = new_mapper(r, IovaMode::Identity).map_err(chain("identity VfioMapper"))?;
            mappers.push(Arc::new(m));
        }
        let nvme = dev
            .start(mappers.clone(), NvmeConfig::default())
            .map_err(chain("starting the controller"))?;
        Ok(NvmeEnv {
            nvme,
            mappers,
            _container: container,
            mm,
        })
    }
}

/// Identify: the controller and namespace xtask set up.
fn identify(n: &mut NvmeEnv) -> Res {
    let ns = n.nvme.namespace().map_err(err("namespace"))?;
    let c = n.nvme.controller().ok_or("no Identify Controller data")?;
    let (major, minor) = n.nvme.device().version();
    println!(
        "nvme: {} ({}) serial {}, NVMe {major}.{minor}, namespace {}: {} blocks of {} bytes, {} KiB per command, IOVA = address: {}",
        c.model,
        n.nvme.device().path().display(),
        c.serial,
        ns.nsid,
        ns.blocks,
        ns.lba_size,
        n.nvme.max_transfer() >> 10,
        n.mappers.iter().all(|m| m.is_identity())
    );
    ensure!(
        n.mappers.iter().all(|m| m.is_identity()),
        "IOVA is not the process address"
    );
    ensure!(c.serial == SERIAL, "serial {:?}, want {SERIAL:?}", c.serial);
    // The controller's BAR0 mapping (and any other mapping of a VFIO device) is I/O memory to
    // the page source: never registered with the userfaultfd, which refuses it (EINVAL), so a
    // buffer that shares its 2 MiB with it still faults. Checked by the names the running
    // kernel gives them.
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let source = svmirror_mm::ProcessPageSource::new().map_err(|e| e.to_string())?;
    let mut bars = 0;
    let device = |l: &&str| l.contains("[vfio-device]") || l.contains("/dev/vfio/");
    for line in maps.lines().filter(device) {
        let start = line
            .split('-')
            .next()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .ok_or_else(|| format!("unreadable maps line {line:?}"))?;
        let m = source
            .mapping(start)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no mapping at {start:#x}"))?;
        ensure!(
            m.io,
            "a VFIO device mapping not taken for I/O memory: {line:?}"
        );
        bars += 1;
    }
    ensure!(bars >= 1, "no VFIO device mapping in /proc/self/maps");
    println!("nvme: {bars} VFIO device mapping(s), each taken for I/O memory");
    ensure!(
        ns.bytes() == IMAGE_BYTES,
        "namespace of {} bytes, the image has {IMAGE_BYTES}",
        ns.bytes()
    );
    Ok(())
}

/// Reads into fresh `Vec`s: one sector, a page-straddling 8 KiB (a PRP list), and 1 MiB
/// (several commands cut at MDTS), each checked against the image's pattern.
fn read_into_fresh_vec(n: &mut NvmeEnv) -> Res {
    let lba_size = n.nvme.namespace().map_err(err("namespace"))?.lba_size;
    for (lba, len) in [(0u64, 512u64), (7, 8192), (1000, 1 << 20)] {
        let mut v = vec![0u8; len as usize];
        n.nvme.read(lba, &mut v).map_err(chain("read"))?;
        check_pattern(&v, lba * lba_size).map_err(|e| format!("read of {len} at {lba}: {e}"))?;
    }
    Ok(())
}

/// Writes from a slice in the middle of a larger heap object (page-straddling, at an offset
/// in its first page), reads it back into another `Vec`; the sectors around are untouched.
fn write_from_heap_object(n: &mut NvmeEnv) -> Res {
    let lba_size = n.nvme.namespace().map_err(err("namespace"))?.lba_size;
    let mut object = vec![0u8; 64 << 10];
    let (at, len) = (1000usize, 3 * 4096usize);
    for (i, b) in object[at..at + len].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(3);
    }
    let lba = 4000;
    n.nvme
        .write(lba, &object[at..at + len])
        .map_err(chain("write"))?;
    let mut back = vec![0u8; len + 2 * lba_size as usize];
    n.nvme
        .read(lba - 1, &mut back)
        .map_err(chain("read back"))?;
    let (before, rest) = back.split_at(lba_size as usize);
    let (data, after) = rest.split_at(len);
    ensure!(
        data == &object[at..at + len],
        "the sectors read back differ from the heap object written"
    );
    check_pattern(before, (lba - 1) * lba_size).map_err(|e| format!("sector before: {e}"))?;
    let next = lba + (len as u64) / lba_size;
    check_pattern(after, next * lba_size).map_err(|e| format!("sector after: {e}"))?;
    Ok(())
}

/// A buffer freed and a new one allocated at the same address between two reads: the second
/// read lands in the new memory (the old pages, which the first read's mapping pinned, are
/// never written again), and the munmap took the old mapping away.
fn freed_buffer_address_reused(n: &mut NvmeEnv) -> Res {
    let lba_size = n.nvme.namespace().map_err(err("namespace"))?.lba_size;
    // Large enough that no free chunk of the heap holds it: glibc mmaps it (and munmaps it on
    // free), whatever the earlier scenarios left in the heap. The reads stay clear of the
    // blocks the write scenario changed.
    let len = 2 << 20;
    let (first_lba, lba) = ((4 << 20) / lba_size, (6 << 20) / lba_size);
    let unmaps = |n: &NvmeEnv| -> u64 {
        n.mappers
            .iter()
            .map(|m| m.counters().invalidations[Event::Unmap.index()])
            .sum()
    };
    let before = unmaps(n);
    let mut a = vec![0u8; len];
    n.nvme
        .read(first_lba, &mut a)
        .map_err(chain("first read"))?;
    check_pattern(&a, first_lba * lba_size)?;
    let old = a.as_ptr() as u64;
    drop(a);
    let mut b = vec![0u8; len];
    let new = b.as_ptr() as u64;
    ensure!(
        new == old,
        "the allocator did not reuse {old:#x} (got {new:#x}): no reuse to test"
    );
    n.nvme.read(lba, &mut b).map_err(chain("second read"))?;
    check_pattern(&b, lba * lba_size).map_err(|e| format!("new memory at the old address: {e}"))?;
    let seen = unmaps(n) - before;
    ensure!(seen > 0, "the free's munmap invalidated nothing");
    println!(
        "nvme: {len}-byte Vec freed and reallocated at {new:#x}; {seen} unmap invalidation(s); the second read landed in the new memory"
    );
    Ok(())
}

/// Bad input is a typed error, not a panic, and the controller keeps working.
fn bad_input(n: &mut NvmeEnv) -> Res {
    use svmirror_nvme::NvmeError as E;
    let ns = n.nvme.namespace().map_err(err("namespace"))?;
    let mut v = vec![0u8; 4096];
    let r = n.nvme.read(0, &mut v[..0]);
    ensure!(matches!(r, Err(E::EmptyTransfer)), "empty: {r:?}");
    let r = n.nvme.read(0, &mut v[..100]);
    ensure!(
        matches!(r, Err(E::UnalignedLength { .. })),
        "unaligned: {r:?}"
    );
    let r = n.nvme.read(ns.blocks, &mut v[..512]);
    ensure!(
        matches!(r, Err(E::OutOfRange { .. })),
        "past the end: {r:?}"
    );
    let r = n.nvme.read(0, &mut v[1..513]);
    ensure!(
        matches!(r, Err(E::MisalignedBuffer { .. })),
        "misaligned: {r:?}"
    );
    n.nvme
        .read(1, &mut v[..512])
        .map_err(chain("read after bad input"))?;
    check_pattern(&v[..512], ns.lba_size)
}

/// An NVMe scenario: its name and body.
type NvmeScenario = (&'static str, fn(&mut NvmeEnv) -> Res);

/// Runs the NVMe scenarios on a controller of their own; returns how many ran and how many
/// failed.
pub(crate) fn run() -> (usize, usize) {
    let scenarios: &[NvmeScenario] = &[
        ("nvme_identify", identify),
        ("nvme_read_into_fresh_vec", read_into_fresh_vec),
        ("nvme_write_from_heap_object", write_from_heap_object),
        (
            "nvme_freed_buffer_address_reused",
            freed_buffer_address_reused,
        ),
        ("nvme_bad_input", bad_input),
        ("nvme_read_churn", read_churn),
        (
            "nvme_unmapped_buffer_blocked_by_the_iommu",
            unmapped_buffer_blocked_by_the_iommu,
        ),
        (
            "nvme_timeout_resets_the_controller",
            timeout_resets_the_controller,
        ),
    ];
    let vmlck = status_bytes("VmLck:");
    let mut n = match NvmeEnv::open() {
        Ok(n) => n,
        Err(e) => {
            println!("FAIL nvme setup: {e}");
            return (scenarios.len() + 2, scenarios.len() + 2);
        }
    };
    let mut failed = 0;
    for (name, f) in scenarios {
        let t = Instant::now();
        match f(&mut n) {
            Ok(()) => println!("PASS {name} ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    let t = Instant::now();
    match teardown_leaves_nothing(n, vmlck) {
        Ok(()) => println!(
            "PASS nvme_teardown_leaves_nothing ({:.0} ms)",
            t.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => {
            failed += 1;
            println!("FAIL nvme_teardown_leaves_nothing: {e}");
        }
    }
    let t = Instant::now();
    match backend_contract() {
        Ok(()) => println!(
            "PASS nvme_backend_contract ({:.0} ms)",
            t.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => {
            failed += 1;
            println!("FAIL nvme_backend_contract: {e}");
        }
    }
    (scenarios.len() + 2, failed)
}

/// The backend scenario suite again, on a container of the NVMe controller's IOMMU group
/// (the controller opened, and so reset, but not started): run after the NVMe scenarios,
/// whose mappers mirror all of user space in the same IOVA space.
fn backend_contract() -> Res {
    let mm = Arc::new(ProcessMm::new().map_err(err("ProcessMm::new"))?);
    let container = Arc::new(VfioContainer::new(None).map_err(err("opening /dev/vfio/vfio"))?);
    let path = NvmeDevice::find().map_err(err("finding the NVMe controller"))?;
    let _dev = NvmeDevice::open(&path, container.clone()).map_err(chain("opening NVMe"))?;
    crate::backend_suite("VFIO (NVMe controller's group)", &mm, &container)
}

/// 1000 reads of random sizes (one sector to 256 KiB) at random blocks, each into a fresh
/// `Vec` that replaces one of 8 live ones (so buffers are freed, and their addresses reused,
/// all the time: small ones in the heap, large ones mmapped and munmapped); every sector is
/// checked against the image. Reads stay clear of the blocks the write scenario changed.
fn read_churn(n: &mut NvmeEnv) -> Res {
    let ns = n.nvme.namespace().map_err(err("namespace"))?;
    let first = 4096 * 512 / ns.lba_size; // past the write scenario's blocks
    let max_blocks = (256 << 10) / ns.lba_size;
    let mut rng = svmirror_testsupport::Rng::new(0x5eed_1234_abcd_0001);
    let mut live: Vec<Vec<u8>> = (0..8).map(|_| Vec::new()).collect();
    let (mut bytes, mut mismatches, mut reused) = (0u64, 0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let started = Instant::now();
    for i in 0..1000 {
        let blocks = 1 + rng.below(max_blocks as usize) as u64;
        let lba = first + rng.below((ns.blocks - first - blocks + 1) as usize) as u64;
        let slot = rng.below(live.len());
        live[slot] = Vec::new(); // free the old buffer first, so its address can come back
        let mut v = vec![0u8; (blocks * ns.lba_size) as usize];
        if !seen.insert(v.as_ptr() as u64) {
            reused += 1;
        }
        n.nvme
            .read(lba, &mut v)
            .map_err(|e| format!("read {i} ({blocks} blocks at {lba}): {e}"))?;
        if let Err(e) = check_pattern(&v, lba * ns.lba_size) {
            mismatches += 1;
            println!(
                "nvme churn: read {i} ({blocks} blocks at {lba}) into {:#x}: {e}",
                v.as_ptr() as u64
            );
        }
        bytes += v.len() as u64;
        live[slot] = v;
    }
    println!(
        "nvme churn: 1000 reads, {:.1} MiB in {:.2} s, {reused} into a reused address, {mismatches} mismatches",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    ensure!(mismatches == 0, "{mismatches} reads differ from the image");
    Ok(())
}

/// A command that outlives its timeout is a typed error, and the controller is reset before
/// it returns (so it no longer writes the buffer); every later command answers `Halted`.
/// Runs last: the controller stays reset.
/// A command outstanding when its buffer is unmapped. Through the driver, which holds the
/// buffer's access until the completion, the munmap waits for the command (the scenario suite
/// and the churn show it). Here the driver drops the hold on purpose
/// (`Nvme::read_unheld`) and the CPU unmaps the buffer through the SVM API before the
/// doorbell, then maps new memory at the same address: the device's write to the old IOVA is
/// blocked by the IOMMU (a DMAR write fault at the buffer's address), the new memory is left
/// alone, and the driver gets a typed result and goes on working.
///
/// QEMU's NVMe (7.2) completes such a command as a success: its DMA helpers write through a
/// bounce buffer whose failed write-back they do not report, so the driver cannot tell;
/// a real controller reports a data transfer error. What the driver saw is printed.
fn unmapped_buffer_blocked_by_the_iommu(n: &mut NvmeEnv) -> Res {
    let mm = n.mm.clone();
    let buf = mm
        .mmap_anonymous(PAGE_SIZE, Protection::READ_WRITE)
        .map_err(err("mmap"))?;
    fill(buf.start(), PAGE_SIZE, 0x11);
    // The edu scenarios' faults may still hold the kernel's DMAR print ratelimit.
    wait_for_dmar_ratelimit();
    let before = dmar_faults().len();
    let mut remapped = Ok(());
    // The CPU frees the buffer with the command prepared but not yet submitted (the SVM API
    // munmap: the mapper unmaps its IOVA), and new memory takes its address.
    let between = || {
        // SAFETY: nothing refers into the buffer.
        remapped = unsafe { mm.munmap(buf) }
            .map_err(|e| format!("munmap: {e}"))
            .and_then(|()| {
                // SAFETY: the address was just unmapped by this scenario; MAP_FIXED puts new
                // private memory there.
                let p = unsafe {
                    libc::mmap(
                        buf.start() as usize as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if p as u64 == buf.start() {
                    fill(buf.start(), PAGE_SIZE, 0x22);
                    Ok(())
                } else {
                    Err(format!("mmap: {}", std::io::Error::last_os_error()))
                }
            });
    };
    // SAFETY: when the device runs the command, the IOMMU maps nothing at the buffer's IOVA
    // (the munmap invalidated it, and the new memory is not faulted in through the mapper
    // before the command completes).
    let r = unsafe { n.nvme.read_unheld(3, buf.start(), PAGE_SIZE, between) };
    println!("nvme: a read whose buffer was unmapped before the doorbell returned {r:?}");
    remapped?;
    let line = expect_dmar_fault(before, buf.start(), "DMA Write")?;
    println!("DMAR (NVMe read into an unmapped buffer): {line}");
    let new = read(buf.start(), PAGE_SIZE);
    // SAFETY: the new memory is this scenario's; nothing refers into it.
    unsafe {
        libc::munmap(
            buf.start() as usize as *mut libc::c_void,
            PAGE_SIZE as usize,
        )
    };
    ensure!(
        new.iter().all(|&b| b == 0x22),
        "the device wrote the memory now at the unmapped buffer's address"
    );
    if let Err(e) = &r {
        ensure!(
            !matches!(e, svmirror_nvme::NvmeError::Access { .. }),
            "the buffer was refused before the command: {e}"
        );
    }
    ensure!(!n.nvme.is_halted(), "the controller was reset: {r:?}");
    // The driver goes on: the next read lands in a fresh Vec.
    let lba_size = n.nvme.namespace().map_err(err("namespace"))?.lba_size;
    let mut v = vec![0u8; 4096];
    n.nvme.read(3, &mut v).map_err(chain("read after"))?;
    check_pattern(&v, 3 * lba_size)
}

fn timeout_resets_the_controller(n: &mut NvmeEnv) -> Res {
    use svmirror_nvme::NvmeError as E;
    // No time at all: the first poll after the doorbell finds the command still running.
    n.nvme.set_command_timeout(std::time::Duration::ZERO);
    let mut v = vec![0u8; 64 << 10];
    let mut completed = 0;
    let r = loop {
        match n.nvme.read(8192, &mut v) {
            Ok(()) if completed < 100 => completed += 1,
            r => break r,
        }
    };
    println!(
        "nvme: with a zero timeout, {completed} read(s) completed before one timed out: {r:?}"
    );
    ensure!(
        matches!(r, Err(E::CommandTimeout { .. })),
        "no timeout: {r:?}"
    );
    ensure!(n.nvme.is_halted(), "the controller was not reset");
    let again = n.nvme.read(8192, &mut v);
    ensure!(
        matches!(again, Err(E::Halted)),
        "after the reset: {again:?}"
    );
    Ok(())
}

/// After the scenarios: every mapper unmapped, the container's mapping budget is whole again
/// (`dma_avail` = `dma_entry_limit`), and with the controller and mappers gone, locked memory
/// (`VmLck`, where type1 charges its pins) is back to where it was before they were made.
fn teardown_leaves_nothing(n: NvmeEnv, vmlck_before: u64) -> Res {
    let limit: u32 = std::fs::read_to_string(crate::DMA_ENTRY_LIMIT)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("cannot read dma_entry_limit")?;
    let during = status_bytes("VmLck:");
    for m in &n.mappers {
        m.unmap_all();
    }
    let avail = n.mappers[0]
        .query_iommu_info()
        .map_err(chain("GET_INFO"))?
        .dma_avail
        .ok_or("kernel does not report dma_avail")?;
    ensure!(
        avail == limit,
        "dma_avail {avail} after unmapping everything, {limit} at the start"
    );
    drop(n);
    let after = status_bytes("VmLck:");
    println!(
        "nvme: VmLck {} KiB before, {} KiB with the controller's mappings, {} KiB after; dma_avail back to {avail}",
        vmlck_before >> 10,
        during >> 10,
        after >> 10
    );
    ensure!(
        after == vmlck_before,
        "VmLck {after} after teardown, {vmlck_before} before"
    );
    Ok(())
}
