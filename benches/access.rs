//! Key verification (run with `cargo bench --bench access`): judging a
//! presented key against a ring of 100,000 keys, as every keyed request
//! does — checksum, lookup, SHA-256 and constant-time compare, the chain
//! walk and the allowlist — and, as a floor measured in the same run,
//! the SHA-256 alone, which no verification of a stored hash can avoid.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tally_pipelines::access::{ControlEvent, KeyRing, KeySpec, KeyToken, Principal, Scope};

fn spec(name: String, parent: Option<String>) -> KeySpec {
    KeySpec {
        name,
        scopes: [Scope::Check, Scope::Read].into_iter().collect(),
        client_ids: None,
        parent_key_id: parent,
        expires_at_ms: None,
        ip_allowlist: vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ],
        rate_limit: None,
        metadata: BTreeMap::new(),
    }
}

fn ring_of(n: usize) -> (KeyRing, KeyToken, KeyToken) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut ring = KeyRing::default();
    let op = Principal::operator("bench");
    let mut last = None;
    let mut parent = None;
    for i in 0..n {
        let token = KeyToken::generate(&mut rng, None);
        let s = ring.admit(&op, spec(format!("k{i}"), None), 0).unwrap();
        ring.apply(
            0,
            "bench",
            &ControlEvent::KeyCreated {
                key_id: token.id().to_string(),
                spec: s,
                hash: token.hash(),
            },
        );
        if i == 0 {
            parent = Some(token.clone());
        }
        last = Some(token);
    }
    // A child two levels down, to time the chain walk.
    let root = parent.unwrap();
    let child = KeyToken::generate(&mut rng, None);
    ring.apply(
        0,
        "bench",
        &ControlEvent::KeyCreated {
            key_id: child.id().to_string(),
            spec: spec("child".into(), Some(root.id().to_string())),
            hash: child.hash(),
        },
    );
    (ring, last.unwrap(), child)
}

fn bench(c: &mut Criterion) {
    let (ring, key, child) = ring_of(100_000);
    let peer: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
    let mut g = c.benchmark_group("access");
    g.bench_function("verify_root_key", |b| {
        b.iter(|| ring.verify(black_box(key.reveal()), peer, 1).unwrap())
    });
    g.bench_function("verify_child_key", |b| {
        b.iter(|| ring.verify(black_box(child.reveal()), peer, 1).unwrap())
    });
    g.bench_function("sha256_floor", |b| {
        b.iter(|| tally_pipelines::access::token::hash(black_box(key.reveal())))
    });
    g.bench_function("refuse_mistyped", |b| {
        let mut typo = key.reveal().to_string();
        typo.replace_range(20..21, if &typo[20..21] == "a" { "b" } else { "a" });
        b.iter(|| ring.verify(black_box(&typo), peer, 1).unwrap_err())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
