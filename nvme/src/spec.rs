//! NVMe wire structures and constants, from the NVM Express Base Specification 2.0 and the
//! NVM Command Set Specification 1.0.
//!
//! These are the bytes the host and the controller exchange through queue memory: the 64-byte
//! submission queue entry, the 16-byte completion queue entry, status codes and the Identify
//! data layouts. Every transport (the in-process `mem` controller, VFIO against real hardware)
//! uses exactly these.

use std::fmt;

/// The memory page size the host configures (CC.MPS = 0: 4 KiB). PRP entries address pages of
/// this size.
pub const PAGE_SIZE: usize = 4096;
/// PRP entries per 4 KiB PRP list page.
pub const PRP_ENTRIES_PER_PAGE: usize = PAGE_SIZE / 8;

/// Admin command opcodes (Base Specification, figure "Opcodes for Admin Commands").
pub mod admin_opcode {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
}

/// NVM command set opcodes (NVM Command Set Specification, figure "Opcodes for NVM Commands").
pub mod io_opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACE_LIST: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
}

/// A submission queue entry (Base Specification, "Common Command Format").
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// Command Dword 0: opcode (bits 7:0), fused (9:8), PSDT (15:14), command identifier (31:16).
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP entry 1.
    pub prp1: u64,
    /// Data pointer: PRP entry 2, or the address of a PRP list.
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<SubmissionEntry>() == 64);
const _: () = assert!(std::mem::align_of::<SubmissionEntry>() == 64);

impl SubmissionEntry {
    /// An entry with opcode, command identifier and namespace filled in; PSDT = 0 (PRPs).
    #[inline(always)]
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Self {
        Self {
            cdw0: opcode as u32 | (cid as u32) << 16,
            nsid,
            ..Self::default()
        }
    }

    /// The entry as the eight little-endian quadwords it occupies in the ring, computed from
    /// the fields (no memory round trip), so a queue can store it with eight 8-byte writes.
    #[inline(always)]
    pub fn to_qwords(&self) -> [u64; 8] {
        [
            self.cdw0 as u64 | (self.nsid as u64) << 32,
            self.cdw2 as u64 | (self.cdw3 as u64) << 32,
            self.mptr,
            self.prp1,
            self.prp2,
            self.cdw10 as u64 | (self.cdw11 as u64) << 32,
            self.cdw12 as u64 | (self.cdw13 as u64) << 32,
            self.cdw14 as u64 | (self.cdw15 as u64) << 32,
        ]
    }

    #[inline(always)]
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    #[inline(always)]
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    /// Starting LBA of a Read/Write/Write Zeroes (CDW10 low, CDW11 high).
    #[inline(always)]
    pub fn slba(&self) -> u64 {
        self.cdw10 as u64 | (self.cdw11 as u64) << 32
    }

    #[inline(always)]
    pub fn set_slba(&mut self, slba: u64) {
        self.cdw10 = slba as u32;
        self.cdw11 = (slba >> 32) as u32;
    }

    /// Number of logical blocks, converted from the 0's based field in CDW12 bits 15:0.
    #[inline(always)]
    pub fn block_count(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// Sets CDW12's 0's based block count; `blocks` must be 1..=65536.
    #[inline(always)]
    pub fn set_block_count(&mut self, blocks: u32) {
        debug_assert!((1..=65536).contains(&blocks));
        self.cdw12 = (self.cdw12 & !0xffff) | (blocks - 1);
    }

    /// Force Unit Access (CDW12 bit 30).
    #[inline(always)]
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
}

impl fmt::Debug for SubmissionEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmissionEntry")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid)
            .field("prp1", &format_args!("{:#x}", self.prp1))
            .field("prp2", &format_args!("{:#x}", self.prp2))
            .field("cdw10", &format_args!("{:#x}", self.cdw10))
            .field("cdw11", &format_args!("{:#x}", self.cdw11))
            .field("cdw12", &format_args!("{:#x}", self.cdw12))
            .finish()
    }
}

/// A completion queue entry (Base Specification, "Common Completion Queue Entry").
#[repr(C, align(16))]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command specific result.
    pub dw0: u32,
    pub dw1: u32,
    /// SQ head pointer: how far the controller has consumed the submission queue.
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status_phase: u16,
}

