//! The API's one error type and its one mapping to HTTP: RFC 9457
//! problem+json. 5xx details are logged, never returned to clients.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One problem with a field or an element of the request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldProblem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub reason: String,
}

impl FieldProblem {
    pub fn field(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            index: None,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldProblem>,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("{0}")]
    NoSuchResource(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No key presented where one is required.
    #[error("an API key is required: send `Authorization: Bearer <key>` or `X-Api-Key`")]
    Unauthenticated,
    /// A key was presented and is not good for this request. Deliberately
    /// one text for every cause (unknown, wrong, expired, revoked, out of
    /// scope or of its clients, outside its allowlist): the cause is in
    /// the log and the audit, never told to the caller.
    #[error("the API key is not valid for this request")]
    Forbidden,
    /// A key's own request budget (shared with its parents) is spent.
    #[error("the API key's request rate limit is reached")]
    KeyRateLimited { retry_after_secs: u64 },
    /// `If-Match` names a version that is no longer current.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A configured bound (webhooks, subscriptions) is reached.
    #[error("{0}")]
    LimitReached(String),
    #[error("{detail}")]
    Overloaded {
        detail: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("partition {partition} is moving between instances; retry shortly")]
    PartitionMoving { partition: u16 },
    /// The owner's address and the error are logged, never answered.
    #[error("the instance owning partition {partition} did not answer; retry shortly")]
    OwnerUnreachable {
        partition: u16,
        owner: String,
        detail: String,
    },
    #[error("{detail}")]
    NotApplied {
        detail: String,
        /// Indices (array element or NDJSON line) of events that were
        /// applied and of those that were not.
        applied_indices: Vec<usize>,
        not_applied_indices: Vec<usize>,
    },
    /// A 4xx the HTTP layer produced (extractor rejections, 413, 414...).
    #[error("{detail}")]
    Http { status: StatusCode, detail: String },
    /// Stored state that cannot be read (shown: it names no secret and
    /// tells the operator where to look).
    #[error("{0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "<[FieldProblem]>::is_empty")]
    errors: &'a [FieldProblem],
    #[serde(skip_serializing_if = "Option::is_none")]
    applied_indices: Option<&'a [usize]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_applied_indices: Option<&'a [usize]>,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>, errors: Vec<FieldProblem>) -> Self {
        ApiError::BadRequest {
            detail: detail.into(),
            errors,
        }
    }

    fn status_and_slug(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
            ),
            ApiError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            ApiError::NotFound(_) | ApiError::NoSuchResource(_) => {
                (StatusCode::NOT_FOUND, "not-found", "Not found")
            }
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            ApiError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::KeyRateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "key-rate-limited",
                "Key rate limit reached",
            ),
            ApiError::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                "Precondition failed",
            ),
            ApiError::LimitReached(_) => (StatusCode::CONFLICT, "limit-reached", "Limit reached"),
            ApiError::Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Service overloaded",
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::PartitionMoving { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "partition-moving",
                "Partition moving",
            ),
            ApiError::OwnerUnreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "owner-unreachable",
                "Owner unreachable",
            ),
            ApiError::NotApplied { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-applied",
                "Events not applied",
            ),
            ApiError::Http { status, .. } => (*status, "http", "Request refused"),
            ApiError::Corrupt(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt-state",
                "Stored state cannot be read",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.status_and_slug();
        if let ApiError::OwnerUnreachable {
            partition,
            owner,
            detail,
        } = &self
        {
            tracing::error!(partition, owner = %owner, error = %detail, "forwarding to the partition owner failed");
        }
        let detail = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "an internal error occurred; the request id identifies it in the logs".to_string()
            }
            other => other.to_string(),
        };
        let errors = match &self {
            ApiError::BadRequest { errors, .. } => errors.as_slice(),
            _ => &[],
        };
        let (applied_indices, not_applied_indices) = match &self {
            ApiError::NotApplied {
                applied_indices,
                not_applied_indices,
                ..
            } => (
                Some(applied_indices.as_slice()),
                Some(not_applied_indices.as_slice()),
            ),
            _ => (None, None),
        };
        let body = Problem {
            kind: &format!("urn:tally:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
            applied_indices,
            not_applied_indices,
        };
        let mut response =
            (status, serde_json::to_string(&body).unwrap_or_default()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let retry_after = match self {
            ApiError::Overloaded {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            ApiError::PartitionMoving { .. } | ApiError::NotApplied { .. } => Some(1),
            ApiError::Unavailable(_) => Some(1),
            ApiError::KeyRateLimited { retry_after_secs } => Some(retry_after_secs),
            _ => None,
        };
        if matches!(self, ApiError::Unauthenticated) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally\""),
            );
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<tally_state::Error> for ApiError {
    fn from(e: tally_state::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<tally_actors::Error> for ApiError {
    fn from(e: tally_actors::Error) -> Self {
        use tally_actors::Error as E;
        match e {
            E::Overloaded { .. } => ApiError::Overloaded {
                detail: e.to_string(),
                retry_after_secs: 1,
            },
            E::ShardRestarted { .. } | E::ShardUnavailable { .. } | E::ShardFailed { .. } => {
                ApiError::Unavailable(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}
