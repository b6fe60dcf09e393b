//! What one window of the node's own telemetry says of one volume: the numbers the detector,
//! the canaries and drift are fed, read from two snapshots of the stats region
//! (`fathom_telemetry::region`), a second apart.
//!
//! The region's series are per volume slot and op: the clients' `read`, `write`, `flush` and
//! `write_zeroes`, and the health probes' own `probe_read` and `probe_write` (the smoke write
//! and the canaries), which never mix with the clients'. Stages are named as the engine names
//! them: `device`, `total`, and on a primary `replicate:NODE` per replica.

use fathom_telemetry::region::{Directory, Snapshot};
use fathom_telemetry::report::{delta_histogram, merged_histogram, volume_delta};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::detector::Latency;
use crate::drift::{bucket, Shape, SIZE_BUCKETS};

/// The clients' ops, by name in the region.
const CLIENT_OPS: [&str; 4] = ["read", "write", "flush", "write_zeroes"];
/// The probes' ops, reads then writes.
pub const PROBE_OPS: [&str; 2] = ["probe_read", "probe_write"];
/// The stages a canary is judged on.
pub const PROBE_STAGES: [&str; 2] = ["device", "total"];
/// Prefix of a replica's stage on the primary.
const REPLICATE: &str = "replicate:";

/// One replica's part of a primary's window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaSignal {
    pub node: String,
    /// Writes it answered in the window.
    pub writes: u64,
    /// Their latency: sent to answered.
    pub write: Latency,
}

/// One probe series' stage over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeStage {
    /// `probe_write device`, `probe_read total`, ...
    pub name: String,
    pub count: u64,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub p99_ns: f64,
}

/// One volume over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeSignals {
    pub volume: String,
    /// The region's slot.
    pub slot: usize,
    pub seconds: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    /// Client IOs that failed.
    pub errors: u64,
    /// The clients' p99 (ns) of their `total` stage: reads, writes, and both.
    pub read_p99_ns: Option<f64>,
    pub write_p99_ns: Option<f64>,
    /// The clients' read p95 (ns): a hedged read goes to a replica once it is this late.
    pub read_p95_ns: Option<f64>,
    pub p99_ns: Option<f64>,
    /// The clients' writes on this node's own device (their `device` stage).
    pub local_write: Option<Latency>,
    /// On a primary, each replica that answered writes in the window.
    pub replicas: Vec<ReplicaSignal>,
    /// Client IOs in flight on average (completions per second times their mean latency,
    /// Little's law).
    pub depth: f64,
    /// The probes' stages ([`PROBE_STAGES`] of [`PROBE_OPS`]) that had IO.
    pub probes: Vec<ProbeStage>,
    /// The clients' IO shape, for drift.
    pub shape: Shape,
}

impl VolumeSignals {
    /// Client reads and writes completed per second.
    pub fn iops(&self) -> f64 {
        self.read_iops + self.write_iops
    }
}

