//! Cost of one rate-limit decision per algorithm (target <= 200 ns), and
//! of a full client check (global + endpoint limit) as a shard runs it.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tally_pipelines::limit::policy::{ClientLimiter, LimitConfig, LimitSpec};
use tally_pipelines::limit::{Algorithm, Limit, LimiterState};

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("limit_decision");
    group.throughput(Throughput::Elements(1));
    // Large enough that most decisions allow; time advances 1 ms a call so
    // windows roll and buckets refill as in production.
    let limit = Limit::new(1_000_000, 60, 0);
    for algorithm in Algorithm::ALL {
        let mut state = LimiterState::new(algorithm, &limit, 0);
        let mut now = 0i64;
        group.bench_function(format!("{algorithm:?}"), |b| {
            b.iter(|| {
                now += 1;
                std::hint::black_box(state.check(&limit, now, 1))
            })
        });
    }
    let config = LimitConfig {
        algorithm: Algorithm::SlidingWindow,
        global_limit: LimitSpec {
            requests: 1_000_000,
            window_seconds: 60,
        },
        endpoint_limits: BTreeMap::from([(
            "/search".to_string(),
            LimitSpec {
                requests: 500_000,
                window_seconds: 60,
            },
        )]),
        burst_allowance: 0,
        enabled: true,
        shadow: false,
    };
    let mut limiter = ClientLimiter::default();
    let mut now = 0i64;
    group.bench_function("client_check_global_and_endpoint", |b| {
        b.iter(|| {
            now += 1;
            std::hint::black_box(limiter.check(&config, 1.0, "/search", now, 1, true))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
