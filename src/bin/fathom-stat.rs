//! fathom-stat: live per-stage latency and throughput of a running node, from its
//! shared-memory stats region.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fathom::stat::{render_table, Follower, Observation};
use fathom::text::replication_table;
use fathom::trace::command::TraceOptions;
use fathom_control::proto::{ReplicationRow, Request};
use fathom_control::ControlClient;
use fathom_telemetry::region::{Directory, Snapshot};
use fathom_telemetry::report::delta_histogram;
use fathom_telemetry::trace::{Start, TraceId};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

/// Shows what a running Fathom node's IOs spend in each stage of the data path (receive,
/// queue, submit, device, complete, reply, total; receive and reply for NBD requests only),
/// per volume and op, with rates and their per-second peaks, and how busy each device queue
/// is. It reads the node's shared-memory region (`/dev/shm/fathom-<node-id>`) and never slows
/// the node down.
///
///   fathom-stat                  one report per second, forever (like iostat -x 1)
///   fathom-stat 5 12             a report every 5 s, 12 times
///   fathom-stat --json 1 3       JSON lines, one object per interval
///   fathom-stat --hdr-log h.log  also write HdrHistogram interval logs (ns)
///   fathom-stat top              a live full-screen view
///   fathom-stat trace            traced IOs, live (see `fathom-stat trace --help`)
///
/// Percentiles come from log-linear histograms with 1% resolution. A report covers the
/// interval since the previous one; peaks are the highest per-second rate inside it.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Seconds between reports (iostat's interval).
    #[arg(value_name = "INTERVAL")]
    interval_positional: Option<f64>,
    /// Number of reports, then exit (iostat's count); default: until interrupted.
    #[arg(value_name = "COUNT")]
    count_positional: Option<u64>,
    #[command(flatten)]
    source: Source,
    /// Seconds between reports.
    #[arg(long, conflicts_with = "interval_positional")]
    interval: Option<f64>,
    /// Number of reports, then exit.
    #[arg(long, conflicts_with = "count_positional")]
    count: Option<u64>,
    /// One JSON object per interval (JSON lines) instead of tables.
    #[arg(long)]
    json: bool,
    /// Also append HdrHistogram interval logs (values in ns, tag volume.op.stage) to FILE.
    #[arg(long, value_name = "FILE")]
    hdr_log: Option<PathBuf>,
    /// Show volumes and ops that had no IO in the interval too.
    #[arg(long)]
    all: bool,
    /// Only these stages in the latency table, comma separated (e.g. device,total).
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Also show replication under each report: per replicated volume its role and epoch,
    /// and on the primary per replica its session, sync, lag (writes behind, dirty bytes) and
    /// resync (left, copied, rate in force), asked of the node's control socket (its
    /// data_dir, or the socket). JSON: a "replication" array in each object.
    #[arg(long, value_name = "DIR")]
    control: Option<PathBuf>,
    /// Also show each volume's health under each report: state, sign, the detector's inputs,
    /// canary, cause and why, from the status the node writes beside its region every
    /// second (REGION.health.json). JSON: a "health" object in each object.
    #[arg(long)]
    health: bool,
}

#[derive(Debug, clap::Args)]
struct Source {
    /// The node whose region to read: `/dev/shm/fathom-<NODE>`.
    #[arg(long, default_value = "node0", global = true)]
    node: String,
    /// Read this region file instead (overrides --node).
    #[arg(long, global = true)]
    region: Option<PathBuf>,
}

