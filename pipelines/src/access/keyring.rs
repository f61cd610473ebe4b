//! The key ring: the projection of the control log's key events, and the
//! one place a presented key is judged.
//!
//! A key belongs to a tree: a child is minted by (or under) a parent, gets
//! at most the parent's scopes, clients and networks, and is valid only
//! while every key above it is. So revoking an organisation's key revokes
//! every key it minted, at once, without touching them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::event::{ControlEvent, KeySpec};
use super::scope::Scope;
use super::token::{self, hashes_equal, Malformed, TokenHash};

/// Keys above a key at most (a cycle can't be built, this bounds the walk).
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credential {
    #[serde(with = "super::event::hex_hash")]
    pub hash: TokenHash,
    /// Valid before this time (epoch ms); `None` until rotated away.
    pub valid_until_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub spec: KeySpec,
    pub created_at_ms: i64,
    pub created_by: String,
    pub credentials: Vec<Credential>,
    pub revoked_at_ms: Option<i64>,
    /// Events applied to this key (1 at creation): what `If-Match` names.
    pub version: u64,
}

/// Who a verified request comes from: the key, and what its whole chain
/// allows (the intersection of every key's scopes and clients up to the
/// root).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Principal {
    pub key_id: String,
    pub scopes: BTreeSet<Scope>,
    pub client_ids: Option<BTreeSet<String>>,
    /// The key, then its parent, up to the root.
    pub chain: Vec<String>,
}

impl Principal {
    /// The principal of operator tooling (bootstrap, `tally keys`): all.
    pub fn operator(name: &str) -> Principal {
        Principal {
            key_id: name.to_string(),
            scopes: Scope::all(),
            client_ids: None,
            chain: vec![],
        }
    }

    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    pub fn may_client(&self, client: &str) -> bool {
        self.client_ids.as_ref().is_none_or(|c| c.contains(client))
    }

    /// Not limited to some clients (may see cross-client lists).
    pub fn all_clients(&self) -> bool {
        self.client_ids.is_none()
    }

    fn is_operator(&self) -> bool {
        self.chain.is_empty()
    }
}

/// Why a key was refused: logged and audited, never told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed(Malformed),
    UnknownKey,
    WrongSecret,
    Expired,
    Revoked,
    /// A key above this one is revoked or expired.
    ParentInvalid,
    AddressNotAllowed,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed(Malformed::Prefix) => "malformed key: prefix",
            Refusal::Malformed(Malformed::Length) => "malformed key: length",
            Refusal::Malformed(Malformed::Alphabet) => "malformed key: characters",
            Refusal::Malformed(Malformed::Checksum) => "malformed key: checksum",
            Refusal::UnknownKey => "unknown key",
            Refusal::WrongSecret => "wrong or rotated secret",
            Refusal::Expired => "expired key",
            Refusal::Revoked => "revoked key",
            Refusal::ParentInvalid => "a parent key is revoked or expired",
            Refusal::AddressNotAllowed => "address not in the key's allowlist",
        }
    }
}

/// Serialisable as a snapshot of the projection (a start-up then replays
/// only the events after it).
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRing {
    keys: BTreeMap<String, KeyRecord>,
    /// Events applied in all: a cache stamped with an older generation
    /// is stale.
    generation: u64,
}

impl KeyRing {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn get(&self, key_id: &str) -> Option<&KeyRecord> {
        self.keys.get(key_id)
    }

    /// Applies one event, unconditionally (the plane judges `If-Match`
    /// first: [`super::plane::ControlPlane::apply_envelope`]).
    pub fn apply(&mut self, at_ms: i64, actor: &str, event: &ControlEvent) {
        self.generation += 1;
        match event {
            ControlEvent::KeyCreated { key_id, spec, hash } => {
                if self.keys.contains_key(key_id) {
                    return;
                }
                self.keys.insert(
                    key_id.clone(),
                    KeyRecord {
                        key_id: key_id.clone(),
                        spec: spec.clone(),
                        created_at_ms: at_ms,
                        created_by: actor.to_string(),
                        credentials: vec![Credential {
                            hash: *hash,
                            valid_until_ms: None,
                        }],
                        revoked_at_ms: None,
                        version: 1,
                    },
                );
            }
            ControlEvent::KeyRotated {
                key_id,
                hash,
                old_valid_until_ms,
            } => {
                if let Some(key) = self.keys.get_mut(key_id) {
                    for c in &mut key.credentials {
                        c.valid_until_ms = Some(
                            c.valid_until_ms
                                .map_or(*old_valid_until_ms, |v| v.min(*old_valid_until_ms)),
                        );
                    }
                    // Secrets past their grace are gone for good.
                    key.credentials
                        .retain(|c| c.valid_until_ms.is_none_or(|v| v > at_ms));
                    key.credentials.push(Credential {
                        hash: *hash,
                        valid_until_ms: None,
                    });
                    key.version += 1;
                }
            }
            ControlEvent::KeyRevoked { key_id } => {
                if let Some(key) = self.keys.get_mut(key_id) {
                    if key.revoked_at_ms.is_none() {
                        key.revoked_at_ms = Some(at_ms);
                    }
                    key.version += 1;
                }
            }
            // Configuration: versioned by the plane, not the ring.
            ControlEvent::LimitsSet { .. }
            | ControlEvent::QuotaSet { .. }
            | ControlEvent::WebhookSet { .. }
            | ControlEvent::WebhookDeleted { .. }
            | ControlEvent::PlanSet { .. }
            | ControlEvent::ClientPlanSet { .. }
            | ControlEvent::AdjustmentBooked { .. } => {}
        }
    }

