//! Detector scenarios on generated minute streams: steady traffic raises
//! (almost) nothing; injected anomalies of each type are found at the
//! right minute with a severity that grows with their size.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};

use super::*;

const MINUTE: i64 = 60_000;

/// A steady client: ~100 requests/min (Poisson), 1 % 5xx, p95 ~ 80 ms,
/// five endpoints.
struct Steady {
    rng: ChaCha8Rng,
    minute: i64,
}

impl Steady {
    fn new(seed: u64) -> Self {
        Steady {
            rng: ChaCha8Rng::seed_from_u64(seed),
            minute: 0,
        }
    }

    fn next(&mut self) -> MinuteSummary {
        let requests = Poisson::new(100.0).unwrap().sample(&mut self.rng) as u64;
        let errors = (0..requests).filter(|_| self.rng.random_bool(0.01)).count() as u64;
        let p95: f64 = Normal::new(80.0f64, 6.0).unwrap().sample(&mut self.rng);
        let p95 = p95.max(1.0);
        let mut endpoints: Vec<(String, u64)> = (0..5).map(|i| (format!("/v1/e{i}"), 0)).collect();
        for _ in 0..requests {
            endpoints[self.rng.random_range(0..5)].1 += 1;
        }
        let s = MinuteSummary {
            minute_start_ms: self.minute * MINUTE,
            requests,
            server_errors: errors,
            auth_failures: (0..requests).filter(|_| self.rng.random_bool(0.02)).count() as u64,
            denials: 0,
            p95_latency_ms: Some(p95),
            endpoints,
        };
        self.minute += 1;
        s
    }
}

/// Runs `warm` steady minutes, then the injected minute; returns what the
/// injected minute raised.
fn inject(seed: u64, warm: usize, change: impl FnOnce(&mut MinuteSummary)) -> Vec<Anomaly> {
    let cfg = DetectorConfig::default();
    let mut d = ClientDetector::default();
    let mut steady = Steady::new(seed);
    for _ in 0..warm {
        let s = steady.next();
        d.evaluate("c", &s, &cfg);
    }
    let mut s = steady.next();
    change(&mut s);
    d.evaluate("c", &s, &cfg)
}

fn only(found: &[Anomaly], kind: AnomalyType) -> Severity {
    let of_kind: Vec<&Anomaly> = found.iter().filter(|a| a.anomaly_type == kind).collect();
    assert_eq!(of_kind.len(), 1, "{kind:?} in {found:#?}");
    assert_eq!(
        of_kind[0].detected_at_ms,
        101 * MINUTE,
        "detected at the bucket end"
    );
    of_kind[0].severity
}

#[test]
fn a_steady_stream_raises_few_false_alarms() {
    // 200 clients x 8 hours of minutes = 96,000 judged buckets.
    let cfg = DetectorConfig::default();
    let mut alarms = 0;
    for client in 0..200u64 {
        let mut d = ClientDetector::default();
        let mut steady = Steady::new(client);
        for _ in 0..480 {
            let s = steady.next();
            alarms += d.evaluate("c", &s, &cfg).len();
        }
    }
    // Measured: 0 (default thresholds). The bound leaves room for an unlucky seed, not for a
    // detector that alarms routinely (that would be hundreds).
    assert!(
        alarms <= 5,
        "{alarms} false alarms in 96,000 steady buckets"
    );
}

#[test]
fn request_spikes_are_found_and_graded_by_size() {
    let severities: Vec<Severity> = [3.0, 5.0, 12.0, 30.0]
        .iter()
        .map(|&factor| {
            only(
                &inject(7, 100, |s| s.requests = (s.requests as f64 * factor) as u64),
                AnomalyType::SpikeInRequests,
            )
        })
        .collect();
    assert!(
        severities.windows(2).all(|w| w[0] <= w[1]),
        "{severities:?}"
    );
    assert!(severities[0] < severities[3], "{severities:?}");
}

#[test]
fn error_spikes_are_found_and_graded_by_size() {
    let severities: Vec<Severity> = [0.15, 0.3, 0.6, 0.95]
        .iter()
        .map(|&rate| {
            only(
                &inject(8, 100, |s| {
                    s.server_errors = (s.requests as f64 * rate) as u64
                }),
                AnomalyType::SpikeInErrors,
            )
        })
        .collect();
    assert!(
        severities.windows(2).all(|w| w[0] <= w[1]),
        "{severities:?}"
    );
    assert!(severities[0] < severities[3], "{severities:?}");
}

#[test]
fn latency_degradations_are_found_and_graded_by_size() {
    let severities: Vec<Severity> = [200.0, 400.0, 1_000.0, 5_000.0]
        .iter()
        .map(|&p95| {
            only(
                &inject(9, 100, |s| s.p95_latency_ms = Some(p95)),
                AnomalyType::LatencyDegradation,
            )
        })
        .collect();
    assert!(
        severities.windows(2).all(|w| w[0] <= w[1]),
        "{severities:?}"
    );
    assert!(severities[0] < severities[3], "{severities:?}");
}

