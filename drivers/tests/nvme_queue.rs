//! The NVMe queue protocol between the host queue pair and the in-process controller, driven
//! directly through a device queue: back-pressure, wraparound, and the controller's answers to
//! commands it must refuse.

use std::time::{Duration, Instant};

use fathom_dma::{DmaPool, PageKind};
use fathom_drivers::inject::{InjectRule, LatencySpec};
use fathom_drivers::mem::{DeviceMode, MediaKind, MemDriver, MemOptions};
use fathom_drivers::{Driver, IoCommand, IoFlags, IoQueue, Op};
use fathom_nvme::{Completed, DataRange, QueueFull, Status};
use fathom_telemetry::Clock;

fn device(mode: DeviceMode) -> (MemDriver, DmaPool) {
    device_with(mode, Vec::new())
}

/// A `mem` device with 8 MiB of ram media and the given injection rules. DMA memory from
/// hugepages where 8 are free, else normal pages.
fn device_with(mode: DeviceMode, inject: Vec<InjectRule>) -> (MemDriver, DmaPool) {
    let pool = DmaPool::new(16 << 20, PageKind::Huge)
        .or_else(|_| DmaPool::new(16 << 20, PageKind::Normal))
        .unwrap();
    let options = MemOptions {
        name: "q".into(),
        media: MediaKind::Ram,
        mode,
        size: 8 << 20,
        block_size: 512,
        path: "unused.img".into(),
        inject,
    };
    let driver = MemDriver::open(&options, &pool, Clock::best(), 2).unwrap();
    (driver, pool)
}

fn read(slba: u64, blocks: u32, data: DataRange) -> IoCommand {
    IoCommand {
        op: Op::Read,
        nsid: 1,
        slba,
        blocks,
        data: Some(data),
        flags: IoFlags::NONE,
    }
}

/// Reaps until `count` completions arrived (bounded by a deadline: a lost completion fails).
fn reap_all(queue: &mut dyn IoQueue, count: usize) -> Vec<Completed> {
    let mut out = vec![Completed::default(); 64];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        let reaped = queue.reap(&mut out);
        got.extend_from_slice(&out[..reaped]);
        assert!(
            Instant::now() < deadline,
            "only {} of {count} completions arrived",
            got.len()
        );
    }
    got
}

#[test]
fn identify_describes_the_controller_and_namespace() {
    let (driver, _pool) = device(DeviceMode::Inline);
    let info = driver.info();
    assert_eq!(info.model, "Fathom mem NVMe");
    assert_eq!(info.serial, "FTHM-q");
    assert_eq!(info.namespaces.len(), 1);
    assert_eq!(
        (
            info.namespaces[0].nsid,
            info.namespaces[0].block_size,
            info.namespaces[0].blocks
        ),
        (1, 512, 16384)
    );
    assert_eq!(info.max_transfer_bytes, 1 << 20, "MDTS 8 with 4 KiB pages");
}

#[test]
fn a_full_queue_refuses_and_recovers() {
    for mode in [DeviceMode::Inline, DeviceMode::Thread] {
        let (driver, pool) = device(mode);
        let mut queue = driver.create_queue(4).unwrap();
        let buf = pool.alloc(4096).unwrap();
        assert_eq!(queue.capacity(), 4);
        for cookie in 0..4 {
            queue
                .submit(&read(cookie as u64, 8, DataRange::of(&buf)), cookie)
                .unwrap();
        }
        assert_eq!(
            queue.submit(&read(0, 8, DataRange::of(&buf)), 99),
            Err(QueueFull),
            "{mode:?}"
        );
        queue.ring();
        let mut cookies: Vec<u32> = reap_all(queue.as_mut(), 4)
            .iter()
            .map(|done| done.cookie)
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [0, 1, 2, 3]);
        assert_eq!(queue.outstanding(), 0);
        queue.submit(&read(0, 8, DataRange::of(&buf)), 5).unwrap();
        queue.ring();
        assert_eq!(reap_all(queue.as_mut(), 1)[0].cookie, 5);
    }
}

