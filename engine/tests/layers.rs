//! The layer stack: run-time injection and stubs change a volume's IO path while IO runs, data
//! still reads back as written, and a layer can fan one IO out into children.

mod common;

use std::time::{Duration, Instant};

use common::{node, pattern};
use fathom_drivers::inject::{InjectRule, InjectedError, LatencySpec};
use fathom_drivers::IoCommand;
use fathom_engine::layer::{Down, Layer, LayerCtx, LayerName};
use fathom_engine::{Engine, IoError, IoRequest, Notify, VolumeId};

const ONE_VOLUME: &str = "[[device]]\nname = \"d\"\ndriver = \"mem\"\nmedia = \"ram\"\n\
    size = \"8MiB\"\n[[volume]]\nname = \"v\"\ndevice = \"d\"\nsize = \"8MiB\"\n";

fn write(engine: &Engine, offset: u64, seed: u64) -> Result<(), IoError> {
    let mut buf = engine.dma().alloc(4096).unwrap();
    buf.write_at(0, &pattern(seed, 4096));
    engine
        .io(IoRequest::write(VolumeId(0), offset, buf, seed))
        .result
}

fn read(engine: &Engine, offset: u64) -> Vec<u8> {
    let buf = engine.dma().alloc(4096).unwrap();
    let done = engine.io(IoRequest::read(VolumeId(0), offset, buf, 0));
    done.result.unwrap();
    done.buf.unwrap().as_bytes().to_vec()
}

fn latency(layer: LayerName, engine: &Engine, spec: &str) {
    engine
        .change_layers("v", |layers| {
            layers.get_mut(layer).inject = vec![InjectRule::latency(spec.parse().unwrap())];
            Ok(())
        })
        .unwrap();
}

#[test]
fn injected_latency_at_a_layer_delays_its_ios_and_clearing_it_restores_them() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    for layer in [LayerName::Engine, LayerName::Queue] {
        latency(layer, &engine, "20ms");
        let started = Instant::now();
        write(&engine, 0, 1).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "{layer}: a write took {:?} with 20 ms injected",
            started.elapsed()
        );
        assert_eq!(
            read(&engine, 0),
            pattern(1, 4096),
            "{layer}: data through the layer"
        );
        engine
            .change_layers("v", |layers| {
                layers.get_mut(layer).inject.clear();
                Ok(())
            })
            .unwrap();
        // Without the rule, fifty writes take far less than one injected delay each.
        let started = Instant::now();
        for seed in 0..50 {
            write(&engine, 4096, seed).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(50 * 20),
            "{layer}: still delayed"
        );
    }
    engine.shutdown().unwrap();
}

#[test]
fn the_queue_stub_completes_without_reaching_the_device_and_clearing_it_restores_the_path() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    write(&engine, 8192, 7).unwrap();
    engine
        .change_layers("v", |layers| {
            layers.get_mut(LayerName::Queue).stub = true;
            Ok(())
        })
        .unwrap();
    // Acknowledged by the stub, never written: the media keep what was there.
    write(&engine, 8192, 8).unwrap();
    engine
        .change_layers("v", |layers| {
            layers.get_mut(LayerName::Queue).stub = false;
            Ok(())
        })
        .unwrap();
    assert_eq!(read(&engine, 8192), pattern(7, 4096));
    engine.shutdown().unwrap();
}

