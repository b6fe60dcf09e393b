//! The detector of one volume on one node: a [`Window`] a second, a [`Verdict`] each.
//!
//! **Signs.** A window is first checked against the fail-safes (an IO older than
//! [`Settings::stuck_op`], a smoke write slower than [`Settings::smoke_limit`] or failed):
//! either makes it sick at once. Then, on a primary with replicas, the **peer ratio**: the
//! local write latency over the replicas' latency for the same writes, against the ratio
//! learned while healthy, at the median and at p99 ([`Quantile`]). Load is matched by
//! construction (the same writes), so a ratio far above its baseline is the local device's
//! doing. Then the **self-model** ([`LoadModel`]):
//! latency above the model at a throughput the volume carried before is sick; at a higher one,
//! busy. A window with nothing against it is fine.
//!
//! **States with hysteresis.** healthy -> suspect at the first sick window; suspect ->
//! degraded after [`Settings::degrade_after`] sick windows in a row (a fail-safe degrades at
//! once; so do [`Settings::intermittent`] sick windows among the last
//! [`Settings::intermittent_of`], a device slow now and then); suspect -> healthy at a window
//! that is not sick; degraded -> recovering after
//! [`Settings::recover_after`] windows that are not sick; recovering -> degraded at a sick
//! one, -> healthy after [`Settings::healthy_after`] more. Busy is not sick: load never
//! degrades a volume. The model and the ratio baseline learn only from fine windows of a
//! healthy volume.
//!
//! Every verdict carries its reasons, with the values and the window they come from.

use serde::{Deserialize, Serialize};

use crate::model::{Load, LoadModel};

/// How the detector judges; the defaults detect a 20x step in 3 s and a 3x step in a few
/// more, and leave load alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Sick windows in a row that degrade a suspect volume.
    pub degrade_after: u32,
    /// Sick windows among the last `intermittent_of` that degrade a volume, though never
    /// `degrade_after` of them in a row.
    pub intermittent: u32,
    pub intermittent_of: u32,
    /// Windows that are not sick, in a row, before a degraded volume is recovering.
    pub recover_after: u32,
    /// And then before it is healthy again.
    pub healthy_after: u32,
    /// The peer ratio, over its healthy baseline, above which the local device is sick.
    pub peer_factor: f64,
    /// The self-model's bound lies at least this fraction above the fitted latency.
    pub model_margin: f64,
    /// Healthy windows the self-model keeps.
    pub model_windows: usize,
    /// Fail-safe: an IO in flight longer than this (ns).
    pub stuck_op_ns: u64,
    /// Fail-safe: a smoke write slower than this (ns).
    pub smoke_limit_ns: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            degrade_after: 3,
            intermittent: 5,
            intermittent_of: 10,
            recover_after: 3,
            healthy_after: 10,
            peer_factor: 2.0,
            model_margin: 0.5,
            model_windows: 600,
            stuck_op_ns: 5_000_000_000,
            smoke_limit_ns: 1_000_000_000,
        }
    }
}

/// One second of one volume, from the node's own telemetry.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    /// Its end, in seconds (any monotonic count: it names the window in explanations).
    pub second: u64,
    /// Completions per second (reads and writes).
    pub iops: f64,
    /// The clients' p99 latency (ns) over the window, reads and writes; `None` with no IO.
    pub p99_ns: Option<f64>,
    /// On a primary: its own copy's writes (the device stage) and each replica's answers to
    /// the same writes (its `replicate` stage); empty elsewhere.
    pub local_write: Option<Latency>,
    pub replica_writes: Vec<Latency>,
    /// The clients' IOs in flight on average over the window (Little's law: completions per
    /// second times their mean latency).
    pub depth: f64,
    /// The oldest IO still in flight at the window's end (ns; 0: none).
    pub oldest_op_ns: u64,
    /// On a primary: a replica is being resynchronised (the peer ratio is not learned).
    pub resyncing: bool,
    /// The window's smoke write: its latency (ns), or `None` if none was due.
    pub smoke_ns: Option<u64>,
    /// The smoke write failed or read back wrong.
    pub smoke_failed: bool,
}

