//! Fathom's socket runtime, shared by the protocols that reactors poll: the NBD front end
//! and replication.
//!
//! - [`transport`]: a connection's byte stream, plain TCP or TLS over it (rustls), server or
//!   client side, non-blocking like the socket under it;
//! - [`buffers`]: DMA buffers by size class, reused across one reactor's requests;
//! - [`fault`]: the partition switch (a node cut off from its peers, for tests and drills);
//! - [`server`]: listeners and connections polled by the reactors, each connection handed
//!   to the reactor that owns what it serves; a protocol is a [`server::Service`].
//!
//! Protocols stay sans-IO in their own crates; this is the thin part that touches sockets.

pub mod buffers;
pub mod fault;
pub mod server;
pub mod transport;

pub use buffers::BufferCache;
pub use transport::{TlsError, Transport};
