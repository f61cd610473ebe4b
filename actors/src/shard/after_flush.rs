//! What a shard does once a flush has committed: clients the rankings let
//! go come back with their stored totals, quotas see their new usage,
//! sampled requests are published, and the minutes the watermark passed
//! are judged.

use super::Shard;
use crate::limits::lock;
use crate::top::lock_top;
use crate::Error;

impl Shard {
    /// Clients a ranking let go and saw again come back with their stored
    /// totals (read after the commit, so they include this flush).
    pub(super) fn admit_to_rankings(&mut self, needed: Vec<crate::top::TotalNeeded>) {
        if needed.is_empty() {
            return;
        }
        let wanted: Vec<_> = needed
            .iter()
            .map(|n| (n.period, n.period_start_ms, n.client.as_str()))
            .collect();
        match self.store.period_totals_of(self.partition, &wanted) {
            Ok(totals) => {
                let mut top = lock_top(&self.top);
                for (n, total) in needed.iter().zip(totals) {
                    top.admit(n, total);
                }
            }
            Err(e) => {
                // A client neither held nor bounded would make memory
                // answers wrong: until the next load, the store answers.
                tracing::warn!(shard = self.partition, error = %e, "cannot read period totals for the ranking; queries read the store");
                lock_top(&self.top).clear();
            }
        }
    }

    /// Quota usage moved with the flush; clients whose usage is not in
    /// memory are read here, on the shard's thread, without the lock.
    pub(super) fn after_limits_flush(&mut self, content: &tally_pipelines::ingest::FlushContent) {
        let now_ms = self.config.clock.now_ms();
        let unloaded = lock(&self.limits).after_flush(&content.stats, now_ms);
        for (client, config) in unloaded {
            let needs = crate::limits::Needs {
                client: client.clone(),
                limiter: false,
                quota_usage: Some((config, now_ms)),
            };
            let generation = lock(&self.limits).generation();
            match crate::limits::load(&self.store, self.partition, &needs) {
                Ok(loaded) => {
                    let mut limits = lock(&self.limits);
                    if limits.install(loaded, generation) {
                        limits.observe_quota(&client, now_ms);
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = self.partition, error = %e, "cannot evaluate quota")
                }
            }
        }
    }

    pub(super) fn publish_sampled(&mut self) {
        let Some(alerts) = &self.config.detect.alerts else {
            self.sampled.clear();
            return;
        };
        for e in self.sampled.drain(..) {
            alerts.publish(
                "REQUEST_RECORDED",
                &e.client_id,
                Some(&e.endpoint),
                e.timestamp_ms,
                serde_json::json!({
                    "event_id": e.event_id,
                    "method": e.method,
                    "status": e.status,
                    "latency_ms": e.latency_ms,
                    "request_bytes": e.request_bytes,
                    "response_bytes": e.response_bytes,
                }),
            );
        }
    }

    /// Judges the minutes that closed (all open ones with `None`). State
    /// that cannot be read stops the shard; other failures leave the
    /// minutes open, to be judged at the next close.
    pub(super) fn close_minutes(&mut self, watermark_ms: Option<i64>) {
        let denials = lock(&self.limits).take_denials();
        self.detectors.note_denials(denials);
        match self.detectors.close(watermark_ms) {
            Ok(_) => {}
            Err(Error::Corrupt(reason)) => {
                self.fail(format!("cannot judge closed minutes: {reason}"))
            }
            Err(e) => {
                tracing::warn!(shard = self.partition, error = %e, "anomaly detection failed for closed minutes")
            }
        }
    }
}
