//! Fathom telemetry.
//!
//! Every IO in the engine is timed in CPU cycles. This crate owns the clock those cycles come
//! from ([`Clock`]): the time stamp counter (TSC) read inline, calibrated once at start against
//! the monotonic clock so that cycles can be turned into nanoseconds by anyone who knows the
//! frequency, including a reader in another process. Stage stamps, the shared-memory histogram
//! region and the exporters build on it.

pub mod clock;
pub mod hdr;
pub mod prometheus;
pub mod region;
pub mod report;
mod shm;
pub mod trace;

pub use clock::{Clock, ClockError, ClockSource};
pub use shm::SlotError;
