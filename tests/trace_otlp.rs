//! `fathom-stat trace`'s OTLP output as its consumers see it: records written to a real trace
//! region and read back are exported as OTLP JSON lines that the official protobuf definitions
//! parse strictly (tests/trace/validate_otlp.py), forming one tree per trace; and the sender
//! speaks OTLP/HTTP to a collector, reporting a refusal or an absent collector clearly.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::otlp::validate;
use fathom::trace::otlp::{export_request, OtlpError, OtlpFile, OtlpSender};
use fathom_telemetry::trace::{
    reason, stamp, IdGenerator, SpanId, Start, TraceContext, TraceDirectory, TraceReader,
    TraceRecord, TraceRegion, TraceSpec, MAX_LAYERS,
};
use fathom_telemetry::Clock;
use serde_json::{json, Value};

fn spec() -> TraceSpec {
    TraceSpec {
        node_id: "node-a".into(),
        cores: vec![0, 1],
        capacity: 16,
        volumes: vec!["vol0".into(), "vol1".into()],
        geometry: vec![
            fathom_telemetry::trace::VolumeGeometry {
                first_lba: 0,
                block_size: 512,
            };
            2
        ],
        layers: vec!["cache".into(), "replica".into()],
        spare_volumes: 0,
    }
}

/// IO `n` of a test: through the front end (every stamp) or from inside the node (no
/// RECEIVED, REPLY_START, SENT), through `layers` (indexes into [`spec`]'s layer names), its
/// stamps 1000 ticks apart from `base + 10000 n`.
fn io(
    ids: &mut IdGenerator,
    base: u64,
    n: u64,
    frontend: bool,
    layers: &[u8],
    volume: u32,
) -> TraceRecord {
    let start = base + 10_000 * n;
    let mut stamps = [0u64; stamp::COUNT];
    for (index, stamp) in stamps.iter_mut().enumerate() {
        *stamp = start + 1000 * index as u64;
    }
    if !frontend {
        for unused in [stamp::RECEIVED, stamp::REPLY_START, stamp::SENT] {
            stamps[unused] = 0;
        }
    }
    let mut layer_stamps = [(0u8, 0u64, 0u64); MAX_LAYERS];
    for (index, &kind) in layers.iter().enumerate() {
        // Inside the IO's time in its volume's path, between SUBMITTED and SEEN.
        let begin = stamps[stamp::SUBMITTED] + 100 + 400 * index as u64;
        layer_stamps[index] = (kind, begin, begin + 300);
    }
    TraceRecord {
        trace_id: ids.trace_id(),
        span_id: ids.span_id(),
        parent: SpanId(0),
        volume,
        op: 0,
        reason: reason::HEAD,
        status: 0,
        offset: 4096 * n,
        len: 4096,
        core: 0,
        queue: 0,
        stamps,
        layer_count: layers.len() as u8,
        layers: layer_stamps,
    }
}

/// The IOs of ring 0 (front-end ones: a plain read through two layers, then two writes of one
/// caller's span, whose `traceparent` they carried) and of ring 1 (the engine's own: write
/// zeroes through a layer, a read that failed on the medium, a flush that reached no queue).
fn ios(base: u64) -> (Vec<TraceRecord>, Vec<TraceRecord>) {
    let mut ids = IdGenerator::new(42);
    let caller =
        TraceContext::from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .unwrap();
    let read = io(&mut ids, base, 0, true, &[0, 1], 0);
    let mut calls = Vec::new();
    for n in 1..3 {
        let mut write = io(&mut ids, base, n, true, &[1], 1);
        write.trace_id = caller.trace_id;
        write.parent = caller.parent;
        write.op = 1;
        write.reason = reason::CONTEXT;
        calls.push(write);
    }
    let mut zeroes = io(&mut ids, base, 3, false, &[0], 0);
    zeroes.op = 3;
    zeroes.reason = reason::TAIL;
    zeroes.core = 1;
    let mut failed = io(&mut ids, base, 4, false, &[], 0);
    failed.status = 0x0281; // media errors: Unrecovered Read Error
    failed.reason = reason::ERROR | reason::TAIL;
    failed.core = 1;
    let mut flush = io(&mut ids, base, 5, false, &[], 1);
    flush.op = 2;
    flush.queue = u16::MAX;
    flush.core = 1;
    (vec![read, calls[0], calls[1]], vec![zeroes, failed, flush])
}

/// Pushes `records` on `ring` and reads them back with `reader`, checking nothing was lost.
fn through_the_ring(
    region: &TraceRegion,
    reader: &mut TraceReader,
    ring: usize,
    records: &[TraceRecord],
) -> Vec<(usize, TraceRecord)> {
    let mut writer = region.writer(ring);
    for record in records {
        writer.push(record);
    }
    let batch = reader.poll();
    assert_eq!((batch.lost, batch.damaged), (0, 0));
    let expected: Vec<(usize, TraceRecord)> = records.iter().map(|r| (ring, *r)).collect();
    assert_eq!(
        batch.records, expected,
        "the ring gives back what was pushed"
    );
    batch.records
}