const _: () = assert!(std::mem::size_of::<CompletionEntry>() == 16);

impl CompletionEntry {
    /// Dword 3 as the controller writes it last: CID in bits 15:0, status and phase in 31:16.
    /// The phase tag lives in this dword, so the controller publishes an entry by storing it.
    #[inline(always)]
    pub fn dw3(cid: u16, status: Status, phase: bool) -> u32 {
        cid as u32 | (((status.to_field() << 1) | phase as u16) as u32) << 16
    }
}

/// Status Code Type values.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
}

/// An NVMe completion status: Status Code Type and Status Code, with the Do Not Retry bit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status::generic(0x00);
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    pub const INTERNAL_ERROR: Status = Status::generic(0x06);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    pub const INVALID_PRP_OFFSET: Status = Status::generic(0x13);
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    pub const COMPLETION_QUEUE_INVALID: Status = Status::command_specific(0x00);
    pub const INVALID_QUEUE_IDENTIFIER: Status = Status::command_specific(0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::command_specific(0x02);
    pub const WRITE_FAULT: Status = Status::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);

    pub const fn generic(sc: u8) -> Self {
        Self {
            sct: sct::GENERIC,
            sc,
            dnr: false,
        }
    }
    pub const fn command_specific(sc: u8) -> Self {
        Self {
            sct: sct::COMMAND_SPECIFIC,
            sc,
            dnr: false,
        }
    }
    pub const fn media(sc: u8) -> Self {
        Self {
            sct: sct::MEDIA,
            sc,
            dnr: false,
        }
    }

    #[inline(always)]
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The 15-bit status field (CQE DW3 bits 31:17): SC 7:0, SCT 10:8, DNR 14.
    #[inline(always)]
    pub const fn to_field(self) -> u16 {
        self.sc as u16 | ((self.sct as u16 & 0x7) << 8) | ((self.dnr as u16) << 14)
    }

    /// Parses the status/phase half-word of a CQE (bit 0 is the phase tag).
    #[inline(always)]
    pub const fn from_status_phase(status_phase: u16) -> Self {
        let field = status_phase >> 1;
        Self {
            sc: field as u8,
            sct: ((field >> 8) & 0x7) as u8,
            dnr: field & (1 << 14) != 0,
        }
    }

    /// The specification's name for this status.
    pub fn name(&self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x13) => "Invalid PRP Offset",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x0c) => "Invalid Queue Deletion",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x86) => "Access Denied",
            _ => "Unknown Status",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT {:x}h SC {:02x}h{})",
            self.name(),
            self.sct,
            self.sc,
            if self.dnr { ", DNR" } else { "" }
        )
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Controller registers in BAR0 (NVMe over PCIe), and the fields the host driver uses.
pub mod register {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version (32-bit).
    pub const VS: usize = 0x08;
    /// Controller Configuration (32-bit).
    pub const CC: usize = 0x14;
    /// Controller Status (32-bit).
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes (32-bit): ACQS (27:16) and ASQS (11:0), 0's based.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell; doorbell `i` sits at `DOORBELLS + i * (4 << CAP.DSTRD)`.
    pub const DOORBELLS: usize = 0x1000;

    /// CAP.MQES (15:0): maximum queue entries supported, 0's based.
    pub fn cap_mqes(cap: u64) -> u32 {
        (cap & 0xffff) as u32 + 1
    }
    /// CAP.TO (31:24): worst-case time to become ready, in 500 ms units.
    pub fn cap_timeout(cap: u64) -> std::time::Duration {
        std::time::Duration::from_millis(((cap >> 24) & 0xff) * 500)
    }
    /// CAP.DSTRD (35:32): doorbell stride, as `4 << DSTRD` bytes.
    pub fn cap_doorbell_stride(cap: u64) -> usize {
        4 << ((cap >> 32) & 0xf)
    }
    /// CAP.CSS bit 37: the NVM command set is supported.
    pub fn cap_nvm_command_set(cap: u64) -> bool {
        cap >> 37 & 1 == 1
    }
    /// CAP.MPSMIN (51:48): smallest memory page size, as `4096 << MPSMIN`.
    pub fn cap_min_page_size(cap: u64) -> usize {
        4096 << ((cap >> 48) & 0xf)
    }
    /// CAP.MPSMAX (55:52): largest memory page size, as `4096 << MPSMAX`.
    pub fn cap_max_page_size(cap: u64) -> usize {
        4096 << ((cap >> 52) & 0xf)
    }

