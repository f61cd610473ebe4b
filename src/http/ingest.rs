//! `POST /v1/events`: decode, validate, route to shards, and answer 202
//! only once the accepted events are durable in RocksDB (or, in Kafka
//! mode, acknowledged by the broker).
//!
//! - Load shedding: at most `max_ingest_requests` bodies and
//!   `max_ingest_bytes` of body in flight; beyond, 503 with `Retry-After`
//!   before the body is read.
//! - A 503 after decoding says exactly which events were applied
//!   (`applied_indices`, `not_applied_indices`); when none were, it says so.
//! - `Idempotency-Key`: events without an `event_id` get one derived from
//!   the key, their position in the body and their content, so a body
//!   retried with the same key is applied once (within the de-duplication
//!   window), whether the first attempt was applied fully, partly or not.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use metrics::histogram;
use serde::Serialize;
use tally_actors::telemetry::{EventsRejected, IngestShed, BATCH_DURATION};
use tally_actors::{BatchOutcome, Source};
use tally_pipelines::decode::{decode_body_keeping, BodyFormat, DecodedBody};
use tally_pipelines::dedupe::derived_event_id;
use tally_pipelines::event::RequestEvent;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use crate::config::Config;
use crate::error::ApiError;

pub fn router(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/v1/events", post(ingest))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
}

/// Admission of ingest bodies (events and telemetry share it): a count
/// and a byte budget.
pub struct IngestGate {
    requests: Arc<Semaphore>,
    bytes: AtomicUsize,
    max_bytes: usize,
}

/// Held while a body is processed; gives its share back when dropped.
pub(crate) struct Admitted<'a> {
    gate: &'a IngestGate,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.gate.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl IngestGate {
    pub fn new(max_requests: usize, max_bytes: usize) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            bytes: AtomicUsize::new(0),
            max_bytes,
        }
    }

    fn admit(&self, bytes: usize) -> Result<Admitted<'_>, ApiError> {
        let shed = |what: &str| {
            IngestShed.emit();
            ApiError::Overloaded {
                detail: format!("too many ingest {what} in flight; retry shortly"),
                retry_after_secs: 1,
            }
        };
        let permit = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| shed("requests"))?;
        let before = self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.max_bytes && before > 0 {
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(shed("bytes"));
        }
        Ok(Admitted {
            gate: self,
            bytes,
            _permit: permit,
        })
    }
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

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The `Idempotency-Key` header, if sent: 1..=255 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES)
        .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid Idempotency-Key header",
                vec![crate::error::FieldProblem::field(
                    "Idempotency-Key",
                    format!("must be 1..={MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"),
                )],
            )
        })?;
    Ok(Some(key.to_string()))
}

/// Gives each event without an `event_id` one derived from the request's
/// idempotency key (see [`derived_event_id`]).
fn derive_event_ids(key: &str, decoded: &mut DecodedBody) {
    for (event, index) in decoded.events.iter_mut().zip(&decoded.indices) {
        if event.event_id.is_none() {
            event.event_id = Some(derived_event_id(key, *index, event));
        }
    }
}

/// An admitted ingest body, read whole, and its format.
pub(crate) struct IngestBody<'a> {
    pub _admitted: Admitted<'a>,
    pub bytes: axum::body::Bytes,
    pub format: BodyFormat,
}

/// Admits (or sheds) a body before reading it, reads it within the size
/// limit and picks its format: what every ingest route does first.
pub(crate) async fn read_ingest_body<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<IngestBody<'a>, ApiError> {
    let limit = state.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Before the body is read: a body of unknown length counts as the
    // largest allowed.
    let admitted = state.ingest_gate.admit(declared.unwrap_or(limit))?;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"), vec![])
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("invalid"))
        .map(str::to_string);
    let format = BodyFormat::from_content_type(content_type.as_deref(), &bytes)
        .map_err(|e| ApiError::UnsupportedMediaType(e.to_string()))?;
    Ok(IngestBody {
        _admitted: admitted,
        bytes,
        format,
    })
}

