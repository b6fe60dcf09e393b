//! Fathom replication: how a volume's primary keeps its replicas in step.
//!
//! A primary writes locally and to every replica in parallel and acknowledges a client once a
//! majority holds the write; a new primary reconciles from the survivors before it serves;
//! every frame carries the volume's epoch so that a replica can refuse a deposed primary
//! (see the Replication section of the design). This crate grows that in steps; all of it
//! is sans-IO so far, tested without sockets:
//! - [`proto`]: the wire protocol, frames in and out as bytes (unit-tested, property-tested
//!   and fuzzed);
//! - [`meta`]: a replicated volume's crash-safe superblock (two checksummed copies) and its
//!   dirty-region bitmap, blocks in and out;
//! - [`auth`]: the cluster-key challenge-response peers run in their first frames, and
//!   [`session`]: the opening of a session around it (cluster, version, volumes, key or
//!   mutual TLS);
//! - [`order`]: overlapping writes in sequence order on a replica, and [`replica`]: what a
//!   replica does with each frame of a volume (fencing, bounds, order, the replies);
//! - [`primary`]: the primary's bookkeeping per volume: sequences, majority answers for
//!   writes and flushes, and the regions each replica may lack.
//!
//! The replica service and the primary's peer connections (socket drivers on `fathom-net`)
//! and the primary's fan-out layer come next and stay thin over these.

pub mod auth;
pub mod authority;
pub mod client;
pub mod dial;
pub mod forward;
pub mod layer;
pub mod meta;
pub mod node;
pub mod order;
pub mod pace;
pub mod primary;
pub mod proto;
pub mod replica;
pub mod resync;
pub mod role;
pub mod service;
pub mod session;
pub mod stream;

pub use proto::{
    check_epoch, encode, DecodedHeader, EpochVerdict, Frame, FrameDecoder, Header, Hello, Kind,
    ProbeEntry, ProtoError, Refusal,
};
