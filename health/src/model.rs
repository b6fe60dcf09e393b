//! A volume's latency against its throughput, learned from healthy windows (after Perseus,
//! FAST '23, which fits latency to throughput per drive and flags what lies above the fit's
//! upper bound).
//!
//! The model is a least-squares line through the last [`LoadModel::capacity`] healthy windows
//! (throughput in IOs per second, latency in ns) with an upper bound: the line plus the larger
//! of three standard deviations of its residuals and a relative margin. A window above the
//! bound is judged by its throughput against the highest the model has seen healthy:
//!
//! - at or above (a tenth below it, at most; the highest is the 95th percentile of the
//!   windows' throughput): **busy**, latency from queueing under load the
//!   volume has not carried before;
//! - below: **sick**, slower at a load it carried well.
//!
//! A volume only ever seen at one load cannot tell the two apart at that load (a device that
//! slows down under a steady rate, or one saturated by it): there the peer ratio, which
//! compares the same writes on other nodes, decides.

use std::collections::VecDeque;

/// Windows the model needs before it judges.
pub const MIN_POINTS: usize = 30;
/// Standard deviations of the residuals the bound allows above the line.
const SIGMAS: f64 = 3.0;
/// A throughput this close below the highest healthy one counts as "at" it.
const BUSY_FRACTION: f64 = 0.9;

/// What the model says of one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Too few healthy windows learned yet.
    Unknown,
    /// Within the model's bound.
    Normal,
    /// Above the bound, at or beyond the throughput the volume has carried.
    Busy { bound_ns: f64, max_iops: f64 },
    /// Above the bound at a throughput it carried well before.
    Sick { bound_ns: f64, max_iops: f64 },
}

/// The line and its spread, fitted to the points.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    intercept: f64,
    slope: f64,
    sigma: f64,
    max_iops: f64,
}

/// Latency against throughput, learned from healthy windows.
#[derive(Debug, Clone)]
pub struct LoadModel {
    points: VecDeque<(f64, f64)>,
    capacity: usize,
    /// The bound is at least this fraction above the line.
    margin: f64,
    fit: Option<Fit>,
}

