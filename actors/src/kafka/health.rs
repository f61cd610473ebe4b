//! What the Kafka source knows about its broker connection and lag, for
//! readiness, `/health/detailed` and `/metrics`. Fed by librdkafka's error
//! and statistics callbacks, which run on librdkafka's threads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use metrics::gauge;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::partitioning::{PartitionCheck, PartitioningView};
use crate::telemetry::KAFKA_CONSUMER_LAG;

const CONNECTED: i64 = i64::MIN;

#[derive(Debug)]
pub struct KafkaHealth {
    /// Wall-clock ms since which no broker has been reachable, or CONNECTED.
    down_since_ms: AtomicI64,
    ever_connected: AtomicBool,
    // std mutexes: short critical sections, never held across an await.
    last_error: Mutex<Option<String>>,
    /// partition -> consumer lag (messages), from the last statistics.
    lag: Mutex<BTreeMap<i32, i64>>,
    /// Whether the records fit the configured partitioner.
    partitioning: PartitionCheck,
}

/// A point-in-time view.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaHealthView {
    pub connected: bool,
    pub down_since_ms: Option<i64>,
    pub last_error: Option<String>,
    pub lag: BTreeMap<i32, i64>,
    pub partitioning: PartitioningView,
}

impl KafkaHealth {
    pub fn new(now_ms: i64, partitioning: PartitionCheck) -> Self {
        // Not connected until a broker answers.
        Self {
            partitioning,
            down_since_ms: AtomicI64::new(now_ms),
            ever_connected: AtomicBool::new(false),
            last_error: Mutex::new(None),
            lag: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn connected(&self) {
        self.down_since_ms.store(CONNECTED, Ordering::Relaxed);
        self.ever_connected.store(true, Ordering::Relaxed);
    }

    pub fn disconnected(&self, now_ms: i64, reason: &str) {
        let _ = self.down_since_ms.compare_exchange(
            CONNECTED,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(reason.to_string());
        }
    }

    /// librdkafka's error callback: all brokers down means disconnected.
    pub fn on_error(&self, now_ms: i64, error: &KafkaError, reason: &str) {
        let down = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown) | Some(RDKafkaErrorCode::BrokerTransportFailure)
        );
        if down
            && matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::AllBrokersDown)
            )
        {
            self.disconnected(now_ms, reason);
        } else if let Ok(mut e) = self.last_error.lock() {
            *e = Some(format!("{error}: {reason}"));
        }
    }

    /// librdkafka's statistics callback: broker states and per-partition lag.
    pub fn on_statistics(&self, now_ms: i64, topic: &str, stats: &Statistics) {
        if stats
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0)
        {
            self.connected();
        } else if !stats.brokers.is_empty() {
            self.disconnected(now_ms, "no broker is UP");
        }
        let Some(t) = stats.topics.get(topic) else {
            return;
        };
        let Ok(mut lag) = self.lag.lock() else { return };
        for (&p, part) in &t.partitions {
            // Partition -1 is librdkafka's internal unassigned partition;
            // a negative lag means "unknown" (not assigned or not fetched).
            if p >= 0 && part.consumer_lag >= 0 {
                lag.insert(p, part.consumer_lag);
                gauge!(KAFKA_CONSUMER_LAG, "partition" => p.to_string())
                    .set(part.consumer_lag as f64);
            }
        }
    }

    pub fn view(&self) -> KafkaHealthView {
        let down = self.down_since_ms.load(Ordering::Relaxed);
        KafkaHealthView {
            connected: down == CONNECTED,
            down_since_ms: (down != CONNECTED).then_some(down),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            lag: self.lag.lock().map(|l| l.clone()).unwrap_or_default(),
            partitioning: self.partitioning.view(),
        }
    }

    pub fn partitioning(&self) -> &PartitionCheck {
        &self.partitioning
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_is_timed_from_the_first_failure_and_cleared_by_a_connection() {
        let h = KafkaHealth::new(0, PartitionCheck::new(Default::default(), 4));
        assert_eq!(h.view().down_since_ms, Some(0));
        h.connected();
        assert!(h.view().connected);
        h.disconnected(1_000, "all brokers down");
        h.disconnected(5_000, "still down");
        let v = h.view();
        assert_eq!(v.down_since_ms, Some(1_000));
        assert_eq!(v.last_error.as_deref(), Some("still down"));
        h.connected();
        assert_eq!(h.view().down_since_ms, None);
    }
}