#[test]
fn traced_ios_written_as_otlp_json_lines_pass_the_official_protobuf_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let region_path = dir.path().join("trace");
    let clock = Clock::monotonic();
    let region = TraceRegion::create(&region_path, &spec(), &clock).unwrap();
    let mut reader = TraceReader::open(&region_path, Start::Oldest).unwrap();
    let directory: TraceDirectory = reader.directory().clone();
    let (ring0, ring1) = ios(clock.now());

    // As fathom-stat trace does it: one request per poll, appended to the file.
    let file_path = dir.path().join("otlp.jsonl");
    let mut file = OtlpFile::create(&file_path).unwrap();
    let mut read_back = Vec::new();
    for (ring, records) in [(0, &ring0), (1, &ring1)] {
        let batch = through_the_ring(&region, &mut reader, ring, records);
        file.write(&export_request(&directory, &batch)).unwrap();
        read_back.extend(batch);
    }

    let summary = validate(&file_path).unwrap_or_else(|errors| panic!("{errors}"));
    let spans: Vec<_> = read_back
        .iter()
        .flat_map(|(_, record)| record.spans(&directory.layers))
        .collect();
    let mut names = BTreeMap::new();
    for span in &spans {
        *names.entry(span.name.clone()).or_insert(0u64) += 1;
    }
    assert_eq!(summary["lines"], 2, "{summary}");
    assert_eq!(summary["spans"], spans.len(), "{summary}");
    assert_eq!(summary["names"], json!(names), "{summary}");
    assert!(names.contains_key("layer:cache") && names.contains_key("layer:replica"));
    // Five traces: the read, the caller's (two writes), and the engine's three IOs.
    assert_eq!(summary["traces"], 5, "{summary}");
    assert_eq!(
        summary["external_parents"],
        json!([["4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"]]),
        "the caller's span is the only parent from outside: {summary}"
    );
    assert_eq!(
        summary["kinds"],
        json!({"1": spans.len() - 3, "2": 3}),
        "the three front-end roots are SERVER spans, the rest INTERNAL: {summary}"
    );
    assert_eq!(summary["errors"], 1, "{summary}");
    assert_eq!(summary["volumes"], json!(["vol0", "vol1"]), "{summary}");
    assert_eq!(summary["nodes"], json!(["node-a"]), "{summary}");
    // Times are the stamps on the region's clock, mapped to unix time through its epoch.
    let first = spans.iter().map(|span| span.begin).min().unwrap();
    let last = spans.iter().map(|span| span.end).max().unwrap();
    assert_eq!(summary["start_min"], directory.unix_ns(first), "{summary}");
    assert_eq!(summary["end_max"], directory.unix_ns(last), "{summary}");
    assert!(directory.unix_ns(first) >= directory.start_unix_ns);

    // What a person reads in Jaeger about the failed IO.
    let text = std::fs::read_to_string(&file_path).unwrap();
    let failed = ring1[1];
    let failed_root = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .flat_map(|request| {
            let resources = request["resourceSpans"].as_array().unwrap().clone();
            resources.into_iter().flat_map(|resource| {
                resource["scopeSpans"][0]["spans"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
        })
        .find(|span| span["spanId"] == failed.span_id.to_string())
        .expect("the failed IO's root span");
    assert_eq!(failed_root["status"]["code"], 2);
    let message = failed_root["status"]["message"].as_str().unwrap();
    assert!(message.contains("Unrecovered Read Error"), "{message}");
}

/// A valid request of ring 0's IOs, for the validator's refusals.
fn valid_request(dir: &Path) -> Value {
    let clock = Clock::monotonic();
    let region_path = dir.join("trace");
    let region = TraceRegion::create(&region_path, &spec(), &clock).unwrap();
    let mut reader = TraceReader::open(&region_path, Start::Oldest).unwrap();
    let (ring0, _) = ios(clock.now());
    let batch = through_the_ring(&region, &mut reader, 0, &ring0);
    export_request(reader.directory(), &batch)
}

#[test]
fn the_validator_refuses_what_a_collector_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_request(dir.path());
    let check = |name: &str, request: &Value| {
        let path = dir.path().join(format!("{name}.jsonl"));
        let mut file = OtlpFile::create(&path).unwrap();
        file.write(request).unwrap();
        validate(&path)
    };
    check("good", &good).expect("the unchanged request passes");
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 8] = [
        (
            "uppercase",
            |span| span["traceId"] = json!(span["traceId"].as_str().unwrap().to_uppercase()),
            "lowercase hex",
        ),
        (
            "base64",
            |span| span["spanId"] = json!("AAAAAAAAAAE="),
            "lowercase hex",
        ),
        (
            "enum-name",
            |span| span["kind"] = json!("SPAN_KIND_SERVER"),
            "enum must be a JSON integer",
        ),
        (
            "time-number",
            |span| span["startTimeUnixNano"] = json!(1_700_000_000_000_000_000u64),
            "decimal string",
        ),
        (
            "unknown-field",
            |span| span["spanKind"] = json!(2),
            "json_format",
        ),
        (
            "backwards",
            |span| span["endTimeUnixNano"] = json!("1"),
            "before it starts",
        ),
        (
            "dangling-parent",
            |span| span["parentSpanId"] = json!("00000000000000ff"),
            "not one tree",
        ),
        (
            "second-root",
            |span| {
                span.as_object_mut().unwrap().remove("parentSpanId");
            },
            "2 root spans",
        ),
    ];
    for (name, edit, says) in cases {
        let mut request = good.clone();
        // The first child of the plain read's root (spans are root first): the root stays
        // whole, so each case breaks exactly one rule.
        edit(&mut request["resourceSpans"][0]["scopeSpans"][0]["spans"][1]);
        let errors = check(name, &request).expect_err(name);
        assert!(errors.contains(says), "{name}: {errors}");
    }
    let mut snake = good.clone();
    let spans = snake["resourceSpans"][0]
        .as_object_mut()
        .unwrap()
        .remove("scopeSpans")
        .unwrap();
    snake["resourceSpans"][0]["scope_spans"] = spans;
    let errors = check("snake", &snake).expect_err("snake_case key");
    assert!(errors.contains("lowerCamelCase"), "{errors}");
}

