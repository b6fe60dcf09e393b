//! Volume health on real nodes: three fathom-node processes on a control plane (etcd), their
//! devices given a flash-like latency, a client writing through the primary and remembering
//! every acknowledged write (`fathom::checker`).
//!
//! - A 20x step of the primary's device latency (run-time injection): the primary's volume
//!   is degraded within 5 s, reparented to an in-sync replica through the control plane
//!   within 1 s of the verdict, no client IO fails and every acknowledged write reads back.
//! - An advise-only volume is degraded and told what would be done, and stays put.
//! - A slow primary that cannot be reparented (its other replica is down) hedges its reads to
//!   its in-sync replica: the clients' read p99 falls under the slow device's latency, and
//!   every read matches what was acknowledged.
//! - A canary: a +30% step at its device stage turns it red within one interval, naming the
//!   stage; unchanged it stays green.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::health::{
    events, finish, fio, fio_stop, flash_like, health, inject, load, unix_ms, wait_for,
    wait_learned,
};

#[test]
fn a_20x_slower_primary_is_degraded_within_5_s_and_reparented_with_no_client_io_failing() {
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 7, stop.clone());
    wait_learned(&cluster, 0, "vol0");

    // The 20x step: 1 ms more 19 ms.
    inject(&cluster, 0, "nvme0", &["--latency", "19ms"]);
    let injected = unix_ms();
    let degraded = wait_for(Duration::from_secs(15), "a degraded verdict", || {
        events(&cluster, 0)
            .into_iter()
            .find(|event| event["event"] == "state" && event["to"] == "degraded")
    });
    let detection = Duration::from_millis(degraded["unix_ms"].as_u64().unwrap() - injected);
    println!("degraded after {detection:?}: {degraded}");
    let reparented = wait_for(Duration::from_secs(15), "the reparent", || {
        events(&cluster, 0).into_iter().find(|event| {
            event["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("reparent"))
        })
    });
    println!("{reparented}");
    assert_eq!(
        reparented["event"],
        "reparented",
        "{reparented}\n{}",
        cluster.logs()
    );
    let elapsed_ms = reparented["elapsed_ms"].as_f64().unwrap();
    assert!(
        detection < Duration::from_secs(5),
        "degraded {detection:?} after the step"
    );
    assert!(elapsed_ms < 1000.0, "the reparent took {elapsed_ms} ms");
    let reasons = degraded["reasons"].to_string();
    assert!(
        reasons.contains("peer ratio"),
        "the verdict says why: {reasons}"
    );

    // The control plane moved the primary; the client, still on a, goes on through it.
    let to = reparented["to"].as_str().unwrap().to_string();
    let new = cluster.nodes.iter().position(|node| node.id == to).unwrap();
    cluster.wait_serving(new, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    finish(&stop, vec![client]);
    let old = health(&cluster, 0);
    assert_eq!(old["role"], "replica", "{old}");
    // The operator's view: the table, then why.
    let (ok, table) = cluster.ctl(0, &["health"]);
    assert!(ok, "{table}");
    println!("{table}");
    assert!(
        table.starts_with("VOLUME  ROLE")
            && table.contains("vol0    replica")
            && table.contains("action: reparent to"),
        "{table}"
    );
}

#[test]
fn an_advise_only_volume_is_degraded_and_told_what_would_be_done_but_not_moved() {
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    let (ok, text) = cluster.ctl(0, &["health", "vol0", "--advise", "on"]);
    assert!(ok && text.contains("advise-only"), "{text}");
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 9, stop.clone());
    wait_learned(&cluster, 0, "vol0");
    inject(&cluster, 0, "nvme0", &["--latency", "19ms"]);
    let advised = wait_for(Duration::from_secs(15), "the advice", || {
        events(&cluster, 0)
            .into_iter()
            .find(|event| event["event"] == "action")
    });
    println!("{advised}");
    assert_eq!(advised["taken"], false, "{advised}");
    assert!(
        advised["reasons"]
            .to_string()
            .contains("advise: reparent to"),
        "{advised}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let status = health(&cluster, 0);
    assert_eq!(status["role"], "primary", "nothing moved: {status}");
    assert_eq!(status["health"], "degraded", "{status}");
    finish(&stop, vec![client]);
}

#[test]
fn a_slow_primary_that_cannot_be_reparented_hedges_its_reads_to_its_replica() {
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    flash_like(&cluster, &["nvme0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&cluster, 0, 11, stop.clone());
    let output = cluster.nodes[0].dir.join("fio.json");
    let reads = fio(&cluster.uri(0), "randread", 1, 8, 3600, &output);
    wait_learned(&cluster, 0, "vol0");
    // c is gone: a reparent would leave fewer than two healthy copies, so a stays primary.
    cluster.kill(2);
    std::thread::sleep(Duration::from_secs(2));
    inject(&cluster, 0, "nvme0", &["--latency", "19ms"]);
    let hedging = wait_for(Duration::from_secs(15), "hedged reads", || {
        events(&cluster, 0)
            .into_iter()
            .find(|event| event["event"] == "hedge" && event["active"] == true)
    });
    println!("{hedging}");
    let refused = wait_for(Duration::from_secs(15), "the reparent refused", || {
        events(&cluster, 0)
            .into_iter()
            .find(|event| event["event"] == "action" && event["taken"] == false)
    });
    assert!(
        refused["reasons"].to_string().contains("fewer than two"),
        "{refused}"
    );
    // The clients' reads are answered by b once a's copy is late: their p99 falls well
    // under the 20 ms a's device takes now.
    std::thread::sleep(Duration::from_secs(3));
    let status = wait_for(
        Duration::from_secs(20),
        "reads answered by the replica",
        || {
            let status = health(&cluster, 0);
            let inputs = &status["inputs"];
            println!(
                "{} {} reads p99 {} hedged {} replica first {}",
                status["health"],
                status["role"],
                inputs["read_p99_us"],
                inputs["hedged_reads"],
                inputs["hedge_wins"]
            );
            (inputs["hedge_wins"].as_u64() > Some(50)
                && inputs["read_p99_us"]
                    .as_f64()
                    .is_some_and(|p99| p99 < 10_000.0))
            .then_some(status)
        },
    );
    println!("{:#}", status["inputs"]);
    assert_eq!(status["role"], "primary", "{status}");
    assert_ne!(status["health"], "healthy", "{status}");
    // No read failed; every acknowledged write reads back (through the hedges too).
    fio_stop(&cluster, reads, &output);
    finish(&stop, vec![client]);
    let (ok, text) = cluster.ctl(0, &["health", "vol0"]);
    assert!(ok && text.contains("hedging reads"), "{text}");
}

#[test]
fn a_30_percent_slower_device_turns_the_canary_red_within_one_interval_naming_the_stage() {
    let cluster = Cluster::start_with(
        3,
        "[health]\ncanary_period = \"10ms\"\ncanary_interval = \"1s\"\n",
    );
    flash_like(&cluster, &["nvme0"]);
    // Green once every stage has its baseline.
    let canary = wait_for(Duration::from_secs(40), "the canary's baseline", || {
        let canary = health(&cluster, 1)["canary"].clone();
        (canary["learning"].as_array().is_some_and(Vec::is_empty)
            && canary["interval"].as_u64() > Some(12))
        .then_some(canary)
    });
    assert_eq!(canary["red"], false, "an unchanged node is green: {canary}");
    let baseline_us = canary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["stage"] == "probe_write device")
        .and_then(|stage| stage["baseline_p50_us"].as_f64())
        .expect("the device stage has a baseline");
    let step = format!("{}us", (baseline_us * 0.3).ceil() as u64);
    println!("canary baseline {baseline_us:.1} us; adding {step}");
    let interval = canary["interval"].as_u64().unwrap();
    inject(&cluster, 1, "nvme0", &["--latency", &step]);
    let injected = Instant::now();
    let red = wait_for(Duration::from_secs(10), "a red canary", || {
        let canary = health(&cluster, 1)["canary"].clone();
        (canary["red"] == true).then_some(canary)
    });
    println!("red after {:?}: {red}", injected.elapsed());
    let reasons = red["reasons"].to_string();
    assert!(
        reasons.contains("device"),
        "the verdict names the stage: {reasons}"
    );
    // fathom-stat shows it from the status beside the region, as /metrics does.
    let region = cluster.nodes[1].dir.join("stats");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fathom-stat"))
        .args([
            "--region",
            &region.display().to_string(),
            "--health",
            "--json",
            "1",
            "1",
        ])
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["health"]["volumes"][0]["volume"], "vol0", "{line}");
    assert!(
        line["health"]["volumes"][0]["canary"]["stages"].is_array(),
        "{line}"
    );
    assert!(
        red["interval"].as_u64().unwrap() <= interval + 2,
        "red in the first whole interval after the step (the step came in interval {interval}): {red}"
    );
}
