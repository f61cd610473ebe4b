//! The control plane: the projection of the whole control log. It holds
//! the key ring, and a version for every other configuration stream (a
//! client's limits, a client's quota, a webhook) so that `If-Match` can be
//! judged alike for all of them, on every instance, at apply time.
//!
//! Webhook configurations and billing plans are kept here whole (they are
//! few: webhooks bounded by `max_webhooks`, and every instance delivers to
//! all of them), and so is each client's plan schedule (small, and every
//! report needs it). A client's
//! limits and quota are applied by the partition that owns the client and
//! move with it; the plane keeps only who set them when, and their
//! version, so that its memory grows with the number of configured
//! clients by tens of bytes each, not by their configurations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::event::{ControlEvent, Envelope, Stream};
use super::keyring::KeyRing;
use crate::billing::{Adjustment, Assignment};

/// The snapshot format this build writes. A snapshot of another format
/// (a key ring alone, before configurations were versioned) is not used:
/// the log is replayed from the start instead.
pub const PLANE_FORMAT: u16 = 2;

/// One configuration stream's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    /// Changes applied (1 after the first): what `If-Match` names.
    pub version: u64,
    pub set_at_ms: i64,
    pub set_by: String,
    /// Webhooks: the configuration as published (`None` once deleted);
    /// plans: the plan; client plans: the schedule (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlPlane {
    /// Which snapshot format this is (0: written before there was one).
    #[serde(default)]
    pub format: u16,
    pub keys: KeyRing,
    /// By [`Stream::config_key`].
    #[serde(default)]
    configs: BTreeMap<String, Versioned>,
}

impl ControlPlane {
    pub fn new() -> Self {
        ControlPlane {
            format: PLANE_FORMAT,
            ..ControlPlane::default()
        }
    }

    /// The version of a stream now (0: never changed).
    pub fn version(&self, stream: Stream<'_>) -> u64 {
        match stream {
            Stream::Key(id) => self.keys.get(id).map_or(0, |k| k.version),
            other => other
                .config_key()
                .and_then(|k| self.configs.get(&k))
                .map_or(0, |v| v.version),
        }
    }

    /// A configuration stream's state (`None` for keys and for streams
    /// never changed).
    pub fn config(&self, stream: Stream<'_>) -> Option<&Versioned> {
        self.configs.get(&stream.config_key()?)
    }

