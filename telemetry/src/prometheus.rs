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
//! Only series that have seen IO are written, so an idle node's page stays small.

use std::fmt::Write;

use crate::region::{Directory, Snapshot};

/// Bucket bounds of `fathom_io_stage_seconds`, in seconds.
pub const BUCKETS_SECONDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `snapshot` of the region described by `directory`.
pub fn render(directory: &Directory, snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let node = escape(&directory.node_id);
    let hz = directory.tsc_hz as f64;
    let layout = directory.histogram;
    let (ops, stages, counts_len) = (
        directory.ops.len(),
        directory.stages.len(),
        layout.counts_len(),
    );
    let active = |volume: usize, op: usize| {
        let at = (volume * ops + op) * 3;
        snapshot.volume_counters[at] + snapshot.volume_counters[at + 2] > 0
    };

    out += "# HELP fathom_io_stage_seconds Time IOs spent in each stage of the data path.\n";
    out += "# TYPE fathom_io_stage_seconds histogram\n";
    for (volume_index, volume) in directory.volumes.iter().enumerate() {
        for (op_index, op) in directory.ops.iter().enumerate() {
            if !active(volume_index, op_index) {
                continue;
            }
            for (stage_index, stage) in directory.stages.iter().enumerate() {
                let start = ((volume_index * ops + op_index) * stages + stage_index) * counts_len;
                let counts = &snapshot.histograms[start..start + counts_len];
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

    for (word, name, help) in [
        (0, "fathom_volume_ios_total", "IOs completed successfully."),
        (
            1,
            "fathom_volume_bytes_total",
            "Bytes moved by successful IOs.",
        ),
        (
            2,
            "fathom_volume_errors_total",
            "IOs that completed with an error.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (volume_index, volume) in directory.volumes.iter().enumerate() {
            for (op_index, op) in directory.ops.iter().enumerate() {
                if !active(volume_index, op_index) {
                    continue;
                }
                let value = snapshot.volume_counters[(volume_index * ops + op_index) * 3 + word];
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{node}\",volume=\"{}\",op=\"{}\"}} {value}",
                    escape(&volume.name),
                    escape(op)
                );
            }
        }
    }

    for (word, name, help) in [
        (
            0,
            "fathom_queue_busy_seconds_total",
            "Time the queue had commands outstanding (rate() is %util).",
        ),
        (
            2,
            "fathom_queue_submitted_total",
            "Commands submitted to the device queue.",
        ),
        (
            3,
            "fathom_queue_completed_total",
            "Commands completed by the device queue.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (index, queue) in directory.queues.iter().enumerate() {
            let words = &snapshot.queue_counters[index * 4..index * 4 + 4];
            let core = directory
                .cores
                .get(queue.core_index as usize)
                .copied()
                .unwrap_or(u32::MAX);
            let labels = format!(
                "node=\"{node}\",device=\"{}\",core=\"{core}\"",
                escape(&queue.device)
            );
            if word == 0 {
                let ongoing = if words[1] != 0 {
                    snapshot.taken_ticks.saturating_sub(words[1])
                } else {
                    0
                };
                let _ = writeln!(
                    out,
                    "{name}{{{labels}}} {:e}",
                    (words[0] + ongoing) as f64 / hz
                );
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {}", words[word]);
            }
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
