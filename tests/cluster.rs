//! A volume replicated across three fathom-node processes on loopback: writes through the
//! primary land on every replica byte for byte, a replica that dies does not stop writes (a
//! majority still holds them) and is shown behind, and the replica service refuses garbage
//! and peers without the cluster key while the volume's IO goes on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::cluster::{first_difference, Cluster, BLOCK_BYTES};
use common::promtool_check;
use fathom::checker::{Client, ClientOptions, RunEnd};
use fathom::nbd_client::NbdUri;
use fathom_replication::proto::{encode, FrameDecoder, Header, Hello, Kind};
use fathom_telemetry::trace::{reason, region_beside, stamp, Start, TraceReader, TraceRecord};

/// Runs the checker's random writes (FUA, flushes) on the primary for `duration`; every one
/// must be acknowledged (failures before it, counted in the client's totals, are not its).
fn write_for(client: &mut Client, cluster: &Cluster, duration: Duration) {
    let before = client.summary().stats;
    let end = client
        .run(duration)
        .unwrap_or_else(|error| panic!("{error}\n{}", cluster.logs()));
    assert!(
        matches!(end, RunEnd::Elapsed),
        "{end:?}\n{}",
        cluster.logs()
    );
    if let Err(error) = client.sync() {
        panic!("sync: {error}\n{}", cluster.logs());
    }
    let stats = client.summary().stats;
    assert_eq!(
        (
            stats.writes_failed - before.writes_failed,
            stats.flushes_failed - before.flushes_failed
        ),
        (0, 0),
        "{}\n{}",
        client.summary(),
        cluster.logs()
    );
}

/// Waits until each replica of the primary (node 0) acknowledged every write it began.
fn wait_caught_up(cluster: &Cluster) {
    wait_caught_up_on(cluster, 0);
}

/// Waits until each replica of primary `primary` is in sync and acknowledged every write it
/// began.
fn wait_caught_up_on(cluster: &Cluster, primary: usize) {
    let sequence = cluster.replication(primary)["sequence"].as_u64().unwrap();
    cluster.wait_peers(primary, Duration::from_secs(60), "caught up", |peer| {
        peer["in_sync"] == true && peer["acknowledged"].as_u64() >= Some(sequence)
    });
}

fn assert_identical(cluster: &Cluster, nodes: &[usize]) {
    let first = cluster.volume_data(nodes[0]);
    for &other in &nodes[1..] {
        let data = cluster.volume_data(other);
        if let Some(block) = first_difference(&first, &data) {
            panic!(
                "node {} and node {} differ first at block {block} (byte {})",
                cluster.nodes[nodes[0]].id,
                cluster.nodes[other].id,
                block * BLOCK_BYTES
            );
        }
    }
}

#[test]
fn writes_through_the_primary_are_on_every_replica_byte_for_byte() {
    let cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 21);
    write_for(&mut client, &cluster, Duration::from_secs(2));
    client.verify_all().unwrap();
    let summary = client.summary();
    println!("{summary}");
    assert!(summary.stats.writes_acked > 200, "{summary}");
    assert!(summary.stats.fua_writes_acked > 0 && summary.stats.flushes_acked > 0);
    wait_caught_up(&cluster);
    // Every write is on every replica now; a flush makes them durable there (the client's
    // last one may have come while the slower replica still wrote), after which no region
    // is dirty for any of them.
    client.sync().unwrap();
    cluster.wait_peers(0, Duration::from_secs(10), "clean", |peer| {
        peer["dirty_bytes"] == 0
    });
    let row = cluster.replication(0);
    assert_eq!(row["role"], "primary", "{row}");
    for peer in row["peers"].as_array().unwrap() {
        assert_eq!(peer["in_sync"], true, "{row}");
    }
    // The replicas took the primary's epoch and know who it is.
    for index in 1..3 {
        let replica = cluster.replication(index);
        assert_eq!(replica["role"], "replica", "{replica}");
        assert_eq!(replica["primary"], "a", "{replica}");
        assert_eq!(replica["epoch"], row["epoch"], "{replica}");
    }
    assert_identical(&cluster, &[0, 1, 2]);
    let (_, table) = cluster.ctl(0, &["replication"]);
    println!("{table}");
    assert!(
        table.contains("REPLICA") && table.contains("open"),
        "{table}"
    );

    // A replica's clients are served too: their IO goes to the primary (forwarded), so
    // every copy gets their writes and their reads see the primary's data.
    let output = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &cluster.uri(1),
            "-c",
            "write -P 0x33 40M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x33 40M 64k",
            "-c",
            "read -P 0 41M 4k",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("wrote 65536/65536") && text.contains("read 65536/65536"),
        "{text}\n--- log of b:\n{}\n--- log of a:\n{}",
        cluster.log(1),
        cluster.log(0)
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
    let offset = 40usize << 20;
    assert!(cluster.volume_data(2)[offset..offset + 65536]
        .iter()
        .all(|&byte| byte == 0x33));
    let log = cluster.log(1);
    assert!(log.contains("forwarding client IO to the primary"), "{log}");
}

