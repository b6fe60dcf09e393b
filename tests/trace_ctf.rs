//! The CTF output of traced IOs as its real readers see it: records pushed into a trace
//! region's rings, read back by a `TraceReader` and written by `CtfWriter`, must be decoded
//! by babeltrace2 (its command line and its `bt2` Python module, through
//! `tests/trace/read_ctf.py`) into exactly the IOs that went in.

use std::path::Path;
use std::process::{Command, Output};

use fathom::trace::ctf::{CtfSummary, CtfWriter};
use fathom_telemetry::trace::{
    reason, stamp, SpanId, Start, TraceDirectory, TraceId, TraceReader, TraceRecord, TraceRegion,
    TraceSpec, MAX_LAYERS,
};
use fathom_telemetry::Clock;
use serde_json::Value;

const READ_CTF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trace/read_ctf.py");
const PYTHON: &str = "/usr/bin/python3";

/// Runs `program args`, failing the test (not skipping it) when the program is missing.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "could not run {program} ({error}): these tests need babeltrace2 and python3-bt2; \
             run scripts/test, which installs them"
            )
        })
}

fn require_readers() {
    let version = run("babeltrace2", &["--version"]);
    assert!(version.status.success(), "babeltrace2 --version failed");
    let bt2 = run(PYTHON, &["-c", "import bt2"]);
    assert!(
        bt2.status.success(),
        "{PYTHON} cannot import bt2 ({}): run scripts/test, which installs python3-bt2",
        String::from_utf8_lossy(&bt2.stderr).trim()
    );
}

fn spec() -> TraceSpec {
    TraceSpec {
        node_id: "node-ctf".into(),
        cores: vec![2, 5],
        capacity: 512,
        volumes: vec!["vol0".into(), "vol1".into()],
        geometry: vec![
            fathom_telemetry::trace::VolumeGeometry {
                first_lba: 0,
                block_size: 512,
            };
            2
        ],
        layers: vec!["cache".into(), "crypt".into()],
        spare_volumes: 0,
    }
}

/// Record `n` of ring `ring`, ending about `n` ms after `base`. A third come through the
/// front end (RECEIVED to SENT) and some of those carry a caller's span; a third pass two
/// layers; every eleventh ends before the one before it; some fail.
fn record(ring: usize, n: u64, base: u64) -> TraceRecord {
    let mut end = base + 1_000_000 * n + 137 * (n % 5);
    if n % 11 == 10 {
        end -= 1_500_000;
    }
    let mut stamps = [0u64; stamp::COUNT];
    let mut layers = [(0u8, 0u64, 0u64); MAX_LAYERS];
    let mut layer_count = 0;
    let mut parent = SpanId(0);
    let kind = n % 3;
    let completed = if kind == 0 { end - 9_000 } else { end };
    stamps[stamp::ACCEPTED] = completed - 80_000;
    stamps[stamp::SUBMITTED] = completed - 70_000;
    stamps[stamp::RUNG] = completed - 60_000;
    stamps[stamp::SEEN] = completed - 5_000;
    stamps[stamp::COMPLETED] = completed;
    match kind {
        0 => {
            stamps[stamp::RECEIVED] = completed - 90_000;
            stamps[stamp::REPLY_START] = completed + 1_000;
            stamps[stamp::SENT] = end;
            if n.is_multiple_of(2) {
                parent = SpanId(0x00c0_ffee_0000_0000 | n);
            }
        }
        1 => {
            layer_count = 2;
            layers[0] = (0, completed - 70_000, completed - 65_000);
            layers[1] = (1, completed - 65_000, completed - 61_000);
        }
        _ => {}
    }
    TraceRecord {
        trace_id: TraceId(
            0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 ^ ((ring as u128) << 64 | n as u128),
        ),
        span_id: SpanId(0x00f0_67aa_0ba9_0000 | (ring as u64) << 32 | n),
        parent,
        volume: (n % 2) as u32,
        op: (n % 4) as u8,
        reason: if n.is_multiple_of(7) {
            reason::TAIL | reason::ERROR
        } else {
            reason::HEAD
        },
        status: if n.is_multiple_of(7) { 0x0281 } else { 0 },
        offset: 4096 * n,
        len: if n % 4 == 2 {
            0
        } else {
            4096 * (1 + (n % 8) as u32)
        },
        core: [2, 5][ring],
        queue: (n % 3) as u16,
        stamps,
        layer_count,
        layers,
    }
}

