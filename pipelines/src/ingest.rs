//! What one partition does with each event, in order: drop what this
//! partition already applied from the same source position, recognise
//! duplicates by `(client_id, source, event_id)`, set late events aside,
//! and aggregate the rest into one-minute buckets with hour and day
//! rollups.
//!
//! The partition's event-time clock is the highest event time applied,
//! except that no event moves it past the ingest clock at the moment the
//! event arrived: an event stamped 14 minutes ahead (a fast producer
//! clock, a hostile request) is counted in its own minute, but the
//! watermark (clock minus the allowed lateness) never passes "now minus
//! the allowed lateness", so it cannot make the partition's honest events
//! late. One clock per partition, not one per producer: producers are not
//! identified on the wire, and per-producer watermarks would still need
//! this bound for a producer that lies.
//!
//! The caller (a shard) does the I/O: it restores the dedupe index and the
//! event-time clock from the last flush and writes [`FlushContent`] in one
//! atomic batch. Everything here is deterministic in the order of events, so a
//! replay from a stored position reproduces the same state.

use rustc_hash::FxHashMap;
use std::sync::Arc;

use crate::aggregate::{BucketStats, ComputeWeights};
use crate::dedupe::{event_fingerprint, DedupeIndex, Fingerprint};
use crate::event::RequestEvent;
use crate::time::{format_rfc3339_ms, Granularity};

#[derive(Debug, Clone, Copy)]
pub struct PartitionRules {
    /// Events older than the partition's event-time clock minus this are
    /// late.
    pub allowed_lateness_ms: i64,
    /// A dedupe record lives while its event time is within this of the
    /// partition's event-time clock.
    pub dedupe_window_ms: i64,
}

impl Default for PartitionRules {
    fn default() -> Self {
        Self {
            allowed_lateness_ms: 5 * 60_000,
            dedupe_window_ms: 3_600_000,
        }
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Duplicate,
    Late { watermark_ms: i64 },
}

/// An event excluded for lateness, kept with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: String,
    pub event_json: String,
    pub event_ms: i64,
}

/// One client's usage in one minute since the last flush. The store merges
/// it into the minute, hour and day buckets that contain the minute: the
/// same delta, encoded once, rolls up by RocksDB's merge operator instead
/// of by cloning and merging bucket maps here.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsDelta {
    pub client_id: String,
    pub minute_start_ms: i64,
    pub stats: BucketStats,
}

/// Everything a flush must write atomically (with the source positions the
/// caller holds).
#[derive(Debug, Default)]
pub struct FlushContent {
    pub stats: Vec<StatsDelta>,
    /// `(event id fingerprint, event time)` claimed since the last flush.
    pub dedupe_claims: Vec<(Fingerprint, i64)>,
    /// Claims with event time before this are expired and may be deleted.
    pub dedupe_cutoff_ms: Option<i64>,
    pub dead_letters: Vec<DeadLetter>,
    /// The partition's event-time clock after these events.
    pub event_clock_ms: Option<i64>,
}

/// The hot state of one partition between flushes.
#[derive(Debug)]
pub struct PartitionIngest {
    rules: PartitionRules,
    weights: Arc<ComputeWeights>,
    event_clock_ms: Option<i64>,
    dedupe: DedupeIndex,
    /// client -> (minute start, stats), a handful of minutes per client.
    minutes: FxHashMap<String, Vec<(i64, BucketStats)>>,
    dead_letters: Vec<DeadLetter>,
    pending_events: usize,
}

impl PartitionIngest {
    /// `event_clock_ms` and `dedupe` come from the last flush.
    pub fn new(
        rules: PartitionRules,
        weights: Arc<ComputeWeights>,
        event_clock_ms: Option<i64>,
        dedupe: DedupeIndex,
    ) -> Self {
        Self {
            rules,
            weights,
            event_clock_ms,
            dedupe,
            minutes: FxHashMap::default(),
            dead_letters: Vec::new(),
            pending_events: 0,
        }
    }

    pub fn event_clock_ms(&self) -> Option<i64> {
        self.event_clock_ms
    }

    /// The current watermark: events before it are late.
    pub fn watermark_ms(&self) -> Option<i64> {
        self.event_clock_ms
            .map(|m| m.saturating_sub(self.rules.allowed_lateness_ms))
    }

    /// Dedupe records with an event time before this are expired.
    pub fn dedupe_cutoff_ms(&self) -> Option<i64> {
        self.event_clock_ms
            .map(|m| m.saturating_sub(self.rules.dedupe_window_ms))
    }

    /// Events applied since the last flush (accepted, duplicate or late).
    pub fn pending_events(&self) -> usize {
        self.pending_events
    }

    /// Claims held by the dedupe index, and claims evicted early by its cap.
    pub fn dedupe_stats(&self) -> (usize, u64) {
        (self.dedupe.len(), self.dedupe.evicted())
    }

