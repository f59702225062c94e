//! Dispatch with fault and replay, and the staging-copy baselines.
//!
//! # Fault and replay
//!
//! A pass runs the kernel; every work item that misses a translation records the missing page
//! in the fault buffer (as many as it holds: [`MirrorConfig::fault_capacity`]), sets its bit in
//! the replay bitmap and stops before writing anything. After the pass the host reads the fault
//! buffer, resolves each distinct page through the core's fault loop (import and map), and runs
//! a replay pass in which only the marked items run. Misses that did not fit in the fault buffer
//! are simply found again by the replay. The dispatch ends after the first pass in which no item
//! faulted.
//!
//! [`MirrorConfig::fault_capacity`]: crate::MirrorConfig::fault_capacity

use std::sync::Arc;

use ash::vk;
use gpu_allocator::MemoryLocation;

use crate::device::Gpu;
use crate::error::{Result, VulkanError};
use crate::kernels::{ChaseNode, Dispatch, Kernel, Module, PUSH_SIZE, groups};
use crate::memory::{GpuBuffer, HostBuffer, Submission};
use crate::mirror::VulkanMirror;
use crate::page_table::MAX_PROBE;

/// What one [`VulkanMirror::dispatch`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Passes run (1 when nothing faulted).
    pub passes: u32,
    /// Distinct misses the shader recorded, counting those the fault buffer could not hold.
    pub misses: u64,
    /// Distinct pages resolved.
    pub pages_resolved: u64,
    /// Work items replayed.
    pub replayed_items: u64,
    /// Passes whose misses overflowed the fault buffer.
    pub overflowed_passes: u32,
    /// Fault batches: passes that recorded misses, each serviced as one batch between the pass
    /// and its replay, so `pages_resolved / fault_batches` is the faults per batch.
    pub fault_batches: u32,
}

impl DispatchStats {
    /// Pages resolved per fault batch (0 when nothing faulted).
    pub fn faults_per_batch(&self) -> f64 {
        if self.fault_batches == 0 {
            0.0
        } else {
            self.pages_resolved as f64 / f64::from(self.fault_batches)
        }
    }
}

/// The fault buffer and the two replay bitmaps, reused across dispatches.
pub(crate) struct DispatchBuffers {
    faults: HostBuffer,
    bits: [HostBuffer; 2],
    items: u32,
}

/// Header of the fault buffer: counters, then the `seen` filter of `shaders/svm.glsl`.
const SEEN_WORDS: u64 = 4096;
const FAULT_HEADER: u64 = 16 + 4 * SEEN_WORDS;

impl DispatchBuffers {
    fn new(gpu: &Arc<Gpu>, cap: u32, items: u32) -> Result<Self> {
        let words = u64::from(items.div_ceil(32).max(1));
        let faults = HostBuffer::new(
            gpu,
            FAULT_HEADER + 8 * u64::from(cap),
            MemoryLocation::GpuToCpu,
            "svm faults",
        )?;
        let a = HostBuffer::new(gpu, words * 4, MemoryLocation::GpuToCpu, "svm replay a")?;
        let b = HostBuffer::new(gpu, words * 4, MemoryLocation::GpuToCpu, "svm replay b")?;
        Ok(DispatchBuffers {
            faults,
            bits: [a, b],
            items,
        })
    }
}

