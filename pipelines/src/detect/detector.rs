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

    /// Judges one closed bucket, then learns from it.
    pub fn evaluate(
        &mut self,
        client: &str,
        s: &MinuteSummary,
        cfg: &DetectorConfig,
    ) -> Vec<Anomaly> {
        let warm = self.buckets >= cfg.warmup_buckets;
        let mut findings = Vec::new();
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
        if let Some(rate) = rate.filter(|_| warm && s.requests >= cfg.error_min_requests) {
            let mean = self.error_rate.mean();
            let score = self.error_rate.score(rate, 0.02);
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
        if let Some(p95) = s.p95_latency_ms.filter(|_| warm && s.requests > 0) {
            let mean = self.p95.mean();
            let score = self.p95.score(p95, (mean * 0.1).max(1.0));
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
        if warm && !new.is_empty() {
            let new_requests: u64 = new.iter().map(|(_, n)| n).sum();
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
            } else {
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

        // Bursts of 401/403.
        if s.auth_failures >= cfg.auth_failure_burst {
            findings.push(Finding {
                kind: AnomalyType::PotentialAbuse,
                rule: "auth-failures",
                score: s.auth_failures as f64 / cfg.auth_failure_burst.max(1) as f64,
                endpoint: None,
                baseline: 0.0,
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
        if let Some(p95) = s.p95_latency_ms.filter(|_| !latency_anomalous) {
            self.p95.update(p95, cfg.alpha);
        }
        for (e, n) in &s.endpoints {
            if *n > 0 && self.known_endpoints.len() < cfg.max_known_endpoints {
                self.known_endpoints.insert(e.clone());
            }
        }
        self.buckets = self.buckets.saturating_add(1);

        findings
            .into_iter()
            .filter_map(|f| {
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
                        s.minute_start_ms,
                        f.rule,
                        f.endpoint.as_deref(),
                    ),
                    client_id: client.to_string(),
                    endpoint: f.endpoint,
                    anomaly_type: f.kind,
                    severity,
                    detected_at_ms: s.minute_start_ms + 60_000,
                    description: f.description,
                    baseline: f.baseline,
                    observed: f.observed,
                    deviation_percent: deviation_percent(f.baseline, f.observed, f.floor),
                })
            })
            .collect()
    }
}
