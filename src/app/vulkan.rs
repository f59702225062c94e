//! The Vulkan backend: a compute shader works on the apps' data by CPU pointer through
//! svmirror-vulkan's [`VulkanMirror`], which mirrors the whole user address space on the best
//! Vulkan device (a discrete GPU, else lavapipe).
//!
//! - **bfs**: level-synchronous, one [`Kernel::BfsFrontier`] dispatch per level on the app's
//!   own [`Node`]s (the kernel reads the layout the CPU built); only the frontier lives in
//!   device memory, sized ahead from the degree sum the kernel keeps.
//! - **saxpy**: [`Kernel::Stream`] on the app's vectors, in dispatches of 4 MiB per vector
//!   (for progress).
//! - **churn** (`sum_slots`): one [`Kernel::SumSlots`] dispatch over the slot table. A fault the
//!   mirror cannot resolve (a store to a read-only slot, an unmapped page) fails the dispatch
//!   with the faulting page; the slot that page belongs to (per the table entry the kernel
//!   recorded in device memory) is marked skipped and reported refused, and the table runs
//!   again: slots already stored skip themselves, and storing twice stores the same sum.
//!
//! With `SVMIRROR_VK_VALIDATION=1` the Khronos validation layer is on: every call fails if it
//! reported an error, and errors it reports at teardown are printed.

mod bench;

use std::sync::Arc;
use std::time::Instant;

use svmirror_core::Mirror;
use svmirror_mm::ProcessMm;
use svmirror_vulkan::{
    Dispatch, DispatchStats, FrontierCounters, GraphNode, Kernel, ScratchBuffer, SlotStatus,
    VALIDATION_ENV, ValidationCounts, VulkanError, VulkanMirror,
};

use super::report::Figure;
use super::{
    AppError, Backend, BackendKind, DeviceWork, Node, Progress, Result, SlotRef, SlotResult,
    error_chain,
};

/// Elements of one saxpy dispatch (4 MiB of f32 per vector).
const SAXPY_CHUNK: usize = 1 << 20;

/// Frontier entries allocated at first.
const FRONTIER_START: u64 = 1024;

// The kernel reads the app's nodes as `GraphNode`s: the layouts must agree.
const _: () = {
    assert!(std::mem::size_of::<Node>() == std::mem::size_of::<GraphNode>());
    assert!(std::mem::offset_of!(Node, level) == std::mem::offset_of!(GraphNode, level));
    assert!(std::mem::offset_of!(Node, degree) == std::mem::offset_of!(GraphNode, degree));
    assert!(std::mem::offset_of!(Node, edges) == std::mem::offset_of!(GraphNode, edges));
    assert!(super::bfs::UNVISITED == GraphNode::UNVISITED);
    assert!(std::mem::size_of::<SlotRef>() == 16);
};

/// The validation layer reported errors.
#[derive(Debug, thiserror::Error)]
#[error(
    "the Khronos validation layer reported {errors} errors (run with RUST_LOG=svmirror_vulkan=debug for the messages)"
)]
struct ValidationFailed {
    errors: u64,
}

/// The Vulkan backend. See the [module documentation](self).
pub struct VulkanBackend {
    mirror: VulkanMirror,
    validation: ValidationCounts,
    device: String,
    /// Declared after `mirror`, so dropped after it.
    _teardown: TeardownCheck,
}

impl std::fmt::Debug for VulkanBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanBackend")
            .field("mirror", &self.mirror)
            .finish()
    }
}

/// What is missing and how to get it, for a mirror that cannot open.
fn unavailable(e: &VulkanError) -> AppError {
    let fix = match e {
        VulkanError::Loader { .. } => {
            "apt install libvulkan1 (the Vulkan loader) and mesa-vulkan-drivers (lavapipe, a CPU Vulkan device), or your GPU vendor's driver"
                .to_string()
        }
        VulkanError::NoDevice => {
            "apt install mesa-vulkan-drivers for lavapipe (a CPU Vulkan device), or your GPU vendor's Vulkan driver".to_string()
        }
        VulkanError::NoValidationLayer => format!(
            "apt install vulkan-validationlayers, or unset {VALIDATION_ENV}"
        ),
        VulkanError::NoMatchingDevice { .. } => format!(
            "unset {} or name one of the devices found",
            svmirror_vulkan::DEVICE_ENV
        ),
        VulkanError::MissingFeatures { .. } => {
            "svmirror needs VK_EXT_external_memory_host, bufferDeviceAddress and shaderInt64: use a driver that has them (lavapipe from mesa-vulkan-drivers does; choose it with SVMIRROR_VK_DEVICE=llvmpipe)".to_string()
        }
        _ => "see svmirror info; the device or its driver refused to start".to_string(),
    };
    AppError::BackendUnavailable {
        backend: BackendKind::Vulkan,
        missing: format!("no usable Vulkan device ({})", error_chain(e)),
        fix,
    }
}

