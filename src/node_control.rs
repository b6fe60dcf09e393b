//! What a running node answers on its control socket: the [`Handler`] behind
//! `<data_dir>/control.sock` (the protocol and the socket are `fathom-control`'s).
//!
//! Every change goes through the engine's control path (`Engine::change_layers`,
//! `Engine::change_device_inject`): built off the reactors, applied by the owning reactor
//! between two loop iterations. Trace sampling goes through the engine's `TraceSettings`,
//! which the reactors take at their next publication. A request that is wrong in any way is
//! refused with a message before anything changes, so IO in flight never sees a
//! half-applied request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use fathom_control::proto::{
    self, Cleared, DeviceRow, Hello, LayerRow, NamespaceRow, PeerRow, PromoteResult, RemoteError,
    ReparentResult, ReplicationRow, Request, RuleRow, RunResult, TraceRow, VolumeRow,
};
use fathom_control::server::Handler;
use fathom_engine::config::{InjectRule, TailThreshold};
use fathom_engine::layer::{ControlError, LayerName};
use fathom_engine::stats::{CLIENT_OPS, OP_NAMES};
use fathom_engine::trace::{TraceSettings, VolumeSampling};
use fathom_engine::{Engine, Volume};
use fathom_replication::node::Replication;
use serde_json::Value;
use std::sync::Mutex as StdMutex;

use crate::workload::{Pattern, WorkloadSpec, WorkloadTask};

/// Workloads (`run`) at once per node: each holds `iodepth` DMA buffers.
const MAX_RUNS: usize = 4;
/// Longest `run` accepted.
const MAX_RUNTIME: Duration = Duration::from_secs(3600);
const MAX_IODEPTH: u32 = 4096;

/// The node's control handler.
pub struct NodeControl {
    engine: Engine,
    /// The rules as the operator gave them, per (target, layer), for `inject list`: the
    /// engine keeps them parsed.
    rules: StdMutex<HashMap<(String, LayerName), Vec<Value>>>,
    runs: AtomicUsize,
    /// Held across a `trace_set`'s read of the current sampling and its writes, so that two
    /// at once (one changing the rate, the other the tail) do not undo each other's change.
    trace_changes: StdMutex<()>,
    /// Replication, when this node holds copies of replicated volumes.
    replication: Option<std::sync::Arc<Replication>>,
    /// The health monitor, when health runs.
    health: Option<std::sync::Arc<crate::health::monitor::MonitorShared>>,
}

