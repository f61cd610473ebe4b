//! The billing report of every client with usage in a period, streamed:
//! `GET /v1/reports/billing?period=|from=&to=&format=ndjson|csv&cursor=
//! &limit=`.
//!
//! Each NDJSON line is exactly the client's own report (the bytes `GET
//! /v1/clients/{id}/reports/billing` answers, so a closed period reads
//! the same stored bytes); CSV gives the header once, then every client's
//! line items in the per-client columns. Clients come partition by
//! partition, in key order within one; no list of clients is held: the
//! walk asks the store for the next client after the last one, a few
//! dozen at a time, and waits while the reader is slow (a bounded
//! channel), so memory stays flat however many clients there are.
//!
//! Resuming: `cursor` is the `client_id` of the last complete record
//! received (the stream cut anywhere, the consumer resumes after it; a
//! cut stream ends without its terminating chunk, so it is seen as cut).
//! `limit` bounds the clients of one response.
//!
//! In Kafka mode each partition is read at its owner: local ones here,
//! the others forwarded to their owner as a one-partition export (always
//! NDJSON between instances, converted here for CSV).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tally_actors::kafka::membership::Owner;
use tally_pipelines::event::MAX_CLIENT_ID_BYTES;
use tokio::sync::mpsc;

use super::billing::{csv_header, csv_rows, resolve_period, ReportParams};
use super::forward::{FORWARDED_BY, PEER_IP};
use super::{page, usage, AppState};
use crate::billing::close::{self, ClientBilling};
use crate::error::{ApiError, FieldProblem};

/// Clients read per blocking step (then the chunk is handed on).
const CLIENTS_PER_STEP: usize = 32;
/// A step also ends once this much is encoded.
const BYTES_PER_STEP: usize = 256 * 1024;
/// Chunks in flight between the walk and the socket.
const CHANNEL_CHUNKS: usize = 4;
/// The most clients one response may be asked for.
const MAX_LIMIT: usize = 10_000_000;
/// How long a forwarded part may go without sending anything.
const REMOTE_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/reports/billing", get(export))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// `ndjson` (default) or `csv` (also by `Accept: text/csv`).
    format: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    /// Only this partition (what one instance asks another for).
    partition: Option<u16>,
}

/// Where a partition is read.
enum Source {
    Local,
    Remote(String),
}

/// What the walk needs, owned (it outlives the request's handler).
struct Job {
    state: AppState,
    period: ReportParams,
    csv: bool,
    now_ms: i64,
    /// Partitions in order, each with its source.
    plan: Vec<(u16, Source)>,
    /// Where the first partition resumes.
    cursor: Option<String>,
    remaining: Option<usize>,
    /// Passed on to owners (the key, the request id, the caller's IP).
    headers: HeaderMap,
    me: String,
}

fn bad(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::bad_request(
        "invalid export request",
        vec![FieldProblem::field(field, reason.into())],
    )
}

