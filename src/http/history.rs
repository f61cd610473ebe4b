//! Configuration history: every change of a client's limits and quota is
//! an event in the control log, so `GET ...?as_of=T` answers what applied
//! at time T (a billing dispute is one request). The value applied now
//! lives in the partition's state, which moves with it.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use serde::Deserialize;
use tally_pipelines::access::{ControlEvent, ControlPlane};
use tally_pipelines::time::parse_instant;

use super::AppState;
use crate::error::{ApiError, FieldProblem};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsOfParam {
    /// RFC 3339 or epoch ms: what applied then, from the control log.
    as_of: Option<String>,
}

pub fn as_of(q: Result<Query<AsOfParam>, QueryRejection>) -> Result<Option<i64>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text(), vec![]))?;
    q.as_of
        .map(|t| {
            parse_instant(&t).map_err(|e| {
                ApiError::bad_request(
                    "invalid query parameters",
                    vec![FieldProblem::field("as_of", e)],
                )
            })
        })
        .transpose()
}

/// The last configuration of `client` set at or before `at` (of the kind
/// `pick` recognises): `(config, set_at, set_by)`.
pub async fn configured_at(
    state: &AppState,
    at: i64,
    pick: fn(&ControlEvent, &str) -> Option<serde_json::Value>,
    client: &str,
) -> Result<Option<(serde_json::Value, i64, String)>, ApiError> {
    let access = state.access.clone();
    let events = super::blocking(move || Ok(access.events_until(at)?)).await?;
    Ok(events
        .iter()
        .rev()
        .find_map(|e| pick(&e.event, client).map(|c| (c, e.at_ms, e.actor.clone()))))
}

/// The control plane as it stood at `at`: the log replayed up to it, each
/// event judged as when it was applied (a stale `If-Match` changed
/// nothing then, and changes nothing here).
pub async fn plane_at(state: &AppState, at: i64) -> Result<ControlPlane, ApiError> {
    let access = state.access.clone();
    let events = super::blocking(move || Ok(access.events_until(at)?)).await?;
    let mut plane = ControlPlane::new();
    for e in &events {
        plane.apply_envelope(e);
    }
    Ok(plane)
}

pub fn limits_of(e: &ControlEvent, client: &str) -> Option<serde_json::Value> {
    match e {
        ControlEvent::LimitsSet { client_id, config } if client_id == client => {
            Some(config.clone())
        }
        _ => None,
    }
}

pub fn quota_of(e: &ControlEvent, client: &str) -> Option<serde_json::Value> {
    match e {
        ControlEvent::QuotaSet { client_id, config } if client_id == client => Some(config.clone()),
        _ => None,
    }
}
