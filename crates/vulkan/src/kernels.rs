//! The compute kernels in `shaders/`, compiled to the SPIR-V committed in `shaders/spv/`
//! (`cargo xtask shaders` regenerates it), and their pipelines.
//!
//! Every kernel takes the same 128-byte push-constant block (`SvmPush` in `shaders/svm.glsl`):
//! the page table's and fault buffer's addresses, the pass mode, the item count, and nine
//! 64-bit kernel arguments ([`Dispatch::args`]).

use std::sync::Arc;

use ash::vk;

use crate::conv::vk_err;
use crate::device::Gpu;
use crate::error::{Result, VulkanError};
use crate::memory::Submission;
use svmirror_core::MirrorError;

/// A kernel the backend can dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `y[i] = a * x[i] + y[i]` over `f32` arrays (saxpy). Arguments: `[x, y, a.to_bits()]`;
    /// items: the element count. (The shader handles 64 consecutive elements per invocation and
    /// translates the at most two pages of each array they lie on; the backend sets its fourth
    /// argument to the element count.)
    Stream,
    /// Linked-list walk: item `i` follows `next` from `heads[i]` for at most `steps` nodes
    /// ([`ChaseNode`]) and stores the sum of their values in `out[i]` (`u32`). Arguments:
    /// `[heads (*const u64), out (*mut u32), steps]`; items: the number of lists.
    Chase,
    /// One level of a pull-style BFS over [`BfsNode`]s: a node without a level that has a
    /// neighbour at level `cur` takes `cur + 1` and adds one to `*changed`. Arguments:
    /// `[nodes (*const u64 node pointers), cur, changed (*mut u32)]`; items: the node count.
    BfsStep,
    /// One level of a push-style BFS over [`GraphNode`]s (the layout a CPU program builds:
    /// level, degree, pointer to the adjacency list): item `i` takes the node at
    /// `frontier[i]` and claims every neighbour whose level is still all ones, giving it
    /// `level`; a claimed node is appended to `next` and its degree added to the counters
    /// ([`FrontierCounters`]), which bounds the next level's appends. With `claim_self` set, an
    /// item claims its own node instead (how a search starts from its root). Arguments:
    /// `[frontier, next, counters, level, next capacity, claim_self]`, the first three device
    /// addresses ([`ScratchBuffer`](crate::ScratchBuffer)s); items: the frontier's length.
    BfsFrontier,
    /// Slot sums: item `i` loads entry `i` of a table of `{ addr: u64, words: u64 }` in
    /// process memory, sums the slot's words `0..words - 1` (wrapping) and stores the sum in
    /// its last word, reporting in the [`SlotStatus`] record `i` of a device buffer. Items
    /// whose record says stored or skipped do nothing, so a table runs again after the host
    /// marks a slot it found refused. Arguments: `[table, status (device address)]`; items:
    /// the entries.
    SumSlots,
}

/// A graph node of [`Kernel::BfsFrontier`], as the shader reads and writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphNode {
    /// BFS level, all ones while unreached (the kernel writes it).
    pub level: u64,
    /// Number of neighbours.
    pub degree: u64,
    /// Address of `degree` node addresses (`u64`), the neighbours.
    pub edges: u64,
}

impl GraphNode {
    /// The level of a node no search has reached.
    pub const UNVISITED: u64 = u64::MAX;
}

/// The counters [`Kernel::BfsFrontier`] keeps in device memory, by byte offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontierCounters {
    /// Nodes claimed (appended to `next`, as far as it has room).
    pub count: u32,
    /// Sum of the claimed nodes' degrees.
    pub degree: u32,
    /// Non-zero when `next` was too small.
    pub overflow: u32,
}

impl FrontierCounters {
    /// Size of the counters in device memory.
    pub const BYTES: u64 = 12;
}

/// The per-item record of [`Kernel::SumSlots`] in device memory (32 bytes, four `u64`s).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStatus {
    /// [`SlotStatus::PENDING`], [`STORED`](SlotStatus::STORED),
    /// [`SKIPPED`](SlotStatus::SKIPPED) or [`EMPTY`](SlotStatus::EMPTY).
    pub state: u64,
    /// The sum stored, once stored.
    pub sum: u64,
    /// The slot's address as the kernel read it from the table.
    pub addr: u64,
    /// The slot's word count as the kernel read it.
    pub words: u64,
}

impl SlotStatus {
    /// Bytes per record.
    pub const BYTES: u64 = 32;
    /// Not done yet.
    pub const PENDING: u64 = 0;
    /// Summed and stored.
    pub const STORED: u64 = 1;
    /// Set by the host: the slot is not to be touched (its memory was refused).
    pub const SKIPPED: u64 = 2;
    /// The entry's address or word count is zero.
    pub const EMPTY: u64 = 3;
}