#[test]
fn a_dead_replica_does_not_stop_writes_and_is_resynced_when_it_returns() {
    let mut cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 22);
    write_for(&mut client, &cluster, Duration::from_millis(500));
    cluster.kill(2);
    // Two copies of three are a majority: writes and flushes go on.
    write_for(&mut client, &cluster, Duration::from_secs(1));
    client.verify_all().unwrap();
    let row = cluster.replication(0);
    let peers = row["peers"].as_array().unwrap();
    assert_eq!(peers[1]["node"], "c");
    assert_eq!(peers[1]["state"], "down", "{row}");
    assert_eq!(peers[1]["in_sync"], false, "{row}");
    assert!(
        peers[1]["acknowledged"].as_u64() < row["sequence"].as_u64(),
        "{row}"
    );
    assert_eq!(peers[0]["in_sync"], true, "{row}");
    // fathom-stat shows it too, under its report: c down, behind, its dirty bytes.
    let stat = |json: bool| {
        let output = Command::new(env!("CARGO_BIN_EXE_fathom-stat"))
            .arg("--region")
            .arg(cluster.nodes[0].dir.join("stats"))
            .arg("--control")
            .arg(&cluster.nodes[0].dir)
            .args(if json {
                &["--json", "0.2", "1"][..]
            } else {
                &["0.2", "1"][..]
            })
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let report: serde_json::Value = serde_json::from_str(stat(true).trim()).unwrap();
    let c = &report["replication"][0]["peers"][1];
    assert_eq!(
        (&c["node"], &c["state"]),
        (&"c".into(), &"down".into()),
        "{report}"
    );
    assert!(c["dirty_bytes"].as_u64().unwrap() > 0, "{report}");
    let text = stat(false);
    println!("{text}");
    assert!(
        text.contains("REPLICA")
            && text
                .lines()
                .any(|line| line.trim_start().starts_with("c ") && line.contains("down")),
        "{text}"
    );
    wait_caught_up_one(&cluster, "b");
    assert_identical(&cluster, &[0, 1]);

    // It comes back: its session opens again, and the regions it missed are copied to it in
    // the background while writes go on; then it is in sync, byte for byte.
    cluster.start_node(2);
    cluster.wait_open(0, Duration::from_secs(30));
    write_for(&mut client, &cluster, Duration::from_millis(500));
    cluster.wait_peers(0, Duration::from_secs(30), "in sync", |peer| {
        peer["in_sync"] == true
    });
    let row = cluster.replication(0);
    let c = &row["peers"][1];
    assert_eq!(c["resync_left_bytes"], 0, "{row}");
    assert!(c["resynced_bytes"].as_u64().unwrap() > 0, "{row}");
    write_for(&mut client, &cluster, Duration::from_millis(300));
    client.verify_all().unwrap();
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
    let (_, table) = cluster.ctl(0, &["replication"]);
    println!("{table}");
}

fn wait_caught_up_one(cluster: &Cluster, node: &str) {
    let sequence = cluster.replication(0)["sequence"].as_u64().unwrap();
    cluster.wait_peers(0, Duration::from_secs(10), "caught up", |peer| {
        peer["node"] != node || peer["acknowledged"].as_u64() == Some(sequence)
    });
}

/// Reads frames from `stream` until one arrives or it closes; `None` when it closed.
fn read_frame(stream: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut decoder = FrameDecoder::default();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next() {
            let frame = frame.ok()?;
            return Some((frame.header, frame.payload.to_vec()));
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(read) => {
                decoder.push(&buf[..read]);
            }
        }
    }
}

fn hello(node: &str, cluster: &str, auth: &[u8]) -> Vec<u8> {
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        node_id: node,
        cluster,
        auth,
        volumes: vec!["vol0"],
    };
    let mut payload = Vec::new();
    hello.encode(&mut payload).unwrap();
    let mut out = Vec::new();
    encode(&Header::new(Kind::Hello), &payload, &mut out).unwrap();
    out
}

