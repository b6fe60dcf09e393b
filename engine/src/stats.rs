//! Stage stamps: every IO is timed at each stage it passes, and the durations go into the
//! shared-memory stats region (`fathom_telemetry::region`).
//!
//! Stages (names are part of the public stats interface), in the order an IO passes them:
//! - `receive`: a front end's socket read that brought the request until it was parsed and
//!   handed to the engine (front-end IOs only);
//! - `queue`: the engine accepted the IO (on the caller's thread) until its reactor submits it;
//! - `submit`: submission until the doorbell that published it;
//! - `device`: doorbell until the reactor saw its completion;
//! - `complete`: completion seen until the callbacks of its batch have run;
//! - `reply`: a front end's reply from then until the socket took all of it (front-end IOs
//!   only);
//! - `total`: accepted until the callbacks ran; for front-end IOs, from the socket read to the
//!   reply written, recorded by the front end.
//!
//! Reading the clock costs about 11 ns here, far more than recording, so the reactor reads it
//! once per batch event and every IO crossing that boundary shares the value: once before a
//! round of doorbells, once per reap batch. The end of the `complete` stage is the reactor's
//! next clock read, so in steady state a loop iteration reads the clock twice however many IOs
//! it moves.
//!
//! IOs submitted together and completed together carry identical stamps, so consecutive
//! completions with the same volume, op and stamps form a *run* that is recorded once with a
//! count: a batch of 32 typically costs five histogram increments, not 160. A run's stages are
//! recorded together at the end of the loop iteration whose clock read ended it, away from the
//! read whose value they wait for. Counters (IOs,
//! bytes, errors, queue busy time) are kept by the reactor and published to the region every
//! millisecond, when the reactor goes idle, and when it stops; so is the `queue` stage of IOs
//! submitted on the reactor itself (by a task or a front end), which is always zero.

use fathom_telemetry::region::{QueueRecorder, SeriesRecorder};
use fathom_telemetry::trace::{
    reason, stamp, IdGenerator, RingWriter, SpanId, TraceId, TraceRecord, MAX_LAYERS,
};
use fathom_telemetry::Clock;
use std::sync::Arc;

use crate::trace::{SamplingTable, TraceSettings, NO_THRESHOLD};

use fathom_drivers::Op;

/// Stage indices and names, in region order.
pub mod stage {
    pub const RECEIVE: usize = 0;
    pub const QUEUE: usize = 1;
    pub const SUBMIT: usize = 2;
    pub const DEVICE: usize = 3;
    pub const COMPLETE: usize = 4;
    pub const REPLY: usize = 5;
    pub const TOTAL: usize = 6;
    pub const NAMES: [&str; 7] = [
        "receive", "queue", "submit", "device", "complete", "reply", "total",
    ];
}

/// Operation names, indexed by [`op_index`], then the health probes' own series (the smoke
/// write and the canaries, in the volume's health area): their IOs never mix with the
/// clients'.
pub const OP_NAMES: [&str; 6] = [
    "read",
    "write",
    "flush",
    "write_zeroes",
    "probe_read",
    "probe_write",
];

/// The clients' ops: the first of [`OP_NAMES`].
pub const CLIENT_OPS: usize = 4;

/// Index in [`OP_NAMES`] of the health probes' reads, then their writes.
pub const PROBE_READ: usize = 4;
pub const PROBE_WRITE: usize = 5;

#[inline(always)]
pub fn op_index(op: Op) -> u8 {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::WriteZeroes => 3,
    }
}

/// One op on one volume, as the reactor's telemetry tables index it (volume × ops + op), with
/// a flag for IOs whose `total` a front end records itself. One word, so that comparing two
/// IOs' keys stays cheap.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Series(u32);

impl Series {
    const FRONTEND: u32 = 1 << 31;

    #[inline(always)]
    pub fn new(volume: u32, op: Op, frontend: bool) -> Self {
        let index = volume * OP_NAMES.len() as u32 + op_index(op) as u32;
        Self(index | if frontend { Self::FRONTEND } else { 0 })
    }

    /// A health probe's IO of `op` on `volume` ([`PROBE_READ`], [`PROBE_WRITE`]; its other
    /// ops count as writes).
    pub fn probe(volume: u32, op: Op) -> Self {
        let op = match op {
            Op::Read => PROBE_READ,
            _ => PROBE_WRITE,
        };
        Self(volume * OP_NAMES.len() as u32 + op as u32)
    }

