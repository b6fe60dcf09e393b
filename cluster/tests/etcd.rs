//! The etcd client against real etcd members (Debian's etcd-server) on loopback: what the
//! control plane relies on — compare-and-swap, leases that end when not kept alive, and
//! operations and watches that go on when a member dies or hangs.

use std::time::{Duration, Instant};

use fathom_cluster::etcd::{Change, Condition, Etcd, Timeouts, Write};
use fathom_cluster::local::LocalEtcd;

fn client(local: &LocalEtcd) -> Etcd {
    Etcd::new(&local.endpoints(), Timeouts::default()).unwrap()
}

#[test]
fn compare_and_swap_lets_one_of_two_writers_win() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalEtcd::start(dir.path(), 1).unwrap();
    let mut one = client(&local);
    let mut two = client(&local);
    one.put("/t/state", b"epoch 1", None).unwrap();
    let seen = one.get("/t/state").unwrap().unwrap();
    let write = |value: &[u8]| Write::Put {
        key: "/t/state".into(),
        value: value.to_vec(),
        lease: None,
    };
    let when = [Condition::ModRevision("/t/state".into(), seen.mod_revision)];
    assert!(one.txn(&when, &[write(b"epoch 2 by one")]).unwrap());
    assert!(!two.txn(&when, &[write(b"epoch 2 by two")]).unwrap());
    assert_eq!(
        two.get("/t/state").unwrap().unwrap().value,
        b"epoch 2 by one"
    );
    // Create-only.
    assert!(one
        .txn(
            &[Condition::Absent("/t/new".into())],
            &[Write::Put {
                key: "/t/new".into(),
                value: b"x".to_vec(),
                lease: None
            }]
        )
        .unwrap());
    assert!(!two
        .txn(
            &[Condition::Absent("/t/new".into())],
            &[Write::Put {
                key: "/t/new".into(),
                value: b"y".to_vec(),
                lease: None
            }]
        )
        .unwrap());
    assert!(one.get("/t/absent").unwrap().is_none());
}

#[test]
fn a_key_under_a_lease_lives_while_kept_alive_and_goes_after() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalEtcd::start(dir.path(), 1).unwrap();
    let mut etcd = client(&local);
    let lease = etcd.grant(Duration::from_secs(1)).unwrap();
    etcd.put("/t/nodes/a", b"a", Some(lease)).unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(etcd.keep_alive(lease).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(etcd.get("/t/nodes/a").unwrap().is_some(), "kept alive 3 s");
    let stopped = Instant::now();
    while etcd.get("/t/nodes/a").unwrap().is_some() {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "lease of 1 s still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        etcd.keep_alive(lease).unwrap(),
        None,
        "an expired lease says so"
    );
}

#[test]
fn operations_and_watches_go_on_when_a_member_dies_or_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = LocalEtcd::start(dir.path(), 3).unwrap();
    let mut etcd = client(&local);
    let mut watcher = client(&local);
    let (_, revision) = etcd.get_prefix("/w/").unwrap();
    watcher.watch("/w/", revision + 1);
    // Long enough to outlive an election on a loaded machine: what is tested is that the
    // keep-alive reaches a live member, not how fast etcd elects.
    let lease = etcd.grant(Duration::from_secs(5)).unwrap();
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    let drain = |watcher: &mut Etcd, seen: &mut Vec<Vec<u8>>| {
        if let Ok(changes) = watcher.next_events(Duration::from_millis(100)) {
            for change in changes {
                if let Change::Put(kv) = change {
                    seen.push(kv.value);
                }
            }
        }
    };
    for round in 0..3u32 {
        // The member both clients use now (each starts on the first) dies, or hangs.
        let victim = round as usize % 3;
        match round {
            1 => local.signal(victim, libc::SIGSTOP),
            _ => local.kill(victim),
        }
        let started = Instant::now();
        for step in 0..5u32 {
            let value = format!("{round}-{step}").into_bytes();
            etcd.put(&format!("/w/{round}-{step}"), &value, None)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(etcd.keep_alive(lease).unwrap().is_some(), "round {round}");
            expected.push(value);
            drain(&mut watcher, &mut seen);
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "round {round}: 5 puts took {:?}",
            started.elapsed()
        );
        match round {
            1 => local.signal(victim, libc::SIGCONT),
            _ => local.restart(victim).unwrap(),
        }
    }
    let until = Instant::now() + Duration::from_secs(10);
    while seen.len() < expected.len() && Instant::now() < until {
        drain(&mut watcher, &mut seen);
    }
    // A put tried again on another member after no answer may be applied by the first as
    // well when it comes back (a hung member proposes what it had received: retries are at
    // least once), so the watch may show a put twice, the second time later. Every put must
    // show, in order, and nothing else.
    let mut rest = seen.iter();
    for value in &expected {
        assert!(
            rest.any(|seen| seen == value),
            "the watch missed {:?} (or saw it out of order): saw {seen:?}",
            String::from_utf8_lossy(value)
        );
    }
    assert!(
        seen.iter().all(|value| expected.contains(value)),
        "{seen:?}"
    );
}
