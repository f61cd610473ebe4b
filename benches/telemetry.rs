//! Telemetry statistics per point (run with `cargo bench --bench
//! telemetry`): one point into a series bucket (Welford moments and the
//! signed sketch), a day's 1,440 minute buckets merged into one, and the
//! heap allocations a point costs once its bucket has seen the series'
//! range (a counting allocator around the system one).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, Criterion, Throughput};
use tally_pipelines::telemetry::Bucket;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A CPU-like series: a level with noise and occasional spikes, any sign
/// around a drifting zero for a second series.
fn values(n: usize) -> Vec<f64> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let spike = if i % 997 == 0 { 40.0 } else { 0.0 };
            55.0 + 10.0 * noise + spike
        })
        .collect()
}

fn telemetry(c: &mut Criterion) {
    let points = values(100_000);
    let mut group = c.benchmark_group("telemetry");
    group.throughput(Throughput::Elements(points.len() as u64));
    group.bench_function("insert_100k_points_into_a_bucket", |b| {
        b.iter(|| {
            let mut bucket = Bucket::default();
            for (i, v) in points.iter().enumerate() {
                bucket.insert(i as i64, *v);
            }
            bucket
        })
    });
    let minutes: Vec<Bucket> = points
        .chunks(points.len() / 1440 + 1)
        .map(|chunk| {
            let mut b = Bucket::default();
            for (i, v) in chunk.iter().enumerate() {
                b.insert(i as i64, *v);
            }
            b
        })
        .collect();
    group.throughput(Throughput::Elements(minutes.len() as u64));
    group.bench_function("merge_a_days_minute_buckets", |b| {
        b.iter(|| {
            let mut day = Bucket::default();
            for m in &minutes {
                day.merge(m);
            }
            day
        })
    });
    group.finish();
}

/// Allocations per point once the bucket holds the series' bins.
fn allocations() {
    let points = values(1_000_000);
    let mut bucket = Bucket::default();
    for (i, v) in points.iter().take(100_000).enumerate() {
        bucket.insert(i as i64, *v);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for (i, v) in points.iter().enumerate() {
        bucket.insert(i as i64, *v);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    println!(
        "telemetry: {} heap allocations over {} points into a warm bucket ({:.6} per point); {} points counted",
        after - before,
        points.len(),
        (after - before) as f64 / points.len() as f64,
        bucket.moments.count()
    );
}

criterion_group!(benches, telemetry);

fn main() {
    allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
