//! Vulkan backend benchmarks (being written; see issue 6).

fn main() {}
