//! Billing reports over a real socket, against sums over the events the
//! test sent (a plain loop, not the engine): plans with free tiers,
//! graduated prices and compute weights, a plan change mid-period, clients
//! with awkward ids, a closed period that stays byte-identical through late
//! events, a replay and a restart, CSV, the all-clients export, a reset day
//! of 31 in February and a client in a DST-observing zone across the
//! change. Closing unasked and history: `http_billing_close.rs`.

mod support;

use std::collections::BTreeMap;

use chrono::TimeZone;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use support::billing::*;
use support::{client, encode_path, Server, DAY, MINUTE};

#[tokio::test]
async fn a_closed_periods_report_is_exact_and_never_moves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let c = client();
    put(&c, server.url("/v1/plans/basic"), basic()).await;
    put(&c, server.url("/v1/plans/pro"), pro()).await;
    let switched = "acme/eu west";
    let steady = "ünï-client, \"quoted\"";
    let unplanned = "plain";
    put(
        &c,
        server.url(&format!("/v1/clients/{}/plan", encode_path(switched))),
        json!({"plan_id": "basic", "effective_from": "2025-12-01T00:00:00Z"}),
    )
    .await;
    let schedule = put(
        &c,
        server.url(&format!("/v1/clients/{}/plan", encode_path(switched))),
        json!({"plan_id": "pro", "effective_from": "2026-01-16T00:00:00Z"}),
    )
    .await;
    assert_eq!(schedule["schedule"].as_array().unwrap().len(), 2);
    put(
        &c,
        server.url(&format!("/v1/clients/{}/plan", encode_path(steady))),
        json!({"plan_id": "basic", "effective_from": "2025-12-01T00:00:00Z"}),
    )
    .await;

    // January 2026, in time order across clients (so nothing is late).
    let start = ms("2026-01-01T00:00:00Z");
    let end = ms("2026-02-01T00:00:00Z");
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut events = vec![];
    let clients = [(switched, 4200), (steady, 1600), (unplanned, 300)];
    for (client, n) in clients {
        for _ in 0..n {
            let ts = start + (next() as i64 % (end - start));
            let endpoint = if next() % 3 == 0 {
                "/v1/search"
            } else {
                "/v1/orders/{id}"
            };
            events.push(Ev {
                client: client.to_string(),
                endpoint,
                status: [200, 200, 200, 404, 503][next() as usize % 5],
                bytes: next() % 5000,
                units: (next() % 10 == 0).then(|| next() % 50),
                ts,
            });
        }
    }
    // The edges: the period's first and last millisecond, and just outside.
    for ts in [start, end - 1, start - 1, end] {
        events.push(Ev {
            client: steady.to_string(),
            endpoint: "/v1/orders/{id}",
            status: 200,
            bytes: 10,
            units: None,
            ts,
        });
    }
    // A client with usage in December only: not in January's export.
    let december_only = "only-in-december";
    events.push(Ev {
        client: december_only.to_string(),
        endpoint: "/v1/orders/{id}",
        status: 200,
        bytes: 7,
        units: None,
        ts: start - 3 * DAY,
    });
    events.sort_by_key(|e| e.ts);
    let numbered: Vec<(usize, Ev)> = events.iter().cloned().enumerate().collect();
    for chunk in numbered.chunks(2000) {
        let v = ingest(&c, &server, chunk).await;
        assert_eq!(v["accepted"].as_u64().unwrap() as usize, chunk.len(), "{v}");
    }

    let pro_from = ms("2026-01-16T00:00:00Z");
    let mut first_bytes = BTreeMap::new();
    for (client, _) in clients {
        let bytes = report_bytes(&c, &server, client, "period=2026-01-15").await;
        let r: Value = serde_json::from_slice(&bytes).unwrap();
        first_bytes.insert(client, bytes);
        let mine: Vec<&Ev> = events
            .iter()
            .filter(|e| e.client == client && e.ts >= start && e.ts < end)
            .collect();
        assert_eq!(r["status"], "closed");
        assert_eq!(r["billing_period_start"], "2026-01-01T00:00:00.000Z");
        assert_eq!(r["billing_period_end"], "2026-02-01T00:00:00.000Z");
        let s = &r["summary"];
        assert_eq!(
            s["total_requests"].as_u64().unwrap() as usize,
            mine.len(),
            "{client}"
        );
        let failed = mine.iter().filter(|e| e.status >= 400).count();
        let server_errors = mine.iter().filter(|e| e.status >= 500).count();
        assert_eq!(s["failed_requests"].as_u64().unwrap() as usize, failed);
        assert_eq!(s["server_errors"].as_u64().unwrap() as usize, server_errors);
        let bytes_sum: u64 = mine.iter().map(|e| e.bytes).sum();
        assert_eq!(s["total_data_transfer_bytes"].as_u64().unwrap(), bytes_sum);
        // The report's summary is the usage query's for the same period.
        let usage: Value = c
            .get(server.url(&format!(
                "/v1/clients/{}/usage?period=month&at=2026-01-15T00:00:00Z",
                encode_path(client)
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(usage["total_requests"], s["total_requests"]);
        assert_eq!(
            usage["total_data_transfer_bytes"],
            s["total_data_transfer_bytes"]
        );
        assert_eq!(usage["p99_latency_ms"], s["p99_latency_ms"]);
        // Days: each UTC day's count.
        let days = r["daily_trend"].as_array().unwrap();
        assert_eq!(days.len(), 31);
        for (i, day) in days.iter().enumerate() {
            let from = start + i as i64 * DAY;
            let want = mine
                .iter()
                .filter(|e| e.ts >= from && e.ts < from + DAY)
                .count();
            assert_eq!(
                day["requests"].as_u64().unwrap() as usize,
                want,
                "{client} day {i}"
            );
        }
        // Compute units: an event's own, else the weight of the plan in
        // force when it happened (1 without a plan or listed weight).
        let plan_weight = |e: &Ev| -> u64 {
            let plan = match client {
                c if c == switched && e.ts >= pro_from => "pro",
                c if c == unplanned => "none",
                _ => "basic",
            };
            match (plan, e.endpoint) {
                ("basic", "/v1/search") => 5,
                ("pro", "/v1/search") => 2,
                _ => 1,
            }
        };
        let units = |list: &[&Ev]| -> u64 {
            list.iter()
                .map(|e| e.units.unwrap_or_else(|| plan_weight(e)))
                .sum()
        };
        assert_eq!(
            s["compute_units"].as_u64().unwrap(),
            units(&mine),
            "{client}"
        );
        let b = &r["billable_metrics"];
        assert_eq!(b["total_requests"].as_u64().unwrap() as usize, mine.len());

        if client == unplanned {
            assert!(r["plan_id"].is_null());
            assert_eq!(r["lines"], json!([]));
            assert!(r["total_amount"].is_null());
            continue;
        }
        // By hand: what each segment owes.
        let mut want_total = Decimal::ZERO;
        let mut want_lines: Vec<(String, String, Decimal)> = vec![];
        let segments: Vec<(&str, i64, i64)> = if client == switched {
            vec![("basic", start, pro_from), ("pro", pro_from, end)]
        } else {
            vec![("basic", start, end)]
        };
        let mut billable = 0u64;
        for (plan, from, to) in segments {
            let part: Vec<&Ev> = mine
                .iter()
                .copied()
                .filter(|e| e.ts >= from && e.ts < to)
                .collect();
            let share = |included: u64| -> u64 {
                (included as u128 * (to - from) as u128 / (end - start) as u128) as u64
            };
            let (free, tiers): (u64, &[(Option<&str>, &str)]) = match plan {
                "basic" => (share(500), &BASIC_TIERS),
                _ => (share(3100), &[(None, "0.001")]),
            };
            let over = (part.len() as u64).saturating_sub(free);
            billable += over;
            if over > 0 {
                let amount = priced(Decimal::from(over), tiers);
                want_lines.push((plan.to_string(), "requests".into(), amount));
                want_total += amount;
            }
            if plan == "basic" {
                let gb = Decimal::from(part.iter().map(|e| e.bytes).sum::<u64>()) / d("1000000000");
                let included_gb = Decimal::from(share(1_000_000)) / d("1000000000");
                let over_gb = (gb - included_gb).max(Decimal::ZERO);
                if over_gb > Decimal::ZERO {
                    let amount = over_gb * d("0.09");
                    want_lines.push((plan.to_string(), "data_transfer_gb".into(), amount));
                    want_total += amount;
                }
                let cu = Decimal::from(units(&part));
                if cu > Decimal::ZERO {
                    let amount = cu * d("0.0001");
                    want_lines.push((plan.to_string(), "compute_units".into(), amount));
                    want_total += amount;
                }
            }
        }
        assert_eq!(
            b["billable_requests"].as_u64().unwrap(),
            billable,
            "{client}"
        );
        let mut got_lines: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for l in r["lines"].as_array().unwrap() {
            *got_lines
                .entry((
                    l["plan_id"].as_str().unwrap().into(),
                    l["metric"].as_str().unwrap().into(),
                ))
                .or_default() += d(l["amount"].as_str().unwrap());
            assert_eq!(
                d(l["quantity"].as_str().unwrap()) * d(l["unit_price"].as_str().unwrap()),
                d(l["amount"].as_str().unwrap())
            );
        }
        let want_map: BTreeMap<(String, String), Decimal> = want_lines
            .into_iter()
            .map(|(p, m, a)| ((p, m), a))
            .collect();
        assert_eq!(got_lines, want_map, "{client}");
        assert_eq!(
            d(r["total_amount"].as_str().unwrap()),
            want_total,
            "{client}"
        );
        assert_eq!(r["currency"], "USD");
    }
    let switched_report: Value = serde_json::from_slice(&first_bytes[switched]).unwrap();
    assert_eq!(switched_report["plan_id"], "pro");
    assert_eq!(switched_report["plans"].as_array().unwrap().len(), 2);

    // CSV: the same lines, one row each, under the documented header.
    let csv = c
        .get(server.url(&format!(
            "/v1/clients/{}/reports/billing?period=2026-01-15",
            encode_path(steady)
        )))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.unwrap();
    let rows: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        rows[0],
        "client_id,plan_id,billing_period_start,billing_period_end,status,currency,description,metric,line_from,line_to,quantity,unit_price,amount"
    );
    let steady_report: Value = serde_json::from_slice(&first_bytes[steady]).unwrap();
    assert_eq!(
        rows.len() - 1,
        steady_report["lines"].as_array().unwrap().len()
    );
    // The awkward id is quoted, its quotes doubled.
    assert!(
        rows[1].starts_with("\"ünï-client, \"\"quoted\"\"\",basic,"),
        "{}",
        rows[1]
    );
    let csv_total: Decimal = rows[1..]
        .iter()
        .map(|r| d(r.rsplit(',').next().unwrap()))
        .sum();
    assert_eq!(
        csv_total,
        d(steady_report["total_amount"].as_str().unwrap())
    );

    // Every client at once: each line is that client's own report, byte
    // for byte; only clients with usage in the period.
    let all = export(&c, &server, "period=2026-01-15").await;
    assert_eq!(
        all,
        first_bytes
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    );
    let december = export(&c, &server, "period=2025-12-15").await;
    // December closed as the export reached it: asked again, the stored
    // bytes.
    assert_eq!(export(&c, &server, "period=2025-12-15").await, december);
    for (client, bytes) in &december {
        assert_eq!(
            &report_bytes(&c, &server, client, "period=2025-12-15").await,
            bytes
        );
    }
    assert_eq!(december.keys().map(String::as_str).collect::<Vec<_>>(), {
        let mut want = vec![steady, december_only];
        want.sort();
        want
    });
    // Resumed one client at a time from the last record's client_id: the
    // same clients, none twice.
    let mut paged = BTreeMap::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = match &cursor {
            Some(c) => format!("period=2026-01-15&limit=1&cursor={}", encode_path(c)),
            None => "period=2026-01-15&limit=1".to_string(),
        };
        let page = export_lines(&c, &server, &q).await;
        assert!(page.len() <= 1);
        let Some((client, bytes)) = page.into_iter().next() else {
            break;
        };
        assert!(
            paged.insert(client.clone(), bytes).is_none(),
            "{client} twice"
        );
        cursor = Some(client);
    }
    assert_eq!(paged, all);
    // CSV: the per-client rows of every client, under one header.
    let r = c
        .get(server.url("/v1/reports/billing?period=2026-01-15"))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let text = r.text().await.unwrap();
    let mut got: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert!(got.remove(0).starts_with("client_id,plan_id,"));
    let mut want = Vec::new();
    for (client, _) in clients {
        let one = c
            .get(server.url(&format!(
                "/v1/clients/{}/reports/billing?period=2026-01-15&format=csv",
                encode_path(client)
            )))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        want.extend(
            one.split("\r\n")
                .skip(1)
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    for bad in ["period=2026-13-40", "format=xml", "limit=0", "nonsense=1"] {
        let r = c
            .get(server.url(&format!("/v1/reports/billing?{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    // Late events for January (the partitions are in February by now), a
    // replay of the whole month and a restart: the closed reports do not
    // move by a byte.
    let feb = Ev {
        client: switched.into(),
        endpoint: "/v1/orders/{id}",
        status: 200,
        bytes: 1,
        units: None,
        ts: ms("2026-02-20T00:00:00Z"),
    };
    let mut later: Vec<(usize, Ev)> = clients
        .iter()
        .enumerate()
        .map(|(i, (client, _))| {
            (
                900_000 + i,
                Ev {
                    client: client.to_string(),
                    ..feb.clone()
                },
            )
        })
        .collect();
    later.push((
        900_100,
        Ev {
            ts: ms("2026-01-20T00:00:00Z"),
            ..feb.clone()
        },
    ));
    let v = ingest(&c, &server, &later).await;
    assert_eq!(v["late"], 1, "{v}");
    // The late event is not lost: booked from the dead letters as an
    // adjustment, once, into the open period (under the plan then: pro).
    let adjustments = server.url(&format!(
        "/v1/clients/{}/adjustments",
        encode_path(switched)
    ));
    let booking = json!({"reason": "late January traffic", "from_dead_letters": true});
    let r = c.post(&adjustments).json(&booking).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let booked: Value = r.json().await.unwrap();
    assert_eq!(
        (booked["requests"].as_u64(), booked["dead_letters"].as_u64()),
        (Some(1), Some(1)),
        "{booked}"
    );
    let again = c.post(&adjustments).json(&booking).send().await.unwrap();
    assert_eq!(again.status(), 400, "booked once");
    let both = c
        .post(&adjustments)
        .json(&json!({"reason": "x", "from_dead_letters": true, "requests": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 400);
    let current: Value =
        serde_json::from_slice(&report_bytes(&c, &server, switched, "period=current").await)
            .unwrap();
    assert_eq!(current["status"], "open");
    assert_eq!(
        current["adjustments"].as_array().unwrap().len(),
        1,
        "{current}"
    );
    assert_eq!(
        current["adjustments"][0]["adjustment_id"],
        booked["adjustment_id"]
    );
    let line = current["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["description"]
                .as_str()
                .unwrap()
                .starts_with("adjustment ")
        })
        .unwrap();
    assert_eq!(
        (line["metric"].as_str(), line["plan_id"].as_str()),
        (Some("requests"), Some("pro"))
    );
    assert_eq!(d(line["amount"].as_str().unwrap()), d("0.001"));
    for chunk in numbered.chunks(2000) {
        ingest(&c, &server, chunk).await;
    }
    for (client, bytes) in &first_bytes {
        assert_eq!(
            &report_bytes(&c, &server, client, "period=2026-01-15").await,
            bytes
        );
    }
    server.stop();
    let server = Server::start(&data, &[]);
    for (client, bytes) in &first_bytes {
        assert_eq!(
            &report_bytes(&c, &server, client, "period=2026-01-01T00:00:00Z").await,
            bytes
        );
    }
    assert_eq!(export(&c, &server, "period=2026-01-15").await, all);
    server.stop();
}

/// The export's records, by client, in the order given (and none twice).
async fn export_lines(c: &reqwest::Client, server: &Server, q: &str) -> Vec<(String, Vec<u8>)> {
    let r = c
        .get(server.url(&format!("/v1/reports/billing?{q}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{q}");
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let body = r.bytes().await.unwrap();
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let v: Value = serde_json::from_slice(line).unwrap();
            (v["client_id"].as_str().unwrap().to_string(), line.to_vec())
        })
        .collect()
}

async fn export(c: &reqwest::Client, server: &Server, q: &str) -> BTreeMap<String, Vec<u8>> {
    let lines = export_lines(c, server, q).await;
    let n = lines.len();
    let map: BTreeMap<String, Vec<u8>> = lines.into_iter().collect();
    assert_eq!(map.len(), n, "a client twice in {q}");
    map
}

#[tokio::test]
async fn periods_follow_the_reset_day_and_the_clients_zone_across_dst() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let c = client();
    put(&c, server.url("/v1/plans/basic"), basic()).await;
    // A zone that observes DST: Berlin, across March 29 2026 (02:00 CET
    // becomes 03:00 CEST).
    let r = c
        .put(server.url("/v1/clients/berlin/plan"))
        .json(&json!({"plan_id": "basic", "effective_from": 0, "time_zone": "Mars/Base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    put(
        &c,
        server.url("/v1/clients/berlin/plan"),
        json!({"plan_id": "basic", "effective_from": 0, "time_zone": "Europe/Berlin"}),
    )
    .await;
    // A reset day of 31: February's period ends on the 28th.
    put(
        &c,
        server.url("/v1/clients/feb/quota"),
        json!({"monthly_request_limit": 1_000_000, "reset_day": 31}),
    )
    .await;

    let mut events = vec![];
    // Berlin: one event every 20 minutes from March 27 to April 2 (UTC).
    let mut t = ms("2026-03-27T00:00:00Z");
    while t < ms("2026-04-02T00:00:00Z") {
        events.push(Ev {
            client: "berlin".into(),
            endpoint: "/v1/orders/{id}",
            status: 200,
            bytes: 1,
            units: None,
            ts: t,
        });
        t += 20 * MINUTE;
    }
    for ts in [
        "2026-01-30T23:59:59.999Z",
        "2026-01-31T00:00:00Z",
        "2026-02-27T23:59:59.999Z",
        "2026-02-28T00:00:00Z",
    ] {
        events.push(Ev {
            client: "feb".into(),
            endpoint: "/x",
            status: 200,
            bytes: 1,
            units: None,
            ts: ms(ts),
        });
    }
    events.sort_by_key(|e| e.ts);
    let numbered: Vec<(usize, Ev)> = events.iter().cloned().enumerate().collect();
    let v = ingest(&c, &server, &numbered).await;
    assert_eq!(
        v["accepted"].as_u64().unwrap() as usize,
        events.len(),
        "{v}"
    );

    let feb: Value =
        serde_json::from_slice(&report_bytes(&c, &server, "feb", "period=2026-02-10").await)
            .unwrap();
    assert_eq!(feb["billing_period_start"], "2026-01-31T00:00:00.000Z");
    assert_eq!(feb["billing_period_end"], "2026-02-28T00:00:00.000Z");
    assert_eq!(feb["summary"]["total_requests"], 2);
    assert_eq!(feb["daily_trend"].as_array().unwrap().len(), 28);

    let berlin: Value =
        serde_json::from_slice(&report_bytes(&c, &server, "berlin", "period=2026-03-15").await)
            .unwrap();
    assert_eq!(berlin["time_zone"], "Europe/Berlin");
    // Local midnights: 00:00 CET on March 1, 00:00 CEST on April 1.
    assert_eq!(berlin["billing_period_start"], "2026-02-28T23:00:00.000Z");
    assert_eq!(berlin["billing_period_end"], "2026-03-31T22:00:00.000Z");
    let tz = chrono_tz::Europe::Berlin;
    let local_date = |ts: i64| {
        tz.timestamp_millis_opt(ts)
            .unwrap()
            .date_naive()
            .to_string()
    };
    let (start, end) = (ms("2026-02-28T23:00:00Z"), ms("2026-03-31T22:00:00Z"));
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.client == "berlin" && e.ts >= start && e.ts < end)
    {
        *want.entry(local_date(e.ts)).or_default() += 1;
    }
    let days = berlin["daily_trend"].as_array().unwrap();
    assert_eq!(days.len(), 31);
    for day in days {
        let date = day["date"].as_str().unwrap();
        assert_eq!(
            day["requests"].as_u64().unwrap(),
            want.get(date).copied().unwrap_or(0),
            "{date}"
        );
    }
    // The short day: 23 hours of events every 20 minutes.
    let short = days.iter().find(|d| d["date"] == "2026-03-29").unwrap();
    assert_eq!(short["requests"], 69);
    assert_eq!(short["start"], "2026-03-28T23:00:00.000Z");
    let total: u64 = want.values().sum();
    assert_eq!(berlin["summary"]["total_requests"].as_u64().unwrap(), total);
    server.stop();
}
