//! Per-event aggregation cost: dedupe, watermark, minute bucket, sketch;
//! and the flush-time rollup to hour and day.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tally_pipelines::decode::decode_event_bytes;
use tally_pipelines::dedupe::DedupeIndex;
use tally_pipelines::event::{RequestEvent, ValidationContext};
use tally_pipelines::ingest::{PartitionIngest, PartitionRules};
use tally_pipelines::sketch::LatencySketch;
use tally_pipelines::synthetic::{Generator, GeneratorConfig};

fn events(n: usize) -> Vec<RequestEvent> {
    let mut g = Generator::new(GeneratorConfig::default()).expect("generator");
    let ctx = ValidationContext::lenient();
    (0..n)
        .map(|_| {
            let mut s = String::new();
            g.next_line(&mut s);
            decode_event_bytes(s.as_bytes(), &ctx).expect("valid")
        })
        .collect()
}

fn aggregate(c: &mut Criterion) {
    let events = events(10_000);
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("apply_10k_events", |b| {
        b.iter_batched(
            || {
                PartitionIngest::new(
                    PartitionRules::default(),
                    Arc::default(),
                    None,
                    DedupeIndex::new(1_000_000),
                )
            },
            |mut p| {
                for e in &events {
                    p.apply(e, i64::MAX / 4);
                }
                p
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("apply_and_flush_10k_events", |b| {
        b.iter_batched(
            || {
                PartitionIngest::new(
                    PartitionRules::default(),
                    Arc::default(),
                    None,
                    DedupeIndex::new(1_000_000),
                )
            },
            |mut p| {
                for e in &events {
                    p.apply(e, i64::MAX / 4);
                }
                p.take_flush()
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let latencies: Vec<f64> = events.iter().map(|e| e.latency_ms).collect();
    let mut group = c.benchmark_group("sketch");
    group.throughput(Throughput::Elements(latencies.len() as u64));
    group.bench_function("insert_10k", |b| {
        b.iter(|| {
            let mut s = LatencySketch::new();
            for &l in &latencies {
                s.insert(l);
            }
            s
        })
    });
    let mut full = LatencySketch::new();
    latencies.iter().for_each(|&l| full.insert(l));
    group.bench_function("p99_of_10k", |b| b.iter(|| full.quantile(0.99)));
    group.finish();
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