fn device_err(app: &'static str, what: &'static str) -> impl FnOnce(VulkanError) -> AppError {
    move |e| AppError::device(app, BackendKind::Vulkan, what, e)
}

/// Adds a dispatch's figures to `w`.
fn account(w: &mut DeviceWork, s: &DispatchStats) {
    w.commands += u64::from(s.passes);
    w.page_requests += s.pages_resolved;
}

/// Whether a fault that failed a dispatch is a refused access (the memory is read-only or not
/// mapped) rather than a failure of the device or the mirror, and the page.
fn refused_page(e: &VulkanError) -> Option<(u64, bool)> {
    match e {
        VulkanError::Fault {
            addr,
            write,
            source:
                svmirror_core::Error::WriteToReadOnly { .. } | svmirror_core::Error::BadAddress { .. },
        } => Some((*addr, *write)),
        _ => None,
    }
}

impl VulkanBackend {
    /// Opens the best Vulkan device (see [`svmirror_vulkan::Gpu::new`]) mirroring all of `mm`'s
    /// user address space, or says what is missing.
    pub fn open(mm: Arc<ProcessMm>) -> Result<VulkanBackend> {
        let mirror = VulkanMirror::open(mm).map_err(|e| unavailable(&e))?;
        let gpu = mirror.gpu();
        let info = gpu.info();
        let device = format!(
            "{} ({}, driver {} {}, Vulkan {}, sparseBinding {}, sparseResidencyBuffer {}); GPU page table over host-memory imports, fault and replay; validation layer {}",
            info.name,
            info.kind,
            info.driver,
            info.driver_info,
            info.api_version,
            info.sparse_binding,
            info.sparse_residency_buffer,
            if gpu.validation_enabled() {
                "on"
            } else {
                "off"
            }
        );
        let validation = gpu.validation();
        Ok(VulkanBackend {
            mirror,
            validation: validation.clone(),
            device,
            _teardown: TeardownCheck(validation),
        })
    }

    /// Fails when the validation layer has reported an error.
    fn check_validation(&self, app: &'static str) -> Result<()> {
        let errors = self.validation.errors();
        if errors == 0 {
            return Ok(());
        }
        Err(AppError::device(
            app,
            BackendKind::Vulkan,
            "Vulkan validation",
            ValidationFailed { errors },
        ))
    }

    /// Runs `d`, adding what it did to `w`.
    ///
    /// # Safety
    ///
    /// As for [`VulkanMirror::dispatch`].
    unsafe fn run(&self, d: &Dispatch, w: &mut DeviceWork) -> Result<(), VulkanError> {
        // SAFETY: the caller's contract is this function's.
        let s = unsafe { self.mirror.dispatch(d) }?;
        account(w, &s);
        Ok(())
    }
}

/// Reports validation errors left at teardown: it is dropped after the mirror, whose device
/// the layer checks for leaks when it is destroyed.
struct TeardownCheck(ValidationCounts);

impl Drop for TeardownCheck {
    fn drop(&mut self) {
        let errors = self.0.errors();
        if errors > 0 {
            tracing::error!(errors, "Vulkan validation errors");
            eprintln!("svmirror: the Khronos validation layer reported {errors} errors");
        }
    }
}

