//! The node's health monitor: a thread that, every second, reads the node's own stats region,
//! judges each volume with its detector (`fathom_health::detector`), each canary interval
//! judges the canaries and the clients' drift, and acts on what it finds.
//!
//! What it sees goes to [`NodeHealth`] (for `fathom-ctl health`, `/metrics` and the status
//! file `fathom-stat` reads next to the stats region), and every change (a state, a canary
//! turning red or green, drift, a node fault, an action) to the event log, JSON lines in
//! `DATA_DIR/health-events.jsonl`.
//!
//! Actions, unless the volume is advise-only:
//! - a primary that is not healthy hedges its reads to its in-sync replicas after its healthy
//!   read p95 (the replication layer's hedged reads, `VolumeStatus::set_hedge`);
//! - a degraded primary is reparented to its fastest in-sync replica, never when that would
//!   leave fewer than two healthy copies, never twice at once for one volume, and not again
//!   within [`REPARENT_COOLDOWN`];
//! - a volume degraded [`REPLACE_AFTER`] times within [`REPLACE_SPAN`] is flagged for
//!   replacement.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fathom_engine::config::{HealthActions, HealthConfig};
use fathom_engine::{Engine, Volume};
use fathom_health::canary::{self, Baseline, Reading};
use fathom_health::detector::{self, Detector, Health, Latency, Quantile, Sign, Window};
use fathom_health::drift::{classify, Cause, DriftTracker};
use fathom_health::signals::{queue_idle_pct, volume_signals, OldestOp, VolumeSignals};
use fathom_replication::layer::VolumeStatus;
use fathom_replication::node::Replication;
use fathom_telemetry::region::{RegionReader, Snapshot};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::probe::{ProbeSettings, ProbeShared, ProbeTask};

/// The monitor's window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// A volume is not reparented again by the monitor within this time of its last reparent.
pub const REPARENT_COOLDOWN: Duration = Duration::from_secs(60);
/// A volume whose peer ratio is this many times its healthy one is slowed, for the node-wide
/// rule, though under the detector's limit.
pub const NODE_WIDE_ELEVATION: f64 = 1.3;
/// Degradations within [`REPLACE_SPAN`] that flag a volume for replacement.
pub const REPLACE_AFTER: usize = 3;
pub const REPLACE_SPAN: Duration = Duration::from_secs(3600);
/// A hedged read's delay before the healthy read p95 is learned (ns).
const HEDGE_AFTER_UNLEARNED_NS: f64 = 2e6;
/// Canary intervals the clients' usual shape follows, for drift.
const DRIFT_SPAN: u32 = 60;

/// What the node's health looks like now (the status file, `fathom-ctl health`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeHealth {
    pub node: String,
    /// The monitor's window count since the node started.
    pub second: u64,
    pub unix_ms: u64,
    /// Set while every volume with IO is slow alike: a node fault (or node-wide load), held
    /// against no single volume.
    pub node_fault: Option<String>,
    pub volumes: Vec<VolumeHealth>,
}

/// One volume's health, with the detector's inputs of the last window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeHealth {
    pub volume: String,
    /// primary, replica, or local (a volume of this node only).
    pub role: String,
    pub health: String,
    /// The last window's sign: fine, busy, sick, stuck.
    pub sign: String,
    /// The window count when the state last changed.
    pub since: u64,
    pub reasons: Vec<String>,
    pub advise_only: bool,
    /// Degradations within the last hour; `replace` once there were too many.
    pub degradations: usize,
    pub replace: bool,
    pub inputs: Inputs,
    pub canary: Option<CanaryStatus>,
    /// Why the clients' shape counts as drift in the last canary interval (empty: none).
    pub drift: Vec<String>,
    /// What a slower client latency in the last canary interval is: regression, drift, load.
    pub cause: String,
    /// The last action taken or advised, and when (window count).
    pub last_action: Option<String>,
}

/// The detector's inputs over the last window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inputs {
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub read_p99_us: Option<f64>,
    pub write_p99_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub depth: f64,
    pub errors: u64,
    /// The device queue's idle time, percent.
    pub device_idle_pct: Option<f64>,
    /// On a primary: its own device's writes, and each replica's answers to the same writes.
    pub local_write: Option<LatencyUs>,
    pub replicas: Vec<ReplicaInput>,
    /// On a primary: the peer ratio at p50 and at p99, with the ratio learned healthy.
    pub peer_ratios: Vec<PeerRatio>,
    /// The self-model: healthy windows learned, the most IO/s among them, and the clients'
    /// usual queue depth then.
    pub model_points: usize,
    pub model_max_iops: Option<f64>,
    pub typical_depth: Option<f64>,
    pub oldest_op_ms: f64,
    pub smoke_ms: Option<f64>,
    pub smoke_rounds: u64,
    pub smoke_failures: u64,
    /// On a primary hedging its reads: after how long a read is asked of a replica too,
    /// reads asked so (since it became primary) and those the replica answered first.
    pub hedge_after_us: Option<f64>,
    pub hedged_reads: u64,
    pub hedge_wins: u64,
}

