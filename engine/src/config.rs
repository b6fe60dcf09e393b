//! The node's configuration: TOML, validated once at start.
//!
//! Parsing (unknown keys, wrong types, unknown variants) is serde's and names the line and the
//! key; [`Config::validate`] then checks what types cannot say (sizes that fit, names that
//! exist, cores that exist) and names the key, the value and what is allowed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use fathom_drivers::inject::{parse_duration, InjectRule, InjectedError, LatencySpec, OpName};
pub use fathom_drivers::mem::{DeviceMode, MediaKind, MemOptions};
use fathom_drivers::uring::UringOptions;
use fathom_drivers::vfio::VfioOptions;

/// The embedded default: one node, one `mem` device with `file` media, one volume.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/single-node.toml");

/// At most this many devices per node (a reactor keeps one bit in its doorbell mask for each,
/// and one for each device's stub).
pub const MAX_DEVICES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML for fathom: {0}")]
    Parse(String),
    #[error("config key `{key}` = {value} is not allowed: {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    allowed: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub dma: DmaConfig,
    #[serde(default)]
    pub reactor: ReactorConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(rename = "device", default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeConfig>,
    /// The nodes of this node's cluster (`[[cluster.node]]`), for replicated volumes.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// This node's replica service and the peers' authentication (`[replication]`).
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Volume health: probes, canaries, the detector and its actions (`[health]`).
    #[serde(default)]
    pub health: HealthConfig,
}

/// `[health]`: every volume's health, judged each second from the node's own telemetry
/// (so it needs `[telemetry] enabled`), with probes in each replicated volume's health area.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Default: on when telemetry is.
    pub enabled: Option<bool>,
    /// A canary round (a 4 KiB write, then a read of it back) starts every period; `"0s"`:
    /// no canary.
    #[serde(default = "HealthConfig::default_canary_period")]
    pub canary_period: DurationValue,
    /// The canaries' verdict interval: each stage's p99 over it against its baseline.
    #[serde(default = "HealthConfig::default_canary_interval")]
    pub canary_interval: DurationValue,
    /// A smoke write (4 KiB, read back and compared) every period; `"0s"`: none.
    #[serde(default = "HealthConfig::default_smoke_period")]
    pub smoke_period: DurationValue,
    /// What the detector's verdicts do: `"act"` (hedge, reparent, stop waiting on a
    /// degraded replica) or `"advise"` (log what it would do, and do nothing).
    #[serde(default)]
    pub actions: HealthActions,
    /// Volumes whose actions are advise-only whatever `actions` says.
    #[serde(default)]
    pub advise: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthActions {
    #[default]
    Act,
    Advise,
}

impl HealthConfig {
    /// Whether health runs: as configured, else when telemetry does.
    pub fn enabled(&self, telemetry: bool) -> bool {
        self.enabled.unwrap_or(telemetry)
    }
    fn default_canary_period() -> DurationValue {
        DurationValue(Duration::from_millis(10))
    }
    fn default_canary_interval() -> DurationValue {
        DurationValue(Duration::from_secs(5))
    }
    fn default_smoke_period() -> DurationValue {
        DurationValue(Duration::from_secs(1))
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            canary_period: Self::default_canary_period(),
            canary_interval: Self::default_canary_interval(),
            smoke_period: Self::default_smoke_period(),
            actions: HealthActions::Act,
            advise: Vec::new(),
        }
    }
}

/// `[cluster]`: the nodes replicated volumes are placed on. Every node of a cluster has the
/// same list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Peers of another cluster are refused.
    #[serde(default)]
    pub name: String,
    #[serde(rename = "node", default)]
    pub nodes: Vec<ClusterNode>,
    /// The control plane: etcd members (`host:port`). Empty (the default): no control plane;
    /// a volume's primary is the one its metadata names, moved by `fathom-ctl`.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// This node's etcd lease (whole seconds, at least 1): a primary that cannot renew it
    /// stops acknowledging IO before it runs out, and once it has, an in-sync replica takes
    /// the volume over.
    #[serde(default = "ClusterConfig::default_lease")]
    pub lease: DurationValue,
    /// `[cluster.pool]`: where volumes made through the control plane (`fathom-ctl volume
    /// create`) live on this node. None: this node holds only its configured volumes.
    pub pool: Option<PoolConfig>,
}

/// `[cluster.pool]`: the device space this node gives to volumes the control plane creates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The device whose namespace 1, less the ranges of `[[volume]]`s, holds them.
    pub device: String,
    /// How many such volumes this node can hold at once (each takes a slot of the stats
    /// region, with its histograms, whether used or not).
    #[serde(default = "PoolConfig::default_volumes")]
    pub volumes: usize,
}

impl PoolConfig {
    fn default_volumes() -> usize {
        16
    }

    /// At most this many pool volumes per node.
    pub const MAX_VOLUMES: usize = 256;
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            nodes: Vec::new(),
            etcd: Vec::new(),
            lease: Self::default_lease(),
            pool: None,
        }
    }
}

impl ClusterConfig {
    fn default_lease() -> DurationValue {
        DurationValue(std::time::Duration::from_secs(2))
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub id: String,
    /// Where its replica service listens (`[replication] listen` on that node).
    pub replication: String,
    /// Where it serves NBD (for operators and clients; forwarding uses `replication`).
    pub nbd: Option<String>,
}

/// `[replication]`: this node's replica service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Addresses the replica service listens on (loopback unless listed otherwise).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Mutual TLS between peers: the cluster's CA, and this node's certificate and key.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Or a cluster key (at least 32 bytes, the same file on every node) for a
    /// challenge-response when peers connect.
    pub key_file: Option<PathBuf>,
    /// Resync and reconciliation work per region of this size; the dirty bitmaps have a bit
    /// per region.
    #[serde(default = "ReplicationConfig::default_region_size")]
    pub region_size: ByteSize,
    /// Resync bytes per second to one replica (a returning or new replica is caught up in
    /// the background); 0 (the default): as fast as the disks and the network go.
    #[serde(default)]
    pub resync_rate: ByteSize,
    /// The client write p99 a resync keeps to (`"5ms"`): the resync's rate halves in each
    /// 100 ms window whose client writes had a higher p99, and grows while they are well
    /// within it (never above `resync_rate`, if set, nor below 1 MiB/s). Unset: no bound.
    #[serde(default)]
    pub resync_p99: Option<DurationValue>,
}