#[test]
fn an_injected_error_fails_the_io_and_a_stall_holds_it_until_cleared() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    engine
        .change_layers("v", |layers| {
            let mut rule = InjectRule::latency(LatencySpec::Fixed(Duration::ZERO));
            rule.latency = None;
            rule.error = Some(InjectedError::WriteFault);
            layers.get_mut(LayerName::Engine).inject = vec![rule];
            Ok(())
        })
        .unwrap();
    match write(&engine, 0, 1) {
        Err(IoError::Device { status, .. }) => {
            assert_eq!(status, InjectedError::WriteFault.status())
        }
        other => panic!("expected the injected write fault, got {other:?}"),
    }
    engine
        .change_layers("v", |layers| {
            let mut rule = InjectRule::latency(LatencySpec::Fixed(Duration::ZERO));
            rule.latency = None;
            rule.stall = true;
            layers.get_mut(LayerName::Engine).inject = vec![rule];
            Ok(())
        })
        .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for seed in 0..8u64 {
        let mut buf = engine.dma().alloc(4096).unwrap();
        buf.write_at(0, &pattern(seed, 4096));
        engine
            .submit(
                IoRequest::write(VolumeId(0), seed * 4096, buf, seed),
                Notify::Channel(tx.clone()),
            )
            .unwrap();
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a stalled write completed"
    );
    engine
        .change_layers("v", |layers| {
            layers.get_mut(LayerName::Engine).inject.clear();
            Ok(())
        })
        .unwrap();
    for _ in 0..8 {
        let done = rx.recv_timeout(Duration::from_secs(10)).expect("released");
        done.result.unwrap();
    }
    for seed in 0..8u64 {
        assert_eq!(read(&engine, seed * 4096), pattern(seed, 4096));
    }
    engine.shutdown().unwrap();
}

#[test]
fn layers_change_while_io_flows_and_every_io_completes_once_with_its_data() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    let writer = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut in_flight = 0;
            let mut completed = 0u64;
            for seed in 0..3000u64 {
                let mut buf = engine.dma().alloc(4096).unwrap();
                buf.write_at(0, &pattern(seed, 4096));
                let mut request = IoRequest::write(VolumeId(0), (seed % 256) * 4096, buf, seed);
                loop {
                    match engine.submit(request, Notify::Channel(tx.clone())) {
                        Ok(()) => break,
                        Err(rejected) => {
                            assert_eq!(rejected.error, IoError::Busy);
                            request = rejected.request;
                            rx.recv().unwrap().result.unwrap();
                            in_flight -= 1;
                            completed += 1;
                        }
                    }
                }
                in_flight += 1;
                // At most 16 in flight, so later writes to a block never race earlier ones.
                if in_flight == 16 || seed % 256 == 255 {
                    while in_flight > 0 {
                        rx.recv().unwrap().result.unwrap();
                        in_flight -= 1;
                        completed += 1;
                    }
                }
            }
            while in_flight > 0 {
                rx.recv().unwrap().result.unwrap();
                in_flight -= 1;
                completed += 1;
            }
            completed
        })
    };
    let specs = [
        "50us",
        "uniform(10us,200us)",
        "exponential(100us)",
        "pareto(20us,1.5)",
    ];
    let mut changes = 0;
    while !writer.is_finished() && changes < 400 {
        let layer = [LayerName::Engine, LayerName::Queue][changes % 2];
        latency(layer, &engine, specs[changes % specs.len()]);
        std::thread::sleep(Duration::from_millis(2));
        engine
            .change_layers("v", |layers| {
                *layers = Default::default();
                Ok(())
            })
            .unwrap();
        changes += 1;
    }
    assert_eq!(
        writer.join().unwrap(),
        3000,
        "every write completed exactly once"
    );
    assert!(
        changes >= 2,
        "the stack changed {changes} times during the run"
    );
    for block in 0..256u64 {
        let last = 2816 + block - if 2816 + block >= 3000 { 256 } else { 0 };
        assert_eq!(
            read(&engine, block * 4096),
            pattern(last, 4096),
            "block {block}"
        );
    }
    engine.shutdown().unwrap();
}

/// A layer that writes every write twice: to its own blocks and, as a second child, to the
/// same blocks in the volume's upper half; the parent completes when both children have.
/// Issues a write as two children: as given, and the same blocks in the second half.
fn write_both_halves(
    ctx: &mut LayerCtx<'_>,
    slot: u32,
    command: &IoCommand,
    half_blocks: u64,
) -> Result<(), IoError> {
    let mut copy = *command;
    copy.slba += half_blocks;
    ctx.issue(slot, *command)?;
    ctx.issue(slot, copy)
}

