//! Control-plane changes over HTTP, for keys, limits, quotas and webhooks
//! alike: every change is an event recorded through the control log
//! (synced locally, or through the control topic in Kafka mode) before it
//! is answered; `If-Match` names the version of the changed thing a
//! writer read, and a stale one gets 412; reads carry the version as an
//! ETag.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use axum::Extension;
use tally_pipelines::access::{ControlEvent, Principal};

use super::AppState;
use crate::access::{Applied, Origin, Stale};
use crate::error::{ApiError, FieldProblem};

/// The caller: its key, or on an instance with no key yet (open, on
/// loopback or `--insecure`) the operator, who makes the first key.
pub fn caller(principal: Option<Extension<std::sync::Arc<Principal>>>) -> Principal {
    principal.map_or_else(
        || Principal::operator("anonymous"),
        |Extension(p)| Principal::clone(&p),
    )
}

/// `If-Match: "<version>"` (or `*`): the version a change is for.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let digits = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    digits.parse().map(Some).map_err(|_| {
        ApiError::bad_request(
            "invalid If-Match",
            vec![FieldProblem::field(
                "If-Match",
                "must be a version as the ETag gave it, e.g. \"3\"",
            )],
        )
    })
}

/// Sets the ETag of a response to `version`.
pub fn with_etag(mut response: Response, version: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// Records a change at the version `If-Match` named; answers the event
/// as recorded, or 412 when the thing changed since, or 503 when the
/// control topic could not take it.
pub async fn record(
    state: &AppState,
    actor: &Principal,
    origin: Option<Extension<Origin>>,
    now: i64,
    event: ControlEvent,
    expected: Option<u64>,
) -> Result<Applied, ApiError> {
    let what = describe(&event);
    let origin = origin.map(|Extension(o)| o).unwrap_or_default();
    match state
        .access
        .change(&actor.key_id, now, event, expected, origin)
        .await
    {
        Ok(applied) => Ok(applied),
        Err(Stale::Version { current }) => Err(ApiError::PreconditionFailed(format!(
            "{what} is at version {current}, not {}; read it again",
            expected.unwrap_or(0)
        ))),
        Err(Stale::Store(e)) => Err(e.into()),
        Err(Stale::Unavailable(detail)) => {
            tracing::error!(error = %detail, "a control change could not go through the control topic");
            Err(ApiError::Unavailable(
                "the change could not be made through the control topic; retry shortly".into(),
            ))
        }
    }
}

/// What a change is to, as a 412 names it.
fn describe(event: &ControlEvent) -> String {
    use tally_pipelines::access::Stream;
    match event.stream() {
        Stream::Key(id) => format!("key {id}"),
        Stream::Limits(c) => format!("the limits of client {c:?}"),
        Stream::Quota(c) => format!("the quota of client {c:?}"),
        Stream::Webhook(w) => format!("webhook {w:?}"),
        Stream::Plan(p) => format!("plan {p:?}"),
        Stream::ClientPlan(c) => format!("the plan schedule of client {c:?}"),
        Stream::Adjustments(c) => format!("the adjustments of client {c:?}"),
    }
}
