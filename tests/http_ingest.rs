//! End-to-end over a real socket and real RocksDB: ingest a generated
//! dataset over HTTP and compare every client's numbers with a reference
//! computed by a plain loop.

mod support;

use serde_json::Value;
use support::*;

async fn post_ndjson(c: &reqwest::Client, server: &Server, body: String) -> Value {
    let resp = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.json().await.unwrap()
}

async fn get_json(c: &reqwest::Client, url: String) -> Value {
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{url}: {}",
        resp.text().await.unwrap_or_default()
    );
    resp.json().await.unwrap()
}

fn iso(ms: i64) -> String {
    chrono_like(ms)
}

/// RFC 3339 by hand (days from civil), to keep the test free of the
/// engine's time code.
fn chrono_like(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_matches_reference_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lines = dataset(60_000, 150, 7);
    let server = Server::start(&data, &[]);
    let c = client();

    // Ingest in batches; per-batch counts must match the dataset's labels.
    let mut totals = [0u64; 4];
    for chunk in lines.chunks(5_000) {
        let r = post_ndjson(&c, &server, ndjson(chunk)).await;
        let counts = tally_counts(&r);
        assert_eq!(
            counts["rejected"],
            count_kind(chunk, Kind::Malformed),
            "rejected"
        );
        assert_eq!(
            counts["duplicates"],
            count_kind(chunk, Kind::Duplicate),
            "duplicates"
        );
        assert_eq!(counts["late"], count_kind(chunk, Kind::Late), "late");
        assert_eq!(
            counts["accepted"],
            count_kind(chunk, Kind::Good),
            "accepted"
        );
        assert_eq!(
            r["errors"].as_array().unwrap().len() as u64,
            counts["rejected"]
        );
        for (i, k) in ["accepted", "rejected", "duplicates", "late"]
            .iter()
            .enumerate()
        {
            totals[i] += counts[k];
        }
    }
    assert_eq!(totals.iter().sum::<u64>(), lines.len() as u64);

    // The whole dataset lies in one day, week and month.
    let day_start = START_MS;
    let at = iso(START_MS + 3 * HOUR);
    let clients = clients_of(&lines);
    assert!(clients.len() > 100);
    let check_all = |server_base: String| {
        let c = c.clone();
        let lines = &lines;
        let clients = &clients;
        let at = at.clone();
        async move {
            for client in clients {
                let enc = encode_path(client);
                // 2026-03-01 (Sunday) is in the month but not in the week.
                for (period, from) in [
                    ("day", day_start),
                    ("week", day_start),
                    ("month", day_start - DAY),
                ] {
                    let url =
                        format!("{server_base}/v1/clients/{enc}/usage?period={period}&at={at}");
                    let got = get_json(&c, url).await;
                    check_usage(
                        &got,
                        &expected(lines, client, from, day_start + DAY),
                        &format!("{client} {period}"),
                    );
                }
                // Each hour separately.
                for h in [0i64, 2, 4] {
                    let from = START_MS + h * HOUR;
                    let url = format!(
                        "{server_base}/v1/clients/{enc}/usage?period=hour&at={}",
                        from + 1
                    );
                    let got = get_json(&c, url).await;
                    check_usage(
                        &got,
                        &expected(lines, client, from, from + HOUR),
                        &format!("{client} hour {h}"),
                    );
                }
            }
        }
    };
    check_all(server.base.clone()).await;

    // Endpoints breakdown of a few clients.
    for client in clients.iter().take(20) {
        let want = expected(&lines, client, day_start, day_start + DAY);
        let got = get_json(
            &c,
            server.url(&format!(
                "/v1/clients/{}/usage/endpoints?period=day&at={at}",
                encode_path(client)
            )),
        )
        .await;
        let eps = got["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), want.endpoints.len());
        let counts: Vec<u64> = eps
            .iter()
            .map(|e| e["request_count"].as_u64().unwrap())
            .collect();
        assert!(
            counts.windows(2).all(|w| w[0] >= w[1]),
            "sorted by request_count desc"
        );
        for e in eps {
            let name = e["endpoint"].as_str().unwrap();
            let w = &want.endpoints[name];
            assert_eq!(e["request_count"].as_u64(), Some(w.count));
            assert_eq!(e["error_count"].as_u64(), Some(w.errors));
            assert_eq!(e["total_data_transfer_bytes"].as_u64(), Some(w.bytes));
            assert_close(
                "error_rate",
                e["error_rate"].as_f64().unwrap(),
                w.errors as f64 / w.count as f64,
                1e-12,
            );
            assert_close(
                "endpoint p95",
                e["p95_latency_ms"].as_f64().unwrap(),
                nearest_rank(&w.latencies, 0.95),
                0.01,
            );
        }
    }

    // History at minute and hour granularity.
    for client in clients.iter().take(10) {
        for (granularity, width) in [("minute", MINUTE), ("hour", HOUR)] {
            let url = server.url(&format!(
                "/v1/clients/{}/usage/history?granularity={granularity}&from={}&to={}",
                encode_path(client),
                START_MS - 2 * HOUR,
                START_MS + DAY
            ));
            let got = get_json(&c, url).await;
            let points = got["points"].as_array().unwrap();
            let want = expected_history(&lines, client, width);
            assert_eq!(points.len(), want.len(), "{client} {granularity} points");
            for (p, (ts, (n, errors, bytes))) in points.iter().zip(want) {
                assert_eq!(p["timestamp"].as_i64(), Some(ts));
                assert_eq!(p["request_count"].as_u64(), Some(n));
                assert_eq!(p["error_count"].as_u64(), Some(errors));
                assert_eq!(p["data_transfer_bytes"].as_u64(), Some(bytes));
            }
        }
    }

    // Late events are kept in the dead-letter store with the reason (read
    // page by page).
    let items = all_dead_letters(&c, &server).await;
    assert_eq!(items.len() as u64, count_kind(&lines, Kind::Late));
    assert!(items
        .iter()
        .all(|d| d["reason"].as_str().unwrap().starts_with("late:")));

    // Metrics count what happened, by source.
    let metrics = metrics_text(&c, &server).await;
    let metric = |name: &str| -> u64 {
        metric_value(&metrics, name, "source=\"http\"")
            .unwrap_or_else(|| panic!("{name} missing in /metrics")) as u64
    };
    assert_eq!(metric("tally_events_accepted_total"), totals[0]);
    assert_eq!(metric("tally_events_rejected_total"), totals[1]);
    assert_eq!(metric("tally_events_duplicate_total"), totals[2]);
    assert_eq!(metric("tally_events_late_total"), totals[3]);
    assert!(metrics.contains("tally_flush_duration_seconds"));
    assert!(metrics.contains("tally_rocksdb_size_bytes"));

    // Graceful restart keeps everything.
    assert!(server.stop().success());
    let server = Server::start(&data, &[]);
    check_all(server.base.clone()).await;

    // An acknowledged batch survives SIGKILL right after its 202. (Dated
    // after the dataset, so that it is not late in its partition.)
    let extra = format!(
        r#"{{"event_id":"after-kill","client_id":"survivor","endpoint":"/v1/x","status":200,"latency_ms":3,"timestamp":{}}}"#,
        START_MS + 5 * HOUR
    );
    let r = post_ndjson(&c, &server, format!("{extra}\n")).await;
    assert_eq!(r["accepted"], 1);
    server.kill();
    let server = Server::start(&data, &[]);
    let got = get_json(
        &c,
        server.url(&format!("/v1/clients/survivor/usage?period=day&at={at}")),
    )
    .await;
    assert_eq!(got["total_requests"], 1);
    // And re-sending it after the restart is recognised as a duplicate.
    let r = post_ndjson(&c, &server, format!("{extra}\n")).await;
    assert_eq!(
        (r["accepted"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
}
