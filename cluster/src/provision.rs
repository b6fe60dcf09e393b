//! Volumes the control plane makes and deletes on this node: a spec in etcd that names this
//! node gets a range of the node's pool ([`crate::pool`]), an engine volume on it, cleared
//! (write-zeroes over its data and metadata, so that no byte of an earlier volume shows), a
//! copy in replication and an NBD export; a spec deleted from etcd takes them away again, in
//! the reverse order. Runs on a thread of its own: clearing a large volume takes a while,
//! and failovers must not wait for it.
//!
//! At start the pool's ready volumes are served again before the agent acts (etcd need not
//! be reachable for this node's copies to serve as replicas); a volume whose clearing was cut
//! short is made again once etcd's spec is seen.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fathom_engine::config::metadata_bytes;
use fathom_engine::engine::{Engine, NewVolume};
use fathom_engine::layer::ControlError;
use fathom_engine::volume::{IoRequest, Volume};
use fathom_replication::node::{CopySpec, Replication};

use crate::pool::{Extent, Pool, PoolError, Room};
use crate::schema::VolumeSpec;

/// How long a volume that could not be made or deleted waits for the next try.
const RETRY: Duration = Duration::from_secs(2);
/// How often the thread looks for work when nothing is asked.
const TICK: Duration = Duration::from_millis(100);

/// What else serves a volume on this node (the NBD front end): told when one comes, and
/// before one goes.
pub trait Frontends: Send + Sync {
    fn added(&self, volume: &Volume);
    /// Returns once the volume's clients are gone (or after a bound of its own).
    fn removing(&self, name: &str);
}

/// `[cluster.pool]` as the provisioner needs it.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub device: String,
    pub data_dir: PathBuf,
    /// `[replication] region_size`: what a volume's metadata is sized for.
    pub region_size: u64,
    /// `[cluster.pool] volumes`: how many it may hold.
    pub volumes: usize,
}

/// What etcd says of the volumes, as the agent last read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub specs: BTreeMap<String, VolumeSpec>,
    /// Deleted volumes: the incarnation each tombstone names.
    pub tombstones: BTreeMap<String, u64>,
    /// Volumes whose spec is in etcd and was refused (what they are is not known).
    pub refused: BTreeSet<String>,
}

/// What the agent hands the provisioner: etcd's view (set when it changes).
#[derive(Default)]
pub struct Wanted {
    desired: Mutex<Option<Desired>>,
    /// The pool's free space, for the node's status.
    room: Mutex<Option<Room>>,
}

impl Wanted {
    pub fn set(&self, desired: &Desired) {
        let mut wanted = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        if wanted.as_ref() != Some(desired) {
            *wanted = Some(desired.clone());
        }
    }