    /// Where the series' recorder and totals are.
    #[inline(always)]
    fn index(self) -> usize {
        (self.0 & !Self::FRONTEND) as usize
    }

    #[inline(always)]
    fn frontend(self) -> bool {
        self.0 & Self::FRONTEND != 0
    }

    /// The volume id.
    pub fn volume(self) -> u32 {
        self.index() as u32 / OP_NAMES.len() as u32
    }
}

/// What identifies a run: IOs with equal keys have equal stage durations.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct RunKey {
    accepted: u64,
    submitted: u64,
    rung: u64,
    series: Series,
}

/// A reaped run: its stamps, and the clock read that ended its `complete` and `total` stages
/// (0 until the next read).
#[derive(Clone, Copy)]
struct Reaped {
    key: RunKey,
    seen: u64,
    ended: u64,
    count: u64,
    bytes: u64,
}

/// How often counters are published to the region.
const PUBLISH_PERIOD: std::time::Duration = std::time::Duration::from_millis(1);

/// A queue's counters as the reactor keeps them between publications.
#[derive(Clone, Copy, Default)]
struct QueueTotals {
    busy_ticks: u64,
    /// Start of the current busy period, 0 when idle.
    busy_since: u64,
    submitted: u64,
    completed: u64,
}

/// A series' counters as the reactor keeps them between publications.
#[derive(Clone, Copy, Default)]
struct SeriesTotals {
    ios: u64,
    bytes: u64,
    errors: u64,
}

/// One reactor's telemetry state.
pub(crate) struct CoreTelemetry {
    clock: Clock,
    /// The last clock read: the stamp of anything happening before the next read.
    pub now: u64,
    /// Indexed by [`Series`]; only this reactor's volumes have recorders.
    series: Box<[Option<SeriesRecorder>]>,
    /// Indexed by device.
    queues: Box<[QueueRecorder]>,
    /// Per device: commands in flight.
    in_flight: Box<[u32]>,
    /// Bit d: device d's queue is busy (has commands outstanding).
    busy: u64,
    /// The run being reaped: its key, and how many IOs (bytes) it has so far.
    run: RunKey,
    run_ios: u64,
    run_bytes: u64,
    run_errors: u64,
    /// Runs reaped and not yet recorded; the first `ended` of them have their end stamp.
    reaped: Vec<Reaped>,
    ended: usize,
    stamped: bool,
    stamped_last_iteration: bool,
    /// Indexed by [`Series`], as published.
    series_totals: Box<[SeriesTotals]>,
    /// Indexed by [`Series`]: IOs that spent no time in the `queue` stage (submitted on the
    /// reactor itself, by a task or a front end), recorded with the counters.
    queue_zeros: Box<[u64]>,
    queue_totals: Box<[QueueTotals]>,
    next_publish: u64,
    publish_period: u64,
    /// Head sampling: completions until the next sampled one (`u32::MAX` when nothing is
    /// head-sampled: it then fires once per 4 Gi IOs, and [`CoreTelemetry::trace`] declines).
    trace_countdown: u32,
    /// Tail sampling: an IO whose completion is seen more than this many ticks after it was
    /// accepted is traced (`u64::MAX`: off).
    tail_ticks: u64,
    tracer: Option<Box<Tracer>>,
}

/// One reactor's writer of trace records, for the IOs its completions pick.
pub(crate) struct Tracer {
    pub ring: RingWriter,
    pub ids: IdGenerator,
    pub core: u16,
    /// Queues per reactor in the stats region's queue table (this reactor's start at
    /// `reactor * queues`).
    pub queue_base: u16,
    pub settings: Arc<TraceSettings>,
    /// The settings as last taken, per series.
    table: SamplingTable,
    /// Series this reactor records (its volumes' ops).
    owned: Vec<bool>,
    /// The head sampler counts down at the lowest rate of this reactor's series; a series
    /// with a rate `k` times that keeps every `k`th of its turns (counted here, per series).
    base_rate: u32,
    turns: Vec<u32>,
    /// The head sampler's decision on the last front-end IO it picked, for the front end to
    /// take when the completion reaches it ([`CoreTelemetry::take_frontend_head`]).
    frontend_head: bool,
}