impl Source {
    fn path(&self) -> PathBuf {
        self.region
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/fathom-{}", self.node)))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Traced IOs: the node keeps one record per traced IO (head-sampled, slower than the
    /// tail threshold, or failed) in per-core rings in shared memory, with every stage's
    /// stamps. This follows them live, one line per IO (like `tail -f`), through node
    /// restarts, and shows or exports them.
    ///
    ///   fathom-stat trace                       follow: one line per traced IO
    ///   fathom-stat trace --slowest 3           waterfalls of the 3 slowest IOs the rings hold
    ///   fathom-stat trace --slowest 5 --duration 10   ... of those traced in the next 10 s
    ///   fathom-stat trace --show 4bf92f3577b34da6a3ce929d0e0e4736   one trace's waterfall
    ///   fathom-stat trace --json --count 100    JSON lines, one object per IO with its spans
    ///   fathom-stat trace --ctf /tmp/t --duration 60 -q   CTF 1.8: `babeltrace2 /tmp/t`
    ///   fathom-stat trace --otlp http://127.0.0.1:4318   to an OpenTelemetry collector/Jaeger
    ///   fathom-stat trace --otlp-file spans.jsonl        the same OTLP JSON, one request a line
    ///
    /// A waterfall has one row per span: the front end's request (or `io` for an IO from
    /// inside the node) and, below it, queue, submit, each layer, device, complete and reply,
    /// each bar placed and sized on the request's time axis; the longest is marked. Which
    /// IOs are traced is set by `[telemetry.trace]` and `fathom-ctl trace set`.
    #[command(verbatim_doc_comment)]
    Trace {
        /// The trace region (default: the stats region's path with `.trace` added).
        #[arg(long, value_name = "FILE")]
        trace_region: Option<PathBuf>,
        /// Start with what the rings already hold instead of what comes next.
        #[arg(long)]
        oldest: bool,
        /// Stop after this many seconds (with --slowest/--show: read for this long).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// Stop after this many traced IOs.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// JSON lines: one object per traced IO, with its spans.
        #[arg(long)]
        json: bool,
        /// No line per IO: only the exports and the closing summary.
        #[arg(long, short)]
        quiet: bool,
        /// Also write a CTF 1.8 trace (for babeltrace2) into this new directory: one trace
        /// per node run, in DIR/<node>-<pid>.
        #[arg(long, value_name = "DIR")]
        ctf: Option<PathBuf>,
        /// Also send OTLP/HTTP JSON to this collector (http://host:port; /v1/traces added).
        #[arg(long, value_name = "URL")]
        otlp: Option<String>,
        /// Also write the OTLP JSON to FILE, one export request per line.
        #[arg(long, value_name = "FILE")]
        otlp_file: Option<PathBuf>,
        /// Draw the waterfalls of the N slowest IOs (of what the rings hold, or of what comes
        /// during --duration).
        #[arg(long, value_name = "N", conflicts_with = "show")]
        slowest: Option<usize>,
        /// Draw the waterfall of this trace (32 hex digits).
        #[arg(long, value_name = "TRACE_ID")]
        show: Option<String>,
        /// Characters of a waterfall's time axis (default: fits the terminal).
        #[arg(long)]
        width: Option<usize>,
    },
    /// A live full-screen view in the spirit of spdk_top: per volume and op, rates and stage
    /// latencies, refreshed every interval. q quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("fathom-stat: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Some(Command::Top { interval }) => {
            let every = seconds(interval, "--interval")?;
            return fathom::top::run(&args.source.path(), every);
        }
        Some(Command::Trace {
            trace_region,
            oldest,
            duration,
            count,
            json,
            quiet,
            ctf,
            otlp,
            otlp_file,
            slowest,
            show,
            width,
        }) => {
            if count == Some(0) || slowest == Some(0) {
                bail!("a count of 0 shows nothing; leave it out to follow until interrupted");
            }
            let show = show
                .map(|text| {
                    TraceId::parse(&text).with_context(|| {
                        format!("--show {text:?} is not a trace id: give its 32 hex digits, as a line or waterfall prints it")
                    })
                })
                .transpose()?;
            let width = width.unwrap_or_else(|| {
                crossterm::terminal::size()
                    .map_or(100, |(columns, _)| columns as usize)
                    .saturating_sub(48)
                    .clamp(20, 200)
            });
            let region = trace_region
                .unwrap_or_else(|| fathom_telemetry::trace::region_beside(&args.source.path()));
            return fathom::trace::command::run(&TraceOptions {
                region,
                start: if oldest { Start::Oldest } else { Start::Now },
                duration: duration
                    .map(|value| seconds(value, "--duration"))
                    .transpose()?,
                count,
                json,
                quiet,
                ctf,
                otlp,
                otlp_file,
                slowest,
                show,
                width,
            });
        }
        None => {}
    }
    let every = seconds(
        args.interval.or(args.interval_positional).unwrap_or(1.0),
        "the interval",
    )?;
    let count = args.count.or(args.count_positional);
    if count == Some(0) {
        bail!("a count of 0 reports nothing; leave it out to report until interrupted");
    }
    let path = args.source.path();
    let mut follower =
        Follower::new(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(reader) = follower.reader() {
        let directory = reader.directory();
        if !args.json {
            println!(
                "fathom-stat: node {} (pid {}), {} volumes on cores {:?}, clock {:?} {:.3} GHz, region {}",
                directory.node_id,
                directory.writer_pid,
                directory.live_volumes().count(),
                directory.cores,
                directory.clock_source,
                directory.tsc_hz as f64 / 1e9,
                path.display()
            );
        }
    }
    let mut hdr_log = match &args.hdr_log {
        Some(file) => Some(HdrLog::create(file)?),
        None => None,
    };
    let mut control = args.control.as_deref().map(Control::new);
    let sub_interval = every.min(Duration::from_secs(1));
    let mut reported = 0;
    while count.is_none_or(|count| reported < count) {
        match follower.next(every, sub_interval, args.all) {
            Observation::Report { report, samples } => {
                let replication = control.as_mut().map(Control::replication);
                let health = args
                    .health
                    .then(|| fathom::health::monitor::read_status(&path));
                if args.json {
                    let mut object = serde_json::to_value(&report)?;
                    if let Some(rows) = &replication {
                        object["replication"] = match rows {
                            Ok(rows) => serde_json::to_value(rows)?,
                            Err(error) => serde_json::json!({ "error": error }),
                        };
                    }
                    match &health {
                        Some(Ok(Some(status))) => object["health"] = serde_json::to_value(status)?,
                        Some(Ok(None)) => {
                            object["health"] = serde_json::json!({ "error": "no health status: the node runs without health ([health] enabled = false, or no telemetry)" })
                        }
                        Some(Err(error)) => {
                            object["health"] = serde_json::json!({ "error": error })
                        }
                        None => {}
                    }
                    println!("{object}");
                } else {
                    println!("{}", render_table(&report, &args.stages));
                    match &replication {
                        Some(Ok(rows)) => println!("{}", replication_table(rows)),
                        Some(Err(error)) => println!("replication: {error}\n"),
                        None => {}
                    }
                    match &health {
                        Some(Ok(Some(status))) => {
                            println!("{}", fathom::text::health_text(status))
                        }
                        Some(Ok(None)) => println!(
                            "health: no status beside the region: the node runs without health\n"
                        ),
                        Some(Err(error)) => println!("health: {error}\n"),
                        None => {}
                    }
                }
                if let (Some(log), Some(reader)) = (hdr_log.as_mut(), follower.reader()) {
                    log.write(reader.directory(), &samples)?;
                }
            }
            Observation::Note(note) => {
                if !note.is_empty() {
                    eprintln!("fathom-stat: {note}");
                }
            }
        }
        reported += 1;
    }
    Ok(())
}

