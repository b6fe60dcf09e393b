//! How `fathom-stat trace` shows traced IOs to a person and to a script: one line per IO
//! while following, a waterfall of one IO's spans, and a JSON object per IO.

use std::fmt::Write;

use fathom_engine::stats::OP_NAMES;
use fathom_telemetry::trace::{reason, Span, TraceDirectory, TraceRecord};
use serde_json::{json, Value};

use crate::stat::duration;

/// A record's operation's name, as the stats region names ops (`op7` for one this reader
/// does not know).
pub fn op_name(record: &TraceRecord) -> String {
    OP_NAMES
        .get(record.op as usize)
        .map_or_else(|| format!("op{}", record.op), |name| name.to_string())
}

/// A record's volume's name (`?7` for a slot the directory does not have or has no volume in).
pub fn volume_name(directory: &TraceDirectory, record: &TraceRecord) -> String {
    directory
        .volume_name(record.volume as usize)
        .map_or_else(|| format!("?{}", record.volume), str::to_string)
}

/// The bits of a record's reason ([`reason`]) as words, comma-separated: `head`, `tail`,
/// `error`, `context`, `late`, and an unknown bit as its hex value; empty for none.
pub fn reason_words(bits: u8) -> String {
    let names = [
        (reason::HEAD, "head"),
        (reason::TAIL, "tail"),
        (reason::ERROR, "error"),
        (reason::CONTEXT, "context"),
        (reason::LATE, "late"),
    ];
    (0..8)
        .map(|bit| 1u8 << bit)
        .filter(|mask| bits & mask != 0)
        .map(|mask| {
            names
                .iter()
                .find(|(known, _)| *known == mask)
                .map_or_else(|| format!("{mask:#x}"), |(_, name)| name.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Why it was traced, as words ([`reason_words`]), or `-`.
pub fn reasons(record: &TraceRecord) -> String {
    match reason_words(record.reason) {
        words if words.is_empty() => "-".into(),
        words => words,
    }
}

/// The child span the IO's time went to: the longest by its own time, the time no span
/// below it covers. Below a stage (`queue`, `submit`, `complete`, `reply`) are the layers and
/// the device, below a layer the layers after it and the device: a layer encloses the device
/// span under it, and a layered IO's `submit` stage holds the layers' way down.
pub fn longest(spans: &[Span]) -> Option<&Span> {
    let children = &spans[1..];
    let depth = |index: usize| match children[index].name.as_str() {
        "device" => usize::MAX,
        name if name.starts_with("layer:") => 1 + index,
        _ => 0,
    };
    (0..children.len())
        .max_by_key(|&index| {
            let span = &children[index];
            let mut below: Vec<(u64, u64)> = (0..children.len())
                .filter(|&other| depth(other) > depth(index))
                .map(|other| {
                    let other = &children[other];
                    (other.begin.max(span.begin), other.end.min(span.end))
                })
                .filter(|(begin, end)| begin < end)
                .collect();
            below.sort_unstable();
            // The union of what the spans below cover inside this one.
            let (mut covered, mut reach) = (0, span.begin);
            for (begin, end) in below {
                let begin = begin.max(reach);
                if end > begin {
                    covered += end - begin;
                    reach = end;
                }
            }
            (span.end.saturating_sub(span.begin)).saturating_sub(covered)
        })
        .map(|index| &children[index])
}

/// Whether the offset was kept (a late tail decision has none).
fn offset_known(record: &TraceRecord) -> bool {
    record.offset != u64::MAX
}

/// The heading of [`line`]'s rows.
pub const LINE_HEADER: &str =
    "TIME(UTC)        TRACE                             VOLUME       OP               LBA     LEN     TOTAL  LONGEST              WHY";

/// One traced IO on one line, as `fathom-stat trace` prints them while following.
pub fn line(directory: &TraceDirectory, record: &TraceRecord) -> String {
    let spans = record.spans(&directory.layers);
    let longest = longest(&spans).map_or_else(
        || "-".to_string(),
        |span| {
            format!(
                "{} {}",
                span.name,
                duration(directory.ns(span.end.saturating_sub(span.begin)) as f64)
            )
        },
    );
    format!(
        "{:<16} {:<33} {:<12} {:<6} {:>14} {:>7} {:>9}  {:<20} {}",
        clock_time(directory.unix_ns(spans[0].begin)),
        record.trace_id.to_string(),
        volume_name(directory, record),
        op_name(record),
        directory
            .lba(record)
            .map_or_else(|| "?".into(), |lba| lba.to_string()),
        bytes(record.len as u64),
        duration(directory.ns(record.total_ticks()) as f64),
        longest,
        reasons(record),
    )
}

/// A record and its spans as one JSON object (`fathom-stat trace --json`): times in unix ns
/// and durations in ns, ids in lowercase hex as W3C trace-context writes them.
pub fn json(directory: &TraceDirectory, record: &TraceRecord) -> Value {
    let spans = record.spans(&directory.layers);
    let parent = |id: u64| (id != 0).then(|| format!("{id:016x}"));
    json!({
        "node": directory.node_id,
        "trace_id": record.trace_id.to_string(),
        "span_id": record.span_id.to_string(),
        "parent_span_id": parent(record.parent.0),
        "volume": volume_name(directory, record),
        "op": op_name(record),
        "offset": offset_known(record).then_some(record.offset),
        "lba": directory.lba(record),
        "len": record.len,
        "status": record.status,
        "core": record.core,
        "queue": (record.queue != u16::MAX).then_some(record.queue),
        "reason": reasons(record),
        "start_unix_ns": directory.unix_ns(spans[0].begin),
        "total_ns": directory.ns(record.total_ticks()),
        "spans": spans.iter().map(|span| json!({
            "name": span.name,
            "span_id": span.span_id.to_string(),
            "parent_span_id": parent(span.parent.0),
            "start_unix_ns": directory.unix_ns(span.begin),
            "duration_ns": directory.ns(span.end.saturating_sub(span.begin)),
        })).collect::<Vec<_>>(),
    })
}

/// One traced IO as a waterfall: a row per span, its bar placed and sized to scale on the
/// root's time axis `width` characters wide (`.` for a span under half a character), the
/// longest child span drawn with `#` and marked.
pub fn waterfall(directory: &TraceDirectory, record: &TraceRecord, width: usize) -> String {
    let spans = record.spans(&directory.layers);
    let root = &spans[0];
    let origin = root.begin;
    let span_ns = |span: &Span| directory.ns(span.end.saturating_sub(span.begin));
    let total = span_ns(root).max(1);
    let longest_id = longest(&spans).map(|span| span.span_id);
    let width = width.max(10);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trace {}  span {}{}",
        record.trace_id,
        record.span_id,
        if record.parent.0 != 0 {
            format!("  parent {}", record.parent)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "node {}  volume {}  {} {}{}  core {}{}  {}  traced: {}",
        directory.node_id,
        volume_name(directory, record),
        op_name(record),
        bytes(record.len as u64),
        match (offset_known(record), directory.lba(record)) {
            (true, Some(lba)) => format!(" at LBA {lba} (offset {})", record.offset),
            (true, None) => format!(" at offset {}", record.offset),
            (false, _) => " (offset not kept)".into(),
        },
        record.core,
        if record.queue != u16::MAX {
            format!(" queue {}", record.queue)
        } else {
            String::new()
        },
        match record.status {
            0 => "status ok".to_string(),
            status => format!("status SCT {:x}h SC {:02x}h", status >> 8, status & 0xff),
        },
        reasons(record),
    );
    let _ = writeln!(
        out,
        "started {} UTC, total {}",
        clock_time(directory.unix_ns(origin)),
        duration(directory.ns(record.total_ticks()) as f64)
    );
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>9}  |{}|",
        "SPAN",
        "START",
        "DURATION",
        axis(width, total)
    );
    for span in &spans {
        let start = directory.ns(span.begin.saturating_sub(origin));
        let length = span_ns(span);
        let from = (start as u128 * width as u128 / total as u128) as usize;
        let cells = (length as u128 * width as u128).div_ceil(total as u128) as usize;
        let from = from.min(width - 1);
        let cells = cells.clamp(1, width - from);
        let mark = if Some(span.span_id) == longest_id {
            "  <- longest"
        } else {
            ""
        };
        let name = if span.parent == record.span_id {
            format!("  {}", span.name)
        } else {
            span.name.clone()
        };
        // A span shorter than half a character is a dot where it happened.
        let bar_char = if Some(span.span_id) == longest_id {
            '#'
        } else if (length as u128 * width as u128 * 2) < total as u128 {
            '.'
        } else {
            '='
        };
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9}  |{}{}{}|{}",
            name,
            duration(start as f64),
            duration(length as f64),
            " ".repeat(from),
            bar_char.to_string().repeat(cells),
            " ".repeat(width - from - cells),
            mark
        );
    }
    out
}

