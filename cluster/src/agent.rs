//! The control plane on one node: a thread that keeps the node registered in etcd under a
//! lease, follows the cluster's keys with a watch, and acts on them for the volumes this node
//! holds; and the [`EtcdAuthority`] through which replication takes epochs.
//!
//! - **Lease** (a thread of its own, so that nothing the agent does delays it). Kept alive
//!   every quarter of its TTL. The node may acknowledge IO as a primary until the send time
//!   of its last answered keep-alive plus the TTL, less a margin: etcd counts the lease from
//!   when it received that keep-alive, later, so the node stops first. A lease etcd no longer
//!   has is granted again and the node's key put anew.
//! - **Volumes** (the agent's thread, every 100 ms or at once when the watch sees a change).
//!   For each replicated volume of this node:
//!   - no state in etcd: it is seeded (create-only) from this node's copy and the config;
//!   - etcd names this node the primary and it does not serve: it takes the next epoch
//!     (`Claim::Restart`) and serves once a majority of copies took it;
//!   - etcd names another node whose key is gone (its lease expired) and this node is in the
//!     in-sync set: it takes the next epoch (`Claim::Failover`), brings itself up to date
//!     from the survivors and serves. Several candidates may try; the compare-and-swap lets
//!     one through;
//!   - etcd names another node while this one serves: it steps down;
//!   - this node serves: the in-sync set in etcd follows its replicas' sync.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fathom_replication::authority::{Claim, EpochAuthority, Grant};
use fathom_replication::layer::PeerState;
use fathom_replication::node::Replication;
use fathom_replication::role::VolumeRole;

use crate::etcd::{Change, Condition, Etcd, EtcdError, Kv, Timeouts, Write};
use crate::provision::{Desired, Frontends, PoolSettings, ProvisionError, Provisioner, Wanted};
use crate::schema::{
    Key, NodeRecord, NodeStatus, Prefix, SchemaError, Tombstone, VolumeSpec, VolumeState,
    SCHEMA_VERSION,
};

/// How often the agent looks at its volumes when nothing changes.
const TICK: Duration = Duration::from_millis(100);
/// How long a new volume's first primary waits for the other copies to be made before it
/// serves without them.
const FIRST_CLAIM_WAIT: Duration = Duration::from_secs(10);
/// After a claim that failed, the next try of the same volume waits this long.
const RETRY: Duration = Duration::from_millis(500);

/// What the control plane of a node is made of.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster: String,
    pub endpoints: Vec<String>,
    pub lease: Duration,
    pub node: String,
    pub replication: String,
    pub nbd: Option<String>,
    /// This node's replicated volumes as its config describes them, to seed etcd with when
    /// it has no record of them yet.
    pub volumes: Vec<VolumeSpec>,
    /// `[cluster.pool]`: where volumes made through etcd go on this node.
    pub pool: Option<PoolSettings>,
}

