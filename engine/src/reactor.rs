//! Reactors: one pinned thread per configured core, never blocking on the IO path.
//!
//! Each loop iteration, bounded in every step:
//! 1. takes up to [`INBOUND_BATCH`] messages from its inbound ring (requests from other
//!    threads, tasks to run here), and retries requests that found the device queue full;
//! 2. polls its tasks (reactor-local workloads that submit without any cross-core hop);
//! 3. rings the doorbell of every queue that got new commands, once per batch;
//! 4. reaps up to [`REAP_BATCH`] completions per queue and hands each to whoever asked for it.
//!
//! Per-IO state lives in a slot array allocated at start (one slot per command the queues can
//! hold); submitting takes a slot from a free stack and completing returns it. Nothing on this
//! path allocates or takes a lock.
//!
//! In `adaptive` poll mode a reactor with nothing in flight and nothing to do parks after a
//! short spin; submitters unpark it. One whose only work is IO in flight on a single queue that
//! can notify (io_uring) waits in the kernel for a completion instead of spinning, leaving the
//! core to the kernel's completion work; polled queues (mem, later VFIO) keep being polled.
//! `busy` mode never parks or waits, as SPDK's reactors.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::config::PollMode;
use crate::dma::DmaBuf;
use crate::driver::{IoQueue, Op};
use crate::nvme::Completed;
use crate::stats::{op_index, CoreTelemetry};
use crate::volume::{IoCompletion, IoError, IoRequest, Notify, Volume};

/// Inbound messages taken per loop iteration.
pub const INBOUND_BATCH: usize = 64;
/// Completions reaped per queue per loop iteration.
pub const REAP_BATCH: usize = 64;
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
}

/// What other threads share with one reactor.
pub(crate) struct ReactorShared {
    pub inbound: ArrayQueue<Message>,
    pub sleeping: AtomicBool,
    pub stop: AtomicBool,
}

impl ReactorShared {
    pub fn new(capacity: usize) -> Self {
        Self {
            inbound: ArrayQueue::new(capacity),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }
}

struct Slot {
    notify: Notify,
    tag: u64,
    buf: Option<DmaBuf>,
    op: Op,
    /// Stage stamps (telemetry only): accepted by the engine, submitted to the device queue,
    /// published by a doorbell.
    accepted: u64,
    submitted: u64,
    rung: u64,
    volume: u32,
    bytes: u64,
}

/// A reactor's IO state: its device queues and per-IO slots. Tasks submit through it.
pub struct IoContext {
    reactor: usize,
    core: usize,
    volumes: Arc<[Volume]>,
    /// One queue per device, indexed like the engine's device table.
    queues: Vec<Box<dyn IoQueue>>,
    /// Bit d set: device d's queue has commands written but not yet rung.
    dirty: u64,
    slots: Box<[Slot]>,
    free_slots: Vec<u32>,
    /// The task being polled or completed, so its submissions come back to it.
    current_task: u32,
    telemetry: Option<Box<CoreTelemetry>>,
    /// Per device (telemetry only): slots written since the last doorbell, stamped when it
    /// rings. Bounded by the queue's capacity.
    unrung: Vec<Vec<u32>>,
}

impl IoContext {
    /// At most this many devices per node (one bit each in the doorbell mask).
    pub const MAX_DEVICES: usize = 64;

    pub(crate) fn new(
        reactor: usize,
        core: usize,
        volumes: Arc<[Volume]>,
        queues: Vec<Box<dyn IoQueue>>,
        telemetry: Option<Box<CoreTelemetry>>,
    ) -> Self {
        assert!(
            queues.len() <= Self::MAX_DEVICES,
            "at most {} devices",
            Self::MAX_DEVICES
        );
        let capacity: usize = queues.iter().map(|queue| queue.capacity()).sum();
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
                volume: 0,
                bytes: 0,
            })
            .collect();
        Self {
            reactor,
            core,
            volumes,
            dirty: 0,
            queues,
            slots,
            free_slots: (0..capacity as u32).rev().collect(),
            current_task: u32::MAX,
            unrung,

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

    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
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
        self.submit_notify(request, Notify::Task(task), None)
    }

    #[inline]
    pub(crate) fn submit_notify(
        &mut self,
        request: IoRequest,
        notify: Notify,
        accepted: Option<u64>,
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
            let error = IoError::WrongCore {
                volume: volume.id.0,
                core: volume.core,
            };
            return Err(Rejected {
                request,
                notify,
                error,
            });
        }
        let command = match volume.command(&request) {
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
        if self.queues[device].submit(&command, slot_index).is_err() {
            self.free_slots.push(slot_index);
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
            slot.volume = request.volume.0;
            slot.bytes = request.len;
        }
        slot.notify = notify;
        slot.tag = request.tag;
        slot.buf = request.buf;
        slot.op = request.op;
        Ok(())
    }

