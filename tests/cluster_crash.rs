//! The crash test of a replicated volume: three fathom-node processes on loopback, a client
//! (`fathom::checker::Client`) writing random blocks through the primary (some FUA, some
//! followed by a flush) and remembering every write it was acknowledged. At a random moment
//! a random node (primary or replica) is killed with SIGKILL and started again; when it was
//! the primary, an in-sync survivor is promoted with `fathom-ctl promote` and the client
//! reconnects to it. The checker is never told of a crash: with one node of three down a
//! majority still holds every acknowledged write, so every one must read back, and no block
//! may hold data that was never written. Each cycle waits for the returning node to be in
//! sync (one failure at a time). At the end, once writes stop and resync is done, the three
//! copies must be byte for byte the same.
//!
//! The second test does the same on a control plane (etcd), where nothing but the nodes moves
//! the primary: automatic failover.
//!
//! `FATHOM_CLUSTER_CRASH_CYCLES` sets the cycles (5 unless set; `tests/cluster-crash-soak`
//! runs 50 or more), `FATHOM_CLUSTER_CRASH_SEED` the seed (printed).

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use fathom::checker::{CheckerError, Client, RunEnd};
use fathom::nbd_client::NbdUri;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number"))
    })
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn uri(cluster: &Cluster, index: usize) -> NbdUri {
    NbdUri::parse(&cluster.uri(index)).unwrap()
}

/// A verify pass on the current primary that must find every acknowledged write.
fn verify(client: &mut Client, cluster: &Cluster, when: &str) -> u64 {
    match client.verify_all() {
        Ok(report) => report.blocks_checked,
        Err(CheckerError::Violations { count, violations }) => {
            let listed: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
            panic!(
                "{when}: {count} blocks hold what the model forbids:\n{}\n{}\n{}",
                listed.join("\n"),
                client.summary(),
                cluster.logs()
            );
        }
        Err(error) => panic!("{when}: verify failed: {error}\n{}", cluster.logs()),
    }
}

/// Waits until primary `primary` has every replica open, in sync and caught up.
fn wait_in_sync(cluster: &Cluster, primary: usize) {
    cluster.wait_serving(primary, Duration::from_secs(30));
    let sequence = cluster.replication(primary)["sequence"].as_u64().unwrap();
    cluster.wait_peers(primary, Duration::from_secs(120), "in sync", |peer| {
        peer["state"] == "open"
            && peer["in_sync"] == true
            && peer["acknowledged"].as_u64() >= Some(sequence)
    });
}