#[test]
fn new_endpoints_enumeration_and_auth_bursts() {
    let found = inject(10, 100, |s| s.endpoints.push(("/admin/export".into(), 40)));
    let a: Vec<&Anomaly> = found
        .iter()
        .filter(|a| a.anomaly_type == AnomalyType::UnusualEndpointAccess)
        .collect();
    assert_eq!(a.len(), 1, "{found:#?}");
    assert_eq!(a[0].endpoint.as_deref(), Some("/admin/export"));
    let small = only(
        &inject(10, 100, |s| s.endpoints.push(("/admin/export".into(), 6))),
        AnomalyType::UnusualEndpointAccess,
    );
    assert!(small < a[0].severity, "{small:?} vs {:?}", a[0].severity);

    let enumeration = inject(11, 100, |s| {
        s.endpoints
            .extend((0..30).map(|i| (format!("/v1/guess/{i}"), 1)))
    });
    assert_eq!(
        only(&enumeration, AnomalyType::PotentialAbuse),
        Severity::Medium
    );

    let burst = |n: u64| {
        only(
            &inject(12, 100, |s| s.auth_failures = n),
            AnomalyType::PotentialAbuse,
        )
    };
    assert!(burst(25) < burst(200), "401/403 bursts graded by size");
}

#[test]
fn sustained_denials_alarm_only_when_sustained() {
    let cfg = DetectorConfig::default();
    let mut d = ClientDetector::default();
    let mut steady = Steady::new(13);
    let mut raised = Vec::new();
    for minute in 0..40 {
        let mut s = steady.next();
        if (35..40).contains(&minute) || minute == 20 {
            s.denials = 80;
        }
        let abuse = d
            .evaluate("c", &s, &cfg)
            .into_iter()
            .filter(|a| {
                a.anomaly_type == AnomalyType::PotentialAbuse && a.description.contains("denied")
            })
            .count();
        if abuse > 0 {
            raised.push(minute);
        }
    }
    // A single minute (20) is not sustained; 35..40 alarms from its third
    // minute on.
    assert_eq!(raised, vec![37, 38, 39]);
}

#[test]
fn nothing_alarms_during_warm_up_and_replays_are_identical() {
    assert!(inject(14, 10, |s| s.requests *= 50).is_empty());
    let run = || {
        inject(15, 100, |s| {
            s.requests *= 8;
            s.server_errors = s.requests / 2;
        })
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0].anomaly_id, a[1].anomaly_id);
}

#[test]
fn a_stray_request_to_a_new_endpoint_is_not_unusual_but_a_habit_is() {
    let unusual = |n: u64| {
        inject(14, 100, |s| s.endpoints.push(("/v1/new".into(), n)))
            .into_iter()
            .filter(|a| a.anomaly_type == AnomalyType::UnusualEndpointAccess)
            .count()
    };
    // The trigger is 3 requests (`new_endpoint_min_requests`).
    assert_eq!(unusual(1), 0);
    assert_eq!(unusual(2), 0);
    assert_eq!(unusual(3), 1);
}

