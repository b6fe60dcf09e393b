//! Telemetry as a user sees it: latency injected into the device shows up in fathom-stat's
//! percentiles, in its HdrHistogram log and on the Prometheus endpoint; the reader refuses a
//! region it does not understand and follows a node across a restart.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fathom::workload::{Pattern, WorkloadSpec, WorkloadTask};
use fathom_engine::{Config, Engine};

const STAT: &str = env!("CARGO_BIN_EXE_fathom-stat");

/// These tests measure latencies with a busy-polling reactor on core 0: one at a time, or they
/// would time-slice the core and measure each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn hugepages() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .is_some_and(|free| free >= 16)
}

/// A node with one ram device (inline controller) whose reads get `inject` rules.
fn config(dir: &Path, id: &str, inject: &str) -> Config {
    Config::parse(&config_text(dir, id, inject)).unwrap()
}

/// The TOML of [`config`], for tests that start the fathom-node program.
fn config_text(dir: &Path, id: &str, inject: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\ndata_dir = {dir:?}\n[dma]\nsize = \"16MiB\"\nhugepages = {huge}\n\
         [reactor]\ncores = [0]\npoll = \"busy\"\n[telemetry]\nregion = {region:?}\nmetrics = \"\"\n[nbd]\nlisten = []\n\
         [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"ram\"\nsize = \"64MiB\"\n{inject}\n\
         [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n",
        dir = dir.display().to_string(),
        region = dir.join("stats").display().to_string(),
        huge = hugepages(),
    )
}

/// Runs a 4 KiB random-read workload at `iodepth` on the node's reactor for `seconds`.
fn drive(
    engine: &Engine,
    iodepth: usize,
    seconds: f64,
) -> crossbeam_channel::Receiver<fathom::workload::WorkloadResult> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let spec = WorkloadSpec {
        volume: engine.volume("vol0").unwrap().id,
        pattern: Pattern::Randread,
        block_size: 4096,
        iodepth,
        span_bytes: 64 << 20,
        runtime: Duration::from_secs_f64(seconds),
        ramp: Duration::ZERO,
        seed: 1,
        read_percent: 100,
    };
    let task = WorkloadTask::new(spec, engine.dma(), *engine.clock(), tx).unwrap();
    engine.spawn(0, Box::new(task)).unwrap();
    rx
}

fn stat_json(region: &Path, extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    let output = Command::new(STAT)
        .arg("--region")
        .arg(region)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fathom-stat failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (
        reports,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn stage<'a>(report: &'a serde_json::Value, op: &str, stage: &str) -> &'a serde_json::Value {
    let row = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["op"] == op)
        .unwrap_or_else(|| panic!("no {op} row in {report}"));
    row["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap()
}

#[test]
fn an_injected_device_latency_is_what_fathom_stat_reports() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&config(
        dir.path(),
        "lat",
        "[[device.inject]]\nops = [\"read\"]\nlatency = \"200us\"\n",
    ))
    .unwrap();
    let done = drive(&engine, 8, 4.0);
    std::thread::sleep(Duration::from_millis(300));
    let log = dir.path().join("hdr.log");
    let (reports, _) = stat_json(
        &dir.path().join("stats"),
        &["--hdr-log", log.to_str().unwrap(), "1", "2"],
    );
    done.recv_timeout(Duration::from_secs(30)).unwrap();
    let report = reports.last().unwrap();
    let device = stage(report, "read", "device");
    let p50 = device["p50_ns"].as_f64().unwrap();
    assert!(
        (180_000.0..=220_000.0).contains(&p50),
        "device p50 {p50} ns, 200 us injected: {report}"
    );
    let total = stage(report, "read", "total");
    assert!(
        total["p50_ns"].as_f64().unwrap() >= p50,
        "total is at least the device stage: {report}"
    );
    assert!(total["count"].as_u64().unwrap() > 1000, "{report}");
    let row = &report["volumes"][0];
    let ios = row["ios"].as_f64().unwrap();
    assert!(
        (row["iops"].as_f64().unwrap() * report["interval_s"].as_f64().unwrap() - ios).abs() < 1.0,
        "{row}"
    );

    // The HdrHistogram log holds the same distribution, in nanoseconds.
    let bytes = std::fs::read(&log).unwrap();
    let mut found = 0;
    for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&bytes) {
        if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(interval)) = entry {
            if interval.tag().map(|tag| tag.as_str()) == Some("vol0.read.device") {
                let decoded = base64_decode(interval.encoded_histogram());
                let histogram: hdrhistogram::Histogram<u64> =
                    hdrhistogram::serialization::Deserializer::new()
                        .deserialize(&mut decoded.as_slice())
                        .unwrap();
                let p50 = histogram.value_at_quantile(0.5) as f64;
                assert!(
                    (180_000.0..=220_000.0).contains(&p50),
                    "hdr log device p50 {p50}"
                );
                found += 1;
            }
        }
    }
    assert_eq!(found, 2, "one vol0.read.device histogram per interval");
    engine.shutdown().unwrap();
}