    /// Applies one event that arrived when the ingest clock read `now_ms`.
    pub fn apply(&mut self, event: &RequestEvent, now_ms: i64) -> Verdict {
        self.pending_events += 1;
        let fp = event
            .event_id
            .as_deref()
            .map(|id| event_fingerprint(&event.client_id, event.source.as_deref(), id));
        if let Some(claimed_ms) = fp.and_then(|fp| self.dedupe.claim_of(fp)) {
            // A claim older than the window no longer counts, whether or not
            // the index has dropped it yet.
            if self
                .dedupe_cutoff_ms()
                .is_none_or(|cutoff| claimed_ms >= cutoff)
            {
                return Verdict::Duplicate;
            }
        }
        if let Some(watermark_ms) = self.watermark_ms() {
            if event.timestamp_ms < watermark_ms {
                self.dead_letters.push(DeadLetter {
                    reason: format!(
                        "late: event time {} is before the partition watermark {} (allowed lateness {} ms)",
                        format_rfc3339_ms(event.timestamp_ms),
                        format_rfc3339_ms(watermark_ms),
                        self.rules.allowed_lateness_ms
                    ),
                    event_json: event.to_wire_json(),
                    event_ms: event.timestamp_ms,
                });
                return Verdict::Late { watermark_ms };
            }
        }
        // Never past the ingest clock: see the module documentation.
        let advance = event.timestamp_ms.min(now_ms);
        self.event_clock_ms = Some(self.event_clock_ms.map_or(advance, |m| m.max(advance)));
        if let Some(fp) = fp {
            self.dedupe.claim(fp, event.timestamp_ms);
        }
        let minute = Granularity::Minute.bucket_start(event.timestamp_ms);
        let units = self.weights.units_for(event);
        let buckets = match self.minutes.get_mut(event.client_id.as_str()) {
            Some(b) => b,
            None => self.minutes.entry(event.client_id.clone()).or_default(),
        };
        match buckets.iter_mut().find(|(m, _)| *m == minute) {
            Some((_, stats)) => stats.record(event, units),
            None => {
                let mut stats = BucketStats::default();
                stats.record(event, units);
                buckets.push((minute, stats));
            }
        }
        Verdict::Accepted
    }

