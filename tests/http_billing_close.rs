//! Billing periods closing over a real socket: the closer finalises the
//! last period unasked and announces it; an announcement a crash cut off
//! is made after restart, once; and `as_of` answers which plan and terms
//! were recorded at a time.

mod support;

use serde_json::{json, Value};
use support::billing::*;
use support::{client, encode_path, Server, DAY, MINUTE};

#[tokio::test]
async fn the_closer_finalises_the_last_period_and_announces_its_totals() {
    let now = chrono::Utc::now().timestamp_millis();
    let (start, end) = previous_month(now);
    if now - end < 10 * MINUTE {
        // The last period closes 5 minutes (the lateness) after its end.
        println!("skipped: too close to the start of a month");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Nothing closes on the first run (a closing delay of ten years)...
    let server = Server::start(&data, &["--billing-close-delay", "3650d"]);
    let c = client();
    put(&c, server.url("/v1/plans/basic"), basic()).await;
    put(
        &c,
        server.url("/v1/clients/closing%2F1/plan"),
        json!({"plan_id": "basic", "effective_from": start - DAY}),
    )
    .await;
    let events: Vec<(usize, Ev)> = (0..700)
        .map(|i| {
            (
                i,
                Ev {
                    client: "closing/1".into(),
                    endpoint: "/v1/orders/{id}",
                    status: 200,
                    bytes: 0,
                    units: None,
                    ts: start + i as i64 * ((end - start) / 700),
                },
            )
        })
        .collect();
    ingest(&c, &server, &events).await;
    let open: Value =
        serde_json::from_slice(&report_bytes(&c, &server, "closing/1", "period=previous").await)
            .unwrap();
    assert_eq!(open["status"], "open");
    server.stop();

    // ...then the closer, soon after start, finalises it unasked.
    let server = Server::start(&data, &["--billing-close-delay", "0s"]);
    let url = server
        .url("/v1/alerts/ws?last_event_id=0&types=BILLING_PERIOD_CLOSED")
        .replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let closed = support::next_ws_json(&mut ws).await;
    assert_eq!(closed["event_type"], "BILLING_PERIOD_CLOSED");
    assert_eq!(closed["client_id"], "closing/1");
    let details = &closed["details"];
    // 700 requests, 500 free: 200 at 0.01; 700 compute units (weight 1)
    // at 0.0001.
    assert_eq!(details["billable_metrics"]["billable_requests"], 200);
    assert_eq!(d(details["total_amount"].as_str().unwrap()), d("2.07"));
    let report: Value =
        serde_json::from_slice(&report_bytes(&c, &server, "closing/1", "period=previous").await)
            .unwrap();
    assert_eq!(report["status"], "closed");
    assert_eq!(report["total_amount"], details["total_amount"]);
    assert_eq!(
        report["billing_period_start"],
        details["billing_period_start"]
    );
    server.stop();
}

#[tokio::test]
async fn plans_and_assignments_answer_as_of_what_was_recorded_then() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let client_id = "dispute/tenant 1";
    let plan_url = server.url("/v1/plans/basic");
    let assign_url = server.url(&format!("/v1/clients/{}/plan", encode_path(client_id)));
    let before_all = wall_ms() - 1;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put(&c, plan_url.clone(), basic()).await;
    put(&c, server.url("/v1/plans/pro"), pro()).await;
    put(
        &c,
        assign_url.clone(),
        json!({"plan_id": "basic", "effective_from": "2026-01-01T00:00:00Z"}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let first_terms = wall_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // The plan's terms change, and the client moves to pro from March.
    let mut dearer = basic();
    dearer["free_requests"] = json!(100);
    put(&c, plan_url.clone(), dearer).await;
    put(
        &c,
        assign_url.clone(),
        json!({"plan_id": "pro", "effective_from": "2026-03-01T00:00:00Z"}),
    )
    .await;

    let at = |t: i64| format!("as_of={t}");
    let (status, then) = get_json(&c, format!("{plan_url}?{}", at(first_terms))).await;
    assert_eq!(status, 200, "{then}");
    assert_eq!(then["plan"]["free_requests"], 500);
    assert_eq!(then["version"], 1);
    let (_, now) = get_json(&c, plan_url.clone()).await;
    assert_eq!(now["plan"]["free_requests"], 100);
    assert_eq!(now["version"], 2);
    let (status, _) = get_json(&c, format!("{plan_url}?{}", at(before_all))).await;
    assert_eq!(status, 404);

    // The client at `first_terms`: only the basic assignment was recorded,
    // so basic applied, on its terms then.
    let (status, then) = get_json(&c, format!("{assign_url}?{}", at(first_terms))).await;
    assert_eq!(status, 200, "{then}");
    assert_eq!(then["plan_id"], "basic");
    assert_eq!(then["schedule"].as_array().unwrap().len(), 1);
    assert_eq!(then["plan"]["free_requests"], 500);
    // Now: both assignments recorded; pro in force (since March).
    let (_, later) = get_json(&c, format!("{assign_url}?{}", at(wall_ms()))).await;
    assert_eq!(later["schedule"].as_array().unwrap().len(), 2, "{later}");
    assert_eq!(later["plan_id"], "pro");
    assert_eq!(later["plan"]["free_requests"], 3100);
    let (status, _) = get_json(&c, format!("{assign_url}?{}", at(before_all))).await;
    assert_eq!(status, 404);
    let (status, bad) = get_json(&c, format!("{assign_url}?as_of=yesterday")).await;
    assert_eq!(status, 400, "{bad}");
    server.stop();
}

/// A crash after a closed report is stored and before its
/// `BILLING_PERIOD_CLOSED` is logged (simulated: the report and its
/// announcement marker written offline, as the close writes them): the
/// next start announces it, once.
#[tokio::test]
async fn a_close_whose_announcement_a_crash_cut_off_is_announced_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    Server::start(&data, &[]).stop();
    let client_id = "cut/1";
    {
        let store = tally_state::Store::open(&data, tally_state::StoreOptions::default()).unwrap();
        let partition = store.partition_of(client_id);
        let report = br#"{"client_id":"cut/1","summary":{"total_requests":3}}"#;
        let details = br#"{"total_amount":"1.5","plan_id":"basic"}"#;
        store
            .put_closed_reports(partition, &[(client_id, 86_400_000, report, details)])
            .unwrap();
        assert_eq!(store.unannounced_closes(partition).unwrap().len(), 1);
    }
    let server = Server::start(&data, &[]);
    let ws_url = |s: &Server, after: &str| {
        s.url(&format!(
            "/v1/alerts/ws?last_event_id={after}&types=BILLING_PERIOD_CLOSED"
        ))
        .replacen("http://", "ws://", 1)
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&server, "0"))
        .await
        .unwrap();
    let announced = support::next_ws_json(&mut ws).await;
    assert_eq!(announced["client_id"], client_id);
    assert_eq!(announced["details"]["total_amount"], "1.5");
    let position = announced["stream_id"].as_str().unwrap().to_string();
    server.stop();
    // Restarted again: nothing more to announce (the marker is gone).
    let server = Server::start(&data, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&server, &position))
        .await
        .unwrap();
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        support::next_ws_json(&mut ws),
    )
    .await;
    assert!(again.is_err(), "announced twice: {:?}", again.ok());
    let store_check = server;
    store_check.stop();
    let store = tally_state::Store::open(&data, tally_state::StoreOptions::default()).unwrap();
    assert!(store
        .unannounced_closes(store.partition_of(client_id))
        .unwrap()
        .is_empty());
}
