//! svmirror's vfio backend (under construction).
