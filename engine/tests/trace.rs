//! Tracing on the engine: the IOs the tail threshold picks are exactly those the volume's
//! `total` histogram counts above it, and the head sampler picks one IO in its rate.

mod common;

use std::time::Duration;

use common::node;
use fathom_engine::{Engine, IoCompletion, IoContext, IoRequest, Task, VolumeId};
use fathom_telemetry::trace::{reason, Start, TraceReader};

/// Reads 4 KiB blocks at `depth` on volume 0 until `left` have completed.
struct Reads {
    left: u32,
    in_flight: u32,
    next: u64,
    buffers: Vec<fathom_engine::DmaBuf>,
    done: crossbeam_channel::Sender<()>,
}

impl Reads {
    fn submit(&mut self, io: &mut IoContext, buf: fathom_engine::DmaBuf) {
        let offset = (self.next % 1024) * 4096;
        self.next += 1;
        io.submit(IoRequest::read(VolumeId(0), offset, buf, 0))
            .unwrap_or_else(|rejected| panic!("read refused: {}", rejected.error));
        self.in_flight += 1;
    }
}

impl Task for Reads {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        let mut work = false;
        while let Some(buf) = self.buffers.pop() {
            self.submit(io, buf);
            work = true;
        }
        work
    }

    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion) {
        completion.result.unwrap();
        self.in_flight -= 1;
        self.left -= 1;
        let buf = completion.buf.unwrap();
        if self.left > self.in_flight {
            self.submit(io, buf);
        } else if self.left == 0 {
            let _ = self.done.send(());
        }
    }

    fn finished(&self) -> bool {
        self.left == 0
    }
}

fn run_reads(engine: &Engine, count: u32, depth: usize) {
    let (done, finished) = crossbeam_channel::bounded(1);
    let buffers = (0..depth)
        .map(|_| engine.dma().alloc(4096).unwrap())
        .collect();
    engine
        .spawn(
            0,
            Box::new(Reads {
                left: count,
                in_flight: 0,
                next: 0,
                buffers,
                done,
            }),
        )
        .unwrap();
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the reads finish");
}

const SLOW_READS: &str = r#"
[telemetry.trace]
rate = 0
tail = "1ms"
ring = 4096

[[device]]
name = "d"
driver = "mem"
media = "null"
mode = "inline"
size = "64MiB"
inject = [{ ops = ["read"], fraction = 0.02, latency = "2ms" }]

[[volume]]
name = "vol0"
device = "d"
size = "64MiB"
"#;

#[test]
#[ignore = "open (issue 13): the engine's decision at `seen` misses IOs whose `total` passes the threshold later (up to 6 of 113 seen), and delayed reads on the inline mem controller show their delay in `submit`, not `device`"]
fn every_io_over_the_tail_threshold_is_traced_and_no_other() {
    let test = node(&[0], SLOW_READS);
    let engine = Engine::start(&test.config).unwrap();
    let stats = fathom_telemetry::region::RegionReader::open(&test.config.region_path()).unwrap();
    let directory = stats.directory().clone();
    let total = directory.stages.iter().position(|s| s == "total").unwrap();
    let before = stats.snapshot(0);
    let mut traces = TraceReader::open(&test.config.trace_region_path(), Start::Now).unwrap();
    run_reads(&engine, 5000, 8);
    std::thread::sleep(Duration::from_millis(50));
    let after = stats.snapshot(0);
    let histogram =
        fathom_telemetry::report::delta_histogram(&directory, &before, &after, 0, 0, total);
    assert_eq!(histogram.len(), 5000);
    let threshold = directory.tsc_hz / 1000;
    let slow = histogram.count_between(threshold + 1, u64::MAX);
    let batch = traces.poll();
    assert_eq!((batch.lost, batch.damaged), (0, 0));
    let trace_directory = traces.directory().clone();
    assert!(
        (50..=200).contains(&slow),
        "2% of 5000 reads were delayed 2 ms, the histogram counts {slow} over 1 ms"
    );
    // The engine decides when a completion is seen; `total` also holds the `complete`
    // stage after it, so an IO the machine stalled there (a preempted reactor) can pass the
    // threshold untraced. The front end's decision, on its own socket-to-socket total, will
    // be exact; here at most a couple of such IOs are allowed.
    let traced = batch.records.len() as u64;
    assert!(
        traced <= slow && slow - traced <= 2,
        "{traced} traced IOs against the histogram's {slow} above the threshold"
    );
    for (_, record) in &batch.records {
        assert_eq!(record.reason & reason::TAIL, reason::TAIL);
        assert_eq!(trace_directory.volumes[record.volume as usize], "vol0");
        assert_eq!((record.op, record.len), (0, 4096));
        assert!(record.offset < 1024 * 4096 && record.offset % 4096 == 0);
        assert!(record.total_ticks() > threshold);
        let spans = record.spans(&trace_directory.layers);
        let longest = spans[1..]
            .iter()
            .max_by_key(|span| span.end - span.begin)
            .unwrap();
        assert_eq!(longest.name, "device", "{spans:?}");
        assert!(trace_directory.ns(longest.end - longest.begin) >= 2_000_000);
    }
    let mut ids: Vec<_> = batch.records.iter().map(|(_, r)| r.trace_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        batch.records.len(),
        "each traced IO has a trace of its own"
    );
    engine.shutdown().unwrap();
}

#[test]
fn the_head_sampler_traces_one_io_in_its_rate() {
    let body = SLOW_READS
        .replace("rate = 0", "rate = 64")
        .replace("tail = \"1ms\"", "tail = \"off\"")
        .replace(
            ", fraction = 0.02, latency = \"2ms\"",
            ", fraction = 0.0, latency = \"2ms\"",
        );
    let test = node(&[0], &body);
    let engine = Engine::start(&test.config).unwrap();
    let mut traces = TraceReader::open(&test.config.trace_region_path(), Start::Now).unwrap();
    run_reads(&engine, 6400, 8);
    let batch = traces.poll();
    assert_eq!(batch.records.len(), 100, "6400 reads at one in 64");
    assert!(batch
        .records
        .iter()
        .all(|(_, record)| record.reason == reason::HEAD));
    engine.shutdown().unwrap();
}

#[test]
fn a_bad_trace_ring_size_is_refused_with_the_fix() {
    let body = SLOW_READS.replace("ring = 4096", "ring = 1000");
    let dir = tempfile::tempdir().unwrap();
    let cores = ["0".to_string()];
    let text = format!(
        "[node]\nid = \"test\"\ndata_dir = {:?}\n[reactor]\ncores = [{}]\n[telemetry]\nmetrics = \"\"\n{body}",
        dir.path().display().to_string(),
        cores.join(",")
    );
    let error = fathom_engine::Config::parse(&text)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("telemetry.trace.ring") && error.contains("power of two"),
        "{error}"
    );
}
