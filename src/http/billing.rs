//! Billing over HTTP: plans (`PUT|GET /v1/plans/{plan_id}`, `GET
//! /v1/plans`), a client's plan schedule (`PUT|GET
//! /v1/clients/{id}/plan`), both control changes with history and
//! `If-Match`; and a client's billing report for a period (`GET
//! /v1/clients/{id}/reports/billing`, JSON or CSV).
//!
//! Closed periods are stored once and answered as stored
//! ([`crate::billing::close`]).

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tally_pipelines::access::{ControlEvent, Principal, Stream};
use tally_pipelines::billing::period::{self, BillingPeriod};
use tally_pipelines::billing::plan::plan_id_problem;
use tally_pipelines::billing::schedule::in_force;
use tally_pipelines::billing::{Assignment, Plan};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, MINUTE_MS};

use super::{control, history, page, usage, AppState};
use crate::access::Origin;
use crate::billing::close::{self, ClientBilling};
use crate::error::{ApiError, FieldProblem};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/plans", get(list_plans))
        .route("/v1/plans/{plan_id}", get(get_plan).put(put_plan))
        .route(
            "/v1/clients/{client_id}/plan",
            get(get_client_plan).put(put_client_plan),
        )
}

/// Routes answered by the owner of the client's partition.
pub fn client_router() -> Router<AppState> {
    Router::new().route(
        "/v1/clients/{client_id}/reports/billing",
        get(client_report),
    )
}

pub(super) fn invalid(problems: Vec<(String, String)>) -> ApiError {
    ApiError::bad_request(
        "invalid billing request",
        problems
            .into_iter()
            .map(|(f, r)| FieldProblem::field(&f, r))
            .collect(),
    )
}

fn plan_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) =
        path.map_err(|e| ApiError::bad_request(format!("invalid plan id in path: {e}"), vec![]))?;
    if let Some(problem) = plan_id_problem(&id) {
        return Err(invalid(vec![("plan_id".into(), problem)]));
    }
    Ok(id)
}

fn plan_view(id: &str, plan: &Plan, version: u64) -> Response {
    let body = json!({"plan_id": id, "version": version, "plan": plan});
    control::with_etag(Json(body).into_response(), version)
}

async fn put_plan(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = plan_id(path)?;
    let plan: Plan = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid plan: {e}"), vec![]))?;
    let problems = plan.problems();
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let expected = control::if_match(&headers)?;
    let existed = state.access.with_plane(|p| p.plan(&id).is_some());
    let event = ControlEvent::PlanSet {
        plan_id: id.clone(),
        plan: serde_json::to_value(&plan).unwrap_or_default(),
    };
    let actor = control::caller(principal);
    let now = state.config.clock.now_ms();
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    let mut response = plan_view(&id, &plan, applied.version);
    if !existed {
        *response.status_mut() = StatusCode::CREATED;
    }
    Ok(response)
}

