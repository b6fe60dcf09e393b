//! Latency and error injection: how a slow or failing device (or layer) is reproduced.
//!
//! Rules come from a device's `[[device.inject]]` tables (the `mem` controller applies them)
//! or, at run time, from the control channel (the engine's injection layer applies them at any
//! layer of a volume's IO path). They are evaluated in order for every command; every rule that
//! matches applies (latencies add up, the first error wins, a stall holds the command until
//! the rule is cleared). A rule matches by operation, by LBA range, and for a fraction of
//! commands drawn from a per-queue seeded generator, so a run is reproducible. A rule's
//! latency can follow a time profile from the moment it was installed: a step, a ramp, or
//! periodic spikes.

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
    /// Added device latency: `"200us"` (or `"fixed(200us)"`), `"uniform(100us,300us)"`,
    /// `"exponential(1ms)"` or `"pareto(100us,1.5)"`.
    pub latency: Option<LatencySpec>,
    /// Complete with this error instead of doing the transfer.
    pub error: Option<InjectedError>,
    /// Hold matching commands until the rule is cleared (run-time rules only).
    #[serde(default)]
    pub stall: bool,
    /// How the latency changes with time since the rule was installed (default: constant).
    pub profile: Option<ProfileSpec>,
}

impl InjectRule {
    /// A rule that adds `latency` to every command.
    pub fn latency(latency: LatencySpec) -> Self {
        Self {
            ops: Self::all_ops(),
            fraction: 1.0,
            lbas: None,
            latency: Some(latency),
            error: None,
            stall: false,
            profile: None,
        }
    }

    /// Checks what the types cannot: on failure, the field, its value and what is allowed.
    pub fn validate(&self) -> Result<(), (&'static str, String, &'static str)> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(("fraction", self.fraction.to_string(), "0.0 to 1.0"));
        }
        if let Some([first, last]) = self.lbas {
            if first > last {
                return Err((
                    "lbas",
                    format!("[{first}, {last}]"),
                    "[first, last] with first <= last",
                ));
            }
        }
        if self.latency.is_none() && self.error.is_none() && !self.stall {
            return Err((
                "latency",
                "nothing".into(),
                "a rule needs a latency, an error or a stall",
            ));
        }
        if self.ops.is_empty() {
            return Err((
                "ops",
                "[]".into(),
                "one or more of \"read\", \"write\", \"flush\"",
            ));
        }
        if self.profile.is_some() && self.latency.is_none() {
            return Err((
                "profile",
                "a profile".into(),
                "a profile scales a latency: give one",
            ));
        }
        Ok(())
    }

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
    Uniform {
        min: Duration,
        max: Duration,
    },
    Exponential {
        mean: Duration,
    },
    /// Heavy-tailed: `scale / U^(1/shape)`, at least `scale`; a smaller shape, a longer tail.
    Pareto {
        scale: Duration,
        shape: f64,
    },
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
        } else if let Some(args) = inner("pareto(") {
            let usage = || format!("{text:?}: write pareto(SCALE,SHAPE), e.g. pareto(100us,1.5)");
            let (scale, shape) = args.split_once(',').ok_or_else(usage)?;
            let scale = parse_duration(scale)?;
            let shape: f64 = shape.trim().parse().map_err(|_| usage())?;
            if !(shape.is_finite() && (0.1..=100.0).contains(&shape)) {
                return Err(format!("{text:?}: the shape must be 0.1 to 100"));
            }
            Ok(LatencySpec::Pareto { scale, shape })
        } else if let Some(mean) = inner("exponential(") {
            Ok(LatencySpec::Exponential {
                mean: parse_duration(mean)?,
            })
        } else if let Some(fixed) = inner("fixed(") {
            // The same as the bare duration, spelled as the other distributions are.
            Ok(LatencySpec::Fixed(parse_duration(fixed)?))
        } else {
            parse_duration(text).map(LatencySpec::Fixed).map_err(|error| {
                format!("{error}; a latency is a duration (\"200us\"), \"uniform(MIN,MAX)\", \"exponential(MEAN)\" or \"pareto(SCALE,SHAPE)\"")
            })
        }
    }
}

