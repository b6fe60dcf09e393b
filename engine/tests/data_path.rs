//! The data path end to end: what is written is read back, across cores, devices, controller
//! modes and media; errors and limits surface as IO errors; file media persist.

mod common;

use std::time::{Duration, Instant};

use common::{node, pattern, two_cores};
use fathom_engine::{
    Engine, IoCompletion, IoContext, IoError, IoRequest, Notify, Op, Task, VolumeId,
};
use fathom_nvme::Status;
use proptest::prelude::*;

/// Two devices, both controller modes, both stored media, four volumes spread over the cores.
/// The queues hold only 7 commands, so a burst of 32 wraps them and meets "queue full".
const FOUR_VOLUMES: &str = r#"
[[device]]
name = "ram0"
driver = "mem"
media = "ram"
mode = "inline"
size = "8MiB"
[[device]]
name = "file0"
driver = "mem"
media = "file"
mode = "thread"
size = "8MiB"
block_size = 4096
[[volume]]
name = "a"
device = "ram0"
size = "4MiB"
[[volume]]
name = "b"
device = "ram0"
offset = "4MiB"
size = "4MiB"
[[volume]]
name = "c"
device = "file0"
size = "4MiB"
[[volume]]
name = "d"
device = "file0"
offset = "4MiB"
size = "4MiB"
"#;

#[derive(Debug, Clone)]
struct Step {
    volume: usize,
    write: bool,
    /// In units of the volume's block size.
    offset_blocks: u64,
    blocks: u64,
    /// Where in its first page the buffer starts (4-byte aligned): exercises PRP offsets.
    page_offset: usize,
    seed: u64,
}

fn steps() -> impl Strategy<Value = (Vec<Step>, usize)> {
    let step = (
        0..4usize,
        any::<bool>(),
        0..1024u64,
        prop_oneof![8 => 1..=16u64, 3 => 17..=256u64, 1 => 257..=512u64],
        0..1024usize,
        any::<u64>(),
    )
        .prop_map(
            |(volume, write, offset_blocks, blocks, page_offset, seed)| Step {
                volume,
                write,
                offset_blocks,
                blocks,
                page_offset: page_offset * 4,
                seed,
            },
        );
    (proptest::collection::vec(step, 1..160), 1..=48usize)
}