/// A set of IOs' latency: the median and the tail (ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ns: f64,
    pub p99_ns: f64,
}

/// Where the peer ratio is taken. The median sees a device slowed for every write (a 3x
/// step) through the noise a busy CPU puts in the tail; the tail sees a device slow now and
/// then (spikes) that leaves the median alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantile {
    P50,
    P99,
}

impl Quantile {
    pub const ALL: [Quantile; 2] = [Quantile::P50, Quantile::P99];

    pub fn as_str(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P99 => "p99",
        }
    }

    /// As a fraction, as Prometheus labels quantiles.
    pub fn fraction(self) -> f64 {
        match self {
            Quantile::P50 => 0.5,
            Quantile::P99 => 0.99,
        }
    }

    pub fn of(self, latency: &Latency) -> f64 {
        match self {
            Quantile::P50 => latency.p50_ns,
            Quantile::P99 => latency.p99_ns,
        }
    }
}

/// A volume's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Suspect,
    Degraded,
    Recovering,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Suspect => "suspect",
            Health::Degraded => "degraded",
            Health::Recovering => "recovering",
        }
    }
}

/// What one window says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sign {
    Fine,
    /// Slow because of load: never held against the volume.
    Busy,
    Sick,
    /// A fail-safe: degrades at once.
    Stuck,
}

/// The verdict on one window: the state after it, the window's sign, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub second: u64,
    pub health: Health,
    /// The state changed with this window.
    pub changed: bool,
    pub sign: Sign,
    /// The signals and values behind the sign (empty when fine and nothing was notable).
    pub reasons: Vec<String>,
}

/// The detector of one volume.
#[derive(Debug, Clone)]
pub struct Detector {
    settings: Settings,
    health: Health,
    /// Sick windows in a row (while suspect), windows that are not sick in a row (while
    /// degraded or recovering).
    streak: u32,
    model: LoadModel,
    /// The peer ratio learned while healthy, per [`Quantile`].
    ratios: [RatioBaseline; 2],
    /// The last windows' sickness, a bit each, the newest lowest.
    recent: u32,
    /// The clients' queue depth in the healthy windows learned (the last `model_windows`).
    depths: std::collections::VecDeque<f64>,
}

/// A peer ratio learned while healthy: an average over fine windows.
#[derive(Debug, Clone, Copy, Default)]
struct RatioBaseline {
    value: Option<f64>,
    windows: u32,
}

impl RatioBaseline {
    /// The ratio counted as healthy, once enough windows are learned.
    fn get(&self) -> Option<f64> {
        self.value.filter(|_| self.windows >= RATIO_MIN_WINDOWS)
    }

    fn learn(&mut self, ratio: f64) {
        // Once learned, a ratio well above the baseline teaches nothing, though it is under
        // the limit: a device slowing by steps each below it would otherwise carry the
        // baseline up with it.
        if self
            .get()
            .is_some_and(|baseline| ratio > LEARN_BAND * baseline)
        {
            return;
        }
        self.windows += 1;
        let weight = 1.0 / self.windows.min(100) as f64;
        let baseline = self.value.unwrap_or(ratio);
        self.value = Some(baseline + (ratio - baseline) * weight);
    }
}

/// A learned peer ratio moves only with windows at most this many times it.
const LEARN_BAND: f64 = 1.5;

/// Windows the ratio baseline averages over before it is used.
const RATIO_MIN_WINDOWS: u32 = 10;

impl Detector {
    pub fn new(settings: Settings) -> Self {
        Self {
            model: LoadModel::new(settings.model_windows, settings.model_margin),
            settings,
            health: Health::Healthy,
            streak: 0,
            ratios: Default::default(),
            recent: 0,
            depths: std::collections::VecDeque::new(),
        }
    }

