//! Reactors: one pinned thread per configured core, never blocking on the IO path.
//!
//! Each loop iteration, bounded in every step:
//! 1. retries the request that found its device queue full, if any, then takes up to
//!    [`INBOUND_BATCH`] messages from its inbound ring (requests from other threads, tasks to
//!    run here, control messages), none while a request still waits for its queue: the ring
//!    fills and submitters get `Busy`, so back-pressure reaches them;
//! 2. polls its tasks (reactor-local workloads that submit without any cross-core hop);
//! 3. rings the doorbell of every queue that got new commands, once per batch;
//! 4. reaps up to [`REAP_BATCH`] completions per queue and hands each to whoever asked for it.
//!
//! Per-IO state lives in a slot array allocated at start (one slot per command the queues can
//! hold); submitting takes a slot from a free stack and completing returns it. Nothing on this
//! path allocates or takes a lock.
//!
//! In `adaptive` poll mode a reactor with nothing in flight and nothing to do sleeps after a
//! short spin, in poll(2) on its wake-up eventfd and on the descriptors its tasks name (a front
//! end's epoll, [`Task::wake_fd`]); submitters write the eventfd. A task without such a
//! descriptor keeps its reactor polling. One whose only work is IO in flight on a single queue
//! that can notify (io_uring) waits in the kernel for a completion instead of spinning, leaving
//! the core to the kernel's completion work; polled queues (mem, VFIO) keep being polled.
//! `busy` mode never sleeps or waits, as SPDK's reactors.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::config::{PollMode, MAX_DEVICES};
use crate::layer::{
    Down, Layer, LayerCtx, LayerName, LayerWork, OwnIo, Up, VolumePath, NO_SLOT, OWN_SLOT,
};
use crate::poll::EventFd;
use crate::stats::{
    CoreTelemetry, EngineStamps, FrontendTrace, LayerSpans, Series, TraceIds, TracedIo,
};
use crate::volume::{IoCompletion, IoError, IoRequest, Notify, Volume, VolumeId};
use fathom_dma::DmaBuf;
use fathom_drivers::{IoCommand, IoFlags, IoQueue, Op};
use fathom_nvme::{Completed, DataRange, Status};
use fathom_telemetry::region::SeriesRecorder;
use fathom_telemetry::trace::TraceContext;
use fathom_telemetry::Clock;

/// Inbound messages taken per loop iteration.
pub const INBOUND_BATCH: usize = 64;
/// Completions reaped per queue per loop iteration.
pub const REAP_BATCH: usize = 64;
/// Tasks that can wait in turn for room on one device queue; more wait without a turn.
const MAX_WAITERS: usize = 64;
/// Set in the cookie of a command that came down through a volume's layers: the reap loop
/// tells it from a layerless one by a bit of the completion it holds, with no load.
const LAYERED_COOKIE: u32 = 1 << 31;

/// Finishes the IO in slot `$cookie` of `$io` (an [`IoContext`]), `ok` or not, with the
/// result `$result` makes of its op: records it and tells whoever asked (a task of `$tasks`,
/// or the IO's channel or callback). A macro, so the reap loop has it inline in exactly this
/// shape: each value read from the slot once, straight into the completion built in the call,
/// the result made last. Measured per IO, each of these cost 1 to 4 ns (store-forwarding
/// latency on the path from reap to the task): an out-of-line call, a completion assembled
/// first and then moved, the buffer read as part of a tuple (copied twice on the stack), and
/// the same code as an inlined function taking a closure (spills).
macro_rules! finish_io {
    ($io:expr, $tasks:expr, $cookie:expr, $seen:expr, ok: $ok:expr, status: $status:expr, queue: $queue:expr, layered: $layered:expr, result: |$op:pat_param| $result:expr) => {{
        let cookie: u32 = $cookie;
        let slot = &mut $io.slots[cookie as usize];
        if let (Some(telemetry), Some(seen)) = ($io.telemetry.as_deref_mut(), $seen) {
            telemetry.completed(
                slot.series,
                slot.bytes,
                $ok,
                slot.accepted,
                slot.submitted,
                slot.rung,
                seen,
            );
            $io.completing = Completing {
                seen,
                slot: cookie,
                queue: $queue,
                layered: $layered,
            };
            if telemetry.trace_due(slot.accepted, seen) {
                telemetry.trace(TracedIo {
                    series: slot.series,
                    offset: $io.offsets[cookie as usize],
                    bytes: slot.bytes,
                    accepted: slot.accepted,
                    submitted: slot.submitted,
                    rung: slot.rung,
                    seen,
                    status: $status,
                    ok: $ok,
                    queue: $queue,
                    layers: match $layered {
                        true => $io.layer_spans.get(cookie as usize).copied(),
                        false => None,
                    },
                });
            }
        }
        let notify = std::mem::replace(&mut slot.notify, Notify::Nobody);
        let tag = slot.tag;
        let $op = slot.op;
        let buf = slot.buf.take();
        $io.free_slots.push(cookie);
        let result = $result;
        match notify {
            Notify::Task(index) => {
                if let Some(Some(task)) = $tasks.get_mut(index as usize) {
                    $io.current_task = index;
                    task.complete(&mut $io, IoCompletion { tag, result, buf });
                }
            }
            other => deliver(other, IoCompletion { tag, result, buf }),
        }
    }};
}
/// An adaptive reactor with IO in flight and nothing else to do spins this long, then waits in
/// the kernel for a completion (where the device's queue can wait), at most this long.
const DEVICE_WAIT_SPIN: Duration = Duration::from_micros(20);
const DEVICE_WAIT_TIMEOUT: Duration = Duration::from_millis(1);

/// Work that runs on a reactor's own thread: a workload generator (as SPDK's perf), later a
/// front end's connection poller. It submits through the [`IoContext`] it is handed, and its
/// completions come back to [`Task::complete`] on the same thread.
pub trait Task: Send {
    /// Called once per loop iteration. Returns whether it did anything.
    fn poll(&mut self, io: &mut IoContext) -> bool;
    /// One of this task's IOs finished.
    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion);
    /// A finished task is dropped once none of its IOs is in flight.
    fn finished(&self) -> bool;
    /// A descriptor that turns readable when the task has work (a front end's epoll), so that
    /// an idle reactor can sleep until then. A task without one keeps its reactor polling.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Who submitted an IO, which says where it goes and how it is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A task or the engine: through the volume's layers.
    Client,
    /// A front end, which records the IO's `total` itself.
    Frontend,
    /// Replication, in the volume's metadata area: straight to the device.
    Metadata,
    /// A health probe, in the volume's health area: straight to the device, in the volume's
    /// probe series.
    Probe,
}

/// A request refused at submission, handed back with the reason.
#[derive(Debug)]
pub struct Rejected {
    pub request: IoRequest,
    pub notify: Notify,
    pub error: IoError,
}

pub(crate) enum Message {
    /// A request, its completion target, and when the engine accepted it (clock ticks; 0
    /// without telemetry).
    Io(IoRequest, Notify, u64),
    Spawn(Box<dyn Task>),
    /// A change to a volume's state, applied between loop iterations.
    Control(VolumeControl),
}