    /// Rings every queue that has new commands.
    #[inline]
    fn ring(&mut self) {
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

pub(crate) struct Reactor {
    io: IoContext,
    tasks: Vec<Option<Box<dyn Task>>>,
    shared: Arc<ReactorShared>,
    /// Requests from other threads that found the device queue full, in arrival order.
    /// Bounded by the inbound ring's capacity: they came from it.
    backlog: VecDeque<(IoRequest, Notify, u64)>,
    reaped: Box<[Completed; REAP_BATCH]>,
    poll: PollMode,
    idle_spin: Duration,
}

impl Reactor {
    pub fn new(
        io: IoContext,
        shared: Arc<ReactorShared>,
        poll: PollMode,
        idle_spin: Duration,
    ) -> Self {
        let backlog = VecDeque::with_capacity(shared.inbound.capacity());
        Self {
            io,
            tasks: Vec::new(),
            shared,
            backlog,
            reaped: Box::new([Completed::default(); REAP_BATCH]),
            poll,
            idle_spin,
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
            let mut work = self.take_inbound(stopping);
            work += self.retry_backlog();
            if !stopping {
                work += self.poll_tasks();
            }
            self.io.ring();
            work += self.reap();
            if let Some(telemetry) = self.io.telemetry.as_deref_mut() {
                telemetry.end_iteration();
            }
            if stopping {
                break;
            }
            if work > 0 || !self.backlog.is_empty() {
                idle_since = None;
                continue;
            }
            if self.poll == PollMode::Adaptive {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if self.io.in_flight() > 0 {
                    // Only waiting for a device: where it can, wait in the kernel rather than
                    // spin, leaving the core to the kernel's completion work.
                    if since.elapsed() >= DEVICE_WAIT_SPIN
                        && self.io.wait_for_completion(DEVICE_WAIT_TIMEOUT)
                    {
                        idle_since = None;
                    }
                } else if self.tasks.is_empty() && since.elapsed() >= self.idle_spin {
                    self.park();
                    idle_since = None;
                }
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
        // either it sees us sleeping and unparks, or we see its message here.
        fence(Ordering::SeqCst);
        if self.shared.inbound.is_empty() && !self.shared.stop.load(Ordering::Acquire) {
            // Bounded, so that even a lost wake-up costs at most this long.
            std::thread::park_timeout(Duration::from_millis(10));
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }

    fn take_inbound(&mut self, stopping: bool) -> usize {
        let mut taken = 0;
        while taken < INBOUND_BATCH {
            let Some(message) = self.shared.inbound.pop() else {
                break;
            };
            taken += 1;
            match message {
                Message::Io(request, notify, _) if stopping => {
                    deliver_error(notify, request, IoError::Stopped)
                }
                Message::Io(request, notify, accepted) => {
                    if self.backlog.is_empty() {
                        self.submit_or_backlog(request, notify, accepted);
                    } else {
                        self.backlog.push_back((request, notify, accepted));
                    }
                }
                Message::Spawn(task) => {
                    if !stopping {
                        self.tasks.push(Some(task));
                    }
                }
            }
        }
        taken
    }

    fn submit_or_backlog(&mut self, request: IoRequest, notify: Notify, accepted: u64) -> bool {
        let stamp = (self.io.telemetry.is_some()).then_some(accepted);
        match self.io.submit_notify(request, notify, stamp) {
            Ok(()) => true,
            Err(Rejected {
                request,
                notify,
                error: IoError::Busy,
            }) => {
                self.backlog.push_back((request, notify, accepted));
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
        let mut submitted = 0;
        while let Some((request, notify, accepted)) = self.backlog.pop_front() {
            if !self.submit_or_backlog(request, notify, accepted) {
                // It went to the back: put it in front again to keep arrival order.
                let last = self.backlog.pop_back().expect("just pushed");
                self.backlog.push_front(last);
                break;
            }
            submitted += 1;
        }
        submitted
    }

    fn poll_tasks(&mut self) -> usize {
        let mut work = 0;
        for index in 0..self.tasks.len() {
            if let Some(task) = self.tasks[index].as_mut() {
                self.io.current_task = index as u32;
                work += task.poll(&mut self.io) as usize;
            }
        }
        // Drop finished tasks; keep indices stable while any might still get completions.
        if self.io.in_flight() == 0 {
            self.tasks
                .retain(|task| task.as_ref().is_some_and(|task| !task.finished()));
        }
        work
    }

    #[inline]
    fn reap(&mut self) -> usize {
        let mut total = 0;
        for device in 0..self.io.queues.len() {
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
                let slot = &mut self.io.slots[completed.cookie as usize];
                if let (Some(telemetry), Some(seen)) = (self.io.telemetry.as_deref_mut(), seen) {
                    telemetry.completed(
                        slot.volume,
                        op_index(slot.op),
                        slot.bytes,
                        completed.status.is_success(),
                        slot.accepted,
                        slot.submitted,
                        slot.rung,
                        seen,
                    );
                }
                let notify = std::mem::replace(&mut slot.notify, Notify::Nobody);
                let (tag, buf, op) = (slot.tag, slot.buf.take(), slot.op);
                self.io.free_slots.push(completed.cookie);
                let result = match completed.status.is_success() {
                    true => Ok(()),
                    false => Err(IoError::Device {
                        op,
                        status: completed.status,
                    }),
                };
                // The completion is built in the call itself: a completion assembled first and
                // then moved costs a store-forwarding stall per IO (measured: about 4 ns).
                match notify {
                    Notify::Task(index) => {
                        if let Some(Some(task)) = self.tasks.get_mut(index as usize) {
                            self.io.current_task = index;
                            task.complete(&mut self.io, IoCompletion { tag, result, buf });
                        }
                    }
                    other => deliver(other, IoCompletion { tag, result, buf }),
                }
            }
            if let (Some(telemetry), Some(seen)) = (self.io.telemetry.as_deref_mut(), seen) {
                telemetry.reaped(device, count, seen);
            }
        }
        total
    }

    /// Finishes what is in flight, bounded by `timeout`; refuses what is still queued.
    fn drain(&mut self, timeout: Duration) {
        let started = Instant::now();
        while self.io.outstanding() > 0 && started.elapsed() < timeout {
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
        while let Some((request, notify, _)) = self.backlog.pop_front() {
            deliver_error(notify, request, IoError::Stopped);
        }
        while let Some(message) = self.shared.inbound.pop() {
            if let Message::Io(request, notify, _) = message {
                deliver_error(notify, request, IoError::Stopped);
            }
        }
    }
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
