//! The rate-limit and quota state a shard holds for its clients, and the
//! gateway check. A client's limiter lives in the shard that owns the
//! client, so checks for one client are serialized and exact under any
//! concurrency.
//!
//! Unlike event batches, checks do not travel through the shard's mailbox:
//! a decision costs well under a microsecond, and a round trip to the
//! shard's thread and back (two context switches) cost several times the
//! rest of a check. The shard shares its limits behind a mutex instead;
//! HTTP handlers lock it for the decision, the shard for its flush.
//!
//! Nothing under that lock touches the disk. A check whose client is not
//! in memory returns [`Prepared::Needs`]; the caller reads what is missing
//! ([`load`]) without the lock, off the async workers, and installs it.
//! Every flush bumps a generation number, and a load read before the
//! flush it raced with is discarded and read again. Limiters leave memory
//! through a bounded LRU; an evicted limiter with unflushed changes waits
//! in memory for the next flush (which writes it) and is read back from
//! there, so eviction never writes under the lock either.
//!
//! Quotas: usage is the flushed statistics (the numbers the usage queries
//! return), read once per client and period and then kept current from
//! each flush's deltas. Hard quotas reserve what checks admit (see
//! `tally_pipelines::reservation`).

mod check;
mod load;
mod quota;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use tally_pipelines::ingest::StatsDelta;
use tally_pipelines::limit::policy::{ClientLimiter, LimitConfig};
use tally_pipelines::limit::Algorithm;
use tally_pipelines::quota::{QuotaConfig, QuotaMarks, QuotaStatus};
use tally_state::limits::LimitWrites;

use crate::adaptive::AdaptiveLimits;
use crate::alerts::AlertLog;
use crate::messages::{LimitReply, LimitRequest};
use crate::Error;

pub use load::{load, Loaded, Needs};
use quota::QuotaState;

/// Limit settings every shard shares.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Applies to clients without their own configuration.
    /// Shared, not copied: a check takes it on every call.
    pub default_config: Option<Arc<LimitConfig>>,
    /// Clients whose limiter state a shard keeps in memory.
    pub max_clients: usize,
    pub adaptive: Arc<AdaptiveLimits>,
    /// Where RATE_LIMITED and quota events go.
    pub alerts: Option<Arc<AlertLog>>,
    /// A hard-quota reservation whose event has not been ingested after
    /// this long is released (the request never happened, or is not
    /// reported).
    pub reservation_ttl_ms: i64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            default_config: None,
            max_clients: 100_000,
            adaptive: Arc::default(),
            alerts: None,
            reservation_ttl_ms: 5 * 60_000,
        }
    }
}

/// Why a check was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    RateLimit,
    Quota,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::RateLimit => "rate_limit",
            DenyReason::Quota => "quota",
        }
    }
}

/// The answer to a check or a status request.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckAnswer {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    /// `None` when no rate limit applies to the client.
    pub algorithm: Option<Algorithm>,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: i64,
    pub retry_after_ms: i64,
    /// `global`, the endpoint whose limit decided, `quota`, `disabled` or
    /// `none`.
    pub policy: String,
    pub window_seconds: u64,
    pub factor: f64,
    /// Shadow mode: a limit denied, the request was allowed anyway.
    pub shadow_limited: bool,
    /// Soft quota exceeded: allowed, marked as overage.
    pub quota_overage: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Client {
    /// The client's own configuration (else the default applies).
    pub(crate) config: Option<Arc<LimitConfig>>,
    pub(crate) limiter: ClientLimiter,
}

/// A shard's limits, shared with the HTTP handlers.
pub type SharedLimits = Arc<Mutex<ShardLimits>>;

/// Locks a shard's limits. A panic while holding the lock cannot leave a
/// half-applied decision (each is one assignment), so poisoning is ignored.
pub fn lock(limits: &SharedLimits) -> MutexGuard<'_, ShardLimits> {
    limits.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a request can be served from memory.
#[derive(Debug)]
pub enum Prepared {
    Ready,
    /// Read this (without the lock), then [`ShardLimits::install`] it.
    Needs(Needs),
}

pub struct ShardLimits {
    partition: u16,
    settings: LimitSettings,
    clients: LruCache<String, Client>,
    /// Clients whose limiter changed since the last flush.
    changed: HashSet<String>,
    /// Evicted limiters with unflushed changes: the next flush writes them
    /// (they move to `writing`), and until it has, they are read back from
    /// here, not from the store.
    evicted: HashMap<String, Client>,
    writing: HashMap<String, Client>,
    /// Quota configuration and state of every client with a quota (read
    /// when the shard loads its state).
    quotas: HashMap<String, QuotaState>,
    quotas_changed: HashSet<String>,
    /// Bumped by every flush and configuration change: a load that read the
    /// store before it may be stale and is read again.
    generation: u64,
    /// The minute each client last had a RATE_LIMITED event (at most one
    /// per client and minute goes on the channel).
    limited_in_minute: HashMap<String, i64>,
    /// Denied checks per (minute, client) since the detectors last took
    /// them; bounded by `max_clients` entries.
    denials: HashMap<(i64, String), u64>,
}

