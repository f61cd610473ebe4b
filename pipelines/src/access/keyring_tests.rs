use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::access::event::KeySpec;
use crate::access::token::KeyToken;

fn spec(name: &str, scopes: &[Scope]) -> KeySpec {
    KeySpec {
        name: name.into(),
        scopes: scopes.iter().copied().collect(),
        client_ids: None,
        parent_key_id: None,
        expires_at_ms: None,
        ip_allowlist: vec![],
        rate_limit: None,
        metadata: BTreeMap::new(),
    }
}

fn clients(list: &[&str]) -> Option<BTreeSet<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

struct Fixture {
    ring: KeyRing,
    rng: ChaCha8Rng,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            ring: KeyRing::default(),
            rng: ChaCha8Rng::seed_from_u64(42),
        }
    }

    /// Admits and creates a key as `creator`, at time `at`.
    fn create(&mut self, creator: &Principal, spec: KeySpec, at: i64) -> KeyToken {
        let spec = self.ring.admit(creator, spec, at).expect("admitted");
        let token = KeyToken::generate(&mut self.rng, None);
        self.ring.apply(
            at,
            &creator.key_id,
            &ControlEvent::KeyCreated {
                key_id: token.id().to_string(),
                spec,
                hash: token.hash(),
            },
        );
        token
    }

    fn verify(&self, token: &KeyToken, at: i64) -> Result<Principal, Refusal> {
        self.ring.verify(token.reveal(), None, at)
    }
}

