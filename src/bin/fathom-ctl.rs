//! fathom-ctl: the operator's command line for a running node, over its control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::PossibleValuesParser;
use clap::{ArgGroup, Parser};
use fathom::text::{bytes_text, duration_text, replication_table, Table};
use fathom_control::proto::{
    PromoteResult, ReparentResult, ReplicationRow, Request, TraceRow, LAYERS,
};
use fathom_control::{
    Cleared, ControlClient, DeviceRow, Hello, LayerRow, RuleRow, RunResult, VolumeRow,
};
use fathom_engine::config::{parse_duration, ByteSize, TailThreshold};
use fathom_engine::trace::P999_MIN_IOS;
use serde_json::{Map, Value};

/// The embedded default config's `node.data_dir` (a test checks they agree).
const DEFAULT_NODE: &str = "/var/lib/fathom";

/// Controls a running Fathom node through its control socket, DATA_DIR/control.sock: lists
/// its volumes, devices and the layers of each volume's IO path, stubs a layer, injects
/// latency and errors at run time, runs a workload inside the node, and changes which IOs
/// are traced.
///
/// The layers of a volume's IO path, top to bottom: frontend, engine, queue (the volume's),
/// then device, media (its device's). A stubbed layer completes IOs without passing them
/// down, so a run measures the path above it. An injection rule adds latency, fails or
/// stalls matching IOs at one layer; a TARGET is a volume (layers frontend, engine, queue)
/// or a device (layers device, the default, and media).
///
/// Tracing records the spans of some IOs end to end: one IO in RATE per volume (head
/// sampling; 0: none) and every IO slower than the volume's TAIL (tail sampling): a duration
/// (2ms, 500us), p99.9 (the volume's own p99.9 per op, learned once an op has 1000 IOs) or
/// off. The config's [telemetry.trace] and [volume.trace] set them at start.
///
/// Examples:
///
///   fathom-ctl volumes                                  # what the node serves
///   fathom-ctl --node /tmp/fathom layers vol0           # a node started with --data-dir /tmp/fathom
///   fathom-ctl stub set vol0 queue                      # stop IOs at the queue layer
///   fathom-ctl run vol0 --rw randread --bs 4k --iodepth 32 --runtime 5
///   fathom-ctl stub clear vol0 queue
///   fathom-ctl inject add nvme0 --ops read --latency 'uniform(100us,300us)'
///   fathom-ctl inject add nvme0 --layer media --latency 200us --profile 'step(x4,10s)'
///   fathom-ctl inject add vol0 --layer engine --error internal --fraction 0.01
///   fathom-ctl inject add nvme0 --lbas 0-2047 --stall  # hold IOs until cleared
///   fathom-ctl inject list
///   fathom-ctl inject clear nvme0
///   fathom-ctl trace show                               # which IOs each volume traces
///   fathom-ctl trace set vol0 --tail 500us --rate 0     # vol0: only IOs slower than 500us
///   fathom-ctl trace set --tail p99.9                   # every volume: its slowest 0.1%
///   fathom-ctl replication                              # replicas: sessions, sync, lag
///   fathom-ctl promote vol0                             # this replica becomes the primary
///   fathom-ctl reparent vol0 --to b                     # move the primary, no IO failing
///
/// On a control plane (etcd), straight from etcd, no node needed:
///
///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback cluster status
///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume list --json
///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume create vol1 --size 1GiB
///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume delete vol1
///   fathom-ctl partition etcd                           # drill: cut this node off from etcd
///
/// The socket is owner-only: run as the user that runs fathom-node. --json prints the node's
/// answer as JSON instead of a table. Exit status: 0 done, 1 the node (or the connection)
/// refused, 2 a usage error.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The node's data_dir (its socket is DIR/control.sock) or the socket itself
    /// [default: /var/lib/fathom, the embedded config's data_dir]
    #[arg(long, global = true, value_name = "DIR|SOCKET")]
    node: Option<PathBuf>,
    /// Prints the node's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The control plane's etcd members, for `cluster` and `volume` (host:port, comma
    /// separated; or FATHOM_ETCD).
    #[arg(
        long,
        global = true,
        value_name = "ENDPOINTS",
        env = "FATHOM_ETCD",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// The cluster's name in etcd, its [cluster] name (or FATHOM_CLUSTER).
    #[arg(long, global = true, value_name = "NAME", env = "FATHOM_CLUSTER")]
    cluster: Option<String>,
    /// Seconds to wait for an answer (a run waits its runtime and ramp on top of this).
    #[arg(long, global = true, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The node's identity: id, pid, data_dir, telemetry region, protocol version.
    Hello,
    /// The node's volumes: device, namespace, LBA range, size, owning core, stubs, rules.
    Volumes,
    /// The node's devices: driver, model, serial, namespaces, largest transfer, queue depth.
    Devices,
    /// The layers of each volume's IO path and their state: pass, stub or inject.
    Layers {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Stubs a layer (completes IOs there without passing them down) or clears the stub.
    Stub {
        #[command(subcommand)]
        action: StubAction,
    },
    /// Latency, error and stall injection at run time.
    Inject {
        #[command(subcommand)]
        action: InjectAction,
    },
    /// Runs a fio-like workload inside the node and prints IOPS, bandwidth and waits.
    ///
    /// The workload runs on the reactor that owns the volume, with no frontend in the way;
    /// the answer comes when it ends (after --ramp_time and --runtime).
    ///
    ///   fathom-ctl run vol0                                   # 5 s of 4k random reads at QD 32
    ///   fathom-ctl run vol0 --rw randrw --rwmixread 70 --bs 16k --iodepth 8 --runtime 30
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Which IOs are traced: each volume's head rate and tail threshold, shown or changed.
    Trace {
        #[command(subcommand)]
        action: TraceAction,
    },
    /// The replicated volumes this node holds a copy of, as `drbdadm status` shows them:
    /// role, epoch and primary; on the primary, each replica's session (open, connecting,
    /// down), whether it is in sync (counts for majorities and flushes), the last write it
    /// acknowledged, how many writes it is behind, the bytes it may lack (its dirty regions)
    /// and its resync: what is left to copy to it (regions it missed while away) and what
    /// was copied.
    ///
    ///   fathom-ctl --node /tmp/fathom-cluster/a replication
    ///   fathom-ctl replication vol0 --json
    #[command(verbatim_doc_comment)]
    Replication {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Makes this node the primary of VOLUME when its primary is dead (or gone for good).
    ///
    /// The node takes the volume's next epoch, durably, and claims it on every copy it
    /// reaches: a majority must take it (a deposed primary that comes back is refused by
    /// them, and becomes a replica). It asks each survivor which regions it wrote last,
    /// copies to itself every region another has newer, then serves; the survivors are
    /// caught up in the background (`fathom-ctl replication` shows it). Refused for a copy
    /// its primary did not call in sync, unless --force (which can lose acknowledged writes
    /// the others lack).
    ///
    ///   fathom-ctl --node /tmp/fathom-cluster/b promote vol0
    #[command(verbatim_doc_comment)]
    Promote {
        volume: String,
        /// Promote a copy that is not known to be in sync.
        #[arg(long)]
        force: bool,
    },
    /// Each volume's health as the node judges it every second: its state (healthy,
    /// suspect, degraded, recovering) and the last second's sign (fine, busy: slow from load,
    /// sick, stuck), the detector's inputs (IOPS, p99, the primary's write p99 over its
    /// replicas' for the same writes against its healthy ratio, the device's idle time, the
    /// smoke write), the canary (green, RED, learning its baseline) and what a slower client
    /// latency is (regression: the canary is red; drift: the clients' IO shape changed;
    /// load), then why, in full. --json gives every input. Every change is also in the
    /// node's event log, DATA_DIR/health-events.jsonl (JSON lines).
    ///
    /// --advise on makes VOLUME's actions (reparent of a degraded primary) advise-only: the
    /// node logs what it would do and does nothing; --advise off lets it act again.
    ///
    ///   fathom-ctl --node /tmp/fathom-cluster/a health
    ///   fathom-ctl --node /tmp/fathom-cluster/a health vol0 --json
    ///   fathom-ctl --node /tmp/fathom-cluster/a health vol0 --advise on
    #[command(verbatim_doc_comment)]
    Health {
        /// Only this volume.
        volume: Option<String>,
        /// Makes VOLUME's actions advise-only (on) or lets them act (off).
        #[arg(long, value_parser = ["on", "off"], requires = "volume")]
        advise: Option<String>,
    },
    /// The cluster as its control plane (etcd) holds it; needs --etcd and --cluster.
    ///
    ///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback cluster status
    #[command(verbatim_doc_comment)]
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The cluster's volumes, from its control plane (etcd); needs --etcd and --cluster.
    ///
    ///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume list
    #[command(verbatim_doc_comment)]
    Volume {
        #[command(subcommand)]
        action: VolumeAction,
    },
    /// The partition switch, for tests and failure drills: `on` cuts this node off from its
    /// peers (every replication session, both ways) and from etcd, as a network partition
    /// would, while its NBD clients stay connected; `etcd` cuts it off from etcd only; `off`
    /// heals it. On a control plane, a
    /// primary cut off stops acknowledging IO before its lease can run out, and the others
    /// elect a new primary once it has; healed, it rejoins as a replica.
    ///
    ///   fathom-ctl --node /tmp/fathom-cluster/a partition on
    #[command(verbatim_doc_comment)]
    Partition {
        #[arg(value_parser = ["on", "etcd", "off"])]
        state: String,
    },
    /// Moves a volume's primary to another node, with no client IO failing: run on the
    /// primary. New IO pauses, the writes in flight are answered, the new primary (an
    /// in-sync replica) checks it holds every one, takes the next epoch on a majority and
    /// serves; this node becomes a replica that forwards its NBD clients' IO, the paused IO
    /// first, to it. Clients keep their connections. Called off (IO goes on here) when the
    /// target refuses or writes do not drain within 10 s.
    ///
    ///   fathom-ctl --node /tmp/fathom-cluster/a reparent vol0 --to b
    #[command(verbatim_doc_comment)]
    Reparent {
        volume: String,
        /// The node to move the primary to (an in-sync replica of the volume).
        #[arg(long, value_name = "NODE")]
        to: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum TraceAction {
    /// Each volume's head rate, tail setting, and the tail threshold in force per op.
    ///
    /// RATE: one IO in N is traced (off: none). TAIL: the setting, a duration, p99.9 or off.
    /// Then per op the threshold in force: IOs slower than it are traced. "(p99.9)" marks a
    /// threshold learned from the volume's own histograms; "-" means none (tail off, or a
    /// p99.9 not learned yet: it needs 1000 IOs of the op).
    ///
    ///   fathom-ctl trace show
    ///   fathom-ctl trace show vol0 --json
    #[command(verbatim_doc_comment)]
    Show {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Changes the head rate, the tail threshold or both, of VOLUME or of every volume.
    ///
    /// The reactors take the change within a millisecond of IO. Nothing changes if any part
    /// is wrong. Setting p99.9 leaves no threshold in force until the node learns one from
    /// the volume's histograms, per op (about a second after the op has 1000 IOs).
    ///
    ///   fathom-ctl trace set vol0 --rate 64              # one IO in 64
    ///   fathom-ctl trace set vol0 --tail 500us --rate 0  # only IOs slower than 500us
    ///   fathom-ctl trace set --tail p99.9                # every volume: its slowest 0.1%
    ///   fathom-ctl trace set vol1 --tail off
    #[command(verbatim_doc_comment)]
    Set(TraceSetArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true).args(["rate", "tail"])))]
struct TraceSetArgs {
    /// Only this volume [default: every volume].
    volume: Option<String>,
    /// Head sampling: one IO in N is traced; 0 for none.
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    rate: Option<u32>,
    /// Tail sampling: every IO slower than this is traced: a duration (2ms, 500us), p99.9
    /// (the volume's own, per op) or off.
    #[arg(long, value_name = "THRESHOLD", value_parser = parse_tail)]
    tail: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum StubAction {
    /// Completes IOs at LAYER of VOLUME without passing them down.
    Set {
        volume: String,
        #[arg(value_parser = PossibleValuesParser::new(LAYERS))]
        layer: String,
    },
    /// Passes IOs through LAYER of VOLUME again.
    Clear {
        volume: String,
        #[arg(value_parser = PossibleValuesParser::new(LAYERS))]
        layer: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum InjectAction {
    /// Adds a rule at one layer of a volume or a device. Rules apply in order and every
    /// matching rule applies: latencies add up, the first error wins, a stall holds the IO
    /// until the rule is cleared. A rule needs a --latency, an --error or --stall.
    ///
    ///   --latency: 50us | fixed(50us) | uniform(100us,300us) | exponential(1ms)
    ///              | pareto(SCALE,SHAPE), e.g. pareto(100us,1.5)
    ///   --profile: how the latency changes from the moment the rule is added:
    ///              step(x4,10s) | ramp(x1,x10,30s) | spikes(x10,1s,100ms)
    ///
    ///   fathom-ctl inject add nvme0 --ops read --latency 'exponential(1ms)' --fraction 0.1
    ///   fathom-ctl inject add vol0 --layer queue --error data-transfer --lbas 100-199
    #[command(verbatim_doc_comment)]
    Add(RuleArgs),
    /// Lists the rules of one target, or of all.
    List { target: Option<String> },
    /// Removes the rules of TARGET (of one layer with --layer); stalled IOs are released.
    Clear {
        target: String,
        #[arg(long, value_parser = PossibleValuesParser::new(LAYERS))]
        layer: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("effect").required(true).multiple(true).args(["latency", "error", "stall"])))]
struct RuleArgs {
    /// A volume or a device.
    target: String,
    /// The layer: frontend, engine or queue of a volume; device or media of a device
    /// [default: the device layer of a device].
    #[arg(long, value_parser = PossibleValuesParser::new(LAYERS))]
    layer: Option<String>,
    /// The operations the rule applies to [default: all].
    #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(["read", "write", "flush"]))]
    ops: Option<Vec<String>>,
    /// The fraction of matching IOs affected, 0 to 1 [default: 1].
    #[arg(long, value_parser = parse_fraction)]
    fraction: Option<f64>,
    /// Only IOs touching LBAs FIRST to LAST (inclusive).
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_lbas)]
    lbas: Option<Lbas>,
    /// Added latency: 50us, fixed(50us), uniform(MIN,MAX), exponential(MEAN), pareto(SCALE,SHAPE).
    #[arg(long, value_name = "SPEC")]
    latency: Option<String>,
    /// Complete matching IOs with this error instead.
    #[arg(long, value_name = "KIND", value_parser = PossibleValuesParser::new(["unrecovered-read", "write-fault", "internal", "data-transfer"]))]
    error: Option<String>,
    /// Hold matching IOs until the rule is cleared.
    #[arg(long)]
    stall: bool,
    /// How the latency changes with time: step(xN,AT), ramp(xA,xB,OVER), spikes(xN,EVERY,FOR).
    #[arg(long, value_name = "SPEC")]
    profile: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lbas {
    first: u64,
    last: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    volume: String,
    /// The access pattern, as fio names it.
    #[arg(long, default_value = "randread", value_parser = PossibleValuesParser::new(["read", "write", "randread", "randwrite", "readwrite", "rw", "randrw"]))]
    rw: String,
    /// Block size of each IO: 4k, 64k, 1M.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// IOs kept in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    iodepth: u32,
    /// Measured time: seconds (5, 2.5) or a duration (500ms).
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_seconds)]
    runtime: Duration,
    /// Time run before measuring starts.
    #[arg(long = "ramp_time", visible_alias = "ramp-time", default_value = "1", value_name = "SECS", value_parser = parse_seconds)]
    ramp_time: Duration,
    /// Bytes of the volume touched, from offset 0 [default: the whole volume].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seed of the offsets and the read/write draw, for a repeatable run.
    #[arg(long)]
    seed: Option<u64>,
    /// Percent of reads in readwrite and randrw [default: 50].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: Option<u32>,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds, e.g. 10 or 0.5"))?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!(
            "{text:?}: give more than 0 and at most 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.trim().parse::<f64>() {
        if !(seconds.is_finite() && (0.0..=86_400.0).contains(&seconds)) {
            return Err(format!("{text:?}: give 0 to 86400 seconds"));
        }
        return Ok(Duration::from_secs_f64(seconds));
    }
    parse_duration(text).map_err(|error| format!("{error}; or a number of seconds"))
}

