//! fio-like workloads that run as tasks on the reactors themselves, as SPDK's perf does: each
//! reactor's task keeps `iodepth` IOs in flight on its own volume, resubmitting from the
//! completion, with no cross-core hop and no allocation per IO.

use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::Sender;
use fathom_engine::{
    DmaBuf, DmaPool, IoCompletion, IoContext, IoError, IoRequest, Op, Task, VolumeId,
};
use fathom_telemetry::Clock;

/// The access pattern, named as fio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Sequential reads and writes mixed (--rwmixread percent reads).
    #[value(alias = "rw")]
    Readwrite,
    /// Random reads and writes mixed (--rwmixread percent reads).
    Randrw,
}

impl Pattern {
    /// The operation of a pure pattern; `None` for mixes.
    fn op(self) -> Option<Op> {
        match self {
            Pattern::Read | Pattern::Randread => Some(Op::Read),
            Pattern::Write | Pattern::Randwrite => Some(Op::Write),
            Pattern::Readwrite | Pattern::Randrw => None,
        }
    }
    /// Whether the pattern draws its offsets at random (else it goes through them in order).
    pub fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
    /// Whether the pattern writes at all (its buffers then carry data).
    pub fn writes(self) -> bool {
        self.op() != Some(Op::Read)
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub volume: VolumeId,
    pub pattern: Pattern,
    pub block_size: u64,
    pub iodepth: usize,
    /// Bytes of the volume the workload touches, from offset 0.
    pub span_bytes: u64,
    pub runtime: Duration,
    pub ramp: Duration,
    pub seed: u64,
    /// Percent of reads in a mixed pattern (fio's rwmixread).
    pub read_percent: u32,
}

/// The offsets and operations of a fio-style workload: blocks of the span in order or drawn at
/// random (aligned to the block size), and for mixes a read or a write drawn per IO with
/// `read_percent` percent reads. The in-process workload and fathom-bench's NBD client both draw
/// from it, so the same seed and shape give the same sequence of IOs on either path.
#[derive(Debug, Clone)]
pub struct AccessGenerator {
    pattern: Pattern,
    block_size: u64,
    blocks_in_span: u64,
    next_block: u64,
    rng: u64,
    read_percent: u32,
}

impl AccessGenerator {
    /// A generator over `span_bytes / block_size` blocks from offset 0; `block_size` is not 0.
    pub fn new(
        pattern: Pattern,
        block_size: u64,
        span_bytes: u64,
        seed: u64,
        read_percent: u32,
    ) -> Self {
        assert!(block_size > 0, "a zero block size has no blocks");
        Self {
            pattern,
            block_size,
            blocks_in_span: span_bytes / block_size,
            next_block: 0,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            read_percent,
        }
    }

    /// The byte offset (within the span) of the next IO.
    #[inline(always)]
    pub fn next_offset(&mut self) -> u64 {
        let block = if self.pattern.random() {
            let mut x = self.rng;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.rng = x;
            // Multiply-shift maps the draw onto the span without a division.
            ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) as u128 * self.blocks_in_span as u128) >> 64)
                as u64
        } else {
            let block = self.next_block;
            self.next_block = if block + 1 == self.blocks_in_span {
                0
            } else {
                block + 1
            };
            block
        };
        block * self.block_size
    }

    /// The next IO: its operation and its byte offset within the span.
    #[inline(always)]
    pub fn next_io(&mut self) -> (Op, u64) {
        let offset = self.next_offset();
        let op = match self.pattern.op() {
            Some(op) => op,
            None => {
                let draw = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if (draw % 100) < self.read_percent as u64 {
                    Op::Read
                } else {
                    Op::Write
                }
            }
        };
        (op, offset)
    }
}

/// What one reactor's workload did over the measured interval (after the ramp).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WorkloadResult {
    pub core: usize,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Wall time of the measured interval.
    pub elapsed_ns: u64,
    /// CPU time the reactor thread used over the measured interval.
    pub cpu_ns: u64,
    /// IOs that waited to be submitted (the engine refused them `Busy`: every slot or queue
    /// entry taken), and the time they waited in all, from the first refusal to acceptance.
    pub waited_ios: u64,
    pub wait_ns: u64,
}