struct Mirror {
    half_blocks: u64,
    pending: Vec<(u32, u8, Result<(), IoError>)>,
}

impl Layer for Mirror {
    fn layer(&self) -> LayerName {
        LayerName::Engine
    }
    fn kind(&self) -> &'static str {
        "mirror"
    }
    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down {
        if command.op != fathom_engine::Op::Write {
            return Down::Pass;
        }
        if write_both_halves(ctx, slot, command, self.half_blocks).is_err() {
            return Down::Complete(Err(IoError::Busy));
        }
        self.pending.push((slot, 2, Ok(())));
        Down::Hold
    }
    fn child_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        parent: u32,
        _child: u32,
        result: Result<(), IoError>,
    ) {
        let index = self
            .pending
            .iter()
            .position(|entry| entry.0 == parent)
            .expect("a child of a pending parent");
        let entry = &mut self.pending[index];
        entry.1 -= 1;
        if entry.2.is_ok() {
            entry.2 = result;
        }
        if entry.1 == 0 {
            let (slot, _, result) = self.pending.swap_remove(index);
            ctx.complete(slot, result);
        }
    }
    fn holding(&self) -> usize {
        self.pending.len()
    }
}

#[test]
fn a_layer_fans_a_write_out_into_children_and_completes_the_parent_when_both_are_done() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    let volume = engine.volume("v").unwrap().clone();
    let half = volume.blocks / 2;
    engine
        .install_layers(
            &volume,
            vec![Box::new(Mirror {
                half_blocks: half,
                pending: Vec::with_capacity(512),
            })],
        )
        .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for seed in 0..64u64 {
        let mut buf = engine.dma().alloc(4096).unwrap();
        buf.write_at(0, &pattern(seed, 4096));
        engine
            .submit(
                IoRequest::write(VolumeId(0), seed * 4096, buf, seed),
                Notify::Channel(tx.clone()),
            )
            .unwrap();
    }
    let mut tags: Vec<u64> = (0..64)
        .map(|_| {
            let done = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            done.result.unwrap();
            done.tag
        })
        .collect();
    tags.sort_unstable();
    assert!(tags.iter().copied().eq(0..64), "each parent completed once");
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "no completion for a child"
    );
    engine.install_layers(&volume, Vec::new()).unwrap();
    let half_bytes = half * volume.block_size as u64;
    for seed in 0..64u64 {
        assert_eq!(read(&engine, seed * 4096), pattern(seed, 4096));
        assert_eq!(read(&engine, half_bytes + seed * 4096), pattern(seed, 4096));
    }
    engine.shutdown().unwrap();
}

#[test]
fn bad_changes_are_refused_with_the_reason_and_change_nothing() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    let error = engine.change_layers("nope", |_| Ok(())).unwrap_err();
    assert!(error.to_string().contains("the volumes are: v"), "{error}");
    let error = engine
        .change_layers("v", |layers| {
            let mut rule = InjectRule::latency("1ms".parse().unwrap());
            rule.fraction = 3.0;
            layers.get_mut(LayerName::Engine).inject = vec![rule];
            Ok(())
        })
        .unwrap_err();
    assert!(error.to_string().contains("fraction"), "{error}");
    assert!(engine
        .layers("v")
        .unwrap()
        .get(LayerName::Engine)
        .inject
        .is_empty());
    write(&engine, 0, 3).unwrap();
    assert_eq!(read(&engine, 0), pattern(3, 4096));
    engine.shutdown().unwrap();
}

fn stub(engine: &Engine, layer: LayerName, on: bool) {
    engine
        .change_layers("v", |layers| {
            layers.get_mut(layer).stub = on;
            Ok(())
        })
        .unwrap();
}

fn device_rules(engine: &Engine, layer: LayerName, rules: Vec<InjectRule>) {
    engine
        .change_device_inject("d", layer, |current| {
            *current = rules;
            Ok(())
        })
        .unwrap();
}

fn stall() -> InjectRule {
    let mut rule = InjectRule::latency(LatencySpec::Fixed(Duration::ZERO));
    rule.latency = None;
    rule.stall = true;
    rule
}