/// Pushes `records` into a fresh region's rings and reads them back as `fathom-stat trace`
/// does: what the CTF writer gets is what a reader gives, in ring order.
fn through_a_region(
    dir: &Path,
    records: &[(usize, TraceRecord)],
) -> (TraceDirectory, Vec<(usize, TraceRecord)>) {
    let path = dir.join("trace-region");
    let region = TraceRegion::create(&path, &spec(), &Clock::monotonic()).unwrap();
    let mut writers = [region.writer(0), region.writer(1)];
    for (ring, record) in records {
        writers[*ring].push(record);
    }
    let mut reader = TraceReader::open(&path, Start::Oldest).unwrap();
    let batch = reader.poll();
    assert_eq!((batch.lost, batch.damaged), (0, 0));
    let mut sorted = records.to_vec();
    sorted.sort_by_key(|(ring, _)| *ring);
    assert_eq!(
        batch.records, sorted,
        "the reader gives back what was pushed"
    );
    (reader.directory().clone(), batch.records)
}

/// Writes `records` as a CTF trace in `out`, flushing once half way.
fn write_ctf(
    out: &Path,
    directory: &TraceDirectory,
    records: &[(usize, TraceRecord)],
) -> CtfSummary {
    let mut writer = CtfWriter::create(out, directory).unwrap();
    for (index, (ring, record)) in records.iter().enumerate() {
        writer.write(*ring, record).unwrap();
        if index == records.len() / 2 {
            writer.flush().unwrap();
        }
    }
    writer.finish().unwrap()
}

