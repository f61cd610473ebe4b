//! `POST /v1/events`: decode, validate, route to shards, and answer 202
//! only once the accepted events are durable in RocksDB.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use metrics::histogram;
use serde::Serialize;
use tally_actors::telemetry::{EventsRejected, BATCH_DURATION};
use tally_actors::Source;
use tally_pipelines::decode::{decode_body, BodyFormat};
use tally_state::retention::wall_clock_ms;

use super::AppState;
use crate::config::Config;
use crate::error::ApiError;

pub fn router(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/v1/events", post(ingest))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
}

#[derive(Debug, Serialize)]
pub struct IngestError {
    pub index: usize,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct IngestResponse {
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub late: u64,
    pub errors: Vec<IngestError>,
    /// Present when more events were rejected than `errors` lists.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub errors_truncated: bool,
}

async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IngestResponse>), ApiError> {
    let started = Instant::now();
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.config.max_body_bytes,
            }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"), vec![])
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("invalid"))
        .map(str::to_string);
    let format = BodyFormat::from_content_type(content_type.as_deref(), &body)
        .map_err(|e| ApiError::UnsupportedMediaType(e.to_string()))?;
    let ctx = state.config.validation(wall_clock_ms());
    // Decoding a large body is CPU work; keep it off the async workers.
    let decoded = tokio::task::spawn_blocking(move || decode_body(format, &body, &ctx))
        .await
        .map_err(|e| ApiError::Internal(format!("decoder task failed: {e}")))?
        .map_err(|e| ApiError::bad_request(e.to_string(), vec![]))?;

    let rejected = decoded.rejected.len() as u64;
    EventsRejected {
        source: "http",
        count: rejected,
    }
    .emit();
    let outcome = if decoded.events.is_empty() {
        Default::default()
    } else if let Some(kafka) = &state.kafka_ingest {
        // Kafka mode: durable once the broker acknowledged every event;
        // duplicates and lateness are judged when they are consumed.
        let produced = kafka
            .produce(&decoded.events)
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot produce to Kafka: {e}")))?;
        tally_actors::BatchOutcome {
            accepted: produced,
            ..Default::default()
        }
    } else {
        state
            .shards
            .ingest_durable(decoded.events, Source::Http)
            .await?
    };
    let limit = state.config.max_errors_reported;
    let errors = decoded
        .rejected
        .iter()
        .take(limit)
        .map(|(index, reason)| IngestError {
            index: *index,
            reason: reason.to_string(),
        })
        .collect();
    histogram!(BATCH_DURATION, "source" => "http").record(started.elapsed().as_secs_f64());
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestResponse {
            accepted: outcome.accepted,
            rejected,
            duplicates: outcome.duplicates,
            late: outcome.late,
            errors,
            errors_truncated: decoded.rejected.len() > limit,
        }),
    ))
}
