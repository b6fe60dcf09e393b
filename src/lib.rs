//! Shared code of Fathom's programs: `fathom-node`, `fathom-bench`.

pub mod workload;
