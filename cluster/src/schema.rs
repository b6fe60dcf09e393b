//! The keys and values Fathom keeps in etcd, without any IO: the layout under a cluster's
//! prefix, the JSON records, and their checks. Anything under the prefix that does not parse
//! or does not hold together is refused here with the reason, and the caller logs it and
//! goes on without it.
//!
//! ```text
//! /fathom/<cluster>/nodes/<node>             NodeRecord    put under the node's lease
//! /fathom/<cluster>/volumes/<volume>/spec    VolumeSpec    size and placement, set at create
//! /fathom/<cluster>/volumes/<volume>/state   VolumeState   epoch, primary, in-sync copies
//! /fathom/<cluster>/status/<node>            NodeStatus    what the node serves, under its lease
//! ```
//!
//! Every record is a JSON object with `"v": 1`. A node is alive while its key exists: the key
//! goes when its lease expires. A volume's state changes only by compare-and-swap on the
//! state key's revision ([`crate::etcd`]): the epoch grows by one at each change of primary.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The layout version of every record.
pub const SCHEMA_VERSION: u32 = 1;
/// The longest node id or volume name (what a replica's superblock stores).
pub const MAX_NAME: usize = 47;
/// The most copies of a volume.
pub const MAX_REPLICAS: usize = 7;

/// Why a key or value under the prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("key {key:?} is not under the cluster prefix {prefix:?}")]
    Foreign { key: String, prefix: String },
    #[error("key {0:?} is not one Fathom writes (nodes/<node>, volumes/<volume>/spec or /state, status/<node>)")]
    UnknownKey(String),
    #[error("{what} {name:?}: {why}")]
    BadName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("value of {key}: not a record Fathom writes: {why}")]
    BadJson { key: String, why: String },
    #[error("value of {key}: layout version {found}, this node reads version {SCHEMA_VERSION}")]
    Version { key: String, found: u32 },
    #[error("value of {key}: {why}")]
    Inconsistent { key: String, why: String },
}

/// A cluster's place in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// `/fathom/<cluster>/`.
    pub fn new(cluster: &str) -> Result<Self, SchemaError> {
        check_name("cluster name", cluster)?;
        Ok(Self(format!("/fathom/{cluster}/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.0)
    }

    pub fn volumes(&self) -> String {
        format!("{}volumes/", self.0)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.0)
    }

    pub fn spec(&self, volume: &str) -> String {
        format!("{}volumes/{volume}/spec", self.0)
    }

    pub fn state(&self, volume: &str) -> String {
        format!("{}volumes/{volume}/state", self.0)
    }

    pub fn deleted(&self, volume: &str) -> String {
        format!("{}volumes/{volume}/deleted", self.0)
    }

    pub fn status(&self, node: &str) -> String {
        format!("{}status/{node}", self.0)
    }

    /// What `key` names.
    pub fn parse(&self, key: &[u8]) -> Result<Key, SchemaError> {
        let text = String::from_utf8_lossy(key);
        let rest = text
            .strip_prefix(self.0.as_str())
            .ok_or_else(|| SchemaError::Foreign {
                key: text.to_string(),
                prefix: self.0.clone(),
            })?;
        let unknown = || SchemaError::UnknownKey(text.to_string());
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["nodes", node] => {
                check_name("node id", node)?;
                Ok(Key::Node(node.to_string()))
            }
            ["volumes", volume, "spec"] => {
                check_name("volume name", volume)?;
                Ok(Key::Spec(volume.to_string()))
            }
            ["volumes", volume, "state"] => {
                check_name("volume name", volume)?;
                Ok(Key::State(volume.to_string()))
            }
            ["volumes", volume, "deleted"] => {
                check_name("volume name", volume)?;
                Ok(Key::Deleted(volume.to_string()))
            }
            ["status", node] => {
                check_name("node id", node)?;
                Ok(Key::Status(node.to_string()))
            }
            _ => Err(unknown()),
        }
    }
}

/// A key Fathom writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Node(String),
    Spec(String),
    State(String),
    /// A volume deleted through the control plane: its nodes drop their copies.
    Deleted(String),
    Status(String),
}

