//! One webhook's delivery task: follows the alert log from the webhook's
//! cursor, delivers matching events one at a time and in order, retries
//! each until it is delivered (or refused for good, or overflows), and
//! asks the circuit breaker before every attempt.
//!
//! Requests are `POST`s of `{idempotency_key, webhook_id, attempt, event}`
//! with `X-Tally-Signature: sha256=<hex>`, the HMAC-SHA256 of
//! `"<X-Tally-Timestamp>.<body>"` under the webhook's secret (the
//! timestamp is signed so that a captured request cannot be replayed
//! later with a fresh one).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use metrics::{counter, gauge};
use serde::Serialize;
use sha2::Sha256;
use tally_actors::alerts::{AlertEvent, AlertLog};
use tally_actors::telemetry::{
    WEBHOOK_ATTEMPTS, WEBHOOK_CIRCUIT_STATE, WEBHOOK_CIRCUIT_TRANSITIONS, WEBHOOK_DELIVERIES,
    WEBHOOK_OVERFLOW, WEBHOOK_PENDING,
};
use tally_pipelines::circuit::{backoff_ms, Circuit, CircuitState, Outcome, Transition};
use tally_pipelines::time::format_rfc3339_ms;
use tally_state::Store;

use super::egress::{EgressPolicy, PublicOnlyResolver, ResolveFailure};
use super::{sink_name, SinkCursor, WebhookConfig, WebhookStatus};

/// The status's reason for a delivery the egress policy refused.
pub const REFUSED_NOT_PUBLIC: &str = "refused: destination address is not public";

/// Log entries read per step.
const BATCH: usize = 256;

pub struct Delivery {
    pub id: String,
    pub config: WebhookConfig,
    pub store: Arc<Store>,
    pub alerts: Arc<AlertLog>,
    pub client: reqwest::Client,
    /// Checks IP-literal URLs (the client's resolver checks names).
    pub egress: Arc<EgressPolicy>,
    pub status: Arc<Mutex<WebhookStatus>>,
}

#[derive(Serialize)]
struct Payload<'a> {
    idempotency_key: String,
    webhook_id: &'a str,
    attempt: u32,
    event: &'a AlertEvent,
}

/// How one event ended for this webhook.
enum Done {
    Delivered,
    Rejected,
    /// Skipped: the backlog passed `max_pending` while it was retried.
    Overflowed,
}

pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The client every webhook delivers with: it connects only where
/// `egress` permits.
pub fn client(egress: &Arc<EgressPolicy>) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("tally-webhooks/", env!("CARGO_PKG_VERSION")))
        // A redirect's target is a destination nobody checked: a 3xx is a
        // failed attempt.
        .redirect(reqwest::redirect::Policy::none())
        // Through a proxy the proxy would resolve and connect, and the
        // resolver would judge only the proxy's address.
        .no_proxy()
        .dns_resolver(Arc::new(PublicOnlyResolver {
            policy: egress.clone(),
        }))
        .build()
}

/// The status's reason for an answer that is not a success.
fn answered(status: reqwest::StatusCode) -> String {
    if status.is_redirection() {
        format!("answered {status} (redirects are not followed)")
    } else {
        format!("answered {status}")
    }
}

/// The cause after `e`: an `io::Error` wrapping another error is followed
/// into it (its `source` skips the wrapped error itself).
fn cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return Some(inner);
    }
    e.source()
}

/// What the webhook's status says about an attempt that got no answer: a
/// short class, never the error's text, which can carry the addresses a
/// name resolved to and the OS's messages (the log has those).
fn failure_reason(err: &reqwest::Error) -> &'static str {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(failure) = e.downcast_ref::<ResolveFailure>() {
            return match failure {
                ResolveFailure::NotPublic { .. } => REFUSED_NOT_PUBLIC,
                ResolveFailure::Lookup { .. } => "DNS lookup failed",
            };
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return "TLS error";
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused => return "connection refused",
                K::ConnectionReset | K::ConnectionAborted => return "connection reset",
                K::TimedOut => return "timed out",
                _ => {}
            }
        }
        next = cause(e);
    }
    if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}

