//! fathom-bench: fio-like workloads on Fathom's data path, run on the reactor cores themselves.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use fathom::stat::{duration, quantity};
use fathom::workload::{
    Pattern, VerifyOptions, VerifyResult, VerifyTask, WorkloadResult, WorkloadSpec, WorkloadTask,
};
use fathom_engine::config::{ByteSize, Config};
use fathom_engine::Engine;
use fathom_telemetry::region::{RegionReader, Snapshot, VolumeCounters};
use fathom_telemetry::report::{merged_histogram, volume_delta, StageReport};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Driver {
    /// The in-process NVMe controller.
    Mem,
    /// io_uring with O_DIRECT on --filename (a file or block device).
    Uring,
    /// The userspace NVMe driver on the controller at --pci (bound to vfio-pci).
    Vfio,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Media {
    Null,
    Ram,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PollArg {
    Busy,
    Adaptive,
    /// Adaptive, yielding the core between idle polls (for cores shared with other nodes).
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClockArg {
    Tsc,
    Monotonic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Inline,
    Thread,
}

/// Runs a fio-style workload against Fathom's engine, with the workload generator on each
/// reactor's own core (as SPDK's perf does), and reports IOPS, bandwidth and the CPU cost of
/// one IO.
///
/// `fathom-bench isolate ...` instead measures which layer holds the latency, by stubbing one
/// layer at a time (`fathom-bench isolate --help`).
///
/// Example, the software-overhead measurement (no device time, no data copies):
///
///   fathom-bench --driver mem --media null --mode inline --rw randread --bs 4k --iodepth 32 --runtime 10
///
/// Each core gets its own volume (a slice of the device) and keeps --iodepth IOs in flight on
/// it. DMA buffers come from 2 MiB hugepages: reserve them with `sysctl -w vm.nr_hugepages=256`,
/// or pass --no-hugepages.
///
/// Example, a running node through its client path (NBD over TCP, as a VM or qemu-img would
/// reach it), to set beside the in-process figures:
///
///   fathom-bench --nbd nbd://127.0.0.1:10809/vol0 --rw randread --bs 4k --iodepth 32 --runtime 10
///
/// There each of --numjobs jobs is a client thread with its own connection and its own
/// --size region of the export (job j at j * size; by default the export is divided among the
/// jobs). Latencies and CPU time are the client's; the node's own per-stage breakdown of the
/// same IOs is in fathom-stat. The options of the in-process engine (--driver, --media,
/// --mode, --filename, --pci, --poll, --clock, --telemetry, --trace*, --sector, --no-hugepages,
/// --plot, --bsrange) do not apply and are refused.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Drive a running node through NBD instead of an in-process engine:
    /// `nbd://HOST[:PORT]/EXPORT` (port 10809 unless given; no TLS). Several, comma
    /// separated (nodes of one cluster, each serving the volume): the first is used, and a
    /// job whose connection is lost connects again to the next in turn.
    #[arg(long, value_name = "URI[,URI...]")]
    nbd: Option<String>,
    /// With --nbd: how long a job tries to connect again after losing its connection (a
    /// node killed, a failover), in seconds; the IOs in flight then are counted as of
    /// unknown outcome and the outage is reported. 0: a lost connection ends the run.
    #[arg(long, value_name = "SECS", default_value = "30")]
    reconnect_timeout: f64,
    #[arg(long, value_enum, default_value = "mem")]
    driver: Driver,
    /// Media of the mem driver: null (nothing stored, nothing copied), ram, or file.
    #[arg(long, value_enum, default_value = "null")]
    media: Media,
    /// inline: the controller runs in the reactor's poll loop; thread: on a device thread.
    #[arg(long, value_enum, default_value = "inline")]
    mode: Mode,
    /// --driver uring: the file or block device; --media file: the backing file (created
    /// sparse).
    #[arg(long)]
    filename: Option<std::path::PathBuf>,
    /// --driver vfio: the NVMe controller's PCI address, e.g. 0000:00:04.0 (bind it to
    /// vfio-pci first: `fathom-node devices bind ADDRESS`).
    #[arg(long, value_name = "ADDRESS")]
    pci: Option<String>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Pattern,
    /// Block size of each IO (e.g. 512, 4k, 128k).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// IOs kept in flight per core.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// With --nbd: each client job spins on its socket for replies instead of sleeping in
    /// poll(2) (as fio's hipri): a core per job, and no client wake-up in the node's latency.
    #[arg(long)]
    hipri: bool,
    /// Reactor cores to run on (one workload per core), as fio's numjobs; with --nbd, client
    /// jobs (threads), each on its own connection.
    #[arg(long, alias = "numjobs", default_value_t = 1)]
    cores: usize,
    /// Write every block of --size once (in --rw's order), then read every block back and
    /// check its contents; --runtime does not apply. Needs media that store data.
    #[arg(long)]
    verify: bool,
    /// With --verify: IOs of random sizes from --bs up to this (multiples of --bs), in
    /// buffers starting at random 512-byte offsets into a page, as fio's bsrange.
    #[arg(long, value_name = "MAX", value_parser = parse_size)]
    bsrange: Option<u64>,
    /// With --verify: only read back and check what an earlier --verify run with the same
    /// --size and --cores wrote (as fio's verify_only), e.g. after a restart or from another
    /// host.
    #[arg(long = "verify_only", alias = "verify-only")]
    verify_only: bool,
    /// Also draw the latency distribution of every stage (percentile curves) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
    /// busy: reactors poll without pause (as SPDK's perf); adaptive: a reactor waiting only on
    /// a device that can notify (uring) sleeps in the kernel until a completion arrives.
    #[arg(long, value_enum, default_value = "busy")]
    poll: PollArg,
    /// Percent of reads in a mixed pattern (readwrite, randrw), as fio's rwmixread.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Bytes each core's workload spans; with --nbd, each job's region of the export (by
    /// default, the export divided among the jobs).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Seconds to run before measuring.
    #[arg(long = "ramp_time", alias = "ramp-time", default_value_t = 1.0)]
    ramp_time: f64,
    /// Device block size.
    #[arg(long, default_value_t = 512)]
    sector: u32,
    /// Use normal pages for DMA memory instead of hugepages.
    #[arg(long)]
    no_hugepages: bool,
    /// Telemetry (stage stamps into the shared-memory stats region): on, as a node runs, or
    /// off, to measure what it costs.
    #[arg(long, value_enum, default_value = "on")]
    telemetry: Switch,
    /// Tracing (with telemetry): on as a node runs, or off, to measure what it costs.
    #[arg(long, value_enum, default_value = "on")]
    trace: Switch,
    /// Head sampling: one IO in N is traced (0: none), as `[telemetry.trace] rate`.
    #[arg(long, default_value_t = 1024)]
    trace_rate: u32,
    /// Tail sampling: every IO slower than this is traced ("1ms", "p99.9", "off").
    #[arg(long, default_value = "1ms", value_parser = parse_tail)]
    trace_tail: String,
    /// Telemetry's clock: tsc (the CPU's invariant TSC, refused on CPUs without one) or
    /// monotonic (CLOCK_MONOTONIC: slower to read, works everywhere, e.g. in emulators).
    #[arg(long, value_enum, default_value = "tsc")]
    clock: ClockArg,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
}

fn parse_tail(text: &str) -> Result<String, String> {
    fathom_engine::config::TailThreshold::parse(text).map(|_| text.to_string())
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<ByteSize>().map(|size| size.0)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("isolate") {
        let args = fathom::isolate::IsolateArgs::parse_from(std::env::args().skip(1));
        if let Err(error) = fathom::isolate::main(args) {
            eprintln!("fathom-bench isolate: {error:#}");
            std::process::exit(1);
        }
        return;
    }
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // Which options the command line gave (not their defaults).
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let result = match &args.nbd {
        Some(uri) => nbd_mode::run(&args, uri, given),
        None => run(args),
    };
    if let Err(error) = result {
        eprintln!("fathom-bench: {error:#}");
        std::process::exit(1);
    }
}

/// Checks of the workload's shape that hold in every mode.
fn check_shape(args: &Args) -> Result<()> {
    if args.iodepth == 0 {
        bail!("--iodepth 0: at least one IO must be in flight");
    }
    if args.runtime.is_nan()
        || args.runtime <= 0.0
        || args.ramp_time.is_nan()
        || args.ramp_time < 0.0
    {
        bail!("--runtime must be positive and --ramp_time not negative");
    }
    if args.rwmixread > 100 {
        bail!("--rwmixread {} is a percentage: 0 to 100", args.rwmixread);
    }
    Ok(())
}

fn run(mut args: Args) -> Result<()> {
    if args.hipri {
        bail!("--hipri is for an NBD client (--nbd URI): in-node workloads are polled by their reactors already");
    }
    // As fio does, a relative --filename is relative to where the command runs.
    if let Some(path) = &args.filename {
        args.filename = Some(
            std::path::absolute(path)
                .with_context(|| format!("resolving --filename {}", path.display()))?,
        );
    }
    check_shape(&args)?;
    if args.bs == 0 || !args.bs.is_multiple_of(args.sector as u64) {
        bail!(
            "--bs {} is not a multiple of the {}-byte sector",
            args.bs,
            args.sector
        );
    }
    if args.size < args.bs || !args.size.is_multiple_of(args.bs) {
        bail!(
            "--size {} must be a non-zero multiple of --bs {}",
            args.size,
            args.bs
        );
    }
    if matches!(args.driver, Driver::Uring) && args.filename.is_none() {
        bail!("--driver uring needs --filename: the file (created at --size per core if missing) or block device to test");
    }
    if matches!(args.driver, Driver::Vfio) != args.pci.is_some() {
        bail!("--driver vfio and --pci ADDRESS go together: the PCI address of the NVMe controller (bound to vfio-pci) to drive");
    }
    if (args.bsrange.is_some() || args.verify_only) && !args.verify {
        bail!("--bsrange and --verify_only apply to --verify runs");
    }
    if let Some(max) = args.bsrange {
        if max < args.bs || !max.is_multiple_of(args.bs) {
            bail!(
                "--bsrange {max} must be a multiple of --bs {} and at least as large",
                args.bs
            );
        }
    }
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if args.cores == 0 || args.cores > online {
        bail!("--cores {}: this machine has {online} cores", args.cores);
    }
    if args.verify && matches!((args.driver, args.media), (Driver::Mem, Media::Null)) {
        bail!("--verify needs media that store data: --media ram or file (null stores nothing)");
    }
    let config =
        Config::parse(&bench_config(&args)).context("building the benchmark configuration")?;
    let engine = Engine::start(&config).context("starting the engine")?;
    for device in engine.devices() {
        let namespaces: Vec<String> = device
            .namespaces
            .iter()
            .map(|ns| format!("nsid {} {} x {} B", ns.nsid, ns.blocks, ns.block_size))
            .collect();
        eprintln!(
            "fathom-bench: device {} ({}): model \"{}\", serial \"{}\", {}",
            device.name,
            device.driver,
            device.model,
            device.serial,
            namespaces.join(", ")
        );
    }
    if args.verify {
        return verify(&args, &engine, &config);
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    for reactor in 0..args.cores {
        let spec = workload_spec(&args, &engine, reactor);
        let task = WorkloadTask::new(spec, engine.dma(), *engine.clock(), tx.clone())
            .context("allocating IO buffers")?;
        engine.spawn(reactor, Box::new(task))?;
    }
    // The stats region gives latencies and the stage breakdown over the measured interval:
    // from the end of the ramp to the end of the run.
    let region = match config.telemetry.enabled {
        true => Some(
            RegionReader::open(&config.region_path())
                .context("reading the benchmark's stats region")?,
        ),
        false => None,
    };
    let clock = *engine.clock();
    let progress = Progress::new(&args, region.as_ref().map(completed_ios));
    let ramp_end = std::time::Instant::now() + Duration::from_secs_f64(args.ramp_time);
    let mut measured_from = None;
    let deadline = ramp_end + Duration::from_secs_f64(args.runtime + 60.0);
    let mut results: Vec<WorkloadResult> = Vec::new();
    while results.len() < args.cores {
        if measured_from.is_none() && std::time::Instant::now() >= ramp_end {
            measured_from = region.as_ref().map(|region| region.snapshot(clock.now()));
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(result) => results.push(result),
            Err(_) if std::time::Instant::now() > deadline => {
                bail!("a workload did not finish in time")
            }
            Err(_) => progress.tick(region.as_ref().map(completed_ios)),
        }
    }
    progress.finish();
    // Counters are published every millisecond: wait for the last publication, and take the
    // snapshot before shutdown flushes the volumes.
    std::thread::sleep(Duration::from_millis(5));
    let measured_from =
        measured_from.or_else(|| region.as_ref().map(|region| region.snapshot(clock.now())));
    let stats = match (&region, &measured_from) {
        (Some(region), Some(from)) => {
            Some(interval_stats(region, from, &region.snapshot(clock.now())))
        }
        _ => None,
    };
    engine.shutdown().context("shutting the engine down")?;
    remove_regions(&config);
    if let Some(path) = &args.plot {
        let Some(op) = stats.as_ref().and_then(|stats| stats.last()) else {
            bail!("--plot needs telemetry (--telemetry on): the latencies come from it");
        };
        let curves: Vec<fathom::plot::Curve> = op
            .histograms
            .iter()
            .map(|(label, histogram)| fathom::plot::Curve { label, histogram })
            .collect();
        let title = format!(
            "fathom-bench {:?} bs={} iodepth={} ({:?}, {} ops)",
            args.rw, args.bs, args.iodepth, args.driver, op.op
        )
        .to_lowercase();
        std::fs::write(path, fathom::plot::percentile_svg(&title, &curves, op.hz))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    report(&args, &results, stats.as_ref())
}

/// The workload of reactor `reactor`: its own volume, the arguments' shape.
fn workload_spec(args: &Args, engine: &Engine, reactor: usize) -> WorkloadSpec {
    WorkloadSpec {
        volume: engine.volumes()[reactor].id,
        pattern: args.rw,
        block_size: args.bs,
        iodepth: args.iodepth,
        span_bytes: args.size,
        runtime: Duration::from_secs_f64(args.runtime),
        ramp: Duration::from_secs_f64(args.ramp_time),
        seed: reactor as u64 + 1,
        read_percent: args.rwmixread,
    }
}

/// The --verify run: every core writes its span once, reads it back, compares.
fn verify(args: &Args, engine: &Engine, config: &Config) -> Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let options = VerifyOptions {
        max_block_size: args.bsrange.unwrap_or(args.bs),
        read_only: args.verify_only,
    };
    for reactor in 0..args.cores {
        let spec = workload_spec(args, engine, reactor);
        engine.spawn(
            reactor,
            Box::new(
                VerifyTask::new(&spec, options, engine.dma(), tx.clone())
                    .context("allocating IO buffers")?,
            ),
        )?;
    }
    let mut results: Vec<VerifyResult> = Vec::new();
    for _ in 0..args.cores {
        results.push(
            rx.recv_timeout(Duration::from_secs(3600))
                .context("a verify pass did not finish within an hour")?,
        );
    }
    engine.shutdown().context("shutting the engine down")?;
    remove_regions(config);
    let mismatches: u64 = results.iter().map(|r| r.mismatches).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "verify": results, "mismatches": mismatches, "errors": errors })
            )?
        );
    } else {
        for result in &results {
            println!(
                "verify core {}: wrote {} extents of {}, read {} back: {} mismatches, {} IO errors{}",
                result.core,
                result.blocks_written,
                match args.bsrange {
                    Some(max) => format!("{} to {} B", args.bs, max),
                    None => format!("{} B", args.bs),
                },
                result.blocks_read,
                result.mismatches,
                result.errors,
                if result.first_mismatches.is_empty() { String::new() } else { format!(" (first at offsets {:?})", result.first_mismatches) }
            );
        }
    }
    if mismatches + errors > 0 {
        bail!("verify failed: {mismatches} blocks read back differently from what was written, {errors} IO errors");
    }
    Ok(())
}

