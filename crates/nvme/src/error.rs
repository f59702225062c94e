//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong driving an NVMe controller.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// Opening the device through VFIO (its group, then the device) failed.
    #[error("cannot open the device through VFIO")]
    Open {
        /// What vfio-ioctls reported.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A system call on the device or sysfs failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No PCI device at this sysfs path, or it is not the device expected.
    #[error("{path} is not a usable {expected}")]
    WrongDevice {
        /// The sysfs path.
        path: PathBuf,
        /// The device expected.
        expected: &'static str,
    },
    /// The controller lacks something this driver needs.
    #[error("the controller does not support {what}")]
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
    /// The controller did not reach a state in time (CSTS.RDY after a change of CC.EN, or
    /// CSTS.SHST after a shutdown notification).
    #[error("the controller did not {what} within {millis} ms")]
    ControllerTimeout {
        /// What it was asked to do.
        what: &'static str,
        /// How long it was given.
        millis: u64,
    },
    /// The controller reports a fatal status (CSTS.CFS).
    #[error("the controller reports a fatal status (CSTS {csts:#x})")]
    ControllerFatal {
        /// The CSTS register.
        csts: u32,
    },
    /// A command did not complete in time; the controller was reset (disabled), so it can no
    /// longer touch the command's memory, and takes no more commands.
    #[error("command {opcode:#04x} (cid {cid}) did not complete within {millis} ms")]
    CommandTimeout {
        /// The command's opcode.
        opcode: u8,
        /// Its command identifier.
        cid: u16,
        /// How long it was given.
        millis: u64,
    },
    /// A command completed with an error status.
    #[error(
        "command {opcode:#04x} failed: status code type {sct:#x}, status code {sc:#04x} ({})",
        crate::regs::status_name(*sct, *sc)
    )]
    CommandFailed {
        /// The command's opcode.
        opcode: u8,
        /// Status Code Type.
        sct: u8,
        /// Status Code.
        sc: u8,
    },
    /// A write to the namespace of a controller that is not QEMU's, without
    /// [`NvmeConfig::allow_write`](crate::NvmeConfig::allow_write): it would overwrite the
    /// drive's blocks.
    #[error(
        "refusing to write to {model} (serial {serial}): it is not QEMU's emulated controller, and writes overwrite the drive's blocks; allow them explicitly (NvmeConfig::allow_write, `svmirror --nvme-allow-write`)"
    )]
    WriteRefused {
        /// The controller's model number.
        model: String,
        /// Its serial number.
        serial: String,
    },
    /// The controller was reset after an earlier timeout or fatal status: open it again.
    #[error("the controller was reset after an earlier failure and takes no more commands")]
    Halted,
    /// A transfer of no bytes.
    #[error("a transfer of 0 bytes")]
    EmptyTransfer,
    /// A transfer whose length is not a whole number of logical blocks.
    #[error("a transfer of {len} bytes is not a multiple of the {lba_size}-byte logical block")]
    UnalignedLength {
        /// Bytes asked for.
        len: u64,
        /// The namespace's logical block size.
        lba_size: u64,
    },
    /// A transfer past the end of the namespace.
    #[error("logical blocks {lba}+{blocks} lie outside the namespace's {capacity} blocks")]
    OutOfRange {
        /// First logical block.
        lba: u64,
        /// Blocks asked for.
        blocks: u64,
        /// The namespace's size in blocks.
        capacity: u64,
    },
    /// A completion for a command that is not the one outstanding: the queue state is lost,
    /// and the controller was reset.
    #[error("a completion for command {cid} arrived while command {expected} was outstanding")]
    UnexpectedCompletion {
        /// The completion's command identifier.
        cid: u16,
        /// The outstanding command's.
        expected: u16,
    },
    /// A buffer that wraps around the end of the address space.
    #[error("the buffer at {addr:#x}+{len:#x} wraps around the address space")]
    BufferWraps {
        /// The buffer's address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A data buffer not aligned to 4 bytes (PRP entries are dword aligned).
    #[error("the buffer at {addr:#x} is not 4-byte aligned, as a PRP entry must be")]
    MisalignedBuffer {
        /// The buffer's address.
        addr: u64,
    },
    /// The driver could not allocate its queue memory.
    #[error("cannot allocate {len} bytes of queue memory")]
    Alloc {
        /// Bytes asked for.
        len: usize,
    },
    /// No mapper given to the controller mirrors this memory.
    #[error("no mapper mirrors {addr:#x}+{len:#x}")]
    NoMapper {
        /// The CPU address of the memory.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The mapper could not map memory of a command for the device.
    #[error("no device access to {addr:#x}+{len:#x}")]
    Access {
        /// The CPU address of the memory.
        addr: u64,
        /// Its length.
        len: u64,
        /// What the mapper reported.
        #[source]
        source: svmirror_vfio::VfioError,
    },
}

/// The crate's result type.
pub type Result<T, E = NvmeError> = std::result::Result<T, E>;
