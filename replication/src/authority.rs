//! Who decides epochs. With no control plane (a single node, or a cluster driven by
//! `fathom-ctl`), a node takes the next epoch on its own and its claim on a majority of copies
//! decides. With one (etcd, in `fathom-cluster`), the next epoch is taken there first, by
//! compare-and-swap, and only then claimed on the copies: this crate calls the authority and
//! never knows what is behind it.

/// Why a node takes a volume's next epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The primary is gone (its lease expired); this node is an in-sync copy.
    Failover,
    /// The primary handed the volume over to this node (a reparent).
    Handover,
    /// This node is the primary of record and (re)starts serving.
    Restart,
    /// The operator forced it (`fathom-ctl promote --force`).
    Forced,
}

impl Claim {
    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Failover => "failover",
            Claim::Handover => "handover",
            Claim::Restart => "restart",
            Claim::Forced => "forced",
        }
    }
}

/// What an authority granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The epoch to serve at.
    pub epoch: u64,
    /// The copies the authority holds in sync (this node among them): any other copy may
    /// lack writes nobody can name, and is rebuilt in full.
    pub in_sync: Vec<String>,
}

/// Grants epochs.
pub trait EpochAuthority: Send + Sync {
    /// Takes the next epoch of `volume` for this node, above `known` (the highest epoch this
    /// node has seen), or says why not (and what to do).
    fn claim(&self, volume: &str, known: u64, why: Claim) -> Result<Grant, String>;
}
