//! Fathom's control plane on etcd. [`schema`] is the key layout and records (sans-IO),
//! [`etcd`] a blocking client with deadlines and endpoint failover, [`local`] etcd members on
//! loopback for tests and laptops.

pub mod admin;
pub mod agent;
pub mod etcd;
pub mod local;
pub mod placement;
pub mod pool;
pub mod provision;
pub mod report;
pub mod schema;
