//! Cost of judging one closed minute bucket: `ClientDetector::evaluate`
//! for a warmed-up client (100 buckets of history), on a steady bucket
//! that raises nothing, on one that fires the request, error, latency and
//! new-endpoint detectors at once, and on an enumeration of 30 never-seen
//! endpoints. The buckets look like the generator's: 20 endpoint templates.
//!
//! The firing cases learn (new endpoints become known), so each is judged
//! on a fresh clone of the warm detector; the clone is set-up, not
//! measured. Reading the bucket back from RocksDB, which the engine does
//! first, is not included.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tally_pipelines::detect::{ClientDetector, DetectorConfig, MinuteSummary};
use tally_pipelines::synthetic::endpoint_name;

const MINUTE: i64 = 60_000;

/// About 100 requests over 20 endpoints (Zipf-like), 3 % 5xx, p95 near
/// 150 ms; `wobble` varies it a little so the baselines learn a spread.
fn steady(minute: i64, wobble: i64) -> MinuteSummary {
    let requests = (100 + wobble) as u64;
    let endpoints = (0..20u32)
        .map(|i| (endpoint_name(i), (requests / (u64::from(i) + 2)).max(1)))
        .collect();
    MinuteSummary {
        minute_start_ms: minute * MINUTE,
        requests,
        server_errors: 3 + (wobble.rem_euclid(3) as u64),
        auth_failures: 1,
        denials: 0,
        p95_latency_ms: Some(150.0 + 3.0 * wobble as f64),
        endpoints,
    }
}

fn warm_detector(cfg: &DetectorConfig) -> ClientDetector {
    let mut d = ClientDetector::default();
    for minute in 0..100 {
        // -5..=5 in a fixed pattern: a deterministic spread.
        let wobble = (minute * 7) % 11 - 5;
        let found = d.evaluate("client-00042", &steady(minute, wobble), cfg);
        assert!(found.is_empty(), "warm-up raised {found:?}");
    }
    d
}

fn evaluate(c: &mut Criterion) {
    let cfg = DetectorConfig::default();
    let warm = warm_detector(&cfg);
    let mut group = c.benchmark_group("detect_evaluate");
    group.throughput(Throughput::Elements(1));

    let quiet = steady(100, 0);
    let mut d = warm.clone();
    assert!(d.evaluate("client-00042", &quiet, &cfg).is_empty());
    group.bench_function("steady_bucket", |b| {
        b.iter(|| std::hint::black_box(d.evaluate("client-00042", &quiet, &cfg)))
    });

    let mut firing = steady(100, 0);
    firing.requests *= 10;
    firing.server_errors = firing.requests / 2;
    firing.p95_latency_ms = Some(900.0);
    firing.endpoints.push(("/admin/export".into(), 40));
    firing.endpoints.push(("/internal/debug".into(), 5));
    let raised = warm.clone().evaluate("client-00042", &firing, &cfg).len();
    assert_eq!(raised, 4, "spike, errors, latency, new endpoints");
    group.bench_function("bucket_raising_4_anomalies", |b| {
        b.iter_batched_ref(
            || warm.clone(),
            |d| std::hint::black_box(d.evaluate("client-00042", &firing, &cfg)),
            BatchSize::SmallInput,
        )
    });

    let mut probing = steady(100, 0);
    probing
        .endpoints
        .extend((0..30).map(|i| (format!("/probe/{i}"), 1)));
    let raised = warm.clone().evaluate("client-00042", &probing, &cfg).len();
    assert_eq!(raised, 1, "one enumeration finding");
    group.bench_function("bucket_enumerating_30_endpoints", |b| {
        b.iter_batched_ref(
            || warm.clone(),
            |d| std::hint::black_box(d.evaluate("client-00042", &probing, &cfg)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, evaluate);
criterion_main!(benches);
