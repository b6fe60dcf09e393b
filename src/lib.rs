//! Shared code of Fathom's programs: `fathom-node`, `fathom-bench`.

pub mod metrics;
pub mod nbd_client;
pub mod plot;
pub mod stat;
pub mod top;
pub mod workload;
