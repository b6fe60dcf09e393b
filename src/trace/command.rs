//! `fathom-stat trace`: follows a node's trace rings and shows or exports what they hold.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fathom_telemetry::trace::{Start, TraceDirectory, TraceId, TraceRecord};

use super::ctf::CtfWriter;
use super::follow::{TraceEvent, TraceFollower};
use super::otlp::{export_request, OtlpFile, OtlpSender};
use super::view;

/// What to do, as the command line says.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The trace region.
    pub region: PathBuf,
    /// Where the first node's reading starts.
    pub start: Start,
    /// Stop after this long (following), or read for this long (`--slowest`, `--show`).
    pub duration: Option<Duration>,
    /// Stop after this many records.
    pub count: Option<u64>,
    pub json: bool,
    /// No line per IO (exports and the summary only).
    pub quiet: bool,
    pub ctf: Option<PathBuf>,
    pub otlp: Option<String>,
    pub otlp_file: Option<PathBuf>,
    /// Waterfalls of the N slowest IOs read.
    pub slowest: Option<usize>,
    /// The waterfall of this trace.
    pub show: Option<TraceId>,
    /// Characters of the waterfall's time axis.
    pub width: usize,
}

/// How often an idle follower looks at the rings.
const POLL_PERIOD: Duration = Duration::from_millis(50);
/// How often a live CTF trace's partial packets are written out.
const CTF_FLUSH_PERIOD: Duration = Duration::from_secs(1);
/// Most records per OTLP request.
const OTLP_BATCH: usize = 512;

/// Where the exports go, per node followed (a restarted node is a new CTF trace).
struct Exports {
    ctf_root: Option<PathBuf>,
    ctf: Option<(CtfWriter, PathBuf)>,
    otlp: Option<OtlpSender>,
    otlp_file: Option<OtlpFile>,
    /// Records the collector refused or could not be given.
    otlp_dropped: u64,
    otlp_sent: u64,
    ctf_events: u64,
    ctf_traces: Vec<PathBuf>,
    ctf_flushed: Instant,
}

impl Exports {
    fn new(options: &TraceOptions) -> Result<Self> {
        if let Some(dir) = &options.ctf {
            if dir.exists()
                && std::fs::read_dir(dir)
                    .with_context(|| format!("listing {}", dir.display()))?
                    .next()
                    .is_some()
            {
                bail!(
                    "{} is not empty: --ctf writes a new trace directory (one CTF trace per node run inside it); give a new or empty directory",
                    dir.display()
                );
            }
        }
        Ok(Self {
            ctf_root: options.ctf.clone(),
            ctf: None,
            otlp: options
                .otlp
                .as_deref()
                .map(OtlpSender::new)
                .transpose()
                .context("--otlp")?,
            otlp_file: options
                .otlp_file
                .as_deref()
                .map(OtlpFile::create)
                .transpose()
                .context("--otlp-file")?,
            otlp_dropped: 0,
            otlp_sent: 0,
            ctf_events: 0,
            ctf_traces: Vec::new(),
            ctf_flushed: Instant::now(),
        })
    }

    /// A node's region was opened: its records go into a CTF trace of their own.
    fn node(&mut self, directory: &TraceDirectory) -> Result<()> {
        self.finish_ctf()?;
        if let Some(root) = &self.ctf_root {
            let dir = root.join(format!("{}-{}", directory.node_id, directory.writer_pid));
            let writer = CtfWriter::create(&dir, directory)
                .with_context(|| format!("--ctf: starting a trace in {}", dir.display()))?;
            self.ctf_traces.push(dir.clone());
            self.ctf = Some((writer, dir));
        }
        Ok(())
    }