impl Settings {
    /// The control plane `config` asks for (`[cluster] etcd`), for this node's replicated
    /// volumes as `engine` made them; `None` when it names no etcd, or the node holds no
    /// replicated volume and has no pool to make them in.
    pub fn from_config(
        config: &fathom_engine::config::Config,
        engine: &fathom_engine::engine::Engine,
    ) -> Option<Self> {
        let node = config.node.id.as_str();
        if config.cluster.etcd.is_empty() {
            return None;
        }
        let entry = config.cluster.nodes.iter().find(|entry| entry.id == node)?;
        let volumes: Vec<VolumeSpec> = config
            .volumes
            .iter()
            .filter(|volume| volume.replicas.iter().any(|replica| replica == node))
            .filter_map(|volume| {
                let made = engine.volume(&volume.name)?;
                Some(VolumeSpec {
                    v: SCHEMA_VERSION,
                    name: volume.name.clone(),
                    size: made.blocks * made.block_size as u64,
                    block_size: made.block_size,
                    replicas: volume.replicas.clone(),
                    incarnation: 0,
                })
            })
            .collect();
        let pool = config.cluster.pool.as_ref().map(|pool| PoolSettings {
            device: pool.device.clone(),
            data_dir: config.node.data_dir.clone(),
            region_size: config.replication.region_size.0,
            volumes: pool.volumes,
        });
        if volumes.is_empty() && pool.is_none() {
            return None;
        }
        Some(Self {
            cluster: config.cluster.name.clone(),
            endpoints: config.cluster.etcd.clone(),
            lease: config.cluster.lease.0,
            node: node.to_string(),
            replication: entry.replication.clone(),
            nbd: entry.nbd.clone(),
            volumes,
            pool,
        })
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cluster: {0}")]
    Schema(#[from] SchemaError),
    #[error("cluster.etcd: {0}")]
    Etcd(#[from] EtcdError),
    #[error("cannot start the control-plane thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
}

/// The node's lease as its keeper last renewed it, kept by the authority (a node whose
/// lease ran out claims nothing).
#[derive(Debug, Default)]
struct LeaseState {
    id: Option<i64>,
    valid_until: Option<Instant>,
    /// One more at each registration (a new lease): what was read under the old one is
    /// read afresh.
    registrations: u64,
}

impl LeaseState {
    /// Until when the node may act on its lease, if it still may now.
    fn valid_now(&self) -> Option<Instant> {
        self.valid_until.filter(|until| Instant::now() < *until)
    }
}

/// Epochs taken in etcd by compare-and-swap on the volume's state.
pub struct EtcdAuthority {
    prefix: Prefix,
    node: String,
    etcd: Mutex<Etcd>,
    lease: Mutex<LeaseState>,
}

impl EtcdAuthority {
    pub fn new(settings: &Settings) -> Result<Arc<Self>, AgentError> {
        Ok(Arc::new(Self {
            prefix: Prefix::new(&settings.cluster)?,
            node: settings.node.clone(),
            etcd: Mutex::new(Etcd::new(&settings.endpoints, Timeouts::default())?),
            lease: Mutex::new(LeaseState::default()),
        }))
    }

    /// The node's lease, as its keeper last renewed it.
    fn lease(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EpochAuthority for EtcdAuthority {
    fn claim(&self, volume: &str, known: u64, why: Claim) -> Result<Grant, String> {
        if self.lease().valid_now().is_none() {
            return Err("this node holds no live etcd lease: it claims nothing until it has one (is etcd reachable?)".into());
        }
        let me = self.node.as_str();
        let key = self.prefix.state(volume);
        let mut etcd = self.etcd.lock().unwrap_or_else(|p| p.into_inner());
        let read = |etcd: &mut Etcd| -> Result<(VolumeState, Kv), String> {
            let kv = etcd.get(&key).map_err(|e| e.to_string())?.ok_or_else(|| {
                format!("etcd holds no state for it ({key}); a node that holds a copy seeds it")
            })?;
            let state = VolumeState::decode(&key, None, &kv.value).map_err(|e| e.to_string())?;
            Ok((state, kv))
        };
        let (state, kv) = read(&mut etcd)?;
        let mut when = vec![
            Condition::ModRevision(key.clone(), kv.mod_revision),
            Condition::Present(self.prefix.node(me)),
        ];
        let in_sync_here = state.in_sync.iter().any(|node| node == me);
        let not_in_sync = || {
            format!(
                "this node is not in its in-sync set {:?} in etcd (epoch {}): it may lack acknowledged writes; wait for its resync, or promote with --force",
                state.in_sync, state.epoch
            )
        };
        let mut in_sync = state.in_sync.clone();
        match why {
            Claim::Failover => {
                if state.primary == me {
                    return Err(format!(
                        "etcd names this node its primary already (epoch {})",
                        state.epoch
                    ));
                }
                if !in_sync_here {
                    return Err(not_in_sync());
                }
                // Only while the primary's lease is gone: a live primary is not failed over.
                when.push(Condition::Absent(self.prefix.node(&state.primary)));
                in_sync.retain(|node| node != &state.primary);
            }
            Claim::Handover => {
                if !in_sync_here {
                    return Err(not_in_sync());
                }
            }
            Claim::Restart => {
                if state.primary != me {
                    return Err(format!(
                        "etcd names node {:?} its primary at epoch {}, not this node",
                        state.primary, state.epoch
                    ));
                }
            }
            Claim::Forced => {
                if !in_sync_here {
                    in_sync = vec![me.to_string()];
                } else if state.primary != me {
                    in_sync.retain(|node| node != &state.primary);
                }
            }
        }
        let epoch = state.epoch.max(known) + 1;
        let next = VolumeState {
            v: SCHEMA_VERSION,
            epoch,
            primary: me.to_string(),
            in_sync,
        };
        let put = Write::Put {
            key: key.clone(),
            value: next.encode(),
            lease: None,
        };
        if etcd.txn(&when, &[put]).map_err(|e| e.to_string())? {
            tracing::warn!(
                volume,
                epoch,
                why = why.as_str(),
                "cluster: etcd granted this node the next epoch"
            );
            return Ok(Grant {
                epoch,
                in_sync: next.in_sync,
            });
        }
        // Refused, or an earlier try of this same transaction went through unanswered.
        let (now, _) = read(&mut etcd)?;
        if now == next {
            return Ok(Grant {
                epoch,
                in_sync: next.in_sync,
            });
        }
        let primary_alive = etcd
            .get(&self.prefix.node(&state.primary))
            .map(|kv| kv.is_some())
            .unwrap_or(false);
        Err(match (why, primary_alive) {
            (Claim::Failover, true) if now.epoch == state.epoch => format!(
                "node {:?}, its primary, holds a live lease: it is not failed over",
                state.primary
            ),
            _ => format!(
                "its state in etcd changed meanwhile: epoch {}, primary {:?}, in sync {:?}",
                now.epoch, now.primary, now.in_sync
            ),
        })
    }
}

/// The cluster as this node last read it from etcd.
#[derive(Debug, Default)]
struct View {
    nodes: BTreeMap<String, NodeRecord>,
    /// The volumes' specs, and what the provisioner needs besides: which were deleted
    /// (tombstones) and whose spec is there but refused.
    desired: Desired,
    /// With the state key's revision, for compare-and-swap.
    states: BTreeMap<String, (VolumeState, i64)>,
    /// The volumes each live node holds a copy of, from its status.
    holding: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl View {
    fn apply(&mut self, prefix: &Prefix, change: &Change) {
        let (key, value) = match change {
            Change::Put(kv) => (&kv.key, Some(kv)),
            Change::Delete { key, .. } => (key, None),
        };
        let parsed = match prefix.parse(key) {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::warn!("cluster: ignoring a key under the prefix: {error}");
                return;
            }
        };
        let text = String::from_utf8_lossy(key).into_owned();
        let Some(kv) = value else {
            match parsed {
                Key::Node(node) => {
                    self.nodes.remove(&node);
                }
                Key::Spec(volume) => {
                    self.desired.specs.remove(&volume);
                    self.desired.refused.remove(&volume);
                }
                Key::Deleted(volume) => {
                    self.desired.tombstones.remove(&volume);
                }
                Key::State(volume) => {
                    self.states.remove(&volume);
                }
                Key::Status(node) => {
                    self.holding.remove(&node);
                }
            }
            return;
        };
        let refused = |error: SchemaError| {
            tracing::error!(
                "cluster: refusing a value in etcd, keeping what was known before: {error}"
            );
        };
        match parsed {
            Key::Node(node) => match NodeRecord::decode(&text, &node, &kv.value) {
                Ok(record) => {
                    self.nodes.insert(node, record);
                }
                Err(error) => refused(error),
            },
            Key::Spec(volume) => match VolumeSpec::decode(&text, &volume, &kv.value) {
                Ok(spec) => {
                    self.desired.refused.remove(&volume);
                    self.desired.specs.insert(volume, spec);
                }
                Err(error) => {
                    self.desired.refused.insert(volume);
                    refused(error)
                }
            },
            Key::Deleted(volume) => match Tombstone::decode(&text, &volume, &kv.value) {
                Ok(tombstone) => {
                    self.desired
                        .tombstones
                        .insert(volume, tombstone.incarnation);
                }
                Err(error) => refused(error),
            },
            Key::State(volume) => {
                match VolumeState::decode(&text, self.desired.specs.get(&volume), &kv.value) {
                    Ok(state) => {
                        self.states.insert(volume, (state, kv.mod_revision));
                    }
                    Err(error) => refused(error),
                }
            }
            // Which volumes each node holds, as its status says (for a new volume's first
            // claim); the rest of a status is for operators.
            Key::Status(node) => match NodeStatus::decode(&text, &node, &kv.value) {
                Ok(status) => {
                    let volumes = status
                        .replication
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|row| row["volume"].as_str().map(str::to_string))
                        .collect();
                    self.holding.insert(node, volumes);
                }
                Err(error) => refused(error),
            },
        }
    }

    fn load(prefix: &Prefix, kvs: &[Kv]) -> Self {
        let mut view = View::default();
        // Specs before states, so that a state is checked against its volume's copies.
        let mut ordered: Vec<&Kv> = kvs.iter().collect();
        ordered.sort_by_key(|kv| !kv.key.ends_with(b"/spec"));
        for kv in ordered {
            view.apply(prefix, &Change::Put(kv.clone()));
        }
        view
    }
}

/// What the node serves, as JSON rows, for its status key (`fathom-ctl cluster status`).
pub type StatusSource = Box<dyn Fn() -> serde_json::Value + Send>;

/// How often a node's status key is brought up to date while it changes.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// And while it does not: a put retried on another member may be applied late by the first
/// (etcd retries are at least once), leaving an older status in place.
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// The control plane running on this node; dropping it stops it and ends the lease (the
/// node's volumes fail over at once instead of after the lease's TTL).
pub struct Agent {
    stop: Arc<AtomicBool>,
    /// Follows the cluster and acts on it.
    runner: Option<JoinHandle<()>>,
    /// Keeps the lease alive on a thread of its own, so that a long promote or a slow etcd
    /// call of the runner never delays a keep-alive.
    keeper: Option<JoinHandle<()>>,
    /// Makes and deletes the pool's volumes (with a pool).
    provisioner: Option<JoinHandle<()>>,
}

/// The node's registration and lease, kept on their own thread.
struct Keeper {
    settings: Settings,
    prefix: Prefix,
    etcd: Etcd,
    authority: Arc<EtcdAuthority>,
    replication: Arc<Replication>,
    next_keep_alive: Instant,
    logged: HashMap<&'static str, Instant>,
}

struct Runner {
    settings: Settings,
    prefix: Prefix,
    etcd: Etcd,
    authority: Arc<EtcdAuthority>,
    replication: Arc<Replication>,
    view: View,
    watching: bool,
    /// The registration the view was read under.
    registration: u64,
    retry_at: HashMap<String, Instant>,
    /// Nodes named as primaries whose key is missing, and from when they count as gone: at
    /// once when this node saw the key deleted (its lease expired or was revoked), one TTL
    /// after it first noticed otherwise (a node that has not registered yet, at start).
    gone_at: HashMap<String, Instant>,
    /// When an error was last logged, per kind, so that a long outage does not flood the log.
    logged: HashMap<&'static str, Instant>,
    status: Option<StatusSource>,
    /// The status last published, and when.
    published: Option<(serde_json::Value, Instant)>,
    /// When the status was last compared with what was published.
    status_checked: Instant,
    /// The provisioner's: the specs it is to follow, and the pool's room (with a pool).
    wanted: Option<Arc<Wanted>>,
    /// New volumes (epoch 0) this node is to claim first, and since when it waits for their
    /// copies to be made.
    first_claim: HashMap<String, Instant>,
}

impl Agent {
    /// Starts the control plane of this node, for `replication` started with `authority`.
    /// With a pool, the pool's volumes serve again (before this returns) and `frontends`
    /// hears of volumes that come and go.
    pub fn start(
        settings: Settings,
        authority: Arc<EtcdAuthority>,
        replication: Arc<Replication>,
        status: Option<StatusSource>,
        engine: &fathom_engine::engine::Engine,
        frontends: Option<Arc<dyn Frontends>>,
    ) -> Result<Self, AgentError> {
        let prefix = Prefix::new(&settings.cluster)?;
        let stop = Arc::new(AtomicBool::new(false));
        let provisioner = match &settings.pool {
            Some(pool) => Some(Provisioner::open(
                &settings.node,
                pool,
                engine,
                replication.clone(),
                frontends,
            )?),
            None => None,
        };
        let wanted = provisioner.as_ref().map(Provisioner::wanted);
        let mut keeper = Keeper {
            settings: settings.clone(),
            prefix: prefix.clone(),
            etcd: Etcd::new(&settings.endpoints, Timeouts::default())?,
            authority: authority.clone(),
            replication: replication.clone(),
            next_keep_alive: Instant::now(),
            logged: HashMap::new(),
        };
        let mut runner = Runner {
            etcd: Etcd::new(&settings.endpoints, Timeouts::default())?,
            settings,
            prefix,
            authority,
            replication,
            view: View::default(),
            watching: false,
            registration: 0,
            retry_at: HashMap::new(),
            gone_at: HashMap::new(),
            logged: HashMap::new(),
            status,
            published: None,
            status_checked: Instant::now(),
            wanted,
            first_claim: HashMap::new(),
        };
        let provisioner = provisioner
            .map(|provisioner| provisioner.spawn(stop.clone()))
            .transpose()?;
        let keeper = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cluster-lease".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        keeper.step();
                    }
                    keeper.leave();
                })
                .map_err(AgentError::Thread)?
        };
        let runner = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cluster-agent".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        runner.step();
                    }
                })
                .map_err(AgentError::Thread)?
        };
        Ok(Self {
            stop,
            runner: Some(runner),
            keeper: Some(keeper),
            provisioner,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The runner first, so that nothing is claimed while the lease ends.
        for thread in [
            self.runner.take(),
            self.keeper.take(),
            self.provisioner.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// Logs `message` unless the same kind was logged in the last 5 s, so that a long outage
/// does not flood the log.
fn log_error(logged: &mut HashMap<&'static str, Instant>, kind: &'static str, message: String) {
    let now = Instant::now();
    let due = logged
        .get(kind)
        .is_none_or(|last| now.duration_since(*last) >= Duration::from_secs(5));
    if due {
        logged.insert(kind, now);
        tracing::error!("cluster: {message}");
    }
}

impl Keeper {
    /// Keeps the lease, tells the volumes until when they may acknowledge IO, and sleeps until
    /// the next keep-alive (a tick at most).
    fn step(&mut self) {
        self.keep_lease();
        let until = self.authority.lease().valid_now();
        for role in self.replication.roles() {
            role.set_lease_until(until);
        }
        let wait = TICK.min(
            self.next_keep_alive
                .saturating_duration_since(Instant::now()),
        );
        std::thread::sleep(wait);
    }

    /// Registers the node, or keeps its lease alive when due.
    fn keep_lease(&mut self) {
        let now = Instant::now();
        let id = self.authority.lease().id;
        let ttl = self.settings.lease;
        let margin = (ttl / 8).max(Duration::from_millis(100));
        match id {
            None => {
                let sent = Instant::now();
                match self.register() {
                    Ok(id) => {
                        let mut lease = self.authority.lease();
                        lease.id = Some(id);
                        lease.valid_until = Some(sent + ttl - margin);
                        lease.registrations += 1;
                        drop(lease);
                        self.next_keep_alive = sent + ttl / 4;
                        tracing::info!(node = %self.settings.node, lease = format!("{id:x}"), ttl_s = ttl.as_secs(), "cluster: registered in etcd");
                    }
                    Err(error) => {
                        log_error(
                            &mut self.logged,
                            "register",
                            format!("cannot register this node in etcd: {error}; retrying"),
                        );
                        std::thread::sleep(TICK);
                    }
                }
            }
            Some(id) if now >= self.next_keep_alive => {
                let sent = Instant::now();
                match self.etcd.keep_alive(id) {
                    Ok(Some(granted)) => {
                        let was_valid = {
                            let mut lease = self.authority.lease();
                            let was_valid = lease.valid_until.is_some_and(|until| sent < until);
                            lease.valid_until = Some(sent + granted.min(ttl) - margin);
                            was_valid
                        };
                        self.next_keep_alive = sent + ttl / 4;
                        if !was_valid {
                            tracing::warn!(
                                "cluster: the lease is renewed: this node acknowledges IO again"
                            );
                        }
                    }
                    Ok(None) => {
                        tracing::error!(lease = format!("{id:x}"), "cluster: etcd let this node's lease expire: it acknowledges no IO as a primary, and registers again (another node may have taken its volumes over)");
                        let mut lease = self.authority.lease();
                        lease.id = None;
                        lease.valid_until = None;
                    }
                    Err(error) => {
                        let until = self.authority.lease().valid_until;
                        let left =
                            until.map(|until| until.saturating_duration_since(Instant::now()));
                        log_error(&mut self.logged, "keep-alive", format!("cannot keep the lease alive: {error}; this node stops acknowledging IO as a primary in {left:?} unless it can"));
                        self.next_keep_alive = Instant::now() + TICK;
                    }
                }
            }
            Some(_) => {}
        }
    }

    fn register(&mut self) -> Result<i64, EtcdError> {
        let id = self.etcd.grant(self.settings.lease)?;
        let record = NodeRecord {
            v: SCHEMA_VERSION,
            id: self.settings.node.clone(),
            replication: self.settings.replication.clone(),
            nbd: self.settings.nbd.clone(),
            pid: std::process::id(),
            lease_ms: self.settings.lease.as_millis() as u64,
        };
        self.etcd.put(
            &self.prefix.node(&self.settings.node),
            &record.encode(),
            Some(id),
        )?;
        Ok(id)
    }

    /// A clean stop: the lease ends now, so that another node takes this node's volumes over
    /// without waiting for its TTL.
    fn leave(&mut self) {
        for role in self.replication.roles() {
            role.set_lease_until(None);
        }
        let id = self.authority.lease().id.take();
        if let Some(id) = id {
            match self.etcd.revoke(id) {
                Ok(()) => tracing::info!("cluster: left etcd (lease revoked)"),
                Err(error) => tracing::warn!(
                    "cluster: could not revoke the lease ({error}); it expires by itself"
                ),
            }
        }
    }
}

impl Runner {
    fn log_error(&mut self, kind: &'static str, message: String) {
        log_error(&mut self.logged, kind, message);
    }

    fn step(&mut self) {
        let (until, registration) = {
            let lease = self.authority.lease();
            (lease.valid_now(), lease.registrations)
        };
        if registration != self.registration {
            // Registered anew: what happened meanwhile is read afresh, and the status put
            // again under the new lease.
            self.registration = registration;
            self.watching = false;
            self.published = None;
        }
        self.follow();
        if let (Some(wanted), true) = (&self.wanted, self.watching) {
            wanted.set(&self.view.desired);
        }
        if until.is_some() && self.watching {
            for role in self.replication.roles() {
                self.act(&role);
            }
            self.publish_status();
        }
    }

    /// Puts this node's status under its lease when it changed, at most once a second.
    fn publish_status(&mut self) {
        let Some(source) = &self.status else { return };
        if self.published.is_some() && self.status_checked.elapsed() < STATUS_EVERY {
            return;
        }
        self.status_checked = Instant::now();
        let rows = serde_json::json!({
            "replication": source(),
            "pool": self.wanted.as_ref().and_then(|wanted| wanted.room()),
        });
        let unchanged = self
            .published
            .as_ref()
            .is_some_and(|(last, at)| *last == rows && at.elapsed() < STATUS_REFRESH);
        if unchanged {
            return;
        }
        let Some(lease) = self.authority.lease().id else {
            return;
        };
        let record = NodeStatus {
            v: SCHEMA_VERSION,
            node: self.settings.node.clone(),
            replication: rows["replication"].clone(),
            pool: serde_json::from_value(rows["pool"].clone()).unwrap_or(None),
        };
        let key = self.prefix.status(&self.settings.node);
        match self.etcd.put(&key, &record.encode(), Some(lease)) {
            Ok(_) => self.published = Some((rows, Instant::now())),
            Err(error) => self.log_error(
                "status",
                format!("cannot publish this node's status: {error}"),
            ),
        }
    }

    /// Reads the cluster's keys (afresh when not watching) and waits up to a tick for changes.
    fn follow(&mut self) {
        if !self.watching {
            match self.etcd.get_prefix(self.prefix.as_str()) {
                Ok((kvs, revision)) => {
                    self.view = View::load(&self.prefix, &kvs);
                    self.etcd.watch(self.prefix.as_str(), revision + 1);
                    self.watching = true;
                }
                Err(error) => {
                    self.log_error("read", format!("cannot read the cluster's keys: {error}"));
                    std::thread::sleep(TICK);
                    return;
                }
            }
        }
        match self.etcd.next_events(TICK) {
            Ok(changes) => {
                for change in &changes {
                    self.view.apply(&self.prefix, change);
                    if let Change::Delete { key, .. } = change {
                        if let Ok(Key::Node(node)) = self.prefix.parse(key) {
                            self.gone_at.insert(node, Instant::now());
                        }
                    }
                }
            }
            Err(EtcdError::Compacted(_)) => self.watching = false,
            Err(error) => self.log_error("watch", format!("watching the cluster's keys: {error}")),
        }
    }

    fn due(&self, volume: &str) -> bool {
        self.retry_at
            .get(volume)
            .is_none_or(|at| Instant::now() >= *at)
    }

    fn act(&mut self, role: &Arc<VolumeRole>) {
        let name = role.volume.as_str();
        let me = self.settings.node.clone();
        let Some((state, revision)) = self.view.states.get(name).cloned() else {
            if self.due(name) {
                self.seed(role);
            }
            return;
        };
        if state.primary == me {
            if !role.primary_here() {
                if self.due(name) && self.copies_made(name, &state) {
                    self.claim(name, Claim::Restart);
                }
            } else if let Some(status) = role.primary_status() {
                if status.serving() && !status.fenced() && status.epoch() == state.epoch {
                    let mut in_sync = vec![me.clone()];
                    in_sync.extend(
                        status
                            .peers
                            .iter()
                            .filter(|peer| peer.state() == PeerState::Open && peer.in_sync())
                            .map(|peer| peer.node.clone()),
                    );
                    self.publish_in_sync(name, &state, revision, in_sync);
                }
            }
            return;
        }
        if role.primary_here() {
            // A reparent hands the volume over by itself (this node drains, then follows).
            if role.handing_over_to().is_none() {
                self.replication.step_down(name, state.epoch);
            }
            return;
        }
        let primary_gone = match self.view.nodes.contains_key(&state.primary) {
            true => {
                self.gone_at.remove(&state.primary);
                false
            }
            false => {
                let now = Instant::now();
                let ttl = self.settings.lease;
                now >= *self
                    .gone_at
                    .entry(state.primary.clone())
                    .or_insert(now + ttl)
            }
        };
        if primary_gone && state.in_sync.contains(&me) && self.due(name) {
            tracing::warn!(volume = name, primary = %state.primary, epoch = state.epoch, "cluster: the primary's lease is gone: this in-sync copy takes the volume over");
            self.claim(name, Claim::Failover);
        }
    }

    /// Whether a new volume's first primary may claim it: once every copy the spec names has
    /// been made (its node's status lists it), or after [`FIRST_CLAIM_WAIT`]. A copy made
    /// after the claim is rebuilt in full, zeroes and all; made before, it joins in sync.
    fn copies_made(&mut self, name: &str, state: &VolumeState) -> bool {
        if state.epoch != 0 {
            self.first_claim.remove(name);
            return true;
        }
        let Some(spec) = self.view.desired.specs.get(name) else {
            return true;
        };
        let missing: Vec<&String> = spec
            .replicas
            .iter()
            .filter(|node| **node != self.settings.node)
            .filter(|node| {
                !self
                    .view
                    .holding
                    .get(*node)
                    .is_some_and(|volumes| volumes.contains(name))
            })
            .collect();
        if missing.is_empty() {
            self.first_claim.remove(name);
            return true;
        }
        let since = *self
            .first_claim
            .entry(name.to_string())
            .or_insert_with(Instant::now);
        if since.elapsed() < FIRST_CLAIM_WAIT {
            return false;
        }
        tracing::warn!(volume = name, ?missing, "cluster: the volume's first claim waited {} s for copies that are not made yet; it serves without them (they are rebuilt in full when made)", FIRST_CLAIM_WAIT.as_secs());
        self.first_claim.remove(name);
        true
    }

    fn claim(&mut self, name: &str, why: Claim) {
        let started = Instant::now();
        match self.replication.promote_for(name, why) {
            Ok(promoted) => {
                self.retry_at.remove(name);
                tracing::warn!(
                    volume = name,
                    epoch = promoted.epoch,
                    why = why.as_str(),
                    took_ms = started.elapsed().as_millis() as u64,
                    regions_copied = promoted.regions_copied,
                    "cluster: this node serves the volume as its primary"
                );
            }
            Err(error) => {
                self.retry_at
                    .insert(name.to_string(), Instant::now() + RETRY);
                tracing::warn!(
                    volume = name,
                    why = why.as_str(),
                    "cluster: not taking the volume: {error}"
                );
            }
        }
    }

    /// The in-sync set in etcd follows the primary's view of its replicas.
    fn publish_in_sync(
        &mut self,
        name: &str,
        state: &VolumeState,
        revision: i64,
        mut in_sync: Vec<String>,
    ) {
        let mut known = state.in_sync.clone();
        known.sort();
        in_sync.sort();
        if known == in_sync || !self.due(name) {
            return;
        }
        let next = VolumeState {
            in_sync: in_sync.clone(),
            ..state.clone()
        };
        let key = self.prefix.state(name);
        let put = Write::Put {
            key: key.clone(),
            value: next.encode(),
            lease: None,
        };
        match self
            .etcd
            .txn(&[Condition::ModRevision(key, revision)], &[put])
        {
            Ok(true) => tracing::info!(
                volume = name,
                epoch = state.epoch,
                ?in_sync,
                "cluster: in-sync copies updated in etcd"
            ),
            Ok(false) => {} // The watch brings the newer state.
            Err(error) => {
                self.retry_at
                    .insert(name.to_string(), Instant::now() + RETRY);
                self.log_error(
                    "in-sync",
                    format!("volume {name}: cannot update its in-sync copies in etcd: {error}"),
                );
            }
        }
    }

    /// Puts the volume's spec and first state in etcd unless they are there.
    fn seed(&mut self, role: &Arc<VolumeRole>) {
        let name = role.volume.as_str();
        let Some(spec) = self
            .settings
            .volumes
            .iter()
            .find(|s| s.name == name)
            .cloned()
        else {
            return;
        };
        let superblock = role.superblock();
        let primary = match spec.replicas.contains(&superblock.primary) {
            true => superblock.primary.clone(),
            false => spec.replicas[0].clone(),
        };
        let mut in_sync: Vec<String> = superblock
            .in_sync
            .iter()
            .filter(|node| spec.replicas.contains(node))
            .cloned()
            .collect();
        if !in_sync.contains(&primary) {
            in_sync = spec.replicas.clone();
        }
        let state = VolumeState {
            v: SCHEMA_VERSION,
            epoch: role.epoch(),
            primary,
            in_sync,
        };
        let state_key = self.prefix.state(name);
        let spec_key = self.prefix.spec(name);
        let mut writes = vec![Write::Put {
            key: state_key.clone(),
            value: state.encode(),
            lease: None,
        }];
        if !self.view.desired.specs.contains_key(name) {
            writes.push(Write::Put {
                key: spec_key,
                value: spec.encode(),
                lease: None,
            });
        } else if self.view.desired.specs.get(name) != Some(&spec) {
            tracing::warn!(volume = name, "cluster: this node's config and etcd describe the volume differently; etcd's spec stands");
        }
        match self.etcd.txn(&[Condition::Absent(state_key)], &writes) {
            Ok(true) => {
                tracing::info!(volume = name, epoch = state.epoch, primary = %state.primary, "cluster: seeded the volume's state in etcd")
            }
            Ok(false) => {}
            Err(error) => {
                self.retry_at
                    .insert(name.to_string(), Instant::now() + RETRY);
                self.log_error(
                    "seed",
                    format!("volume {name}: cannot seed its state in etcd: {error}"),
                );
            }
        }
    }
}