/// A list node of [`Kernel::Chase`], as the shader reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChaseNode {
    /// Address of the next node, 0 at the end.
    pub next: u64,
    /// Added to the list's sum.
    pub value: u32,
    /// Unused (keeps the node 16 bytes).
    pub pad: u32,
}

/// A graph node of [`Kernel::BfsStep`], as the shader reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BfsNode {
    /// Address of `degree` node addresses (`u64`), the neighbours.
    pub edges: u64,
    /// Number of neighbours.
    pub degree: u32,
    /// BFS level, -1 while unreached.
    pub level: i32,
}

/// One dispatch: a kernel, its work items, and its arguments (CPU pointers, by value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dispatch {
    /// What to run.
    pub kernel: Kernel,
    /// How many work items (one invocation each).
    pub items: u32,
    /// The kernel's arguments; see [`Kernel`].
    pub args: [u64; 9],
}

impl Dispatch {
    /// A dispatch of `kernel` over `items` with the first arguments `args` (rest zero).
    pub fn new(kernel: Kernel, items: u32, args: &[u64]) -> Result<Self> {
        if args.len() > 9 {
            return Err(VulkanError::InvalidDispatch {
                reason: "at most nine arguments",
            });
        }
        let mut a = [0u64; 9];
        a[..args.len()].copy_from_slice(args);
        Ok(Dispatch {
            kernel,
            items,
            args: a,
        })
    }
}

/// Which compiled module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Module {
    Stream,
    StreamDirect,
    Chase,
    ChaseDirect,
    Bfs,
    BfsFrontier,
    Slots,
}

impl Module {
    pub(crate) const ALL: [Module; 7] = [
        Module::Stream,
        Module::StreamDirect,
        Module::Chase,
        Module::ChaseDirect,
        Module::Bfs,
        Module::BfsFrontier,
        Module::Slots,
    ];

    fn spirv(self) -> &'static [u8] {
        match self {
            Module::Stream => include_bytes!("../../../shaders/spv/stream.spv"),
            Module::StreamDirect => include_bytes!("../../../shaders/spv/stream_direct.spv"),
            Module::Chase => include_bytes!("../../../shaders/spv/chase.spv"),
            Module::ChaseDirect => include_bytes!("../../../shaders/spv/chase_direct.spv"),
            Module::Bfs => include_bytes!("../../../shaders/spv/bfs.spv"),
            Module::BfsFrontier => include_bytes!("../../../shaders/spv/bfs_frontier.spv"),
            Module::Slots => include_bytes!("../../../shaders/spv/slots.spv"),
        }
    }

    /// The workgroup size the shader declares.
    pub(crate) fn local_size(self) -> u32 {
        match self {
            Module::Stream | Module::StreamDirect => 256,
            _ => 64,
        }
    }

    pub(crate) fn svm(kernel: Kernel) -> Module {
        match kernel {
            Kernel::Stream => Module::Stream,
            Kernel::Chase => Module::Chase,
            Kernel::BfsStep => Module::Bfs,
            Kernel::BfsFrontier => Module::BfsFrontier,
            Kernel::SumSlots => Module::Slots,
        }
    }

    pub(crate) fn direct(kernel: Kernel) -> Option<Module> {
        match kernel {
            Kernel::Stream => Some(Module::StreamDirect),
            Kernel::Chase => Some(Module::ChaseDirect),
            Kernel::BfsStep | Kernel::BfsFrontier | Kernel::SumSlots => None,
        }
    }
}

/// Size of the push-constant block.
pub(crate) const PUSH_SIZE: u32 = 128;

/// The pipelines of every module, sharing one layout.
pub(crate) struct Pipelines {
    gpu: Arc<Gpu>,
    pub(crate) layout: vk::PipelineLayout,
    pipelines: Vec<(Module, vk::Pipeline)>,
}