#[test]
fn a_light_client_is_not_judged_on_endpoints_before_its_baseline_holds_enough() {
    // 4 requests a minute for 60 minutes = 240 learned requests, below
    // the 500 the endpoint baseline needs: a new endpoint is not unusual.
    let cfg = DetectorConfig::default();
    let mut d = ClientDetector::default();
    let minute = |m: i64, endpoints: Vec<(String, u64)>| MinuteSummary {
        minute_start_ms: m * MINUTE,
        requests: endpoints.iter().map(|(_, n)| n).sum(),
        endpoints,
        ..MinuteSummary::default()
    };
    for m in 0..60 {
        assert!(d
            .evaluate("light", &minute(m, vec![("/v1/a".into(), 4)]), &cfg)
            .is_empty());
    }
    let found = d.evaluate("light", &minute(60, vec![("/v1/b".into(), 4)]), &cfg);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_busy_clients_usual_auth_failures_are_no_burst_but_three_times_them_is() {
    // A busy client: 3,000 requests a minute with its ordinary 1 % of
    // 401/403 (~30, over the fixed trigger of 20). Neither its first
    // minutes (5 % of requests decides before the baseline has learned)
    // nor later ones (3x its usual decides) are bursts.
    let cfg = DetectorConfig::default();
    let mut d = ClientDetector::default();
    let mut steady = Steady::new(15);
    let mut alarms = 0;
    for _ in 0..100 {
        let mut s = steady.next();
        s.requests = 3_000;
        s.auth_failures += 28;
        alarms += d
            .evaluate("busy", &s, &cfg)
            .iter()
            .filter(|a| a.anomaly_type == AnomalyType::PotentialAbuse)
            .count();
    }
    assert_eq!(alarms, 0, "its usual 401/403s raised {alarms} alarms");
    let mut s = steady.next();
    s.requests = 3_000;
    s.auth_failures = 100;
    let found = d.evaluate("busy", &s, &cfg);
    assert_eq!(
        found
            .iter()
            .filter(|a| a.anomaly_type == AnomalyType::PotentialAbuse)
            .count(),
        1,
        "{found:#?}"
    );
}

/// A small client: Poisson(`rate`) requests a minute, 1 % 5xx, 1 % 401/403,
/// one or two endpoints, steady latency.
struct Small {
    rng: ChaCha8Rng,
    minute: i64,
    rate: f64,
}

impl Small {
    fn new(seed: u64, rate: f64) -> Self {
        Small {
            rng: ChaCha8Rng::seed_from_u64(seed),
            minute: 0,
            rate,
        }
    }

    fn next(&mut self) -> MinuteSummary {
        let requests = Poisson::new(self.rate).unwrap().sample(&mut self.rng) as u64;
        let errors = (0..requests).filter(|_| self.rng.random_bool(0.01)).count() as u64;
        let auth = (0..requests).filter(|_| self.rng.random_bool(0.01)).count() as u64;
        let s = MinuteSummary {
            minute_start_ms: self.minute * MINUTE,
            requests,
            server_errors: errors,
            auth_failures: auth,
            denials: 0,
            p95_latency_ms: (requests > 0).then_some(40.0),
            endpoints: vec![("/v1/a".into(), requests)],
        };
        self.minute += 1;
        s
    }
}

/// Runs a small client for `warm` minutes, then `minutes` changed ones;
/// returns what the changed minutes raised, with the minute each came in.
fn small_incident(
    seed: u64,
    rate: f64,
    warm: usize,
    minutes: usize,
    change: impl Fn(&mut MinuteSummary),
) -> Vec<(usize, Anomaly)> {
    let cfg = DetectorConfig::default();
    let mut d = ClientDetector::default();
    let mut small = Small::new(seed, rate);
    for _ in 0..warm {
        let s = small.next();
        d.evaluate("small", &s, &cfg);
    }
    let mut raised = Vec::new();
    for m in 0..minutes {
        let mut s = small.next();
        change(&mut s);
        raised.extend(d.evaluate("small", &s, &cfg).into_iter().map(|a| (m, a)));
    }
    raised
}

/// The reproduction: a client with ~10 requests a minute whose
/// answers turn 60 % 5xx for five minutes raised nothing, because no
/// minute had the 20 requests an error rate needs.
#[test]
fn a_small_clients_error_storm_is_found_over_a_window_of_minutes() {
    let raised = small_incident(21, 10.0, 120, 5, |s| {
        s.server_errors = (s.requests as f64 * 0.6).round() as u64
    });
    let errors: Vec<&(usize, Anomaly)> = raised
        .iter()
        .filter(|(_, a)| a.anomaly_type == AnomalyType::SpikeInErrors)
        .collect();
    assert!(!errors.is_empty(), "{raised:#?}");
    // Found within the first windows of the storm (a window closes at 20
    // requests, about two minutes here).
    assert!(errors[0].0 <= 2, "first found in minute {}", errors[0].0);
    assert!(errors[0].1.description.contains("minute(s)"));
    assert!(
        errors[0].1.severity >= Severity::Medium,
        "{:?}",
        errors[0].1
    );
}

#[test]
fn a_small_clients_request_spike_and_auth_burst_are_found_over_a_window() {
    // 2 requests a minute, then 15: no single minute reaches the 20 a
    // spike needs, two together do.
    let spike = small_incident(22, 2.0, 120, 4, |s| s.requests = 15);
    assert!(
        spike
            .iter()
            .any(|(m, a)| a.anomaly_type == AnomalyType::SpikeInRequests && *m <= 2),
        "{spike:#?}"
    );
    // 10 requests a minute, every one answered 401: 20 in two minutes.
    let burst = small_incident(23, 10.0, 120, 4, |s| s.auth_failures = s.requests);
    assert!(
        burst
            .iter()
            .any(|(m, a)| a.anomaly_type == AnomalyType::PotentialAbuse && *m <= 3),
        "{burst:#?}"
    );
}

/// The false-alarm rate on steady small clients: 300 clients at 1, 3 and
/// 10 requests a minute, eight hours each (144,000 client-minutes).
#[test]
fn steady_small_clients_raise_almost_no_false_alarms() {
    let cfg = DetectorConfig::default();
    let mut alarms = Vec::new();
    for client in 0..300u64 {
        let rate = [1.0, 3.0, 10.0][(client % 3) as usize];
        let mut d = ClientDetector::default();
        let mut small = Small::new(1000 + client, rate);
        for _ in 0..480 {
            let s = small.next();
            alarms.extend(d.evaluate("small", &s, &cfg));
        }
    }
    // Measured: 16 (0.011 %), all LOW request spikes (a Poisson(10)
    // client's 21-request minute is 4 noise floors up). The bound leaves
    // room for an unlucky seed, not for a detector that alarms routinely.
    assert!(
        alarms.len() <= 30,
        "{} false alarms in 144,000 small-client minutes: {:#?}",
        alarms.len(),
        &alarms[..alarms.len().min(5)]
    );
    assert!(
        alarms.iter().all(|a| a.severity == Severity::Low),
        "{alarms:#?}"
    );
}
