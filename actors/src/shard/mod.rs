//! The shard actor: sole owner of one partition's hot state.
//!
//! A shard applies batches in arrival order (dedupe, watermark, rollups in
//! `tally_pipelines::ingest`) and flushes its dirty state, dedupe claims,
//! dead letters and source positions in one RocksDB WriteBatch. Acks wait
//! for the flush. A batch whose sender waits (HTTP) schedules a flush
//! right after the mailbox is drained, so concurrent requests share one
//! commit (group commit).
//!
//! Under its supervisor, a shard whose flush fails stops and is restarted
//! from its last flush: unflushed events are lost to the shard but were
//! never acknowledged, and positioned sources learn about the gap (their
//! next batch or flush fails) so they resume from the stored position.
//!
//! A shard that cannot read its own state (a checkpoint or stored value
//! that does not decode, a read that fails) does not guess: it stops
//! taking batches and writing anything, and says why in its status, which
//! turns readiness false. Writing over state it could not read (a default
//! checkpoint, say) would make its sources replay from the start and count
//! everything twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_state::clock::SharedClock;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, Supervised};
use tally_pipelines::aggregate::ComputeWeights;
use tally_pipelines::dedupe::{DedupeBudget, DedupeIndex};
use tally_pipelines::event::RequestEvent;
use tally_pipelines::ingest::{PartitionIngest, PartitionRules, Verdict};
use tally_pipelines::sample::RequestSampler;
use tally_pipelines::telemetry::ingest::TelemetryRules;
use tally_pipelines::telemetry::watch::WatchRules;
use tally_state::commit::TelemetryWrite;
use tally_state::{Checkpoint, Store};

mod after_flush;
mod control;
mod points;

pub use points::{TELEMETRY_ANOMALY, TELEMETRY_DRIFT};

use crate::anomaly::{DetectSettings, ShardDetectors};
use crate::limits::{lock, LimitSettings, SharedLimits};
use crate::messages::{Ack, ApplyBatch, BatchOutcome, FlushNow, Items, Source, Urgency};
use crate::status::ShardStatus;
use crate::telemetry::{BatchApplied, FlushCompleted, FlushFailed, MailboxDepth, ShardRestarted};
use crate::top::{lock_top, SharedTop};
use crate::Error;
use points::ShardPoints;

/// Settings every shard shares.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub rules: PartitionRules,
    pub weights: Arc<ComputeWeights>,
    /// Flush at least this often while dirty.
    pub flush_interval: Duration,
    /// Flush once this many events are pending (bounds memory).
    pub flush_max_events: usize,
    /// Bounded mailbox: senders wait (or get 503) beyond this.
    pub mailbox_capacity: usize,
    /// fsync acknowledged flushes (durable against power loss, not only
    /// against a process crash).
    pub sync_writes: bool,
    /// Event ids every shard's dedupe index may hold together.
    pub dedupe: Arc<DedupeBudget>,
    /// Clients a shard's top-consumer rankings hold per period.
    pub max_ranked_clients: usize,
    /// Rate limits and quotas.
    pub limits: LimitSettings,
    /// Anomaly detection on closed minutes.
    pub detect: DetectSettings,
    /// Which accepted events go on the channel as `REQUEST_RECORDED`
    /// (published once durable; off by default).
    pub request_sampler: RequestSampler,
    /// The ingest clock: bounds the event-time clock, times idle closes.
    pub clock: SharedClock,
    /// Telemetry resolutions and the series bound of a partition.
    pub telemetry: TelemetryRules,
    /// What telemetry series are watched for.
    pub watch: Arc<WatchRules>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            rules: PartitionRules::default(),
            weights: Arc::default(),
            flush_interval: Duration::from_secs(1),
            flush_max_events: 25_000,
            mailbox_capacity: 16,
            sync_writes: true,
            dedupe: DedupeBudget::new(4_000_000),
            max_ranked_clients: 100_000,
            limits: LimitSettings::default(),
            detect: DetectSettings::default(),
            request_sampler: RequestSampler::new(0.0),
            clock: tally_state::clock::system(),
            telemetry: TelemetryRules::default(),
            watch: Arc::new(WatchRules::default()),
        }
    }
}

