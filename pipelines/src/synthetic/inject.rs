//! Anomalies injected into the synthetic stream at known times, and the
//! steady clients to inject them on.
//!
//! A detector judges a client only after its warm-up (30 closed minutes
//! with events), and the statistical detectors only from 20 requests in a
//! minute; under Zipf over 10k clients only the top few clients have that
//! much traffic. An injection may therefore target a top-ranked Zipf client
//! (`client-00001` has about 15 % of all traffic at the default exponent)
//! or a steady client (`steady-0001`, ...: a Poisson number of requests per
//! minute around a fixed mean, with the request mix of everyone else),
//! whose normal rate is known by construction. The abuse kinds are rules
//! that need no baseline (the 401/403 burst) or only a warm client
//! (enumeration), so they may also target a client that appears nowhere
//! else.
//!
//! Every injection draws from its own seeded random stream and the steady
//! clients from theirs, so adding or removing an injection leaves every
//! line it does not touch unchanged. Extra lines are scheduled a minute
//! ahead of the base stream and written among its lines in event-time
//! order: the engine treats events older than its watermark (minus the
//! allowed lateness) as late.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

use super::{ClientLabel, EventId, EventLine, GeneratorConfig, Traffic, METHODS};
use crate::detect::{AnomalyType, DetectorConfig};
use crate::time::MINUTE_MS;
use crate::Error;

/// More added events than this per injected minute is a typo, not a test.
const MAX_ADDED_PER_MINUTE: u64 = 1_000_000;

/// What an injection does to its client's traffic, and what `size` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InjectionKind {
    /// `size` times the client's normal per-minute rate: every injected
    /// minute adds round((size - 1) x rate) requests with the usual
    /// endpoints and latencies. They all succeed (2xx): a real spike's 1 %
    /// of 401s would, from 2,000 requests a minute, also cross the absolute
    /// 401/403 burst trigger and blur which detector found what.
    RequestSpike,
    /// Each of the client's own requests in the window fails with a 5xx
    /// with probability `size` (0..=1), on top of its normal 3 % 5xx.
    ErrorSpike,
    /// The client's own requests in the window take `size` times as long.
    LatencyDegradation,
    /// round(`size`) requests per minute to an endpoint the generator never
    /// produces (`endpoint`, default `/internal/unusual-<index>`).
    UnusualEndpoint,
    /// round(`size` x 20) requests answered 401/403 (alternating) per
    /// minute on the busiest endpoint; 20 is the default burst trigger.
    AuthFailureBurst,
    /// round(`size` x 10) distinct never-seen endpoints probed once each
    /// (404) per minute; 10 is the default enumeration trigger.
    EndpointEnumeration,
}

impl InjectionKind {
    pub const ALL: [InjectionKind; 6] = [
        InjectionKind::RequestSpike,
        InjectionKind::ErrorSpike,
        InjectionKind::LatencyDegradation,
        InjectionKind::UnusualEndpoint,
        InjectionKind::AuthFailureBurst,
        InjectionKind::EndpointEnumeration,
    ];

    /// The name `tally gen --inject` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            InjectionKind::RequestSpike => "spike",
            InjectionKind::ErrorSpike => "errors",
            InjectionKind::LatencyDegradation => "latency",
            InjectionKind::UnusualEndpoint => "unusual-endpoint",
            InjectionKind::AuthFailureBurst => "auth-burst",
            InjectionKind::EndpointEnumeration => "enumeration",
        }
    }

    /// The anomaly the detectors should report for it.
    pub fn anomaly_type(self) -> AnomalyType {
        match self {
            InjectionKind::RequestSpike => AnomalyType::SpikeInRequests,
            InjectionKind::ErrorSpike => AnomalyType::SpikeInErrors,
            InjectionKind::LatencyDegradation => AnomalyType::LatencyDegradation,
            InjectionKind::UnusualEndpoint => AnomalyType::UnusualEndpointAccess,
            InjectionKind::AuthFailureBurst | InjectionKind::EndpointEnumeration => {
                AnomalyType::PotentialAbuse
            }
        }
    }

    /// `size` when none is given: clearly detectable at default settings.
    pub fn default_size(self) -> f64 {
        match self {
            InjectionKind::RequestSpike => 10.0,
            InjectionKind::ErrorSpike => 0.5,
            InjectionKind::LatencyDegradation => 5.0,
            InjectionKind::UnusualEndpoint => 10.0,
            InjectionKind::AuthFailureBurst => 2.0,
            InjectionKind::EndpointEnumeration => 2.0,
        }
    }
}

