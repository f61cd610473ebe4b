//! A client's rate-limit configuration and the limiter that applies it: one
//! limiter for the global limit and one per limited endpoint, checked
//! together. A request passes only if every applicable limit lets it pass
//! (then each consumes the cost); the tightest limit is the one reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Algorithm, Decision, Limit, LimiterState};

/// `requests` per `window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub requests: u64,
    pub window_seconds: u64,
}

fn yes() -> bool {
    true
}

/// `PUT /v1/clients/{id}/limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub algorithm: Algorithm,
    pub global_limit: LimitSpec,
    #[serde(default)]
    pub endpoint_limits: BTreeMap<String, LimitSpec>,
    /// Bucket capacity when above 0 (else `requests`).
    #[serde(default)]
    pub burst_allowance: u64,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Evaluate and record, but always allow.
    #[serde(default)]
    pub shadow: bool,
}

/// Longest accepted window: a year.
const MAX_WINDOW_SECONDS: u64 = 366 * 86_400;

impl LimitConfig {
    /// Every problem, as (field, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut check = |field: String, spec: &LimitSpec| {
            if spec.requests == 0 {
                out.push((format!("{field}.requests"), "must be at least 1".into()));
            }
            if spec.window_seconds == 0 || spec.window_seconds > MAX_WINDOW_SECONDS {
                out.push((
                    format!("{field}.window_seconds"),
                    format!("must be within 1..={MAX_WINDOW_SECONDS}"),
                ));
            }
        };
        check("global_limit".into(), &self.global_limit);
        for (endpoint, spec) in &self.endpoint_limits {
            check(format!("endpoint_limits[{endpoint:?}]"), spec);
        }
        for endpoint in self.endpoint_limits.keys() {
            if endpoint.is_empty() || endpoint.len() > 512 {
                out.push((
                    "endpoint_limits".into(),
                    format!("endpoint {endpoint:?} must be 1..=512 bytes"),
                ));
            }
        }
        if self.endpoint_limits.len() > 1000 {
            out.push(("endpoint_limits".into(), "at most 1000 endpoints".into()));
        }
        out
    }

    fn limit(&self, spec: &LimitSpec, factor: f64) -> Limit {
        Limit::new(spec.requests, spec.window_seconds, self.burst_allowance).scaled(factor)
    }
}

/// What a check decided, with the limit that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutcome {
    /// The answer given (true in shadow mode even when a limit denies).
    pub allowed: bool,
    /// A limit denied (in shadow mode the request was still allowed).
    pub limited: bool,
    pub decision: Decision,
    pub algorithm: Algorithm,
    /// `"global"` or the endpoint whose limit decided.
    pub policy: String,
    /// The effective limit (after the adaptive factor).
    pub limit: Limit,
}

/// Limiter state of one client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientLimiter {
    global: Option<LimiterState>,
    endpoints: BTreeMap<String, LimiterState>,
}

impl ClientLimiter {
    /// Checks (and with `consume`, consumes) `cost` against every limit
    /// that applies to `endpoint`.
    pub fn check(
        &mut self,
        config: &LimitConfig,
        factor: f64,
        endpoint: &str,
        now_ms: i64,
        cost: u64,
        consume: bool,
    ) -> CheckOutcome {
        let global_limit = config.limit(&config.global_limit, factor);
        if !config.enabled {
            return CheckOutcome {
                allowed: true,
                limited: false,
                decision: Decision::allow(global_limit.quota(), global_limit.quota(), now_ms),
                algorithm: config.algorithm,
                policy: "disabled".into(),
                limit: global_limit,
            };
        }
        let endpoint_spec = config.endpoint_limits.get(endpoint);
        // Limiters of another algorithm (configuration changed) start over.
        let fresh = |state: &mut Option<LimiterState>, limit: &Limit| {
            if state.as_ref().map(LimiterState::algorithm) != Some(config.algorithm) {
                *state = Some(LimiterState::new(config.algorithm, limit, now_ms));
            }
        };
        fresh(&mut self.global, &global_limit);
        let mut endpoint_state = endpoint_spec.map(|_| self.endpoints.remove(endpoint));
        let endpoint_limit = endpoint_spec.map(|s| config.limit(s, factor));
        if let (Some(state), Some(limit)) = (endpoint_state.as_mut(), endpoint_limit.as_ref()) {
            fresh(state, limit);
        }
        let mut candidates: Vec<(&str, &mut LimiterState, Limit)> = Vec::with_capacity(2);
        if let Some(g) = self.global.as_mut() {
            candidates.push(("global", g, global_limit));
        }
        if let (Some(Some(state)), Some(limit)) = (endpoint_state.as_mut(), endpoint_limit) {
            candidates.push((endpoint, state, limit));
        }
        let peeked: Vec<Decision> = candidates
            .iter()
            .map(|(_, s, l)| s.peek(l, now_ms, cost))
            .collect();
        let denied = peeked.iter().any(|d| !d.allowed);
        let decisive = if denied {
            // The binding limit: the one that keeps the request out longest.
            (0..peeked.len())
                .filter(|&i| !peeked[i].allowed)
                .max_by_key(|&i| peeked[i].retry_after_ms)
        } else {
            // The tightest: least room left after this request.
            (0..peeked.len()).min_by_key(|&i| peeked[i].remaining)
        }
        .unwrap_or(0);
        let mut decisions = peeked;
        if !denied && consume {
            for (i, (_, state, limit)) in candidates.iter_mut().enumerate() {
                decisions[i] = state.check(limit, now_ms, cost);
            }
        }
        let (policy, _, limit) = &candidates[decisive];
        let outcome = CheckOutcome {
            allowed: !denied || config.shadow,
            limited: denied,
            decision: decisions[decisive],
            algorithm: config.algorithm,
            policy: (*policy).to_string(),
            limit: *limit,
        };
        drop(candidates);
        if let Some(Some(state)) = endpoint_state {
            self.endpoints.insert(endpoint.to_string(), state);
        }
        outcome
    }

