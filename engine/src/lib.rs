//! The Fathom durability engine.
//!
//! A polled-mode, kernel-bypass NVMe data path in the SPDK model:
//! - [`nvme`]: spec-exact queue entries, the host queue pair (one implementation for every
//!   NVMe transport), and the host controller driver (admin queue, Identify, queue creation);
//! - [`driver`]: the device trait and the transports, starting with `mem`, an in-process NVMe
//!   controller with null, ram or file media, inline or on a device thread, with latency and
//!   error injection;
//! - [`dma`]: hugepage DMA memory and the buffers IO moves through;
//! - [`reactor`]: one pinned, polling thread per core, owning its queue pairs, with per-IO
//!   slots allocated at start;
//! - [`volume`]: named LBA ranges and the request/completion types;
//! - [`engine`]: everything brought up from a [`config::Config`], and the submit API;
//! - [`frontend`]: the protocols that serve volumes to clients, starting with NBD, written
//!   sans-IO (bytes in, bytes out) for reactor-polled socket tasks to drive.
//!
//! The IO path (submit, doorbell, controller, completion, callback) takes no lock, makes no
//! system call and allocates nothing.

pub mod config;
pub mod dma;
pub mod driver;
pub mod engine;
pub mod frontend;
pub mod nvme;
pub mod poll;
pub mod reactor;
pub mod stats;
pub mod volume;

pub use config::Config;
pub use dma::{DmaBuf, DmaPool, PageKind};
pub use driver::Op;
pub use engine::{Engine, EngineError};
pub use reactor::{IoContext, Rejected, Task};
pub use volume::{IoCompletion, IoError, IoRequest, Notify, Volume, VolumeId};
