//! A client's learned behaviour and the rules that judge each closed
//! minute bucket against it.
//!
//! Statistical detectors (requests, error rate, p95 latency) score a bucket
//! in standard deviations above the client's EWMA baseline, with a noise
//! floor (Poisson noise for counts, 2 points for error rates, 10 % for
//! latency) and a minimum relative change, so that a quiet, flat history
//! does not alarm on small absolute changes. Rule-based detectors (new
//! endpoints, 401/403 bursts, sustained gateway denials, enumeration) score
//! in multiples of their trigger. No client alarms before its warm-up.
//!
//! A sparse client (fewer than `error_min_requests` in a minute) cannot be
//! judged on one minute: ten requests say little about a rate. Its minutes
//! are gathered in a window, closed once it holds `error_min_requests` or
//! spans `sparse_window_minutes` of event time, and the window is judged
//! as one bucket for error spikes, request spikes and 401/403 bursts (with
//! the noise floors of its request count), and teaches the error-rate
//! baseline like a dense minute does. So a client at ten requests a minute
//! whose answers turn 60 % 5xx is found within two minutes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::baseline::Ewma;
use super::{anomaly_id, deviation_percent, Anomaly, AnomalyType, DetectorConfig, MinuteSummary};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientDetector {
    buckets: u32,
    requests: Ewma,
    error_rate: Ewma,
    p95: Ewma,
    known_endpoints: BTreeSet<String>,
    /// Consecutive minutes with denials at or above the burst.
    denial_streak: u32,
    /// 401/403 answers per minute.
    auth_failures: Ewma,
    /// Requests the baseline has seen (endpoint novelty needs enough).
    learned_requests: u64,
    /// Sparse minutes gathered for judging together.
    window: SparseWindow,
}

/// Sparse minutes of a client not judged yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct SparseWindow {
    /// Minutes in the window (0 = empty).
    minutes: u32,
    first_minute_ms: i64,
    last_minute_ms: i64,
    requests: u64,
    server_errors: u64,
    auth_failures: u64,
}

struct Finding {
    kind: AnomalyType,
    /// Tells findings of one type in one bucket apart (in the id).
    rule: &'static str,
    score: f64,
    endpoint: Option<String>,
    baseline: f64,
    observed: f64,
    floor: f64,
    description: String,
}

impl ClientDetector {
    pub fn buckets_seen(&self) -> u32 {
        self.buckets
    }

    /// Gathers a sparse minute into the window, and judges the window when
    /// it is complete (or when a dense minute or a gap ends it).
    fn judge_window(
        &mut self,
        s: &MinuteSummary,
        cfg: &DetectorConfig,
        warm: bool,
        findings: &mut Vec<(i64, Finding)>,
    ) {
        let span = i64::from(cfg.sparse_window_minutes.max(1)) * 60_000;
        let sparse = s.requests < cfg.error_min_requests;
        // A dense minute, or one beyond the window's span, ends the window.
        if self.window.minutes > 0
            && (!sparse || s.minute_start_ms >= self.window.first_minute_ms + span)
        {
            self.close_window(cfg, warm, findings);
        }
        if !sparse || s.requests == 0 {
            return;
        }
        let w = &mut self.window;
        if w.minutes == 0 {
            w.first_minute_ms = s.minute_start_ms;
        }
        w.minutes += 1;
        w.last_minute_ms = s.minute_start_ms;
        w.requests += s.requests;
        w.server_errors += s.server_errors;
        w.auth_failures += s.auth_failures;
        if w.requests >= cfg.error_min_requests
            || s.minute_start_ms + 60_000 >= w.first_minute_ms + span
        {
            self.close_window(cfg, warm, findings);
        }
    }

