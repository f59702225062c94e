#version 460
// bfs.comp: one level of a pull-style breadth-first search over a graph whose nodes live in
// process memory and point at each other. Item i is node nodes[i]: if it has no level yet and
// one of its neighbours has level `cur`, it takes level cur + 1 and bumps *changed. Every write
// follows every read, so a faulted item replays from the start without harm.
// arg[0] = nodes (CPU pointer to uint64_t node pointers), arg[1] = cur (level),
// arg[2] = changed (CPU pointer to uint); items = number of nodes.
// Node layout (svmirror_vulkan::BfsNode): { uint64_t edges; uint degree; int level; },
// `edges` pointing at `degree` uint64_t node pointers.
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 8) buffer GNode {
    uint64_t edges;
    uint degree;
    int level;
};
layout(buffer_reference, std430, buffer_reference_align = 8) buffer U64 {
    uint64_t v;
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer U32 {
    uint v;
};

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (!svm_begin(i)) {
        return;
    }
    int cur = int(pc.arg[1]);
    uint64_t np = svm_translate(pc.arg[0] + 8ul * i, false);
    uint64_t cp = svm_translate(pc.arg[2], true);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    uint64_t me = svm_translate(U64(np).v, true);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    if (GNode(me).level >= 0) {
        return;
    }
    uint64_t edges = GNode(me).edges;
    uint degree = GNode(me).degree;
    bool found = false;
    for (uint e = 0u; e < degree && !found; e++) {
        uint64_t ep = svm_translate(edges + 8ul * e, false);
        if (svm_faulted) {
            svm_end(i);
            return;
        }
        uint64_t other = svm_translate(U64(ep).v, false);
        if (svm_faulted) {
            svm_end(i);
            return;
        }
        found = GNode(other).level == cur;
    }
    if (found) {
        GNode(me).level = cur + 1;
        atomicAdd(U32(cp).v, 1u);
    }
}
