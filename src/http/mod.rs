//! The HTTP API. Each area is a module with `router()`; [`app`] merges them
//! and adds the cross-cutting layers (request ids, tracing, metrics,
//! timeouts, problem+json for unmatched routes).

pub mod adjustments;
pub mod alerts;
pub mod anomalies;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod control;
pub mod dead_letters;
pub mod export;
pub mod forward;
pub mod health;
pub mod history;
pub mod ingest;
pub mod keys;
pub mod limits;
pub mod page;
pub mod telemetry;
pub mod top;
pub mod usage;
pub mod webhooks;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tally_actors::telemetry::{HTTP_DURATION, HTTP_REQUESTS};
use tally_actors::ShardRouter;
use tally_state::Store;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::error::ApiError;

/// Shared by every handler. Cloned for each request (by every `State`
/// extractor and layer), so it is one `Arc`, not a dozen.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub shards: ShardRouter,
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub prometheus: PrometheusHandle,
    /// False until the engine runs and again once shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// In Kafka mode, ingest produces to the request topic.
    pub kafka_ingest: Option<Arc<tally_actors::kafka::ingest::KafkaIngest>>,
    /// In Kafka mode, the consumer's broker connection and lag.
    pub kafka_health: Option<Arc<tally_actors::kafka::health::KafkaHealth>>,
    /// In Kafka mode, who owns which partition (queries are forwarded).
    pub membership: Option<Arc<tally_actors::kafka::membership::Membership>>,
    /// Forwards queries to the owning instance.
    pub http_client: reqwest::Client,
    /// The event channel (alerts).
    pub alerts: Arc<tally_actors::alerts::AlertLog>,
    /// In Kafka mode, the whole cluster's event channel (the streams read
    /// it instead of the local log).
    pub cluster_alerts: Option<Arc<tally_actors::kafka::alert_mirror::ClusterAlerts>>,
    /// Webhook configurations and their delivery tasks.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Load shedding of ingest bodies.
    pub ingest_gate: ingest::IngestGate,
    /// Open SSE and WebSocket subscriptions (bounded by configuration).
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// API keys and who may call what.
    pub access: Arc<crate::access::Access>,
    /// Control changes and refused requests.
    pub audit: Arc<crate::audit::Audit>,
}

/// Runs store I/O (or other blocking work) on the blocking pool, keeping
/// the async workers free for requests that need no disk.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
}

/// Reads one partition's stored state off the async workers. State found
/// corrupt stops the partition's shard (nothing more is applied or written
/// over it, readiness says why) and answers 500 naming it.
pub async fn read_partition<T: Send + 'static>(
    state: &AppState,
    partition: u16,
    read: impl FnOnce(&Store) -> Result<T, tally_state::Error> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    let result = tokio::task::spawn_blocking(move || read(&store))
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?;
    result.map_err(|e| {
        if e.is_corruption() {
            state.shards.stop_shard(partition, &e.to_string());
            ApiError::Corrupt(format!(
                "the stored state of partition {partition} cannot be read ({e}); its shard is stopped, see /health/detailed"
            ))
        } else {
            ApiError::from(e)
        }
    })
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn app(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    Router::new()
        .merge(ingest::router(&state.config))
        .merge(
            usage::router()
                .merge(limits::client_router())
                .merge(anomalies::client_router())
                .merge(billing::client_router())
                .merge(adjustments::client_router())
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    forward::to_owner,
                )),
        )
        .merge(limits::router())
        .merge(top::router())
        .merge(webhooks::router())
        .merge(anomalies::router())
        .merge(alerts::router())
        .merge(health::router())
        .merge(dead_letters::router())
        .merge(keys::router())
        .merge(audit::router())
        .merge(billing::router())
        .merge(export::router())
        .merge(telemetry::router(&state))
        // After routing (the rule is the route's), before any handler.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route_layer(middleware::from_fn(record_http_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(refuse_long_uris))
        .layer(middleware::from_fn(problem_instance))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(req.uri().path().to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Request count and duration by route template (never the raw path,
/// which carries client ids) and status class.
async fn record_http_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!(HTTP_REQUESTS, "route" => route.clone(), "status" => class).increment(1);
    histogram!(HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// Longest request target (path and query) served; longer ones get a
/// problem+json 414 here, before any handler parses them.
pub const MAX_URI_BYTES: usize = 8192;

async fn refuse_long_uris(req: Request, next: Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        return ApiError::Http {
            status: StatusCode::URI_TOO_LONG,
            detail: format!("the request target is {len} bytes, the limit is {MAX_URI_BYTES}"),
        }
        .into_response();
    }
    next.run(req).await
}

/// Every error answer is problem+json: responses built by the HTTP layer
/// itself (an extractor's rejection, a body limit's 413, a timeout's 408)
/// are rewrapped here, and RFC 9457 `instance` (the request path) is
/// filled into every problem, since problems are built where the path is
/// not known.
async fn problem_instance(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    let status = response.status();
    // Answers that are JSON by design (a check's 429) stay as they are;
    // the HTTP layer's own rejections are plain text or empty.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !is_problem && !(plain && (status.is_client_error() || status.is_server_error())) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, 1 << 20).await else {
        return (parts.status, "").into_response();
    };
    let bytes = if is_problem {
        bytes
    } else {
        // A plain-text rejection: its text is the detail.
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let detail = if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        };
        let problem = ApiError::Http { status, detail }.into_response();
        let (problem_parts, problem_body) = problem.into_parts();
        parts.headers.extend(
            problem_parts
                .headers
                .into_iter()
                .filter_map(|(k, v)| k.map(|k| (k, v))),
        );
        match to_bytes(problem_body, 1 << 20).await {
            Ok(b) => b,
            Err(_) => return (parts.status, "").into_response(),
        }
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("instance".into(), serde_json::Value::String(path));
            serde_json::to_vec(&map).unwrap_or_else(|_| bytes.to_vec())
        }
        _ => bytes.to_vec(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    Response::from_parts(parts, Body::from(body))
}