    /// Takes what the next flush must write and leaves the hot state empty
    /// (closed buckets leave memory at flush).
    pub fn take_flush(&mut self) -> FlushContent {
        let mut stats = Vec::new();
        for (client_id, minutes) in self.minutes.drain() {
            for (minute_start_ms, bucket) in minutes {
                stats.push(StatsDelta {
                    client_id: client_id.clone(),
                    minute_start_ms,
                    stats: bucket,
                });
            }
        }
        self.pending_events = 0;
        let dedupe_cutoff_ms = self.dedupe_cutoff_ms();
        if let Some(cutoff) = dedupe_cutoff_ms {
            self.dedupe.expire(cutoff);
        }
        FlushContent {
            stats,
            dedupe_claims: self.dedupe.take_new_claims(),
            dedupe_cutoff_ms,
            dead_letters: std::mem::take(&mut self.dead_letters),
            event_clock_ms: self.event_clock_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: Option<&str>, client: &str, ts: i64) -> RequestEvent {
        RequestEvent {
            event_id: id.map(str::to_string),
            client_id: client.into(),
            api_key_id: None,
            endpoint: "/e".into(),
            method: None,
            status: 200,
            request_bytes: 1,
            response_bytes: 1,
            latency_ms: 1.0,
            compute_units: None,
            timestamp_ms: ts,
            metadata: None,
            source: None,
        }
    }

    /// The ingest clock of a replay of old traffic: far ahead of every
    /// event time, so it never bounds the event-time clock.
    const REPLAY_NOW: i64 = i64::MAX / 4;

    fn ingest() -> PartitionIngest {
        PartitionIngest::new(
            PartitionRules::default(),
            Arc::default(),
            None,
            DedupeIndex::new(1000),
        )
    }

    #[test]
    fn late_event_beyond_allowed_lateness_goes_to_dead_letter() {
        let mut p = ingest();
        let t = 10 * 3_600_000;
        assert_eq!(p.apply(&ev(None, "c", t), REPLAY_NOW), Verdict::Accepted);
        // Exactly at the watermark is on time; one ms before is late.
        assert_eq!(
            p.apply(&ev(None, "c", t - 300_000), REPLAY_NOW),
            Verdict::Accepted
        );
        assert_eq!(
            p.apply(&ev(None, "c", t - 300_001), REPLAY_NOW),
            Verdict::Late {
                watermark_ms: t - 300_000
            }
        );
        let flush = p.take_flush();
        assert_eq!(flush.dead_letters.len(), 1);
        assert!(flush.dead_letters[0].reason.starts_with("late:"));
    }

    #[test]
    fn duplicate_in_batch_and_from_restored_claims_counts_once() {
        let mut restored = DedupeIndex::new(1000);
        restored.restore([(event_fingerprint("c", None, "y"), 900)]);
        let mut p = PartitionIngest::new(
            PartitionRules::default(),
            Arc::default(),
            Some(1000),
            restored,
        );
        assert_eq!(
            p.apply(&ev(Some("x"), "c", 1000), REPLAY_NOW),
            Verdict::Accepted
        );
        assert_eq!(
            p.apply(&ev(Some("x"), "c", 1000), REPLAY_NOW),
            Verdict::Duplicate
        );
        assert_eq!(
            p.apply(&ev(Some("y"), "c", 1000), REPLAY_NOW),
            Verdict::Duplicate
        );
        let flush = p.take_flush();
        assert_eq!(
            flush.dedupe_claims,
            vec![(event_fingerprint("c", None, "x"), 1000)]
        );
    }

    #[test]
    fn dedupe_claim_expires_after_the_window() {
        let t = 5 * 3_600_000;
        let mut restored = DedupeIndex::new(1000);
        restored.restore([(event_fingerprint("c", None, "z"), t - 7_200_000)]);
        let mut p = PartitionIngest::new(PartitionRules::default(), Arc::default(), None, restored);
        p.apply(&ev(None, "c", t), REPLAY_NOW);
        // The claim is 2 h before the max event time: expired, so the event
        // is judged on its own (late here, accepted when on time).
        assert!(matches!(
            p.apply(&ev(Some("z"), "c", t - 7_200_000), REPLAY_NOW),
            Verdict::Late { .. }
        ));
        assert_eq!(
            p.apply(&ev(Some("z"), "c", t), REPLAY_NOW),
            Verdict::Accepted
        );
        assert_eq!(
            p.apply(&ev(Some("z"), "c", t), REPLAY_NOW),
            Verdict::Duplicate
        );
    }

    #[test]
    fn flush_hands_out_one_delta_per_client_minute() {
        let mut p = ingest();
        p.apply(&ev(None, "c", 0), REPLAY_NOW);
        p.apply(&ev(None, "c", 1_000), REPLAY_NOW);
        p.apply(&ev(None, "c", 61_000), REPLAY_NOW);
        p.apply(&ev(None, "d", 3_600_000), REPLAY_NOW);
        let mut flush = p.take_flush();
        flush.stats.sort_by(|a, b| {
            (&a.client_id, a.minute_start_ms).cmp(&(&b.client_id, b.minute_start_ms))
        });
        let got: Vec<(&str, i64, u64)> = flush
            .stats
            .iter()
            .map(|d| {
                (
                    d.client_id.as_str(),
                    d.minute_start_ms,
                    d.stats.totals().requests,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("c", 0, 2), ("c", 60_000, 1), ("d", 3_600_000, 1)]
        );
        assert_eq!(p.pending_events(), 0);
        assert!(p.take_flush().stats.is_empty());
    }

    /// Reproduced over HTTP on an earlier main: one event for `victim`
    /// stamped now + 14 min (within `max_future`), then 100 events stamped
    /// now: all 100 were late. The clock stops at the ingest clock, so
    /// they are on time and the early one is counted in its own minute.
    #[test]
    fn an_early_stamped_event_does_not_make_the_partition_late() {
        let now = 1_800_000_000_000;
        let mut p = ingest();
        assert_eq!(
            p.apply(&ev(None, "victim", now + 14 * 60_000), now),
            Verdict::Accepted
        );
        for i in 0..100 {
            assert_eq!(
                p.apply(&ev(None, "other", now + i), now + i),
                Verdict::Accepted
            );
        }
        assert_eq!(p.watermark_ms(), Some(now + 99 - 300_000));
        // A real lateness still counts: 5 min + 1 ms behind the ingest clock.
        assert!(matches!(
            p.apply(&ev(None, "other", now - 300_002), now),
            Verdict::Late { .. }
        ));
        let flush = p.take_flush();
        let total: u64 = flush.stats.iter().map(|d| d.stats.totals().requests).sum();
        assert_eq!(total, 101);
        assert_eq!(flush.event_clock_ms, Some(now + 99));
    }

    #[test]
    fn two_clients_sending_the_same_event_id_are_both_counted() {
        let mut p = ingest();
        assert_eq!(
            p.apply(&ev(Some("e1"), "alice", 1000), REPLAY_NOW),
            Verdict::Accepted
        );
        assert_eq!(
            p.apply(&ev(Some("e1"), "bob", 1000), REPLAY_NOW),
            Verdict::Accepted
        );
        assert_eq!(
            p.apply(&ev(Some("e1"), "bob", 1000), REPLAY_NOW),
            Verdict::Duplicate
        );
        let mut from_source = ev(Some("e1"), "alice", 1000);
        from_source.source = Some("gw-1".into());
        assert_eq!(p.apply(&from_source, REPLAY_NOW), Verdict::Accepted);
        assert_eq!(p.apply(&from_source, REPLAY_NOW), Verdict::Duplicate);
    }
}