/// Node ids, volume and cluster names: 1 to 47 of `A-Z a-z 0-9 . _ -`, not starting with a
/// dot.
pub fn check_name(what: &'static str, name: &str) -> Result<(), SchemaError> {
    let bad = |why| SchemaError::BadName {
        what,
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad("it is longer than 47 bytes"));
    }
    if name.starts_with('.') {
        return Err(bad("it starts with a dot"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("it may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// A node, registered while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub v: u32,
    pub id: String,
    /// Its replica service.
    pub replication: String,
    /// Its NBD front end, if it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    pub pid: u32,
    /// The TTL of the lease its key is under, in milliseconds.
    pub lease_ms: u64,
}

/// A volume: its size and the nodes that hold its copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub v: u32,
    pub name: String,
    /// Bytes.
    pub size: u64,
    pub block_size: u32,
    /// The nodes that hold a copy, each once.
    pub replicas: Vec<String>,
    /// Which volume of this name (`fathom-ctl volume create` draws a new one each time; 0: a
    /// volume of the nodes' config files): a copy of another incarnation is not this
    /// volume's, and is dropped, never joined to it.
    #[serde(default)]
    pub incarnation: u64,
}

/// What `volume delete` leaves under `volumes/<v>/deleted`: the incarnation deleted, whose
/// copies the nodes drop (a node down then drops its copy when it comes back). A node drops
/// a pool volume only on this, or on a spec of another incarnation: a spec missing or
/// unreadable deletes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub v: u32,
    pub name: String,
    pub incarnation: u64,
}

impl Tombstone {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    pub fn decode(key: &str, name: &str, bytes: &[u8]) -> Result<Self, SchemaError> {
        let tombstone: Self = decode(key, bytes)?;
        if tombstone.name != name {
            return Err(inconsistent(
                key,
                format!("it names volume {:?}, the key {name:?}", tombstone.name),
            ));
        }
        Ok(tombstone)
    }
}

/// Who serves a volume: changed only by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    pub v: u32,
    /// Grows by one at every change of primary.
    pub epoch: u64,
    pub primary: String,
    /// The copies that lack no acknowledged write (the primary among them): only these may
    /// become primary.
    pub in_sync: Vec<String>,
}

/// What a node serves, as it last published it (every second while it changes): its
/// replication rows, as `fathom-ctl replication --json` prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    pub v: u32,
    pub node: String,
    pub replication: serde_json::Value,
    /// The free space of its pool (`[cluster.pool]`), where volumes are placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::pool::Room>,
}

impl NodeStatus {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    pub fn decode(key: &str, node: &str, bytes: &[u8]) -> Result<Self, SchemaError> {
        let status: Self = decode(key, bytes)?;
        if status.node != node {
            return Err(inconsistent(
                key,
                format!("it names node {:?}, the key node {node:?}", status.node),
            ));
        }
        if !status.replication.is_array() {
            return Err(inconsistent(key, "replication is not a list".into()));
        }
        Ok(status)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, SchemaError> {
    // The version first, so that a newer layout is named as such and not as garbage.
    #[derive(Deserialize)]
    struct Versioned {
        v: Option<u32>,
    }
    let bad = |why: String| SchemaError::BadJson {
        key: key.to_string(),
        why,
    };
    let versioned: Versioned = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    match versioned.v {
        Some(SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(SchemaError::Version {
                key: key.to_string(),
                found,
            })
        }
        None => return Err(bad("no \"v\" field".into())),
    }
    serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))
}

fn inconsistent(key: &str, why: String) -> SchemaError {
    SchemaError::Inconsistent {
        key: key.to_string(),
        why,
    }
}

impl NodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    /// The record under `key`, for node `id` (the key's).
    pub fn decode(key: &str, id: &str, bytes: &[u8]) -> Result<Self, SchemaError> {
        let record: Self = decode(key, bytes)?;
        if record.id != id {
            return Err(inconsistent(
                key,
                format!("it names node {:?}, the key node {id:?}", record.id),
            ));
        }
        if record.replication.parse::<std::net::SocketAddr>().is_err() {
            return Err(inconsistent(
                key,
                format!(
                    "replication address {:?} is not ip:port",
                    record.replication
                ),
            ));
        }
        Ok(record)
    }
}