impl Backend for VulkanBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vulkan
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    unsafe fn bfs(&self, root: *const Node, progress: Progress<'_>) -> Result<(u64, DeviceWork)> {
        let started = Instant::now();
        let gpu = self.mirror.gpu();
        let err = |what| device_err("bfs", what);
        let mut w = DeviceWork::default();
        let counters = ScratchBuffer::new(gpu, FrontierCounters::BYTES).map_err(err("scratch"))?;
        let mut cur = ScratchBuffer::new(gpu, 8 * FRONTIER_START).map_err(err("scratch"))?;
        let mut next = ScratchBuffer::new(gpu, 8 * FRONTIER_START).map_err(err("scratch"))?;
        cur.write_u64(0, root as u64).map_err(err("scratch"))?;
        // Level 0: the root claims itself.
        let (mut items, mut claim_self, mut level) = (1u64, 1u64, 0u64);
        let (mut reached, mut done) = (0u64, 0u64);
        while items > 0 {
            let cap = next.len() / 8;
            counters
                .zero(0, FrontierCounters::BYTES)
                .map_err(err("scratch"))?;
            let d = Dispatch::new(
                Kernel::BfsFrontier,
                u32::try_from(items).map_err(|_| AppError::BadParameter {
                    what: "bfs: a frontier of more than 2^32 - 1 nodes".into(),
                })?,
                &[
                    cur.device_addr(),
                    next.device_addr(),
                    counters.device_addr(),
                    level,
                    cap,
                    claim_self,
                ],
            )
            .map_err(err("dispatch"))?;
            // SAFETY: the kernel reads the nodes reachable from `root` and their adjacency
            // lists, and writes their `level` fields, all valid and untouched by anyone else
            // during this call (the caller's contract); the other arguments are device
            // addresses of this call's scratch buffers, large enough for `items` and `cap`.
            unsafe { self.run(&d, &mut w) }.map_err(err("BFS level"))?;
            let count = u64::from(counters.read_u32(0).map_err(err("scratch"))?);
            let degree = u64::from(counters.read_u32(4).map_err(err("scratch"))?);
            let overflow = counters.read_u32(8).map_err(err("scratch"))?;
            if overflow != 0 || count > cap {
                return Err(AppError::Mismatch {
                    app: "bfs",
                    count: 1,
                    first: format!(
                        "level {level}: {count} nodes claimed for a frontier of {cap} (the degree bound was wrong)"
                    ),
                });
            }
            w.bytes_read += items * 24 + degree * 8;
            w.bytes_written += count * 8;
            if claim_self == 0 {
                done += items;
            }
            reached += count;
            progress(done, reached);
            if degree > cur.len() / 8 {
                // The next level appends at most `degree` nodes into what is `cur` now.
                let grown = degree.max(2 * cur.len() / 8);
                cur = ScratchBuffer::new(gpu, 8 * grown).map_err(err("scratch"))?;
            }
            std::mem::swap(&mut cur, &mut next);
            items = count;
            level = if claim_self == 1 { 1 } else { level + 1 };
            claim_self = 0;
        }
        self.check_validation("bfs")?;
        w.elapsed = started.elapsed();
        Ok((reached, w))
    }

    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork> {
        let started = Instant::now();
        let mut w = DeviceWork::default();
        let mut i = 0;
        while i < n {
            let len = SAXPY_CHUNK.min(n - i);
            let off = (i * 4) as u64;
            let d = Dispatch::new(
                Kernel::Stream,
                len as u32,
                &[x as u64 + off, y as u64 + off, u64::from(a.to_bits())],
            )
            .map_err(device_err("saxpy", "dispatch"))?;
            // SAFETY: elements `i..i + len` of `x` and `y`, inside the `n` valid f32s each
            // that the caller vouches for, untouched by anyone else during this call.
            unsafe { self.run(&d, &mut w) }.map_err(device_err("saxpy", "saxpy dispatch"))?;
            i += len;
            progress(i as u64, n as u64);
        }
        self.check_validation("saxpy")?;
        w.bytes_read = 8 * n as u64;
        w.bytes_written = 4 * n as u64;
        w.elapsed = started.elapsed();
        Ok(w)
    }

    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)> {
        let started = Instant::now();
        let err = |what| device_err("churn", what);
        let mut w = DeviceWork::default();
        if n == 0 {
            return Ok((Vec::new(), w));
        }
        let items = u32::try_from(n).map_err(|_| AppError::BadParameter {
            what: "churn: more than 2^32 - 1 slots".into(),
        })?;
        let status = ScratchBuffer::new(self.mirror.gpu(), SlotStatus::BYTES * n as u64)
            .map_err(err("scratch"))?;
        let field = |i: usize, k: u64| status.read_u64(SlotStatus::BYTES * i as u64 + 8 * k);
        let mut refused: Vec<Option<u64>> = vec![None; n];
        let d = Dispatch::new(
            Kernel::SumSlots,
            items,
            &[table as u64, status.device_addr()],
        )
        .map_err(err("dispatch"))?;
        loop {
            // SAFETY: the kernel reads the `n` table entries and the slots they name, and
            // writes each slot's last word, all untouched by anyone else during this call
            // (the caller's contract); `status` holds `n` records.
            let r = unsafe { self.run(&d, &mut w) };
            let Err(e) = r else { break };
            let Some((page, write)) = refused_page(&e) else {
                return Err(err("slot sums")(e));
            };
            // The slot the page belongs to, per the entries the kernel recorded: a refused
            // store is to the last word's page, a refused load anywhere in the slot.
            let mut found = false;
            for (i, r) in refused.iter_mut().enumerate() {
                let state = field(i, 0).map_err(err("scratch"))?;
                let addr = field(i, 2).map_err(err("scratch"))?;
                let words = field(i, 3).map_err(err("scratch"))?;
                if state != SlotStatus::PENDING || addr == 0 || words == 0 {
                    continue;
                }
                let last = addr.wrapping_add(8 * (words - 1));
                let hit = if write {
                    last & !0xfff == page
                } else {
                    addr & !0xfff <= page && page < last
                };
                if hit {
                    *r = Some(page.max(addr));
                    status
                        .write_u64(SlotStatus::BYTES * i as u64, SlotStatus::SKIPPED)
                        .map_err(err("scratch"))?;
                    found = true;
                }
            }
            if !found {
                return Err(err("slot sums")(e));
            }
        }
        let mut out = Vec::with_capacity(n);
        for (i, r) in refused.iter().enumerate() {
            let state = field(i, 0).map_err(err("scratch"))?;
            let addr = field(i, 2).map_err(err("scratch"))?;
            let words = field(i, 3).map_err(err("scratch"))?;
            out.push(match (state, r) {
                (SlotStatus::SKIPPED, Some(at)) => SlotResult::Refused { addr: *at },
                (SlotStatus::EMPTY, _) => SlotResult::Refused { addr },
                (SlotStatus::STORED, _) => {
                    w.bytes_read += 16 + 8 * words.saturating_sub(1);
                    w.bytes_written += 8;
                    SlotResult::Stored(field(i, 1).map_err(err("scratch"))?)
                }
                _ => {
                    return Err(AppError::Mismatch {
                        app: "churn",
                        count: 1,
                        first: format!("slot table entry {i}: the kernel left state {state}"),
                    });
                }
            });
        }
        self.check_validation("churn")?;
        w.elapsed = started.elapsed();
        Ok((out, w))
    }

    fn mirrors(&self) -> Vec<&dyn Mirror> {
        vec![&self.mirror]
    }

    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<Figure>> {
        let figs = bench::micro_benchmarks(&self.mirror, quick)?;
        self.check_validation("bench")?;
        Ok(figs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_accesses_count_as_refused_slots() {
        let refused = VulkanError::Fault {
            addr: 0x7000,
            write: true,
            source: svmirror_core::Error::WriteToReadOnly { addr: 0x7000 },
        };
        assert_eq!(refused_page(&refused), Some((0x7000, true)));
        let unmapped = VulkanError::Fault {
            addr: 0x9000,
            write: false,
            source: svmirror_core::Error::BadAddress { addr: 0x9000 },
        };
        assert_eq!(refused_page(&unmapped), Some((0x9000, false)));
        assert_eq!(refused_page(&VulkanError::DeviceLost), None);
        assert_eq!(
            refused_page(&VulkanError::TooManyPasses { passes: 3 }),
            None
        );
    }

    #[test]
    fn a_missing_device_says_which_package_to_install() {
        let e = unavailable(&VulkanError::NoDevice);
        assert!(e.is_bad_input());
        let msg = e.to_string();
        assert!(msg.contains("no usable Vulkan device"), "{msg}");
        assert!(msg.contains("apt install mesa-vulkan-drivers"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        let e = unavailable(&VulkanError::NoValidationLayer).to_string();
        assert!(
            e.contains("vulkan-validationlayers") && e.contains(VALIDATION_ENV),
            "{e}"
        );
    }
}