fn parse_rate(text: &str) -> Result<u32, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?}: give N to trace one IO in N (a whole number, 0 to {}), or 0 for none",
            u32::MAX
        )
    })
}

/// Checks a tail threshold with the node's own parser, so a typo is a usage error here; the
/// text goes to the node as written (the node checks it again).
fn parse_tail(text: &str) -> Result<String, String> {
    TailThreshold::parse(text).map(|_| text.to_string())
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<ByteSize>().map(|size| size.0)
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let fraction: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number: give 0 to 1, e.g. 0.01 for 1%"))?;
    if !(0.0..=1.0).contains(&fraction) {
        return Err(format!("{text}: a fraction is 0 to 1, e.g. 0.01 for 1%"));
    }
    Ok(fraction)
}

fn parse_lbas(text: &str) -> Result<Lbas, String> {
    let usage = || format!("{text:?}: write FIRST-LAST, e.g. 0-2047 (inclusive), or one LBA");
    let number = |part: &str| part.trim().parse::<u64>().map_err(|_| usage());
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (number(first)?, number(last)?),
        None => {
            let lba = number(text)?;
            (lba, lba)
        }
    };
    if first > last {
        return Err(format!("{text:?}: the first LBA is above the last"));
    }
    Ok(Lbas { first, last })
}

