//! The Fathom engine core: what stands between a client's request and a device queue.
//!
//! - [`reactor`]: one pinned, polling thread per core, owning its device queues, with per-IO
//!   slots allocated at start;
//! - [`volume`]: named LBA ranges and the engine-level request/completion types;
//! - [`stats`]: stage stamps and the per-core histograms behind the shared-memory region;
//! - [`engine`]: everything brought up from a [`config::Config`], and the submit API;
//! - [`config`]: the node's TOML schema, validated once;
//! - [`poll`]: eventfd and epoll, for reactors that sleep and tasks that poll sockets.
//!
//! Below it (crates it depends on): `fathom-dma` (DMA memory), `fathom-nvme` (queue pairs and
//! the host controller), `fathom-drivers` (the device trait and its transports). Above it:
//! `fathom-frontend` (NBD) and the programs. The IO path (submit, doorbell, controller,
//! completion, callback) takes no lock, makes no system call and allocates nothing.

pub mod config;
pub mod engine;
pub mod layer;
pub mod poll;
pub mod reactor;
pub mod stats;
pub mod trace;
pub mod volume;

pub use config::Config;
pub use engine::{Engine, EngineError, NewVolume, MAX_VOLUME_NAME};
pub use fathom_dma::{DmaBuf, DmaPool, PageKind};
pub use fathom_drivers::Op;
pub use layer::ControlError;
pub use reactor::{IoContext, Rejected, Task};
pub use stats::{EngineStamps, FrontendTrace};
pub use volume::{IoCompletion, IoError, IoRequest, Notify, Volume, VolumeId};