/// The push-constant block of `shaders/svm.glsl`.
#[allow(clippy::too_many_arguments)]
fn push_block(
    dir: u64,
    leaves: u64,
    faults: u64,
    replay_in: u64,
    replay_out: u64,
    dir_mask: u32,
    mode: u32,
    items: u32,
    args: &[u64; 9],
) -> [u8; PUSH_SIZE as usize] {
    let mut b = [0u8; PUSH_SIZE as usize];
    for (i, v) in [dir, leaves, faults, replay_in, replay_out]
        .iter()
        .enumerate()
    {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    for (i, v) in [dir_mask, mode, items, MAX_PROBE].iter().enumerate() {
        b[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    for (i, v) in args.iter().enumerate() {
        b[56 + i * 8..64 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

impl VulkanMirror {
    /// Records `module` over `items` with `push` into `sub`; with `only`, just the workgroups
    /// holding items `only.0..=only.1` (a replay pass: the other items return at `svm_begin`,
    /// but on lavapipe even that costs about 80 ns an item).
    fn record(
        &self,
        sub: &Submission,
        module: Module,
        items: u32,
        push: &[u8],
        only: Option<(u32, u32)>,
    ) {
        let dev = &self.inner.gpu.device;
        let (x, y) = groups(items, module.local_size());
        let (base, count) = match only {
            Some(r) => replay_groups(r, x, y, module.local_size()),
            None => ((0, 0), (x, y)),
        };
        // SAFETY: `sub.cb` is recording on this thread; the pipeline and layout are live.
        unsafe {
            dev.cmd_bind_pipeline(
                sub.cb,
                vk::PipelineBindPoint::COMPUTE,
                self.pipelines.get(module),
            )
        };
        // SAFETY: as above; `push` is the layout's whole 128-byte range.
        unsafe {
            dev.cmd_push_constants(
                sub.cb,
                self.pipelines.layout,
                vk::ShaderStageFlags::COMPUTE,
                0,
                push,
            )
        };
        // SAFETY: as above; the pipelines are created with DISPATCH_BASE, and base + count
        // stays within the full dispatch's groups.
        unsafe { dev.cmd_dispatch_base(sub.cb, base.0, base.1, 0, count.0, count.1, 1) };
    }

    /// Submits `sub` with its fence in the in-flight list, waits, and takes it off the list.
    ///
    /// Settles the mirrored range first: a plain munmap, mremap or madvise returns once its
    /// userfaultfd event is read (fs/userfaultfd.c: reading completes it), before the monitor
    /// invalidated anything, and the shader goes through every translation the table still
    /// holds without asking; so the submission waits until every change the monitor has read
    /// is handled (`PageSource::settle`).
    fn run_tracked(&self, mut sub: Submission) -> Result<()> {
        let inner = &*self.inner;
        self.mm.settle(inner.range).map_err(|source| {
            VulkanError::Mirror(svmirror_core::MirrorError::Core {
                op: "settle",
                range: inner.range,
                source,
            })
        })?;
        let id = {
            let mut g = inner.state.lock();
            sub.submit()?;
            g.track(sub.fence)
        };
        let waited = sub.wait();
        inner.state.lock().untrack(id);
        drop(sub);
        waited
    }

    /// Runs `d` on the device over the process's memory, resolving faults and replaying the
    /// work items that faulted until none does. Returns what it took.
    ///
    /// # Safety
    ///
    /// The kernel reads and writes process memory at the addresses in `d.args` and wherever
    /// the data there points (see [`Kernel`]). The caller guarantees those addresses lie in
    /// memory that may be accessed so, inside the mirrored range, and that no Rust reference
    /// to memory the kernel writes is used until this returns (STYLE.md rule 6).
    pub unsafe fn dispatch(&self, d: &Dispatch) -> Result<DispatchStats> {
        // SAFETY: the caller's contract is this function's.
        let r = unsafe { self.dispatch_inner(d) };
        if matches!(r, Err(VulkanError::DeviceLost)) {
            // Fail closed: a lost device reaches nothing any more; its imports go now.
            self.evict_all();
        }
        r
    }

    /// [`dispatch`](Self::dispatch) without the clean-up on device loss.
    ///
    /// # Safety
    ///
    /// As for [`dispatch`](Self::dispatch).
    unsafe fn dispatch_inner(&self, d: &Dispatch) -> Result<DispatchStats> {
        let inner = &*self.inner;
        let _span =
            tracing::debug_span!("vulkan.dispatch", kernel = ?d.kernel, items = d.items).entered();
        if d.items == 0 {
            return Err(VulkanError::InvalidDispatch {
                reason: "a dispatch needs at least one item",
            });
        }
        let module = Module::svm(d.kernel);
        let (items, args) = d.shader_form();
        let mut bufs = self
            .dispatch_buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let b = match &mut *bufs {
            Some(b) if b.items >= items => &*b,
            slot => {
                // The old buffers go before the bigger ones are made.
                *slot = None;
                &*slot.insert(DispatchBuffers::new(
                    &inner.gpu,
                    inner.config.fault_capacity,
                    items,
                )?)
            }
        };
        let cap = inner.config.fault_capacity;
        let words = u64::from(items.div_ceil(32));
        let (dir, leaves, mask) = {
            let g = inner.state.lock();
            (
                g.table().dir_addr(),
                g.table().leaves_addr(),
                g.table().dir_mask(),
            )
        };
        let mut stats = DispatchStats::default();
        let (mut cur_in, mut mode) = (1usize, 0u32);
        let mut replay = None;
        loop {
            if stats.passes >= inner.config.max_passes {
                return Err(VulkanError::TooManyPasses {
                    passes: stats.passes,
                });
            }
            stats.passes += 1;
            let cur_out = 1 - cur_in;
            b.faults.write_u32(0, 0);
            b.faults.write_u32(4, cap);
            b.faults.write_u32(8, 0);
            b.faults.zero(16, 4 * SEEN_WORDS);
            b.bits[cur_out].zero(0, words * 4);
            let push = push_block(
                dir,
                leaves,
                b.faults.addr,
                b.bits[cur_in].addr,
                b.bits[cur_out].addr,
                mask,
                mode,
                items,
                &args,
            );
            let sub = Submission::begin(&inner.gpu)?;
            self.record(&sub, module, items, &push, replay);
            self.run_tracked(sub)?;
            let count = b.faults.read_u32(0);
            if b.faults.read_u32(8) == 0 {
                return Ok(stats);
            }
            let (mut faulted, mut first, mut last) = (0u64, u32::MAX, 0u32);
            for w in 0..words {
                let bits = b.bits[cur_out].read_u32(w * 4);
                if bits != 0 {
                    let w = w as u32;
                    first = first.min(w * 32 + bits.trailing_zeros());
                    last = w * 32 + 31 - bits.leading_zeros();
                    faulted += u64::from(bits.count_ones());
                }
            }
            // A replay needs only the groups from the first to the last faulted item.
            replay = (faulted > 0).then_some((first, last.min(items - 1)));
            stats.misses += u64::from(count);
            if count > cap {
                stats.overflowed_passes += 1;
            }
            let mut misses: Vec<(u64, bool)> = (0..count.min(cap))
                .map(|i| {
                    let rec = b.faults.read_u64(FAULT_HEADER + 8 * u64::from(i));
                    (rec & !0xfff, rec & 1 != 0)
                })
                .collect();
            misses.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            misses.dedup_by_key(|m| m.0);
            stats.fault_batches += 1;
            for (page, write) in misses {
                self.resolve(page, write)?;
                stats.pages_resolved += 1;
            }
            stats.replayed_items += faulted;
            cur_in = cur_out;
            mode = 1;
        }
    }

    /// `y[i] = a * x[i] + y[i]` on the device, in place, over the first `min(x.len(), y.len())`
    /// elements: [`Kernel::Stream`] with its safety argument settled by the borrows (the kernel
    /// reads only `x` and writes only `y`, which no one else can touch meanwhile).
    pub fn saxpy(&self, a: f32, x: &[f32], y: &mut [f32]) -> Result<DispatchStats> {
        let n = u32::try_from(x.len().min(y.len())).map_err(|_| VulkanError::InvalidDispatch {
            reason: "more than 2^32 - 1 elements",
        })?;
        let d = Dispatch::new(
            Kernel::Stream,
            n,
            &[
                x.as_ptr() as u64,
                y.as_mut_ptr() as u64,
                u64::from(a.to_bits()),
            ],
        )?;
        // SAFETY: the kernel reads `n` elements of `x` (shared borrow: nobody writes it) and
        // writes `n` elements of `y` (exclusive borrow: nobody else reads or writes it), and
        // nothing else; the borrows last until the dispatch has completed.
        unsafe { self.dispatch(&d) }
    }

    /// Runs `d`'s kernel compiled without translation: its arguments are device addresses
    /// (of [`DeviceArray`]s, say), and nothing faults. The staging-copy baseline.
    ///
    /// # Safety
    ///
    /// Every address the kernel reaches must be a device address of live device memory.
    pub unsafe fn dispatch_direct(&self, d: &Dispatch) -> Result<()> {
        let module = Module::direct(d.kernel).ok_or(VulkanError::InvalidDispatch {
            reason: "this kernel has no direct variant",
        })?;
        if d.items == 0 {
            return Err(VulkanError::InvalidDispatch {
                reason: "a dispatch needs at least one item",
            });
        }
        let (items, args) = d.shader_form();
        let push = push_block(0, 0, 0, 0, 0, 0, 0, items, &args);
        let sub = Submission::begin(&self.inner.gpu)?;
        self.record(&sub, module, items, &push, None);
        self.run_tracked(sub)
    }
}

/// The workgroups (base, count) of a replay of items `first..=last` in a dispatch of `x` by `y`
/// groups of `local` items: a run of groups when the dispatch is one row, else the rows
/// holding them (the shaders number items across the full row width, which stays).
fn replay_groups(
    (first, last): (u32, u32),
    x: u32,
    y: u32,
    local: u32,
) -> ((u32, u32), (u32, u32)) {
    let (g0, g1) = (first / local, last / local);
    if y <= 1 {
        let g1 = g1.min(x - 1);
        let g0 = g0.min(g1);
        ((g0, 0), (g1 - g0 + 1, 1))
    } else {
        let r1 = (g1 / x).min(y - 1);
        let r0 = (g0 / x).min(r1);
        ((0, r0), (x, r1 - r0 + 1))
    }
}

/// A device-local array with a host staging buffer beside it: the explicit-copy way of giving a
/// kernel data, which the benchmarks compare SVM against.
pub struct DeviceArray {
    gpu: Arc<Gpu>,
    device: GpuBuffer,
    staging: HostBuffer,
    readback: HostBuffer,
}

impl std::fmt::Debug for DeviceArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArray")
            .field("bytes", &self.device.size)
            .finish()
    }
}

impl DeviceArray {
    /// `bytes` of device-local memory with staging buffers of the same size.
    pub fn new(gpu: &Arc<Gpu>, bytes: u64) -> Result<Self> {
        Ok(DeviceArray {
            gpu: gpu.clone(),
            device: GpuBuffer::new(gpu, bytes, MemoryLocation::GpuOnly, "array")?,
            staging: HostBuffer::new(gpu, bytes, MemoryLocation::CpuToGpu, "array upload")?,
            readback: HostBuffer::new(gpu, bytes, MemoryLocation::GpuToCpu, "array readback")?,
        })
    }

    /// The device address kernels use.
    pub fn device_addr(&self) -> u64 {
        self.device.addr
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.device.size
    }

    /// Whether it is empty (never: zero-sized arrays are refused).
    pub fn is_empty(&self) -> bool {
        self.device.size == 0
    }

    /// Copies `data` into the device memory (through the staging buffer, one submission).
    pub fn upload(&self, data: &[u8]) -> Result<()> {
        let n = (data.len() as u64).min(self.device.size);
        let dst = self.staging.host_ptr();
        // SAFETY: `dst` is mapped for `size >= n` bytes and distinct from `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, n as usize) };
        self.copy(&self.staging, &self.device, n)
    }

    /// Copies the device memory into `out` (through the readback buffer, one submission).
    pub fn download(&self, out: &mut [u8]) -> Result<()> {
        let n = (out.len() as u64).min(self.device.size);
        self.copy(&self.device, &self.readback, n)?;
        let src = self.readback.host_ptr();
        // SAFETY: `src` is mapped for `n` bytes, written by the finished copy, distinct from
        // `out`.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), n as usize) };
        Ok(())
    }

    fn copy(&self, from: &GpuBuffer, to: &GpuBuffer, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut sub = Submission::begin(&self.gpu)?;
        let region = [vk::BufferCopy::default().size(n)];
        // SAFETY: `sub.cb` is recording on this thread; both buffers are live and at least `n`
        // bytes long.
        unsafe {
            self.gpu
                .device
                .cmd_copy_buffer(sub.cb, from.buffer, to.buffer, &region)
        };
        sub.submit()?;
        sub.wait()
    }
}

/// The staging-copy version of [`Kernel::Stream`]: upload `x` and `y`, run the direct kernel,
/// download `y`. The baseline the SVM dispatch is measured against.
#[derive(Debug)]
pub struct StagedStream {
    x: DeviceArray,
    y: DeviceArray,
}

impl StagedStream {
    /// Device arrays for `n` elements.
    pub fn new(gpu: &Arc<Gpu>, n: u32) -> Result<Self> {
        let bytes = u64::from(n) * 4;
        Ok(StagedStream {
            x: DeviceArray::new(gpu, bytes)?,
            y: DeviceArray::new(gpu, bytes)?,
        })
    }

    /// `y = a * x + y` through explicit copies.
    pub fn run(&self, mirror: &VulkanMirror, x: &[f32], y: &mut [f32], a: f32) -> Result<()> {
        let n = x.len().min(y.len());
        if n == 0 || (n as u64) * 4 > self.x.len() {
            return Err(VulkanError::InvalidDispatch {
                reason: "arrays empty or larger than the staging buffers",
            });
        }
        let as_bytes = |s: &[f32]| s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        self.x.upload(&as_bytes(&x[..n]))?;
        self.y.upload(&as_bytes(&y[..n]))?;
        let d = Dispatch::new(
            Kernel::Stream,
            n as u32,
            &[
                self.x.device_addr(),
                self.y.device_addr(),
                u64::from(a.to_bits()),
            ],
        )?;
        // SAFETY: the arguments are device addresses of arrays holding `n` elements.
        unsafe { mirror.dispatch_direct(&d) }?;
        let mut out = vec![0u8; n * 4];
        self.y.download(&mut out)?;
        for (v, c) in y.iter_mut().zip(out.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// The staging-copy version of [`Kernel::Chase`]: the nodes are copied to device memory with
/// their `next` pointers rewritten to device addresses (the work SVM saves), the walk runs on
/// the copy, and the sums come back.
#[derive(Debug)]
pub struct StagedChase {
    nodes: DeviceArray,
    heads: DeviceArray,
    out: DeviceArray,
}

impl StagedChase {
    /// Device arrays for `nodes` nodes and `lists` lists.
    pub fn new(gpu: &Arc<Gpu>, nodes: u32, lists: u32) -> Result<Self> {
        Ok(StagedChase {
            nodes: DeviceArray::new(gpu, u64::from(nodes) * 16)?,
            heads: DeviceArray::new(gpu, u64::from(lists) * 8)?,
            out: DeviceArray::new(gpu, u64::from(lists) * 4)?,
        })
    }

    /// Walks the lists starting at `heads` (addresses of elements of `nodes`) for at most
    /// `steps` nodes each, storing the sums in `out`.
    pub fn run(
        &self,
        mirror: &VulkanMirror,
        nodes: &[ChaseNode],
        heads: &[u64],
        steps: u64,
        out: &mut [u32],
    ) -> Result<()> {
        let base = nodes.as_ptr() as u64;
        let end = base + 16 * nodes.len() as u64;
        let dev = self.nodes.device_addr();
        let reloc = |p: u64| {
            if p == 0 {
                Ok(0)
            } else if (base..end).contains(&p) {
                Ok(dev + (p - base))
            } else {
                Err(VulkanError::InvalidDispatch {
                    reason: "a node pointer leaves the node array",
                })
            }
        };
        if nodes.is_empty()
            || heads.is_empty()
            || out.len() < heads.len()
            || 16 * nodes.len() as u64 > self.nodes.len()
            || 8 * heads.len() as u64 > self.heads.len()
        {
            return Err(VulkanError::InvalidDispatch {
                reason: "arrays empty or larger than the staging buffers",
            });
        }
        let mut nb = Vec::with_capacity(nodes.len() * 16);
        for n in nodes {
            nb.extend_from_slice(&reloc(n.next)?.to_le_bytes());
            nb.extend_from_slice(&n.value.to_le_bytes());
            nb.extend_from_slice(&n.pad.to_le_bytes());
        }
        let mut hb = Vec::with_capacity(heads.len() * 8);
        for &h in heads {
            hb.extend_from_slice(&reloc(h)?.to_le_bytes());
        }
        self.nodes.upload(&nb)?;
        self.heads.upload(&hb)?;
        let d = Dispatch::new(
            Kernel::Chase,
            heads.len() as u32,
            &[self.heads.device_addr(), self.out.device_addr(), steps],
        )?;
        // SAFETY: every address the kernel follows was relocated into the node array's copy.
        unsafe { mirror.dispatch_direct(&d) }?;
        let mut ob = vec![0u8; heads.len() * 4];
        self.out.download(&mut ob)?;
        for (v, c) in out.iter_mut().zip(ob.chunks_exact(4)) {
            *v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// Device work in flight that does nothing but wait: a command buffer whose first command waits
/// for a host-set event (`vkCmdWaitEvents` with `VK_PIPELINE_STAGE_HOST_BIT`, legal outside a
/// render pass for an event the host sets after submission), tracked in the mirror's in-flight
/// list like a dispatch. An invalidation of an occupied range waits for its fence, so the
/// CPU's change does not return until this drops: the [`Mirror::begin_work`] token.
///
/// [`Mirror::begin_work`]: svmirror_core::Mirror::begin_work
pub(crate) struct HeldWork {
    inner: Arc<crate::mirror::Inner>,
    event: vk::Event,
    sub: Option<Submission>,
    id: Option<u64>,
}

impl VulkanMirror {
    /// Submits a [`HeldWork`]: in flight until it drops.
    pub(crate) fn hold_work(&self) -> Result<HeldWork> {
        let gpu = &self.inner.gpu;
        // SAFETY: a live device and a plain create info.
        let event = unsafe {
            gpu.device
                .create_event(&vk::EventCreateInfo::default(), None)
        }
        .map_err(crate::conv::vk_err("vkCreateEvent"))?;
        let mut held = HeldWork {
            inner: self.inner.clone(),
            event,
            sub: None,
            id: None,
        };
        let mut sub = Submission::begin(gpu)?;
        // SAFETY: `sub.cb` is recording on this thread; the event is live until `held` drops,
        // which waits for the submission first.
        unsafe {
            gpu.device.cmd_wait_events(
                sub.cb,
                &[event],
                vk::PipelineStageFlags::HOST,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                &[],
                &[],
                &[],
            )
        };
        let mut g = self.inner.state.lock();
        sub.submit()?;
        let id = g.track(sub.fence);
        drop(g);
        held.sub = Some(sub);
        held.id = Some(id);
        Ok(held)
    }
}

impl Drop for HeldWork {
    fn drop(&mut self) {
        let dev = &self.inner.gpu.device;
        // SAFETY: the event is live; setting it from the host lets the waiting command finish.
        if let Err(e) = unsafe { dev.set_event(self.event) } {
            tracing::error!(error = %e, "vkSetEvent failed; the held work ends with the device");
        }
        // Waits for the submission (Submission's drop) before the event goes.
        if let Some(sub) = self.sub.take() {
            if let Err(e) = sub.wait() {
                tracing::error!(error = %e, "waiting for held work failed");
            }
            if let Some(id) = self.id {
                self.inner.state.lock().untrack(id);
            }
            drop(sub);
        }
        // SAFETY: no pending submission waits on the event any more (waited above, or never
        // submitted).
        unsafe { dev.destroy_event(self.event, None) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_covers_exactly_the_groups_of_its_items_in_one_row() {
        // 10 groups of 64 in one row: items 130..=200 are in groups 2..=3.
        assert_eq!(replay_groups((130, 200), 10, 1, 64), ((2, 0), (2, 1)));
        assert_eq!(replay_groups((0, 0), 10, 1, 64), ((0, 0), (1, 1)));
        assert_eq!(replay_groups((639, 639), 10, 1, 64), ((9, 0), (1, 1)));
    }

    #[test]
    fn a_replay_of_a_two_dimensional_dispatch_takes_whole_rows() {
        // 65535 x 3 groups of 64: item 65535 * 64 + 5 is in row 1, the last item in row 2.
        let row = 65535 * 64;
        assert_eq!(
            replay_groups((row + 5, row + 6), 65535, 3, 64),
            ((0, 1), (65535, 1))
        );
        assert_eq!(
            replay_groups((10, 2 * row + 1), 65535, 3, 64),
            ((0, 0), (65535, 3))
        );
    }
}
