//! The live stats reader behind `fathom-stat`: follows a node's shared-memory region across
//! intervals, node stops and restarts, volumes created and deleted while it runs, and turns
//! snapshots into reports.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fathom_telemetry::region::{RegionError, RegionReader, Snapshot, WriterState};
use fathom_telemetry::report::{interval, IntervalReport};
use fathom_telemetry::Clock;

/// What the follower saw when asked for the next interval.
pub enum Observation {
    /// A report over the interval (with the sub-samples it was built from).
    Report {
        report: IntervalReport,
        samples: Vec<Snapshot>,
    },
    /// Something a user should know (node stopped, restarted, missing); no report this time.
    Note(String),
}

/// Follows the region at a path.
pub struct Follower {
    path: PathBuf,
    reader: Option<(RegionReader, Clock, u64)>,
    baseline: Option<Snapshot>,
    waiting_noted: bool,
    last_state: Option<String>,
}

impl Follower {
    /// Opens the region now; a region that exists but is not understood is an error (wrong
    /// path, wrong version), a missing one is waited for.
    pub fn new(path: &Path) -> Result<Self, RegionError> {
        let mut follower = Self {
            path: path.into(),
            reader: None,
            baseline: None,
            waiting_noted: false,
            last_state: None,
        };
        match follower.open() {
            Ok(()) => {}
            Err(RegionError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(follower)
    }

    fn open(&mut self) -> Result<(), RegionError> {
        let reader = RegionReader::open(&self.path)?;
        let inode = std::fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0);
        let directory = reader.directory();
        let clock = Clock::recorded(directory.clock_source, directory.tsc_hz);
        self.baseline = Some(reader.snapshot(clock.now()));
        self.reader = Some((reader, clock, inode));
        Ok(())
    }

    pub fn reader(&self) -> Option<&RegionReader> {
        self.reader.as_ref().map(|(reader, _, _)| reader)
    }

    /// Waits one interval (sampling every `sub_interval` for peak rates) and reports it.
    pub fn next(&mut self, every: Duration, sub_interval: Duration, all: bool) -> Observation {
        let started = Instant::now();
        let Some(mut samples) = self.begin() else {
            std::thread::sleep(every);
            return self.try_open();
        };
        loop {
            let left = every.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(sub_interval));
            samples.extend(self.sample());
        }
        self.finish(samples, all)
    }

    /// The samples of a new interval: the baseline. `None` while no node is there.
    pub fn begin(&self) -> Option<Vec<Snapshot>> {
        self.baseline.clone().map(|baseline| vec![baseline])
    }

    /// A snapshot now, if a region is open.
    pub fn sample(&self) -> Option<Snapshot> {
        self.reader
            .as_ref()
            .map(|(reader, clock, _)| reader.snapshot(clock.now()))
    }

    /// Reports the interval the samples span, unless the node changed meanwhile. The report
    /// names the volumes the node has now: one created during the interval appears (counted
    /// from its creation), one deleted is gone.
    pub fn finish(&mut self, samples: Vec<Snapshot>, all: bool) -> Observation {
        if let Some(note) = self.check_writer() {
            return Observation::Note(note);
        }
        let (reader, _, _) = self.reader.as_mut().expect("a reader when samples exist");
        if let Err(error) = reader.refresh() {
            return Observation::Note(format!("cannot read {}: {error}", self.path.display()));
        }
        let report = interval(reader.directory(), &samples, all);
        self.baseline = samples.last().cloned();
        Observation::Report { report, samples }
    }

    /// Tries to open the region of a node that was not there.
    pub fn try_open(&mut self) -> Observation {
        match self.open() {
            Ok(()) => {
                self.waiting_noted = false;
                let directory = self.reader().expect("just opened").directory();
                Observation::Note(format!(
                    "node {} is up (pid {}); reporting from the next interval",
                    directory.node_id, directory.writer_pid
                ))
            }
            Err(RegionError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                if std::mem::replace(&mut self.waiting_noted, true) {
                    Observation::Note(String::new())
                } else {
                    Observation::Note(format!(
                        "waiting for a node: no stats region at {}",
                        self.path.display()
                    ))
                }
            }
            Err(error) => {
                Observation::Note(format!("cannot read {}: {error}", self.path.display()))
            }
        }
    }

    /// Notices a replaced, removed, stopped or dead writer; reopens when a new node is there.
    fn check_writer(&mut self) -> Option<String> {
        let (reader, _, inode) = self.reader.as_ref()?;
        let directory = reader.directory();
        let current_inode = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current_inode != Some(*inode) {
            let old = (directory.node_id.clone(), directory.writer_pid);
            self.reader = None;
            self.last_state = None;
            return Some(match current_inode {
                Some(_) => match self.open() {
                    Ok(()) => {
                        let new = self.reader().expect("opened").directory();
                        format!(
                            "node {} restarted (pid {} -> {}); counting from now",
                            new.node_id, old.1, new.writer_pid
                        )
                    }
                    Err(error) => format!(
                        "node {} was replaced by a region that cannot be read: {error}",
                        old.0
                    ),
                },
                None => format!(
                    "node {} removed its stats region; waiting for it to return",
                    old.0
                ),
            });
        }
        let state = reader.snapshot(0).state;
        let alive = process_alive(directory.writer_pid);
        let description = if state == WriterState::Stopped as u32 {
            Some(format!(
                "node {} stopped cleanly (pid {}); waiting for a restart",
                directory.node_id, directory.writer_pid
            ))
        } else if !alive {
            Some(format!(
                "node {} (pid {}) exited without stopping cleanly; waiting for a restart",
                directory.node_id, directory.writer_pid
            ))
        } else {
            None
        };
        match description {
            Some(text) => {
                let repeated = self.last_state.as_deref() == Some(text.as_str());
                self.last_state = Some(text.clone());
                Some(if repeated { String::new() } else { text })
            }
            None => {
                self.last_state = None;
                None
            }
        }
    }
}