/// The rule table the node parses, from the flags given (and only those).
fn rule_json(args: &RuleArgs) -> Value {
    let mut rule = Map::new();
    if let Some(ops) = &args.ops {
        rule.insert("ops".into(), ops.clone().into());
    }
    if let Some(fraction) = args.fraction {
        rule.insert("fraction".into(), fraction.into());
    }
    if let Some(Lbas { first, last }) = args.lbas {
        rule.insert("lbas".into(), vec![first, last].into());
    }
    if let Some(latency) = &args.latency {
        // `fixed(D)` is the spelled-out form of a plain duration, which is what the config
        // takes.
        let latency = latency.trim();
        let latency = latency
            .strip_prefix("fixed(")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or(latency);
        rule.insert("latency".into(), latency.into());
    }
    if let Some(error) = &args.error {
        rule.insert("error".into(), error.clone().into());
    }
    if args.stall {
        rule.insert("stall".into(), true.into());
    }
    if let Some(profile) = &args.profile {
        rule.insert("profile".into(), profile.clone().into());
    }
    Value::Object(rule)
}

/// The request a command sends.
fn request(command: &Command) -> Request {
    match command {
        Command::Hello => Request::Hello,
        Command::Volumes => Request::Volumes,
        Command::Devices => Request::Devices,
        Command::Layers { volume } => Request::Layers {
            volume: volume.clone(),
        },
        Command::Stub {
            action: StubAction::Set { volume, layer },
        } => Request::StubSet {
            volume: volume.clone(),
            layer: layer.clone(),
        },
        Command::Stub {
            action: StubAction::Clear { volume, layer },
        } => Request::StubClear {
            volume: volume.clone(),
            layer: layer.clone(),
        },
        Command::Inject {
            action: InjectAction::Add(rule),
        } => Request::InjectAdd {
            target: rule.target.clone(),
            layer: rule.layer.clone(),
            rule: rule_json(rule),
        },
        Command::Inject {
            action: InjectAction::List { target },
        } => Request::InjectList {
            target: target.clone(),
        },
        Command::Inject {
            action: InjectAction::Clear { target, layer },
        } => Request::InjectClear {
            target: target.clone(),
            layer: layer.clone(),
        },
        Command::Run(run) => Request::Run {
            volume: run.volume.clone(),
            rw: run.rw.clone(),
            bs: run.bs,
            iodepth: run.iodepth,
            runtime_ms: millis(run.runtime),
            ramp_ms: millis(run.ramp_time),
            size: run.size,
            seed: run.seed,
            rwmixread: run.rwmixread,
        },
        Command::Trace {
            action: TraceAction::Show { volume },
        } => Request::TraceShow {
            volume: volume.clone(),
        },
        Command::Trace {
            action: TraceAction::Set(set),
        } => Request::TraceSet {
            volume: set.volume.clone(),
            rate: set.rate,
            tail: set.tail.clone(),
        },
        Command::Replication { volume } => Request::Replication {
            volume: volume.clone(),
        },
        Command::Health {
            volume: Some(volume),
            advise: Some(advise),
        } => Request::HealthAdvise {
            volume: volume.clone(),
            advise: advise == "on",
        },
        Command::Health { volume, .. } => Request::Health {
            volume: volume.clone(),
        },
        Command::Promote { volume, force } => Request::Promote {
            volume: volume.clone(),
            force: *force,
        },
        Command::Reparent { volume, to } => Request::Reparent {
            volume: volume.clone(),
            to: to.clone(),
        },
        Command::Partition { state } => Request::Partition {
            state: state.clone(),
        },
        Command::Cluster { .. } | Command::Volume { .. } => {
            unreachable!("answered from etcd, not by a node")
        }
    }
}