pub struct Shard {
    partition: u16,
    store: Arc<Store>,
    config: Arc<ShardConfig>,
    ingest: PartitionIngest,
    /// What is durable.
    checkpoint: Checkpoint,
    /// What is applied (durable after the next flush).
    positions: BTreeMap<String, u64>,
    /// Positioned sources that lost applied-but-unflushed events in a
    /// restart; they must resume from the stored position.
    broken_sources: BTreeSet<String>,
    waiters: Vec<(Ack, BatchOutcome)>,
    urgent_flush_scheduled: bool,
    /// A waiter needs an fsync'd flush (HTTP acks), not only a WAL write.
    sync_needed: bool,
    dirty: bool,
    /// Mailbox depth and health, shared with the router (which refuses
    /// HTTP batches at capacity) and with health checks.
    status: Arc<ShardStatus>,
    /// Kafka ownership of the partition: the epoch whose batches are
    /// accepted, and whether the partition is currently let go.
    epoch: u64,
    released: bool,
    /// The clients' rate limiters and quotas (shared with HTTP handlers).
    limits: SharedLimits,
    /// The top-consumer ranking (shared with HTTP handlers).
    top: SharedTop,
    /// Closing minutes and judging them.
    detectors: ShardDetectors,
    /// When events last arrived (ingest clock), for closing idle minutes.
    last_events_ms: i64,
    /// Sampled accepted events, published as `REQUEST_RECORDED` once the
    /// flush that makes them durable commits.
    sampled: Vec<RequestEvent>,
    /// The partition's telemetry series.
    points: ShardPoints,
}

/// Internal: flush once the mailbox is drained.
#[derive(Message)]
#[rtype(result = "()")]
struct GroupCommit;

impl Shard {
    pub fn new(
        partition: u16,
        store: Arc<Store>,
        config: Arc<ShardConfig>,
        status: Arc<ShardStatus>,
        limits: SharedLimits,
        top: SharedTop,
    ) -> Self {
        let detectors = ShardDetectors::new(partition, store.clone(), config.detect.clone());
        let points = ShardPoints::empty(&config);
        let mut shard = Shard {
            partition,
            ingest: PartitionIngest::new(
                config.rules,
                config.weights.clone(),
                None,
                DedupeIndex::new(1),
            ),
            store,
            config,
            checkpoint: Checkpoint::default(),
            positions: BTreeMap::new(),
            broken_sources: BTreeSet::new(),
            waiters: Vec::new(),
            urgent_flush_scheduled: false,
            sync_needed: false,
            dirty: false,
            status,
            epoch: 0,
            released: false,
            detectors,
            last_events_ms: 0,
            sampled: Vec::new(),
            points,
            limits,
            top,
        };
        shard.reload();
        shard
    }

    /// Resets the hot state to the last flush; a shard whose state cannot
    /// be read stops (see the module documentation).
    fn reload(&mut self) {
        if let Err(e) = self.try_reload() {
            self.fail(format!("cannot load its state: {e}"));
        }
        self.status.set_loaded();
    }

    /// Stops the shard for good: nothing is applied or written until an
    /// operator repairs the state and restarts the instance.
    fn fail(&mut self, reason: String) {
        let reason = format!("partition {}: {reason}", self.partition);
        tracing::error!(shard = self.partition, reason = %reason, "shard stopped");
        self.status.set_fatal(&reason);
        self.answer_waiters(Err(Error::ShardFailed {
            shard: self.partition,
            reason,
        }));
    }

    /// Why the shard is stopped, if it is (its own read failed, or a
    /// reader found its stored state corrupt).
    fn failed(&self) -> Option<String> {
        self.status.stopped()
    }

    fn try_reload(&mut self) -> Result<(), Error> {
        let checkpoint = self.store.load_checkpoint(self.partition)?;
        let mut dedupe = DedupeIndex::within(self.config.dedupe.clone());
        let cutoff = checkpoint
            .event_clock_ms
            .map(|m| m.saturating_sub(self.config.rules.dedupe_window_ms));
        dedupe.restore(self.store.load_dedupe_claims(self.partition, cutoff)?);
        self.ingest = PartitionIngest::new(
            self.config.rules,
            self.config.weights.clone(),
            checkpoint.event_clock_ms,
            dedupe,
        );
        self.positions = checkpoint.positions.clone();
        self.checkpoint = checkpoint;
        self.dirty = false;
        // Not durable, so never published: the source sends them again.
        self.sampled.clear();
        let quotas = self.store.quotas(self.partition)?;
        lock(&self.limits).reset(quotas);
        self.detectors.reload(self.checkpoint.judged_before_ms)?;
        lock_top(&self.top).load(&self.store)?;
        self.points = ShardPoints::load(&self.store, self.partition, &self.config)?;
        Ok(())
    }