impl Tracer {
    pub fn new(
        ring: RingWriter,
        ids: IdGenerator,
        core: u16,
        queue_base: u16,
        settings: Arc<TraceSettings>,
    ) -> Self {
        Self {
            ring,
            ids,
            core,
            queue_base,
            settings,
            table: SamplingTable::default(),
            owned: Vec::new(),
            base_rate: 0,
            turns: Vec::new(),
            frontend_head: false,
        }
    }

    /// Completions until the next head-sampler turn (`u32::MAX` when none is sampled).
    fn countdown(&self) -> u32 {
        match self.base_rate {
            0 => u32::MAX,
            rate => rate,
        }
    }

    /// Whether the head sampler's turn, landing on an IO of `series`, keeps it.
    fn head_keeps(&mut self, series: usize) -> bool {
        let rate = self.table.rates.get(series).copied().unwrap_or(0);
        if rate == 0 || self.base_rate == 0 {
            return false;
        }
        let turns = &mut self.turns[series];
        *turns += self.base_rate;
        if *turns >= rate {
            *turns -= rate;
            true
        } else {
            false
        }
    }

    fn threshold(&self, series: usize) -> u64 {
        self.table
            .thresholds
            .get(series)
            .copied()
            .unwrap_or(NO_THRESHOLD)
    }

    /// Takes new settings if they changed: the base rate and lowest threshold of this
    /// reactor's series, for the two compares on every IO.
    fn refresh(&mut self) -> Option<(u32, u64)> {
        if !self.settings.refresh(&mut self.table) {
            return None;
        }
        let owned = |values: &[u32]| {
            values
                .iter()
                .zip(&self.owned)
                .filter(|&(&rate, &owned)| owned && rate != 0)
                .map(|(&rate, _)| rate)
                .min()
        };
        self.base_rate = owned(&self.table.rates).unwrap_or(0);
        self.turns.clear();
        self.turns.resize(self.table.rates.len(), 0);
        let lowest = self
            .table
            .thresholds
            .iter()
            .zip(&self.owned)
            .filter(|&(_, &owned)| owned)
            .map(|(&ticks, _)| ticks)
            .min()
            .unwrap_or(NO_THRESHOLD);
        Some((self.countdown(), lowest))
    }

    /// A run whose `total` may have passed its threshold only in its `complete` stage, after
    /// the decision at completion: each of its IOs is traced now, so that the traced IOs are
    /// exactly those the `total` histogram counts above the threshold. What only the slot
    /// knew (offset, status) is gone by now: the records say so with [`reason::LATE`].
    #[cold]
    #[inline(never)]
    fn trace_late(&mut self, run: &Reaped, total: u64) {
        let series = run.key.series.index();
        let threshold = self.threshold(series);
        let decided = run.seen.saturating_sub(run.key.accepted);
        if total <= threshold || decided > threshold {
            return;
        }
        let stamps = engine_stamps(
            run.key.accepted,
            run.key.submitted,
            run.key.rung,
            run.seen,
            run.ended,
        );
        for _ in 0..run.count {
            let record = self.record(
                series,
                reason::TAIL | reason::LATE,
                u64::MAX,
                run.bytes / run.count.max(1),
                0,
                u16::MAX,
                stamps,
            );
            self.push(&record);
        }
    }

    /// Writes one record.
    fn push(&mut self, record: &TraceRecord) {
        self.ring.push(record);
    }

    /// A new trace's record of an IO of `series` (`queue`: on this reactor, `u16::MAX` if
    /// not known).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        series: usize,
        reason: u8,
        offset: u64,
        bytes: u64,
        status: u16,
        queue: u16,
        stamps: [u64; stamp::COUNT],
    ) -> TraceRecord {
        let ops = OP_NAMES.len();
        TraceRecord {
            trace_id: self.ids.trace_id(),
            span_id: self.ids.span_id(),
            parent: SpanId(0),
            volume: (series / ops) as u32,
            op: (series % ops) as u8,
            reason,
            status,
            offset,
            len: bytes as u32,
            core: self.core,
            queue: match queue {
                u16::MAX => u16::MAX,
                queue => self.queue_base + queue,
            },
            stamps,
            layer_count: 0,
            layers: Default::default(),
        }
    }

    #[cold]
    #[inline(never)]
    fn trace_frontend(&mut self, series: usize, io: &FrontendTrace, tail: bool) {
        let engine = &io.engine;
        let mut stamps = engine_stamps(
            engine.accepted,
            engine.submitted,
            engine.rung,
            engine.seen,
            io.reply_start,
        );
        stamps[stamp::RECEIVED] = io.received;
        stamps[stamp::REPLY_START] = io.reply_start;
        stamps[stamp::SENT] = io.sent;
        let reason = reason_bits(engine.head, tail, !io.ok);
        let mut record = self.record(
            series,
            reason,
            io.offset,
            io.len,
            io.status,
            engine.queue,
            stamps,
        );
        engine.layers.into_record(&mut record);
        self.push(&record);
    }
}