/// A change to the state of a volume this reactor owns. Built off the reactor (where
/// allocating is fine) and applied between two loop iterations, so the IO path takes no lock.
pub enum VolumeControl {
    /// Replaces the volume's layer stack (top first). What the old layers hold goes on through
    /// the new stack from its top; IOs already below complete through the new stack.
    SetLayers {
        volume: VolumeId,
        layers: Vec<Box<dyn Layer>>,
        path: VolumePath,
        done: crossbeam_channel::Sender<()>,
    },
    /// A volume made while the engine runs takes its (free) slot, with its telemetry series'
    /// recorders (one per op), and takes IO from now on.
    Open {
        volume: Box<Volume>,
        recorders: Option<Vec<SeriesRecorder>>,
        done: crossbeam_channel::Sender<()>,
    },
    /// The volume takes no more IO; its layers let go of what they hold. Answers how many of
    /// its IOs are still in flight (sent again until none are).
    Close {
        volume: VolumeId,
        done: crossbeam_channel::Sender<usize>,
    },
}

/// What other threads share with one reactor.
pub(crate) struct ReactorShared {
    pub inbound: ArrayQueue<Message>,
    pub sleeping: AtomicBool,
    pub stop: AtomicBool,
    /// Written to wake the reactor while it sleeps ([`ReactorShared::wake`]).
    wake: EventFd,
}

impl ReactorShared {
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(Self {
            inbound: ArrayQueue::new(capacity),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: EventFd::new()?,
        })
    }

    /// Wakes the reactor if it sleeps. Call after publishing the work (a message, `stop`).
    pub fn wake(&self) {
        // Pairs with the reactor's fence between setting `sleeping` and its last look at the
        // ring: either we see it sleeping, or it sees our message.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.notify();
        }
    }
}

pub(crate) struct Slot {
    notify: Notify,
    tag: u64,
    pub(crate) buf: Option<DmaBuf>,
    pub(crate) op: Op,
    /// Stage stamps (telemetry only): accepted by the engine, submitted to the device queue,
    /// published by a doorbell.
    accepted: u64,
    submitted: u64,
    rung: u64,
    /// Volume and op, and whether a front end records the IO's `total` itself.
    series: Series,
    bytes: u64,
}

/// What an IO on the layered path needs beyond its [`Slot`], in an array of its own so that
/// the layerless path's slots stay as small as they were (and it never touches these).
pub(crate) struct Link {
    /// Submitted by a front end (NBD): only such IOs pass the `frontend` layer.
    from_frontend: bool,
    /// Its command went to a device queue.
    below: bool,
    /// The depth of the layer that issued a child IO.
    origin: u8,
    volume: u32,
    /// A child IO's parent slot ([`NO_SLOT`] for an IO a client submitted).
    parent: u32,
    /// A parent's children in flight: their commands may point into its buffer, so its
    /// completion waits for them ([`Link::deferred`]).
    children: u32,
    /// A parent a layer completed while children were in flight: where and with what.
    deferred: Option<(u8, Result<(), IoError>)>,
    /// Below the layers: the device command (kept while a layer holds the IO).
    command: IoCommand,
}

/// A reactor's IO state: its device queues and per-IO slots. Tasks submit through it.
pub struct IoContext {
    reactor: usize,
    core: usize,
    /// By volume id, the engine's table as this reactor knows it; a free slot holds a
    /// [`Volume::vacant`] one, owned by no reactor, so that the submit path checks nothing
    /// more than it did when volumes never changed.
    volumes: Box<[Volume]>,
    /// One queue per device, indexed like the engine's device table, then one per device
    /// stub (device `d`'s at `devices + d`).
    queues: Vec<Box<dyn IoQueue>>,
    devices: usize,
    /// Queues to reap: the devices', and the stubs' while any volume here uses one.
    active_queues: usize,
    /// Bit d set: device d's queue has commands written but not yet rung.
    dirty: u64,
    slots: Box<[Slot]>,
    /// Per slot, for IOs on the layered path.
    links: Box<[Link]>,
    /// Per slot: the IO's byte offset in its volume (telemetry only, for a trace record). An
    /// array of its own: a field more would make every slot a word larger, which measured
    /// +0.6 ns per IO.
    offsets: Box<[u64]>,
    /// Per slot (telemetry only): the layers a layered IO passed, by depth: (layer kind,
    /// entered going down, left going up), for its trace.
    layer_spans: Box<[LayerSpans]>,
    free_slots: Vec<u32>,
    /// The task being polled or completed, so its submissions come back to it.
    current_task: u32,
    /// The IO whose completion is being delivered (telemetry only), for a front end to take
    /// its stamps ([`IoContext::completion_stamps`]).
    completing: Completing,
    telemetry: Option<Box<CoreTelemetry>>,
    /// Per device (telemetry only): slots written since the last doorbell, stamped when it
    /// rings. Bounded by the queue's capacity.
    unrung: Vec<Vec<u32>>,
    clock: Clock,
    /// Per volume (by id; empty for volumes of other reactors): its layers, top first.
    stacks: Vec<Vec<Box<dyn Layer>>>,
    /// Whether any volume here has layers or a stubbed device path: the one check the
    /// layerless path pays.
    layered: bool,
    /// Per volume: whether its IO goes the layered way (it has layers, or a stub below).
    detour: Vec<bool>,
    /// Per volume: where its commands go below the layers (queue index, flags added).
    routes: Vec<(usize, IoFlags)>,
    /// IOs between layers, and a second list to swap with so that walking one never
    /// allocates. Every list is sized for all slots: an IO is in at most one.
    work: LayerWork,
    down_batch: Vec<(u32, u8)>,
    up_batch: Vec<(u32, u8, Result<(), IoError>)>,
    /// The clock as layers see it, read once per loop iteration while any volume has layers.
    layer_now: u64,
    /// Per device: tasks refused because its queue was full, oldest first (as SPDK's
    /// io_wait). While any wait, a task's new IO goes behind them: a submitter that resubmits
    /// from its own completions cannot keep a shared queue to itself.
    waiters: Vec<std::collections::VecDeque<u32>>,
    /// Bit d: device d has waiters.
    waiting: u64,
    /// `waiting`, with bit 63 set while any volume here has layers: the one check the
    /// submit path pays ([`IoContext::update_slow`]).
    slow: u64,
    /// Per device: the first waiter when the tasks were last polled, to expire a turn not taken.
    turn: Vec<u32>,
}

impl Link {
    pub(crate) fn below(&self) -> bool {
        self.below
    }
}