enum Phase {
    Start,
    Ramp {
        until: u64,
    },
    Measure {
        until: u64,
        started: u64,
        cpu_started: u64,
    },
    Drain,
    Done,
}

pub struct WorkloadTask {
    spec: WorkloadSpec,
    clock: Clock,
    /// Idle buffers, oldest first, each with the clock reading since when its IO has waited
    /// to be submitted (0: it has not been refused yet). Served in order: a completion's
    /// buffer goes behind IOs already waiting, as a client's requests queue for a device.
    buffers: VecDeque<(DmaBuf, u64)>,
    /// Waits summed in clock ticks (converted once, at the report).
    wait_ticks: u64,
    phase: Phase,
    /// Whether a completion's buffer must not go straight back to work: the task is not
    /// ramping or measuring, or buffers wait before it. One flag for the path of every IO,
    /// recomputed whenever the phase or the waiting buffers change.
    hold: bool,
    in_flight: usize,
    access: AccessGenerator,
    result: WorkloadResult,
    report: Sender<WorkloadResult>,
}

impl WorkloadTask {
    /// Allocates the task's buffers (`iodepth` of `block_size`) up front.
    pub fn new(
        spec: WorkloadSpec,
        pool: &DmaPool,
        clock: Clock,
        report: Sender<WorkloadResult>,
    ) -> Result<Self, fathom_dma::DmaError> {
        let mut buffers = VecDeque::with_capacity(spec.iodepth);
        for index in 0..spec.iodepth {
            let mut buf = pool.alloc(spec.block_size as usize)?;
            if spec.pattern.writes() {
                buf.fill(index as u8 ^ 0x5a);
            }
            buffers.push_back((buf, 0));
        }
        Ok(Self {
            access: AccessGenerator::new(
                spec.pattern,
                spec.block_size,
                spec.span_bytes,
                spec.seed,
                spec.read_percent,
            ),
            spec,
            clock,
            buffers,
            wait_ticks: 0,
            phase: Phase::Start,
            hold: true,
            in_flight: 0,
            result: WorkloadResult::default(),
            report,
        })
    }

    /// Submits one IO with `buf`, waiting since `since` (0: not refused before); false when
    /// it was refused (the buffer waits for the next poll: back-pressure is not an error,
    /// anything else is counted as one). A waited IO carries its wait into the engine's
    /// `queue` stage, so the telemetry shows what the workload saw.
    #[inline]
    fn issue(&mut self, io: &mut IoContext, buf: DmaBuf, since: u64) -> bool {
        let (op, offset) = self.access.next_io();
        let request = IoRequest {
            volume: self.spec.volume,
            op,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            fua: false,
            tag: 0,
        };
        let submitted = if since == 0 {
            io.submit(request)
        } else {
            io.submit_waited(request, since)
        };
        match submitted {
            Ok(()) => {
                self.in_flight += 1;
                if since != 0 {
                    self.result.waited_ios += 1;
                    self.wait_ticks += self.clock.now().saturating_sub(since);
                }
                true
            }
            Err(rejected) => {
                if rejected.error != IoError::Busy {
                    self.result.errors += 1;
                }
                let since = match since {
                    0 => self.clock.now().max(1),
                    since => since,
                };
                if let Some(buf) = rejected.request.buf {
                    self.buffers.push_front((buf, since));
                    self.hold = true;
                }
                false
            }
        }
    }

    /// Whether completed IOs are to be replaced (ramping or measuring).
    fn running(&self) -> bool {
        matches!(self.phase, Phase::Ramp { .. } | Phase::Measure { .. })
    }

    /// Recomputes [`WorkloadTask::hold`].
    fn update_hold(&mut self) {
        self.hold = !self.buffers.is_empty() || !self.running();
    }

