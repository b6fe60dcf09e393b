//! Three fathom-node processes on a control plane: a real etcd (Debian's etcd-server) on
//! loopback grants epochs by compare-and-swap and holds each node's lease. When the primary
//! is killed, an in-sync replica takes the volume over by itself once the lease is gone,
//! with no acknowledged write lost; the old primary returns as a replica and is caught up.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{first_difference, Cluster, BLOCK_BYTES};
use fathom::checker::{Client, ClientOptions};
use fathom::nbd_client::NbdUri;
use fathom_cluster::etcd::{Etcd, Timeouts};
use fathom_cluster::schema::{Prefix, VolumeState};

fn client(cluster: &Cluster, index: usize, seed: u64) -> Client {
    let uri = NbdUri::parse(&cluster.uri(index)).unwrap();
    Client::connect(
        &uri,
        ClientOptions {
            seed,
            blocks: 1024,
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

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

/// Which of `candidates` serves as the primary, if one does.
fn serving(cluster: &Cluster, candidates: &[usize]) -> Option<usize> {
    candidates.iter().copied().find(|&index| {
        let row = cluster.replication(index);
        row["role"] == "primary" && row["in_sync"] == true
    })
}

#[test]
fn a_killed_primary_fails_over_by_itself_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start_with_etcd(3, 1, 2);
    let state = etcd_state(&cluster);
    assert_eq!(state.primary, "a", "{state:?}");
    let first_epoch = state.epoch;
    // The client is on c, a replica: c forwards to whoever is the primary.
    let mut client = client(&cluster, 2, 51);
    client.run(Duration::from_millis(500)).unwrap();
    client.sync().unwrap();
    let before = client.summary().stats;

    let pid = cluster.pid(0);
    // SAFETY: a signal to the test's own child process, not yet waited for.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    cluster.reap(0);
    let new_primary = loop {
        if let Some(index) = serving(&cluster, &[1, 2]) {
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
    loop {
        let state = etcd_state(&cluster);
        if state.in_sync.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a did not rejoin the in-sync set: {state:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = cluster.replication(0);
    assert_eq!(a["role"], "replica", "{a}");
    client.sync().unwrap();
    client.verify_all().unwrap();
    let sequence = cluster.replication(new_primary)["sequence"]
        .as_u64()
        .unwrap();
    cluster.wait_peers(new_primary, Duration::from_secs(60), "caught up", |peer| {
        peer["in_sync"] == true && peer["acknowledged"].as_u64() >= Some(sequence)
    });
    let reference = cluster.volume_data(new_primary);
    for index in 0..3 {
        if let Some(block) = first_difference(&reference, &cluster.volume_data(index)) {
            panic!(
                "node {} differs from the primary first at block {block} (byte {})",
                cluster.nodes[index].id,
                block * BLOCK_BYTES
            );
        }
    }
}
