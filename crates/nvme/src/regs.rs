//! NVMe register offsets, command encodings and data structure layouts, from the NVM Express
//! Base Specification (section names cited where the semantics matter) and the NVM Command
//! Set Specification. Pure data: nothing here touches the device.

/// Controller Registers (Base spec, "Controller Registers"): offsets into BAR0.
pub(crate) mod reg {
    /// Controller Capabilities (64 bits, read as two dwords).
    pub(crate) const CAP: u64 = 0x00;
    /// Version.
    pub(crate) const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub(crate) const INTMS: u64 = 0x0c;
    /// Controller Configuration.
    pub(crate) const CC: u64 = 0x14;
    /// Controller Status.
    pub(crate) const CSTS: u64 = 0x1c;
    /// Admin Queue Attributes.
    pub(crate) const AQA: u64 = 0x24;
    /// Admin Submission Queue Base Address (64 bits, written as two dwords, low first).
    pub(crate) const ASQ: u64 = 0x28;
    /// Admin Completion Queue Base Address (64 bits, written as two dwords, low first).
    pub(crate) const ACQ: u64 = 0x30;
    /// The first doorbell: queue `y`'s submission tail doorbell is at
    /// `DOORBELLS + 2y * (4 << CAP.DSTRD)`, its completion head doorbell one stride after.
    pub(crate) const DOORBELLS: u64 = 0x1000;
}

/// The fields of CAP this driver reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cap {
    /// Maximum Queue Entries Supported, as a count (the register holds it 0-based).
    pub(crate) max_entries: u32,
    /// Timeout (CAP.TO) in milliseconds: the worst case for CSTS.RDY to follow CC.EN.
    pub(crate) timeout_ms: u64,
    /// Doorbell stride in bytes (`4 << CAP.DSTRD`).
    pub(crate) doorbell_stride: u64,
    /// Whether the NVM command set is supported (CAP.CSS bit 0).
    pub(crate) nvm: bool,
    /// Memory page sizes supported: `4096 << MPSMIN ..= 4096 << MPSMAX`.
    pub(crate) page_min: u64,
    /// As `page_min`.
    pub(crate) page_max: u64,
}

impl Cap {
    pub(crate) fn parse(cap: u64) -> Cap {
        Cap {
            max_entries: (cap & 0xffff) as u32 + 1,
            timeout_ms: ((cap >> 24) & 0xff).max(1) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            nvm: (cap >> 37) & 1 == 1,
            page_min: 4096 << ((cap >> 48) & 0xf),
            page_max: 4096 << ((cap >> 52) & 0xf),
        }
    }
}

/// CC fields ("Offset 14h: CC – Controller Configuration").
pub(crate) mod cc {
    /// Enable.
    pub(crate) const EN: u32 = 1;
    /// Shutdown Notification: normal shutdown (bits 15:14 = 01b).
    pub(crate) const SHN_NORMAL: u32 = 1 << 14;
    /// I/O Submission Queue Entry Size: 2^6 = 64 bytes (bits 19:16).
    pub(crate) const IOSQES_64: u32 = 6 << 16;
    /// I/O Completion Queue Entry Size: 2^4 = 16 bytes (bits 23:20).
    pub(crate) const IOCQES_16: u32 = 4 << 20;
    // CSS (bits 6:4) = 000b: the NVM command set; MPS (bits 10:7) = 0: 4 KiB pages;
    // AMS (bits 13:11) = 000b: round robin. All zero.
}

/// CSTS fields ("Offset 1Ch: CSTS – Controller Status").
pub(crate) mod csts {
    /// Ready.
    pub(crate) const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub(crate) const CFS: u32 = 1 << 1;
    /// Shutdown Status mask (bits 3:2); 10b = shutdown processing complete.
    pub(crate) const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing complete.
    pub(crate) const SHST_COMPLETE: u32 = 2 << 2;
}

/// The memory page size the driver sets (CC.MPS = 0) and builds PRPs for.
pub(crate) const PAGE: u64 = 4096;
/// Bytes of a submission queue entry.
pub(crate) const SQE: usize = 64;
/// Bytes of a completion queue entry.
pub(crate) const CQE: usize = 16;

/// Admin command opcodes ("Admin Command Set").
pub(crate) mod admin {
    /// Create I/O Submission Queue.
    pub(crate) const CREATE_SQ: u8 = 0x01;
    /// Create I/O Completion Queue.
    pub(crate) const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub(crate) const IDENTIFY: u8 = 0x06;
    /// Identify CNS 00h: the Identify Namespace data structure.
    pub(crate) const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS 01h: the Identify Controller data structure.
    pub(crate) const CNS_CONTROLLER: u32 = 0x01;
}

/// NVM command set opcodes (NVM Command Set spec, "I/O Commands for the NVM Command Set").
pub(crate) mod io {
    /// Write.
    pub(crate) const WRITE: u8 = 0x01;
    /// Read.
    pub(crate) const READ: u8 = 0x02;
}

