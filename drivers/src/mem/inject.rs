//! Latency and error injection: how the `mem` controller reproduces a slow or failing device.
//!
//! Rules come from the device's `[[device.inject]]` tables and are evaluated in order for every
//! command; every rule that matches applies (latencies add up, the first error wins). A rule
//! matches by operation, by LBA range, and for a fraction of commands drawn from a per-queue
//! seeded generator, so a run is reproducible.

use fathom_telemetry::Clock;

use std::str::FromStr;
use std::time::Duration;

use fathom_nvme::Status;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpName {
    Read,
    Write,
    Flush,
}

/// Injected error, as the NVMe status the controller returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InjectedError {
    /// Media error: Unrecovered Read Error (SCT 2h, SC 81h).
    UnrecoveredRead,
    /// Media error: Write Fault (SCT 2h, SC 80h).
    WriteFault,
    /// Generic: Internal Error (SCT 0h, SC 06h).
    Internal,
    /// Generic: Data Transfer Error (SCT 0h, SC 04h).
    DataTransfer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRule {
    /// Which commands the rule applies to (default: all).
    #[serde(default = "InjectRule::all_ops")]
    pub ops: Vec<OpName>,
    /// Fraction of matching commands affected, 0.0..=1.0 (default 1.0).
    #[serde(default = "InjectRule::always")]
    pub fraction: f64,
    /// Only commands touching LBAs in [first, last] (inclusive; default: all).
    pub lbas: Option<[u64; 2]>,
    /// Added device latency: `"200us"`, `"uniform(100us,300us)"` or `"exponential(1ms)"`.
    pub latency: Option<LatencySpec>,
    /// Complete with this error instead of doing the transfer.
    pub error: Option<InjectedError>,
}

impl InjectRule {
    fn all_ops() -> Vec<OpName> {
        vec![OpName::Read, OpName::Write, OpName::Flush]
    }
    fn always() -> f64 {
        1.0
    }
}

/// Parses `"200us"`, `"1.5ms"`, `"2s"`, `"500ns"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 500ns, 200us, 1.5ms, 2s"))?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "" => return Err(format!("{text:?} needs a unit: ns, us, ms or s")),
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}: use ns, us, ms or s"
            ))
        }
    };
    if !(value.is_finite() && value >= 0.0 && value * scale < 3600.0) {
        return Err(format!("{text:?} is out of range (0 to 1h)"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// A latency distribution for injection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencySpec {
    Fixed(Duration),
    Uniform { min: Duration, max: Duration },
    Exponential { mean: Duration },
}

impl FromStr for LatencySpec {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let inner = |prefix: &str| {
            text.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(')'))
        };
        if let Some(args) = inner("uniform(") {
            let (min, max) = args.split_once(',').ok_or_else(|| {
                format!("{text:?}: write uniform(MIN,MAX), e.g. uniform(100us,300us)")
            })?;
            let (min, max) = (parse_duration(min)?, parse_duration(max)?);
            if min > max {
                return Err(format!("{text:?}: the minimum is above the maximum"));
            }
            Ok(LatencySpec::Uniform { min, max })
        } else if let Some(mean) = inner("exponential(") {
            Ok(LatencySpec::Exponential {
                mean: parse_duration(mean)?,
            })
        } else {
            parse_duration(text).map(LatencySpec::Fixed).map_err(|error| {
                format!("{error}; a latency is a duration (\"200us\"), \"uniform(MIN,MAX)\" or \"exponential(MEAN)\"")
            })
        }
    }
}

impl<'de> Deserialize<'de> for LatencySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

const READ: u8 = 1;
const WRITE: u8 = 2;
const FLUSH: u8 = 4;

/// The operation classes rules select on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read = READ as isize,
    Write = WRITE as isize,
    Flush = FLUSH as isize,
}

#[derive(Debug, Clone, Copy)]
enum Latency {
    Fixed(u64),
    Uniform { min: u64, span: u64 },
    Exponential { mean: f64 },
}

#[derive(Debug, Clone)]
struct Rule {
    ops: u8,
    /// Matches when a uniform u64 draw is below this; `u64::MAX` matches always.
    threshold: u64,
    first_lba: u64,
    last_lba: u64,
    latency: Option<Latency>,
    status: Option<Status>,
}

/// A device's injection rules, in clock ticks.
#[derive(Debug, Clone, Default)]
pub struct Injector {
    rules: Box<[Rule]>,
}

/// What injection decided for one command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay_ticks: u64,
    pub status: Option<Status>,
}

