//! Usage aggregates of one client in one time bucket, per endpoint.
//!
//! Client-level numbers (totals, distinct endpoints, latency quantiles) are
//! derived from the per-endpoint ones, so each event touches one cell and one
//! sketch. Every field merges exactly and independently of order — counts
//! and sums are integers (latency is summed in nanoseconds) — so a bucket
//! assembled from any grouping of flush deltas is bit-identical.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::event::RequestEvent;
use crate::sketch::LatencySketch;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStats {
    pub requests: u64,
    /// status >= 400
    pub failed: u64,
    /// status >= 500
    pub server_errors: u64,
    /// status 401 or 403 (abuse detection)
    pub auth_failures: u64,
    /// request + response bytes
    pub bytes: u128,
    pub latency_ns: u128,
    pub compute_units: u128,
    pub latency: LatencySketch,
    /// Requests that carried their own `compute_units`, and those units:
    /// a billing plan weighs only the others ([`EndpointStats::units_weighted`]).
    pub own_unit_requests: u64,
    pub own_units: u128,
}

impl EndpointStats {
    pub fn record(&mut self, event: &RequestEvent, compute_units: u64) {
        self.requests = self.requests.saturating_add(1);
        if event.status >= 400 {
            self.failed = self.failed.saturating_add(1);
        }
        if event.status >= 500 {
            self.server_errors = self.server_errors.saturating_add(1);
        }
        if matches!(event.status, 401 | 403) {
            self.auth_failures = self.auth_failures.saturating_add(1);
        }
        // Sums saturate: with validated bounds they cannot reach u128::MAX,
        // but a wrapped sum would be a silent lie, a saturated one a
        // visible ceiling.
        self.bytes = self
            .bytes
            .saturating_add(u128::from(event.request_bytes))
            .saturating_add(u128::from(event.response_bytes));
        self.latency_ns = self.latency_ns.saturating_add(latency_ns(event.latency_ms));
        self.compute_units = self.compute_units.saturating_add(u128::from(compute_units));
        if let Some(own) = event.compute_units {
            self.own_unit_requests = self.own_unit_requests.saturating_add(1);
            self.own_units = self.own_units.saturating_add(u128::from(own));
        }
        self.latency.insert(event.latency_ms);
    }

    pub fn merge(&mut self, other: &EndpointStats) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failed = self.failed.saturating_add(other.failed);
        self.server_errors = self.server_errors.saturating_add(other.server_errors);
        self.auth_failures = self.auth_failures.saturating_add(other.auth_failures);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.latency_ns = self.latency_ns.saturating_add(other.latency_ns);
        self.compute_units = self.compute_units.saturating_add(other.compute_units);
        self.latency.merge(&other.latency);
        self.own_unit_requests = self
            .own_unit_requests
            .saturating_add(other.own_unit_requests);
        self.own_units = self.own_units.saturating_add(other.own_units);
    }

    /// Compute units with `weight` per request for the requests that did
    /// not carry their own (which win).
    pub fn units_weighted(&self, weight: u64) -> u128 {
        let weighed = self.requests.saturating_sub(self.own_unit_requests);
        self.own_units
            .saturating_add(u128::from(weighed).saturating_mul(u128::from(weight)))
    }

    pub fn average_latency_ms(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.latency_ns as f64 / self.requests as f64 / 1e6
        }
    }
}

/// Latency in whole nanoseconds, so that sums are exact and order-free.
/// (`as` saturates: negative and NaN give 0, huge values u128::MAX.)
pub fn latency_ns(latency_ms: f64) -> u128 {
    (latency_ms * 1e6).round() as u128
}

/// One client's usage in one bucket: endpoint stats sorted by endpoint.
///
/// A sorted vector rather than a `BTreeMap`: most cells hold one or two
/// endpoints, and a B-tree leaf allocates room for eleven entries up front
/// (kilobytes per sparse cell), where a vector costs what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketStats {
    endpoints: Vec<(String, EndpointStats)>,
}

impl BucketStats {
    pub fn record(&mut self, event: &RequestEvent, compute_units: u64) {
        match self
            .endpoints
            .binary_search_by(|(e, _)| e.as_str().cmp(event.endpoint.as_str()))
        {
            Ok(i) => self.endpoints[i].1.record(event, compute_units),
            Err(i) => {
                let mut stats = EndpointStats::default();
                stats.record(event, compute_units);
                self.endpoints.insert(i, (event.endpoint.clone(), stats));
            }
        }
    }

    pub fn merge(&mut self, other: &BucketStats) {
        for (endpoint, stats) in &other.endpoints {
            match self
                .endpoints
                .binary_search_by(|(e, _)| e.as_str().cmp(endpoint.as_str()))
            {
                Ok(i) => self.endpoints[i].1.merge(stats),
                Err(i) => self.endpoints.insert(i, (endpoint.clone(), stats.clone())),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.iter().all(|(_, s)| s.requests == 0)
    }

    /// Endpoints with their stats, in endpoint order.
    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &EndpointStats)> {
        self.endpoints.iter().map(|(e, s)| (e.as_str(), s))
    }

    pub fn into_endpoints(self) -> impl Iterator<Item = (String, EndpointStats)> {
        self.endpoints.into_iter()
    }

    pub fn endpoint(&self, endpoint: &str) -> Option<&EndpointStats> {
        self.endpoints
            .binary_search_by(|(e, _)| e.as_str().cmp(endpoint))
            .ok()
            .map(|i| &self.endpoints[i].1)
    }

    /// Endpoints with at least one request.
    pub fn distinct_endpoints(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|(_, s)| s.requests > 0)
            .count()
    }