    /// Judges a presented key: well-formed, known, its secret current,
    /// it and every key above it neither revoked nor expired, the address
    /// allowed by each.
    pub fn verify(
        &self,
        presented: &str,
        peer: Option<IpAddr>,
        now_ms: i64,
    ) -> Result<Principal, Refusal> {
        let key_id = token::parse(presented).map_err(Refusal::Malformed)?;
        let key = self.keys.get(key_id).ok_or(Refusal::UnknownKey)?;
        let presented_hash = token::hash(presented);
        // Every credential is compared (no early exit), in constant time.
        let mut matched = false;
        for c in &key.credentials {
            let current = c.valid_until_ms.is_none_or(|v| now_ms < v);
            matched |= hashes_equal(&c.hash, &presented_hash) & current;
        }
        if !matched {
            return Err(Refusal::WrongSecret);
        }
        let chain = self.chain(key_id);
        let mut scopes = Scope::all();
        let mut client_ids: Option<BTreeSet<String>> = None;
        for (depth, k) in chain.iter().enumerate() {
            let own = depth == 0;
            if k.revoked_at_ms.is_some_and(|t| t <= now_ms) {
                return Err(if own {
                    Refusal::Revoked
                } else {
                    Refusal::ParentInvalid
                });
            }
            if k.spec.expires_at_ms.is_some_and(|t| t <= now_ms) {
                return Err(if own {
                    Refusal::Expired
                } else {
                    Refusal::ParentInvalid
                });
            }
            if !k.spec.ip_allowlist.is_empty() {
                let Some(ip) = peer.map(canonical) else {
                    return Err(Refusal::AddressNotAllowed);
                };
                if !k.spec.ip_allowlist.iter().any(|net| net.contains(&ip)) {
                    return Err(Refusal::AddressNotAllowed);
                }
            }
            scopes = scopes.intersection(&k.spec.scopes).copied().collect();
            if let Some(own_clients) = &k.spec.client_ids {
                client_ids = Some(match client_ids {
                    None => own_clients.clone(),
                    Some(c) => c.intersection(own_clients).cloned().collect(),
                });
            }
        }
        Ok(Principal {
            key_id: key_id.to_string(),
            scopes,
            client_ids,
            chain: chain.iter().map(|k| k.key_id.clone()).collect(),
        })
    }

    /// The key and the keys above it, nearest first.
    pub fn chain(&self, key_id: &str) -> Vec<&KeyRecord> {
        let mut out = Vec::new();
        let mut next = self.keys.get(key_id);
        while let Some(k) = next {
            if out.len() > MAX_DEPTH {
                break;
            }
            out.push(k);
            next = k
                .spec
                .parent_key_id
                .as_deref()
                .and_then(|p| self.keys.get(p));
        }
        out
    }

    /// Whether `manager` may see, rotate or revoke `key_id`: operators and
    /// unrestricted admin keys any key, others themselves and the keys
    /// below them.
    pub fn may_manage(&self, manager: &Principal, key_id: &str) -> bool {
        if manager.is_operator() || self.is_top_admin(manager) {
            return self.keys.contains_key(key_id);
        }
        self.chain(key_id)
            .iter()
            .any(|k| k.key_id == manager.key_id)
    }

    /// An admin key with every client and no parent: the organisation's
    /// own operator key.
    fn is_top_admin(&self, p: &Principal) -> bool {
        p.may(Scope::Admin) && p.all_clients() && p.chain.len() == 1
    }

