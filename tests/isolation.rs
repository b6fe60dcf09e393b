//! Loopback isolation on a running node: its control socket refuses bad input while IO flows
//! and loses nothing, and `fathom-bench isolate` names a device queue that two volumes
//! overfill as the limit, with the wait the telemetry shows. (The blind attribution trials
//! are in tests/attribution.rs, a binary of their own so nothing runs beside them.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::Node;

const BENCH: &str = env!("CARGO_BIN_EXE_fathom-bench");

/// One request line on a raw connection, and the answer line as JSON.
fn ask(stream: &mut BufReader<UnixStream>, line: &[u8]) -> serde_json::Value {
    stream.get_mut().write_all(line).unwrap();
    let mut answer = String::new();
    stream.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|error| panic!("answer {answer:?}: {error}"))
}

/// `fathom-bench isolate ARGS --json` on an engine in this process (normal pages when no
/// hugepages are free): its report.
fn isolate_in_process(args: &[&str]) -> serde_json::Value {
    let output = Command::new(BENCH)
        .arg("isolate")
        .args(args)
        .arg("--json")
        .args(if common::free_hugepages() >= 64 {
            &[][..]
        } else {
            &["--no-hugepages"][..]
        })
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    report
}

#[test]
fn bad_control_requests_get_clear_errors_while_io_flows_and_lose_nothing() {
    let node = Node::start();
    let socket = node.dir.path().join("control.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the control socket is for its owner only"
    );

    // Every block of vol0 written and read back through NBD, while the control socket is
    // hammered with bad requests (and a client that connects and says nothing).
    let verify = Command::new(BENCH)
        .args([
            "--nbd",
            &node.uri("vol0"),
            "--verify",
            "--bs",
            "4k",
            "--iodepth",
            "8",
            "--size",
            "48M",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _silent = UnixStream::connect(&socket).unwrap();
    let mut stream = BufReader::new(UnixStream::connect(&socket).unwrap());
    stream
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let oversized = {
        let mut line = vec![b'x'; 100 << 10];
        line.push(b'\n');
        line
    };
    let bad: Vec<(&[u8], &str, &str)> = vec![
        (b"garbage\n", "bad_request", "not JSON"),
        (b"\xff\xfe\x00\n", "bad_request", "UTF-8"),
        (&oversized, "bad_request", "longer than"),
        (br#"{"v":2,"cmd":"hello"}"#, "bad_request", "version 1"),
        (br#"{"v":1,"cmd":"format_disk"}"#, "bad_request", "unknown command"),
        (br#"{"v":1,"cmd":"stub_set","volume":"nope","layer":"queue"}"#, "unknown_volume", "vol0, vol1"),
        (br#"{"v":1,"cmd":"stub_set","volume":"vol0","layer":"disk"}"#, "unknown_layer", "frontend, engine, replication, queue, device, media"),
        (br#"{"v":1,"cmd":"stub_set","volume":"vol0","layer":"frontend"}"#, "unsupported", "inside the node"),
        (br#"{"v":1,"cmd":"inject_add","target":"vol1","layer":"engine","rule":{"fraction":7}}"#, "bad_rule", "0.0 to 1.0"),
        (br#"{"v":1,"cmd":"inject_add","target":"vol1","rule":{"latency":"banana"}}"#, "bad_rule", "banana"),
        (br#"{"v":1,"cmd":"inject_add","target":"nvme0","layer":"engine","rule":{}}"#, "unknown_layer", "device and media"),
        (br#"{"v":1,"cmd":"inject_add","target":"vol1","layer":"media","rule":{}}"#, "unknown_layer", "nvme0"),
        (br#"{"v":1,"cmd":"run","volume":"vol1","rw":"randread","bs":3,"iodepth":1,"runtime_ms":10,"ramp_ms":0}"#, "bad_request", "multiple"),
        (br#"{"v":1,"cmd":"run","volume":"vol1","rw":"randread","bs":4096,"iodepth":0,"runtime_ms":10,"ramp_ms":0}"#, "bad_request", "iodepth"),
        (br#"{"v":1,"cmd":"run","volume":"vol1","rw":"sideways","bs":4096,"iodepth":1,"runtime_ms":10,"ramp_ms":0}"#, "bad_request", "randread"),
        (br#"{"v":1,"cmd":"layers","volume":"vol0","extra":1}"#, "bad_request", "extra"),
    ];
    let mut verify = verify;
    let mut rounds = 0;
    // Until the verify run ends (and at least a few rounds): the bad requests overlap its IO.
    while rounds < 5 || verify.try_wait().unwrap().is_none() {
        let round = rounds;
        rounds += 1;
        assert!(rounds < 100_000, "the verify run does not end");
        for (line, code, says) in &bad {
            let mut line = line.to_vec();
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            let answer = ask(&mut stream, &line);
            assert_eq!(answer["ok"], false, "round {round}: {answer}");
            assert_eq!(answer["error"]["code"], *code, "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
        // The same connection still answers a good request.
        let answer = ask(
            &mut stream,
            b"{\"v\":1,\"cmd\":\"layers\",\"volume\":\"vol0\"}\n",
        );
        assert_eq!(answer["ok"], true, "{answer}");
    }
    assert!(
        rounds > 5,
        "the verify run ended before the bad requests began"
    );
    let output = verify.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "verify failed while the control socket was hammered:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    // Nothing was changed by the refused requests.
    let rows: serde_json::Value = serde_json::from_str(&node.ctl(&["--json", "layers"])).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["state"], "pass", "{row}");
    }
    let log = node.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn stubs_and_injection_through_fathom_ctl_change_a_running_node_and_clear_back() {
    let node = Node::start();
    let ok = |args: &[&str]| node.ctl(args);
    ok(&["stub", "set", "vol1", "device"]);
    ok(&[
        "inject",
        "add",
        "nvme0",
        "--layer",
        "media",
        "--latency",
        "1ms",
    ]);
    ok(&[
        "inject",
        "add",
        "vol1",
        "--layer",
        "queue",
        "--latency",
        "uniform(10us,20us)",
    ]);
    let layers: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "layers", "vol1"])).unwrap();
    let state = |layer: &str| {
        layers
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["layer"] == layer)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("device"), "stub");
    assert_eq!(state("queue"), "inject");
    assert_eq!(state("media"), "inject");
    // The in-node workload runs through them: the device stub's null controller answers.
    let run: serde_json::Value = serde_json::from_str(&ok(&[
        "--json",
        "run",
        "vol1",
        "--rw",
        "randwrite",
        "--runtime",
        "0.3",
        "--ramp_time",
        "0",
        "--iodepth",
        "4",
    ]))
    .unwrap();
    assert!(run["ios"].as_u64().unwrap() > 100, "{run}");
    assert_eq!(run["errors"], 0, "{run}");
    ok(&["stub", "clear", "vol1", "device"]);
    ok(&["inject", "clear", "vol1"]);
    ok(&["inject", "clear", "nvme0"]);
    let rules: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "inject", "list"])).unwrap();
    assert_eq!(rules.as_array().unwrap().len(), 0, "{rules}");
    node.stop();
}

#[test]
fn isolate_names_an_overfilled_device_queue_as_the_limit_with_the_wait_telemetry_shows() {
    // Two volumes on one device, each keeping 16 IOs in flight, on a device queue of 16.
    let report = isolate_in_process(&[
        "--volumes",
        "2",
        "--queue-depth",
        "16",
        "--iodepth",
        "16",
        "--mode",
        "thread",
        "--media",
        "null",
        "--layers",
        "queue",
        "--rounds",
        "1",
        "--runtime",
        "0.5",
        "--ramp_time",
        "0.1",
    ]);
    let queueing = &report["queueing"];
    let limit = queueing["limit"]
        .as_str()
        .unwrap_or_else(|| panic!("no limit: {queueing}"));
    assert!(
        limit.contains("device queue nvme0 on core 0: 16 entries")
            && limit.contains("32 IOs in flight"),
        "{limit}"
    );
    let (ios, waited) = (
        queueing["ios"].as_u64().unwrap(),
        queueing["waited_ios"].as_u64().unwrap(),
    );
    assert!(
        waited * 4 > ios,
        "only {waited} of {ios} IOs waited: {queueing}"
    );
    // What the workloads saw waiting is what the engine's queue stage recorded.
    let (seen, telemetry) = (
        queueing["mean_wait_ns"].as_f64().unwrap(),
        queueing["telemetry_mean_ns"].as_f64().unwrap(),
    );
    assert!(seen > 1000.0, "a mean wait of {seen} ns");
    assert!(
        (seen - telemetry).abs() <= 0.1 * seen + 500.0,
        "workload mean wait {seen:.0} ns, telemetry queue stage {telemetry:.0} ns"
    );
}

#[test]
fn isolate_on_uring_measures_every_layer_it_can_and_says_why_not_the_media() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("uring.img");
    let file = file.to_str().unwrap();
    let report = isolate_in_process(&[
        "--driver",
        "uring",
        "--filename",
        file,
        "--iodepth",
        "4",
        "--rounds",
        "1",
        "--runtime",
        "0.3",
        "--ramp_time",
        "0.05",
    ]);
    let variants = report["variants"].as_array().unwrap();
    let media = variants
        .iter()
        .find(|variant| variant["stubbed"] == "media")
        .unwrap();
    let why = media["skipped"].as_str().unwrap_or_default();
    assert!(why.contains("mem driver") && why.contains("uring"), "{why}");
    for layer in ["engine", "queue", "device"] {
        let variant = variants
            .iter()
            .find(|variant| variant["stubbed"] == layer)
            .unwrap();
        assert!(variant["skipped"].is_null(), "{variant}");
        assert!(variant["ios"].as_u64().unwrap() > 1000, "{variant}");
    }
    let shares: Vec<&str> = report["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|share| share["layer"].as_str().unwrap())
        .collect();
    assert_eq!(shares, ["engine", "queue", "device"]);
}