impl fmt::Display for InjectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InjectionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InjectionKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = InjectionKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown injection kind {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One anomaly to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub kind: InjectionKind,
    pub client: String,
    /// Start of the first injected minute, epoch ms. Aligned to a minute,
    /// each injected minute is one of the detectors' buckets.
    pub at_ms: i64,
    pub minutes: u32,
    /// See [`InjectionKind`].
    pub size: f64,
    /// [`InjectionKind::UnusualEndpoint`] only: the endpoint to call.
    pub endpoint: Option<String>,
}

impl Injection {
    pub fn new(kind: InjectionKind, client: &str, at_ms: i64, minutes: u32, size: f64) -> Self {
        Injection {
            kind,
            client: client.to_string(),
            at_ms,
            minutes,
            size,
            endpoint: None,
        }
    }
}

/// An injection as the generator carries it out.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedInjection {
    /// Position in [`GeneratorConfig::injections`]; injected events have
    /// `event_id` `<seed hex>-i<index>-<n>`.
    pub index: usize,
    pub injection: Injection,
    /// Events added in every injected minute (0 for the kinds that alter
    /// the client's own requests).
    pub added_per_minute: u64,
    /// The endpoint an unusual-endpoint injection calls.
    pub endpoint: Option<String>,
}

/// Expected requests per minute of `client` (its accepted events) in a
/// stream generated with `config`; `None` for a client it does not
/// generate.
pub fn client_rate_per_minute(config: &GeneratorConfig, client: &str) -> Option<f64> {
    match ClientRef::resolve(client, config) {
        ClientRef::Zipf(rank) => {
            let s = config.zipf_exponent;
            let norm: f64 = (1..=config.clients).map(|k| f64::from(k).powf(-s)).sum();
            // Malformed and duplicate lines take a base line's place; late
            // events are dated out of the minute and refused.
            let fresh =
                (1.0 - config.malformed_rate - config.duplicate_rate - config.late_rate).max(0.0);
            Some(60.0 * config.events_per_second * fresh * f64::from(rank).powf(-s) / norm)
        }
        ClientRef::Steady(_) => Some(config.steady_per_minute),
        ClientRef::Other => None,
    }
}

/// Which generated client an event or injection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientRef {
    Zipf(u32),
    Steady(u32),
    /// A client the generator does not produce on its own.
    Other,
}

impl ClientRef {
    fn resolve(name: &str, config: &GeneratorConfig) -> ClientRef {
        if let Some(rank) = numbered(name, "client-", 5) {
            if (1..=config.clients).contains(&rank) {
                return ClientRef::Zipf(rank);
            }
        }
        if let Some(i) = numbered(name, "steady-", 4) {
            if (1..=config.steady_clients).contains(&i) {
                return ClientRef::Steady(i);
            }
        }
        ClientRef::Other
    }
}

/// `n` if `name` is `prefix` and `n` zero-padded to `width`, exactly as the
/// generator writes it (`client-7` is not `client-00007`).
fn numbered(name: &str, prefix: &str, width: usize) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    let n: u32 = digits.parse().ok()?;
    (format!("{n:0width$}") == digits).then_some(n)
}

/// Injected ids and endpoints are written into JSON as they are.
fn json_safe(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

struct Planned {
    plan: PlannedInjection,
    target: ClientRef,
    rng: ChaCha8Rng,
    from_ms: i64,
    to_ms: i64,
    /// Next injected minute to schedule.
    next_minute: u32,
    /// Events written so far (numbers the event ids).
    written: u64,
}

struct Steady {
    clients: u32,
    per_minute: Poisson<f64>,
    rng: ChaCha8Rng,
    written: u64,
}

/// An extra line waiting for the base stream to reach its time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    ts: i64,
    /// Scheduling order: ties in `ts` keep it.
    order: u64,
    line: String,
}