#[derive(Debug, clap::Subcommand)]
enum ClusterAction {
    /// Nodes (and what is left of their leases), volumes (placement, primary, epoch, in-sync
    /// copies) and each primary's view of its replicas (sessions, resync).
    Status,
}

#[derive(Debug, clap::Subcommand)]
enum VolumeAction {
    /// One line per volume: size, copies, primary, epoch, in-sync copies, state.
    List,
    /// Makes a volume: places its copies on distinct live nodes with room in their pools
    /// ([cluster.pool]), the emptiest first, and writes it to etcd; each of those nodes then
    /// clears a range of its pool for it and serves it (NBD export NAME on every node).
    /// Refused, with the reason, when it cannot be placed (fewer live nodes with pools than
    /// copies, no room, a size not a multiple of the block) or the name is taken.
    ///
    ///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume create vol1 --size 1GiB
    #[command(verbatim_doc_comment)]
    Create {
        name: String,
        /// Bytes clients see: 512MiB, 1GiB, ... (a multiple of the block size).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Copies, each on its own node (3 survives the loss of any one node).
        #[arg(long, default_value = "3")]
        replicas: usize,
        /// The block size of the pools to use [default: the one most live pools have].
        #[arg(long)]
        block_size: Option<u32>,
        /// Returns once its primary serves it (every copy made and cleared), or fails after
        /// --timeout.
        #[arg(long)]
        wait: bool,
    },
    /// Deletes a volume: it goes from etcd at once, and each node that holds a copy stops
    /// serving it (its NBD clients are disconnected) and gives its range back to its pool.
    /// Nodes that are down drop theirs when they come back. The data stays on the devices
    /// until the range is taken again (cleared then): do not count on getting it back.
    ///
    ///   fathom-ctl --etcd 127.0.0.1:2379 --cluster fathom-loopback volume delete vol1
    #[command(verbatim_doc_comment)]
    Delete { name: String },
}