    fn apply(
        &mut self,
        source: &Source,
        items: &Items,
        positions: Option<&[u64]>,
        epoch: Option<u64>,
    ) -> Result<BatchOutcome, Error> {
        let mut outcome = BatchOutcome::default();
        if let Some(reason) = self.failed() {
            return Err(Error::ShardFailed {
                shard: self.partition,
                reason,
            });
        }
        if let Some(epoch) = epoch {
            if self.released || epoch != self.epoch {
                return Err(Error::StaleEpoch {
                    shard: self.partition,
                });
            }
        }
        let mut start = 0;
        let position_key = source.position_key();
        if let (Some(key), Some(positions)) = (position_key, positions) {
            if self.broken_sources.contains(key) {
                return Err(Error::SourceGap {
                    shard: self.partition,
                });
            }
            if positions.len() != items.len() {
                return Err(Error::InvalidBatch(
                    "positions and events differ in length".into(),
                ));
            }
            if let Some(&applied) = self.positions.get(key) {
                start = positions.partition_point(|&p| p <= applied);
            }
            outcome.already_applied = start as u64;
        }
        let now_ms = self.config.clock.now_ms();
        let applied = items.len() - start;
        match items {
            Items::Events(events) => {
                for event in &events[start..] {
                    match self.ingest.apply(event, now_ms) {
                        Verdict::Accepted => {
                            outcome.accepted += 1;
                            if self.config.request_sampler.keep(event) {
                                self.sampled.push(event.clone());
                            }
                        }
                        Verdict::Duplicate => outcome.duplicates += 1,
                        Verdict::Late { .. } => outcome.late += 1,
                    }
                }
            }
            Items::Points(points) => self.points.apply(&points[start..], now_ms, &mut outcome),
        }
        if let (Some(key), Some(&last)) = (position_key, positions.and_then(|p| p.last())) {
            if applied > 0 {
                self.positions.insert(key.to_string(), last);
            }
        }
        if applied > 0 {
            self.dirty = true;
            self.last_events_ms = now_ms;
        }
        BatchApplied {
            shard: self.partition,
            source: source.label(),
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            late: outcome.late,
        }
        .emit();
        Ok(outcome)
    }