/// A record's stamps of the engine's stages (a front end adds its own).
fn engine_stamps(
    accepted: u64,
    submitted: u64,
    rung: u64,
    seen: u64,
    completed: u64,
) -> [u64; stamp::COUNT] {
    let mut stamps = [0u64; stamp::COUNT];
    stamps[stamp::ACCEPTED] = accepted;
    stamps[stamp::SUBMITTED] = submitted;
    stamps[stamp::RUNG] = rung;
    stamps[stamp::SEEN] = seen;
    stamps[stamp::COMPLETED] = completed;
    stamps
}

/// Why an IO is traced, as a record's [`reason`] bits.
fn reason_bits(head: bool, tail: bool, failed: bool) -> u8 {
    (head as u8 * reason::HEAD) | (tail as u8 * reason::TAIL) | (failed as u8 * reason::ERROR)
}

/// A front end's answered request, as [`crate::IoContext::trace_frontend`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct FrontendTrace {
    pub volume: u32,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub ok: bool,
    /// NVMe status word (status code type << 8 | status code), 0 for success.
    pub status: u16,
    /// The socket read that brought it, the start of its reply, the write that finished it.
    pub received: u64,
    pub reply_start: u64,
    pub sent: u64,
    /// Its engine IO's stamps ([`crate::IoContext::completion_stamps`]; for a request split
    /// into several, the last to complete).
    pub engine: EngineStamps,
}

/// What the engine stamped on one IO, handed to the front end with its completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStamps {
    pub accepted: u64,
    pub submitted: u64,
    pub rung: u64,
    pub seen: u64,
    /// The device queue it completed on, on its reactor (`u16::MAX`: not known).
    pub queue: u16,
    /// The head sampler kept it.
    pub head: bool,
    /// The layers it passed (none for a volume without layers).
    pub layers: LayerSpans,
}

/// What a traced IO's slot holds, handed to [`CoreTelemetry::trace`].
pub(crate) struct TracedIo {
    pub series: Series,
    pub offset: u64,
    pub bytes: u64,
    pub accepted: u64,
    pub submitted: u64,
    pub rung: u64,
    pub seen: u64,
    pub status: u16,
    pub ok: bool,
    /// The device queue it completed on, on this reactor (`u16::MAX`: not known).
    pub queue: u16,
    /// The layers it passed, if it went through its volume's layers.
    pub layers: Option<LayerSpans>,
}

/// What a layered IO carries for its trace: the layers it passed, and the ids it was given
/// when its trace crossed to another node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerSpans {
    /// By depth in its volume's stack: (layer kind as [`crate::layer::LayerName::index`],
    /// entered going down, left going up; 0 where it did not pass).
    pub spans: [(u8, u64, u64); MAX_LAYERS],
    /// Its trace's ids, set before its record is made: by a layer that sent it on to other
    /// nodes in a trace context ([`crate::LayerCtx::trace_context`]), or by a caller that
    /// brought one ([`crate::IoContext::submit_in_trace`]). Zero: the record draws its own.
    pub ids: TraceIds,
}

/// A traced IO's ids on this node: its trace, its root span, and its caller's span (zero when
/// the trace starts here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: TraceId,
    pub span: SpanId,
    pub parent: SpanId,
}

impl LayerSpans {
    /// The layers it passed, top first, and its ids if it has some, as a trace record holds
    /// them.
    fn into_record(self, record: &mut TraceRecord) {
        let mut count = 0;
        for &(kind, begin, end) in &self.spans {
            if begin != 0 {
                record.layers[count] = (kind, begin, end.max(begin));
                count += 1;
            }
        }
        record.layer_count = count as u8;
        if self.ids.trace_id.0 != 0 {
            record.trace_id = self.ids.trace_id;
            record.span_id = self.ids.span;
            record.parent = self.ids.parent;
        }
    }
}