impl ShardLimits {
    pub fn new(partition: u16, settings: LimitSettings) -> Self {
        let capacity = NonZeroUsize::new(settings.max_clients.max(1)).unwrap_or(NonZeroUsize::MIN);
        ShardLimits {
            partition,
            settings,
            clients: LruCache::new(capacity),
            changed: HashSet::new(),
            evicted: HashMap::new(),
            writing: HashMap::new(),
            quotas: HashMap::new(),
            quotas_changed: HashSet::new(),
            generation: 0,
            limited_in_minute: HashMap::new(),
            denials: HashMap::new(),
        }
    }

    pub fn partition(&self) -> u16 {
        self.partition
    }

    /// Forgets everything in memory (a released partition).
    pub fn clear(&mut self) {
        self.clients.clear();
        self.changed.clear();
        self.evicted.clear();
        self.writing.clear();
        self.quotas.clear();
        self.quotas_changed.clear();
        self.generation += 1;
    }

    /// Back to the flushed state: `quotas` are every quota configured in
    /// the partition with its stored marks (read by the caller).
    pub fn reset(&mut self, quotas: Vec<(String, QuotaConfig, QuotaMarks)>) {
        self.clear();
        self.quotas = quotas
            .into_iter()
            .map(|(client, config, marks)| (client, QuotaState::new(config, marks)))
            .collect();
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What `request` needs that is not in memory.
    pub fn prepare(&self, request: &LimitRequest) -> Prepared {
        let (client, now_ms) = match request {
            LimitRequest::Check {
                client_id, now_ms, ..
            } => (client_id, Some(*now_ms)),
            LimitRequest::QuotaStatus { client_id, now_ms } => {
                return self.prepare_quota(client_id, *now_ms)
            }
            LimitRequest::SetConfig { client_id, .. }
            | LimitRequest::ResetCounters { client_id, .. } => (client_id, None),
            LimitRequest::SetQuota { .. } => return Prepared::Ready,
        };
        let limiter = !self.has_client(client);
        let quota = now_ms.and_then(|now| match self.prepare_quota(client, now) {
            Prepared::Needs(n) => n.quota_usage,
            Prepared::Ready => None,
        });
        if limiter || quota.is_some() {
            Prepared::Needs(Needs {
                client: client.clone(),
                limiter,
                quota_usage: quota,
            })
        } else {
            Prepared::Ready
        }
    }

    fn prepare_quota(&self, client: &str, now_ms: i64) -> Prepared {
        match self.quotas.get(client) {
            Some(q) if !q.usage_is_current(now_ms) => Prepared::Needs(Needs {
                client: client.to_string(),
                limiter: false,
                quota_usage: Some((q.config.clone(), now_ms)),
            }),
            _ => Prepared::Ready,
        }
    }

    fn has_client(&self, client: &str) -> bool {
        self.clients.contains(client)
            || self.evicted.contains_key(client)
            || self.writing.contains_key(client)
    }

    /// Installs what [`load`] read, unless a flush or configuration change
    /// since `generation` may have made it stale (then prepare again).
    pub fn install(&mut self, loaded: Loaded, generation: u64) -> bool {
        if generation != self.generation {
            return false;
        }
        if let Some(client) = loaded.client {
            if !self.has_client(&loaded.name) {
                self.insert_client(loaded.name.clone(), client);
            }
        }
        if let Some(usage) = loaded.quota_usage {
            if let Some(q) = self.quotas.get_mut(&loaded.name) {
                q.install_usage(usage);
            }
        }
        true
    }

    /// Puts a client in the LRU; an evicted one with unflushed changes
    /// waits for the next flush in memory.
    fn insert_client(&mut self, name: String, client: Client) {
        if let Some((evicted, state)) = self.clients.push(name.clone(), client) {
            if evicted != name && self.changed.remove(&evicted) {
                self.evicted.insert(evicted, state);
            }
        }
    }

    /// The client's in-memory state (after [`ShardLimits::prepare`]).
    fn client(&mut self, client: &str) -> Result<&mut Client, Error> {
        if !self.clients.contains(client) {
            let state = self
                .evicted
                .remove(client)
                .or_else(|| self.writing.get(client).cloned())
                .ok_or_else(|| Error::NotLoaded(client.to_string()))?;
            // Changed since its last write: it stays changed.
            self.changed.insert(client.to_string());
            self.insert_client(client.to_string(), state);
        }
        self.clients
            .get_mut(client)
            .ok_or_else(|| Error::NotLoaded(client.to_string()))
    }

    /// Serves one request whose needs are in memory.
    pub fn handle(&mut self, request: LimitRequest) -> Result<LimitReply, Error> {
        match request {
            LimitRequest::Check {
                client_id,
                endpoint,
                cost,
                consume,
                now_ms,
            } => self
                .check(&client_id, &endpoint, cost, consume, now_ms)
                .map(LimitReply::Check),
            LimitRequest::QuotaStatus { client_id, now_ms } => {
                Ok(LimitReply::Quota(self.quota_status(&client_id, now_ms)?))
            }
            LimitRequest::SetConfig { client_id, config } => self
                .set_config(&client_id, config)
                .map(|()| LimitReply::Done),
            LimitRequest::ResetCounters {
                client_id,
                endpoint,
            } => self
                .reset_counters(&client_id, endpoint.as_deref())
                .map(|()| LimitReply::Done),
            LimitRequest::SetQuota { client_id, config } => {
                self.set_quota(&client_id, config);
                Ok(LimitReply::Done)
            }
        }
    }

    /// The configuration was written to the store (by the caller); this
    /// applies it in memory.
    fn set_config(&mut self, client: &str, config: Option<LimitConfig>) -> Result<(), Error> {
        let entry = self.client(client)?;
        if let Some(c) = &config {
            entry.limiter.retain_configured(c);
        }
        entry.config = config.map(Arc::new);
        self.changed.insert(client.to_string());
        self.generation += 1;
        Ok(())
    }

    fn reset_counters(&mut self, client: &str, endpoint: Option<&str>) -> Result<(), Error> {
        self.client(client)?.limiter.reset(endpoint);
        self.changed.insert(client.to_string());
        Ok(())
    }

    /// The quota was written to the store (by the caller); this applies it
    /// in memory, keeping the period's marks and reservations.
    fn set_quota(&mut self, client: &str, config: Option<QuotaConfig>) {
        match config {
            Some(c) => match self.quotas.get_mut(client) {
                Some(q) => q.set_config(c),
                None => {
                    self.quotas.insert(
                        client.to_string(),
                        QuotaState::new(c, QuotaMarks::default()),
                    );
                }
            },
            None => {
                self.quotas.remove(client);
            }
        }
        self.generation += 1;
    }

    /// The quota configuration and status of a client (`None` without a
    /// quota).
    fn quota_status(
        &mut self,
        client: &str,
        now_ms: i64,
    ) -> Result<Option<(QuotaConfig, QuotaStatus)>, Error> {
        let ttl = self.settings.reservation_ttl_ms;
        match self.quotas.get_mut(client) {
            Some(q) => Ok(Some((q.config.clone(), q.status(now_ms, ttl)?))),
            None => Ok(None),
        }
    }

    /// Whether a flush has limiter or quota state to write.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || !self.quotas_changed.is_empty() || !self.evicted.is_empty()
    }

