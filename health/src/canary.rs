//! A canary's verdict per interval: each stage's latency against the baseline the canary
//! learned while the node was healthy (sans-IO; the node runs the canary's IO and feeds a
//! value per key, such as `probe_write device p50` and `probe_write device p99`).
//!
//! The baseline of a key is the median of its value over the last [`Baseline::capacity`]
//! green intervals, and its noise band is the median absolute deviation of those (MAD,
//! robust to the odd slow interval) times [`NOISE_MADS`]. An interval is **red** when some
//! key's value is above the baseline by more than the noise band, than
//! [`Settings::min_regression`] (a fraction) and than [`MIN_REGRESSION_NS`]: the verdict
//! names the stage, its value, the baseline and the band. Red intervals teach the baseline nothing. The baseline is kept in
//! JSON across restarts ([`Baseline::to_json`], [`Baseline::from_json`], which refuses what
//! does not hold together).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Deviations (MADs) above the median that are still noise.
pub const NOISE_MADS: f64 = 5.0;
/// A rise smaller than this (ns) is never red: below a few µs, timer reads and cache misses
/// move a stage by more than a third (a page-cache read of 0.1 µs reads 0.14 µs).
pub const MIN_REGRESSION_NS: f64 = 2_000.0;
/// Green intervals a stage needs before it is judged.
pub const MIN_INTERVALS: usize = 10;
/// Above this (about 11 days, in ns) a value is not a latency.
const MAX_LATENCY_NS: f64 = 1e15;

fn is_latency(ns: f64) -> bool {
    ns.is_finite() && (0.0..=MAX_LATENCY_NS).contains(&ns)
}

/// How a canary judges.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Intervals the baseline keeps per stage.
    pub intervals: usize,
    /// A regression smaller than this fraction of the baseline is never red (0.2: 20%).
    pub min_regression: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            intervals: 120,
            min_regression: 0.25,
        }
    }
}

/// What one interval of a canary says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CanaryVerdict {
    pub interval: u64,
    pub red: bool,
    /// One line per stage over its limit (empty when green).
    pub reasons: Vec<String>,
    /// Stages still learning their baseline.
    pub learning: Vec<String>,
}

/// Why a stored baseline was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BaselineError(pub String);

impl std::fmt::Display for BaselineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "canary baseline: {}", self.0)
    }
}

impl std::error::Error for BaselineError {}

/// The p99s of green intervals, per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub v: u32,
    pub settings: Settings,
    /// Per stage, its latency (ns) in the last green intervals, oldest first.
    pub stages: BTreeMap<String, VecDeque<f64>>,
    /// Stages over their limit in the last interval judged, and which interval that was.
    #[serde(skip)]
    over: BTreeMap<String, u64>,
}

/// One interval's latency of one key (a stage and percentile), for
/// [`Baseline::judge_readings`].
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub key: &'a str,
    pub ns: f64,
    /// Red only when over the limit two intervals in a row.
    pub persistent: bool,
}

