//! Which IOs are traced: each volume's head rate and tail threshold, shared by the engine
//! (which changes them at run time, and keeps `p99.9` thresholds up to date from the
//! volume's own histograms) and the reactors (which take a new version between loop
//! iterations, at their next publication).
//!
//! Thresholds are kept per series (volume × op, in clock ticks), because a volume's reads
//! and writes have tails of their own.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use fathom_telemetry::region::RegionReader;
use fathom_telemetry::Clock;
use parking_lot::Mutex;

use crate::config::{Config, TailThreshold};
use crate::stats::OP_NAMES;

/// No threshold: no IO is tail-sampled.
pub const NO_THRESHOLD: u64 = u64::MAX;

/// A volume's sampling, as the operator set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSampling {
    /// One IO in `rate` is head-sampled (0: none).
    pub rate: u32,
    pub tail: TailThreshold,
}

/// The settings of every volume of the engine, and the thresholds in force.
pub struct TraceSettings {
    /// Bumped after every change, so a reactor re-reads only when something changed.
    generation: AtomicU64,
    /// Per volume.
    sampling: Mutex<Vec<VolumeSampling>>,
    /// Per series (volume × op): one in `rate` head-sampled.
    rates: Box<[AtomicU32]>,
    /// Per series: the tail threshold in ticks ([`NO_THRESHOLD`]: none, or not known yet).
    thresholds: Box<[AtomicU64]>,
    clock: Clock,
    /// `[telemetry.trace]`'s sampling: what a volume made at run time starts with.
    defaults: VolumeSampling,
}

/// What a reactor copies out of [`TraceSettings`] when they change.
#[derive(Debug, Clone, Default)]
pub(crate) struct SamplingTable {
    pub generation: u64,
    pub rates: Vec<u32>,
    pub thresholds: Vec<u64>,
}

impl TraceSettings {
    pub(crate) fn new(config: &Config, clock: Clock) -> Self {
        // The configured volumes' own, then the defaults for the slots of volumes made at
        // run time.
        let defaults = VolumeSampling {
            rate: config.telemetry.trace.rate,
            tail: config.telemetry.trace.tail,
        };
        let sampling: Vec<VolumeSampling> = config
            .volumes
            .iter()
            .map(|volume| VolumeSampling {
                rate: volume.trace.rate.unwrap_or(defaults.rate),
                tail: volume.trace.tail.unwrap_or(defaults.tail),
            })
            .chain(std::iter::repeat_n(defaults, config.spare_volumes()))
            .collect();
        let series = sampling.len() * OP_NAMES.len();
        let settings = Self {
            generation: AtomicU64::new(1),
            sampling: Mutex::new(Vec::new()),
            rates: (0..series).map(|_| AtomicU32::new(0)).collect(),
            thresholds: (0..series).map(|_| AtomicU64::new(NO_THRESHOLD)).collect(),
            clock,
            defaults,
        };
        for (volume, &sampling) in sampling.iter().enumerate() {
            settings.apply(volume, sampling, false);
        }
        *settings.sampling.lock() = sampling;
        settings
    }

    /// Every volume's sampling, in volume order.
    pub fn sampling(&self) -> Vec<VolumeSampling> {
        self.sampling.lock().clone()
    }

    /// The tail threshold in force for `op` (index into [`OP_NAMES`]) of `volume`: `None`
    /// when no IO is tail-sampled (off, or a `p99.9` not known yet).
    pub fn threshold(&self, volume: usize, op: usize) -> Option<Duration> {
        let ticks = self.thresholds[volume * OP_NAMES.len() + op].load(Ordering::Relaxed);
        (ticks != NO_THRESHOLD).then(|| Duration::from_nanos(self.clock.ticks_to_ns(ticks)))
    }

