//! Drift: what the clients send changing shape (IO sizes, read/write mix, queue depth), told
//! apart from the node regressing (sans-IO).
//!
//! A [`Shape`] is one interval of a volume's client IO. The [`DriftTracker`] keeps a slowly
//! moving reference of the shapes seen (an exponential average over about
//! [`DriftTracker::new`]'s `span` intervals) and reports the interval's shape as drift when it
//! is far from it: the read fraction moved by more than [`MIX_DELTA`], the size distribution
//! by more than [`SIZE_DISTANCE`] (total variation over power-of-two buckets), or the queue
//! depth by more than a factor [`DEPTH_FACTOR`]. [`classify`] then names what a slower client
//! latency is: the node regressing (its canary, whose shape never changes, is red), drift
//! (the canary is green and the clients changed shape), or neither (green, same shape: load,
//! for the detector to judge).

use serde::Serialize;

/// Power-of-two size buckets: 512 B, 1 KiB, ... 1 MiB and more.
pub const SIZE_BUCKETS: usize = 12;
/// The read fraction moving by more than this is drift.
pub const MIX_DELTA: f64 = 0.2;
/// The size distribution moving by more than this (total variation, 0 to 1) is drift.
pub const SIZE_DISTANCE: f64 = 0.3;
/// The queue depth growing or shrinking by more than this factor is drift.
pub const DEPTH_FACTOR: f64 = 2.0;

/// One interval of a volume's client IO.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shape {
    /// Reads over reads and writes (0 to 1).
    pub read_fraction: f64,
    /// IOs per size bucket ([`bucket`]).
    pub sizes: [u64; SIZE_BUCKETS],
    /// The mean number of client IOs in flight.
    pub depth: f64,
}

impl Shape {
    fn ios(&self) -> u64 {
        self.sizes.iter().sum()
    }
}

/// The bucket of an IO of `bytes`.
pub fn bucket(bytes: u64) -> usize {
    let blocks = bytes.div_ceil(512).max(1);
    (blocks.next_power_of_two().trailing_zeros() as usize).min(SIZE_BUCKETS - 1)
}

/// How an interval's shape differs from the reference (empty: it does not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub reasons: Vec<String>,
}

/// The reference shape and what moves it.
#[derive(Debug, Clone)]
pub struct DriftTracker {
    weight: f64,
    read_fraction: f64,
    sizes: [f64; SIZE_BUCKETS],
    depth: f64,
    seen: u32,
}

/// Intervals the reference needs before drift is reported.
const MIN_SEEN: u32 = 5;

impl DriftTracker {
    /// A reference that follows the shapes over about `span` intervals.
    pub fn new(span: u32) -> Self {
        Self {
            weight: 1.0 / span.max(1) as f64,
            read_fraction: 0.0,
            sizes: [0.0; SIZE_BUCKETS],
            depth: 0.0,
            seen: 0,
        }
    }

    /// Compares `shape` with the reference, then moves the reference towards it. Intervals
    /// with no IO say nothing and teach nothing.
    pub fn observe(&mut self, shape: &Shape) -> Option<Drift> {
        let ios = shape.ios();
        if ios == 0 || !shape.read_fraction.is_finite() || !shape.depth.is_finite() {
            return None;
        }
        let fractions: Vec<f64> = shape
            .sizes
            .iter()
            .map(|&count| count as f64 / ios as f64)
            .collect();
        let mut reasons = Vec::new();
        if self.seen >= MIN_SEEN {
            let mix = shape.read_fraction - self.read_fraction;
            if mix.abs() > MIX_DELTA {
                reasons.push(format!(
                    "reads are {:.0}% of the IO, {:.0}% before",
                    shape.read_fraction * 100.0,
                    self.read_fraction * 100.0
                ));
            }
            let distance: f64 = fractions
                .iter()
                .zip(&self.sizes)
                .map(|(now, before)| (now - before).abs())
                .sum::<f64>()
                / 2.0;
            if distance > SIZE_DISTANCE {
                reasons.push(format!(
                    "IO sizes moved: mostly {} now, {} before ({:.0}% of the IO changed bucket)",
                    size_text(mode(&fractions)),
                    size_text(mode(&self.sizes)),
                    distance * 100.0
                ));
            }
            let (now, before) = (shape.depth.max(0.01), self.depth.max(0.01));
            if now / before > DEPTH_FACTOR || before / now > DEPTH_FACTOR {
                reasons.push(format!(
                    "queue depth {:.1}, {:.1} before",
                    shape.depth, self.depth
                ));
            }
        }
        // The first interval sets the reference; later ones move it by the weight.
        let weight = match self.seen {
            0 => 1.0,
            _ => self.weight.max(1.0 / (self.seen + 1) as f64),
        };
        self.read_fraction += (shape.read_fraction.clamp(0.0, 1.0) - self.read_fraction) * weight;
        for (reference, now) in self.sizes.iter_mut().zip(&fractions) {
            *reference += (now - *reference) * weight;
        }
        self.depth += (shape.depth.max(0.0) - self.depth) * weight;
        self.seen = self.seen.saturating_add(1);
        (!reasons.is_empty()).then_some(Drift { reasons })
    }
}