impl VolumeSpec {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    pub fn decode(key: &str, name: &str, bytes: &[u8]) -> Result<Self, SchemaError> {
        let spec: Self = decode(key, bytes)?;
        spec.check().map_err(|why| inconsistent(key, why))?;
        if spec.name != name {
            return Err(inconsistent(
                key,
                format!("it names volume {:?}, the key {name:?}", spec.name),
            ));
        }
        Ok(spec)
    }

    /// What must hold of a spec, whoever wrote it.
    pub fn check(&self) -> Result<(), String> {
        check_name("volume name", &self.name).map_err(|e| e.to_string())?;
        if !self.block_size.is_power_of_two() || !(512..=4096).contains(&self.block_size) {
            return Err(format!(
                "block size {} is not 512, 1024, 2048 or 4096",
                self.block_size
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(self.block_size as u64) {
            return Err(format!(
                "size {} is not a positive multiple of the block size {}",
                self.size, self.block_size
            ));
        }
        if self.replicas.is_empty() || self.replicas.len() > MAX_REPLICAS {
            return Err(format!(
                "{} replicas; a volume has 1 to {MAX_REPLICAS}",
                self.replicas.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for node in &self.replicas {
            check_name("node id", node).map_err(|e| e.to_string())?;
            if !seen.insert(node) {
                return Err(format!("node {node:?} holds two of its copies"));
            }
        }
        Ok(())
    }
}

impl VolumeState {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    /// The state under `key`, of a volume whose spec is `spec` (when known: a state read
    /// before its spec is checked again once the spec is there).
    pub fn decode(key: &str, spec: Option<&VolumeSpec>, bytes: &[u8]) -> Result<Self, SchemaError> {
        let state: Self = decode(key, bytes)?;
        state.check(spec).map_err(|why| inconsistent(key, why))?;
        Ok(state)
    }

    pub fn check(&self, spec: Option<&VolumeSpec>) -> Result<(), String> {
        check_name("primary", &self.primary).map_err(|e| e.to_string())?;
        if !self.in_sync.contains(&self.primary) {
            return Err(format!(
                "primary {:?} is not among the in-sync copies {:?}",
                self.primary, self.in_sync
            ));
        }
        let mut seen = BTreeSet::new();
        for node in &self.in_sync {
            if !seen.insert(node) {
                return Err(format!("node {node:?} is listed in sync twice"));
            }
        }
        if let Some(spec) = spec {
            if let Some(stranger) = self.in_sync.iter().find(|n| !spec.replicas.contains(n)) {
                return Err(format!(
                    "in-sync node {stranger:?} holds no copy (the copies are on {:?})",
                    spec.replicas
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix() -> Prefix {
        Prefix::new("lab").unwrap()
    }

    fn spec() -> VolumeSpec {
        VolumeSpec {
            v: 1,
            name: "vol0".into(),
            size: 1 << 20,
            block_size: 512,
            replicas: vec!["a".into(), "b".into(), "c".into()],
            incarnation: 7,
        }
    }

    #[test]
    fn keys_round_trip_through_parse() {
        let p = prefix();
        assert_eq!(p.parse(p.node("a").as_bytes()), Ok(Key::Node("a".into())));
        assert_eq!(
            p.parse(p.spec("vol0").as_bytes()),
            Ok(Key::Spec("vol0".into()))
        );
        assert_eq!(
            p.parse(p.state("vol0").as_bytes()),
            Ok(Key::State("vol0".into()))
        );
        assert!(p.node("a").starts_with(&p.nodes()));
        assert!(p.state("v").starts_with(&p.volumes()));
    }

    #[test]
    fn keys_fathom_does_not_write_are_refused_with_the_reason() {
        let p = prefix();
        for key in [
            "/fathom/lab/nodes/",
            "/fathom/lab/nodes/a/b",
            "/fathom/lab/volumes/v",
            "/fathom/lab/volumes/v/other",
            "/fathom/lab/stray",
        ] {
            let error = p.parse(key.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    error,
                    SchemaError::UnknownKey(_) | SchemaError::BadName { .. }
                ),
                "{key}: {error}"
            );
        }
        assert!(matches!(
            p.parse(b"/fathom/other/nodes/a"),
            Err(SchemaError::Foreign { .. })
        ));
        assert!(matches!(
            p.parse(b"/fathom/lab/nodes/a b"),
            Err(SchemaError::BadName { .. })
        ));
    }

    #[test]
    fn records_round_trip_and_check() {
        let key = prefix().state("vol0");
        let state = VolumeState {
            v: 1,
            epoch: 4,
            primary: "b".into(),
            in_sync: vec!["b".into(), "c".into()],
        };
        assert_eq!(
            VolumeState::decode(&key, Some(&spec()), &state.encode()),
            Ok(state)
        );
        let node = NodeRecord {
            v: 1,
            id: "a".into(),
            replication: "127.0.0.1:7601".into(),
            nbd: None,
            pid: 7,
            lease_ms: 2000,
        };
        assert_eq!(NodeRecord::decode("k", "a", &node.encode()), Ok(node));
        assert_eq!(
            VolumeSpec::decode("k", "vol0", &spec().encode()),
            Ok(spec())
        );
    }

    #[test]
    fn values_that_do_not_hold_together_are_refused_with_the_reason() {
        let key = "k";
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "not a record"),
            (b"{}", "no \"v\""),
            (br#"{"v":2,"epoch":1}"#, "layout version 2"),
            (
                br#"{"v":1,"epoch":1,"primary":"a","in_sync":["b"]}"#,
                "not among the in-sync",
            ),
            (
                br#"{"v":1,"epoch":1,"primary":"a","in_sync":["a","a"]}"#,
                "twice",
            ),
            (
                br#"{"v":1,"epoch":1,"primary":"a","in_sync":["a","z"]}"#,
                "holds no copy",
            ),
            (
                br#"{"v":1,"epoch":1,"primary":"a","in_sync":["a"],"extra":1}"#,
                "unknown field",
            ),
            (
                br#"{"v":1,"epoch":-1,"primary":"a","in_sync":["a"]}"#,
                "invalid",
            ),
        ];
        for (bytes, says) in cases {
            let error = VolumeState::decode(key, Some(&spec()), bytes).unwrap_err();
            assert!(
                error.to_string().contains(says),
                "{}: {error}",
                String::from_utf8_lossy(bytes)
            );
        }
        let mut bad = spec();
        bad.replicas = vec!["a".into(), "a".into()];
        assert!(VolumeSpec::decode(key, "vol0", &bad.encode())
            .unwrap_err()
            .to_string()
            .contains("two of its copies"));
        let mut bad = spec();
        bad.size = 1000;
        assert!(VolumeSpec::decode(key, "vol0", &bad.encode()).is_err());
        assert!(VolumeSpec::decode(key, "other", &spec().encode()).is_err());
        let node = br#"{"v":1,"id":"a","replication":"nowhere","pid":1,"lease_ms":2000}"#;
        assert!(NodeRecord::decode(key, "a", node)
            .unwrap_err()
            .to_string()
            .contains("ip:port"));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = VolumeState::decode("k", Some(&spec()), &bytes);
            let _ = VolumeSpec::decode("k", "vol0", &bytes);
            let _ = NodeRecord::decode("k", "a", &bytes);
        }

        #[test]
        fn any_key_parses_or_is_refused(key in "(/fathom/lab/)?[a-z/ .]{0,40}") {
            if let Ok(parsed) = prefix().parse(key.as_bytes()) {
                let back = match &parsed {
                    Key::Node(n) => prefix().node(n),
                    Key::Spec(v) => prefix().spec(v),
                    Key::State(v) => prefix().state(v),
                    Key::Deleted(v) => prefix().deleted(v),
                    Key::Status(n) => prefix().status(n),
                };
                prop_assert_eq!(back, key);
            }
        }
    }
}