#[test]
fn the_replica_service_refuses_garbage_and_strangers_while_writes_go_on() {
    let cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 23);
    let replica = cluster.nodes[1].replication;
    let connect = || {
        let stream = TcpStream::connect(replica).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
    };

    // Garbage: the connection is closed, nothing answered.
    let mut garbage = connect();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_frame(&mut garbage).is_none());

    // Another cluster: refused with the reason.
    let mut stranger = connect();
    stranger.write_all(&hello("z", "other", &[7; 32])).unwrap();
    let (header, text) = read_frame(&mut stranger).expect("an answer");
    assert_eq!(header.kind, Kind::Refused);
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("cluster"), "{text}");
    assert!(read_frame(&mut stranger).is_none(), "then closed");

    // The right cluster without the key: the HelloOk's challenge cannot be answered, and a
    // made-up proof is refused.
    let mut impostor = connect();
    impostor.write_all(&hello("a", "test", &[7; 32])).unwrap();
    let (header, _) = read_frame(&mut impostor).expect("a challenge");
    assert_eq!(header.kind, Kind::HelloOk);
    impostor.write_all(&hello("a", "test", &[9; 32])).unwrap();
    let (header, text) = read_frame(&mut impostor).expect("an answer");
    assert_eq!(
        header.kind,
        Kind::Refused,
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert!(read_frame(&mut impostor).is_none(), "then closed");

    // A write frame before any session opened: refused and closed, nothing written.
    let mut early = connect();
    let mut frame = Vec::new();
    encode(
        &Header {
            epoch: 99,
            sequence: 1,
            block_count: 1,
            ..Header::new(Kind::Write)
        },
        &[0xee; BLOCK_BYTES as usize],
        &mut frame,
    )
    .unwrap();
    early.write_all(&frame).unwrap();
    let answer = read_frame(&mut early);
    assert!(
        answer
            .as_ref()
            .is_none_or(|(header, _)| header.kind == Kind::Refused),
        "{answer:?}"
    );

    // Through all of it the volume's IO went on, on every copy.
    write_for(&mut client, &cluster, Duration::from_millis(500));
    client.verify_all().unwrap();
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
    let log = cluster.log(1);
    assert!(log.contains("refused the session"), "{log}");
}

/// The primary's record of what each replica lacks is on its device: a replica misses
/// writes, the primary is killed (kill -9) and restarted, and the replica is still caught up.
#[test]
fn a_primary_that_crashes_remembers_what_a_replica_missed() {
    let mut cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 24);
    write_for(&mut client, &cluster, Duration::from_millis(300));
    cluster.kill(2);
    write_for(&mut client, &cluster, Duration::from_millis(500));
    let missed = cluster.replication(0)["peers"][1]["dirty_bytes"]
        .as_u64()
        .unwrap();
    assert!(missed > 0, "c missed writes");
    cluster.kill(0);
    client.crashed();
    cluster.start_node(0);
    cluster.wait_peers(0, Duration::from_secs(30), "b open", |peer| {
        peer["node"] != "b" || peer["state"] == "open"
    });
    let row = cluster.replication(0);
    assert_eq!(
        row["epoch"], 2,
        "a restarted primary takes the next epoch: {row}"
    );
    assert_eq!(
        row["peers"][1]["dirty_bytes"].as_u64(),
        Some(missed),
        "c's dirty regions came back from the bitmap: {row}"
    );
    cluster.start_node(2);
    cluster.wait_peers(0, Duration::from_secs(30), "in sync", |peer| {
        peer["in_sync"] == true
    });
    client
        .reconnect(
            &NbdUri::parse(&cluster.uri(0)).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    client.verify_all().unwrap();
    write_for(&mut client, &cluster, Duration::from_millis(300));
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
}

/// A replica whose disk is replaced (its media file deleted) is rebuilt in full.
#[test]
fn a_replica_with_a_new_disk_is_rebuilt_in_full() {
    let mut cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 25);
    write_for(&mut client, &cluster, Duration::from_millis(500));
    cluster.kill(1);
    std::fs::remove_file(cluster.media(1)).unwrap();
    cluster.start_node(1);
    cluster.wait_peers(0, Duration::from_secs(60), "in sync", |peer| {
        peer["in_sync"] == true && peer["state"] == "open"
    });
    let row = cluster.replication(0);
    let b = &row["peers"][0];
    assert!(
        b["resynced_bytes"].as_u64().unwrap() >= common::cluster::VOLUME_BYTES,
        "the whole volume was copied: {row}"
    );
    write_for(&mut client, &cluster, Duration::from_millis(300));
    client.verify_all().unwrap();
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
}

