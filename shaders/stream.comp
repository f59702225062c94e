#version 460
// stream.comp: y[e] = a * x[e] + y[e] over two float arrays in process memory (saxpy).
// arg[0] = x (CPU pointer), arg[1] = y (CPU pointer), arg[2] = a (float bits), arg[3] = n.
//
// A workgroup covers a tile of 256 * 16 elements in four 4 KiB sub-tiles of 64 invocations:
// invocation l handles elements tile + 1024 (l / 64) + (l % 64) + 64 k for k < 16, so
// neighbouring invocations touch neighbouring addresses and each spans under 4 KiB of an array.
// It translates the pages of its first and its last element in each array (the only pages it
// touches), all before its first write: a replayed item then redoes exactly its own elements
// once. Four translations in straight-line code, not one per element behind a page-change
// test: lavapipe runs the body of an `if` for every SIMD lane, masked, so a translation in the
// element loop cost 16 walks per array (saxpy mapped 12-24 -> 4-9 ms). Items: 256 per tile
// (svmirror-vulkan computes them from n).
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 256) in;

layout(buffer_reference, std430, buffer_reference_align = 4) buffer F32 {
    float v;
};

const uint PER_ITEM = 16u;

void main() {
    uint wg = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    uint item = wg * 256u + gl_LocalInvocationID.x;
    if (!svm_begin(item)) {
        return;
    }
    uint n = uint(pc.arg[3]);
    uint l = gl_LocalInvocationID.x;
    uint base = wg * 256u * PER_ITEM + (l / 64u) * 64u * PER_ITEM + (l % 64u);
    if (base >= n) {
        return;
    }
    // The first and the last element of the item: the item's elements lie on these pages.
    uint last = min(base + 64u * (PER_ITEM - 1u), n - 1u);
    last = base + (last - base) / 64u * 64u;
    uint64_t x0 = pc.arg[0] + 4ul * base;
    uint64_t y0 = pc.arg[1] + 4ul * base;
    uint64_t x1 = pc.arg[0] + 4ul * last;
    uint64_t y1 = pc.arg[1] + 4ul * last;
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
    for (uint k = 0u; k < PER_ITEM; k++) {
        uint e = base + 64u * k;
        if (e >= n) {
            break;
        }
        uint64_t xa = pc.arg[0] + 4ul * e;
        uint64_t ya = pc.arg[1] + 4ul * e;
        F32 xp = F32(((xa >> 12) == xpage0 ? xt0 : xt1) + (xa & 4095ul));
        F32 yp = F32(((ya >> 12) == ypage0 ? yt0 : yt1) + (ya & 4095ul));
        yp.v = a * xp.v + yp.v;
    }
}