impl Baseline {
    pub fn new(settings: Settings) -> Self {
        Self {
            v: 1,
            settings: Settings {
                intervals: settings.intervals.max(MIN_INTERVALS),
                ..settings
            },
            stages: BTreeMap::new(),
            over: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.settings.intervals
    }

    /// The baseline and noise band of `stage` (ns), once it has learned enough.
    pub fn band(&self, stage: &str) -> Option<(f64, f64)> {
        let values = self.stages.get(stage)?;
        if values.len() < MIN_INTERVALS {
            return None;
        }
        let median = median(values.iter().copied());
        let mad = median_of(values.iter().map(|v| (v - median).abs()).collect());
        Some((median, NOISE_MADS * mad))
    }

    /// Judges interval `interval`, whose stages had these latencies (ns), and learns from it
    /// if it is green.
    pub fn judge(&mut self, interval: u64, values: &[(&str, f64)]) -> CanaryVerdict {
        let readings: Vec<Reading> = values
            .iter()
            .map(|&(key, ns)| Reading {
                key,
                ns,
                persistent: false,
            })
            .collect();
        self.judge_readings(interval, &readings)
    }

    /// As [`Baseline::judge`], where a reading marked `persistent` (a tail percentile: one
    /// slow interval of it is the machine's noise) is red only when it is over its limit in
    /// two intervals in a row. A reading over its limit, red or not, teaches nothing.
    pub fn judge_readings(&mut self, interval: u64, readings: &[Reading]) -> CanaryVerdict {
        let mut reasons = Vec::new();
        let mut learning = Vec::new();
        let mut over = Vec::new();
        for reading in readings {
            let (stage, ns) = (reading.key, reading.ns);
            if !is_latency(ns) {
                continue;
            }
            match self.band(stage) {
                None => learning.push(stage.to_string()),
                Some((baseline, noise)) => {
                    let limit = baseline
                        + noise
                            .max(self.settings.min_regression * baseline)
                            .max(MIN_REGRESSION_NS);
                    if ns <= limit {
                        continue;
                    }
                    over.push(stage.to_string());
                    let again = self.over.get(stage) == Some(&interval.wrapping_sub(1));
                    if reading.persistent && !again {
                        continue;
                    }
                    reasons.push(format!(
                        "stage {stage}: {:.1} µs in interval {interval} is {:+.0}% over its baseline {:.1} µs (noise band ±{:.1} µs, limit {:.1} µs){}",
                        ns / 1e3,
                        (ns / baseline - 1.0) * 100.0,
                        baseline / 1e3,
                        noise / 1e3,
                        limit / 1e3,
                        if reading.persistent { ", the second interval in a row" } else { "" }
                    ));
                }
            }
        }
        self.over.retain(|_, _| false);
        for stage in &over {
            self.over.insert(stage.clone(), interval);
        }
        let red = !reasons.is_empty();
        if !red {
            let capacity = self.capacity();
            for reading in readings {
                if !is_latency(reading.ns) || over.iter().any(|stage| stage == reading.key) {
                    continue;
                }
                let values = self.stages.entry(reading.key.to_string()).or_default();
                if values.len() == capacity {
                    values.pop_front();
                }
                values.push_back(reading.ns);
            }
        }
        CanaryVerdict {
            interval,
            red,
            reasons,
            learning,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a baseline serialises")
    }

    /// A stored baseline, checked: its version, a capacity it can hold, finite latencies.
    pub fn from_json(text: &str) -> Result<Self, BaselineError> {
        let baseline: Self =
            serde_json::from_str(text).map_err(|error| BaselineError(error.to_string()))?;
        if baseline.v != 1 {
            return Err(BaselineError(format!(
                "layout version {}, this node reads 1",
                baseline.v
            )));
        }
        let capacity = baseline.settings.intervals;
        if !(MIN_INTERVALS..=100_000).contains(&capacity) {
            return Err(BaselineError(format!(
                "{capacity} intervals; {MIN_INTERVALS} to 100000 are kept"
            )));
        }
        for (stage, values) in &baseline.stages {
            if values.len() > capacity || values.iter().any(|v| !is_latency(*v)) {
                return Err(BaselineError(format!(
                    "stage {stage:?} holds {} values, or one that is not a latency",
                    values.len()
                )));
            }
        }
        Ok(baseline)
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    median_of(values.collect())
}

fn median_of(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() % 2 {
        1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A canary with a device stage of about 80 µs and a queue stage of about 2 µs, learned
    /// for `intervals` intervals with a little noise.
    fn learned(intervals: u64) -> Baseline {
        let mut baseline = Baseline::new(Settings::default());
        for interval in 0..intervals {
            let noise = ((interval * 7919) % 7) as f64 * 400.0;
            let verdict = baseline.judge(
                interval,
                &[
                    ("device", 80_000.0 + noise),
                    ("queue", 2_000.0 + noise / 10.0),
                ],
            );
            assert!(!verdict.red, "{verdict:?}");
        }
        baseline
    }

    #[test]
    fn a_tail_is_red_only_when_slow_two_intervals_in_a_row_and_one_slow_interval_is_not_learned() {
        let mut baseline = learned(60);
        let tail = |ns| Reading {
            key: "device",
            ns,
            persistent: true,
        };
        let before = baseline.band("device");
        // One slow interval: noise, not red, not learned.
        assert!(!baseline.judge_readings(60, &[tail(200_000.0)]).red);
        assert_eq!(baseline.band("device"), before);
        assert!(!baseline.judge_readings(61, &[tail(81_000.0)]).red);
        // Two in a row: red, and the reason says so.
        assert!(!baseline.judge_readings(62, &[tail(200_000.0)]).red);
        let verdict = baseline.judge_readings(63, &[tail(200_000.0)]);
        assert!(verdict.red, "{verdict:?}");
        assert!(
            verdict.reasons[0].contains("second interval in a row"),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_30_percent_regression_at_one_stage_is_red_in_one_interval_and_named() {
        let mut baseline = learned(60);
        let verdict = baseline.judge(60, &[("device", 104_000.0), ("queue", 2_100.0)]);
        assert!(verdict.red, "{verdict:?}");
        assert_eq!(verdict.reasons.len(), 1, "{verdict:?}");
        assert!(
            verdict.reasons[0].starts_with("stage device:"),
            "{verdict:?}"
        );
    }

    #[test]
    fn an_unchanged_node_stays_green_and_a_red_interval_teaches_nothing() {
        let mut baseline = learned(60);
        for interval in 60..660 {
            let noise = ((interval * 104_729) % 7) as f64 * 400.0;
            let verdict = baseline.judge(interval, &[("device", 80_000.0 + noise)]);
            assert!(!verdict.red, "{verdict:?}");
        }
        let before = baseline.band("device");
        assert!(baseline.judge(660, &[("device", 500_000.0)]).red);
        assert_eq!(baseline.band("device"), before);
    }

    #[test]
    fn a_rise_of_a_fraction_of_a_microsecond_is_never_red() {
        let mut baseline = Baseline::new(Settings::default());
        for interval in 0..60 {
            baseline.judge(interval, &[("cached", 100.0 + (interval % 3) as f64)]);
        }
        // +40%, far beyond the band of a steady 0.1 µs, and still only 40 ns.
        assert!(!baseline.judge(60, &[("cached", 140.0)]).red);
        assert!(baseline.judge(61, &[("cached", 2_500.0)]).red);
    }

    #[test]
    fn nothing_is_judged_while_learning() {
        let mut baseline = learned(MIN_INTERVALS as u64 - 1);
        let verdict = baseline.judge(99, &[("device", 10_000_000.0)]);
        assert!(!verdict.red);
        assert_eq!(verdict.learning, ["device"]);
    }

    #[test]
    fn the_baseline_survives_a_restart_and_bad_ones_are_refused() {
        let baseline = learned(30);
        let back = Baseline::from_json(&baseline.to_json()).unwrap();
        assert_eq!(back, baseline);
        for (text, expect) in [
            ("{", "EOF"),
            (
                r#"{"v":2,"settings":{"intervals":120,"min_regression":0.2},"stages":{}}"#,
                "version 2",
            ),
            (
                r#"{"v":1,"settings":{"intervals":3,"min_regression":0.2},"stages":{}}"#,
                "3 intervals",
            ),
            (
                r#"{"v":1,"settings":{"intervals":10,"min_regression":0.2},"stages":{"d":[-1.0]}}"#,
                "not a latency",
            ),
        ] {
            let error = Baseline::from_json(text).unwrap_err().to_string();
            assert!(error.contains(expect), "{text}: {error}");
        }
    }

    proptest! {
        /// Whatever it is fed, the baseline never holds more than its capacity per stage nor a
        /// value that is not a latency, and what it stores reads back.
        #[test]
        fn any_input_keeps_the_baseline_sound(inputs in proptest::collection::vec((0u8..3, proptest::num::f64::ANY), 0..400)) {
            let mut baseline = Baseline::new(Settings { intervals: 10, min_regression: 0.2 });
            for (interval, (stage, p99)) in inputs.into_iter().enumerate() {
                let name = ["device", "queue", "total"][stage as usize];
                let _ = baseline.judge(interval as u64, &[(name, p99)]);
            }
            for values in baseline.stages.values() {
                prop_assert!(values.len() <= 10);
                prop_assert!(values.iter().all(|v| is_latency(*v)));
            }
            // Back within a rounding of the last digit.
            let back = Baseline::from_json(&baseline.to_json()).unwrap();
            prop_assert_eq!(back.stages.len(), baseline.stages.len());
            for (stage, values) in &baseline.stages {
                let read = &back.stages[stage];
                prop_assert_eq!(read.len(), values.len());
                for (a, b) in read.iter().zip(values) {
                    prop_assert!((a - b).abs() <= b.abs() * 1e-12, "{a} {b}");
                }
            }
        }
    }
}