/// Accepts one connection on `listener` (within 10 s), reads one request and answers `reply`:
/// the request's head (request line and headers) and body.
fn serve_one(listener: &TcpListener, reply: &[u8]) -> (String, Vec<u8>) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream: TcpStream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the sender never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let count = stream.read(&mut buffer).unwrap();
        assert!(count > 0, "the request ended before its headers");
        request.extend_from_slice(&buffer[..count]);
    };
    let head = String::from_utf8(request[..head_end].to_vec()).unwrap();
    let length: usize = header(&head, "content-length")
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = request[head_end + 4..].to_vec();
    while body.len() < length {
        let count = stream.read(&mut buffer).unwrap();
        assert!(count > 0, "the body ended after {} bytes", body.len());
        body.extend_from_slice(&buffer[..count]);
    }
    assert_eq!(body.len(), length, "Content-Length matches the body");
    stream.write_all(reply).unwrap();
    (head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Sends `request` from a thread of its own to a collector on `listener` answering `reply`.
fn exchange(
    listener: &TcpListener,
    request: &Value,
    reply: &[u8],
) -> (String, Vec<u8>, Result<(), OtlpError>) {
    let port = listener.local_addr().unwrap().port();
    let sender = OtlpSender::new(&format!("http://127.0.0.1:{port}"))
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    assert_eq!(sender.url(), format!("http://127.0.0.1:{port}/v1/traces"));
    let body = request.clone();
    let thread = std::thread::spawn(move || sender.send(&body));
    let (head, body) = serve_one(listener, reply);
    (head, body, thread.join().unwrap())
}

#[test]
fn the_sender_posts_json_to_v1_traces_and_accepts_a_200() {
    let dir = tempfile::tempdir().unwrap();
    let request = valid_request(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let (head, body, result) = exchange(&listener, &request, reply);
    result.expect("a 200 is success");
    assert_eq!(head.split("\r\n").next(), Some("POST /v1/traces HTTP/1.1"));
    assert_eq!(
        header(&head, "host"),
        Some(format!("127.0.0.1:{port}").as_str())
    );
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent, request, "the body is the request, unchanged");
}

#[test]
fn a_400_reply_is_an_error_that_quotes_the_collectors_body() {
    let dir = tempfile::tempdir().unwrap();
    let request = valid_request(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let body = r#"{"code":3,"message":"invalid span id length 12"}"#;
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (_, _, result) = exchange(&listener, &request, reply.as_bytes());
    let error = result.expect_err("a 400 is an error");
    assert!(
        matches!(error, OtlpError::Refused { code: 400, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("400 Bad Request") && text.contains("invalid span id length 12"),
        "{text}"
    );
    assert!(!error.is_retryable(), "OTLP says not to retry a 400");
}

#[test]
fn a_collector_that_is_not_there_is_a_clear_connection_error() {
    // A port that was free a moment ago, with nothing listening on it now.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sender = OtlpSender::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let error = sender.send(&json!({"resourceSpans": []})).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("could not connect to the OTLP collector")
            && text.contains(&format!("127.0.0.1:{port}"))
            && text.contains("is a collector listening there"),
        "{text}"
    );
    let source = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .expect("the OS error is kept");
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(error.is_retryable());
}