fn base64_decode(text: &str) -> Vec<u8> {
    let table: Vec<u8> =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".to_vec();
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text.bytes().filter(|&byte| byte != b'=') {
        buffer = buffer << 6 | table.iter().position(|&c| c == byte).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

#[test]
fn a_slow_tail_shows_in_p99_but_not_in_p50() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&config(
        dir.path(),
        "tail",
        "[[device.inject]]\nops = [\"read\"]\nfraction = 0.015\nlatency = \"2ms\"\n",
    ))
    .unwrap();
    let done = drive(&engine, 16, 4.0);
    std::thread::sleep(Duration::from_millis(300));
    let (reports, _) = stat_json(&dir.path().join("stats"), &["2", "1"]);
    done.recv_timeout(Duration::from_secs(30)).unwrap();
    let report = &reports[0];
    for name in ["device", "total"] {
        let stage = stage(report, "read", name);
        let (p50, p90, p99) = (
            stage["p50_ns"].as_f64().unwrap(),
            stage["p90_ns"].as_f64().unwrap(),
            stage["p99_ns"].as_f64().unwrap(),
        );
        assert!(
            p50 < 200_000.0 && p90 < 200_000.0,
            "{name}: the fast 98.5% set p50/p90: {stage}"
        );
        assert!(
            p99 >= 1_800_000.0,
            "{name}: 1.5% of IOs at 2 ms must show in p99: {stage}"
        );
    }
    engine.shutdown().unwrap();
}

#[test]
fn a_region_of_the_wrong_kind_or_version_is_refused_clearly() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    std::fs::write(&path, vec![b'x'; 8192]).unwrap();
    let output = Command::new(STAT)
        .arg("--region")
        .arg(&path)
        .args(["1", "1"])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && error.contains("not a fathom stats region"),
        "{error}"
    );

    let engine = Engine::start(&config(dir.path(), "ver", "")).unwrap();
    let mut bytes = std::fs::read(dir.path().join("stats")).unwrap();
    engine.shutdown().unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let output = Command::new(STAT)
        .arg("--region")
        .arg(&path)
        .args(["1", "1"])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && error.contains("version 99")
            && error.contains(&format!(
                "reads version {}",
                fathom_telemetry::region::VERSION
            )),
        "{error}"
    );
}

