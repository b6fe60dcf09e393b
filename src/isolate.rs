//! `fathom-bench isolate`: which layer holds the latency.
//!
//! The same workload runs with the full stack and then with one layer at a time replaced by
//! its loopback stub, in alternating rounds (full, frontend, engine, ..., full, frontend, ...)
//! so that drift of a shared machine spreads over every variant alike. Latency is the node's
//! own `total` stage from the stats region over each round, so every variant is measured by
//! the same clock at the same two points.
//!
//! What a stub removes: the `frontend` stub (the workload runs inside the node) and the
//! `engine` stub remove only their own layer; `queue` completes at submission, so it removes
//! the queue and everything below; `device` removes the device and its media; `media` only
//! the data movement. A layer's own share is therefore
//!
//! ```text
//! frontend = full - frontend-stubbed       engine = full - engine-stubbed
//! queue    = device-stubbed - queue-stubbed
//! device   = media-stubbed  - device-stubbed
//! media    = full - media-stubbed
//! ```
//!
//! (a layer whose stub cannot run here falls back to the next one measured below it). The noise
//! band of a share is the sum of the half-ranges, across rounds, of the two variants it is the
//! difference of.
//!
//! fathom-bench's own NBD client spins on its socket (as `--hipri`): a client that sleeps in
//! poll(2) while a slow layer holds its IO has to be woken by the node's reply, and on some
//! virtual machines that wake-up (an IPI) adds several microseconds to the node's own latency,
//! only in the variants slow enough for the client to sleep: the layer slowed would be charged
//! for it.
//!
//! Queueing is its own line: IOs that the engine refused `Busy` (every slot or queue entry
//! taken) and waited to be submitted, as the in-node workload saw them, beside the engine's
//! `queue` stage for the same IOs, and the limit that explains them (a device queue whose
//! depth is below what its volumes keep in flight).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fathom_control::client::ControlClient;
use fathom_control::proto::{DeviceRow, Hello, Request, RunResult, VolumeRow};
use fathom_control::server::Handler;
use fathom_engine::layer::LayerName;
use fathom_telemetry::region::{RegionReader, Snapshot};
use fathom_telemetry::report::merged_histogram;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::nbd_client::{self, Connection, JobSpec, NbdUri};
use crate::node_control::NodeControl;
use crate::stat::duration;
use crate::workload::Pattern;

/// How long after a round the region is read, so the reactors have published its last IOs.
const SETTLE: Duration = Duration::from_millis(20);

/// The workload and the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct IsolateSpec {
    pub volumes: Vec<String>,
    pub pattern: Pattern,
    pub bs: u64,
    pub iodepth: u32,
    #[serde(serialize_with = "seconds")]
    pub runtime: Duration,
    #[serde(serialize_with = "seconds")]
    pub ramp: Duration,
    /// Bytes of each volume the workload spans (default: all of it).
    pub size: Option<u64>,
    pub rwmixread: u32,
    pub rounds: usize,
    /// Layers to stub, top first.
    #[serde(serialize_with = "layer_names")]
    pub layers: Vec<LayerName>,
    /// With a node: who drives the full stack through NBD.
    pub client: Client,
}

/// The NBD client of a node's full-stack rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// fathom-bench's own NBD client (the same generator as the in-node workload).
    Builtin,
    /// fio's nbd engine (Debian's fio), one job of --iodepth per volume.
    Fio,
}

fn seconds<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

fn layer_names<S: serde::Serializer>(
    value: &[LayerName],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(value.iter().map(|layer| layer.as_str()))
}

/// Where the workload runs.
pub enum Target {
    /// A running node: control through its socket, the full stack through NBD at `nbd`
    /// (`HOST:PORT`).
    Node { socket: PathBuf, nbd: String },
    /// An engine in this process, controlled without a socket; its "full stack" is the
    /// workload on the reactor (there is no front end).
    Local { control: Arc<NodeControl> },
}

impl Target {
    fn call(&self, request: Request, timeout: Duration) -> Result<serde_json::Value> {
        match self {
            Target::Node { socket, .. } => {
                let mut client = ControlClient::connect(socket, Duration::from_secs(10))
                    .with_context(|| format!("connecting to {}", socket.display()))?;
                Ok(client.call_with_timeout(&request, timeout)?)
            }
            Target::Local { control } => control.handle(request).map_err(|error| anyhow!(error)),
        }
    }

    fn typed<T: serde::de::DeserializeOwned>(&self, request: Request) -> Result<T> {
        let value = self.call(request, Duration::from_secs(30))?;
        serde_json::from_value(value).context("the node's answer does not have the expected shape")
    }

    fn has_frontend(&self) -> bool {
        matches!(self, Target::Node { .. })
    }
}

