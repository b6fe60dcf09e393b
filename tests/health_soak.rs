//! Volume health over time, on three fathom-node processes whose devices have a 1 ms media
//! latency, with a checker client remembering every acknowledged write and fio's nbd engine
//! as load. Short in CI; `bench/health-soak` runs them at full length (10 minutes each) and
//! the detection benchmark:
//!
//! - no false positive under load that saturates the devices (more IO in flight than their
//!   queues take: latency rises by queueing alone);
//! - no false positive while a replica is resynchronised again and again (it is killed and
//!   comes back, under writes);
//! - no false positive in a node-wide slowdown: both volumes whose primary is node a slowed
//!   alike, tenfold (a node fault, reported as one), no volume degraded or moved;
//! - an unchanged node's canaries stay green, and a change of the clients' IO shape is
//!   reported as drift, not as a regression;
//! - (benchmark, `--ignored`) detection and reparent times over many injections of one fault
//!   profile on the primary's device: `FATHOM_HEALTH_PROFILE` (step20, step3, ramp, spikes,
//!   stall) and `FATHOM_HEALTH_INJECTIONS` (20).
//!
//! `FATHOM_HEALTH_SOAK_SECS` sets the soaks' length (20 s unless set).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::health::{
    events, finish, fio, fio_done, fio_sized, fio_stop, flash_like, health, health_of, inject,
    learned_within, load, unix_ms, verdicts, wait_for, wait_learned,
};
use serde_json::Value;

fn soak_seconds() -> u64 {
    std::env::var("FATHOM_HEALTH_SOAK_SECS")
        .ok()
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("FATHOM_HEALTH_SOAK_SECS={value:?} is not a number"))
        })
        .unwrap_or(20)
}

/// A false positive is a volume degraded or an action taken; a second of suspicion that
/// passes is neither (it is counted).
fn no_false_positive(cluster: &Cluster, what: &str) {
    let changes = verdicts(cluster);
    let suspect = changes
        .iter()
        .filter(|event| event["to"] == "suspect")
        .count();
    let bad: Vec<&Value> = changes
        .iter()
        .filter(|event| event["event"] == "action" || event["to"] == "degraded")
        .collect();
    assert!(bad.is_empty(), "{what}: a false positive: {bad:#?}");
    println!("{what}: no volume degraded, no action taken ({suspect} suspect seconds that passed)");
}

/// The cluster tests of this file one at a time: each is three nodes and their clients on a
/// machine of two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn no_false_positive_under_load_that_saturates_the_devices() {
    let _serial = serial();
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    // Learned at one client's load, then fio on top, with more IO in flight than the
    // devices' queues take: the IO waits its turn, latency rises by queueing alone, and no
    // device is slower than before.
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 11, stop.clone());
    wait_learned(&cluster, 0, "vol0");
    let output = cluster.nodes[0].dir.join("fio.json");
    let fio = fio(&cluster.uri(0), "randrw", 4, 128, soak_seconds(), &output);
    let iops = fio_done(&cluster, fio, &output);
    println!("saturating fio: {iops:.0} IO/s for {} s", soak_seconds());
    finish(&stop, vec![client]);
    no_false_positive(&cluster, "load that saturates the devices");
}

#[test]
fn no_false_positive_while_a_replica_is_resynchronised_again_and_again() {
    let _serial = serial();
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 21, stop.clone());
    wait_learned(&cluster, 0, "vol0");
    let started = Instant::now();
    let mut resyncs = 0;
    while started.elapsed() < Duration::from_secs(soak_seconds()) {
        // c goes away for 3 s of writes, comes back and is caught up under them.
        cluster.kill(2);
        std::thread::sleep(Duration::from_secs(3));
        cluster.start_node(2);
        flash_like_node(&cluster, 2);
        cluster.wait_peers(0, Duration::from_secs(60), "in sync", |peer| {
            peer["state"] == "open" && peer["in_sync"] == true
        });
        resyncs += 1;
    }
    println!("{resyncs} resyncs in {:?}", started.elapsed());
    finish(&stop, vec![client]);
    // The returning node's own first seconds (no baseline yet) count as much as any.
    no_false_positive(&cluster, "a replica's resync");
}

/// Node `index`'s device back at its media latency after a restart (rules do not persist).
fn flash_like_node(cluster: &Cluster, index: usize) {
    inject(
        cluster,
        index,
        "nvme0",
        &[
            "--layer",
            "media",
            "--latency",
            common::health::DEVICE_LATENCY,
        ],
    );
}

