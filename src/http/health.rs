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

async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.ready.load(Ordering::Relaxed) {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(ApiError::Unavailable(
            "not ready: starting or shutting down".into(),
        ))
    }
}

async fn detailed(State(state): State<AppState>) -> impl IntoResponse {
    let depths = state.shards.mailbox_depths();
    let partitions: Vec<_> = depths
        .iter()
        .enumerate()
        .map(|(p, depth)| {
            let clock = state.store.partition_clock(p as u16);
            json!({
                "partition": p,
                "mailbox_depth": depth,
                "mailbox_capacity": state.config.mailbox_capacity,
                "max_event_time": clock.map(format_rfc3339_ms),
            })
        })
        .collect();
    let ready = state.ready.load(Ordering::Relaxed);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
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
