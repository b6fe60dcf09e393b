//! How fast a resync copies while clients write, sans-IO: an additive-increase,
//! multiplicative-decrease controller (as TCP's congestion window) on the p99 of the client
//! writes the primary answered in the last window.
//!
//! With a bound (`replication.resync_p99`), the rate starts at [`START_RATE`] and, once per
//! [`WINDOW`]:
//! - the window's client write p99 over the bound halves it (not below [`FLOOR_RATE`], so a
//!   resync always ends), and so do too few answered writes to tell ([`MIN_SAMPLES`]) while
//!   some wait (writes held longer than a window are over any bound);
//! - a p99 under 80% of the bound, or no client writing, raises it by a quarter and [`RAMP`]
//!   (up to `replication.resync_rate`, if set);
//! - between the two it holds.
//!
//! Without a bound the rate is `replication.resync_rate` (0: as fast as the disks and the
//! network go).

use std::time::{Duration, Instant};

use fathom_telemetry::hdr::Layout;

/// How often the rate is decided, from the client writes answered since the last decision.
pub const WINDOW: Duration = Duration::from_millis(100);
/// The rate a bounded resync starts at.
pub const START_RATE: f64 = 32.0 * MIB;
/// The least a bounded resync copies per second, whatever the clients see.
pub const FLOOR_RATE: f64 = MIB;
/// Added per window while the clients' p99 is well within the bound.
pub const RAMP: f64 = 4.0 * MIB;
/// Fewer client writes than this in a window say nothing about their p99.
pub const MIN_SAMPLES: u64 = 20;
/// A bounded resync with no `resync_rate` cap still stops growing here.
const CEILING_RATE: f64 = 64.0 * 1024.0 * MIB;
const MIB: f64 = 1024.0 * 1024.0;
/// Client write latencies are counted in µs, up to 10 s, with 2 significant figures.
const LAYOUT: Layout = match Layout::new(10_000_000, 2) {
    Some(layout) => layout,
    None => panic!("a valid histogram layout"),
};

/// One volume's resync pace.
#[derive(Debug)]
pub struct ResyncPace {
    /// The client write p99 to keep, in µs; `None`: a fixed rate.
    bound_us: Option<u64>,
    /// Bytes per second at most (0: no cap).
    cap: f64,
    rate: f64,
    window_start: Instant,
    /// This window's client write latencies.
    counts: Vec<u32>,
    samples: u64,
    /// The last window's p99 (µs) and how many writes it had, for status.
    last_p99_us: u64,
    last_samples: u64,
    /// No resync asked for a rate since the last [`ResyncPace::idle`].
    idle: bool,
}

impl ResyncPace {
    /// At most `cap` bytes per second (0: no cap), keeping the client write p99 within `bound`
    /// if given.
    pub fn new(cap: u64, bound: Option<Duration>, now: Instant) -> Self {
        let cap = cap as f64;
        let bound_us = bound.map(|bound| (bound.as_micros() as u64).max(1));
        Self {
            bound_us,
            cap,
            rate: Self::start(cap, bound_us),
            window_start: now,
            counts: match bound_us {
                Some(_) => vec![0; LAYOUT.counts_len()],
                None => Vec::new(),
            },
            samples: 0,
            last_p99_us: 0,
            last_samples: 0,
            idle: true,
        }
    }

    fn start(cap: f64, bound_us: Option<u64>) -> f64 {
        match (bound_us, cap > 0.0) {
            (None, _) => cap,
            (Some(_), true) => START_RATE.min(cap),
            (Some(_), false) => START_RATE,
        }
    }

    /// A client write was answered `us` µs after the layer took it. Counted only while a
    /// resync runs: the window it falls in decides that resync's rate.
    #[inline]
    pub fn record(&mut self, us: u64) {
        if self.bound_us.is_some() && !self.idle {
            self.counts[LAYOUT.index_of(us.max(1))] += 1;
            self.samples += 1;
        }
    }

    /// Bytes per second a resync may copy now (0: no limit), deciding the windows that ended;
    /// `waiting`: client writes are in flight now.
    pub fn rate(&mut self, now: Instant, waiting: bool) -> f64 {
        if self.idle {
            self.idle = false;
            self.window_start = now;
        }
        if let Some(bound) = self.bound_us {
            if now.duration_since(self.window_start) >= WINDOW {
                self.decide(bound, waiting);
                self.window_start = now;
            }
        }
        self.rate
    }

    /// No resync is running: the next one starts from the start rate again. True when it
    /// was running until now.
    pub fn idle(&mut self) -> bool {
        if self.idle {
            return false;
        }
        self.idle = true;
        self.rate = Self::start(self.cap, self.bound_us);
        self.counts.iter_mut().for_each(|count| *count = 0);
        self.samples = 0;
        true
    }

    /// The rate in force (what the next resync starts at, while none runs).
    pub fn rate_in_force(&self) -> f64 {
        self.rate
    }