    /// Forgets what it learned (the self-model, the peer ratio, the usual queue depth) and
    /// learns again from the next healthy windows, its state kept: for a volume whose work
    /// changed in kind (this node became its primary, or a replica).
    pub fn relearn(&mut self) {
        self.model = LoadModel::new(self.settings.model_windows, self.settings.model_margin);
        self.ratios = Default::default();
        self.depths.clear();
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn model(&self) -> &LoadModel {
        &self.model
    }

    /// The clients' usual queue depth while healthy (the median of the windows learned).
    pub fn typical_depth(&self) -> Option<f64> {
        if self.depths.is_empty() {
            return None;
        }
        let mut depths: Vec<f64> = self.depths.iter().copied().collect();
        depths.sort_by(f64::total_cmp);
        Some(depths[depths.len() / 2])
    }

    /// The peer ratio at `quantile` it counts as healthy, once learned.
    pub fn ratio_baseline(&self, quantile: Quantile) -> Option<f64> {
        self.ratios[quantile as usize].get()
    }

    /// Sick windows among the last [`Settings::intermittent_of`].
    pub fn recent_sick(&self) -> u32 {
        (self.recent & ((1u32 << self.settings.intermittent_of.min(31)) - 1)).count_ones()
    }

    /// Judges one window and moves the state.
    pub fn observe(&mut self, window: &Window) -> Verdict {
        let (sign, reasons) = self.judge(window);
        self.apply(window, sign, reasons)
    }

    /// Moves the state on `window`'s sign as [`Detector::judge`] gave it, or as the caller
    /// changed it from what it knows beyond this volume (a node whose every volume is slow
    /// alike: load or a node fault, held against no single volume).
    pub fn apply(&mut self, window: &Window, sign: Sign, reasons: Vec<String>) -> Verdict {
        let before = self.health;
        self.recent = (self.recent << 1) | (sign == Sign::Sick) as u32;
        // Sick now and then, again and again (a device that stalls every few seconds):
        // degraded though never for `degrade_after` windows in a row.
        let intermittent = sign == Sign::Sick && self.recent_sick() >= self.settings.intermittent;
        let s = &self.settings;
        self.health = match (self.health, sign) {
            (_, Sign::Stuck) => Health::Degraded,
            (Health::Healthy | Health::Suspect, Sign::Sick) if intermittent => Health::Degraded,
            (Health::Healthy, Sign::Sick) => Health::Suspect,
            (Health::Healthy, _) => Health::Healthy,
            (Health::Suspect, Sign::Sick) if self.streak + 1 >= s.degrade_after => Health::Degraded,
            (Health::Suspect, Sign::Sick) => Health::Suspect,
            (Health::Suspect, _) => Health::Healthy,
            (Health::Degraded, Sign::Sick) => Health::Degraded,
            (Health::Degraded, _) if self.streak + 1 >= s.recover_after => Health::Recovering,
            (Health::Degraded, _) => Health::Degraded,
            (Health::Recovering, Sign::Sick) => Health::Degraded,
            (Health::Recovering, _) if self.streak + 1 >= s.healthy_after => Health::Healthy,
            (Health::Recovering, _) => Health::Recovering,
        };
        let counts = match self.health {
            Health::Suspect => sign == Sign::Sick,
            Health::Degraded | Health::Recovering => !matches!(sign, Sign::Sick | Sign::Stuck),
            Health::Healthy => false,
        };
        self.streak = match (self.health == before, counts) {
            (true, true) => self.streak + 1,
            (false, true) => 1,
            (_, false) => 0,
        };
        if self.health == Health::Healthy && before == Health::Healthy && sign == Sign::Fine {
            self.learn(window);
        }
        Verdict {
            second: window.second,
            health: self.health,
            changed: self.health != before,
            sign,
            reasons,
        }
    }

    fn learn(&mut self, window: &Window) {
        if let Some(p99) = window.p99_ns {
            self.model.learn(window.iops, p99);
        }
        if window.depth.is_finite() && window.depth > 0.0 {
            if self.depths.len() == self.settings.model_windows.max(1) {
                self.depths.pop_front();
            }
            self.depths.push_back(window.depth);
        }
        // A resync loads the primary's device with its reads and a replica's with its
        // writes: a ratio then is neither device's healthy one.
        if !window.resyncing {
            for quantile in Quantile::ALL {
                if let Some(ratio) = peer_ratio(window, quantile) {
                    self.ratios[quantile as usize].learn(ratio);
                }
            }
        }
    }

    /// The window's sign and the reasons for it; the state does not move.
    pub fn judge(&self, window: &Window) -> (Sign, Vec<String>) {
        let s = &self.settings;
        let at = window.second;
        let mut stuck = Vec::new();
        if window.oldest_op_ns > s.stuck_op_ns {
            stuck.push(format!(
                "an IO in flight for {} at second {at} (fail-safe: {})",
                ms(window.oldest_op_ns as f64),
                ms(s.stuck_op_ns as f64)
            ));
        }
        if window.smoke_failed {
            stuck.push(format!(
                "the smoke write failed or read back wrong at second {at}"
            ));
        } else if let Some(smoke) = window.smoke_ns.filter(|&ns| ns > s.smoke_limit_ns) {
            stuck.push(format!(
                "the smoke write took {} at second {at} (fail-safe: {})",
                ms(smoke as f64),
                ms(s.smoke_limit_ns as f64)
            ));
        }
        if !stuck.is_empty() {
            return (Sign::Stuck, stuck);
        }
        let mut reasons = Vec::new();
        let mut sick = false;
        let mut busy = false;
        let learned_iops = self.model.max_iops().unwrap_or(f64::INFINITY);
        let queueing = self.queueing(window);
        if let Some(why) = &queueing {
            reasons.push(why.clone());
        }
        for quantile in Quantile::ALL {
            let q = quantile.as_str();
            let (Some(ratio), Some(baseline)) =
                (peer_ratio(window, quantile), self.ratio_baseline(quantile))
            else {
                continue;
            };
            if ratio <= s.peer_factor * baseline {
                continue;
            }
            let factor = ratio / baseline;
            if queueing.is_some() {
                busy = true;
                reasons.push(format!(
                    "peer ratio at {q} {ratio:.2} at second {at} is {factor:.1}x its healthy {baseline:.2}: the clients' queue, not the device"
                ));
            } else if window.iops > learned_iops {
                // More load than it ever carried healthy: the primary's own work (its clients,
                // its fan-out) slows what it times of its device; load, not its device.
                busy = true;
                reasons.push(format!(
                    "peer ratio at {q} {ratio:.2} at second {at} is {factor:.1}x its healthy {baseline:.2}, at {:.0} IO/s, beyond the {learned_iops:.0} IO/s it was learned at: load, not sickness",
                    window.iops
                ));
            } else {
                sick = true;
                reasons.push(format!(
                    "peer ratio at {q} {ratio:.2} at second {at} is {factor:.1}x its healthy {baseline:.2} (limit {:.1}x): own write {q} {}, the replicas' for the same writes {}",
                    s.peer_factor,
                    ms(window.local_write.map_or(0.0, |local| quantile.of(&local))),
                    window
                        .replica_writes
                        .iter()
                        .map(|replica| ms(quantile.of(replica)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(p99) = window.p99_ns {
            match self.model.judge(window.iops, p99) {
                Load::Sick { bound_ns, .. } if queueing.is_some() => {
                    busy = true;
                    reasons.push(format!(
                        "p99 {} at {:.0} IO/s at second {at} is above the healthy model's {}: the clients' queue, not the device",
                        ms(p99),
                        window.iops,
                        ms(bound_ns)
                    ));
                }
                Load::Sick { bound_ns, max_iops } => {
                    sick = true;
                    reasons.push(format!(
                        "p99 {} at {:.0} IO/s at second {at} is above the healthy model's {} for that load (it carried up to {max_iops:.0} IO/s)",
                        ms(p99),
                        window.iops,
                        ms(bound_ns)
                    ));
                }
                Load::Busy { bound_ns, max_iops } => {
                    busy = true;
                    reasons.push(format!(
                        "p99 {} above the model's {} at {:.0} IO/s at second {at}, beyond the {max_iops:.0} IO/s it was learned at: load, not sickness",
                        ms(p99),
                        ms(bound_ns),
                        window.iops
                    ));
                }
                Load::Normal | Load::Unknown => {}
            }
        }
        let sign = match (sick, busy) {
            (true, _) => Sign::Sick,
            (false, true) => Sign::Busy,
            (false, false) => Sign::Fine,
        };
        (sign, reasons)
    }
}

impl Detector {
    /// Why the window's latency is the clients' queue (`None` if it is not). By Little's
    /// law latency is depth over throughput, so against the healthy windows it grew by the
    /// depth's factor times the throughput's loss: when far more IO is in flight than usual,
    /// and that factor is the larger, the IO waits its turn (load); when the throughput
    /// fell more (a device carrying less with the clients' queue as it was), it is not.
    fn queueing(&self, window: &Window) -> Option<String> {
        let max_iops = self.model.max_iops()?;
        let usual = self.typical_depth()?;
        let deeper = window.depth / usual;
        let slower = max_iops / window.iops.max(f64::MIN_POSITIVE);
        (deeper > QUEUE_FACTOR && deeper > slower).then(|| {
            format!(
                "{:.0} IOs in flight at second {}, {deeper:.1}x the usual healthy {usual:.1}, at {:.0} IO/s ({slower:.1}x below the {max_iops:.0} it carried): queueing",
                window.depth, window.second, window.iops
            )
        })
    }
}

/// A client queue this many times deeper than the usual healthy one may be queueing.
const QUEUE_FACTOR: f64 = 2.0;

/// The window's own write latency at `quantile` over the median of its replicas' for the
/// same writes.
pub fn peer_ratio(window: &Window, quantile: Quantile) -> Option<f64> {
    let local = window
        .local_write
        .map(|local| quantile.of(&local))
        .filter(|&ns| ns.is_finite() && ns > 0.0)?;
    let mut replicas: Vec<f64> = window
        .replica_writes
        .iter()
        .map(|replica| quantile.of(replica))
        .filter(|ns| ns.is_finite() && *ns > 0.0)
        .collect();
    if replicas.is_empty() {
        return None;
    }
    replicas.sort_by(f64::total_cmp);
    let median = replicas[replicas.len() / 2];
    Some(local / median)
}

/// `ns` as milliseconds, for reasons.
fn ms(ns: f64) -> String {
    format!("{:.3} ms", ns / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A primary at `iops` whose device writes in `local_us` and whose replicas answer in
    /// `replica_us`; the clients see the slower of the two (a majority write).
    fn window(second: u64, iops: f64, local_us: f64, replica_us: f64) -> Window {
        let client = local_us.max(replica_us) + 20.0;
        Window {
            second,
            iops,
            p99_ns: Some(client * 1000.0),
            local_write: Some(latency(local_us)),
            replica_writes: vec![latency(replica_us), latency(replica_us * 1.01)],
            ..Window::default()
        }
    }

    /// Writes whose p99 is `p99_us`, their median half of it.
    fn latency(p99_us: f64) -> Latency {
        Latency {
            p50_ns: p99_us * 500.0,
            p99_ns: p99_us * 1000.0,
        }
    }

    /// A detector that learned 60 healthy seconds between 1000 and 5000 IO/s.
    fn learned() -> (Detector, u64) {
        let mut detector = Detector::new(Settings::default());
        for second in 0..60 {
            let iops = 1000.0 + (second % 5) as f64 * 1000.0;
            let verdict = detector.observe(&window(second, iops, 40.0 + iops / 1000.0, 90.0));
            assert_eq!(verdict.health, Health::Healthy);
        }
        (detector, 60)
    }

    /// Seconds from `from` until the detector says degraded, feeding `make(second)`.
    fn seconds_to_degraded(
        detector: &mut Detector,
        from: u64,
        make: impl Fn(u64) -> Window,
    ) -> Option<u64> {
        (from..from + 60).find_map(|second| {
            (detector.observe(&make(second)).health == Health::Degraded)
                .then_some(second - from + 1)
        })
    }

    #[test]
    fn a_20x_step_on_the_primary_degrades_it_in_3_s_and_says_why() {
        let (mut detector, from) = learned();
        let took = seconds_to_degraded(&mut detector, from, |s| window(s, 3000.0, 860.0, 90.0));
        assert_eq!(took, Some(3));
        let verdict = detector.observe(&window(from + 3, 3000.0, 860.0, 90.0));
        assert!(
            verdict.reasons.iter().any(|r| r.contains("peer ratio")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_3x_step_degrades_it_too() {
        let (mut detector, from) = learned();
        let took = seconds_to_degraded(&mut detector, from, |s| window(s, 3000.0, 129.0, 90.0));
        assert!(took.is_some_and(|t| t <= 30), "{took:?}");
    }

    /// A primary on a busy CPU: every write's tail is the scheduler's (4-6 ms, here and on
    /// the replicas alike), its median the device's (`local_p50_us`; the replicas' 1.3 ms).
    fn noisy(second: u64, local_p50_us: f64) -> Window {
        let jitter = [0.0, 900.0, 300.0, 1500.0, 600.0][second as usize % 5];
        let replica = |us: f64| Latency {
            p50_ns: 1300e3,
            p99_ns: (us + jitter) * 1e3,
        };
        Window {
            second,
            iops: 4000.0,
            p99_ns: Some((5000.0 + local_p50_us + jitter) * 1e3),
            local_write: Some(Latency {
                p50_ns: local_p50_us * 1e3,
                p99_ns: (4000.0 + local_p50_us + jitter) * 1e3,
            }),
            replica_writes: vec![replica(5000.0), replica(4500.0)],
            ..Window::default()
        }
    }

    #[test]
    fn a_3x_step_lost_in_the_tails_noise_shows_in_the_median() {
        let mut detector = Detector::new(Settings::default());
        for second in 0..60 {
            let verdict = detector.observe(&noisy(second, 1100.0));
            assert_eq!(verdict.health, Health::Healthy, "{verdict:?}");
        }
        // Every write 2 ms slower: the tail ratio moves by under 1.5x, the median's by 2.8x.
        let took = seconds_to_degraded(&mut detector, 60, |s| noisy(s, 3100.0));
        assert_eq!(took, Some(3));
        let verdict = detector.observe(&noisy(63, 3100.0));
        assert!(
            verdict
                .reasons
                .iter()
                .any(|r| r.contains("peer ratio at p50")),
            "{verdict:?}"
        );
        assert!(
            !verdict.reasons.iter().any(|r| r.contains("at p99")),
            "{verdict:?}"
        );
    }

    #[test]
    fn spikes_every_other_second_degrade_though_never_three_in_a_row() {
        let (mut detector, from) = learned();
        let spiky = |s: u64| match s % 2 {
            0 => window(s, 3000.0, 860.0, 90.0),
            _ => window(s, 3000.0, 43.0, 90.0),
        };
        let took = seconds_to_degraded(&mut detector, from, spiky);
        assert!(took.is_some_and(|t| t <= 10), "{took:?}");
        // One sick window in five is noise: never degraded.
        let (mut detector, from) = learned();
        let rare = |s: u64| match s % 5 {
            0 => window(s, 3000.0, 860.0, 90.0),
            _ => window(s, 3000.0, 43.0, 90.0),
        };
        assert_eq!(seconds_to_degraded(&mut detector, from, rare), None);
    }

    #[test]
    fn load_is_not_sickness() {
        let (mut detector, from) = learned();
        // Twice the load ever seen, everything slower alike (queueing): busy, not degraded.
        for second in from..from + 120 {
            let verdict = detector.observe(&window(second, 10_000.0, 400.0, 800.0));
            assert_ne!(verdict.health, Health::Degraded, "{verdict:?}");
            assert_ne!(verdict.sign, Sign::Sick, "{verdict:?}");
        }
    }

    #[test]
    fn a_primary_slowed_by_more_load_than_ever_is_busy_though_its_ratio_rises() {
        let (mut detector, from) = learned();
        // Twice the load: the primary's own work (clients, fan-out) slows what it times of
        // its device more than the replicas' answers.
        for second in from..from + 60 {
            let verdict = detector.observe(&window(second, 10_000.0, 400.0, 150.0));
            assert_eq!(verdict.sign, Sign::Busy, "{verdict:?}");
            assert_eq!(verdict.health, Health::Healthy, "{verdict:?}");
        }
        // The same ratio at a load it carried before: its device.
        let took = seconds_to_degraded(&mut detector, from + 60, |s| {
            window(s, 3000.0, 400.0, 150.0)
        });
        assert_eq!(took, Some(3));
    }

    #[test]
    fn more_clients_queueing_on_a_saturated_primary_is_busy_and_a_sick_device_is_not() {
        let with_depth = |mut window: Window| {
            window.depth = window.iops * window.p99_ns.unwrap() / 1e9;
            window
        };
        let mut detector = Detector::new(Settings::default());
        for second in 0..60 {
            let iops = 1000.0 + (second % 5) as f64 * 1000.0;
            detector.observe(&with_depth(window(
                second,
                iops,
                40.0 + iops / 1000.0,
                90.0,
            )));
        }
        // Ten times the IO in flight at 80% of the most it carried: every IO waits its turn
        // at the primary, its own device stage the longest.
        for second in 60..120 {
            let mut w = window(second, 4000.0, 2000.0, 900.0);
            w.depth = 40.0;
            let verdict = detector.observe(&w);
            assert_eq!(verdict.sign, Sign::Busy, "{verdict:?}");
            assert!(
                verdict.reasons.iter().any(|r| r.contains("queueing")),
                "{verdict:?}"
            );
        }
        // The clients' queue as before, the throughput collapsed: the device.
        let took = seconds_to_degraded(&mut detector, 120, |s| {
            with_depth(window(s, 300.0, 2000.0, 90.0))
        });
        assert_eq!(took, Some(3));
    }

    #[test]
    fn relearning_forgets_the_models_and_keeps_the_state() {
        let (mut detector, from) = degraded_at_20x();
        detector.relearn();
        assert_eq!(detector.health(), Health::Degraded);
        assert_eq!(detector.ratio_baseline(Quantile::P50), None);
        assert_eq!(detector.ratio_baseline(Quantile::P99), None);
        assert_eq!(detector.model().len(), 0);
        assert_eq!(detector.typical_depth(), None);
        // Nothing learned judges nothing: a slow window is not sick.
        let verdict = detector.observe(&window(from, 3000.0, 860.0, 90.0));
        assert_ne!(verdict.sign, Sign::Sick, "{verdict:?}");
    }

    #[test]
    fn a_node_wide_slowdown_does_not_trip_the_peer_ratio() {
        let (mut detector, from) = learned();
        // Own device and replicas all 5x slower: the ratio holds; the self-model sees it.
        let verdict = detector.observe(&window(from, 3000.0, 215.0, 450.0));
        assert!(
            !verdict.reasons.iter().any(|r| r.contains("peer ratio")),
            "{verdict:?}"
        );
    }

    #[test]
    fn fail_safes_degrade_at_once() {
        for stuck in [
            Window {
                oldest_op_ns: 6_000_000_000,
                ..Window::default()
            },
            Window {
                smoke_ns: Some(1_500_000_000),
                ..Window::default()
            },
            Window {
                smoke_failed: true,
                ..Window::default()
            },
        ] {
            let mut detector = Detector::new(Settings::default());
            let verdict = detector.observe(&stuck);
            assert_eq!(verdict.health, Health::Degraded);
            assert_eq!(verdict.sign, Sign::Stuck);
            assert!(
                verdict.changed && !verdict.reasons.is_empty(),
                "{verdict:?}"
            );
        }
    }

    /// A learned detector taken to degraded by a 20x step, and the second it got there.
    fn degraded_at_20x() -> (Detector, u64) {
        let (mut detector, from) = learned();
        let took = seconds_to_degraded(&mut detector, from, |s| window(s, 3000.0, 860.0, 90.0))
            .expect("a 20x step degrades");
        (detector, from + took - 1)
    }

    #[test]
    fn recovery_takes_its_time_and_a_relapse_degrades_again() {
        let (mut detector, mut second) = degraded_at_20x();
        let mut states = Vec::new();
        for _ in 0..20 {
            second += 1;
            states.push(detector.observe(&window(second, 3000.0, 43.0, 90.0)).health);
        }
        assert_eq!(states[..2], [Health::Degraded, Health::Degraded]);
        assert_eq!(states[2], Health::Recovering);
        assert_eq!(states[12], Health::Healthy);
        // Recovering, then sick again: straight back to degraded.
        let (mut detector, mut second) = degraded_at_20x();
        for _ in 0..3 {
            second += 1;
            detector.observe(&window(second, 3000.0, 43.0, 90.0));
        }
        assert_eq!(detector.health(), Health::Recovering);
        let verdict = detector.observe(&window(second + 1, 3000.0, 860.0, 90.0));
        assert_eq!((verdict.health, verdict.changed), (Health::Degraded, true));
    }

    #[test]
    fn a_sick_volume_does_not_teach_its_models() {
        let (mut detector, from) = learned();
        let baseline = detector.ratio_baseline(Quantile::P99).unwrap();
        let learned = detector.model().len();
        for second in from..from + 30 {
            detector.observe(&window(second, 3000.0, 860.0, 90.0));
        }
        assert_eq!(detector.ratio_baseline(Quantile::P99), Some(baseline));
        assert_eq!(detector.model().len(), learned);
    }

    #[test]
    fn a_ratio_seen_during_a_resync_is_not_learned() {
        let mut detector = Detector::new(Settings::default());
        for second in 0..60 {
            // The primary's device reads for the resync: its writes 2.5x slower meanwhile.
            let mut w = window(second, 3000.0, 43.0 * 2.5, 90.0);
            w.resyncing = true;
            detector.observe(&w);
        }
        assert_eq!(detector.ratio_baseline(Quantile::P50), None);
        let (learned, _) = learned();
        assert!(learned.ratio_baseline(Quantile::P50).is_some());
    }

    #[test]
    fn a_ratio_creeping_up_under_the_limit_is_not_learned_and_a_step_then_degrades() {
        let (mut detector, from) = learned();
        let baseline = detector.ratio_baseline(Quantile::P99).unwrap();
        // 1.8x for a minute: under the 2x limit, above the learning band.
        for second in from..from + 60 {
            let verdict = detector.observe(&window(second, 3000.0, 43.0 * 1.8, 90.0));
            assert_eq!(verdict.health, Health::Healthy, "{verdict:?}");
        }
        let drifted = detector.ratio_baseline(Quantile::P99).unwrap();
        assert!(drifted < baseline * 1.05, "{baseline} -> {drifted}");
        let took = seconds_to_degraded(&mut detector, from + 60, |s| {
            window(s, 3000.0, 43.0 * 2.5, 90.0)
        });
        assert_eq!(took, Some(3));
    }

    proptest! {
        /// Whatever the windows, the states move only along the machine's edges and never
        /// panic; busy windows alone never degrade a volume.
        #[test]
        fn states_follow_the_machine(windows in proptest::collection::vec(
            (1.0f64..20_000.0, 1.0f64..5_000.0, 1.0f64..5_000.0, 0u64..8_000_000_000, proptest::option::of(0u64..2_000_000_000), any::<bool>()),
            1..200,
        )) {
            let mut detector = Detector::new(Settings::default());
            let mut before = Health::Healthy;
            for (second, (iops, local, replica, oldest, smoke, failed)) in windows.into_iter().enumerate() {
                let mut w = window(second as u64, iops, local, replica);
                w.oldest_op_ns = oldest;
                w.smoke_ns = smoke;
                w.smoke_failed = failed;
                let verdict = detector.observe(&w);
                let allowed = match (before, verdict.health) {
                    (a, b) if a == b => true,
                    (_, Health::Degraded) => matches!(verdict.sign, Sign::Sick | Sign::Stuck),
                    (Health::Healthy, Health::Suspect) => verdict.sign == Sign::Sick,
                    (Health::Suspect, Health::Healthy) => verdict.sign != Sign::Sick,
                    (Health::Degraded, Health::Recovering) => true,
                    (Health::Recovering, Health::Healthy) => true,
                    _ => false,
                };
                prop_assert!(allowed, "{before:?} -> {verdict:?}");
                prop_assert_eq!(verdict.changed, before != verdict.health);
                if verdict.sign != Sign::Fine {
                    prop_assert!(!verdict.reasons.is_empty(), "{verdict:?}");
                }
                before = verdict.health;
            }
        }
    }
}