#[test]
fn the_device_stub_moves_a_volume_to_a_null_controller_and_back() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    write(&engine, 0, 1).unwrap();
    // A stall on the real device holds its commands; the stub's controller has no rules.
    device_rules(&engine, LayerName::Device, vec![stall()]);
    stub(&engine, LayerName::Device, true);
    write(&engine, 0, 2).unwrap();
    assert_eq!(
        read(&engine, 0),
        vec![0; 4096],
        "the device stub's null media returns zeroes"
    );
    device_rules(&engine, LayerName::Device, Vec::new());
    stub(&engine, LayerName::Device, false);
    // The write acknowledged by the stub never reached the real device.
    assert_eq!(read(&engine, 0), pattern(1, 4096));
    engine.shutdown().unwrap();
}

#[test]
fn the_media_stub_skips_the_data_and_the_media_rules_but_not_the_device() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    write(&engine, 4096, 3).unwrap();
    stub(&engine, LayerName::Media, true);
    // Media rules do not apply to commands that move no data...
    device_rules(&engine, LayerName::Media, vec![stall()]);
    write(&engine, 4096, 4).unwrap();
    device_rules(&engine, LayerName::Media, Vec::new());
    // ... device rules still do.
    device_rules(
        &engine,
        LayerName::Device,
        vec![InjectRule::latency("20ms".parse().unwrap())],
    );
    let started = Instant::now();
    write(&engine, 4096, 5).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(20),
        "device latency under the media stub: {:?}",
        started.elapsed()
    );
    device_rules(&engine, LayerName::Device, Vec::new());
    stub(&engine, LayerName::Media, false);
    assert_eq!(read(&engine, 4096), pattern(3, 4096), "no data moved");
    engine.shutdown().unwrap();
}

#[test]
fn a_run_time_device_stall_holds_commands_until_cleared_and_bad_targets_are_refused() {
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    device_rules(&engine, LayerName::Device, vec![stall()]);
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut buf = engine.dma().alloc(4096).unwrap();
    buf.write_at(0, &pattern(9, 4096));
    engine
        .submit(
            IoRequest::write(VolumeId(0), 0, buf, 9),
            Notify::Channel(tx),
        )
        .unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    device_rules(&engine, LayerName::Device, Vec::new());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("released")
        .result
        .unwrap();
    assert_eq!(read(&engine, 0), pattern(9, 4096));
    for (device, layer) in [("nope", LayerName::Device), ("d", LayerName::Queue)] {
        let error = engine
            .change_device_inject(device, layer, |_| Ok(()))
            .unwrap_err();
        assert!(
            error.to_string().contains("nope") || error.to_string().contains("VOLUME"),
            "{error}"
        );
    }
    engine.shutdown().unwrap();
}

