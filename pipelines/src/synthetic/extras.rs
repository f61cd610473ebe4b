//! The extra lines of a synthetic stream: steady clients' requests and
//! injected anomalies, scheduled a minute ahead and merged into the base
//! stream in event-time order (see [`super::inject`] for what each
//! injection does and why).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

use super::inject::{
    client_rate_per_minute, json_safe, ClientRef, Injection, InjectionKind, PlannedInjection,
    MAX_ADDED_PER_MINUTE,
};
use super::{ClientLabel, EventId, EventLine, GeneratorConfig, Traffic, METHODS};
use crate::detect::DetectorConfig;
use crate::time::MINUTE_MS;
use crate::Error;

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
