//! Telemetry through Kafka, against a real broker: points produced to the
//! telemetry topic (keyed by series) and posted over HTTP (produced there
//! by the instance) are counted exactly once through a kill -9 in the
//! middle of consumption; a second instance then takes half the
//! partitions, rebuilt from the changelog, and answers for their series
//! exactly, point ids and lateness included (a point re-sent after the
//! move is a duplicate or late there too); lists and correlations are
//! answered across the two.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kafka::{kafka_dead_letter_origins, produce_all, wait_for_split, Broker};
use support::telemetry::{check_steps, day_start, get, line, post, P};
use support::*;

const TOPIC: &str = "tally.requests";
const TELEMETRY: &str = "tally.telemetry";
const DLQ: &str = "tally.requests.dlq";
const PARTITIONS: u16 = 12;
const SERIES: usize = 24;
const HOUR: i64 = 3_600_000;

fn args(broker: &Broker) -> Vec<String> {
    vec![
        "--kafka-brokers".into(),
        broker.bootstrap(),
        "--kafka-group".into(),
        "tally-telemetry".into(),
    ]
}

fn host(i: usize) -> &'static str {
    ["a", "b", "c", "d", "e", "f"][(i / 4) % 6]
}

fn name(i: usize) -> &'static str {
    ["cpu", "mem", "disk", "net"][i % 4]
}

/// Series `i`: one of 4 names with one of 6 hosts, so 24 distinct series.
fn point(i: usize, ts: i64, value: f64, id: Option<String>) -> P {
    P {
        series: name(i),
        tags: Some(BTreeMap::from([("host", host(i))])),
        ts,
        value,
        id,
    }
}

/// The series key the engine routes by (`name{host=..}`).
fn key(i: usize) -> String {
    format!("{}{{host={}}}", name(i), host(i))
}

/// `n` points per series, in time order across the last hours of a past
/// day, with values of every sign; every point has an id.
fn points(n: usize, from_ms: i64, seed: u64) -> Vec<(usize, P)> {
    let mut out = Vec::with_capacity(n * SERIES);
    let mut x = seed;
    for k in 0..n {
        for i in 0..SERIES {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = ((x >> 33) % 10_000) as f64 / 100.0 - 50.0;
            let ts = from_ms + (k as i64) * 1_000 + i as i64;
            let value = (i as f64) * 10.0 + noise;
            out.push((i, point(i, ts, value, Some(format!("s{i}-{seed}-{k}")))));
        }
    }
    out
}

fn note(want: &mut BTreeMap<usize, Vec<(i64, f64)>>, points: &[(usize, P)]) {
    for (i, p) in points {
        want.entry(*i).or_default().push((p.ts, p.value));
    }
}

fn records(points: &[(usize, P)]) -> Vec<(String, String)> {
    points.iter().map(|(i, p)| (key(*i), line(p))).collect()
}

async fn accepted(c: &reqwest::Client, server: &Server) -> u64 {
    metric_value(
        &metrics_text(c, server).await,
        "tally_events_accepted_total",
        "source=\"kafka\"",
    )
    .unwrap_or(0.0) as u64
}

fn query_url(server: &Server, i: usize, from: i64, to: i64, step: &str, agg: &str) -> String {
    server.url(&format!(
        "/v1/telemetry/{}?tags.host={}&from={}&to={}&step={step}&agg={agg}",
        name(i),
        host(i),
        from,
        to
    ))
}

