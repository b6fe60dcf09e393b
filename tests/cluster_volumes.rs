//! A volume's life through the control plane: `fathom-ctl volume create` places its copies
//! on the nodes' pools and every node serves it; `volume delete` takes it away everywhere;
//! what cannot be is refused with the reason.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use fathom::nbd_client::{Connection, NbdUri, Pipeline};
use fathom_cluster::etcd::{Etcd, Timeouts};
use fathom_cluster::schema::Prefix;
use fathom_frontend::nbd::proto::Command;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The volumes node `index` serves (`fathom-ctl volumes --json`), by name.
fn served(cluster: &Cluster, index: usize) -> Vec<String> {
    let (ok, text) = cluster.ctl(index, &["--json", "volumes"]);
    assert!(ok, "fathom-ctl volumes: {text}");
    let rows: Value = serde_json::from_str(&text).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `check` holds of every running node's served volumes.
fn wait_all(cluster: &Cluster, what: &str, check: impl Fn(&[String]) -> bool) {
    let started = Instant::now();
    for index in 0..cluster.nodes.len() {
        loop {
            let volumes = served(cluster, index);
            if check(&volumes) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "node {} does not {what} after 30 s: it serves {volumes:?}\n{}",
                cluster.nodes[index].id,
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One IO of `len` bytes at `offset` through `uri`, retried while the volume's primary is
/// being elected (the forwarding node holds or refuses IO until then): the data read, or
/// nothing for a write.
fn io(cluster: &Cluster, uri: &str, command: Command, offset: u64, len: u32, fill: u8) -> Vec<u8> {
    let uri = NbdUri::parse(uri).unwrap();
    let started = Instant::now();
    loop {
        let attempt = (|| {
            let connection = Connection::open(&uri).map_err(|e| e.to_string())?;
            let mut pipeline =
                Pipeline::new(connection, 1, len, true).map_err(|e| e.to_string())?;
            pipeline
                .submit(command, offset, len, |data| data.fill(fill))
                .ok_or("no free slot")?;
            pipeline.flush().map_err(|e| e.to_string())?;
            loop {
                if let Some(done) = pipeline.next_completion().map_err(|e| e.to_string())? {
                    if done.error != 0 {
                        return Err(done.describe_error());
                    }
                    return Ok(pipeline.data(done.slot).to_vec());
                }
                pipeline
                    .wait(Duration::from_secs(5))
                    .map_err(|e| e.to_string())?;
            }
        })();
        match attempt {
            Ok(data) => return data,
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!(
                "{command:?} at {offset} on {uri:?}: {error}\n{}",
                cluster.logs()
            ),
        }
    }
}

/// Reads `len` bytes at `offset` of `volume` through node `index`.
fn read(cluster: &Cluster, index: usize, volume: &str, offset: u64, len: u32) -> Vec<u8> {
    io(
        cluster,
        &cluster.uri_of(index, volume),
        Command::Read,
        offset,
        len,
        0,
    )
}

/// Writes `len` bytes of `fill` at `offset` of `volume` through node `index`.
fn write(cluster: &Cluster, index: usize, volume: &str, offset: u64, len: u32, fill: u8) {
    io(
        cluster,
        &cluster.uri_of(index, volume),
        Command::Write,
        offset,
        len,
        fill,
    );
}

fn pool_record(cluster: &Cluster, index: usize) -> Value {
    let text = std::fs::read_to_string(cluster.nodes[index].dir.join("pool.json"))
        .unwrap_or_else(|_| "{\"volumes\":{}}".into());
    serde_json::from_str(&text).unwrap()
}

/// Waits until every node has published its pool's room (before that, no volume can be
/// placed on it).
fn wait_pools(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        let (ok, text) = cluster.ctl_etcd(&["--json", "cluster", "status"]);
        assert!(ok, "{text}");
        let report: Value = serde_json::from_str(&text).unwrap();
        let pools = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|node| node["pool"].is_object())
            .count();
        if pools == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn volumes_are_made_served_everywhere_and_deleted_through_the_control_plane() {
    let mut cluster = Cluster::start_with_pool(3, 48 * MIB);
    wait_pools(&cluster);
    let (ok, text) = cluster.ctl_etcd(&["volume", "create", "vol1", "--size", "16MiB", "--wait"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("created and served") && text.contains("at epoch 1"),
        "{text}"
    );
    wait_all(&cluster, "serve vol1", |v| v.iter().any(|n| n == "vol1"));
    // Written through one node, read back through another: one volume, three copies.
    write(&cluster, 1, "vol1", 4 * MIB, 65536, 0xa7);
    let data = read(&cluster, 2, "vol1", 4 * MIB, 65536);
    assert!(
        data.iter().all(|&b| b == 0xa7),
        "vol1 reads back what was written"
    );
    let fresh = read(&cluster, 0, "vol1", 8 * MIB, 4096);
    assert!(fresh.iter().all(|&b| b == 0), "a new volume reads zeroes");
    // Its first primary waited for every copy to be made: they joined in sync, nothing was
    // copied to make them so.
    let logs = cluster.logs();
    assert!(
        !logs
            .lines()
            .any(|line| line.contains("rebuilding it in full") && line.contains("vol1")),
        "{logs}"
    );
    let (ok, text) = cluster.ctl_etcd(&["volume", "list"]);
    assert!(
        ok && text.contains("vol1") && text.contains("vol0"),
        "{text}"
    );
    // Its telemetry is there while it is: the write counted on the primary.
    let started = Instant::now();
    while !cluster.scrape(0).contains("volume=\"vol1\"") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            cluster.scrape(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // What cannot be is refused, with the reason, and changes nothing.
    for (args, expect) in [
        (
            vec!["volume", "create", "vol1", "--size", "16MiB"],
            "exists already",
        ),
        (
            vec![
                "volume",
                "create",
                "vol9",
                "--size",
                "16MiB",
                "--replicas",
                "4",
            ],
            "4 distinct live nodes",
        ),
        (
            vec!["volume", "create", "vol9", "--size", "10000"],
            "not a positive multiple",
        ),
        (vec!["volume", "create", "vol9", "--size", "1GiB"], "free"),
        (
            vec!["volume", "create", "bad/name", "--size", "1MiB"],
            "name",
        ),
        (vec!["volume", "delete", "vol9"], "no volume \"vol9\""),
        (vec!["volume", "delete", "vol0"], "configured volumes"),
    ] {
        let (ok, text) = cluster.ctl_etcd(&args);
        assert!(!ok && text.contains(expect), "{args:?}: {text}");
    }

    // A spec that cannot be read deletes nothing: the copies serve on, and etcd's own
    // value back makes it whole again.
    let endpoints = cluster.etcd.as_ref().unwrap().endpoints();
    let mut etcd = Etcd::new(&endpoints, Timeouts::default()).unwrap();
    let key = Prefix::new("test").unwrap().spec("vol1");
    let good = etcd.get(&key).unwrap().unwrap().value;
    etcd.put(&key, b"{\"v\":1,\"garbage\":true}", None).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    wait_all(&cluster, "keep vol1", |v| v.iter().any(|n| n == "vol1"));
    assert!(
        cluster.logs().contains("refusing a value in etcd"),
        "{}",
        cluster.logs()
    );
    // Nor does a spec gone without a tombstone (an etcd restored from an old backup, a
    // hand's mistake): only `volume delete` deletes.
    etcd.txn(&[], &[fathom_cluster::etcd::Write::Delete(key.clone())])
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    wait_all(&cluster, "keep vol1", |v| v.iter().any(|n| n == "vol1"));
    assert!(
        cluster.logs().contains("no readable spec or tombstone"),
        "{}",
        cluster.logs()
    );
    etcd.put(&key, &good, None).unwrap();

    // A node restarted serves its pool's volume again, and its copy catches up.
    cluster.kill(2);
    write(&cluster, 0, "vol1", 5 * MIB, 65536, 0x3c);
    cluster.start_node(2);
    wait_all(&cluster, "serve vol1 again", |v| {
        v.iter().any(|n| n == "vol1")
    });
    let data = read(&cluster, 2, "vol1", 5 * MIB, 65536);
    assert!(data.iter().all(|&b| b == 0x3c));

    // Deleted: gone from every node and its pool; its range serves the next volume,
    // cleared.
    // A client connected to vol1 when it is deleted is disconnected.
    let connected = Connection::open(&NbdUri::parse(&cluster.uri_of(1, "vol1")).unwrap()).unwrap();
    let mut held = Pipeline::new(connected, 1, 4096, true).unwrap();
    let (ok, text) = cluster.ctl_etcd(&["volume", "delete", "vol1"]);
    assert!(ok, "{text}");
    wait_all(&cluster, "drop vol1", |v| !v.iter().any(|n| n == "vol1"));
    for index in 0..3 {
        let record = pool_record(&cluster, index);
        assert!(record["volumes"].get("vol1").is_none(), "{record}");
    }
    assert!(
        Connection::open(&NbdUri::parse(&cluster.uri_of(0, "vol1")).unwrap()).is_err(),
        "no export vol1 any more"
    );
    assert!(!cluster.scrape(0).contains("volume=\"vol1\""));
    let refused = held
        .submit(Command::Read, 0, 4096, |_| {})
        .map(|_| held.flush())
        .and_then(|flushed| flushed.ok())
        .map(|()| {
            held.wait(Duration::from_secs(5))
                .and_then(|()| held.next_completion())
        });
    assert!(
        !matches!(refused, Some(Ok(Some(ref done))) if done.error == 0),
        "a read on a deleted volume's connection does not succeed"
    );
    let (ok, text) = cluster.ctl_etcd(&["volume", "create", "vol2", "--size", "16MiB"]);
    assert!(ok, "{text}");
    wait_all(&cluster, "serve vol2", |v| v.iter().any(|n| n == "vol2"));
    for index in 0..3 {
        let data = read(&cluster, index, "vol2", 4 * MIB, 65536);
        assert!(
            data.iter().all(|&b| b == 0),
            "node {index}: vol2 shows nothing of vol1"
        );
    }
    // Deleted and made again while a node is down: back, that node drops its copy of the
    // old volume (another incarnation), whatever the name says.
    cluster.kill(2);
    let (ok, text) = cluster.ctl_etcd(&["volume", "delete", "vol2"]);
    assert!(ok, "{text}");
    // Placement counts node c live until etcd lets its lease go (2 s after the kill).
    let started = Instant::now();
    loop {
        let (ok, text) = cluster.ctl_etcd(&["--json", "cluster", "status"]);
        assert!(ok, "{text}");
        let report: Value = serde_json::from_str(&text).unwrap();
        let live: Vec<&str> = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|node| node["id"].as_str())
            .collect();
        if !live.contains(&"c") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, text) = cluster.ctl_etcd(&[
        "volume",
        "create",
        "vol2",
        "--size",
        "8MiB",
        "--replicas",
        "2",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("copies on a, b") || text.contains("copies on b, a"),
        "{text}"
    );
    let old = pool_record(&cluster, 2)["volumes"]["vol2"]["incarnation"].clone();
    assert!(old.is_u64(), "node c's pool holds the old vol2");
    cluster.start_node(2);
    let started = Instant::now();
    while pool_record(&cluster, 2)["volumes"].get("vol2").is_some()
        || served(&cluster, 2).contains(&"vol2".to_string())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_all(&cluster, "serve or drop vol2", |v| {
        v.iter().any(|n| n == "vol0")
    });
    assert!(served(&cluster, 0).contains(&"vol2".to_string()));
    // The configured volume served on throughout.
    let data = read(&cluster, 1, "vol0", 0, 4096);
    assert_eq!(data.len(), 4096);
}

/// Volumes deleted while a client writes to them, and made again under the same name, cycle
/// after cycle: the writes fail or are cut off (nothing hangs, no node falls over), every new
/// volume reads zeroes where the last one was written, and the configured volume serves on.
/// `FATHOM_VOLUME_CHURN_CYCLES` (3 unless given) sets the cycles; `tests/volume-churn-soak`
/// runs many.
#[test]
fn volumes_deleted_under_writes_and_made_again_leak_nothing() {
    let cycles: usize = std::env::var("FATHOM_VOLUME_CHURN_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(3);
    let cluster = Cluster::start_with_pool(3, 48 * MIB);
    wait_pools(&cluster);
    let started = Instant::now();
    for cycle in 0..cycles {
        let name = format!("churn{}", cycle % 2);
        let (ok, text) = cluster.ctl_etcd(&["volume", "create", &name, "--size", "8MiB"]);
        assert!(ok, "cycle {cycle}: {text}");
        wait_all(&cluster, "serve the new volume", |v| v.contains(&name));
        for index in 0..3 {
            let data = read(&cluster, index, &name, 0, 65536);
            assert!(
                data.iter().all(|&b| b == 0),
                "cycle {cycle}: node {index}: the new {name} shows an old volume's data"
            );
        }
        // A client writes on until the volume is deleted under it.
        let uri = NbdUri::parse(&cluster.uri_of(cycle % 3, &name)).unwrap();
        let writer = std::thread::spawn(move || {
            let mut acked = 0u64;
            let Ok(connection) = Connection::open(&uri) else {
                return acked;
            };
            let Ok(mut pipeline) = Pipeline::new(connection, 4, 65536, true) else {
                return acked;
            };
            pipeline.set_stall_timeout(Duration::from_secs(10));
            for round in 0u64.. {
                let offset = (round % 16) * 65536;
                if pipeline
                    .submit(Command::Write, offset, 65536, |data| data.fill(0xee))
                    .is_none()
                    || pipeline.flush().is_err()
                {
                    return acked;
                }
                loop {
                    match pipeline.next_completion() {
                        Ok(Some(done)) if done.error == 0 => {
                            acked += 1;
                            break;
                        }
                        Ok(Some(_)) | Err(_) => return acked,
                        Ok(None) => {
                            if pipeline.wait(Duration::from_secs(10)).is_err() {
                                return acked;
                            }
                        }
                    }
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(300));
        let (ok, text) = cluster.ctl_etcd(&["volume", "delete", &name]);
        assert!(ok, "cycle {cycle}: {text}");
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_all(&cluster, "drop the volume", |v| !v.contains(&name))
        }))
        .is_err()
        {
            panic!("stuck");
        }
        let acked = writer.join().unwrap();
        assert!(
            acked > 0,
            "cycle {cycle}: the client wrote before the delete"
        );
    }
    // Every node still serves, and the configured volume takes IO.
    write(&cluster, 2, "vol0", 0, 4096, 0x11);
    assert!(read(&cluster, 0, "vol0", 0, 4096)
        .iter()
        .all(|&b| b == 0x11));
    println!(
        "{cycles} create/write/delete cycles in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