    /// The client write p99 of the last window (µs) and its count of writes.
    pub fn last_window(&self) -> (u64, u64) {
        (self.last_p99_us, self.last_samples)
    }

    fn decide(&mut self, bound: u64, waiting: bool) {
        let p99 = self.p99();
        let (samples, cap) = (self.samples, self.cap);
        self.last_p99_us = p99;
        self.last_samples = samples;
        let ceiling = if cap > 0.0 { cap } else { CEILING_RATE };
        let few = samples < MIN_SAMPLES;
        if (!few && p99 > bound) || (few && waiting) {
            self.rate = (self.rate / 2.0).max(FLOOR_RATE.min(ceiling));
        } else if few || p99 * 5 <= bound * 4 {
            self.rate = (self.rate * 1.25 + RAMP).min(ceiling);
        }
        self.counts.iter_mut().for_each(|count| *count = 0);
        self.samples = 0;
    }

    /// The window's p99 in µs (the highest value of its bucket), 0 without samples.
    fn p99(&self) -> u64 {
        if self.samples == 0 {
            return 0;
        }
        let rank = (self.samples * 99).div_ceil(100);
        let mut seen = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count as u64;
            if seen >= rank {
                return match index + 1 < self.counts.len() {
                    true => LAYOUT.value_at(index + 1) - 1,
                    false => LAYOUT.value_at(index),
                };
            }
        }
        LAYOUT.value_at(self.counts.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn window(pace: &mut ResyncPace, now: &mut Instant, latencies: &[(u64, u64)]) -> f64 {
        for &(us, count) in latencies {
            for _ in 0..count {
                pace.record(us);
            }
        }
        *now += WINDOW;
        pace.rate(*now, false)
    }

    #[test]
    fn without_a_bound_the_rate_is_the_configured_one() {
        let mut now = Instant::now();
        let mut pace = ResyncPace::new(10 << 20, None, now);
        assert_eq!(
            window(&mut pace, &mut now, &[(50 * MS, 1000)]),
            (10 << 20) as f64
        );
        let mut pace = ResyncPace::new(0, None, now);
        assert_eq!(window(&mut pace, &mut now, &[]), 0.0, "0: no limit");
    }

    #[test]
    fn a_p99_over_the_bound_halves_the_rate_down_to_the_floor() {
        let mut now = Instant::now();
        let mut pace = ResyncPace::new(0, Some(Duration::from_millis(2)), now);
        assert_eq!(
            pace.rate(now, false),
            START_RATE,
            "the first ask starts the first window"
        );
        // 98% fast, 2% at 5 ms: the p99 is 5 ms.
        let slow = [(200, 98), (5 * MS, 2)];
        assert_eq!(window(&mut pace, &mut now, &slow), START_RATE / 2.0);
        let (p99, samples) = pace.last_window();
        assert_eq!(samples, 100);
        assert!((5 * MS..5 * MS + 100).contains(&p99), "{p99}");
        for _ in 0..20 {
            window(&mut pace, &mut now, &slow);
        }
        assert_eq!(pace.rate(now, false), FLOOR_RATE, "a resync always goes on");
    }

    #[test]
    fn a_p99_well_within_the_bound_or_no_clients_raise_it_up_to_the_cap() {
        let mut now = Instant::now();
        let cap = 100 << 20;
        let mut pace = ResyncPace::new(cap, Some(Duration::from_millis(2)), now);
        pace.rate(now, false);
        let fast = [(300, 500)];
        let raised = window(&mut pace, &mut now, &fast);
        assert_eq!(raised, START_RATE * 1.25 + RAMP);
        assert!(
            window(&mut pace, &mut now, &[(300, 3)]) > raised,
            "no client waits"
        );
        let before = pace.rate(now, true);
        pace.record(300);
        now += WINDOW;
        assert_eq!(
            pace.rate(now, true),
            before / 2.0,
            "one answered, others wait"
        );
        for _ in 0..20 {
            window(&mut pace, &mut now, &fast);
        }
        assert_eq!(pace.rate(now, false), cap as f64);
        // Between 80% and 100% of the bound: held.
        let mut pace = ResyncPace::new(cap, Some(Duration::from_millis(2)), now);
        pace.rate(now, false);
        assert_eq!(window(&mut pace, &mut now, &[(1900, 500)]), START_RATE);
    }

    #[test]
    fn a_window_decides_only_once_it_ended_and_idle_starts_over() {
        let mut now = Instant::now();
        let mut pace = ResyncPace::new(0, Some(Duration::from_millis(1)), now);
        assert_eq!(pace.rate(now, false), START_RATE);
        for _ in 0..100 {
            pace.record(10 * MS);
        }
        assert_eq!(pace.rate(now + WINDOW / 2, false), START_RATE, "not yet");
        now += WINDOW;
        assert_eq!(pace.rate(now, false), START_RATE / 2.0);
        pace.idle();
        assert_eq!(pace.rate(now, false), START_RATE);
    }
}