pub(crate) fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let result = unsafe { libc::kill(pid as i32, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Formats nanoseconds with a unit a human reads at a glance.
pub fn duration(ns: f64) -> String {
    if ns < 0.0 {
        // A difference (isolate's shares) can be below zero.
        return format!("-{}", duration(-ns));
    }
    if ns < 1_000.0 {
        format!("{ns:.0}ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

/// Formats a count or rate with K/M/G suffixes.
pub fn quantity(value: f64) -> String {
    if value < 10_000.0 {
        format!("{value:.0}")
    } else if value < 1_000_000.0 {
        format!("{:.1}K", value / 1e3)
    } else if value < 1_000_000_000.0 {
        format!("{:.2}M", value / 1e6)
    } else {
        format!("{:.2}G", value / 1e9)
    }
}

/// The human report: a throughput table, a latency table, a queue table.
pub fn render_table(report: &IntervalReport, stages: &[String]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let clock = chrono_free_time();
    let _ = writeln!(
        out,
        "{clock}  node {}  interval {:.2}s",
        report.node, report.interval_s
    );
    if report.volumes.is_empty() {
        let _ = writeln!(out, "  (no IO in this interval)");
    } else {
        let _ = writeln!(
            out,
            "{:<12} {:<6} {:>9} {:>9} {:>10} {:>10} {:>7}",
            "volume", "op", "IOPS", "peak/s", "MiB/s", "peak MiB/s", "errors"
        );
        for row in &report.volumes {
            let _ = writeln!(
                out,
                "{:<12} {:<6} {:>9} {:>9} {:>10.1} {:>10.1} {:>7}",
                row.volume,
                row.op,
                quantity(row.iops),
                quantity(row.peak_iops),
                row.bw_bytes / (1 << 20) as f64,
                row.peak_bw_bytes / (1 << 20) as f64,
                row.errors
            );
        }
        let _ = writeln!(
            out,
            "\n{:<12} {:<6} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "volume", "op", "stage", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        for row in &report.volumes {
            // Front-end stages (receive, reply) stay empty for IO that came in another way.
            let timed = row.stages.iter().any(|stage| stage.count > 0);
            for stage in row.stages.iter().filter(|stage| {
                (stages.is_empty() || stages.contains(&stage.stage)) && (stage.count > 0 || !timed)
            }) {
                let _ = writeln!(
                    out,
                    "{:<12} {:<6} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    row.volume,
                    row.op,
                    stage.stage,
                    quantity(stage.count as f64),
                    duration(stage.mean_ns),
                    duration(stage.p50_ns),
                    duration(stage.p90_ns),
                    duration(stage.p99_ns),
                    duration(stage.p999_ns),
                    duration(stage.max_ns)
                );
            }
        }
    }
    if !report.queues.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<12} {:>5} {:>7} {:>7} {:>10} {:>10}",
            "device", "core", "busy%", "idle%", "submitted", "completed"
        );
        for queue in &report.queues {
            let _ = writeln!(
                out,
                "{:<12} {:>5} {:>7.1} {:>7.1} {:>10} {:>10}",
                queue.device,
                queue.core,
                queue.busy_pct,
                queue.idle_pct,
                quantity(queue.submitted as f64),
                quantity(queue.completed as f64)
            );
        }
    }
    out
}

/// HH:MM:SS (UTC) without a date-time dependency.
fn chrono_free_time() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::region::{RegionSpec, StatsRegion, VolumeEntry};

    fn volume(name: &str) -> VolumeEntry {
        VolumeEntry {
            name: name.into(),
            core_index: 0,
            block_size: 4096,
            size_bytes: 1 << 30,
            generation: 0,
        }
    }

    /// The next interval's (volume, op, IOs) rows.
    fn rows(
        follower: &mut Follower,
        during: impl FnOnce(),
        all: bool,
    ) -> Vec<(String, String, u64)> {
        let mut samples = follower.begin().unwrap();
        during();
        samples.push(follower.sample().unwrap());
        match follower.finish(samples, all) {
            Observation::Report { report, .. } => report
                .volumes
                .into_iter()
                .map(|row| (row.volume, row.op, row.ios))
                .collect(),
            Observation::Note(note) => panic!("{note}"),
        }
    }

    #[test]
    fn the_live_view_shows_a_volume_created_and_drops_one_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        let spec = RegionSpec {
            node_id: "n1".into(),
            cores: vec![0],
            volumes: vec![volume("vol0")],
            spare_volumes: 1,
            ops: vec!["read".into()],
            stages: vec!["total".into()],
            queues: Vec::new(),
        };
        let region = StatsRegion::create(&path, &spec, &Clock::monotonic()).unwrap();
        let mut follower = Follower::new(&path).unwrap();
        let created = rows(
            &mut follower,
            || {
                region.set_volume(1, Some(&volume("late"))).unwrap();
                let recorder = region.series_recorder(1, 0);
                recorder.record(0, 40_000, 5);
                recorder.publish_counts(5, 5 * 4096, 0);
            },
            false,
        );
        assert_eq!(created, [("late".into(), "read".into(), 5)]);
        let deleted = rows(&mut follower, || region.set_volume(1, None).unwrap(), true);
        assert_eq!(
            deleted,
            [("vol0".into(), "read".into(), 0)],
            "idle rows shown, of live volumes only"
        );
    }
}
