//! Billing adjustments: `POST|GET /v1/clients/{id}/adjustments`. Late
//! usage of a closed period is booked, with a reason, into the period it
//! is booked in, never merged into the closed one: from the client's
//! dead-lettered late events (each once) or as stated quantities.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tally_pipelines::access::{ControlEvent, Principal, Stream};
use tally_pipelines::billing::Adjustment;
use tally_pipelines::time::{format_rfc3339_ms, parse_instant};

use super::billing::invalid;
use super::{control, usage, AppState};
use crate::access::Origin;
use crate::error::ApiError;

/// Routes answered by the owner of the client's partition (its dead
/// letters are there).
pub fn client_router() -> Router<AppState> {
    Router::new().route(
        "/v1/clients/{client_id}/adjustments",
        get(list_adjustments).post(book_adjustment),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    reason: String,
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    data_transfer_bytes: u64,
    #[serde(default)]
    compute_units: u64,
    /// Book the client's late events from the dead letters (each once),
    /// of event times in `[from, to)` when given.
    #[serde(default)]
    from_dead_letters: bool,
    from: Option<String>,
    to: Option<String>,
}

/// Dead letters read at most per booking.
const MAX_DEAD_LETTERS_READ: usize = 100_000;

/// Books an adjustment into the client's open period: stated quantities,
/// or the late events of its dead letters not booked before.
async fn book_adjustment(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let client = usage::client_id(path)?;
    let body: AdjustBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid adjustment: {e}"), vec![]))?;
    let mut problems = Vec::new();
    if body.reason.trim().is_empty() || body.reason.len() > 1024 {
        problems.push(("reason".to_string(), "must be 1..=1024 bytes".to_string()));
    }
    let mut instant = |field: &str, v: &Option<String>| {
        v.as_deref().and_then(|t| {
            parse_instant(t)
                .map_err(|e| problems.push((field.to_string(), e)))
                .ok()
        })
    };
    let from = instant("from", &body.from);
    let to = instant("to", &body.to);
    let stated = body.requests > 0 || body.data_transfer_bytes > 0 || body.compute_units > 0;
    if body.from_dead_letters == stated {
        problems.push((
            "from_dead_letters".to_string(),
            "book either stated quantities or the dead letters, one of them".to_string(),
        ));
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let expected = control::if_match(&headers)?;
    let now = state.config.clock.now_ms();
    let mut adjustment = Adjustment {
        adjustment_id: uuid::Uuid::new_v4().to_string(),
        booked_at_ms: now,
        reason: body.reason.trim().to_string(),
        requests: body.requests,
        data_transfer_bytes: body.data_transfer_bytes,
        compute_units: body.compute_units,
        dead_letters: vec![],
    };
    if body.from_dead_letters {
        let partition = state.store.partition_of(&client);
        let booked: HashSet<(u16, u64)> = state.access.with_plane(|p| {
            p.adjustments(&client)
                .into_iter()
                .flat_map(|a| a.dead_letters)
                .collect()
        });
        let name = client.clone();
        let late = super::read_partition(&state, partition, move |store| {
            late_events(store, partition, &name, (from, to), &booked)
        })
        .await?;
        if late.dead_letters.is_empty() {
            return Err(ApiError::bad_request(
                format!("client {client:?} has no late events in the dead letters that are not booked yet"),
                vec![],
            ));
        }
        adjustment.requests = late.requests;
        adjustment.data_transfer_bytes = late.bytes;
        adjustment.compute_units = late.units;
        adjustment.dead_letters = late.dead_letters;
    }
    let event = ControlEvent::AdjustmentBooked {
        client_id: client.clone(),
        adjustment: adjustment.clone(),
    };
    let actor = control::caller(principal);
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    let mut shown = adjustment_view(&adjustment);
    shown["client_id"] = json!(client);
    shown["version"] = json!(applied.version);
    let mut response = control::with_etag(Json(shown).into_response(), applied.version);
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

fn adjustment_view(a: &Adjustment) -> serde_json::Value {
    json!({
        "adjustment_id": a.adjustment_id,
        "booked_at": format_rfc3339_ms(a.booked_at_ms),
        "reason": a.reason,
        "requests": a.requests,
        "data_transfer_bytes": a.data_transfer_bytes,
        "compute_units": a.compute_units,
        "dead_letters": a.dead_letters.len(),
    })
}

struct Late {
    requests: u64,
    bytes: u64,
    units: u64,
    dead_letters: Vec<(u16, u64)>,
}

/// The client's late events among its partition's dead letters (event
/// times in `[from, to)`), not booked before.
fn late_events(
    store: &tally_state::Store,
    partition: u16,
    client: &str,
    (from, to): (Option<i64>, Option<i64>),
    booked: &HashSet<(u16, u64)>,
) -> Result<Late, tally_state::Error> {
    let mut late = Late {
        requests: 0,
        bytes: 0,
        units: 0,
        dead_letters: vec![],
    };
    let mut before = None;
    let mut read = 0;
    while read < MAX_DEAD_LETTERS_READ {
        let page = store.dead_letters(partition, before, 1000)?;
        let Some(last) = page.last() else { break };
        before = Some(last.sequence);
        read += page.len();
        for dl in &page {
            let outside =
                from.is_some_and(|f| dl.event_ms < f) || to.is_some_and(|t| dl.event_ms >= t);
            if !dl.reason.starts_with("late")
                || outside
                || booked.contains(&(partition, dl.sequence))
            {
                continue;
            }
            let Ok(e) = serde_json::from_str::<serde_json::Value>(&dl.event_json) else {
                continue;
            };
            if e["client_id"].as_str() != Some(client) {
                continue;
            }
            let n = |f: &str| e[f].as_u64().unwrap_or(0);
            late.requests += 1;
            late.bytes = late
                .bytes
                .saturating_add(n("request_bytes"))
                .saturating_add(n("response_bytes"));
            late.units = late
                .units
                .saturating_add(e["compute_units"].as_u64().unwrap_or(1));
            late.dead_letters.push((partition, dl.sequence));
        }
    }
    // Oldest first, as they happened.
    late.dead_letters.reverse();
    Ok(late)
}

async fn list_adjustments(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let client = usage::client_id(path)?;
    let (list, version) = state.access.with_plane(|p| {
        (
            p.adjustments(&client),
            p.version(Stream::Adjustments(&client)),
        )
    });
    let shown: Vec<serde_json::Value> = list.iter().rev().map(adjustment_view).collect();
    Ok(control::with_etag(
        Json(json!({"client_id": client, "adjustments": shown})).into_response(),
        version,
    ))
}
