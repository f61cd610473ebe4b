//! Decoding and validation cost per event (NDJSON and JSON array bodies).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tally_pipelines::decode::{decode_body, decode_event_bytes, BodyFormat};
use tally_pipelines::event::ValidationContext;
use tally_pipelines::synthetic::{Generator, GeneratorConfig};

fn lines(n: usize) -> Vec<String> {
    let mut g = Generator::new(GeneratorConfig::default()).expect("generator");
    (0..n)
        .map(|_| {
            let mut s = String::new();
            g.next_line(&mut s);
            s
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let ctx = ValidationContext::lenient();
    let lines = lines(10_000);
    let ndjson = lines.join("\n");
    let array = format!("[{}]", lines.join(","));
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function(BenchmarkId::new("ndjson_body", lines.len()), |b| {
        b.iter(|| decode_body(BodyFormat::Ndjson, ndjson.as_bytes(), &ctx).expect("decodes"))
    });
    group.bench_function(BenchmarkId::new("json_array_body", lines.len()), |b| {
        b.iter(|| decode_body(BodyFormat::Json, array.as_bytes(), &ctx).expect("decodes"))
    });
    group.finish();
    let one = lines[0].as_bytes();
    c.bench_function("decode/one_event", |b| {
        b.iter(|| decode_event_bytes(one, &ctx))
    });
}

criterion_group!(benches, decode);
criterion_main!(benches);