#[test]
fn a_node_wide_slowdown_is_a_node_fault_and_no_volume_is_degraded() {
    let _serial = serial();
    // vol1 on a device of its own, primary a as vol0's.
    let cluster = Cluster::start_with(
        3,
        "[[device]]\nname = \"nvme1\"\ndriver = \"mem\"\nmedia = \"file\"\nsize = \"80MiB\"\n\
         block_size = 4096\n\
         [[volume]]\nname = \"vol1\"\ndevice = \"nvme1\"\nsize = \"64MiB\"\n\
         replicas = [\"a\", \"b\", \"c\"]\nprimary = \"a\"\n",
    );
    flash_like(&cluster, &["nvme0", "nvme1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 31, stop.clone());
    let seconds = soak_seconds() + 40;
    let output = cluster.nodes[0].dir.join("fio-vol1.json");
    let vol1 = fio(
        &cluster.uri_of(0, "vol1"),
        "randwrite",
        1,
        8,
        seconds,
        &output,
    );
    wait_learned(&cluster, 0, "vol0");
    wait_learned(&cluster, 0, "vol1");
    // Everything of node a ten times slower: both devices alike (slow enough that each
    // volume alone would be sick).
    for device in ["nvme0", "nvme1"] {
        inject(&cluster, 0, device, &["--latency", "9ms"]);
    }
    std::thread::sleep(Duration::from_secs(soak_seconds()));
    let faults: Vec<Value> = events(&cluster, 0)
        .into_iter()
        .filter(|event| event["event"] == "node-fault")
        .collect();
    println!("node-fault events: {faults:#?}");
    println!("vol0: {}", health_of(&cluster, 0, "vol0")["reasons"]);
    let bad: Vec<Value> = verdicts(&cluster)
        .into_iter()
        .filter(|event| event["event"] == "action" || event["to"] == "degraded")
        .collect();
    assert!(
        bad.is_empty(),
        "a node-wide slowdown degraded or moved a volume: {bad:#?}"
    );
    assert!(
        faults.iter().any(|event| event["active"] == true),
        "the node fault is reported"
    );
    finish(&stop, vec![client]);
    fio_done(&cluster, vol1, &output);
}

#[test]
fn unchanged_canaries_stay_green_and_a_new_client_shape_is_drift_not_regression() {
    let _serial = serial();
    let cluster = Cluster::start_with(3, "[health]\ncanary_interval = \"2s\"\n");
    flash_like(&cluster, &["nvme0"]);
    // An unchanged node: its canaries learn, then stay green.
    wait_for(Duration::from_secs(90), "the canaries' baselines", || {
        (0..3)
            .all(|index| {
                let canary = &health(&cluster, index)["canary"];
                canary["learning"].as_array().is_some_and(Vec::is_empty)
                    && canary["interval"].as_u64() >= Some(20)
            })
            .then_some(())
    });
    let green_from = unix_ms();
    std::thread::sleep(Duration::from_secs(soak_seconds()));
    let red: Vec<Value> = (0..3)
        .flat_map(|index| events(&cluster, index))
        .filter(|event| event["event"] == "canary" && event["red"] == true)
        .filter(|event| event["unix_ms"].as_u64() >= Some(green_from))
        .collect();
    assert!(
        red.is_empty(),
        "an unchanged node's canary turned red: {red:#?}"
    );
    println!("canaries green for {} s on every node", soak_seconds());

    // The clients' usual: 4 KiB random writes at depth 8, long enough to be the reference.
    let uri = cluster.uri(0);
    let output = cluster.nodes[0].dir.join("fio-write.json");
    let writes = fio(&uri, "randwrite", 1, 8, 15, &output);
    fio_done(&cluster, writes, &output);
    // Then reads of 64 KiB at depth 1: drift, whatever the canary says.
    let changed = unix_ms();
    let output = cluster.nodes[0].dir.join("fio-read.json");
    let reads = fio_sized(&uri, "randread", "64k", 1, 1, 15, &output);
    let drift = wait_for(Duration::from_secs(20), "a drift event", || {
        events(&cluster, 0).into_iter().find(|event| {
            event["event"] == "drift"
                && event["active"] == true
                && event["unix_ms"].as_u64() >= Some(changed)
        })
    });
    println!("{drift}");
    let status = health(&cluster, 0);
    assert_eq!(status["cause"], "drift", "{status}");
    fio_done(&cluster, reads, &output);
}

/// The fault profiles, on a 1 ms device: the rule added at the primary's device layer.
fn profile(name: &str) -> (&'static [&'static str], Duration) {
    match name {
        "step20" => (&["--latency", "19ms"], Duration::from_secs(30)),
        "step3" => (&["--latency", "2ms"], Duration::from_secs(60)),
        "ramp" => (
            &["--latency", "1ms", "--profile", "ramp(x1,x19,20s)"],
            Duration::from_secs(60),
        ),
        "spikes" => (
            &["--latency", "1ms", "--profile", "spikes(x19,2s,500ms)"],
            Duration::from_secs(60),
        ),
        "stall" => (&["--stall"], Duration::from_secs(30)),
        other => {
            panic!("FATHOM_HEALTH_PROFILE={other:?}: one of step20, step3, ramp, spikes, stall")
        }
    }
}

/// Which node is vol0's primary now, as the nodes' health says.
fn primary(cluster: &Cluster) -> usize {
    wait_for(Duration::from_secs(30), "a primary", || {
        (0..cluster.nodes.len()).find(|&index| health(cluster, index)["role"] == "primary")
    })
}

fn percentiles(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "none".into();
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} min {:.0} p50 {:.0} p90 {:.0} max {:.0}",
        values.len(),
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

#[test]
#[ignore = "a benchmark: bench/health-soak runs it per profile"]
fn detection_and_reparent_times_over_many_injections() {
    let _serial = serial();
    let name = std::env::var("FATHOM_HEALTH_PROFILE").unwrap_or_else(|_| "step20".into());
    let injections: usize = std::env::var("FATHOM_HEALTH_INJECTIONS")
        .ok()
        .map(|value| value.parse().expect("FATHOM_HEALTH_INJECTIONS is a number"))
        .unwrap_or(20);
    let (rule, timeout) = profile(&name);
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    // The client and fio on node a, whichever node is the primary (a forwards to it).
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 41, stop.clone());
    let output = cluster.nodes[0].dir.join("fio.json");
    let fio_run = fio(&cluster.uri(0), "randrw", 1, 16, 24 * 3600, &output);
    let (mut detection, mut reparent, mut missed, mut failed, mut unsettled) =
        (Vec::new(), Vec::new(), 0, Vec::new(), 0);
    for cycle in 0..injections {
        let at = primary(&cluster);
        // The last injection is cleared: its primary is healthy again before the next one,
        // or this is a false positive (counted, and shown).
        if let Err(status) = learned_within(&cluster, at, "vol0", Duration::from_secs(120)) {
            unsettled += 1;
            println!(
                "{name} #{cycle} on {}: not healthy within 120 s of the last clear: {} {}",
                cluster.nodes[at].id, status["health"], status["reasons"]
            );
            continue;
        }
        let injected = unix_ms();
        let mut args = rule.to_vec();
        args.extend(["--layer", "device"]);
        inject(&cluster, at, "nvme0", &args);
        let after = |event: &Value| event["unix_ms"].as_u64() >= Some(injected);
        let degraded = (|| {
            let started = Instant::now();
            while started.elapsed() < timeout {
                if let Some(event) = events(&cluster, at).into_iter().find(|event| {
                    after(event) && event["event"] == "state" && event["to"] == "degraded"
                }) {
                    return Some(event);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })();
        let line = match &degraded {
            None => {
                missed += 1;
                // What the detector saw at the end: its sign, why, and its inputs.
                let status = health_of(&cluster, at, "vol0");
                let inputs = &status["inputs"];
                format!(
                    "not degraded within {timeout:?}: {} {} {}; peer ratios {}; {:.0} IO/s (carried {}), depth {:.1} (typical {})",
                    status["health"],
                    status["sign"],
                    status["reasons"],
                    inputs["peer_ratios"],
                    inputs["read_iops"].as_f64().unwrap_or(0.0)
                        + inputs["write_iops"].as_f64().unwrap_or(0.0),
                    inputs["model_max_iops"],
                    inputs["depth"].as_f64().unwrap_or(0.0),
                    inputs["typical_depth"],
                )
            }
            Some(event) => {
                let took = event["unix_ms"].as_u64().unwrap() - injected;
                detection.push(took as f64);
                let moved = wait_for(Duration::from_secs(20), "the reparent's outcome", || {
                    events(&cluster, at).into_iter().find(|event| {
                        after(event)
                            && (event["event"] == "reparented"
                                || event["event"] == "reparent-failed"
                                || (event["event"] == "action" && event["taken"] == false))
                    })
                });
                match moved["event"].as_str() {
                    Some("reparented") => {
                        let ms = moved["elapsed_ms"].as_f64().unwrap();
                        reparent.push(ms);
                        format!(
                            "degraded after {took} ms, reparented to {} in {ms:.0} ms",
                            moved["to"]
                        )
                    }
                    _ => {
                        failed.push(moved["reasons"].to_string());
                        format!(
                            "degraded after {took} ms, not reparented: {}",
                            moved["reasons"]
                        )
                    }
                }
            }
        };
        println!("{name} #{cycle} on {}: {line}", cluster.nodes[at].id);
        // The device is mended.
        let (ok, text) = cluster.ctl(at, &["inject", "clear", "nvme0", "--layer", "device"]);
        assert!(ok, "{text}");
        if degraded.is_some() {
            // Its next primary serves before the next cycle.
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let fio_iops = fio_stop(&cluster, fio_run, &output);
    finish(&stop, vec![client]);
    println!(
        "profile {name}: {injections} injections; detection ms {}; reparent ms {}; not degraded {missed}; not reparented {}{}; not healthy again after a clear {unsettled}; fio {fio_iops:.0} IO/s, no IO error; every acknowledged write read back",
        percentiles(&mut detection),
        percentiles(&mut reparent),
        failed.len(),
        match failed.first() {
            Some(first) => format!(" (first: {first})"),
            None => String::new(),
        }
    );
}