/// Steady clients' and injected lines, merged into the base stream.
pub(super) struct Extras {
    seed: u64,
    start_ms: i64,
    steady: Option<Steady>,
    planned: Vec<Planned>,
    /// Extra lines of every minute before this are in `pending`.
    scheduled_until_ms: i64,
    pending: BinaryHeap<Reverse<Pending>>,
    order: u64,
}

impl Extras {
    /// `None` when there is nothing to add: the base stream's fast path.
    pub(super) fn new(config: &GeneratorConfig) -> Result<Option<Extras>, Error> {
        if config.steady_clients == 0 && config.injections.is_empty() {
            return Ok(None);
        }
        let steady = if config.steady_clients > 0 {
            let per_minute = Poisson::new(config.steady_per_minute)
                .ok()
                .filter(|_| config.steady_per_minute.is_finite())
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "generator: steady_per_minute must be > 0 (got {})",
                        config.steady_per_minute
                    ))
                })?;
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(1);
            Some(Steady {
                clients: config.steady_clients,
                per_minute,
                rng,
                written: 0,
            })
        } else {
            None
        };
        let planned = config
            .injections
            .iter()
            .enumerate()
            .map(|(index, injection)| plan(config, index, injection))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Extras {
            seed: config.seed,
            start_ms: config.start_ms,
            steady,
            planned,
            scheduled_until_ms: config.start_ms - config.start_ms.rem_euclid(MINUTE_MS),
            pending: BinaryHeap::new(),
            order: 0,
        }))
    }

    pub(super) fn plans(&self) -> Vec<PlannedInjection> {
        self.planned.iter().map(|p| p.plan.clone()).collect()
    }

    /// Writes the next extra line due at or before `now_ms` (the base
    /// stream's next nominal event time) to `out`; false if none is due.
    pub(super) fn next_due(&mut self, now_ms: i64, traffic: &Traffic, out: &mut String) -> bool {
        // A minute ahead: every extra line is pending before the base
        // stream reaches its time.
        while self.scheduled_until_ms <= now_ms.saturating_add(MINUTE_MS) {
            let minute = self.scheduled_until_ms;
            self.schedule_minute(minute, traffic);
            self.scheduled_until_ms += MINUTE_MS;
        }
        if self
            .pending
            .peek()
            .is_none_or(|Reverse(next)| next.ts > now_ms)
        {
            return false;
        }
        match self.pending.pop() {
            Some(Reverse(next)) => {
                out.push_str(&next.line);
                true
            }
            None => false,
        }
    }

    /// Applies the injections that alter a client's own requests.
    pub(super) fn alter(
        &mut self,
        client: ClientRef,
        ts: i64,
        status: &mut u16,
        latency_ms: &mut f64,
    ) {
        alter(&mut self.planned, client, ts, status, latency_ms);
    }

    fn schedule_minute(&mut self, minute: i64, traffic: &Traffic) {
        let Extras {
            seed,
            start_ms,
            steady,
            planned,
            pending,
            order,
            ..
        } = self;
        let mut push = |ts: i64, event: EventLine<'_>| {
            let mut line = String::with_capacity(256);
            event.write_to(&mut line);
            pending.push(Reverse(Pending {
                ts,
                order: *order,
                line,
            }));
            *order += 1;
        };
        if let Some(steady) = steady.as_mut() {
            for i in 1..=steady.clients {
                let n = steady.per_minute.sample(&mut steady.rng) as u64;
                for _ in 0..n {
                    let ts = minute + steady.rng.random_range(0..MINUTE_MS);
                    let drawn = Drawn::sample(traffic, &mut steady.rng);
                    if ts < *start_ms {
                        continue;
                    }
                    let (mut status, mut latency_ms) = (drawn.status, drawn.latency_ms);
                    alter(
                        planned,
                        ClientRef::Steady(i),
                        ts,
                        &mut status,
                        &mut latency_ms,
                    );
                    push(
                        ts,
                        EventLine {
                            seed: *seed,
                            id: EventId::Steady(steady.written),
                            client: ClientLabel::Steady(i),
                            endpoint: drawn.endpoint,
                            method: drawn.method,
                            status,
                            request_bytes: drawn.request_bytes,
                            response_bytes: drawn.response_bytes,
                            latency_ms,
                            ts,
                        },
                    );
                    steady.written += 1;
                }
            }
        }
        for p in planned.iter_mut().filter(|p| p.plan.added_per_minute > 0) {
            while p.next_minute < p.plan.injection.minutes {
                let from = p.from_ms + i64::from(p.next_minute) * MINUTE_MS;
                if from >= minute + MINUTE_MS {
                    break;
                }
                let n = p.plan.added_per_minute;
                for k in 0..n {
                    // Spread evenly over the minute, jittered within a slot.
                    let slot = (k as f64 + p.rng.random::<f64>()) * MINUTE_MS as f64 / n as f64;
                    let ts = from + (slot as i64).min(MINUTE_MS - 1);
                    let drawn = Drawn::sample(traffic, &mut p.rng);
                    let probe;
                    let (endpoint, method, status) = match p.plan.injection.kind {
                        InjectionKind::RequestSpike => (
                            drawn.endpoint,
                            drawn.method,
                            // The base stream's 2xx mix: 850 x 200 to 50 x 201.
                            if p.rng.random_range(0..18) == 0 {
                                201
                            } else {
                                200
                            },
                        ),
                        InjectionKind::UnusualEndpoint => {
                            (p.plan.endpoint.as_deref().unwrap_or_default(), "GET", 200)
                        }
                        InjectionKind::AuthFailureBurst => (
                            traffic.endpoint_names[0].as_str(),
                            "POST",
                            if k % 2 == 0 { 401 } else { 403 },
                        ),
                        InjectionKind::EndpointEnumeration => {
                            probe = format!("/probe/{}/{}/{k}", p.plan.index, p.next_minute);
                            (probe.as_str(), "GET", 404)
                        }
                        InjectionKind::ErrorSpike | InjectionKind::LatencyDegradation => {
                            (drawn.endpoint, drawn.method, drawn.status)
                        }
                    };
                    push(
                        ts,
                        EventLine {
                            seed: *seed,
                            id: EventId::Injected {
                                injection: p.plan.index,
                                n: p.written,
                            },
                            client: ClientLabel::Named(&p.plan.injection.client),
                            endpoint,
                            method,
                            status,
                            request_bytes: drawn.request_bytes,
                            response_bytes: drawn.response_bytes,
                            latency_ms: drawn.latency_ms,
                            ts,
                        },
                    );
                    p.written += 1;
                }
                p.next_minute += 1;
            }
        }
    }
}

