//! The live access layer: the key ring, projected from the control log
//! in the store at start-up and kept current by every change, and the
//! per-key request budgets.
//!
//! Access control is on as soon as one key exists (a bootstrap key from
//! `TALLY_BOOTSTRAP_KEY`, one made offline with `tally keys create`, or
//! the first made through the API): from then on every route but
//! `/health/live` (and, by configuration, readiness and metrics) wants a
//! key. With none, the API is open, which `serve` allows on a loopback
//! address only, unless told `--insecure`.
//!
//! Alone, a change is appended to the local log (synced) and applied. In
//! Kafka mode the control topic is the log's order: a change is published
//! there, and every instance (the writer too) appends what it reads to its
//! local log with the topic offset and applies it, so all instances apply
//! the same events in the same order; the writer answers once its own
//! reader has applied the change. A restart projects the local log, then
//! reads the topic from after the offset it stored.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use metrics::histogram;
use tally_actors::kafka::control::ControlTopic;
use tally_actors::telemetry::CONTROL_PROPAGATION;
use tally_pipelines::access::{
    ControlEvent, Envelope, KeyRing, KeySpec, KeyToken, Principal, Refusal, Scope,
};
use tally_pipelines::limit::LimiterState;
use tally_state::retention::wall_clock_ms;
use tally_state::Store;

/// The actor name of changes made with the bootstrap key's creation.
pub const BOOTSTRAP_ACTOR: &str = "bootstrap";
/// Control topic record keys of access events (one key per event: a
/// compacted topic must not fold a key's history into its last change).
pub const CONTROL_PREFIX: &str = "access/";
/// A snapshot of the key ring every this many events.
const SNAPSHOT_EVERY: u64 = 1000;
/// How long a writer waits for its change to come back from the topic.
const READ_BACK: Duration = Duration::from_secs(10);
/// Offsets of rejected (stale `If-Match`) changes remembered for their
/// writers.
const MAX_REJECTIONS: usize = 1024;

/// Where a change came from, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub ip: Option<String>,
}

pub struct Access {
    store: Arc<Store>,
    /// Every applied change is audited (none offline).
    audit: Option<Arc<crate::audit::Audit>>,
    ring: RwLock<KeyRing>,
    /// The next local sequence; held while an event is appended, so the
    /// log's order is the order events are applied in.
    log: Mutex<LogPosition>,
    /// Request budgets by key id (keys with a `rate_limit`).
    budgets: Mutex<HashMap<String, LimiterState>>,
    /// Kafka mode: the topic changes go through.
    control: OnceLock<Arc<ControlTopic>>,
    /// Topic offsets of changes refused at apply (stale version).
    rejected: Mutex<BTreeSet<i64>>,
    /// JWTs accepted besides keys, when configured.
    jwt: OnceLock<crate::jwt::JwtVerifier>,
}

struct LogPosition {
    next_seq: u64,
    /// The last control topic offset applied (-1: none).
    topic_offset: i64,
}

/// Why a change was not recorded.
#[derive(Debug)]
pub enum Stale {
    /// The key is at another version than the one asked for.
    Version {
        current: u64,
    },
    Store(tally_state::Error),
    /// Kafka mode: the control topic did not take or return the change.
    Unavailable(String),
}

impl Access {
    /// Projects the stored log, then (alone; in Kafka mode see
    /// [`Access::attach`]) makes sure the bootstrap key exists.
    pub fn open(
        store: Arc<Store>,
        audit: Option<Arc<crate::audit::Audit>>,
        bootstrap: Option<&str>,
        now_ms: i64,
    ) -> anyhow::Result<Arc<Access>> {
        // The last snapshot, then the events after it.
        let (mut ring, mut next_seq) = match store.control_snapshot()? {
            Some((seq, bytes)) => match serde_json::from_slice::<KeyRing>(&bytes) {
                Ok(ring) => (ring, seq + 1),
                Err(e) => {
                    tracing::warn!(error = %e, "the key ring snapshot cannot be read; replaying the whole control log");
                    (KeyRing::default(), 0)
                }
            },
            None => (KeyRing::default(), 0),
        };
        for (seq, bytes) in store.control_events(next_seq)? {
            let envelope = Envelope::decode(&bytes)
                .map_err(|e| anyhow::anyhow!("control event {seq} cannot be read: {e}"))?;
            ring.apply_envelope(&envelope);
            next_seq = seq + 1;
        }
        let topic_offset = store.control_topic_offset()?.unwrap_or(-1);
        let access = Arc::new(Access {
            store,
            audit,
            ring: RwLock::new(ring),
            log: Mutex::new(LogPosition {
                next_seq,
                topic_offset,
            }),
            budgets: Mutex::new(HashMap::new()),
            control: OnceLock::new(),
            rejected: Mutex::new(BTreeSet::new()),
            jwt: OnceLock::new(),
        });
        if let Some(token) = bootstrap {
            if let Some(event) = access.bootstrap_event(token)? {
                access
                    .record_at_version(BOOTSTRAP_ACTOR, now_ms, event, None, Origin::default())
                    .map_err(|e| anyhow::anyhow!("recording the bootstrap key: {e:?}"))?;
            }
        }
        Ok(access)
    }