/// Runs `steps` with up to `depth` IOs in flight at once; checks every read against a model.
fn run_against_model(engine: &Engine, steps: &[Step], depth: usize) {
    let volumes: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| engine.volume(name).unwrap().clone())
        .collect();
    let mut model: Vec<Vec<u8>> = volumes
        .iter()
        .map(|volume| vec![0u8; volume.size_bytes() as usize])
        .collect();
    let (tx, rx) = crossbeam_channel::unbounded::<IoCompletion>();
    let mut index = 0;
    while index < steps.len() {
        // A batch: up to `depth` steps whose byte ranges do not overlap, so the model's answer is
        // the same whatever order the device completes them in.
        let mut batch: Vec<(Step, u64, usize)> = Vec::new();
        while index < steps.len() && batch.len() < depth {
            let step = &steps[index];
            let volume = &volumes[step.volume];
            let block = volume.block_size as u64;
            let total_blocks = volume.blocks;
            let blocks = step
                .blocks
                .min(total_blocks)
                .min(volume.max_transfer_bytes as u64 / block);
            let offset = (step.offset_blocks % (total_blocks - blocks + 1)) * block;
            let len = (blocks * block) as usize;
            let overlaps = batch.iter().any(|(other, other_offset, other_len)| {
                other.volume == step.volume
                    && offset < other_offset + *other_len as u64
                    && *other_offset < offset + len as u64
            });
            if overlaps {
                break;
            }
            batch.push((step.clone(), offset, len));
            index += 1;
        }
        for (tag, (step, offset, len)) in batch.iter().enumerate() {
            let mut buf = engine.dma().alloc(step.page_offset + len).unwrap();
            buf.set_view(step.page_offset, *len);
            let volume = VolumeId(step.volume as u32);
            let request = if step.write {
                let data = pattern(step.seed, *len);
                buf.write_at(0, &data);
                model[step.volume][*offset as usize..*offset as usize + len].copy_from_slice(&data);
                IoRequest::write(volume, *offset, buf, tag as u64)
            } else {
                IoRequest::read(volume, *offset, buf, tag as u64)
            };
            engine
                .submit(request, Notify::Channel(tx.clone()))
                .expect("inbound ring has room");
        }
        for _ in 0..batch.len() {
            let done = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("completion within 20 s");
            let (step, offset, len) = &batch[done.tag as usize];
            done.result
                .unwrap_or_else(|error| panic!("{step:?} failed: {error}"));
            if !step.write {
                let got = done.buf.expect("buffer back").to_vec();
                let want = &model[step.volume][*offset as usize..*offset as usize + len];
                assert!(
                    got == want,
                    "read of volume {} at {offset}+{len} differs from what was written",
                    step.volume
                );
            }
        }
    }
    // Everything written must also be there at the end, read in one sweep per volume.
    for (index, volume) in volumes.iter().enumerate() {
        let chunk = 512 * 1024;
        for offset in (0..volume.size_bytes()).step_by(chunk) {
            let done = engine.io(IoRequest::read(
                VolumeId(index as u32),
                offset,
                engine.dma().alloc(chunk).unwrap(),
                0,
            ));
            done.result.unwrap();
            assert!(
                done.buf.unwrap().to_vec()
                    == model[index][offset as usize..offset as usize + chunk],
                "final sweep of volume {index} at {offset}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Random sizes (512 B to 1 MiB, so PRP1 only, PRP1+PRP2 and PRP lists), random in-page
    /// buffer offsets, random depths over four volumes on two cores, inline and thread
    /// controllers, ram and file media, 7-deep queues: everything read equals the model.
    #[test]
    fn reads_return_what_was_written((steps, depth) in steps()) {
        let node = node(&two_cores(), FOUR_VOLUMES);
        let mut config = node.config.clone();
        config.reactor.queue_depth = 7;
        let engine = Engine::start(&config).unwrap();
        run_against_model(&engine, &steps, depth);
        engine.shutdown().unwrap();
    }
}

#[test]
fn file_media_survive_a_restart() {
    let test = node(&two_cores(), FOUR_VOLUMES);
    let data = pattern(42, 256 * 1024);
    {
        let engine = Engine::start(&test.config).unwrap();
        let volume = engine.volume("d").unwrap().id;
        let mut buf = engine.dma().alloc(data.len()).unwrap();
        buf.write_at(0, &data);
        engine
            .io(IoRequest::write(volume, 1 << 20, buf, 0))
            .result
            .unwrap();
        engine.shutdown().unwrap();
    }
    let engine = Engine::start(&test.config).unwrap();
    let volume = engine.volume("d").unwrap().id;
    let done = engine.io(IoRequest::read(
        volume,
        1 << 20,
        engine.dma().alloc(data.len()).unwrap(),
        0,
    ));
    done.result.unwrap();
    assert!(
        done.buf.unwrap().to_vec() == data,
        "data written before the restart reads back after it"
    );
    engine.shutdown().unwrap();
    // And it is in the file where the volume maps it: volume d starts 4 MiB into file0.img.
    let file = std::fs::read(test.dir.path().join("file0.img")).unwrap();
    assert!(file[(4 << 20) + (1 << 20)..][..data.len()] == data[..]);
}

#[test]
fn a_burst_far_deeper_than_the_queue_completes_in_full() {
    let test = node(&two_cores(), FOUR_VOLUMES);
    let mut config = test.config.clone();
    config.reactor.queue_depth = 3;
    let engine = Engine::start(&config).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let count = 2000;
    for tag in 0..count {
        let volume = VolumeId((tag % 4) as u32);
        let offset = (tag / 4 % 64) * 4096;
        let mut buf = engine.dma().alloc(4096).unwrap();
        buf.write_at(0, &pattern(tag, 4096));
        let request = if tag % 3 == 0 {
            IoRequest::read(volume, offset, buf, tag)
        } else {
            IoRequest::write(volume, offset, buf, tag)
        };
        let mut pending = Some(request);
        while let Some(request) = pending.take() {
            if let Err(rejected) = engine.submit(request, Notify::Channel(tx.clone())) {
                assert_eq!(
                    rejected.error,
                    IoError::Busy,
                    "only back-pressure may refuse a valid request"
                );
                pending = Some(rejected.request);
                std::thread::yield_now();
            }
        }
    }
    let mut tags: Vec<u64> = (0..count)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(20))
                .map(|done| {
                    done.result.unwrap();
                    done.tag
                })
                .unwrap()
        })
        .collect();
    tags.sort_unstable();
    assert!(
        tags.iter().copied().eq(0..count),
        "every IO completed exactly once"
    );
    engine.shutdown().unwrap();
}

