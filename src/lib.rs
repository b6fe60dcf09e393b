//! Shared code of Fathom's programs: `fathom-node`, `fathom-bench`, `fathom-ctl`.

pub mod checker;
pub mod health;
pub mod isolate;
pub mod metrics;
pub mod nbd_client;
pub mod node_control;
pub mod plot;
pub mod stat;
pub mod text;
pub mod top;
pub mod trace;
pub mod workload;