    /// Judges and learns from the window, then empties it. Findings carry
    /// the window's last minute.
    fn close_window(
        &mut self,
        cfg: &DetectorConfig,
        warm: bool,
        findings: &mut Vec<(i64, Finding)>,
    ) {
        let w = std::mem::take(&mut self.window);
        if w.requests < cfg.sparse_min_requests.max(1) {
            return;
        }
        let at = w.last_minute_ms;
        let n = w.requests as f64;
        let minutes = f64::from(w.minutes.max(1));
        let mut errors_anomalous = false;
        let rate = w.server_errors as f64 / n;
        if warm
            && w.server_errors >= cfg.error_min_errors
            && self.error_rate.samples() >= cfg.min_baseline_samples
        {
            let mean = self.error_rate.mean();
            let p = mean.clamp(0.02, 0.98);
            let score = self
                .error_rate
                .score(rate, (p * (1.0 - p) / n).sqrt().max(0.02));
            if rate - mean >= cfg.error_min_increase && score >= cfg.statistical.low {
                errors_anomalous = true;
                findings.push((
                    at,
                    Finding {
                        kind: AnomalyType::SpikeInErrors,
                        rule: "errors-window",
                        score,
                        endpoint: None,
                        baseline: mean,
                        observed: rate,
                        floor: 0.01,
                        description: format!(
                            "{:.1} % of {} requests over {} minute(s) failed with 5xx against a baseline of {:.1} %",
                            rate * 100.0,
                            w.requests,
                            w.minutes,
                            mean * 100.0
                        ),
                    },
                ));
            }
        }
        if !errors_anomalous {
            self.error_rate.update(rate, cfg.alpha);
        }
        // Requests against the per-minute baseline over as many minutes.
        if warm && w.requests >= cfg.spike_min_requests {
            let expected = self.requests.mean().max(0.0) * minutes;
            let score = (n - expected) / expected.sqrt().max(1.0);
            if n >= cfg.spike_min_ratio * expected.max(1.0) && score >= cfg.statistical.low {
                findings.push((
                    at,
                    Finding {
                        kind: AnomalyType::SpikeInRequests,
                        rule: "requests-window",
                        score,
                        endpoint: None,
                        baseline: expected,
                        observed: n,
                        floor: 1.0,
                        description: format!(
                            "{} requests over {} minute(s) against a baseline of {expected:.1}",
                            w.requests, w.minutes
                        ),
                    },
                ));
            }
        }
        // 401/403 over the window against the trigger (and the usual rate
        // over as many minutes once learned).
        let usual = if self.auth_failures.samples() >= cfg.min_baseline_samples {
            self.auth_failures.mean() * minutes
        } else {
            0.0
        };
        let trigger = (cfg.auth_failure_burst.max(1) as f64)
            .max(cfg.auth_failure_baseline_ratio * usual)
            .max(0.05 * n);
        if w.auth_failures as f64 >= trigger {
            findings.push((
                at,
                Finding {
                    kind: AnomalyType::PotentialAbuse,
                    rule: "auth-failures-window",
                    score: w.auth_failures as f64 / trigger,
                    endpoint: None,
                    baseline: usual,
                    observed: w.auth_failures as f64,
                    floor: 1.0,
                    description: format!(
                        "{} authentication failures (401/403) over {} minute(s)",
                        w.auth_failures, w.minutes
                    ),
                },
            ));
        }
    }

