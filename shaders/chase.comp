#version 460
// chase.comp: walks linked lists in process memory. Item i starts at heads[i], follows `next`
// for at most `steps` nodes and stores the sum of their values in out[i].
// arg[0] = heads (CPU pointer to uint64_t node pointers), arg[1] = out (CPU pointer to uint),
// arg[2] = steps; items = number of lists.
// Node layout (svmirror_vulkan::ChaseNode): { uint64_t next; uint value; uint pad; }.
#extension GL_GOOGLE_include_directive : require
#include "svm.glsl"

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 8) buffer Node {
    uint64_t next;
    uint value;
    uint pad;
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
    uint64_t hp = svm_translate(pc.arg[0] + 8ul * i, false);
    uint64_t op = svm_translate(pc.arg[1] + 4ul * i, true);
    if (svm_faulted) {
        svm_end(i);
        return;
    }
    uint64_t node = U64(hp).v;
    uint sum = 0u;
    for (uint64_t s = 0ul; s < pc.arg[2] && node != 0ul; s++) {
        uint64_t np = svm_translate(node, false);
        if (svm_faulted) {
            svm_end(i);
            return;
        }
        sum += Node(np).value;
        node = Node(np).next;
    }
    U32(op).v = sum;
}