/// With `replication.resync_p99`, a resync's rate follows the client writes' p99: a bound no
/// write can meet (1 µs) takes it down to its floor of 1 MiB/s while the client writes, and
/// once the client stops it grows again and the rebuild of the new disk ends.
#[test]
fn a_resync_slows_to_keep_the_client_write_p99_bound_and_speeds_up_without_clients() {
    let mut cluster = Cluster::start_with_replication(3, "resync_p99 = \"1us\"");
    let mut client = cluster.checker(0, 26);
    write_for(&mut client, &cluster, Duration::from_millis(300));
    cluster.kill(1);
    std::fs::remove_file(cluster.media(1)).unwrap();
    cluster.start_node(1);
    cluster.wait_open(0, Duration::from_secs(30));
    write_for(&mut client, &cluster, Duration::from_millis(1500));
    let row = cluster.replication(0);
    let b = &row["peers"][0];
    assert_eq!(row["resync_rate"], 1 << 20, "at its floor: {row}");
    assert!(row["resync_client_p99_us"].as_u64().unwrap() > 1, "{row}");
    assert!(
        b["resync_left_bytes"].as_u64().unwrap() > 0 && b["in_sync"] == false,
        "a 64 MiB rebuild at that pace is not done: {row}"
    );
    let (_, table) = cluster.ctl(0, &["replication"]);
    println!("{table}");
    assert!(table.contains("at 1MiB/s (client write p99"), "{table}");
    // No client: the rate grows by a quarter and 4 MiB/s every 100 ms, and the rebuild ends.
    cluster.wait_peers(0, Duration::from_secs(60), "in sync", |peer| {
        peer["in_sync"] == true
    });
    let row = cluster.replication(0);
    assert!(
        row["peers"][0]["resynced_bytes"].as_u64().unwrap() >= common::cluster::VOLUME_BYTES,
        "{row}"
    );
    client.verify_all().unwrap();
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
}

/// The primary dies in the middle of writes; a replica is promoted with fathom-ctl and the
/// client reconnects to it: every write it was acknowledged is there (the checker is not told
/// of any crash: a majority held each write). The old primary comes back as a replica and is
/// rebuilt; all three copies end byte for byte the same.
#[test]
fn a_replica_promoted_after_the_primary_dies_has_every_acknowledged_write() {
    let mut cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 26);
    write_for(&mut client, &cluster, Duration::from_millis(500));
    // b was told it is in sync: it may be promoted.
    let b = cluster.replication(1);
    assert_eq!(b["in_sync"], true, "{b}");
    let pid = cluster.pid(0);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: a signal to the test's own child process, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let end = client.run(Duration::from_secs(30)).unwrap();
    killer.join().unwrap();
    assert!(matches!(end, RunEnd::ConnectionLost(_)), "{end:?}");
    cluster.reap(0);

    let (ok, text) = cluster.ctl(1, &["promote", "vol0"]);
    println!("{text}");
    assert!(ok, "promote: {text}\n{}", cluster.logs());
    assert!(text.contains("epoch 2"), "{text}");
    cluster.wait_serving(1, Duration::from_secs(10));
    client
        .reconnect(
            &NbdUri::parse(&cluster.uri(1)).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    // No crash for the model: every acknowledged write must read back.
    client.verify_all().unwrap();
    write_for(&mut client, &cluster, Duration::from_millis(500));

    // The old primary returns: the others took epoch 2 from b, so it is a replica now, and
    // its copy (which may hold writes no majority took) is rebuilt.
    cluster.start_node(0);
    cluster.wait_peers(1, Duration::from_secs(60), "open", |peer| {
        peer["state"] == "open"
    });
    write_for(&mut client, &cluster, Duration::from_millis(300));
    wait_caught_up_on(&cluster, 1);
    client.sync().unwrap();
    client.verify_all().unwrap();
    let a = cluster.replication(0);
    assert_eq!(a["role"], "replica", "{a}");
    assert_eq!(a["primary"], "b", "{a}");
    let (_, table) = cluster.ctl(1, &["replication"]);
    println!("{table}");
    assert_identical(&cluster, &[0, 1, 2]);
}

