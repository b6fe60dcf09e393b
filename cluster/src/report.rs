//! The cluster as etcd holds it, for operators (`fathom-ctl cluster status`, `volume list`):
//! the nodes and what is left of their leases, each volume's placement, primary, epoch and
//! in-sync copies, and what its primary last published of its replicas (sessions, resync).
//! Keys that do not parse are listed with the reason, not skipped in silence.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::etcd::{Etcd, EtcdError};
use crate::schema::{Key, NodeRecord, NodeStatus, Prefix, Tombstone, VolumeSpec, VolumeState};

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Seconds left of its lease (`None`: etcd did not say).
    pub lease_left_s: Option<u64>,
    /// Its pool's free space, as it last published it (`None`: no pool).
    pub pool: Option<crate::pool::Room>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeReport {
    pub name: String,
    pub spec: Option<VolumeSpec>,
    pub state: Option<VolumeState>,
    /// Why its spec or state in etcd was refused, if it was.
    pub refused: Option<String>,
    /// Whether the primary named by the state holds a live lease.
    pub primary_alive: bool,
    /// The primary's own row for the volume, as it last published it (its replicas'
    /// sessions, sync and resync), as `fathom-ctl replication --json` prints it.
    pub primary_view: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub cluster: String,
    pub endpoint: String,
    pub revision: i64,
    pub nodes: Vec<NodeReport>,
    pub volumes: Vec<VolumeReport>,
    /// Keys under the prefix that were refused, with the reason.
    pub refused: Vec<String>,
}

/// Reads the cluster `cluster` from `etcd`.
pub fn read(etcd: &mut Etcd, cluster: &str) -> Result<ClusterReport, EtcdError> {
    let prefix = Prefix::new(cluster).map_err(|error| EtcdError::Config(error.to_string()))?;
    let (kvs, revision) = etcd.get_prefix(prefix.as_str())?;
    let mut nodes = BTreeMap::new();
    let mut leases = BTreeMap::new();
    let mut specs = BTreeMap::new();
    let mut states = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    let mut refused = Vec::new();
    let mut volume_refused: BTreeMap<String, String> = BTreeMap::new();
    for kv in &kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let parsed = match prefix.parse(&kv.key) {
            Ok(parsed) => parsed,
            Err(error) => {
                refused.push(error.to_string());
                continue;
            }
        };
        let volume = match &parsed {
            Key::Spec(volume) | Key::State(volume) => Some(volume.clone()),
            _ => None,
        };
        let result = match parsed {
            Key::Node(node) => NodeRecord::decode(&key, &node, &kv.value).map(|record| {
                leases.insert(node.clone(), kv.lease);
                nodes.insert(node, record);
            }),
            Key::Spec(volume) => VolumeSpec::decode(&key, &volume, &kv.value).map(|spec| {
                specs.insert(volume, spec);
            }),
            Key::State(volume) => VolumeState::decode(&key, None, &kv.value).map(|state| {
                states.insert(volume, state);
            }),
            Key::Status(node) => NodeStatus::decode(&key, &node, &kv.value).map(|status| {
                statuses.insert(node, status);
            }),
            // A deleted volume's tombstone: for the nodes, not listed.
            Key::Deleted(volume) => Tombstone::decode(&key, &volume, &kv.value).map(|_| ()),
        };
        if let Err(error) = result {
            if let Some(volume) = volume {
                volume_refused.insert(volume, error.to_string());
            }
            refused.push(error.to_string());
        }
    }
    let mut node_reports = Vec::new();
    for (id, record) in nodes.iter() {
        let lease = leases.get(id).copied().unwrap_or(0);
        let left = match lease {
            0 => None,
            lease => etcd
                .time_to_live(lease)
                .ok()
                .flatten()
                .map(|left: Duration| left.as_secs()),
        };
        node_reports.push(NodeReport {
            record: record.clone(),
            lease_left_s: left,
            pool: statuses.get(id).and_then(|status: &NodeStatus| status.pool),
        });
    }
    let names: std::collections::BTreeSet<&String> = specs
        .keys()
        .chain(states.keys())
        .chain(volume_refused.keys())
        .collect();
    let volumes = names
        .into_iter()
        .map(|name| {
            let state = states.get(name).cloned();
            let primary = state.as_ref().map(|state| state.primary.clone());
            let primary_view = primary
                .as_ref()
                .and_then(|primary| statuses.get(primary))
                .and_then(|status| status.replication.as_array())
                .and_then(|rows| {
                    rows.iter()
                        .find(|row| row["volume"] == name.as_str() && row["role"] == "primary")
                        .cloned()
                });
            VolumeReport {
                name: name.clone(),
                spec: specs.get(name).cloned(),
                refused: volume_refused.get(name).cloned(),
                primary_alive: primary.as_ref().is_some_and(|p| nodes.contains_key(p)),
                state,
                primary_view,
            }
        })
        .collect();
    Ok(ClusterReport {
        cluster: cluster.to_string(),
        endpoint: etcd.endpoint().to_string(),
        revision,
        nodes: node_reports,
        volumes,
        refused,
    })
}
