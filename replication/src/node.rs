//! Replication on one node. At start, each replicated volume this node holds a copy of is
//! read from its metadata area (the superblock: epoch, role, primary), formatted if it is
//! new, and served to primaries by the replica service. The node its superblock names as
//! the primary gets a [`ReplicationLayer`] that claims the next epoch on the others and
//! serves once a majority took it; the other copies forward their clients' IO to it
//! ([`ForwardLayer`]).
//!
//! `promote` makes a replica the primary when the primary is gone: it takes the next epoch
//! durably, claims it on every copy it reaches (a majority is needed), asks each what it
//! wrote last, region by region (Probe), copies to itself every region another survivor has
//! newer, and serves with the survivors' lagging regions marked for resync. A primary that
//! learns another node took over (a replica refused its epoch, or its own replica service
//! took a newer claim) is fenced and becomes a replica (a watcher thread swaps its layer).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fathom_engine::config::{Config, HEALTH_BYTES, MAX_REPLICAS};
use fathom_engine::engine::Engine;
use fathom_engine::layer::ControlError;
use fathom_engine::volume::{IoRequest, Volume};
use fathom_net::server::{self, Server, ServerError};
use fathom_net::transport::{self, TlsError};

use crate::auth::{AuthError, ClusterKey};
use crate::authority::{Claim, EpochAuthority};
use crate::client::{BlockingSession, ClientError, Opener};
use crate::dial::Identity;
use crate::forward::{ForwardLayer, ForwardSettings};
use crate::layer::{PeerAddress, PeerState, ReplicationLayer, Settings};
use crate::meta::{MetaError, Role, Superblock, BLOCK_BYTES};
use crate::proto::{probe_entries, refusal, status, Header, Kind, MAX_PAYLOAD_LIMIT_BYTES};
use crate::replica::PROBE_PAIRS_PER_REPLY;
use crate::role::VolumeRole;
use crate::service::{HeldTable, HeldVolume, ReplicaService, SLOTS};
use crate::session::PeerAuth;

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("replication.key_file: {0}")]
    Key(#[from] AuthError),
    #[error("replication TLS (replication.tls_ca, tls_cert, tls_key): {0}")]
    Tls(#[from] TlsError),
    #[error("volume {volume}: {what}")]
    Volume { volume: String, what: String },
    #[error("volume {volume}: its metadata: {source}")]
    Metadata {
        volume: String,
        #[source]
        source: MetaError,
    },
    #[error("volume {volume}: {source}")]
    Layer {
        volume: String,
        #[source]
        source: ControlError,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Why a promote was refused or failed. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("this node holds no copy of volume {0:?}")]
    Unknown(String),
    #[error("this node is the primary of volume {0:?} already")]
    AlreadyPrimary(String),
    #[error("this node's copy of volume {0:?} is not known to be in sync (its primary never said so, or it lacks regions): promoting it could lose acknowledged writes; promote an in-sync replica, or use --force to accept that")]
    NotInSync(String),
    #[error("only {reached} of {copies} copies of volume {volume:?} took epoch {epoch} (a majority is {majority}); the others: {failures}. The epoch stays taken here; promote again once a majority is reachable")]
    NoMajority {
        volume: String,
        epoch: u64,
        reached: usize,
        copies: usize,
        majority: usize,
        failures: String,
    },
    #[error("volume {volume:?}: the control plane did not grant the next epoch: {why}")]
    Refused { volume: String, why: String },
    #[error("volume {volume:?}: {what}")]
    Failed { volume: String, what: String },
}

/// Why a reparent was refused or failed; the volume stays with its primary (this node)
/// unless the error says otherwise. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReparentError {
    #[error("this node holds no copy of volume {0:?}")]
    Unknown(String),
    #[error("this node is not the primary of volume {volume:?} (node {primary:?} is, as far as this node knows): run reparent on the primary")]
    NotPrimary { volume: String, primary: String },
    #[error("node {to:?} holds no copy of volume {volume:?}; its copies are on {copies}")]
    NotACopy {
        volume: String,
        to: String,
        copies: String,
    },
    #[error("node {to:?} is not an in-sync replica of volume {volume:?} now (its session is {state}{sync}): wait for its resync to finish (`fathom-ctl replication`), or pick an in-sync replica")]
    NotInSync {
        volume: String,
        to: String,
        state: &'static str,
        sync: &'static str,
    },
    #[error("volume {volume:?}: {what}; IO goes on on this node")]
    CalledOff { volume: String, what: String },
    #[error("volume {volume:?}: node {to:?} accepted the volume but did not take it over within {seconds} s: it may still; check `fathom-ctl replication` on both nodes")]
    NotTaken {
        volume: String,
        to: String,
        seconds: u64,
    },
}

/// What a reparent did.
#[derive(Debug, Clone)]
pub struct Reparented {
    pub volume: String,
    pub from: String,
    pub to: String,
    /// The new primary's epoch.
    pub epoch: u64,
    /// The last write sequence of the old primary's epoch.
    pub sequence: u64,
    /// From the pause of new IO to this node serving as a replica (IO paused meanwhile goes
    /// to the new primary).
    pub paused: Duration,
}

/// How long a blocking session (a promote's claim, a reparent's handover) waits for a copy to
/// connect and answer.
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);
/// Once a majority answered a promote, how long the other copies still have.
const PROMOTE_GRACE: Duration = Duration::from_millis(200);