impl NodeControl {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            rules: StdMutex::new(HashMap::new()),
            runs: AtomicUsize::new(0),
            trace_changes: StdMutex::new(()),
            replication: None,
            health: None,
        }
    }

    /// Answers `health` and `health_advise` from the health monitor.
    pub fn with_health(
        mut self,
        health: Option<std::sync::Arc<crate::health::monitor::MonitorShared>>,
    ) -> Self {
        self.health = health;
        self
    }

    fn health(&self) -> Result<&crate::health::monitor::MonitorShared, RemoteError> {
        self.health.as_deref().ok_or_else(|| {
            RemoteError::new(
                proto::BAD_REQUEST,
                "health does not run on this node: it needs [telemetry] enabled (and [health] enabled, the default)",
            )
        })
    }

    /// Answers `replication` and `promote` through `replication`.
    pub fn with_replication(mut self, replication: Option<std::sync::Arc<Replication>>) -> Self {
        self.replication = replication;
        self
    }

    fn replication(&self, volume: Option<&str>) -> Result<Vec<ReplicationRow>, RemoteError> {
        if let Some(name) = volume {
            self.engine.volume_named(name).map_err(control_error)?;
        }
        let node = &self.engine.config().node.id;
        let roles = self
            .replication
            .as_ref()
            .map(|replication| replication.roles())
            .unwrap_or_default();
        Ok(replication_rows(node, &roles)
            .into_iter()
            .filter(|row| volume.is_none_or(|name| name == row.volume))
            .collect())
    }

    /// The replication of `volume`, a volume of this node, for an action that needs it
    /// (`refused`: why it cannot be without, e.g. "there is nothing to promote").
    fn replicated(&self, volume: &str, refused: &str) -> Result<&Replication, RemoteError> {
        self.engine.volume_named(volume).map_err(control_error)?;
        self.replication.as_deref().ok_or_else(|| {
            RemoteError::new(
                proto::UNSUPPORTED,
                format!("volume {volume} is not replicated: {refused}"),
            )
        })
    }

    fn promote(&self, volume: &str, force: bool) -> Result<PromoteResult, RemoteError> {
        let promoted = self
            .replicated(volume, "there is nothing to promote")?
            .promote(volume, force)
            .map_err(|error| RemoteError::new(proto::UNSUPPORTED, error.to_string()))?;
        Ok(PromoteResult {
            volume: promoted.volume,
            epoch: promoted.epoch,
            survivors: promoted.survivors,
            regions_copied: promoted.regions_copied,
            bytes_copied: promoted.bytes_copied,
            behind: promoted.behind,
        })
    }

    fn reparent(&self, volume: &str, to: &str) -> Result<ReparentResult, RemoteError> {
        let done = self
            .replicated(volume, "it has no primary to move")?
            .reparent(volume, to)
            .map_err(|error| RemoteError::new(proto::UNSUPPORTED, error.to_string()))?;
        Ok(ReparentResult {
            volume: done.volume,
            from: done.from,
            to: done.to,
            epoch: done.epoch,
            sequence: done.sequence,
            paused_us: done.paused.as_micros() as u64,
        })
    }

    /// The operator's rules; a handler that panicked holding them left them whole (each
    /// change is applied to the engine before the map), so a poisoned lock is taken as is.
    fn rules(&self) -> std::sync::MutexGuard<'_, HashMap<(String, LayerName), Vec<Value>>> {
        self.rules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hello(&self) -> Hello {
        let config = self.engine.config();
        Hello {
            version: proto::VERSION,
            node_id: config.node.id.clone(),
            pid: std::process::id(),
            region: self
                .engine
                .stats_region()
                .map(|region| region.path().display().to_string()),
            data_dir: config.node.data_dir.display().to_string(),
        }
    }

    fn volumes(&self) -> Result<Vec<VolumeRow>, RemoteError> {
        let rules = self.rules();
        self.engine
            .volumes()
            .iter()
            .map(|volume| {
                let layers = self.engine.layers(&volume.name).map_err(control_error)?;
                Ok(VolumeRow {
                    name: volume.name.clone(),
                    device: volume.device_name.clone(),
                    nsid: volume.nsid as u64,
                    first_lba: volume.first_lba,
                    blocks: volume.blocks,
                    block_size: volume.block_size as u64,
                    size_bytes: volume.size_bytes(),
                    core: volume.core as u64,
                    stubs: layers
                        .stubs()
                        .iter()
                        .map(|layer| layer.to_string())
                        .collect(),
                    rules: rules
                        .iter()
                        .filter(|((target, _), _)| *target == volume.name)
                        .map(|(_, list)| list.len())
                        .sum(),
                })
            })
            .collect()
    }

    fn devices(&self) -> Vec<DeviceRow> {
        let rules = self.rules();
        self.engine
            .devices()
            .map(|info| DeviceRow {
                name: info.name.clone(),
                driver: info.driver.to_string(),
                model: info.model.clone(),
                serial: info.serial.clone(),
                namespaces: info
                    .namespaces
                    .iter()
                    .map(|namespace| NamespaceRow {
                        nsid: namespace.nsid as u64,
                        blocks: namespace.blocks,
                        block_size: namespace.block_size as u64,
                    })
                    .collect(),
                max_transfer_bytes: info.max_transfer_bytes as u64,
                queue_depth: self.engine.queue_depth() as u32,
                rules: rules
                    .iter()
                    .filter(|((target, _), _)| *target == info.name)
                    .map(|(_, list)| list.len())
                    .sum(),
            })
            .collect()
    }

    /// One volume's layers, top to bottom, as `fathom-ctl layers` shows them.
    fn layer_rows(&self, volume: &str) -> Result<Vec<LayerRow>, RemoteError> {
        let settings = self.engine.layers(volume).map_err(control_error)?;
        let device = self
            .engine
            .volume(volume)
            .map(|volume| volume.device_name.clone())
            .unwrap_or_default();
        let rules = self.rules();
        Ok(LayerName::ALL
            .into_iter()
            .map(|layer| {
                let owner = match layer {
                    LayerName::Device | LayerName::Media => device.clone(),
                    _ => volume.to_string(),
                };
                let count = rules
                    .get(&(owner.clone(), layer))
                    .map_or(0, |list| list.len());
                let (state, detail) = if settings.get(layer).stub {
                    ("stub", stub_detail(layer).to_string())
                } else if count > 0 {
                    ("inject", format!("{count} rule(s) on {owner}"))
                } else {
                    ("pass", String::new())
                };
                LayerRow {
                    volume: volume.to_string(),
                    layer: layer.to_string(),
                    state: state.to_string(),
                    detail,
                }
            })
            .collect())
    }

    fn layers(&self, volume: Option<String>) -> Result<Vec<LayerRow>, RemoteError> {
        match volume {
            Some(volume) => self.layer_rows(&volume),
            None => {
                let mut rows = Vec::new();
                for volume in self.engine.volumes() {
                    rows.extend(self.layer_rows(&volume.name)?);
                }
                Ok(rows)
            }
        }
    }

    fn stub(&self, volume: &str, layer: &str, on: bool) -> Result<LayerRow, RemoteError> {
        let layer = parse_layer(layer)?;
        if layer == LayerName::Frontend {
            return Err(RemoteError::new(
                proto::UNSUPPORTED,
                fathom_engine::layer::FRONTEND_STUB,
            ));
        }
        self.engine
            .change_layers(volume, |settings| {
                settings.get_mut(layer).stub = on;
                Ok(())
            })
            .map_err(control_error)?;
        let rows = self.layer_rows(volume)?;
        Ok(rows
            .into_iter()
            .nth(layer as usize)
            .expect("a row per layer"))
    }

    /// Which layer of `target` a rule goes to, and whether the target is a device.
    fn target_layer(
        &self,
        target: &str,
        layer: Option<&str>,
    ) -> Result<(LayerName, bool), RemoteError> {
        let device = self.engine.devices().any(|info| info.name == target);
        let volume = self.engine.volume(target).is_some();
        if !device && !volume {
            let volumes: Vec<String> = self.engine.volumes().into_iter().map(|v| v.name).collect();
            let devices: Vec<String> = self.engine.devices().map(|d| d.name.clone()).collect();
            return Err(RemoteError::new(
                proto::UNKNOWN_VOLUME,
                format!(
                    "no volume or device {target:?}; volumes: {}; devices: {}",
                    volumes.join(", "),
                    devices.join(", ")
                ),
            ));
        }
        let layer = match layer {
            Some(layer) => parse_layer(layer)?,
            None if device => LayerName::Device,
            None => LayerName::Engine,
        };
        let device_layer = matches!(layer, LayerName::Device | LayerName::Media);
        if device && !device_layer {
            return Err(RemoteError::new(
                proto::UNKNOWN_LAYER,
                format!(
                    "{target} is a device: its layers are device and media; the {layer} layer \
                     belongs to each volume (`fathom-ctl inject add VOLUME --layer {layer}`)"
                ),
            ));
        }
        if !device && device_layer {
            let owner = &self.engine.volume(target).expect("checked").device_name;
            return Err(RemoteError::new(
                proto::UNKNOWN_LAYER,
                format!(
                    "{target} is a volume: its layers are frontend, engine and queue; the {layer} \
                     layer belongs to its device (`fathom-ctl inject add {owner} --layer {layer}`)"
                ),
            ));
        }
        Ok((layer, device))
    }

    /// Edits the engine's own rule list of (`target`, `layer`): the device's, or the
    /// volume's layer's.
    fn change_rules(
        &self,
        target: &str,
        layer: LayerName,
        device: bool,
        edit: impl FnOnce(&mut Vec<InjectRule>),
    ) -> Result<(), RemoteError> {
        let changed = if device {
            self.engine
                .change_device_inject(target, layer, |rules| {
                    edit(rules);
                    Ok(())
                })
                .map(drop)
        } else {
            self.engine
                .change_layers(target, |settings| {
                    edit(&mut settings.get_mut(layer).inject);
                    Ok(())
                })
                .map(drop)
        };
        changed.map_err(control_error)
    }

    fn inject_add(
        &self,
        target: &str,
        layer: Option<&str>,
        rule: Value,
    ) -> Result<RuleRow, RemoteError> {
        let (layer, device) = self.target_layer(target, layer)?;
        let parsed: InjectRule = serde_json::from_value(rule.clone()).map_err(|error| {
            RemoteError::new(
                proto::BAD_RULE,
                format!(
                    "injection rule: {error}; a rule is the config's [[device.inject]] table, e.g. \
                     {{\"ops\":[\"read\"],\"fraction\":1.0,\"latency\":\"fixed(50us)\"}}"
                ),
            )
        })?;
        let mut rules = self.rules();
        self.change_rules(target, layer, device, |current| current.push(parsed))?;
        let list = rules.entry((target.to_string(), layer)).or_default();
        list.push(rule.clone());
        let index = list.len() - 1;
        Ok(RuleRow {
            target: target.to_string(),
            layer: layer.to_string(),
            index,
            rule,
        })
    }

    fn inject_list(&self, target: Option<String>) -> Result<Vec<RuleRow>, RemoteError> {
        if let Some(target) = &target {
            self.target_layer(target, None)?;
        }
        let rules = self.rules();
        let mut rows: Vec<RuleRow> = rules
            .iter()
            .filter(|((owner, _), _)| target.as_ref().is_none_or(|target| target == owner))
            .flat_map(|((owner, layer), list)| {
                list.iter().enumerate().map(move |(index, rule)| RuleRow {
                    target: owner.clone(),
                    layer: layer.to_string(),
                    index,
                    rule: rule.clone(),
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.target, &a.layer, a.index).cmp(&(&b.target, &b.layer, b.index)));
        Ok(rows)
    }

    fn inject_clear(&self, target: &str, layer: Option<&str>) -> Result<Cleared, RemoteError> {
        let (_, device) = self.target_layer(target, None)?;
        let layers: Vec<LayerName> = match layer {
            Some(layer) => vec![self.target_layer(target, Some(layer))?.0],
            None if device => vec![LayerName::Device, LayerName::Media],
            None => vec![
                LayerName::Frontend,
                LayerName::Engine,
                LayerName::Replication,
                LayerName::Queue,
            ],
        };
        let mut rules = self.rules();
        let mut cleared = 0;
        for layer in layers {
            let key = (target.to_string(), layer);
            let count = rules.get(&key).map_or(0, |list| list.len());
            if count == 0 {
                continue;
            }
            self.change_rules(target, layer, device, Vec::clear)?;
            rules.remove(&key);
            cleared += count;
        }
        Ok(Cleared { cleared })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        volume: &str,
        rw: &str,
        bs: u64,
        iodepth: u32,
        runtime_ms: u64,
        ramp_ms: u64,
        size: Option<u64>,
        seed: Option<u64>,
        rwmixread: Option<u32>,
    ) -> Result<RunResult, RemoteError> {
        let bad = |what: String| RemoteError::new(proto::BAD_REQUEST, format!("run: {what}"));
        let target = self
            .engine
            .volume_named(volume)
            .map_err(control_error)?
            .clone();
        let pattern = Pattern::from_str(rw, true).map_err(|_| {
            bad(format!(
                "rw {rw:?}: one of read, write, randread, randwrite, readwrite, randrw"
            ))
        })?;
        let block = target.block_size as u64;
        if bs == 0 || !bs.is_multiple_of(block) || bs > target.max_transfer_bytes as u64 {
            return Err(bad(format!(
                "bs {bs}: a multiple of the volume's {block}-byte blocks, at most {} bytes",
                target.max_transfer_bytes
            )));
        }
        if iodepth == 0 || iodepth > MAX_IODEPTH {
            return Err(bad(format!("iodepth {iodepth}: 1 to {MAX_IODEPTH}")));
        }
        let (runtime, ramp) = (
            Duration::from_millis(runtime_ms),
            Duration::from_millis(ramp_ms),
        );
        if runtime.is_zero() || runtime > MAX_RUNTIME || ramp > MAX_RUNTIME {
            return Err(bad(format!(
                "runtime_ms {runtime_ms}, ramp_ms {ramp_ms}: a runtime of 1 ms to 1 h, a ramp of at most 1 h"
            )));
        }
        let span = size.unwrap_or(target.size_bytes());
        if span < bs || span > target.size_bytes() {
            return Err(bad(format!(
                "size {span}: at least bs ({bs}) and at most the volume's {} bytes",
                target.size_bytes()
            )));
        }
        let read_percent = rwmixread.unwrap_or(50);
        if read_percent > 100 {
            return Err(bad(format!("rwmixread {read_percent}: 0 to 100")));
        }
        if self.runs.fetch_add(1, Ordering::AcqRel) >= MAX_RUNS {
            self.runs.fetch_sub(1, Ordering::AcqRel);
            return Err(RemoteError::new(
                proto::BUSY,
                format!("{MAX_RUNS} workloads already run on this node; wait for one to end"),
            ));
        }
        let result = self.run_workload(
            &target,
            WorkloadSpec {
                volume: target.id,
                pattern,
                block_size: bs,
                iodepth: iodepth as usize,
                span_bytes: span - span % bs,
                runtime,
                ramp,
                seed: seed.unwrap_or(0x5eed),
                read_percent,
            },
        );
        self.runs.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn run_workload(
        &self,
        volume: &fathom_engine::Volume,
        spec: WorkloadSpec,
    ) -> Result<RunResult, RemoteError> {
        let wait = spec.runtime + spec.ramp + Duration::from_secs(30);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let task = WorkloadTask::new(spec, self.engine.dma(), *self.engine.clock(), tx).map_err(
            |error| {
                RemoteError::new(
                    proto::BUSY,
                    format!("run: no DMA memory for the workload's buffers ({error}); lower iodepth or bs"),
                )
            },
        )?;
        self.engine
            .spawn(volume.reactor, Box::new(task))
            .map_err(|error| RemoteError::new(proto::BUSY, format!("run: {error}")))?;
        let result = rx.recv_timeout(wait).map_err(|_| {
            RemoteError::new(
                proto::INTERNAL,
                format!(
                    "run: the workload did not report within {wait:?}; the reactor may be stuck"
                ),
            )
        })?;
        Ok(RunResult {
            volume: volume.name.clone(),
            core: result.core,
            ios: result.ios,
            bytes: result.bytes,
            errors: result.errors,
            elapsed_ns: result.elapsed_ns,
            cpu_ns: result.cpu_ns,
            waited_ios: result.waited_ios,
            wait_ns: result.wait_ns,
        })
    }

    /// The engine's trace settings, or why there are none.
    fn trace_settings(&self) -> Result<&TraceSettings, RemoteError> {
        self.engine.trace_settings().ok_or_else(|| {
            let why = if self.engine.config().telemetry.enabled {
                "tracing is off on this node ([telemetry.trace] enabled = false)"
            } else {
                "tracing is off on this node: it needs telemetry, which is off ([telemetry] enabled = false)"
            };
            RemoteError::new(
                proto::UNSUPPORTED,
                format!(
                    "{why}; to trace, set [telemetry.trace] enabled = true with [telemetry] \
                     enabled = true in the node's config and restart the node"
                ),
            )
        })
    }

    /// The volumes a trace command is about: the one named, or every volume.
    fn trace_volumes(&self, volume: Option<&str>) -> Result<Vec<Volume>, RemoteError> {
        match volume {
            Some(name) => Ok(vec![self
                .engine
                .volume_named(name)
                .map_err(control_error)?]),
            None => Ok(self.engine.volumes()),
        }
    }

    fn trace_row(settings: &TraceSettings, volume: &Volume, sampling: VolumeSampling) -> TraceRow {
        let index = volume.id.0 as usize;
        TraceRow {
            volume: volume.name.clone(),
            rate: sampling.rate,
            tail: tail_text(sampling.tail),
            thresholds_ns: OP_NAMES[..CLIENT_OPS]
                .iter()
                .enumerate()
                .map(|(op, name)| {
                    let threshold = settings
                        .threshold(index, op)
                        .map(|threshold| u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX));
                    (name.to_string(), threshold)
                })
                .collect(),
        }
    }

    fn trace_show(&self, volume: Option<&str>) -> Result<Vec<TraceRow>, RemoteError> {
        let settings = self.trace_settings()?;
        let volumes = self.trace_volumes(volume)?;
        let sampling = settings.sampling();
        Ok(volumes
            .into_iter()
            .map(|volume| Self::trace_row(settings, &volume, sampling[volume.id.0 as usize]))
            .collect())
    }

    /// Changes the rate and/or the tail of the volumes named; everything is checked before
    /// the first volume changes.
    fn trace_set(
        &self,
        volume: Option<&str>,
        rate: Option<u32>,
        tail: Option<&str>,
    ) -> Result<Vec<TraceRow>, RemoteError> {
        let bad = |what: String| RemoteError::new(proto::BAD_REQUEST, format!("trace_set: {what}"));
        let settings = self.trace_settings()?;
        let volumes = self.trace_volumes(volume)?;
        let tail = tail
            .map(|text| TailThreshold::parse(text).map_err(|error| bad(format!("tail: {error}"))))
            .transpose()?;
        if rate.is_none() && tail.is_none() {
            return Err(bad("nothing to change: give a rate, a tail, or both".into()));
        }
        let _changing = self
            .trace_changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut sampling = settings.sampling();
        let mut rows = Vec::with_capacity(volumes.len());
        for volume in volumes {
            let index = volume.id.0 as usize;
            let changed = &mut sampling[index];
            if let Some(rate) = rate {
                changed.rate = rate;
            }
            if let Some(tail) = tail {
                changed.tail = tail;
            }
            settings.set(index, *changed);
            rows.push(Self::trace_row(settings, &volume, *changed));
        }
        Ok(rows)
    }
}

impl Handler for NodeControl {
    fn handle(&self, request: Request) -> Result<Value, RemoteError> {
        fn json(value: impl serde::Serialize) -> Result<Value, RemoteError> {
            serde_json::to_value(value)
                .map_err(|error| RemoteError::new(proto::INTERNAL, error.to_string()))
        }
        match request {
            Request::Hello => json(self.hello()),
            Request::Volumes => json(self.volumes()?),
            Request::Devices => json(self.devices()),
            Request::Layers { volume } => json(self.layers(volume)?),
            Request::StubSet { volume, layer } => json(self.stub(&volume, &layer, true)?),
            Request::StubClear { volume, layer } => json(self.stub(&volume, &layer, false)?),
            Request::InjectAdd {
                target,
                layer,
                rule,
            } => json(self.inject_add(&target, layer.as_deref(), rule)?),
            Request::InjectList { target } => json(self.inject_list(target)?),
            Request::InjectClear { target, layer } => {
                json(self.inject_clear(&target, layer.as_deref())?)
            }
            Request::Run {
                volume,
                rw,
                bs,
                iodepth,
                runtime_ms,
                ramp_ms,
                size,
                seed,
                rwmixread,
            } => json(self.run(
                &volume, &rw, bs, iodepth, runtime_ms, ramp_ms, size, seed, rwmixread,
            )?),
            Request::TraceShow { volume } => json(self.trace_show(volume.as_deref())?),
            Request::TraceSet { volume, rate, tail } => {
                json(self.trace_set(volume.as_deref(), rate, tail.as_deref())?)
            }
            Request::Replication { volume } => json(self.replication(volume.as_deref())?),
            Request::Promote { volume, force } => json(self.promote(&volume, force)?),
            Request::Partition { state } => {
                use fathom_net::fault::{set_partition, Partition};
                let (partition, what) = match state.as_str() {
                    "on" => (Partition::All, "cut off from its peers and etcd"),
                    "etcd" => (Partition::Etcd, "cut off from etcd (its peers are reached)"),
                    "off" => (Partition::Off, "reconnected to its peers and etcd"),
                    other => {
                        return Err(RemoteError::new(
                            proto::BAD_REQUEST,
                            format!("partition state {other:?}: use \"on\", \"etcd\" or \"off\""),
                        ))
                    }
                };
                if partition != fathom_net::fault::partition() {
                    tracing::warn!("partition switch {state}: this node is {what}");
                }
                set_partition(partition);
                json(serde_json::json!({ "partition": state }))
            }
            Request::Reparent { volume, to } => json(self.reparent(&volume, &to)?),
            Request::Health { volume } => {
                let mut status = self.health()?.status.lock().clone();
                if let Some(name) = volume {
                    self.engine.volume_named(&name).map_err(control_error)?;
                    status.volumes.retain(|health| health.volume == name);
                }
                json(status)
            }
            Request::HealthAdvise { volume, advise } => {
                let health = self.health()?;
                self.engine.volume_named(&volume).map_err(control_error)?;
                health.set_advise(&volume, advise);
                tracing::info!(
                    "health: volume {volume}'s actions are {} from now on",
                    if advise { "advise-only" } else { "taken" }
                );
                json(serde_json::json!({ "volume": volume, "advise": advise }))
            }
        }
    }
}

fn parse_layer(layer: &str) -> Result<LayerName, RemoteError> {
    layer
        .parse()
        .map_err(|what: String| RemoteError::new(proto::UNKNOWN_LAYER, what))
}

fn stub_detail(layer: LayerName) -> &'static str {
    match layer {
        LayerName::Frontend => "workload inside the node",
        LayerName::Engine => "no engine layers: nothing held or delayed",
        LayerName::Replication => "no replication stub yet",
        LayerName::Queue => "completes at submission, NVMe rings untouched",
        LayerName::Device => "inline null controller behind the same queue code",
        LayerName::Media => "the controller moves no data",
    }
}

