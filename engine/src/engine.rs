//! The engine: devices, volumes and reactors brought up from a [`Config`], and the API any
//! thread uses to submit IO.
//!
//! A request goes to the inbound ring of the reactor that owns its volume (lock-free, bounded:
//! a full ring hands the request back), and its completion comes back through the
//! [`Notify`] the caller chose. Code running *on* a reactor (a [`Task`]) submits directly,
//! without the hop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fathom_telemetry::Clock;
use parking_lot::{Mutex, RwLock};

use crate::config::DriverKind;
use crate::config::{ClockChoice, Config, MediaKind};
use crate::layer::{ControlError, Layer, LayerName, VolumeLayers, VolumePath};
use crate::reactor::{
    pin_to_core, IoContext, Message, Reactor, ReactorShared, Rejected, Task, VolumeControl,
};
use crate::stats::{stage, CoreTelemetry, Tracer, OP_NAMES};
use crate::trace::{P999Tracker, TraceSettings};
use crate::volume::{IoCompletion, IoError, IoRequest, Notify, Volume, VolumeId};
use fathom_dma::{DmaError, DmaPool, PageKind, VFIO_IOVA_BASE};
use fathom_drivers::inject::InjectRule;
use fathom_drivers::mem::{DeviceMode, MediaKind as MemMedia, MemDriver, MemOptions};
use fathom_drivers::uring::UringDriver;
use fathom_drivers::vfio::VfioDriver;
use fathom_drivers::{DeviceInfo, Driver, DriverError, InjectAt};
use fathom_telemetry::region::{QueueEntry, RegionSpec, StatsRegion, VolumeEntry};
use fathom_telemetry::trace::{IdGenerator, TraceRegion, TraceSpec, VolumeGeometry};

/// How often the stats region's heartbeat moves.
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);
/// How long a control change waits for the owning reactor to apply it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight IO and for the final flush.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// [`EngineInner::owners`] of a free volume slot.
const NO_OWNER: u32 = u32::MAX;
/// The longest volume name: what the stats and trace regions keep of a name.
pub const MAX_VOLUME_NAME: usize = 47;