impl ReplicationConfig {
    fn default_region_size() -> ByteSize {
        ByteSize(1 << 20)
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            key_file: None,
            region_size: Self::default_region_size(),
            resync_rate: ByteSize(0),
            resync_p99: None,
        }
    }
}

/// Metadata blocks (4 KiB) a replicated volume keeps after its data: two superblocks, a
/// dirty-region bitmap for each of up to 7 replicas, then the health area.
pub const METADATA_BLOCK_BYTES: u64 = 4096;
pub const MAX_REPLICAS: usize = 7;
/// The health area, the last bytes of a replicated volume's metadata: the node's health
/// probes (the smoke write, the canaries) write and read there, never in the clients' data.
pub const HEALTH_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Names the node in logs and in the shared-memory stats region.
    pub id: String,
    /// Where `file` media live when their path is relative.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaConfig {
    /// DMA memory reserved at start for queue rings, PRP lists and IO buffers.
    #[serde(default = "DmaConfig::default_size")]
    pub size: ByteSize,
    /// Back DMA memory with 2 MiB hugepages (the default). `false` uses normal pages, which
    /// is slower and only meant for hosts that cannot reserve hugepages.
    #[serde(default = "yes")]
    pub hugepages: bool,
}

impl DmaConfig {
    fn default_size() -> ByteSize {
        ByteSize(64 << 20)
    }
}

impl Default for DmaConfig {
    fn default() -> Self {
        Self {
            size: Self::default_size(),
            hugepages: true,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Poll without pause, as SPDK does: lowest latency, one full core per reactor.
    Busy,
    /// Poll while there is work; after a short idle spell park until work arrives.
    Adaptive,
    /// Adaptive, for a core this reactor shares with other busy threads (several nodes on
    /// one machine): after a loop with nothing done (idle, or only waiting: for a device that
    /// cannot notify, a peer's answer a layer holds IO for, a full queue) it yields the core
    /// (`sched_yield`), so that a reactor beside it with work runs first. About a
    /// microsecond more to see new work when the core is its own.
    Shared,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorConfig {
    /// CPU cores to run one reactor on each, pinned.
    #[serde(default = "ReactorConfig::default_cores")]
    pub cores: Vec<usize>,
    #[serde(default = "ReactorConfig::default_poll")]
    pub poll: PollMode,
    /// Commands in flight per device queue pair (the NVMe queues get one more entry).
    #[serde(default = "ReactorConfig::default_queue_depth")]
    pub queue_depth: u16,
    /// Requests from other threads waiting for a reactor, per reactor.
    #[serde(default = "ReactorConfig::default_inbound")]
    pub inbound_capacity: usize,
    /// How long an adaptive reactor spins with nothing to do before it parks.
    #[serde(default = "ReactorConfig::default_idle_spin")]
    pub idle_spin: DurationValue,
}

impl ReactorConfig {
    fn default_cores() -> Vec<usize> {
        vec![0]
    }
    fn default_poll() -> PollMode {
        PollMode::Adaptive
    }
    fn default_queue_depth() -> u16 {
        255
    }
    fn default_inbound() -> usize {
        4096
    }
    fn default_idle_spin() -> DurationValue {
        DurationValue(Duration::from_micros(200))
    }
}

impl Default for ReactorConfig {
    fn default() -> Self {
        Self {
            cores: Self::default_cores(),
            poll: Self::default_poll(),
            queue_depth: Self::default_queue_depth(),
            inbound_capacity: Self::default_inbound(),
            idle_spin: Self::default_idle_spin(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockChoice {
    /// The CPU's invariant TSC (refused, with an explanation, on CPUs without one).
    Tsc,
    /// CLOCK_MONOTONIC: slower to read, always available.
    Monotonic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Stage stamps and the shared-memory stats region. Meant to stay on.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "TelemetryConfig::default_clock")]
    pub clock: ClockChoice,
    /// The shared-memory stats region (default `/dev/shm/fathom-<node.id>`).
    pub region: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint; `""` turns it off.
    #[serde(default = "TelemetryConfig::default_metrics")]
    pub metrics: String,
    /// End-to-end tracing of sampled and slow IOs (`[telemetry.trace]`).
    #[serde(default)]
    pub trace: TraceConfig,
}

/// `[telemetry.trace]`: which IOs are traced, into per-core span rings in shared memory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    /// Span rings and sampling; needs telemetry (the stamps it records are telemetry's).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Head sampling: one IO in `rate` per core is traced (0: none).
    #[serde(default = "TraceConfig::default_rate")]
    pub rate: u32,
    /// Tail sampling: every IO slower than this is traced: a duration (`"1ms"`), `"p99.9"`
    /// (the volume's own p99.9 of `total` per op, over its last 1000 IOs or more), or `"off"`.
    #[serde(default = "TraceConfig::default_tail")]
    pub tail: TailThreshold,
    /// Records per core's ring (a power of two): the newest are kept.
    #[serde(default = "TraceConfig::default_ring")]
    pub ring: u32,
    /// The trace region (default: the stats region's path with `.trace` added).
    pub region: Option<PathBuf>,
}

impl TraceConfig {
    fn default_rate() -> u32 {
        1024
    }
    fn default_tail() -> TailThreshold {
        TailThreshold::Above(Duration::from_millis(1))
    }
    fn default_ring() -> u32 {
        4096
    }
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rate: Self::default_rate(),
            tail: Self::default_tail(),
            ring: Self::default_ring(),
            region: None,
        }
    }
}

/// The tail-sampling threshold: a duration with a unit, `"p99.9"`, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailThreshold {
    Off,
    Above(Duration),
    /// The volume's current p99.9 of `total`, per op, from its own histograms.
    P999,
}

impl TailThreshold {
    /// Parses what the config and `fathom-ctl trace set --tail` take.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(TailThreshold::Off),
            "p99.9" => Ok(TailThreshold::P999),
            _ => parse_duration(text).map(TailThreshold::Above).map_err(|error| {
                format!("{error}, or \"p99.9\" (the volume's own p99.9), or \"off\" for no tail sampling")
            }),
        }
    }
}

