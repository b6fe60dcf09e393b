//! What an operator asks of the control plane (`fathom-ctl volume create`, `volume delete`):
//! checked against the cluster as etcd holds it, then written in one transaction that fails
//! if the cluster changed under it (another create of the same name). The nodes do the rest
//! when they see the change ([`crate::provision`]).

use serde::Serialize;

use fathom_engine::config::metadata_bytes;

use crate::etcd::{Condition, Etcd, EtcdError, Write};
use crate::placement::{self, Candidate, PlacementError, Request};
use crate::report::ClusterReport;
use crate::schema::{Prefix, Tombstone, VolumeSpec, VolumeState, SCHEMA_VERSION};

/// A new volume's incarnation: the time in ns mixed with the process id, never 0 (that
/// is the configured volumes').
fn new_incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    (nanos ^ ((std::process::id() as u64) << 48)).max(1)
}

/// The smallest region a node may track: what sizes the metadata a volume needs at most.
const SMALLEST_REGION: u64 = 64 << 10;

/// Why a request was refused. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("a volume {name:?} exists already ({size} bytes on {replicas}); pick another name, or delete it first")]
    Exists {
        name: String,
        size: u64,
        replicas: String,
    },
    #[error("no volume {name:?} in cluster {cluster:?}; the volumes are: {known}")]
    Unknown {
        name: String,
        cluster: String,
        known: String,
    },
    #[error("no live node of cluster {cluster:?} has a pool to place volumes in ([cluster.pool] in a node's config){blocks}")]
    NoPool { cluster: String, blocks: String },
    #[error("--size {size}: not a positive multiple of the {block_size}-byte blocks of the nodes' pools")]
    Size { size: u64, block_size: u32 },
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("volume {0:?} changed in etcd while this ran; look again (`volume list`) and retry")]
    Raced(String),
    #[error("volume {0:?} is one of the nodes' configured volumes ([[volume]] in their config files): remove it there and restart them; `volume delete` deletes volumes made with `volume create`")]
    Configured(String),
}

/// A volume made: its spec, as the nodes will make it.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub spec: VolumeSpec,
    pub state: VolumeState,
}