#[test]
fn thousands_of_laps_around_small_rings_lose_nothing() {
    for (mode, depth) in [
        (DeviceMode::Inline, 1u16),
        (DeviceMode::Inline, 5),
        (DeviceMode::Thread, 1),
        (DeviceMode::Thread, 6),
    ] {
        let (driver, pool) = device(mode);
        let mut queue = driver.create_queue(depth).unwrap();
        let buf = pool.alloc(4096).unwrap();
        let mut next = 0u32;
        // Batches of every size up to the depth, so the tail and head land on every slot
        // and the phase tag flips thousands of times.
        for round in 0..3000u32 {
            let batch = 1 + round % depth as u32;
            for _ in 0..batch {
                queue
                    .submit(&read(next as u64 % 1000, 1, DataRange::of(&buf)), next)
                    .unwrap();
                next += 1;
            }
            queue.ring();
            let done = reap_all(queue.as_mut(), batch as usize);
            let mut cookies: Vec<u32> = done.iter().map(|done| done.cookie).collect();
            cookies.sort_unstable();
            assert!(
                cookies.iter().copied().eq(next - batch..next),
                "{mode:?} depth {depth} round {round}: {cookies:?}"
            );
            assert!(done.iter().all(|done| done.status.is_success()));
        }
        assert_eq!(queue.outstanding(), 0);
    }
}

#[test]
fn the_controller_refuses_what_a_device_would_refuse() {
    for mode in [DeviceMode::Inline, DeviceMode::Thread] {
        let (driver, pool) = device(mode);
        let mut queue = driver.create_queue(16).unwrap();
        let buf = pool.alloc(4 << 20).unwrap();
        let data = DataRange {
            len: 4096,
            ..DataRange::of(&buf)
        };
        let outside = DataRange {
            iova: 0x1000,
            addr: 0x1000,
            len: 4096,
        };
        let cases = [
            (
                read(16384, 1, DataRange { len: 512, ..data }),
                Status::LBA_OUT_OF_RANGE,
            ),
            (read(16380, 8, data), Status::LBA_OUT_OF_RANGE),
            (read(u64::MAX - 2, 8, data), Status::LBA_OUT_OF_RANGE),
            (
                IoCommand {
                    nsid: 2,
                    ..read(0, 1, DataRange { len: 512, ..data })
                },
                Status::INVALID_NAMESPACE,
            ),
            (read(0, 8, outside), Status::DATA_TRANSFER_ERROR),
            (
                read(
                    0,
                    4096,
                    DataRange {
                        len: 2 << 20,
                        ..data
                    },
                ),
                Status::INVALID_FIELD,
            ),
            (
                read(
                    0,
                    128,
                    DataRange {
                        iova: data.iova + 512,
                        addr: data.addr + 512,
                        len: 64 << 10,
                    },
                ),
                Status::SUCCESS,
            ),
            (
                IoCommand {
                    op: Op::Flush,
                    ..read(0, 1, data)
                },
                Status::SUCCESS,
            ),
        ];
        for (cookie, (command, _)) in cases.iter().enumerate() {
            queue.submit(command, cookie as u32).unwrap();
        }
        queue.ring();
        for done in reap_all(queue.as_mut(), cases.len()) {
            let (command, want) = &cases[done.cookie as usize];
            assert_eq!(done.status, *want, "{mode:?}: {command:?}");
        }
    }
}

#[test]
fn a_deleted_queue_is_never_written_again() {
    // Eight reads are held inside the device thread by injected latency when their queue is
    // deleted. The controller drops them with the queue and never completes them; once the
    // deletion returns, the ring memory goes back to the pool. Fill all free memory with a
    // pattern and check nothing overwrites it after the latency has expired.
    const LATENCY: Duration = Duration::from_secs(1);
    let (driver, pool) = device_with(
        DeviceMode::Thread,
        vec![InjectRule::latency(LatencySpec::Fixed(LATENCY))],
    );
    let data = pool.alloc(4096).unwrap();
    let mut queue = driver.create_queue(8).unwrap();
    for cookie in 0..8 {
        queue
            .submit(&read(cookie as u64, 8, DataRange::of(&data)), cookie)
            .unwrap();
    }
    queue.ring();
    // The deletion must meet commands the controller holds, or this test shows nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while driver.deferred_commands() < 8 {
        assert!(
            Instant::now() < deadline,
            "the device thread fetched only {} of 8 commands",
            driver.deferred_commands()
        );
        std::thread::yield_now();
    }
    let mut out = [Completed::default(); 8];
    assert_eq!(
        queue.reap(&mut out),
        0,
        "a completion before the injected latency"
    );
    assert_eq!(queue.outstanding(), 8);
    drop(queue);
    assert_eq!(
        driver.deferred_commands(),
        0,
        "the deleted queue's commands are dropped by the time the deletion completes"
    );
    let mut filler = Vec::new();
    while let Ok(mut buf) = pool.alloc(4096) {
        buf.fill(0xa5);
        filler.push(buf);
    }
    std::thread::sleep(LATENCY + Duration::from_millis(200));
    for buf in &filler {
        assert!(
            buf.to_vec().iter().all(|&byte| byte == 0xa5),
            "freed queue memory at {:#x} was written after deletion",
            buf.iova()
        );
    }
}