    fn write(
        &mut self,
        directory: &TraceDirectory,
        records: &[(usize, TraceRecord)],
    ) -> Result<()> {
        if let Some((writer, dir)) = self.ctf.as_mut() {
            writer.follow(directory);
            for (ring, record) in records {
                writer
                    .write(*ring, record)
                    .with_context(|| format!("--ctf: writing to {}", dir.display()))?;
            }
            // Whole packets go out when full; a partial one at most once a second, so that
            // babeltrace2 can read a live trace without one small packet per poll.
            if self.ctf_flushed.elapsed() >= CTF_FLUSH_PERIOD {
                writer
                    .flush()
                    .with_context(|| format!("--ctf: writing to {}", dir.display()))?;
                self.ctf_flushed = Instant::now();
            }
            self.ctf_events += records.len() as u64;
        }
        for chunk in records.chunks(OTLP_BATCH) {
            let request = export_request(directory, chunk);
            if let Some(file) = self.otlp_file.as_mut() {
                file.write(&request).context("--otlp-file")?;
            }
            if let Some(sender) = &self.otlp {
                match sender.send(&request) {
                    Ok(()) => self.otlp_sent += chunk.len() as u64,
                    Err(error) => {
                        // The collector being away loses its records, not the others.
                        if self.otlp_dropped == 0 {
                            eprintln!("fathom-stat: --otlp: {error:#}; records are dropped until it answers");
                        }
                        self.otlp_dropped += chunk.len() as u64;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_ctf(&mut self) -> Result<()> {
        if let Some((writer, dir)) = self.ctf.take() {
            writer
                .finish()
                .with_context(|| format!("--ctf: finishing {}", dir.display()))?;
        }
        Ok(())
    }

    fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.ctf_traces.is_empty() {
            lines.push(format!(
                "CTF: {} events in {} (read it with `babeltrace2 {}`)",
                self.ctf_events,
                self.ctf_traces
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.ctf_root.as_deref().unwrap_or(Path::new(".")).display()
            ));
        }
        if let Some(sender) = &self.otlp {
            lines.push(format!(
                "OTLP: {} IOs sent to {}, {} dropped",
                self.otlp_sent,
                sender.url(),
                self.otlp_dropped
            ));
        }
        if let Some(file) = &self.otlp_file {
            lines.push(format!("OTLP JSON lines: {}", file.path().display()));
        }
        lines
    }
}

/// Runs the command until its duration or count is reached, or until interrupted.
pub fn run(options: &TraceOptions) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    // --slowest and --show look at what the rings hold (and what comes during --duration).
    let picking = options.slowest.is_some() || options.show.is_some();
    let start = if picking && options.duration.is_none() {
        Start::Oldest
    } else {
        options.start
    };
    let mut follower = TraceFollower::new(&options.region, start)
        .with_context(|| format!("reading {}", options.region.display()))?;
    let mut exports = Exports::new(options)?;
    let mut kept: Vec<(TraceDirectory, TraceRecord)> = Vec::new();
    let (mut seen, mut lost, mut damaged) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut header_printed = false;
    if let Some(directory) = follower.directory().cloned() {
        note_node(&directory, follower.path());
        exports.node(&directory)?;
    }
    loop {
        let event = follower.poll();
        match event {
            TraceEvent::Batch(batch, directory) => {
                lost += batch.lost;
                damaged += batch.damaged;
                if batch.lost > 0 {
                    eprintln!(
                        "fathom-stat: lost {} records: the rings overwrote them before they were read (raise [telemetry.trace] ring, or trace fewer IOs)",
                        batch.lost
                    );
                }
                if batch.damaged > 0 {
                    eprintln!(
                        "fathom-stat: {} records could not be decoded (a damaged region); they are skipped",
                        batch.damaged
                    );
                }
                let mut records = batch.records;
                if let Some(count) = options.count {
                    records.truncate(count.saturating_sub(seen) as usize);
                }
                // Rings are read one after the other: show them in time order.
                records.sort_by_key(|(_, record)| record.stamps.iter().copied().max());
                seen += records.len() as u64;
                exports.write(&directory, &records)?;
                if picking {
                    kept.extend(
                        records
                            .iter()
                            .filter(|(_, record)| {
                                options.show.is_none_or(|id| record.trace_id == id)
                            })
                            .map(|(_, record)| (directory.clone(), *record)),
                    );
                    if let Some(slowest) = options.slowest {
                        keep_slowest(&mut kept, slowest);
                    }
                } else if !options.quiet {
                    for (_, record) in &records {
                        if options.json {
                            writeln!(stdout, "{}", view::json(&directory, record))?;
                        } else {
                            if !header_printed {
                                writeln!(stdout, "{}", view::LINE_HEADER)?;
                                header_printed = true;
                            }
                            writeln!(stdout, "{}", view::line(&directory, record))?;
                        }
                    }
                    stdout.flush()?;
                }
            }
            TraceEvent::Opened(directory) => {
                note_node(&directory, follower.path());
                exports.node(&directory)?;
            }
            TraceEvent::Note(note) => eprintln!("fathom-stat: {note}"),
            TraceEvent::Idle => {
                // Without a duration, --slowest and --show look at what the rings hold now.
                if picking && options.duration.is_none() {
                    break;
                }
                std::thread::sleep(POLL_PERIOD);
            }
        }
        let done = stop.load(Ordering::Relaxed)
            || options.count.is_some_and(|count| seen >= count)
            || options
                .duration
                .is_some_and(|duration| started.elapsed() >= duration)
            || (picking
                && options.show.is_some()
                && !kept.is_empty()
                && options.duration.is_none());
        if done {
            break;
        }
    }
    exports.finish_ctf()?;
    if picking {
        show_picked(options, &kept, &mut stdout)?;
    }
    let mut summary = vec![format!(
        "{seen} traced IOs read, {lost} lost, {damaged} damaged"
    )];
    summary.extend(exports.summary());
    for line in summary {
        eprintln!("fathom-stat: {line}");
    }
    if let (Some(id), true) = (options.show, kept.is_empty()) {
        let holds = follower.directory().map_or_else(String::new, |directory| {
            format!(
                " (its rings keep the newest {} records of each of {} cores)",
                directory.capacity,
                directory.cores.len()
            )
        });
        bail!(
            "trace {id} is not in {}{holds}: it was overwritten, or traced on another node; add --duration to wait for it",
            options.region.display()
        );
    }
    Ok(())
}

/// Keeps the `n` slowest records, slowest first.
fn keep_slowest(kept: &mut Vec<(TraceDirectory, TraceRecord)>, n: usize) {
    kept.sort_by_key(|(directory, record)| std::cmp::Reverse(directory.ns(record.total_ticks())));
    kept.truncate(n);
}

fn show_picked(
    options: &TraceOptions,
    kept: &[(TraceDirectory, TraceRecord)],
    out: &mut impl Write,
) -> Result<()> {
    for (index, (directory, record)) in kept.iter().enumerate() {
        if options.json {
            writeln!(out, "{}", view::json(directory, record))?;
            continue;
        }
        if index > 0 {
            writeln!(out)?;
        }
        write!(out, "{}", view::waterfall(directory, record, options.width))?;
    }
    Ok(())
}

fn note_node(directory: &TraceDirectory, path: &Path) {
    eprintln!(
        "fathom-stat: tracing node {} (pid {}), {} rings of {} records, {} volumes, region {}",
        directory.node_id,
        directory.writer_pid,
        directory.cores.len(),
        directory.capacity,
        directory.live_volumes().count(),
        path.display()
    );
}