impl std::fmt::Display for TailThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TailThreshold::Off => f.write_str("off"),
            TailThreshold::P999 => f.write_str("p99.9"),
            // In the units the parser takes back (ns, us, ms, s), exactly.
            TailThreshold::Above(duration) => {
                let ns = duration.as_nanos();
                match ns {
                    _ if ns >= 1_000_000_000 && ns % 1_000_000_000 == 0 => {
                        write!(f, "{}s", ns / 1_000_000_000)
                    }
                    _ if ns >= 1_000_000 && ns % 1_000_000 == 0 => {
                        write!(f, "{}ms", ns / 1_000_000)
                    }
                    _ if ns >= 1_000 && ns % 1_000 == 0 => write!(f, "{}us", ns / 1_000),
                    _ => write!(f, "{ns}ns"),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for TailThreshold {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TailThreshold::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl TelemetryConfig {
    fn default_clock() -> ClockChoice {
        ClockChoice::Tsc
    }
    fn default_metrics() -> String {
        "127.0.0.1:9480".into()
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            clock: Self::default_clock(),
            region: None,
            metrics: Self::default_metrics(),
            trace: TraceConfig::default(),
        }
    }
}

/// The NBD front end: every volume is an export of the same name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Addresses to listen on; `[]` serves nothing. Default: NBD's registered port on
    /// loopback only.
    #[serde(default = "NbdConfig::default_listen")]
    pub listen: Vec<String>,
    /// Connections served at once; more are accepted and closed with a logged reason.
    #[serde(default = "NbdConfig::default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may have in flight; further requests wait in the socket.
    #[serde(default = "NbdConfig::default_max_in_flight")]
    pub max_in_flight: usize,
    /// TLS (NBD_OPT_STARTTLS): the server's certificate chain and private key, PEM files
    /// (relative paths from where fathom-node runs). Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With a certificate: clients must start TLS before anything else, as with qemu-nbd
    /// --tls-creds. `false` lets clients choose.
    #[serde(default = "yes")]
    pub tls_required: bool,
}

impl NbdConfig {
    pub const DEFAULT_PORT: u16 = 10809;
    fn default_listen() -> Vec<String> {
        vec![format!("127.0.0.1:{}", Self::DEFAULT_PORT)]
    }
    fn default_max_connections() -> usize {
        256
    }
    fn default_max_in_flight() -> usize {
        128
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            max_connections: Self::default_max_connections(),
            max_in_flight: Self::default_max_in_flight(),
            tls_cert: None,
            tls_key: None,
            tls_required: true,
        }
    }
}

/// `dddd:bb:dd.f` (or `bb:dd.f`), hexadecimal, as sysfs names PCI functions.
fn is_pci_address(text: &str) -> bool {
    let hex =
        |part: &str, len: usize| part.len() == len && part.chars().all(|c| c.is_ascii_hexdigit());
    let parts: Vec<&str> = text.split(':').collect();
    let (domain, bus, rest) = match parts.as_slice() {
        [domain, bus, rest] => (Some(*domain), *bus, *rest),
        [bus, rest] => (None, *bus, *rest),
        _ => return false,
    };
    let Some((device, function)) = rest.split_once('.') else {
        return false;
    };
    domain.is_none_or(|domain| hex(domain, 4))
        && hex(bus, 2)
        && hex(device, 2)
        && function.len() == 1
        && matches!(function.chars().next(), Some('0'..='7'))
}

impl Config {
    /// Where the node's stats region lives.
    pub fn region_path(&self) -> PathBuf {
        self.telemetry
            .region
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/fathom-{}", self.node.id)))
    }