fn alter(planned: &mut [Planned], client: ClientRef, ts: i64, status: &mut u16, latency: &mut f64) {
    for p in planned
        .iter_mut()
        .filter(|p| p.target == client && (p.from_ms..p.to_ms).contains(&ts))
    {
        let size = p.plan.injection.size;
        match p.plan.injection.kind {
            InjectionKind::ErrorSpike if p.rng.random_bool(size) => {
                *status = [500, 502, 503][p.rng.random_range(0..3)];
            }
            InjectionKind::LatencyDegradation => {
                *latency = (*latency * size * 1000.0).round() / 1000.0;
            }
            _ => {}
        }
    }
}

/// One request drawn from the common mix.
struct Drawn<'t> {
    endpoint: &'t str,
    method: &'static str,
    status: u16,
    request_bytes: u64,
    response_bytes: u64,
    latency_ms: f64,
}

impl<'t> Drawn<'t> {
    fn sample(traffic: &'t Traffic, rng: &mut ChaCha8Rng) -> Self {
        Drawn {
            endpoint: traffic.endpoint(rng),
            method: METHODS[rng.random_range(0..METHODS.len())],
            status: Traffic::status(rng),
            request_bytes: rng.random_range(50..2_000),
            response_bytes: rng.random_range(100..50_000),
            latency_ms: traffic.latency_ms(rng),
        }
    }
}