impl CoreTelemetry {
    /// `series[volume × ops + op]` is the recorder of that op on that volume if this reactor
    /// owns the volume; `queue_capacities[d]` is device d's queue capacity on this reactor.
    pub fn new(
        clock: Clock,
        series: Box<[Option<SeriesRecorder>]>,
        queues: Box<[QueueRecorder]>,
        queue_capacities: &[usize],
    ) -> Self {
        let devices = queue_capacities.len();
        let total: usize = queue_capacities.iter().sum();
        Self {
            now: clock.now(),
            series_totals: vec![SeriesTotals::default(); series.len()].into_boxed_slice(),
            queue_zeros: vec![0; series.len()].into_boxed_slice(),
            queue_totals: vec![QueueTotals::default(); devices].into_boxed_slice(),
            next_publish: 0,
            publish_period: clock.duration_to_ticks(PUBLISH_PERIOD),
            clock,
            series,
            queues,
            in_flight: vec![0; devices].into_boxed_slice(),
            busy: 0,
            run: RunKey::default(),
            run_ios: 0,
            run_bytes: 0,
            run_errors: 0,
            // Runs wait at most two loop iterations, each reaping at most every slot.
            reaped: Vec::with_capacity(2 * total),
            ended: 0,
            stamped: false,
            stamped_last_iteration: false,
            trace_countdown: u32::MAX,
            tail_ticks: u64::MAX,
            tracer: None,
        }
    }

    /// Volume `volume` now records through `recorders` (one per op; `None`: it is not this
    /// reactor's, or gone). What was recorded under its id so far is published first, and
    /// its totals start again from zero, as the region's new series does.
    pub fn set_volume(&mut self, volume: usize, recorders: Option<Vec<SeriesRecorder>>) {
        self.end_run(self.now);
        self.stamp();
        self.record_ended();
        self.publish();
        let ops = OP_NAMES.len();
        let mut recorders = recorders.map(Vec::into_iter);
        for op in 0..ops {
            let series = volume * ops + op;
            if series >= self.series.len() {
                return;
            }
            self.series[series] = recorders.as_mut().and_then(Iterator::next);
            self.series_totals[series] = SeriesTotals::default();
            self.queue_zeros[series] = 0;
            if let Some(tracer) = self.tracer.as_deref_mut() {
                tracer.owned[series] = self.series[series].is_some();
            }
        }
        if self.tracer.is_some() {
            self.refresh_tracer();
        }
    }

    /// Traces this reactor's IOs into `tracer`'s ring from now on, as its settings say;
    /// `owned[series]` is whether this reactor records that series.
    pub fn set_tracer(&mut self, mut tracer: Tracer) {
        tracer.owned = self.series.iter().map(Option::is_some).collect();
        self.tracer = Some(Box::new(tracer));
        self.refresh_tracer();
    }

    /// Takes the trace settings if they changed (a load of their version).
    #[inline]
    pub fn take_trace_settings(&mut self) {
        if let Some(tracer) = &self.tracer {
            if tracer.settings.generation() != tracer.table.generation {
                self.refresh_tracer();
            }
        }
    }

    #[cold]
    fn refresh_tracer(&mut self) {
        if let Some((countdown, tail_ticks)) = self.tracer.as_deref_mut().and_then(Tracer::refresh)
        {
            self.trace_countdown = countdown;
            self.tail_ticks = tail_ticks;
        }
    }

    /// Whether the IO accepted at `accepted` whose completion was seen at `seen` is to be
    /// traced: the head sampler's turn came, or it was slower than the tail threshold. Two
    /// compares on the path of every IO; the record itself is out of line.
    #[inline(always)]
    pub fn trace_due(&mut self, accepted: u64, seen: u64) -> bool {
        self.trace_countdown = self.trace_countdown.wrapping_sub(1);
        (self.trace_countdown == 0) | (seen.wrapping_sub(accepted) > self.tail_ticks)
    }