    /// Checks a new key's spec against its creator, and answers it with
    /// its parent filled in (a key minted by a non-top key is its child).
    /// Problems are `(field, reason)`.
    pub fn admit(
        &self,
        creator: &Principal,
        mut spec: KeySpec,
        now_ms: i64,
    ) -> Result<KeySpec, Vec<(String, String)>> {
        let mut problems = Vec::new();
        if spec.name.trim().is_empty() || spec.name.len() > 256 {
            problems.push(("name".into(), "must be 1..=256 bytes".into()));
        }
        if spec.scopes.is_empty() {
            problems.push(("scopes".into(), "at least one scope".into()));
        }
        if spec.expires_at_ms.is_some_and(|t| t <= now_ms) {
            problems.push(("expires_at".into(), "must be in the future".into()));
        }
        if let Some(c) = &spec.client_ids {
            if c.is_empty() {
                problems.push((
                    "client_ids".into(),
                    "an empty list would allow no client; omit it for all".into(),
                ));
            }
        }
        if let Some(r) = &spec.rate_limit {
            if r.requests == 0 || r.window_seconds == 0 {
                problems.push((
                    "rate_limit".into(),
                    "requests and window_seconds must be >= 1".into(),
                ));
            }
        }
        if spec.parent_key_id.is_none() && !creator.is_operator() && !self.is_top_admin(creator) {
            spec.parent_key_id = Some(creator.key_id.clone());
        }
        if let Some(parent_id) = spec.parent_key_id.clone() {
            match self.keys.get(&parent_id) {
                None => problems.push(("parent_key_id".into(), "no such key".into())),
                Some(_) if !self.may_manage(creator, &parent_id) => problems.push((
                    "parent_key_id".into(),
                    "not a key this key may mint under".into(),
                )),
                Some(parent) => {
                    if self.chain(&parent_id).len() >= MAX_DEPTH {
                        problems.push((
                            "parent_key_id".into(),
                            format!("keys nest at most {MAX_DEPTH} deep"),
                        ));
                    }
                    if self
                        .chain(&parent_id)
                        .iter()
                        .any(|k| k.revoked_at_ms.is_some())
                    {
                        problems.push(("parent_key_id".into(), "the parent is revoked".into()));
                    }
                    let parent_scopes = self.effective_scopes(&parent_id);
                    let extra: Vec<_> = spec.scopes.difference(&parent_scopes).collect();
                    if !extra.is_empty() {
                        problems.push((
                            "scopes".into(),
                            format!(
                                "the parent does not hold {}",
                                extra
                                    .iter()
                                    .map(|s| s.name())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    if let Some(parent_clients) = self.effective_clients(&parent_id) {
                        match &spec.client_ids {
                            None => spec.client_ids = Some(parent_clients),
                            Some(own) if !own.is_subset(&parent_clients) => problems.push((
                                "client_ids".into(),
                                "must be a subset of the parent's clients".into(),
                            )),
                            Some(_) => {}
                        }
                    }
                    if let (Some(p), Some(c)) = (parent.spec.expires_at_ms, spec.expires_at_ms) {
                        if c > p {
                            problems
                                .push(("expires_at".into(), "must not outlive the parent".into()));
                        }
                    }
                }
            }
        } else {
            // A root key: only an operator or a top admin mints one, and
            // only with what it holds itself.
            let extra: Vec<_> = spec.scopes.difference(&creator.scopes).collect();
            if !extra.is_empty() {
                problems.push(("scopes".into(), "more than the creating key holds".into()));
            }
        }
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(problems)
        }
    }

    fn effective_scopes(&self, key_id: &str) -> BTreeSet<Scope> {
        let mut scopes = Scope::all();
        for k in self.chain(key_id) {
            scopes = scopes.intersection(&k.spec.scopes).copied().collect();
        }
        scopes
    }

    fn effective_clients(&self, key_id: &str) -> Option<BTreeSet<String>> {
        let mut out: Option<BTreeSet<String>> = None;
        for k in self.chain(key_id) {
            if let Some(own) = &k.spec.client_ids {
                out = Some(match out {
                    None => own.clone(),
                    Some(c) => c.intersection(own).cloned().collect(),
                });
            }
        }
        out
    }

    /// Keys after `after` in id order that `viewer` may manage, at most
    /// `limit` of them.
    pub fn list(&self, viewer: &Principal, after: Option<&str>, limit: usize) -> Vec<&KeyRecord> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        self.keys
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, k)| k)
            .filter(|k| self.may_manage(viewer, &k.key_id))
            .take(limit)
            .collect()
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of an IPv4
/// peer) match IPv4 networks.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
#[path = "keyring_tests.rs"]
mod tests;
