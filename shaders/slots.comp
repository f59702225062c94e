#version 460
// slots.comp: slot sums. Item i loads entry i of a slot table in process memory,
// { uint64_t addr; uint64_t words; }, sums the slot's words 0 .. words - 2 (wrapping) and
// stores the sum in its last word. Each item reports in a status record in device memory,
// { uint64_t state; uint64_t sum; uint64_t addr; uint64_t words; } (svmirror_vulkan::SlotStatus):
// state 0 pending, 1 stored, 2 skipped (the host found the slot's memory refused: read-only or
// not mapped), 3 empty (addr or words is 0). Items in state 1 or 2 do nothing, so the host can
// run the table again after marking a refused slot.
//
// Replay: the item records the entry it read (device memory, rewritten identically on replay),
// translates every page of the slot, the last word's for writing, before the one store; the
// sum leaves out the last word, so running an item twice stores the same sum.
//
// arg[0] = table (CPU pointer), arg[1] = status (device address); items = entries.
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 8) buffer U64 {
    uint64_t v;
};
layout(buffer_reference, std430, buffer_reference_align = 8) buffer Status {
    uint64_t state;
    uint64_t sum;
    uint64_t addr;
    uint64_t words;
};

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (!svm_begin(i)) {
        return;
    }
    Status s = Status(pc.arg[1] + 32ul * i);
    if (s.state == 1ul || s.state == 2ul) {
        return;
    }
    uint64_t tp = svm_translate(pc.arg[0] + 16ul * i, false);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    uint64_t addr = U64(tp).v;
    uint64_t words = U64(tp + 8ul).v;
    s.addr = addr;
    s.words = words;
    if (addr == 0ul || words == 0ul) {
        s.state = 3ul;
        return;
    }
    uint64_t last = addr + 8ul * (words - 1ul);
    // Loops count in 32 bits: on lavapipe (Mesa 22.3, LLVM 15) a word loop with a 64-bit
    // induction variable gave wrong sums over slots of 192 KiB and more (cause not found).
    uint pages = last > addr ? uint(((last - 1ul) >> 12) - (addr >> 12)) + 1u : 0u;
    for (uint k = 0u; k < pages; k++) {
        svm_translate((addr & ~4095ul) + 4096ul * k, false);
    }
    uint64_t lw = svm_translate(last, true);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    uint64_t sum = 0ul;
    for (uint k = 0u; k < pages; k++) {
        uint64_t p = (addr & ~4095ul) + 4096ul * k;
        uint64_t base = svm_translate(p, false);
        if (base == 0ul) {
            // Invalidated since the first loop: replay from the start.
            svm_end(i);
            return;
        }
        uint64_t lo = max(addr, p);
        uint64_t hi = min(last, p + 4096ul);
        uint64_t from = base + (lo & 4095ul);
        uint count = uint((hi - lo) >> 3);
        for (uint w = 0u; w < count; w++) {
            sum += U64(from + 8ul * w).v;
        }
    }
    U64(lw).v = sum;
    s.sum = sum;
    s.state = 1ul;
}