/// One round of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub iops: f64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
}

/// A variant: the full stack, or one layer stubbed.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    /// `None`: the full stack.
    pub stubbed: Option<String>,
    /// Why the variant could not run, when it could not.
    pub skipped: Option<String>,
    pub ios: u64,
    pub errors: u64,
    pub iops: f64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
    /// Half the range of the round means: the variant's noise band.
    pub noise_ns: f64,
    pub rounds: Vec<Round>,
    #[serde(skip)]
    total: Option<Histogram<u64>>,
    #[serde(skip)]
    queue: Option<Histogram<u64>>,
    #[serde(skip)]
    waits: (u64, u64, u64),
}

/// One layer's share of the latency.
#[derive(Debug, Clone, Serialize)]
pub struct Share {
    pub layer: String,
    /// The variants it is measured between (minuend, subtrahend).
    pub between: (String, String),
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub noise_ns: f64,
    /// Of the full stack's mean.
    pub percent: f64,
}

/// Waiting for a free slot or queue entry.
#[derive(Debug, Clone, Serialize)]
pub struct Queueing {
    /// IOs of the in-node workloads, those that waited, and their mean wait over all IOs.
    pub ios: u64,
    pub waited_ios: u64,
    pub mean_wait_ns: f64,
    /// The engine's `queue` stage of the same rounds' IOs (telemetry).
    pub telemetry_mean_ns: f64,
    pub telemetry_p99_ns: f64,
    /// What limits them, when IOs waited.
    pub limit: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub node: String,
    pub region: String,
    pub spec: IsolateSpec,
    pub variants: Vec<Variant>,
    pub shares: Vec<Share>,
    /// The layer with the largest mean share.
    pub largest: Option<String>,
    pub queueing: Queueing,
}