    /// A completion's buffer while [`WorkloadTask::hold`]: it waits behind the buffers
    /// already waiting (from now), or for the next phase.
    #[cold]
    fn complete_held(&mut self, io: &mut IoContext, buf: DmaBuf) {
        if self.running() {
            self.buffers.push_back((buf, self.clock.now().max(1)));
            self.issue_idle(io);
        } else {
            self.buffers.push_back((buf, 0));
        }
        self.update_hold();
    }

    /// Puts every idle buffer back to work (after a start or a refusal).
    fn issue_idle(&mut self, io: &mut IoContext) {
        while let Some((buf, since)) = self.buffers.pop_front() {
            if !self.issue(io, buf, since) {
                break;
            }
        }
    }
}

impl Task for WorkloadTask {
    /// Starts, moves between phases, retries refused IOs. Whatever changes the phase or the
    /// waiting buffers recomputes `hold`.
    fn poll(&mut self, io: &mut IoContext) -> bool {
        match self.phase {
            Phase::Start => {
                let now = self.clock.now();
                self.result.core = io.core();
                self.phase = if self.spec.ramp.is_zero() {
                    Phase::Measure {
                        until: now + self.clock.duration_to_ticks(self.spec.runtime),
                        started: now,
                        cpu_started: thread_cpu_ns(),
                    }
                } else {
                    Phase::Ramp {
                        until: now + self.clock.duration_to_ticks(self.spec.ramp),
                    }
                };
                self.issue_idle(io);
                self.update_hold();
                true
            }
            Phase::Ramp { until } => {
                if self.hold {
                    self.issue_idle(io);
                    self.update_hold();
                }
                let now = self.clock.now();
                if now >= until {
                    self.result = WorkloadResult {
                        core: io.core(),
                        ..WorkloadResult::default()
                    };
                    self.wait_ticks = 0;
                    let until = now + self.clock.duration_to_ticks(self.spec.runtime);
                    self.phase = Phase::Measure {
                        until,
                        started: now,
                        cpu_started: thread_cpu_ns(),
                    };
                }
                false
            }
            Phase::Measure {
                until,
                started,
                cpu_started,
            } => {
                // IOs the engine refused go again as soon as it has room.
                if self.hold {
                    self.issue_idle(io);
                    self.update_hold();
                }
                let now = self.clock.now();
                if now >= until {
                    self.result.elapsed_ns = self.clock.ticks_to_ns(now - started);
                    self.result.cpu_ns = thread_cpu_ns().saturating_sub(cpu_started);
                    self.result.wait_ns = self.clock.ticks_to_ns(self.wait_ticks);
                    self.phase = Phase::Drain;
                    self.hold = true;
                }
                false
            }
            Phase::Drain => {
                if self.in_flight == 0 {
                    let _ = self.report.send(self.result);
                    self.phase = Phase::Done;
                }
                false
            }
            Phase::Done => false,
        }
    }

    #[inline]
    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion) {
        self.in_flight -= 1;
        let buf = completion
            .buf
            .expect("read and write completions carry their buffer");
        match completion.result {
            Ok(()) => {
                self.result.ios += 1;
                self.result.bytes += buf.len() as u64;
            }
            Err(_) => self.result.errors += 1,
        }
        match self.hold {
            false => {
                self.issue(io, buf, 0);
            }
            true => self.complete_held(io, buf),
        }
    }

    fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_ns() -> u64 {
    let mut now = libc_timespec();
    // SAFETY: clock_gettime writes one timespec into `now`, which is valid and exclusively ours.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn libc_timespec() -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }
}

/// What a verify run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyResult {
    pub core: usize,
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub mismatches: u64,
    /// Byte offsets (in the volume) of the first mismatching blocks.
    pub first_mismatches: Vec<u64>,
    pub errors: u64,
}

const VERIFY_MAGIC: &[u8; 8] = b"FTHMVRFY";
/// Verify data is made of 512-byte units, each generated from its own byte offset, so what a
/// run wrote can be read back in extents of any size (another run, another tool).
pub const VERIFY_UNIT: usize = 512;