/// Every message in an error's chain, for the log.
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut next = cause(err);
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = cause(e);
    }
    text
}

impl Delivery {
    fn matches(&self, e: &AlertEvent) -> bool {
        (self.config.event_types.is_empty() || self.config.event_types.contains(&e.event_type))
            && (self.config.client_ids.is_empty() || self.config.client_ids.contains(&e.client_id))
    }

    fn update(&self, f: impl FnOnce(&mut WebhookStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    fn cursor(&self) -> SinkCursor {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).cursor
    }

    /// Moves the cursor (and counts) and stores it.
    fn advance(&self, f: impl FnOnce(&mut SinkCursor)) {
        let mut cursor = self.cursor();
        f(&mut cursor);
        if let Err(e) = self.store.put_sink_state(&sink_name(&self.id), &cursor) {
            tracing::error!(webhook = %self.id, error = %e, "cannot store the webhook cursor; it will redeliver after a restart");
        }
        let pending = self.alerts.last_id().saturating_sub(cursor.cursor);
        gauge!(WEBHOOK_PENDING, "webhook" => self.id.clone()).set(pending as f64);
        self.update(|s| {
            s.cursor = cursor;
            s.pending = pending;
        });
    }

    fn transition(&self, t: Transition) {
        let name = |s: CircuitState| match s {
            CircuitState::Closed => "CLOSED",
            CircuitState::Open => "OPEN",
            CircuitState::HalfOpen => "HALF_OPEN",
        };
        tracing::info!(webhook = %self.id, from = name(t.from), to = name(t.to), "webhook circuit changed");
        counter!(WEBHOOK_CIRCUIT_TRANSITIONS, "webhook" => self.id.clone(), "to" => name(t.to))
            .increment(1);
        let level = match t.to {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        };
        gauge!(WEBHOOK_CIRCUIT_STATE, "webhook" => self.id.clone()).set(level);
        self.update(|s| s.circuit_state = t.to);
        self.alerts.publish(
            "CIRCUIT_STATE_CHANGED",
            "",
            None,
            t.at_ms,
            serde_json::json!({"webhook_id": self.id, "from": name(t.from), "to": name(t.to)}),
        );
    }

    /// Whether the backlog has run past `max_pending` behind `cursor`.
    fn overflowing(&self, cursor: u64) -> bool {
        self.alerts.last_id().saturating_sub(cursor) > self.config.delivery.max_pending
    }

    /// Skips the oldest events until at most `max_pending` remain, counting
    /// the skipped ones this webhook would have received.
    fn drop_overflow(&self) {
        let mut cursor = self.cursor().cursor;
        let keep_from = self
            .alerts
            .last_id()
            .saturating_sub(self.config.delivery.max_pending);
        let mut skipped = 0u64;
        while cursor < keep_from {
            let Ok(batch) = self.alerts.after(cursor, BATCH) else {
                break;
            };
            if batch.is_empty() {
                break;
            }
            for e in batch {
                if e.event_id > keep_from {
                    break;
                }
                cursor = e.event_id;
                skipped += u64::from(self.matches(&e));
            }
        }
        if skipped > 0 {
            tracing::warn!(webhook = %self.id, skipped, "webhook backlog over max_pending; oldest events skipped");
            counter!(WEBHOOK_OVERFLOW, "webhook" => self.id.clone()).increment(skipped);
        }
        self.advance(|c| {
            c.cursor = c.cursor.max(cursor);
            c.overflowed += skipped;
        });
    }

    async fn attempt(&self, e: &AlertEvent, attempt: u32) -> (Outcome, Option<String>) {
        let url = match reqwest::Url::parse(&self.config.url) {
            Ok(url) => url,
            Err(_) => return (Outcome::ConnectionFailed, Some("invalid URL".into())),
        };
        // Configurations are checked when made, but one stored before the
        // check, or from another instance's control record, may not be.
        if self.egress.refuses_literal(&url) {
            tracing::warn!(webhook = %self.id, "webhook delivery refused: the URL's address is not public and not in webhook_allow");
            return (
                Outcome::ConnectionFailed,
                Some(REFUSED_NOT_PUBLIC.to_string()),
            );
        }
        let payload = Payload {
            idempotency_key: format!("{}:{}", self.id, e.event_id),
            webhook_id: &self.id,
            attempt,
            event: e,
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(b) => b,
            Err(err) => return (Outcome::ConnectionFailed, Some(err.to_string())),
        };
        let timestamp = (self.store.clock().now_ms() / 1000).to_string();
        let started = Instant::now();
        let sent = self
            .client
            .post(url)
            .timeout(Duration::from_millis(self.config.delivery.timeout_ms))
            .header("content-type", "application/json")
            .header("idempotency-key", &payload.idempotency_key)
            .header("x-tally-event-id", e.event_id.to_string())
            .header("x-tally-timestamp", &timestamp)
            .header(
                "x-tally-signature",
                signature(&self.config.secret, &timestamp, &body),
            )
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) => (
                Outcome::Answered {
                    status: r.status().as_u16(),
                    latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                },
                (!r.status().is_success()).then(|| answered(r.status())),
            ),
            Err(err) => {
                let reason = failure_reason(&err);
                // The full error is the operator's (the log), the class the
                // admin's (the status).
                if reason == REFUSED_NOT_PUBLIC {
                    tracing::warn!(webhook = %self.id, error = %error_chain(&err), "webhook delivery refused");
                } else {
                    tracing::debug!(webhook = %self.id, error = %error_chain(&err), "webhook delivery failed");
                }
                let outcome = if err.is_timeout() {
                    Outcome::TimedOut
                } else {
                    Outcome::ConnectionFailed
                };
                (outcome, Some(reason.to_string()))
            }
        }
    }

    /// Delivers one event, retrying until it is done.
    async fn deliver(&self, e: &AlertEvent, circuit: &mut Circuit) -> Done {
        let cfg = &self.config;
        let mut attempt: u32 = 0;
        loop {
            if self.overflowing(e.event_id.saturating_sub(1)) {
                return Done::Overflowed;
            }
            let now = self.store.clock().now_ms();
            let (allowed, transition) = circuit.try_acquire(&cfg.circuit, now);
            if let Some(t) = transition {
                self.transition(t);
            }
            if !allowed {
                // Open: wait out the reset timeout (bounded, so that
                // overflow is noticed); half-open with probes busy: soon.
                let wait = (circuit.next_attempt_ms(&cfg.circuit, now) - now).clamp(10, 1_000);
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                continue;
            }
            attempt += 1;
            let (outcome, error) = self.attempt(e, attempt).await;
            if let Some(t) = circuit.record(
                &cfg.circuit,
                &cfg.failure,
                &outcome,
                self.store.clock().now_ms(),
            ) {
                self.transition(t);
            }
            let status = match outcome {
                Outcome::Answered { status, .. } => Some(status),
                _ => None,
            };
            let result = match status {
                Some(200..=299) => "delivered",
                Some(408 | 429) | None => "failed",
                Some(400..=499) => "rejected",
                Some(_) => "failed",
            };
            counter!(WEBHOOK_ATTEMPTS, "webhook" => self.id.clone(), "result" => result)
                .increment(1);
            match result {
                "delivered" => {
                    self.update(|s| {
                        s.last_delivered_at = Some(format_rfc3339_ms(self.store.clock().now_ms()))
                    });
                    return Done::Delivered;
                }
                "rejected" => {
                    tracing::warn!(webhook = %self.id, event_id = e.event_id, error = ?error, "webhook refused an event; not retried");
                    self.update(|s| s.last_error = error);
                    return Done::Rejected;
                }
                _ => {
                    self.update(|s| {
                        s.failed_attempts += 1;
                        s.last_error = error;
                    });
                    let wait = backoff_ms(
                        attempt.saturating_sub(1),
                        cfg.delivery.initial_backoff_ms,
                        cfg.delivery.max_backoff_ms,
                        rand::random::<f64>(),
                    );
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }
}

/// The delivery loop (runs until the webhook is deleted or replaced).
pub async fn run(d: Delivery) {
    if !d.config.enabled {
        return;
    }
    let mut follower = d.alerts.follow();
    let mut circuit = Circuit::default();
    loop {
        if d.overflowing(d.cursor().cursor) {
            d.drop_overflow();
        }
        let cursor = d.cursor().cursor;
        let batch = follower.next_batch(cursor, BATCH).await;
        if batch.is_empty() {
            continue;
        }
        // Ids missing after the cursor were removed by retention.
        if let Some(first) = batch.first() {
            let gap = first.event_id.saturating_sub(cursor + 1);
            if gap > 0 && cursor > 0 {
                counter!(WEBHOOK_OVERFLOW, "webhook" => d.id.clone()).increment(gap);
                d.advance(|c| c.overflowed += gap);
            }
        }
        // Events this webhook does not take move the cursor once per
        // batch (or with the next delivery), not one write each.
        let mut passed_over = None;
        for e in batch {
            if !d.matches(&e) {
                passed_over = Some(e.event_id);
                continue;
            }
            passed_over = None;
            let done = d.deliver(&e, &mut circuit).await;
            let outcome = match done {
                Done::Delivered => "delivered",
                Done::Rejected => "rejected",
                Done::Overflowed => "overflowed",
            };
            counter!(WEBHOOK_DELIVERIES, "webhook" => d.id.clone(), "outcome" => outcome)
                .increment(1);
            if let Done::Overflowed = done {
                d.drop_overflow();
                break;
            }
            d.advance(|c| {
                c.cursor = e.event_id;
                match done {
                    Done::Delivered => c.delivered += 1,
                    Done::Rejected => c.rejected += 1,
                    Done::Overflowed => {}
                }
            });
        }
        if let Some(id) = passed_over {
            d.advance(|c| c.cursor = c.cursor.max(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason `client(allow)` gives for a `POST` to `url`.
    async fn reason_for(allow: &str, url: &str) -> &'static str {
        let egress = Arc::new(EgressPolicy::parse(allow).unwrap());
        let err = client(&egress)
            .unwrap()
            .post(url)
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("the request must fail");
        failure_reason(&err)
    }

    #[tokio::test]
    async fn failures_are_shown_as_a_short_class_without_addresses() {
        // A port nothing listens on (bound, then let go).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert_eq!(
            reason_for("127.0.0.1/32", &format!("http://127.0.0.1:{closed_port}/")).await,
            "connection refused"
        );
        // A name that resolves only to loopback, not allowed.
        assert_eq!(
            reason_for("", &format!("http://localhost:{closed_port}/")).await,
            REFUSED_NOT_PUBLIC
        );
        // A listener that never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}/", silent.local_addr().unwrap());
        assert_eq!(reason_for("127.0.0.1/32", &silent_url).await, "timed out");
        // HTTPS to a server that speaks plain HTTP: the handshake fails.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_url = format!("https://{}/", plain.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = plain.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        assert_eq!(reason_for("127.0.0.1/32", &plain_url).await, "TLS error");
        drop(silent);
    }

    #[test]
    fn signature_matches_an_independently_computed_hmac() {
        // python3: hmac.new(b"whsec-0123456789abcdef",
        //   b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
        assert_eq!(
            signature("whsec-0123456789abcdef", "1700000000", br#"{"a":1}"#),
            "sha256=d77c78ac4da074c56908b55eac30358b2a7bfc573be4c76819af5102e8dcf939"
        );
    }
}