/// A volume to make while the engine runs ([`Engine::create_volume`]): a range of namespace 1
/// of `device` that no other volume uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub name: String,
    pub device: String,
    /// Byte offset of its first block in the namespace.
    pub offset: u64,
    /// Bytes of data clients see.
    pub size: u64,
    /// Bytes of replication metadata right after the data (see
    /// [`VolumeConfig::metadata_bytes`](crate::config::VolumeConfig::metadata_bytes)).
    pub meta_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("could not create the data directory {path} (set node.data_dir, or --data-dir)")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume:?}: {what}")]
    Volume { volume: String, what: String },
    #[error("reactor on core {core}: {what}")]
    Reactor { core: usize, what: String },
    #[error("flushing volume {volume:?} at shutdown: {error}")]
    Flush { volume: String, error: IoError },
    // The cause is the error's source: a chain printer (anyhow's `{:#}`) prints it once.
    #[error("telemetry clock")]
    Clock(#[from] fathom_telemetry::ClockError),
    #[error("telemetry")]
    Region(#[from] fathom_telemetry::region::RegionError),
    #[error("tracing")]
    Trace(#[from] fathom_telemetry::trace::RingError),
}

struct ReactorHandle {
    core: usize,
    shared: Arc<ReactorShared>,
}

struct EngineInner {
    config: Config,
    clock: Clock,
    pool: DmaPool,
    devices: Vec<Arc<dyn Driver>>,
    /// Per device, its stub: an inline `mem` controller on null media of the same geometry,
    /// where a volume's commands go while its `device` layer is stubbed.
    stubs: Vec<Arc<dyn Driver>>,
    /// Per device, its run-time injection rules: [device, media].
    device_rules: Mutex<Vec<[Vec<InjectRule>; 2]>>,
    /// The volume table, by [`VolumeId`]: the configured volumes, then slots for volumes
    /// made while the engine runs ([`Engine::create_volume`]); `None`: a free slot.
    volumes: RwLock<Vec<Option<Volume>>>,
    /// By volume id, the index of the owning reactor (`NO_OWNER`: a free slot): what
    /// [`Engine::submit`] reads, without a lock.
    owners: Box<[AtomicU32]>,
    /// One volume created or removed at a time.
    table_changes: Mutex<()>,
    /// Where the search for a free slot starts (counted from the first spare).
    next_slot: Mutex<usize>,
    reactors: Vec<ReactorHandle>,
    joins: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
    region: Option<Arc<StatsRegion>>,
    /// The trace region (its volume names follow the volume table).
    trace_region: Option<Arc<TraceRegion>>,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
    heartbeat_stop: Arc<AtomicBool>,
    /// Which IOs are traced (with a trace region).
    trace_settings: Option<Arc<TraceSettings>>,
    /// Each volume's layer settings as last applied (the control plane's copy; reactors own
    /// the layers themselves).
    layers: Mutex<Vec<VolumeLayers>>,
    /// IO slots per reactor: what a layer that holds IOs must have room for.
    slots_per_reactor: usize,
    /// Volumes of the configuration: the first slots of the table, never removed.
    configured: usize,
}

/// A running engine. Cheap to clone; every clone submits to the same reactors.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl Engine {
    /// Brings up DMA memory, devices, volumes and one reactor per configured core.
    pub fn start(config: &Config) -> Result<Self, EngineError> {
        let clock = match (config.telemetry.enabled, config.telemetry.clock) {
            (true, ClockChoice::Tsc) => Clock::tsc(Duration::from_millis(20))?,
            (true, ClockChoice::Monotonic) => Clock::monotonic(),
            (false, _) => Clock::best(),
        };
        let kind = if config.dma.hugepages {
            PageKind::Huge
        } else {
            PageKind::Normal
        };
        let pool = if config.devices.iter().any(|d| d.driver == DriverKind::Vfio) {
            DmaPool::with_iova_base(config.dma.size.0 as usize, kind, VFIO_IOVA_BASE)?
        } else {
            DmaPool::new(config.dma.size.0 as usize, kind)?
        };
        if config
            .devices
            .iter()
            .any(|device| device.media == Some(MediaKind::File))
        {
            std::fs::create_dir_all(&config.node.data_dir).map_err(|source| {
                EngineError::DataDir {
                    path: config.node.data_dir.clone(),
                    source,
                }
            })?;
        }
        let reactor_count = config.reactor.cores.len() as u16;
        let mut devices: Vec<Arc<dyn Driver>> = Vec::new();
        for device in &config.devices {
            let driver: Arc<dyn Driver> = match device.driver {
                DriverKind::Mem => Arc::new(MemDriver::open(
                    &device.mem_options(&config.node.data_dir),
                    &pool,
                    clock,
                    reactor_count,
                )?),
                DriverKind::Uring => Arc::new(UringDriver::open(
                    &device.uring_options(&config.node.data_dir),
                    &pool,
                )?),
                DriverKind::Vfio => Arc::new(VfioDriver::open(
                    &device.vfio_options(),
                    &pool,
                    reactor_count,
                )?),
            };
            devices.push(driver);
        }
        let stubs = devices
            .iter()
            .map(|device| open_stub(device.info(), &pool, clock, reactor_count))
            .collect::<Result<Vec<_>, _>>()?;
        let configured = build_volumes(config, &devices)?;
        let region = if config.telemetry.enabled {
            Some(Arc::new(create_region(
                config,
                &devices,
                &stubs,
                &configured,
                &clock,
            )?))
        } else {
            None
        };
        let trace_region = match config.telemetry.enabled && config.telemetry.trace.enabled {
            true => Some(Arc::new(create_trace_region(config, &configured, &clock)?)),
            false => None,
        };
        let mut volumes: Vec<Option<Volume>> = configured.into_iter().map(Some).collect();
        volumes.resize(volumes.len() + config.spare_volumes(), None);
        let trace_settings = trace_region
            .as_ref()
            .map(|_| Arc::new(TraceSettings::new(config, clock)));

        let mut reactors = Vec::new();
        let mut joins = Vec::new();
        let mut ready = Vec::new();
        for (index, &core) in config.reactor.cores.iter().enumerate() {
            let shared = Arc::new(ReactorShared::new(config.reactor.inbound_capacity).map_err(
                |error| EngineError::Reactor {
                    core,
                    what: format!("could not create its wake-up eventfd: {error}"),
                },
            )?);
            let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(1);
            let (devices, volumes, shared_for_thread) = (
                devices.iter().chain(&stubs).cloned().collect::<Vec<_>>(),
                volumes.clone(),
                shared.clone(),
            );
            let device_count = stubs.len();
            let node_id = config.node.id.clone();
            let region = region.clone();
            let (trace_region, trace_settings) = (trace_region.clone(), trace_settings.clone());
            let (depth, poll, idle_spin) = (
                config.reactor.queue_depth,
                config.reactor.poll,
                config.reactor.idle_spin.0,
            );
            let join = std::thread::Builder::new()
                .name(format!("reactor-{core}"))
                .spawn(move || {
                    if let Err(error) = pin_to_core(core) {
                        tracing::warn!(
                            "could not pin the reactor to core {core}: {error}; it runs unpinned"
                        );
                    }
                    // Queues are created on the reactor's own thread: it is their only user.
                    let mut queues = Vec::new();
                    for device in &devices {
                        match device.create_queue(depth) {
                            Ok(queue) => queues.push(queue),
                            Err(error) => {
                                let _ = ready_tx.send(Err(format!(
                                    "creating a queue on device {}: {error}",
                                    device.info().name
                                )));
                                return;
                            }
                        }
                    }
                    let telemetry = region.map(|region| {
                        let recorders = volumes
                            .iter()
                            .enumerate()
                            .flat_map(|(id, volume)| {
                                let region = &region;
                                let mine = volume.as_ref().is_some_and(|v| v.reactor == index);
                                (0..OP_NAMES.len())
                                    .map(move |op| mine.then(|| region.series_recorder(id, op)))
                            })
                            .collect();
                        let queue_recorders = (0..devices.len())
                            .map(|queue| region.queue_recorder(index * devices.len() + queue))
                            .collect();
                        let mut telemetry = Box::new(CoreTelemetry::new(
                            clock,
                            recorders,
                            queue_recorders,
                            &IoContext::queue_capacities(&queues),
                        ));
                        if let (Some(traces), Some(settings)) = (&trace_region, &trace_settings) {
                            telemetry.set_tracer(Tracer::new(
                                traces.writer(index),
                                IdGenerator::new(trace_seed(&node_id, core)),
                                core as u16,
                                (index * devices.len()) as u16,
                                settings.clone(),
                            ));
                        }
                        telemetry
                    });
                    let _ = ready_tx.send(Ok(()));
                    let io = IoContext::new(
                        index,
                        core,
                        volumes,
                        queues,
                        device_count,
                        telemetry,
                        clock,
                    );
                    Reactor::new(io, shared_for_thread, poll, idle_spin).run(DRAIN_TIMEOUT);
                })
                .map_err(|error| EngineError::Reactor {
                    core,
                    what: format!("could not start the thread: {error}"),
                })?;
            reactors.push(ReactorHandle { core, shared });
            joins.push(join);
            ready.push((core, ready_rx));
        }
        let volumes_count = volumes.len();
        let devices_count = devices.len();
        let owners = volumes
            .iter()
            .map(|volume| {
                AtomicU32::new(
                    volume
                        .as_ref()
                        .map_or(NO_OWNER, |volume| volume.reactor as u32),
                )
            })
            .collect();
        let heartbeat_stop = Arc::new(AtomicBool::new(false));
        let heartbeat = match &region {
            Some(region) => {
                let (region, stop) = (region.clone(), heartbeat_stop.clone());
                // `p99.9` tail thresholds come from the histograms, read on this thread.
                let mut p999 = match &trace_settings {
                    Some(settings) => {
                        Some((settings.clone(), P999Tracker::open(&config.region_path())?))
                    }
                    None => None,
                };
                let handle = std::thread::Builder::new()
                    .name("stats-heartbeat".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            region.heartbeat(clock.now());
                            if let Some((settings, tracker)) = p999.as_mut() {
                                tracker.update(settings);
                            }
                            std::thread::park_timeout(HEARTBEAT_PERIOD);
                        }
                    })
                    .map_err(|error| EngineError::Reactor {
                        core: usize::MAX,
                        what: format!("could not start the heartbeat thread: {error}"),
                    })?;
                Some(handle)
            }
            None => None,
        };
        let engine = Self {
            inner: Arc::new(EngineInner {
                config: config.clone(),
                clock,
                pool,
                devices,
                stubs,
                device_rules: Mutex::new(vec![Default::default(); devices_count]),
                volumes: RwLock::new(volumes),
                owners,
                table_changes: Mutex::new(()),
                next_slot: Mutex::new(0),
                reactors,
                joins: Mutex::new(joins),
                stopped: AtomicBool::new(false),
                region,
                trace_region,
                heartbeat: Mutex::new(heartbeat),
                heartbeat_stop,
                trace_settings,
                layers: Mutex::new(vec![VolumeLayers::default(); volumes_count]),
                // A reactor has a queue on every device and on its stub: slots for both (an
                // IO stubbed at its device layer holds a slot as any other).
                slots_per_reactor: 2
                    * config.devices.len()
                    * (config.reactor.queue_depth as usize + 1),
                configured: config.volumes.len(),
            }),
        };
        for (core, ready_rx) in ready {
            match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err(what)) => return Err(EngineError::Reactor { core, what }),
                Err(_) => {
                    return Err(EngineError::Reactor {
                        core,
                        what: "did not come up within 30 s".into(),
                    })
                }
            }
        }
        for volume in &config.volumes {
            if volume.stub.is_empty() {
                continue;
            }
            engine
                .change_layers(&volume.name, |layers| {
                    for &layer in &volume.stub {
                        layers.get_mut(layer).stub = true;
                    }
                    Ok(())
                })
                .map_err(|error| EngineError::Volume {
                    volume: volume.name.clone(),
                    what: format!("stub = {:?}: {error}", volume.stub),
                })?;
        }
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The shared-memory stats region, when telemetry is on.
    /// Which IOs are traced, changeable at run time (`None`: tracing is off).
    pub fn trace_settings(&self) -> Option<&TraceSettings> {
        self.inner.trace_settings.as_deref()
    }

    pub fn stats_region(&self) -> Option<&StatsRegion> {
        self.inner.region.as_deref()
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The DMA memory IO buffers come from.
    pub fn dma(&self) -> &DmaPool {
        &self.inner.pool
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceInfo> {
        self.inner.devices.iter().map(|device| device.info())
    }

    /// The volumes, by id (a copy: volumes come and go while the engine runs).
    pub fn volumes(&self) -> Vec<Volume> {
        self.inner
            .volumes
            .read()
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn volume(&self, name: &str) -> Option<Volume> {
        self.inner
            .volumes
            .read()
            .iter()
            .flatten()
            .find(|volume| volume.name == name)
            .cloned()
    }

    /// Volume slots: the configured volumes and the spares for volumes made at run time.
    pub fn volume_slots(&self) -> usize {
        self.inner.owners.len()
    }

    /// The cores reactors run on, in reactor order.
    pub fn cores(&self) -> Vec<usize> {
        self.inner
            .reactors
            .iter()
            .map(|reactor| reactor.core)
            .collect()
    }

    /// Queues `request` on the reactor that owns its volume. The completion goes to `notify`.
    /// A full inbound ring or a stopped engine hands the request back.
    pub fn submit(&self, request: IoRequest, notify: Notify) -> Result<(), Rejected> {
        let owner = self
            .inner
            .owners
            .get(request.volume.0 as usize)
            .map_or(NO_OWNER, |owner| owner.load(Ordering::Acquire));
        if owner == NO_OWNER {
            let error = IoError::UnknownVolume(request.volume.0);
            return Err(Rejected {
                request,
                notify,
                error,
            });
        };
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(Rejected {
                request,
                notify,
                error: IoError::Stopped,
            });
        }
        let reactor = &self.inner.reactors[owner as usize];
        let accepted = if self.inner.region.is_some() {
            self.inner.clock.now()
        } else {
            0
        };
        match reactor
            .shared
            .inbound
            .push(Message::Io(request, notify, accepted))
        {
            Ok(()) => {
                reactor.shared.wake();
                Ok(())
            }
            Err(Message::Io(request, notify, _)) => Err(Rejected {
                request,
                notify,
                error: IoError::Busy,
            }),
            Err(_) => unreachable!("pushed an Io message"),
        }
    }

    /// Submits and waits for the completion (for tools and tests; not for the IO path).
    pub fn io(&self, request: IoRequest) -> IoCompletion {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let tag = request.tag;
        if let Err(rejected) = self.submit(request, Notify::Channel(tx)) {
            return IoCompletion {
                tag,
                result: Err(rejected.error),
                buf: rejected.request.buf,
            };
        }
        rx.recv().unwrap_or(IoCompletion {
            tag,
            result: Err(IoError::Stopped),
            buf: None,
        })
    }

    /// As [`Engine::io`], in `request.volume`'s replication metadata area (offsets from its
    /// start; see [`Volume::metadata_command`]): for start-up and tools, not the IO path.
    pub fn metadata_io(&self, request: IoRequest) -> IoCompletion {
        let tag = request.tag;
        let volume = self.volume_by_id(request.volume);
        let Some(volume) = volume else {
            return IoCompletion {
                tag,
                result: Err(IoError::UnknownVolume(request.volume.0)),
                buf: request.buf,
            };
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let task = OneMetadataIo {
            request: Some(request),
            done: tx,
            finished: false,
        };
        if let Err(error) = self.spawn(volume.reactor, Box::new(task)) {
            tracing::warn!("metadata IO on volume {}: {error}", volume.name);
            return IoCompletion {
                tag,
                result: Err(IoError::Busy),
                buf: None,
            };
        }
        rx.recv().unwrap_or(IoCompletion {
            tag,
            result: Err(IoError::Stopped),
            buf: None,
        })
    }

    /// Adds `layer`, one that belongs to the volume ([`Layer::persistent`]: replication), to
    /// `volume`'s stack at its place among the layers its settings make, and waits until it
    /// is in place. Later changes of the settings keep it; adding another of the same kind
    /// replaces it.
    pub fn add_layer(&self, volume: &Volume, layer: Box<dyn Layer>) -> Result<(), ControlError> {
        let all = self.inner.layers.lock();
        let settings = &all[volume.id.0 as usize];
        let (mut layers, path) = settings.build(
            &self.inner.clock,
            self.inner.slots_per_reactor,
            volume.id.0 as u64,
        )?;
        let at = layers
            .iter()
            .take_while(|built| built.layer() <= layer.layer())
            .count();
        layers.insert(at, layer);
        self.install(volume, layers, path)
    }

    /// A volume's layer settings: stubs and run-time injection rules, per layer.
    pub fn layers(&self, volume: &str) -> Result<VolumeLayers, ControlError> {
        let volume = self.volume_named(volume)?;
        Ok(self.inner.layers.lock()[volume.id.0 as usize].clone())
    }

    /// Changes a volume's layer settings while IO runs: `change` edits a copy, the new stack is
    /// built here and handed to the owning reactor, which swaps it in between two loop
    /// iterations. Returns once the reactor has applied it.
    pub fn change_layers(
        &self,
        volume: &str,
        change: impl FnOnce(&mut VolumeLayers) -> Result<(), ControlError>,
    ) -> Result<VolumeLayers, ControlError> {
        let volume = self.volume_named(volume)?;
        let mut all = self.inner.layers.lock();
        let mut settings = all[volume.id.0 as usize].clone();
        change(&mut settings)?;
        let (layers, path) = settings.build(
            &self.inner.clock,
            self.inner.slots_per_reactor,
            volume.id.0 as u64,
        )?;
        if path.media_stub && !path.device_stub && !self.inner.devices[volume.device].null_media() {
            return Err(ControlError::Unsupported {
                what: format!(
                    "the media stub needs a controller that can skip the data, Fathom's mem \
                     driver; {} is a {} device (stub its device layer instead)",
                    volume.device_name,
                    self.inner.devices[volume.device].info().driver
                ),
            });
        }
        if path.device_stub && volume.nsid != 1 {
            let stub = self.inner.stubs[volume.device].info();
            let fits = stub.namespaces.first().is_some_and(|namespace| {
                namespace.block_size == volume.block_size
                    && volume.first_lba + volume.blocks <= namespace.blocks
            });
            if !fits {
                return Err(ControlError::Unsupported {
                    what: format!(
                        "volume {} (namespace {}) does not fit the device stub of {}, which \
                         copies namespace 1's geometry",
                        volume.name, volume.nsid, volume.device_name
                    ),
                });
            }
        }
        self.install(&volume, layers, path)?;
        all[volume.id.0 as usize] = settings.clone();
        Ok(settings)
    }

    /// A device's run-time injection rules at `layer` (device or media).
    pub fn device_inject(
        &self,
        device: &str,
        layer: LayerName,
    ) -> Result<Vec<InjectRule>, ControlError> {
        let (index, at) = self.device_layer(device, layer)?;
        Ok(self.inner.device_rules.lock()[index][at as usize].clone())
    }

    /// Changes a device's run-time injection rules at `layer` (device: the controller; media:
    /// the data it moves) while IO runs: `change` edits a copy; commands fetched after the
    /// controller's next poll see the new rules, and commands a cleared `stall` held go on.
    pub fn change_device_inject(
        &self,
        device: &str,
        layer: LayerName,
        change: impl FnOnce(&mut Vec<InjectRule>) -> Result<(), ControlError>,
    ) -> Result<Vec<InjectRule>, ControlError> {
        let (index, at) = self.device_layer(device, layer)?;
        let mut all = self.inner.device_rules.lock();
        let mut rules = all[index][at as usize].clone();
        change(&mut rules)?;
        for (rule_index, rule) in rules.iter().enumerate() {
            rule.validate()
                .map_err(|(field, value, allowed)| ControlError::BadRule {
                    index: rule_index,
                    field,
                    value,
                    allowed,
                })?;
        }
        self.inner.devices[index]
            .set_inject(at, &rules)
            .map_err(|what| ControlError::Unsupported { what })?;
        all[index][at as usize] = rules.clone();
        Ok(rules)
    }

    /// The index of device `name`, or an error that lists the devices there are.
    fn device_index(&self, name: &str) -> Result<usize, ControlError> {
        self.inner
            .devices
            .iter()
            .position(|driver| driver.info().name == name)
            .ok_or_else(|| ControlError::UnknownDevice {
                name: name.to_string(),
                known: self
                    .devices()
                    .map(|info| info.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn device_layer(
        &self,
        device: &str,
        layer: LayerName,
    ) -> Result<(usize, InjectAt), ControlError> {
        let index = self.device_index(device)?;
        let at = match layer {
            LayerName::Device => InjectAt::Device,
            LayerName::Media => InjectAt::Media,
            other => {
                return Err(ControlError::Unsupported {
                    what: format!(
                        "a device takes injection at its device or media layer; the {other} \
                         layer belongs to each volume: `fathom-ctl inject add VOLUME --layer {other}`"
                    ),
                })
            }
        };
        Ok((index, at))
    }

    /// The index of telemetry stage `name` (one of [`stage::NAMES`] or
    /// [`Config::replicate_stages`]), for [`LayerCtx::record`](crate::layer::LayerCtx::record).
    pub fn stage(&self, name: &str) -> Option<usize> {
        stage::NAMES
            .iter()
            .map(|name| name.to_string())
            .chain(self.inner.config.replicate_stages())
            .position(|stage| stage == name)
    }

    /// IO slots each reactor has (what a layer that holds IOs sizes its storage for).
    pub fn slots_per_reactor(&self) -> usize {
        self.inner.slots_per_reactor
    }

    /// The queue depth of each reactor's queue on every device.
    pub fn queue_depth(&self) -> u16 {
        self.inner.config.reactor.queue_depth
    }

    /// Hands `volume`'s reactor a new layer stack (top first) and waits until it is in place.
    /// [`Engine::change_layers`] builds stacks from settings; a layer of its own (a test's,
    /// replication's) is installed here.
    pub fn install_layers(
        &self,
        volume: &Volume,
        layers: Vec<Box<dyn Layer>>,
    ) -> Result<(), ControlError> {
        // Held while the reactor applies it, as change_layers does, so changes never cross.
        let all = self.inner.layers.lock();
        self.install(volume, layers, all[volume.id.0 as usize].path())
    }

    fn install(
        &self,
        volume: &Volume,
        layers: Vec<Box<dyn Layer>>,
        path: VolumePath,
    ) -> Result<(), ControlError> {
        self.control(volume.reactor, |done| VolumeControl::SetLayers {
            volume: volume.id,
            layers,
            path,
            done,
        })
    }

    /// The volume called `name`, or an error that lists the volumes there are.
    pub fn volume_named(&self, name: &str) -> Result<Volume, ControlError> {
        self.volume(name)
            .ok_or_else(|| ControlError::UnknownVolume {
                name: name.to_string(),
                known: self
                    .volumes()
                    .iter()
                    .map(|volume| volume.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn volume_by_id(&self, id: VolumeId) -> Option<Volume> {
        self.inner.volumes.read().get(id.0 as usize)?.clone()
    }

    /// Makes a volume while the engine runs, in a free slot, on the reactor with the fewest
    /// volumes; it takes IO once this returns. Refused: a name in use or not a plain name
    /// (letters, digits, `.`, `-`, `_`; at most [`MAX_VOLUME_NAME`] bytes), a range that is
    /// not block aligned, does not fit the namespace or overlaps another volume, or no free
    /// slot. The range's old contents are the caller's to clear.
    pub fn create_volume(&self, new: &NewVolume) -> Result<Volume, ControlError> {
        let _one = self.inner.table_changes.lock();
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(ControlError::Stopped);
        }
        let bad = |what: String| ControlError::BadVolume {
            what: format!("volume {:?}: {what}", new.name),
        };
        if new.name.is_empty()
            || new.name.len() > MAX_VOLUME_NAME
            || !new
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad(format!(
                "a volume name is 1 to {MAX_VOLUME_NAME} letters, digits, '.', '-' or '_'"
            )));
        }
        if self.volume(&new.name).is_some() {
            return Err(ControlError::VolumeExists {
                name: new.name.clone(),
            });
        }
        let live = self.volumes();
        // The next free slot after the last one taken, round the table: a slot just freed
        // is the last to serve again.
        let slot = {
            let table = self.inner.volumes.read();
            let spares = table.len() - self.inner.configured;
            let mut next = self.inner.next_slot.lock();
            let found = (0..spares)
                .map(|step| self.inner.configured + (*next + step) % spares.max(1))
                .find(|&id| table[id].is_none())
                .ok_or(ControlError::NoVolumeSlot { slots: spares })?;
            *next = (found - self.inner.configured + 1) % spares;
            found
        };
        let device = self.device_index(&new.device)?;
        let info = self.inner.devices[device].info();
        let namespace = info
            .namespaces
            .iter()
            .find(|namespace| namespace.nsid == 1)
            .ok_or_else(|| bad(format!("device {} has no namespace 1", info.name)))?;
        let block = namespace.block_size as u64;
        if new.size == 0
            || !new.size.is_multiple_of(block)
            || !new.offset.is_multiple_of(block)
            || !new.meta_bytes.is_multiple_of(block)
        {
            return Err(bad(format!(
                "offset {}, size {} and metadata {} must be multiples of {}'s {block}-byte blocks (size not 0)",
                new.offset, new.size, new.meta_bytes, info.name
            )));
        }
        let first_lba = new.offset / block;
        let (blocks, meta_blocks) = (new.size / block, new.meta_bytes / block);
        let end = first_lba
            .checked_add(blocks)
            .and_then(|end| end.checked_add(meta_blocks))
            .filter(|&end| end <= namespace.blocks)
            .ok_or_else(|| {
                bad(format!(
                    "blocks {first_lba}.. ({blocks} of data, {meta_blocks} of metadata) do not fit namespace 1 of {} ({} blocks)",
                    info.name, namespace.blocks
                ))
            })?;
        if let Some(other) = live.iter().find(|other| {
            other.device == device
                && other.nsid == 1
                && first_lba < other.first_lba + other.blocks + other.meta_blocks
                && other.first_lba < end
        }) {
            return Err(bad(format!(
                "blocks {first_lba}..{end} of {} overlap volume {:?} (blocks {}..{})",
                info.name,
                other.name,
                other.first_lba,
                other.first_lba + other.blocks + other.meta_blocks
            )));
        }
        let reactor = (0..self.inner.reactors.len())
            .min_by_key(|&reactor| live.iter().filter(|v| v.reactor == reactor).count())
            .expect("an engine has a reactor");
        let volume = Volume {
            id: VolumeId(slot as u32),
            name: new.name.clone(),
            device,
            device_name: info.name.clone(),
            nsid: 1,
            first_lba,
            blocks,
            block_size: namespace.block_size,
            block_shift: namespace.block_size.trailing_zeros(),
            reactor,
            core: self.inner.reactors[reactor].core,
            max_transfer_bytes: info.max_transfer_bytes,
            meta_blocks,
        };
        // The slot's telemetry starts from zero under the new name (no reactor records into
        // it: its last volume's reactor let go of its recorders when that volume closed).
        if let Some(region) = &self.inner.region {
            region
                .set_volume(
                    slot,
                    Some(&VolumeEntry {
                        name: volume.name.clone(),
                        core_index: reactor as u32,
                        block_size: volume.block_size,
                        size_bytes: volume.size_bytes(),
                        generation: 0,
                    }),
                )
                .map_err(|error| bad(format!("its stats slot: {error}")))?;
        }
        if let Some(traces) = &self.inner.trace_region {
            let geometry = VolumeGeometry {
                first_lba,
                block_size: volume.block_size,
            };
            traces
                .set_volume(slot, Some((&volume.name, geometry)))
                .map_err(|error| bad(format!("its trace slot: {error}")))?;
        }
        let recorders = self.inner.region.as_ref().map(|region| {
            (0..OP_NAMES.len())
                .map(|op| region.series_recorder(slot, op))
                .collect()
        });
        self.control(reactor, |done| VolumeControl::Open {
            volume: Box::new(volume.clone()),
            recorders,
            done,
        })?;
        if let Some(settings) = &self.inner.trace_settings {
            settings.reset(slot);
        }
        self.inner.layers.lock()[slot] = VolumeLayers::default();
        self.inner.volumes.write()[slot] = Some(volume.clone());
        self.inner.owners[slot].store(reactor as u32, Ordering::Release);
        Ok(volume)
    }

    /// Removes a volume made with [`Engine::create_volume`]: IO submitted from now on is
    /// refused as for an unknown volume, and this returns once the owning reactor has
    /// nothing of it in flight (or fails with [`ControlError::VolumeBusy`] after 5 s: retry).
    /// Its front ends and layers' users should have let go of it first. Its data stays on the
    /// device.
    pub fn remove_volume(&self, name: &str) -> Result<(), ControlError> {
        let _one = self.inner.table_changes.lock();
        let volume = self.volume_named(name)?;
        let slot = volume.id.0 as usize;
        if slot < self.inner.configured {
            return Err(ControlError::BadVolume {
                what: format!(
                    "volume {name:?} is in the node's configuration file: remove its [[volume]] there and restart the node"
                ),
            });
        }
        self.inner.owners[slot].store(NO_OWNER, Ordering::Release);
        // Its layers let go of what they hold (injection's stalls included), which then fails
        // at the one layer left, as does anything still coming down.
        self.install_layers(
            &volume,
            vec![Box::new(crate::layer::Closed {
                volume: volume.id.0,
            })],
        )?;
        let deadline = std::time::Instant::now() + CONTROL_TIMEOUT;
        loop {
            let in_flight = self.control(volume.reactor, |done| VolumeControl::Close {
                volume: volume.id,
                done,
            })?;
            if in_flight == 0 {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(ControlError::VolumeBusy {
                    volume: name.into(),
                    in_flight,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.inner.volumes.write()[slot] = None;
        self.inner.layers.lock()[slot] = VolumeLayers::default();
        if let Some(region) = &self.inner.region {
            let _ = region.set_volume(slot, None);
        }
        if let Some(traces) = &self.inner.trace_region {
            let _ = traces.set_volume(slot, None);
        }
        Ok(())
    }

    /// Hands reactor `reactor` the control message `make` builds around a completion
    /// channel, and waits until the reactor has applied it.
    fn control<T>(
        &self,
        reactor: usize,
        make: impl FnOnce(crossbeam_channel::Sender<T>) -> VolumeControl,
    ) -> Result<T, ControlError> {
        let (done, applied) = crossbeam_channel::bounded(1);
        let handle = &self.inner.reactors[reactor];
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(ControlError::Stopped);
        }
        let mut message = Message::Control(make(done));
        let deadline = std::time::Instant::now() + CONTROL_TIMEOUT;
        loop {
            match handle.shared.inbound.push(message) {
                Ok(()) => break,
                Err(back) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(_) => return Err(ControlError::Timeout(handle.core)),
            }
        }
        handle.shared.wake();
        applied
            .recv_timeout(CONTROL_TIMEOUT)
            .map_err(|_| ControlError::Timeout(handle.core))
    }

    /// Runs `task` on reactor `reactor` (an index into [`Engine::cores`]).
    pub fn spawn(&self, reactor: usize, task: Box<dyn Task>) -> Result<(), EngineError> {
        let handle = self
            .inner
            .reactors
            .get(reactor)
            .ok_or_else(|| EngineError::Reactor {
                core: usize::MAX,
                what: format!(
                    "no reactor {reactor}; there are {}",
                    self.inner.reactors.len()
                ),
            })?;
        handle
            .shared
            .inbound
            .push(Message::Spawn(task))
            .map_err(|_| EngineError::Reactor {
                core: handle.core,
                what: "inbound ring full; retry".into(),
            })?;
        handle.shared.wake();
        Ok(())
    }

    /// Flushes every volume and waits for all of them.
    pub fn flush_all(&self) -> Result<(), EngineError> {
        let volumes = self.volumes();
        let (tx, rx) = crossbeam_channel::bounded(volumes.len().max(1));
        for volume in &volumes {
            if let Err(rejected) = self.submit(
                IoRequest::flush(volume.id, volume.id.0 as u64),
                Notify::Channel(tx.clone()),
            ) {
                return Err(EngineError::Flush {
                    volume: volume.name.clone(),
                    error: rejected.error,
                });
            }
        }
        for _ in 0..volumes.len() {
            let completion = rx
                .recv_timeout(DRAIN_TIMEOUT)
                .map_err(|_| EngineError::Flush {
                    volume: "(any)".into(),
                    error: IoError::Device {
                        op: fathom_drivers::Op::Flush,
                        status: fathom_nvme::Status::INTERNAL_ERROR,
                    },
                })?;
            if let Err(error) = completion.result {
                let volume = self
                    .volume_by_id(VolumeId(completion.tag as u32))
                    .map_or_else(|| format!("#{}", completion.tag), |volume| volume.name);
                return Err(EngineError::Flush { volume, error });
            }
        }
        Ok(())
    }

    /// Flushes every volume, stops the reactors once their IO is done, deletes the device
    /// queues and shuts the devices down. Later submissions are refused with
    /// [`IoError::Stopped`]. Calling it again does nothing.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        let flushed = self.flush_all();
        self.inner.stop_reactors();
        let mut result = flushed;
        for device in self.inner.devices.iter().chain(&self.inner.stubs) {
            if let Err(error) = device.shutdown() {
                result = result.and(Err(error.into()));
            }
        }
        result
    }
}

impl EngineInner {
    fn stop_reactors(&self) {
        self.stopped.store(true, Ordering::Release);
        for reactor in &self.reactors {
            reactor.shared.stop.store(true, Ordering::Release);
            reactor.shared.wake();
        }
        for join in self.joins.lock().drain(..) {
            let _ = join.join();
        }
        self.heartbeat_stop.store(true, Ordering::Release);
        if let Some(heartbeat) = self.heartbeat.lock().take() {
            heartbeat.thread().unpark();
            let _ = heartbeat.join();
        }
        if let Some(region) = &self.region {
            region.mark_stopped();
        }
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        // An engine dropped without shutdown still stops its threads; devices flush on their
        // own drop (media are synced by the kernel's writeback in any case).
        self.stop_reactors();
    }
}

/// Creates the stats region: one histogram set per volume, one queue per (reactor, device).
fn create_region(
    config: &Config,
    devices: &[Arc<dyn Driver>],
    stubs: &[Arc<dyn Driver>],
    volumes: &[Volume],
    clock: &Clock,
) -> Result<StatsRegion, EngineError> {
    let spec = RegionSpec {
        node_id: config.node.id.clone(),
        cores: config
            .reactor
            .cores
            .iter()
            .map(|&core| core as u32)
            .collect(),
        volumes: volumes
            .iter()
            .map(|volume| VolumeEntry {
                name: volume.name.clone(),
                core_index: volume.reactor as u32,
                block_size: volume.block_size,
                size_bytes: volume.size_bytes(),
                generation: 0,
            })
            .collect(),
        spare_volumes: config.spare_volumes(),
        ops: OP_NAMES.iter().map(|name| name.to_string()).collect(),
        stages: stage::NAMES
            .iter()
            .map(|name| name.to_string())
            .chain(config.replicate_stages())
            .collect(),
        queues: (0..config.reactor.cores.len())
            .flat_map(|reactor| {
                devices.iter().chain(stubs).map(move |device| QueueEntry {
                    device: device.info().name.clone(),
                    core_index: reactor as u32,
                })
            })
            .collect(),
    };
    Ok(StatsRegion::create(&config.region_path(), &spec, clock)?)
}

/// Creates the trace region: one span ring per reactor.
fn create_trace_region(
    config: &Config,
    volumes: &[Volume],
    clock: &Clock,
) -> Result<TraceRegion, EngineError> {
    let spec = TraceSpec {
        node_id: config.node.id.clone(),
        cores: config
            .reactor
            .cores
            .iter()
            .map(|&core| core as u32)
            .collect(),
        capacity: config.telemetry.trace.ring,
        volumes: volumes.iter().map(|volume| volume.name.clone()).collect(),
        geometry: volumes
            .iter()
            .map(|volume| VolumeGeometry {
                first_lba: volume.first_lba,
                block_size: volume.block_size,
            })
            .collect(),
        spare_volumes: config.spare_volumes(),
        layers: LayerName::ALL
            .iter()
            .map(|layer| layer.as_str().to_string())
            .collect(),
    };
    Ok(TraceRegion::create(
        &config.trace_region_path(),
        &spec,
        clock,
    )?)
}

/// A seed for a reactor's trace ids: unique to the node, the core and this start.
fn trace_seed(node_id: &str, core: usize) -> u64 {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
        ^ (std::process::id() as u64) << 32
        ^ core as u64;
    for byte in node_id.bytes() {
        seed = (seed ^ byte as u64).wrapping_mul(0x100_0000_01b3);
    }
    seed
}

/// The stub of a device: an inline `mem` controller on null media with the geometry of the
/// device's first namespace, so a volume can move onto it with nothing above changing.
fn open_stub(
    info: &DeviceInfo,
    pool: &DmaPool,
    clock: Clock,
    reactors: u16,
) -> Result<Arc<dyn Driver>, EngineError> {
    let (blocks, block_size) = info.namespaces.first().map_or((1 << 20, 512), |namespace| {
        (namespace.blocks, namespace.block_size)
    });
    let options = MemOptions {
        name: format!("{}~stub", info.name),
        media: MemMedia::Null,
        mode: DeviceMode::Inline,
        size: blocks * block_size as u64,
        block_size,
        path: PathBuf::new(),
        inject: Vec::new(),
    };
    Ok(Arc::new(MemDriver::open(&options, pool, clock, reactors)?))
}

fn build_volumes(config: &Config, devices: &[Arc<dyn Driver>]) -> Result<Vec<Volume>, EngineError> {
    let mut volumes = Vec::new();
    for (index, volume) in config.volumes.iter().enumerate() {
        let error = |what: String| EngineError::Volume {
            volume: volume.name.clone(),
            what,
        };
        let device_index = devices
            .iter()
            .position(|device| device.info().name == volume.device)
            .ok_or_else(|| error(format!("no device {:?}", volume.device)))?;
        let info = devices[device_index].info();
        let namespace = info
            .namespaces
            .iter()
            .find(|namespace| namespace.nsid == volume.nsid)
            .ok_or_else(|| {
                error(format!(
                    "device {:?} has no namespace {}",
                    info.name, volume.nsid
                ))
            })?;
        let block_size = namespace.block_size as u64;
        let (first_lba, blocks) = (volume.offset.0 / block_size, volume.size.0 / block_size);
        if first_lba + blocks > namespace.blocks {
            return Err(error(format!(
                "LBAs {first_lba}..{} do not fit namespace {} of {} blocks",
                first_lba + blocks,
                volume.nsid,
                namespace.blocks
            )));
        }
        let reactor = match volume.core {
            Some(core) => config
                .reactor
                .cores
                .iter()
                .position(|&c| c == core)
                .expect("validated"),
            None => index % config.reactor.cores.len(),
        };
        volumes.push(Volume {
            id: VolumeId(index as u32),
            name: volume.name.clone(),
            device: device_index,
            device_name: info.name.clone(),
            nsid: volume.nsid,
            first_lba,
            blocks,
            block_size: namespace.block_size,
            block_shift: namespace.block_size.trailing_zeros(),
            reactor,
            core: config.reactor.cores[reactor],
            max_transfer_bytes: info.max_transfer_bytes,
            meta_blocks: volume.metadata_bytes(config.replication.region_size.0) / block_size,
        });
    }
    Ok(volumes)
}

/// One metadata IO run on the volume's own reactor ([`Engine::metadata_io`]), which is the
/// only place [`IoContext::submit_metadata`] can be called.
struct OneMetadataIo {
    request: Option<IoRequest>,
    done: crossbeam_channel::Sender<IoCompletion>,
    finished: bool,
}

impl Task for OneMetadataIo {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        let Some(request) = self.request.take() else {
            return false;
        };
        match io.submit_metadata(request) {
            Ok(()) => {}
            Err(Rejected {
                request,
                error: IoError::Busy,
                ..
            }) => self.request = Some(request),
            Err(rejected) => {
                let _ = self.done.send(IoCompletion {
                    tag: rejected.request.tag,
                    result: Err(rejected.error),
                    buf: rejected.request.buf,
                });
                self.finished = true;
            }
        }
        true
    }

    fn complete(&mut self, _io: &mut IoContext, completion: IoCompletion) {
        let _ = self.done.send(completion);
        self.finished = true;
    }

    fn finished(&self) -> bool {
        self.finished
    }
}
