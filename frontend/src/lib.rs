//! Front ends: the protocols that serve volumes to clients over the network, above the engine.
//!
//! Each is a sans-IO codec (received bytes become requests, replies become bytes to send),
//! tested without sockets, plus a thin socket driver that reactor-polled tasks run.

pub mod nbd;