/// Places and creates volume `name` of `size` bytes with `replicas` copies, on the live nodes
/// with pools in `report` (read just before from `etcd`). `block_size`: the pools' block
/// size to use (`None`: the one most live pools have).
pub fn create(
    etcd: &mut Etcd,
    report: &ClusterReport,
    name: &str,
    size: u64,
    replicas: usize,
    block_size: Option<u32>,
) -> Result<Created, AdminError> {
    if let Some(existing) = report
        .volumes
        .iter()
        .find(|volume| volume.name == name && volume.spec.is_some())
    {
        let spec = existing.spec.as_ref().expect("checked");
        return Err(AdminError::Exists {
            name: name.into(),
            size: spec.size,
            replicas: spec.replicas.join(","),
        });
    }
    let pools: Vec<(&str, crate::pool::Room)> = report
        .nodes
        .iter()
        .filter_map(|node| Some((node.record.id.as_str(), node.pool?)))
        .collect();
    let block_size = match block_size {
        Some(block_size) => block_size,
        None => {
            let mut counts = std::collections::BTreeMap::new();
            for (_, room) in &pools {
                *counts.entry(room.block_size).or_insert(0usize) += 1;
            }
            let Some((&block_size, _)) = counts.iter().max_by_key(|(_, count)| **count) else {
                return Err(AdminError::NoPool {
                    cluster: report.cluster.clone(),
                    blocks: String::new(),
                });
            };
            block_size
        }
    };
    if size == 0 || !size.is_multiple_of(block_size as u64) {
        return Err(AdminError::Size { size, block_size });
    }
    let metadata = metadata_bytes(size, SMALLEST_REGION);
    let candidates: Vec<Candidate> = pools
        .iter()
        .filter(|(_, room)| room.block_size == block_size && room.slots_free > 0)
        .map(|(node, room)| Candidate {
            node: node.to_string(),
            // Room for the data once the metadata is set aside.
            free_bytes: room.largest_bytes.saturating_sub(metadata),
            copies: report
                .volumes
                .iter()
                .filter(|volume| {
                    volume
                        .spec
                        .as_ref()
                        .is_some_and(|spec| spec.replicas.iter().any(|r| r == node))
                })
                .count(),
        })
        .collect();
    if candidates.is_empty() && !pools.is_empty() {
        let pools: Vec<String> = pools
            .iter()
            .map(|(node, room)| {
                format!(
                    "{node}: {}-byte blocks, {} volume slots free",
                    room.block_size, room.slots_free
                )
            })
            .collect();
        return Err(AdminError::NoPool {
            cluster: report.cluster.clone(),
            blocks: format!(
                " with {block_size}-byte blocks and a free volume slot; the pools have: {}",
                pools.join("; ")
            ),
        });
    }
    let nodes = placement::place(
        &Request {
            name: name.into(),
            size,
            block_size,
            replicas,
        },
        &candidates,
    )?;
    let spec = VolumeSpec {
        v: SCHEMA_VERSION,
        name: name.into(),
        size,
        block_size,
        replicas: nodes.clone(),
        incarnation: new_incarnation(),
    };
    // Every copy starts cleared: all of them are in sync, and the first is the primary.
    let state = VolumeState {
        v: SCHEMA_VERSION,
        epoch: 0,
        primary: nodes[0].clone(),
        in_sync: nodes,
    };
    let prefix = Prefix::new(&report.cluster).map_err(|e| EtcdError::Config(e.to_string()))?;
    let (spec_key, state_key) = (prefix.spec(name), prefix.state(name));
    // A tombstone of an earlier volume of this name goes: the nodes drop any copy of that
    // one anyway, its incarnation not being this one's.
    let written = etcd.txn(
        &[
            Condition::Absent(spec_key.clone()),
            Condition::Absent(state_key.clone()),
        ],
        &[
            Write::Put {
                key: spec_key,
                value: spec.encode(),
                lease: None,
            },
            Write::Put {
                key: state_key,
                value: state.encode(),
                lease: None,
            },
            Write::Delete(prefix.deleted(name)),
        ],
    )?;
    if !written {
        return Err(AdminError::Raced(name.into()));
    }
    Ok(Created { spec, state })
}

/// Deletes volume `name`: its spec and state go from etcd in one transaction, and every node
/// that holds a copy deletes it when it sees that (a node that is down, when it comes back).
pub fn delete(
    etcd: &mut Etcd,
    report: &ClusterReport,
    name: &str,
) -> Result<VolumeSpec, AdminError> {
    let Some(spec) = report
        .volumes
        .iter()
        .find(|volume| volume.name == name)
        .and_then(|volume| volume.spec.clone())
    else {
        let known: Vec<&str> = report
            .volumes
            .iter()
            .filter(|volume| volume.spec.is_some())
            .map(|volume| volume.name.as_str())
            .collect();
        return Err(AdminError::Unknown {
            name: name.into(),
            cluster: report.cluster.clone(),
            known: if known.is_empty() {
                "(none)".into()
            } else {
                known.join(", ")
            },
        });
    };
    if spec.incarnation == 0 {
        return Err(AdminError::Configured(name.into()));
    }
    let prefix = Prefix::new(&report.cluster).map_err(|e| EtcdError::Config(e.to_string()))?;
    let (spec_key, state_key) = (prefix.spec(name), prefix.state(name));
    let tombstone = Tombstone {
        v: SCHEMA_VERSION,
        name: name.into(),
        incarnation: spec.incarnation,
    };
    let deleted = etcd.txn(
        &[Condition::Present(spec_key.clone())],
        &[
            Write::Delete(spec_key),
            Write::Delete(state_key),
            Write::Put {
                key: prefix.deleted(name),
                value: tombstone.encode(),
                lease: None,
            },
        ],
    )?;
    if !deleted {
        return Err(AdminError::Raced(name.into()));
    }
    Ok(spec)
}
