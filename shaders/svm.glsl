// svm.glsl: the svmirror translation include.
//
// A compute shader that includes this file reaches the process's ordinary memory by CPU
// pointer. `svm_translate(ptr, write)` looks the pointer's page up in the GPU page table that
// svmirror-vulkan keeps (a hashed directory of 2 MiB blocks, each with a leaf of 512 page
// entries) and returns the device address of the byte, or 0 after recording a miss in the
// fault buffer. A work item that saw a miss must not write anything afterwards: it calls
// `svm_end(item)` and returns, and the host replays it once the miss is resolved.
//
// Compiled with -DSVM_DIRECT, translation is the identity and nothing faults: the same kernel
// then works on device addresses, which is the staging-copy baseline of the benchmarks.
//
// Layouts (crates/vulkan/src/page_table.rs and dispatch.rs hold the host side):
//   directory entry: { uint64_t key = block + 1 (0 empty, ~0 deleted); uint64_t leaf index }
//   leaf entry:      device address of the page | VALID (bit 63) | WRITE (bit 62)
//   fault buffer:    { uint count; uint cap; uint faulted; uint pad; uint seen[SVM_SEEN];
//                      uint64_t miss[cap] }
//                    miss = page address | 1 if the access was a write; `seen` filters
//                    repeated misses of one page within a pass (a hashed set of page tags,
//                    cleared by the host before each pass); `faulted` is set when any item
//                    faulted
//   replay bitmaps:  one bit per work item

#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require

layout(buffer_reference, std430, buffer_reference_align = 8) buffer SvmU64 {
    uint64_t v[];
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer SvmBits {
    uint w[];
};
const uint SVM_SEEN = 4096u;
const uint SVM_SEEN_PROBE = 8u;

layout(buffer_reference, std430, buffer_reference_align = 8) buffer SvmFaults {
    uint count;
    uint cap;
    uint faulted;
    uint pad;
    uint seen[SVM_SEEN];
    uint64_t miss[];
};

// 128 bytes: the minimum every Vulkan device offers.
layout(push_constant, std430) uniform SvmPush {
    uint64_t dir;
    uint64_t leaves;
    uint64_t faults;
    uint64_t replay_in;
    uint64_t replay_out;
    uint dir_mask;
    uint mode;
    uint items;
    uint max_probe;
    uint64_t arg[9];
} pc;

const uint64_t SVM_VALID = 1ul << 63;
const uint64_t SVM_WRITE = 1ul << 62;
const uint64_t SVM_ADDR_MASK = SVM_WRITE - 1ul;
const uint SVM_MODE_REPLAY = 1u;

bool svm_faulted = false;

void svm_miss(uint64_t page_addr, bool write) {
    svm_faulted = true;
    SvmFaults f = SvmFaults(pc.faults);
    // One record per page and kind of access per pass: the first miss of a page claims its
    // tag (linear probing over a few slots); later ones with the same tag stop here. A full
    // neighbourhood only records a duplicate.
    uint64_t pn = page_addr >> 12;
    uint tag = (uint(pn) << 1 | (write ? 1u : 0u)) | 0x80000000u;
    uint h = ((uint(pn) ^ uint(pn >> 32)) * 0x9E3779B1u >> 8) & (SVM_SEEN - 1u);
    for (uint i = 0u; i < SVM_SEEN_PROBE; i++) {
        uint old = atomicCompSwap(f.seen[h], 0u, tag);
        if (old == tag) {
            return;
        }
        if (old == 0u) {
            break;
        }
        h = (h + 1u) & (SVM_SEEN - 1u);
    }
    if (f.count >= f.cap) {
        // Full: count the miss so the host knows it overflowed; the replay finds it again.
        atomicAdd(f.count, 1u);
        return;
    }
    uint slot = atomicAdd(f.count, 1u);
    if (slot < f.cap) {
        f.miss[slot] = page_addr | (write ? 1ul : 0ul);
    }
}

uint64_t svm_translate(uint64_t p, bool write) {
#ifdef SVM_DIRECT
    return p;
#else
    uint64_t page = p >> 12;
    uint64_t block = page >> 9;
    uint h = ((uint(block) ^ uint(block >> 32)) * 0x9E3779B1u >> 8) & pc.dir_mask;
    SvmU64 dir = SvmU64(pc.dir);
    uint64_t leaf = ~0ul;
    for (uint i = 0u; i < pc.max_probe; i++) {
        uint64_t key = dir.v[2u * h];
        if (key == block + 1ul) {
            leaf = dir.v[2u * h + 1u];
            break;
        }
        if (key == 0ul) {
            break;
        }
        h = (h + 1u) & pc.dir_mask;
    }
    uint64_t e = 0ul;
    if (leaf != ~0ul) {
        e = SvmU64(pc.leaves).v[uint(leaf) * 512u + uint(page & 511ul)];
    }
    if ((e & SVM_VALID) == 0ul || (write && (e & SVM_WRITE) == 0ul)) {
        svm_miss(page << 12, write);
        return 0ul;
    }
    return (e & SVM_ADDR_MASK) + (p & 4095ul);
#endif
}

// Whether work item `item` runs in this pass: every item in the first pass, only those that
// faulted in the previous pass when replaying.
bool svm_begin(uint item) {
    if (item >= pc.items) {
        return false;
    }
#ifndef SVM_DIRECT
    if (pc.mode == SVM_MODE_REPLAY) {
        uint w = SvmBits(pc.replay_in).w[item >> 5];
        return ((w >> (item & 31u)) & 1u) != 0u;
    }
#endif
    return true;
}

// Marks `item` for replay if it saw a miss. Call it before returning from a faulted item.
void svm_end(uint item) {
#ifndef SVM_DIRECT
    if (svm_faulted) {
        atomicOr(SvmBits(pc.replay_out).w[item >> 5], 1u << (item & 31u));
        SvmFaults(pc.faults).faulted = 1u;
    }
#endif
}
