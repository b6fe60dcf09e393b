//! Fathom replication: how a volume's primary keeps its replicas in step.
//!
//! A primary writes locally and to every replica in parallel and acknowledges a client once a
//! majority holds the write; a new primary reconciles from the survivors before it serves;
//! every frame carries the volume's epoch so that a replica can refuse a deposed primary
//! (see the Replication section of the design). This crate grows that in steps. Today it is
//! the wire protocol and the metadata formats: [`proto`] is a sans-IO codec, frames in and
//! out as bytes with no socket, unit-tested, property-tested and fuzzed on its own; [`meta`] is
//! a replicated volume's crash-safe superblock (two checksummed copies) and its dirty-region
//! bitmap, blocks in and out; [`auth`] is the cluster-key challenge-response peers run in
//! their first frames, and [`session`] the opening of a session around it (cluster, version,
//! volumes, key or mutual TLS); [`order`] keeps overlapping writes in sequence order on a
//! replica. The
//! replica service, the primary's fan-out layer and the socket
//! driver that feeds the codec (on `fathom-net`) come next and stay thin over them.

pub mod auth;
pub mod meta;
pub mod order;
pub mod proto;
pub mod session;

pub use proto::{
    check_epoch, encode, DecodedHeader, EpochVerdict, Frame, FrameDecoder, Header, Hello, Kind,
    ProbeEntry, ProtoError, Refusal,
};
