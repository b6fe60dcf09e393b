//! Volumes: named, sized LBA ranges on a device namespace, owned by one reactor core.
//!
//! A volume turns a byte-addressed request into a device command and refuses, with an
//! [`IoError`], anything that does not fit: out of range, not block aligned, too large for one
//! command, a buffer a controller cannot address. Nothing a client sends can make it panic.

use std::sync::Arc;

use crossbeam_channel::Sender;

use fathom_dma::DmaBuf;
use fathom_drivers::{IoCommand, IoFlags, Op};
use fathom_nvme::{DataRange, Status};

/// Index of a volume in the engine's volume table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId(pub u32);

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    /// Index of the device in the engine's device table.
    pub device: usize,
    pub device_name: String,
    pub nsid: u32,
    /// First namespace LBA of the volume.
    pub first_lba: u64,
    pub blocks: u64,
    pub block_size: u32,
    /// log2(block_size): offsets are converted with shifts, not divisions.
    pub block_shift: u32,
    /// Index of the owning reactor in the engine's reactor table.
    pub reactor: usize,
    /// The CPU core that reactor runs on.
    pub core: usize,
    pub max_transfer_bytes: usize,
    /// Blocks of replication metadata right after the data (superblocks, dirty bitmaps),
    /// reached only through [`Volume::metadata_command`]; 0 for a volume of one node.
    pub meta_blocks: u64,
}

/// [`Volume::reactor`] of a vacant slot: no reactor's.
const VACANT: usize = usize::MAX;

impl Volume {
    /// What a reactor holds in a free slot of the volume table: a volume of no blocks that
    /// no reactor owns, so that IO to it is refused as for an unknown volume.
    pub fn vacant(id: VolumeId) -> Self {
        Self {
            id,
            name: String::new(),
            device: 0,
            device_name: String::new(),
            nsid: 0,
            first_lba: 0,
            blocks: 0,
            block_size: 512,
            block_shift: 9,
            reactor: VACANT,
            core: VACANT,
            max_transfer_bytes: 0,
            meta_blocks: 0,
        }
    }

    pub fn is_vacant(&self) -> bool {
        self.reactor == VACANT
    }
}

/// Why an IO failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("no volume with id {0}")]
    UnknownVolume(u32),
    #[error(
        "{op} of {len} bytes at offset {offset} is beyond the end of the volume ({size} bytes)"
    )]
    OutOfRange {
        op: Op,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op} of {len} bytes at offset {offset} is not aligned to the volume's {block_size}-byte blocks")]
    Misaligned {
        op: Op,
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("{op} of {len} bytes is larger than the {max} bytes one command can carry; split it")]
    TooLarge { op: Op, len: u64, max: u64 },
    #[error("{op} needs a data buffer")]
    MissingBuffer { op: Op },
    #[error("{op} of zero bytes")]
    Empty { op: Op },
    #[error("the data buffer at IOVA {iova:#x} is not 4-byte aligned, as NVMe requires")]
    BufferMisaligned { iova: u64 },
    #[error("volume {volume} is owned by core {core}; submit from that core's tasks or through the engine")]
    WrongCore { volume: u32, core: usize },
    #[error("every IO slot on this core is in use; retry after completions")]
    Busy,
    #[error("the device failed the {op}: NVMe status {status}")]
    Device { op: Op, status: Status },
    #[error("the engine is shutting down")]
    Stopped,
    #[error("{op} reached fewer than a majority of the volume's copies: it failed (it may be on some of them); the volume needs a majority of its replicas up")]
    NoQuorum { op: Op },
    #[error("this node is not the volume's primary at epoch {epoch}: another node took the volume over; send IO to the primary")]
    NotPrimary { epoch: u64 },
    #[error("the volume's primary failed the {op} this node forwarded to it (replication status {status})")]
    Forwarded { op: Op, status: u16 },
}

/// One IO as a client describes it: byte offsets within a volume.
#[derive(Debug)]
pub struct IoRequest {
    pub volume: VolumeId,
    pub op: Op,
    pub offset: u64,
    /// Bytes to zero for write-zeroes; read and write transfer the buffer's length.
    pub len: u64,
    pub buf: Option<DmaBuf>,
    /// Force Unit Access: the write is durable when it completes.
    pub fua: bool,
    /// Returned unchanged in the completion.
    pub tag: u64,
}

impl IoRequest {
    pub fn read(volume: VolumeId, offset: u64, buf: DmaBuf, tag: u64) -> Self {
        Self {
            volume,
            op: Op::Read,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            fua: false,
            tag,
        }
    }
    pub fn write(volume: VolumeId, offset: u64, buf: DmaBuf, tag: u64) -> Self {
        Self {
            volume,
            op: Op::Write,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            fua: false,
            tag,
        }
    }
    pub fn flush(volume: VolumeId, tag: u64) -> Self {
        Self {
            volume,
            op: Op::Flush,
            offset: 0,
            len: 0,
            buf: None,
            fua: false,
            tag,
        }
    }
    pub fn write_zeroes(volume: VolumeId, offset: u64, len: u64, tag: u64) -> Self {
        Self {
            volume,
            op: Op::WriteZeroes,
            offset,
            len,
            buf: None,
            fua: false,
            tag,
        }
    }
}

