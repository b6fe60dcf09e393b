//! A volume's health probes, run as a task on the reactor that owns the volume, in the
//! volume's health area (the end of its metadata, never the clients' data):
//! - the **canary**: a known-shape workload, a 4 KiB write then a read of it back at queue
//!   depth 1 every period (10 ms by default), each read compared with what was written;
//! - the **smoke write**: about once a second a 4 KiB write to the area's first block, read
//!   back and compared, timed from submission to the read's completion ("can we write a
//!   file").
//!
//! Their IOs go straight to the device (past the volume's layers) and are timed in the
//! volume's own probe series of the stats region (`probe_read`, `probe_write`), so the
//! canaries have their histograms per stage, apart from the clients'. What the stats region
//! cannot say (a probe still in flight, a read that came back wrong) is published in
//! [`ProbeShared`] for the health monitor.
//!
//! The task sleeps on a timerfd between rounds, so an idle reactor still sleeps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fathom_engine::{
    DmaBuf, DmaPool, IoCompletion, IoContext, IoError, IoRequest, Rejected, Task, VolumeId,
};
use fathom_telemetry::Clock;
use parking_lot::Mutex;

/// Bytes a probe writes and reads.
pub const PROBE_BYTES: usize = 4096;

/// What a volume's probe task tells the health monitor; written by the task on its reactor.
#[derive(Debug, Default)]
pub struct ProbeShared {
    /// Set by the monitor: the task ends.
    pub stop: AtomicBool,
    /// The task has ended (the volume is gone, or `stop`).
    pub ended: AtomicBool,
    /// Clock ticks when the smoke write in flight was submitted; 0 when none is.
    pub smoke_since: AtomicU64,
    /// Smoke rounds done, and the last one's time (ns, write to read-back).
    pub smoke_rounds: AtomicU64,
    pub smoke_last_ns: AtomicU64,
    /// Smoke rounds that failed: an IO error, or data read back wrong.
    pub smoke_failures: AtomicU64,
    /// Canary rounds done, and failed (an IO error, or data read back wrong).
    pub canary_rounds: AtomicU64,
    pub canary_failures: AtomicU64,
    /// The last failure, for the monitor's explanation.
    pub last_failure: Mutex<Option<String>>,
}

impl ProbeShared {
    fn fail(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock() = Some(what);
    }
}

/// The probes' shape.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// A canary round (write, read back) starts every period; zero: no canary.
    pub canary_period: Duration,
    /// A smoke round starts every period; zero: no smoke write.
    pub smoke_period: Duration,
}

/// Where a probe is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// The write is to be submitted (it was refused busy, or the round is due).
    Write,
    Writing,
    Read,
    Reading,
}

/// One probe (the canary or the smoke write): its buffers, block and round.
struct Probe {
    /// Offset in the health area of the block it uses now.
    offset: u64,
    /// Blocks it goes round (the canary moves on each round; the smoke write stays).
    first_block: u64,
    blocks: u64,
    round: u64,
    phase: Phase,
    written: Option<DmaBuf>,
    read: Option<DmaBuf>,
    /// When the round's write was submitted (ticks).
    since: u64,
    period_ticks: u64,
    next_due: u64,
}

const CANARY: u64 = 0;
const SMOKE: u64 = 1;

impl Probe {
    fn new(pool: &DmaPool, first_block: u64, blocks: u64, period_ticks: u64) -> Option<Self> {
        Some(Self {
            offset: first_block * PROBE_BYTES as u64,
            first_block,
            blocks,
            round: 0,
            phase: Phase::Idle,
            written: Some(pool.alloc(PROBE_BYTES).ok()?),
            read: Some(pool.alloc(PROBE_BYTES).ok()?),
            since: 0,
            period_ticks,
            next_due: 0,
        })
    }