    pub fn room(&self) -> Option<Room> {
        *self.room.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes and deletes this node's pool volumes.
pub struct Provisioner {
    node: String,
    engine: Engine,
    replication: Arc<Replication>,
    frontends: Option<Arc<dyn Frontends>>,
    pool: Pool,
    region_size: u64,
    wanted: Arc<Wanted>,
    /// Volumes whose last try failed, and when to try again.
    retry_at: HashMap<String, Instant>,
    /// Pool volumes the front ends were told of.
    exported: HashSet<String>,
    /// Pool volumes etcd does not name, already logged as kept.
    kept: HashSet<String>,
    /// Set when the node stops: a volume being cleared gives up.
    stop: Arc<AtomicBool>,
}

/// Why the pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cluster.pool: {0}")]
    Pool(#[from] PoolError),
    #[error("cluster.pool.device {0:?}: the engine has no such device, or it has no namespace 1")]
    Device(String),
    #[error("cannot start the thread that makes volumes: {0}")]
    Thread(std::io::Error),
}

impl Provisioner {
    /// Opens the pool of `settings.device`, around the configured volumes on it, and serves
    /// its ready volumes again.
    pub fn open(
        node: &str,
        settings: &PoolSettings,
        engine: &Engine,
        replication: Arc<Replication>,
        frontends: Option<Arc<dyn Frontends>>,
    ) -> Result<Self, ProvisionError> {
        let device = engine
            .devices()
            .find(|info| info.name == settings.device)
            .ok_or_else(|| ProvisionError::Device(settings.device.clone()))?;
        let namespace = device
            .namespaces
            .iter()
            .find(|namespace| namespace.nsid == 1)
            .ok_or_else(|| ProvisionError::Device(settings.device.clone()))?;
        let block = namespace.block_size as u64;
        let reserved = engine
            .volumes()
            .iter()
            .filter(|volume| volume.device_name == settings.device)
            .map(|volume| {
                (
                    volume.first_lba * block,
                    (volume.first_lba + volume.blocks + volume.meta_blocks) * block,
                )
            })
            .collect();
        let pool = Pool::open(
            &settings.data_dir,
            &settings.device,
            namespace.blocks * block,
            namespace.block_size,
            reserved,
            settings.volumes,
        )?;
        let mut provisioner = Self {
            node: node.into(),
            engine: engine.clone(),
            replication,
            frontends,
            pool,
            region_size: settings.region_size,
            wanted: Arc::new(Wanted::default()),
            retry_at: HashMap::new(),
            exported: HashSet::new(),
            kept: HashSet::new(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        provisioner.restore();
        Ok(provisioner)
    }

    /// Where the agent puts what etcd wants.
    pub fn wanted(&self) -> Arc<Wanted> {
        self.wanted.clone()
    }

    /// Runs until `stop`: makes and deletes volumes as the specs ask.
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>, ProvisionError> {
        self.stop = stop;
        std::thread::Builder::new()
            .name("cluster-volumes".into())
            .spawn(move || {
                while !self.stop.load(Ordering::Acquire) {
                    let desired = self
                        .wanted
                        .desired
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(desired) = desired {
                        self.reconcile(&desired);
                    }
                    std::thread::sleep(TICK);
                }
            })
            .map_err(ProvisionError::Thread)
    }

    fn publish_room(&self) {
        *self.wanted.room.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.pool.room());
    }

    /// Serves the pool's ready volumes again (at start).
    fn restore(&mut self) {
        let ready: Vec<(String, Extent)> = self
            .pool
            .volumes()
            .iter()
            .filter(|(_, extent)| extent.ready)
            .map(|(name, extent)| (name.clone(), extent.clone()))
            .collect();
        for (name, extent) in ready {
            let spec = VolumeSpec {
                v: crate::schema::SCHEMA_VERSION,
                name: name.clone(),
                size: extent.size,
                block_size: self.pool.room().block_size,
                replicas: extent.replicas.clone(),
                incarnation: extent.incarnation,
            };
            match self.ensure(&spec) {
                Ok(_) => tracing::info!(volume = %name, "cluster: serving the pool's volume again"),
                Err(error) => {
                    self.retry_at.insert(name.clone(), Instant::now() + RETRY);
                    tracing::error!(volume = %name, "cluster: cannot serve the pool's volume again: {error}")
                }
            }
        }
        self.publish_room();
    }

    /// Makes what the specs name for this node and the pool lacks (or serves it, if it is
    /// made and not served); deletes what etcd deleted (a tombstone of its incarnation) or
    /// replaced (a spec of another incarnation, or not naming this node). A pool volume etcd
    /// says nothing of (no spec, no tombstone, or a spec refused) is kept.
    pub fn reconcile(&mut self, desired: &Desired) {
        let now = Instant::now();
        let due = |retry_at: &HashMap<String, Instant>, name: &str| {
            retry_at.get(name).is_none_or(|at| now >= *at)
        };
        let held: Vec<(String, u64)> = self
            .pool
            .volumes()
            .iter()
            .map(|(name, extent)| (name.clone(), extent.incarnation))
            .collect();
        for (name, incarnation) in held {
            let gone = match desired.specs.get(&name) {
                Some(spec) => {
                    spec.incarnation != incarnation || !spec.replicas.contains(&self.node)
                }
                None if desired.refused.contains(&name) => false,
                None => desired.tombstones.get(&name) == Some(&incarnation),
            };
            let unknown = !gone && !desired.specs.contains_key(&name);
            if unknown && self.kept.insert(name.clone()) {
                tracing::warn!(volume = %name, incarnation, "cluster: the pool holds this volume and etcd has no readable spec or tombstone of it: it is kept as it is");
            }
            if !unknown {
                self.kept.remove(&name);
            }
            if gone && due(&self.retry_at, &name) {
                self.delete(&name);
            }
        }
        for spec in desired.specs.values() {
            let name = spec.name.as_str();
            if !spec.replicas.contains(&self.node) || spec.incarnation == 0 {
                // Not this node's, or a volume of the nodes' config files.
                continue;
            }
            let current = self
                .pool
                .volumes()
                .get(name)
                .map(|extent| extent.incarnation);
            if current.is_some_and(|incarnation| incarnation != spec.incarnation) {
                continue; // The old copy goes first (above).
            }
            let served = self.exported.contains(name)
                && self.pool.volumes().get(name).is_some_and(|e| e.ready);
            if !served && due(&self.retry_at, name) {
                self.make(spec);
            }
        }
    }

    fn make(&mut self, spec: &VolumeSpec) {
        let name = spec.name.as_str();
        let started = Instant::now();
        match self.ensure(spec) {
            Ok(extent) => {
                self.retry_at.remove(name);
                tracing::info!(
                    volume = name,
                    size = spec.size,
                    device = self.pool.device(),
                    offset = extent.offset,
                    replicas = ?spec.replicas,
                    incarnation = spec.incarnation,
                    took_ms = started.elapsed().as_millis() as u64,
                    "cluster: this node serves its copy of the volume"
                );
            }
            Err(error) => {
                self.retry_at.insert(name.into(), Instant::now() + RETRY);
                tracing::error!(volume = name, "cluster: cannot make or serve the volume's copy on this node: {error}; trying again in {} s", RETRY.as_secs());
            }
        }
        self.publish_room();
    }

    /// Brings `spec`'s copy here as far as it is not yet: a range of the pool, an engine
    /// volume, cleared (and flushed) once, recorded ready, held by replication, exported.
    /// Each step is skipped when done, so a failed one is simply tried again.
    fn ensure(&mut self, spec: &VolumeSpec) -> Result<Extent, String> {
        let name = spec.name.as_str();
        let room = self.pool.room();
        if spec.block_size != room.block_size {
            return Err(format!(
                "its spec asks for {}-byte blocks; this node's pool has {}-byte blocks",
                spec.block_size, room.block_size
            ));
        }
        let meta = metadata_bytes(spec.size, self.region_size);
        let extent = self
            .pool
            .allocate(name, spec.size, meta, &spec.replicas, spec.incarnation)
            .map_err(|error| error.to_string())?;
        if extent.size != spec.size || extent.incarnation != spec.incarnation {
            return Err(format!(
                "the pool holds another copy under this name ({} bytes, incarnation {}); it goes first",
                extent.size, extent.incarnation
            ));
        }
        let volume = match self.engine.volume(name) {
            Some(volume) => volume,
            None => {
                self.pool.save().map_err(|error| error.to_string())?;
                self.engine
                    .create_volume(&new_volume(self.pool.device(), name, &extent))
                    .map_err(|error| error.to_string())?
            }
        };
        if !extent.ready {
            clear(&self.engine, &volume, &self.stop)
                .map_err(|error| format!("clearing it: {error}"))?;
            self.pool.set_ready(name);
            self.pool.save().map_err(|error| error.to_string())?;
        }
        let held = self
            .replication
            .roles()
            .iter()
            .any(|role| role.volume == name);
        if !held {
            let copy = CopySpec {
                volume: name.into(),
                replicas: spec.replicas.clone(),
                first_primary: spec.replicas[0].clone(),
                incarnation: spec.incarnation,
            };
            self.replication
                .add_volume(&copy)
                .map_err(|error| error.to_string())?;
        }
        if !self.exported.contains(name) {
            if let Some(frontends) = &self.frontends {
                frontends.added(&volume);
            }
            self.exported.insert(name.into());
        }
        Ok(extent)
    }

    fn delete(&mut self, name: &str) {
        if let Some(frontends) = &self.frontends {
            frontends.removing(name);
        }
        self.exported.remove(name);
        self.replication.remove_volume(name);
        match self.engine.remove_volume(name) {
            Ok(()) | Err(ControlError::UnknownVolume { .. }) => {}
            Err(error) => {
                self.retry_at.insert(name.into(), Instant::now() + RETRY);
                tracing::error!(
                    volume = name,
                    "cluster: cannot delete the volume's copy yet: {error}"
                );
                return;
            }
        }
        self.pool.release(name);
        match self.pool.save() {
            Ok(()) => {
                self.retry_at.remove(name);
                tracing::info!(
                    volume = name,
                    "cluster: deleted the volume's copy on this node (its spec is gone from etcd)"
                );
            }
            Err(error) => {
                self.retry_at.insert(name.into(), Instant::now() + RETRY);
                tracing::error!(
                    volume = name,
                    "cluster: deleted the volume, and cannot record it: {error}"
                );
            }
        }
        self.publish_room();
    }
}

fn new_volume(device: &str, name: &str, extent: &Extent) -> NewVolume {
    NewVolume {
        name: name.into(),
        device: device.into(),
        offset: extent.offset,
        size: extent.size,
        meta_bytes: extent.meta_bytes,
    }
}

/// Zeroes `volume`'s data and metadata (write-zeroes, as large as one command takes), then
/// flushes, so that the zeroes are durable before the volume is recorded ready.
fn clear(engine: &Engine, volume: &Volume, stop: &AtomicBool) -> Result<(), String> {
    let chunk = 65536 * volume.block_size as u64;
    let areas = [
        (false, volume.blocks * volume.block_size as u64),
        (true, volume.meta_blocks * volume.block_size as u64),
    ];
    for (metadata, size) in areas {
        let mut offset = 0;
        while offset < size {
            if stop.load(Ordering::Acquire) {
                return Err("the node is stopping".into());
            }
            let len = chunk.min(size - offset);
            let request = IoRequest::write_zeroes(volume.id, offset, len, offset);
            let done = match metadata {
                false => engine.io(request),
                true => engine.metadata_io(request),
            };
            done.result.map_err(|error| error.to_string())?;
            offset += len;
        }
    }
    engine
        .io(IoRequest::flush(volume.id, 0))
        .result
        .map_err(|error| format!("flushing the zeroes: {error}"))
}
