#version 460
// bfs_frontier.comp: one level of a push-style breadth-first search over nodes that live in
// process memory and point at each other, in the layout the CPU built them (the svmirror app's
// `Node`, svmirror_vulkan::GraphNode): { uint64_t level; uint64_t degree; uint64_t edges; },
// `edges` pointing at `degree` uint64_t node pointers, `level` all ones while unreached.
//
// Item i takes node frontier[i]. Normally it claims every neighbour that has no level yet,
// giving it level arg[3]; in claim-self mode (arg[5] != 0) it claims its own node instead (how
// the search starts from the root). A claim is a compare-and-swap of the level's low word from
// all ones (little-endian), so exactly one item claims a node; the claimer clears the high
// word, appends the node to `next` and adds its degree to the counters, which bounds the next
// level's appends so that the host can size `next` ahead.
//
// Replay: every claim follows the translations it needs, and once an item has missed it only
// translates (recording the rest of its misses) and writes nothing. A replayed item starts
// over; what it claimed before is claimed already and is not appended twice.
//
// arg[0] = frontier (device address of uint64_t node pointers; items = their count),
// arg[1] = next (device address of uint64_t node pointers), arg[2] = counters (device address
// of { uint count; uint degree; uint overflow; }), arg[3] = the level to give,
// arg[4] = capacity of next, arg[5] = claim-self mode.
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 8) buffer U64 {
    uint64_t v;
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer U32 {
    uint v;
};
layout(buffer_reference, std430, buffer_reference_align = 8) buffer Ptrs {
    uint64_t v[];
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Counters {
    uint count;
    uint degree;
    uint overflow;
};

// Claims node `n` (a CPU pointer) with `level`, unless a miss was seen.
void claim(uint64_t n, uint level) {
    // `level` and `degree` share a page unless the node straddles one: one translation.
    uint64_t lp = svm_translate(n, true);
    uint64_t dp = lp + 8ul;
    if (((n + 8ul) >> 12) != (n >> 12)) {
        dp = svm_translate(n + 8ul, false);
    }
    if (svm_faulted) {
        return;
    }
    if (atomicCompSwap(U32(lp).v, 0xffffffffu, level) != 0xffffffffu) {
        return;
    }
    U32(lp + 4ul).v = 0u;
    uint degree = uint(U64(dp).v);
    Counters c = Counters(pc.arg[2]);
    uint slot = atomicAdd(c.count, 1u);
    atomicAdd(c.degree, degree);
    if (slot < uint(pc.arg[4])) {
        Ptrs(pc.arg[1]).v[slot] = n;
    } else {
        atomicOr(c.overflow, 1u);
    }
}

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (!svm_begin(i)) {
        return;
    }
    uint64_t node = Ptrs(pc.arg[0]).v[i];
    uint level = uint(pc.arg[3]);
    if (pc.arg[5] != 0ul) {
        claim(node, level);
        svm_end(i);
        return;
    }
    uint64_t dp = svm_translate(node + 8ul, false);
    uint64_t ep = svm_translate(node + 16ul, false);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    // A 32-bit count (no node has 2^32 edges), as in slots.comp, where a long loop with a
    // 64-bit induction variable gave wrong results on lavapipe.
    uint degree = uint(min(U64(dp).v, 0xfffffffful));
    uint64_t edges = U64(ep).v;
    // The adjacency list is translated once per page it spans.
    uint64_t page = ~0ul;
    uint64_t base = 0ul;
    for (uint e = 0u; e < degree; e++) {
        uint64_t ea = edges + 8ul * e;
        if ((ea >> 12) != page) {
            page = ea >> 12;
            base = svm_translate(page << 12, false);
        }
        if (base == 0ul) {
            continue;
        }
        claim(U64(base + (ea & 4095ul)).v, level);
    }
    svm_end(i);
}