/// A progress bar over the run, with the live IOPS from a count of completed IOs (the
/// benchmark's stats region, or the NBD client's own counters).
struct Progress {
    bar: indicatif::ProgressBar,
    started: std::time::Instant,
    last: std::cell::Cell<(u64, std::time::Instant)>,
}

impl Progress {
    fn new(args: &Args, ios: Option<u64>) -> Self {
        let total_ms = ((args.runtime + args.ramp_time) * 1000.0) as u64;
        let bar = if args.json {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total_ms)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:40}] {elapsed}/{duration} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Self {
            bar,
            started: std::time::Instant::now(),
            last: std::cell::Cell::new((ios.unwrap_or(0), std::time::Instant::now())),
        }
    }

    /// Moves the bar on; `ios` is the count of IOs completed so far, if known.
    fn tick(&self, ios: Option<u64>) {
        self.bar
            .set_position(self.started.elapsed().as_millis() as u64);
        if let Some(now) = ios {
            let (before, at) = self.last.get();
            let seconds = at.elapsed().as_secs_f64().max(1e-3);
            self.bar.set_message(format!(
                "{} IOPS",
                quantity(now.saturating_sub(before) as f64 / seconds)
            ));
            self.last.set((now, std::time::Instant::now()));
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// IOs completed so far on every volume, from the region's counters.
fn completed_ios(region: &RegionReader) -> u64 {
    let directory = region.directory();
    let snapshot = region.snapshot(0);
    let ops = directory.ops.len();
    directory
        .live_volumes()
        .flat_map(|(volume, _)| (0..ops).map(move |op| (volume, op)))
        .map(|(volume, op)| {
            let counters = snapshot.volume(volume, op);
            counters.ios + counters.errors
        })
        .sum()
}

/// Per op (and for all ops together, under "all"): IOs, bytes and the stage reports.
struct OpStats {
    op: String,
    ios: u64,
    bytes: u64,
    stages: Vec<StageReport>,
    /// The stage histograms (in ticks of the region's clock), for --plot.
    histograms: Vec<(String, hdrhistogram::Histogram<u64>)>,
    hz: u64,
}

fn interval_stats(region: &RegionReader, from: &Snapshot, to: &Snapshot) -> Vec<OpStats> {
    let directory = region.directory();
    let volumes: Vec<usize> = directory.live_volumes().map(|(index, _)| index).collect();
    // One of a volume's counters (IOs, bytes, errors), summed over the volumes, over the interval.
    let counter = |op: usize, field: fn(VolumeCounters) -> u64| -> u64 {
        volumes
            .iter()
            .map(|&volume| field(volume_delta(from, to, volume, op)))
            .sum()
    };
    let histograms = |ops: &[usize]| -> Vec<(String, hdrhistogram::Histogram<u64>)> {
        directory
            .stages
            .iter()
            .enumerate()
            .map(|(stage, name)| {
                (
                    name.clone(),
                    merged_histogram(directory, from, to, &volumes, ops, stage),
                )
            })
            .collect()
    };
    let op_stats = |op: String, ios: u64, bytes: u64, ops: &[usize]| {
        let histograms = histograms(ops);
        let stages = histograms
            .iter()
            .map(|(name, histogram)| StageReport::from_histogram(name, histogram, directory.tsc_hz))
            .collect();
        OpStats {
            op,
            ios,
            bytes,
            stages,
            histograms,
            hz: directory.tsc_hz,
        }
    };
    let active: Vec<usize> = (0..directory.ops.len())
        .filter(|&op| counter(op, |c| c.ios) + counter(op, |c| c.errors) > 0)
        .collect();
    let mut out: Vec<OpStats> = active
        .iter()
        .map(|&op| {
            op_stats(
                directory.ops[op].clone(),
                counter(op, |c| c.ios),
                counter(op, |c| c.bytes),
                &[op],
            )
        })
        .collect();
    if active.len() > 1 {
        let (ios, bytes) = (
            active.iter().map(|&op| counter(op, |c| c.ios)).sum(),
            active.iter().map(|&op| counter(op, |c| c.bytes)).sum(),
        );
        out.push(op_stats("all".into(), ios, bytes, &active));
    }
    out
}

fn bench_config(args: &Args) -> String {
    let cores: Vec<String> = (0..args.cores).map(|core| core.to_string()).collect();
    let media = format!("{:?}", args.media).to_lowercase();
    let mode = format!("{:?}", args.mode).to_lowercase();
    let path = match (&args.filename, args.driver, args.media) {
        (Some(path), Driver::Uring, _) | (Some(path), Driver::Mem, Media::File) => {
            format!("path = {:?}\n", path.display().to_string())
        }
        _ => String::new(),
    };
    let device = match args.driver {
        Driver::Mem => format!("driver = \"mem\"\nmedia = \"{media}\"\nmode = \"{mode}\"\n"),
        Driver::Uring => "driver = \"uring\"\n".to_string(),
        Driver::Vfio => format!(
            "driver = \"vfio\"\npci = {:?}\n",
            args.pci.as_deref().unwrap_or_default()
        ),
    };
    // A vfio controller's namespace gives the device's size and block size.
    let geometry = match args.driver {
        Driver::Vfio => String::new(),
        _ => format!(
            "size = {}\nblock_size = {}\n",
            args.size * args.cores as u64,
            args.sector
        ),
    };
    let data_dir = std::env::temp_dir().join("fathom-bench");
    // Ring, PRP lists and buffers for every core, with room to spare.
    let largest = args.bsrange.map_or(args.bs, |max| max + 4096);
    let dma = 32 + args.cores as u64 * (args.iodepth as u64 * largest + (4 << 20)) / (1 << 20);
    let mut text = format!(
        "[node]\nid = \"bench\"\ndata_dir = {data_dir:?}\n\
         [dma]\nsize = \"{dma}MiB\"\nhugepages = {hugepages}\n\
         [reactor]\ncores = [{cores}]\npoll = \"{poll}\"\nqueue_depth = {depth}\n\
         [telemetry]\nenabled = {telemetry}\nclock = \"{clock}\"\nregion = {region:?}\nmetrics = \"\"\n\
         [telemetry.trace]\nenabled = {trace}\nrate = {rate}\ntail = {tail:?}\n\
         [[device]]\nname = \"nvme0\"\n{device}{path}{geometry}",
        hugepages = !args.no_hugepages,
        telemetry = args.telemetry == Switch::On,
        trace = args.trace == Switch::On,
        rate = args.trace_rate,
        tail = args.trace_tail,
        clock = format!("{:?}", args.clock).to_lowercase(),
        poll = format!("{:?}", args.poll).to_lowercase(),
        region = format!("/dev/shm/fathom-bench-{}", std::process::id()),
        cores = cores.join(", "),
        depth = args.iodepth.clamp(1, 4095),
    );
    for core in 0..args.cores {
        text += &format!(
            "[[volume]]\nname = \"bench{core}\"\ndevice = \"nvme0\"\noffset = {}\nsize = {}\ncore = {core}\n",
            args.size * core as u64,
            args.size
        );
    }
    text
}

fn lat_json(stage: &StageReport) -> serde_json::Value {
    serde_json::json!({
        "count": stage.count, "mean": stage.mean_ns, "p50": stage.p50_ns, "p90": stage.p90_ns,
        "p99": stage.p99_ns, "p999": stage.p999_ns, "max": stage.max_ns,
    })
}

fn report(args: &Args, results: &[WorkloadResult], stats: Option<&Vec<OpStats>>) -> Result<()> {
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let elapsed_s = results.iter().map(|r| r.elapsed_ns).max().unwrap_or(1) as f64 / 1e9;
    let cpu_ns: u64 = results.iter().map(|r| r.cpu_ns).sum();
    let iops = ios as f64 / elapsed_s;
    let iops_per_core = iops / results.len() as f64;
    let wall_ns_per_io = 1e9 / iops_per_core;
    let cpu_ns_per_io = cpu_ns as f64 / ios.max(1) as f64;
    // The latency of the whole run: the `total` stage over every op.
    let overall = stats
        .and_then(|stats| stats.last())
        .and_then(|op| op.stages.iter().find(|stage| stage.stage == "total"));
    if args.json {
        let ops: serde_json::Map<String, serde_json::Value> = stats
            .map(|stats| {
                stats
                    .iter()
                    .map(|op| {
                        let stages: serde_json::Map<String, serde_json::Value> = op
                            .stages
                            .iter()
                            .map(|stage| (stage.stage.clone(), lat_json(stage)))
                            .collect();
                        let value = serde_json::json!({
                            "ios": op.ios, "iops": op.ios as f64 / elapsed_s,
                            "bw_bytes": op.bytes as f64 / elapsed_s, "stages": stages,
                        });
                        (op.op.clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let stages: serde_json::Map<String, serde_json::Value> = stats
            .and_then(|stats| stats.last())
            .map(|op| {
                op.stages
                    .iter()
                    .map(|stage| (stage.stage.clone(), lat_json(stage)))
                    .collect()
            })
            .unwrap_or_default();
        let json = serde_json::json!({
            "driver": format!("{:?}", args.driver).to_lowercase(),
            "media": format!("{:?}", args.media).to_lowercase(),
            "mode": format!("{:?}", args.mode).to_lowercase(),
                        "telemetry": args.telemetry == Switch::On,
            "poll": format!("{:?}", args.poll).to_lowercase(),
            "rw": args.rw, "bs": args.bs, "iodepth": args.iodepth, "cores": results.len(),
            "runtime_s": elapsed_s,
            "ios": ios, "errors": errors,
            "iops": iops, "iops_per_core": iops_per_core, "bw_bytes": bytes as f64 / elapsed_s,
            "ns_per_io_wall": wall_ns_per_io, "cpu_ns_per_io": cpu_ns_per_io,
            "lat_ns": overall.map(lat_json),
            "stages": stages,
            "ops": ops,
            "per_core": results,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "fathom-bench: driver={:?} media={:?} mode={:?} rw={:?} bs={} iodepth={} cores={} runtime={:.1}s",
            args.driver, args.media, args.mode, args.rw, args.bs, args.iodepth, results.len(), elapsed_s
        );
        match stats {
            Some(stats) => {
                for op in stats {
                    println!(
                        "  {}: IOPS={}, BW={:.1}MiB/s, ios={}",
                        op.op,
                        quantity(op.ios as f64 / elapsed_s),
                        op.bytes as f64 / elapsed_s / (1 << 20) as f64,
                        op.ios
                    );
                    if let Some(total) = op.stages.iter().find(|stage| stage.stage == "total") {
                        println!(
                            "    lat: mean={}, p50={}, p90={}, p99={}, p99.9={}, max={}",
                            duration(total.mean_ns),
                            duration(total.p50_ns),
                            duration(total.p90_ns),
                            duration(total.p99_ns),
                            duration(total.p999_ns),
                            duration(total.max_ns)
                        );
                    }
                }
                if let Some(op) = stats.last() {
                    println!("  stages ({}):      count      mean       p50       p99     p99.9       max", op.op);
                    // The front-end stages (receive, reply) stay empty: no NBD in this mode.
                    for stage in op.stages.iter().filter(|stage| stage.count > 0) {
                        println!(
                            "    {:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                            stage.stage,
                            quantity(stage.count as f64),
                            duration(stage.mean_ns),
                            duration(stage.p50_ns),
                            duration(stage.p99_ns),
                            duration(stage.p999_ns),
                            duration(stage.max_ns)
                        );
                    }
                }
            }
            None => println!("  (telemetry off: no latencies)"),
        }
        println!(
            "  all: IOPS={}, BW={:.1}MiB/s, ios={ios}, errors={errors}",
            quantity(iops),
            bytes as f64 / elapsed_s / (1 << 20) as f64
        );
        println!(
            "  per core: IOPS={}, {:.1} ns/IO (wall), {:.1} ns/IO (reactor CPU time)",
            quantity(iops_per_core),
            wall_ns_per_io,
            cpu_ns_per_io
        );
        for result in results {
            println!(
                "    core {}: {} IOPS, {:.1} ns CPU/IO",
                result.core,
                quantity(result.ios as f64 / (result.elapsed_ns as f64 / 1e9)),
                result.cpu_ns as f64 / result.ios.max(1) as f64
            );
        }
    }
    if errors > 0 {
        bail!("{errors} IOs failed");
    }
    Ok(())
}

/// `--nbd URI`: the workload through a running node's client path, by fathom-bench's own NBD
/// client (fathom::nbd_client): one thread and one connection per job.
mod nbd_mode {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use crossbeam_channel::RecvTimeoutError;
    use fathom::nbd_client::{
        self, Connection, Export, JobResult, JobSpec, NbdUri, OpResult, VerifyJobResult, VerifySpec,
    };
    use fathom::stat::{duration, quantity};
    use fathom_telemetry::report::StageReport;

    use super::{check_shape, lat_json, Args, Progress};

    /// The most jobs (client threads, each with its connection) one run may have.
    const MAX_JOBS: usize = 256;
    /// The client's latencies are nanoseconds: a histogram "tick" is one.
    const NS_PER_SECOND: u64 = 1_000_000_000;
    /// Beyond the run's own length, how long the jobs may take to drain and report.
    const FINISH_GRACE: Duration = Duration::from_secs(90);

    /// The in-process engine's options, which mean nothing for a node reached over NBD: the
    /// argument id, the flag, and why.
    const NOT_FOR_NBD: &[(&str, &str, &str)] = &[
        ("driver", "--driver", "the node's devices are set by its configuration"),
        ("media", "--media", "the node's devices are set by its configuration"),
        ("mode", "--mode", "the node's devices are set by its configuration"),
        ("filename", "--filename", "the node's devices are set by its configuration"),
        ("pci", "--pci", "the node's devices are set by its configuration"),
        ("poll", "--poll", "the node's reactors poll as its configuration says"),
        (
            "clock",
            "--clock",
            "the client times IOs with the monotonic clock; the node's telemetry clock is the node's",
        ),
        (
            "telemetry",
            "--telemetry",
            "telemetry is the node's: read its per-stage breakdown with fathom-stat",
        ),
        (
            "trace",
            "--trace",
            "tracing is the node's: change it with `fathom-ctl trace set`",
        ),
        (
            "trace_rate",
            "--trace-rate",
            "tracing is the node's: change it with `fathom-ctl trace set`",
        ),
        (
            "trace_tail",
            "--trace-tail",
            "tracing is the node's: change it with `fathom-ctl trace set`",
        ),
        ("sector", "--sector", "the export's block sizes come from the server"),
        ("no_hugepages", "--no-hugepages", "the client needs no DMA memory"),
        (
            "plot",
            "--plot",
            "it draws the engine's stage latencies, which a client does not see (fathom-stat has the node's)",
        ),
        ("bsrange", "--bsrange", "the NBD client verifies in --bs extents only"),
    ];

    pub fn run(args: &Args, uri_text: &str, given: impl Fn(&str) -> bool) -> Result<()> {
        for (id, flag, why) in NOT_FOR_NBD {
            if given(id) {
                bail!("{flag} does not apply with --nbd: {why}");
            }
        }
        check_shape(args)?;
        if args.verify_only && !args.verify {
            bail!("--verify_only applies to --verify runs");
        }
        let jobs = args.cores;
        if jobs == 0 || jobs > MAX_JOBS {
            bail!("--numjobs {jobs}: from 1 to {MAX_JOBS} jobs, each with its own connection");
        }
        let uris = uri_text
            .split(',')
            .map(|text| NbdUri::parse(text.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if !(args.reconnect_timeout >= 0.0 && args.reconnect_timeout.is_finite()) {
            bail!(
                "--reconnect-timeout {}: seconds, 0 or more",
                args.reconnect_timeout
            );
        }
        let uri = uris[0].clone();
        let first = Connection::open(&uri)?;
        let export = first.export().clone();
        eprintln!(
            "fathom-bench: NBD export {:?} at {}: {} ({} bytes), block sizes {}/{}/{} \
             (minimum/preferred/maximum){}",
            export.name,
            first.address(),
            bytes_text(export.size_bytes),
            export.size_bytes,
            export.min_block_bytes,
            export.preferred_block_bytes,
            export.max_block_bytes,
            if export.read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        // Unless told, the jobs share the whole export.
        let size = if given("size") {
            args.size
        } else {
            export.size_bytes / jobs as u64 / args.bs.max(1) * args.bs
        };
        let writes = if args.verify {
            !args.verify_only
        } else {
            args.rw.writes()
        };
        export.check_plan(args.bs, size, jobs, writes)?;
        if !given("size") && size == 0 {
            bail!(
                "export {:?} of {} bytes is too small for {jobs} jobs of --bs {}",
                export.name,
                export.size_bytes,
                args.bs
            );
        }
        if size == 0 || !size.is_multiple_of(args.bs) {
            bail!(
                "--size {size} must be a non-zero multiple of --bs {}",
                args.bs
            );
        }
        let block_size =
            u32::try_from(args.bs).expect("checked against the export's maximum block size");
        // Every connection is open before any IO, so handshakes are not measured.
        let mut connections = vec![first];
        for job in 1..jobs {
            connections.push(
                Connection::open(&uri)
                    .with_context(|| format!("opening the connection of job {job}"))?,
            );
        }
        if args.verify {
            verify(args, &uri, connections, block_size, size)
        } else {
            bench(args, &uris, &export, connections, block_size, size)
        }
    }

    fn bench(
        args: &Args,
        uris: &[NbdUri],
        export: &Export,
        connections: Vec<Connection>,
        block_size: u32,
        size: u64,
    ) -> Result<()> {
        let jobs = connections.len();
        let start = Arc::new(Barrier::new(jobs));
        let counters: Vec<Arc<AtomicU64>> = (0..jobs).map(|_| Arc::default()).collect();
        let (tx, rx) = crossbeam_channel::unbounded();
        for (job, connection) in connections.into_iter().enumerate() {
            let spec = JobSpec {
                job,
                pattern: args.rw,
                block_size,
                iodepth: args.iodepth,
                offset_bytes: job as u64 * size,
                span_bytes: size,
                runtime: Duration::from_secs_f64(args.runtime),
                ramp: Duration::from_secs_f64(args.ramp_time),
                // As the in-process workloads seed core c with c + 1.
                seed: job as u64 + 1,
                read_percent: args.rwmixread,
                spin: args.hipri,
                // The same node first (it may come back), then the others in turn.
                reconnect: match args.reconnect_timeout > 0.0 {
                    true => uris.to_vec(),
                    false => Vec::new(),
                },
                reconnect_timeout: Duration::from_secs_f64(args.reconnect_timeout),
            };
            let (start, counter, tx) = (start.clone(), counters[job].clone(), tx.clone());
            std::thread::Builder::new()
                .name(format!("nbd-job{job}"))
                .spawn(move || {
                    let result = nbd_client::run_job(connection, &spec, &start, &counter);
                    let _ = tx.send((job, result));
                })
                .context("starting a job's thread")?;
        }
        drop(tx);
        let progress = Progress::new(args, Some(0));
        let deadline = Instant::now()
            + Duration::from_secs_f64(args.ramp_time + args.runtime + args.reconnect_timeout)
            + FINISH_GRACE;
        let mut results: Vec<JobResult> = Vec::with_capacity(jobs);
        while results.len() < jobs {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((_, Ok(result))) => results.push(result),
                Ok((job, Err(error))) => {
                    progress.finish();
                    return Err(error).with_context(|| format!("job {job}"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("a job's thread ended without a result")
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("a job did not finish in time")
                }
                Err(RecvTimeoutError::Timeout) => progress.tick(Some(
                    counters
                        .iter()
                        .map(|counter| counter.load(Ordering::Relaxed))
                        .sum(),
                )),
            }
        }
        progress.finish();
        results.sort_by_key(|result| result.job);
        report(args, &uris[0], export, size, &results)
    }

    /// One op's IOs, bytes and merged latencies over every job.
    fn merged(results: &[JobResult], pick: fn(&JobResult) -> &OpResult) -> (u64, u64, StageReport) {
        let mut latency = pick(&results[0]).latency_ns.clone();
        latency.reset();
        for result in results {
            // Every histogram has the same bounds: adding cannot fail.
            let _ = latency.add(&pick(result).latency_ns);
        }
        let ios = results.iter().map(|result| pick(result).ios).sum();
        let bytes = results.iter().map(|result| pick(result).bytes).sum();
        (
            ios,
            bytes,
            StageReport::from_histogram("client", &latency, NS_PER_SECOND),
        )
    }

    fn report(
        args: &Args,
        uri: &NbdUri,
        export: &Export,
        size: u64,
        results: &[JobResult],
    ) -> Result<()> {
        let jobs = results.len();
        let ios: u64 = results.iter().map(|result| result.ios).sum();
        let bytes: u64 = results.iter().map(|result| result.bytes).sum();
        let errors: u64 = results.iter().map(|result| result.errors).sum();
        let reconnects: u64 = results.iter().map(|result| result.reconnects).sum();
        let lost_ios: u64 = results.iter().map(|result| result.lost_ios).sum();
        let outage_ns: u64 = results.iter().map(|result| result.outage_ns).sum();
        let cpu_ns: u64 = results.iter().map(|result| result.cpu_ns).sum();
        let elapsed_s = results
            .iter()
            .map(|result| result.elapsed_ns)
            .max()
            .unwrap_or(1)
            .max(1) as f64
            / 1e9;
        let iops = ios as f64 / elapsed_s;
        let iops_per_job = iops / jobs as f64;
        let wall_ns_per_io = 1e9 / iops_per_job.max(f64::MIN_POSITIVE);
        let cpu_ns_per_io = cpu_ns as f64 / ios.max(1) as f64;
        // Per op (those the pattern issues), then every op together.
        let mut ops: Vec<(&str, u64, u64, StageReport)> = Vec::new();
        for (name, pick) in [
            (
                "read",
                (|result: &JobResult| &result.read) as fn(&JobResult) -> &OpResult,
            ),
            ("write", |result: &JobResult| &result.write),
        ] {
            let (op_ios, op_bytes, latency) = merged(results, pick);
            if op_ios > 0 {
                ops.push((name, op_ios, op_bytes, latency));
            }
        }
        let overall = {
            let mut latency = results[0].read.latency_ns.clone();
            latency.reset();
            for result in results {
                let _ = latency.add(&result.read.latency_ns);
                let _ = latency.add(&result.write.latency_ns);
            }
            StageReport::from_histogram("client", &latency, NS_PER_SECOND)
        };
        if args.json {
            let ops_json: serde_json::Map<String, serde_json::Value> = ops
                .iter()
                .map(|(name, op_ios, op_bytes, latency)| {
                    let value = serde_json::json!({
                        "ios": op_ios, "iops": *op_ios as f64 / elapsed_s,
                        "bw_bytes": *op_bytes as f64 / elapsed_s, "lat_ns": lat_json(latency),
                    });
                    (name.to_string(), value)
                })
                .collect();
            let json = serde_json::json!({
                "mode": "nbd-client",
                "target": uri.to_string(),
                "latency_source": "client",
                "export": export,
                "rw": args.rw, "bs": args.bs, "iodepth": args.iodepth, "numjobs": jobs,
                "size": size, "rwmixread": args.rwmixread,
                "runtime_s": elapsed_s,
                "ios": ios, "errors": errors,
                "reconnects": reconnects, "lost_ios": lost_ios, "outage_ns": outage_ns,
                "iops": iops, "iops_per_job": iops_per_job, "bw_bytes": bytes as f64 / elapsed_s,
                "ns_per_io_wall": wall_ns_per_io, "cpu_ns_per_io": cpu_ns_per_io,
                "lat_ns": lat_json(&overall),
                "ops": ops_json,
                "per_job": results,
            });
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            println!(
                "fathom-bench: client path: NBD to {uri} (latencies measured by the client; the \
                 node's own per-stage breakdown is in fathom-stat)"
            );
            println!(
                "fathom-bench: mode=nbd-client rw={:?} bs={} iodepth={} numjobs={jobs} size={} \
                 runtime={elapsed_s:.1}s",
                args.rw,
                args.bs,
                args.iodepth,
                bytes_text(size)
            );
            for (name, op_ios, op_bytes, latency) in &ops {
                println!(
                    "  {name}: IOPS={}, BW={:.1}MiB/s, ios={op_ios}",
                    quantity(*op_ios as f64 / elapsed_s),
                    *op_bytes as f64 / elapsed_s / (1 << 20) as f64,
                );
                println!(
                    "    lat (client): mean={}, p50={}, p90={}, p99={}, p99.9={}, max={}",
                    duration(latency.mean_ns),
                    duration(latency.p50_ns),
                    duration(latency.p90_ns),
                    duration(latency.p99_ns),
                    duration(latency.p999_ns),
                    duration(latency.max_ns)
                );
            }
            println!(
                "  all: IOPS={}, BW={:.1}MiB/s, ios={ios}, errors={errors}",
                quantity(iops),
                bytes as f64 / elapsed_s / (1 << 20) as f64
            );
            println!(
                "  per job: IOPS={}, {wall_ns_per_io:.1} ns/IO (wall), {cpu_ns_per_io:.1} ns/IO \
                 (client CPU time)",
                quantity(iops_per_job),
            );
            for result in results {
                println!(
                    "    job {}: {} IOPS, {:.1} ns CPU/IO, bytes {}..{} of {}{}",
                    result.job,
                    quantity(result.ios as f64 / (result.elapsed_ns.max(1) as f64 / 1e9)),
                    result.cpu_ns as f64 / result.ios.max(1) as f64,
                    result.offset_bytes,
                    result.offset_bytes + result.span_bytes,
                    export.name,
                    match &result.first_error {
                        Some(error) => format!(", {} errors, first: {error}", result.errors),
                        None => String::new(),
                    }
                );
            }
            if reconnects > 0 {
                println!(
                    "  connection lost {reconnects} time(s) and opened again: {lost_ios} IOs in flight then (outcome unknown), {} without a connection; first loss: {}",
                    duration(outage_ns as f64),
                    results
                        .iter()
                        .find_map(|result| result.first_loss.as_deref())
                        .unwrap_or("-")
                );
            }
        }
        if errors > 0 {
            bail!("{errors} IOs failed: the server answered them with errors");
        }
        Ok(())
    }

    /// The --verify run: every job writes its region once, reads it back, compares.
    fn verify(
        args: &Args,
        uri: &NbdUri,
        connections: Vec<Connection>,
        block_size: u32,
        size: u64,
    ) -> Result<()> {
        let handles: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(job, connection)| {
                let spec = VerifySpec {
                    job,
                    pattern: args.rw,
                    block_size,
                    iodepth: args.iodepth,
                    offset_bytes: job as u64 * size,
                    span_bytes: size,
                    read_only: args.verify_only,
                };
                std::thread::Builder::new()
                    .name(format!("nbd-verify{job}"))
                    .spawn(move || nbd_client::run_verify(connection, &spec))
            })
            .collect::<Result<_, _>>()
            .context("starting a job's thread")?;
        let mut results: Vec<VerifyJobResult> = Vec::with_capacity(handles.len());
        for (job, handle) in handles.into_iter().enumerate() {
            let result = handle
                .join()
                .map_err(|_| anyhow::anyhow!("the verify thread of job {job} panicked"))?;
            results.push(result.with_context(|| format!("job {job}"))?);
        }
        let mismatches: u64 = results.iter().map(|result| result.mismatches).sum();
        let errors: u64 = results.iter().map(|result| result.errors).sum();
        if args.json {
            let json = serde_json::json!({
                "mode": "nbd-client", "target": uri.to_string(),
                "verify": results, "mismatches": mismatches, "errors": errors,
            });
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            println!("fathom-bench: client path: NBD to {uri}");
            for result in &results {
                println!(
                    "verify job {} (bytes {}..{}): wrote {} extents of {block_size} B, read {} \
                     back: {} mismatches, {} IO errors{}{}",
                    result.job,
                    result.offset_bytes,
                    result.offset_bytes + result.span_bytes,
                    result.blocks_written,
                    result.blocks_read,
                    result.mismatches,
                    result.errors,
                    if result.first_mismatches.is_empty() {
                        String::new()
                    } else {
                        format!(" (first at offsets {:?})", result.first_mismatches)
                    },
                    match &result.first_error {
                        Some(error) => format!(" (first error: {error})"),
                        None => String::new(),
                    }
                );
            }
        }
        if mismatches + errors > 0 {
            bail!(
                "verify failed: {mismatches} blocks read back differently from what was \
                 written, {errors} IO errors"
            );
        }
        Ok(())
    }

    /// A byte count in the largest binary unit that divides it.
    fn bytes_text(bytes: u64) -> String {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
                return format!("{}{unit}", bytes >> shift);
            }
        }
        format!("{bytes}B")
    }
}

/// Removes the benchmark's stats and trace regions: they are its own (a node's stay for
/// readers after it stops).
fn remove_regions(config: &Config) {
    if config.telemetry.enabled {
        let _ = std::fs::remove_file(config.region_path());
        let _ = std::fs::remove_file(config.trace_region_path());
    }
}
