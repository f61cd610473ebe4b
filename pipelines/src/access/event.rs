//! Control-plane events: every change to keys, limits, quotas and
//! webhooks is one immutable event in an append-only log, and the control
//! plane ([`super::plane`]) is their projection. An event is
//! stored in an envelope with its format version; older versions are
//! upcast on read, so the stored log never has to be rewritten when the
//! format grows.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::scope::Scope;
use super::token::TokenHash;
use crate::limit::{Algorithm, Limit};

/// The envelope version this build writes.
pub const EVENT_VERSION: u16 = 1;

/// A request budget of a key, shared by the key and all its descendants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRateLimit {
    pub requests: u64,
    pub window_seconds: u64,
    #[serde(default)]
    pub burst_allowance: u64,
    #[serde(default = "token_bucket")]
    pub algorithm: Algorithm,
}

fn token_bucket() -> Algorithm {
    Algorithm::TokenBucket
}

impl KeyRateLimit {
    pub fn limit(&self) -> Limit {
        Limit::new(self.requests, self.window_seconds, self.burst_allowance)
    }
}

/// What a key is allowed, as its creator asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// Only these clients (all when absent; a child without a list
    /// inherits its parent's).
    pub client_ids: Option<BTreeSet<String>>,
    pub parent_key_id: Option<String>,
    pub expires_at_ms: Option<i64>,
    /// Requests only from these networks (any when empty).
    pub ip_allowlist: Vec<IpNet>,
    pub rate_limit: Option<KeyRateLimit>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlEvent {
    KeyCreated {
        key_id: String,
        spec: KeySpec,
        #[serde(with = "hex_hash")]
        hash: TokenHash,
    },
    /// A new secret; the ones before it stay valid until `old_valid_until_ms`.
    KeyRotated {
        key_id: String,
        #[serde(with = "hex_hash")]
        hash: TokenHash,
        old_valid_until_ms: i64,
    },
    KeyRevoked {
        key_id: String,
    },
    /// A client's rate-limit configuration, as the API took it (the
    /// projection versions it; the value applied lives in the partition's
    /// state, which moves with the partition).
    LimitsSet {
        client_id: String,
        config: serde_json::Value,
    },
    /// A client's quota configuration (history, as `LimitsSet`).
    QuotaSet {
        client_id: String,
        config: serde_json::Value,
    },
    /// A webhook created or replaced: its configuration as published,
    /// the secret sealed when a secrets key is configured (so neither
    /// the log nor the control topic holds it in the clear).
    WebhookSet {
        webhook_id: String,
        config: String,
    },
    WebhookDeleted {
        webhook_id: String,
    },
    /// A billing plan created or replaced (as the API took it).
    PlanSet {
        plan_id: String,
        plan: serde_json::Value,
    },
    /// The plan a client is billed under from `effective_from_ms` on.
    ClientPlanSet {
        client_id: String,
        assignment: crate::billing::Assignment,
    },
    /// Usage booked after its period closed, into the open period.
    AdjustmentBooked {
        client_id: String,
        adjustment: crate::billing::Adjustment,
    },
}

impl ControlEvent {
    pub fn action(&self) -> &'static str {
        match self {
            ControlEvent::KeyCreated { .. } => "key.create",
            ControlEvent::KeyRotated { .. } => "key.rotate",
            ControlEvent::KeyRevoked { .. } => "key.revoke",
            ControlEvent::LimitsSet { .. } => "limits.set",
            ControlEvent::QuotaSet { .. } => "quota.set",
            ControlEvent::WebhookSet { .. } => "webhook.set",
            ControlEvent::WebhookDeleted { .. } => "webhook.delete",
            ControlEvent::PlanSet { .. } => "plan.set",
            ControlEvent::ClientPlanSet { .. } => "client_plan.set",
            ControlEvent::AdjustmentBooked { .. } => "adjustment.book",
        }
    }

    /// What the event changes: a key id or a client id.
    pub fn target(&self) -> &str {
        match self {
            ControlEvent::KeyCreated { key_id, .. }
            | ControlEvent::KeyRotated { key_id, .. }
            | ControlEvent::KeyRevoked { key_id } => key_id,
            ControlEvent::LimitsSet { client_id, .. }
            | ControlEvent::QuotaSet { client_id, .. } => client_id,
            ControlEvent::WebhookSet { webhook_id, .. }
            | ControlEvent::WebhookDeleted { webhook_id } => webhook_id,
            ControlEvent::PlanSet { plan_id, .. } => plan_id,
            ControlEvent::ClientPlanSet { client_id, .. }
            | ControlEvent::AdjustmentBooked { client_id, .. } => client_id,
        }
    }

    /// What the event versions: one stream per key, per client's limits,
    /// per client's quota and per webhook. `If-Match` names a version of
    /// the event's stream.
    pub fn stream(&self) -> Stream<'_> {
        match self {
            ControlEvent::KeyCreated { key_id, .. }
            | ControlEvent::KeyRotated { key_id, .. }
            | ControlEvent::KeyRevoked { key_id } => Stream::Key(key_id),
            ControlEvent::LimitsSet { client_id, .. } => Stream::Limits(client_id),
            ControlEvent::QuotaSet { client_id, .. } => Stream::Quota(client_id),
            ControlEvent::WebhookSet { webhook_id, .. }
            | ControlEvent::WebhookDeleted { webhook_id } => Stream::Webhook(webhook_id),
            ControlEvent::PlanSet { plan_id, .. } => Stream::Plan(plan_id),
            ControlEvent::ClientPlanSet { client_id, .. } => Stream::ClientPlan(client_id),
            ControlEvent::AdjustmentBooked { client_id, .. } => Stream::Adjustments(client_id),
        }
    }
}