impl InjectedError {
    /// The NVMe status a controller completes the command with.
    pub fn status(self) -> Status {
        match self {
            InjectedError::UnrecoveredRead => Status::UNRECOVERED_READ_ERROR,
            InjectedError::WriteFault => Status::WRITE_FAULT,
            InjectedError::Internal => Status::INTERNAL_ERROR,
            InjectedError::DataTransfer => Status::DATA_TRANSFER_ERROR,
        }
    }
}

impl<'de> Deserialize<'de> for LatencySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How a rule's latency changes with time since the rule was installed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProfileSpec {
    /// `step(xN,AT)`: the latency times N from AT on.
    Step { factor: f64, at: Duration },
    /// `ramp(xA,xB,OVER)`: from A times the latency to B times, linearly over OVER, then B.
    Ramp { from: f64, to: f64, over: Duration },
    /// `spikes(xN,EVERY,FOR)`: the latency times N for FOR at the start of every EVERY;
    /// nothing added in between.
    Spikes {
        factor: f64,
        every: Duration,
        length: Duration,
    },
}

fn parse_factor(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let value: f64 = text
        .strip_prefix('x')
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| format!("{text:?} is not a factor: write e.g. x4 or x0.5"))?;
    if !(value.is_finite() && (0.0..=10_000.0).contains(&value)) {
        return Err(format!("{text:?}: a factor is x0 to x10000"));
    }
    Ok(value)
}

impl FromStr for ProfileSpec {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let usage = || {
            format!("{text:?} is not a profile: write step(x4,10s), ramp(x1,x10,30s) or spikes(x10,1s,100ms)")
        };
        let (name, args) = text
            .strip_suffix(')')
            .and_then(|rest| rest.split_once('('))
            .ok_or_else(usage)?;
        let args: Vec<&str> = args.split(',').collect();
        match (name.trim(), args.as_slice()) {
            ("step", [factor, at]) => Ok(ProfileSpec::Step {
                factor: parse_factor(factor)?,
                at: parse_duration(at)?,
            }),
            ("ramp", [from, to, over]) => {
                let over = parse_duration(over)?;
                if over.is_zero() {
                    return Err(format!("{text:?}: a ramp takes some time"));
                }
                Ok(ProfileSpec::Ramp {
                    from: parse_factor(from)?,
                    to: parse_factor(to)?,
                    over,
                })
            }
            ("spikes", [factor, every, length]) => {
                let (every, length) = (parse_duration(every)?, parse_duration(length)?);
                if every.is_zero() || length > every {
                    return Err(format!(
                        "{text:?}: spikes need a period above zero and no longer than it"
                    ));
                }
                Ok(ProfileSpec::Spikes {
                    factor: parse_factor(factor)?,
                    every,
                    length,
                })
            }
            _ => Err(usage()),
        }
    }
}

impl<'de> Deserialize<'de> for ProfileSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A profile in clock ticks.
#[derive(Debug, Clone, Copy)]
enum Profile {
    Step {
        factor: f64,
        at: u64,
    },
    Ramp {
        from: f64,
        to: f64,
        over: u64,
    },
    Spikes {
        factor: f64,
        every: u64,
        length: u64,
    },
}