impl LoadModel {
    /// A model of the last `capacity` healthy windows whose bound lies at least `margin`
    /// (0.5: 50%) above the fitted latency.
    pub fn new(capacity: usize, margin: f64) -> Self {
        Self {
            points: VecDeque::with_capacity(capacity.max(MIN_POINTS)),
            capacity: capacity.max(MIN_POINTS),
            margin,
            fit: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Healthy windows learned (at most the capacity).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The highest throughput the healthy windows learned carried (`None` before the first),
    /// counted before the model has enough of them to judge latency: their 95th percentile,
    /// so that one odd window (a burst into a cache before the device's latency told) does
    /// not move it.
    pub fn max_iops(&self) -> Option<f64> {
        (!self.points.is_empty()).then(|| high_iops(&self.points))
    }

    /// Learns a healthy window: `iops` completions per second at `latency_ns`. Windows with
    /// no IO, or values that are not finite, teach nothing.
    pub fn learn(&mut self, iops: f64, latency_ns: f64) {
        if !(iops.is_finite() && latency_ns.is_finite()) || iops <= 0.0 || latency_ns <= 0.0 {
            return;
        }
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back((iops, latency_ns));
        self.fit = fit(&self.points);
    }

    /// The latency the model allows at `iops` (`None` until it has learned enough).
    pub fn bound_ns(&self, iops: f64) -> Option<f64> {
        let fit = self.fit?;
        let line = (fit.intercept + fit.slope * iops).max(0.0);
        Some(line + (SIGMAS * fit.sigma).max(self.margin * line))
    }

    /// Judges a window of `iops` at `latency_ns`.
    pub fn judge(&self, iops: f64, latency_ns: f64) -> Load {
        let (Some(fit), Some(bound_ns)) = (self.fit, self.bound_ns(iops)) else {
            return Load::Unknown;
        };
        if latency_ns <= bound_ns {
            return Load::Normal;
        }
        let max_iops = fit.max_iops;
        match iops >= BUSY_FRACTION * max_iops {
            true => Load::Busy { bound_ns, max_iops },
            false => Load::Sick { bound_ns, max_iops },
        }
    }
}

/// The 95th percentile of the points' throughput.
fn high_iops(points: &VecDeque<(f64, f64)>) -> f64 {
    let mut iops: Vec<f64> = points.iter().map(|point| point.0).collect();
    iops.sort_by(f64::total_cmp);
    iops[(iops.len() - 1) * 95 / 100]
}

/// Least squares over `points`, centred for stability; `None` below [`MIN_POINTS`].
fn fit(points: &VecDeque<(f64, f64)>) -> Option<Fit> {
    if points.len() < MIN_POINTS {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    // A volume seen at one throughput only: latency is flat in it as far as is known. A
    // falling line (noise at light load) is taken as flat too: more load never makes IO
    // faster.
    let slope = match sxx > f64::EPSILON * n {
        true => (sxy / sxx).max(0.0),
        false => 0.0,
    };
    let intercept = mean_y - slope * mean_x;
    let residuals: f64 = points
        .iter()
        .map(|p| (p.1 - (intercept + slope * p.0)).powi(2))
        .sum();
    let sigma = (residuals / n).sqrt();
    let max_iops = high_iops(points);
    Some(Fit {
        intercept,
        slope,
        sigma,
        max_iops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A volume whose latency grows with load, 100 µs at rest plus 1 µs per 100 IO/s, with
    /// a little noise.
    fn learned() -> LoadModel {
        let mut model = LoadModel::new(600, 0.5);
        for i in 0..300 {
            let iops = 1000.0 + (i % 50) as f64 * 100.0;
            let noise = ((i * 7919) % 11) as f64 * 1000.0;
            model.learn(iops, 100_000.0 + iops * 10.0 + noise);
        }
        model
    }

    #[test]
    fn nothing_is_judged_before_enough_is_learned() {
        let mut model = LoadModel::new(600, 0.5);
        for i in 0..MIN_POINTS - 1 {
            model.learn(1000.0 + (i % 4) as f64 * 1000.0, 100_000.0);
        }
        assert_eq!(model.judge(1000.0, 10_000_000.0), Load::Unknown);
        model.learn(1000.0, 100_000.0);
        assert!(matches!(
            model.judge(1000.0, 10_000_000.0),
            Load::Sick { .. }
        ));
    }

    #[test]
    fn slower_at_a_load_carried_before_is_sick_and_at_a_new_load_busy() {
        let model = learned();
        // Within the model: normal, wherever the load.
        assert_eq!(model.judge(3000.0, 135_000.0), Load::Normal);
        // 3x the latency at a load it carried well: sick.
        assert!(matches!(model.judge(3000.0, 390_000.0), Load::Sick { .. }));
        // The same latency at twice the highest load ever seen: busy.
        assert!(matches!(
            model.judge(12_000.0, 390_000.0),
            Load::Busy { .. }
        ));
    }

    #[test]
    fn one_odd_burst_does_not_raise_the_throughput_carried() {
        let mut model = learned();
        model.learn(60_000.0, 100_000.0);
        assert!(
            model.max_iops().is_some_and(|iops| iops < 6000.0),
            "{:?}",
            model.max_iops()
        );
        // So 3x the latency at 4000 IO/s is still slower at a load it carried: sick.
        assert!(matches!(model.judge(4000.0, 450_000.0), Load::Sick { .. }));
    }

    #[test]
    fn the_model_forgets_the_oldest_windows() {
        let mut model = LoadModel::new(40, 0.5);
        for i in 0..40 {
            model.learn(1000.0 + (i % 4) as f64 * 1000.0, 1_000_000.0);
        }
        for i in 0..40 {
            model.learn(1000.0 + (i % 4) as f64 * 1000.0, 100_000.0);
        }
        assert_eq!(model.len(), 40);
        assert!(matches!(model.judge(1000.0, 500_000.0), Load::Sick { .. }));
    }

    proptest! {
        /// Whatever it learned, the bound is a finite, non-negative latency everywhere it
        /// learned, and values that are not a window's teach it nothing.
        #[test]
        fn learned_windows_are_within_the_bound(points in proptest::collection::vec((1.0f64..1e6, 1.0f64..1e9), MIN_POINTS..200)) {
            let mut model = LoadModel::new(1000, 0.5);
            for &(iops, latency) in &points {
                model.learn(iops, latency);
            }
            for &(iops, _) in &points {
                let bound = model.bound_ns(iops).unwrap();
                prop_assert!(bound.is_finite() && bound >= 0.0);
            }
            // Garbage in teaches nothing.
            let before = model.len();
            model.learn(f64::NAN, 1.0);
            model.learn(1.0, f64::INFINITY);
            model.learn(0.0, 1.0);
            prop_assert_eq!(model.len(), before);
        }
    }
}
