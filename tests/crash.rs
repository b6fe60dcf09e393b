//! Crash tests: `fathom::checker::Client` writes at random to a node's volume over NBD and
//! remembers every write it was acknowledged; the node is killed under it (SIGKILL), started
//! again on the same media, and every block must hold what the checker's model allows: no
//! durable write lost, no older overwritten write back, nothing never written.
//!
//! `FATHOM_CRASH_CYCLES` sets the number of kill cycles (8 unless set; `tests/crash-soak` runs
//! 50 or more), `FATHOM_CRASH_SEED` the client's seed (printed; kill times vary regardless).

mod common;

use std::time::{Duration, Instant};

use common::Node;
use fathom::checker::{CheckerError, Client, ClientOptions, Observed, RunEnd};
use fathom::nbd_client::NbdUri;

/// A `mem` device on `file` media (a sparse file under the node's data directory, which the
/// harness makes the test's directory), so what the node wrote is there after it restarts. Its
/// block is the checker's 4 KiB, so a block the checker judges atomic is one device block.
const CONFIG: &str = "[nbd]\nlisten = [\"127.0.0.1:0\"]\n\
    [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"file\"\nsize = \"64MiB\"\n\
    block_size = 4096\n\
    [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n";

/// The client writes the first 4 MiB of the 64 MiB volume, so each cycle (some 600 writes of
/// 1 to 8 blocks with the debug build) overwrites most blocks a few times.
const WORKING_SET_BLOCKS: u64 = 1024;
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn uri(node: &Node) -> NbdUri {
    NbdUri::parse(&node.uri("vol0")).unwrap()
}

fn options(seed: u64) -> ClientOptions {
    ClientOptions {
        seed,
        blocks: WORKING_SET_BLOCKS,
        ..ClientOptions::default()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number"))
    })
}

/// A verify pass that must pass; a failure names every violation kept, and the node's log.
fn verify(client: &mut Client, node: &Node, when: &str) -> u64 {
    match client.verify_all() {
        Ok(report) => report.blocks_checked,
        Err(CheckerError::Violations { count, violations }) => {
            let listed: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
            panic!(
                "{when}: {count} blocks hold what the model forbids:\n{}\n{}\nnode log:\n{}",
                listed.join("\n"),
                client.summary(),
                node.log()
            );
        }
        Err(error) => panic!(
            "{when}: verify pass failed: {error}\nnode log:\n{}",
            node.log()
        ),
    }
}

