//! `svmirror`: runs the example SVM compute app, says what this machine offers, and runs the
//! benchmarks. `svmirror --help` says how.
//!
//! Exit codes: 0 when everything ran and matched; 1 when a device result differed from the CPU
//! reference or a device failed; 2 for bad input (unknown app or backend, a backend this
//! machine or build lacks, a size that does not fit). Errors are one line on stderr,
//! `svmirror: <message>`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
