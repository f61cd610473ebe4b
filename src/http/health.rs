//! Liveness, readiness, detail, and Prometheus metrics.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics::gauge;
use serde_json::json;
use tally_actors::telemetry::{MailboxDepth, ROCKSDB_SIZE};
use tally_pipelines::time::format_rfc3339_ms;
use tally_state::retention::wall_clock_ms;

use super::AppState;
use crate::error::ApiError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/detailed", get(detailed))
        .route("/metrics", get(metrics))
}

async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

/// Why the instance is not ready, if it is not: starting or stopping, a
/// shard whose flushes keep failing across restarts (its circuit is
/// tripped; see `tally_actors::status`), or a shard stopped because its
/// state cannot be read.
fn not_ready_reason(state: &AppState) -> Option<String> {
    if !state.ready.load(Ordering::Relaxed) {
        return Some("starting or shutting down".into());
    }
    if let Some(kafka) = &state.kafka_health {
        let view = kafka.view();
        if let Some(reason) = view.partitioning.not_ready_reason() {
            return Some(reason);
        }
        let grace_ms =
            i64::try_from(state.config.kafka_outage_grace.as_millis()).unwrap_or(i64::MAX);
        // Holds are timed by the wall clock, as the source stamps them.
        if let Some(reason) = view.held_reason(wall_clock_ms(), grace_ms) {
            return Some(reason);
        }
        if let Some(since) = view.down_since_ms {
            let down_for = state.config.clock.now_ms().saturating_sub(since);
            if down_for > grace_ms {
                return Some(format!(
                    "no Kafka broker reachable for {} s ({}); queries still answer from local state",
                    down_for / 1000,
                    view.last_error.unwrap_or_else(|| "not connected".into())
                ));
            }
        }
    }
    let tripped: Vec<String> = state
        .shards
        .health()
        .into_iter()
        .enumerate()
        .filter_map(|(p, h)| {
            let reason = h.reason()?;
            // A stopped shard's reason already names its partition.
            Some(if reason.starts_with("partition ") {
                reason
            } else {
                format!("partition {p}: {reason}")
            })
        })
        .collect();
    (!tripped.is_empty()).then(|| tripped.join("; "))
}

async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    match not_ready_reason(&state) {
        None => Ok(Json(json!({"status": "ready"}))),
        Some(reason) => Err(ApiError::Unavailable(format!("not ready: {reason}"))),
    }
}

async fn detailed(State(state): State<AppState>) -> impl IntoResponse {
    let partitions: Vec<_> = state
        .shards
        .health()
        .into_iter()
        .enumerate()
        .map(|(p, h)| {
            json!({
                "partition": p,
                "mailbox_depth": h.queued,
                "mailbox_capacity": state.config.mailbox_capacity,
                "max_event_time": state.store.partition_clock(p as u16).map(format_rfc3339_ms),
                "restarts": h.restarts,
                "consecutive_flush_failures": h.consecutive_failures,
                "last_error": h.last_error,
                "stopped": h.fatal,
                "durable_before": h.durable_before_ms.map(format_rfc3339_ms),
                "durable_before_ms": h.durable_before_ms,
            })
        })
        .collect();
    let reason = not_ready_reason(&state);
    let status = match reason {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        Json(json!({
            "status": if reason.is_none() { "ready" } else { "not_ready" },
            "reason": reason,
            "kafka": state.kafka_health.as_ref().map(|k| {
                let v = k.view();
                json!({
                    "connected": v.connected,
                    "down_since": v.down_since_ms.map(format_rfc3339_ms),
                    "last_error": v.last_error,
                    "consumer_lag": v.lag,
                    "partitioning": v.partitioning,
                    "held_partitions": v.held.iter().map(|((topic, p), h)| json!({
                        "topic": topic,
                        "partition": p,
                        "offset": h.offset,
                        "since": format_rfc3339_ms(h.since_ms),
                        "reason": h.reason,
                    })).collect::<Vec<_>>(),
                })
            }),
            "cluster": state.membership.as_ref().map(|m| json!({
                "address": m.address(),
                "owned_partitions": m.owned(),
            })),
            "storage": {"engine": "rocksdb", "data_dir": state.config.data_dir, "size_bytes": state.store.size_bytes()},
            "partitions": partitions,
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    gauge!(ROCKSDB_SIZE).set(state.store.size_bytes() as f64);
    for (shard, depth) in state.shards.mailbox_depths().into_iter().enumerate() {
        MailboxDepth {
            shard: shard as u16,
            depth,
        }
        .emit();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}
