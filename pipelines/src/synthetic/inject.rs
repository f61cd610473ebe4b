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

use std::fmt;
use std::str::FromStr;

use super::GeneratorConfig;
use crate::detect::AnomalyType;

/// More added events than this per injected minute is a typo, not a test.
pub(super) const MAX_ADDED_PER_MINUTE: u64 = 1_000_000;

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
    pub(super) fn resolve(name: &str, config: &GeneratorConfig) -> ClientRef {
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
pub(super) fn json_safe(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;
    use crate::synthetic::Generator;
    use crate::time::MINUTE_MS;

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