impl IoContext {
    pub(crate) fn new(
        reactor: usize,
        core: usize,
        volumes: Vec<Option<Volume>>,
        queues: Vec<Box<dyn IoQueue>>,
        devices: usize,
        telemetry: Option<Box<CoreTelemetry>>,
        clock: Clock,
    ) -> Self {
        assert!(
            queues.len() <= 2 * MAX_DEVICES && devices <= queues.len(),
            "at most {} devices and their stubs",
            MAX_DEVICES
        );
        let capacity: usize = queues.iter().map(|queue| queue.capacity()).sum();
        // Slot numbers leave the cookie's layered bit free (queues hold at most 64 Ki each).
        assert!(capacity < LAYERED_COOKIE as usize, "{capacity} IO slots");
        let queue_count = queues.len();
        let volumes_len = volumes.len();
        let unrung = queues
            .iter()
            .map(|queue| Vec::with_capacity(queue.capacity()))
            .collect();
        let slots = (0..capacity)
            .map(|_| Slot {
                notify: Notify::Nobody,
                tag: 0,
                buf: None,
                op: Op::Flush,
                accepted: 0,
                submitted: 0,
                rung: 0,
                series: Series::default(),
                bytes: 0,
            })
            .collect();
        let links = (0..capacity)
            .map(|_| Link {
                from_frontend: false,
                below: false,
                origin: 0,
                volume: 0,
                parent: NO_SLOT,
                children: 0,
                deferred: None,
                command: IoCommand {
                    op: Op::Flush,
                    nsid: 0,
                    slba: 0,
                    blocks: 0,
                    data: None,
                    flags: IoFlags::NONE,
                },
            })
            .collect();
        let routes = volumes
            .iter()
            .map(|volume| {
                (
                    volume.as_ref().map_or(0, |volume| volume.device),
                    IoFlags::NONE,
                )
            })
            .collect();
        Self {
            reactor,
            core,
            volumes: volumes
                .into_iter()
                .enumerate()
                .map(|(id, volume)| volume.unwrap_or_else(|| Volume::vacant(VolumeId(id as u32))))
                .collect(),
            dirty: 0,
            queues,
            devices,
            active_queues: devices,
            slots,
            links,
            offsets: vec![0; capacity].into_boxed_slice(),
            layer_spans: vec![
                LayerSpans::default();
                if telemetry.is_some() { capacity } else { 0 }
            ]
            .into_boxed_slice(),
            free_slots: (0..capacity as u32).rev().collect(),
            current_task: u32::MAX,
            completing: Completing::default(),
            unrung,
            clock,
            stacks: (0..volumes_len).map(|_| Vec::new()).collect(),
            layered: false,
            detour: vec![false; volumes_len],
            routes,
            work: LayerWork::with_capacity(capacity),
            down_batch: Vec::with_capacity(capacity),
            up_batch: Vec::with_capacity(capacity),
            layer_now: 0,
            waiters: (0..queue_count)
                .map(|_| std::collections::VecDeque::with_capacity(MAX_WAITERS))
                .collect(),
            waiting: 0,
            slow: 0,
            turn: vec![u32::MAX; queue_count],

            telemetry,
        }
    }

    /// The queue capacities of this reactor's devices, in device order.
    pub(crate) fn queue_capacities(queues: &[Box<dyn IoQueue>]) -> Vec<usize> {
        queues.iter().map(|queue| queue.capacity()).collect()
    }

    /// The CPU core this reactor runs on.
    pub fn core(&self) -> usize {
        self.core
    }

    /// IOs in flight on this reactor.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Submits from a task; the completion goes to that task's [`Task::complete`]. A request
    /// that cannot be queued now comes back with the reason ([`IoError::Busy`] when every
    /// slot is in use: retry after a completion).
    #[inline]
    pub fn submit(&mut self, request: IoRequest) -> Result<(), Rejected> {
        let task = self.current_task;
        self.submit_notify(request, Notify::Task(task), None, Origin::Client)
    }

    /// As [`IoContext::submit`], for an IO that has waited since `since` (clock ticks) to be
    /// submitted, refused `Busy` before: the wait shows in its `queue` stage and its `total`.
    #[inline]
    pub fn submit_waited(&mut self, request: IoRequest, since: u64) -> Result<(), Rejected> {
        let task = self.current_task;
        // A waited IO is off the fast path: a fresh stamp ends its `queue` stage where it
        // really ends, not at the reactor's last clock read.
        let since = self.telemetry.as_deref_mut().map(|telemetry| {
            telemetry.stamp();
            since
        });
        self.submit_notify(request, Notify::Task(task), since, Origin::Client)
    }

    /// As [`IoContext::submit`], for the volume's replication metadata area
    /// ([`Volume::metadata_command`]): straight to the device, past every layer.
    pub fn submit_metadata(&mut self, request: IoRequest) -> Result<(), Rejected> {
        let task = self.current_task;
        self.submit_notify(request, Notify::Task(task), None, Origin::Metadata)
    }

    /// As [`IoContext::submit`], for a health probe (the smoke write, a canary) in the volume's
    /// health area ([`Volume::health_command`]): straight to the device, past every layer,
    /// timed in the volume's probe series ([`crate::stats::PROBE_READ`], `PROBE_WRITE`).
    pub fn submit_probe(&mut self, request: IoRequest) -> Result<(), Rejected> {
        let task = self.current_task;
        self.submit_notify(request, Notify::Task(task), None, Origin::Probe)
    }

    /// As [`IoContext::submit`], from a front end that times the IO from its socket to its
    /// socket: telemetry leaves the IO's `total` to it ([`IoContext::record_stage`]).
    #[inline]
    pub fn submit_frontend(&mut self, request: IoRequest) -> Result<(), Rejected> {
        let task = self.current_task;
        self.submit_notify(request, Notify::Task(task), None, Origin::Frontend)
    }

    /// [`IoContext::submit`] for an IO that another node's trace reaches (a replica's write
    /// from its primary, a client's IO forwarded to the primary): if it is traced here, its
    /// record joins that trace, its root span a child of `context`'s parent. Only IO that goes
    /// through its volume's layers keeps the context.
    pub fn submit_in_trace(
        &mut self,
        request: IoRequest,
        context: Option<TraceContext>,
    ) -> Result<(), Rejected> {
        let slot = self.free_slots.last().copied();
        let layered = self.layered && self.detour.get(request.volume.0 as usize) == Some(&true);
        self.submit(request)?;
        if let (Some(context), Some(slot), true) = (context, slot, layered) {
            let span = self
                .telemetry
                .as_deref_mut()
                .and_then(|telemetry| telemetry.new_span());
            if let (Some(span), Some(spans)) = (span, self.layer_spans.get_mut(slot as usize)) {
                spans.ids = TraceIds {
                    trace_id: context.trace_id,
                    span,
                    parent: context.parent,
                };
            }
        }
        Ok(())
    }

    /// Inside [`Task::complete`], before submitting anything: the stamps of the IO whose
    /// completion this is (`None` without telemetry), for a front end that traces its
    /// requests ([`IoContext::trace_frontend`]).
    #[inline]
    pub fn completion_stamps(&mut self) -> Option<EngineStamps> {
        let telemetry = self.telemetry.as_deref_mut()?;
        let completing = self.completing;
        let slot = &self.slots[completing.slot as usize];
        Some(EngineStamps {
            accepted: slot.accepted,
            submitted: slot.submitted,
            rung: slot.rung,
            seen: completing.seen,
            queue: completing.queue,
            head: telemetry.take_frontend_head(),
            layers: match completing.layered {
                true => self.layer_spans[completing.slot as usize],
                false => LayerSpans::default(),
            },
        })
    }

    /// A front end answered a request: it is traced if the head sampler kept its engine IO,
    /// it failed, or its `total` passed its volume's tail threshold.
    #[inline]
    pub fn trace_frontend(&mut self, io: &FrontendTrace) {
        if let Some(telemetry) = self.telemetry.as_deref_mut() {
            telemetry.trace_frontend(io);
        }
    }

    /// Reads the telemetry clock (0 without telemetry). Stamps taken here also end the stages
    /// waiting for the reactor's next clock read, so a front end's stamps cost the reactor
    /// none of its own.
    #[inline]
    pub fn stamp(&mut self) -> u64 {
        self.telemetry
            .as_deref_mut()
            .map_or(0, |telemetry| telemetry.stamp())
    }

    /// The last clock read (0 without telemetry): the stamp of anything happening now, to
    /// within one loop iteration.
    #[inline]
    pub fn last_stamp(&self) -> u64 {
        self.telemetry
            .as_deref()
            .map_or(0, |telemetry| telemetry.now)
    }

