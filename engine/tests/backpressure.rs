//! Back-pressure: when a device queue is full, requests wait in the bounded inbound ring and
//! submitters are told `Busy`; nothing queues without bound on the reactor.

mod common;

use std::time::Duration;

use common::{node, pattern};
use fathom_engine::{Engine, IoError, IoRequest, Notify, VolumeId};

#[test]
fn a_full_device_queue_pushes_back_on_submitters_instead_of_queueing_without_bound() {
    // Commands take 200 ms at the device, two fit its queue, sixteen the inbound ring.
    let test = node(
        &[0],
        "[[device]]\nname = \"slow\"\ndriver = \"mem\"\nmedia = \"ram\"\nmode = \"thread\"\n\
         size = \"8MiB\"\n[[device.inject]]\nlatency = \"200ms\"\n\
         [[volume]]\nname = \"v\"\ndevice = \"slow\"\nsize = \"8MiB\"\n",
    );
    let mut config = test.config.clone();
    config.reactor.queue_depth = 2;
    config.reactor.inbound_capacity = 16;
    let engine = Engine::start(&config).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut accepted = 0u64;
    let mut busy = 0;
    for tag in 0..200u64 {
        let mut buf = engine.dma().alloc(4096).unwrap();
        buf.write_at(0, &pattern(tag, 4096));
        match engine.submit(
            IoRequest::write(VolumeId(0), tag * 4096, buf, tag),
            Notify::Channel(tx.clone()),
        ) {
            Ok(()) => accepted += 1,
            Err(rejected) => {
                assert_eq!(rejected.error, IoError::Busy, "only back-pressure refuses");
                busy += 1;
            }
        }
        // Slow enough for the reactor to keep up with the ring: what it holds is what it took.
        std::thread::sleep(Duration::from_micros(100));
    }
    // What the node holds is bounded by its queue, the one request waiting for it, and the
    // ring; the burst (about 20 ms) ends long before the first 200 ms command.
    assert!(
        accepted <= 2 + 1 + 16,
        "the reactor took {accepted} requests while its queue holds 2 and its ring 16"
    );
    assert_eq!(accepted + busy, 200);
    for _ in 0..accepted {
        let done = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a completion");
        done.result.expect("an accepted write succeeds");
    }
    engine.shutdown().unwrap();
}