async fn get_plan(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<history::AsOfParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = plan_id(path)?;
    if let Some(at) = history::as_of(q)? {
        let then = history::plane_at(&state, at).await?;
        let (Some(plan), Some(set)) = (then.plan(&id), then.config(Stream::Plan(&id))) else {
            return Err(ApiError::NoSuchResource(format!(
                "no plan {id:?} at {}",
                format_rfc3339_ms(at)
            )));
        };
        return Ok(Json(json!({"plan_id": id, "as_of": format_rfc3339_ms(at),
            "version": set.version, "plan": plan,
            "set_at": format_rfc3339_ms(set.set_at_ms), "set_by": set.set_by}))
        .into_response());
    }
    let (plan, version) = state
        .access
        .with_plane(|p| (p.plan(&id), p.version(Stream::Plan(&id))));
    let plan = plan.ok_or_else(|| ApiError::NoSuchResource(format!("no plan {id:?}")))?;
    Ok(plan_view(&id, &plan, version))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list_plans(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = usage::query(q)?;
    let limit = page::limit(params.limit, 100, 1000)?;
    let after = params.cursor.unwrap_or_default();
    let (plans, more) = state.access.with_plane(|p| {
        let mut ids = p.plan_ids(&after, limit + 1);
        let more = ids.len() > limit;
        ids.truncate(limit);
        let plans: Vec<serde_json::Value> = ids
            .iter()
            .filter_map(|id| {
                let plan = p.plan(id)?;
                let version = p.version(Stream::Plan(id));
                Some(json!({"plan_id": id, "version": version, "plan": plan}))
            })
            .collect();
        (plans, more)
    });
    let next_cursor = more
        .then(|| {
            plans
                .last()
                .and_then(|p| p["plan_id"].as_str().map(str::to_string))
        })
        .flatten();
    Ok(Json(json!({"plans": plans, "next_cursor": next_cursor})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    plan_id: String,
    /// RFC 3339 or epoch ms; default now. Taken at minute precision.
    effective_from: Option<serde_json::Value>,
    time_zone: Option<String>,
}

fn schedule_view(client: &str, schedule: &[Assignment], now_ms: i64, version: u64) -> Response {
    let body = schedule_json(client, schedule, now_ms, version);
    control::with_etag(Json(body).into_response(), version)
}

fn schedule_json(
    client: &str,
    schedule: &[Assignment],
    now_ms: i64,
    version: u64,
) -> serde_json::Value {
    let current = in_force(schedule, now_ms).map(|a| a.plan_id.clone());
    let entries: Vec<serde_json::Value> = schedule
        .iter()
        .map(|a| {
            json!({"plan_id": a.plan_id, "effective_from": format_rfc3339_ms(a.effective_from_ms),
                   "time_zone": a.time_zone.as_deref().unwrap_or("UTC")})
        })
        .collect();
    json!({"client_id": client, "plan_id": current, "schedule": entries, "version": version})
}

async fn put_client_plan(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let client = usage::client_id(path)?;
    let body: AssignBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid plan assignment: {e}"), vec![]))?;
    let now = state.config.clock.now_ms();
    let mut problems = Vec::new();
    if !state.access.with_plane(|p| p.plan(&body.plan_id).is_some()) {
        problems.push((
            "plan_id".to_string(),
            format!(
                "no plan {:?}; PUT /v1/plans/{{plan_id}} first",
                body.plan_id
            ),
        ));
    }
    if let Some(tz) = &body.time_zone {
        if let Err(e) = period::zone(tz) {
            problems.push(("time_zone".into(), e));
        }
    }
    let effective_from = match &body.effective_from {
        None => now,
        Some(serde_json::Value::String(s)) => parse_instant(s).unwrap_or_else(|e| {
            problems.push(("effective_from".into(), e));
            0
        }),
        Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or_else(|| {
            problems.push(("effective_from".into(), "must be epoch ms".into()));
            0
        }),
        Some(_) => {
            problems.push((
                "effective_from".into(),
                "must be RFC 3339 or epoch ms".into(),
            ));
            0
        }
    };
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let expected = control::if_match(&headers)?;
    let event = ControlEvent::ClientPlanSet {
        client_id: client.clone(),
        assignment: Assignment {
            plan_id: body.plan_id,
            effective_from_ms: effective_from.div_euclid(MINUTE_MS) * MINUTE_MS,
            time_zone: body.time_zone,
        },
    };
    let actor = control::caller(principal);
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    let schedule = state.access.with_plane(|p| p.schedule(&client));
    Ok(schedule_view(&client, &schedule, now, applied.version))
}

async fn get_client_plan(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<history::AsOfParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let client = usage::client_id(path)?;
    if let Some(at) = history::as_of(q)? {
        // What was recorded by then: the schedule, the plan it put in
        // force at that time, and that plan's terms then.
        let then = history::plane_at(&state, at).await?;
        let schedule = then.schedule(&client);
        if schedule.is_empty() {
            return Err(ApiError::NoSuchResource(format!(
                "no plan assigned to client {client:?} at {}",
                format_rfc3339_ms(at)
            )));
        }
        let current = in_force(&schedule, at).map(|a| a.plan_id.clone());
        let plan = current.as_deref().and_then(|id| then.plan(id));
        let mut view = schedule_json(
            &client,
            &schedule,
            at,
            then.version(Stream::ClientPlan(&client)),
        );
        view["as_of"] = json!(format_rfc3339_ms(at));
        view["plan"] = json!(plan);
        return Ok(Json(view).into_response());
    }
    let (schedule, version) = state
        .access
        .with_plane(|p| (p.schedule(&client), p.version(Stream::ClientPlan(&client))));
    if schedule.is_empty() {
        return Err(ApiError::NoSuchResource(format!(
            "no plan assigned to client {client:?}"
        )));
    }
    Ok(schedule_view(
        &client,
        &schedule,
        state.config.clock.now_ms(),
        version,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportParams {
    /// `current` (default), `previous`, or an instant or local date
    /// (`YYYY-MM-DD`) inside the period.
    pub period: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `json` (default) or `csv` (also by `Accept: text/csv`).
    pub format: Option<String>,
}

async fn client_report(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    q: Result<Query<ReportParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let client = usage::client_id(path)?;
    let params = usage::query(q)?;
    let csv = wants_csv(&headers, params.format.as_deref())?;
    let now = state.config.clock.now_ms();
    let partition = state.store.partition_of(&client);
    let (s, name) = (state.clone(), client.clone());
    let who = super::read_partition(&state, partition, move |_| {
        ClientBilling::read(&s, &name, now)
    })
    .await?;
    let (period, stored) = resolve_period(&params, who.tz, who.reset_day, now)?;
    let closed = now >= close::closes_at(&state, &period);
    let s = state.clone();
    let bytes = super::read_partition(&state, partition, move |store| {
        close::answer(store, &s.alerts, &who, period, closed, stored, now).map(|a| a.bytes)
    })
    .await?;
    if csv {
        return csv_response(&bytes);
    }
    let mut response = Response::new(axum::body::Body::from(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// The period asked for, and whether it is a billing period (which is
/// stored once closed) rather than a `from`/`to` range.
pub(super) fn resolve_period(
    params: &ReportParams,
    tz: chrono_tz::Tz,
    reset_day: u8,
    now: i64,
) -> Result<(BillingPeriod, bool), ApiError> {
    let bad = |field: &str, reason: String| invalid(vec![(field.to_string(), reason)]);
    match (&params.from, &params.to) {
        (Some(from), Some(to)) => {
            if params.period.is_some() {
                return Err(bad("period", "give period or from/to, not both".into()));
            }
            let from_ms = parse_instant(from).map_err(|e| bad("from", e))?;
            let to_ms = parse_instant(to).map_err(|e| bad("to", e))?;
            if from_ms >= to_ms {
                return Err(bad("from", "must be before `to`".into()));
            }
            if to_ms - from_ms > 92 * tally_pipelines::time::DAY_MS {
                return Err(bad("to", "a range spans at most 92 days".into()));
            }
            Ok((
                BillingPeriod {
                    start_ms: from_ms,
                    end_ms: to_ms,
                    first_day: period::local_date(tz, from_ms),
                    end_day: period::local_date(tz, to_ms - 1)
                        .succ_opt()
                        .unwrap_or_default(),
                },
                false,
            ))
        }
        (None, None) => {
            let current = BillingPeriod::containing(tz, reset_day, now);
            let p = match params.period.as_deref().unwrap_or("current") {
                "current" => current,
                "previous" => current.shifted(tz, reset_day, -1),
                other => {
                    let at = match chrono::NaiveDate::parse_from_str(other, "%Y-%m-%d") {
                        Ok(date) => period::day_start(tz, date),
                        Err(_) => parse_instant(other).map_err(|_| {
                            bad(
                                "period",
                                format!("{other:?} is not current, previous, a date (YYYY-MM-DD) or an instant"),
                            )
                        })?,
                    };
                    BillingPeriod::containing(tz, reset_day, at)
                }
            };
            Ok((p, true))
        }
        _ => Err(bad("from", "from and to go together".into())),
    }
}

fn wants_csv(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        Some("csv") => return Ok(true),
        Some("json") => return Ok(false),
        Some(other) => {
            return Err(invalid(vec![(
                "format".into(),
                format!("{other:?} is not json or csv"),
            )]))
        }
        None => {}
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv")))
}

/// The columns of the CSV form, one row per line item.
pub const CSV_COLUMNS: [&str; 13] = [
    "client_id",
    "plan_id",
    "billing_period_start",
    "billing_period_end",
    "status",
    "currency",
    "description",
    "metric",
    "line_from",
    "line_to",
    "quantity",
    "unit_price",
    "amount",
];

fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// The CSV form of a report (from its JSON, so a stored report's CSV is
/// as stable as its JSON).
fn csv_response(json: &[u8]) -> Result<Response, ApiError> {
    let mut out = csv_header();
    csv_rows(json, &mut out)?;
    let mut response = Response::new(axum::body::Body::from(out));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    Ok(response)
}

pub(super) fn csv_header() -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push_str("\r\n");
    out
}

/// Appends the rows of one report (its JSON) to `out`.
pub(super) fn csv_rows(json: &[u8], out: &mut String) -> Result<(), ApiError> {
    let r: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| ApiError::Internal(format!("a report is not JSON: {e}")))?;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    for line in r["lines"].as_array().into_iter().flatten() {
        let row = [
            text(&r["client_id"]),
            text(&line["plan_id"]),
            text(&r["billing_period_start"]),
            text(&r["billing_period_end"]),
            text(&r["status"]),
            text(&r["currency"]),
            text(&line["description"]),
            text(&line["metric"]),
            text(&line["from"]),
            text(&line["to"]),
            text(&line["quantity"]),
            text(&line["unit_price"]),
            text(&line["amount"]),
        ];
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_field(out, v);
        }
        out.push_str("\r\n");
    }
    Ok(())
}
