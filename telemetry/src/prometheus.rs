//! The stats region in Prometheus' text exposition format (version 0.0.4).
//!
//! Metrics (all cumulative since the node started, as Prometheus expects):
//! - `fathom_io_stage_seconds` histogram {volume, op, stage}: time IOs spent in each stage,
//!   with buckets from 1 µs to 10 s;
//! - `fathom_volume_ios_total`, `fathom_volume_bytes_total`, `fathom_volume_errors_total`
//!   counters {volume, op};
//! - `fathom_queue_busy_seconds_total`, `fathom_queue_submitted_total`,
//!   `fathom_queue_completed_total` counters {device, core}: rate(busy) is the queue's
//!   utilisation, as iostat's %util;
//! - `fathom_node_start_time_seconds` gauge.
//!
//! Only series that have seen IO are written, so an idle node's page stays small; only the
//! volumes in use (a volume the node deleted is gone from the next page).

use std::fmt::Write;

use crate::region::{Directory, Snapshot, VolumeCounters, VolumeEntry};

/// Bucket bounds of `fathom_io_stage_seconds`, in seconds.
pub const BUCKETS_SECONDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Picks one of a volume's counters.
type VolumeField = fn(VolumeCounters) -> u64;
/// Formats one queue metric from a snapshot, a queue index and the clock frequency.
type QueueValue = fn(&Snapshot, usize, f64) -> String;

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `snapshot` of the region described by `directory`: the live volumes whose slots
/// the snapshot read at the generation the directory knows (a slot that changed in between
/// is left for the next scrape rather than shown under the wrong name).
pub fn render(directory: &Directory, snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let node = escape(&directory.node_id);
    let hz = directory.tsc_hz as f64;
    let layout = directory.histogram;
    let active = |volume: usize, op: usize| {
        let counters = snapshot.volume(volume, op);
        counters.ios + counters.errors > 0
    };
    let volumes: Vec<(usize, &VolumeEntry)> = directory
        .live_volumes()
        .filter(|(index, volume)| snapshot.volume_generation(*index) == volume.generation)
        .collect();

    out += "# HELP fathom_io_stage_seconds Time IOs spent in each stage of the data path.\n";
    out += "# TYPE fathom_io_stage_seconds histogram\n";
    for &(volume_index, volume) in &volumes {
        for (op_index, op) in directory.ops.iter().enumerate() {
            if !active(volume_index, op_index) {
                continue;
            }
            for (stage_index, stage) in directory.stages.iter().enumerate() {
                let counts = snapshot.histogram(volume_index, op_index, stage_index);
                let labels = format!(
                    "node=\"{node}\",volume=\"{}\",op=\"{}\",stage=\"{}\"",
                    escape(&volume.name),
                    escape(op),
                    escape(stage)
                );
                let mut cumulative = vec![0u64; BUCKETS_SECONDS.len()];
                let (mut total, mut sum_seconds) = (0u64, 0f64);
                for (index, &count) in counts.iter().enumerate() {
                    if count == 0 {
                        continue;
                    }
                    let seconds = layout.value_at(index) as f64 / hz;
                    total += count;
                    sum_seconds += seconds * count as f64;
                    for (bucket, &bound) in BUCKETS_SECONDS.iter().enumerate() {
                        if seconds <= bound {
                            cumulative[bucket] += count;
                        }
                    }
                }
                for (bucket, &bound) in BUCKETS_SECONDS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "fathom_io_stage_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                        cumulative[bucket]
                    );
                }
                let _ = writeln!(
                    out,
                    "fathom_io_stage_seconds_bucket{{{labels},le=\"+Inf\"}} {total}"
                );
                let _ = writeln!(
                    out,
                    "fathom_io_stage_seconds_sum{{{labels}}} {sum_seconds:e}"
                );
                let _ = writeln!(out, "fathom_io_stage_seconds_count{{{labels}}} {total}");
            }
        }
    }

    let volume_metrics: [(&str, &str, VolumeField); 3] = [
        (
            "fathom_volume_ios_total",
            "IOs completed successfully.",
            |c| c.ios,
        ),
        (
            "fathom_volume_bytes_total",
            "Bytes moved by successful IOs.",
            |c| c.bytes,
        ),
        (
            "fathom_volume_errors_total",
            "IOs that completed with an error.",
            |c| c.errors,
        ),
    ];
    for (name, help, value) in volume_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for &(volume_index, volume) in &volumes {
            for (op_index, op) in directory.ops.iter().enumerate() {
                if !active(volume_index, op_index) {
                    continue;
                }
                let value = value(snapshot.volume(volume_index, op_index));
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{node}\",volume=\"{}\",op=\"{}\"}} {value}",
                    escape(&volume.name),
                    escape(op)
                );
            }
        }
    }

    let queue_metrics: [(&str, &str, QueueValue); 3] = [
        (
            "fathom_queue_busy_seconds_total",
            "Time the queue had commands outstanding (rate() is %util).",
            |snapshot, queue, hz| format!("{:e}", snapshot.queue_busy_ticks(queue) as f64 / hz),
        ),
        (
            "fathom_queue_submitted_total",
            "Commands submitted to the device queue.",
            |snapshot, queue, _| snapshot.queue(queue).submitted.to_string(),
        ),
        (
            "fathom_queue_completed_total",
            "Commands completed by the device queue.",
            |snapshot, queue, _| snapshot.queue(queue).completed.to_string(),
        ),
    ];
    for (name, help, value) in queue_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (index, queue) in directory.queues.iter().enumerate() {
            let core = directory
                .cores
                .get(queue.core_index as usize)
                .copied()
                .unwrap_or(u32::MAX);
            let labels = format!(
                "node=\"{node}\",device=\"{}\",core=\"{core}\"",
                escape(&queue.device)
            );
            let _ = writeln!(out, "{name}{{{labels}}} {}", value(snapshot, index, hz));
        }
    }
    let _ = writeln!(
        out,
        "# HELP fathom_node_start_time_seconds When the node started, in seconds since the Unix epoch.\n\
         # TYPE fathom_node_start_time_seconds gauge\nfathom_node_start_time_seconds{{node=\"{node}\"}} {:e}",
        directory.start_unix_ns as f64 / 1e9
    );
    out
}
