//! fathom-stat: live per-stage latency and throughput of a running node, from its
//! shared-memory stats region.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fathom::stat::{render_table, Follower, Observation};
use fathom_telemetry::region::{Directory, Snapshot};
use fathom_telemetry::report::delta_histogram;
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
    if let Some(Command::Top { interval }) = args.command {
        let every = seconds(interval, "--interval")?;
        return fathom::top::run(&args.source.path(), every);
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
                directory.volumes.len(),
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
    let sub_interval = every.min(Duration::from_secs(1));
    let mut reported = 0;
    while count.is_none_or(|count| reported < count) {
        match follower.next(every, sub_interval, args.all) {
            Observation::Report { report, samples } => {
                if args.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    println!("{}", render_table(&report, &args.stages));
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
        for (volume_index, volume) in directory.volumes.iter().enumerate() {
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
