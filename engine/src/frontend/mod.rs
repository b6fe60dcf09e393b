//! Front ends: the protocols that serve volumes to clients over the network.
//!
//! Each front end is written sans-IO: it turns received bytes into requests and replies into
//! bytes to send, and owns no socket, thread or engine type, so a reactor-polled socket task
//! can drive it and tests can feed it bytes directly.

pub mod nbd;
