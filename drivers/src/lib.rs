//! Drivers: one trait, several transports.
//!
//! A [`Driver`] is one device. At start-up each reactor asks it for an [`IoQueue`] of its own
//! (for NVMe transports: an I/O submission/completion queue pair), which only that reactor
//! touches afterwards, so the IO path takes no lock.

pub mod inject;
pub mod mem;
pub mod uring;
pub mod vfio;

use fathom_dma::DmaError;
use fathom_nvme::spec::io_opcode;
use fathom_nvme::{Completed, DataRange, Namespace, NvmeError, QueueFull, SubmissionEntry};

/// The operations a volume accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    WriteZeroes,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::WriteZeroes => "write-zeroes",
        }
    }
}

/// A command for a device queue, already validated and in device terms.
#[derive(Debug, Clone, Copy)]
pub struct IoCommand {
    pub op: Op,
    pub nsid: u32,
    pub slba: u64,
    /// Logical blocks (1..=65536); ignored for flush.
    pub blocks: u32,
    pub data: Option<DataRange>,
    pub flags: IoFlags,
}

impl IoCommand {
    /// The NVMe command for this IO, for the NVMe transports (`mem`, `vfio`); the queue pair
    /// adds the identifier and the data pointers.
    #[inline(always)]
    pub fn nvme_entry(&self) -> SubmissionEntry {
        let opcode = match self.op {
            Op::Read => io_opcode::READ,
            Op::Write => io_opcode::WRITE,
            Op::Flush => io_opcode::FLUSH,
            Op::WriteZeroes => io_opcode::WRITE_ZEROES,
        };
        let mut entry = SubmissionEntry::new(opcode, 0, self.nsid);
        if self.op != Op::Flush {
            entry.set_slba(self.slba);
            entry.set_block_count(self.blocks);
            // Both flags are moved into place without a branch (on the path of every IO).
            entry.cdw12 |= (self.flags.0 & IoFlags::FUA.0) << 30;
            // CDW2 is reserved for Read and Write in the NVM command set; Fathom's own
            // controller reads this bit as "move no data". Never set for other devices.
            entry.cdw2 |= self.flags.0 & NO_DATA_CDW2;
        }
        entry
    }
}

/// The bit of CDW2 that carries [`IoFlags::NO_DATA`] to Fathom's in-process controller: the
/// flag's own bit.
pub const NO_DATA_CDW2: u32 = IoFlags::NO_DATA.0;

/// Where in a device run-time injection applies: the controller (command handling) or the
/// media (the data it moves: skipped with the media stub).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectAt {
    Device,
    Media,
}

/// Per-command flags, as one word: a flag stored as its own byte next to another would be
/// read back by a wider load and stall store forwarding on every IO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoFlags(pub u32);

impl IoFlags {
    pub const NONE: IoFlags = IoFlags(0);
    /// Force Unit Access: the data is durable when the command completes.
    pub const FUA: IoFlags = IoFlags(1);
    /// The media stub: the controller does everything but move data (Fathom's in-process
    /// controller only; [`Driver::null_media`] says whether a device honours it).
    pub const NO_DATA: IoFlags = IoFlags(2);

    #[inline(always)]
    pub fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What a device is, as the engine needs to know it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub driver: &'static str,
    pub model: String,
    pub serial: String,
    pub namespaces: Vec<Namespace>,
    /// Largest transfer one command may carry.
    pub max_transfer_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("device {device}: {what}")]
    Media {
        device: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device}: DMA memory")]
    Dma {
        device: String,
        #[source]
        source: DmaError,
    },
    #[error("device {device}: {what}")]
    Setup { device: String, what: String },
    #[error(transparent)]
    Pci(#[from] vfio::pci::PciError),
}

/// One device.
pub trait Driver: Send + Sync {
    fn info(&self) -> &DeviceInfo;
    /// A queue for the calling reactor, with room for `depth` commands in flight.
    fn create_queue(&self, depth: u16) -> Result<Box<dyn IoQueue>, DriverError>;
    /// Stops the device cleanly after every queue is gone: for NVMe, the shutdown
    /// notification; for media, everything written is made durable.
    fn shutdown(&self) -> Result<(), DriverError>;
    /// Replaces the device's run-time injection rules at `at` (the config's rules stay).
    /// Only devices whose controller runs in Fathom can; others say so.
    fn set_inject(&self, _at: InjectAt, _rules: &[inject::InjectRule]) -> Result<(), String> {
        Err(format!(
            "device {}: run-time injection needs the mem driver's controller; the {} driver's \
             controller is outside Fathom (inject at the queue layer of its volumes instead)",
            self.info().name,
            self.info().driver
        ))
    }
    /// Whether the controller honours [`IoFlags::NO_DATA`] (the media stub).
    fn null_media(&self) -> bool {
        false
    }
}

/// One reactor's queue on a device. Never shared: the reactor owns it.
pub trait IoQueue: Send {
    /// Queues a command; it reaches the device at the next [`IoQueue::ring`].
    fn submit(&mut self, command: &IoCommand, cookie: u32) -> Result<(), QueueFull>;
    /// Publishes the commands queued since the last ring (one doorbell for the batch).
    fn ring(&mut self);
    /// Reaps up to `out.len()` completions.
    fn reap(&mut self, out: &mut [Completed]) -> usize;
    /// Commands in flight.
    fn outstanding(&self) -> usize;
    /// Commands that can be in flight at once.
    fn capacity(&self) -> usize;
    /// Blocks up to `timeout` until a completion can be reaped, for queues whose device can
    /// notify (io_uring); returns false, at once, for queues that must be polled.
    fn wait(&mut self, _timeout: std::time::Duration) -> bool {
        false
    }
}