impl Pipelines {
    pub(crate) fn new(gpu: &Arc<Gpu>) -> Result<Self> {
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(PUSH_SIZE)];
        let li = vk::PipelineLayoutCreateInfo::default().push_constant_ranges(&ranges);
        // SAFETY: a live device and a create info pointing at locals.
        let layout = unsafe { gpu.device.create_pipeline_layout(&li, None) }
            .map_err(vk_err("vkCreatePipelineLayout"))?;
        let mut me = Pipelines {
            gpu: gpu.clone(),
            layout,
            pipelines: Vec::new(),
        };
        for m in Module::ALL {
            let code = ash::util::read_spv(&mut std::io::Cursor::new(m.spirv())).map_err(|_| {
                VulkanError::Mirror(MirrorError::InvalidConfig {
                    reason: "committed SPIR-V is malformed (run cargo xtask shaders)",
                })
            })?;
            let mi = vk::ShaderModuleCreateInfo::default().code(&code);
            // SAFETY: `code` is SPIR-V that passed spirv-val in `cargo xtask shaders --check`.
            let module = unsafe { gpu.device.create_shader_module(&mi, None) }
                .map_err(vk_err("vkCreateShaderModule"))?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main");
            // DISPATCH_BASE: a replay dispatches only the groups holding faulted items.
            let ci = [vk::ComputePipelineCreateInfo::default()
                .flags(vk::PipelineCreateFlags::DISPATCH_BASE)
                .stage(stage)
                .layout(layout)];
            // SAFETY: the module and layout are live; the create info points at locals.
            let r = unsafe {
                gpu.device
                    .create_compute_pipelines(vk::PipelineCache::null(), &ci, None)
            };
            // SAFETY: the pipeline (if any) keeps what it needs; the module may go.
            unsafe { gpu.device.destroy_shader_module(module, None) };
            let p = r.map_err(|(_, e)| vk_err("vkCreateComputePipelines")(e))?;
            me.pipelines.push((m, p[0]));
        }
        me.warm_up()?;
        Ok(me)
    }

    /// Runs every pipeline once over no items (each invocation returns at `svm_begin`, reaching
    /// no memory). Mesa's llvmpipe compiles a compute shader to machine code at its first
    /// dispatch, not at pipeline creation: without this the first dispatch of each kernel
    /// took the compile (3.8 ms for a one-item BFS level on lavapipe).
    fn warm_up(&self) -> Result<()> {
        let sub = Submission::begin(&self.gpu)?;
        let push = [0u8; PUSH_SIZE as usize];
        let dev = &self.gpu.device;
        for &(_, p) in &self.pipelines {
            // SAFETY: `sub.cb` is recording on this thread; the pipeline is live.
            unsafe { dev.cmd_bind_pipeline(sub.cb, vk::PipelineBindPoint::COMPUTE, p) };
            // SAFETY: as above; `push` is the layout's whole range.
            unsafe {
                dev.cmd_push_constants(sub.cb, self.layout, vk::ShaderStageFlags::COMPUTE, 0, &push)
            };
            // SAFETY: as above; with `items` 0 in `push` every invocation returns at
            // `svm_begin` and the shader reaches no memory.
            unsafe { dev.cmd_dispatch(sub.cb, 1, 1, 1) };
        }
        let mut sub = sub;
        sub.submit()?;
        sub.wait()
    }

    #[expect(
        clippy::expect_used,
        reason = "`new` made a pipeline for each of `Module::ALL`, which lists every module, or failed"
    )]
    pub(crate) fn get(&self, m: Module) -> vk::Pipeline {
        self.pipelines
            .iter()
            .find(|(k, _)| *k == m)
            .map(|(_, p)| *p)
            .expect("every module has a pipeline")
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        for (_, p) in self.pipelines.drain(..) {
            // SAFETY: no submission using the pipeline is pending (the owner waited).
            unsafe { self.gpu.device.destroy_pipeline(p, None) };
        }
        // SAFETY: as above; its pipelines are gone.
        unsafe { self.gpu.device.destroy_pipeline_layout(self.layout, None) };
    }
}

/// Elements one [`Kernel::Stream`] workgroup covers (256 invocations of 64 elements).
const STREAM_TILE: u32 = 256 * 64;

impl Dispatch {
    /// The invocation count and push arguments the shader gets for this dispatch.
    pub(crate) fn shader_form(&self) -> (u32, [u64; 9]) {
        match self.kernel {
            Kernel::Stream => {
                let mut args = self.args;
                args[3] = u64::from(self.items);
                (self.items.div_ceil(STREAM_TILE) * 256, args)
            }
            Kernel::Chase | Kernel::BfsStep | Kernel::BfsFrontier | Kernel::SumSlots => {
                (self.items, self.args)
            }
        }
    }
}

/// Workgroup counts for `items` invocations of `local`-sized groups: x up to 65535, y for the
/// rest (the shader folds y back into the item index).
pub(crate) fn groups(items: u32, local: u32) -> (u32, u32) {
    let g = items.div_ceil(local).max(1);
    let x = g.min(65535);
    (x, g.div_ceil(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_cover_every_item() {
        assert_eq!(groups(1, 256), (1, 1));
        assert_eq!(groups(256, 256), (1, 1));
        assert_eq!(groups(257, 256), (2, 1));
        let (x, y) = groups(u32::MAX, 64);
        assert!(u64::from(x) * u64::from(y) * 64 >= u64::from(u32::MAX));
        assert!(x <= 65535 && y <= 65535);
    }

    #[test]
    fn node_layouts_match_the_shaders() {
        assert_eq!(std::mem::size_of::<ChaseNode>(), 16);
        assert_eq!(std::mem::size_of::<BfsNode>(), 16);
        assert_eq!(std::mem::offset_of!(BfsNode, level), 12);
        assert_eq!(std::mem::size_of::<GraphNode>(), 24);
        assert_eq!(std::mem::offset_of!(GraphNode, edges), 16);
        assert_eq!(std::mem::size_of::<SlotStatus>() as u64, SlotStatus::BYTES);
    }
}
