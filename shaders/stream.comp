#version 460
// stream.comp: y[e] = a * x[e] + y[e] over two float arrays in process memory (saxpy).
// arg[0] = x (CPU pointer), arg[1] = y (CPU pointer), arg[2] = a (float bits), arg[3] = n.
//
// A workgroup covers a tile of 256 * 16 elements in four 4 KiB sub-tiles of 64 invocations:
// invocation l handles elements tile + 1024 (l / 64) + (l % 64) + 64 k for k < 16, so
// neighbouring invocations touch neighbouring addresses and each spans under 4 KiB of an array.
// It translates each page it touches once (at most 2 per array), all before its first write:
// a replayed item then redoes exactly its own elements once. Items: 256 per tile
// (svmirror-vulkan computes them from n).
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 256) in;

layout(buffer_reference, std430, buffer_reference_align = 4) buffer F32 {
    float v;
};

const uint PER_ITEM = 16u;
const uint PAGES = 2u;

void main() {
    uint wg = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    uint item = wg * 256u + gl_LocalInvocationID.x;
    if (!svm_begin(item)) {
        return;
    }
    uint n = uint(pc.arg[3]);
    uint l = gl_LocalInvocationID.x;
    uint base = wg * 256u * PER_ITEM + (l / 64u) * 64u * PER_ITEM + (l % 64u);
    uint64_t xfirst = (pc.arg[0] + 4ul * base) >> 12;
    uint64_t yfirst = (pc.arg[1] + 4ul * base) >> 12;
    uint64_t xt[PAGES];
    uint64_t yt[PAGES];
    uint xlast = ~0u;
    uint ylast = ~0u;
    for (uint k = 0u; k < PER_ITEM; k++) {
        uint e = base + 64u * k;
        if (e >= n) {
            break;
        }
        uint64_t xa = pc.arg[0] + 4ul * e;
        uint64_t ya = pc.arg[1] + 4ul * e;
        uint xi = uint((xa >> 12) - xfirst);
        uint yi = uint((ya >> 12) - yfirst);
        if (xi != xlast) {
            xt[xi] = svm_translate(xa & ~4095ul, false);
            xlast = xi;
        }
        if (yi != ylast) {
            yt[yi] = svm_translate(ya & ~4095ul, true);
            ylast = yi;
        }
    }
    if (svm_faulted) {
        svm_end(item);
        return;
    }
    float a = uintBitsToFloat(uint(pc.arg[2]));
    for (uint k = 0u; k < PER_ITEM; k++) {
        uint e = base + 64u * k;
        if (e >= n) {
            break;
        }
        uint64_t xa = pc.arg[0] + 4ul * e;
        uint64_t ya = pc.arg[1] + 4ul * e;
        F32 xp = F32(xt[uint((xa >> 12) - xfirst)] + (xa & 4095ul));
        F32 yp = F32(yt[uint((ya >> 12) - yfirst)] + (ya & 4095ul));
        yp.v = a * xp.v + yp.v;
    }
}
