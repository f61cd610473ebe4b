//! The live control plane: the key ring and the versions of every
//! client's limits and quota and of every webhook, projected from the
//! control log in the store at start-up and kept current by every change;
//! and the per-key request budgets ([`budget`]).
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

pub mod budget;
pub mod offline;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::histogram;
use tally_actors::kafka::control::ControlTopic;
use tally_actors::telemetry::CONTROL_PROPAGATION;
use tally_pipelines::access::plane::PLANE_FORMAT;
use tally_pipelines::access::{
    ControlEvent, ControlPlane, Envelope, KeyRing, KeySpec, Principal, Refusal, Scope, Stream,
};
use tally_state::retention::wall_clock_ms;
use tally_state::Store;

/// The actor name of changes made with the bootstrap key's creation.
pub const BOOTSTRAP_ACTOR: &str = "bootstrap";
/// Control topic record keys of access events (one key per event: a
/// compacted topic must not fold a key's history into its last change).
pub const CONTROL_PREFIX: &str = "access/";
/// A snapshot of the control plane every this many events.
const SNAPSHOT_EVERY: u64 = 1000;
/// How long a writer waits for its change to come back from the topic.
const READ_BACK: Duration = Duration::from_secs(10);
/// Outcomes of changes read from the control topic remembered for their
/// writers (who wait for their own change to come back).
const MAX_OUTCOMES: usize = 1024;

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
    plane: RwLock<ControlPlane>,
    /// The next local sequence; held while an event is appended, so the
    /// log's order is the order events are applied in.
    log: Mutex<LogPosition>,
    /// Request budgets of keys with a `rate_limit`.
    budgets: budget::KeyBudgets,
    /// Told of every applied change (the webhooks follow theirs).
    listener: OnceLock<Listener>,
    /// Kafka mode: the topic changes go through.
    control: OnceLock<Arc<ControlTopic>>,
    /// Kafka mode: by topic offset, the version a change left its stream
    /// at, or `None` when it was refused at apply (stale version).
    outcomes: Mutex<BTreeMap<i64, Option<u64>>>,
    /// JWTs accepted besides keys, when configured.
    jwt: OnceLock<crate::jwt::JwtVerifier>,
}

type Listener = Box<dyn Fn(&Envelope) + Send + Sync>;

struct LogPosition {
    next_seq: u64,
    /// The last control topic offset applied (-1: none).
    topic_offset: i64,
}

/// A change recorded and applied: the version it left its stream at
/// (the ETag to answer).
#[derive(Debug)]
pub struct Applied {
    pub version: u64,
}