/// A reparent in the middle of a client's writes (QD 8, FUA and flushes) moves the primary
/// from a to b with no IO failing: a pauses new IO, drains, b takes epoch 2, and the client,
/// still connected to a, goes on through a's forwarding. a's copy is not rebuilt (it drained:
/// b holds every write it had).
#[test]
fn a_reparent_moves_the_primary_with_no_client_io_failing() {
    let cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 31);
    write_for(&mut client, &cluster, Duration::from_millis(300));
    // a to b (the client's node becomes a forwarding replica), then back from b to a (its
    // own node the primary again).
    for (from, to, epoch) in [(0usize, 1usize, 2u64), (1, 0, 3)] {
        let (name, to_name) = (["a", "b"][from], ["a", "b"][to]);
        let runner = std::thread::spawn(move || {
            let end = client.run(Duration::from_secs(3));
            (client, end)
        });
        std::thread::sleep(Duration::from_millis(500));
        let (ok, text) = cluster.ctl(from, &["reparent", "vol0", "--to", to_name]);
        println!("{text}");
        assert!(ok, "reparent: {text}\n{}", cluster.logs());
        assert!(
            text.contains(&format!("{to_name} is primary of vol0 at epoch {epoch}")),
            "{text}"
        );
        let (returned, end) = runner.join().unwrap();
        client = returned;
        assert!(
            matches!(end, Ok(RunEnd::Elapsed)),
            "{end:?}\n{}",
            cluster.logs()
        );
        if let Err(error) = client.sync() {
            panic!("sync: {error}\n{}", cluster.logs());
        }
        let stats = client.summary().stats;
        println!("{}", client.summary());
        assert_eq!(
            (stats.writes_failed, stats.flushes_failed),
            (0, 0),
            "no client IO fails in a reparent: {}\n{}",
            client.summary(),
            cluster.logs()
        );
        let old = cluster.replication(from);
        assert_eq!(old["role"], "replica", "{old}");
        assert_eq!(old["primary"], to_name, "{old}");
        let new = cluster.replication(to);
        assert_eq!(new["role"], "primary", "{new}");
        assert_eq!(new["epoch"], epoch, "{new}");
        client.verify_all().unwrap();
        wait_caught_up_on(&cluster, to);
        assert_identical(&cluster, &[0, 1, 2]);
        let log = cluster.log(to);
        assert!(
            !log.contains("rebuilding it in full"),
            "the drained primary {name} was not rebuilt: {log}"
        );
        assert!(cluster.log(from).contains("reparent done"));
    }
    // A reparent that cannot be: to a node that holds no copy, and from a replica.
    let (ok, text) = cluster.ctl(0, &["reparent", "vol0", "--to", "z"]);
    assert!(!ok && text.contains("holds no copy"), "{text}");
    let (ok, text) = cluster.ctl(1, &["reparent", "vol0", "--to", "c"]);
    assert!(!ok && text.contains("not the primary"), "{text}");
}