/// A tail setting as text that `trace_set` and the config take back. Durations are written
/// with `us`, as operators and the config write them, not the `µs` of `Duration`'s `Debug`
/// (which the engine's `Display` uses); both parse.
fn tail_text(tail: TailThreshold) -> String {
    tail.to_string().replace("µs", "us")
}

fn control_error(error: ControlError) -> RemoteError {
    let code = match &error {
        ControlError::UnknownVolume { .. } => proto::UNKNOWN_VOLUME,
        ControlError::UnknownDevice { .. } => proto::UNKNOWN_DEVICE,
        ControlError::Unsupported { .. } => proto::UNSUPPORTED,
        ControlError::BadRule { .. } => proto::BAD_RULE,
        ControlError::Timeout(_) | ControlError::VolumeBusy { .. } => proto::BUSY,
        ControlError::VolumeExists { .. }
        | ControlError::NoVolumeSlot { .. }
        | ControlError::BadVolume { .. } => proto::UNSUPPORTED,
        ControlError::Stopped => proto::INTERNAL,
    };
    RemoteError::new(code, error.to_string())
}

/// Each replicated volume's row as node `node` sees it (`fathom-ctl replication`): the
/// primary's with its replicas, a replica's with what it applied.
pub fn replication_rows(
    node: &str,
    roles: &[std::sync::Arc<fathom_replication::role::VolumeRole>],
) -> Vec<ReplicationRow> {
    roles
        .iter()
        .map(|role| match role.primary_status() {
            Some(status) => ReplicationRow {
                volume: status.volume.clone(),
                role: "primary".into(),
                epoch: status.epoch(),
                primary: node.to_string(),
                sequence: status.sequence(),
                fenced: status.fenced(),
                in_sync: status.serving(),
                peers: status
                    .peers
                    .iter()
                    .map(|peer| PeerRow {
                        node: peer.node.clone(),
                        state: peer.state().as_str().into(),
                        in_sync: peer.in_sync(),
                        acknowledged: peer.acknowledged(),
                        dirty_bytes: peer.dirty_regions() * status.region_bytes,
                        resync_left_bytes: peer.stale_regions() * status.region_bytes,
                        resynced_bytes: peer.resynced_bytes(),
                    })
                    .collect(),
                resync_rate: status.resync_pace(),
                resync_client_p99_us: status.resync_client_p99_us(),
            },
            None => ReplicationRow {
                volume: role.volume.clone(),
                role: "replica".into(),
                epoch: role.epoch(),
                primary: role.superblock().primary,
                sequence: role.applied(),
                fenced: false,
                in_sync: role.in_sync(),
                peers: Vec::new(),
                resync_rate: 0,
                resync_client_p99_us: 0,
            },
        })
        .collect()
}