    fn flush(&mut self, ctx: &mut Context<Self>) -> Result<(), Error> {
        if let Some(reason) = self.failed() {
            let error = Error::ShardFailed {
                shard: self.partition,
                reason,
            };
            self.answer_waiters(Err(error.clone()));
            return Err(error);
        }
        let started_ms = self.config.clock.now_ms();
        if !self.dirty && !lock(&self.limits).has_changes() && !self.detectors.has_changes() {
            self.status.flush_succeeded(started_ms);
            self.answer_waiters(Ok(()));
            return Ok(());
        }
        let started = Instant::now();
        let content = self.ingest.take_flush();
        let mut limit_writes = lock(&self.limits).take_writes();
        limit_writes.detectors = self.detectors.take_changed();
        limit_writes.open_minutes = self.detectors.opened_by(&content);
        limit_writes.closed_minutes = self.detectors.take_closed();
        let mut next = self.checkpoint.clone();
        next.positions = self.positions.clone();
        next.judged_before_ms = self.detectors.judged_before();
        let sync = self.config.sync_writes && self.sync_needed;
        let (telemetry, detectors) = match self.points.take_write() {
            Ok(write) => write,
            Err(e) => {
                // Nothing was written: restart from the last flush.
                self.answer_waiters(Err(e.clone()));
                ctx.stop();
                return Err(e);
            }
        };
        let mut telemetry_next = self.points.checkpoint.clone();
        let telemetry_write = TelemetryWrite {
            flush: &telemetry,
            rules: &self.config.telemetry,
            detectors: &detectors,
            checkpoint: &mut telemetry_next,
        };
        match self.store.commit_flush(
            self.partition,
            &content,
            &limit_writes,
            Some(telemetry_write),
            &mut next,
            sync,
        ) {
            Ok(stats) => {
                self.checkpoint = next;
                self.points.checkpoint = telemetry_next;
                self.points.publish(self.config.detect.alerts.as_deref());
                self.after_limits_flush(&content);
                self.detectors.note_flushed(&content);
                let needed = lock_top(&self.top).note_flushed(&content);
                self.admit_to_rankings(needed);
                self.publish_sampled();
                self.close_minutes(self.ingest.watermark_ms());
                self.status.flush_succeeded(started_ms);
                self.dirty = false;
                self.sync_needed = false;
                FlushCompleted {
                    shard: self.partition,
                    duration: started.elapsed(),
                    bytes: stats.bytes,
                    records: stats.records,
                }
                .emit();
                self.answer_waiters(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = Error::Storage(e.to_string());
                FlushFailed {
                    shard: self.partition,
                    error: &error.to_string(),
                }
                .emit();
                self.status.flush_failed(&error.to_string());
                self.answer_waiters(Err(error.clone()));
                // The supervisor restarts the shard from its last flush.
                ctx.stop();
                Err(error)
            }
        }
    }

    /// The periodic work: flush when dirty, close idle minutes.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.failed().is_some() {
            // Waiters that slipped in are answered, never left hanging.
            self.answer_waiters(Err(Error::ShardFailed {
                shard: self.partition,
                reason: self.failed().unwrap_or_default(),
            }));
            return;
        }
        if self.dirty
            || !self.waiters.is_empty()
            || lock(&self.limits).has_changes()
            || self.detectors.has_changes()
        {
            let _ = self.flush(ctx);
        }
        // A quiet partition still gets its last minutes judged.
        let idle_ms = i64::try_from(self.detectors.idle_close().as_millis()).unwrap_or(i64::MAX);
        if self.detectors.has_open()
            && self
                .config
                .clock
                .now_ms()
                .saturating_sub(self.last_events_ms)
                >= idle_ms
        {
            self.close_minutes(None);
        }
        MailboxDepth {
            shard: self.partition,
            depth: self.status.queued.load(Ordering::Relaxed),
        }
        .emit();
    }

    fn answer_waiters(&mut self, result: Result<(), Error>) {
        for (ack, outcome) in self.waiters.drain(..) {
            // A sender that gave up (client disconnected) is not an error.
            let _ = ack.send(result.clone().map(|()| outcome));
        }
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        self.last_events_ms = self.config.clock.now_ms();
        ctx.run_interval(self.config.flush_interval, |shard, ctx| shard.tick(ctx));
    }
}

impl Supervised for Shard {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        ShardRestarted {
            shard: self.partition,
        }
        .emit();
        self.status.restarted();
        for (source, applied) in &self.positions {
            if self.checkpoint.positions.get(source) != Some(applied) {
                self.broken_sources.insert(source.clone());
            }
        }
        self.answer_waiters(Err(Error::ShardRestarted {
            shard: self.partition,
        }));
        self.urgent_flush_scheduled = false;
        self.reload();
    }
}

impl Handler<ApplyBatch> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ApplyBatch, ctx: &mut Context<Self>) {
        self.status.batch_taken();
        let result = self.apply(
            &msg.source,
            &msg.events,
            msg.positions.as_deref(),
            msg.epoch,
        );
        match (result, msg.ack) {
            (Ok(outcome), Some((ack, urgency))) => {
                self.waiters.push((ack, outcome));
                if urgency == Urgency::FlushSoon {
                    self.sync_needed = true;
                }
                if urgency == Urgency::FlushSoon && !self.urgent_flush_scheduled {
                    self.urgent_flush_scheduled = true;
                    ctx.notify(GroupCommit);
                }
            }
            (Ok(_), None) => {}
            (Err(e), Some((ack, _))) => {
                let _ = ack.send(Err(e));
            }
            (Err(e), None) => tracing::error!(shard = self.partition, error = %e, "batch refused"),
        }
        if self.ingest.pending_events() + self.points.pending() >= self.config.flush_max_events {
            let _ = self.flush(ctx);
        }
    }
}

impl Handler<GroupCommit> for Shard {
    type Result = ();

    fn handle(&mut self, _: GroupCommit, ctx: &mut Context<Self>) {
        self.urgent_flush_scheduled = false;
        let _ = self.flush(ctx);
    }
}

impl Handler<FlushNow> for Shard {
    type Result = ();

    fn handle(&mut self, msg: FlushNow, ctx: &mut Context<Self>) {
        let result = self.flush(ctx).and_then(|()| {
            match msg.source.as_ref().and_then(Source::position_key) {
                Some(key) if self.broken_sources.contains(key) => Err(Error::SourceGap {
                    shard: self.partition,
                }),
                _ => Ok(()),
            }
        });
        let _ = msg.ack.send(result);
    }
}