async fn ingest(
    State(state): State<AppState>,
    principal: Option<axum::Extension<std::sync::Arc<tally_pipelines::access::Principal>>>,
    origin: Option<axum::Extension<crate::access::Origin>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<IngestResponse>), ApiError> {
    let started = Instant::now();
    let key = idempotency_key(&headers)?;
    let IngestBody {
        _admitted,
        bytes: body,
        format,
    } = read_ingest_body(&state, &headers, body).await?;
    let ctx = state.config.validation(state.config.clock.now_ms());
    let keep = state.config.max_errors_reported;
    // Decoding a large body is CPU work; keep it off the async workers.
    let mut decoded = tokio::task::spawn_blocking(move || {
        decode_body_keeping::<RequestEvent>(format, &body, &ctx, keep)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoder task failed: {e}")))?
    .map_err(|e| ApiError::bad_request(e.to_string(), vec![]))?;
    // A key limited to some clients posts for those only; one event for
    // another refuses the whole body, before anything is applied.
    if let Some(p) = principal
        .as_ref()
        .map(|p| &p.0)
        .filter(|p| !p.all_clients())
    {
        let origin = origin.as_ref().map(|o| &o.0);
        for event in &decoded.events {
            super::auth::permit_client(&state, Some(p), origin, "/v1/events", &event.client_id)?;
        }
    }
    if let Some(key) = &key {
        derive_event_ids(key, &mut decoded);
    }
    EventsRejected {
        source: "http",
        count: decoded.rejected_total,
    }
    .emit();
    let indices = std::mem::take(&mut decoded.indices);
    let outcome = if decoded.events.is_empty() {
        BatchOutcome::default()
    } else if let Some(kafka) = &state.kafka_ingest {
        produce_to_kafka(kafka, &decoded.events, &indices, key.is_some()).await?
    } else {
        let events: Vec<RequestEvent> = std::mem::take(&mut decoded.events);
        ingest_shards(&state, events, &indices, key.is_some()).await?
    };
    let errors = reported_errors(&decoded);
    histogram!(BATCH_DURATION, "source" => "http").record(started.elapsed().as_secs_f64());
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestResponse {
            accepted: outcome.accepted,
            rejected: decoded.rejected_total,
            duplicates: outcome.duplicates,
            late: outcome.late,
            errors,
            errors_truncated: decoded.rejected_total > decoded.rejected.len() as u64,
        }),
    ))
}

/// Kafka mode: produced to the item's topic, durable once the broker
/// acknowledged each; duplicates and lateness are judged when they are
/// consumed. A broker that did not take some makes the answer the 503 of
/// [`not_applied`].
pub(crate) async fn produce_to_kafka<T: tally_actors::kafka::decode::FeedItem>(
    kafka: &tally_actors::kafka::ingest::KafkaIngest,
    items: &[T],
    indices: &[usize],
    keyed: bool,
) -> Result<BatchOutcome, ApiError> {
    let produced = kafka.produce(items).await;
    if let Some(error) = produced.first_error {
        // The broker's error is the operator's (the log).
        tracing::error!(error = %error, "producing ingested items to Kafka failed");
        return Err(not_applied(
            indices,
            |i| produced.delivered[i],
            "the Kafka broker did not take them".to_string(),
            keyed,
        ));
    }
    Ok(BatchOutcome {
        accepted: produced.delivered.len() as u64,
        ..Default::default()
    })
}

/// Applies decoded items on their shards and answers once durable; a
/// partition that applied nothing makes the whole answer the 503 of
/// [`not_applied`] (`indices`: each item's position in the body).
pub(crate) async fn ingest_shards<T: tally_actors::messages::Routable>(
    state: &AppState,
    items: Vec<T>,
    indices: &[usize],
    keyed: bool,
) -> Result<BatchOutcome, ApiError> {
    let ingested = state
        .shards
        .ingest_durable_parts(items, Source::Http)
        .await?;
    if let Some(first) = ingested.failed.first() {
        let mut failed = vec![false; indices.len()];
        for part in &ingested.failed {
            for &i in &part.positions {
                failed[i] = true;
            }
        }
        return Err(not_applied(
            indices,
            |i| !failed[i],
            first.error.to_string(),
            keyed,
        ));
    }
    Ok(ingested.outcome)
}

/// The rejections a body's answer lists, by index.
pub(crate) fn reported_errors<T>(decoded: &DecodedBody<T>) -> Vec<IngestError> {
    decoded
        .rejected
        .iter()
        .map(|(index, reason)| IngestError {
            index: *index,
            reason: reason.to_string(),
        })
        .collect()
}

/// The 503 of a body some or all of whose events were not applied: which
/// were (by their index in the body) and which were not.
pub(crate) fn not_applied(
    indices: &[usize],
    applied: impl Fn(usize) -> bool,
    cause: String,
    keyed: bool,
) -> ApiError {
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    for (i, index) in indices.iter().enumerate() {
        if applied(i) {
            yes.push(*index);
        } else {
            no.push(*index);
        }
    }
    let retry = if keyed {
        "retry the same body with the same Idempotency-Key: applied events are recognised and counted once"
    } else if yes.is_empty() {
        "nothing was applied; the body can be retried as is"
    } else {
        "resend only the events at not_applied_indices, or send an Idempotency-Key with every body so that a retry of the whole body is safe"
    };
    ApiError::NotApplied {
        detail: format!(
            "{} of {} events were not applied ({cause}); {retry}",
            no.len(),
            indices.len()
        ),
        applied_indices: yes,
        not_applied_indices: no,
    }
}