#[test]
fn the_reader_follows_a_node_that_stops_and_restarts() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("stats");
    let first = Engine::start(&config(dir.path(), "alpha", "")).unwrap();
    let done = drive(&first, 4, 1.5);
    let reader = Command::new(STAT)
        .arg("--region")
        .arg(&region)
        .args(["--json", "--interval", "0.4", "--count", "14"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    done.recv_timeout(Duration::from_secs(30)).unwrap();
    first.shutdown().unwrap();
    drop(first);
    std::thread::sleep(Duration::from_millis(1200));
    let second = Engine::start(&config(dir.path(), "beta", "")).unwrap();
    let done = drive(&second, 4, 2.5);
    let output = reader.wait_with_output().unwrap();
    done.recv_timeout(Duration::from_secs(30)).unwrap();
    second.shutdown().unwrap();
    let notes = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{notes}");
    assert!(
        notes.contains("stopped cleanly"),
        "the stop is reported: {notes}"
    );
    assert!(
        notes.contains("restarted"),
        "the restart is reported: {notes}"
    );
    let reports: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let busy = |node: &str| {
        reports
            .iter()
            .filter(|r| r["node"] == node && r["volumes"].as_array().is_some_and(|v| !v.is_empty()))
            .count()
    };
    assert!(
        busy("alpha") >= 1 && busy("beta") >= 1,
        "reports from both lives of the node: {reports:?}"
    );
}

#[test]
fn the_metrics_endpoint_passes_promtool() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&config(
        dir.path(),
        "prom",
        "[[device.inject]]\nops = [\"read\"]\nlatency = \"50us\"\n",
    ))
    .unwrap();
    drive(&engine, 4, 0.5)
        .recv_timeout(Duration::from_secs(30))
        .unwrap();
    let server = fathom::metrics::MetricsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("stats"),
    )
    .unwrap();
    let mut stream = std::net::TcpStream::connect(server.address()).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    for expect in [
        "fathom_io_stage_seconds_bucket{node=\"prom\",volume=\"vol0\",op=\"read\",stage=\"device\",le=\"0.0001\"}",
        "fathom_volume_ios_total{node=\"prom\",volume=\"vol0\",op=\"read\"}",
        "fathom_queue_busy_seconds_total{node=\"prom\",device=\"nvme0\",core=\"0\"}",
    ] {
        assert!(body.contains(expect), "{expect} missing from\n{body}");
    }
    // 50 us per read: all device-stage reads are under 100 us and none under 25 us.
    let value = |series: &str| -> f64 {
        body.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let prefix = "fathom_io_stage_seconds_bucket{node=\"prom\",volume=\"vol0\",op=\"read\",stage=\"device\",le=";
    let count = value(
        "fathom_io_stage_seconds_count{node=\"prom\",volume=\"vol0\",op=\"read\",stage=\"device\"}",
    );
    assert!(count > 100.0);
    assert!(
        value(&format!("{prefix}\"0.0001\"}}")) >= 0.95 * count,
        "nearly all reads take under 100 us"
    );
    assert_eq!(
        value(&format!("{prefix}\"0.000025\"}}")),
        0.0,
        "none is faster than the injected 50 us"
    );
    assert_eq!(value(&format!("{prefix}\"+Inf\"}}")), count);

    common::promtool_check(body);
    drop(server);
    engine.shutdown().unwrap();
}

#[test]
fn the_reader_survives_a_node_killed_with_sigkill() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("stats");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, config_text(dir.path(), "victim", "")).unwrap();
    let mut node = Command::new(env!("CARGO_BIN_EXE_fathom-node"))
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !region.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node never created its region"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reader = Command::new(STAT)
        .arg("--region")
        .arg(&region)
        .args(["--interval", "0.3", "--count", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    node.kill().unwrap();
    node.wait().unwrap();
    let output = reader.wait_with_output().unwrap();
    let notes = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the reader keeps running: {notes}");
    assert!(notes.contains("exited without stopping cleanly"), "{notes}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("node victim"),
        "it reported while the node lived"
    );
}

#[test]
fn top_shows_the_node_live_and_quits_on_q() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&config(
        dir.path(),
        "topnode",
        "[[device.inject]]\nops = [\"read\"]\nlatency = \"20us\"\n",
    ))
    .unwrap();
    let done = drive(&engine, 4, 4.0);
    let session = format!("fathom-top-{}", std::process::id());
    let command = format!(
        "{STAT} top --region {} --interval 0.3",
        dir.path().join("stats").display()
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux (scripts/test installs it)")
    };
    assert!(tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "30",
        &command
    ])
    .status
    .success());
    std::thread::sleep(Duration::from_millis(1500));
    let screen =
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    let _ = tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tmux(&["has-session", "-t", &session]).status.success() {
        if std::time::Instant::now() > deadline {
            let _ = tmux(&["kill-session", "-t", &session]);
            panic!("top did not quit on q; screen was:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done.recv_timeout(Duration::from_secs(30)).unwrap();
    engine.shutdown().unwrap();
    for expect in [
        "node topnode",
        "vol0",
        "read",
        "device queues",
        "nvme0",
        "q quit",
    ] {
        assert!(
            screen.contains(expect),
            "{expect:?} not on the screen:\n{screen}"
        );
    }
}