#[test]
fn bad_requests_get_errors_not_panics() {
    let test = node(&[0], FOUR_VOLUMES);
    let engine = Engine::start(&test.config).unwrap();
    let a = engine.volume("a").unwrap().id;
    let c = engine.volume("c").unwrap().id;
    let dma = engine.dma();
    let cases = [
        (
            IoRequest::read(a, 4 << 20, dma.alloc(512).unwrap(), 0),
            "beyond the end",
        ),
        (
            IoRequest::read(a, (4 << 20) - 512, dma.alloc(1024).unwrap(), 0),
            "beyond the end",
        ),
        (
            IoRequest::read(a, 100, dma.alloc(512).unwrap(), 0),
            "not aligned",
        ),
        (
            IoRequest::read(c, 512, dma.alloc(4096).unwrap(), 0),
            "not aligned",
        ),
        (
            IoRequest::write(c, 0, dma.alloc(2 << 20).unwrap(), 0),
            "larger than",
        ),
        (
            IoRequest::write(VolumeId(99), 0, dma.alloc(512).unwrap(), 0),
            "no volume",
        ),
        (
            IoRequest {
                buf: None,
                ..IoRequest::flush(a, 0)
            },
            "",
        ),
        (
            IoRequest {
                op: Op::Read,
                ..IoRequest::flush(a, 0)
            },
            "needs a data buffer",
        ),
        (IoRequest::write_zeroes(a, 0, 0, 0), "zero bytes"),
    ];
    for (request, expect) in cases {
        let had_buffer = request.buf.is_some();
        let done = engine.io(request);
        match (&done.result, expect) {
            (Ok(()), "") => {}
            (Err(error), expect) if !expect.is_empty() => {
                assert!(
                    error.to_string().contains(expect),
                    "{error} should say {expect:?}"
                );
                assert_eq!(
                    done.buf.is_some(),
                    had_buffer,
                    "the buffer comes back with the error: {error}"
                );
            }
            (result, expect) => panic!("got {result:?}, expected {expect:?}"),
        }
    }
    // The engine still serves correct IO afterwards.
    let mut buf = dma.alloc(4096).unwrap();
    buf.write_at(0, &pattern(1, 4096));
    engine.io(IoRequest::write(a, 8192, buf, 0)).result.unwrap();
    let done = engine.io(IoRequest::read(a, 8192, dma.alloc(4096).unwrap(), 0));
    assert_eq!(done.buf.unwrap().to_vec(), pattern(1, 4096));
    // Write Zeroes zeroes.
    engine
        .io(IoRequest::write_zeroes(a, 8192, 4096, 0))
        .result
        .unwrap();
    let done = engine.io(IoRequest::read(a, 8192, dma.alloc(4096).unwrap(), 0));
    assert!(done.buf.unwrap().to_vec().iter().all(|&byte| byte == 0));
    engine.shutdown().unwrap();
    assert_eq!(
        engine.io(IoRequest::flush(a, 0)).result,
        Err(IoError::Stopped)
    );
}

const INJECTED: &str = r#"
[[device]]
name = "flaky"
driver = "mem"
media = "ram"
mode = "MODE"
size = "4MiB"
[[device.inject]]
ops = ["read"]
lbas = [1000, 1999]
error = "unrecovered-read"
[[device.inject]]
ops = ["write"]
lbas = [4000, 4999]
fraction = 0.3
error = "write-fault"
[[device.inject]]
ops = ["read"]
lbas = [6000, 6999]
latency = "50ms"
[[volume]]
name = "v"
device = "flaky"
size = "4MiB"
"#;