    /// Changed limiter state and quota marks, for the flush's WriteBatch.
    /// Evicted limiters move to `writing` until the flush has committed.
    pub fn take_writes(&mut self) -> LimitWrites {
        let mut writes = LimitWrites::default();
        for client in self.changed.drain() {
            if let Some(entry) = self.clients.peek(&client) {
                writes.limiters.push((client, entry.limiter.clone()));
            }
        }
        for (client, state) in self.evicted.drain() {
            writes
                .limiters
                .push((client.clone(), state.limiter.clone()));
            self.writing.insert(client, state);
        }
        for client in self.quotas_changed.drain() {
            if let Some(q) = self.quotas.get(&client) {
                writes.quota_marks.push((client, q.marks.clone()));
            }
        }
        writes
    }

    /// After a committed flush: the written limiters are in the store now,
    /// each client's flushed requests settle its reservations and move its
    /// cached usage, and quota thresholds crossed raise their events.
    /// Returns the quota clients whose usage is not in memory, for the
    /// caller to load and [`ShardLimits::observe_quota`] without the lock.
    pub fn after_flush(
        &mut self,
        flushed: &[StatsDelta],
        now_ms: i64,
    ) -> Vec<(String, QuotaConfig)> {
        self.writing.clear();
        self.generation += 1;
        if self.quotas.is_empty() {
            return Vec::new();
        }
        let mut touched: HashSet<&str> = HashSet::new();
        for delta in flushed {
            if let Some(q) = self.quotas.get_mut(&delta.client_id) {
                if q.add_flushed(delta, now_ms) {
                    self.quotas_changed.insert(delta.client_id.clone());
                }
                touched.insert(delta.client_id.as_str());
            }
        }
        let mut unloaded = Vec::new();
        for client in touched {
            if self
                .quotas
                .get(client)
                .is_some_and(|q| q.usage_is_current(now_ms))
            {
                self.observe_quota(client, now_ms);
            } else if let Some(q) = self.quotas.get(client) {
                unloaded.push((client.to_string(), q.config.clone()));
            }
        }
        unloaded
    }

    /// Raises the quota events a client's current status calls for (once
    /// per period each).
    pub fn observe_quota(&mut self, client: &str, now_ms: i64) {
        let ttl = self.settings.reservation_ttl_ms;
        let alerts = self.settings.alerts.clone();
        let Some(q) = self.quotas.get_mut(client) else {
            return;
        };
        if q.observe(client, now_ms, ttl, alerts.as_deref()) {
            self.quotas_changed.insert(client.to_string());
        }
    }
}