    /// Forgets the counters of `endpoint`, or of everything.
    pub fn reset(&mut self, endpoint: Option<&str>) {
        match endpoint {
            Some(e) => {
                self.endpoints.remove(e);
            }
            None => *self = ClientLimiter::default(),
        }
    }

    /// Drops limiters of endpoints the configuration no longer limits.
    pub fn retain_configured(&mut self, config: &LimitConfig) {
        self.endpoints
            .retain(|e, _| config.endpoint_limits.contains_key(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algorithm: Algorithm) -> LimitConfig {
        LimitConfig {
            algorithm,
            global_limit: LimitSpec {
                requests: 10,
                window_seconds: 60,
            },
            endpoint_limits: BTreeMap::from([(
                "/search".to_string(),
                LimitSpec {
                    requests: 3,
                    window_seconds: 60,
                },
            )]),
            burst_allowance: 0,
            enabled: true,
            shadow: false,
        }
    }

    #[test]
    fn the_tightest_limit_decides_and_a_denial_consumes_nothing() {
        let c = config(Algorithm::FixedWindow);
        let mut l = ClientLimiter::default();
        // Three searches pass; each reports the endpoint limit (3 < 10).
        for left in [2, 1, 0] {
            let o = l.check(&c, 1.0, "/search", 1_000, 1, true);
            assert!(o.allowed);
            assert_eq!((o.policy.as_str(), o.decision.remaining), ("/search", left));
        }
        // The fourth is denied by the endpoint limit; the global limit is
        // untouched by the denial: 7 other requests still pass.
        let o = l.check(&c, 1.0, "/search", 1_000, 1, true);
        assert!(!o.allowed && o.limited);
        assert_eq!(o.policy, "/search");
        assert_eq!(o.decision.retry_after_ms, 59_000);
        for left in (0..7).rev() {
            let o = l.check(&c, 1.0, "/other", 2_000, 1, true);
            assert!(o.allowed, "left {left}");
            assert_eq!((o.policy.as_str(), o.decision.remaining), ("global", left));
        }
        let o = l.check(&c, 1.0, "/other", 2_000, 1, true);
        assert_eq!((o.allowed, o.policy.as_str()), (false, "global"));
    }

    #[test]
    fn shadow_allows_but_records_and_disabled_never_limits() {
        let mut c = config(Algorithm::TokenBucket);
        c.shadow = true;
        let mut l = ClientLimiter::default();
        let results: Vec<(bool, bool)> = (0..12)
            .map(|_| {
                let o = l.check(&c, 1.0, "/x", 0, 1, true);
                (o.allowed, o.limited)
            })
            .collect();
        assert!(results.iter().all(|r| r.0));
        assert_eq!(results.iter().filter(|r| r.1).count(), 2);
        c.enabled = false;
        assert_eq!(l.check(&c, 1.0, "/x", 0, 100, true).policy, "disabled");
    }

    #[test]
    fn the_adaptive_factor_halves_the_effective_limit() {
        let c = config(Algorithm::FixedWindow);
        let mut l = ClientLimiter::default();
        let passed = (0..10)
            .filter(|_| l.check(&c, 0.5, "/x", 0, 1, true).allowed)
            .count();
        assert_eq!(passed, 5);
        assert_eq!(l.check(&c, 0.5, "/x", 0, 1, false).limit.requests, 5);
    }

    #[test]
    fn problems_name_every_field() {
        let mut c = config(Algorithm::LeakyBucket);
        c.global_limit.requests = 0;
        c.endpoint_limits.insert(
            "/y".into(),
            LimitSpec {
                requests: 1,
                window_seconds: 0,
            },
        );
        let fields: Vec<String> = c.problems().into_iter().map(|p| p.0).collect();
        assert_eq!(
            fields,
            vec![
                "global_limit.requests".to_string(),
                "endpoint_limits[\"/y\"].window_seconds".to_string()
            ]
        );
    }
}