#[test]
fn the_total_of_an_io_held_by_a_layer_is_its_own_latency() {
    // One IO at a time through a 2 ms delay: each IO's `total` is what the IO took, as its
    // submitter timed it, not the time until the next IO's completion ended its record.
    // Its own core, the last: the other tests of this file run at the same time with
    // reactors spinning on core 0, and time slices shared with them would count in the IOs'
    // own latency (as the submitter times it) and not in their telemetry, or the reverse.
    let core = std::thread::available_parallelism().map_or(1, |cores| cores.get()) - 1;
    let test = node(&[core], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    latency(LayerName::Queue, &engine, "2ms");
    let region = fathom_telemetry::region::RegionReader::open(&test.config.region_path()).unwrap();
    let directory = region.directory().clone();
    let total = directory.stages.iter().position(|s| s == "total").unwrap();
    let before = region.snapshot(0);
    let (tx, rx) = crossbeam_channel::unbounded();
    struct Serial {
        left: u32,
        buf: Option<fathom_engine::DmaBuf>,
        started: Instant,
        took: Vec<Duration>,
        done: crossbeam_channel::Sender<Vec<Duration>>,
    }
    impl fathom_engine::Task for Serial {
        fn poll(&mut self, io: &mut fathom_engine::IoContext) -> bool {
            if let Some(buf) = self.buf.take() {
                self.started = Instant::now();
                io.submit(IoRequest::read(VolumeId(0), 0, buf, 0)).unwrap();
            }
            false
        }
        fn complete(
            &mut self,
            io: &mut fathom_engine::IoContext,
            completion: fathom_engine::IoCompletion,
        ) {
            completion.result.unwrap();
            self.took.push(self.started.elapsed());
            self.left -= 1;
            if self.left == 0 {
                let _ = self.done.send(std::mem::take(&mut self.took));
            } else {
                self.started = Instant::now();
                io.submit(IoRequest::read(VolumeId(0), 0, completion.buf.unwrap(), 0))
                    .unwrap();
            }
        }
        fn finished(&self) -> bool {
            self.left == 0
        }
    }
    engine
        .spawn(
            0,
            Box::new(Serial {
                left: 20,
                buf: Some(engine.dma().alloc(4096).unwrap()),
                started: Instant::now(),
                took: Vec::new(),
                done: tx,
            }),
        )
        .unwrap();
    let mut took = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let after = region.snapshot(0);
    let histogram =
        fathom_telemetry::report::delta_histogram(&directory, &before, &after, 0, 0, total);
    // Medians: a reactor descheduled between a completion's stamp and its delivery (a busy
    // machine) stretches one IO's total, not the claim.
    let median_ms = histogram.value_at_quantile(0.5) as f64 * 1e3 / directory.tsc_hz as f64;
    took.sort();
    let own_ms = took[took.len() / 2].as_secs_f64() * 1e3;
    assert_eq!(histogram.len(), 20);
    assert!(own_ms >= 2.0, "IOs delayed 2 ms took {own_ms:.2} ms");
    assert!(
        (median_ms - own_ms).abs() <= 0.1 * own_ms,
        "telemetry's median total {median_ms:.2} ms, the IOs' own {own_ms:.2} ms"
    );
    engine.shutdown().unwrap();
}

/// Writes every write twice (to both halves of the volume) and completes the parent as soon as
/// the first copy is done, as a quorum write would.
struct FirstOfTwo {
    half_blocks: u64,
    /// Parents waiting for their first child.
    pending: Vec<u32>,
}

impl Layer for FirstOfTwo {
    fn layer(&self) -> LayerName {
        LayerName::Engine
    }
    fn kind(&self) -> &'static str {
        "first-of-two"
    }
    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down {
        if command.op != fathom_engine::Op::Write {
            return Down::Pass;
        }
        if write_both_halves(ctx, slot, command, self.half_blocks).is_err() {
            return Down::Complete(Err(IoError::Busy));
        }
        self.pending.push(slot);
        Down::Hold
    }
    fn child_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        parent: u32,
        _child: u32,
        result: Result<(), IoError>,
    ) {
        if let Some(index) = self.pending.iter().position(|&slot| slot == parent) {
            self.pending.swap_remove(index);
            ctx.complete(parent, result);
        }
    }
    fn holding(&self) -> usize {
        self.pending.len()
    }
}

#[test]
fn a_parent_completed_early_waits_for_its_children_before_its_buffer_goes_back() {
    // The copy to the second half is delayed 100 ms; the layer completes the parent when the
    // first copy is done, but the second still reads the parent's buffer: the engine hands
    // the buffer back only after it.
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    let volume = engine.volume("v").unwrap().clone();
    let half = volume.blocks / 2;
    let mut slow = InjectRule::latency("100ms".parse().unwrap());
    slow.lbas = Some([half, volume.blocks - 1]);
    engine
        .install_layers(
            &volume,
            vec![
                Box::new(FirstOfTwo {
                    half_blocks: half,
                    pending: Vec::with_capacity(512),
                }),
                Box::new(fathom_engine::layer::Inject::new(
                    LayerName::Queue,
                    vec![slow],
                    engine.clock(),
                    512,
                    1,
                )),
            ],
        )
        .unwrap();
    let started = Instant::now();
    write(&engine, 0, 11).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "the parent came back after {:?}, while its second copy was still delayed",
        started.elapsed()
    );
    engine.install_layers(&volume, Vec::new()).unwrap();
    let half_bytes = half * volume.block_size as u64;
    assert_eq!(read(&engine, 0), pattern(11, 4096));
    assert_eq!(read(&engine, half_bytes), pattern(11, 4096));
    engine.shutdown().unwrap();
}