    /// The trace region's path: `[telemetry.trace] region`, or the stats region's with
    /// `.trace` added.
    pub fn trace_region_path(&self) -> PathBuf {
        self.telemetry
            .trace
            .region
            .clone()
            .unwrap_or_else(|| fathom_telemetry::trace::region_beside(&self.region_path()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// The in-process NVMe controller.
    Mem,
    /// io_uring on a file or block device, with O_DIRECT: the kernel path.
    Uring,
    /// An NVMe controller driven from userspace through VFIO (kernel bypass).
    Vfio,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    pub driver: DriverKind,
    /// `mem` only: null, ram or file.
    pub media: Option<MediaKind>,
    /// `mem` only: where the controller runs.
    #[serde(default = "DeviceConfig::default_mode")]
    pub mode: DeviceMode,
    /// Size of the device's one namespace. Required for `mem`; for `uring` it defaults to the
    /// file's or block device's size (a missing file is created at this size).
    pub size: Option<ByteSize>,
    #[serde(default = "DeviceConfig::default_block_size")]
    pub block_size: u32,
    /// `mem` with `file` media: the backing file (default `<name>.img`). `uring`: the file or
    /// block device (required). Relative paths are under `node.data_dir`.
    pub path: Option<PathBuf>,
    /// `vfio` only: the controller's PCI address, e.g. "0000:00:04.0" (bound to vfio-pci,
    /// see `fathom-node devices`).
    pub pci: Option<String>,
    /// `uring` only: a kernel thread polls the submission queue (no system call per batch).
    #[serde(default)]
    pub sqpoll: bool,
    /// `uring` only: completions are polled from the device instead of interrupt driven
    /// (block devices with poll queues, such as NVMe with `nvme.poll_queues` > 0).
    #[serde(default)]
    pub iopoll: bool,
    /// Latency and error injection rules, applied in order; every matching rule applies.
    #[serde(default)]
    pub inject: Vec<InjectRule>,
}

impl DeviceConfig {
    /// The `mem` driver's options (validated: `mem` devices have media and a size).
    pub fn mem_options(&self, data_dir: &std::path::Path) -> MemOptions {
        MemOptions {
            name: self.name.clone(),
            media: self.media.expect("validated: mem devices have media"),
            mode: self.mode,
            size: self.size.expect("validated: mem devices have a size").0,
            block_size: self.block_size,
            path: data_dir.join(
                self.path
                    .clone()
                    .unwrap_or_else(|| format!("{}.img", self.name).into()),
            ),
            inject: self.inject.clone(),
        }
    }

    /// The `uring` driver's options (validated: `uring` devices have a path).
    pub fn uring_options(&self, data_dir: &std::path::Path) -> UringOptions {
        UringOptions {
            name: self.name.clone(),
            path: data_dir.join(
                self.path
                    .as_ref()
                    .expect("validated: uring devices have a path"),
            ),
            size: self.size.map(|size| size.0),
            block_size: self.block_size,
            sqpoll: self.sqpoll,
            iopoll: self.iopoll,
        }
    }

    /// The `vfio` driver's options (validated: `vfio` devices have a PCI address).
    pub fn vfio_options(&self) -> VfioOptions {
        VfioOptions {
            name: self.name.clone(),
            pci: self
                .pci
                .clone()
                .expect("validated: vfio devices have a PCI address"),
        }
    }

    fn default_mode() -> DeviceMode {
        DeviceMode::Inline
    }
    fn default_block_size() -> u32 {
        512
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub device: String,
    #[serde(default = "VolumeConfig::default_nsid")]
    pub nsid: u32,
    /// Byte offset of the volume in the namespace (a multiple of the block size).
    #[serde(default)]
    pub offset: ByteSize,
    pub size: ByteSize,
    /// The reactor core that owns the volume's IO (default: spread over the cores in order).
    pub core: Option<usize>,
    /// Layers replaced by their loopback stubs from the start: engine, queue, device, media
    /// (`fathom-ctl stub` changes them while the node runs).
    #[serde(default)]
    pub stub: Vec<crate::layer::LayerName>,
    /// This volume's own head rate and tail threshold (`[volume.trace]`), instead of
    /// `[telemetry.trace]`'s.
    #[serde(default)]
    pub trace: VolumeTraceConfig,
    /// The nodes that hold a copy (ids of `[[cluster.node]]`, this node among them); empty
    /// for a volume of this node only.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The primary of its first epoch (default: the first replica). Later epochs are in the
    /// volume's metadata.
    pub primary: Option<String>,
}

impl VolumeConfig {
    /// Bytes of crash-safe metadata a replicated volume keeps right after its data: two
    /// superblocks, one dirty-region bitmap per possible replica (a bit per `region_size`
    /// bytes) and the health area ([`HEALTH_BYTES`]). 0 for a volume that is not replicated.
    pub fn metadata_bytes(&self, region_size: u64) -> u64 {
        if self.replicas.is_empty() {
            return 0;
        }
        metadata_bytes(self.size.0, region_size)
    }
}

/// Bytes of metadata a replicated volume of `size` bytes keeps after its data (see
/// [`VolumeConfig::metadata_bytes`]).
pub fn metadata_bytes(size: u64, region_size: u64) -> u64 {
    let regions = size.div_ceil(region_size.max(1));
    let bitmap_blocks = regions.div_ceil(METADATA_BLOCK_BYTES * 8);
    (2 + MAX_REPLICAS as u64 * bitmap_blocks) * METADATA_BLOCK_BYTES + HEALTH_BYTES
}

/// `[volume.trace]`: a volume's sampling, where it differs from `[telemetry.trace]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeTraceConfig {
    pub rate: Option<u32>,
    pub tail: Option<TailThreshold>,
}

impl VolumeConfig {
    fn default_nsid() -> u32 {
        1
    }
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        Self::parse(DEFAULT_CONFIG).expect("the embedded default config is valid")
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|error| ConfigError::Parse(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything the types cannot.
    fn validate_health(&self) -> Result<(), ConfigError> {
        let health = &self.health;
        let canary = health.canary_period.0;
        if !canary.is_zero()
            && !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&canary)
        {
            return Err(invalid(
                "health.canary_period",
                format!("{canary:?}"),
                "from 1ms to 10s (a canary round every period), or \"0s\" for no canary",
            ));
        }
        let interval = health.canary_interval.0;
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&interval)
            || (!canary.is_zero() && interval < canary * 10)
        {
            return Err(invalid(
                "health.canary_interval",
                format!("{interval:?}"),
                "from 1s to 600s, and at least 10 canary periods (a p99 needs rounds)",
            ));
        }
        let smoke = health.smoke_period.0;
        if !smoke.is_zero()
            && !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&smoke)
        {
            return Err(invalid(
                "health.smoke_period",
                format!("{smoke:?}"),
                "from 100ms to 60s, or \"0s\" for no smoke write",
            ));
        }
        if health.enabled == Some(true) && !self.telemetry.enabled {
            return Err(invalid(
                "health.enabled",
                "true",
                "health is judged from telemetry: set [telemetry] enabled = true, or [health] enabled = false",
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id.is_empty()
            || !self
                .node
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "node.id",
                format!("{:?}", self.node.id),
                "use letters, digits, '-' and '_' (it names /dev/shm/fathom-<id>)",
            ));
        }
        if !self.telemetry.metrics.is_empty()
            && self
                .telemetry
                .metrics
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(invalid(
                "telemetry.metrics",
                format!("{:?}", self.telemetry.metrics),
                "an IP address and port such as \"127.0.0.1:9480\", or \"\" for no endpoint",
            ));
        }
        self.validate_health()?;
        let trace = &self.telemetry.trace;
        if !trace.ring.is_power_of_two() || trace.ring > 1 << 20 {
            return Err(invalid(
                "telemetry.trace.ring",
                trace.ring.to_string(),
                "records per core's ring: a power of two from 1 to 1048576 (each is 256 bytes)",
            ));
        }
        for (index, listen) in self.nbd.listen.iter().enumerate() {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    format!("nbd.listen[{index}]"),
                    format!("{listen:?}"),
                    "an IP address and port such as \"127.0.0.1:10809\" (NBD's registered port)",
                ));
            }
        }
        if !(1..=65536).contains(&self.nbd.max_connections) {
            return Err(invalid(
                "nbd.max_connections",
                self.nbd.max_connections,
                "1 to 65536",
            ));
        }
        match (&self.nbd.tls_cert, &self.nbd.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    if self.nbd.tls_cert.is_some() {
                        "nbd.tls_key"
                    } else {
                        "nbd.tls_cert"
                    },
                    "(missing)",
                    "set both nbd.tls_cert and nbd.tls_key (PEM files), or neither",
                ))
            }
            _ => {}
        }
        if !(1..=4096).contains(&self.nbd.max_in_flight) {
            return Err(invalid(
                "nbd.max_in_flight",
                self.nbd.max_in_flight,
                "1 to 4096",
            ));
        }
        if self.dma.size.0 < 4 << 20 {
            return Err(invalid("dma.size", self.dma.size, "at least 4MiB"));
        }
        let online = online_cpus();
        if self.reactor.cores.is_empty() {
            return Err(invalid("reactor.cores", "[]", "list at least one core"));
        }
        for (index, &core) in self.reactor.cores.iter().enumerate() {
            if core >= online {
                return Err(invalid(
                    format!("reactor.cores[{index}]"),
                    core,
                    format!("this machine has cores 0..={}", online - 1),
                ));
            }
            if self.reactor.cores[..index].contains(&core) {
                return Err(invalid(
                    format!("reactor.cores[{index}]"),
                    core,
                    "each core at most once",
                ));
            }
        }
        if !(1..=4095).contains(&self.reactor.queue_depth) {
            return Err(invalid(
                "reactor.queue_depth",
                self.reactor.queue_depth,
                "1 to 4095",
            ));
        }
        if !(16..=1 << 20).contains(&self.reactor.inbound_capacity) {
            return Err(invalid(
                "reactor.inbound_capacity",
                self.reactor.inbound_capacity,
                "16 to 1048576",
            ));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(invalid(
                "device",
                format!("{} devices", self.devices.len()),
                format!("at most {}", MAX_DEVICES),
            ));
        }
        for (index, device) in self.devices.iter().enumerate() {
            let key = |field: &str| format!("device[{index}].{field}");
            if device.name.is_empty()
                || self.devices[..index]
                    .iter()
                    .any(|other| other.name == device.name)
            {
                return Err(invalid(
                    key("name"),
                    format!("{:?}", device.name),
                    "a non-empty name no other device has",
                ));
            }
            if !matches!(device.block_size, 512 | 4096) {
                return Err(invalid(key("block_size"), device.block_size, "512 or 4096"));
            }
            if let Some(size) = device.size {
                if size.0 == 0 || size.0 % device.block_size as u64 != 0 {
                    return Err(invalid(
                        key("size"),
                        size,
                        format!("a non-zero multiple of block_size ({})", device.block_size),
                    ));
                }
            }
            match device.driver {
                DriverKind::Mem => {
                    let Some(media) = device.media else {
                        return Err(invalid(
                            key("media"),
                            "nothing",
                            "driver = \"mem\" needs media: \"null\", \"ram\" or \"file\"",
                        ));
                    };
                    if device.size.is_none() {
                        return Err(invalid(
                            key("size"),
                            "nothing",
                            "driver = \"mem\" needs a size, e.g. \"1GiB\"",
                        ));
                    }
                    if let (Some(path), true) = (&device.path, media != MediaKind::File) {
                        return Err(invalid(
                            key("path"),
                            format!("{path:?}"),
                            "only for media = \"file\"",
                        ));
                    }
                    if device.sqpoll || device.iopoll {
                        return Err(invalid(
                            key("sqpoll"),
                            "true",
                            "sqpoll and iopoll only apply to driver = \"uring\"",
                        ));
                    }
                }
                DriverKind::Uring => {
                    if device.path.is_none() {
                        return Err(invalid(
                            key("path"),
                            "nothing",
                            "driver = \"uring\" needs the file or block device to use",
                        ));
                    }
                    if let Some(media) = device.media {
                        return Err(invalid(
                            key("media"),
                            format!("{media:?}").to_lowercase(),
                            "media only applies to driver = \"mem\"",
                        ));
                    }
                    if !device.inject.is_empty() {
                        return Err(invalid(key("inject"), "rules", "injection is done by the mem driver's controller; use driver = \"mem\""));
                    }
                }
                DriverKind::Vfio => {
                    let Some(pci) = &device.pci else {
                        return Err(invalid(
                            key("pci"),
                            "nothing",
                            "driver = \"vfio\" needs the controller's PCI address, e.g. \"0000:00:04.0\" (`fathom-node devices` lists them)",
                        ));
                    };
                    if !is_pci_address(pci) {
                        return Err(invalid(
                            key("pci"),
                            format!("{pci:?}"),
                            "a PCI address as domain:bus:device.function, e.g. \"0000:00:04.0\"",
                        ));
                    }
                    for (field, set) in [
                        ("media", device.media.is_some()),
                        ("size", device.size.is_some()),
                        ("path", device.path.is_some()),
                        ("sqpoll", device.sqpoll),
                        ("iopoll", device.iopoll),
                        ("inject", !device.inject.is_empty()),
                    ] {
                        if set {
                            return Err(invalid(
                                key(field),
                                "a value",
                                "nothing for driver = \"vfio\": the controller's namespaces give sizes and block sizes",
                            ));
                        }
                    }
                }
            }
            if device.pci.is_some() && device.driver != DriverKind::Vfio {
                return Err(invalid(key("pci"), "a value", "only for driver = \"vfio\""));
            }
            for (rule_index, rule) in device.inject.iter().enumerate() {
                let key = |field: &str| format!("device[{index}].inject[{rule_index}].{field}");
                rule.validate()
                    .map_err(|(field, value, allowed)| invalid(key(field), value, allowed))?;
                if rule.stall {
                    return Err(invalid(
                        key("stall"),
                        true,
                        "a stall holds commands until it is cleared: add it at run time with `fathom-ctl inject add`",
                    ));
                }
            }
        }
        self.validate_cluster()?;
        for (index, volume) in self.volumes.iter().enumerate() {
            let key = |field: &str| format!("volume[{index}].{field}");
            if volume.name.is_empty()
                || self.volumes[..index]
                    .iter()
                    .any(|other| other.name == volume.name)
            {
                return Err(invalid(
                    key("name"),
                    format!("{:?}", volume.name),
                    "a non-empty name no other volume has",
                ));
            }
            if volume.stub.contains(&crate::layer::LayerName::Frontend) {
                return Err(invalid(
                    key("stub"),
                    "\"frontend\"",
                    crate::layer::FRONTEND_STUB,
                ));
            }
            let Some(device) = self
                .devices
                .iter()
                .find(|device| device.name == volume.device)
            else {
                let names: Vec<_> = self
                    .devices
                    .iter()
                    .map(|device| device.name.as_str())
                    .collect();
                return Err(invalid(
                    key("device"),
                    format!("{:?}", volume.device),
                    format!("one of the configured devices {names:?}"),
                ));
            };
            if volume.nsid != 1 {
                return Err(invalid(
                    key("nsid"),
                    volume.nsid,
                    format!("1 (device {:?} has one namespace)", device.name),
                ));
            }
            let block = device.block_size as u64;
            if volume.offset.0 % block != 0 {
                return Err(invalid(
                    key("offset"),
                    volume.offset,
                    format!("a multiple of the device's {block}-byte blocks"),
                ));
            }
            if volume.size.0 == 0 || volume.size.0 % block != 0 {
                return Err(invalid(
                    key("size"),
                    volume.size,
                    format!("a non-zero multiple of the device's {block}-byte blocks"),
                ));
            }
            self.validate_replicas(index, volume)?;
            // A device whose size comes from the disk is checked when the engine opens it.
            let metadata = volume.metadata_bytes(self.replication.region_size.0);
            if let Some(device_size) = device.size {
                if volume
                    .offset
                    .0
                    .checked_add(volume.size.0)
                    .and_then(|end| end.checked_add(metadata))
                    .is_none_or(|end| end > device_size.0)
                {
                    return Err(invalid(
                        key("size"),
                        volume.size,
                        match metadata {
                            0 => format!(
                                "offset + size within device {:?} ({} bytes)",
                                device.name, device_size.0
                            ),
                            _ => format!(
                                "offset + size + its {metadata} bytes of replication metadata within device {:?} ({} bytes)",
                                device.name, device_size.0
                            ),
                        },
                    ));
                }
            }
            if let Some(core) = volume.core {
                if !self.reactor.cores.contains(&core) {
                    return Err(invalid(
                        key("core"),
                        core,
                        format!("one of reactor.cores {:?}", self.reactor.cores),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// Stages beyond the data path's own: with replicated volumes, `replicate:NODE` for each
    /// other node of the cluster (a write or flush sent to that replica, until it answered),
    /// so that local and remote latency show apart.
    pub fn replicate_stages(&self) -> Vec<String> {
        if !self.replicated() {
            return Vec::new();
        }
        self.cluster
            .nodes
            .iter()
            .filter(|node| node.id != self.node.id)
            .map(|node| format!("replicate:{}", node.id))
            .collect()
    }

    /// Whether any volume is replicated (or can be: a pool's volumes are made by the control
    /// plane, replicated over the cluster's nodes).
    pub fn replicated(&self) -> bool {
        self.cluster.pool.is_some()
            || self
                .volumes
                .iter()
                .any(|volume| !volume.replicas.is_empty())
    }

    /// Volume slots the engine keeps free for volumes made while it runs (the pool's).
    pub fn spare_volumes(&self) -> usize {
        self.cluster.pool.as_ref().map_or(0, |pool| pool.volumes)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let lease = self.cluster.lease.0;
        if lease.as_secs() == 0 || lease.subsec_nanos() != 0 {
            return Err(invalid(
                "cluster.lease",
                format!("{lease:?}"),
                "a whole number of seconds, at least 1 (etcd leases count in seconds), e.g. \"2s\"",
            ));
        }
        for (index, endpoint) in self.cluster.etcd.iter().enumerate() {
            let address = endpoint.strip_prefix("http://").unwrap_or(endpoint);
            if address.is_empty() || address.contains('/') || !address.contains(':') {
                return Err(invalid(
                    format!("cluster.etcd[{index}]"),
                    format!("{endpoint:?}"),
                    "an etcd member's client address, host:port, e.g. \"127.0.0.1:2379\"",
                ));
            }
        }
        if !self.cluster.etcd.is_empty() && self.cluster.name.is_empty() {
            return Err(invalid(
                "cluster.name",
                "\"\"",
                "a name for the cluster: its keys in etcd live under /fathom/<name>/",
            ));
        }
        if let Some(pool) = &self.cluster.pool {
            if self.cluster.etcd.is_empty() {
                return Err(invalid(
                    "cluster.pool",
                    format!("{{ device = {:?} }}", pool.device),
                    "a control plane to make its volumes: set cluster.etcd, or remove [cluster.pool]",
                ));
            }
            if !self.devices.iter().any(|device| device.name == pool.device) {
                let names: Vec<_> = self.devices.iter().map(|d| d.name.as_str()).collect();
                return Err(invalid(
                    "cluster.pool.device",
                    format!("{:?}", pool.device),
                    format!("one of the configured devices {names:?}"),
                ));
            }
            if !(1..=PoolConfig::MAX_VOLUMES).contains(&pool.volumes) {
                return Err(invalid(
                    "cluster.pool.volumes",
                    pool.volumes,
                    format!("1 to {}", PoolConfig::MAX_VOLUMES),
                ));
            }
        }
        for (index, node) in self.cluster.nodes.iter().enumerate() {
            let key = |field: &str| format!("cluster.node[{index}].{field}");
            if node.id.is_empty()
                || !node
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || self.cluster.nodes[..index]
                    .iter()
                    .any(|other| other.id == node.id)
            {
                return Err(invalid(
                    key("id"),
                    format!("{:?}", node.id),
                    "a node id (letters, digits, '-' and '_') no other node of the cluster has",
                ));
            }
            if node.replication.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    key("replication"),
                    format!("{:?}", node.replication),
                    "the IP address and port its replica service listens on, e.g. \"127.0.0.1:7601\"",
                ));
            }
        }
        for (index, listen) in self.replication.listen.iter().enumerate() {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    format!("replication.listen[{index}]"),
                    format!("{listen:?}"),
                    "an IP address and port such as \"127.0.0.1:7601\"",
                ));
            }
        }
        let region = self.replication.region_size.0;
        if !region.is_power_of_two() || !(64 << 10..=1 << 30).contains(&region) {
            return Err(invalid(
                "replication.region_size",
                self.replication.region_size,
                "a power of two from 64KiB to 1GiB",
            ));
        }
        let tls = [
            &self.replication.tls_ca,
            &self.replication.tls_cert,
            &self.replication.tls_key,
        ];
        let tls_set = tls.iter().filter(|path| path.is_some()).count();
        if tls_set != 0 && tls_set != 3 {
            return Err(invalid(
                "replication.tls_ca",
                "(partly set)",
                "set all of replication.tls_ca, tls_cert and tls_key (PEM files), or none",
            ));
        }
        if !self.replicated() {
            return Ok(());
        }
        if !self
            .cluster
            .nodes
            .iter()
            .any(|node| node.id == self.node.id)
        {
            return Err(invalid(
                "cluster.node",
                format!("no node {:?}", self.node.id),
                "list this node (node.id) among [[cluster.node]]: replicated volumes need it",
            ));
        }
        if self.replication.listen.is_empty() {
            return Err(invalid(
                "replication.listen",
                "[]",
                "the address this node's replica service listens on (its [[cluster.node]] replication address)",
            ));
        }
        if tls_set == 0 && self.replication.key_file.is_none() {
            return Err(invalid(
                "replication.key_file",
                "(missing)",
                "peers must authenticate: a cluster key file (e.g. `head -c 32 /dev/urandom > cluster.key`, the same on every node), or replication.tls_ca/tls_cert/tls_key",
            ));
        }
        Ok(())
    }

    fn validate_replicas(&self, index: usize, volume: &VolumeConfig) -> Result<(), ConfigError> {
        if volume.replicas.is_empty() {
            if volume.primary.is_some() {
                return Err(invalid(
                    format!("volume[{index}].primary"),
                    format!("{:?}", volume.primary.as_deref().unwrap_or_default()),
                    "a primary only for a replicated volume: list its replicas too",
                ));
            }
            return Ok(());
        }
        let key = |field: &str| format!("volume[{index}].{field}");
        if volume.replicas.len() > MAX_REPLICAS {
            return Err(invalid(
                key("replicas"),
                format!("{:?}", volume.replicas),
                format!("at most {MAX_REPLICAS} nodes"),
            ));
        }
        let known: Vec<&str> = self
            .cluster
            .nodes
            .iter()
            .map(|node| node.id.as_str())
            .collect();
        for (at, replica) in volume.replicas.iter().enumerate() {
            if !known.contains(&replica.as_str()) || volume.replicas[..at].contains(replica) {
                return Err(invalid(
                    format!("volume[{index}].replicas[{at}]"),
                    format!("{replica:?}"),
                    format!("a node of [[cluster.node]] ({known:?}), each once"),
                ));
            }
        }
        if !volume.replicas.contains(&self.node.id) {
            return Err(invalid(
                key("replicas"),
                format!("{:?}", volume.replicas),
                format!(
                    "this node ({:?}) among them: a node configures the volumes it holds",
                    self.node.id
                ),
            ));
        }
        if let Some(primary) = &volume.primary {
            if !volume.replicas.contains(primary) {
                return Err(invalid(
                    key("primary"),
                    format!("{primary:?}"),
                    format!("one of its replicas {:?}", volume.replicas),
                ));
            }
        }
        Ok(())
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(
            // SAFETY: sysconf has no memory effects.
            unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize,
        )
}