    /// Changes `volume`'s sampling; reactors take it at their next publication (within a
    /// millisecond of IO).
    pub fn set(&self, volume: usize, sampling: VolumeSampling) {
        let mut all = self.sampling.lock();
        // A p99.9 already learned stays in force while the volume stays `p99.9`.
        let keep_learned =
            all[volume].tail == TailThreshold::P999 && sampling.tail == TailThreshold::P999;
        all[volume] = sampling;
        self.apply(volume, sampling, keep_learned);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Volume slot `volume` holds a new volume: `[telemetry.trace]`'s sampling, nothing
    /// learned.
    pub(crate) fn reset(&self, volume: usize) {
        let mut all = self.sampling.lock();
        if let Some(sampling) = all.get_mut(volume) {
            *sampling = self.defaults;
            self.apply(volume, self.defaults, false);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    fn apply(&self, volume: usize, sampling: VolumeSampling, keep_learned: bool) {
        for op in 0..OP_NAMES.len() {
            let series = volume * OP_NAMES.len() + op;
            self.rates[series].store(sampling.rate, Ordering::Relaxed);
            if keep_learned {
                continue;
            }
            let ticks = match sampling.tail {
                TailThreshold::Off => NO_THRESHOLD,
                TailThreshold::Above(threshold) => self.clock.duration_to_ticks(threshold),
                // Until its histograms have enough IOs: [`TraceSettings::set_p999`].
                TailThreshold::P999 => NO_THRESHOLD,
            };
            self.thresholds[series].store(ticks, Ordering::Relaxed);
        }
    }

    /// Sets a `p99.9` volume's threshold for one op, from its histograms; ignored if the
    /// volume's tail setting changed meanwhile.
    pub(crate) fn set_p999(&self, volume: usize, op: usize, ticks: u64) {
        let all = self.sampling.lock();
        if all[volume].tail == TailThreshold::P999 {
            let series = volume * OP_NAMES.len() + op;
            if self.thresholds[series].swap(ticks.max(1), Ordering::Relaxed) != ticks {
                self.generation.fetch_add(1, Ordering::Release);
            }
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Copies the current rates and thresholds into `table` if they changed since it was
    /// filled; true if they did.
    pub(crate) fn refresh(&self, table: &mut SamplingTable) -> bool {
        let generation = self.generation();
        if generation == table.generation {
            return false;
        }
        table.generation = generation;
        table.rates.clear();
        table
            .rates
            .extend(self.rates.iter().map(|rate| rate.load(Ordering::Relaxed)));
        table.thresholds.clear();
        table.thresholds.extend(
            self.thresholds
                .iter()
                .map(|threshold| threshold.load(Ordering::Relaxed)),
        );
        true
    }
}

/// Keeps `p99.9` volumes' thresholds up to date: each series' p99.9 of `total`, over the IOs
/// since its last update once there are at least [`P999_MIN_IOS`] of them (and at least a
/// second has passed), read from the node's own stats region as any reader would.
pub(crate) struct P999Tracker {
    reader: RegionReader,
    /// Per series: the `total` histogram's counts at its last update.
    baselines: Vec<Vec<u64>>,
    /// Per volume slot: its generation when its baselines were taken (a slot given to
    /// another volume starts from zero).
    generations: Vec<u64>,
    last: std::time::Instant,
}

/// A p99.9 is taken over at least this many IOs.
pub const P999_MIN_IOS: u64 = 1000;
/// And is updated at most this often.
const P999_PERIOD: Duration = Duration::from_secs(1);

impl P999Tracker {
    pub(crate) fn open(
        path: &std::path::Path,
    ) -> Result<Self, fathom_telemetry::region::RegionError> {
        let reader = RegionReader::open(path)?;
        let slots = reader.directory().volumes.len();
        Ok(Self {
            reader,
            baselines: vec![Vec::new(); slots * OP_NAMES.len()],
            generations: vec![0; slots],
            last: std::time::Instant::now(),
        })
    }

    /// Updates the thresholds of the series whose volumes are `p99.9`, at most once per
    /// period.
    pub(crate) fn update(&mut self, settings: &TraceSettings) {
        if self.last.elapsed() < P999_PERIOD {
            return;
        }
        self.last = std::time::Instant::now();
        let sampling = settings.sampling();
        if !sampling
            .iter()
            .any(|volume| volume.tail == TailThreshold::P999)
        {
            return;
        }
        if let Err(error) = self.reader.refresh() {
            tracing::warn!("p99.9 thresholds: cannot read the stats region: {error}");
            return;
        }
        let directory = self.reader.directory();
        let Some(total) = directory.stages.iter().position(|stage| stage == "total") else {
            return;
        };
        let layout = directory.histogram;
        let snapshot = self.reader.snapshot(0);
        for (volume, volume_sampling) in sampling.iter().enumerate() {
            let live = directory
                .volumes
                .get(volume)
                .is_some_and(|entry| entry.is_live());
            if volume_sampling.tail != TailThreshold::P999 || !live {
                continue;
            }
            let generation = snapshot.volume_generation(volume);
            let new_volume = self.generations[volume] != generation;
            self.generations[volume] = generation;
            for op in 0..OP_NAMES.len() {
                let counts = snapshot.histogram(volume, op, total);
                let baseline = &mut self.baselines[volume * OP_NAMES.len() + op];
                if baseline.len() != counts.len() || new_volume {
                    baseline.clear();
                    baseline.resize(counts.len(), 0);
                }
                let delta = |index: usize| counts[index].saturating_sub(baseline[index]);
                let ios: u64 = (0..counts.len()).map(delta).sum();
                if ios < P999_MIN_IOS {
                    continue;
                }
                // The first bucket at which 99.9% of the IOs are counted: the threshold is
                // its highest value, so the slowest 0.1% are above it.
                let wanted = ios - ios / 1000;
                let mut seen = 0;
                let Some(index) = (0..counts.len()).find(|&index| {
                    seen += delta(index);
                    seen >= wanted
                }) else {
                    continue;
                };
                let ticks = layout
                    .value_at(index + 1)
                    .saturating_sub(1)
                    .max(layout.value_at(index));
                settings.set_p999(volume, op, ticks);
                baseline.copy_from_slice(counts);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_prints_as_the_parser_takes_it_back() {
        for text in ["500us", "2ms", "1s", "750ns", "1500us", "off", "p99.9"] {
            let threshold = TailThreshold::parse(text).unwrap();
            assert_eq!(threshold.to_string(), text);
        }
        assert!(TailThreshold::parse("fast").unwrap_err().contains("p99.9"));
    }
}