async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    origin: Option<axum::Extension<crate::access::Origin>>,
    q: Result<Query<ExportParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = usage::query(q)?;
    let csv = match params.format.as_deref() {
        Some("csv") => true,
        Some("ndjson") => false,
        Some(other) => return Err(bad("format", format!("{other:?} is not ndjson or csv"))),
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/csv")),
    };
    let remaining = params
        .limit
        .map(|l| page::limit(Some(l), l, MAX_LIMIT))
        .transpose()?;
    if let Some(c) = &params.cursor {
        if c.is_empty() || c.len() > MAX_CLIENT_ID_BYTES {
            return Err(bad(
                "cursor",
                "is the client_id of the last record received (1..=256 bytes)",
            ));
        }
    }
    let period = ReportParams {
        period: params.period,
        from: params.from,
        to: params.to,
        format: None,
    };
    let now_ms = state.config.clock.now_ms();
    // The period's own errors (not a date, from after to, ...) before the
    // stream starts: its status can still say so.
    resolve_period(&period, chrono_tz::UTC, 1, now_ms)?;
    let partitions = state.store.partitions();
    let first = params
        .cursor
        .as_deref()
        .map_or(0, |c| state.store.partition_of(c));
    let wanted: Vec<u16> = match params.partition {
        Some(p) if p >= partitions => {
            return Err(bad("partition", format!("must be below {partitions}")))
        }
        Some(p) => vec![p],
        None => (first..partitions).collect(),
    };
    let forwarded = headers.contains_key(&FORWARDED_BY);
    let mut plan = Vec::with_capacity(wanted.len());
    for p in wanted {
        let source = match state.membership.as_ref().map(|m| m.owner(p)) {
            None | Some(Owner::Local) => Source::Local,
            Some(Owner::Remote(owner)) if !forwarded => Source::Remote(owner),
            Some(_) => return Err(ApiError::PartitionMoving { partition: p }),
        };
        plan.push((p, source));
    }
    let pass_on = super::forward::with_caller_address(&headers, origin.as_deref());
    let job = Job {
        me: state
            .membership
            .as_ref()
            .map(|m| m.address().to_string())
            .unwrap_or_default(),
        state,
        period,
        csv,
        now_ms,
        plan,
        cursor: params.cursor,
        remaining,
        headers: pass_on,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHANNEL_CHUNKS);
    tokio::spawn(walk(job, tx));
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if csv {
            "text/csv; charset=utf-8"
        } else {
            "application/x-ndjson"
        }),
    );
    Ok(response)
}

type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Produces the stream; a failure part-way ends it cut (the consumer
/// resumes from its last complete record), and is logged.
async fn walk(mut job: Job, tx: Sender) {
    if job.csv && tx.send(Ok(Bytes::from(csv_header()))).await.is_err() {
        return;
    }
    let plan = std::mem::take(&mut job.plan);
    let mut cursor = job.cursor.take();
    for (partition, source) in plan {
        if job.remaining == Some(0) {
            break;
        }
        // The cursor positions only the partition it belongs to.
        let after = cursor
            .take()
            .filter(|c| job.state.store.partition_of(c) == partition);
        let done = match source {
            Source::Local => local(&mut job, partition, after, &tx).await,
            Source::Remote(owner) => remote(&mut job, partition, &owner, after, &tx).await,
        };
        match done {
            Ok(true) => {}
            // The reader went away.
            Ok(false) => return,
            Err(detail) => {
                let request_id = job
                    .headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::error!(partition, request_id, error = %detail, "billing export cut");
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "the export was cut; resume with cursor",
                    )))
                    .await;
                return;
            }
        }
    }
}

/// One blocking step's output.
struct Step {
    bytes: Vec<u8>,
    last: Option<String>,
    clients: usize,
    finished: bool,
}

/// Walks a partition of this instance. `Ok(false)`: the reader left.
async fn local(
    job: &mut Job,
    partition: u16,
    mut after: Option<String>,
    tx: &Sender,
) -> Result<bool, String> {
    loop {
        let most = job
            .remaining
            .map_or(CLIENTS_PER_STEP, |r| r.min(CLIENTS_PER_STEP));
        let state = job.state.clone();
        let period = ReportParams {
            period: job.period.period.clone(),
            from: job.period.from.clone(),
            to: job.period.to.clone(),
            format: None,
        };
        let (csv, now) = (job.csv, job.now_ms);
        let cursor = after.clone();
        let step = tokio::task::spawn_blocking(move || {
            tally_state::engine::rocks::bulk_reads(|| {
                step(&state, partition, cursor, &period, csv, now, most)
            })
        })
        .await
        .map_err(|e| format!("export task failed: {e}"))?;
        let step = match step {
            Ok(s) => s,
            Err(e) => {
                if e.is_corruption() {
                    job.state.shards.stop_shard(partition, &e.to_string());
                }
                return Err(e.to_string());
            }
        };
        if let Some(r) = job.remaining.as_mut() {
            *r -= step.clients.min(*r);
        }
        if !step.bytes.is_empty() && tx.send(Ok(Bytes::from(step.bytes))).await.is_err() {
            return Ok(false);
        }
        if step.finished || job.remaining == Some(0) {
            return Ok(true);
        }
        after = step.last;
    }
}