/// A submission queue entry ("Common Command Format"): dword 0 holds the opcode (bits 7:0),
/// PSDT = 00b (PRPs, bits 15:14) and the command identifier (bits 31:16); dword 1 the
/// namespace; dwords 6-7 PRP1, 8-9 PRP2; dwords 10-15 are command specific.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Command {
    pub(crate) opcode: u8,
    pub(crate) nsid: u32,
    pub(crate) prp1: u64,
    pub(crate) prp2: u64,
    pub(crate) cdw10: u32,
    pub(crate) cdw11: u32,
    pub(crate) cdw12: u32,
}

impl Command {
    /// The entry's 16 dwords with command identifier `cid`.
    pub(crate) fn encode(&self, cid: u16) -> [u32; 16] {
        let mut d = [0u32; 16];
        d[0] = u32::from(self.opcode) | (u32::from(cid) << 16);
        d[1] = self.nsid;
        d[6] = self.prp1 as u32;
        d[7] = (self.prp1 >> 32) as u32;
        d[8] = self.prp2 as u32;
        d[9] = (self.prp2 >> 32) as u32;
        d[10] = self.cdw10;
        d[11] = self.cdw11;
        d[12] = self.cdw12;
        d
    }
}

/// A completion queue entry's dwords 2 and 3 ("Common Completion Queue Entry Layout").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    /// SQ Head Pointer.
    pub(crate) sq_head: u16,
    /// Command Identifier.
    pub(crate) cid: u16,
    /// Phase Tag.
    pub(crate) phase: bool,
    /// Status Code Type (Status Field bits 11:9).
    pub(crate) sct: u8,
    /// Status Code (Status Field bits 8:1).
    pub(crate) sc: u8,
}

impl Completion {
    pub(crate) fn parse(dw2: u32, dw3: u32) -> Completion {
        Completion {
            sq_head: dw2 as u16,
            cid: dw3 as u16,
            phase: (dw3 >> 16) & 1 == 1,
            sc: (dw3 >> 17) as u8,
            sct: ((dw3 >> 25) & 7) as u8,
        }
    }

    pub(crate) fn ok(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
}

/// A short name for the statuses a driver meets most ("Generic Command Status Values").
pub(crate) fn status_name(sct: u8, sc: u8) -> &'static str {
    match (sct, sc) {
        (0, 0x00) => "successful completion",
        (0, 0x01) => "invalid command opcode",
        (0, 0x02) => "invalid field in command",
        (0, 0x04) => "data transfer error",
        (0, 0x06) => "internal error",
        (0, 0x07) => "command abort requested",
        (0, 0x0b) => "invalid namespace or format",
        (0, 0x13) => "invalid number of SGL descriptors or PRP offset",
        (0, 0x80) => "LBA out of range",
        (1, _) => "command specific status",
        (2, _) => "media and data integrity error",
        (3, _) => "path related status",
        _ => "see the NVMe specification",
    }
}

/// What the driver reads from the Identify Controller data structure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI Vendor ID (bytes 1:0).
    pub vendor: u16,
    /// Serial Number (bytes 23:04), trimmed.
    pub serial: String,
    /// Model Number (bytes 63:24), trimmed.
    pub model: String,
    /// Firmware Revision (bytes 71:64), trimmed.
    pub firmware: String,
    /// Maximum Data Transfer Size in bytes (byte 77: 2^MDTS minimum pages; 0 = no limit,
    /// reported as `None`).
    pub max_transfer: Option<u64>,
    /// Number of Namespaces (bytes 519:516).
    pub namespaces: u32,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_owned()
}

/// The PCI vendor ID QEMU's emulated NVMe controller reports (Red Hat, Inc.).
pub(crate) const QEMU_VENDOR: u16 = 0x1b36;

impl ControllerInfo {
    /// Whether this is QEMU's emulated controller (vendor 1b36, a model starting "QEMU"),
    /// whose namespace is a scratch image rather than someone's drive.
    pub fn is_qemu(&self) -> bool {
        self.vendor == QEMU_VENDOR && self.model.starts_with("QEMU")
    }

    /// Parses the 4 KiB structure; `page_min` is CAP's minimum page size (MDTS's unit).
    pub(crate) fn parse(d: &[u8; 4096], page_min: u64) -> ControllerInfo {
        let mdts = d[77];
        ControllerInfo {
            vendor: u16::from_le_bytes([d[0], d[1]]),
            serial: ascii(&d[4..24]),
            model: ascii(&d[24..64]),
            firmware: ascii(&d[64..72]),
            max_transfer: (mdts != 0).then(|| page_min << mdts.min(20)),
            namespaces: u32::from_le_bytes([d[516], d[517], d[518], d[519]]),
        }
    }
}

/// What the driver reads from the Identify Namespace data structure (NVM Command Set spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// The namespace identifier.
    pub nsid: u32,
    /// Namespace Size in logical blocks (bytes 7:0).
    pub blocks: u64,
    /// Logical block size in bytes, from the LBA Format that FLBAS selects (2^LBADS).
    pub lba_size: u64,
    /// Metadata bytes per block of that format (0 for plain blocks).
    pub metadata: u16,
}