    /// Judges one closed bucket, then learns from it.
    pub fn evaluate(
        &mut self,
        client: &str,
        s: &MinuteSummary,
        cfg: &DetectorConfig,
    ) -> Vec<Anomaly> {
        let warm = self.buckets >= cfg.warmup_buckets;
        let mut findings = Vec::new();
        // The window is judged against the baseline before this minute.
        let mut windowed: Vec<(i64, Finding)> = Vec::new();
        self.judge_window(s, cfg, warm, &mut windowed);
        let requests = s.requests as f64;

        // Requests.
        let mut requests_anomalous = false;
        if warm && s.requests >= cfg.spike_min_requests {
            let mean = self.requests.mean();
            let score = self.requests.score(requests, mean.sqrt().max(1.0));
            if requests >= cfg.spike_min_ratio * mean.max(1.0) && score >= cfg.statistical.low {
                requests_anomalous = true;
                findings.push(Finding {
                    kind: AnomalyType::SpikeInRequests,
                    rule: "requests",
                    score,
                    endpoint: None,
                    baseline: mean,
                    observed: requests,
                    floor: 1.0,
                    description: format!(
                        "{} requests in the minute against a baseline of {mean:.1}",
                        s.requests
                    ),
                });
            }
        }

        // Error rate.
        let mut errors_anomalous = false;
        let rate = (s.requests > 0).then(|| s.server_errors as f64 / requests);
        if let Some(rate) = rate.filter(|_| {
            warm && s.requests >= cfg.error_min_requests
                && s.server_errors >= cfg.error_min_errors
                && self.error_rate.samples() >= cfg.min_baseline_samples
        }) {
            let mean = self.error_rate.mean();
            // Binomial noise of this minute's count, at least 2 points.
            let p = mean.clamp(0.02, 0.98);
            let score = self
                .error_rate
                .score(rate, (p * (1.0 - p) / requests).sqrt().max(0.02));
            if rate - mean >= cfg.error_min_increase && score >= cfg.statistical.low {
                errors_anomalous = true;
                findings.push(Finding {
                    kind: AnomalyType::SpikeInErrors,
                    rule: "errors",
                    score,
                    endpoint: None,
                    baseline: mean,
                    observed: rate,
                    floor: 0.01,
                    description: format!(
                        "{:.1} % of requests failed with 5xx against a baseline of {:.1} %",
                        rate * 100.0,
                        mean * 100.0
                    ),
                });
            }
        }

        // Latency.
        let mut latency_anomalous = false;
        if let Some(p95) = s.p95_latency_ms.filter(|_| {
            warm && s.requests >= cfg.latency_min_requests.max(1)
                && self.p95.samples() >= cfg.min_baseline_samples
        }) {
            let mean = self.p95.mean();
            // A p95 over n requests of a heavy-tailed latency wanders by
            // about 2.2/sqrt(n) of itself (28 % at 60 requests), never
            // less than 10 %.
            let spread = (2.2 / requests.sqrt()).max(0.1);
            let score = self.p95.score(p95, (mean * spread).max(1.0));
            if p95 >= cfg.latency_min_ratio * mean && score >= cfg.statistical.low {
                latency_anomalous = true;
                findings.push(Finding {
                    kind: AnomalyType::LatencyDegradation,
                    rule: "latency",
                    score,
                    endpoint: None,
                    baseline: mean,
                    observed: p95,
                    floor: 1.0,
                    description: format!(
                        "p95 latency {p95:.1} ms against a baseline of {mean:.1} ms"
                    ),
                });
            }
        }

        // Endpoints never used in the baseline.
        let mut new: Vec<&(String, u64)> = s
            .endpoints
            .iter()
            .filter(|(e, n)| *n > 0 && !self.known_endpoints.contains(e))
            .collect();
        new.sort();
        let new_requests: u64 = new.iter().map(|(_, n)| n).sum();
        let established = self.learned_requests >= cfg.endpoint_baseline_min_requests;
        if warm && !new.is_empty() {
            if new.len() >= cfg.enumeration_endpoints {
                findings.push(Finding {
                    kind: AnomalyType::PotentialAbuse,
                    rule: "enumeration",
                    score: new.len() as f64 / cfg.enumeration_endpoints.max(1) as f64,
                    endpoint: None,
                    baseline: 0.0,
                    observed: new.len() as f64,
                    floor: 1.0,
                    description: format!(
                        "endpoint enumeration: {} never-used endpoints in one minute",
                        new.len()
                    ),
                });
            } else if established && new_requests >= cfg.new_endpoint_min_requests {
                // Severity grows with the share of traffic they take:
                // 5 % of requests is the trigger (score 1).
                let share = new_requests as f64 / requests.max(1.0);
                findings.push(Finding {
                    kind: AnomalyType::UnusualEndpointAccess,
                    rule: "new-endpoint",
                    score: (share / 0.05).max(cfg.rules.low),
                    endpoint: new.first().map(|(e, _)| e.clone()),
                    baseline: 0.0,
                    observed: new_requests as f64,
                    floor: 1.0,
                    description: format!(
                        "{} request(s) to {} endpoint(s) this client never used: {}",
                        new_requests,
                        new.len(),
                        new.iter()
                            .map(|(e, _)| e.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }

        // Bursts of 401/403: against the fixed trigger, and for a warm
        // client also against its own usual rate.
        let auth_learned = self.auth_failures.samples() >= cfg.min_baseline_samples;
        let usual_auth = if auth_learned {
            self.auth_failures.mean()
        } else {
            0.0
        };
        // Before it has learned, a busy client's share decides: 5 % of its
        // requests (90 of 9,000 is its normal 1 %, not a burst).
        let unlearned_floor = if auth_learned { 0.0 } else { 0.05 * requests };
        let auth_trigger = (cfg.auth_failure_burst.max(1) as f64)
            .max(cfg.auth_failure_baseline_ratio * usual_auth)
            .max(unlearned_floor);
        let auth_anomalous = s.auth_failures as f64 >= auth_trigger;
        if auth_anomalous {
            findings.push(Finding {
                kind: AnomalyType::PotentialAbuse,
                rule: "auth-failures",
                score: s.auth_failures as f64 / auth_trigger,
                endpoint: None,
                baseline: usual_auth,
                observed: s.auth_failures as f64,
                floor: 1.0,
                description: format!(
                    "{} authentication failures (401/403) in one minute",
                    s.auth_failures
                ),
            });
        }

        // Sustained gateway denials.
        if s.denials >= cfg.denial_burst {
            self.denial_streak += 1;
        } else {
            self.denial_streak = 0;
        }
        if self.denial_streak >= cfg.denial_minutes.max(1) {
            findings.push(Finding {
                kind: AnomalyType::PotentialAbuse,
                rule: "denials",
                score: s.denials as f64 / cfg.denial_burst.max(1) as f64,
                endpoint: None,
                baseline: 0.0,
                observed: s.denials as f64,
                floor: 1.0,
                description: format!(
                    "{} checks denied this minute, {} minutes in a row",
                    s.denials, self.denial_streak
                ),
            });
        }

        // Learn, except from what was just judged anomalous.
        if !requests_anomalous {
            self.requests.update(requests, cfg.alpha);
        }
        if let Some(rate) =
            rate.filter(|_| !errors_anomalous && s.requests >= cfg.error_min_requests)
        {
            self.error_rate.update(rate, cfg.alpha);
        }
        if let Some(p95) = s
            .p95_latency_ms
            .filter(|_| !latency_anomalous && s.requests >= cfg.latency_min_requests.max(1))
        {
            self.p95.update(p95, cfg.alpha);
        }
        // Until it has learned, a client's baseline takes every minute
        // (a busy client's ordinary 401s must not lock it at zero).
        if !auth_anomalous || !auth_learned {
            self.auth_failures.update(s.auth_failures as f64, cfg.alpha);
        }
        self.learned_requests = self.learned_requests.saturating_add(s.requests);
        for (e, n) in &s.endpoints {
            if *n > 0
                && self.known_endpoints.len() < cfg.max_known_endpoints
                && !self.known_endpoints.contains(e)
            {
                self.known_endpoints.insert(e.clone());
            }
        }
        self.buckets = self.buckets.saturating_add(1);

        findings
            .into_iter()
            .map(|f| (s.minute_start_ms, f))
            .chain(windowed)
            .filter_map(|(minute_start_ms, f)| {
                let thresholds = match f.kind {
                    AnomalyType::SpikeInRequests
                    | AnomalyType::SpikeInErrors
                    | AnomalyType::LatencyDegradation => &cfg.statistical,
                    _ => &cfg.rules,
                };
                let severity = thresholds.severity(f.score)?;
                Some(Anomaly {
                    anomaly_id: anomaly_id(
                        client,
                        f.kind,
                        minute_start_ms,
                        f.rule,
                        f.endpoint.as_deref(),
                    ),
                    client_id: client.to_string(),
                    endpoint: f.endpoint,
                    anomaly_type: f.kind,
                    severity,
                    detected_at_ms: minute_start_ms + 60_000,
                    description: f.description,
                    baseline: f.baseline,
                    observed: f.observed,
                    deviation_percent: deviation_percent(f.baseline, f.observed, f.floor),
                })
            })
            .collect()
    }
}