/// The time axis' heading: 0 at the left, the total at the right.
fn axis(width: usize, total_ns: u64) -> String {
    let right = duration(total_ns as f64);
    let left = "0";
    let gap = width.saturating_sub(left.len() + right.len());
    format!("{left}{}{right}", " ".repeat(gap))
}

/// HH:MM:SS.micros of a unix time in ns.
fn clock_time(unix_ns: u64) -> String {
    let seconds = unix_ns / 1_000_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
        unix_ns % 1_000_000_000 / 1000
    )
}

/// Bytes in the units block people use: 4K, 128K, 1M.
fn bytes(len: u64) -> String {
    if len >= 1 << 20 && len.is_multiple_of(1 << 20) {
        format!("{}M", len >> 20)
    } else if len >= 1 << 10 && len.is_multiple_of(1 << 10) {
        format!("{}K", len >> 10)
    } else {
        len.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::trace::{stamp, SpanId, TraceId};

    fn directory() -> TraceDirectory {
        TraceDirectory {
            node_id: "n1".into(),
            tsc_hz: 1_000_000_000,
            epoch_ticks: 0,
            epoch_unix_ns: 1_764_633_600_000_000_000,
            writer_pid: 1,
            start_unix_ns: 0,
            cores: vec![0],
            capacity: 8,
            volumes: vec!["vol0".into()],
            geometry: vec![fathom_telemetry::trace::VolumeGeometry {
                first_lba: 2048,
                block_size: 512,
            }],
            layers: vec!["cache".into()],
        }
    }

    /// An NBD read of 2.1 ms whose device took 2 ms.
    fn slow_read() -> TraceRecord {
        let mut stamps = [0u64; stamp::COUNT];
        for (index, at) in [
            (stamp::RECEIVED, 1_000),
            (stamp::ACCEPTED, 11_000),
            (stamp::SUBMITTED, 11_000),
            (stamp::RUNG, 12_000),
            (stamp::SEEN, 2_012_000),
            (stamp::COMPLETED, 2_013_000),
            (stamp::REPLY_START, 2_013_000),
            (stamp::SENT, 2_101_000),
        ] {
            stamps[index] = at;
        }
        TraceRecord {
            trace_id: TraceId(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            span_id: SpanId(0x00f0_67aa_0ba9_02b7),
            reason: reason::TAIL,
            offset: 8192,
            len: 4096,
            queue: 1,
            stamps,
            ..TraceRecord::default()
        }
    }

    #[test]
    fn the_waterfall_draws_each_span_to_scale_and_marks_the_longest() {
        let text = waterfall(&directory(), &slow_read(), 40);
        let rows: Vec<&str> = text.lines().collect();
        assert!(
            rows[0].starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736  span 00f067aa0ba902b7")
        );
        assert!(
            rows[1].contains("volume vol0  read 4K at LBA 2064 (offset 8192)"),
            "{text}"
        );
        assert!(rows[2].contains("total 2.10ms"), "{text}");
        let row = |name: &str| {
            rows.iter()
                .find(|row| row.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row:\n{text}"))
        };
        let bar = |name: &str| {
            let row = row(name);
            let inside = &row[row.find('|').unwrap() + 1..row.rfind('|').unwrap()];
            (
                inside.find(['=', '#']).unwrap(),
                inside.trim().len(),
                inside.len(),
            )
        };
        // The root spans the whole axis; the device span 2 ms of 2.1 ms (38 of 40 cells),
        // starting just after the first 11 us.
        assert_eq!(bar("frontend"), (0, 40, 40));
        let (start, cells, _) = bar("device");
        assert_eq!(start, 0);
        assert_eq!(cells, 39, "{text}");
        assert!(row("device").ends_with("<- longest"), "{text}");
        assert!(!row("reply").contains("longest"));
        let (start, cells, _) = bar("reply");
        assert_eq!((start, cells), (38, 2), "{text}");
        assert!(
            row("queue").contains("|. "),
            "a zero-length span is a dot: {text}"
        );
    }

    #[test]
    fn a_line_and_a_json_object_name_the_io_and_where_its_time_went() {
        let (directory, record) = (directory(), slow_read());
        let line = line(&directory, &record);
        assert!(line.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{line}");
        assert!(line.contains("vol0") && line.contains("read") && line.contains(" 2064 "));
        assert!(
            line.contains("2.10ms") && line.contains("device 2.00ms"),
            "{line}"
        );
        assert!(line.ends_with("tail"));
        let object = json(&directory, &record);
        assert_eq!(object["volume"], "vol0");
        assert_eq!(
            (object["offset"].as_u64(), object["lba"].as_u64()),
            (Some(8192), Some(2064))
        );
        assert_eq!(object["total_ns"], 2_100_000);
        assert_eq!(object["parent_span_id"], Value::Null);
        let spans = object["spans"].as_array().unwrap();
        assert_eq!(spans[0]["name"], "frontend");
        let device = spans.iter().find(|span| span["name"] == "device").unwrap();
        assert_eq!(device["duration_ns"], 2_000_000);
        assert_eq!(device["parent_span_id"], "00f067aa0ba902b7");
    }

    #[test]
    fn a_layer_around_the_device_is_not_where_the_time_went() {
        let directory = directory();
        let mut record = slow_read();
        // An engine layer from just after submission to just before completion.
        record.layer_count = 1;
        record.layers[0] = (0, 11_500, 2_012_500);
        let spans = record.spans(&directory.layers);
        assert_eq!(longest(&spans).unwrap().name, "device");
        let text = waterfall(&directory, &record, 40);
        let marked: Vec<&str> = text.lines().filter(|l| l.ends_with("<- longest")).collect();
        assert_eq!(marked.len(), 1, "{text}");
        assert!(marked[0].trim_start().starts_with("device"), "{text}");
        // A layer that holds the IO itself (a delay before the device, inside `submit`) is.
        record.stamps[stamp::RUNG] = 1_900_000;
        let spans = record.spans(&directory.layers);
        assert_eq!(longest(&spans).unwrap().name, "layer:cache");
    }

    #[test]
    fn untrusted_indexes_and_a_late_record_are_shown_not_panicked_on() {
        let directory = directory();
        let mut record = slow_read();
        record.volume = 9;
        record.op = 7;
        record.offset = u64::MAX;
        record.reason = reason::TAIL | reason::LATE;
        let line = line(&directory, &record);
        assert!(line.contains("?9") && line.contains("op7") && line.contains("tail,late"));
        let text = waterfall(&directory, &record, 20);
        assert!(text.contains("(offset not kept)"), "{text}");
        let empty = TraceRecord::default();
        let _ = waterfall(&directory, &empty, 0);
        let _ = json(&directory, &empty);
    }
}