impl Injector {
    pub fn new(configs: &[InjectRule], clock: &Clock) -> Self {
        let rules = configs
            .iter()
            .map(|config| Rule {
                ops: config.ops.iter().fold(0, |mask, op| {
                    mask | match op {
                        OpName::Read => READ,
                        OpName::Write => WRITE,
                        OpName::Flush => FLUSH,
                    }
                }),
                threshold: if config.fraction >= 1.0 {
                    u64::MAX
                } else {
                    (config.fraction * u64::MAX as f64) as u64
                },
                first_lba: config.lbas.map_or(0, |[first, _]| first),
                last_lba: config.lbas.map_or(u64::MAX, |[_, last]| last),
                latency: config.latency.map(|spec| match spec {
                    LatencySpec::Fixed(duration) => {
                        Latency::Fixed(clock.duration_to_ticks(duration))
                    }
                    LatencySpec::Uniform { min, max } => {
                        let min = clock.duration_to_ticks(min);
                        Latency::Uniform {
                            min,
                            span: clock.duration_to_ticks(max) - min,
                        }
                    }
                    LatencySpec::Exponential { mean } => Latency::Exponential {
                        mean: clock.duration_to_ticks(mean) as f64,
                    },
                }),
                status: config.error.map(|error| match error {
                    InjectedError::UnrecoveredRead => Status::UNRECOVERED_READ_ERROR,
                    InjectedError::WriteFault => Status::WRITE_FAULT,
                    InjectedError::Internal => Status::INTERNAL_ERROR,
                    InjectedError::DataTransfer => Status::DATA_TRANSFER_ERROR,
                }),
            })
            .collect();
        Self { rules }
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides delay and error for a command on `blocks` LBAs from `slba` (flush: all LBAs).
    pub fn evaluate(&self, op: OpClass, slba: u64, blocks: u64, rng: &mut Rng) -> Injected {
        let mut injected = Injected::default();
        let last = slba.saturating_add(blocks.saturating_sub(1));
        for rule in self.rules.iter() {
            if rule.ops & op as u8 == 0 || last < rule.first_lba || slba > rule.last_lba {
                continue;
            }
            if rule.threshold != u64::MAX && rng.next_u64() >= rule.threshold {
                continue;
            }
            if let Some(latency) = rule.latency {
                let ticks = match latency {
                    Latency::Fixed(ticks) => ticks,
                    Latency::Uniform { min, span } => {
                        min + if span == 0 {
                            0
                        } else {
                            rng.next_u64() % (span + 1)
                        }
                    }
                    Latency::Exponential { mean } => {
                        // Inverse transform: -mean * ln(U), U uniform in (0, 1].
                        let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                        (-mean * (1.0 - uniform).ln()) as u64
                    }
                };
                injected.delay_ticks = injected.delay_ticks.saturating_add(ticks);
            }
            if injected.status.is_none() {
                injected.status = rule.status;
            }
        }
        injected
    }
}

/// xorshift64*: tiny, fast, good enough to pick commands; seeded per queue for reproducibility.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule(
        fraction: f64,
        lbas: Option<[u64; 2]>,
        latency: Option<&str>,
        error: Option<InjectedError>,
    ) -> InjectRule {
        InjectRule {
            ops: vec![OpName::Read, OpName::Write],
            fraction,
            lbas,
            latency: latency.map(|text| text.parse().unwrap()),
            error,
        }
    }

    #[test]
    fn rules_select_by_op_range_and_fraction() {
        let clock = Clock::monotonic();
        let injector = Injector::new(
            &[
                rule(
                    1.0,
                    Some([100, 199]),
                    None,
                    Some(InjectedError::UnrecoveredRead),
                ),
                rule(0.25, None, Some("1ms"), None),
            ],
            &clock,
        );
        let mut rng = Rng::new(7);
        assert_eq!(
            injector.evaluate(OpClass::Read, 150, 1, &mut rng).status,
            Some(Status::UNRECOVERED_READ_ERROR)
        );
        assert_eq!(
            injector.evaluate(OpClass::Read, 90, 11, &mut rng).status,
            Some(Status::UNRECOVERED_READ_ERROR)
        );
        assert_eq!(
            injector.evaluate(OpClass::Read, 200, 8, &mut rng).status,
            None
        );
        assert_eq!(
            injector.evaluate(OpClass::Flush, 150, 1, &mut rng),
            Injected::default()
        );
        let delayed = (0..100_000)
            .filter(|_| {
                injector
                    .evaluate(OpClass::Write, 0, 1, &mut rng)
                    .delay_ticks
                    > 0
            })
            .count();
        assert!(
            (23_000..27_000).contains(&delayed),
            "{delayed} of 100000 delayed at fraction 0.25"
        );
    }

    #[test]
    fn distributions_have_the_configured_shape() {
        let clock = Clock::monotonic();
        let mut rng = Rng::new(1);
        let uniform = Injector::new(
            &[rule(1.0, None, Some("uniform(100us,300us)"), None)],
            &clock,
        );
        let samples: Vec<u64> = (0..10_000)
            .map(|_| uniform.evaluate(OpClass::Read, 0, 1, &mut rng).delay_ticks)
            .collect();
        assert!(samples.iter().all(|&ns| (100_000..=300_000).contains(&ns)));
        let mean = samples.iter().sum::<u64>() / samples.len() as u64;
        assert!((190_000..210_000).contains(&mean), "uniform mean {mean}");
        let exponential = Injector::new(&[rule(1.0, None, Some("exponential(1ms)"), None)], &clock);
        let mean = (0..20_000)
            .map(|_| {
                exponential
                    .evaluate(OpClass::Read, 0, 1, &mut rng)
                    .delay_ticks
            })
            .sum::<u64>()
            / 20_000;
        assert!(
            (950_000..1_050_000).contains(&mean),
            "exponential mean {mean}"
        );
        assert_eq!(clock.duration_to_ticks(Duration::from_millis(1)), 1_000_000);
    }
}
