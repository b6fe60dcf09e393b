//! The cycle clock.
//!
//! Reading the clock is the expensive part of telemetry (about 11 ns per `rdtsc` on a VM,
//! against under 1 ns for a histogram increment), so callers read it once per batch event and
//! share the value among the IOs that cross that boundary. `rdtsc` is not serialising: a stamp
//! may move by a few tens of cycles relative to the surrounding loads and stores, which is far
//! below the resolution anyone reads a latency histogram at.

use std::time::{Duration, Instant};

/// Where the clock's ticks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockSource {
    /// The CPU's invariant time stamp counter, read with `rdtsc`.
    Tsc,
    /// `CLOCK_MONOTONIC` in nanoseconds (one vDSO call per read: slower, but always there).
    Monotonic,
}

/// Why a TSC clock could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error(
        "this CPU does not report an invariant TSC (CPUID 8000_0007h EDX bit 8), so cycle stamps \
         taken on different cores or across frequency changes would not agree; use the \
         monotonic clock instead (telemetry.clock = \"monotonic\")"
    )]
    NoInvariantTsc,
    #[error(
        "the TSC frequency measured {measured_hz} Hz, which is not plausible; use the monotonic \
         clock instead (telemetry.clock = \"monotonic\")"
    )]
    ImplausibleFrequency { measured_hz: u64 },
}

/// A calibrated tick source. Copy it freely: it is two words. Ticks are comparable across
/// processes on one machine (the TSC, or absolute `CLOCK_MONOTONIC` nanoseconds), so a stats
/// reader can stamp its snapshots with the node's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    source: ClockSource,
    /// Ticks per second.
    hz: u64,
}

impl Clock {
    /// The TSC, calibrated against the monotonic clock over `calibration` (20 ms is plenty:
    /// the error is the jitter of two `clock_gettime` calls over the interval).
    pub fn tsc(calibration: Duration) -> Result<Self, ClockError> {
        Self::tsc_checked(invariant_tsc(), || calibrate_tsc(calibration))
    }

    /// The TSC clock's checks, given what the CPU reports and a calibration to run.
    fn tsc_checked(invariant: bool, calibrate: impl FnOnce() -> u64) -> Result<Self, ClockError> {
        if !invariant {
            return Err(ClockError::NoInvariantTsc);
        }
        let hz = calibrate();
        // Anything outside 100 MHz..20 GHz means the measurement itself went wrong.
        if !(100_000_000..=20_000_000_000).contains(&hz) {
            return Err(ClockError::ImplausibleFrequency { measured_hz: hz });
        }
        Ok(Self {
            source: ClockSource::Tsc,
            hz,
        })
    }

    /// The monotonic clock, in nanoseconds.
    pub fn monotonic() -> Self {
        Self {
            source: ClockSource::Monotonic,
            hz: 1_000_000_000,
        }
    }

    /// The clock another process recorded (source and frequency), for reading stamps it
    /// wrote: the TSC is shared by every process on the machine.
    pub fn recorded(source: ClockSource, hz: u64) -> Self {
        match source {
            ClockSource::Tsc => Self {
                source,
                hz: hz.max(1),
            },
            ClockSource::Monotonic => Self::monotonic(),
        }
    }

    /// The TSC when the CPU has an invariant one, else the monotonic clock.
    pub fn best() -> Self {
        Self::tsc(Duration::from_millis(20)).unwrap_or_else(|_| Self::monotonic())
    }

    pub fn source(&self) -> ClockSource {
        self.source
    }

    /// Ticks per second.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// The current tick count.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        match self.source {
            ClockSource::Tsc => rdtsc(),
            ClockSource::Monotonic => monotonic_ns(),
        }
    }

    /// Converts a tick count to nanoseconds (saturating).
    #[inline]
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * 1_000_000_000) / self.hz as u128).min(u64::MAX as u128) as u64
    }

    /// Converts a duration to ticks (saturating).
    #[inline]
    pub fn duration_to_ticks(&self, duration: Duration) -> u64 {
        ((duration.as_nanos() * self.hz as u128) / 1_000_000_000).min(u64::MAX as u128) as u64
    }
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which is valid and ours.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no memory effects and exists on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn rdtsc() -> u64 {
    unreachable!("the TSC clock is only constructed on x86_64")
}

#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    use core::arch::x86_64::__cpuid;
    // `cpuid` exists on every x86_64 CPU and only reads identification registers.
    let max_extended = __cpuid(0x8000_0000).eax;
    if max_extended < 0x8000_0007 {
        return false;
    }
    let power = __cpuid(0x8000_0007);
    power.edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn invariant_tsc() -> bool {
    false
}