/// Copies the volume's first 4 KiB to `to` with IO of its own (a read, then a write of the same
/// buffer), once per client write it sees; counts the copies done.
struct Copier {
    buf: Option<fathom_dma::DmaBuf>,
    to_lba: u64,
    due: usize,
    busy: bool,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    copied: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const READ_TAG: u64 = 1;
const WRITE_TAG: u64 = 2;

impl Layer for Copier {
    fn layer(&self) -> LayerName {
        LayerName::Replication
    }
    fn kind(&self) -> &'static str {
        "copier"
    }
    fn submit(&mut self, _ctx: &mut LayerCtx<'_>, _slot: u32, command: &IoCommand) -> Down {
        if command.op == fathom_engine::Op::Write {
            self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.due += 1;
        }
        Down::Pass
    }
    fn holding(&self) -> usize {
        self.due + self.busy as usize
    }
    fn poll(&mut self, ctx: &mut LayerCtx<'_>) -> bool {
        if self.busy || self.due == 0 {
            return false;
        }
        let io = fathom_engine::layer::OwnIo {
            op: fathom_engine::Op::Read,
            slba: 0,
            blocks: 8,
            fua: false,
            tag: READ_TAG,
            buf: self.buf.take(),
        };
        match ctx.issue_own(io) {
            Ok(()) => {
                self.due -= 1;
                self.busy = true;
            }
            Err((_, io)) => self.buf = io.buf,
        }
        true
    }
    fn own_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        tag: u64,
        result: Result<(), IoError>,
        buf: Option<fathom_dma::DmaBuf>,
    ) {
        result.unwrap();
        if tag == READ_TAG {
            let io = fathom_engine::layer::OwnIo {
                op: fathom_engine::Op::Write,
                slba: self.to_lba,
                blocks: 8,
                fua: true,
                tag: WRITE_TAG,
                buf,
            };
            if let Err((error, io)) = ctx.issue_own(io) {
                panic!("{error}: {io:?}");
            }
        } else {
            self.buf = buf;
            self.busy = false;
            self.copied
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn persistent(&self) -> bool {
        true
    }
}

#[test]
fn a_layer_moves_data_with_io_of_its_own_and_stays_through_setting_changes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let test = node(&[0], ONE_VOLUME);
    let engine = Engine::start(&test.config).unwrap();
    let (seen, copied) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let volume = engine.volume("v").unwrap().clone();
    engine
        .add_layer(
            &volume,
            Box::new(Copier {
                buf: Some(engine.dma().alloc(4096).unwrap()),
                to_lba: 1024,
                due: 0,
                busy: false,
                seen: seen.clone(),
                copied: copied.clone(),
            }),
        )
        .unwrap();
    let wait_copies = |count: usize| {
        let started = Instant::now();
        while copied.load(Ordering::SeqCst) < count {
            assert!(started.elapsed() < Duration::from_secs(5), "no copy made");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    write(&engine, 0, 41).unwrap();
    wait_copies(1);
    assert_eq!(
        read(&engine, 1024 * 512),
        pattern(41, 4096),
        "the layer's copy"
    );
    // A stub or injection change rebuilds the settings' layers; the persistent one stays, and
    // sees the next write from below the new engine layer.
    latency(LayerName::Engine, &engine, "1ms");
    write(&engine, 0, 42).unwrap();
    wait_copies(2);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(read(&engine, 1024 * 512), pattern(42, 4096));
    let described = engine.layers("v").unwrap();
    assert_eq!(described.get(LayerName::Engine).inject.len(), 1);
}