    /// Records `count` IOs of `volume`/`op` that spent `ticks` each in `stage` (an index of
    /// [`crate::stats::stage`]): for the stages a front end times itself. Nothing without
    /// telemetry.
    #[inline]
    pub fn record_stage(&mut self, volume: VolumeId, op: Op, stage: usize, ticks: u64, count: u64) {
        if let Some(telemetry) = self.telemetry.as_deref_mut() {
            telemetry.record(volume.0, op, stage, ticks, count);
        }
    }

    #[inline]
    pub(crate) fn submit_notify(
        &mut self,
        request: IoRequest,
        notify: Notify,
        accepted: Option<u64>,
        origin: Origin,
    ) -> Result<(), Rejected> {
        let Some(volume) = self.volumes.get(request.volume.0 as usize) else {
            let error = IoError::UnknownVolume(request.volume.0);
            return Err(Rejected {
                request,
                notify,
                error,
            });
        };
        if volume.reactor != self.reactor {
            let error = match volume.is_vacant() {
                true => IoError::UnknownVolume(request.volume.0),
                false => IoError::WrongCore {
                    volume: volume.id.0,
                    core: volume.core,
                },
            };
            return Err(Rejected {
                request,
                notify,
                error,
            });
        }
        let command = match match origin {
            Origin::Client | Origin::Frontend => volume.command(&request),
            Origin::Metadata => volume.metadata_command(&request),
            Origin::Probe => volume.health_command(&request),
        } {
            Ok(command) => command,
            Err(error) => {
                return Err(Rejected {
                    request,
                    notify,
                    error,
                })
            }
        };
        let Some(slot_index) = self.free_slots.pop() else {
            return Err(Rejected {
                request,
                notify,
                error: IoError::Busy,
            });
        };
        let device = volume.device;
        // One check for the layerless, uncontended path: anything else is behind it, out of
        // line, so that the fast path keeps the command in the one place the queue reads it.
        // Metadata and probe IO go straight to the device: they are no client's and pass no
        // layer.
        let direct = matches!(origin, Origin::Metadata | Origin::Probe);
        if self.slow != 0 && !direct {
            if self.waiting & (1 << device) != 0 {
                if let Notify::Task(task) = notify {
                    if !self.take_turn(device, task) {
                        self.free_slots.push(slot_index);
                        return Err(Rejected {
                            request,
                            notify,
                            error: IoError::Busy,
                        });
                    }
                }
            }
            if self.layered && self.detour[request.volume.0 as usize] {
                // A layered IO may need slots for its children (replication's local write,
                // its bitmap writes) before it can complete: clients' IO takes at most half of
                // the slots, so that children always find one.
                if self.free_slots.len() < self.slots.len() / 2 {
                    self.free_slots.push(slot_index);
                    return Err(Rejected {
                        request,
                        notify,
                        error: IoError::Busy,
                    });
                }
                let frontend = origin == Origin::Frontend;
                self.submit_detour(slot_index, &command, request, notify, accepted, frontend);
                return Ok(());
            }
        }
        if self.queues[device].submit(&command, slot_index).is_err() {
            self.free_slots.push(slot_index);
            if let Notify::Task(task) = notify {
                self.wait_turn(device, task);
            }
            return Err(Rejected {
                request,
                notify,
                error: IoError::Busy,
            });
        }
        self.dirty |= 1 << device;
        let slot = &mut self.slots[slot_index as usize];
        if let Some(telemetry) = self.telemetry.as_deref_mut() {
            slot.submitted = telemetry.now;
            slot.accepted = accepted.unwrap_or(telemetry.now);
            self.unrung[device].push(slot_index);
            slot.series = match origin {
                Origin::Probe => Series::probe(request.volume.0, request.op),
                _ => Series::new(request.volume.0, request.op, origin == Origin::Frontend),
            };
            slot.bytes = request.len;
            self.offsets[slot_index as usize] = request.offset;
        }
        slot.notify = notify;
        slot.tag = request.tag;
        slot.buf = request.buf;
        slot.op = request.op;
        Ok(())
    }

    /// Sends an accepted IO in `slot_index` down through its volume's layers, before this
    /// iteration's doorbells.
    #[cold]
    #[inline(never)]
    fn submit_detour(
        &mut self,
        slot_index: u32,
        command: &IoCommand,
        request: IoRequest,
        notify: Notify,
        accepted: Option<u64>,
        frontend: bool,
    ) {
        self.work.down.push((slot_index, 0));
        let slot = &mut self.slots[slot_index as usize];
        if let Some(telemetry) = self.telemetry.as_deref_mut() {
            slot.submitted = telemetry.now;
            slot.accepted = accepted.unwrap_or(telemetry.now);
            slot.rung = telemetry.now;
            slot.series = Series::new(request.volume.0, request.op, frontend);
            slot.bytes = request.len;
            self.offsets[slot_index as usize] = request.offset;
            self.layer_spans[slot_index as usize] = LayerSpans::default();
        }
        slot.notify = notify;
        slot.tag = request.tag;
        slot.buf = request.buf;
        slot.op = request.op;
        self.links[slot_index as usize] = Link {
            from_frontend: frontend,
            below: false,
            origin: 0,
            volume: request.volume.0,
            parent: NO_SLOT,
            children: 0,
            deferred: None,
            command: *command,
        };
    }

    /// A command that came down through its volume's layers completed on its device queue:
    /// it goes up through them once the batch is reaped.
    #[cold]
    #[inline(never)]
    fn reaped_layered(&mut self, slot: u32, status: Status) {
        let result = match status.is_success() {
            true => Ok(()),
            false => Err(IoError::Device {
                op: self.slots[slot as usize].op,
                status,
            }),
        };
        let volume = self.links[slot as usize].volume as usize;
        let depth = self.stacks[volume].len();
        self.work.up.push((slot, depth as u8, result));
    }

    /// Whether `task` may submit to `device` now that tasks wait for it: only the first
    /// waiter may (and its turn is used); anyone else waits behind.
    #[cold]
    fn take_turn(&mut self, device: usize, task: u32) -> bool {
        let waiters = &mut self.waiters[device];
        if waiters.front() == Some(&task) {
            waiters.pop_front();
            if waiters.is_empty() {
                self.waiting &= !(1 << device);
                self.update_slow();
            }
            return true;
        }
        if !waiters.contains(&task) && waiters.len() < MAX_WAITERS {
            waiters.push_back(task);
        }
        false
    }

    /// `task` found `device`'s queue full: it waits for room, first if it had its turn.
    #[cold]
    fn wait_turn(&mut self, device: usize, task: u32) {
        let waiters = &mut self.waiters[device];
        if !waiters.contains(&task) && waiters.len() < MAX_WAITERS {
            waiters.push_front(task);
        }
        self.waiting |= 1 << device;
        self.update_slow();
    }

    /// After the tasks were polled: a first waiter that had a whole poll with room on its
    /// queue and did not submit loses its turn (it stopped, or wants no more), so nobody
    /// behind it waits for ever.
    #[cold]
    fn expire_turns(&mut self) {
        let mut waiting = self.waiting;
        while waiting != 0 {
            let device = waiting.trailing_zeros() as usize;
            waiting &= waiting - 1;
            let queue = &self.queues[device];
            let room = queue.outstanding() < queue.capacity();
            let waiters = &mut self.waiters[device];
            if room && waiters.front() == Some(&self.turn[device]) {
                waiters.pop_front();
            }
            self.turn[device] = waiters.front().copied().unwrap_or(u32::MAX);
            if waiters.is_empty() {
                self.waiting &= !(1 << device);
            }
        }
        self.update_slow();
    }