fn calibrate_tsc(over: Duration) -> u64 {
    let start_wall = Instant::now();
    let start_tsc = rdtsc();
    while start_wall.elapsed() < over {
        std::hint::spin_loop();
    }
    let end_tsc = rdtsc();
    let elapsed = start_wall.elapsed();
    ((end_tsc.wrapping_sub(start_tsc)) as u128 * 1_000_000_000 / elapsed.as_nanos().max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `clock` around a sleep, between two pairs of `Instant`s: the clock's span in
    /// nanoseconds, and the spans of the inner and the outer pair.
    fn bracketed(clock: &Clock, sleep: Duration) -> (u64, u64, u64) {
        let outer_start = Instant::now();
        let start = clock.now();
        let inner_start = Instant::now();
        std::thread::sleep(sleep);
        let inner_end = Instant::now();
        let end = clock.now();
        let outer_end = Instant::now();
        (
            clock.ticks_to_ns(end - start),
            (inner_end - inner_start).as_nanos() as u64,
            (outer_end - outer_start).as_nanos() as u64,
        )
    }

    /// What the kernel found: Linux lists `nonstop_tsc` when CPUID 8000_0007h EDX bit 8 (the
    /// invariant TSC) is set. `None` where there is no /proc/cpuinfo to ask.
    fn kernel_reports_invariant_tsc() -> Option<bool> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|line| line.starts_with("flags"))?;
        Some(flags.split_whitespace().any(|flag| flag == "nonstop_tsc"))
    }

    #[test]
    fn the_monotonic_clock_counts_what_instant_counts() {
        // `Instant` reads CLOCK_MONOTONIC too (on Linux), so the clock's span, in nanoseconds,
        // lies exactly between the spans of the Instants taken inside and outside it: no
        // tolerance, whatever the scheduler does. A wrong unit or conversion cannot pass.
        let clock = Clock::monotonic();
        for sleep in [Duration::ZERO, Duration::from_millis(20)] {
            let (measured_ns, inner_ns, outer_ns) = bracketed(&clock, sleep);
            assert!(
                inner_ns <= measured_ns && measured_ns <= outer_ns,
                "monotonic clock {measured_ns} ns, Instant {inner_ns}..={outer_ns} ns"
            );
        }
    }

    #[test]
    fn the_tsc_clock_agrees_with_the_monotonic_clock_or_is_refused() {
        let invariant = invariant_tsc();
        if cfg!(target_arch = "x86_64") {
            if let Some(kernel) = kernel_reports_invariant_tsc() {
                assert_eq!(
                    invariant, kernel,
                    "CPUID and the kernel disagree about an invariant TSC"
                );
            }
        }
        if !invariant {
            // Nothing to compare: the TSC clock must refuse, saying what to do instead, and
            // the best clock is the monotonic one (checked against Instant above).
            let error = Clock::tsc(Duration::from_millis(20)).unwrap_err();
            assert!(matches!(error, ClockError::NoInvariantTsc), "{error}");
            assert!(
                error
                    .to_string()
                    .contains("telemetry.clock = \"monotonic\""),
                "{error}"
            );
            assert_eq!(Clock::best().source(), ClockSource::Monotonic);
            return;
        }
        assert_eq!(Clock::best().source(), ClockSource::Tsc);
        // Within 5% of the Instant spans over 100 ms. A calibration disturbed by scheduling on
        // a loaded machine can miss that once; a clock that is wrong misses it every time, so
        // a fresh calibration gets three tries.
        let mut misses = Vec::new();
        for _ in 0..3 {
            let clock = Clock::tsc(Duration::from_millis(50)).expect("an invariant TSC");
            assert_eq!(clock.source(), ClockSource::Tsc);
            let (measured_ns, inner_ns, outer_ns) = bracketed(&clock, Duration::from_millis(100));
            if (inner_ns as f64 * 0.95..=outer_ns as f64 * 1.05).contains(&(measured_ns as f64)) {
                return;
            }
            misses.push(format!(
                "TSC at {} Hz: {measured_ns} ns, Instant {inner_ns}..={outer_ns} ns",
                clock.hz()
            ));
        }
        panic!("the TSC clock disagrees with the monotonic clock: {misses:?}");
    }

    #[test]
    fn a_cpu_without_an_invariant_tsc_is_refused_with_the_way_out() {
        let error = Clock::tsc_checked(false, || {
            unreachable!("no calibration without an invariant TSC")
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("invariant TSC") && error.contains("telemetry.clock = \"monotonic\""),
            "{error}"
        );
        let error = Clock::tsc_checked(true, || 12_345).unwrap_err().to_string();
        assert!(
            error.contains("12345 Hz") && error.contains("monotonic"),
            "{error}"
        );
        assert_eq!(
            Clock::tsc_checked(true, || 2_445_000_000).unwrap().hz(),
            2_445_000_000
        );
    }

    #[test]
    fn conversions_round_trip() {
        let clock = Clock::monotonic();
        assert_eq!(clock.duration_to_ticks(Duration::from_micros(200)), 200_000);
        assert_eq!(clock.ticks_to_ns(200_000), 200_000);
    }
}