/// Waits until every series counts as many points as `want` says.
async fn wait_for_counts(
    c: &reqwest::Client,
    server: &mut Server,
    want: &BTreeMap<usize, Vec<(i64, f64)>>,
    from: i64,
    to: i64,
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut done = true;
        for (&i, values) in want {
            let (status, body) = get(c, query_url(server, i, from, to, "1d", "count")).await;
            let got = body["summary"]["count"].as_u64().unwrap_or(0);
            assert!(
                status != 200 || got <= values.len() as u64,
                "series {} counted {got} of {}: double counting",
                key(i),
                values.len()
            );
            done &= status == 200 && got == values.len() as u64;
        }
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "telemetry not all counted; {}",
            server.report()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every series, every aggregation at an hourly step, against the
/// reference over the points the test sent.
async fn check_all(
    c: &reqwest::Client,
    server: &Server,
    want: &BTreeMap<usize, Vec<(i64, f64)>>,
    from: i64,
    to: i64,
    ctx: &str,
) {
    for (&i, values) in want {
        for agg in ["count", "sum", "mean", "min", "max", "stddev", "p95"] {
            let (status, body) = get(c, query_url(server, i, from, to, "1h", agg)).await;
            assert_eq!(status, 200, "{ctx} {}: {body}", key(i));
            check_steps(&body, values, HOUR, agg, &format!("{ctx} {} {agg}", key(i)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_through_kafka_is_exact_through_a_kill_and_moves_with_its_partition() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(TELEMETRY, u32::from(PARTITIONS));
    broker.create_topic(DLQ, 1);
    let from = day_start() + 20 * HOUR;
    let to = from + 4 * HOUR;
    let bootstrap = broker.bootstrap();

    // What the engine must hold: per series, (timestamp, value).
    let mut want: BTreeMap<usize, Vec<(i64, f64)>> = BTreeMap::new();
    // 60,000 points before the instance starts, 60,000 while it restarts.
    let first = points(2_500, from, 1);
    let second = points(2_500, from + 2_500_000, 2);
    note(&mut want, &first);
    note(&mut want, &second);
    produce_all(&bootstrap, TELEMETRY, &records(&first)).await;
    // A record that is not a point: a dead letter, naming its topic.
    produce_all(
        &bootstrap,
        TELEMETRY,
        &[(key(0), r#"{"series":"cpu","value":"high"}"#.to_string())],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = client();
    let one = Server::start(&data, &args);
    let listen = one.listen_address();
    let deadline = Instant::now() + Duration::from_secs(120);
    while accepted(&c, &one).await == 0 {
        assert!(Instant::now() < deadline, "nothing consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Killed mid-consumption: what it applied but did not flush is read
    // again, what it flushed is not counted twice.
    let at_kill = accepted(&c, &one).await;
    one.kill();
    eprintln!("killed after {at_kill} accepted points of {}", first.len());
    let producing = {
        let bootstrap = bootstrap.clone();
        let second = records(&second);
        tokio::spawn(async move { produce_all(&bootstrap, TELEMETRY, &second).await })
    };
    let mut one = Server::start_on(&data, &listen, &args);
    producing.await.unwrap();

    // Over HTTP in Kafka mode: produced to the telemetry topic, counted
    // when consumed; late points inside the lateness count, outside not.
    let end = from + 2_500_000 + 2_500_000;
    let mut posted = vec![
        (3, point(3, end - 60_000, 7.5, None)),
        (3, point(3, end - 2 * HOUR, 1e6, None)),
        (4, point(4, end - 30_000, -2.25, Some("late-in".into()))),
    ];
    // Everything is consumed before the late points are posted, so the
    // partitions' clocks are at the end of the data.
    wait_for_counts(&c, &mut one, &want, from, to).await;
    let body = post(
        &c,
        &one,
        &posted.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(body["accepted"], 3, "{body}");
    posted.remove(1);
    note(&mut want, &posted);
    wait_for_counts(&c, &mut one, &want, from, to).await;
    check_all(&c, &one, &want, from, to, "after the kill").await;
    let (dead, _) = kafka_dead_letter_origins(&c, &one).await;
    assert_eq!(dead, 1, "the bad point is a dead letter");
    let dead: Value = c
        .get(one.url("/v1/dead-letters/kafka"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dead["dead_letters"][0]["source_topic"], TELEMETRY, "{dead}");
    // One instance owns every partition: it lists every series.
    let (status, list) = get(&c, one.url("/v1/telemetry?limit=100")).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["series"].as_array().map(Vec::len),
        Some(SERIES),
        "{list}"
    );

    // A second instance takes half the partitions, restored from the
    // changelog: their series answer exactly there (and through the first
    // instance, forwarded to their owner).
    let dir_two = tempfile::tempdir().unwrap();
    let mut two = Server::start(&dir_two.path().join("data"), &args);
    let sets = wait_for_split(&c, &[&one, &two], PARTITIONS).await;
    eprintln!("split: {sets:?}");
    let moved: Vec<usize> = (0..SERIES)
        .filter(|&i| {
            let p =
                tally_pipelines::partitioner::Partitioner::default().partition(&key(i), PARTITIONS);
            sets[1].contains(&p)
        })
        .collect();
    assert!(!moved.is_empty(), "no series moved: {sets:?}");
    let moved_want: BTreeMap<usize, Vec<(i64, f64)>> =
        moved.iter().map(|i| (*i, want[i].clone())).collect();
    wait_for_counts(&c, &mut two, &moved_want, from, to).await;
    check_all(&c, &two, &moved_want, from, to, "moved, on its owner").await;
    check_all(&c, &one, &want, from, to, "through the first instance").await;
    // The partitions' telemetry clocks and point ids moved too: the first
    // batch sent again is late, the last 200 s of the second (inside the
    // lateness) are duplicates by id.
    produce_all(&bootstrap, TELEMETRY, &records(&first)).await;
    let tail: Vec<(usize, P)> = second
        .iter()
        .filter(|(_, p)| p.ts >= end - 200_000)
        .cloned()
        .collect();
    assert!(tail.len() >= 100 * SERIES);
    produce_all(&bootstrap, TELEMETRY, &records(&tail)).await;
    // One new point per series behind them: once those count, every
    // re-sent record before them in its partition has been consumed.
    let fresh: Vec<(usize, P)> = (0..SERIES)
        .map(|i| {
            (
                i,
                point(
                    i,
                    end - 10_000 + i as i64,
                    42.0 + i as f64,
                    Some(format!("after-move-{i}")),
                ),
            )
        })
        .collect();
    produce_all(&bootstrap, TELEMETRY, &records(&fresh)).await;
    note(&mut want, &fresh);
    wait_for_counts(&c, &mut two, &want, from, to).await;
    check_all(&c, &two, &want, from, to, "after re-sending").await;
    // The list gathers every owner's series, a page at a time, from
    // either instance.
    for server in [&one, &two] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = server.url("/v1/telemetry?limit=5");
            if let Some(c) = &cursor {
                url += &format!("&cursor={}", encode_path(c));
            }
            let (status, page) = get(&c, url).await;
            assert_eq!(status, 200, "{page}");
            seen.extend(
                page["series"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string()),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => break,
            }
        }
        let mut want_keys: Vec<String> = (0..SERIES).map(key).collect();
        want_keys.sort();
        assert_eq!(seen, want_keys);
    }
    // A correlation is answered where both sides live (the same answer
    // from either instance), refused with why when two instances do.
    let owner_of = |i: usize| {
        let p = tally_pipelines::partitioner::Partitioner::default().partition(&key(i), PARTITIONS);
        usize::from(sets[1].contains(&p))
    };
    let pairs: Vec<(usize, usize)> = (0..SERIES)
        .flat_map(|i| (0..SERIES).map(move |j| (i, j)))
        .filter(|(i, j)| i < j)
        .collect();
    let together = pairs
        .iter()
        .find(|(i, j)| owner_of(*i) == owner_of(*j))
        .unwrap();
    let apart = pairs
        .iter()
        .find(|(i, j)| owner_of(*i) != owner_of(*j))
        .unwrap();
    let correlate = |server: &Server, (i, j): (usize, usize)| {
        server.url(&format!(
            "/v1/telemetry/correlate?a={}&b={}&from={from}&to={to}&step=1m",
            encode_path(&key(i)),
            encode_path(&key(j))
        ))
    };
    let (status, direct) = get(&c, correlate([&one, &two][owner_of(together.0)], *together)).await;
    assert_eq!(status, 200, "{direct}");
    assert!(direct["matched"].as_u64().unwrap() > 60, "{direct}");
    let (status, forwarded) = get(
        &c,
        correlate([&one, &two][1 - owner_of(together.0)], *together),
    )
    .await;
    assert_eq!((status, &forwarded), (200, &direct));
    let (status, refused) = get(&c, correlate(&one, *apart)).await;
    assert_eq!(status, 501, "{refused}");
    assert!(refused.to_string().contains("two instances"), "{refused}");
}
