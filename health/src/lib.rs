//! Volume health (sans-IO): what one second of a volume's signals says of it, and what the
//! seconds before say of that.
//!
//! - [`model`]: the volume's latency against its throughput, learned while it is healthy
//!   (after Perseus, FAST '23): latency above the model at a throughput below what it has
//!   done before is sickness; at or above it, load.
//! - [`canary`]: a canary's verdict per interval, each stage's p99 against the baseline and
//!   noise band learned while green, stored across restarts.
//! - [`drift`]: the clients' IO shape (sizes, mix, depth) against its recent past, so that a
//!   slower client is named a regression (the canary is red), drift, or load.
//! - [`signals`]: a volume's window read from two snapshots of the node's stats region.
//! - [`detector`]: per window a sign (fine, busy, sick, and why) from the peer ratio, the
//!   model and the fail-safes; states with hysteresis (healthy, suspect, degraded,
//!   recovering); every verdict with the values it was made on.
//!
//! Nothing here reads a clock or a socket: the node feeds windows in, tests feed made-up
//! ones, and the same windows give the same verdicts.

pub mod canary;
pub mod detector;
pub mod drift;
pub mod model;
pub mod signals;
