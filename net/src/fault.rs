//! The node's partition switch, for tests and failure drills: `fathom-ctl partition on` cuts
//! this node off from its peers (every replication session, both ways, and new ones) and
//! from etcd, as a network partition would, while its NBD clients stay connected;
//! `partition etcd` cuts it off from etcd only. Each protocol's socket code asks
//! [`partitioned`] (peers) or [`etcd_cut`] where it reads, writes and connects.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

/// What the switch cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    Off,
    /// etcd only: the peers are still reached.
    Etcd,
    /// Peers and etcd.
    All,
}

static PARTITION: AtomicU8 = AtomicU8::new(0);

pub fn set_partition(partition: Partition) {
    let value = match partition {
        Partition::Off => 0,
        Partition::Etcd => 1,
        Partition::All => 2,
    };
    PARTITION.store(value, Ordering::Release);
}

pub fn partition() -> Partition {
    match PARTITION.load(Ordering::Relaxed) {
        0 => Partition::Off,
        1 => Partition::Etcd,
        _ => Partition::All,
    }
}

/// The peers are out of reach.
pub fn partitioned() -> bool {
    partition() == Partition::All
}

/// etcd is out of reach.
pub fn etcd_cut() -> bool {
    partition() != Partition::Off
}

/// What a read, write or connect fails with while cut off.
pub fn partition_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "cut off by the partition switch (`fathom-ctl partition off` heals it)",
    )
}