/// A finished IO: the request's tag, the outcome, and the buffer back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub buf: Option<DmaBuf>,
}

/// Where a completion goes.
pub enum Notify {
    /// Sent on a channel (a bounded channel never allocates per message).
    Channel(Sender<IoCompletion>),
    /// Called on the reactor's thread; keep it short.
    Callback(Arc<dyn Fn(IoCompletion) + Send + Sync>),
    /// To the reactor-local task with this index (see [`crate::reactor::Task`]).
    Task(u32),
    /// Nobody is told (a placeholder in free IO slots).
    Nobody,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notify::Channel(_) => f.write_str("Channel"),
            Notify::Callback(_) => f.write_str("Callback"),
            Notify::Task(index) => write!(f, "Task({index})"),
            Notify::Nobody => f.write_str("Nobody"),
        }
    }
}

impl Volume {
    pub fn size_bytes(&self) -> u64 {
        self.blocks << self.block_shift
    }

    /// The device command for `request`, or why there is none.
    #[inline]
    pub fn command(&self, request: &IoRequest) -> Result<IoCommand, IoError> {
        self.command_in(request, self.first_lba, self.size_bytes())
    }

    /// As [`Volume::command`], for the volume's replication metadata area: `request`'s offset
    /// counts from the area's start.
    pub fn metadata_command(&self, request: &IoRequest) -> Result<IoCommand, IoError> {
        self.command_in(
            request,
            self.first_lba + self.blocks,
            self.meta_blocks << self.block_shift,
        )
    }

    /// As [`Volume::command`], for the volume's health area, the end of its metadata area
    /// ([`crate::config::HEALTH_BYTES`]): `request`'s offset counts from the area's start. A
    /// volume without metadata has no health area: every request is out of its range.
    pub fn health_command(&self, request: &IoRequest) -> Result<IoCommand, IoError> {
        let (first_lba, size) = self.health_area();
        self.command_in(request, first_lba, size)
    }

    /// The health area: its first namespace LBA and its size in bytes (0 without metadata).
    pub fn health_area(&self) -> (u64, u64) {
        let meta_bytes = self.meta_blocks << self.block_shift;
        let size = match meta_bytes >= crate::config::HEALTH_BYTES {
            true => crate::config::HEALTH_BYTES,
            false => 0,
        };
        let end = self.first_lba + self.blocks + self.meta_blocks;
        (end - (size >> self.block_shift), size)
    }

    /// The command for `request` in the `size` bytes from namespace LBA `first_lba`.
    #[inline(always)]
    fn command_in(
        &self,
        request: &IoRequest,
        first_lba: u64,
        size: u64,
    ) -> Result<IoCommand, IoError> {
        let op = request.op;
        let (len, data) = match request.op {
            Op::Flush => {
                return Ok(IoCommand {
                    op: Op::Flush,
                    nsid: self.nsid,
                    slba: 0,
                    blocks: 0,
                    data: None,
                    flags: IoFlags::NONE,
                });
            }
            Op::WriteZeroes => (request.len, None),
            Op::Read | Op::Write => {
                let buf = request.buf.as_ref().ok_or(IoError::MissingBuffer { op })?;
                if buf.iova() % 4 != 0 {
                    return Err(IoError::BufferMisaligned { iova: buf.iova() });
                }
                (buf.len() as u64, Some(DataRange::of(buf)))
            }
        };
        if len == 0 {
            return Err(IoError::Empty { op });
        }
        let block_size = self.block_size as u64;
        if (request.offset | len) & (block_size - 1) != 0 {
            return Err(IoError::Misaligned {
                op,
                offset: request.offset,
                len,
                block_size: self.block_size,
            });
        }
        if request.offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError::OutOfRange {
                op,
                offset: request.offset,
                len,
                size,
            });
        }
        let max = if request.op == Op::WriteZeroes {
            65536 * block_size
        } else {
            self.max_transfer_bytes as u64
        };
        if len > max {
            return Err(IoError::TooLarge { op, len, max });
        }
        Ok(IoCommand {
            op: request.op,
            nsid: self.nsid,
            slba: first_lba + (request.offset >> self.block_shift),
            blocks: (len >> self.block_shift) as u32,
            data,
            flags: if request.fua {
                IoFlags::FUA
            } else {
                IoFlags::NONE
            },
        })
    }
}

// The completion travels by value through every callback: keep it small (tag, result, buffer).
const _: () = assert!(std::mem::size_of::<Result<(), IoError>>() <= 40);
const _: () = assert!(std::mem::size_of::<IoCompletion>() <= 72);
