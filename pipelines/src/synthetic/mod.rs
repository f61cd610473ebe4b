//! Deterministic synthetic request traffic for `tally gen`, benchmarks and
//! tests: Zipf-distributed clients and endpoints, a realistic status mix,
//! lognormal latencies, and optional injected duplicates, late events and
//! malformed lines. Optionally also steady clients (a fixed Poisson rate
//! each) and anomalies injected at known times ([`Injection`]). The same
//! configuration always yields the same lines.

mod extras;
mod inject;

use std::collections::VecDeque;
use std::fmt::{self, Write};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Zipf};

use crate::Error;

pub use inject::{client_rate_per_minute, Injection, InjectionKind, PlannedInjection};

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    pub clients: u32,
    pub endpoints: u32,
    /// Event time of the first event, epoch ms.
    pub start_ms: i64,
    /// Events per second of event time.
    pub events_per_second: f64,
    pub zipf_exponent: f64,
    /// Fraction of lines that repeat an earlier event (same `event_id`).
    pub duplicate_rate: f64,
    /// Fraction of events dated well before the allowed lateness.
    pub late_rate: f64,
    /// Fraction of lines that are malformed or invalid.
    pub malformed_rate: f64,
    /// Clients `steady-0001`, `steady-0002`, ... beside the Zipf clients,
    /// each with a Poisson number of requests per minute: a known, steady
    /// baseline to inject anomalies on.
    pub steady_clients: u32,
    /// Mean requests per minute of each steady client.
    pub steady_per_minute: f64,
    /// Anomalies to inject (see [`InjectionKind`]).
    pub injections: Vec<Injection>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            clients: 10_000,
            endpoints: 20,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            events_per_second: 1_000.0,
            zipf_exponent: 1.1,
            duplicate_rate: 0.0,
            late_rate: 0.0,
            malformed_rate: 0.0,
            steady_clients: 0,
            steady_per_minute: 60.0,
            injections: Vec::new(),
        }
    }
}

const RESOURCES: [&str; 12] = [
    "orders",
    "users",
    "products",
    "payments",
    "search",
    "cart",
    "inventory",
    "reports",
    "invoices",
    "shipments",
    "reviews",
    "sessions",
];
const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
const MALFORMED: [&str; 6] = [
    r#"{"client_id":"client-broken","endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":"#,
    r#"{"client_id":"client-00001","endpoint":"/v1/x","status":700,"latency_ms":1,"timestamp":1767225600000}"#,
    r#"{"endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":1767225600000}"#,
    r#"{"client_id":"client-00001","endpoint":"/v1/x","status":200,"latency_ms":-3,"timestamp":1767225600000}"#,
    r#"{"client_id":"client-00001","endpoint":"/v1/x","status":"200","latency_ms":1,"timestamp":1767225600000}"#,
    r#"{"client_id":"","endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":1767225600000}"#,
];

/// The route template of endpoint number `i`.
pub fn endpoint_name(i: u32) -> String {
    let resource = RESOURCES[(i as usize / 2) % RESOURCES.len()];
    let round = i as usize / (2 * RESOURCES.len());
    let version = if round == 0 {
        "v1".to_string()
    } else {
        format!("v{}", round + 1)
    };
    if i.is_multiple_of(2) {
        format!("/{version}/{resource}")
    } else {
        format!("/{version}/{resource}/{{id}}")
    }
}

/// The id of Zipf client number `rank` (1 = the busiest).
pub fn zipf_client_name(rank: u32) -> String {
    ClientLabel::Zipf(rank).to_string()
}

/// The id of steady client number `i` (from 1).
pub fn steady_client_name(i: u32) -> String {
    ClientLabel::Steady(i).to_string()
}

/// A client id, formatted only when written.
#[derive(Debug, Clone, Copy)]
enum ClientLabel<'a> {
    Zipf(u32),
    Steady(u32),
    Named(&'a str),
}

impl fmt::Display for ClientLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientLabel::Zipf(rank) => write!(f, "client-{rank:05}"),
            ClientLabel::Steady(i) => write!(f, "steady-{i:04}"),
            ClientLabel::Named(name) => f.write_str(name),
        }
    }
}

/// An `event_id`, unique per seed: base events, steady clients' events and
/// each injection's events are numbered separately.
#[derive(Debug, Clone, Copy)]
enum EventId {
    Base(u64),
    Steady(u64),
    Injected { injection: usize, n: u64 },
}