#[test]
fn injected_errors_surface_as_io_errors() {
    for mode in ["inline", "thread"] {
        let test = node(&[0], &INJECTED.replace("MODE", mode));
        let engine = Engine::start(&test.config).unwrap();
        let v = engine.volume("v").unwrap().id;
        let read = |lba: u64| {
            engine
                .io(IoRequest::read(
                    v,
                    lba * 512,
                    engine.dma().alloc(512).unwrap(),
                    0,
                ))
                .result
        };
        let error = Err(IoError::Device {
            op: Op::Read,
            status: Status::UNRECOVERED_READ_ERROR,
        });
        assert_eq!(read(1000), error, "{mode}");
        assert_eq!(read(1999), error, "{mode}");
        assert_eq!(read(999), Ok(()), "{mode}");
        assert_eq!(read(2000), Ok(()), "{mode}");
        // A read that straddles into the range fails too.
        let done = engine.io(IoRequest::read(
            v,
            996 * 512,
            engine.dma().alloc(4096).unwrap(),
            0,
        ));
        assert_eq!(done.result, error);
        let mut failed = 0;
        for index in 0..1000u64 {
            let result = engine
                .io(IoRequest::write(
                    v,
                    (4000 + index) * 512,
                    engine.dma().alloc(512).unwrap(),
                    0,
                ))
                .result;
            match result {
                Ok(()) => {}
                Err(IoError::Device { status, .. }) if status == Status::WRITE_FAULT => failed += 1,
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert!(
            (200..400).contains(&failed),
            "{failed} of 1000 writes failed at fraction 0.3 ({mode})"
        );
        engine.shutdown().unwrap();
    }
}

/// A reactor task that submits all its requests in one poll, so that they reach the device
/// behind one doorbell, and reports their completions (or refusals) in the order they come.
struct OneBatch {
    requests: Vec<IoRequest>,
    left: usize,
    done: crossbeam_channel::Sender<(u64, Result<(), IoError>)>,
}

impl Task for OneBatch {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        if self.requests.is_empty() {
            return false;
        }
        for request in self.requests.drain(..) {
            if let Err(rejected) = io.submit(request) {
                self.left -= 1;
                let _ = self.done.send((rejected.request.tag, Err(rejected.error)));
            }
        }
        true
    }

    fn complete(&mut self, _io: &mut IoContext, completion: IoCompletion) {
        self.left -= 1;
        let _ = self.done.send((completion.tag, completion.result));
    }

    fn finished(&self) -> bool {
        self.left == 0
    }
}

#[test]
fn injected_latency_delays_completion() {
    for mode in ["inline", "thread"] {
        let test = node(&[0], &INJECTED.replace("MODE", mode));
        let engine = Engine::start(&test.config).unwrap();
        let v = engine.volume("v").unwrap().id;
        for lba in [6000u64, 6500, 6999] {
            let started = Instant::now();
            engine
                .io(IoRequest::read(
                    v,
                    lba * 512,
                    engine.dma().alloc(512).unwrap(),
                    0,
                ))
                .result
                .unwrap();
            // The lower bound is exact (the device posts no completion before it is due); the
            // upper one only catches a lost or forgotten completion, so it is generous.
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(50),
                "{mode}: read at LBA {lba} took {took:?}, 50 ms injected"
            );
            assert!(
                took < Duration::from_secs(2),
                "{mode}: read at LBA {lba} took {took:?}"
            );
        }
        // A read outside the range is not held back: submitted behind the same doorbell right
        // after a delayed read, it completes first. The order is fixed by what the device
        // does, not by how fast a loaded machine runs: the delayed read cannot complete before
        // its 50 ms, and the device posts the other one's completion as it executes it, in the
        // same pass over the ring. (Injection wrongly delaying it too would post it after.)
        let (tx, rx) = crossbeam_channel::bounded(2);
        let requests = vec![
            IoRequest::read(v, 6000 * 512, engine.dma().alloc(512).unwrap(), 1),
            IoRequest::read(v, 0, engine.dma().alloc(512).unwrap(), 2),
        ];
        let task = OneBatch {
            requests,
            left: 2,
            done: tx,
        };
        engine.spawn(0, Box::new(task)).unwrap();
        let order: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(
            order,
            [(2, Ok(())), (1, Ok(()))],
            "{mode}: the read outside the injected range (tag 2) waited for the delayed one"
        );
        engine.shutdown().unwrap();
    }
}

#[test]
fn completions_reach_callbacks_too() {
    let test = node(&two_cores(), FOUR_VOLUMES);
    let engine = Engine::start(&test.config).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(8);
    let callback = std::sync::Arc::new(move |done: IoCompletion| {
        let _ = tx.send((
            done.tag,
            done.result,
            std::thread::current().name().map(str::to_string),
        ));
    });
    for (tag, volume) in ["a", "b"].iter().enumerate() {
        let volume = engine.volume(volume).unwrap().id;
        let request = IoRequest::write(volume, 0, engine.dma().alloc(4096).unwrap(), tag as u64);
        engine
            .submit(request, Notify::Callback(callback.clone()))
            .unwrap();
    }
    let mut seen: Vec<_> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    seen.sort_by_key(|(tag, _, _)| *tag);
    for (tag, result, thread) in seen {
        result.unwrap();
        let core = engine.volumes()[tag as usize].core;
        assert_eq!(
            thread.as_deref(),
            Some(format!("reactor-{core}").as_str()),
            "callbacks run on the owning reactor"
        );
    }
    engine.shutdown().unwrap();
}