/// Why a change was not recorded.
#[derive(Debug)]
pub enum Stale {
    /// The changed thing is at another version than the one asked for.
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
        let (mut plane, mut next_seq) = match store.control_snapshot()? {
            Some((seq, bytes)) => match serde_json::from_slice::<ControlPlane>(&bytes) {
                Ok(plane) if plane.format == PLANE_FORMAT => (plane, seq + 1),
                // A snapshot of an older build (the key ring alone).
                Ok(_) => (ControlPlane::new(), 0),
                Err(e) => {
                    tracing::warn!(error = %e, "the control plane snapshot cannot be read; replaying the whole control log");
                    (ControlPlane::new(), 0)
                }
            },
            None => (ControlPlane::new(), 0),
        };
        for (seq, bytes) in store.control_events(next_seq)? {
            let envelope = Envelope::decode(&bytes)
                .map_err(|e| anyhow::anyhow!("control event {seq} cannot be read: {e}"))?;
            plane.apply_envelope(&envelope);
            next_seq = seq + 1;
        }
        let topic_offset = store.control_topic_offset()?.unwrap_or(-1);
        let access = Arc::new(Access {
            store,
            audit,
            plane: RwLock::new(plane),
            log: Mutex::new(LogPosition {
                next_seq,
                topic_offset,
            }),
            budgets: budget::KeyBudgets::default(),
            listener: OnceLock::new(),
            control: OnceLock::new(),
            outcomes: Mutex::new(BTreeMap::new()),
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
        for envelope in self.unpublished()? {
            tracing::info!(
                key_id = envelope.event.target(),
                "publishing a key made offline to the control topic"
            );
            self.change(
                &envelope.actor,
                envelope.at_ms,
                envelope.event,
                None,
                Origin::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("publishing a key made offline: {e:?}"))?;
        }
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

    /// Keys created in the local log only (`tally keys create` on this
    /// data directory) and never read back from the control topic.
    fn unpublished(&self) -> anyhow::Result<Vec<Envelope>> {
        let mut local = Vec::new();
        let mut published = HashSet::new();
        for (seq, bytes) in self.store.control_events(0)? {
            let envelope = Envelope::decode(&bytes)
                .map_err(|e| anyhow::anyhow!("control event {seq} cannot be read: {e}"))?;
            if let ControlEvent::KeyCreated { key_id, .. } = &envelope.event {
                if envelope.topic_offset.is_some() {
                    published.insert(key_id.clone());
                } else if envelope.actor == offline::CLI_ACTOR {
                    local.push(envelope);
                }
            }
        }
        local.retain(|e| !published.contains(e.event.target()));
        Ok(local)
    }

    /// The event that creates the bootstrap key, unless it exists.
    fn bootstrap_event(&self, token: &str) -> anyhow::Result<Option<ControlEvent>> {
        let id = tally_pipelines::access::token::parse(token).map_err(|e| {
            anyhow::anyhow!(
                "TALLY_BOOTSTRAP_KEY is not a Tally key ({e:?}); make one with `tally keys create --data-dir <dir> --name admin --scopes all`"
            )
        })?;
        let hash = tally_pipelines::access::token::hash(token);
        if let Some(existing) = self.read().keys.get(id) {
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ControlPlane> {
        self.plane.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells `listener` of every change applied from now on (in log
    /// order, on the thread that applies it).
    pub fn on_applied(&self, listener: impl Fn(&Envelope) + Send + Sync + 'static) {
        let _ = self.listener.set(Box::new(listener));
    }

    /// Accepts JWTs checked by `verifier` too (which turns access
    /// control on).
    pub fn accept_jwts(&self, verifier: crate::jwt::JwtVerifier) {
        let _ = self.jwt.set(verifier);
    }

    /// Whether requests need a key (at least one key exists, or JWTs are
    /// configured).
    pub fn enforced(&self) -> bool {
        self.jwt.get().is_some() || !self.read().keys.is_empty()
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
        self.read().keys.verify(presented, peer, now_ms)
    }

    /// Reads the ring (for listings and admission checks).
    pub fn with_ring<T>(&self, f: impl FnOnce(&KeyRing) -> T) -> T {
        f(&self.read().keys)
    }

    /// Reads the whole projection (versions, webhooks).
    pub fn with_plane<T>(&self, f: impl FnOnce(&ControlPlane) -> T) -> T {
        f(&self.read())
    }

    /// The version of a stream now (what an ETag gives).
    pub fn version(&self, stream: Stream<'_>) -> u64 {
        self.read().version(stream)
    }

    /// Makes a change: through the control topic in Kafka mode, else
    /// appended locally (synced before this answers). `expected` is the
    /// version `If-Match` named, of the event's stream.
    pub async fn change(
        self: &Arc<Self>,
        actor: &str,
        at_ms: i64,
        event: ControlEvent,
        expected: Option<u64>,
        origin: Origin,
    ) -> Result<Applied, Stale> {
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
        let outcome = self.lock_outcomes().remove(&offset);
        match outcome {
            Some(Some(version)) => Ok(Applied { version }),
            Some(None) => Err(Stale::Version {
                current: self.version(envelope.event.stream()),
            }),
            // Not remembered (a thousand changes overtook it): applied,
            // at the version the stream has now or an earlier one.
            None => Ok(Applied {
                version: self.version(envelope.event.stream()),
            }),
        }
    }

    fn lock_outcomes(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Option<u64>>> {
        self.outcomes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one event to the local log (synced) and applies it, if
    /// the event's stream is at version `expected` (checked under the lock
    /// that orders the log, so two racing writers cannot both pass).
    pub fn record_at_version(
        &self,
        actor: &str,
        at_ms: i64,
        event: ControlEvent,
        expected: Option<u64>,
        origin: Origin,
    ) -> Result<Applied, Stale> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let envelope = Envelope::new(log.next_seq, at_ms, actor, event)
            .from_request(origin.request_id, origin.ip);
        if let Some(expected) = expected {
            let current = self.version(envelope.event.stream());
            if current != expected {
                self.audit(&envelope, "stale_version");
                return Err(Stale::Version { current });
            }
        }
        self.store
            .append_control_event(log.next_seq, &envelope.encode(), None)
            .map_err(Stale::Store)?;
        log.next_seq += 1;
        let version = self.apply(&envelope).unwrap_or(0);
        self.snapshot_if_due(envelope.seq);
        Ok(Applied { version })
    }

    /// Applies an event to the projection: the version it left its
    /// stream at, or `None` when refused (stale `expect_version`).
    fn apply(&self, envelope: &Envelope) -> Option<u64> {
        let version = {
            let mut plane = self.plane.write().unwrap_or_else(PoisonError::into_inner);
            plane
                .apply_envelope(envelope)
                .then(|| plane.version(envelope.event.stream()))
        };
        self.audit(
            envelope,
            if version.is_some() {
                "applied"
            } else {
                "stale_version"
            },
        );
        version?;
        if let ControlEvent::KeyRevoked { key_id } = &envelope.event {
            self.budgets.forget(key_id);
        }
        if let Some(listener) = self.listener.get() {
            listener(envelope);
        }
        version
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
                tracing::warn!(error = %e, "cannot encode a control plane snapshot");
                return;
            }
        };
        if let Err(e) = self.store.put_control_snapshot(seq, &bytes) {
            tracing::warn!(error = %e, "cannot store a control plane snapshot");
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
            | ControlEvent::QuotaSet { client_id, .. }
            | ControlEvent::ClientPlanSet { client_id, .. }
            | ControlEvent::AdjustmentBooked { client_id, .. } => {
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
        envelope.topic_offset = Some(offset);
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
        let outcome = self.apply(&envelope);
        self.snapshot_if_due(envelope.seq);
        let mut outcomes = self.lock_outcomes();
        outcomes.insert(offset, outcome);
        while outcomes.len() > MAX_OUTCOMES {
            outcomes.pop_first();
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
        Ok(self.plane_at(as_of_ms)?.keys)
    }

    /// The whole projection rebuilt from the log, as it was at `as_of_ms`
    /// (`i64::MAX`: now; a rebuild equals the live projection).
    pub fn plane_at(&self, as_of_ms: i64) -> Result<ControlPlane, tally_state::Error> {
        let mut plane = ControlPlane::new();
        for envelope in self.events_until(as_of_ms)? {
            plane.apply_envelope(&envelope);
        }
        Ok(plane)
    }

    /// Takes one request from the budgets of the key and the keys above
    /// it (see [`budget`]); the wait in ms when one is spent.
    pub fn charge(&self, principal: &Principal, now_ms: i64) -> Result<(), i64> {
        self.budgets.charge(&self.read().keys, principal, now_ms)
    }
}

#[cfg(test)]
mod tests;