/// `cluster` and `volume`: straight to etcd, no node needed.
fn run_control_plane(args: &Args) -> Result<()> {
    if args.etcd.is_empty() {
        anyhow::bail!("this command reads the control plane: give its etcd members with --etcd host:port[,host:port...] (or FATHOM_ETCD)");
    }
    let cluster = args.cluster.as_deref().context(
        "give the cluster's name with --cluster NAME (or FATHOM_CLUSTER): its [cluster] name in the nodes' configs",
    )?;
    let timeouts = fathom_cluster::etcd::Timeouts {
        attempt: Duration::from_millis(500).min(args.timeout),
        deadline: args.timeout,
    };
    let mut etcd = fathom_cluster::etcd::Etcd::new(&args.etcd, timeouts)?;
    let report = fathom_cluster::report::read(&mut etcd, cluster)?;
    if let Command::Volume { action } = &args.command {
        match action {
            VolumeAction::List => {}
            VolumeAction::Create {
                name,
                size,
                replicas,
                block_size,
                wait,
            } => {
                let created = fathom_cluster::admin::create(
                    &mut etcd,
                    &report,
                    name,
                    *size,
                    *replicas,
                    *block_size,
                )?;
                let serving = match wait {
                    true => Some(wait_serving(&mut etcd, cluster, name, args.timeout)?),
                    false => None,
                };
                if args.json {
                    let mut value = serde_json::to_value(&created)?;
                    if let Some((epoch, took)) = serving {
                        value["serving"] =
                            serde_json::json!({ "epoch": epoch, "after_ms": millis(took) });
                    }
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    let (spec, primary) = (&created.spec, &created.state.primary);
                    let what = format!(
                        "{} in {}-byte blocks, copies on {}",
                        fathom::text::bytes_text(spec.size),
                        spec.block_size,
                        spec.replicas.join(", ")
                    );
                    match serving {
                        Some((epoch, took)) => println!(
                            "volume {} created and served: {what}, primary {primary} at epoch {epoch} after {:.1} s",
                            spec.name,
                            took.as_secs_f64()
                        ),
                        None => println!(
                            "volume {} created: {what} (primary {primary}); the nodes make and serve it within seconds (`volume list`)",
                            spec.name
                        ),
                    }
                }
                return Ok(());
            }
            VolumeAction::Delete { name } => {
                let spec = fathom_cluster::admin::delete(&mut etcd, &report, name)?;
                if args.json {
                    println!("{}", serde_json::json!({ "deleted": spec }));
                } else {
                    println!(
                        "volume {} deleted; its copies on {} go as those nodes see it",
                        spec.name,
                        spec.replicas.join(", ")
                    );
                }
                return Ok(());
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &args.command {
        Command::Cluster { .. } => print!("{}", fathom::text::cluster_status_text(&report)),
        _ => print!("{}", fathom::text::volume_list_text(&report)),
    }
    Ok(())
}

/// Waits until volume `name`'s primary has taken its first epoch and holds a live lease:
/// the epoch, and how long it took.
fn wait_serving(
    etcd: &mut fathom_cluster::etcd::Etcd,
    cluster: &str,
    name: &str,
    timeout: Duration,
) -> Result<(u64, Duration)> {
    let started = std::time::Instant::now();
    loop {
        let report = fathom_cluster::report::read(etcd, cluster)?;
        let volume = report.volumes.iter().find(|volume| volume.name == name);
        if let Some((Some(state), true)) = volume.map(|v| (v.state.as_ref(), v.primary_alive)) {
            if state.epoch >= 1 {
                return Ok((state.epoch, started.elapsed()));
            }
        }
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "volume {name} is created, and its primary did not serve it within {timeout:?}: see `cluster status` and the nodes' logs (a large volume takes a while to clear; --timeout waits longer)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fathom-ctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if matches!(
        args.command,
        Command::Cluster { .. } | Command::Volume { .. }
    ) {
        return run_control_plane(args);
    }
    let node = args
        .node
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NODE));
    let socket = fathom_control::socket_of(&node);
    let request = request(&args.command);
    let timeout = match &request {
        Request::Run {
            runtime_ms,
            ramp_ms,
            ..
        } => args.timeout + Duration::from_millis(runtime_ms.saturating_add(*ramp_ms)),
        // Each waits up to 10 s for a drain, and as long for the other nodes (5 s a node
        // that does not answer).
        Request::Promote { .. } | Request::Reparent { .. } => {
            args.timeout + Duration::from_secs(25)
        }
        _ => args.timeout,
    };
    let mut client = ControlClient::connect(&socket, args.timeout)?;
    let answer = client.call_with_timeout(&request, timeout)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    print_answer(&args.command, &request, answer)
}

fn parse<T: serde::de::DeserializeOwned>(answer: Value, what: &str) -> Result<T> {
    serde_json::from_value(answer)
        .with_context(|| format!("the node's answer to {what} is not what this fathom-ctl expects (try --json, or a fathom-ctl of the node's version)"))
}

fn print_answer(command: &Command, request: &Request, answer: Value) -> Result<()> {
    let what = request.command();
    match command {
        Command::Hello => {
            let hello: Hello = parse(answer, what)?;
            print!("{}", hello_text(&hello));
        }
        Command::Volumes => {
            let volumes: Vec<VolumeRow> = parse(answer, what)?;
            print!("{}", volumes_table(&volumes));
        }
        Command::Devices => {
            let devices: Vec<DeviceRow> = parse(answer, what)?;
            print!("{}", devices_table(&devices));
        }
        Command::Layers { .. } => {
            let layers: Vec<LayerRow> = parse(answer, what)?;
            print!("{}", layers_table(&layers));
        }
        Command::Stub { .. } => match serde_json::from_value::<LayerRow>(answer.clone()) {
            Ok(layer) => print!("{}", layers_table(&[layer])),
            Err(_) => print_other(&answer)?,
        },
        Command::Inject {
            action: InjectAction::Add(_),
        } => match serde_json::from_value::<RuleRow>(answer.clone()) {
            Ok(rule) => println!(
                "added rule {} at {} {}: {}",
                rule.index,
                rule.target,
                rule.layer,
                rule_text(&rule.rule)
            ),
            Err(_) => print_other(&answer)?,
        },
        Command::Inject {
            action: InjectAction::List { .. },
        } => {
            let rules: Vec<RuleRow> = parse(answer, what)?;
            print!("{}", rules_table(&rules));
        }
        Command::Inject {
            action: InjectAction::Clear { target, layer },
        } => {
            let cleared = serde_json::from_value::<Cleared>(answer.clone())
                .map(|cleared| cleared.cleared as u64)
                .ok()
                .or_else(|| answer.as_u64());
            match cleared {
                Some(count) => println!(
                    "cleared {count} rule{} from {target}{}",
                    if count == 1 { "" } else { "s" },
                    layer
                        .as_ref()
                        .map(|layer| format!(" {layer}"))
                        .unwrap_or_default()
                ),
                None => print_other(&answer)?,
            }
        }
        Command::Run(run) => {
            let result: RunResult = parse(answer, what)?;
            print!("{}", run_text(run, &result));
        }
        Command::Trace {
            action: TraceAction::Show { .. },
        } => {
            let rows: Vec<TraceRow> = parse(answer, what)?;
            print!("{}", trace_table(&rows));
        }
        Command::Trace {
            action: TraceAction::Set(set),
        } => {
            let rows: Vec<TraceRow> = parse(answer, what)?;
            print!("{}{}", trace_set_text(set, &rows), trace_table(&rows));
        }
        Command::Replication { .. } => {
            let rows: Vec<ReplicationRow> = parse(answer, what)?;
            print!("{}", replication_table(&rows));
        }
        Command::Health {
            advise: Some(_),
            volume,
        } => println!(
            "volume {}: health actions are {}",
            volume.as_deref().unwrap_or(""),
            match answer["advise"].as_bool() {
                Some(true) => "advise-only (logged, not taken)",
                _ => "taken",
            }
        ),
        Command::Health { .. } => {
            let health: fathom::health::monitor::NodeHealth = parse(answer, what)?;
            print!("{}", fathom::text::health_text(&health));
        }
        Command::Cluster { .. } | Command::Volume { .. } => {
            unreachable!("answered from etcd, not by a node")
        }
        Command::Partition { .. } => {
            println!(
                "{}",
                match answer["partition"].as_str().unwrap_or("") {
                    "on" => "partitioned: this node is cut off from its peers and etcd (its NBD clients stay)",
                    "etcd" => "partitioned from etcd: this node reaches its peers, not etcd",
                    _ => "not partitioned: this node reaches its peers and etcd",
                }
            );
        }
        Command::Promote { .. } => {
            let result: PromoteResult = parse(answer, what)?;
            println!(
                "{} is primary of {} at epoch {}; copies that took it: {}",
                result.survivors.first().map_or("this node", String::as_str),
                result.volume,
                result.epoch,
                result.survivors.join(", ")
            );
            println!(
                "reconciled: {} region(s), {} copied here from newer survivors",
                result.regions_copied,
                bytes_text(result.bytes_copied)
            );
            for (node, regions) in &result.behind {
                println!("  {node}: behind in {regions} region(s), resynchronised from here");
            }
        }
        Command::Reparent { .. } => {
            let result: ReparentResult = parse(answer, what)?;
            println!(
                "{} is primary of {} at epoch {} (writes up to {} of the last epoch on it); {} is a replica that forwards its clients' IO; IO paused {:.1} ms",
                result.to,
                result.volume,
                result.epoch,
                result.sequence,
                result.from,
                result.paused_us as f64 / 1e3
            );
        }
    }
    Ok(())
}

/// An answer this fathom-ctl has no table for.
fn print_other(answer: &Value) -> Result<()> {
    match answer {
        Value::Null => println!("done"),
        other => println!("{}", serde_json::to_string_pretty(other)?),
    }
    Ok(())
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn hello_text(hello: &Hello) -> String {
    format!(
        "node      {}\npid       {}\ndata_dir  {}\nregion    {}\nprotocol  {}\n",
        hello.node_id,
        hello.pid,
        hello.data_dir,
        hello.region.as_deref().unwrap_or("- (telemetry off)"),
        hello.version
    )
}

fn volumes_table(volumes: &[VolumeRow]) -> String {
    if volumes.is_empty() {
        return "no volumes\n".into();
    }
    let mut table = Table::new(&[
        ("NAME", false),
        ("DEVICE", false),
        ("NSID", true),
        ("FIRST_LBA", true),
        ("BLOCKS", true),
        ("BS", true),
        ("SIZE", true),
        ("CORE", true),
        ("STUBS", false),
        ("RULES", true),
    ]);
    for volume in volumes {
        table.row(vec![
            volume.name.clone(),
            volume.device.clone(),
            volume.nsid.to_string(),
            volume.first_lba.to_string(),
            volume.blocks.to_string(),
            volume.block_size.to_string(),
            bytes_text(volume.size_bytes),
            volume.core.to_string(),
            list_or_dash(&volume.stubs),
            volume.rules.to_string(),
        ]);
    }
    table.render()
}

fn devices_table(devices: &[DeviceRow]) -> String {
    if devices.is_empty() {
        return "no devices\n".into();
    }
    let mut table = Table::new(&[
        ("NAME", false),
        ("DRIVER", false),
        ("MODEL", false),
        ("SERIAL", false),
        ("MAX_XFER", true),
        ("QD", true),
        ("RULES", true),
        ("NAMESPACES (nsid:size/block)", false),
    ]);
    for device in devices {
        let namespaces: Vec<String> = device
            .namespaces
            .iter()
            .map(|ns| {
                format!(
                    "{}:{}/{}",
                    ns.nsid,
                    bytes_text(ns.blocks.saturating_mul(ns.block_size)),
                    ns.block_size
                )
            })
            .collect();
        table.row(vec![
            device.name.clone(),
            device.driver.clone(),
            or_dash(&device.model),
            or_dash(&device.serial),
            bytes_text(device.max_transfer_bytes),
            device.queue_depth.to_string(),
            device.rules.to_string(),
            if namespaces.is_empty() {
                "-".into()
            } else {
                namespaces.join(" ")
            },
        ]);
    }
    table.render()
}

fn or_dash(text: &str) -> String {
    if text.trim().is_empty() {
        "-".into()
    } else {
        text.trim().to_string()
    }
}

fn layers_table(layers: &[LayerRow]) -> String {
    if layers.is_empty() {
        return "no volumes\n".into();
    }
    let mut table = Table::new(&[
        ("VOLUME", false),
        ("LAYER", false),
        ("STATE", false),
        ("DETAIL", false),
    ]);
    for layer in layers {
        table.row(vec![
            layer.volume.clone(),
            layer.layer.clone(),
            layer.state.clone(),
            or_dash(&layer.detail),
        ]);
    }
    table.render()
}

fn rules_table(rules: &[RuleRow]) -> String {
    if rules.is_empty() {
        return "no injection rules\n".into();
    }
    let mut table = Table::new(&[
        ("TARGET", false),
        ("LAYER", false),
        ("#", true),
        ("RULE", false),
    ]);
    for rule in rules {
        table.row(vec![
            rule.target.clone(),
            rule.layer.clone(),
            rule.index.to_string(),
            rule_text(&rule.rule),
        ]);
    }
    table.render()
}

/// A rule table in one line, the usual keys first: `ops=read latency=50us fraction=0.1`.
fn rule_text(rule: &Value) -> String {
    let Value::Object(fields) = rule else {
        return rule.to_string();
    };
    const ORDER: [&str; 7] = [
        "ops", "lbas", "fraction", "latency", "profile", "error", "stall",
    ];
    let mut keys: Vec<&String> = fields.keys().collect();
    keys.sort_by_key(|key| {
        (
            ORDER
                .iter()
                .position(|known| known == key)
                .unwrap_or(ORDER.len()),
            key.as_str(),
        )
    });
    let mut parts = Vec::new();
    for key in keys {
        let value = &fields[key];
        let text = match (key.as_str(), value) {
            (_, Value::Bool(true)) => {
                parts.push(key.clone());
                continue;
            }
            ("lbas", Value::Array(pair)) if pair.len() == 2 => format!("{}-{}", pair[0], pair[1]),
            (_, Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            (_, Value::String(s)) => s.clone(),
            (_, other) => other.to_string(),
        };
        parts.push(format!("{key}={text}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// The tail threshold columns of `trace show`, in the order of the engine's ops (a test
/// checks they agree); a threshold of an op this list lacks is in `--json`.
const THRESHOLD_COLUMNS: [(&str, &str); 4] = [
    ("read", "READ"),
    ("write", "WRITE"),
    ("flush", "FLUSH"),
    ("write_zeroes", "WRITE_ZEROES"),
];

fn trace_table(rows: &[TraceRow]) -> String {
    if rows.is_empty() {
        return "no volumes\n".into();
    }
    let mut columns = vec![("VOLUME", false), ("RATE", false), ("TAIL", false)];
    columns.extend(THRESHOLD_COLUMNS.iter().map(|&(_, header)| (header, false)));
    let mut table = Table::new(&columns);
    let mut learning = false;
    for row in rows {
        let p999 = row.tail == "p99.9";
        let mut cells = vec![row.volume.clone(), rate_text(row.rate), row.tail.clone()];
        for (op, _) in THRESHOLD_COLUMNS {
            cells.push(match row.thresholds_ns.get(op).copied().flatten() {
                Some(ns) if p999 => format!("{} (p99.9)", threshold_text(ns)),
                Some(ns) => threshold_text(ns),
                None => {
                    learning |= p999;
                    "-".into()
                }
            });
        }
        table.row(cells);
    }
    let mut text = table.render();
    if learning {
        text.push_str(&format!(
            "-: no tail sampling yet: a p99.9 is learned once the op has {P999_MIN_IOS} IOs\n"
        ));
    }
    text
}

/// What `trace set` changed, in a line: `set rate off, tail 500us on vol0`. The values are
/// the node's answer (what is in force now, as the node writes it), the same on every row.
fn trace_set_text(set: &TraceSetArgs, rows: &[TraceRow]) -> String {
    let Some(first) = rows.first() else {
        return "changed no volume\n".into();
    };
    let mut changes = Vec::new();
    if set.rate.is_some() {
        changes.push(format!("rate {}", rate_text(first.rate)));
    }
    if set.tail.is_some() {
        changes.push(format!("tail {}", first.tail));
    }
    let volumes: Vec<&str> = rows.iter().map(|row| row.volume.as_str()).collect();
    format!("set {} on {}\n", changes.join(", "), volumes.join(", "))
}

/// Head sampling as a fraction: `1/1024`, or `off`.
fn rate_text(rate: u32) -> String {
    match rate {
        0 => "off".into(),
        rate => format!("1/{rate}"),
    }
}

/// A threshold in its largest whole unit, to three significant digits: `1ms`, `812us`,
/// `1.5ms`. The clock's tick conversion can leave a set `1ms` at 999999 ns: it reads `1ms`.
fn threshold_text(ns: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1, "ns"),
        (1_000, "us"),
        (1_000_000, "ms"),
        (1_000_000_000, "s"),
    ];
    let mut unit = UNITS
        .iter()
        .rposition(|&(scale, _)| ns >= scale)
        .unwrap_or(0);
    loop {
        let (scale, name) = UNITS[unit];
        let value = ns as f64 / scale as f64;
        let decimals = match value {
            v if v >= 100.0 => 0,
            v if v >= 10.0 => 1,
            _ => 2,
        };
        let text = format!("{value:.decimals$}");
        // Rounding can carry into the next unit (999.7us is 1ms).
        if unit + 1 < UNITS.len() && text.parse::<f64>().is_ok_and(|v| v >= 1000.0) {
            unit += 1;
            continue;
        }
        let text = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.')
        } else {
            &text
        };
        return format!("{text}{name}");
    }
}

fn run_text(run: &RunArgs, result: &RunResult) -> String {
    let seconds = result.elapsed_ns as f64 / 1e9;
    let per_second = |count: f64| if seconds > 0.0 { count / seconds } else { 0.0 };
    let iops = per_second(result.ios as f64);
    let mib_per_second = per_second(result.bytes as f64) / f64::from(1u32 << 20);
    let waited_percent = if result.ios > 0 {
        100.0 * result.waited_ios as f64 / result.ios as f64
    } else {
        0.0
    };
    let mean_wait = if result.waited_ios > 0 {
        duration_text(result.wait_ns as f64 / result.waited_ios as f64)
    } else {
        "-".into()
    };
    let cpu_percent = if result.elapsed_ns > 0 {
        100.0 * result.cpu_ns as f64 / result.elapsed_ns as f64
    } else {
        0.0
    };
    format!(
        "{} on core {}: {} bs={} iodepth={}, {seconds:.2} s measured\n  \
         IOPS {iops:.0}  MiB/s {mib_per_second:.1}  IOs {}  errors {}\n  \
         waited {} IOs ({waited_percent:.2}%), mean wait {mean_wait}  reactor CPU {cpu_percent:.1}%\n",
        result.volume,
        result.core,
        run.rw,
        bytes_text(run.bs),
        run.iodepth,
        result.ios,
        result.errors,
        result.waited_ios,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use fathom_control::proto;
    use serde_json::json;

    fn parse_args(line: &str) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("fathom-ctl").chain(line.split_whitespace()))
    }

    fn request_of(line: &str) -> Request {
        request(
            &parse_args(line)
                .unwrap_or_else(|e| panic!("{line}: {e}"))
                .command,
        )
    }

    fn usage_error(line: &str) -> ErrorKind {
        parse_args(line).expect_err(line).kind()
    }

    #[test]
    fn the_default_node_is_the_embedded_data_dir() {
        let config = fathom_engine::config::Config::embedded_default();
        assert_eq!(config.node.data_dir, PathBuf::from(DEFAULT_NODE));
    }

    #[test]
    fn a_directory_means_its_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            fathom_control::socket_of(dir.path()),
            dir.path().join("control.sock")
        );
        let socket = dir.path().join("other.sock");
        assert_eq!(fathom_control::socket_of(&socket), socket);
    }

    #[test]
    fn only_the_given_flags_make_the_rule() {
        assert_eq!(
            request_of("inject add nvme0 --latency 50us"),
            Request::InjectAdd {
                target: "nvme0".into(),
                layer: None,
                rule: json!({"latency": "50us"}),
            }
        );
        assert_eq!(
            request_of(
                "inject add vol0 --layer engine --ops read,write --fraction 0.25 --lbas 10-99 \
                 --latency uniform(100us,300us) --error write-fault --stall --profile step(x4,10s)"
            ),
            Request::InjectAdd {
                target: "vol0".into(),
                layer: Some("engine".into()),
                rule: json!({
                    "ops": ["read", "write"],
                    "fraction": 0.25,
                    "lbas": [10, 99],
                    "latency": "uniform(100us,300us)",
                    "error": "write-fault",
                    "stall": true,
                    "profile": "step(x4,10s)",
                }),
            }
        );
        let Request::InjectAdd { rule, .. } =
            request_of("inject add nvme0 --latency fixed(50us) --lbas 7 --ops flush")
        else {
            unreachable!()
        };
        assert_eq!(
            rule,
            json!({"latency": "50us", "lbas": [7, 7], "ops": ["flush"]})
        );
        let Request::InjectAdd { rule, .. } = request_of("inject add nvme0 --stall") else {
            unreachable!()
        };
        assert_eq!(rule, json!({"stall": true}));
        // The profile and the latency go through as written: the node validates them.
        let Request::InjectAdd { rule, .. } = request_of(
            "inject add nvme0 --latency pareto(100us,1.5) --profile spikes(x10,1s,100ms)",
        ) else {
            unreachable!()
        };
        assert_eq!(
            rule,
            json!({"latency": "pareto(100us,1.5)", "profile": "spikes(x10,1s,100ms)"})
        );
    }

    #[test]
    fn bad_rule_flags_are_usage_errors() {
        assert_eq!(
            usage_error("inject add nvme0"),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error("inject add nvme0 --fraction 0.5"),
            ErrorKind::MissingRequiredArgument
        );
        for line in [
            "inject add nvme0 --stall --ops read,erase",
            "inject add nvme0 --stall --error timeout",
            "inject add nvme0 --stall --layer disk",
        ] {
            assert_eq!(usage_error(line), ErrorKind::InvalidValue, "{line}");
        }
        for line in [
            "inject add nvme0 --stall --fraction 2",
            "inject add nvme0 --stall --fraction half",
            "inject add nvme0 --stall --lbas 9-1",
            "inject add nvme0 --stall --lbas 1-x",
        ] {
            assert_eq!(usage_error(line), ErrorKind::ValueValidation, "{line}");
        }
        let error = parse_args("inject add nvme0 --stall --lbas 9-1").unwrap_err();
        assert!(
            error.to_string().contains("first LBA is above the last"),
            "{error}"
        );
    }

    #[test]
    fn other_commands_map_to_their_requests() {
        assert_eq!(request_of("hello"), Request::Hello);
        assert_eq!(request_of("volumes --json"), Request::Volumes);
        assert_eq!(request_of("--node /tmp/x devices"), Request::Devices);
        assert_eq!(request_of("layers"), Request::Layers { volume: None });
        assert_eq!(
            request_of("layers vol0"),
            Request::Layers {
                volume: Some("vol0".into())
            }
        );
        assert_eq!(
            request_of("stub set vol0 queue"),
            Request::StubSet {
                volume: "vol0".into(),
                layer: "queue".into()
            }
        );
        assert_eq!(
            request_of("stub clear vol0 engine"),
            Request::StubClear {
                volume: "vol0".into(),
                layer: "engine".into()
            }
        );
        assert_eq!(usage_error("stub set vol0 cache"), ErrorKind::InvalidValue);
        assert_eq!(
            request_of("inject list"),
            Request::InjectList { target: None }
        );
        assert_eq!(
            request_of("inject clear nvme0 --layer media"),
            Request::InjectClear {
                target: "nvme0".into(),
                layer: Some("media".into())
            }
        );
    }

    #[test]
    fn run_flags_and_defaults() {
        assert_eq!(
            request_of("run vol0"),
            Request::Run {
                volume: "vol0".into(),
                rw: "randread".into(),
                bs: 4096,
                iodepth: 32,
                runtime_ms: 5000,
                ramp_ms: 1000,
                size: None,
                seed: None,
                rwmixread: None,
            }
        );
        assert_eq!(
            request_of(
                "run vol0 --rw randrw --bs 1M --iodepth 4 --runtime 2.5 --ramp_time 0 \
                 --size 1G --seed 7 --rwmixread 70"
            ),
            Request::Run {
                volume: "vol0".into(),
                rw: "randrw".into(),
                bs: 1 << 20,
                iodepth: 4,
                runtime_ms: 2500,
                ramp_ms: 0,
                size: Some(1 << 30),
                seed: Some(7),
                rwmixread: Some(70),
            }
        );
        let Request::Run {
            runtime_ms,
            ramp_ms,
            ..
        } = request_of("run vol0 --runtime 500ms --ramp-time 1.5s")
        else {
            unreachable!()
        };
        assert_eq!((runtime_ms, ramp_ms), (500, 1500));
        for line in [
            "run vol0 --rwmixread 101",
            "run vol0 --iodepth 0",
            "run vol0 --bs 4 parsecs",
            "run vol0 --bs 4q",
            "run vol0 --runtime forever",
            "run vol0 --rw sideways",
            "--timeout 0 volumes",
        ] {
            assert!(parse_args(line).is_err(), "{line}");
        }
        assert_eq!(
            parse_args("--timeout 2.5 volumes").unwrap().timeout,
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn tables_align_and_rules_read_as_one_line() {
        let volumes = [
            VolumeRow {
                name: "vol0".into(),
                device: "nvme0".into(),
                nsid: 1,
                first_lba: 0,
                blocks: 262_144,
                block_size: 4096,
                size_bytes: 1 << 30,
                core: 0,
                stubs: vec![],
                rules: 0,
            },
            VolumeRow {
                name: "scratch-volume".into(),
                device: "nvme0".into(),
                nsid: 1,
                first_lba: 262_144,
                blocks: 3 << 21,
                block_size: 512,
                size_bytes: 3 << 29,
                core: 12,
                stubs: vec!["queue".into(), "engine".into()],
                rules: 2,
            },
        ];
        let text = volumes_table(&volumes);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // Right-aligned numbers end in the same column as their header.
        let size_end = lines[0].find("SIZE").unwrap() + 4;
        for line in &lines[1..] {
            assert!(line[..size_end].ends_with("GiB"), "{text}");
        }
        assert!(
            lines[1].contains("1GiB") && lines[2].contains("1.5GiB"),
            "{text}"
        );
        assert!(lines[2].contains("queue,engine"), "{text}");

        assert_eq!(
            rule_text(
                &json!({"stall": true, "latency": "50us", "ops": ["read"], "lbas": [0, 9], "x": 1})
            ),
            "ops=read lbas=0-9 latency=50us stall x=1"
        );
        assert_eq!(volumes_table(&[]), "no volumes\n");
        assert_eq!(rules_table(&[]), "no injection rules\n");
    }

    #[test]
    fn trace_commands_map_to_their_requests() {
        assert_eq!(
            request_of("trace show"),
            Request::TraceShow { volume: None }
        );
        assert_eq!(
            request_of("trace show vol1 --json"),
            Request::TraceShow {
                volume: Some("vol1".into())
            }
        );
        assert_eq!(
            request_of("trace set vol0 --tail 500us --rate 0"),
            Request::TraceSet {
                volume: Some("vol0".into()),
                rate: Some(0),
                tail: Some("500us".into()),
            }
        );
        assert_eq!(
            request_of("trace set --tail p99.9"),
            Request::TraceSet {
                volume: None,
                rate: None,
                tail: Some("p99.9".into()),
            }
        );
        assert_eq!(
            request_of("trace set --rate 4294967295"),
            Request::TraceSet {
                volume: None,
                rate: Some(u32::MAX),
                tail: None,
            }
        );
        // Sent as written: the node parses it again.
        let Request::TraceSet { tail, .. } = request_of("trace set vol0 --tail 1.5ms") else {
            unreachable!()
        };
        assert_eq!(tail.as_deref(), Some("1.5ms"));
    }

    #[test]
    fn bad_trace_flags_are_usage_errors() {
        assert_eq!(
            usage_error("trace set vol0"),
            ErrorKind::MissingRequiredArgument
        );
        for line in [
            "trace set --tail fast",
            "trace set --tail 5",
            "trace set --tail P99",
            "trace set --rate 4294967296",
            "trace set --rate 1/64",
        ] {
            assert_eq!(usage_error(line), ErrorKind::ValueValidation, "{line}");
        }
        let error = parse_args("trace set vol0 --tail fast")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"fast\" is not a duration")
                && error.contains("200us")
                && error.contains("\"p99.9\"")
                && error.contains("\"off\""),
            "{error}"
        );
        let error = parse_args("trace set --rate 1/64").unwrap_err().to_string();
        assert!(
            error.contains("one IO in N") && error.contains("0 for none"),
            "{error}"
        );
    }

    #[test]
    fn trace_table_shows_rates_and_thresholds_in_force() {
        let op_names: Vec<&str> = THRESHOLD_COLUMNS.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            op_names,
            fathom_engine::stats::OP_NAMES[..fathom_engine::stats::CLIENT_OPS]
        );
        let thresholds = |values: [Option<u64>; 4]| {
            op_names
                .iter()
                .map(|op| op.to_string())
                .zip(values)
                .collect()
        };
        let rows = [
            TraceRow {
                volume: "vol0".into(),
                rate: 1024,
                tail: "1ms".into(),
                thresholds_ns: thresholds([Some(999_999); 4]),
            },
            TraceRow {
                volume: "scratch".into(),
                rate: 0,
                tail: "p99.9".into(),
                thresholds_ns: thresholds([Some(812_345), None, None, Some(1_500_000)]),
            },
            TraceRow {
                volume: "vol2".into(),
                rate: 1,
                tail: "off".into(),
                thresholds_ns: thresholds([None; 4]),
            },
        ];
        assert_eq!(
            trace_table(&rows),
            "VOLUME   RATE    TAIL   READ           WRITE  FLUSH  WRITE_ZEROES\n\
             vol0     1/1024  1ms    1ms            1ms    1ms    1ms\n\
             scratch  off     p99.9  812us (p99.9)  -      -      1.5ms (p99.9)\n\
             vol2     1/1     off    -              -      -      -\n\
             -: no tail sampling yet: a p99.9 is learned once the op has 1000 IOs\n"
        );
        // No note when every "-" is a tail that is off.
        assert!(!trace_table(&rows[2..]).contains("p99.9"));
        assert_eq!(trace_table(&[]), "no volumes\n");

        let Command::Trace {
            action: TraceAction::Set(set),
        } = parse_args("trace set --tail 0.5ms --rate 0")
            .unwrap()
            .command
        else {
            unreachable!()
        };
        let changed = [TraceRow {
            tail: "500us".into(),
            ..rows[1].clone()
        }];
        assert_eq!(
            trace_set_text(&set, &changed),
            "set rate off, tail 500us on scratch\n"
        );
    }

    #[test]
    fn thresholds_read_in_their_largest_unit() {
        for (ns, text) in [
            (0, "0ns"),
            (999, "999ns"),
            (1_000, "1us"),
            (1_500, "1.5us"),
            (12_345, "12.3us"),
            (812_345, "812us"),
            (999_700, "1ms"),
            (999_999, "1ms"),
            (1_000_001, "1ms"),
            (2_000_000, "2ms"),
            (1_234_567, "1.23ms"),
            (3_600_000_000_000, "3600s"),
            (u64::MAX, "18446744074s"),
        ] {
            assert_eq!(threshold_text(ns), text, "{ns}");
        }
        assert_eq!(rate_text(0), "off");
        assert_eq!(rate_text(1024), "1/1024");
    }

    #[test]
    fn run_summary() {
        let args = parse_args("run vol0").unwrap();
        let Command::Run(run) = &args.command else {
            unreachable!()
        };
        let result = RunResult {
            volume: "vol0".into(),
            core: 0,
            ios: 500_000,
            bytes: 500_000 * 4096,
            errors: 0,
            elapsed_ns: 5_000_000_000,
            cpu_ns: 4_900_000_000,
            waited_ios: 1000,
            wait_ns: 50_000_000,
        };
        let text = run_text(run, &result);
        assert!(text.contains("IOPS 100000"), "{text}");
        assert!(text.contains("MiB/s 390.6"), "{text}");
        assert!(
            text.contains("waited 1000 IOs (0.20%), mean wait 50.0 us"),
            "{text}"
        );
        assert!(text.contains("reactor CPU 98.0%"), "{text}");
        assert!(text.contains("bs=4KiB iodepth=32"), "{text}");
    }

    #[test]
    fn long_help_teaches() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("fathom-ctl inject add nvme0"), "{help}");
        assert!(
            help.contains("fathom-ctl trace set vol0 --tail 500us --rate 0"),
            "{help}"
        );
        Args::command().debug_assert();
    }

    #[test]
    fn the_request_names_exist_in_the_protocol() {
        for line in [
            "hello",
            "volumes",
            "inject list",
            "run vol0",
            "trace show",
            "trace set --rate 1",
        ] {
            assert!(proto::COMMANDS.contains(&request_of(line).command()));
        }
    }
}
