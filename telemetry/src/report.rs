//! What a reader makes of snapshots: per volume, op and stage, the IOs of an interval with
//! their rate, peak per-second rate and latency percentiles; per queue, busy and idle time.
//!
//! Histograms are rebuilt exactly as `hdrhistogram` histograms (each counter's lowest value
//! recorded with the counter's delta), so percentiles, mean and max follow HdrHistogram's
//! definitions; values are converted from clock ticks to nanoseconds with the region's clock
//! frequency.
//!
//! Deltas are taken per volume slot; when a slot's generation differs between the two
//! snapshots it was set or cleared in between, and the later snapshot's counters are a new
//! series: its delta is its whole value.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::region::{Directory, Snapshot, VolumeCounters};

/// Latency of one stage over an interval, in nanoseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageReport {
    pub stage: String,
    pub count: u64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
    pub max_ns: f64,
}

/// One volume and op over an interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VolumeOpReport {
    pub volume: String,
    pub core: u32,
    pub op: String,
    pub ios: u64,
    pub iops: f64,
    /// The highest one-second (or sub-sample) rate within the interval.
    pub peak_iops: f64,
    pub bytes: u64,
    pub bw_bytes: f64,
    pub peak_bw_bytes: f64,
    pub errors: u64,
    pub stages: Vec<StageReport>,
}

/// One queue (a reactor's queue on a device) over an interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueReport {
    pub device: String,
    pub core: u32,
    pub submitted: u64,
    pub completed: u64,
    /// Time with at least one command outstanding, as iostat's %util.
    pub busy_pct: f64,
    pub idle_pct: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntervalReport {
    pub node: String,
    pub interval_s: f64,
    pub volumes: Vec<VolumeOpReport>,
    pub queues: Vec<QueueReport>,
}

/// The counters of `op` on volume slot `volume` between two snapshots (all of `to`'s when
/// the slot holds another volume than at `from`).
pub fn volume_delta(from: &Snapshot, to: &Snapshot, volume: usize, op: usize) -> VolumeCounters {
    let after = to.volume(volume, op);
    if from.volume_generation(volume) != to.volume_generation(volume) {
        return after;
    }
    let before = from.volume(volume, op);
    VolumeCounters {
        ios: after.ios.saturating_sub(before.ios),
        bytes: after.bytes.saturating_sub(before.bytes),
        errors: after.errors.saturating_sub(before.errors),
    }
}

/// The histogram of one (volume slot, op, stage) between two snapshots, in ticks (all of
/// `to`'s when the slot holds another volume than at `from`).
pub fn delta_histogram(
    directory: &Directory,
    from: &Snapshot,
    to: &Snapshot,
    volume: usize,
    op: usize,
    stage: usize,
) -> Histogram<u64> {
    let layout = directory.histogram;
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, layout.highest(), layout.significant_figures())
            .expect("the region's layout is valid for hdrhistogram");
    let after = to.histogram(volume, op, stage);
    let new_series = from.volume_generation(volume) != to.volume_generation(volume);
    let before = from.histogram(volume, op, stage);
    for (index, &after) in after.iter().enumerate() {
        let delta = if new_series {
            after
        } else {
            after.saturating_sub(before[index])
        };
        if delta > 0 {
            // Within the layout's range by construction; record_n only fails beyond it.
            let _ = histogram.record_n(layout.value_at(index), delta);
        }
    }
    histogram
}

impl StageReport {
    /// Count, mean, percentiles and max of `histogram` (in ticks of a `hz` clock), in ns.
    pub fn from_histogram(stage: &str, histogram: &Histogram<u64>, hz: u64) -> Self {
        let ns = |ticks: u64| ticks as f64 * 1e9 / hz as f64;
        let quantile = |q: f64| ns(histogram.value_at_quantile(q));
        let empty = histogram.is_empty();
        StageReport {
            stage: stage.to_string(),
            count: histogram.len(),
            mean_ns: if empty { 0.0 } else { ns(1) * histogram.mean() },
            p50_ns: quantile(0.5),
            p90_ns: quantile(0.9),
            p99_ns: quantile(0.99),
            p999_ns: quantile(0.999),
            max_ns: if empty { 0.0 } else { ns(histogram.max()) },
        }
    }
}