    /// CC.EN: enable.
    pub const CC_ENABLE: u32 = 1;
    /// CC.IOSQES = 6 (64-byte submission entries) and CC.IOCQES = 4 (16-byte completion
    /// entries); CC.CSS = 0 (NVM), CC.MPS = 0 (4 KiB pages), CC.AMS = 0 (round robin).
    pub const CC_ENTRY_SIZES: u32 = 6 << 16 | 4 << 20;
    /// CC.SHN (15:14) = 01b: normal shutdown notification.
    pub const CC_SHUTDOWN_NORMAL: u32 = 1 << 14;
    pub const CC_SHUTDOWN_MASK: u32 = 3 << 14;

    /// CSTS.RDY: the controller is ready (set after CC.EN = 1, clear after CC.EN = 0).
    pub const CSTS_READY: u32 = 1;
    /// CSTS.CFS: controller fatal status.
    pub const CSTS_FATAL: u32 = 1 << 1;
    /// CSTS.SHST (3:2) = 10b: shutdown processing complete.
    pub const CSTS_SHUTDOWN_COMPLETE: u32 = 2 << 2;
    pub const CSTS_SHUTDOWN_MASK: u32 = 3 << 2;
}

/// Offsets into the 4096-byte Identify Controller data structure.
pub mod identify_controller {
    pub const VID: usize = 0;
    pub const SERIAL: std::ops::Range<usize> = 4..24;
    pub const MODEL: std::ops::Range<usize> = 24..64;
    pub const FIRMWARE: std::ops::Range<usize> = 64..72;
    /// Maximum Data Transfer Size, as a power of two in units of the minimum page size.
    pub const MDTS: usize = 77;
    pub const CNTLID: usize = 78;
    pub const VER: usize = 80;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const NN: usize = 516;
}

/// Offsets into the 4096-byte Identify Namespace data structure.
pub mod identify_namespace {
    pub const NSZE: usize = 0;
    pub const NCAP: usize = 8;
    pub const NUSE: usize = 16;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    /// LBA Format 0; each format is 4 bytes: MS (15:0), LBADS (23:16), RP (25:24).
    pub const LBAF0: usize = 128;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_round_trips_through_a_completion_dword() {
        for status in [
            Status::SUCCESS,
            Status::LBA_OUT_OF_RANGE,
            Status::UNRECOVERED_READ_ERROR,
            Status {
                dnr: true,
                ..Status::INVALID_FIELD
            },
        ] {
            for phase in [false, true] {
                let dw3 = CompletionEntry::dw3(0xbeef, status, phase);
                assert_eq!(dw3 as u16, 0xbeef);
                let status_phase = (dw3 >> 16) as u16;
                assert_eq!(status_phase & 1 == 1, phase);
                assert_eq!(Status::from_status_phase(status_phase), status);
            }
        }
    }

    #[test]
    fn submission_fields_sit_where_the_specification_puts_them() {
        let mut sqe = SubmissionEntry::new(io_opcode::READ, 0x1234, 7);
        sqe.set_slba(0x1_0000_0002);
        sqe.set_block_count(256);
        sqe.prp1 = 0xdead_b000;
        // SAFETY: SubmissionEntry is repr(C), 64 bytes, with no padding; reading it as bytes is sound.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(bytes[0], 0x02);
        assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), 0x1234);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            0xdead_b000
        );
        assert_eq!(u32::from_le_bytes(bytes[40..44].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(bytes[44..48].try_into().unwrap()), 1);
        assert_eq!(u16::from_le_bytes([bytes[48], bytes[49]]), 255);
        assert_eq!(sqe.block_count(), 256);
        let qwords: Vec<u8> = sqe
            .to_qwords()
            .iter()
            .flat_map(|q| q.to_le_bytes())
            .collect();
        assert_eq!(qwords, bytes);
    }
}