    /// Kafka mode: changes go through `control` from now on. Called once
    /// this instance has read the topic to its end.
    pub async fn attach(
        self: &Arc<Self>,
        control: Arc<ControlTopic>,
        bootstrap: Option<&str>,
    ) -> anyhow::Result<()> {
        let _ = self.control.set(control);
        if let Some(token) = bootstrap {
            if let Some(event) = self.bootstrap_event(token)? {
                self.change(
                    BOOTSTRAP_ACTOR,
                    wall_clock_ms(),
                    event,
                    None,
                    Origin::default(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("publishing the bootstrap key: {e:?}"))?;
            }
        }
        Ok(())
    }

    /// The event that creates the bootstrap key, unless it exists.
    fn bootstrap_event(&self, token: &str) -> anyhow::Result<Option<ControlEvent>> {
        let id = tally_pipelines::access::token::parse(token).map_err(|e| {
            anyhow::anyhow!(
                "TALLY_BOOTSTRAP_KEY is not a Tally key ({e:?}); make one with `tally keys create --data-dir <dir> --name admin --scopes all`"
            )
        })?;
        let hash = tally_pipelines::access::token::hash(token);
        if let Some(existing) = self.read().get(id) {
            // Known, perhaps revoked since: a restart must not revive it.
            if existing.revoked_at_ms.is_some() {
                tracing::warn!(
                    key_id = id,
                    "the bootstrap key is revoked; it opens nothing"
                );
            } else if !existing.credentials.iter().any(|c| c.hash == hash) {
                anyhow::bail!("TALLY_BOOTSTRAP_KEY: key {id} exists with another secret");
            }
            return Ok(None);
        }
        Ok(Some(ControlEvent::KeyCreated {
            key_id: id.to_string(),
            spec: KeySpec {
                name: "bootstrap".into(),
                scopes: Scope::all(),
                client_ids: None,
                parent_key_id: None,
                expires_at_ms: None,
                ip_allowlist: vec![],
                rate_limit: None,
                metadata: Default::default(),
            },
            hash,
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.ring.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts JWTs checked by `verifier` too (which turns access
    /// control on).
    pub fn accept_jwts(&self, verifier: crate::jwt::JwtVerifier) {
        let _ = self.jwt.set(verifier);
    }

    /// Whether requests need a key (at least one key exists, or JWTs are
    /// configured).
    pub fn enforced(&self) -> bool {
        self.jwt.get().is_some() || !self.read().is_empty()
    }

    /// Judges a JWT, when JWTs are configured (`None`: not configured).
    pub fn verify_jwt(&self, presented: &str) -> Option<Result<Principal, crate::jwt::JwtRefusal>> {
        self.jwt.get().map(|v| v.verify(presented))
    }

    pub fn verify(
        &self,
        presented: &str,
        peer: Option<IpAddr>,
        now_ms: i64,
    ) -> Result<Principal, Refusal> {
        self.read().verify(presented, peer, now_ms)
    }

    /// Reads the ring (for listings and admission checks).
    pub fn with_ring<T>(&self, f: impl FnOnce(&KeyRing) -> T) -> T {
        f(&self.read())
    }

    /// Makes a change: through the control topic in Kafka mode, else
    /// appended locally (synced before this answers). `expected` is the
    /// version `If-Match` named.
    pub async fn change(
        self: &Arc<Self>,
        actor: &str,
        at_ms: i64,
        event: ControlEvent,
        expected: Option<u64>,
        origin: Origin,
    ) -> Result<Envelope, Stale> {
        let Some(control) = self.control.get() else {
            let me = self.clone();
            let actor = actor.to_string();
            return tokio::task::spawn_blocking(move || {
                me.record_at_version(&actor, at_ms, event, expected, origin)
            })
            .await
            .map_err(|e| Stale::Unavailable(format!("store task failed: {e}")))?;
        };
        let envelope = Envelope::new(0, at_ms, actor, event)
            .expecting(expected)
            .from_request(origin.request_id, origin.ip);
        let record_key = format!("{CONTROL_PREFIX}{}", uuid::Uuid::new_v4());
        let json = String::from_utf8_lossy(&envelope.encode()).into_owned();
        let offset = control
            .publish(&record_key, Some(&json))
            .await
            .map_err(|e| Stale::Unavailable(e.to_string()))?;
        control
            .wait_applied(offset, READ_BACK)
            .await
            .map_err(|e| Stale::Unavailable(e.to_string()))?;
        if self.lock_rejected().remove(&offset) {
            let current = self
                .read()
                .get(envelope.event.target())
                .map_or(0, |k| k.version);
            return Err(Stale::Version { current });
        }
        Ok(envelope)
    }

    fn lock_rejected(&self) -> std::sync::MutexGuard<'_, BTreeSet<i64>> {
        self.rejected.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one event to the local log (synced) and applies it, if
    /// the event's key is at version `expected` (checked under the lock
    /// that orders the log, so two racing writers cannot both pass).
    pub fn record_at_version(
        &self,
        actor: &str,
        at_ms: i64,
        event: ControlEvent,
        expected: Option<u64>,
        origin: Origin,
    ) -> Result<Envelope, Stale> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let envelope = Envelope::new(log.next_seq, at_ms, actor, event)
            .from_request(origin.request_id, origin.ip);
        if let Some(expected) = expected {
            let current = self
                .read()
                .get(envelope.event.target())
                .map_or(0, |k| k.version);
            if current != expected {
                self.audit(&envelope, "stale_version");
                return Err(Stale::Version { current });
            }
        }
        self.store
            .append_control_event(log.next_seq, &envelope.encode(), None)
            .map_err(Stale::Store)?;
        log.next_seq += 1;
        self.apply(&envelope);
        self.snapshot_if_due(envelope.seq);
        Ok(envelope)
    }

    fn apply(&self, envelope: &Envelope) -> bool {
        let applied = self
            .ring
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply_envelope(envelope);
        self.audit(envelope, if applied { "applied" } else { "stale_version" });
        if let ControlEvent::KeyRevoked { key_id } = &envelope.event {
            self.budgets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(key_id);
        }
        applied
    }

    /// Every [`SNAPSHOT_EVERY`] events, the ring as of event `seq` (called
    /// with the log lock held, so no later event is in it yet).
    fn snapshot_if_due(&self, seq: u64) {
        if (seq + 1) % SNAPSHOT_EVERY != 0 {
            return;
        }
        let bytes = match serde_json::to_vec(&*self.read()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a key ring snapshot");
                return;
            }
        };
        if let Err(e) = self.store.put_control_snapshot(seq, &bytes) {
            tracing::warn!(error = %e, "cannot store a key ring snapshot");
        }
    }

    fn audit(&self, envelope: &Envelope, result: &str) {
        let Some(audit) = &self.audit else {
            return;
        };
        let client_ids = match &envelope.event {
            ControlEvent::KeyCreated { spec, .. } => spec
                .client_ids
                .as_ref()
                .map(|c| c.iter().cloned().collect())
                .unwrap_or_default(),
            ControlEvent::LimitsSet { client_id, .. }
            | ControlEvent::QuotaSet { client_id, .. } => {
                vec![client_id.clone()]
            }
            _ => vec![],
        };
        audit.record(&crate::audit::AuditEntry {
            at_ms: envelope.at_ms,
            actor: envelope.actor.clone(),
            action: envelope.event.action().to_string(),
            target: envelope.event.target().to_string(),
            client_ids,
            request_id: envelope.request_id.clone(),
            ip: envelope.ip.clone(),
            result: result.to_string(),
        });
    }

    /// Kafka mode: one access record read from the control topic at
    /// `offset` (called in topic order by the control reader). Records
    /// at or before the stored offset were applied before a restart.
    pub fn apply_published(&self, offset: i64, value: Option<&str>) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if offset <= log.topic_offset {
            return;
        }
        let Some(value) = value else {
            return;
        };
        let mut envelope = match Envelope::decode(value.as_bytes()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(offset, error = %e, "an access change on the control topic cannot be read; skipped");
                return;
            }
        };
        envelope.seq = log.next_seq;
        if let Err(e) =
            self.store
                .append_control_event(log.next_seq, &envelope.encode(), Some(offset))
        {
            // Not applied either: the next start reads it again.
            tracing::error!(offset, error = %e, "cannot store an access change");
            return;
        }
        log.next_seq += 1;
        log.topic_offset = offset;
        let applied = self.apply(&envelope);
        self.snapshot_if_due(envelope.seq);
        if !applied {
            let mut rejected = self.lock_rejected();
            rejected.insert(offset);
            while rejected.len() > MAX_REJECTIONS {
                rejected.pop_first();
            }
        }
        let delay_ms = wall_clock_ms().saturating_sub(envelope.at_ms).max(0);
        histogram!(CONTROL_PROPAGATION).record(delay_ms as f64 / 1000.0);
    }

    /// The logged events made at or before `as_of_ms`, in log order
    /// (what was known to apply at that time). Blocking (store I/O).
    pub fn events_until(&self, as_of_ms: i64) -> Result<Vec<Envelope>, tally_state::Error> {
        let mut out = Vec::new();
        for (seq, bytes) in self.store.control_events(0)? {
            let envelope = Envelope::decode(&bytes)
                .map_err(|e| tally_state::Error::Corrupt(format!("control event {seq}: {e}")))?;
            if envelope.at_ms <= as_of_ms {
                out.push(envelope);
            }
        }
        Ok(out)
    }

    /// The key ring as it was at `as_of_ms`.
    pub fn ring_at(&self, as_of_ms: i64) -> Result<KeyRing, tally_state::Error> {
        let mut ring = KeyRing::default();
        for envelope in self.events_until(as_of_ms)? {
            ring.apply_envelope(&envelope);
        }
        Ok(ring)
    }

    /// Takes one request from the budget of the key and of every key
    /// above it that has one (so children share their parent's), or
    /// nothing when any of them is spent: answers the wait in ms then.
    pub fn charge(&self, principal: &Principal, now_ms: i64) -> Result<(), i64> {
        let limits: Vec<(String, tally_pipelines::access::KeyRateLimit)> = {
            let ring = self.read();
            principal
                .chain
                .iter()
                .filter_map(|id| ring.get(id))
                .filter_map(|k| k.spec.rate_limit.map(|r| (k.key_id.clone(), r)))
                .collect()
        };
        if limits.is_empty() {
            return Ok(());
        }
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        // Peek at all first: a request refused by one level takes nothing
        // from the others.
        let mut wait = 0;
        for (id, r) in &limits {
            let limit = r.limit();
            let state = budgets
                .entry(id.clone())
                .or_insert_with(|| LimiterState::new(r.algorithm, &limit, now_ms));
            if state.algorithm() != r.algorithm {
                *state = LimiterState::new(r.algorithm, &limit, now_ms);
            }
            let d = state.peek(&limit, now_ms, 1);
            if !d.allowed {
                wait = wait.max(d.retry_after_ms.max(1));
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for (id, r) in &limits {
            if let Some(state) = budgets.get_mut(id) {
                state.check(&r.limit(), now_ms, 1);
            }
        }
        Ok(())
    }
}

/// `tally keys create`, offline: appends a key to a data directory's
/// control log (the service must not be running on it) and returns it.
pub fn create_offline(store: Arc<Store>, spec: KeySpec, now_ms: i64) -> anyhow::Result<KeyToken> {
    let access = Access::open(store, None, None, now_ms)?;
    let operator = Principal::operator("cli");
    let spec = access
        .with_ring(|ring| ring.admit(&operator, spec, now_ms))
        .map_err(|problems| {
            anyhow::anyhow!(
                "{}",
                problems
                    .iter()
                    .map(|(f, r)| format!("{f}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
    let token = KeyToken::generate(&mut rand::rng(), None);
    access
        .record_at_version(
            "cli",
            now_ms,
            ControlEvent::KeyCreated {
                key_id: token.id().to_string(),
                spec,
                hash: token.hash(),
            },
            None,
            Origin::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("recording the key")?;
    Ok(token)
}