impl NamespaceInfo {
    /// Parses the 4 KiB structure; `None` when FLBAS names a format past NLBAF or LBADS is
    /// out of range.
    pub(crate) fn parse(nsid: u32, d: &[u8; 4096]) -> Option<NamespaceInfo> {
        let blocks = u64::from_le_bytes(d[0..8].try_into().ok()?);
        let nlbaf = d[25];
        let format = d[26] & 0xf;
        if format > nlbaf {
            return None;
        }
        let at = 128 + 4 * format as usize;
        let metadata = u16::from_le_bytes([d[at], d[at + 1]]);
        let lbads = d[at + 2];
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(NamespaceInfo {
            nsid,
            blocks,
            lba_size: 1 << lbads,
            metadata,
        })
    }

    /// Bytes in the namespace.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.lba_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qemus_controller_counts_as_scratch() {
        let mut d = [0u8; 4096];
        d[0..2].copy_from_slice(&QEMU_VENDOR.to_le_bytes());
        d[24..40].copy_from_slice(b"QEMU NVMe Ctrl  ");
        assert!(ControllerInfo::parse(&d, 4096).is_qemu());
        // The same model string from another vendor, or QEMU's vendor with another model: no.
        d[0..2].copy_from_slice(&0x144du16.to_le_bytes());
        assert!(!ControllerInfo::parse(&d, 4096).is_qemu());
        d[0..2].copy_from_slice(&QEMU_VENDOR.to_le_bytes());
        d[24..40].copy_from_slice(b"Samsung SSD 980 ");
        assert!(!ControllerInfo::parse(&d, 4096).is_qemu());
    }

    #[test]
    fn cap_fields_come_from_their_bits() {
        // QEMU's nvme: MQES 0x7ff, CQR, TO 0x0f, DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = 0x7ff | 1 << 16 | 0x0f << 24 | 1 << 37 | 4 << 52;
        let c = Cap::parse(cap);
        assert_eq!(c.max_entries, 2048);
        assert_eq!(c.timeout_ms, 7500);
        assert_eq!(c.doorbell_stride, 4);
        assert!(c.nvm);
        assert_eq!((c.page_min, c.page_max), (4096, 65536));
        assert_eq!(Cap::parse(2 << 32).doorbell_stride, 16);
    }

    #[test]
    fn commands_encode_opcode_cid_and_prps() {
        let c = Command {
            opcode: io::READ,
            nsid: 1,
            prp1: 0x1234_5678_9abc,
            prp2: 0xdead_b000,
            cdw10: 7,
            cdw11: 0,
            cdw12: 3,
        };
        let d = c.encode(0x42);
        assert_eq!(d[0], 0x0042_0002);
        assert_eq!((d[6], d[7]), (0x5678_9abc, 0x1234));
        assert_eq!((d[8], d[9]), (0xdead_b000, 0));
        assert_eq!((d[10], d[12]), (7, 3));
    }

    #[test]
    fn completions_split_phase_and_status() {
        // SCT 0, SC 0x80 (LBA out of range), phase 1, cid 9, sq head 5.
        let c = Completion::parse(5 | 1 << 16, 9 | 1 << 16 | 0x80 << 17);
        assert_eq!((c.sq_head, c.cid, c.phase), (5, 9, true));
        assert_eq!((c.sct, c.sc), (0, 0x80));
        assert!(!c.ok());
        assert_eq!(status_name(c.sct, c.sc), "LBA out of range");
        assert!(Completion::parse(0, 1 << 16).ok());
    }

    #[test]
    fn identify_namespace_reads_the_selected_lba_format() {
        let mut d = [0u8; 4096];
        d[0..8].copy_from_slice(&32768u64.to_le_bytes());
        d[25] = 1; // two formats
        d[26] = 1; // the second in use
        d[128 + 2] = 9;
        d[132 + 2] = 12;
        let ns = NamespaceInfo::parse(1, &d).unwrap();
        assert_eq!((ns.blocks, ns.lba_size, ns.metadata), (32768, 4096, 0));
        assert_eq!(ns.bytes(), 128 << 20);
        d[26] = 2; // past NLBAF
        assert_eq!(NamespaceInfo::parse(1, &d), None);
    }

    #[test]
    fn identify_controller_reads_strings_and_mdts() {
        let mut d = [0u8; 4096];
        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        d[4..24].copy_from_slice(b"svmirror-nvme0      ");
        d[24..28].copy_from_slice(b"QEMU");
        d[77] = 7;
        d[516] = 1;
        let c = ControllerInfo::parse(&d, 4096);
        assert_eq!(c.serial, "svmirror-nvme0");
        assert_eq!(c.model, "QEMU");
        assert_eq!(c.max_transfer, Some(512 << 10));
        assert_eq!(c.namespaces, 1);
        d[77] = 0;
        assert_eq!(ControllerInfo::parse(&d, 4096).max_transfer, None);
    }
}