/// Checks an injection and works out what it adds.
fn plan(config: &GeneratorConfig, index: usize, inj: &Injection) -> Result<Planned, Error> {
    let bad = |what: String| {
        Error::InvalidConfig(format!(
            "injection {index} ({} on {:?}): {what}",
            inj.kind, inj.client
        ))
    };
    if !json_safe(&inj.client) {
        return Err(bad(
            "the client id must be non-empty, without quotes, backslashes or control characters"
                .into(),
        ));
    }
    if inj.minutes == 0 {
        return Err(bad("minutes must be at least 1".into()));
    }
    if inj.at_ms < config.start_ms {
        return Err(bad(format!(
            "it starts at {} ms, before the stream ({} ms)",
            inj.at_ms, config.start_ms
        )));
    }
    let to_ms = inj
        .at_ms
        .checked_add(i64::from(inj.minutes) * MINUTE_MS)
        .filter(|t| *t <= crate::time::MAX_EPOCH_MS)
        .ok_or_else(|| bad("it ends past the supported time range".into()))?;
    if !inj.size.is_finite() {
        return Err(bad(format!("size {} is not a number", inj.size)));
    }
    if inj.endpoint.is_some() && inj.kind != InjectionKind::UnusualEndpoint {
        return Err(bad("only unusual-endpoint takes an endpoint".into()));
    }
    let target = ClientRef::resolve(&inj.client, config);
    let generated = || -> Result<(), Error> {
        match target {
            ClientRef::Other => Err(bad(format!(
                "it alters the client's own requests, and the generator makes none for it \
                 (Zipf clients are client-00001..{}, {})",
                super::zipf_client_name(config.clients),
                match config.steady_clients {
                    0 => "no steady clients".to_string(),
                    n => format!("steady ones steady-0001..{}", super::steady_client_name(n)),
                }
            ))),
            _ => Ok(()),
        }
    };
    let size = inj.size;
    let defaults = DetectorConfig::default();
    let mut endpoint = None;
    let added_per_minute = match inj.kind {
        InjectionKind::RequestSpike => {
            let rate = client_rate_per_minute(config, &inj.client).ok_or_else(|| {
                bad(
                    "a spike multiplies the client's normal rate, which is known only for a \
                     Zipf client (client-NNNNN) or a steady one (steady-NNNN)"
                        .into(),
                )
            })?;
            if size <= 1.0 {
                return Err(bad(format!(
                    "a spike's size is a multiplier above 1, not {size}"
                )));
            }
            ((size - 1.0) * rate).round()
        }
        InjectionKind::ErrorSpike => {
            generated()?;
            if !(size > 0.0 && size <= 1.0) {
                return Err(bad(format!(
                    "an error spike's size is the failing fraction, within (0, 1], not {size}"
                )));
            }
            0.0
        }
        InjectionKind::LatencyDegradation => {
            generated()?;
            if size <= 0.0 {
                return Err(bad(format!(
                    "a latency degradation's size is a multiplier above 0, not {size}"
                )));
            }
            0.0
        }
        InjectionKind::UnusualEndpoint => {
            let name = inj
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("/internal/unusual-{index}"));
            if !json_safe(&name) {
                return Err(bad(format!("endpoint {name:?} cannot be written as is")));
            }
            if (0..config.endpoints).any(|i| super::endpoint_name(i) == name) {
                return Err(bad(format!(
                    "{name} is one of the generator's own endpoints, not an unusual one"
                )));
            }
            endpoint = Some(name);
            size.round()
        }
        InjectionKind::AuthFailureBurst => (size * defaults.auth_failure_burst as f64).round(),
        InjectionKind::EndpointEnumeration => {
            (size * defaults.enumeration_endpoints as f64).round()
        }
    };
    let adds = !matches!(
        inj.kind,
        InjectionKind::ErrorSpike | InjectionKind::LatencyDegradation
    );
    if adds && added_per_minute < 1.0 {
        return Err(bad(format!("size {size} adds no events")));
    }
    if added_per_minute > MAX_ADDED_PER_MINUTE as f64 {
        return Err(bad(format!(
            "size {size} adds more than {MAX_ADDED_PER_MINUTE} events per minute"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(2 + index as u64);
    Ok(Planned {
        plan: PlannedInjection {
            index,
            injection: inj.clone(),
            added_per_minute: added_per_minute as u64,
            endpoint,
        },
        target,
        rng,
        from_ms: inj.at_ms,
        to_ms,
        next_minute: 0,
        written: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;
    use crate::synthetic::Generator;

    /// 2026-03-02T00:00:00Z, a minute boundary.
    const T0: i64 = 1_772_409_600_000;

    fn config(injections: Vec<Injection>) -> GeneratorConfig {
        GeneratorConfig {
            clients: 100,
            events_per_second: 10.0,
            start_ms: T0,
            steady_clients: 2,
            steady_per_minute: 40.0,
            injections,
            ..GeneratorConfig::default()
        }
    }

    /// Every line until the base stream reaches `minutes` past `T0`.
    fn stream(config: GeneratorConfig, minutes: i64) -> Vec<Value> {
        let base_lines = (minutes * 60) as u64 * config.events_per_second as u64;
        let mut g = Generator::new(config).unwrap();
        let mut out = Vec::new();
        while g.base_lines() < base_lines {
            let mut line = String::new();
            g.next_line(&mut line);
            out.push(serde_json::from_str(&line).unwrap());
        }
        out
    }

    fn of_injection(lines: &[Value], index: usize) -> Vec<&Value> {
        let tag = format!("-i{index}-");
        lines
            .iter()
            .filter(|l| l["event_id"].as_str().unwrap().contains(&tag))
            .collect()
    }

    fn per_minute(lines: &[&Value]) -> BTreeMap<i64, usize> {
        let mut out = BTreeMap::new();
        for l in lines {
            let ts = l["timestamp"].as_i64().unwrap();
            *out.entry((ts - T0).div_euclid(MINUTE_MS)).or_default() += 1;
        }
        out
    }

    #[test]
    fn kinds_parse_by_name_and_unknown_names_list_the_known_ones() {
        for kind in InjectionKind::ALL {
            assert_eq!(kind.name().parse::<InjectionKind>(), Ok(kind));
        }
        let e = "surge".parse::<InjectionKind>().unwrap_err();
        assert!(
            e.contains("spike, errors, latency, unusual-endpoint"),
            "{e}"
        );
    }

    #[test]
    fn zipf_clients_rates_are_their_share_of_the_stream() {
        // Zipf s = 1 over 3 clients: weights 1, 1/2, 1/3 of H = 11/6; at
        // 11 events/s = 660/min that is 360, 180 and 120 a minute.
        let c = GeneratorConfig {
            clients: 3,
            zipf_exponent: 1.0,
            events_per_second: 11.0,
            ..config(vec![])
        };
        for (client, want) in [
            ("client-00001", 360.0),
            ("client-00002", 180.0),
            ("client-00003", 120.0),
            ("steady-0002", 40.0),
        ] {
            let got = client_rate_per_minute(&c, client).unwrap();
            assert!((got - want).abs() < 1e-9, "{client}: {got}");
        }
        for unknown in ["client-00004", "client-2", "steady-0003", "bob"] {
            assert_eq!(client_rate_per_minute(&c, unknown), None, "{unknown}");
        }
        // A 2x spike adds one normal minute: 180 events in each minute.
        let c = GeneratorConfig {
            injections: vec![Injection::new(
                InjectionKind::RequestSpike,
                "client-00002",
                T0 + 3 * MINUTE_MS,
                2,
                2.0,
            )],
            ..c
        };
        let lines = stream(c, 6);
        let spike = of_injection(&lines, 0);
        assert_eq!(per_minute(&spike), BTreeMap::from([(3, 180), (4, 180)]));
        assert!(spike.iter().all(|l| l["client_id"] == "client-00002"));
    }

    #[test]
    fn added_events_land_in_their_minutes_in_exact_counts() {
        let unusual = Injection {
            endpoint: Some("/admin/export".into()),
            ..Injection::new(
                InjectionKind::UnusualEndpoint,
                "steady-0002",
                T0 + 14 * MINUTE_MS,
                3,
                7.0,
            )
        };
        let lines = stream(
            config(vec![
                Injection::new(
                    InjectionKind::RequestSpike,
                    "steady-0001",
                    T0 + 10 * MINUTE_MS,
                    2,
                    3.0,
                ),
                Injection::new(
                    InjectionKind::AuthFailureBurst,
                    "intruder",
                    T0 + 12 * MINUTE_MS,
                    1,
                    1.5,
                ),
                Injection::new(
                    InjectionKind::EndpointEnumeration,
                    "steady-0002",
                    T0 + 13 * MINUTE_MS,
                    1,
                    2.0,
                ),
                unusual,
            ]),
            20,
        );

        // Spike 3x on 40/min: (3 - 1) x 40 = 80 more in each of 2 minutes,
        // all successful.
        let spike = of_injection(&lines, 0);
        assert_eq!(per_minute(&spike), BTreeMap::from([(10, 80), (11, 80)]));
        assert!(spike.iter().all(|l| l["client_id"] == "steady-0001"
            && [200, 201].contains(&l["status"].as_u64().unwrap())));

        // 1.5 x the trigger of 20: 30 answers, half 401 and half 403.
        let auth = of_injection(&lines, 1);
        assert_eq!(per_minute(&auth), BTreeMap::from([(12, 30)]));
        let statuses: Vec<u64> = auth.iter().map(|l| l["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses.iter().filter(|&&s| s == 401).count(), 15);
        assert_eq!(statuses.iter().filter(|&&s| s == 403).count(), 15);
        assert!(auth.iter().all(|l| l["client_id"] == "intruder"));

        // 2 x the trigger of 10: 20 distinct unknown endpoints, once each.
        let probes = of_injection(&lines, 2);
        assert_eq!(per_minute(&probes), BTreeMap::from([(13, 20)]));
        let endpoints: BTreeSet<&str> = probes
            .iter()
            .map(|l| l["endpoint"].as_str().unwrap())
            .collect();
        assert_eq!(endpoints.len(), 20);
        assert!(endpoints.iter().all(|e| e.starts_with("/probe/")));
        assert!(probes.iter().all(|l| l["status"] == 404));

        // 7 a minute to the named endpoint, for 3 minutes.
        let unusual = of_injection(&lines, 3);
        assert_eq!(
            per_minute(&unusual),
            BTreeMap::from([(14, 7), (15, 7), (16, 7)])
        );
        assert!(unusual.iter().all(|l| l["endpoint"] == "/admin/export"));

        // Steady clients: Poisson 40/min over 20 minutes is 800 requests,
        // standard deviation sqrt(800) = 28; the spike's are on top.
        for client in ["steady-0001", "steady-0002"] {
            let own = lines
                .iter()
                .filter(|l| {
                    l["client_id"] == client && !l["event_id"].as_str().unwrap().contains("-i")
                })
                .count();
            assert!((700..=900).contains(&own), "{client}: {own}");
        }

        // In event-time order up to the base stream's 2 s jitter.
        let mut newest = i64::MIN;
        for l in &lines {
            let ts = l["timestamp"].as_i64().unwrap();
            assert!(ts > newest.saturating_sub(2_000), "{l} after {newest}");
            newest = newest.max(ts);
        }
    }

    #[test]
    fn an_injection_leaves_every_other_line_unchanged_and_is_deterministic() {
        let spike = Injection::new(
            InjectionKind::RequestSpike,
            "client-00001",
            T0 + 2 * MINUTE_MS,
            1,
            4.0,
        );
        let with = stream(config(vec![spike.clone()]), 5);
        assert_eq!(with, stream(config(vec![spike]), 5));
        let without_injected: Vec<&Value> = with
            .iter()
            .filter(|l| !l["event_id"].as_str().unwrap().contains("-i0-"))
            .collect();
        let plain = stream(config(vec![]), 5);
        assert_eq!(without_injected, plain.iter().collect::<Vec<_>>());
        assert!(with.len() > plain.len());
    }

    #[test]
    fn alterations_touch_only_the_client_and_window() {
        let (from, to) = (T0 + 4 * MINUTE_MS, T0 + 7 * MINUTE_MS);
        let altered = stream(
            config(vec![
                Injection::new(InjectionKind::ErrorSpike, "client-00001", from, 3, 0.5),
                Injection::new(
                    InjectionKind::LatencyDegradation,
                    "steady-0001",
                    from,
                    3,
                    4.0,
                ),
            ]),
            9,
        );
        let plain = stream(config(vec![]), 9);
        assert_eq!(altered.len(), plain.len(), "nothing added");
        let (mut errors, mut window) = (0, 0);
        for (a, p) in altered.iter().zip(&plain) {
            let ts = p["timestamp"].as_i64().unwrap();
            let inside = (from..to).contains(&ts);
            let mut rest = a.clone();
            match p["client_id"].as_str().unwrap() {
                "client-00001" if inside => {
                    window += 1;
                    let (was, is) = (p["status"].as_u64().unwrap(), a["status"].as_u64().unwrap());
                    if is >= 500 {
                        errors += 1;
                    }
                    assert!(is == was || is >= 500, "{p} became {a}");
                    rest["status"] = p["status"].clone();
                }
                "steady-0001" if inside => {
                    let was = p["latency_ms"].as_f64().unwrap();
                    let is = a["latency_ms"].as_f64().unwrap();
                    assert!((is - 4.0 * was).abs() < 0.0011, "{was} -> {is}");
                    rest["latency_ms"] = p["latency_ms"].clone();
                }
                _ => {}
            }
            assert_eq!(&rest, p);
        }
        // Half of the requests fail, plus 3 % of the other half: 51.5 %.
        // Client 1 has 1 / H(100, 1.1) = 23 % of 600 a minute, about 420
        // in 3 minutes: the binomial standard deviation is 2.5 points.
        let share = f64::from(errors) / f64::from(window);
        assert!(window > 300, "{window}");
        assert!((0.44..=0.59).contains(&share), "{errors} of {window}");
    }

    #[test]
    fn bad_injections_are_refused_with_a_reason() {
        let at = T0 + MINUTE_MS;
        let spike = |client: &str, size: f64| {
            Injection::new(InjectionKind::RequestSpike, client, at, 1, size)
        };
        let cases = [
            (spike("bob", 3.0), "known only for a Zipf client"),
            (spike("client-00001", 1.0), "multiplier above 1"),
            (spike("client-00001", f64::NAN), "not a number"),
            (spike("bo\"b", 3.0), "without quotes"),
            (
                Injection::new(InjectionKind::ErrorSpike, "client-00001", at, 1, 1.5),
                "within (0, 1]",
            ),
            (
                Injection::new(InjectionKind::LatencyDegradation, "bob", at, 1, 2.0),
                "makes none for it",
            ),
            (
                Injection::new(InjectionKind::AuthFailureBurst, "bob", at, 0, 2.0),
                "minutes must be at least 1",
            ),
            (
                Injection::new(InjectionKind::AuthFailureBurst, "bob", T0 - 1, 1, 2.0),
                "before the stream",
            ),
            (
                Injection::new(InjectionKind::EndpointEnumeration, "bob", at, 1, 0.01),
                "adds no events",
            ),
            (
                Injection {
                    endpoint: Some("/v1/orders".into()),
                    ..Injection::new(InjectionKind::UnusualEndpoint, "bob", at, 1, 5.0)
                },
                "generator's own endpoints",
            ),
            (
                Injection {
                    endpoint: Some("/x".into()),
                    ..Injection::new(InjectionKind::AuthFailureBurst, "bob", at, 1, 5.0)
                },
                "only unusual-endpoint",
            ),
        ];
        for (injection, reason) in cases {
            let e = Generator::new(config(vec![injection.clone()]))
                .err()
                .unwrap_or_else(|| panic!("{injection:?} accepted"))
                .to_string();
            assert!(e.contains(reason), "{injection:?}: {e}");
        }
        let zero_rate = GeneratorConfig {
            steady_per_minute: 0.0,
            ..config(vec![])
        };
        assert!(Generator::new(zero_rate).is_err());
    }
}