/// What a slower client latency is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The canary is red and the clients send what they sent: the node itself regressed.
    Regression,
    /// The clients' shape changed. The canary shares the node with them: if it is red too,
    /// the new work explains it first.
    Drift,
    /// Green and the same shape: more of the same load (the detector judges it).
    Load,
}

/// What a slower client latency in an interval is, given the canary's verdict, the drift
/// tracker's, and whether the volume's detector holds its device sick (suspect, degraded or
/// recovering): new work explains a red canary only on a device not otherwise found slow.
pub fn classify(canary_red: bool, drift: Option<&Drift>, device_sick: bool) -> Cause {
    match (canary_red, drift, device_sick) {
        (true, _, true) => Cause::Regression,
        (_, Some(_), _) => Cause::Drift,
        (true, None, _) => Cause::Regression,
        (false, None, _) => Cause::Load,
    }
}

fn mode(fractions: &[f64]) -> usize {
    fractions
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(index, _)| index)
}

fn size_text(bucket: usize) -> String {
    let bytes = 512u64 << bucket;
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(read_fraction: f64, bytes: u64, depth: f64) -> Shape {
        let mut sizes = [0; SIZE_BUCKETS];
        sizes[bucket(bytes)] = 1000;
        Shape {
            read_fraction,
            sizes,
            depth,
        }
    }

    #[test]
    fn sizes_land_in_their_power_of_two_bucket() {
        assert_eq!(bucket(512), 0);
        assert_eq!(bucket(4096), 3);
        assert_eq!(bucket(4097), 4);
        assert_eq!(bucket(1 << 20), 11);
        assert_eq!(bucket(u64::MAX), 11);
        assert_eq!(bucket(0), 0);
    }

    #[test]
    fn a_steady_workload_is_no_drift_and_a_changed_one_is_named() {
        let mut tracker = DriftTracker::new(60);
        for _ in 0..60 {
            assert_eq!(tracker.observe(&shape(0.7, 4096, 32.0)), None);
        }
        // Now 128 KiB sequential writes: sizes and mix both moved.
        let drift = tracker.observe(&shape(0.0, 128 << 10, 32.0)).unwrap();
        assert_eq!(drift.reasons.len(), 2, "{drift:?}");
        assert!(drift.reasons[0].contains("reads are 0%"), "{drift:?}");
        assert!(drift.reasons[1].contains("128 KiB"), "{drift:?}");
        // Only the depth: QD 1 after QD 32.
        let mut tracker = DriftTracker::new(60);
        for _ in 0..60 {
            tracker.observe(&shape(0.7, 4096, 32.0));
        }
        let drift = tracker.observe(&shape(0.7, 4096, 1.0)).unwrap();
        assert!(drift.reasons[0].contains("queue depth 1.0"), "{drift:?}");
    }

    #[test]
    fn the_reference_follows_a_lasting_change() {
        let mut tracker = DriftTracker::new(20);
        for _ in 0..40 {
            tracker.observe(&shape(0.7, 4096, 32.0));
        }
        let drifted = (0..200)
            .filter(|_| tracker.observe(&shape(0.1, 65536, 4.0)).is_some())
            .count();
        assert!((1..200).contains(&drifted), "{drifted}");
        assert_eq!(tracker.observe(&shape(0.1, 65536, 4.0)), None);
    }

    #[test]
    fn a_slower_client_is_regression_drift_or_load() {
        let drift = Drift {
            reasons: vec!["x".into()],
        };
        assert_eq!(classify(true, Some(&drift), false), Cause::Drift);
        assert_eq!(classify(true, None, false), Cause::Regression);
        assert_eq!(classify(false, Some(&drift), false), Cause::Drift);
        assert_eq!(classify(false, None, false), Cause::Load);
        // A device the detector found slow: its red canary is a regression, whatever the
        // clients send now.
        assert_eq!(classify(true, Some(&drift), true), Cause::Regression);
        assert_eq!(classify(false, Some(&drift), true), Cause::Drift);
    }

    proptest! {
        /// Any shapes, garbage included: no panic, reasons only with drift, and an interval
        /// with no IO says nothing.
        #[test]
        fn any_shape_is_judged_or_ignored(shapes in proptest::collection::vec(
            (proptest::num::f64::ANY, proptest::collection::vec(0u64..1_000_000, SIZE_BUCKETS), proptest::num::f64::ANY),
            0..100,
        )) {
            let mut tracker = DriftTracker::new(30);
            for (read_fraction, sizes, depth) in shapes {
                let shape = Shape {
                    read_fraction,
                    sizes: sizes.try_into().unwrap(),
                    depth,
                };
                if let Some(drift) = tracker.observe(&shape) {
                    prop_assert!(!drift.reasons.is_empty());
                    prop_assert!(shape.ios() > 0);
                }
            }
        }
    }
}