/// A versioned thing of the control plane (see [`ControlEvent::stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream<'a> {
    Key(&'a str),
    Limits(&'a str),
    Quota(&'a str),
    Webhook(&'a str),
    Plan(&'a str),
    /// A client's plan schedule.
    ClientPlan(&'a str),
    /// A client's booked adjustments.
    Adjustments(&'a str),
}

impl Stream<'_> {
    /// The projection's map key of a configuration stream (`None` for
    /// keys, which the key ring versions itself).
    pub fn config_key(&self) -> Option<String> {
        match self {
            Stream::Key(_) => None,
            Stream::Limits(c) => Some(format!("limits/{c}")),
            Stream::Quota(c) => Some(format!("quota/{c}")),
            Stream::Webhook(w) => Some(format!("webhook/{w}")),
            Stream::Plan(p) => Some(format!("plan/{p}")),
            Stream::ClientPlan(c) => Some(format!("client_plan/{c}")),
            Stream::Adjustments(c) => Some(format!("adjustments/{c}")),
        }
    }
}

/// One stored event: its place in the log, when, by whom (a key id, or
/// `bootstrap` / `cli`), and the event itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u16,
    pub seq: u64,
    pub at_ms: i64,
    pub actor: String,
    pub event: ControlEvent,
    /// Applies only if the event's key is at this version (`If-Match`):
    /// judged when applied, so every instance, applying the same log in
    /// the same order, judges it alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_version: Option<u64>,
    /// The request that made the change, and its client address (audit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Kafka mode, as stored locally: the control topic offset the event
    /// was read at (`None`: appended here only, as `tally keys create`
    /// does offline, and still to be published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_offset: Option<i64>,
}

impl Envelope {
    pub fn new(seq: u64, at_ms: i64, actor: &str, event: ControlEvent) -> Self {
        Envelope {
            v: EVENT_VERSION,
            seq,
            at_ms,
            actor: actor.to_string(),
            event,
            expect_version: None,
            request_id: None,
            ip: None,
            topic_offset: None,
        }
    }

    pub fn from_request(mut self, request_id: Option<String>, ip: Option<String>) -> Self {
        self.request_id = request_id;
        self.ip = ip;
        self
    }

    pub fn expecting(mut self, version: Option<u64>) -> Self {
        self.expect_version = version;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an envelope of any version this build knows, upcast to the
    /// current one.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let v = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0);
        match v {
            1 => serde_json::from_value(value).map_err(|e| format!("version 1 event: {e}")),
            other => Err(format!(
                "event version {other} is newer than this build ({EVENT_VERSION}); upgrade Tally"
            )),
        }
    }
}

pub(crate) mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::access::token::TokenHash;

    pub fn serialize<S: Serializer>(hash: &TokenHash, s: S) -> Result<S::Ok, S::Error> {
        let text: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TokenHash, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("a token hash is 64 hex digits");
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_and_a_future_version_is_refused_by_name() {
        let event = ControlEvent::KeyRotated {
            key_id: "abcdefghijkl".into(),
            hash: [0xab; 32],
            old_valid_until_ms: 5,
        };
        let envelope = Envelope::new(3, 1000, "cli", event);
        let bytes = envelope.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        assert!(text.contains("\"type\":\"key_rotated\""), "{text}");
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);
        let future = text.replace("\"v\":1", "\"v\":9");
        let err = Envelope::decode(future.as_bytes()).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
    }
}