/// The signals of the volume in region slot `slot` from `from` to `to`; `None` when the slot
/// holds no volume, or changed hands in between (its counters then start a new series).
pub fn volume_signals(
    directory: &Directory,
    from: &Snapshot,
    to: &Snapshot,
    slot: usize,
) -> Option<VolumeSignals> {
    let entry = directory
        .volumes
        .get(slot)
        .filter(|entry| entry.is_live())?;
    let generation = to.volume_generation(slot);
    if generation != entry.generation || from.volume_generation(slot) != generation {
        return None;
    }
    let hz = directory.tsc_hz.max(1) as f64;
    let seconds = (to.taken_ticks.saturating_sub(from.taken_ticks) as f64 / hz).max(1e-9);
    let op = |name: &str| directory.ops.iter().position(|op| op == name);
    let stage = |name: &str| directory.stages.iter().position(|stage| stage == name);
    let ns = |ticks: u64| ticks as f64 * 1e9 / hz;
    let at = |histogram: &Histogram<u64>, quantile: f64| {
        (!histogram.is_empty()).then(|| ns(histogram.value_at_quantile(quantile)))
    };
    let p99 = |histogram: &Histogram<u64>| at(histogram, 0.99);
    let latency = |histogram: &Histogram<u64>| {
        (!histogram.is_empty()).then(|| Latency {
            p50_ns: ns(histogram.value_at_quantile(0.5)),
            p99_ns: ns(histogram.value_at_quantile(0.99)),
        })
    };
    let (read, write) = (op("read"), op("write"));
    let counters = |op: Option<usize>| op.map(|op| volume_delta(from, to, slot, op));
    let (reads, writes) = (
        counters(read).unwrap_or_default(),
        counters(write).unwrap_or_default(),
    );
    let errors = CLIENT_OPS
        .iter()
        .filter_map(|name| counters(op(name)))
        .map(|counters| counters.errors)
        .sum();
    let histogram = |ops: &[Option<usize>], stage: Option<usize>| {
        let ops: Vec<usize> = ops.iter().flatten().copied().collect();
        stage.map(|stage| merged_histogram(directory, from, to, &[slot], &ops, stage))
    };
    let total = stage("total");
    let read_total = histogram(&[read], total);
    let write_total = histogram(&[write], total);
    let both_total = histogram(&[read, write], total);
    let local_write = histogram(&[write], stage("device"));
    let replicas = directory
        .stages
        .iter()
        .enumerate()
        .filter_map(|(index, name)| Some((index, name.strip_prefix(REPLICATE)?)))
        .filter_map(|(index, node)| {
            let histogram = delta_histogram(directory, from, to, slot, write?, index);
            Some(ReplicaSignal {
                node: node.to_string(),
                writes: histogram.len(),
                write: latency(&histogram)?,
            })
        })
        .collect();
    let mean_ns = both_total
        .as_ref()
        .filter(|histogram| !histogram.is_empty())
        .map_or(0.0, |histogram| ns(1) * histogram.mean());
    let (read_iops, write_iops) = (reads.ios as f64 / seconds, writes.ios as f64 / seconds);
    let mut sizes = [0u64; SIZE_BUCKETS];
    for counters in [reads, writes] {
        if counters.ios > 0 {
            sizes[bucket(counters.bytes / counters.ios)] += counters.ios;
        }
    }
    let shape = Shape {
        read_fraction: match reads.ios + writes.ios {
            0 => 0.0,
            all => reads.ios as f64 / all as f64,
        },
        sizes,
        depth: (read_iops + write_iops) * mean_ns / 1e9,
    };
    let mut probes = Vec::new();
    for probe_op in PROBE_OPS {
        for probe_stage in PROBE_STAGES {
            if let Some(histogram) = histogram(&[op(probe_op)], stage(probe_stage)) {
                if !histogram.is_empty() {
                    probes.push(ProbeStage {
                        name: format!("{probe_op} {probe_stage}"),
                        count: histogram.len(),
                        p50_ns: ns(histogram.value_at_quantile(0.5)),
                        p90_ns: ns(histogram.value_at_quantile(0.9)),
                        p99_ns: ns(histogram.value_at_quantile(0.99)),
                    });
                }
            }
        }
    }
    Some(VolumeSignals {
        volume: entry.name.clone(),
        slot,
        seconds,
        read_iops,
        write_iops,
        read_bytes_per_s: reads.bytes as f64 / seconds,
        write_bytes_per_s: writes.bytes as f64 / seconds,
        errors,
        read_p99_ns: read_total.as_ref().and_then(p99),
        read_p95_ns: read_total
            .as_ref()
            .and_then(|histogram| at(histogram, 0.95)),
        write_p99_ns: write_total.as_ref().and_then(p99),
        p99_ns: both_total.as_ref().and_then(p99),
        local_write: local_write.as_ref().and_then(latency),
        replicas,
        depth: shape.depth,
        probes,
        shape,
    })
}

/// A device queue's idle time over the window, percent (as iostat's 100 - %util).
pub fn queue_idle_pct(from: &Snapshot, to: &Snapshot, queue: usize) -> f64 {
    let span = to.taken_ticks.saturating_sub(from.taken_ticks).max(1) as f64;
    let busy = to
        .queue_busy_ticks(queue)
        .saturating_sub(from.queue_busy_ticks(queue)) as f64;
    (100.0 * (1.0 - busy / span)).clamp(0.0, 100.0)
}

/// A lower bound of the age of the oldest command in flight on a device queue, from its
/// submitted and completed counts alone: when fewer commands have completed by now than had
/// been submitted at some earlier moment, one of those is still in flight. Kept per queue, a
/// sample per window; nothing on the IO path.
#[derive(Debug, Clone, Default)]
pub struct OldestOp {
    /// (ns since any fixed origin, submitted by then), oldest first.
    history: std::collections::VecDeque<(u64, u64)>,
}

impl OldestOp {
    /// Samples kept: the fail-safe's horizon in windows, with room.
    const SAMPLES: usize = 64;

    /// Adds the sample at `now_ns` and returns the bound (ns; 0: nothing provably old).
    pub fn observe(&mut self, now_ns: u64, submitted: u64, completed: u64) -> u64 {
        if self.history.len() == Self::SAMPLES {
            self.history.pop_front();
        }
        self.history.push_back((now_ns, submitted));
        self.history
            .iter()
            .find(|(_, submitted_then)| completed < *submitted_then)
            .map_or(0, |(then, _)| now_ns.saturating_sub(*then))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_whose_completions_stop_shows_its_oldest_op_growing() {
        let mut oldest = OldestOp::default();
        let second = 1_000_000_000;
        // Commands come and go: nothing is provably old.
        assert_eq!(oldest.observe(0, 10, 10), 0);
        assert_eq!(oldest.observe(second, 110, 105), 0);
        // Completions stop at 105 while 5 were in flight: the ones submitted before the
        // sample at 1 s (110 of them) cannot all have completed.
        assert_eq!(oldest.observe(2 * second, 120, 105), second);
        assert_eq!(oldest.observe(7 * second, 120, 105), 6 * second);
        // They complete: nothing old any more.
        assert_eq!(oldest.observe(8 * second, 120, 120), 0);
    }
}