/// A set of writes' latency, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyUs {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl From<Latency> for LatencyUs {
    fn from(latency: Latency) -> Self {
        Self {
            p50_us: latency.p50_ns / 1e3,
            p99_us: latency.p99_ns / 1e3,
        }
    }
}

/// One replica's answers to the primary's writes over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInput {
    pub node: String,
    pub writes: u64,
    #[serde(flatten)]
    pub latency: LatencyUs,
}

/// The peer ratio at one quantile: now, and as learned healthy (`None` while it learns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRatio {
    pub quantile: Quantile,
    pub ratio: Option<f64>,
    pub baseline: Option<f64>,
}

/// A volume's canary over its last interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub interval: u64,
    pub red: bool,
    pub reasons: Vec<String>,
    pub learning: Vec<String>,
    pub rounds: u64,
    pub failures: u64,
    /// Per stage: name, p50, p90 and p99 (µs) in the interval, and the p50's and p90's baseline
    /// and noise band (µs) once learned.
    pub stages: Vec<CanaryStage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CanaryStage {
    pub stage: String,
    pub p50_us: f64,
    pub p90_us: f64,
    /// Shown, not judged.
    pub p99_us: f64,
    pub baseline_p50_us: Option<f64>,
    pub band_p50_us: Option<f64>,
    pub baseline_p90_us: Option<f64>,
    pub band_p90_us: Option<f64>,
}

/// The status file beside a stats region: the node rewrites it every second (atomically, by
/// rename), for readers of the region (`fathom-stat --health`, `top`).
pub fn status_path(region: &std::path::Path) -> PathBuf {
    let mut path = region.as_os_str().to_owned();
    path.push(".health.json");
    PathBuf::from(path)
}

/// Statuses older than this are a stopped node's (or a stuck monitor's).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The health status beside `region`: `Ok(None)` when there is none (a node without health,
/// or not started); an error, saying what, when it cannot be read or is stale.
pub fn read_status(region: &std::path::Path) -> Result<Option<NodeHealth>, String> {
    let path = status_path(region);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: {error}", path.display())),
    };
    let status: NodeHealth = serde_json::from_slice(&bytes).map_err(|error| {
        format!(
            "{} is not a health status ({error}); is the node's version this one's?",
            path.display()
        )
    })?;
    let age = Duration::from_millis(unix_ms().saturating_sub(status.unix_ms));
    if age > STALE_AFTER {
        return Err(format!(
            "{} was last written {:.0} s ago: the node (or its health monitor) is not running",
            path.display(),
            age.as_secs_f64()
        ));
    }
    Ok(Some(status))
}

/// What the monitor shares with the control channel and `/metrics`.
pub struct MonitorShared {
    pub status: Mutex<NodeHealth>,
    /// Per volume, advise-only set at run time (`fathom-ctl health advise`).
    advise: Mutex<BTreeMap<String, bool>>,
    stop: AtomicBool,
}

impl MonitorShared {
    /// Makes `volume`'s actions advise-only (or not) from now on.
    pub fn set_advise(&self, volume: &str, advise: bool) {
        self.advise.lock().insert(volume.to_string(), advise);
    }
}

