//! Helpers of the volume health tests and benchmarks: a node's health status and events,
//! run-time injection, client load, and waiting for the detector to learn.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::Cluster;

/// The devices' own latency, at their media layer: a network-attached or busy disk's, well
/// above the scheduling noise of three nodes and their clients sharing two cores in a debug
/// build (about a millisecond at p99). Faults are injected at the device layer above it, so
/// clearing them leaves this.
pub const DEVICE_LATENCY: &str = "1ms";

/// `fathom-ctl --json health VOLUME` on node `index`.
pub fn health_of(cluster: &Cluster, index: usize, volume: &str) -> Value {
    let (ok, text) = cluster.ctl(index, &["--json", "health", volume]);
    assert!(ok, "fathom-ctl health: {text}");
    let status: Value = serde_json::from_str(&text).unwrap();
    status["volumes"][0].clone()
}

/// Node `index`'s health of vol0.
pub fn health(cluster: &Cluster, index: usize) -> Value {
    health_of(cluster, index, "vol0")
}

/// Node `index`'s health events so far.
pub fn events(cluster: &Cluster, index: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(cluster.nodes[index].dir.join("health-events.jsonl"))
        .unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("each event is one JSON line"))
        .collect()
}

/// Every node's state changes and actions.
pub fn verdicts(cluster: &Cluster) -> Vec<Value> {
    (0..cluster.nodes.len())
        .flat_map(|index| events(cluster, index))
        .filter(|event| event["event"] == "state" || event["event"] == "action")
        .collect()
}

/// Adds `args` as an injection rule on node `index`'s device nvme0 (the device layer).
pub fn inject(cluster: &Cluster, index: usize, device: &str, args: &[&str]) {
    let mut all = vec!["inject", "add", device];
    all.extend_from_slice(args);
    let (ok, text) = cluster.ctl(index, &all);
    assert!(ok, "inject {args:?}: {text}");
}

/// Gives every node's devices their media latency ([`DEVICE_LATENCY`]).
pub fn flash_like(cluster: &Cluster, devices: &[&str]) {
    for index in 0..cluster.nodes.len() {
        for device in devices {
            inject(
                cluster,
                index,
                device,
                &["--layer", "media", "--latency", DEVICE_LATENCY],
            );
        }
    }
}

/// Polls `until` every 100 ms for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut until: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = until() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A checker client writing through node `index` until `stop`, remembering every write it
/// was acknowledged; it hands itself back.
pub fn load(
    cluster: &Cluster,
    index: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<fathom::checker::Client> {
    let mut client = cluster.checker(index, seed);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let end = client.run(Duration::from_millis(200));
            assert!(end.is_ok(), "the client's IO failed: {end:?}");
        }
        client
    })
}

/// Stops the clients, checks every acknowledged write reads back and none failed.
pub fn finish(stop: &AtomicBool, clients: Vec<std::thread::JoinHandle<fathom::checker::Client>>) {
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let mut client = client.join().expect("no client IO failed");
        client.sync().unwrap();
        client.verify_all().unwrap();
        let stats = client.summary().stats;
        println!("{}", client.summary());
        assert_eq!(
            (stats.writes_failed, stats.flushes_failed),
            (0, 0),
            "{}",
            client.summary()
        );
    }
}

/// Waits until node `index`'s detector of `volume` learned what healthy looks like: the
/// peer ratio (on a primary) and the self-model.
pub fn wait_learned(cluster: &Cluster, index: usize, volume: &str) {
    if let Err(status) = learned_within(cluster, index, volume, Duration::from_secs(60)) {
        panic!(
            "node {}'s detector of {volume} did not learn within 60 s: {status:#}",
            cluster.nodes[index].id
        );
    }
}

/// As [`wait_learned`] for at most `timeout`; the last status if it did not.
pub fn learned_within(
    cluster: &Cluster,
    index: usize,
    volume: &str,
    timeout: Duration,
) -> Result<(), Value> {
    let started = Instant::now();
    loop {
        let status = health_of(cluster, index, volume);
        let inputs = &status["inputs"];
        if status["health"] == "healthy"
            && (status["role"] != "primary"
                || inputs["peer_ratios"]
                    .as_array()
                    .is_some_and(|peers| peers.iter().all(|peer| peer["baseline"].is_number())))
            && inputs["model_points"].as_u64().unwrap_or(0) >= 10
        {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Now, in ms since the epoch: events carry their time so.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// fio's nbd engine on `uri` for `seconds`, away from the checker's first 4 MiB: `jobs`
/// connections of `iodepth` each, 4 KiB random IO (`rw` as fio names it). Its JSON goes to
/// `output`; [`fio_done`] checks it.
pub fn fio(
    uri: &str,
    rw: &str,
    jobs: u32,
    iodepth: u32,
    seconds: u64,
    output: &std::path::Path,
) -> std::process::Child {
    fio_sized(uri, rw, "4k", jobs, iodepth, seconds, output)
}

/// As [`fio`], with IOs of `bs` (as fio writes sizes: `64k`).
pub fn fio_sized(
    uri: &str,
    rw: &str,
    bs: &str,
    jobs: u32,
    iodepth: u32,
    seconds: u64,
    output: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--offset=16M",
            "--size=32M",
            &format!("--numjobs={jobs}"),
            &format!("--iodepth={iodepth}"),
            "--time_based=1",
            &format!("--runtime={seconds}"),
            "--group_reporting=1",
            "--output-format=json",
            &format!("--output={}", output.display()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fio (install Debian's fio; scripts/test does)")
}

/// Waits for a [`fio`] run and panics unless it ended with no IO error (with `cluster`'s
/// logs); its IOPS.
pub fn fio_done(cluster: &Cluster, child: std::process::Child, output: &std::path::Path) -> f64 {
    fio_end(cluster, child, output, false)
}

/// As [`fio_done`], for a run stopped now (SIGINT: fio reports what it did, and exits 128).
pub fn fio_stop(cluster: &Cluster, child: std::process::Child, output: &std::path::Path) -> f64 {
    // SAFETY: a signal to the test's own child process, waited for below.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    fio_end(cluster, child, output, true)
}

fn fio_end(
    cluster: &Cluster,
    mut child: std::process::Child,
    output: &std::path::Path,
    interrupted: bool,
) -> f64 {
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(output).unwrap_or_default();
    let head: String = text.lines().take(5).collect::<Vec<_>>().join("\n");
    let expected = status.success() || (interrupted && status.code() == Some(128));
    assert!(
        expected,
        "fio failed ({status}): {head}\n{}",
        cluster.logs()
    );
    let json: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .unwrap_or_else(|error| panic!("fio output: {error}\n{text}"));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio saw an IO error: {job}");
    job["read"]["iops"].as_f64().unwrap_or(0.0) + job["write"]["iops"].as_f64().unwrap_or(0.0)
}