    /// The client-level totals of this bucket.
    pub fn totals(&self) -> EndpointStats {
        let mut total = EndpointStats::default();
        for (_, stats) in &self.endpoints {
            total.merge(stats);
        }
        total
    }
}

/// Compute units of an event: its own `compute_units`, else the configured
/// weight of its endpoint, else 1.
#[derive(Debug, Clone, Default)]
pub struct ComputeWeights {
    pub per_endpoint: HashMap<String, u64>,
}

impl ComputeWeights {
    pub fn units_for(&self, event: &RequestEvent) -> u64 {
        event
            .compute_units
            .or_else(|| self.per_endpoint.get(&event.endpoint).copied())
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(endpoint: &str, status: u16, latency: f64, bytes: u64) -> RequestEvent {
        RequestEvent {
            event_id: None,
            client_id: "c".into(),
            api_key_id: None,
            endpoint: endpoint.into(),
            method: None,
            status,
            request_bytes: bytes,
            response_bytes: bytes,
            latency_ms: latency,
            compute_units: None,
            timestamp_ms: 0,
            metadata: None,
            source: None,
        }
    }

    #[test]
    fn a_plans_weight_applies_only_to_requests_without_their_own_units() {
        let mut a = EndpointStats::default();
        let mut own = event("/s", 200, 1.0, 0);
        own.compute_units = Some(7);
        a.record(&own, 7);
        a.record(&event("/s", 200, 1.0, 0), 3);
        a.record(&event("/s", 200, 1.0, 0), 3);
        // Ingest weighed the two at 3; a plan weighing 5: 7 + 2 x 5.
        assert_eq!(a.compute_units, 13);
        assert_eq!(a.units_weighted(5), 17);
        assert_eq!(a.units_weighted(1), 9);
        let mut b = EndpointStats::default();
        b.record(&own, 7);
        a.merge(&b);
        assert_eq!((a.own_unit_requests, a.own_units), (2, 14));
        assert_eq!(a.units_weighted(0), 14);
    }

    #[test]
    fn hand_worked_bucket() {
        let mut b = BucketStats::default();
        b.record(&event("/a", 200, 10.0, 5), 1);
        b.record(&event("/a", 404, 20.0, 5), 1);
        b.record(&event("/b", 503, 30.0, 5), 3);
        b.record(&event("/b", 401, 30.0, 5), 0);
        b.record(&event("/b", 403, 30.0, 5), 0);
        let t = b.totals();
        assert_eq!(t.requests, 5);
        assert_eq!(t.failed, 4);
        assert_eq!(t.server_errors, 1);
        assert_eq!(t.auth_failures, 2);
        assert_eq!(t.bytes, 50);
        assert_eq!(t.compute_units, 5);
        assert!((t.average_latency_ms() - 24.0).abs() < 1e-9);
        assert_eq!(b.distinct_endpoints(), 2);
        assert_eq!(b.endpoint("/a").unwrap().failed, 1);
        let names: Vec<&str> = b.endpoints().map(|(e, _)| e).collect();
        assert_eq!(names, vec!["/a", "/b"]);
    }

    #[test]
    fn bytes_do_not_overflow_u64() {
        let mut b = BucketStats::default();
        b.record(&event("/a", 200, 1.0, u64::MAX), 1);
        b.record(&event("/a", 200, 1.0, u64::MAX), 1);
        assert_eq!(b.totals().bytes, 4 * u128::from(u64::MAX));
    }

    /// Sums saturate instead of wrapping, even for values validation
    /// would refuse (a stored delta from elsewhere, a future bound).
    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut a = EndpointStats::default();
        a.record(&event("/a", 200, 1e300, 1), 1);
        a.record(&event("/a", 200, 1e300, 1), 1);
        assert_eq!(a.latency_ns, u128::MAX);
        let mut b = a.clone();
        b.merge(&a);
        assert_eq!(b.latency_ns, u128::MAX);
        assert!(b.average_latency_ms() > 1e20);
    }

    #[test]
    fn merge_is_order_independent() {
        let events = [
            event("/a", 200, 1.25, 1),
            event("/b", 500, 7.5, 2),
            event("/a", 201, 0.1, 3),
        ];
        let mut whole = BucketStats::default();
        for e in &events {
            whole.record(e, 1);
        }
        let (mut x, mut y) = (BucketStats::default(), BucketStats::default());
        x.record(&events[2], 1);
        y.record(&events[0], 1);
        y.record(&events[1], 1);
        x.merge(&y);
        assert_eq!(x, whole);
    }
}
