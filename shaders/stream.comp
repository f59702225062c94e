#version 460
// stream.comp: y[e] = a * x[e] + y[e] over two float arrays in process memory (saxpy).
// arg[0] = x (CPU pointer), arg[1] = y (CPU pointer), arg[2] = a (float bits), arg[3] = n.
//
// Invocation i (the work item) handles the 64 consecutive elements from 64 i: 256 bytes of each
// array, so at most two pages of each. It translates the pages of its first and its last
// element (the only pages it touches), all before its first write: a replayed item then redoes
// exactly its own elements once. Items: one per 64 elements, rounded up to whole workgroups
// (svmirror-vulkan computes them from n).
//
// Shaped for lavapipe, where code costs about the same whether or not a SIMD lane runs it (the
// body of an `if` runs masked for every lane, and even an item that returns at once costs
// about 40 ns): few items doing much each, and the translations in straight-line code rather
// than one per element behind a page-change test. Against 16 interleaved elements per item
// with per-element page tests: mapped saxpy of 2 x 4 MiB 12-24 -> 2.5 ms, the staging copy's
// kernel (the same source, SVM_DIRECT) faster too.
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 256) in;

layout(buffer_reference, std430, buffer_reference_align = 4) buffer F32 {
    float v;
};

const uint PER_ITEM = 64u;

void main() {
    uint wg = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    uint item = wg * 256u + gl_LocalInvocationID.x;
    if (!svm_begin(item)) {
        return;
    }
    uint n = uint(pc.arg[3]);
    uint base = item * PER_ITEM;
    if (base >= n) {
        return;
    }
    uint count = min(PER_ITEM, n - base);
    // The first and the last element of the item: the item's elements lie on these pages.
    uint64_t x0 = pc.arg[0] + 4ul * base;
    uint64_t y0 = pc.arg[1] + 4ul * base;
    uint64_t x1 = x0 + 4ul * (count - 1u);
    uint64_t y1 = y0 + 4ul * (count - 1u);
    uint64_t xt0 = svm_translate(x0 & ~4095ul, false);
    uint64_t yt0 = svm_translate(y0 & ~4095ul, true);
    uint64_t xt1 = svm_translate(x1 & ~4095ul, false);
    uint64_t yt1 = svm_translate(y1 & ~4095ul, true);
    if (svm_faulted) {
        svm_end(item);
        return;
    }
    uint64_t xpage0 = x0 >> 12;
    uint64_t ypage0 = y0 >> 12;
    float a = uintBitsToFloat(uint(pc.arg[2]));
    for (uint k = 0u; k < count; k++) {
        uint64_t xa = x0 + 4ul * k;
        uint64_t ya = y0 + 4ul * k;
        F32 xp = F32(((xa >> 12) == xpage0 ? xt0 : xt1) + (xa & 4095ul));
        F32 yp = F32(((ya >> 12) == ypage0 ? yt0 : yt1) + (ya & 4095ul));
        yp.v = a * xp.v + yp.v;
    }
}