/// One request event about to be written.
struct EventLine<'a> {
    seed: u64,
    id: EventId,
    client: ClientLabel<'a>,
    endpoint: &'a str,
    method: &'a str,
    status: u16,
    request_bytes: u64,
    response_bytes: u64,
    latency_ms: f64,
    ts: i64,
}

impl EventLine<'_> {
    fn write_to(&self, out: &mut String) {
        let seed = self.seed;
        let _ = match self.id {
            EventId::Base(n) => write!(out, r#"{{"event_id":"{seed:x}-{n}""#),
            EventId::Steady(n) => write!(out, r#"{{"event_id":"{seed:x}-s{n}""#),
            EventId::Injected { injection, n } => {
                write!(out, r#"{{"event_id":"{seed:x}-i{injection}-{n}""#)
            }
        };
        let _ = write!(
            out,
            r#","client_id":"{}","endpoint":"{}","method":"{}","status":{},"request_bytes":{},"response_bytes":{},"latency_ms":{},"timestamp":{}}}"#,
            self.client,
            self.endpoint,
            self.method,
            self.status,
            self.request_bytes,
            self.response_bytes,
            self.latency_ms,
            self.ts
        );
    }
}

/// The request mix every generated client draws from.
struct Traffic {
    endpoints: Zipf<f64>,
    latency: LogNormal<f64>,
    endpoint_names: Vec<String>,
}

impl Traffic {
    fn endpoint(&self, rng: &mut ChaCha8Rng) -> &str {
        &self.endpoint_names[(self.endpoints.sample(rng) as usize).saturating_sub(1)]
    }

    /// 88.5 % 2xx, 5 % 404, 1 % each of 400, 401, 429; 3 % 5xx.
    fn status(rng: &mut ChaCha8Rng) -> u16 {
        match rng.random_range(0..1000) {
            0..=849 => 200,
            850..=899 => 201,
            900..=939 => 404,
            940..=949 => 400,
            950..=959 => 401,
            960..=969 => 429,
            970..=979 => 500,
            980..=989 => 502,
            _ => 503,
        }
    }

    /// Lognormal around 40 ms, microsecond resolution.
    fn latency_ms(&self, rng: &mut ChaCha8Rng) -> f64 {
        (self.latency.sample(rng) * 1000.0).round() / 1000.0
    }
}

pub struct Generator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    clients: Zipf<f64>,
    traffic: Traffic,
    recent: VecDeque<String>,
    produced: u64,
    /// Steady clients and injections; `None` leaves the plain Zipf stream
    /// on its fast path.
    extras: Option<extras::Extras>,
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Result<Self, Error> {
        let bad = |what: &str| Error::InvalidConfig(format!("generator: {what}"));
        if config.clients == 0 || config.endpoints == 0 {
            return Err(bad("clients and endpoints must be at least 1"));
        }
        if !config.events_per_second.is_finite() || config.events_per_second <= 0.0 {
            return Err(bad("events_per_second must be > 0"));
        }
        for (name, rate) in [
            ("duplicate_rate", config.duplicate_rate),
            ("late_rate", config.late_rate),
            ("malformed_rate", config.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(bad(&format!("{name} must be within 0..=1")));
            }
        }
        let clients = Zipf::new(f64::from(config.clients), config.zipf_exponent)
            .map_err(|e| bad(&format!("zipf over clients: {e}")))?;
        let endpoints = Zipf::new(f64::from(config.endpoints), 1.0)
            .map_err(|e| bad(&format!("zipf over endpoints: {e}")))?;
        let latency = LogNormal::new(40f64.ln(), 0.8).map_err(|e| bad(&format!("latency: {e}")))?;
        let extras = extras::Extras::new(&config)?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            traffic: Traffic {
                endpoints,
                latency,
                endpoint_names: (0..config.endpoints).map(endpoint_name).collect(),
            },
            config,
            clients,
            recent: VecDeque::with_capacity(1024),
            produced: 0,
            extras,
        })
    }

    /// Lines of the Zipf stream written so far (steady clients' and
    /// injected lines not counted): `tally gen --count` counts these, so
    /// that the event-time span stays `count / events_per_second`.
    pub fn base_lines(&self) -> u64 {
        self.produced
    }

    /// What each injection adds, as the generator carries it out.
    pub fn injection_plan(&self) -> Vec<PlannedInjection> {
        self.extras.as_ref().map(|e| e.plans()).unwrap_or_default()
    }

    /// Event time of base line `n` before its jitter.
    fn nominal_ms(&self, n: u64) -> i64 {
        self.config.start_ms + (n as f64 * 1000.0 / self.config.events_per_second) as i64
    }

    /// Appends the next line (without newline) to `out`: the next base line,
    /// or a steady client's or injected line that is due before it.
    pub fn next_line(&mut self, out: &mut String) {
        let now = self.nominal_ms(self.produced);
        if let Some(extras) = self.extras.as_mut() {
            if extras.next_due(now, &self.traffic, out) {
                return;
            }
        }
        self.next_base_line(out);
    }

    fn next_base_line(&mut self, out: &mut String) {
        let n = self.produced;
        self.produced += 1;
        let roll: f64 = self.rng.random();
        if roll < self.config.malformed_rate {
            out.push_str(MALFORMED[self.rng.random_range(0..MALFORMED.len())]);
            return;
        }
        if roll < self.config.malformed_rate + self.config.duplicate_rate && !self.recent.is_empty()
        {
            let i = self.rng.random_range(0..self.recent.len());
            out.push_str(&self.recent[i]);
            return;
        }
        let late =
            roll < self.config.malformed_rate + self.config.duplicate_rate + self.config.late_rate;
        let client = self.clients.sample(&mut self.rng) as u32;
        let endpoint = self.traffic.endpoint(&mut self.rng);
        let mut status = Traffic::status(&mut self.rng);
        let mut latency_ms = self.traffic.latency_ms(&mut self.rng);
        let request_bytes: u64 = self.rng.random_range(50..2_000);
        let response_bytes: u64 = self.rng.random_range(100..50_000);
        let base = self.nominal_ms(n);
        // Small disorder, as real gateways deliver; late events are far older.
        let mut ts = base - self.rng.random_range(0..2_000);
        if late {
            ts -= self.rng.random_range(6 * 60_000..30 * 60_000);
        }
        let method = METHODS[self.rng.random_range(0..METHODS.len())];
        if let Some(extras) = self.extras.as_mut() {
            extras.alter(
                inject::ClientRef::Zipf(client),
                ts,
                &mut status,
                &mut latency_ms,
            );
        }
        let start = out.len();
        EventLine {
            seed: self.config.seed,
            id: EventId::Base(n),
            client: ClientLabel::Zipf(client),
            endpoint,
            method,
            status,
            request_bytes,
            response_bytes,
            latency_ms,
            ts,
        }
        .write_to(out);
        if self.config.duplicate_rate > 0.0 {
            if self.recent.len() == self.recent.capacity() {
                self.recent.pop_front();
            }
            self.recent.push_back(out[start..].to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode_event_bytes;
    use crate::event::ValidationContext;

    pub(super) fn lines(config: GeneratorConfig, n: usize) -> Vec<String> {
        let mut g = Generator::new(config).unwrap();
        (0..n)
            .map(|_| {
                let mut s = String::new();
                g.next_line(&mut s);
                s
            })
            .collect()
    }

    #[test]
    fn same_seed_same_lines() {
        assert_eq!(
            lines(GeneratorConfig::default(), 200),
            lines(GeneratorConfig::default(), 200)
        );
        let other = GeneratorConfig {
            seed: 7,
            ..GeneratorConfig::default()
        };
        assert_ne!(lines(GeneratorConfig::default(), 50), lines(other, 50));
    }

    #[test]
    fn clean_stream_is_all_valid_and_injections_are_not() {
        let ctx = ValidationContext::lenient();
        for line in lines(GeneratorConfig::default(), 2_000) {
            decode_event_bytes(line.as_bytes(), &ctx).unwrap();
        }
        let dirty = GeneratorConfig {
            malformed_rate: 0.2,
            ..GeneratorConfig::default()
        };
        let bad = lines(dirty, 2_000)
            .iter()
            .filter(|l| decode_event_bytes(l.as_bytes(), &ctx).is_err())
            .count();
        assert!((250..=550).contains(&bad), "{bad} malformed of 2000 at 20%");
    }

    #[test]
    fn endpoint_names_are_distinct() {
        let names: std::collections::HashSet<String> = (0..100).map(endpoint_name).collect();
        assert_eq!(names.len(), 100);
    }

    #[test]
    fn client_names_have_fixed_width() {
        assert_eq!(zipf_client_name(7), "client-00007");
        assert_eq!(steady_client_name(12), "steady-0012");
    }
}
