//! Deterministic sampling of request events for the opt-in
//! `REQUEST_RECORDED` stream: whether an event is kept depends only on its
//! content (a hash), so a replay of the same input samples the same events.

use xxhash_rust::xxh3::Xxh3;

use crate::event::RequestEvent;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSampler {
    /// Keep events whose hash is below this (0 keeps none).
    threshold: u64,
    all: bool,
}

impl RequestSampler {
    /// `rate` in `[0, 1]`: the share of events kept (clamped).
    pub fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            threshold: (rate * u64::MAX as f64) as u64,
            all: rate >= 1.0,
        }
    }

    pub fn is_off(&self) -> bool {
        self.threshold == 0 && !self.all
    }

    pub fn keep(&self, e: &RequestEvent) -> bool {
        if self.all {
            return true;
        }
        if self.threshold == 0 {
            return false;
        }
        let mut h = Xxh3::new();
        h.update(e.client_id.as_bytes());
        h.update(&[0]);
        h.update(e.endpoint.as_bytes());
        h.update(&e.timestamp_ms.to_be_bytes());
        h.update(&e.status.to_be_bytes());
        h.update(&e.latency_ms.to_bits().to_be_bytes());
        if let Some(id) = &e.event_id {
            h.update(id.as_bytes());
        }
        h.digest() < self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> RequestEvent {
        RequestEvent {
            event_id: Some(format!("e-{i}")),
            client_id: format!("c-{}", i % 7),
            api_key_id: None,
            endpoint: "/x".into(),
            method: None,
            status: 200,
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 1.0,
            compute_units: None,
            timestamp_ms: i as i64,
            metadata: None,
            source: None,
        }
    }

    #[test]
    fn rates_keep_about_their_share_and_the_same_events() {
        assert!(RequestSampler::new(0.0).is_off());
        assert!((0..1000).all(|i| !RequestSampler::new(0.0).keep(&event(i))));
        assert!((0..1000).all(|i| RequestSampler::new(1.0).keep(&event(i))));
        let s = RequestSampler::new(0.1);
        let kept: Vec<u64> = (0..100_000).filter(|&i| s.keep(&event(i))).collect();
        // Binomial(100000, 0.1): sd ~95; 5 sd either side.
        assert!((9_525..=10_475).contains(&kept.len()), "{}", kept.len());
        let again: Vec<u64> = (0..100_000).filter(|&i| s.keep(&event(i))).collect();
        assert_eq!(kept, again);
        assert!(RequestSampler::new(f64::NAN).is_off());
    }
}