/// Volumes made and removed while the engine runs ([`Engine::create_volume`]): they take IO
/// at once, refuse what cannot be, and a removed one takes no more IO; its slot serves the
/// next.
#[test]
fn volumes_come_and_go_while_the_engine_runs() {
    use fathom_engine::{ControlError, NewVolume};
    let body = format!(
        "{FOUR_VOLUMES}\n[[device]]\nname = \"pool0\"\ndriver = \"mem\"\nmedia = \"ram\"\n\
         mode = \"inline\"\nsize = \"8MiB\"\n\
         [cluster]\nname = \"t\"\netcd = [\"127.0.0.1:9\"]\n\
         [cluster.pool]\ndevice = \"pool0\"\nvolumes = 2\n\
         [[cluster.node]]\nid = \"test\"\nreplication = \"127.0.0.1:9\"\n\
         [replication]\nlisten = [\"127.0.0.1:9\"]\nkey_file = \"unused.key\"\n"
    );
    let test = node(&two_cores(), &body);
    let engine = Engine::start(&test.config).unwrap();
    let new = |name: &str, offset: u64, size: u64| NewVolume {
        name: name.into(),
        device: "pool0".into(),
        offset,
        size,
        meta_bytes: 8192,
    };
    let n1 = engine.create_volume(&new("n1", 0, 2 << 20)).unwrap();
    let data = pattern(7, 64 << 10);
    let write = |id, seed| {
        let data = pattern(seed, 64 << 10);
        let mut buf = engine.dma().alloc(data.len()).unwrap();
        buf.write_at(0, &data);
        engine.io(IoRequest::write(id, 4096, buf, 0)).result
    };
    let read = |id| {
        let done = engine.io(IoRequest::read(
            id,
            4096,
            engine.dma().alloc(64 << 10).unwrap(),
            0,
        ));
        done.result.map(|()| done.buf.unwrap().to_vec())
    };
    write(n1.id, 7).unwrap();
    assert!(
        read(n1.id).unwrap() == data,
        "a new volume reads back what was written"
    );
    assert_eq!(engine.volume("n1").unwrap().size_bytes(), 2 << 20);
    // What cannot be is refused, with the reason.
    let refused = |new: NewVolume| engine.create_volume(&new).unwrap_err();
    assert!(matches!(
        refused(new("n1", 4 << 20, 1 << 20)),
        ControlError::VolumeExists { .. }
    ));
    let overlap = refused(new("n2", 1 << 20, 1 << 20)).to_string();
    assert!(overlap.contains("overlap volume \"n1\""), "{overlap}");
    let misaligned = refused(new("n2", 4 << 20, 1000)).to_string();
    assert!(misaligned.contains("multiples"), "{misaligned}");
    let too_far = refused(new("n2", 7 << 20, 2 << 20)).to_string();
    assert!(too_far.contains("do not fit"), "{too_far}");
    let name = refused(new("no/slash", 4 << 20, 1 << 20)).to_string();
    assert!(name.contains("a volume name is"), "{name}");
    let n2 = engine.create_volume(&new("n2", 4 << 20, 1 << 20)).unwrap();
    assert!(matches!(
        refused(new("n3", 6 << 20, 1 << 20)),
        ControlError::NoVolumeSlot { slots: 2 }
    ));
    // Configured volumes stay; a removed one takes no more IO, and its slot serves another.
    assert!(matches!(
        engine.remove_volume("a").unwrap_err(),
        ControlError::BadVolume { .. }
    ));
    engine.remove_volume("n1").unwrap();
    assert!(engine.volume("n1").is_none());
    assert!(matches!(read(n1.id), Err(IoError::UnknownVolume(_))));
    let n3 = engine.create_volume(&new("n3", 0, 1 << 20)).unwrap();
    assert_eq!(n3.id, n1.id, "the free slot is taken again");
    write(n3.id, 9).unwrap();
    assert!(read(n3.id).unwrap() == pattern(9, 64 << 10));
    write(n2.id, 11).unwrap();
    assert!(read(n2.id).unwrap() == pattern(11, 64 << 10));
    let names: Vec<String> = engine.volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b", "c", "d", "n3", "n2"]);
    // The stats region names what is there now, n3 in n1's old slot, counted from zero.
    let mut reader =
        fathom_telemetry::region::RegionReader::open(&test.config.region_path()).unwrap();
    reader.refresh().unwrap();
    let live: Vec<(usize, String)> = reader
        .directory()
        .live_volumes()
        .map(|(index, entry)| (index, entry.name.clone()))
        .collect();
    assert_eq!(live[4..], [(4, "n3".to_string()), (5, "n2".to_string())]);
    engine.remove_volume("n2").unwrap();
    reader.refresh().unwrap();
    assert!(reader
        .directory()
        .live_volumes()
        .all(|(_, entry)| entry.name != "n2"));
    engine.shutdown().unwrap();
}