/// The end of a crash test: a last run, every acknowledged write read back, and once the
/// replicas are caught up, the copies byte for byte the same; their checksums.
fn finish(client: &mut Client, cluster: &Cluster, primary: usize) -> Vec<String> {
    let end = client.run(Duration::from_millis(300)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    client.sync().unwrap();
    verify(client, cluster, "at the end");
    wait_in_sync(cluster, primary);
    cluster.assert_copies_identical(primary)
}

/// The cycles' seed: `FATHOM_CLUSTER_CRASH_SEED`, or the time.
fn seed() -> u64 {
    env_u64("FATHOM_CLUSTER_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

#[test]
fn kill_9_of_any_node_loses_no_acknowledged_write() {
    let cycles = env_u64("FATHOM_CLUSTER_CRASH_CYCLES").unwrap_or(5);
    let seed = seed();
    println!("cluster crash test: {cycles} cycles, FATHOM_CLUSTER_CRASH_SEED={seed}");
    let mut cluster = Cluster::start(3);
    let mut primary = 0;
    let mut client = cluster.checker(primary, seed);
    let mut rng = seed | 1;
    let started = Instant::now();
    let (mut primary_kills, mut replica_kills) = (0, 0);
    for cycle in 1..=cycles {
        let victim = (next(&mut rng) % 3) as usize;
        let delay = Duration::from_millis(100 + next(&mut rng) % 401);
        let pid = cluster.pid(victim);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: a signal to the test's own child process, not yet waited for.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        // The client writes through the kill (a replica's) or until it (the primary's).
        let run_for = delay + Duration::from_millis(300);
        let end = client.run(run_for).unwrap();
        killer.join().unwrap();
        cluster.reap(victim);
        let what = if victim == primary {
            primary_kills += 1;
            assert!(
                matches!(end, RunEnd::ConnectionLost(_)),
                "cycle {cycle}: the primary was killed but the run ended {end:?}"
            );
            // Promote an in-sync survivor.
            let survivor = (0..3)
                .filter(|&index| index != victim)
                .find(|&index| cluster.replication(index)["in_sync"] == true)
                .unwrap_or_else(|| {
                    panic!("cycle {cycle}: no survivor is in sync\n{}", cluster.logs())
                });
            let (ok, text) = cluster.ctl(survivor, &["promote", "vol0"]);
            assert!(ok, "cycle {cycle}: promote: {text}\n{}", cluster.logs());
            primary = survivor;
            cluster.wait_serving(primary, Duration::from_secs(30));
            client
                .reconnect(&uri(&cluster, primary), Duration::from_secs(30))
                .unwrap();
            format!(
                "primary {} killed, {} promoted: {}",
                cluster.nodes[victim].id,
                cluster.nodes[primary].id,
                text.lines().nth(1).unwrap_or("")
            )
        } else {
            replica_kills += 1;
            assert!(
                matches!(end, RunEnd::Elapsed),
                "cycle {cycle}: a replica's death stopped the client: {end:?}\n{}",
                cluster.logs()
            );
            format!("replica {} killed", cluster.nodes[victim].id)
        };
        cluster.start_node(victim);
        wait_in_sync(&cluster, primary);
        let checked = verify(&mut client, &cluster, &format!("cycle {cycle}"));
        println!(
            "cycle {cycle}: {what} after {} ms; {checked} blocks checked",
            delay.as_millis()
        );
    }
    let checksums = finish(&mut client, &cluster, primary);
    let summary = client.summary();
    println!(
        "cluster crash test: {cycles} cycles ({primary_kills} primary, {replica_kills} replica \
         kills) in {:.1} s; copies identical ({}); {summary}",
        started.elapsed().as_secs_f64(),
        checksums.join(" ")
    );
    let stats = summary.stats;
    assert_eq!(stats.violations, 0);
    assert_eq!(stats.crashes, 0, "the model was never told of a crash");
    assert!(
        stats.writes_acked > 0 && stats.flushes_acked > 0,
        "{summary}"
    );
}

/// The same crash test on a control plane: etcd (one member on loopback) grants epochs and
/// holds a 2 s lease per node, and nothing but the nodes themselves moves the primary. The
/// client stays on one node and reconnects to another only when its own is killed (a node
/// that is not the primary forwards its IO). The time from each kill of the primary to a
/// survivor serving is printed, and their distribution at the end.
#[test]
fn kill_9_with_automatic_failover_loses_no_acknowledged_write() {
    let cycles = env_u64("FATHOM_CLUSTER_CRASH_CYCLES").unwrap_or(5);
    let seed = seed();
    println!("automatic failover crash test: {cycles} cycles, FATHOM_CLUSTER_CRASH_SEED={seed}");
    let primary_only = match std::env::var("FATHOM_CLUSTER_CRASH_VICTIM").as_deref() {
        Ok("primary") => true,
        Ok("any") | Err(_) => false,
        Ok(other) => panic!("FATHOM_CLUSTER_CRASH_VICTIM={other:?}: \"primary\" or \"any\""),
    };
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    let mut primary = 0;
    let mut rng = seed | 1;
    // The client starts on a replica.
    let mut at = 2;
    let mut client = cluster.checker(at, seed);
    let started = Instant::now();
    let (mut primary_kills, mut replica_kills) = (0, 0);
    let mut failovers: Vec<Duration> = Vec::new();
    for cycle in 1..=cycles {
        let draw = (next(&mut rng) % 3) as usize;
        // FATHOM_CLUSTER_CRASH_VICTIM=primary kills the primary every cycle (bench/failover).
        let victim = match primary_only {
            true => primary,
            false => draw,
        };
        let delay = Duration::from_millis(100 + next(&mut rng) % 401);
        let pid = cluster.pid(victim);
        let survivors: Vec<usize> = (0..3).filter(|&index| index != victim).collect();
        let was_primary = victim == primary;
        let run_for = delay + Duration::from_millis(300);
        // The killer kills, then (the primary's) watches the survivors until one serves.
        let (end, failover) = std::thread::scope(|scope| {
            let cluster = &cluster;
            let survivors = &survivors;
            let killer = scope.spawn(move || {
                std::thread::sleep(delay);
                // SAFETY: a signal to the test's own child process, not yet waited for.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let killed = Instant::now();
                if !was_primary {
                    return None;
                }
                loop {
                    if let Some(index) = cluster.serving(survivors) {
                        return Some((index, killed.elapsed()));
                    }
                    assert!(
                        killed.elapsed() < Duration::from_secs(30),
                        "cycle {cycle}: no survivor took the volume over within 30 s\n{}",
                        cluster.logs()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let end = client.run(run_for).unwrap();
            (end, killer.join().unwrap())
        });
        cluster.reap(victim);
        let what = match failover {
            Some((index, took)) => {
                primary_kills += 1;
                failovers.push(took);
                primary = index;
                format!(
                    "primary {} killed, {} took over in {} ms",
                    cluster.nodes[victim].id,
                    cluster.nodes[index].id,
                    took.as_millis()
                )
            }
            None => {
                replica_kills += 1;
                format!("replica {} killed", cluster.nodes[victim].id)
            }
        };
        if victim == at {
            // The client's own node died under it: the writes in flight are of unknown
            // outcome, and it goes on through a survivor.
            assert!(
                matches!(end, RunEnd::ConnectionLost(_)),
                "cycle {cycle}: the client's node was killed but the run ended {end:?}"
            );
            at = survivors[(next(&mut rng) % 2) as usize];
            client
                .reconnect(&uri(&cluster, at), Duration::from_secs(30))
                .unwrap();
        } else {
            assert!(
                matches!(end, RunEnd::Elapsed),
                "cycle {cycle}: the client on {} lost its connection: {end:?}\n{}",
                cluster.nodes[at].id,
                cluster.logs()
            );
        }
        cluster.start_node(victim);
        wait_in_sync(&cluster, primary);
        let checked = verify(&mut client, &cluster, &format!("cycle {cycle}"));
        println!(
            "cycle {cycle}: {what} after {} ms; client on {}; {checked} blocks checked",
            delay.as_millis(),
            cluster.nodes[at].id
        );
    }
    let checksums = finish(&mut client, &cluster, primary);
    failovers.sort();
    let ms = |d: &Duration| d.as_millis();
    let distribution = match failovers.len() {
        0 => "no primary was killed".to_string(),
        n => format!(
            "failover (kill -9 of the primary to a survivor serving), {n} times: min {} ms, p50 {} ms, p90 {} ms, max {} ms; all: {:?}",
            ms(&failovers[0]),
            ms(&failovers[n / 2]),
            ms(&failovers[(n * 9 / 10).min(n - 1)]),
            ms(&failovers[n - 1]),
            failovers.iter().map(ms).collect::<Vec<_>>()
        ),
    };
    let summary = client.summary();
    println!(
        "automatic failover crash test: {cycles} cycles ({primary_kills} primary, {replica_kills} \
         replica kills) in {:.1} s; copies identical ({}); {summary}\n{distribution}",
        started.elapsed().as_secs_f64(),
        checksums.join(" ")
    );
    let stats = summary.stats;
    assert_eq!(stats.violations, 0);
    assert!(
        stats.writes_acked > 0 && stats.flushes_acked > 0,
        "{summary}"
    );
}
