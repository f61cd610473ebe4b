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
use crate::kafka::source::Feed;
use crate::telemetry::{KAFKA_CONSUMER_LAG, KAFKA_PARTITIONS_HELD};

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
    /// The same for the telemetry topic's records (keyed by series).
    points_partitioning: PartitionCheck,
    /// (topic, partition) -> the record it is held at because the dead-letter topic
    /// did not take it.
    held: Mutex<BTreeMap<(String, i32), HeldPartition>>,
}

/// A partition that stopped at a record it could not set aside: nothing
/// after it is applied or committed until the dead-letter topic takes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeldPartition {
    pub offset: i64,
    /// Wall-clock ms of the first failed attempt at this record.
    pub since_ms: i64,
    pub reason: String,
}

/// A point-in-time view.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaHealthView {
    pub connected: bool,
    pub down_since_ms: Option<i64>,
    pub last_error: Option<String>,
    pub lag: BTreeMap<i32, i64>,
    pub partitioning: PartitioningView,
    /// By (topic, partition): the request or the telemetry topic.
    pub held: BTreeMap<(String, i32), HeldPartition>,
}

impl KafkaHealthView {
    /// Why the instance is not ready because of held partitions: one held
    /// longer than `grace_ms` (a dead-letter topic that stays unwritable
    /// stalls its partition, and an operator must see it).
    pub fn held_reason(&self, now_ms: i64, grace_ms: i64) -> Option<String> {
        let stalled: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| now_ms.saturating_sub(h.since_ms) > grace_ms)
            .map(|((topic, p), h)| {
                format!(
                    "{topic} partition {p} held at offset {} for {} s: the dead-letter topic does not take its record ({}); nothing after it is counted until it does",
                    h.offset,
                    now_ms.saturating_sub(h.since_ms) / 1000,
                    h.reason
                )
            })
            .collect();
        (!stalled.is_empty()).then(|| stalled.join("; "))
    }
}

impl KafkaHealth {
    pub fn new(now_ms: i64, partitioning: PartitionCheck) -> Self {
        // Not connected until a broker answers.
        Self {
            points_partitioning: partitioning.fresh(),
            partitioning,
            down_since_ms: AtomicI64::new(now_ms),
            ever_connected: AtomicBool::new(false),
            last_error: Mutex::new(None),
            lag: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// `partition` stopped at `offset`: the dead-letter topic refused it.
    /// Held again at the same record, it keeps the time of the first try.
    pub fn hold(&self, topic: &str, partition: i32, offset: i64, reason: &str, now_ms: i64) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        let partition = (topic.to_string(), partition);
        let since_ms = match held.get(&partition) {
            Some(h) if h.offset == offset => h.since_ms,
            _ => now_ms,
        };
        held.insert(
            partition,
            HeldPartition {
                offset,
                since_ms,
                reason: reason.to_string(),
            },
        );
        gauge!(KAFKA_PARTITIONS_HELD).set(held.len() as f64);
    }

    /// `partition` went past its held record, or is no longer this
    /// instance's.
    pub fn release_hold(&self, topic: &str, partition: i32) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        if held.remove(&(topic.to_string(), partition)).is_some() {
            gauge!(KAFKA_PARTITIONS_HELD).set(held.len() as f64);
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
            held: self.held.lock().map(|h| h.clone()).unwrap_or_default(),
        }
    }

    pub fn partitioning(&self) -> &PartitionCheck {
        &self.partitioning
    }

    /// The partition check of a feed's topic.
    pub fn partitioning_of(&self, feed: Feed) -> &PartitionCheck {
        match feed {
            Feed::Events => &self.partitioning,
            Feed::Points => &self.points_partitioning,
        }
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

    #[test]
    fn a_hold_is_timed_from_its_first_attempt_and_stalls_readiness_past_the_grace() {
        let h = KafkaHealth::new(0, PartitionCheck::new(Default::default(), 4));
        let key = ("t".to_string(), 2);
        h.hold("t", 2, 100, "unknown topic", 1_000);
        h.hold("t", 2, 100, "timed out", 20_000);
        // The other topic's partition 2 is held and released apart.
        h.hold("t.telemetry", 2, 7, "timed out", 25_000);
        let v = h.view();
        assert_eq!(v.held[&key].since_ms, 1_000);
        assert_eq!(v.held[&key].reason, "timed out");
        assert_eq!(v.held_reason(31_000, 30_000), None);
        let reason = v.held_reason(31_001, 30_000).unwrap();
        assert!(
            reason.contains("t partition 2 held at offset 100 for 30 s"),
            "{reason}"
        );
        h.release_hold("t.telemetry", 2);
        assert_eq!(h.view().held.len(), 1);
        // A later record held starts its own clock.
        h.hold("t", 2, 250, "timed out", 40_000);
        assert_eq!(h.view().held[&key].since_ms, 40_000);
        h.release_hold("t", 2);
        assert!(h.view().held.is_empty());
        assert_eq!(h.view().held_reason(i64::MAX, 0), None);
    }
}