fn babeltrace(out: &Path) -> String {
    let output = run("babeltrace2", &[out.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "babeltrace2 {} failed: {}",
        out.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Event count as `sink.utils.counter` reports it.
fn babeltrace_count(out: &Path) -> u64 {
    let output = run(
        "babeltrace2",
        &[out.to_str().unwrap(), "-c", "sink.utils.counter"],
    );
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .find(|line| line.trim_end().ends_with(" Event messages"))
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {text}"))
}

/// What `tests/trace/read_ctf.py` makes of the trace.
fn bt2_read(out: &Path) -> Value {
    let output = run(PYTHON, &[READ_CTF, out.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "read_ctf.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Checks every stream file is whole packets, each starting with the CTF magic and the
/// metadata's uuid (babeltrace2 2.0 does not check the uuid itself), and returns the uuid.
fn check_packet_headers(out: &Path, summary: &CtfSummary) -> String {
    let metadata = std::fs::read_to_string(out.join("metadata")).unwrap();
    let uuid = metadata
        .lines()
        .find_map(|line| line.trim().strip_prefix("uuid = \"")?.strip_suffix("\";"))
        .expect("the trace's uuid in metadata")
        .to_string();
    let uuid_bytes: Vec<u8> = (0..16)
        .map(|index| {
            u8::from_str_radix(&uuid.replace('-', "")[2 * index..2 * index + 2], 16).unwrap()
        })
        .collect();
    for stream in &summary.streams {
        let file = std::fs::read(&stream.path).unwrap();
        let (mut at, mut packets) = (0usize, 0u64);
        while at < file.len() {
            assert_eq!(&file[at..at + 4], &0xC1FC_1FC1u32.to_le_bytes(), "magic");
            assert_eq!(&file[at + 4..at + 20], &uuid_bytes[..], "packet uuid");
            let bits = u64::from_le_bytes(file[at + 56..at + 64].try_into().unwrap());
            assert!(bits > 0 && bits % 8 == 0 && bits as usize / 8 <= 64 * 1024);
            at += bits as usize / 8;
            packets += 1;
        }
        assert_eq!(
            at,
            file.len(),
            "{} ends inside a packet",
            stream.path.display()
        );
        assert_eq!(packets, stream.packets);
    }
    uuid
}

#[test]
fn babeltrace2_reads_back_every_traced_io() {
    require_readers();
    let dir = tempfile::tempdir().unwrap();
    let base = Clock::monotonic().now() + 1_000_000;
    // Ring 0's 300 events take more than one 64 KiB packet; ring 1's fit in one.
    let mut records: Vec<(usize, TraceRecord)> =
        (0..300).map(|n| (0, record(0, n, base))).collect();
    records.extend((0..40).map(|n| (1, record(1, n, base + 333))));
    let (directory, read) = through_a_region(dir.path(), &records);
    let out = dir.path().join("ctf");
    let summary = write_ctf(&out, &directory, &read);
    let total = records.len() as u64;
    assert_eq!(summary.events, total);
    assert_eq!(summary.streams.len(), 2);
    assert!(summary.streams[0].packets >= 3, "{summary:?}");
    let uuid = check_packet_headers(&out, &summary);

    let text = babeltrace(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, total, "one line per IO:\n{text}");
    assert!(lines
        .iter()
        .all(|line| line.contains(" node-ctf io: { cpu_id = ")));
    let first = &records[0].1;
    let line = lines
        .iter()
        .find(|line| line.contains(&format!("trace_id = \"{}\"", first.trace_id)))
        .expect("the first IO's trace id is printed as 32 hex digits");
    eprintln!("babeltrace2 prints: {line}");
    assert!(
        line.contains(&format!("span_id = \"{}\"", first.span_id)),
        "{line}"
    );
    assert!(line.contains("volume = \"vol0\", op = \"read\""), "{line}");
    assert!(line.contains("status = 0x281"), "{line}");
    assert!(line.contains("name = \"frontend\""), "{line}");
    assert_eq!(babeltrace_count(&out), total);

    let read_back = bt2_read(&out);
    let trace = &read_back["trace"];
    assert_eq!(trace["uuid"], uuid.as_str());
    assert_eq!(trace["env"]["hostname"], "node-ctf");
    assert_eq!(trace["env"]["node_id"], "node-ctf");
    assert_eq!(trace["env"]["writer_pid"], std::process::id());
    assert_eq!(trace["env"]["tool"], "fathom-stat trace");
    let clock = &read_back["clock"];
    assert_eq!(clock["frequency"], directory.tsc_hz);
    assert_eq!(clock["origin_is_unix_epoch"], true);

    let events = read_back["events"].as_array().unwrap();
    assert_eq!(events.len() as u64, total);
    for ring in 0..2 {
        let got: Vec<&Value> = events
            .iter()
            .filter(|event| event["stream_id"] == ring)
            .collect();
        let wrote: Vec<&TraceRecord> = read
            .iter()
            .filter(|(r, _)| *r == ring)
            .map(|(_, record)| record)
            .collect();
        assert_eq!(got.len(), wrote.len(), "ring {ring}");
        let mut last = 0u64;
        for (event, record) in got.iter().zip(&wrote) {
            let spans = record.spans(&directory.layers);
            let expected_ts = spans[0].end.max(last);
            last = expected_ts;
            let context = format!("ring {ring}, IO at {}: {event}", record.offset);
            assert_eq!(event["ts_cycles"], expected_ts, "{context}");
            assert_eq!(event["ts_ns"], directory.unix_ns(expected_ts), "{context}");
            assert_eq!(event["cpu_id"], directory.cores[ring], "{context}");
            assert_eq!(event["trace_id"], record.trace_id.to_string(), "{context}");
            assert_eq!(event["span_id"], record.span_id.to_string(), "{context}");
            assert_eq!(
                event["parent_span_id"],
                record.parent.to_string(),
                "{context}"
            );
            assert_eq!(
                event["volume"], directory.volumes[record.volume as usize],
                "{context}"
            );
            let op = ["read", "write", "flush", "write_zeroes"][record.op as usize];
            assert_eq!(event["op"], op, "{context}");
            assert_eq!(event["offset"], record.offset, "{context}");
            assert_eq!(event["len"], record.len, "{context}");
            assert_eq!(event["status"], record.status, "{context}");
            assert_eq!(event["core"], record.core, "{context}");
            assert_eq!(event["queue"], record.queue, "{context}");
            assert_eq!(event["reason"], record.reason, "{context}");
            let got_spans = event["spans"].as_array().unwrap();
            assert_eq!(got_spans.len(), spans.len(), "{context}");
            for (got, span) in got_spans.iter().zip(&spans) {
                assert_eq!(got["name"], span.name.as_str(), "{context}");
                assert_eq!(got["span_id"], span.span_id.to_string(), "{context}");
                assert_eq!(got["parent"], span.parent.to_string(), "{context}");
                assert_eq!(got["begin_ticks"], span.begin, "{context}");
                assert_eq!(got["end_ticks"], span.end, "{context}");
            }
        }
    }
    // The records were made to exercise every shape: check they did.
    let all_spans: Vec<String> = events
        .iter()
        .flat_map(|event| event["spans"].as_array().unwrap())
        .map(|span| span["name"].as_str().unwrap().to_string())
        .collect();
    for name in ["frontend", "io", "reply", "layer:cache", "layer:crypt"] {
        assert!(all_spans.iter().any(|n| n == name), "no {name} span");
    }
    let clamped = events
        .iter()
        .filter(|event| event["ts_cycles"] != event["spans"][0]["end_ticks"])
        .count();
    assert!(
        clamped > 0,
        "some timestamps were raised to keep a stream in order"
    );
}

#[test]
fn an_io_on_a_volume_the_region_does_not_name_is_written_with_its_index() {
    require_readers();
    let dir = tempfile::tempdir().unwrap();
    let base = Clock::monotonic().now() + 1_000_000;
    let mut bad = record(1, 1, base);
    bad.volume = 99;
    bad.op = 200;
    let records = vec![(1, bad), (1, record(1, 2, base))];
    let (directory, read) = through_a_region(dir.path(), &records);
    let out = dir.path().join("ctf");
    write_ctf(&out, &directory, &read);
    let text = babeltrace(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("volume = \"#99\", op = \"#200\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("volume = \"vol0\", op = \"flush\""),
        "{}",
        lines[1]
    );
}