/// One stage's histogram between two snapshots, merged over volume slots `volumes` and `ops`
/// (in ticks).
pub fn merged_histogram(
    directory: &Directory,
    from: &Snapshot,
    to: &Snapshot,
    volumes: &[usize],
    ops: &[usize],
    stage: usize,
) -> Histogram<u64> {
    let layout = directory.histogram;
    let mut merged =
        Histogram::<u64>::new_with_bounds(1, layout.highest(), layout.significant_figures())
            .expect("valid layout");
    for &volume in volumes {
        for &op in ops {
            // Same bounds on both sides: adding cannot fail.
            let _ = merged.add(delta_histogram(directory, from, to, volume, op, stage));
        }
    }
    merged
}

/// The report for the interval from `samples[0]` to the last sample; the samples in between
/// give the peak rates. Rows with no IO are left out unless `all`. Only the directory's
/// live volumes are reported, each only if the last sample read its slot at the generation
/// the directory knows (else the slot changed since, and the next report has it).
pub fn interval(directory: &Directory, samples: &[Snapshot], all: bool) -> IntervalReport {
    let first = &samples[0];
    let last = &samples[samples.len() - 1];
    let ticks_to_s = |ticks: u64| ticks as f64 / directory.tsc_hz as f64;
    let seconds = ticks_to_s(last.taken_ticks.saturating_sub(first.taken_ticks)).max(1e-9);
    let mut volumes = Vec::new();
    for (volume_index, volume) in directory.live_volumes() {
        if last.volume_generation(volume_index) != volume.generation {
            continue;
        }
        for (op_index, op) in directory.ops.iter().enumerate() {
            let delta =
                |from: &Snapshot, to: &Snapshot| volume_delta(from, to, volume_index, op_index);
            let VolumeCounters { ios, bytes, errors } = delta(first, last);
            if ios + errors == 0 && !all {
                continue;
            }
            let (mut peak_iops, mut peak_bw) = (0f64, 0f64);
            for pair in samples.windows(2) {
                let span = ticks_to_s(pair[1].taken_ticks.saturating_sub(pair[0].taken_ticks));
                if span > 0.0 {
                    let rates = delta(&pair[0], &pair[1]);
                    peak_iops = peak_iops.max(rates.ios as f64 / span);
                    peak_bw = peak_bw.max(rates.bytes as f64 / span);
                }
            }
            let stages = directory
                .stages
                .iter()
                .enumerate()
                .map(|(stage_index, stage)| {
                    let histogram = delta_histogram(
                        directory,
                        first,
                        last,
                        volume_index,
                        op_index,
                        stage_index,
                    );
                    StageReport::from_histogram(stage, &histogram, directory.tsc_hz)
                })
                .collect();
            volumes.push(VolumeOpReport {
                volume: volume.name.clone(),
                core: directory
                    .cores
                    .get(volume.core_index as usize)
                    .copied()
                    .unwrap_or(u32::MAX),
                op: op.clone(),
                ios,
                iops: ios as f64 / seconds,
                peak_iops: if samples.len() > 2 {
                    peak_iops
                } else {
                    ios as f64 / seconds
                },
                bytes,
                bw_bytes: bytes as f64 / seconds,
                peak_bw_bytes: if samples.len() > 2 {
                    peak_bw
                } else {
                    bytes as f64 / seconds
                },
                errors,
                stages,
            });
        }
    }
    let queues = directory
        .queues
        .iter()
        .enumerate()
        .map(|(index, queue)| {
            let busy = last
                .queue_busy_ticks(index)
                .saturating_sub(first.queue_busy_ticks(index));
            let busy_pct = (100.0 * ticks_to_s(busy) / seconds).clamp(0.0, 100.0);
            let (from, to) = (first.queue(index), last.queue(index));
            QueueReport {
                device: queue.device.clone(),
                core: directory
                    .cores
                    .get(queue.core_index as usize)
                    .copied()
                    .unwrap_or(u32::MAX),
                submitted: to.submitted.saturating_sub(from.submitted),
                completed: to.completed.saturating_sub(from.completed),
                busy_pct,
                idle_pct: 100.0 - busy_pct,
            }
        })
        .collect();
    IntervalReport {
        node: directory.node_id.clone(),
        interval_s: seconds,
        volumes,
        queues,
    }
}