/// Runs the rounds and builds the report. `progress` is told each round as it starts.
pub fn isolate(target: &Target, spec: &IsolateSpec, progress: &dyn Fn(&str)) -> Result<Report> {
    let hello: Hello = target.typed(Request::Hello)?;
    let volumes: Vec<VolumeRow> = target.typed(Request::Volumes)?;
    let devices: Vec<DeviceRow> = target.typed(Request::Devices)?;
    let region_path = hello
        .region
        .clone()
        .ok_or_else(|| anyhow!("node {} runs without telemetry (telemetry.enabled = false): isolate reads the stats region", hello.node_id))?;
    let region = RegionReader::open(Path::new(&region_path))
        .with_context(|| format!("opening the node's stats region {region_path}"))?;
    let mut indices = Vec::new();
    for name in &spec.volumes {
        let row = volumes
            .iter()
            .find(|row| &row.name == name)
            .ok_or_else(|| {
                anyhow!(
                    "node {} has no volume {name:?}; it has {}",
                    hello.node_id,
                    volumes
                        .iter()
                        .map(|row| row.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        if !row.stubs.is_empty() {
            bail!(
                "volume {name} already has stubs set ({}): clear them first (`fathom-ctl stub clear {name} LAYER`), so the full stack is the full stack",
                row.stubs.join(", ")
            );
        }
        let index = region
            .directory()
            .live_volumes()
            .find(|(_, entry)| &entry.name == name)
            .map(|(index, _)| index)
            .ok_or_else(|| anyhow!("volume {name} is not in the stats region {region_path}"))?;
        indices.push(index);
    }
    let directory = region.directory();
    let stage = |name: &str| {
        directory
            .stages
            .iter()
            .position(|stage| stage == name)
            .ok_or_else(|| anyhow!("the stats region has no {name:?} stage"))
    };
    let (total_stage, queue_stage) = (stage("total")?, stage("queue")?);
    let ops: Vec<usize> = match spec.pattern {
        Pattern::Read | Pattern::Randread => vec![0],
        Pattern::Write | Pattern::Randwrite => vec![1],
        Pattern::Readwrite | Pattern::Randrw => vec![0, 1],
    };
    let hz = directory.tsc_hz;
    let to_ns = 1e9 / hz as f64;

    let mut names: Vec<Option<LayerName>> = vec![None];
    for &layer in &spec.layers {
        if layer == LayerName::Frontend && !target.has_frontend() {
            continue;
        }
        names.push(Some(layer));
    }
    let mut variants: Vec<Variant> = names
        .iter()
        .map(|stubbed| Variant {
            stubbed: stubbed.map(|layer| layer.to_string()),
            skipped: None,
            ios: 0,
            errors: 0,
            iops: 0.0,
            mean_ns: 0.0,
            p50_ns: 0.0,
            p99_ns: 0.0,
            p999_ns: 0.0,
            noise_ns: 0.0,
            rounds: Vec::new(),
            total: None,
            queue: None,
            waits: (0, 0, 0),
        })
        .collect();

    for round in 0..spec.rounds {
        for (index, stubbed) in names.iter().enumerate() {
            if variants[index].skipped.is_some() {
                continue;
            }
            let label =
                stubbed.map_or("full stack".to_string(), |layer| format!("{layer} stubbed"));
            progress(&format!("round {}/{}: {label}", round + 1, spec.rounds));
            let measured = match run_variant(target, spec, *stubbed, &region) {
                Ok(measured) => measured,
                Err(error) if round == 0 && stubbed.is_some() => {
                    // A stub this node cannot apply (a driver without null media, say): the
                    // report says so, the other layers are still measured.
                    variants[index].skipped = Some(format!("{error:#}"));
                    continue;
                }
                Err(error) => return Err(error.context(format!("round {} ({label})", round + 1))),
            };
            let (from, to, elapsed, loads) = measured;
            let total = merged_histogram(directory, &from, &to, &indices, &ops, total_stage);
            let queue = merged_histogram(directory, &from, &to, &indices, &ops, queue_stage);
            let variant = &mut variants[index];
            variant.rounds.push(Round {
                iops: total.len() as f64 / elapsed.as_secs_f64().max(1e-9),
                mean_ns: total.mean() * to_ns,
                p50_ns: total.value_at_quantile(0.5) as f64 * to_ns,
                p99_ns: total.value_at_quantile(0.99) as f64 * to_ns,
            });
            for load in &loads {
                variant.errors += load.errors;
                if let Some(run) = &load.inside {
                    variant.waits.0 += run.ios;
                    variant.waits.1 += run.waited_ios;
                    variant.waits.2 += run.wait_ns;
                }
            }
            match (&mut variant.total, &mut variant.queue) {
                (Some(all), Some(all_queue)) => {
                    // Same layout on both sides: adding cannot fail.
                    let _ = all.add(&total);
                    let _ = all_queue.add(&queue);
                }
                _ => {
                    variant.total = Some(total);
                    variant.queue = Some(queue);
                }
            }
        }
    }
    for variant in variants.iter_mut() {
        let Some(total) = &variant.total else {
            continue;
        };
        variant.ios = total.len();
        variant.mean_ns = total.mean() * to_ns;
        variant.p50_ns = total.value_at_quantile(0.5) as f64 * to_ns;
        variant.p99_ns = total.value_at_quantile(0.99) as f64 * to_ns;
        variant.p999_ns = total.value_at_quantile(0.999) as f64 * to_ns;
        variant.iops = variant.rounds.iter().map(|round| round.iops).sum::<f64>()
            / variant.rounds.len().max(1) as f64;
        let means = variant.rounds.iter().map(|round| round.mean_ns);
        let (low, high) = means.fold((f64::MAX, f64::MIN), |(low, high), mean| {
            (low.min(mean), high.max(mean))
        });
        variant.noise_ns = if variant.rounds.len() > 1 {
            (high - low) / 2.0
        } else {
            0.0
        };
    }
    let shares = shares(&variants);
    let largest = shares
        .iter()
        .max_by(|a, b| a.mean_ns.total_cmp(&b.mean_ns))
        .map(|share| share.layer.clone());
    let queueing = queueing(&variants, spec, &volumes, &devices, to_ns);
    Ok(Report {
        node: hello.node_id,
        region: region_path,
        spec: spec.clone(),
        variants,
        shares,
        largest,
        queueing,
    })
}

/// What one volume's workload did in a round.
struct Load {
    errors: u64,
    /// The in-node workload's own result (its waits), when it ran inside the node.
    inside: Option<RunResult>,
}

type Measured = (Snapshot, Snapshot, Duration, Vec<Load>);

/// One round of one variant: stubs set, every volume's workload at once, stubs cleared.
fn run_variant(
    target: &Target,
    spec: &IsolateSpec,
    stubbed: Option<LayerName>,
    region: &RegionReader,
) -> Result<Measured> {
    let inside = !target.has_frontend() || stubbed == Some(LayerName::Frontend);
    let switched = stubbed.filter(|&layer| layer != LayerName::Frontend);
    if let Some(layer) = switched {
        for (index, volume) in spec.volumes.iter().enumerate() {
            if let Err(error) = target.call(
                Request::StubSet {
                    volume: volume.clone(),
                    layer: layer.to_string(),
                },
                Duration::from_secs(30),
            ) {
                clear_stubs(target, &spec.volumes[..index], layer);
                return Err(error.context(format!("stubbing the {layer} layer of {volume}")));
            }
        }
    }
    let result = std::thread::scope(|scope| -> Result<Measured> {
        let start = Arc::new(Barrier::new(spec.volumes.len() + 1));
        let handles: Vec<_> = spec
            .volumes
            .iter()
            .enumerate()
            .map(|(index, volume)| {
                let start = start.clone();
                scope.spawn(move || run_load(target, spec, volume, index, inside, &start))
            })
            .collect();
        start.wait();
        std::thread::sleep(spec.ramp);
        let from = region.snapshot(0);
        let began = Instant::now();
        let mut loads = Vec::new();
        for handle in handles {
            loads.push(
                handle
                    .join()
                    .map_err(|_| anyhow!("a workload thread panicked"))??,
            );
        }
        let elapsed = began.elapsed();
        std::thread::sleep(SETTLE);
        Ok((from, region.snapshot(0), elapsed, loads))
    });
    if let Some(layer) = switched {
        clear_stubs(target, &spec.volumes, layer);
    }
    result
}

fn clear_stubs(target: &Target, volumes: &[String], layer: LayerName) {
    for volume in volumes {
        let _ = target.call(
            Request::StubClear {
                volume: volume.clone(),
                layer: layer.to_string(),
            },
            Duration::from_secs(30),
        );
    }
}

/// One volume's workload for one round: inside the node (`run`), or through NBD.
fn run_load(
    target: &Target,
    spec: &IsolateSpec,
    volume: &str,
    index: usize,
    inside: bool,
    start: &Barrier,
) -> Result<Load> {
    let seed = 0x5eed + index as u64;
    if inside {
        let request = Request::Run {
            volume: volume.to_string(),
            rw: format!("{:?}", spec.pattern).to_lowercase(),
            bs: spec.bs,
            iodepth: spec.iodepth,
            runtime_ms: spec.runtime.as_millis() as u64,
            ramp_ms: spec.ramp.as_millis() as u64,
            size: spec.size,
            seed: Some(seed),
            rwmixread: Some(spec.rwmixread),
        };
        start.wait();
        let timeout = spec.runtime + spec.ramp + Duration::from_secs(60);
        let value = target.call(request, timeout)?;
        let run: RunResult = serde_json::from_value(value).context("the node's run result")?;
        return Ok(Load {
            errors: run.errors,
            inside: Some(run),
        });
    }
    let Target::Node { nbd, .. } = target else {
        unreachable!("only a node has a front end")
    };
    if spec.client == Client::Fio {
        return run_fio(spec, &format!("nbd://{nbd}/{volume}"), start);
    }
    let uri = NbdUri::parse(&format!("nbd://{nbd}/{volume}"))?;
    let connection =
        Connection::open(&uri).with_context(|| format!("opening nbd://{nbd}/{volume}"))?;
    let export = connection.export().clone();
    let span = spec.size.unwrap_or(export.size_bytes) / spec.bs * spec.bs;
    let job = JobSpec {
        job: index,
        pattern: spec.pattern,
        block_size: u32::try_from(spec.bs).context("--bs")?,
        iodepth: spec.iodepth as usize,
        offset_bytes: 0,
        span_bytes: span,
        runtime: spec.runtime,
        ramp: spec.ramp,
        seed,
        read_percent: spec.rwmixread,
        // The node's latency must not include waking the client up: a sleeping client's
        // wake-up is paid in the node's reply (an IPI, ~5 us on some VMs), and only when IOs
        // take long enough for the client to sleep, so it would be counted in a slow layer.
        spin: true,
        // A lost connection ends the run: the measurement is of one node.
        reconnect: Vec::new(),
        reconnect_timeout: Duration::ZERO,
    };
    let result = nbd_client::run_job(connection, &job, start, &AtomicU64::new(0))?;
    Ok(Load {
        errors: result.errors,
        inside: None,
    })
}

/// One volume's full-stack round driven by fio's nbd engine.
fn run_fio(spec: &IsolateSpec, uri: &str, start: &Barrier) -> Result<Load> {
    let pattern = format!("{:?}", spec.pattern).to_lowercase();
    let mut command = std::process::Command::new("fio");
    command.args([
        "--name=isolate",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={pattern}"),
        &format!("--bs={}", spec.bs),
        &format!("--iodepth={}", spec.iodepth),
        &format!("--rwmixread={}", spec.rwmixread),
        &format!("--runtime={}ms", spec.runtime.as_millis()),
        &format!("--ramp_time={}ms", spec.ramp.as_millis()),
        "--time_based",
        "--output-format=json",
    ]);
    if let Some(size) = spec.size {
        command.arg(format!("--size={size}"));
    }
    start.wait();
    let output = command
        .output()
        .context("running fio (Debian's fio package) for --client fio")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "fio failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The nbd engine prints a line ahead of the JSON.
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio's JSON output: {text}"))?;
    let errors = json["jobs"][0]["error"].as_u64().unwrap_or(1);
    Ok(Load {
        errors,
        inside: None,
    })
}

/// Each layer's own share, from the variants that ran.
fn shares(variants: &[Variant]) -> Vec<Share> {
    let find = |stubbed: Option<LayerName>| {
        variants.iter().find(|variant| {
            variant.skipped.is_none()
                && variant.total.is_some()
                && variant.stubbed.as_deref() == stubbed.map(|layer| layer.as_str())
        })
    };
    let Some(full) = find(None) else {
        return Vec::new();
    };
    let mut shares = Vec::new();
    for layer in LayerName::ALL {
        let Some(stubbed) = find(Some(layer)) else {
            continue;
        };
        // What is left of the latency with this layer's stub, against the same with only
        // the layers below it gone (or the full stack).
        let above = match layer {
            LayerName::Frontend | LayerName::Engine | LayerName::Replication | LayerName::Media => {
                full
            }
            LayerName::Queue => find(Some(LayerName::Device))
                .or_else(|| find(Some(LayerName::Media)))
                .unwrap_or(full),
            LayerName::Device => find(Some(LayerName::Media)).unwrap_or(full),
        };
        shares.push(Share {
            layer: layer.to_string(),
            between: (
                above
                    .stubbed
                    .clone()
                    .map_or("full".into(), |l| format!("{l} stubbed")),
                format!("{layer} stubbed"),
            ),
            mean_ns: above.mean_ns - stubbed.mean_ns,
            p50_ns: above.p50_ns - stubbed.p50_ns,
            p99_ns: above.p99_ns - stubbed.p99_ns,
            noise_ns: above.noise_ns + stubbed.noise_ns,
            percent: 100.0 * (above.mean_ns - stubbed.mean_ns) / full.mean_ns.max(1e-9),
        });
    }
    shares
}

fn queueing(
    variants: &[Variant],
    spec: &IsolateSpec,
    volumes: &[VolumeRow],
    devices: &[DeviceRow],
    to_ns: f64,
) -> Queueing {
    // The variants whose workload ran inside the node know their waits.
    let mut queue: Option<Histogram<u64>> = None;
    let (mut ios, mut waited, mut wait_ns) = (0, 0, 0);
    for variant in variants {
        if variant.waits.0 == 0 || variant.stubbed.as_deref().is_some_and(|s| s != "frontend") {
            continue;
        }
        ios += variant.waits.0;
        waited += variant.waits.1;
        wait_ns += variant.waits.2;
        if let Some(histogram) = &variant.queue {
            match &mut queue {
                Some(all) => {
                    let _ = all.add(histogram);
                }
                None => queue = Some(histogram.clone()),
            }
        }
    }
    let limit = (waited * 100 > ios.max(1)).then(|| {
        // The device whose queue the volumes share, against what they keep in flight.
        let mut wanted: Vec<(&str, u64, u64)> = Vec::new();
        for name in &spec.volumes {
            let Some(row) = volumes.iter().find(|row| &row.name == name) else {
                continue;
            };
            match wanted
                .iter_mut()
                .find(|(device, core, _)| *device == row.device && *core == row.core)
            {
                Some(entry) => entry.2 += spec.iodepth as u64,
                None => wanted.push((&row.device, row.core, spec.iodepth as u64)),
            }
        }
        let over = wanted.iter().find_map(|&(device, core, want)| {
            let depth = devices.iter().find(|row| row.name == device)?.queue_depth as u64;
            (want > depth).then(|| {
                format!(
                    "device queue {device} on core {core}: {depth} entries, and its volumes keep {want} IOs in flight"
                )
            })
        });
        over.unwrap_or_else(|| {
            "the engine's IO slots on the volumes' reactor (every slot taken)".to_string()
        })
    });
    Queueing {
        ios,
        waited_ios: waited,
        mean_wait_ns: wait_ns as f64 / ios.max(1) as f64,
        telemetry_mean_ns: queue.as_ref().map_or(0.0, |q| q.mean() * to_ns),
        telemetry_p99_ns: queue
            .as_ref()
            .map_or(0.0, |q| q.value_at_quantile(0.99) as f64 * to_ns),
        limit,
    }
}

/// The human report: variants, shares, the largest, queueing.
pub fn render(report: &Report) -> String {
    let spec = &report.spec;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "isolate: node {} volumes {}: {:?} {} B QD{} ({} rounds of {:.1} s, ramp {:.1} s, full stack by {:?})",
        report.node,
        spec.volumes.join(","),
        spec.pattern,
        spec.bs,
        spec.iodepth,
        spec.rounds,
        spec.runtime.as_secs_f64(),
        spec.ramp.as_secs_f64(),
        spec.client
    );
    let _ = writeln!(
        out,
        "\n{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "VARIANT", "IOPS", "MEAN", "P50", "P99", "P99.9", "±NOISE"
    );
    for variant in &report.variants {
        let name = variant
            .stubbed
            .as_ref()
            .map_or("full stack".to_string(), |layer| format!("{layer} stubbed"));
        if let Some(why) = &variant.skipped {
            let _ = writeln!(out, "{name:<18} not run: {why}");
            continue;
        }
        let _ = writeln!(
            out,
            "{name:<18} {:>10.0} {:>10} {:>10} {:>10} {:>10} {:>9}",
            variant.iops,
            duration(variant.mean_ns),
            duration(variant.p50_ns),
            duration(variant.p99_ns),
            duration(variant.p999_ns),
            duration(variant.noise_ns)
        );
    }
    let _ = writeln!(
        out,
        "\n{:<10} {:>10} {:>9} {:>8} {:>10} {:>10}  measured as",
        "LAYER", "SHARE", "±NOISE", "OF MEAN", "OF P50", "OF P99"
    );
    for share in &report.shares {
        let _ = writeln!(
            out,
            "{:<10} {:>10} {:>9} {:>7.1}% {:>10} {:>10}  {} - {}",
            share.layer,
            duration(share.mean_ns),
            duration(share.noise_ns),
            share.percent,
            duration(share.p50_ns),
            duration(share.p99_ns),
            share.between.0,
            share.between.1
        );
    }
    if let Some(largest) = &report.largest {
        let share = report.shares.iter().find(|share| &share.layer == largest);
        if let Some(share) = share {
            let _ = writeln!(
                out,
                "\nlargest: {largest}, {} of the mean ({:.0}%)",
                duration(share.mean_ns),
                share.percent
            );
        }
    }
    let queueing = &report.queueing;
    let _ = writeln!(
        out,
        "queueing: {} of {} IOs waited for a free slot or queue entry, mean {} per IO; telemetry's queue stage: mean {}, p99 {}",
        queueing.waited_ios,
        queueing.ios,
        duration(queueing.mean_wait_ns),
        duration(queueing.telemetry_mean_ns),
        duration(queueing.telemetry_p99_ns)
    );
    if let Some(limit) = &queueing.limit {
        let _ = writeln!(out, "limit: {limit}");
    }
    out
}

/// One bar pair per layer: its share of p50 and of p99.
pub fn plot_svg(report: &Report) -> String {
    let (width, height, left, bottom, top) = (820.0, 420.0, 80.0, 60.0, 50.0);
    let plot_height = height - bottom - top;
    let max = report
        .shares
        .iter()
        .flat_map(|share| [share.p50_ns, share.p99_ns])
        .fold(1.0f64, f64::max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Latency share per layer: node {}, {} ({:?} {} B QD{})</text>"#,
        width / 2.0,
        report.node,
        report.spec.volumes.join(","),
        report.spec.pattern,
        report.spec.bs,
        report.spec.iodepth
    );
    let base = height - bottom;
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>"#,
        width - 20.0
    );
    for tick in 0..=4 {
        let value = max * tick as f64 / 4.0;
        let y = base - plot_height * tick as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            width - 20.0,
            left - 6.0,
            y + 4.0,
            duration(value)
        );
    }
    let slot = (width - left - 20.0) / report.shares.len().max(1) as f64;
    for (index, share) in report.shares.iter().enumerate() {
        let x = left + slot * index as f64 + slot * 0.15;
        let bar = slot * 0.33;
        for (offset, value, color) in [
            (0.0, share.p50_ns, "#1f77b4"),
            (bar, share.p99_ns, "#ff7f0e"),
        ] {
            let h = (value.max(0.0) / max) * plot_height;
            let _ = writeln!(
                svg,
                r#"<rect x="{}" y="{}" width="{bar}" height="{h}" fill="{color}"><title>{}: {}</title></rect>"#,
                x + offset,
                base - h,
                share.layer,
                duration(value)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x + bar,
            base + 18.0,
            share.layer
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="40" width="12" height="12" fill="#1f77b4"/><text x="{}" y="51">p50</text><rect x="{}" y="40" width="12" height="12" fill="#ff7f0e"/><text x="{}" y="51">p99</text>"##,
        width - 150.0,
        width - 134.0,
        width - 90.0,
        width - 74.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// `fathom-bench isolate`: which layer holds the latency. The same workload runs with the full
/// stack and with each layer stubbed in turn, in alternating rounds; the report gives, per
/// layer, its share of the mean, p50 and p99 of the node's `total` stage, with the spread
/// across rounds as the noise band, and a queueing line (IOs that waited for a free slot or
/// queue entry, and the limit behind them).
///
/// Against a running node (stubs switched through its control socket, never by restarting;
/// the full stack through its NBD front end; the frontend stub is the same workload run
/// inside the node):
///
///   fathom-bench isolate --node /var/lib/fathom --volume vol0 --rw randread --bs 4k --iodepth 1
///
/// Against an engine in this process (no front end; --driver mem only, since stubs replace the
/// device with Fathom's own controller):
///
///   fathom-bench isolate --media ram --mode thread --volumes 2 --queue-depth 16 --iodepth 16
///
/// What each stub removes: frontend and engine only their own layer; queue everything from the
/// NVMe rings down; device the controller and media; media only the data movement. Shares are
/// differences of those (see the README's "Loopback isolation").
#[derive(Debug, clap::Parser)]
#[command(name = "fathom-bench isolate", verbatim_doc_comment)]
pub struct IsolateArgs {
    /// A running node: its data directory (the control socket is DIR/control.sock) or the
    /// socket itself. Without it, an engine starts in this process.
    #[arg(long, value_name = "DIR|SOCKET")]
    pub node: Option<PathBuf>,
    /// --node: where its NBD front end listens.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10809")]
    pub nbd: String,
    /// --node: the volumes to run on (repeat for several, all at once); default: the first.
    #[arg(long = "volume", value_name = "NAME")]
    pub volume: Vec<String>,
    /// In this process: volumes to make, slices of one device on one core, all run at once.
    #[arg(long, default_value_t = 1)]
    pub volumes: usize,
    /// In this process: the device queue depth per core (reactor.queue_depth).
    #[arg(long = "queue-depth", default_value_t = 255)]
    pub queue_depth: u16,
    /// In this process: the device's driver: mem (the in-process controller), uring (io_uring
    /// O_DIRECT on --filename) or vfio (the controller at --pci, bound to vfio-pci). The
    /// device stub works for every driver; the media stub needs mem.
    #[arg(long, default_value = "mem", value_parser = ["mem", "uring", "vfio"])]
    pub driver: String,
    /// In this process, --driver uring: the file (created at the volumes' size if missing) or
    /// block device.
    #[arg(long)]
    pub filename: Option<PathBuf>,
    /// In this process, --driver vfio: the NVMe controller's PCI address.
    #[arg(long, value_name = "ADDRESS")]
    pub pci: Option<String>,
    /// In this process: media of the mem device.
    #[arg(long, default_value = "ram", value_parser = ["null", "ram"])]
    pub media: String,
    /// In this process: inline (the controller in the reactor's loop) or thread.
    #[arg(long, default_value = "inline", value_parser = ["inline", "thread"])]
    pub mode: String,
    /// In this process: DMA memory on normal pages instead of hugepages.
    #[arg(long)]
    pub no_hugepages: bool,
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Pattern,
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// IOs kept in flight per volume.
    #[arg(long, default_value_t = 1)]
    pub iodepth: u32,
    /// Seconds each round measures.
    #[arg(long, default_value_t = 2.0)]
    pub runtime: f64,
    #[arg(long = "ramp_time", alias = "ramp-time", default_value_t = 0.3)]
    pub ramp_time: f64,
    /// Bytes of each volume the workload spans (default: all of it).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Rounds of every variant, alternating.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Layers to stub, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "frontend,engine,queue,device,media"
    )]
    pub layers: Vec<String>,
    /// --node: the NBD client of the full-stack rounds: builtin, or fio's nbd engine.
    #[arg(long, value_enum, default_value = "builtin")]
    pub client: Client,
    /// One JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Also draw one bar pair per layer (its share of p50 and p99) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<fathom_engine::config::ByteSize>()
        .map(|size| size.0)
}

/// Runs `fathom-bench isolate` with its arguments.
pub fn main(args: IsolateArgs) -> Result<()> {
    if args.rounds == 0 || args.rounds > 1000 {
        bail!("--rounds {}: 1 to 1000", args.rounds);
    }
    if !(args.runtime > 0.0 && args.runtime <= 3600.0 && (0.0..=3600.0).contains(&args.ramp_time)) {
        bail!("--runtime must be 0 to 3600 s (not 0) and --ramp_time 0 to 3600 s");
    }
    let layers = args
        .layers
        .iter()
        .map(|name| {
            name.parse::<LayerName>()
                .map_err(|error| anyhow!("--layers: {error}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut engine = None;
    let (target, volumes) = match &args.node {
        Some(node) => {
            if args.volumes != 1
                || args.no_hugepages
                || args.driver != "mem"
                || args.filename.is_some()
                || args.pci.is_some()
            {
                bail!("--volumes, --driver, --filename, --pci and --no-hugepages make an engine in this process; with --node the node's own volumes and devices run (--volume NAME)");
            }
            let socket = if node.is_dir() {
                fathom_control::socket_path(node)
            } else {
                node.clone()
            };
            let target = Target::Node {
                socket,
                nbd: args.nbd.clone(),
            };
            let volumes = if args.volume.is_empty() {
                let rows: Vec<VolumeRow> = target.typed(Request::Volumes)?;
                vec![rows
                    .first()
                    .ok_or_else(|| anyhow!("the node has no volumes"))?
                    .name
                    .clone()]
            } else {
                args.volume.clone()
            };
            (target, volumes)
        }
        None => {
            if args.client != Client::Builtin {
                bail!("--client applies to a node's full stack (--node): an engine in this process has no front end");
            }
            if args.volumes == 0 || args.volumes > 64 {
                bail!("--volumes {}: 1 to 64", args.volumes);
            }
            match args.driver.as_str() {
                "uring" if args.filename.is_none() => bail!("--driver uring needs --filename: the file (created if missing) or block device to run on"),
                "vfio" if args.pci.is_none() => bail!("--driver vfio needs --pci ADDRESS: the NVMe controller, bound to vfio-pci (`fathom-node devices bind ADDRESS`)"),
                _ => {}
            }
            let dir = tempfile_dir()?;
            let config = local_config(&args, &dir)?;
            let started = fathom_engine::Engine::start(&config).context("starting the engine")?;
            let control = Arc::new(NodeControl::new(started.clone()));
            engine = Some((started, dir));
            let volumes = (0..args.volumes)
                .map(|index| format!("vol{index}"))
                .collect();
            (Target::Local { control }, volumes)
        }
    };
    let spec = IsolateSpec {
        volumes,
        pattern: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        runtime: Duration::from_secs_f64(args.runtime),
        ramp: Duration::from_secs_f64(args.ramp_time),
        size: args.size,
        rwmixread: args.rwmixread,
        rounds: args.rounds,
        layers,
        client: args.client,
    };
    let bar = indicatif::ProgressBar::new((spec.rounds * (spec.layers.len() + 1)) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({eta} left)")
            .expect("valid template"),
    );
    if args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let report = isolate(&target, &spec, &|message| {
        bar.set_message(message.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some((engine, _dir)) = engine {
        engine.shutdown().context("stopping the engine")?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot_svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// A directory for the in-process engine's stats region, removed at exit.
fn tempfile_dir() -> Result<TempDir> {
    let path = std::env::temp_dir().join(format!("fathom-isolate-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir(path))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn local_config(args: &IsolateArgs, dir: &TempDir) -> Result<fathom_engine::Config> {
    let volume_bytes: u64 = 64 << 20;
    let size = (volume_bytes >> 20) * args.volumes as u64;
    let device = match args.driver.as_str() {
        "uring" => {
            let path = std::path::absolute(args.filename.as_ref().expect("checked"))
                .context("resolving --filename")?;
            format!(
                "driver = \"uring\"\npath = {:?}\nsize = \"{size}MiB\"\n",
                path.display().to_string()
            )
        }
        "vfio" => format!(
            "driver = \"vfio\"\npci = {:?}\n",
            args.pci.as_deref().unwrap_or_default()
        ),
        _ => format!(
            "driver = \"mem\"\nmedia = \"{}\"\nmode = \"{}\"\nsize = \"{size}MiB\"\n",
            args.media, args.mode
        ),
    };
    let mut text = format!(
        "[node]\nid = \"isolate-{pid}\"\ndata_dir = {dir:?}\n\
         [dma]\nsize = \"{dma}MiB\"\nhugepages = {huge}\n\
         [reactor]\ncores = [0]\npoll = \"busy\"\nqueue_depth = {depth}\n\
         [telemetry]\nregion = {region:?}\nmetrics = \"\"\n\
         [nbd]\nlisten = []\n\
         [[device]]\nname = \"nvme0\"\n{device}",
        pid = std::process::id(),
        dir = dir.0.display().to_string(),
        dma = 64 + ((args.volumes as u64 * args.iodepth as u64 * args.bs * 2) >> 20),
        huge = !args.no_hugepages,
        depth = args.queue_depth,
        region = dir.0.join("stats").display().to_string(),
        device = device,
    );
    for index in 0..args.volumes {
        text += &format!(
            "[[volume]]\nname = \"vol{index}\"\ndevice = \"nvme0\"\noffset = \"{}MiB\"\nsize = \"{}MiB\"\n",
            (volume_bytes >> 20) * index as u64,
            volume_bytes >> 20
        );
    }
    fathom_engine::Config::parse(&text).context("building the engine's configuration")
}
