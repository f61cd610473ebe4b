//! The only consuming instance killed (SIGKILL) under a steady produce load
//! and started again on the same data directory and address: it rejoins
//! the consumer group as the member it was (static membership), so
//! consumption resumes in seconds rather than after the broker expires the
//! dead member's session (45 s by default); usage queries answer
//! throughout, from local state marked with its offset while no instance
//! owns the partition; and the totals come out exact.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::kafka::{produce_all, records, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const DLQ: &str = "tally.requests.dlq";

async fn accepted(c: &reqwest::Client, server: &Server) -> u64 {
    metric_value(
        &metrics_text(c, server).await,
        "tally_events_accepted_total",
        "source=\"kafka\"",
    )
    .unwrap_or(0.0) as u64
}

/// One usage read: its status, total and `x-tally-as-of-offset` header.
async fn usage(
    c: &reqwest::Client,
    server: &Server,
    client: &str,
) -> Option<(u16, u64, Option<u64>)> {
    let url = server.url(&format!(
        "/v1/clients/{}/usage?period=month&at={START_MS}",
        encode_path(client)
    ));
    let r = c.get(url).send().await.ok()?;
    let code = r.status().as_u16();
    let as_of = r
        .headers()
        .get("x-tally-as-of-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Some((code, body["total_requests"].as_u64().unwrap_or(0), as_of))
}

async fn total_of(c: &reqwest::Client, server: &Server, lines: &[Line]) -> u64 {
    let mut got = 0;
    for client in clients_of(lines) {
        if let Some((200, n, _)) = usage(c, server, &client).await {
            got += n;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_restarts_without_an_outage() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 12);
    broker.create_topic(DLQ, 1);
    let lines = dataset(60_000, 60, 71);
    let want = count_kind(&lines, Kind::Good);
    let clients: Vec<String> = clients_of(&lines).into_iter().collect();

    // Steady load: 1,000 records every half second, for 30 s.
    let bootstrap = broker.bootstrap();
    let all = records(&lines);
    let load = tokio::spawn(async move {
        for chunk in all.chunks(1_000) {
            let next = tokio::time::Instant::now() + Duration::from_millis(500);
            produce_all(&bootstrap, TOPIC, chunk).await;
            tokio::time::sleep_until(next).await;
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--kafka-group",
        "tally-restart",
    ];
    let c = client();
    let first = Server::start(&data, &args);
    let listen = first.listen_address();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Killed once every client has flushed state here, so every partition
    // has a local copy to answer from.
    loop {
        let mut all = true;
        for client in &clients {
            all &= matches!(usage(&c, &first, client).await, Some((200, n, _)) if n > 0);
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every client counted before the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And once a changelog round has carried that state: the restarted
    // instance, whose local state is ahead of its last round, takes its
    // partitions back from the changelog, and a round from before the
    // first flush would leave a partition with no position to answer as
    // of while the others are taken. Two rounds of every partition after
    // this point include a whole one.
    let rounds = |text: &str| metric_value(text, "tally_changelog_rounds_total", "").unwrap_or(0.0);
    let from = rounds(&metrics_text(&c, &first).await);
    while rounds(&metrics_text(&c, &first).await) < from + 24.0 {
        assert!(
            Instant::now() < deadline,
            "no changelog round after every client counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    first.kill();
    let killed_at = Instant::now();
    let mut server = Server::start_on(&data, &listen, &args);
    let listening_after = killed_at.elapsed();

    // From the moment it listens until consumption has resumed, every read
    // is answered (200), from local state while nothing is assigned.
    let mut reads = 0u64;
    let mut as_of_answers = 0u64;
    let mut i = 0usize;
    let resumed_after = loop {
        if accepted(&c, &server).await > 0 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(40),
            "consumption did not resume within 40 s of the kill (the session timeout is 45 s); {}",
            server.report()
        );
        let client = &clients[i % clients.len()];
        i += 1;
        let (code, total, as_of) = usage(&c, &server, client)
            .await
            .expect("the restarted instance did not answer");
        if code != 200 {
            // Which 503: the answer's problem type says.
            let url = server.url(&format!("/v1/clients/{}/usage", encode_path(client)));
            let again = c
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            panic!(
                "a read for {client} during the restart was refused ({code}); asked again: {again}; {}",
                server.report()
            );
        }
        assert!(total <= want);
        reads += 1;
        if as_of.is_some() {
            as_of_answers += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "restart: listening {listening_after:?} after the kill, consuming {resumed_after:?} after; {reads} reads meanwhile, {as_of_answers} answered as of an offset"
    );
    assert!(reads > 0, "no read was made during the restart");
    assert!(
        as_of_answers > 0,
        "no read before the assignment carried x-tally-as-of-offset"
    );

    load.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = total_of(&c, &server, &lines).await;
        assert!(got <= want, "counted {got} of {want}: double counting");
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {want} events counted; {}",
            server.report()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Exact per client as well, not just in sum.
    for client in &clients {
        let expected = lines
            .iter()
            .filter(|l| l.kind == Kind::Good && &l.client == client)
            .count() as u64;
        let (code, total, _) = usage(&c, &server, client).await.unwrap();
        assert_eq!((code, total), (200, expected), "{client}");
    }
}