    /// Recomputes [`IoContext::slow`] after `waiting` or `layered` changed.
    #[inline(always)]
    fn update_slow(&mut self) {
        self.slow = self.waiting | (self.layered as u64) << 63;
    }

    /// What a layer at `depth` is handed while it is called.
    fn layer_ctx(&mut self, now: u64, volume: usize, depth: u8) -> LayerCtx<'_> {
        LayerCtx {
            clock: &self.clock,
            slots: &mut self.slots,
            links: &self.links,
            now,
            depth,
            volume: volume as u32,
            from_frontend: false,
            telemetry: self.telemetry.as_deref_mut(),
            layer_spans: &mut self.layer_spans,
            work: &mut self.work,
            free_slots: self.free_slots.len(),
        }
    }

    /// Applies a control message (between loop iterations).
    fn control(&mut self, control: VolumeControl) {
        match control {
            VolumeControl::SetLayers {
                volume,
                layers,
                path,
                done,
            } => {
                self.set_layers(volume, layers, path);
                let _ = done.send(());
            }
            VolumeControl::Open {
                volume,
                recorders,
                done,
            } => {
                let index = volume.id.0 as usize;
                if index < self.volumes.len() {
                    if let Some(telemetry) = self.telemetry.as_deref_mut() {
                        telemetry.set_volume(index, recorders);
                    }
                    self.routes[index] = (volume.device, IoFlags::NONE);
                    self.volumes[index] = *volume;
                    // A new stack: nothing of a volume that had the slot before stays.
                    self.stacks[index].clear();
                    self.set_layers(VolumeId(index as u32), Vec::new(), VolumePath::default());
                }
                let _ = done.send(());
            }
            VolumeControl::Close { volume, done } => {
                let index = volume.0 as usize;
                let in_flight = self.in_flight_of(volume);
                if in_flight == 0 && self.volumes.get(index).is_some_and(|v| !v.is_vacant()) {
                    // Nothing of it is anywhere: its layers go, with nothing to let go of.
                    let now = self.clock.now();
                    let mut stack = std::mem::take(&mut self.stacks[index]);
                    for (depth, layer) in stack.iter_mut().enumerate() {
                        layer.drain(&mut self.layer_ctx(now, index, depth as u8));
                    }
                    self.set_layers(volume, Vec::new(), VolumePath::default());
                    if let Some(telemetry) = self.telemetry.as_deref_mut() {
                        telemetry.set_volume(index, None);
                    }
                }
                // No more IO of it is taken (IO of tasks on this reactor included).
                if let Some(entry) = self.volumes.get_mut(index) {
                    if in_flight == 0 {
                        *entry = Volume::vacant(volume);
                    }
                }
                let _ = done.send(in_flight);
            }
        }
    }

    /// IOs of `volume` in flight: busy slots whose layered link or telemetry series names it.
    /// (An IO on the layerless path of a reactor without telemetry names no volume: a volume
    /// to be closed has layers, as every replicated volume does.)
    fn in_flight_of(&self, volume: VolumeId) -> usize {
        let mut free = vec![false; self.slots.len()];
        for &slot in &self.free_slots {
            free[slot as usize] = true;
        }
        (0..self.slots.len())
            .filter(|&slot| {
                !free[slot]
                    && (self.links[slot].volume == volume.0
                        || (self.telemetry.is_some()
                            && self.slots[slot].series.volume() == volume.0))
            })
            .count()
    }

    /// Replaces a volume's layers; what the old ones held restarts at the new stack's top.
    fn set_layers(&mut self, volume: VolumeId, layers: Vec<Box<dyn Layer>>, path: VolumePath) {
        let index = volume.0 as usize;
        // A slot with no volume (removed while the change was on its way) takes no layers.
        if self.volumes.get(index).is_none_or(|v| v.is_vacant()) {
            return;
        }
        let Some(stack) = self.stacks.get_mut(index) else {
            return;
        };
        let mut layers = layers;
        let mut old = std::mem::take(stack);
        // A persistent layer (replication) stays, unless the new stack brings its own for its
        // place; it moves to its place among the new layers, and its children in flight with it.
        let kept = old.iter().position(|layer| {
            layer.persistent()
                && !layers
                    .iter()
                    .any(|new| new.persistent() && new.layer() == layer.layer())
        });
        // What the old layers hold is released from where each stood (below the persistent
        // layer: on to its children's way down).
        let now = self.clock.now();
        for (depth, layer) in old.iter_mut().enumerate() {
            if Some(depth) != kept {
                layer.drain(&mut self.layer_ctx(now, index, depth as u8));
            }
        }
        let moved = kept.map(|from| {
            let layer = old.remove(from);
            let to = layers
                .iter()
                .take_while(|new| new.layer() <= layer.layer())
                .count();
            layers.insert(to, layer);
            (from, to)
        });
        self.stacks[index] = layers;
        // Everything of this volume waiting between layers starts again at the top, but what
        // is below the persistent layer (its children) goes on from below its new place.
        for entry in self.work.down.iter_mut() {
            if self.links[entry.0 as usize].volume != volume.0 {
                continue;
            }
            match moved {
                Some((from, to)) if entry.1 as usize > from => entry.1 = to as u8 + 1,
                _ => entry.1 = 0,
            }
        }
        if let Some((from, to)) = moved {
            for entry in self.work.up.iter_mut() {
                if self.links[entry.0 as usize].volume == volume.0 && entry.1 as usize > from {
                    entry.1 = to as u8 + 1;
                }
            }
            for link in self.links.iter_mut() {
                if link.volume == volume.0 && link.parent != NO_SLOT && link.origin as usize == from
                {
                    link.origin = to as u8;
                }
            }
        }
        let device = self.volumes[index].device;
        let queue = match path.device_stub {
            true if self.devices + device < self.queues.len() => self.devices + device,
            _ => device,
        };
        let flags = match path.media_stub {
            true => IoFlags::NO_DATA,
            false => IoFlags::NONE,
        };
        // Commands already on the old queue complete there: a slot remembers nothing of its
        // queue, and each queue's completions carry their own slots.
        self.routes[index] = (queue, flags);
        self.detour[index] = !self.stacks[index].is_empty() || !path.is_direct();
        self.layered = self.detour.iter().any(|&detour| detour);
        self.update_slow();
        self.active_queues = if self.routes.iter().any(|&(queue, _)| queue >= self.devices) {
            self.queues.len()
        } else {
            self.devices
        };
    }

    /// Takes the IOs waiting between layers down, through each layer, to their device queues
    /// (before the doorbells). Bounded: IOs a layer releases or issues during this walk wait
    /// for the next iteration.
    fn run_layers(&mut self) {
        if self.work.children.is_empty() && self.work.down.is_empty() && self.work.own.is_empty() {
            return;
        }
        self.start_children();
        let mut batch = std::mem::take(&mut self.down_batch);
        std::mem::swap(&mut batch, &mut self.work.down);
        for &(slot, depth) in batch.iter() {
            self.descend(slot, depth);
        }
        batch.clear();
        self.down_batch = batch;
        // Children issued on this walk get their slots now, so a parent completed on the same
        // walk already counts them (they go down on the next iteration).
        self.start_children();
    }

    /// Gives the children layers issued their slots; they start below their layer.
    fn start_children(&mut self) {
        while let Some((volume, depth, io)) = self.work.own.pop() {
            self.start_own(volume, depth, io);
        }
        while let Some((parent, depth, command)) = self.work.children.pop() {
            let Some(child) = self.free_slots.pop() else {
                // LayerCtx::issue counted free slots; a child without one fails its parent's
                // layer, never the reactor.
                self.work.up.push((parent, depth, Err(IoError::Busy)));
                continue;
            };
            let parent_slot = &self.slots[parent as usize];
            let (accepted, submitted, series) = (
                parent_slot.accepted,
                parent_slot.submitted,
                parent_slot.series,
            );
            let parent_link = &self.links[parent as usize];
            let (volume, from_frontend) = (parent_link.volume, parent_link.from_frontend);
            let slot = &mut self.slots[child as usize];
            slot.notify = Notify::Nobody;
            slot.tag = 0;
            slot.buf = None;
            slot.op = command.op;
            slot.accepted = accepted;
            slot.submitted = submitted;
            slot.rung = submitted;
            slot.series = series;
            slot.bytes = 0;
            self.links[child as usize] = Link {
                from_frontend,
                below: false,
                origin: depth,
                volume,
                parent,
                children: 0,
                deferred: None,
                command,
            };
            self.links[parent as usize].children += 1;
            self.work.down.push((child, depth + 1));
        }
    }

    /// Gives a layer's own IO its slot; it starts below its layer.
    fn start_own(&mut self, volume: u32, depth: u8, io: OwnIo) {
        let OwnIo {
            op,
            slba,
            blocks,
            fua,
            tag,
            buf,
        } = io;
        let Some(slot_index) = self.free_slots.pop() else {
            // LayerCtx::issue_own counted free slots: cannot happen; the layer hears of it.
            let (depth, volume) = (depth as usize, volume as usize);
            let mut stack = std::mem::take(&mut self.stacks[volume]);
            let mut ctx = self.layer_ctx(self.layer_now, volume, depth as u8);
            if let Some(layer) = stack.get_mut(depth) {
                layer.own_done(&mut ctx, tag, Err(IoError::Busy), buf);
            }
            self.stacks[volume] = stack;
            return;
        };
        let nsid = self.volumes[volume as usize].nsid;
        let command = IoCommand {
            op,
            nsid,
            slba,
            blocks,
            data: buf.as_ref().map(DataRange::of),
            flags: match fua {
                true => IoFlags::FUA,
                false => IoFlags::NONE,
            },
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.notify = Notify::Nobody;
        slot.tag = tag;
        slot.buf = buf;
        slot.op = op;
        slot.bytes = 0;
        self.links[slot_index as usize] = Link {
            from_frontend: false,
            below: false,
            origin: depth,
            volume,
            parent: OWN_SLOT,
            children: 0,
            deferred: None,
            command,
        };
        self.work.down.push((slot_index, depth + 1));
    }

    /// Walks one IO down from layer `depth` until a layer keeps or completes it, or it reaches
    /// its device queue. A full queue leaves it waiting at the bottom for the next iteration.
    fn descend(&mut self, slot: u32, depth: u8) {
        let link = &self.links[slot as usize];
        let (volume, mut command, from_frontend) =
            (link.volume as usize, link.command, link.from_frontend);
        let mut stack = std::mem::take(&mut self.stacks[volume]);
        let mut depth = depth as usize;
        loop {
            if depth >= stack.len() {
                let (device, flags) = self.routes[volume];
                if device >= self.devices {
                    // The device stub has one namespace.
                    command.nsid = 1;
                }
                command.flags = IoFlags(command.flags.0 | flags.0);
                if self.queues[device]
                    .submit(&command, slot | LAYERED_COOKIE)
                    .is_err()
                {
                    self.work.down.push((slot, stack.len() as u8));
                } else {
                    self.links[slot as usize].below = true;
                    self.dirty |= 1 << device;
                    if self.telemetry.is_some() {
                        self.unrung[device].push(slot);
                    }
                }
                break;
            }
            if !from_frontend && stack[depth].layer() == LayerName::Frontend {
                // IOs from inside the node (a workload, a canary) never crossed a front end.
                depth += 1;
                continue;
            }
            if let Some(span) = self
                .layer_spans
                .get_mut(slot as usize)
                .and_then(|spans| spans.spans.get_mut(depth))
            {
                *span = (stack[depth].layer().index() as u8, self.layer_now, 0);
            }
            let mut ctx = self.layer_ctx(self.layer_now, volume, depth as u8);
            ctx.from_frontend = from_frontend;
            match stack[depth].submit(&mut ctx, slot, &command) {
                Down::Pass => depth += 1,
                Down::Hold => break,
                Down::Complete(result) => {
                    self.work.up.push((slot, depth as u8, result));
                    break;
                }
            }
        }
        self.stacks[volume] = stack;
    }

    /// Walks one completion up from below layer `depth`. Returns the IO when it leaves the
    /// top (the client's completion is due), `None` when a layer kept it or it was a child.
    fn ascend(
        &mut self,
        slot: u32,
        depth: u8,
        mut result: Result<(), IoError>,
    ) -> Option<Result<(), IoError>> {
        let link = &self.links[slot as usize];
        let (volume, parent, origin, from_frontend) = (
            link.volume as usize,
            link.parent,
            link.origin as usize,
            link.from_frontend,
        );
        let mut stack = std::mem::take(&mut self.stacks[volume]);
        let mut depth = (depth as usize).min(stack.len());
        let outcome = loop {
            if depth == 0 {
                break Some(result);
            }
            depth -= 1;
            if let Some(span) = self
                .layer_spans
                .get_mut(slot as usize)
                .and_then(|spans| spans.spans.get_mut(depth))
            {
                span.2 = self.layer_now;
            }
            if parent == OWN_SLOT && depth == origin {
                let tag = self.slots[slot as usize].tag;
                let buf = self.slots[slot as usize].buf.take();
                let mut ctx = self.layer_ctx(self.layer_now, volume, depth as u8);
                stack[depth].own_done(&mut ctx, tag, result, buf);
                self.links[slot as usize].parent = NO_SLOT;
                self.free_slots.push(slot);
                break None;
            }
            let mut ctx = self.layer_ctx(self.layer_now, volume, depth as u8);
            if parent != NO_SLOT && depth == origin {
                stack[depth].child_done(&mut ctx, parent, slot, result);
                self.links[slot as usize].parent = NO_SLOT;
                self.free_slots.push(slot);
                let parent_link = &mut self.links[parent as usize];
                parent_link.children -= 1;
                if parent_link.children == 0 {
                    if let Some((depth, result)) = parent_link.deferred.take() {
                        // Its last child is done: the completion a layer made goes on up.
                        self.work.up.push((parent, depth, result));
                    }
                }
                break None;
            }
            if !from_frontend && stack[depth].layer() == LayerName::Frontend {
                continue;
            }
            if stack[depth].complete(&mut ctx, slot, &mut result) == Up::Hold {
                break None;
            }
        };
        self.stacks[volume] = stack;
        outcome
    }

    /// Lets layers that hold IOs release what is due. Returns whether any did anything.
    fn poll_layers(&mut self) -> bool {
        // With telemetry, the layers' clock read is also a stamp: it ends the `complete`
        // stage of what the last iteration completed, which would otherwise wait for the
        // next doorbell or reap, as long as a layer holds the next IO.
        self.layer_now = match self.telemetry.as_deref_mut() {
            Some(telemetry) => telemetry.stamp(),
            None => self.clock.now(),
        };
        let mut work = false;
        for volume in 0..self.stacks.len() {
            if self.stacks[volume].is_empty() {
                continue;
            }
            let mut stack = std::mem::take(&mut self.stacks[volume]);
            for (depth, layer) in stack.iter_mut().enumerate() {
                if layer.holding() > 0 || layer.polled() {
                    let mut ctx = self.layer_ctx(self.layer_now, volume, depth as u8);
                    work |= layer.poll(&mut ctx);
                }
            }
            self.stacks[volume] = stack;
        }
        work
    }

    /// Whether every layer polled for its own sake names a descriptor to sleep on.
    fn layers_can_sleep(&self) -> bool {
        !self.layered
            || self
                .stacks
                .iter()
                .flatten()
                .all(|layer| !layer.polled() || layer.wake_fd().is_some())
    }

    /// IOs held by layers or waiting between them.
    fn in_layers(&self) -> usize {
        let between = self.work.down.len() + self.work.up.len();
        if !self.layered {
            // No stack holds anything: the idle loop need not walk every volume's.
            return between;
        }
        between
            + self
                .stacks
                .iter()
                .flatten()
                .map(|layer| layer.holding())
                .sum::<usize>()
    }

    /// Rings every queue that has new commands.
    #[inline]
    fn ring(&mut self) {
        if self.layered || !self.work.down.is_empty() {
            self.run_layers();
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        if dirty == 0 {
            return;
        }
        // One clock read for the whole round of doorbells.
        let now = self
            .telemetry
            .as_deref_mut()
            .map(|telemetry| telemetry.stamp());
        while dirty != 0 {
            let device = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            self.queues[device].ring();
            if let (Some(telemetry), Some(now)) = (self.telemetry.as_deref_mut(), now) {
                let unrung = &mut self.unrung[device];
                for &slot in unrung.iter() {
                    self.slots[slot as usize].rung = now;
                }
                telemetry.rang(device, unrung.len(), now);
                unrung.clear();
            }
        }
    }

    fn outstanding(&self) -> usize {
        self.queues.iter().map(|queue| queue.outstanding()).sum()
    }

    /// Waits up to `timeout` for a completion when exactly one queue has IO in flight and it
    /// can wait; false when the reactor must keep polling.
    fn wait_for_completion(&mut self, timeout: Duration) -> bool {
        let mut busy = self
            .queues
            .iter_mut()
            .filter(|queue| queue.outstanding() > 0);
        match (busy.next(), busy.next()) {
            (Some(queue), None) => queue.wait(timeout),
            _ => false,
        }
    }
}

/// Which IO's completion the reactor is delivering, and when it was seen.
#[derive(Clone, Copy, Default)]
struct Completing {
    seen: u64,
    slot: u32,
    queue: u16,
    /// It came up through its volume's layers: [`IoContext::layer_spans`] holds its spans.
    layered: bool,
}

pub(crate) struct Reactor {
    io: IoContext,
    tasks: Vec<Option<Box<dyn Task>>>,
    shared: Arc<ReactorShared>,
    /// A request from another thread that found the device queue full. At most one: while
    /// it waits, nothing more is taken from the inbound ring, so the ring fills and submitters
    /// see `Busy` (back-pressure reaches them; nothing queues on the heap).
    backlog: Option<(IoRequest, Notify, u64)>,
    reaped: Box<[Completed; REAP_BATCH]>,
    poll: PollMode,
    idle_spin: Duration,
    /// What a sleeping reactor waits on (kept to avoid an allocation per sleep).
    sleep_fds: Vec<libc::pollfd>,
}

impl Reactor {
    pub fn new(
        io: IoContext,
        shared: Arc<ReactorShared>,
        poll: PollMode,
        idle_spin: Duration,
    ) -> Self {
        Self {
            io,
            tasks: Vec::new(),
            shared,
            backlog: None,
            reaped: Box::new([Completed::default(); REAP_BATCH]),
            poll,
            idle_spin,
            sleep_fds: Vec::new(),
        }
    }

    /// Runs until stopped; then finishes the IO in flight (up to `drain_timeout`) and returns.
    pub fn run(mut self, drain_timeout: Duration) {
        let mut idle_since: Option<Instant> = None;
        loop {
            let stopping = self.shared.stop.load(Ordering::Acquire);
            if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
                if !self.tasks.is_empty() || !self.shared.inbound.is_empty() {
                    telemetry.refresh_if_idle();
                }
            }
            let mut work = self.retry_backlog();
            work += self.take_inbound(stopping);
            if !stopping {
                work += self.poll_tasks();
            }
            if self.io.layered {
                work += self.io.poll_layers() as usize;
            }
            self.io.ring();
            work += self.reap();
            if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
                telemetry.end_iteration();
            }
            if stopping {
                break;
            }
            if work > 0 || self.backlog.is_some() || self.io.in_layers() > 0 {
                idle_since = None;
            } else if self.poll != PollMode::Busy {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if self.io.in_flight() > 0 {
                    // Only waiting for a device: where it can, wait in the kernel rather than
                    // spin, leaving the core to the kernel's completion work.
                    if since.elapsed() >= DEVICE_WAIT_SPIN
                        && self.io.wait_for_completion(DEVICE_WAIT_TIMEOUT)
                    {
                        idle_since = None;
                    }
                } else if since.elapsed() >= self.idle_spin
                    && self
                        .tasks
                        .iter()
                        .flatten()
                        .all(|task| task.wake_fd().is_some())
                    && self.io.layers_can_sleep()
                {
                    self.park();
                    idle_since = None;
                    continue;
                }
            }
            if work == 0 && self.poll == PollMode::Shared {
                // Nothing done this loop (idle, or only waiting: a layer holds IO for a peer's
                // answer, a device is busy or full): whoever else is runnable on this core
                // goes first.
                std::thread::yield_now();
            }
        }
        self.drain(drain_timeout);
    }

    fn park(&mut self) {
        // Readers see exact counters while the reactor sleeps.
        if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
            telemetry.stamp();
            telemetry.end_iteration();
            telemetry.publish();
        }
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence a submitter issues between its push and its look at `sleeping`:
        // either it sees us sleeping and wakes us, or we see its message here.
        fence(Ordering::SeqCst);
        if self.shared.inbound.is_empty() && !self.shared.stop.load(Ordering::Acquire) {
            // Sleep until woken, or until a task's descriptor has work. Bounded, so that even a
            // lost wake-up costs at most this long.
            let mut fds = std::mem::take(&mut self.sleep_fds);
            fds.clear();
            let watch = |fd: BorrowedFd<'_>| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            fds.push(watch(self.shared.wake.as_fd()));
            fds.extend(
                self.tasks
                    .iter()
                    .flatten()
                    .filter_map(|task| task.wake_fd())
                    .map(watch),
            );
            fds.extend(
                self.io
                    .stacks
                    .iter()
                    .flatten()
                    .filter_map(|layer| layer.wake_fd())
                    .map(watch),
            );
            // SAFETY: `fds` holds `len` initialised pollfd entries of descriptors that stay
            // open during the call (the shared eventfd and the tasks' own).
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
            self.sleep_fds = fds;
            self.shared.wake.clear();
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        // Settings changed while it slept apply from its first IO on.
        if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
            telemetry.take_trace_settings();
        }
    }

    fn take_inbound(&mut self, stopping: bool) -> usize {
        let mut taken = 0;
        // While requests wait for a device queue, the rest stay in the inbound ring: it fills,
        // and submitters get `Busy` (back-pressure) instead of the backlog growing.
        while taken < INBOUND_BATCH && (stopping || self.backlog.is_none()) {
            let Some(message) = self.shared.inbound.pop() else {
                break;
            };
            taken += 1;
            match message {
                Message::Io(request, notify, _) if stopping => {
                    deliver_error(notify, request, IoError::Stopped)
                }
                Message::Io(request, notify, accepted) => {
                    self.submit_or_backlog(request, notify, accepted);
                }
                Message::Spawn(task) => {
                    if !stopping {
                        self.tasks.push(Some(task));
                    }
                }
                Message::Control(control) => self.io.control(control),
            }
        }
        taken
    }

    fn submit_or_backlog(&mut self, request: IoRequest, notify: Notify, accepted: u64) -> bool {
        let stamp = (self.io.telemetry.is_some()).then_some(accepted);
        match self
            .io
            .submit_notify(request, notify, stamp, Origin::Client)
        {
            Ok(()) => true,
            Err(Rejected {
                request,
                notify,
                error: IoError::Busy,
            }) => {
                debug_assert!(self.backlog.is_none(), "one request waits at most");
                self.backlog = Some((request, notify, accepted));
                false
            }
            Err(Rejected {
                request,
                notify,
                error,
            }) => {
                deliver_error(notify, request, error);
                true
            }
        }
    }

    fn retry_backlog(&mut self) -> usize {
        match self.backlog.take() {
            Some((request, notify, accepted)) => {
                self.submit_or_backlog(request, notify, accepted) as usize
            }
            None => 0,
        }
    }

    fn poll_tasks(&mut self) -> usize {
        let mut work = 0;
        for index in 0..self.tasks.len() {
            if let Some(task) = self.tasks[index].as_mut() {
                self.io.current_task = index as u32;
                work += task.poll(&mut self.io) as usize;
            }
        }
        if self.io.waiting != 0 {
            self.io.expire_turns();
        }
        // Drop finished tasks; keep indices stable while any might still get completions.
        if self.io.in_flight() == 0 {
            let before = self.tasks.len();
            self.tasks
                .retain(|task| task.as_ref().is_some_and(|task| !task.finished()));
            if self.tasks.len() != before {
                // Indices moved: no waiter's turn means what it meant.
                for waiters in self.io.waiters.iter_mut() {
                    waiters.clear();
                }
                self.io.waiting = 0;
                self.io.update_slow();
            }
        }
        work
    }

    #[inline]
    fn reap(&mut self) -> usize {
        let mut total = 0;
        for device in 0..self.io.active_queues {
            let count = self.io.queues[device].reap(&mut self.reaped[..]);
            if count == 0 {
                continue;
            }
            total += count;
            // One clock read for the batch: when its completions were seen.
            let seen = self
                .io
                .telemetry
                .as_deref_mut()
                .map(|telemetry| telemetry.stamp());
            for completed in &self.reaped[..count] {
                let cookie = completed.cookie;
                if cookie & LAYERED_COOKIE != 0 {
                    self.io
                        .reaped_layered(cookie & !LAYERED_COOKIE, completed.status);
                    continue;
                }
                finish_io!(
                    self.io,
                    self.tasks,
                    cookie,
                    seen,
                    ok: completed.status.is_success(),
                    status: status_word(completed.status),
                    queue: device as u16,
                    layered: false,
                    result: |op| match completed.status.is_success() {
                        true => Ok(()),
                        false => Err(IoError::Device {
                            op,
                            status: completed.status,
                        }),
                    }
                );
            }
            if let (Some(telemetry), Some(seen)) = (self.io.telemetry.as_deref_mut(), seen) {
                telemetry.reaped(device, count, seen);
            }
        }
        if !self.io.work.up.is_empty() {
            total += self.complete_layers();
        }
        total
    }

    /// Takes completions up through the layers; those that leave the top are finished.
    fn complete_layers(&mut self) -> usize {
        let seen = self
            .io
            .telemetry
            .as_deref_mut()
            .map(|telemetry| telemetry.stamp());
        if let Some(seen) = seen {
            // The layers' walk up happens now: their spans end here, not at the iteration's
            // start.
            self.io.layer_now = seen;
        }
        let mut done = 0;
        // Bounded: completions layers make during this walk wait for the next iteration.
        let mut batch = std::mem::take(&mut self.io.up_batch);
        std::mem::swap(&mut batch, &mut self.io.work.up);
        for (slot, depth, result) in batch.drain(..) {
            done += 1;
            let link = &mut self.io.links[slot as usize];
            if link.children > 0 {
                // Completed by a layer while its children still run: their commands may read
                // or write its buffer, so it goes up when the last of them is done.
                link.deferred = Some((depth, result));
                continue;
            }
            if let Some(result) = self.io.ascend(slot, depth, result) {
                self.finish_layered(slot, result, seen);
            }
        }
        if let (Some(telemetry), Some(seen)) = (self.io.telemetry.as_deref_mut(), seen) {
            telemetry.layers_completed(seen);
        }
        self.io.up_batch = batch;
        done
    }

    /// Finishes an IO that came up through the layers (out of line: the reap loop keeps its
    /// own inline copy of `finish_io!`).
    #[inline(never)]
    fn finish_layered(&mut self, cookie: u32, result: Result<(), IoError>, seen: Option<u64>) {
        finish_io!(
            self.io,
            self.tasks,
            cookie,
            seen,
            ok: result.is_ok(),
            status: match &result {
                Ok(()) => 0,
                Err(IoError::Device { status, .. }) => status_word(*status),
                Err(_) => u16::MAX,
            },
            queue: u16::MAX,
            layered: true,
            result: |_op| result
        );
    }

    /// Finishes what is in flight, bounded by `timeout`; refuses what is still queued.
    fn drain(&mut self, timeout: Duration) {
        let started = Instant::now();
        while (self.io.outstanding() > 0 || self.io.in_layers() > 0) && started.elapsed() < timeout
        {
            if self.io.layered {
                self.io.poll_layers();
            }
            self.io.ring();
            if self.reap() == 0 {
                std::hint::spin_loop();
            }
        }
        if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
            telemetry.stamp();
            telemetry.end_iteration();
            telemetry.publish();
        }
        if self.io.outstanding() > 0 {
            tracing::warn!(
                core = self.io.core,
                in_flight = self.io.outstanding(),
                "IO still in flight after {timeout:?} at shutdown"
            );
        }
        if let Some((request, notify, _)) = self.backlog.take() {
            deliver_error(notify, request, IoError::Stopped);
        }
        while let Some(message) = self.shared.inbound.pop() {
            match message {
                Message::Io(request, notify, _) => deliver_error(notify, request, IoError::Stopped),
                Message::Control(control) => self.io.control(control),
                Message::Spawn(_) => {}
            }
        }
    }
}

/// An NVMe status as one word for a trace record: status code type << 8 | status code.
fn status_word(status: Status) -> u16 {
    (status.sct as u16) << 8 | status.sc as u16
}

fn deliver_error(notify: Notify, request: IoRequest, error: IoError) {
    deliver(
        notify,
        IoCompletion {
            tag: request.tag,
            result: Err(error),
            buf: request.buf,
        },
    );
}

fn deliver(notify: Notify, completion: IoCompletion) {
    match notify {
        Notify::Channel(sender) => {
            // A receiver that went away no longer wants the answer.
            let _ = sender.send(completion);
        }
        Notify::Callback(callback) => callback(completion),
        Notify::Task(_) | Notify::Nobody => {}
    }
}

/// Pins the calling thread to `core`.
pub(crate) fn pin_to_core(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes a bit inside `set`; core < CPU_SETSIZE is checked by config
    // validation (cores must exist on this machine).
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