/// The monitor thread.
pub struct HealthMonitor {
    shared: Arc<MonitorShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthMonitor {
    /// Starts the monitor of `engine`'s volumes (its stats region at `region`).
    pub fn start(
        engine: Engine,
        replication: Option<Arc<Replication>>,
        config: &HealthConfig,
        node: &str,
        region: PathBuf,
        data_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let reader = RegionReader::open(&region)
            .with_context(|| format!("health: opening the stats region {}", region.display()))?;
        let dir = data_dir.join("health");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("health: creating {} for canary baselines", dir.display()))?;
        let events = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("health-events.jsonl"))
            .with_context(|| format!("health: opening the event log in {}", data_dir.display()))?;
        let shared = Arc::new(MonitorShared {
            status: Mutex::new(NodeHealth {
                node: node.to_string(),
                ..NodeHealth::default()
            }),
            advise: Mutex::new(
                config
                    .advise
                    .iter()
                    .map(|volume| (volume.clone(), true))
                    .collect(),
            ),
            stop: AtomicBool::new(false),
        });
        let status_file = status_path(&region);
        let mut monitor = Monitor {
            engine,
            replication,
            config: config.clone(),
            node: node.to_string(),
            reader,
            previous: None,
            volumes: HashMap::new(),
            queues: HashMap::new(),
            shared: shared.clone(),
            baselines: dir,
            events,
            status_file,
            second: 0,
            node_fault: None,
            reparenting: Arc::new(Mutex::new(Vec::new())),
        };
        let thread = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || monitor.run())
            .context("health: starting its thread")?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub fn shared(&self) -> Arc<MonitorShared> {
        self.shared.clone()
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the monitor keeps per volume.
/// One volume's window as judged, before the node-wide rule and the state machine.
struct Judged {
    name: String,
    window: Window,
    signals: VolumeSignals,
    sign: Sign,
    reasons: Vec<String>,
    /// Its device queue's idle time, percent.
    idle: Option<f64>,
    /// "primary", "replica" or "local".
    role: &'static str,
    /// On a primary: its replication layer's status (hedging, the replicas' sync).
    primary_status: Option<Arc<VolumeStatus>>,
}

struct Tracked {
    /// The region slot's generation it was first seen at: another one is another volume.
    generation: u64,
    detector: Detector,
    probes: Option<Arc<ProbeShared>>,
    smoke_rounds: u64,
    smoke_failures: u64,
    canary: Baseline,
    canary_failures: u64,
    /// The snapshot the current canary interval started at, and the interval's count.
    interval_start: Option<Snapshot>,
    interval: u64,
    drift: DriftTracker,
    status: VolumeHealth,
    degradations: VecDeque<Instant>,
    last_reparent: Option<Instant>,
    /// The clients' read p95 while healthy (ns), a slow average: when hedged reads go out.
    read_p95_ns: Option<f64>,
}

struct Monitor {
    engine: Engine,
    replication: Option<Arc<Replication>>,
    config: HealthConfig,
    node: String,
    reader: RegionReader,
    previous: Option<Snapshot>,
    volumes: HashMap<String, Tracked>,
    /// Per stats-region queue: what proves its oldest command's age.
    queues: HashMap<usize, OldestOp>,
    shared: Arc<MonitorShared>,
    baselines: PathBuf,
    events: std::fs::File,
    status_file: PathBuf,
    second: u64,
    node_fault: Option<String>,
    /// Volumes with a reparent under way (on its own thread).
    reparenting: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn run(&mut self) {
        let mut next = Instant::now() + WINDOW;
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(100)));
                continue;
            }
            next += WINDOW;
            if next < now {
                next = now + WINDOW;
            }
            self.second += 1;
            self.window();
        }
        for tracked in self.volumes.values() {
            if let Some(probes) = &tracked.probes {
                probes.stop.store(true, Ordering::Release);
            }
        }
    }

    /// One window: every volume judged, the status and events written.
    fn window(&mut self) {
        if let Err(error) = self.reader.refresh() {
            tracing::warn!("health: the stats region cannot be read: {error}");
            return;
        }
        let snapshot = self.reader.snapshot(self.engine.clock().now());
        let directory = self.reader.directory().clone();
        let volumes: HashMap<String, Volume> = self
            .engine
            .volumes()
            .into_iter()
            .map(|volume| (volume.name.clone(), volume))
            .collect();
        let roles: HashMap<String, _> = self
            .replication
            .iter()
            .flat_map(|replication| replication.roles())
            .map(|role| (role.volume.clone(), role))
            .collect();
        // Volumes gone since: their probes end, their state goes.
        self.volumes.retain(|name, tracked| {
            let keep = directory
                .live_volumes()
                .any(|(_, entry)| &entry.name == name && entry.generation == tracked.generation);
            if !keep {
                if let Some(probes) = &tracked.probes {
                    probes.stop.store(true, Ordering::Release);
                }
            }
            keep
        });
        let Some(previous) = self.previous.take() else {
            self.previous = Some(snapshot);
            return;
        };
        self.judge(&directory, &volumes, &roles, &previous, &snapshot);
        self.previous = Some(snapshot);
    }

    fn judge(
        &mut self,
        directory: &fathom_telemetry::region::Directory,
        volumes: &HashMap<String, Volume>,
        roles: &HashMap<String, Arc<fathom_replication::role::VolumeRole>>,
        previous: &Snapshot,
        snapshot: &Snapshot,
    ) {
        let now_ns = (snapshot.taken_ticks as f64 * 1e9 / directory.tsc_hz.max(1) as f64) as u64;
        // Each device queue once per window (volumes on one device and core share it): a
        // lower bound of its oldest command's age, and its idle time.
        let queues: Vec<(u64, f64)> = (0..directory.queues.len())
            .map(|queue| {
                let counters = snapshot.queue(queue);
                let oldest = self.queues.entry(queue).or_default().observe(
                    now_ns,
                    counters.submitted,
                    counters.completed,
                );
                (oldest, queue_idle_pct(previous, snapshot, queue))
            })
            .collect();
        let mut judged = Vec::new();
        for (slot, entry) in directory.live_volumes() {
            let Some(volume) = volumes.get(&entry.name) else {
                continue;
            };
            let Some(signals) = volume_signals(directory, previous, snapshot, slot) else {
                continue;
            };
            if !self.volumes.contains_key(&entry.name) {
                let tracked = self.track(volume, entry.generation);
                self.volumes.insert(entry.name.clone(), tracked);
            }
            let queue = directory.queues.iter().position(|queue| {
                queue.device == volume.device_name
                    && directory.cores.get(queue.core_index as usize).copied()
                        == Some(volume.core as u32)
            });
            let oldest_queue = queue.map_or(0, |queue| queues[queue].0);
            let idle = queue.map(|queue| queues[queue].1);
            let role = roles.get(&entry.name);
            let primary = role.is_some_and(|role| role.primary_here());
            let primary_status = role.and_then(|role| role.primary_status());
            // A replica being caught up: the primary's device reads for it, and the replica
            // writes it, so the peer ratio moves by the resync, not by either device.
            let resyncing = primary_status
                .as_ref()
                .is_some_and(|status| status.peers.iter().any(|peer| !peer.in_sync()));
            let tracked = self.volumes.get_mut(&entry.name).expect("tracked above");
            let role = match role {
                Some(_) if primary => "primary",
                Some(_) => "replica",
                None => "local",
            };
            // A new role is other work (a primary times its clients and replicas, a replica
            // the primary's writes, and its clients' IO forwarded): what was learned in the
            // old one does not hold. The state is kept; what it learned starts again.
            if !tracked.status.role.is_empty() && tracked.status.role != role {
                tracked.detector.relearn();
                tracked.drift = DriftTracker::new(DRIFT_SPAN);
            }
            let mut window = window_of(
                self.second,
                &signals,
                primary,
                oldest_queue,
                tracked,
                self.engine.clock(),
            );
            window.resyncing = resyncing;
            let (sign, reasons) = tracked.detector.judge(&window);
            judged.push(Judged {
                name: entry.name.clone(),
                window,
                signals,
                sign,
                reasons,
                idle,
                role,
                primary_status,
            });
        }
        // Every volume with IO slowed alike is the node's fault, held against none of them:
        // each sick now, suspect (sick a moment ago), or its peer ratio well up though under
        // the limit (the same slowdown lands on either side of it from one volume to the
        // next).
        let with_io: Vec<_> = judged
            .iter()
            .filter(|judged| judged.window.iops > 0.0)
            .collect();
        let slowed = |name: &String, sign: Sign, window: &Window| {
            let detector = &self.volumes[name].detector;
            let elevated = Quantile::ALL.iter().any(|&quantile| {
                detector::peer_ratio(window, quantile)
                    .zip(detector.ratio_baseline(quantile))
                    .is_some_and(|(ratio, baseline)| ratio >= NODE_WIDE_ELEVATION * baseline)
            });
            sign == Sign::Sick || detector.health() == Health::Suspect || elevated
        };
        let any_sick = with_io.iter().any(|judged| judged.sign == Sign::Sick);
        // Once seen, a node fault holds while any volume is still sick: the volumes' own
        // noise must not hand a second of it to one of them.
        let node_wide = with_io.len() >= 2
            && any_sick
            && (self.node_fault.is_some()
                || with_io
                    .iter()
                    .all(|judged| slowed(&judged.name, judged.sign, &judged.window)));
        let fault = node_wide.then(|| {
            format!(
                "every volume with IO is slow alike ({}): a node fault or node-wide load, held against no single volume",
                with_io
                    .iter()
                    .map(|judged| judged.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        if fault.is_some() != self.node_fault.is_some() {
            self.event(serde_json::json!({
                "event": "node-fault",
                "active": fault.is_some(),
                "reasons": fault.iter().collect::<Vec<_>>(),
            }));
        }
        self.node_fault = fault;
        let mut statuses = Vec::new();
        for Judged {
            name,
            window,
            signals,
            sign,
            mut reasons,
            idle,
            role,
            primary_status,
        } in judged
        {
            let (sign, reasons) = match (node_wide, sign) {
                (true, Sign::Sick) => {
                    reasons.push(
                        "every volume of this node is slow alike: counted as the node's, not this volume's"
                            .into(),
                    );
                    (Sign::Busy, reasons)
                }
                _ => (sign, reasons),
            };
            let advise = self.advise_only(&name);
            let tracked = self.volumes.get_mut(&name).expect("tracked");
            let verdict = tracked.detector.apply(&window, sign, reasons);
            let before = tracked.status.health.clone();
            if verdict.health == Health::Healthy && verdict.sign == Sign::Fine {
                if let Some(p95) = signals.read_p95_ns {
                    let learned = tracked.read_p95_ns.unwrap_or(p95);
                    tracked.read_p95_ns = Some(learned + (p95 - learned) * 0.05);
                }
            }
            update_status(
                tracked, &name, role, &verdict, &window, &signals, idle, advise,
            );
            if verdict.changed {
                tracked.status.since = self.second;
                if verdict.health == Health::Degraded {
                    let now = Instant::now();
                    tracked.degradations.push_back(now);
                    while tracked
                        .degradations
                        .front()
                        .is_some_and(|at| now.duration_since(*at) > REPLACE_SPAN)
                    {
                        tracked.degradations.pop_front();
                    }
                }
                let degradations = tracked.degradations.len();
                tracked.status.degradations = degradations;
                let flag = degradations >= REPLACE_AFTER && !tracked.status.replace;
                tracked.status.replace |= flag;
                let event = serde_json::json!({
                    "event": "state",
                    "volume": name,
                    "role": role,
                    "from": before,
                    "to": verdict.health.as_str(),
                    "sign": sign_name(verdict.sign),
                    "window": window,
                    "reasons": verdict.reasons,
                });
                self.event(event);
                if flag {
                    self.event(serde_json::json!({
                        "event": "replace",
                        "volume": name,
                        "reasons": [format!("degraded {degradations} times within {} s: replace its device", REPLACE_SPAN.as_secs())],
                    }));
                }
                if verdict.health == Health::Degraded && role == "primary" {
                    self.reparent(&name, advise);
                }
            }
            if let Some(status) = primary_status.as_ref().filter(|_| role == "primary") {
                self.hedge(&name, status, verdict.health != Health::Healthy && !advise);
            }
            self.canary_interval(&name, snapshot, directory);
            statuses.push(self.volumes[&name].status.clone());
        }
        statuses.sort_by(|a, b| a.volume.cmp(&b.volume));
        let status = NodeHealth {
            node: self.node.clone(),
            second: self.second,
            unix_ms: unix_ms(),
            node_fault: self.node_fault.clone(),
            volumes: statuses,
        };
        self.write_status(&status);
        *self.shared.status.lock() = status;
    }

    /// State for a volume first seen (or seen again in another slot generation): its
    /// detector, canary baseline (from disk if stored) and probes.
    fn track(&mut self, volume: &Volume, generation: u64) -> Tracked {
        let path = self.baseline_path(&volume.name);
        let canary = match std::fs::read_to_string(&path) {
            Ok(text) => Baseline::from_json(&text).unwrap_or_else(|error| {
                tracing::warn!(
                    "health: the canary baseline {} is unusable ({}); learning a new one",
                    path.display(),
                    error.0
                );
                Baseline::new(canary::Settings::default())
            }),
            Err(_) => Baseline::new(canary::Settings::default()),
        };
        let probes = self.start_probes(volume);
        Tracked {
            generation,
            detector: Detector::new(detector::Settings::default()),
            probes,
            smoke_rounds: 0,
            smoke_failures: 0,
            canary,
            canary_failures: 0,
            interval_start: None,
            interval: 0,
            drift: DriftTracker::new(DRIFT_SPAN),
            status: VolumeHealth {
                volume: volume.name.clone(),
                health: Health::Healthy.as_str().into(),
                ..VolumeHealth::default()
            },
            degradations: VecDeque::new(),
            last_reparent: None,
            read_p95_ns: None,
        }
    }

    /// Hedges a primary's reads to its in-sync replicas (`on`), after the read p95 it had
    /// healthy, or stops; an event when that changes. The counts show in its inputs.
    fn hedge(&mut self, name: &str, status: &VolumeStatus, on: bool) {
        let tracked = self.volumes.get_mut(name).expect("tracked");
        let after = on.then(|| {
            Duration::from_nanos(tracked.read_p95_ns.unwrap_or(HEDGE_AFTER_UNLEARNED_NS) as u64)
        });
        let (reads, first) = status.hedged_reads();
        tracked.status.inputs.hedge_after_us = after.map(|after| after.as_secs_f64() * 1e6);
        tracked.status.inputs.hedged_reads = reads;
        tracked.status.inputs.hedge_wins = first;
        if status.hedge_after() == after {
            return;
        }
        status.set_hedge(after);
        self.event(serde_json::json!({
            "event": "hedge",
            "volume": name,
            "active": after.is_some(),
            "reasons": [match after {
                Some(after) => format!(
                    "the primary is {}: a read not answered by its own copy within {:.0} µs (its healthy read p95) is asked of an in-sync replica too",
                    self.volumes[name].status.health,
                    after.as_secs_f64() * 1e6
                ),
                None => "the primary is healthy again (or advise-only): reads are its own copy's".into(),
            }],
            "hedged_reads": reads,
            "replica_first": first,
        }));
    }

    fn start_probes(&self, volume: &Volume) -> Option<Arc<ProbeShared>> {
        let (_, area) = volume.health_area();
        let shared = Arc::new(ProbeShared::default());
        let settings = ProbeSettings {
            canary_period: self.config.canary_period.0,
            smoke_period: self.config.smoke_period.0,
        };
        let task = ProbeTask::new(
            volume.id,
            &volume.name,
            area,
            settings,
            self.engine.dma(),
            *self.engine.clock(),
            shared.clone(),
        );
        match task {
            Ok(Some(task)) => match self.engine.spawn(volume.reactor, Box::new(task)) {
                Ok(()) => Some(shared),
                Err(error) => {
                    tracing::warn!(
                        "health: volume {}: probes not started: {error}",
                        volume.name
                    );
                    None
                }
            },
            Ok(None) => None,
            Err(error) => {
                tracing::warn!("health: {error}");
                None
            }
        }
    }

    fn baseline_path(&self, volume: &str) -> PathBuf {
        self.baselines.join(format!("{volume}.canary.json"))
    }

    fn advise_only(&self, volume: &str) -> bool {
        self.shared
            .advise
            .lock()
            .get(volume)
            .copied()
            .unwrap_or(self.config.actions == HealthActions::Advise)
    }

    /// Each canary interval: the canary's verdict, and the clients' drift.
    fn canary_interval(
        &mut self,
        name: &str,
        snapshot: &Snapshot,
        directory: &fathom_telemetry::region::Directory,
    ) {
        let interval_windows = self.config.canary_interval.0.as_secs().max(1);
        let tracked = self.volumes.get_mut(name).expect("tracked");
        let Some(start) = tracked.interval_start.as_ref() else {
            tracked.interval_start = Some(snapshot.clone());
            return;
        };
        let elapsed = snapshot.taken_ticks.saturating_sub(start.taken_ticks) as f64
            / directory.tsc_hz.max(1) as f64;
        if elapsed + 0.5 < interval_windows as f64 {
            return;
        }
        let Some(slot) = directory
            .live_volumes()
            .find(|(_, entry)| entry.name == name)
            .map(|(slot, _)| slot)
        else {
            return;
        };
        let signals = volume_signals(directory, start, snapshot, slot);
        tracked.interval_start = Some(snapshot.clone());
        let Some(signals) = signals else {
            return;
        };
        tracked.interval += 1;
        let interval = tracked.interval;
        let mut events = Vec::new();
        if let Some(probes) = tracked.probes.clone() {
            let failures = probes.canary_failures.load(Ordering::Relaxed);
            let failed = failures > tracked.canary_failures;
            tracked.canary_failures = failures;
            // Each stage is judged at its median, which a regression of every IO moves at
            // once, and at its p90, which a regression of the slowest tenth moves (red when
            // it holds two intervals: one slow interval of a tail is the machine's noise).
            // Not at its p99: a canary interval's hundreds of rounds put it among the few
            // slowest, where a host's scheduling hiccups alone move it twofold.
            let keys: Vec<(String, f64)> = signals
                .probes
                .iter()
                .flat_map(|stage| {
                    [
                        (format!("{} p50", stage.name), stage.p50_ns),
                        (format!("{} p90", stage.name), stage.p90_ns),
                    ]
                })
                .collect();
            let readings: Vec<Reading> = keys
                .iter()
                .map(|(key, ns)| Reading {
                    key,
                    ns: *ns,
                    persistent: key.ends_with(" p90"),
                })
                .collect();
            let mut verdict = tracked.canary.judge_readings(interval, &readings);
            if failed {
                verdict.red = true;
                verdict.reasons.push(format!(
                    "the canary failed in interval {interval}: {}",
                    probes
                        .last_failure
                        .lock()
                        .clone()
                        .unwrap_or_else(|| "an IO error".into())
                ));
            }
            let was_red = tracked
                .status
                .canary
                .as_ref()
                .is_some_and(|canary| canary.red);
            let stages = signals
                .probes
                .iter()
                .map(|stage| {
                    let band = |at: &str| tracked.canary.band(&format!("{} {at}", stage.name));
                    let (p50, p90) = (band("p50"), band("p90"));
                    CanaryStage {
                        stage: stage.name.clone(),
                        p50_us: stage.p50_ns / 1e3,
                        p90_us: stage.p90_ns / 1e3,
                        p99_us: stage.p99_ns / 1e3,
                        baseline_p50_us: p50.map(|(baseline, _)| baseline / 1e3),
                        band_p50_us: p50.map(|(_, noise)| noise / 1e3),
                        baseline_p90_us: p90.map(|(baseline, _)| baseline / 1e3),
                        band_p90_us: p90.map(|(_, noise)| noise / 1e3),
                    }
                })
                .collect();
            if verdict.red != was_red {
                events.push(serde_json::json!({
                    "event": "canary",
                    "volume": name,
                    "red": verdict.red,
                    "interval": interval,
                    "reasons": verdict.reasons,
                }));
            }
            tracked.status.canary = Some(CanaryStatus {
                interval,
                red: verdict.red,
                reasons: verdict.reasons,
                learning: verdict.learning,
                rounds: probes.canary_rounds.load(Ordering::Relaxed),
                failures,
                stages,
            });
        }
        let red = tracked
            .status
            .canary
            .as_ref()
            .is_some_and(|canary| canary.red);
        let drift = tracked.drift.observe(&signals.shape);
        let cause = classify(
            red,
            drift.as_ref(),
            tracked.detector.health() != Health::Healthy,
        );
        let reasons = drift.map(|drift| drift.reasons).unwrap_or_default();
        if reasons.is_empty() != tracked.status.drift.is_empty() {
            events.push(serde_json::json!({
                "event": "drift",
                "volume": name,
                "active": !reasons.is_empty(),
                "interval": interval,
                "reasons": reasons,
                "shape": signals.shape,
            }));
        }
        tracked.status.drift = reasons;
        tracked.status.cause = match cause {
            Cause::Regression => "regression",
            Cause::Drift => "drift",
            Cause::Load => "load",
        }
        .into();
        let json = tracked.canary.to_json();
        let path = self.baseline_path(name);
        if let Err(error) = write_atomically(&path, json.as_bytes()) {
            tracing::warn!(
                "health: cannot store the canary baseline {}: {error}",
                path.display()
            );
        }
        for event in events {
            self.event(event);
        }
    }

    /// A degraded primary: reparented to its fastest in-sync replica if two healthy copies
    /// remain, on its own thread (it pauses the volume's IO for a moment).
    fn reparent(&mut self, name: &str, advise: bool) {
        let Some(replication) = self.replication.clone() else {
            return;
        };
        let tracked = &self.volumes[name];
        let replicas = &tracked.status.inputs.replicas;
        let role = replication
            .roles()
            .into_iter()
            .find(|role| role.volume == name);
        let in_sync: Vec<String> = role
            .and_then(|role| role.primary_status())
            .map(|status| {
                status
                    .peers
                    .iter()
                    .filter(|peer| {
                        peer.in_sync() && peer.state() == fathom_replication::layer::PeerState::Open
                    })
                    .map(|peer| peer.node.clone())
                    .collect()
            })
            .unwrap_or_default();
        // A replica counts as a healthy copy while its session is open and it is in sync
        // (it has every write); the fastest of them for the same writes (at the median: the
        // tail is the CPU's as much as the device's) is the target.
        let healthy: Vec<(String, f64)> = in_sync
            .iter()
            .map(|node| {
                let p50 = replicas
                    .iter()
                    .find(|replica| &replica.node == node)
                    .map_or(f64::INFINITY, |replica| replica.latency.p50_us);
                (node.clone(), p50)
            })
            .collect();
        let target = healthy
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(node, _)| node.clone());
        let cooling = tracked
            .last_reparent
            .is_some_and(|at| at.elapsed() < REPARENT_COOLDOWN);
        let busy = self.reparenting.lock().iter().any(|volume| volume == name);
        let refusal = match (&target, healthy.len()) {
            _ if busy => Some("a reparent of this volume is already under way".to_string()),
            _ if cooling => Some(format!(
                "it was reparented less than {} s ago",
                REPARENT_COOLDOWN.as_secs()
            )),
            (None, _) | (_, 0..=1) => Some(format!(
                "that would leave fewer than two healthy copies (healthy in-sync replicas: {})",
                match healthy.is_empty() {
                    true => "none".to_string(),
                    false => healthy
                        .iter()
                        .map(|(node, _)| node.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            )),
            _ => None,
        };
        let to = target.unwrap_or_default();
        let (action, done) = match (&refusal, advise) {
            (Some(why), _) => (format!("no reparent: {why}"), false),
            (None, true) => (
                format!("advise: reparent to {to} (advise-only volume)"),
                false,
            ),
            (None, false) => (format!("reparent to {to}"), true),
        };
        let second = self.second;
        let tracked = self.volumes.get_mut(name).expect("tracked");
        tracked.status.last_action = Some(format!("{action} (window {second})"));
        if done {
            tracked.last_reparent = Some(Instant::now());
        }
        let event = serde_json::json!({
            "event": "action",
            "volume": name,
            "action": "reparent",
            "to": to,
            "taken": done,
            "reasons": [action],
        });
        self.event(event);
        if !done {
            return;
        }
        self.reparenting.lock().push(name.to_string());
        let (reparenting, volume) = (self.reparenting.clone(), name.to_string());
        let log = self.events.try_clone();
        let node = self.node.clone();
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("health-reparent".into())
            .spawn(move || {
                let result = replication.reparent(&volume, &to);
                let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                let event = match &result {
                    Ok(done) => serde_json::json!({
                        "event": "reparented",
                        "volume": volume,
                        "to": done.to,
                        "epoch": done.epoch,
                        "elapsed_ms": elapsed_ms,
                        "paused_ms": done.paused.as_secs_f64() * 1e3,
                    }),
                    Err(error) => serde_json::json!({
                        "event": "reparent-failed",
                        "volume": volume,
                        "to": to,
                        "elapsed_ms": elapsed_ms,
                        "reasons": [error.to_string()],
                    }),
                };
                match &result {
                    Ok(_) => tracing::info!(
                        "health: volume {volume} reparented to {to} in {elapsed_ms:.0} ms"
                    ),
                    Err(error) => tracing::warn!(
                        "health: reparent of volume {volume} to {to} failed: {error}"
                    ),
                }
                if let Ok(mut log) = log {
                    let _ = writeln!(log, "{}", stamp_event(&node, event));
                }
                reparenting.lock().retain(|name| name != &volume);
            });
        if let Err(error) = spawned {
            tracing::warn!("health: cannot start the reparent of {name}: {error}");
            self.reparenting.lock().retain(|volume| volume != name);
        }
    }

    fn event(&mut self, event: serde_json::Value) {
        let mut event = stamp_event(&self.node, event);
        event["second"] = self.second.into();
        tracing::info!("health: {event}");
        if let Err(error) = writeln!(self.events, "{event}") {
            tracing::warn!("health: cannot write the event log: {error}");
        }
    }

    fn write_status(&self, status: &NodeHealth) {
        let json = serde_json::to_vec(status).expect("the status serialises");
        if let Err(error) = write_atomically(&self.status_file, &json) {
            tracing::warn!(
                "health: cannot write the status file {}: {error}",
                self.status_file.display()
            );
        }
    }
}

/// The detector's window of one volume.
fn window_of(
    second: u64,
    signals: &VolumeSignals,
    primary: bool,
    oldest_queue_ns: u64,
    tracked: &mut Tracked,
    clock: &fathom_telemetry::Clock,
) -> Window {
    let (mut smoke_ns, mut smoke_failed, mut oldest) = (None, false, oldest_queue_ns);
    if let Some(probes) = &tracked.probes {
        let rounds = probes.smoke_rounds.load(Ordering::Acquire);
        let failures = probes.smoke_failures.load(Ordering::Relaxed);
        if rounds > tracked.smoke_rounds {
            smoke_ns = Some(probes.smoke_last_ns.load(Ordering::Relaxed));
        }
        let since = probes.smoke_since.load(Ordering::Acquire);
        if since != 0 {
            let age = clock.ticks_to_ns(clock.now().saturating_sub(since));
            oldest = oldest.max(age);
            // A smoke write still out counts as at least as slow as it is old.
            smoke_ns = Some(smoke_ns.unwrap_or(0).max(age));
        }
        smoke_failed = failures > tracked.smoke_failures;
        tracked.smoke_rounds = rounds;
        tracked.smoke_failures = failures;
    }
    let replicated = primary && !signals.replicas.is_empty();
    Window {
        second,
        iops: signals.iops(),
        p99_ns: signals.p99_ns,
        depth: signals.depth,
        local_write: signals.local_write.filter(|_| replicated),
        replica_writes: match replicated {
            true => signals
                .replicas
                .iter()
                .map(|replica| replica.write)
                .collect(),
            false => Vec::new(),
        },
        oldest_op_ns: oldest,
        smoke_ns,
        smoke_failed,
        // Set by the caller, which knows the replicas.
        resyncing: false,
    }
}

#[allow(clippy::too_many_arguments)]
fn update_status(
    tracked: &mut Tracked,
    name: &str,
    role: &str,
    verdict: &detector::Verdict,
    window: &Window,
    signals: &VolumeSignals,
    idle: Option<f64>,
    advise: bool,
) {
    let us = |ns: f64| ns / 1e3;
    let status = &mut tracked.status;
    status.volume = name.to_string();
    status.role = role.to_string();
    status.health = verdict.health.as_str().into();
    status.sign = sign_name(verdict.sign).into();
    status.reasons = verdict.reasons.clone();
    status.advise_only = advise;
    status.inputs = Inputs {
        read_iops: signals.read_iops,
        write_iops: signals.write_iops,
        read_bytes_per_s: signals.read_bytes_per_s,
        write_bytes_per_s: signals.write_bytes_per_s,
        read_p99_us: signals.read_p99_ns.map(us),
        write_p99_us: signals.write_p99_ns.map(us),
        p99_us: signals.p99_ns.map(us),
        depth: signals.depth,
        errors: signals.errors,
        device_idle_pct: idle,
        local_write: window.local_write.map(LatencyUs::from),
        replicas: signals
            .replicas
            .iter()
            .map(|replica| ReplicaInput {
                node: replica.node.clone(),
                writes: replica.writes,
                latency: replica.write.into(),
            })
            .collect(),
        // On a primary with replicas: learned, or learning from this window's writes.
        peer_ratios: match window.local_write.is_some()
            || tracked.detector.ratio_baseline(Quantile::P50).is_some()
        {
            false => Vec::new(),
            true => Quantile::ALL
                .iter()
                .map(|&quantile| PeerRatio {
                    quantile,
                    ratio: detector::peer_ratio(window, quantile),
                    baseline: tracked.detector.ratio_baseline(quantile),
                })
                .collect(),
        },
        model_points: tracked.detector.model().len(),
        model_max_iops: tracked.detector.model().max_iops(),
        typical_depth: tracked.detector.typical_depth(),
        oldest_op_ms: window.oldest_op_ns as f64 / 1e6,
        smoke_ms: window.smoke_ns.map(|ns| ns as f64 / 1e6),
        smoke_rounds: tracked.smoke_rounds,
        smoke_failures: tracked.smoke_failures,
        // A primary's: filled in by `hedge`.
        hedge_after_us: None,
        hedged_reads: 0,
        hedge_wins: 0,
    };
}

fn sign_name(sign: Sign) -> &'static str {
    match sign {
        Sign::Fine => "fine",
        Sign::Busy => "busy",
        Sign::Sick => "sick",
        Sign::Stuck => "stuck",
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn stamp_event(node: &str, mut event: serde_json::Value) -> serde_json::Value {
    event["unix_ms"] = unix_ms().into();
    event["node"] = node.into();
    event
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader sees
/// the old contents or the new, never a part.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
