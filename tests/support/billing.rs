//! What the billing tests share: events with a plain JSON form, requests
//! that assert their answer, plans and prices worked by hand.

use std::str::FromStr;

use chrono::TimeZone;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_pipelines::time::parse_rfc3339_ms;

use super::{encode_path, Server};

pub fn ms(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap()
}

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[derive(Clone)]
pub struct Ev {
    pub client: String,
    pub endpoint: &'static str,
    pub status: u16,
    pub bytes: u64,
    pub units: Option<u64>,
    pub ts: i64,
}

impl Ev {
    pub fn json(&self, id: usize) -> String {
        let mut v = json!({
            "event_id": format!("e{id}"),
            "client_id": self.client,
            "endpoint": self.endpoint,
            "status": self.status,
            "request_bytes": self.bytes,
            "response_bytes": 0,
            "latency_ms": 12.5,
            "timestamp": self.ts,
        });
        if let Some(u) = self.units {
            v["compute_units"] = json!(u);
        }
        v.to_string()
    }
}

pub async fn put(c: &reqwest::Client, url: String, body: Value) -> Value {
    let r = c.put(url).json(&body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v
}

pub async fn ingest(c: &reqwest::Client, server: &Server, events: &[(usize, Ev)]) -> Value {
    let body: Vec<String> = events.iter().map(|(i, e)| e.json(*i)).collect();
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

pub async fn report_bytes(c: &reqwest::Client, server: &Server, client: &str, q: &str) -> Vec<u8> {
    let r = c
        .get(server.url(&format!(
            "/v1/clients/{}/reports/billing?{q}",
            encode_path(client)
        )))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let bytes = r.bytes().await.unwrap().to_vec();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    bytes
}

/// Graduated price of `q` over `(up_to, price)` tiers, by hand.
pub fn priced(q: Decimal, tiers: &[(Option<&str>, &str)]) -> Decimal {
    let mut left = q;
    let mut from = Decimal::ZERO;
    let mut total = Decimal::ZERO;
    for (up_to, price) in tiers {
        let width = up_to.map_or(left, |u| (d(u) - from).min(left));
        total += width * d(price);
        left -= width;
        from = up_to.map_or(from, d);
        if left.is_zero() {
            break;
        }
    }
    total
}

pub const BASIC_TIERS: [(Option<&str>, &str); 2] = [(Some("1000"), "0.01"), (None, "0.005")];

pub fn basic() -> Value {
    json!({
        "free_requests": 500,
        "included_data_transfer_bytes": 1_000_000,
        "compute_unit_weights": {"/v1/search": 5},
        "prices": {
            "requests": [{"up_to": 1000, "unit_price": "0.01"}, {"up_to": null, "unit_price": "0.005"}],
            "data_transfer_gb": [{"up_to": null, "unit_price": "0.09"}],
            "compute_units": [{"up_to": null, "unit_price": "0.0001"}]
        },
        "currency": "USD"
    })
}

pub fn pro() -> Value {
    json!({
        "free_requests": 3100,
        "compute_unit_weights": {"/v1/search": 2},
        "prices": {"requests": [{"up_to": null, "unit_price": "0.001"}]},
        "currency": "USD"
    })
}

/// The month before the one `now_ms` is in (UTC): `[start, end)`.
pub fn previous_month(now_ms: i64) -> (i64, i64) {
    use chrono::{Datelike, Months, Utc};
    let now = Utc.timestamp_millis_opt(now_ms).unwrap();
    let this = chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1).unwrap();
    let prev = this.checked_sub_months(Months::new(1)).unwrap();
    let at = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
    (at(prev), at(this))
}

pub async fn get_json(c: &reqwest::Client, url: String) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Wall time now, for `as_of`: the control log stamps changes with it.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