/// How long a reparent waits for the primary's writes in flight to be answered and for the
/// new primary to take the volume over, each.
const REPARENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a promote did.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub volume: String,
    pub epoch: u64,
    /// The copies that took the epoch (this node first).
    pub survivors: Vec<String>,
    /// Regions copied to this node from a survivor that had them newer, and their bytes.
    pub regions_copied: u64,
    pub bytes_copied: u64,
    /// Per other copy: regions it is behind in, to be resynchronised.
    pub behind: Vec<(String, u64)>,
}

/// One volume this node holds a copy of.
struct Held {
    volume: Volume,
    /// The name its sessions open (the volume's, and its incarnation if it has one).
    wire: String,
    /// The other nodes that hold copies, in the volume's replica order.
    peers: Vec<PeerAddress>,
    /// Each peer's place in the volume's replica list (its bitmap's place).
    slots: Vec<usize>,
    role: Arc<VolumeRole>,
    max_payload: u32,
    bitmap_blocks: u64,
}

struct Shared {
    engine: Engine,
    node: String,
    cluster: String,
    auth: PeerAuth,
    client_tls: Option<Arc<rustls::ClientConfig>>,
    region_shift: u32,
    resync_rate: u64,
    resync_p99: Option<Duration>,
    /// The cluster's nodes and their replica services (`[[cluster.node]]`).
    nodes: Vec<PeerAddress>,
    volumes: parking_lot::RwLock<Vec<Arc<Held>>>,
    /// What the replica service holds, by engine volume id.
    table: HeldTable,
    /// This node's replica service, for a promote's session to its own copy.
    own_address: Option<SocketAddr>,
    stop: AtomicBool,
    /// One role change at a time (a promote, the watcher's demotion, a volume added or
    /// removed).
    changes: Mutex<()>,
    /// Grants epochs when a control plane runs; `None`: this node takes them itself.
    authority: Option<Arc<dyn EpochAuthority>>,
}

/// Replication running on this node. Dropping it stops the replica service and the
/// watcher.
pub struct Replication {
    shared: Arc<Shared>,
    server: Option<Server<ReplicaService>>,
    watcher: Option<JoinHandle<()>>,
}

/// A copy of a replicated volume this node holds ([`Replication::add_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// The engine volume that holds it (data, then metadata).
    pub volume: String,
    /// The nodes that hold copies, this one among them, in the volume's replica order.
    pub replicas: Vec<String>,
    /// The primary of its first epoch.
    pub first_primary: String,
    /// Which volume of this name (the control plane's; 0 for a volume of the config files):
    /// its sessions carry it, so that a copy of an earlier volume of the same name never
    /// joins this one.
    pub incarnation: u64,
}

