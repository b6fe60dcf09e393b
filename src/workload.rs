//! fio-like workloads that run as tasks on the reactors themselves, as SPDK's perf does: each
//! reactor's task keeps `iodepth` IOs in flight on its own volume, resubmitting from the
//! completion, with no cross-core hop and no allocation per IO.

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
    fn random(self) -> bool {
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
    buffers: Vec<DmaBuf>,
    phase: Phase,
    in_flight: usize,
    next_offset: u64,
    blocks_in_span: u64,
    rng: u64,
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
    ) -> Result<Self, fathom_engine::dma::DmaError> {
        let mut buffers = Vec::with_capacity(spec.iodepth);
        for index in 0..spec.iodepth {
            let mut buf = pool.alloc(spec.block_size as usize)?;
            if spec.pattern.writes() {
                buf.fill(index as u8 ^ 0x5a);
            }
            buffers.push(buf);
        }
        Ok(Self {
            blocks_in_span: spec.span_bytes / spec.block_size,
            rng: spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            spec,
            clock,
            buffers,
            phase: Phase::Start,
            in_flight: 0,
            next_offset: 0,
            result: WorkloadResult::default(),
            report,
        })
    }

    #[inline(always)]
    fn next_offset(&mut self) -> u64 {
        let block = if self.spec.pattern.random() {
            let mut x = self.rng;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.rng = x;
            // Multiply-shift maps the draw onto the span without a division.
            ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) as u128 * self.blocks_in_span as u128) >> 64)
                as u64
        } else {
            let block = self.next_offset;
            self.next_offset = if block + 1 == self.blocks_in_span {
                0
            } else {
                block + 1
            };
            block
        };
        block * self.spec.block_size
    }

    /// Submits one IO with `buf`; false when it was refused (the buffer waits for the next
    /// poll: back-pressure is not an error, anything else is counted as one).
    #[inline]
    fn issue(&mut self, io: &mut IoContext, buf: DmaBuf) -> bool {
        let offset = self.next_offset();
        let op = match self.spec.pattern.op() {
            Some(op) => op,
            None => {
                let draw = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if (draw % 100) < self.spec.read_percent as u64 {
                    Op::Read
                } else {
                    Op::Write
                }
            }
        };
        let request = IoRequest {
            volume: self.spec.volume,
            op,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            fua: false,
            tag: 0,
        };
        match io.submit(request) {
            Ok(()) => {
                self.in_flight += 1;
                true
            }
            Err(rejected) => {
                if rejected.error != IoError::Busy {
                    self.result.errors += 1;
                }
                self.buffers.extend(rejected.request.buf);
                false
            }
        }
    }

    /// Puts every idle buffer back to work (after a start or a refusal).
    fn issue_idle(&mut self, io: &mut IoContext) {
        while let Some(buf) = self.buffers.pop() {
            if !self.issue(io, buf) {
                break;
            }
        }
    }
}

impl Task for WorkloadTask {
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
                true
            }
            Phase::Ramp { until } => {
                self.issue_idle(io);
                let now = self.clock.now();
                if now >= until {
                    self.result = WorkloadResult {
                        core: io.core(),
                        ..WorkloadResult::default()
                    };
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
                let now = self.clock.now();
                if now >= until {
                    self.result.elapsed_ns = self.clock.ticks_to_ns(now - started);
                    self.result.cpu_ns = thread_cpu_ns().saturating_sub(cpu_started);
                    self.phase = Phase::Drain;
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
        if matches!(self.phase, Phase::Ramp { .. } | Phase::Measure { .. }) {
            self.issue(io, buf);
        } else {
            self.buffers.push(buf);
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