/// Fencing: the primary is stopped (SIGSTOP) in the middle of its client's writes, another
/// node promoted, the old one continued (SIGCONT). The writes it held were sent at its old
/// epoch: every replica refuses them, so none is acknowledged (they fail); the old primary
/// knows it was deposed, becomes a replica and forwards its client's later IO to the new
/// primary. Every write the client saw acknowledged reads back.
#[test]
fn a_deposed_primary_gets_no_write_acknowledged() {
    let cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 27);
    write_for(&mut client, &cluster, Duration::from_millis(300));
    let pid = cluster.pid(0);
    let runner = std::thread::spawn(move || {
        let end = client.run(Duration::from_secs(4));
        (client, end)
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a signal to the test's own child process, not yet waited for.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let promoting = std::time::Instant::now();
    let (ok, text) = cluster.ctl(1, &["promote", "vol0"]);
    assert!(ok, "promote: {text}\n{}", cluster.logs());
    // A majority (b and c) answered; the stopped a had a short grace, not the whole timeout.
    let took = promoting.elapsed();
    println!("promote with the old primary stopped: {took:?}");
    assert!(took < Duration::from_secs(3), "promote took {took:?}");
    cluster.wait_serving(1, Duration::from_secs(10));
    cluster.signal(0, libc::SIGCONT);
    let (mut client, end) = runner.join().unwrap();
    let end = end.unwrap();
    assert!(
        matches!(end, RunEnd::Elapsed),
        "{end:?}\n{}",
        cluster.logs()
    );
    // The writes it held fail (refused at the old epoch), unless a majority had them before
    // the promote (sent before the stop, their acks read after it): those are acknowledged
    // rightly. Either way every acknowledged write must read back through the new primary.
    // The client's next writes through a find it deposed.
    let end = client.run(Duration::from_millis(500)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    println!("{}", client.summary());
    let log = cluster.log(0);
    assert!(
        log.contains("another node took the volume over"),
        "{}",
        cluster.logs()
    );
    let started = std::time::Instant::now();
    while cluster.replication(0)["role"] != "replica" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            cluster.replication(0)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Through the old primary (forwarding now) and through the new one alike.
    client.verify_all().unwrap();
    write_for(&mut client, &cluster, Duration::from_millis(300));
    client
        .reconnect(
            &NbdUri::parse(&cluster.uri(1)).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    client.verify_all().unwrap();
    wait_caught_up_on(&cluster, 1);
    assert_identical(&cluster, &[0, 1, 2]);
}

/// Majority writes leave replicas holding different writes: c's device is stalled, so the
/// primary's writes reach c's socket but not its disk, and the newest never leave the
/// primary's buffers; they are acknowledged with b. The primary dies; c is promoted and must
/// first take from b every region b has newer (choosing by sequence number), so that every
/// acknowledged write reads back through c.
#[test]
fn a_promoted_replica_that_lagged_takes_the_newer_regions_from_the_other() {
    let mut cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 28);
    write_for(&mut client, &cluster, Duration::from_millis(200));
    let (ok, text) = cluster.ctl(2, &["inject", "add", "nvme0", "--stall"]);
    assert!(ok, "{text}");
    write_for(&mut client, &cluster, Duration::from_millis(300));
    let row = cluster.replication(0);
    assert!(
        row["peers"][1]["acknowledged"].as_u64() < row["sequence"].as_u64(),
        "c is behind: {row}"
    );
    cluster.kill(0);
    let (ok, text) = cluster.ctl(2, &["inject", "clear", "nvme0"]);
    assert!(ok, "{text}");
    let (ok, text) = cluster.ctl(2, &["promote", "vol0", "--force"]);
    println!("{text}");
    assert!(ok, "promote: {text}\n{}", cluster.logs());
    let copied: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("reconciled: "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    assert!(copied > 0, "c took no region from b: {text}");
    cluster.wait_serving(2, Duration::from_secs(10));
    client
        .reconnect(
            &NbdUri::parse(&cluster.uri(2)).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    client.verify_all().unwrap();
    cluster.start_node(0);
    write_for(&mut client, &cluster, Duration::from_millis(200));
    wait_caught_up_on(&cluster, 2);
    client.sync().unwrap();
    client.verify_all().unwrap();
    assert_identical(&cluster, &[0, 1, 2]);
}

/// Opens a session to node `index`'s replica service for vol0 as node `as_node`, proving the
/// cluster key as a primary would.
fn open_session(cluster: &Cluster, index: usize, as_node: &str) -> TcpStream {
    use fathom_replication::auth::ClusterKey;
    use fathom_replication::session::{ConnectorSession, PeerAuth};
    let auth = PeerAuth::Key(ClusterKey::load(&cluster.key).unwrap());
    let mut stream = TcpStream::connect(cluster.nodes[index].replication).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (mut session, hello) = ConnectorSession::start(
        as_node,
        "test",
        &cluster.nodes[index].id,
        vec!["vol0".into()],
        &auth,
    )
    .unwrap();
    stream.write_all(&hello).unwrap();
    let (header, payload) = read_frame(&mut stream).expect("a HelloOk");
    let frame = fathom_replication::proto::Frame {
        header,
        payload: &payload,
    };
    let (proof, _) = session.on_frame(&frame).unwrap();
    stream.write_all(&proof).unwrap();
    stream
}

/// On a session that proved the key: frames of a wrong epoch are refused and change
/// nothing, garbage closes the session, and a peer that stops in the middle of a frame is
/// dropped; the primary's writes go on throughout.
#[test]
fn a_live_session_that_sends_wrong_epochs_garbage_or_half_a_frame_is_refused() {
    let cluster = Cluster::start(3);
    let mut client = cluster.checker(0, 29);
    write_for(&mut client, &cluster, Duration::from_millis(200));
    let epoch = cluster.replication(1)["epoch"].as_u64().unwrap();

    // A write of an old epoch and one of a newer epoch nobody claimed: refused, with the
    // reason; the session stays.
    let mut peer = open_session(&cluster, 1, "z");
    for (stale, code) in [
        (epoch - 1, fathom_replication::proto::refusal::STALE_EPOCH),
        (
            epoch + 5,
            fathom_replication::proto::refusal::EPOCH_NOT_CLAIMED,
        ),
    ] {
        let mut frame = Vec::new();
        encode(
            &Header {
                epoch: stale,
                sequence: 1 << 40,
                lba: 8192,
                block_count: 1,
                request_id: 5,
                ..Header::new(Kind::Write)
            },
            &[0xee; BLOCK_BYTES as usize],
            &mut frame,
        )
        .unwrap();
        peer.write_all(&frame).unwrap();
        let (header, text) = read_frame(&mut peer).expect("a refusal");
        assert_eq!(
            (header.kind, header.status),
            (Kind::Refused, code),
            "{}",
            String::from_utf8_lossy(&text)
        );
    }
    // A claim of the current epoch by a node that does not hold it: refused.
    let mut claim = Vec::new();
    encode(
        &Header {
            epoch,
            request_id: 6,
            ..Header::new(Kind::Epoch)
        },
        &[],
        &mut claim,
    )
    .unwrap();
    peer.write_all(&claim).unwrap();
    let (header, _) = read_frame(&mut peer).expect("a refusal");
    assert_eq!(
        (header.kind, header.status),
        (
            Kind::Refused,
            fathom_replication::proto::refusal::EPOCH_TAKEN
        )
    );
    // Garbage: the session is closed.
    peer.write_all(&[0x55; 200]).unwrap();
    assert!(read_frame(&mut peer).is_none(), "closed after garbage");

    // Half a frame, then nothing: dropped after the stall timeout, while writes go on.
    let mut staller = open_session(&cluster, 2, "z");
    staller.write_all(&claim[..40]).unwrap();
    let started = std::time::Instant::now();
    write_for(&mut client, &cluster, Duration::from_millis(500));
    assert!(
        read_frame(&mut staller).is_none(),
        "the staller was dropped"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    client.verify_all().unwrap();
    wait_caught_up(&cluster);
    assert_identical(&cluster, &[0, 1, 2]);
    let log = cluster.log(2);
    assert!(
        log.contains("sent 40 bytes of a frame and then nothing"),
        "{log}"
    );
}

/// The primary's stats region (what fathom-stat reads) over `seconds` while `during` runs:
/// the last interval's report.
fn stats_during(cluster: &Cluster, index: usize, during: impl FnOnce()) -> serde_json::Value {
    let region = cluster.nodes[index].dir.join("stats");
    let reader = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_fathom-stat"))
            .arg("--region")
            .arg(&region)
            .args(["--json", "1", "2"])
            .output()
            .unwrap()
    });
    during();
    let output = reader.join().unwrap();
    assert!(
        output.status.success(),
        "fathom-stat: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(text.lines().last().expect("a report")).unwrap()
}

fn write_stage(report: &serde_json::Value, stage: &str) -> serde_json::Value {
    let row = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["op"] == "write")
        .unwrap_or_else(|| panic!("no write row in {report}"));
    row["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} stage in {row}"))
        .clone()
}

/// Every trace record node `index` holds, and its clock's rate (ticks per second).
fn trace_records(cluster: &Cluster, index: usize) -> (u64, Vec<TraceRecord>) {
    let region = region_beside(&cluster.nodes[index].dir.join("stats"));
    let mut reader = TraceReader::open(&region, Start::Oldest)
        .unwrap_or_else(|error| panic!("{}: {error}", region.display()));
    let records = reader.poll().records.into_iter().map(|(_, r)| r).collect();
    (reader.directory().tsc_hz, records)
}

/// 2 ms on one replica's device: the primary's `replicate:c` stage shows it, `replicate:b`
/// does not, and the client's writes are answered by the primary and b without waiting for c.
/// The primary traces every IO and c its writes slower than 1 ms: c's spans join the
/// primary's traces (same trace id, the primary's span their parent) and end after the
/// client had its answer.
#[test]
fn a_slow_replica_shows_in_its_replicate_stage_and_does_not_hold_writes_back() {
    let cluster = Cluster::start(3);
    let (ok, text) = cluster.ctl(2, &["inject", "add", "nvme0", "--latency", "2ms"]);
    assert!(ok, "{text}");
    let (ok, text) = cluster.ctl(0, &["trace", "set", "vol0", "--rate", "1"]);
    assert!(ok, "{text}");
    let (ok, text) = cluster.ctl(2, &["trace", "set", "vol0", "--rate", "0", "--tail", "1ms"]);
    assert!(ok, "{text}");
    let uri = NbdUri::parse(&cluster.uri(0)).unwrap();
    let mut client = Client::connect(
        &uri,
        ClientOptions {
            seed: 30,
            blocks: 1024,
            queue_depth: 1,
            flush_every_writes: 0,
            fua_percent: 0,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let report = stats_during(&cluster, 0, || {
        let end = client.run(Duration::from_millis(2500)).unwrap();
        assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    });
    let (b, c, total) = (
        write_stage(&report, "replicate:b"),
        write_stage(&report, "replicate:c"),
        write_stage(&report, "total"),
    );
    println!("replicate:b {b}\nreplicate:c {c}\ntotal {total}");
    let ns = |stage: &serde_json::Value, field: &str| stage[field].as_f64().unwrap();
    assert!(b["count"].as_u64().unwrap() > 50, "{b}");
    assert!(ns(&c, "p50_ns") >= 2e6, "c's 2 ms shows in its stage: {c}");
    assert!(ns(&b, "p50_ns") < 1e6, "{b}");
    assert!(
        ns(&total, "p50_ns") < 1e6,
        "the client's writes do not wait for c: {total}"
    );
    client.verify_all().unwrap();

    let (hz, primary) = trace_records(&cluster, 0);
    let (_, replica) = trace_records(&cluster, 2);
    let writes: std::collections::HashMap<_, _> = primary
        .iter()
        .filter(|record| record.op == 1 && record.stamps[stamp::SENT] != 0)
        .map(|record| (record.trace_id, record))
        .collect();
    let joined: Vec<(&TraceRecord, &TraceRecord)> = replica
        .iter()
        .filter_map(|span| writes.get(&span.trace_id).map(|&write| (write, span)))
        .collect();
    assert!(
        joined.len() >= 20,
        "{} of c's {} spans join one of the primary's {} traced writes",
        joined.len(),
        replica.len(),
        writes.len()
    );
    // Both nodes stamp with this machine's TSC: raw stamps compare across processes (each
    // node's unix times rest on its own calibration of the TSC's rate). A write the client
    // had answered within the injected 2 ms (most: the stats above) must show c's span, which
    // takes the 2 ms, ending after the answer; slower ones waited on this busy machine.
    let two_ms = 2 * hz / 1000;
    let (mut fast, mut after) = (0, 0);
    for &(write, span) in &joined {
        assert_eq!(
            span.parent, write.span_id,
            "c's span is a child of the write's"
        );
        assert!(span.reason & reason::TAIL != 0, "{span:?}");
        let (received, acked) = (write.stamps[stamp::RECEIVED], write.stamps[stamp::SENT]);
        let end = span.stamps[stamp::COMPLETED].max(span.stamps[stamp::SEEN]);
        assert!(
            span.stamps[stamp::ACCEPTED] > received,
            "c took the write after the primary's client sent it: {write:?} {span:?}"
        );
        if acked - received < two_ms {
            fast += 1;
            after += (end > acked) as usize;
        }
    }
    println!(
        "{} joined traces, {fast} answered within 2 ms: c's span ends after the client's answer in {after}",
        joined.len()
    );
    assert!(fast * 2 >= joined.len(), "most writes do not wait for c");
    assert_eq!(after, fast, "c's span ends after the client was answered");
}

/// The primary's /metrics has the replicate stages and each replica's session, sync, lag
/// and resync, and passes promtool; a replica's says it is not the primary.
#[test]
fn metrics_show_each_replica_and_pass_promtool() {
    let cluster = Cluster::start_with_metrics(3);
    let mut client = cluster.checker(0, 31);
    write_for(&mut client, &cluster, Duration::from_millis(300));
    wait_caught_up(&cluster);
    let body = cluster.scrape(0);
    for expected in [
        "stage=\"replicate:b\"",
        "stage=\"replicate:c\"",
        "fathom_replication_primary{node=\"a\",volume=\"vol0\"} 1",
        "fathom_replica_connected{node=\"a\",volume=\"vol0\",replica=\"b\"} 1",
        "fathom_replica_in_sync{node=\"a\",volume=\"vol0\",replica=\"c\"} 1",
        "fathom_replica_behind_writes{node=\"a\",volume=\"vol0\",replica=\"b\"} 0",
        "fathom_replica_resync_bytes_total{",
    ] {
        assert!(body.contains(expected), "no {expected} in:\n{body}");
    }
    promtool_check(&body);
    let replica = cluster.scrape(1);
    assert!(
        replica.contains("fathom_replication_primary{node=\"b\",volume=\"vol0\"} 0"),
        "{replica}"
    );
}