/// The contents a verify run writes at `offset` (a multiple of [`VERIFY_UNIT`]): per 512-byte
/// unit, a header naming the unit, then bytes drawn from a generator seeded by the unit's
/// offset, so a unit read back from elsewhere, or stale, is caught.
pub fn expected_block(offset: u64, seed: u64, out: &mut [u8]) {
    for (index, unit) in out.chunks_mut(VERIFY_UNIT).enumerate() {
        let unit_offset = offset + (index * VERIFY_UNIT) as u64;
        let mut state =
            (unit_offset ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for chunk in unit.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let header = unit.len().min(16);
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(VERIFY_MAGIC);
        head[8..].copy_from_slice(&unit_offset.to_le_bytes());
        unit[..header].copy_from_slice(&head[..header]);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VerifyPhase {
    Write,
    Read,
    Done,
}

/// How a verify run cuts its span and what it does.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Extents are `block_size` bytes, or, when this is larger, random sizes from
    /// `block_size` to this (multiples of `block_size`), each in a buffer that starts at a
    /// random 512-byte offset into its page: so PRP1 offsets, PRP2 and PRP lists all occur.
    pub max_block_size: u64,
    /// Skip the write pass: check what an earlier run (same size, seed and cores) wrote.
    pub read_only: bool,
}

/// The order in which a verify pass visits the blocks of its span: in order, or for random
/// patterns every block exactly once in a scrambled order (a bijection of the position modulo
/// the next power of two, skipping values past the span). The increment picks the scramble, so
/// the read-back pass can run in an order other than the write pass's.
#[derive(Debug, Clone)]
pub struct BlockOrder {
    blocks: u64,
    random: bool,
    position: u64,
    period: u64,
    increment: u64,
}

impl BlockOrder {
    /// The increment of a write pass's scramble.
    pub const WRITE_INCREMENT: u64 = 1;
    /// The increment of a read-back pass's scramble (another order than the write pass's).
    pub const READ_INCREMENT: u64 = 0x2b;

    pub fn new(blocks: u64, random: bool, increment: u64) -> Self {
        Self {
            blocks,
            random,
            position: 0,
            period: blocks.next_power_of_two(),
            increment,
        }
    }

    /// The next block of the pass, or `None` when every block has had its turn.
    pub fn next_block(&mut self) -> Option<u64> {
        while self.position < self.period {
            let index = self.position;
            self.position += 1;
            let block = if self.random {
                // 5x + c, then times an odd constant: both are bijections modulo a power of
                // two, so every block comes up exactly once, in a scrambled order.
                (index
                    .wrapping_mul(5)
                    .wrapping_add(self.increment)
                    .wrapping_mul(0x5851_f42d_4c95_7f2d | 1))
                    & (self.period - 1)
            } else {
                index
            };
            if block < self.blocks {
                return Some(block);
            }
        }
        None
    }

    /// Gives back the block [`BlockOrder::next_block`] returned last (it could not be issued),
    /// so the next call returns it again.
    pub fn step_back(&mut self) {
        self.position -= 1;
    }

    /// Whether every block of the pass has been handed out.
    pub fn done(&self) -> bool {
        self.position >= self.period
    }

    /// Starts another pass over the same blocks, in the order of `increment`.
    pub fn restart(&mut self, increment: u64) {
        self.position = 0;
        self.increment = increment;
    }
}

/// Writes every extent of the span once, then reads every extent back and compares it.
pub struct VerifyTask {
    volume: VolumeId,
    block_size: u64,
    /// Random-size extents as (offset, length); empty for fixed `block_size` extents.
    extents: Vec<(u64, u32)>,
    seed: u64,
    /// xorshift state for buffer offsets.
    rng: u64,
    phase: VerifyPhase,
    /// The current pass's order over the extents.
    order: BlockOrder,
    buffers: Vec<DmaBuf>,
    in_flight: usize,
    expected: Vec<u8>,
    actual: Vec<u8>,
    result: VerifyResult,
    report: Sender<VerifyResult>,
}

impl VerifyTask {
    pub fn new(
        spec: &WorkloadSpec,
        options: VerifyOptions,
        pool: &DmaPool,
        report: Sender<VerifyResult>,
    ) -> Result<Self, fathom_dma::DmaError> {
        let mut rng = spec.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        let mut extents = Vec::new();
        let mixed = options.max_block_size > spec.block_size;
        if mixed {
            let choices = options.max_block_size / spec.block_size;
            let mut offset = 0;
            while offset < spec.span_bytes {
                // Sizes spread evenly over the powers of two (then uniformly below the chosen
                // one), so single-page, two-page and PRP-list transfers all come up often.
                let bound = 1 << (xorshift(&mut rng) % (choices.ilog2() as u64 + 1));
                let len = (xorshift(&mut rng) % bound.min(choices) + 1) * spec.block_size;
                let len = len.min(spec.span_bytes - offset);
                extents.push((offset, len as u32));
                offset += len;
            }
        }
        let largest = options.max_block_size.max(spec.block_size) as usize;
        // Room for a buffer to start anywhere in its first page.
        let capacity = largest + if mixed { 4096 } else { 0 };
        let buffers = (0..spec.iodepth)
            .map(|_| pool.alloc(capacity))
            .collect::<Result<Vec<_>, _>>()?;
        let blocks = if mixed {
            extents.len() as u64
        } else {
            spec.span_bytes / spec.block_size
        };
        Ok(Self {
            volume: spec.volume,
            block_size: spec.block_size,
            extents,
            seed: spec.seed,
            rng,
            phase: if options.read_only {
                VerifyPhase::Read
            } else {
                VerifyPhase::Write
            },
            order: BlockOrder::new(
                blocks,
                spec.pattern.random(),
                if options.read_only {
                    BlockOrder::READ_INCREMENT
                } else {
                    BlockOrder::WRITE_INCREMENT
                },
            ),
            buffers,
            in_flight: 0,
            expected: vec![0; largest],
            actual: vec![0; largest],
            result: VerifyResult::default(),
            report,
        })
    }

    /// The next extent of this pass, or `None` when every extent has had its turn.
    fn next_extent(&mut self) -> Option<(u64, usize)> {
        let block = self.order.next_block()?;
        Some(match self.extents.get(block as usize) {
            Some(&(offset, len)) => (offset, len as usize),
            None => (block * self.block_size, self.block_size as usize),
        })
    }

    fn issue(&mut self, io: &mut IoContext) {
        while let Some(mut buf) = self.buffers.pop() {
            let Some((offset, len)) = self.next_extent() else {
                self.buffers.push(buf);
                return;
            };
            let start = if self.extents.is_empty() {
                0
            } else {
                (xorshift(&mut self.rng) % 8) as usize * 512
            };
            buf.set_view(start, len);
            let request = if self.phase == VerifyPhase::Write {
                expected_block(offset, self.seed, &mut self.expected[..len]);
                buf.write_at(0, &self.expected[..len]);
                IoRequest::write(self.volume, offset, buf, offset)
            } else {
                IoRequest::read(self.volume, offset, buf, offset)
            };
            match io.submit(request) {
                Ok(()) => self.in_flight += 1,
                Err(rejected) => {
                    // Back-pressure: step back and retry this extent on the next poll.
                    if rejected.error == IoError::Busy {
                        self.order.step_back();
                    } else {
                        self.result.errors += 1;
                    }
                    self.buffers.extend(rejected.request.buf);
                    return;
                }
            }
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl Task for VerifyTask {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        self.result.core = io.core();
        match self.phase {
            VerifyPhase::Write | VerifyPhase::Read => {
                self.issue(io);
                if self.in_flight == 0 && self.order.done() {
                    if self.phase == VerifyPhase::Write {
                        // Read back in a different order from the one written in.
                        self.phase = VerifyPhase::Read;
                        self.order.restart(BlockOrder::READ_INCREMENT);
                    } else {
                        self.phase = VerifyPhase::Done;
                        let _ = self.report.send(std::mem::take(&mut self.result));
                    }
                }
                true
            }
            VerifyPhase::Done => false,
        }
    }

    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion) {
        self.in_flight -= 1;
        let buf = completion.buf.expect("verify IOs carry buffers");
        match (completion.result, self.phase) {
            (Err(_), _) => self.result.errors += 1,
            (Ok(()), VerifyPhase::Write) => self.result.blocks_written += 1,
            (Ok(()), _) => {
                let offset = completion.tag;
                let len = buf.len();
                self.result.blocks_read += 1;
                expected_block(offset, self.seed, &mut self.expected[..len]);
                buf.read_at(0, &mut self.actual[..len]);
                if self.actual[..len] != self.expected[..len] {
                    self.result.mismatches += 1;
                    if self.result.first_mismatches.len() < 8 {
                        self.result.first_mismatches.push(offset);
                    }
                }
            }
        }
        self.buffers.push(buf);
        self.issue(io);
    }

    fn finished(&self) -> bool {
        self.phase == VerifyPhase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_matches_only_its_own_expected_contents() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        expected_block(8192, 1, &mut a);
        expected_block(8192, 1, &mut b);
        assert_eq!(a, b);
        assert_eq!(&a[..8], VERIFY_MAGIC);
        // Any extent is the concatenation of its units: read back in other sizes, it matches.
        let mut pieces = vec![0u8; 4096];
        expected_block(8192, 1, &mut pieces[..1024]);
        expected_block(8192 + 1024, 1, &mut pieces[1024..]);
        assert_eq!(a, pieces);
        expected_block(12288, 1, &mut b);
        assert_ne!(a, b, "another offset");
        expected_block(8192, 2, &mut b);
        assert_ne!(a, b, "another run");
        expected_block(8192, 1, &mut b);
        b[4000] ^= 1;
        assert_ne!(a, b, "one flipped bit");
    }

    #[test]
    fn the_random_order_visits_every_block_exactly_once() {
        for blocks in [1u64, 2, 7, 64, 1000, 4097] {
            for increment in [BlockOrder::WRITE_INCREMENT, BlockOrder::READ_INCREMENT] {
                let mut order = BlockOrder::new(blocks, true, increment);
                let mut seen = vec![false; blocks as usize];
                while let Some(block) = order.next_block() {
                    assert!(
                        !std::mem::replace(&mut seen[block as usize], true),
                        "block {block} twice"
                    );
                }
                assert!(order.done());
                assert!(seen.iter().all(|&seen| seen), "{blocks} blocks");
            }
        }
        // In order, and a block given back comes again.
        let mut order = BlockOrder::new(3, false, BlockOrder::WRITE_INCREMENT);
        assert_eq!(order.next_block(), Some(0));
        order.step_back();
        assert_eq!(order.next_block(), Some(0));
        assert_eq!(order.next_block(), Some(1));
        assert_eq!(order.next_block(), Some(2));
        assert_eq!(order.next_block(), None);
    }

    #[test]
    fn the_access_generator_stays_in_the_span_aligned_and_mixes_as_asked() {
        let mut sequential = AccessGenerator::new(Pattern::Read, 4096, 3 * 4096, 1, 50);
        let offsets: Vec<u64> = (0..4).map(|_| sequential.next_io().1).collect();
        assert_eq!(offsets, [0, 4096, 8192, 0]);
        let mut mixed = AccessGenerator::new(Pattern::Randrw, 512, 1 << 20, 7, 70);
        let mut reads = 0;
        for _ in 0..10_000 {
            let (op, offset) = mixed.next_io();
            assert!(offset < 1 << 20 && offset % 512 == 0, "{offset}");
            reads += usize::from(op == Op::Read);
        }
        assert!((6_500..7_500).contains(&reads), "{reads} reads of 10000");
    }
}