impl Profile {
    /// The latency factor `elapsed` ticks after the rule was installed.
    #[inline]
    fn factor(self, elapsed: u64) -> f64 {
        match self {
            Profile::Step { factor, at } => {
                if elapsed >= at {
                    factor
                } else {
                    1.0
                }
            }
            Profile::Ramp { from, to, over } => {
                let done = (elapsed as f64 / over as f64).min(1.0);
                from + (to - from) * done
            }
            Profile::Spikes {
                factor,
                every,
                length,
            } => {
                if elapsed % every < length {
                    factor
                } else {
                    0.0
                }
            }
        }
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
    Pareto { scale: f64, inverse_shape: f64 },
}

#[derive(Debug, Clone)]
struct Rule {
    ops: u8,
    /// Matches when a uniform u64 draw is below this; `u64::MAX` matches always.
    threshold: u64,
    first_lba: u64,
    last_lba: u64,
    latency: Option<Latency>,
    profile: Option<Profile>,
    status: Option<Status>,
    stall: bool,
}

/// A device's injection rules, in clock ticks.
#[derive(Debug, Clone, Default)]
pub struct Injector {
    rules: Box<[Rule]>,
    /// When the rules were installed (clock ticks): where time profiles start.
    origin: u64,
}

/// What injection decided for one command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay_ticks: u64,
    pub status: Option<Status>,
    /// Hold the command until the rule is cleared.
    pub stall: bool,
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
                    LatencySpec::Pareto { scale, shape } => Latency::Pareto {
                        scale: clock.duration_to_ticks(scale) as f64,
                        inverse_shape: 1.0 / shape,
                    },
                }),
                profile: config.profile.map(|profile| match profile {
                    ProfileSpec::Step { factor, at } => Profile::Step {
                        factor,
                        at: clock.duration_to_ticks(at),
                    },
                    ProfileSpec::Ramp { from, to, over } => Profile::Ramp {
                        from,
                        to,
                        over: clock.duration_to_ticks(over).max(1),
                    },
                    ProfileSpec::Spikes {
                        factor,
                        every,
                        length,
                    } => Profile::Spikes {
                        factor,
                        every: clock.duration_to_ticks(every).max(1),
                        length: clock.duration_to_ticks(length),
                    },
                }),
                stall: config.stall,
                status: config.error.map(InjectedError::status),
            })
            .collect();
        Self {
            rules,
            origin: clock.now(),
        }
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides delay and error for a command on `blocks` LBAs from `slba` (flush: all LBAs).
    /// `now` is the clock's reading (for time profiles).
    pub fn evaluate(
        &self,
        op: OpClass,
        slba: u64,
        blocks: u64,
        now: u64,
        rng: &mut Rng,
    ) -> Injected {
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
                    Latency::Pareto {
                        scale,
                        inverse_shape,
                    } => {
                        // Inverse transform: scale / U^(1/shape), U uniform in (0, 1].
                        let uniform = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
                        (scale / uniform.powf(inverse_shape)).min(1e15) as u64
                    }
                };
                let ticks = match rule.profile {
                    Some(profile) => {
                        (ticks as f64 * profile.factor(now.saturating_sub(self.origin))) as u64
                    }
                    None => ticks,
                };
                injected.delay_ticks = injected.delay_ticks.saturating_add(ticks);
            }
            if injected.status.is_none() {
                injected.status = rule.status;
            }
            injected.stall |= rule.stall;
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
            stall: false,
            profile: None,
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
            injector.evaluate(OpClass::Read, 150, 1, 0, &mut rng).status,
            Some(Status::UNRECOVERED_READ_ERROR)
        );
        assert_eq!(
            injector.evaluate(OpClass::Read, 90, 11, 0, &mut rng).status,
            Some(Status::UNRECOVERED_READ_ERROR)
        );
        assert_eq!(
            injector.evaluate(OpClass::Read, 200, 8, 0, &mut rng).status,
            None
        );
        assert_eq!(
            injector.evaluate(OpClass::Flush, 150, 1, 0, &mut rng),
            Injected::default()
        );
        let delayed = (0..100_000)
            .filter(|_| {
                injector
                    .evaluate(OpClass::Write, 0, 1, 0, &mut rng)
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
            .map(|_| {
                uniform
                    .evaluate(OpClass::Read, 0, 1, 0, &mut rng)
                    .delay_ticks
            })
            .collect();
        assert!(samples.iter().all(|&ns| (100_000..=300_000).contains(&ns)));
        let mean = samples.iter().sum::<u64>() / samples.len() as u64;
        assert!((190_000..210_000).contains(&mean), "uniform mean {mean}");
        let exponential = Injector::new(&[rule(1.0, None, Some("exponential(1ms)"), None)], &clock);
        let mean = (0..20_000)
            .map(|_| {
                exponential
                    .evaluate(OpClass::Read, 0, 1, 0, &mut rng)
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

    #[test]
    fn pareto_has_its_floor_and_its_median() {
        let clock = Clock::monotonic();
        let mut rng = Rng::new(3);
        let pareto = Injector::new(&[rule(1.0, None, Some("pareto(100us,2)"), None)], &clock);
        let mut samples: Vec<u64> = (0..20_000)
            .map(|_| {
                pareto
                    .evaluate(OpClass::Read, 0, 1, 0, &mut rng)
                    .delay_ticks
            })
            .collect();
        samples.sort_unstable();
        assert!(samples[0] >= 100_000, "below the scale: {}", samples[0]);
        // Median of Pareto(scale, shape) is scale * 2^(1/shape): 141.4 us here.
        let median = samples[samples.len() / 2];
        assert!((135_000..148_000).contains(&median), "median {median}");
        assert!("pareto(100us)".parse::<LatencySpec>().is_err());
        assert!("pareto(100us,0)".parse::<LatencySpec>().is_err());
    }

    #[test]
    fn fixed_latency_has_a_named_form_too() {
        assert_eq!(
            "fixed(50us)".parse::<LatencySpec>().unwrap(),
            "50us".parse::<LatencySpec>().unwrap()
        );
        assert!("fixed(soon)".parse::<LatencySpec>().is_err());
    }

    #[test]
    fn profiles_scale_the_latency_with_time_since_install() {
        let clock = Clock::monotonic();
        let mut rng = Rng::new(5);
        let with = |profile: &str| {
            let mut rule = rule(1.0, None, Some("100us"), None);
            rule.profile = Some(profile.parse().unwrap());
            rule.validate().unwrap();
            Injector::new(&[rule], &clock)
        };
        let ms = 1_000_000u64;
        let step = with("step(x4,10ms)");
        let at = |injector: &Injector, elapsed: u64, rng: &mut Rng| {
            injector
                .evaluate(OpClass::Read, 0, 1, injector.origin + elapsed, rng)
                .delay_ticks
        };
        assert_eq!(at(&step, 5 * ms, &mut rng), 100_000);
        assert_eq!(at(&step, 10 * ms, &mut rng), 400_000);
        let ramp = with("ramp(x1,x3,20ms)");
        assert_eq!(at(&ramp, 0, &mut rng), 100_000);
        assert_eq!(at(&ramp, 10 * ms, &mut rng), 200_000);
        assert_eq!(at(&ramp, 60 * ms, &mut rng), 300_000);
        let spikes = with("spikes(x10,100ms,5ms)");
        assert_eq!(at(&spikes, 2 * ms, &mut rng), 1_000_000);
        assert_eq!(at(&spikes, 50 * ms, &mut rng), 0);
        assert_eq!(at(&spikes, 101 * ms, &mut rng), 1_000_000);
        for bad in [
            "step(4,1s)",
            "ramp(x1,x2,0s)",
            "spikes(x2,1s,2s)",
            "wobble(x2)",
        ] {
            assert!(bad.parse::<ProfileSpec>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_stall_rule_marks_commands_to_hold() {
        let clock = Clock::monotonic();
        let mut rng = Rng::new(9);
        let mut stall = rule(1.0, None, None, None);
        stall.stall = true;
        stall.validate().unwrap();
        let injector = Injector::new(&[stall], &clock);
        assert!(injector.evaluate(OpClass::Write, 0, 1, 0, &mut rng).stall);
        let empty = rule(1.0, None, None, None);
        assert_eq!(empty.validate().unwrap_err().0, "latency");
    }
}