impl Replication {
    /// Starts replication for the replicated volumes of `config` this node holds; `None`
    /// when there are none and none can come (no `[cluster.pool]`). With an `authority` (a
    /// control plane), every copy starts as a replica and the control plane decides which
    /// becomes the primary ([`Replication::promote_for`]); without one, the node its
    /// superblock names as the primary claims the next epoch.
    pub fn start(
        engine: &Engine,
        config: &Config,
        authority: Option<Arc<dyn EpochAuthority>>,
    ) -> Result<Option<Self>, StartError> {
        let node = config.node.id.as_str();
        let mine: Vec<CopySpec> = config
            .volumes
            .iter()
            .filter(|volume| volume.replicas.iter().any(|replica| replica == node))
            .map(|volume| CopySpec {
                volume: volume.name.clone(),
                replicas: volume.replicas.clone(),
                first_primary: volume
                    .primary
                    .clone()
                    .unwrap_or_else(|| volume.replicas[0].clone()),
                incarnation: 0,
            })
            .collect();
        if mine.is_empty() && config.cluster.pool.is_none() {
            return Ok(None);
        }
        let replication = &config.replication;
        let auth = match &replication.key_file {
            Some(path) => PeerAuth::Key(ClusterKey::load(path)?),
            None => PeerAuth::Tls,
        };
        let (server_tls, client_tls) = match (
            &replication.tls_ca,
            &replication.tls_cert,
            &replication.tls_key,
        ) {
            (Some(ca), Some(cert), Some(key)) => (
                Some(transport::server_config_mutual(cert, key, ca)?),
                Some(transport::client_config(ca, Some((cert, key)))?),
            ),
            _ => (None, None),
        };
        // Frames carry at most the largest transfer of any device (any volume's).
        let max_payload = engine
            .devices()
            .map(|device| max_payload(device.max_transfer_bytes))
            .max()
            .unwrap_or(BLOCK_BYTES as u32);
        let table: HeldTable =
            Arc::new(parking_lot::RwLock::new(vec![None; engine.volume_slots()]));
        let listeners =
            server::listen::<ReplicaService>(&replication.listen, "replication.listen")?;
        let service = ReplicaService::new(
            node,
            &config.cluster.name,
            auth.clone(),
            server_tls,
            max_payload,
            table.clone(),
        );
        let limits = server::Limits {
            max_connections: 64,
            max_buffer: max_payload.next_power_of_two().max(BLOCK_BYTES as u32),
            keep_buffers: SLOTS * max_payload as usize,
        };
        let server = Server::start(engine, listeners, service, limits)?;
        for address in server.addresses() {
            tracing::info!("replication: replica service on {address}");
        }
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            node: node.into(),
            cluster: config.cluster.name.clone(),
            auth,
            client_tls,
            region_shift: replication.region_size.0.trailing_zeros(),
            resync_rate: replication.resync_rate.0,
            resync_p99: replication.resync_p99.map(|bound| bound.0),
            nodes: config
                .cluster
                .nodes
                .iter()
                .map(|entry| PeerAddress {
                    node: entry.id.clone(),
                    address: entry
                        .replication
                        .parse()
                        .expect("validated: replication addresses parse"),
                })
                .collect(),
            own_address: server.addresses().first().copied(),
            volumes: parking_lot::RwLock::new(Vec::new()),
            table,
            stop: AtomicBool::new(false),
            changes: Mutex::new(()),
            authority,
        });
        for copy in &mine {
            shared.add(copy)?;
        }
        let watcher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("replication-roles".into())
                .spawn(move || shared.watch())
                .map_err(|error| StartError::Volume {
                    volume: String::new(),
                    what: format!("cannot start the role watcher: {error}"),
                })?
        };
        Ok(Some(Self {
            shared,
            server: Some(server),
            watcher: Some(watcher),
        }))
    }

    /// Starts serving a copy of a volume made while the node runs (its engine volume exists,
    /// its metadata area is new or holds this volume's): as a replica with a control plane,
    /// else as its superblock says. Refused for a volume held already, or a replica list
    /// that does not name this node or names nodes not in the cluster.
    pub fn add_volume(&self, copy: &CopySpec) -> Result<(), StartError> {
        self.shared.add(copy)
    }

    /// Stops serving `volume`'s copy here: its sessions close and its layer is taken out
    /// (the engine volume stays, for the caller to remove). False when not held here.
    pub fn remove_volume(&self, volume: &str) -> bool {
        self.shared.remove(volume)
    }

    /// Each replicated volume this node holds, live.
    pub fn roles(&self) -> Vec<Arc<VolumeRole>> {
        self.shared
            .all()
            .iter()
            .map(|held| held.role.clone())
            .collect()
    }

    /// Makes this node the primary of `volume` (see the module documentation): the
    /// operator's promote, of a dead primary's volume, or `force`d.
    pub fn promote(&self, volume: &str, force: bool) -> Result<Promoted, PromoteError> {
        let why = match force {
            true => Claim::Forced,
            false => Claim::Failover,
        };
        self.shared.promote(volume, why)
    }

    /// Makes this node the primary of `volume` for `why` (the control plane's agent).
    pub fn promote_for(&self, volume: &str, why: Claim) -> Result<Promoted, PromoteError> {
        self.shared.promote(volume, why)
    }

    /// The control plane says another node is the primary of `volume` at `epoch`: if this
    /// node serves it, it stops and becomes a replica (its layer is fenced; the watcher
    /// swaps it). The epoch known here is not raised: the new primary's claim of it must
    /// still be taken by this copy's replica service.
    pub fn step_down(&self, volume: &str, epoch: u64) {
        if let Some(held) = self.shared.held(volume) {
            if held.role.primary_here() {
                tracing::warn!(
                    volume,
                    epoch,
                    "replication: the control plane names another primary: this node steps down"
                );
                held.role.set_primary_here(false);
            }
        }
    }

    /// Hands `volume`, whose primary this node is, over to replica `to` (see the module
    /// documentation).
    pub fn reparent(&self, volume: &str, to: &str) -> Result<Reparented, ReparentError> {
        self.shared.reparent(volume, to)
    }

    /// Stops the replica service: its sessions close once their IO in flight is back. True
    /// when they did within `timeout`.
    pub fn stop(&self, timeout: Duration) -> bool {
        self.shared.stop.store(true, Ordering::Release);
        self.server
            .as_ref()
            .is_none_or(|server| server.stop(timeout))
    }

    /// The addresses the replica service listens on.
    pub fn addresses(&self) -> &[SocketAddr] {
        self.server
            .as_ref()
            .map_or(&[], |server| server.addresses())
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

/// The largest write payload a frame carries for a volume whose device moves at most
/// `transfer` bytes per command.
fn max_payload(transfer: usize) -> u32 {
    transfer.min(MAX_PAYLOAD_LIMIT_BYTES as usize - BLOCK_BYTES) as u32
}

impl Shared {
    /// The copy of `name` held here.
    fn held(&self, name: &str) -> Option<Arc<Held>> {
        self.volumes
            .read()
            .iter()
            .find(|held| held.volume.name == name)
            .cloned()
    }

    /// Every copy held here.
    fn all(&self) -> Vec<Arc<Held>> {
        self.volumes.read().clone()
    }

    /// Holds `copy`: reads (or formats) its superblock, lets the replica service serve it,
    /// and installs its layer.
    fn add(&self, copy: &CopySpec) -> Result<(), StartError> {
        let name = copy.volume.as_str();
        let volume_error = |what: String| StartError::Volume {
            volume: name.into(),
            what,
        };
        let _changing = self
            .changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.held(name).is_some() {
            return Err(volume_error("this node holds a copy already".into()));
        }
        if !copy.replicas.contains(&self.node) {
            return Err(volume_error(format!(
                "its replicas {:?} do not name this node ({})",
                copy.replicas, self.node
            )));
        }
        let volume = self
            .engine
            .volume(name)
            .ok_or_else(|| volume_error("not among the engine's volumes".into()))?;
        let payload = max_payload(volume.max_transfer_bytes);
        let (superblock, at) = read_superblock(&self.engine, &volume, |uuid| Superblock {
            generation: 0,
            uuid,
            volume: name.into(),
            epoch: 0,
            role: Role::None,
            region_shift: self.region_shift as u8,
            applied: 0,
            durable: 0,
            primary: copy.first_primary.clone(),
            in_sync: copy.replicas.clone(),
        })?;
        if superblock.volume != name {
            return Err(volume_error(format!(
                "its metadata belongs to volume {:?}: the device range holds another volume's copy",
                superblock.volume
            )));
        }
        let mut peers = Vec::new();
        let mut slots = Vec::new();
        for (slot, replica) in copy.replicas.iter().enumerate() {
            if *replica == self.node {
                continue;
            }
            let peer = self
                .nodes
                .iter()
                .find(|entry| entry.node == *replica)
                .ok_or_else(|| {
                    volume_error(format!(
                        "replica {replica:?} is not a node of the cluster ([[cluster.node]])"
                    ))
                })?;
            peers.push(peer.clone());
            slots.push(slot);
        }
        // Each replica's dirty bitmap lies in the metadata area at its place in the
        // volume's replica list, whoever is primary.
        let bitmap_blocks = (volume.meta_blocks * volume.block_size as u64)
            .saturating_sub(2 * BLOCK_BYTES as u64 + HEALTH_BYTES)
            / (BLOCK_BYTES as u64 * MAX_REPLICAS as u64);
        let primary_here = superblock.primary == self.node;
        let held = Arc::new(Held {
            wire: match copy.incarnation {
                0 => name.to_string(),
                incarnation => format!("{name}~{incarnation:016x}"),
            },
            peers,
            slots,
            role: Arc::new(VolumeRole::new(name, superblock.clone(), at, primary_here)),
            max_payload: payload,
            bitmap_blocks,
            volume,
        });
        let id = held.volume.id.0 as usize;
        {
            let mut table = self.table.write();
            if id >= table.len() {
                table.resize(id + 1, None);
            }
            table[id] = Some(Arc::new(HeldVolume {
                name: held.wire.clone(),
                id: held.volume.id,
                reactor: held.volume.reactor,
                block_size: held.volume.block_size,
                blocks: held.volume.blocks,
                region_shift: self.region_shift,
                role: held.role.clone(),
            }));
        }
        self.volumes.write().push(held.clone());
        if self.authority.is_some() {
            // The control plane names the primary: until then, a replica; and no primary
            // acknowledges IO without the control plane's lease.
            held.role.set_primary_here(false);
            held.role.set_lease_until(None);
        }
        let result = if held.role.primary_here() {
            // It claims the next epoch on the others, and serves once a majority took it:
            // whatever an earlier run of it still had in flight is then refused.
            self.install_primary(&held, superblock.epoch + 1, false, Vec::new(), 0, true)
        } else {
            self.install_replica(&held)
        };
        if let Err(error) = result {
            self.forget(name);
            return Err(volume_error(error));
        }
        tracing::info!(
            volume = %name,
            epoch = superblock.epoch,
            primary = %superblock.primary,
            "replication: this node is {}",
            if held.role.primary_here() { "its primary" } else { "a replica" }
        );
        Ok(())
    }

    /// Lets go of `name`'s copy: its sessions close, its IO fails from here on.
    fn remove(&self, name: &str) -> bool {
        let _changing = self
            .changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(held) = self.forget(name) else {
            return false;
        };
        // Its layer stays until the engine takes the volume out: it is not deposed (no
        // demotion, no "lease ran out"), only no longer this node's.
        held.role.set_removed();
        held.role.set_primary_status(None);
        tracing::info!(volume = %name, "replication: this node no longer holds a copy");
        true
    }

    /// Takes `name` out of the lists; its copy, if there was one.
    fn forget(&self, name: &str) -> Option<Arc<Held>> {
        let held = {
            let mut volumes = self.volumes.write();
            let at = volumes.iter().position(|held| held.volume.name == name)?;
            volumes.remove(at)
        };
        if let Some(entry) = self.table.write().get_mut(held.volume.id.0 as usize) {
            *entry = None;
        }
        Some(held)
    }

    /// Makes this node `held`'s primary at `epoch`: its replication layer in the volume's
    /// stack. `serving`: the epoch is durable on a majority already (a promote).
    fn install_primary(
        &self,
        held: &Held,
        epoch: u64,
        serving: bool,
        stale: Vec<Vec<u64>>,
        sequence: u64,
        load_bitmaps: bool,
    ) -> Result<(), String> {
        let volume = &held.volume;
        let mut bitmap_lbas = Vec::new();
        let mut bitmaps = Vec::new();
        for &slot in &held.slots {
            let first = 2 + slot as u64 * held.bitmap_blocks;
            bitmap_lbas.push(
                volume.first_lba
                    + volume.blocks
                    + first * BLOCK_BYTES as u64 / volume.block_size as u64,
            );
            let blocks = match load_bitmaps {
                true => (0..held.bitmap_blocks)
                    .map(|block| {
                        read_metadata(&self.engine, volume, (first + block) * BLOCK_BYTES as u64)
                            .map_err(|error| error.to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                false => Vec::new(),
            };
            bitmaps.push(blocks);
        }
        let superblock = held.role.superblock();
        let layer = ReplicationLayer::new(Settings {
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            auth: self.auth.clone(),
            tls: self.client_tls.clone(),
            volume: held.wire.clone(),
            epoch,
            first_lba: volume.first_lba,
            blocks: volume.blocks,
            block_size: volume.block_size,
            region_shift: self.region_shift,
            sequence: sequence.max(superblock.applied),
            peers: held.peers.clone(),
            max_payload: held.max_payload,
            slots: self.engine.slots_per_reactor(),
            pool: self.engine.dma().clone(),
            resync_rate: self.resync_rate,
            resync_p99: self.resync_p99,
            bitmap_lbas,
            bitmaps,
            fresh: superblock.epoch == 0,
            role: held.role.clone(),
            serving,
            meta_lba: volume.first_lba + volume.blocks,
            stale,
            replicate_stages: held
                .peers
                .iter()
                .map(|peer| self.engine.stage(&format!("replicate:{}", peer.node)))
                .collect(),
        })
        .map_err(|error| format!("cannot set up its replication: {error}"))?;
        held.role.set_primary_status(Some(layer.status()));
        held.role.set_primary_here(true);
        self.engine
            .add_layer(volume, Box::new(layer))
            .map_err(|error| error.to_string())
    }

    /// Makes this node a replica of `held`: its clients' IO is forwarded to the primary.
    fn install_replica(&self, held: &Held) -> Result<(), String> {
        held.role.set_primary_here(false);
        held.role.set_primary_status(None);
        let forwarder = ForwardLayer::new(ForwardSettings {
            identity: Identity {
                node: self.node.clone(),
                cluster: self.cluster.clone(),
                auth: self.auth.clone(),
                tls: self.client_tls.clone(),
                max_payload: held.max_payload,
            },
            volume: held.wire.clone(),
            role: held.role.clone(),
            nodes: held.peers.clone(),
            first_lba: held.volume.first_lba,
            slots: self.engine.slots_per_reactor(),
        })
        .map_err(|error| format!("cannot set up forwarding: {error}"))?;
        self.engine
            .add_layer(&held.volume, Box::new(forwarder))
            .map_err(|error| error.to_string())
    }

    /// Until stopped: a primary that is fenced (another node took the volume over) becomes
    /// a replica.
    fn watch(self: &Arc<Self>) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            for held in &self.all() {
                if let Some(epoch) = held.role.take_handover() {
                    self.take_over(held, epoch);
                }
                let deposed = held
                    .role
                    .primary_status()
                    .is_some_and(|status| status.fenced() || !held.role.primary_here());
                if !deposed {
                    continue;
                }
                let _changing = self
                    .changes
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // Removed meanwhile: nothing of it is to be installed.
                let listed = self
                    .held(&held.volume.name)
                    .is_some_and(|now| Arc::ptr_eq(&now, held));
                if !listed {
                    continue;
                }
                tracing::warn!(
                    volume = %held.volume.name,
                    epoch = held.role.epoch(),
                    "replication: another node is the primary now; this node serves as a replica"
                );
                if let Err(error) = self.install_replica(held) {
                    tracing::error!(volume = %held.volume.name, "replication: cannot become a replica: {error}");
                }
            }
        }
    }

    /// The primary handed `held` over to this node at `epoch` (it drained): promote, on a
    /// thread of its own so that the watcher goes on.
    fn take_over(self: &Arc<Self>, held: &Held, epoch: u64) {
        if held.role.epoch() != epoch || held.role.primary_here() {
            return;
        }
        let shared = self.clone();
        let name = held.volume.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("take-over-{name}"))
            .spawn(move || match shared.promote(&name, Claim::Handover) {
                Ok(promoted) => tracing::warn!(
                    volume = %name,
                    epoch = promoted.epoch,
                    "replication: took the volume over from its primary (reparent)"
                ),
                Err(error) => tracing::error!(
                    volume = %name,
                    "replication: the primary handed the volume over, and taking it failed: {error}"
                ),
            });
        if let Err(error) = spawned {
            tracing::error!(volume = %held.volume.name, "replication: cannot start taking the volume over: {error}");
        }
    }

    fn reparent(&self, name: &str, to: &str) -> Result<Reparented, ReparentError> {
        let held = self
            .held(name)
            .ok_or_else(|| ReparentError::Unknown(name.into()))?;
        let not_primary = || ReparentError::NotPrimary {
            volume: name.into(),
            primary: held.role.superblock().primary,
        };
        let (status, index) = {
            // Checked under the role lock: no promote or demotion crosses the start.
            let _changing = self
                .changes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let status = held.role.primary_status().ok_or_else(not_primary)?;
            if !held.role.primary_here() || status.fenced() || !status.serving() {
                return Err(not_primary());
            }
            let Some(index) = held.peers.iter().position(|peer| peer.node == to) else {
                return Err(ReparentError::NotACopy {
                    volume: name.into(),
                    to: to.into(),
                    copies: std::iter::once(self.node.as_str())
                        .chain(held.peers.iter().map(|peer| peer.node.as_str()))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let peer = &status.peers[index];
            if peer.state() != PeerState::Open || !peer.in_sync() {
                return Err(ReparentError::NotInSync {
                    volume: name.into(),
                    to: to.into(),
                    state: peer.state().as_str(),
                    sync: if peer.in_sync() { "" } else { ", not in sync" },
                });
            }
            held.role.set_handing_over_to(Some(to.to_string()));
            status.set_draining(true);
            (status, index)
        };
        let started = Instant::now();
        tracing::warn!(
            volume = name,
            to,
            "replication: reparent: new IO paused, draining"
        );
        let call_off = |what: String| {
            status.set_draining(false);
            held.role.set_handing_over_to(None);
            tracing::warn!(
                volume = name,
                to,
                "replication: reparent called off: {what}"
            );
            ReparentError::CalledOff {
                volume: name.into(),
                what,
            }
        };
        // Every write begun is answered (a majority has it) ...
        let deadline = started + REPARENT_TIMEOUT;
        while status.in_flight() > 0 {
            if status.fenced() {
                return Err(call_off(
                    "another node took the volume over meanwhile".into(),
                ));
            }
            if Instant::now() >= deadline {
                let seconds = REPARENT_TIMEOUT.as_secs();
                return Err(call_off(match status.in_flight() {
                    u64::MAX => format!(
                        "the volume's reactor did not report its writes in flight within {seconds} s"
                    ),
                    writes => format!("{writes} writes still in flight after {seconds} s"),
                }));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // ... and the new primary holds every one: it says so in its answer to the Handover
        // (it may still be applying the last ones: asked again until the deadline).
        let epoch = status.epoch();
        let sequence = status.sequence();
        let opener = self.opener(held.max_payload);
        let mut session = BlockingSession::open(&opener, to, held.peers[index].address, &held.wire)
            .map_err(|error| call_off(error.to_string()))?;
        loop {
            let (answer, text) = session
                .request(
                    Header {
                        epoch,
                        sequence,
                        ..Header::new(Kind::Handover)
                    },
                    &[],
                )
                .map_err(|error| call_off(error.to_string()))?;
            if answer.kind == Kind::Ack && answer.status == status::OK {
                break;
            }
            let reason = String::from_utf8_lossy(&text).into_owned();
            if answer.kind != Kind::Refused
                || answer.status != refusal::NOT_READY
                || Instant::now() >= deadline
            {
                return Err(call_off(format!("node {to} refused the volume: {reason}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(session);
        // The new primary claims the next epoch on a majority, this copy among them; this
        // node's watcher then makes it a replica, and what was paused goes to the new primary.
        let deadline = Instant::now() + REPARENT_TIMEOUT;
        loop {
            let superblock = held.role.superblock();
            if superblock.epoch > epoch
                && superblock.primary == to
                && !held.role.primary_here()
                && held.role.primary_status().is_none()
            {
                held.role.set_handing_over_to(None);
                let paused = started.elapsed();
                tracing::warn!(
                    volume = name,
                    to,
                    epoch = superblock.epoch,
                    paused_ms = paused.as_millis() as u64,
                    "replication: reparent done: this node is a replica now"
                );
                return Ok(Reparented {
                    volume: name.into(),
                    from: self.node.clone(),
                    to: to.into(),
                    epoch: superblock.epoch,
                    sequence,
                    paused,
                });
            }
            if Instant::now() >= deadline {
                return Err(ReparentError::NotTaken {
                    volume: name.into(),
                    to: to.into(),
                    seconds: REPARENT_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn opener(&self, max_payload: u32) -> Opener<'_> {
        Opener {
            node: &self.node,
            cluster: &self.cluster,
            auth: &self.auth,
            tls: self.client_tls.clone(),
            max_payload,
            timeout: SESSION_TIMEOUT,
        }
    }

    fn promote(&self, name: &str, why: Claim) -> Result<Promoted, PromoteError> {
        let _changing = self
            .changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let held = self
            .held(name)
            .ok_or_else(|| PromoteError::Unknown(name.into()))?;
        let failed = |what: String| PromoteError::Failed {
            volume: name.into(),
            what,
        };
        if held.role.primary_here() {
            return Err(PromoteError::AlreadyPrimary(name.into()));
        }
        // With a control plane, its in-sync set is what counts, checked by the authority.
        if self.authority.is_none() && why != Claim::Forced && !held.role.in_sync() {
            return Err(PromoteError::NotInSync(name.into()));
        }
        // The next epoch (granted by the control plane first, if one runs), durable here
        // before anyone is asked: from now on this node's own replica service refuses the
        // old primary's frames.
        let (epoch, in_sync) = match &self.authority {
            Some(authority) => {
                let grant = authority
                    .claim(name, held.role.epoch(), why)
                    .map_err(|why| PromoteError::Refused {
                        volume: name.into(),
                        why,
                    })?;
                (grant.epoch, Some(grant.in_sync))
            }
            None => (held.role.epoch() + 1, None),
        };
        held.role.raise_epoch(epoch);
        let node = self.node.clone();
        let (superblock, copy) = held.role.next_superblock(|superblock| {
            superblock.epoch = epoch;
            superblock.role = Role::Primary;
            superblock.primary = node;
        });
        write_superblock(&self.engine, &held.volume, &superblock, copy)
            .map_err(|error| failed(error.to_string()))?;
        tracing::warn!(
            volume = name,
            epoch,
            why = why.as_str(),
            "replication: promoting this node to primary"
        );

        // Claim it on every copy reachable (this one through its own service), and ask each
        // which regions it wrote last.
        let own = self
            .own_address
            .ok_or_else(|| failed("this node's replica service is not running".into()))?;
        let mut survivors: Vec<Survivor> = Vec::new();
        let mut failures = Vec::new();
        let targets: Vec<_> = std::iter::once((None, self.node.clone(), own))
            .chain(
                held.peers
                    .iter()
                    .enumerate()
                    .map(|(index, peer)| (Some(index), peer.node.clone(), peer.address)),
            )
            .collect();
        let regions =
            (held.volume.blocks * held.volume.block_size as u64).div_ceil(1 << self.region_shift);
        // Every copy at once, each on a thread of its own. Once a majority (this copy among
        // them) took the epoch, the others get a short grace and are left behind: a copy that
        // accepts and does not answer (stopped, cut off) does not hold the promote for its
        // whole timeout. A majority holds every acknowledged write.
        let copies = 1 + held.peers.len();
        let majority = copies / 2 + 1;
        let (tx, rx) = crossbeam_channel::bounded(targets.len());
        for (at, (index, peer, address)) in targets.iter().enumerate() {
            let (index, peer, address, tx) = (*index, peer.clone(), *address, tx.clone());
            let (node, cluster, auth, tls) = (
                self.node.clone(),
                self.cluster.clone(),
                self.auth.clone(),
                self.client_tls.clone(),
            );
            let (max_payload, volume) = (held.max_payload, held.wire.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("promote-{peer}"))
                .spawn(move || {
                    let opener = Opener {
                        node: &node,
                        cluster: &cluster,
                        auth: &auth,
                        tls,
                        max_payload,
                        timeout: SESSION_TIMEOUT,
                    };
                    let reached =
                        Survivor::reach(&opener, index, &peer, address, &volume, epoch, regions);
                    let _ = tx.send((at, reached));
                });
            if let Err(error) = spawned {
                return Err(failed(format!("cannot ask the copies: {error}")));
            }
        }
        drop(tx);
        let started = Instant::now();
        let mut majority_at: Option<Instant> = None;
        let mut answered = 0;
        let mut heard = vec![false; targets.len()];
        while answered < targets.len() {
            let limit = match majority_at {
                Some(at) => at + PROMOTE_GRACE,
                None => started + SESSION_TIMEOUT + Duration::from_secs(1),
            };
            let Ok((at, reached)) = rx.recv_deadline(limit) else {
                break;
            };
            answered += 1;
            heard[at] = true;
            let index = targets[at].0;
            match reached {
                Ok(survivor) => survivors.push(survivor),
                Err(error) => {
                    if index.is_none() {
                        return Err(failed(format!("its own copy: {error}")));
                    }
                    tracing::warn!(volume = name, "replication: promote: {error}");
                    failures.push(error.to_string());
                }
            }
            let own = survivors.iter().any(|survivor| survivor.index.is_none());
            if majority_at.is_none() && own && survivors.len() >= majority {
                majority_at = Some(Instant::now());
            }
        }
        for ((_, peer, _), heard) in targets.iter().zip(&heard) {
            if !heard {
                tracing::warn!(volume = name, node = %peer, "replication: promote: no answer within the grace after a majority; going on without it (it is caught up later)");
                failures.push(format!("node {peer}: no answer yet"));
            }
        }
        // This copy first, as the reconciliation below expects.
        survivors.sort_by_key(|survivor| survivor.index.is_some());
        if survivors.len() < majority {
            return Err(PromoteError::NoMajority {
                volume: name.into(),
                epoch,
                reached: survivors.len(),
                copies,
                majority,
                failures: failures.join("; "),
            });
        }

        // Bring this copy up to the newest survivor, region by region.
        let mut newest: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
        for (at, survivor) in survivors.iter().enumerate() {
            for (&region, &sequence) in &survivor.regions {
                let entry = newest.entry(region).or_insert((0, 0));
                if sequence > entry.0 {
                    *entry = (sequence, at);
                }
            }
        }
        let (mut regions_copied, mut bytes_copied) = (0, 0);
        for (&region, &(sequence, source)) in &newest {
            let own_sequence = survivors[0].regions.get(&region).copied().unwrap_or(0);
            if source == 0 || own_sequence >= sequence {
                continue;
            }
            bytes_copied += self
                .copy_region(&held, &mut survivors, source, region)
                .map_err(failed)?;
            regions_copied += 1;
        }
        // Every other copy is behind where it has a region older than the newest; a copy
        // that was not reached is behind in every region anyone wrote lately.
        let written: BTreeSet<u64> = newest.keys().copied().collect();
        let mut stale = vec![Vec::new(); held.peers.len()];
        let mut behind = Vec::new();
        for (index, peer) in held.peers.iter().enumerate() {
            let out_of_sync = in_sync
                .as_ref()
                .is_some_and(|in_sync| !in_sync.contains(&peer.node));
            let found = survivors.iter().find(|s| s.index == Some(index));
            let regions: Vec<u64> = match found {
                // Out of the authority's in-sync set: what it lacks may predate anything a
                // survivor remembers. Rebuilt in full.
                _ if out_of_sync => (0..regions).collect(),
                Some(survivor) => newest
                    .iter()
                    .filter(|(region, (sequence, _))| {
                        survivor.regions.get(region).copied().unwrap_or(0) < *sequence
                    })
                    .map(|(&region, _)| region)
                    .collect(),
                None => written.iter().copied().collect(),
            };
            behind.push((peer.node.clone(), regions.len() as u64));
            stale[index] = regions;
        }
        let sequence = survivors.iter().map(|s| s.taken).max().unwrap_or(0);
        let names = survivors.iter().map(|s| s.node.clone()).collect();
        drop(survivors);
        self.install_primary(&held, epoch, true, stale, sequence, false)
            .map_err(failed)?;
        tracing::warn!(
            volume = name,
            epoch,
            regions_copied,
            "replication: this node is the primary now"
        );
        Ok(Promoted {
            volume: name.into(),
            epoch,
            survivors: names,
            regions_copied,
            bytes_copied,
            behind,
        })
    }

    /// Copies region `region` from survivor `source` to this node's copy; its bytes.
    fn copy_region(
        &self,
        held: &Held,
        survivors: &mut [Survivor],
        source: usize,
        region: u64,
    ) -> Result<u64, String> {
        let volume = &held.volume;
        let block = volume.block_size as u64;
        let per_region = (1u64 << self.region_shift) / block;
        let first = region * per_region;
        let end = (first + per_region).min(volume.blocks);
        let chunk = (held.max_payload as u64 / block).max(1);
        let mut lba = first;
        let mut copied = 0;
        while lba < end {
            let blocks = (end - lba).min(chunk) as u32;
            let (header, data) = survivors[source]
                .session
                .request(
                    Header {
                        epoch: survivors[source].epoch,
                        lba,
                        block_count: blocks,
                        ..Header::new(Kind::Read)
                    },
                    &[],
                )
                .map_err(|error| error.to_string())?;
            if header.kind != Kind::ReadReply || header.status != status::OK {
                return Err(format!(
                    "reading region {region} from node {}: {} status {}",
                    survivors[source].node,
                    header.kind.name(),
                    header.status
                ));
            }
            let mut buf = self
                .engine
                .dma()
                .alloc(data.len())
                .map_err(|error| format!("no DMA memory to copy a region: {error}"))?;
            buf.as_bytes_mut().copy_from_slice(&data);
            self.engine
                .io(IoRequest::write(volume.id, lba * block, buf, 0))
                .result
                .map_err(|error| format!("writing region {region} here: {error}"))?;
            copied += data.len() as u64;
            lba += blocks as u64;
        }
        Ok(copied)
    }
}

/// A copy that took a promote's epoch: its session, and what it wrote last.
struct Survivor {
    /// Its place among the volume's peers; `None` for this node.
    index: Option<usize>,
    node: String,
    session: BlockingSession,
    epoch: u64,
    /// The highest write sequence it took.
    taken: u64,
    /// Region -> the highest sequence it applied there lately.
    regions: BTreeMap<u64, u64>,
}

impl Survivor {
    fn reach(
        opener: &Opener<'_>,
        index: Option<usize>,
        node: &str,
        address: SocketAddr,
        volume: &str,
        epoch: u64,
        regions: u64,
    ) -> Result<Survivor, ClientError> {
        let mut session = BlockingSession::open(opener, node, address, volume)?;
        let fail = |what: String| ClientError {
            node: node.into(),
            address,
            what,
        };
        let (answer, text) = session.request(
            Header {
                epoch,
                status: status::OUT_OF_SYNC,
                ..Header::new(Kind::Epoch)
            },
            &[],
        )?;
        if answer.kind != Kind::EpochOk {
            return Err(fail(format!(
                "refused epoch {epoch}: {}",
                String::from_utf8_lossy(&text)
            )));
        }
        let mut survivor = Survivor {
            index,
            node: node.into(),
            session,
            epoch,
            taken: answer.sequence,
            regions: BTreeMap::new(),
        };
        let mut first = 0;
        while first < regions {
            let count = (regions - first).min(PROBE_PAIRS_PER_REPLY as u64) as u32;
            let (answer, pairs) = survivor.session.request(
                Header {
                    epoch,
                    lba: first,
                    block_count: count,
                    ..Header::new(Kind::Probe)
                },
                &[],
            )?;
            if answer.kind != Kind::ProbeReply || answer.status != status::OK {
                return Err(fail(format!(
                    "probe refused: {}",
                    String::from_utf8_lossy(&pairs)
                )));
            }
            for entry in probe_entries(&pairs) {
                survivor.regions.insert(entry.region, entry.sequence);
            }
            first += (answer.block_count as u64).max(1);
        }
        Ok(survivor)
    }
}

/// One 4 KiB block of the volume's metadata area, at byte `offset` in it.
fn read_metadata(engine: &Engine, volume: &Volume, offset: u64) -> Result<Vec<u8>, StartError> {
    let buf = engine
        .dma()
        .alloc(BLOCK_BYTES)
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("no DMA memory to read its metadata: {error}"),
        })?;
    let completion = engine.metadata_io(IoRequest::read(volume.id, offset, buf, 0));
    completion.result.map_err(|error| StartError::Volume {
        volume: volume.name.clone(),
        what: format!("reading its metadata at byte {offset}: {error}"),
    })?;
    Ok(completion.buf.expect("a read returns its buffer").to_vec())
}

fn read_superblock(
    engine: &Engine,
    volume: &Volume,
    fresh: impl FnOnce([u8; 16]) -> Superblock,
) -> Result<(Superblock, usize), StartError> {
    let (first, second) = (
        read_metadata(engine, volume, 0)?,
        read_metadata(engine, volume, BLOCK_BYTES as u64)?,
    );
    match Superblock::newest(&first, &second) {
        Ok(found) => Ok(found),
        Err(MetaError::NoValidCopy {
            first: a,
            second: b,
        }) if matches!(*a, MetaError::NoSuperblock { .. })
            && matches!(*b, MetaError::NoSuperblock { .. }) =>
        {
            let mut uuid = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uuid).map_err(
                |_| StartError::Volume {
                    volume: volume.name.clone(),
                    what: "no randomness for its uuid".into(),
                },
            )?;
            let superblock = fresh(uuid);
            tracing::info!(volume = %volume.name, "replication: a new copy; formatting its metadata");
            write_superblock(engine, volume, &superblock, 0)?;
            Ok((superblock, 0))
        }
        Err(source) => Err(StartError::Metadata {
            volume: volume.name.clone(),
            source,
        }),
    }
}

/// Writes `superblock` into copy `copy` of the volume's metadata area, with FUA.
fn write_superblock(
    engine: &Engine,
    volume: &Volume,
    superblock: &Superblock,
    copy: usize,
) -> Result<(), StartError> {
    let block = superblock.encode().map_err(|source| StartError::Metadata {
        volume: volume.name.clone(),
        source,
    })?;
    let mut buf = engine
        .dma()
        .alloc(BLOCK_BYTES)
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("no DMA memory to write its superblock: {error}"),
        })?;
    buf.as_bytes_mut().copy_from_slice(&block);
    let request = IoRequest {
        fua: true,
        ..IoRequest::write(volume.id, (copy * BLOCK_BYTES) as u64, buf, 0)
    };
    engine
        .metadata_io(request)
        .result
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("writing its superblock: {error}"),
        })
}