    /// Writes the record of an IO [`CoreTelemetry::trace_due`] picked, if its own series'
    /// settings keep it (the compares on every IO use this reactor's lowest rate and
    /// threshold). IOs a front end times itself are traced by the front end, which knows
    /// their whole `total`: it learns whether the head sampler kept them.
    #[cold]
    #[inline(never)]
    pub fn trace(&mut self, io: TracedIo) {
        let turn = self.trace_countdown == 0;
        let Some(tracer) = self.tracer.as_deref_mut() else {
            self.trace_countdown = u32::MAX;
            return;
        };
        let series = io.series.index();
        let head = turn && {
            self.trace_countdown = tracer.countdown();
            tracer.head_keeps(series)
        };
        if io.series.frontend() {
            tracer.frontend_head = head;
            return;
        }
        let tail = io.seen.wrapping_sub(io.accepted) > tracer.threshold(series);
        if !(head || tail) {
            return;
        }
        let stamps = engine_stamps(io.accepted, io.submitted, io.rung, io.seen, io.seen);
        let reason = reason_bits(head, tail, !io.ok);
        let mut record = tracer.record(
            series, reason, io.offset, io.bytes, io.status, io.queue, stamps,
        );
        if let Some(layers) = io.layers {
            layers.into_record(&mut record);
        }
        tracer.push(&record);
    }

    /// A new trace id and span id for an IO whose trace goes on to another node; `None`
    /// while tracing is off.
    pub(crate) fn new_ids(&mut self) -> Option<(TraceId, SpanId)> {
        let tracer = self.tracer.as_deref_mut()?;
        Some((tracer.ids.trace_id(), tracer.ids.span_id()))
    }

    /// A new span id for an IO that joins another node's trace; `None` while tracing is off.
    pub(crate) fn new_span(&mut self) -> Option<SpanId> {
        Some(self.tracer.as_deref_mut()?.ids.span_id())
    }

    /// Whether the head sampler kept the front-end IO whose completion is being delivered
    /// (and forgets it).
    #[inline]
    pub fn take_frontend_head(&mut self) -> bool {
        self.tracer
            .as_deref_mut()
            .is_some_and(|tracer| std::mem::take(&mut tracer.frontend_head))
    }

    /// A front end's request has been answered: traced if the head sampler kept its engine
    /// IO, it failed, or its socket-to-socket `total` is over its series' threshold, the
    /// same `total` the front end records in the histograms.
    #[inline]
    pub fn trace_frontend(&mut self, io: &FrontendTrace) {
        let Some(tracer) = self.tracer.as_deref_mut() else {
            return;
        };
        let series = Series::new(io.volume, io.op, false).index();
        let tail = io.sent.saturating_sub(io.received) > tracer.threshold(series);
        if io.engine.head || !io.ok || tail {
            tracer.trace_frontend(series, io, tail);
        }
    }

    /// Reads the clock; ends the runs waiting for it.
    #[inline]
    pub fn stamp(&mut self) -> u64 {
        let now = self.clock.now();
        self.now = now;
        self.stamped = true;
        if self.ended < self.reaped.len() {
            for run in &mut self.reaped[self.ended..] {
                run.ended = now;
            }
            self.ended = self.reaped.len();
        }
        now
    }

    /// A fresh stamp if the last loop iteration took none (the reactor was idle), so that work
    /// arriving now is not stamped with a stale time.
    #[inline]
    pub fn refresh_if_idle(&mut self) {
        if !self.stamped_last_iteration && !self.stamped {
            self.stamp();
        }
    }

    /// Device `device`'s doorbell published `count` commands at `now` (the reactor stamped
    /// each command's slot with `now`).
    #[inline]
    pub fn rang(&mut self, device: usize, count: usize, now: u64) {
        self.in_flight[device] += count as u32;
        let totals = &mut self.queue_totals[device];
        totals.submitted += count as u64;
        if self.busy & (1 << device) == 0 && self.in_flight[device] > 0 {
            self.busy |= 1 << device;
            totals.busy_since = now.max(1);
        }
    }