    /// Applies one logged event; false when it names a version its stream
    /// is not at (`expect_version`), and then changes nothing. Events that
    /// do not fit (a rotation of an unknown key) change nothing either:
    /// the log was validated when written, and replay must not stop at
    /// one odd record.
    pub fn apply_envelope(&mut self, envelope: &Envelope) -> bool {
        let stream = envelope.event.stream();
        if let Some(expected) = envelope.expect_version {
            if self.version(stream) != expected {
                return false;
            }
        }
        self.keys
            .apply(envelope.at_ms, &envelope.actor, &envelope.event);
        if let Some(key) = stream.config_key() {
            let entry = self.configs.entry(key).or_insert(Versioned {
                version: 0,
                set_at_ms: envelope.at_ms,
                set_by: String::new(),
                value: None,
            });
            let value = match &envelope.event {
                ControlEvent::WebhookSet { config, .. } => Some(config.clone()),
                ControlEvent::PlanSet { plan, .. } => Some(plan.to_string()),
                ControlEvent::ClientPlanSet { assignment, .. } => {
                    let schedule = entry
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_str::<Vec<Assignment>>(v).ok())
                        .unwrap_or_default();
                    let schedule = crate::billing::schedule::assign(schedule, assignment.clone());
                    serde_json::to_string(&schedule).ok()
                }
                ControlEvent::AdjustmentBooked { adjustment, .. } => {
                    let list = entry
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_str::<Vec<Adjustment>>(v).ok())
                        .unwrap_or_default();
                    let list = crate::billing::adjustment::book(list, adjustment.clone());
                    serde_json::to_string(&list).ok()
                }
                _ => None,
            };
            entry.version += 1;
            entry.set_at_ms = envelope.at_ms;
            entry.set_by = envelope.actor.clone();
            entry.value = value;
        }
        true
    }

    /// A plan as set (`None`: never set).
    pub fn plan(&self, plan_id: &str) -> Option<crate::billing::Plan> {
        let value = self.config(Stream::Plan(plan_id))?.value.as_deref()?;
        serde_json::from_str(value).ok()
    }

    /// Plan ids after `after`, in order, at most `limit`.
    pub fn plan_ids(&self, after: &str, limit: usize) -> Vec<String> {
        let start = format!("plan/{after}");
        self.configs
            .range(start.clone()..)
            .filter(|(k, _)| **k != start || after.is_empty())
            .take_while(|(k, _)| k.starts_with("plan/"))
            .filter_map(|(k, _)| k.strip_prefix("plan/").map(str::to_string))
            .take(limit)
            .collect()
    }

    /// A client's booked adjustments, oldest first.
    pub fn adjustments(&self, client: &str) -> Vec<Adjustment> {
        self.config(Stream::Adjustments(client))
            .and_then(|v| v.value.as_deref())
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default()
    }

    /// Every client with a plan schedule.
    pub fn planned_clients(&self) -> Vec<String> {
        self.configs
            .range("client_plan/".to_string()..)
            .take_while(|(k, _)| k.starts_with("client_plan/"))
            .filter_map(|(k, _)| k.strip_prefix("client_plan/").map(str::to_string))
            .collect()
    }

    /// A client's plan schedule, in time order (empty: no plan).
    pub fn schedule(&self, client: &str) -> Vec<Assignment> {
        self.config(Stream::ClientPlan(client))
            .and_then(|v| v.value.as_deref())
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default()
    }

    /// The webhooks configured now: `(id, configuration as published)`.
    pub fn webhooks(&self) -> Vec<(String, String)> {
        self.configs
            .range("webhook/".to_string()..)
            .take_while(|(k, _)| k.starts_with("webhook/"))
            .filter_map(|(k, v)| {
                let id = k.strip_prefix("webhook/")?;
                v.value.clone().map(|value| (id.to_string(), value))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{KeySpec, KeyToken, Scope};
    use rand::SeedableRng;

    fn envelope(seq: u64, at: i64, event: ControlEvent, expect: Option<u64>) -> Envelope {
        Envelope::new(seq, at, "k1", event).expecting(expect)
    }

    fn limits(client: &str, requests: u64) -> ControlEvent {
        ControlEvent::LimitsSet {
            client_id: client.into(),
            config: serde_json::json!({"requests": requests}),
        }
    }

    #[test]
    fn each_stream_counts_its_own_versions_and_a_stale_expectation_changes_nothing() {
        let mut plane = ControlPlane::new();
        assert!(plane.apply_envelope(&envelope(0, 10, limits("a", 1), None)));
        assert!(plane.apply_envelope(&envelope(1, 11, limits("a", 2), Some(1))));
        // Another client's limits, and the same client's quota, are their
        // own streams: version 0 until first set.
        assert!(plane.apply_envelope(&envelope(
            2,
            12,
            ControlEvent::QuotaSet {
                client_id: "a".into(),
                config: serde_json::json!({})
            },
            Some(0)
        )));
        assert!(!plane.apply_envelope(&envelope(3, 13, limits("a", 3), Some(1))));
        assert_eq!(plane.version(Stream::Limits("a")), 2);
        assert_eq!(plane.version(Stream::Quota("a")), 1);
        assert_eq!(plane.version(Stream::Limits("b")), 0);
        let a = plane.config(Stream::Limits("a")).unwrap();
        assert_eq!((a.set_at_ms, a.set_by.as_str()), (11, "k1"));
        // A client named like a key is not that key.
        assert_eq!(plane.version(Stream::Key("a")), 0);
    }

    #[test]
    fn webhooks_are_kept_whole_until_deleted() {
        let mut plane = ControlPlane::new();
        let set = |id: &str, c: &str| ControlEvent::WebhookSet {
            webhook_id: id.into(),
            config: c.into(),
        };
        plane.apply_envelope(&envelope(0, 1, set("w1", "{1}"), None));
        plane.apply_envelope(&envelope(1, 2, set("w2", "{2}"), None));
        plane.apply_envelope(&envelope(2, 3, set("w1", "{1b}"), Some(1)));
        plane.apply_envelope(&envelope(
            3,
            4,
            ControlEvent::WebhookDeleted {
                webhook_id: "w2".into(),
            },
            Some(1),
        ));
        assert_eq!(
            plane.webhooks(),
            vec![("w1".to_string(), "{1b}".to_string())]
        );
        // Deleted, a stream keeps counting: a writer who read version 1
        // cannot replace what was deleted since.
        assert_eq!(plane.version(Stream::Webhook("w2")), 2);
    }

    #[test]
    fn a_snapshot_plus_the_events_after_it_equals_the_whole_replay() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let token = KeyToken::generate(&mut rng, None);
        let events = [
            ControlEvent::KeyCreated {
                key_id: token.id().into(),
                spec: KeySpec {
                    name: "k".into(),
                    scopes: [Scope::Admin].into(),
                    client_ids: None,
                    parent_key_id: None,
                    expires_at_ms: None,
                    ip_allowlist: vec![],
                    rate_limit: None,
                    metadata: Default::default(),
                },
                hash: token.hash(),
            },
            limits("a", 1),
            ControlEvent::WebhookSet {
                webhook_id: "w".into(),
                config: "{}".into(),
            },
            limits("a", 2),
            ControlEvent::KeyRevoked {
                key_id: token.id().into(),
            },
        ];
        let mut whole = ControlPlane::new();
        for (i, e) in events.iter().enumerate() {
            whole.apply_envelope(&envelope(i as u64, i as i64, e.clone(), None));
        }
        for cut in 0..=events.len() {
            let mut head = ControlPlane::new();
            for (i, e) in events[..cut].iter().enumerate() {
                head.apply_envelope(&envelope(i as u64, i as i64, e.clone(), None));
            }
            let bytes = serde_json::to_vec(&head).unwrap();
            let mut restored: ControlPlane = serde_json::from_slice(&bytes).unwrap();
            for (i, e) in events.iter().enumerate().skip(cut) {
                restored.apply_envelope(&envelope(i as u64, i as i64, e.clone(), None));
            }
            assert_eq!(restored, whole, "cut at {cut}");
        }
    }

    #[test]
    fn a_key_ring_snapshot_of_the_old_format_is_not_taken_for_a_plane() {
        // Before the plane, a snapshot was the key ring alone.
        let old = serde_json::to_vec(&KeyRing::default()).unwrap();
        let read = serde_json::from_slice::<ControlPlane>(&old);
        assert!(read.map_or(true, |p| p.format != PLANE_FORMAT));
    }
}