/// The node's control socket, asked for replication at each report; a node that is down or
/// restarting is asked again next time (the report says why it has no replication).
struct Control {
    socket: PathBuf,
    client: Option<ControlClient>,
}

impl Control {
    fn new(node: &std::path::Path) -> Self {
        Self {
            socket: fathom_control::socket_of(node),
            client: None,
        }
    }

    fn replication(&mut self) -> Result<Vec<ReplicationRow>, String> {
        let answer = (|| {
            let client = match &mut self.client {
                Some(client) => client,
                None => self
                    .client
                    .insert(ControlClient::connect(&self.socket, CONTROL_TIMEOUT)?),
            };
            client.call(&Request::Replication { volume: None })
        })();
        let answer = answer.map_err(|error| {
            self.client = None;
            format!("{} (`fathom-ctl --node {}`)", error, self.socket.display())
        })?;
        serde_json::from_value(answer)
            .map_err(|error| format!("the node's replication answer is not readable: {error}"))
    }
}

/// How long one control request may take before the report goes on without it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

fn seconds(value: f64, what: &str) -> Result<Duration> {
    if !(value.is_finite() && (0.01..=86_400.0).contains(&value)) {
        bail!("{what} must be between 0.01 and 86400 seconds, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// An HdrHistogram interval log (the format HdrHistogram's tools read), values in ns.
struct HdrLog {
    file: File,
    serializer: V2DeflateSerializer,
    started: SystemTime,
}

impl HdrLog {
    fn create(path: &PathBuf) -> Result<Self> {
        let mut file =
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut serializer = V2DeflateSerializer::new();
        let started = SystemTime::now();
        IntervalLogWriterBuilder::new()
            .add_comment("fathom-stat: per volume.op.stage latency, values in nanoseconds")
            .with_start_time(started)
            .with_base_time(started)
            .with_max_value_divisor(1e6)
            .begin_log_with(&mut file, &mut serializer)?;
        Ok(Self {
            file,
            serializer,
            started,
        })
    }

    fn write(&mut self, directory: &Directory, samples: &[Snapshot]) -> Result<()> {
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let interval = Duration::from_secs_f64(
            last.taken_ticks.saturating_sub(first.taken_ticks) as f64 / directory.tsc_hz as f64,
        );
        let start = SystemTime::now()
            .duration_since(self.started)
            .unwrap_or_default()
            .saturating_sub(interval);
        let mut writer =
            IntervalLogWriterBuilder::new().begin_log_with(&mut self.file, &mut self.serializer)?;
        let to_ns = 1e9 / directory.tsc_hz as f64;
        // The volumes the report named: live, and in their slots when the last sample was read.
        for (volume_index, volume) in directory
            .live_volumes()
            .filter(|(index, volume)| last.volume_generation(*index) == volume.generation)
        {
            for (op_index, op) in directory.ops.iter().enumerate() {
                for (stage_index, stage) in directory.stages.iter().enumerate() {
                    let ticks = delta_histogram(
                        directory,
                        first,
                        last,
                        volume_index,
                        op_index,
                        stage_index,
                    );
                    if ticks.is_empty() {
                        continue;
                    }
                    let mut ns = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 2)
                        .expect("valid bounds");
                    for value in ticks.iter_recorded() {
                        let _ = ns.record_n(
                            (value.value_iterated_to() as f64 * to_ns) as u64,
                            value.count_at_value(),
                        );
                    }
                    let tag = format!("{}.{}.{}", volume.name, op, stage).replace([' ', ','], "_");
                    writer
                        .write_histogram(&ns, start, interval, Tag::new(&tag))
                        .map_err(|error| {
                            anyhow::anyhow!("writing the HdrHistogram log: {error}")
                        })?;
                }
            }
        }
        Ok(())
    }
}