/// A byte count written as `4096`, `"4k"`, `"64MiB"`, `"1G"` (binary multiples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a size: write e.g. 4096, 4k, 64MiB, 1GiB"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                    "{text:?} has an unknown unit: use k, M, G or T (binary: KiB, MiB, GiB, TiB)"
                ))
            }
        };
        number
            .checked_mul(1 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
                return write!(f, "\"{}{unit}\"", bytes >> shift);
            }
        }
        write!(f, "{bytes}")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(DurationValue)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every config shipped under configs/ (the cluster's included) parses and validates.
    #[test]
    fn the_shipped_configs_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut dirs = vec![root];
        let mut checked = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|ext| ext == "toml") {
                    Config::load(&path)
                        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                    checked += 1;
                }
            }
        }
        assert!(checked >= 6, "{checked} configs");
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let config = Config::embedded_default();
        assert_eq!(config.devices[0].media, Some(MediaKind::File));
        assert!(!config.volumes.is_empty());
    }

    #[test]
    fn every_example_config_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|extension| extension == "toml")
            {
                Config::load(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                checked += 1;
            }
        }
        assert!(
            checked >= 2,
            "found {checked} example configs in {}",
            dir.display()
        );
    }

    #[test]
    fn sizes_durations_and_latencies_parse() {
        assert_eq!("4k".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(
            parse_duration("1.5ms").unwrap(),
            Duration::from_micros(1500)
        );
        assert!(parse_duration("200").unwrap_err().contains("needs a unit"));
        assert_eq!(
            "uniform(100us, 300us)".parse::<LatencySpec>().unwrap(),
            LatencySpec::Uniform {
                min: Duration::from_micros(100),
                max: Duration::from_micros(300)
            }
        );
        assert!("uniform(3ms,1ms)".parse::<LatencySpec>().is_err());
    }

    /// Node n1 of a three-node cluster with a 64 MiB device, and `extra` after it.
    fn cluster(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[node]\nid = \"n1\"\ndata_dir = \"/tmp/x\"\n\
             [cluster]\nname = \"test\"\n\
             [[cluster.node]]\nid = \"n1\"\nreplication = \"127.0.0.1:7601\"\n\
             [[cluster.node]]\nid = \"n2\"\nreplication = \"127.0.0.1:7602\"\n\
             [[cluster.node]]\nid = \"n3\"\nreplication = \"127.0.0.1:7603\"\n\
             [[device]]\nname = \"d0\"\ndriver = \"mem\"\nmedia = \"ram\"\nsize = \"64MiB\"\n{extra}"
        ))
    }

    const REPLICATION: &str =
        "[replication]\nlisten = [\"127.0.0.1:7601\"]\nkey_file = \"/tmp/x/cluster.key\"\n";

    #[test]
    fn a_replicated_volume_names_its_nodes_and_keeps_room_for_its_metadata() {
        let volume = "[[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize = \"32MiB\"\nreplicas = [\"n1\", \"n2\", \"n3\"]\n";
        let config = cluster(&format!("{REPLICATION}{volume}")).unwrap();
        assert!(config.replicated());
        let v = &config.volumes[0];
        assert_eq!(v.replicas, ["n1", "n2", "n3"]);
        // 32 regions of 1 MiB: two superblocks and one bitmap block for each of 7 replicas.
        assert_eq!(
            v.metadata_bytes(config.replication.region_size.0),
            9 * 4096 + HEALTH_BYTES
        );
        // Data and metadata must fit the device.
        let full = volume.replace("32MiB", "64MiB");
        let error = cluster(&format!("{REPLICATION}{full}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("volume[0].size") && error.contains("replication metadata"),
            "{error}"
        );
        let error = |extra: &str| cluster(extra).unwrap_err().to_string();
        let e = error(&format!(
            "{REPLICATION}{}",
            volume.replace("\"n3\"", "\"n9\"")
        ));
        assert!(
            e.contains("volume[0].replicas[2]") && e.contains("\"n9\""),
            "{e}"
        );
        let e = error(&format!("{REPLICATION}{}", volume.replace("\"n1\", ", "")));
        assert!(e.contains("this node (\"n1\") among them"), "{e}");
        let e = error(&format!("{REPLICATION}{volume}primary = \"n7\"\n"));
        assert!(e.contains("volume[0].primary"), "{e}");
        let e = error(volume);
        assert!(e.contains("replication.listen"), "{e}");
        let e = error(&format!(
            "[replication]\nlisten = [\"127.0.0.1:7601\"]\n{volume}"
        ));
        assert!(
            e.contains("replication.key_file") && e.contains("/dev/urandom"),
            "{e}"
        );
        let e = error(&format!("{REPLICATION}region_size = \"1000\"\n{volume}"));
        assert!(e.contains("replication.region_size"), "{e}");
        let e = error(&format!(
            "[replication]\nlisten = [\"127.0.0.1:7601\"]\ntls_ca = \"/ca.pem\"\n{volume}"
        ));
        assert!(e.contains("tls_cert and tls_key"), "{e}");
        let e =
            error("[[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize = \"4k\"\nprimary = \"n1\"\n");
        assert!(
            e.contains("volume[0].primary") && e.contains("list its replicas"),
            "{e}"
        );
        // A volume of this node alone needs none of it.
        assert!(
            !cluster("[[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize = \"64MiB\"\n")
                .unwrap()
                .replicated()
        );
    }

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[node]\nid = \"n1\"\ndata_dir = \"/tmp/x\"\n[[device]]\nname = \"d0\"\ndriver = \"mem\"\nmedia = \"ram\"\nsize = \"1MiB\"\n{extra}"
        ))
    }

    #[test]
    fn a_wrong_value_names_the_key_the_value_and_what_is_allowed() {
        let error = with("block_size = 1000").unwrap_err().to_string();
        assert!(
            error.contains("device[0].block_size")
                && error.contains("1000")
                && error.contains("512 or 4096"),
            "{error}"
        );
        let error = with("media2 = 1").unwrap_err().to_string();
        assert!(error.contains("media2"), "{error}");
        let error = with("[[volume]]\nname = \"v\"\ndevice = \"nope\"\nsize = \"4k\"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("volume[0].device") && error.contains("\"d0\""),
            "{error}"
        );
        let error = with("[[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize = \"2MiB\"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("volume[0].size") && error.contains("within device"),
            "{error}"
        );
        let error = with("[[device.inject]]\nfraction = 2.0\nlatency = \"1ms\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("device[0].inject[0].fraction"), "{error}");
        let error = with("[[device.inject]]\nlatency = \"1 fortnight\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown unit"), "{error}");
        let vfio = |extra: &str| {
            Config::parse(&format!(
                "[node]\nid = \"n1\"\ndata_dir = \"/tmp/x\"\n[[device]]\nname = \"d0\"\ndriver = \"vfio\"\n{extra}"
            ))
            .map(drop)
            .map_err(|error| error.to_string())
        };
        assert!(vfio("pci = \"0000:00:04.0\"").is_ok());
        assert!(vfio("pci = \"00:04.0\"").is_ok());
        let error = vfio("").unwrap_err();
        assert!(
            error.contains("device[0].pci") && error.contains("fathom-node devices"),
            "{error}"
        );
        let error = vfio("pci = \"0000:00:04\"").unwrap_err();
        assert!(error.contains("domain:bus:device.function"), "{error}");
        let error = vfio("pci = \"0000:00:04.0\"\nsize = \"1GiB\"").unwrap_err();
        assert!(
            error.contains("device[0].size") && error.contains("namespaces"),
            "{error}"
        );
        let error = with("pci = \"0000:00:04.0\"").unwrap_err().to_string();
        assert!(error.contains("only for driver = \"vfio\""), "{error}");
        let error = with("mode = \"sideways\"").unwrap_err().to_string();
        assert!(
            error.contains("inline") && error.contains("thread"),
            "{error}"
        );
    }
}
