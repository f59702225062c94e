//! svmirror's vulkan backend (under construction).