/// Up to `most` clients with usage in the period, after `after`.
fn step(
    state: &AppState,
    partition: u16,
    mut after: Option<String>,
    period: &ReportParams,
    csv: bool,
    now_ms: i64,
    most: usize,
) -> tally_state::Result<Step> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut clients = 0;
    // Periods this step closes are stored together, in one synced write,
    // before any of them is answered.
    let mut closings = close::Closings::begin(partition);
    let mut finished = false;
    while clients < most && out.len() + text.len() < BYTES_PER_STEP {
        let Some(client) = state
            .store
            .next_client_with_days(partition, after.as_deref())?
        else {
            finished = true;
            break;
        };
        after = Some(client.clone());
        let who = ClientBilling::read(state, &client, now_ms)?;
        // Checked for UTC before the stream; a zone does not make it fail.
        let Ok((p, stored)) = resolve_period(period, who.tz, who.reset_day, now_ms) else {
            continue;
        };
        let closed = now_ms >= close::closes_at(state, &p);
        let answer = if closed && stored {
            close::answer_closed(&state.store, &who, p, now_ms, &mut closings)?
        } else {
            close::answer(&state.store, &state.alerts, &who, p, closed, stored, now_ms)?
        };
        if answer.requests == 0 {
            continue;
        }
        if csv {
            csv_rows(&answer.bytes, &mut text)
                .map_err(|e| tally_state::Error::Corrupt(e.to_string()))?;
        } else {
            out.extend_from_slice(&answer.bytes);
            out.push(b'\n');
        }
        clients += 1;
    }
    closings.commit(&state.store, &state.alerts, now_ms)?;
    Ok(Step {
        bytes: if csv { text.into_bytes() } else { out },
        last: after,
        clients,
        finished,
    })
}

/// Relays the part of a partition owned by another instance.
async fn remote(
    job: &mut Job,
    partition: u16,
    owner: &str,
    after: Option<String>,
    tx: &Sender,
) -> Result<bool, String> {
    let mut query: Vec<(&str, String)> = vec![
        ("format", "ndjson".into()),
        ("partition", partition.to_string()),
    ];
    for (name, value) in [
        ("period", &job.period.period),
        ("from", &job.period.from),
        ("to", &job.period.to),
        ("cursor", &after),
    ] {
        if let Some(v) = value {
            query.push((name, v.clone()));
        }
    }
    if let Some(r) = job.remaining {
        query.push(("limit", r.to_string()));
    }
    let mut request = job
        .state
        .http_client
        .get(format!("{owner}/v1/reports/billing"))
        .query(&query)
        .header(FORWARDED_BY.as_str(), job.me.as_str());
    for name in [
        "x-request-id",
        "authorization",
        "x-api-key",
        PEER_IP.as_str(),
    ] {
        if let Some(v) = job.headers.get(name) {
            request = request.header(name, v.as_bytes());
        }
    }
    let mut answer = request.send().await.map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("the owner answered {}", answer.status()));
    }
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::time::timeout(REMOTE_CHUNK_TIMEOUT, answer.chunk())
            .await
            .map_err(|_| "the owner stopped sending".to_string())?
            .map_err(|e| e.to_string())?;
        let Some(chunk) = chunk else {
            return if pending.is_empty() {
                Ok(true)
            } else {
                Err("the owner's part ended inside a record".into())
            };
        };
        pending.extend_from_slice(&chunk);
        let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let complete: Vec<u8> = pending.drain(..=end).collect();
        let records = complete.iter().filter(|b| **b == b'\n').count();
        let bytes = if job.csv {
            let mut text = String::new();
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                csv_rows(line, &mut text).map_err(|e| e.to_string())?;
            }
            text.into_bytes()
        } else {
            complete
        };
        if let Some(r) = job.remaining.as_mut() {
            *r -= records.min(*r);
        }
        if tx.send(Ok(Bytes::from(bytes))).await.is_err() {
            return Ok(false);
        }
    }
}
