//! Three fathom-node processes on a control plane: a real etcd (Debian's etcd-server) on
//! loopback grants epochs by compare-and-swap and holds each node's lease. When the primary
//! is killed, an in-sync replica takes the volume over by itself once the lease is gone,
//! with no acknowledged write lost; the old primary returns as a replica and is caught up.
//! A primary cut off (the node's partition switch) acknowledges nothing once its lease may
//! have run out, and rejoins as a replica when healed; etcd losing a member, or stopping
//! altogether, loses nothing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::promtool_check;
use fathom::nbd_client::{Connection, NbdUri, Pipeline};
use fathom_cluster::etcd::{Etcd, Timeouts};
use fathom_cluster::schema::{Prefix, VolumeState};
use fathom_frontend::nbd::proto::Command;

fn etcd_state(cluster: &Cluster) -> VolumeState {
    let endpoints = cluster.etcd.as_ref().unwrap().endpoints();
    let mut etcd = Etcd::new(&endpoints, Timeouts::default()).unwrap();
    let key = Prefix::new("test").unwrap().state("vol0");
    let kv = etcd
        .get(&key)
        .unwrap()
        .expect("the volume's state is in etcd");
    VolumeState::decode(&key, None, &kv.value).unwrap()
}

/// Waits until one of `candidates` serves as the primary: it, and an instant before which
/// none did (the start of the last look that found none), for windows that must not count
/// what the new primary acknowledged.
fn wait_elected(cluster: &Cluster, candidates: &[usize], since: Instant) -> (usize, Instant) {
    let mut none_before = since;
    loop {
        let looked = Instant::now();
        if let Some(index) = cluster.serving(candidates) {
            return (index, none_before);
        }
        none_before = looked;
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "no new primary within 15 s\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_primary_fails_over_by_itself_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    let state = etcd_state(&cluster);
    assert_eq!(state.primary, "a", "{state:?}");
    let first_epoch = state.epoch;
    // The client is on c, a replica: c forwards to whoever is the primary.
    let mut client = cluster.checker(2, 51);
    client.run(Duration::from_millis(500)).unwrap();
    client.sync().unwrap();
    let before = client.summary().stats;

    let pid = cluster.pid(0);
    // SAFETY: a signal to the test's own child process, not yet waited for.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    cluster.reap(0);
    let new_primary = loop {
        if let Some(index) = cluster.serving(&[1, 2]) {
            break index;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no replica took the volume over within 15 s\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let failover = killed.elapsed();
    println!(
        "failover: node {} serves {failover:?} after the kill",
        cluster.nodes[new_primary].id
    );
    let state = etcd_state(&cluster);
    assert_eq!(state.primary, cluster.nodes[new_primary].id, "{state:?}");
    assert!(state.epoch > first_epoch, "{state:?}");
    assert!(
        !state.in_sync.contains(&"a".to_string()),
        "the dead primary left the in-sync set: {state:?}"
    );

    // The client, still on c, goes on; every write acknowledged before and after reads back.
    client.run(Duration::from_millis(500)).unwrap();
    client.sync().unwrap();
    client.verify_all().unwrap();
    let stats = client.summary().stats;
    println!("{}", client.summary());
    assert!(
        stats.writes_acked > before.writes_acked,
        "{}",
        client.summary()
    );

    // a returns as a replica of the new primary, is rebuilt, and rejoins the in-sync set.
    cluster.start_node(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let state = etcd_state(&cluster);
        if state.in_sync.len() == 3 {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "a did not rejoin the in-sync set: {state:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let a = cluster.replication(0);
    assert_eq!(a["role"], "replica", "{a}");
    // The operator's view, from etcd: every node with its lease, the volume's primary and
    // epoch, all three in sync, and the primary's view of its replicas.
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, text) = cluster.ctl_etcd(&["cluster", "status"]);
    println!("{text}");
    assert!(ok, "{text}");
    let primary_id = &cluster.nodes[new_primary].id;
    let line = text
        .lines()
        .find(|line| line.starts_with("vol0") && line.contains("64MiB"))
        .unwrap_or_else(|| panic!("no line for vol0: {text}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        &[
            "vol0",
            "64MiB",
            "a,b,c",
            primary_id.as_str(),
            &state.epoch.to_string(),
            "a,b,c"
        ],
        "{text}"
    );
    assert!(line.ends_with("serving"), "{text}");
    for node in ["a", "b", "c"] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(node) && line.contains("s of 2s")),
            "{text}"
        );
    }
    let (ok, json) = cluster.ctl_etcd(&["--json", "volume", "list"]);
    assert!(ok, "{json}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        report["volumes"][0]["state"]["primary"],
        primary_id.as_str(),
        "{report}"
    );
    assert_eq!(
        report["volumes"][0]["primary_view"]["peers"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{report}"
    );
    client.sync().unwrap();
    client.verify_all().unwrap();
    let sequence = cluster.replication(new_primary)["sequence"]
        .as_u64()
        .unwrap();
    cluster.wait_peers(new_primary, Duration::from_secs(60), "caught up", |peer| {
        peer["in_sync"] == true && peer["acknowledged"].as_u64() >= Some(sequence)
    });
    cluster.assert_copies_identical(new_primary);
}

/// A client's answer: when its write was sent, when the answer came, and whether it
/// acknowledged the write. Windows are judged by the send time: on a loaded machine the
/// client may read an answer the node sent in time well after it was sent.
#[derive(Debug, Clone, Copy)]
struct Answer {
    sent: Instant,
    at: Instant,
    ok: bool,
}

/// A QD 1 writer on `uri` until `stop`: every write's answer, in order. A connection that
/// fails ends it.
fn writer(uri: NbdUri, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Answer>> {
    std::thread::spawn(move || {
        let connection = Connection::open(&uri).unwrap();
        let mut pipeline = Pipeline::new(connection, 1, 4096, true).unwrap();
        pipeline.set_stall_timeout(Duration::from_secs(60));
        let mut answers = Vec::new();
        let mut next = 0u64;
        while !stop.load(Ordering::Acquire) {
            pipeline
                .submit(Command::Write, (next % 1024) * 4096, 4096, |data| {
                    data.fill(next as u8)
                })
                .unwrap();
            if pipeline.flush().is_err() {
                return answers;
            }
            loop {
                match pipeline.next_completion() {
                    Ok(Some(done)) => {
                        answers.push(Answer {
                            sent: done.sent,
                            at: done.completed,
                            ok: done.error == 0,
                        });
                        break;
                    }
                    Ok(None) => {
                        if pipeline.wait(Duration::from_millis(50)).is_err() {
                            return answers;
                        }
                    }
                    Err(_) => return answers,
                }
            }
            next += 1;
        }
        answers
    })
}

/// The wall clock (the nodes' log times) and this test's monotonic clock, read together.
struct Anchor {
    wall: std::time::SystemTime,
    instant: Instant,
}

impl Anchor {
    fn now() -> Self {
        Self {
            wall: std::time::SystemTime::now(),
            instant: Instant::now(),
        }
    }

    /// The instant of a log time (`2026-12-07T16:27:43.544521Z`, UTC).
    fn instant_of(&self, stamp: &str) -> Instant {
        let number = |range: std::ops::Range<usize>| -> i64 { stamp[range].parse().unwrap() };
        let (year, month, day) = (number(0..4), number(5..7), number(8..10));
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146097 + doe - 719468;
        let seconds = days * 86400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
        let fraction = &stamp[20..stamp.len() - 1];
        let nanos = format!("{fraction:0<9}")[..9].parse::<u64>().unwrap();
        let wall = std::time::UNIX_EPOCH
            + Duration::from_secs(seconds as u64)
            + Duration::from_nanos(nanos);
        match wall.duration_since(self.wall) {
            Ok(after) => self.instant + after,
            Err(before) => self.instant - before.duration(),
        }
    }
}

/// The log line of node `index` that contains `text`, and the UTC time at its start.
fn logged_at(cluster: &Cluster, index: usize, text: &str) -> Option<String> {
    cluster
        .log(index)
        .lines()
        .find(|line| line.contains(text))
        .and_then(|line| line.split_whitespace().next().map(str::to_string))
}

/// Cut the primary off from etcd only: it still reaches its replicas, so its writes still
/// find a majority, and only its lease stops it. It must stop acknowledging before its lease
/// can run out in etcd; the others elect a new primary after it ran out, whose claim reaches
/// the old primary and makes it a replica; its client, still connected to it, goes on
/// through it.
#[test]
fn a_primary_cut_off_from_etcd_stops_acknowledging_before_another_is_elected() {
    let anchor = Anchor::now();
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(NbdUri::parse(&cluster.uri(0)).unwrap(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = cluster.ctl(0, &["partition", "etcd"]);
    assert!(ok, "{text}");
    let cut = Instant::now();
    let (elected, none_before) = wait_elected(&cluster, &[1, 2], cut);
    let elected_after = none_before - cut;
    // The old primary learns of the new epoch from the claim and forwards from then on.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let answers = writes.join().unwrap();
    let (ok, text) = cluster.ctl(0, &["partition", "off"]);
    assert!(ok, "{text}");

    // When a stopped acknowledging (its log) and when the new primary was granted its epoch
    // (its log), on this test's clock.
    let lease = Duration::from_secs(2);
    let held = logged_at(&cluster, 0, "lease ran out").expect("a logged that it held IO");
    let granted = logged_at(&cluster, elected, "etcd granted this node the next epoch")
        .expect("the new primary logged its grant");
    let (held_at, granted_at) = (anchor.instant_of(&held), anchor.instant_of(&granted));
    let before_cut = answers.iter().filter(|a| a.at < cut && a.ok).count();
    // A write sent once a had stopped, answered before anyone else served: a's own.
    let gap = answers
        .iter()
        .filter(|a| a.ok && a.sent >= held_at && a.at < none_before)
        .count();
    let after = answers
        .iter()
        .filter(|a| a.ok && a.at >= none_before)
        .count();
    println!(
        "cut off from etcd: {before_cut} writes acknowledged before; a stopped acknowledging {:?} after the cut; {} was granted the next epoch {:?} after it, and serves; {gap} acknowledged between; {after} acknowledged after, through it",
        held_at.saturating_duration_since(cut),
        cluster.nodes[elected].id,
        granted_at.saturating_duration_since(cut),
    );
    assert!(before_cut > 0, "the writer never wrote");
    assert!(
        held_at < granted_at,
        "a held IO at {held}, the new primary was granted at {granted}"
    );
    assert!(
        held_at <= cut + lease,
        "a stopped acknowledging {:?} after the cut, beyond its lease",
        held_at - cut
    );
    assert_eq!(
        gap, 0,
        "writes acknowledged by a after it stopped, before the new primary"
    );
    // Its last keep-alive before the cut was at most a quarter of the lease before it.
    assert!(
        elected_after >= lease * 3 / 4,
        "elected {elected_after:?} after the cut, before the lease could run out"
    );
    assert!(
        after > 0,
        "the client did not go on through the old primary\n{}",
        cluster.logs()
    );
}

/// Cut the primary off from etcd and from its replicas: its writes fail (no majority) and,
/// once its lease has run out, wait unanswered; the others elect a new primary. Healed, the
/// old primary learns it was replaced, becomes a replica, is caught up, and its client's
/// waiting writes go to the new primary.
#[test]
fn a_partitioned_primary_is_replaced_and_rejoins_as_a_replica_when_healed() {
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(NbdUri::parse(&cluster.uri(0)).unwrap(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = cluster.ctl(0, &["partition", "on"]);
    assert!(ok, "{text}");
    let cut = Instant::now();
    let (elected, _) = wait_elected(&cluster, &[1, 2], cut);
    println!(
        "partitioned: {} took over {:?} after the cut",
        cluster.nodes[elected].id,
        cut.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    // Healed from when it is asked: what the node acknowledges once healed is rightful.
    let healed = Instant::now();
    let (ok, text) = cluster.ctl(0, &["partition", "off"]);
    assert!(ok, "{text}");
    let deadline = healed + Duration::from_secs(30);
    loop {
        let state = etcd_state(&cluster);
        let a = cluster.replication(0);
        if state.in_sync.len() == 3 && a["role"] == "replica" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a did not rejoin as an in-sync replica: {state:?} {a}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "healed: a is an in-sync replica {:?} after",
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let answers = writes.join().unwrap();
    let lease = Duration::from_secs(2);
    let in_gap = answers
        .iter()
        .filter(|a| a.ok && a.sent >= cut + lease && a.at < healed)
        .count();
    let after = answers.iter().filter(|a| a.ok && a.at >= healed).count();
    println!(
        "{} answers: {} acknowledged before the cut, {in_gap} from the lease's end to the heal, {after} after",
        answers.len(),
        answers.iter().filter(|a| a.ok && a.at < cut).count()
    );
    assert_eq!(
        in_gap, 0,
        "writes acknowledged by a cut-off primary after its lease"
    );
    assert!(
        after > 0,
        "the client did not go on after the heal\n{}",
        cluster.logs()
    );
    let sequence = cluster.replication(elected)["sequence"].as_u64().unwrap();
    cluster.wait_peers(elected, Duration::from_secs(60), "caught up", |peer| {
        peer["in_sync"] == true && peer["acknowledged"].as_u64() >= Some(sequence)
    });
    cluster.assert_copies_identical(elected);
}

/// etcd's own failures under a client's writes. One member of three killed (the one every
/// node talks to first) and started again goes unnoticed by the volume: no write fails, no
/// failover.
#[test]
fn etcd_losing_one_member_of_three_under_writes_goes_unnoticed() {
    let mut cluster = Cluster::start_with_etcd(3, 3, 2);
    let epoch = etcd_state(&cluster).epoch;
    let mut client = cluster.checker(2, 77);
    client.run(Duration::from_millis(300)).unwrap();
    let killer = {
        let etcd = cluster.etcd.take().unwrap();
        std::thread::spawn(move || {
            let mut etcd = etcd;
            std::thread::sleep(Duration::from_millis(300));
            etcd.kill(0);
            std::thread::sleep(Duration::from_millis(1500));
            etcd.restart(0).unwrap();
            etcd
        })
    };
    let end = client.run(Duration::from_secs(3)).unwrap();
    cluster.etcd = Some(killer.join().unwrap());
    client.sync().unwrap();
    let stats = client.summary().stats;
    println!("one etcd member killed and restarted: {}", client.summary());
    assert!(matches!(end, fathom::checker::RunEnd::Elapsed), "{end:?}");
    assert_eq!(
        (stats.writes_failed, stats.flushes_failed),
        (0, 0),
        "{}",
        client.summary()
    );
    assert_eq!(
        etcd_state(&cluster).epoch,
        epoch,
        "no failover for a lost etcd member"
    );
    client.verify_all().unwrap();
}

/// etcd stopped altogether for longer than the lease: the primary holds IO unanswered once
/// its lease may have run out, nobody can be elected, and when etcd is back (it extends the
/// leases it had) the primary goes on where it stopped, with no write failed.
#[test]
fn etcd_stopped_longer_than_the_lease_holds_io_and_loses_nothing() {
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    let epoch = etcd_state(&cluster).epoch;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(NbdUri::parse(&cluster.uri(0)).unwrap(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    // /metrics says how long the primary may still acknowledge, and that it holds IO once
    // its lease ran out.
    let lease_left = |body: &str| -> f64 {
        let line = body
            .lines()
            .find(|line| line.starts_with("fathom_replication_lease_left_seconds{node=\"a\""))
            .unwrap_or_else(|| panic!("no lease metric in:\n{body}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let body = cluster.scrape(0);
    promtool_check(&body);
    let before = lease_left(&body);
    assert!(before > 0.5 && before <= 2.0, "{before}");
    cluster.etcd.as_mut().unwrap().kill(0);
    let down = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lease_left(&cluster.scrape(0)), 0.0);
    std::thread::sleep(Duration::from_millis(1500));
    // The node may renew its lease as soon as etcd serves, before the restart below returns:
    // the window without a lease ends when etcd is started again.
    let back = Instant::now();
    cluster.etcd.as_mut().unwrap().restart(0).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let answers = writes.join().unwrap();
    let lease = Duration::from_secs(2);
    let acked = |from: Instant, to: Instant| {
        answers
            .iter()
            .filter(|a| a.ok && a.sent >= from && a.at < to)
            .count()
    };
    let (before, during, after) = (
        acked(down - Duration::from_secs(10), down),
        acked(down + lease, back),
        acked(back, Instant::now()),
    );
    let failed = answers.iter().filter(|a| !a.ok).count();
    println!(
        "etcd down {:?}: {before} writes acknowledged before, {during} from the lease's end until etcd was back, {after} after; {failed} failed",
        back - down
    );
    assert!(before > 0);
    assert_eq!(during, 0, "acknowledged with no lease");
    assert!(after > 0, "the primary did not go on\n{}", cluster.logs());
    assert_eq!(failed, 0, "writes failed\n{}", cluster.logs());
    let state = etcd_state(&cluster);
    assert_eq!(
        (state.epoch, state.primary.as_str()),
        (epoch, "a"),
        "{state:?}"
    );
    let log = cluster.log(0);
    assert!(log.contains("lease ran out"), "{log}");
    assert!(log.contains("held IO goes on"), "{log}");
}

/// Values under the cluster's prefix that Fathom did not write (garbage in a volume's state,
/// a stray key, a record of a newer layout) are refused with the reason in the log and in
/// `cluster status`; the nodes keep what they knew and serve on. A valid value put back is
/// taken again. Impossible requests to fathom-ctl get a clear error.
#[test]
fn bad_values_in_etcd_are_refused_and_logged_and_the_volume_serves_on() {
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    let endpoints = cluster.etcd.as_ref().unwrap().endpoints();
    let mut etcd = Etcd::new(&endpoints, Timeouts::default()).unwrap();
    let prefix = Prefix::new("test").unwrap();
    let good = etcd.get(&prefix.state("vol0")).unwrap().unwrap().value;
    etcd.put(&prefix.state("vol0"), b"{not json", None).unwrap();
    etcd.put("/fathom/test/stray", b"x", None).unwrap();
    etcd.put(&prefix.node("z"), br#"{"v":9,"id":"z"}"#, None)
        .unwrap();
    let mut client = cluster.checker(1, 88);
    client.run(Duration::from_millis(500)).unwrap();
    client.sync().unwrap();
    assert_eq!(
        client.summary().stats.writes_failed,
        0,
        "{}",
        client.summary()
    );
    let logs = cluster.logs();
    assert!(logs.contains("refusing a value in etcd"), "{logs}");
    assert!(logs.contains("layout version 9"), "{logs}");
    assert!(logs.contains("ignoring a key under the prefix"), "{logs}");
    let (ok, text) = cluster.ctl_etcd(&["cluster", "status"]);
    println!("{text}");
    assert!(ok, "{text}");
    assert!(text.contains("refused under the prefix"), "{text}");
    assert!(text.contains("no valid state in etcd"), "{text}");
    assert!(text.contains("/fathom/test/stray"), "{text}");
    // Put back, the state is followed again: the in-sync set is written back by the primary.
    etcd.put(&prefix.state("vol0"), &good, None).unwrap();
    client.run(Duration::from_millis(300)).unwrap();
    client.verify_all().unwrap();
    assert_eq!(etcd_state(&cluster).primary, "a");
    // fathom-ctl without what it needs, or with what cannot be.
    let (ok, text) = cluster.ctl(0, &["cluster", "status"]);
    assert!(!ok && text.contains("--etcd"), "{text}");
    let (ok, text) = cluster.ctl(0, &["partition", "sideways"]);
    assert!(!ok && text.contains("possible values"), "{text}");
}

/// fathom-bench given every node's URI goes on through a kill -9 of the node it writes to
/// (the primary): its jobs connect again to the next node, which forwards to the new primary,
/// and the run reports the loss, the IOs of unknown outcome and the outage.
#[test]
fn fathom_bench_goes_on_through_a_failover_and_reports_it() {
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    let uris = (0..3)
        .map(|index| cluster.uri(index))
        .collect::<Vec<_>>()
        .join(",");
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_fathom-bench"))
        .args([
            "--nbd",
            &uris,
            "--rw",
            "randwrite",
            "--bs",
            "4k",
            "--iodepth",
            "8",
        ])
        .args(["--runtime", "6", "--size", "16MiB", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.kill(0);
    let output = bench.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{stdout}\n{stderr}\n{}",
        cluster.logs()
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    println!(
        "fathom-bench through a failover: {} IOs, {} errors, {} reconnects, {} IOs lost, outage {} ms",
        report["ios"], report["errors"], report["reconnects"], report["lost_ios"],
        report["outage_ns"].as_u64().unwrap_or(0) / 1_000_000
    );
    assert_eq!(report["reconnects"], 1, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ios"].as_u64().unwrap() > 0, "{report}");
    assert!(report["lost_ios"].as_u64().unwrap() <= 8, "{report}");
}

/// A reparent on a control plane: the new primary's epoch is granted by etcd (a handover),
/// and etcd names it from then on; the client, on the old primary, goes on through it.
#[test]
fn a_reparent_on_etcd_moves_the_primary_there_too() {
    let cluster = Cluster::start_with_etcd(3, 1, 2);
    let epoch = etcd_state(&cluster).epoch;
    let mut client = cluster.checker(0, 99);
    client.run(Duration::from_millis(300)).unwrap();
    let (ok, text) = cluster.ctl(0, &["reparent", "vol0", "--to", "b"]);
    println!("{text}");
    assert!(ok, "{text}\n{}", cluster.logs());
    client.run(Duration::from_millis(300)).unwrap();
    client.sync().unwrap();
    client.verify_all().unwrap();
    let stats = client.summary().stats;
    assert_eq!(
        (stats.writes_failed, stats.flushes_failed),
        (0, 0),
        "{}",
        client.summary()
    );
    let state = etcd_state(&cluster);
    assert_eq!(state.primary, "b", "{state:?}");
    assert_eq!(state.epoch, epoch + 1, "{state:?}");
    assert!(
        cluster.log(1).contains("why=\"handover\""),
        "{}",
        cluster.log(1)
    );
}