#[test]
fn a_created_key_verifies_with_its_scopes_and_a_wrong_secret_does_not() {
    let mut f = Fixture::new();
    let op = Principal::operator("cli");
    let token = f.create(&op, spec("gw", &[Scope::Check, Scope::Ingest]), 0);
    let p = f.verify(&token, 1).unwrap();
    assert_eq!(p.key_id, token.id());
    assert!(p.may(Scope::Check) && p.may(Scope::Ingest));
    assert!(!p.may(Scope::Read) && !p.may(Scope::Admin));
    assert!(p.may_client("anyone"));
    // Same id, another secret, valid checksum: found, then refused.
    let forged = KeyToken::generate(&mut f.rng, Some(token.id()));
    assert_eq!(f.verify(&forged, 1), Err(Refusal::WrongSecret));
    let stranger = KeyToken::generate(&mut f.rng, None);
    assert_eq!(f.verify(&stranger, 1), Err(Refusal::UnknownKey));
    assert!(matches!(
        f.ring.verify("tly_short", None, 1),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn a_key_expires_at_its_expiry_time_exactly() {
    let mut f = Fixture::new();
    let mut s = spec("temp", &[Scope::Read]);
    s.expires_at_ms = Some(10_000);
    let token = f.create(&Principal::operator("cli"), s, 0);
    assert!(f.verify(&token, 9_999).is_ok());
    assert_eq!(f.verify(&token, 10_000), Err(Refusal::Expired));
}

#[test]
fn rotation_keeps_the_old_secret_for_the_grace_only() {
    let mut f = Fixture::new();
    let old = f.create(&Principal::operator("cli"), spec("k", &[Scope::Read]), 0);
    let new = KeyToken::generate(&mut f.rng, Some(old.id()));
    f.ring.apply(
        1_000,
        "cli",
        &ControlEvent::KeyRotated {
            key_id: old.id().into(),
            hash: new.hash(),
            old_valid_until_ms: 1_000 + 30_000,
        },
    );
    assert!(f.verify(&old, 30_999).is_ok());
    assert!(f.verify(&new, 30_999).is_ok());
    assert_eq!(f.verify(&old, 31_000), Err(Refusal::WrongSecret));
    assert!(f.verify(&new, 31_000).is_ok());
    // A second rotation with no grace drops `new` at once; both it and
    // `old`, whose grace is over, are pruned.
    let newer = KeyToken::generate(&mut f.rng, Some(old.id()));
    f.ring.apply(
        40_000,
        "cli",
        &ControlEvent::KeyRotated {
            key_id: old.id().into(),
            hash: newer.hash(),
            old_valid_until_ms: 40_000,
        },
    );
    assert_eq!(f.verify(&new, 40_000), Err(Refusal::WrongSecret));
    assert!(f.verify(&newer, 40_000).is_ok());
    assert_eq!(f.ring.get(old.id()).unwrap().credentials.len(), 1);
    assert_eq!(f.ring.get(old.id()).unwrap().version, 3);
}

#[test]
fn a_child_gets_at_most_its_parents_scopes_and_clients() {
    let mut f = Fixture::new();
    let op = Principal::operator("cli");
    let mut org = spec("acme", &[Scope::Admin, Scope::Read, Scope::Check]);
    org.client_ids = clients(&["acme-1", "acme-2"]);
    let org_token = f.create(&op, org, 0);
    let org_p = f.verify(&org_token, 1).unwrap();

    // More scopes than the parent: refused, naming the scope.
    let err = f
        .ring
        .admit(&org_p, spec("x", &[Scope::Read, Scope::Ingest]), 1)
        .unwrap_err();
    assert!(
        err.iter()
            .any(|(f, r)| f == "scopes" && r.contains("ingest")),
        "{err:?}"
    );
    // Other clients than the parent's: refused.
    let mut wider = spec("y", &[Scope::Read]);
    wider.client_ids = clients(&["acme-1", "globex"]);
    let err = f.ring.admit(&org_p, wider, 1).unwrap_err();
    assert!(err.iter().any(|(f, _)| f == "client_ids"), "{err:?}");

    // A child with no list inherits the parent's clients, and is the
    // minting key's child without saying so.
    let child = f.create(&org_p, spec("reader", &[Scope::Read]), 2);
    let child_p = f.verify(&child, 3).unwrap();
    assert_eq!(child_p.client_ids, clients(&["acme-1", "acme-2"]));
    assert_eq!(
        child_p.chain,
        vec![child.id().to_string(), org_token.id().to_string()]
    );
    assert!(child_p.may_client("acme-2") && !child_p.may_client("globex"));
    assert!(!child_p.may(Scope::Check));
    assert!(f.ring.may_manage(&org_p, child.id()));
    assert!(!f.ring.may_manage(&child_p, org_token.id()));
}

#[test]
fn revoking_a_parent_revokes_every_key_below_it() {
    let mut f = Fixture::new();
    let op = Principal::operator("cli");
    let org = f.create(&op, spec("org", &[Scope::Admin, Scope::Read]), 0);
    let org_p = f.verify(&org, 1).unwrap();
    // An unrestricted root admin mints roots unless it names a parent.
    let mut team_spec = spec("team", &[Scope::Admin, Scope::Read]);
    team_spec.parent_key_id = Some(org.id().into());
    let team = f.create(&org_p, team_spec, 1);
    let team_p = f.verify(&team, 2).unwrap();
    assert_eq!(team_p.chain.len(), 2);
    // A key with a parent mints children of its own without saying so.
    let leaf = f.create(&team_p, spec("leaf", &[Scope::Read]), 2);
    assert_eq!(f.verify(&leaf, 3).unwrap().chain.len(), 3);
    f.ring.apply(
        5,
        "cli",
        &ControlEvent::KeyRevoked {
            key_id: org.id().into(),
        },
    );
    assert_eq!(f.verify(&org, 5), Err(Refusal::Revoked));
    assert_eq!(f.verify(&team, 5), Err(Refusal::ParentInvalid));
    assert_eq!(f.verify(&leaf, 5), Err(Refusal::ParentInvalid));
    // And nothing can be minted under a revoked key.
    let mut under = spec("late", &[Scope::Read]);
    under.parent_key_id = Some(team.id().into());
    let err = f.ring.admit(&op, under, 6).unwrap_err();
    assert!(
        err.iter()
            .any(|(f, r)| f == "parent_key_id" && r.contains("revoked")),
        "{err:?}"
    );
}

#[test]
fn an_allowlist_admits_any_of_its_networks_v4_v6_and_mapped() {
    let mut f = Fixture::new();
    let mut s = spec("net", &[Scope::Read]);
    s.ip_allowlist = vec![
        "10.1.0.0/16".parse().unwrap(),
        "192.168.7.7/32".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    let token = f.create(&Principal::operator("cli"), s, 0);
    let at = |ip: &str| {
        f.ring
            .verify(token.reveal(), Some(ip.parse::<IpAddr>().unwrap()), 1)
    };
    assert!(at("10.1.200.3").is_ok());
    assert!(at("192.168.7.7").is_ok());
    assert!(at("2001:db8:1::5").is_ok());
    // An IPv4 peer seen through a dual-stack socket.
    assert!(at("::ffff:10.1.0.9").is_ok());
    assert_eq!(at("10.2.0.1"), Err(Refusal::AddressNotAllowed));
    assert_eq!(at("192.168.7.8"), Err(Refusal::AddressNotAllowed));
    assert_eq!(at("2001:db9::1"), Err(Refusal::AddressNotAllowed));
    assert_eq!(at("::1"), Err(Refusal::AddressNotAllowed));
    assert_eq!(
        f.ring.verify(token.reveal(), None, 1),
        Err(Refusal::AddressNotAllowed)
    );
}

#[test]
fn a_parents_allowlist_binds_its_children() {
    let mut f = Fixture::new();
    let mut org = spec("org", &[Scope::Admin, Scope::Read]);
    org.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()];
    let org_t = f.create(&Principal::operator("cli"), org, 0);
    let org_p = f
        .ring
        .verify(org_t.reveal(), Some("10.0.0.1".parse().unwrap()), 1)
        .unwrap();
    let mut child_spec = spec("c", &[Scope::Read]);
    child_spec.parent_key_id = Some(org_t.id().into());
    let child = f.create(&org_p, child_spec, 1);
    let from = |ip: &str| f.ring.verify(child.reveal(), Some(ip.parse().unwrap()), 2);
    assert!(from("10.9.9.9").is_ok());
    assert_eq!(from("172.16.0.1"), Err(Refusal::AddressNotAllowed));
}

#[test]
fn a_restricted_key_lists_and_manages_only_its_own_subtree() {
    let mut f = Fixture::new();
    let op = Principal::operator("cli");
    let top = f.create(&op, spec("top", &Scope::ALL), 0);
    let top_p = f.verify(&top, 1).unwrap();
    let mut a = spec("tenant-a", &[Scope::Admin, Scope::Read]);
    a.client_ids = clients(&["a"]);
    let a_t = f.create(&top_p, a, 1);
    let a_p = f.verify(&a_t, 2).unwrap();
    let a_child = f.create(&a_p, spec("a-reader", &[Scope::Read]), 2);
    let mut b = spec("tenant-b", &[Scope::Read]);
    b.client_ids = clients(&["b"]);
    let b_t = f.create(&top_p, b, 3);

    let ids = |v: Vec<&KeyRecord>| v.iter().map(|k| k.key_id.clone()).collect::<BTreeSet<_>>();
    let seen_by_a = ids(f.ring.list(&a_p, None, 100));
    let expected: BTreeSet<String> = [a_t.id(), a_child.id()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen_by_a, expected);
    assert_eq!(f.ring.list(&top_p, None, 100).len(), 4);
    assert!(!f.ring.may_manage(&a_p, b_t.id()));
    // Pages follow the id order without overlap.
    let first = f.ring.list(&top_p, None, 2);
    let rest = f.ring.list(&top_p, Some(&first[1].key_id), 100);
    assert_eq!(first.len() + rest.len(), 4);
    assert!(rest.iter().all(|k| k.key_id > first[1].key_id));
}

#[test]
fn replaying_the_same_events_builds_the_same_ring() {
    let mut f = Fixture::new();
    let op = Principal::operator("cli");
    let t = f.create(&op, spec("k", &[Scope::Read]), 0);
    let events = vec![
        (
            0,
            ControlEvent::KeyCreated {
                key_id: t.id().into(),
                spec: f.ring.get(t.id()).unwrap().spec.clone(),
                hash: t.hash(),
            },
        ),
        (
            9,
            ControlEvent::KeyRevoked {
                key_id: t.id().into(),
            },
        ),
    ];
    let mut a = KeyRing::default();
    let mut b = KeyRing::default();
    for (at, e) in &events {
        a.apply(*at, "cli", e);
        b.apply(*at, "cli", e);
    }
    assert_eq!(a.get(t.id()), b.get(t.id()));
    assert_eq!(a.get(t.id()).unwrap().revoked_at_ms, Some(9));
    assert_eq!(a.generation(), 2);
}

#[test]
fn a_snapshot_plus_the_events_after_it_equals_the_whole_replay() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let tokens: Vec<KeyToken> = (0..6).map(|_| KeyToken::generate(&mut rng, None)).collect();
    let mut events = vec![];
    for (i, t) in tokens.iter().enumerate() {
        let mut s = spec(&format!("k{i}"), &[Scope::Read]);
        s.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()];
        events.push(ControlEvent::KeyCreated {
            key_id: t.id().into(),
            spec: s,
            hash: t.hash(),
        });
    }
    events.push(ControlEvent::KeyRevoked {
        key_id: tokens[1].id().into(),
    });
    let rotated = KeyToken::generate(&mut rng, Some(tokens[2].id()));
    events.push(ControlEvent::KeyRotated {
        key_id: tokens[2].id().into(),
        hash: rotated.hash(),
        old_valid_until_ms: 50,
    });
    let mut whole = KeyRing::default();
    for (i, e) in events.iter().enumerate() {
        whole.apply(i as i64, "cli", e);
    }
    for cut in 0..=events.len() {
        let mut head = KeyRing::default();
        for (i, e) in events[..cut].iter().enumerate() {
            head.apply(i as i64, "cli", e);
        }
        let snapshot = serde_json::to_vec(&head).unwrap();
        let mut restored: KeyRing = serde_json::from_slice(&snapshot).unwrap();
        for (i, e) in events.iter().enumerate().skip(cut) {
            restored.apply(i as i64, "cli", e);
        }
        assert_eq!(restored, whole, "cut at {cut}");
    }
    // And the restored ring judges keys as the whole one does.
    assert!(whole
        .verify(rotated.reveal(), Some("10.1.1.1".parse().unwrap()), 10)
        .is_ok());
    assert_eq!(
        whole.verify(tokens[1].reveal(), Some("10.1.1.1".parse().unwrap()), 10),
        Err(Refusal::Revoked)
    );
}