    /// Fills the write buffer for the round: its volume, round and kind in every word, so
    /// that a block read back from another round, volume or place is told apart.
    fn fill(&mut self, volume: VolumeId, kind: u64) {
        self.round += 1;
        self.offset = (self.first_block + self.round % self.blocks) * PROBE_BYTES as u64;
        let buf = self
            .written
            .as_mut()
            .expect("idle probes hold their buffers");
        let bytes = buf.as_bytes_mut();
        for (index, word) in bytes.chunks_exact_mut(8).enumerate() {
            let value = (self.round << 20) ^ ((volume.0 as u64) << 8) ^ kind ^ (index as u64) << 40;
            word.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// The reactor task of one volume's probes.
pub struct ProbeTask {
    volume: VolumeId,
    name: String,
    clock: Clock,
    shared: Arc<ProbeShared>,
    probes: [Option<Probe>; 2],
    timer: OwnedFd,
}

impl ProbeTask {
    /// The task for `volume`, whose health area holds `area_bytes`; `None` with nothing to
    /// probe (no area, or both periods zero). Buffers come from `pool`.
    pub fn new(
        volume: VolumeId,
        name: &str,
        area_bytes: u64,
        settings: ProbeSettings,
        pool: &DmaPool,
        clock: Clock,
        shared: Arc<ProbeShared>,
    ) -> Result<Option<Self>, String> {
        let blocks = area_bytes / PROBE_BYTES as u64;
        if blocks < 2 || (settings.canary_period.is_zero() && settings.smoke_period.is_zero()) {
            return Ok(None);
        }
        let ticks = |period: Duration| clock.duration_to_ticks(period).max(1);
        let dma = || {
            format!("no DMA memory for volume {name}'s health probes (4 buffers of 4 KiB): raise [dma] size")
        };
        let canary = match settings.canary_period.is_zero() {
            true => None,
            false => Some(
                Probe::new(pool, 1, blocks - 1, ticks(settings.canary_period)).ok_or_else(dma)?,
            ),
        };
        let smoke = match settings.smoke_period.is_zero() {
            true => None,
            false => Some(Probe::new(pool, 0, 1, ticks(settings.smoke_period)).ok_or_else(dma)?),
        };
        let periods = [settings.canary_period, settings.smoke_period];
        let tick = periods
            .into_iter()
            .filter(|period| !period.is_zero())
            .min()
            .expect("one period is set");
        Ok(Some(Self {
            volume,
            name: name.to_string(),
            clock,
            shared,
            probes: [canary, smoke],
            timer: periodic_timer(tick)
                .map_err(|error| format!("volume {name}'s health probes: timerfd: {error}"))?,
        }))
    }

    fn submit(&mut self, io: &mut IoContext, kind: u64, now: u64) -> bool {
        let volume = self.volume;
        let Some(probe) = self.probes[kind as usize].as_mut() else {
            return false;
        };
        let (op_write, buf) = match probe.phase {
            Phase::Write => (true, probe.written.take()),
            Phase::Read => (false, probe.read.take()),
            _ => return false,
        };
        let buf = buf.expect("a probe about to submit holds its buffer");
        let request = match op_write {
            true => IoRequest::write(volume, probe.offset, buf, kind),
            false => IoRequest::read(volume, probe.offset, buf, kind),
        };
        match io.submit_probe(request) {
            Ok(()) => {
                if op_write {
                    probe.since = now;
                    if kind == SMOKE {
                        self.shared.smoke_since.store(now.max(1), Ordering::Release);
                    }
                }
                probe.phase = match op_write {
                    true => Phase::Writing,
                    false => Phase::Reading,
                };
            }
            Err(Rejected { request, error, .. }) => {
                let buf = request.buf;
                match op_write {
                    true => probe.written = buf,
                    false => probe.read = buf,
                }
                if error != IoError::Busy {
                    // Tried again next round.
                    probe.phase = Phase::Idle;
                    let what = format!("{}: {error}", kind_name(kind));
                    self.shared.fail(counter(&self.shared, kind), what);
                    if matches!(error, IoError::UnknownVolume(_)) {
                        self.shared.stop.store(true, Ordering::Release);
                    }
                }
            }
        }
        true
    }
}

fn kind_name(kind: u64) -> &'static str {
    match kind {
        CANARY => "canary",
        _ => "smoke write",
    }
}

fn counter(shared: &ProbeShared, kind: u64) -> &AtomicU64 {
    match kind {
        CANARY => &shared.canary_failures,
        _ => &shared.smoke_failures,
    }
}

impl Task for ProbeTask {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        if self.shared.stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = match io.last_stamp() {
            0 => self.clock.now(),
            stamp => stamp,
        };
        let mut due = false;
        for probe in self.probes.iter_mut().flatten() {
            if probe.phase == Phase::Idle && now >= probe.next_due {
                due = true;
            }
        }
        let mut worked = false;
        if due {
            drain_timer(&self.timer);
            for kind in [CANARY, SMOKE] {
                let volume = self.volume;
                if let Some(probe) = self.probes[kind as usize].as_mut() {
                    if probe.phase == Phase::Idle && now >= probe.next_due {
                        probe.next_due = now + probe.period_ticks;
                        probe.fill(volume, kind);
                        probe.phase = Phase::Write;
                    }
                }
            }
        }
        for kind in [CANARY, SMOKE] {
            worked |= self.submit(io, kind, now);
        }
        worked
    }

    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion) {
        let kind = completion.tag;
        let Some(probe) = self.probes.get_mut(kind as usize).and_then(Option::as_mut) else {
            return;
        };
        let name = &self.name;
        let failed = |shared: &ProbeShared, what: String| {
            let what = format!("volume {name}'s {}: {what}", kind_name(kind));
            shared.fail(counter(shared, kind), what);
        };
        match probe.phase {
            Phase::Writing => {
                probe.written = completion.buf;
                match completion.result {
                    Ok(()) => probe.phase = Phase::Read,
                    Err(error) => {
                        failed(&self.shared, format!("write: {error}"));
                        probe.phase = Phase::Idle;
                    }
                }
            }
            Phase::Reading => {
                probe.read = completion.buf;
                probe.phase = Phase::Idle;
                let result = completion.result.map_err(|error| format!("read: {error}"));
                let result = result.and_then(|()| {
                    let (written, read) = (probe.written.as_ref(), probe.read.as_ref());
                    match written.zip(read).map(|(w, r)| w.as_bytes() == r.as_bytes()) {
                        Some(true) => Ok(()),
                        _ => Err(format!(
                            "the block at health-area offset {} read back other data than was written",
                            probe.offset
                        )),
                    }
                });
                match kind {
                    CANARY => {
                        self.shared.canary_rounds.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        let ticks = io.stamp().saturating_sub(probe.since);
                        self.shared
                            .smoke_last_ns
                            .store(self.clock.ticks_to_ns(ticks), Ordering::Relaxed);
                        self.shared.smoke_rounds.fetch_add(1, Ordering::Release);
                        self.shared.smoke_since.store(0, Ordering::Release);
                    }
                }
                if let Err(what) = result {
                    failed(&self.shared, what);
                }
            }
            _ => {}
        }
        if let Some(probe) = self.probes[kind as usize].as_ref() {
            if probe.phase == Phase::Idle && kind == SMOKE {
                self.shared.smoke_since.store(0, Ordering::Release);
            }
        }
    }

    fn finished(&self) -> bool {
        let stop = self.shared.stop.load(Ordering::Acquire);
        if stop {
            self.shared.ended.store(true, Ordering::Release);
        }
        stop
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.timer.as_fd())
    }
}

/// A non-blocking timerfd that turns readable every `period`.
fn periodic_timer(period: Duration) -> std::io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers; a negative result is checked before the
    // descriptor is owned.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let spec = libc::timespec {
        tv_sec: period.as_secs() as libc::time_t,
        tv_nsec: period.subsec_nanos() as libc::c_long,
    };
    let value = libc::itimerspec {
        it_interval: spec,
        it_value: spec,
    };
    // SAFETY: `value` lives across the call; the old value is not asked for (null).
    let result = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads the timer's expirations so that it stops being readable until the next one.
fn drain_timer(timer: &OwnedFd) {
    let mut expirations = [0u8; 8];
    // SAFETY: the buffer is 8 writable bytes, as a timerfd read needs; a would-block result
    // (no expiration yet) is expected and ignored.
    let _ = unsafe {
        libc::read(
            timer.as_raw_fd(),
            expirations.as_mut_ptr().cast(),
            expirations.len(),
        )
    };
}