#[test]
fn writes_read_back_exactly_across_a_reconnect_and_a_clean_restart() {
    let node = Node::start_config(tempfile::tempdir().unwrap(), CONFIG);
    let mut client = Client::connect(&uri(&node), options(7)).unwrap();
    let end = client.run(Duration::from_millis(300)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    verify(&mut client, &node, "after the first run");
    // A new connection sees the same, and writes go on.
    client.disconnect();
    client.reconnect(&uri(&node), RECONNECT_TIMEOUT).unwrap();
    verify(&mut client, &node, "on a new connection");
    let end = client.run(Duration::from_millis(200)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    // SIGTERM flushes every volume: not a crash, so every acknowledged write must be back,
    // exactly (the model is not told of any crash).
    client.disconnect();
    let node = node.restart();
    client.reconnect(&uri(&node), RECONNECT_TIMEOUT).unwrap();
    verify(&mut client, &node, "after a clean restart");
    let summary = client.summary();
    println!("clean restart: {summary}");
    let stats = summary.stats;
    assert!(stats.writes_acked > 100, "{summary}");
    assert!(
        stats.fua_writes_acked > 0 && stats.flushes_acked > 0,
        "{summary}"
    );
    assert_eq!(stats.writes_acked, stats.writes_issued, "{summary}");
    assert_eq!(
        (stats.writes_failed, stats.flushes_failed),
        (0, 0),
        "{summary}"
    );
    assert_eq!(stats.violations, 0);
    client.disconnect();
    node.stop();
}

/// The checker's end-to-end proof that it can fail: after a sync every acknowledged write is
/// durable; the node is killed and three blocks of its media file are damaged behind its back
/// (one zeroed, one given another block's data, one with a bit flipped). The verify pass after
/// the restart must name exactly those three, each for what it is.
#[test]
fn blocks_damaged_behind_the_nodes_back_are_each_named() {
    let node = Node::start_config(tempfile::tempdir().unwrap(), CONFIG);
    let mut client = Client::connect(&uri(&node), options(11)).unwrap();
    let end = client.run(Duration::from_millis(200)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    client.sync().unwrap();
    const BLOCK: usize = fathom::checker::BLOCK_BYTES;
    let mut damaged = Vec::new();
    let node = node.restart_after_kill_with(|dir| {
        // The volume starts at the device's first byte, which is the media file's.
        let path = dir.join("nvme0.img");
        let mut media = std::fs::read(&path).unwrap();
        let written: Vec<usize> = (0..WORKING_SET_BLOCKS as usize)
            .filter(|&block| {
                media[block * BLOCK..(block + 1) * BLOCK]
                    .iter()
                    .any(|&b| b != 0)
            })
            .collect();
        assert!(written.len() > 100, "{} blocks written", written.len());
        let (zeroed, moved, source, flipped) = (written[10], written[20], written[30], written[40]);
        media[zeroed * BLOCK..(zeroed + 1) * BLOCK].fill(0);
        media.copy_within(source * BLOCK..(source + 1) * BLOCK, moved * BLOCK);
        media[flipped * BLOCK + 1000] ^= 0x04;
        std::fs::write(&path, media).unwrap();
        damaged.extend([
            (zeroed, "zeros"),
            (moved, "misdirected"),
            (flipped, "garbage"),
        ]);
        damaged.sort();
        let _ = source;
    });
    client.crashed();
    client.reconnect(&uri(&node), RECONNECT_TIMEOUT).unwrap();
    let Err(CheckerError::Violations { count, violations }) = client.verify_all() else {
        panic!("the damaged blocks went unnoticed: {}", client.summary());
    };
    let listed: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
    let listed = listed.join("\n");
    println!("damaged media: {count} violations:\n{listed}");
    assert_eq!(count, 3, "{listed}");
    for (violation, &(block, kind)) in violations.iter().zip(&damaged) {
        assert_eq!(violation.block, block as u64, "{listed}");
        assert!(violation.after_crash, "{violation}");
        let matches = match kind {
            "zeros" => violation.observed == Observed::Zeros,
            "misdirected" => matches!(violation.observed, Observed::Misdirected { .. }),
            _ => {
                matches!(&violation.observed, Observed::Garbage(garbage) if !garbage.checksum_matches)
            }
        };
        assert!(matches, "block {block} should read as {kind}: {violation}");
        // Every write was durable at the kill: each block had exactly one legal content.
        assert_eq!(violation.allowed.len(), 1, "{violation}");
        assert!(violation.allowed[0].newest_durable, "{violation}");
    }
    node.stop();
}

#[test]
fn kill_9_loses_no_durable_write_and_returns_nothing_never_written() {
    let cycles = env_u64("FATHOM_CRASH_CYCLES").unwrap_or(8);
    let seed = env_u64("FATHOM_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!("crash test: {cycles} cycles, FATHOM_CRASH_SEED={seed}");
    let mut node = Node::start_config(tempfile::tempdir().unwrap(), CONFIG);
    let mut client = Client::connect(&uri(&node), options(seed)).unwrap();
    let mut rng = seed | 1;
    let started = Instant::now();
    for cycle in 1..=cycles {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(100 + rng % 401);
        let pid = node.child.id() as i32;
        // The kill comes from another thread while the client is in the middle of its writes,
        // so some are in flight: the child is not waited for until the killer is done, so the
        // pid stays the node's.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: a signal to the test's own child process, not yet waited for.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let end = client.run(Duration::from_secs(30)).unwrap();
        killer.join().unwrap();
        let in_flight = match &end {
            RunEnd::ConnectionLost(CheckerError::ConnectionLost { in_flight, .. }) => *in_flight,
            other => panic!("cycle {cycle}: the run ended with {other:?}, not the kill"),
        };
        node = node.restart_after_kill();
        client.crashed();
        client.reconnect(&uri(&node), RECONNECT_TIMEOUT).unwrap();
        let checked = verify(&mut client, &node, &format!("after crash {cycle}"));
        println!(
            "cycle {cycle}: killed after {} ms with {in_flight} requests in flight; {checked} \
             blocks checked, {} written",
            delay.as_millis(),
            client.model().written_blocks()
        );
    }
    let end = client.run(Duration::from_millis(200)).unwrap();
    assert!(matches!(end, RunEnd::Elapsed), "{end:?}");
    verify(&mut client, &node, "at the end");
    let summary = client.summary();
    println!(
        "crash test summary: {cycles} cycles in {:.1} s: {summary}",
        started.elapsed().as_secs_f64()
    );
    let stats = summary.stats;
    assert_eq!(stats.crashes, cycles);
    assert_eq!(stats.violations, 0);
    assert_eq!(
        (stats.writes_failed, stats.flushes_failed),
        (0, 0),
        "{summary}"
    );
    assert!(
        stats.fua_writes_acked > 0 && stats.flushes_acked > 0,
        "{summary}"
    );
    client.disconnect();
    node.stop();
}
