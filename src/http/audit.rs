//! `GET /v1/audit?actor=&action=&client_id=&from=&to=&cursor=&limit=`:
//! control changes and refused requests, newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant};

use super::{blocking, page, AppState};
use crate::audit::AuditEntry;
use crate::error::{ApiError, FieldProblem};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    client_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct Shown {
    at: String,
    #[serde(flatten)]
    entry: AuditEntry,
}

#[derive(Serialize)]
struct AuditPage {
    records: Vec<Shown>,
    next_cursor: Option<String>,
}

/// Records read at most per request, matching or not.
const SCAN_LIMIT: usize = 50_000;

fn bad(field: &str, reason: String) -> ApiError {
    ApiError::bad_request(
        "invalid query parameters",
        vec![FieldProblem::field(field, reason)],
    )
}

fn parse_cursor(c: &str) -> Option<(i64, u64)> {
    let (at, seq) = c.split_once('.')?;
    Some((at.parse().ok()?, seq.parse().ok()?))
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), vec![]))?;
    let limit = page::limit(q.limit, 100, 1000)?;
    let from_ms = match &q.from {
        Some(t) => parse_instant(t).map_err(|e| bad("from", e))?,
        None => 0,
    };
    let to_ms = match &q.to {
        Some(t) => Some(parse_instant(t).map_err(|e| bad("to", e))?),
        None => None,
    };
    let mut before = match &q.cursor {
        Some(c) => Some(parse_cursor(c).ok_or_else(page::bad_cursor)?),
        None => None,
    };
    // `to` is exclusive: start just before it unless the cursor is older.
    if let Some(to) = to_ms {
        let at_to = (to, 0);
        if before.is_none_or(|b| b > at_to) {
            before = Some(at_to);
        }
    }
    let audit = state.audit.clone();
    let (records, next) = blocking(move || {
        let keep = |json: &[u8]| {
            let Ok(e) = serde_json::from_slice::<AuditEntry>(json) else {
                return false;
            };
            q.actor.as_ref().is_none_or(|a| &e.actor == a)
                && q.action.as_ref().is_none_or(|a| &e.action == a)
                && q.client_id
                    .as_ref()
                    .is_none_or(|c| e.client_ids.contains(c))
        };
        Ok(audit
            .store()
            .audit_backward(before, from_ms, limit, SCAN_LIMIT, keep)?)
    })
    .await?;
    let records = records
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<AuditEntry>(&r.json).ok())
        .map(|entry| Shown {
            at: format_rfc3339_ms(entry.at_ms),
            entry,
        })
        .collect();
    Ok(Json(AuditPage {
        records,
        next_cursor: next.map(|(at, seq)| format!("{at}.{seq}")),
    }))
}