    /// One IO completed (in the batch being reaped, seen at `seen`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn completed(
        &mut self,
        series: Series,
        bytes: u64,
        ok: bool,
        accepted: u64,
        submitted: u64,
        rung: u64,
        seen: u64,
    ) {
        let key = RunKey {
            accepted,
            submitted,
            rung,
            series,
        };
        if self.run != key {
            self.end_run(seen);
            self.run = key;
        }
        self.run_ios += ok as u64;
        self.run_bytes += if ok { bytes } else { 0 };
        self.run_errors += !ok as u64;
    }

    /// Ends the current run, if it has IOs: it is recorded once the next clock read has ended
    /// its `complete` stage.
    #[inline]
    fn end_run(&mut self, seen: u64) {
        let count = self.run_ios + self.run_errors;
        if count == 0 {
            return;
        }
        let totals = &mut self.series_totals[self.run.series.index()];
        totals.ios += self.run_ios;
        totals.bytes += self.run_bytes;
        totals.errors += self.run_errors;
        self.reaped.push(Reaped {
            key: self.run,
            seen,
            ended: 0,
            count,
            bytes: self.run_bytes,
        });
        (self.run_ios, self.run_bytes, self.run_errors) = (0, 0, 0);
    }

    /// The completions that came up through the layers, seen at `seen`, are all recorded:
    /// their run ends here, not at the next device batch (which a holding layer may delay).
    #[inline]
    pub fn layers_completed(&mut self, seen: u64) {
        self.end_run(seen);
    }

    /// Device `device` delivered `count` completions, seen at `now`.
    #[inline]
    pub fn reaped(&mut self, device: usize, count: usize, now: u64) {
        self.end_run(now);
        self.in_flight[device] -= count as u32;
        let totals = &mut self.queue_totals[device];
        totals.completed += count as u64;
        if self.in_flight[device] == 0 && self.busy & (1 << device) != 0 {
            self.busy &= !(1 << device);
            totals.busy_ticks += now.saturating_sub(totals.busy_since);
            totals.busy_since = 0;
        }
    }

    /// Records the runs whose end stamp was read: all five stages at once, away from the clock
    /// read whose value they wait for.
    fn record_ended(&mut self) {
        for run in &self.reaped[..self.ended] {
            let key = run.key;
            let series = key.series.index();
            let Some(recorder) = &self.series[series] else {
                continue;
            };
            let count = run.count;
            let queued = key.submitted.saturating_sub(key.accepted);
            if queued == 0 {
                self.queue_zeros[series] += count;
            } else {
                recorder.record(stage::QUEUE, queued, count);
            }
            recorder.record(stage::SUBMIT, key.rung.saturating_sub(key.submitted), count);
            recorder.record(stage::DEVICE, run.seen.saturating_sub(key.rung), count);
            recorder.record(stage::COMPLETE, run.ended.saturating_sub(run.seen), count);
            if !key.series.frontend() {
                let total = run.ended.saturating_sub(key.accepted);
                recorder.record(stage::TOTAL, total, count);
                if total > self.tail_ticks {
                    if let Some(tracer) = self.tracer.as_deref_mut() {
                        tracer.trace_late(run, total);
                    }
                }
            }
        }
        self.reaped.drain(..self.ended);
        self.ended = 0;
    }

    /// Records `count` IOs of `volume`/`op` whose `stage` took `ticks` each (for stages a
    /// front end times itself).
    #[inline]
    pub fn record(&mut self, volume: u32, op: Op, stage: usize, ticks: u64, count: u64) {
        let series = Series::new(volume, op, false).index();
        if let Some(Some(recorder)) = self.series.get(series) {
            recorder.record(stage, ticks, count);
        }
    }

    /// Ends a loop iteration: runs still waiting for their closing stamp get one if nothing
    /// else would read the clock before the reactor goes idle; counters are published once
    /// per period.
    #[inline]
    pub fn end_iteration(&mut self) {
        if self.ended < self.reaped.len() && !self.stamped {
            self.stamp();
        }
        if self.ended > 0 {
            self.record_ended();
        }
        self.stamped_last_iteration = self.stamped;
        self.stamped = false;
        if self.now >= self.next_publish {
            self.publish();
        }
    }

    /// Publishes the counters to the region (every period, before the reactor parks, and when
    /// it stops).
    pub fn publish(&mut self) {
        self.next_publish = self.now + self.publish_period;
        self.take_trace_settings();
        for ((recorder, totals), queue_zeros) in self
            .series
            .iter()
            .zip(self.series_totals.iter())
            .zip(self.queue_zeros.iter_mut())
        {
            if let Some(recorder) = recorder {
                recorder.publish_counts(totals.ios, totals.bytes, totals.errors);
                if *queue_zeros != 0 {
                    recorder.record(stage::QUEUE, 0, std::mem::take(queue_zeros));
                }
            }
        }
        for (queue, totals) in self.queues.iter().zip(self.queue_totals.iter()) {
            queue.publish(
                totals.busy_ticks,
                totals.busy_since,
                totals.submitted,
                totals.completed,
            );
        }
    }
}
