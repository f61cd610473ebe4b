//! `GET /v1/dead-letters?limit=&cursor=`: late events set aside, newest
//! first (by partition sequence, merged across partitions by the time they
//! were recorded), with the reason they were excluded. `next_cursor` holds
//! where each partition's reading stopped.
//!
//! `GET /v1/dead-letters/kafka?limit=&cursor=`: in Kafka mode, the records
//! the consumer sent to the dead-letter topic (undecodable, invalid, on the
//! wrong partition), read back from the topic newest first, with reason and
//! origin; the same cursor form, by dead-letter topic partition and offset.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::time::format_rfc3339_ms;
use tally_state::DeadLetterRecord;

use super::{blocking, page, AppState};
use crate::error::ApiError;

const MAX_LIMIT: usize = 10_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/kafka", get(list_kafka))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
struct Item {
    partition: u16,
    sequence: u64,
    reason: String,
    event_time: String,
    recorded_at: String,
    event: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct Response {
    dead_letters: Vec<Item>,
    next_cursor: Option<String>,
}

/// A cursor: for each partition with more to read, the sequence below
/// which its next page starts (`p.s`, joined by `-`); a partition absent
/// from it is done.
fn parse_cursor(cursor: &str, partitions: u16) -> Result<Vec<Option<u64>>, ApiError> {
    let mut below = vec![None; usize::from(partitions)];
    for part in cursor.split('-').filter(|p| !p.is_empty()) {
        let (p, s) = part.split_once('.').ok_or_else(page::bad_cursor)?;
        let p: u16 = p.parse().map_err(|_| page::bad_cursor())?;
        let s: u64 = s.parse().map_err(|_| page::bad_cursor())?;
        *below.get_mut(usize::from(p)).ok_or_else(page::bad_cursor)? = Some(s);
    }
    Ok(below)
}

#[derive(Debug, Serialize)]
struct KafkaResponse {
    dead_letter_topic: String,
    dead_letters: Vec<tally_actors::kafka::dead_letters::KafkaDeadLetter>,
    next_cursor: Option<String>,
}

async fn list_kafka(
    State(state): State<AppState>,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Json<KafkaResponse>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let limit = page::limit(params.limit, 100, MAX_LIMIT)?;
    let Some(kafka) = state.config.kafka.clone() else {
        return Err(ApiError::NotFound(
            "no Kafka source is configured: dead letters of HTTP and file input are at /v1/dead-letters".into(),
        ));
    };
    let below = match &params.cursor {
        None => None,
        Some(c) => Some(
            parse_cursor(c, u16::MAX)?
                .into_iter()
                .enumerate()
                .filter_map(|(p, o)| Some((p as i32, i64::try_from(o?).ok()?)))
                .collect::<Vec<_>>(),
        ),
    };
    let topic = kafka.dead_letter_topic.clone();
    let page = blocking(move || {
        tally_actors::kafka::dead_letters::read_page(&kafka, below.as_deref(), limit).map_err(|e| {
            tracing::error!(error = %e, "reading the dead-letter topic failed");
            ApiError::Unavailable("the dead-letter topic cannot be read; retry shortly".into())
        })
    })
    .await?;
    let parts: Vec<String> = page.next.iter().map(|(p, o)| format!("{p}.{o}")).collect();
    Ok(Json(KafkaResponse {
        dead_letter_topic: topic,
        dead_letters: page.dead_letters,
        next_cursor: (!parts.is_empty()).then(|| parts.join("-")),
    }))
}

async fn list(
    State(state): State<AppState>,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Response>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let limit = page::limit(params.limit, 100, MAX_LIMIT)?;
    let partitions = state.store.partitions();
    // Without a cursor every partition starts at its newest (below MAX).
    let starts: Vec<Option<u64>> = match &params.cursor {
        Some(c) => parse_cursor(c, partitions)?,
        None => vec![Some(u64::MAX); usize::from(partitions)],
    };
    let store = state.store.clone();
    let (records, next_cursor) = blocking(move || {
        // Each partition offers one more than a page; the merge keeps the
        // newest, and a partition with records left over has more.
        let mut candidates: Vec<DeadLetterRecord> = Vec::new();
        let mut fetched = vec![0usize; usize::from(partitions)];
        for p in 0..partitions {
            if let Some(below) = starts[usize::from(p)] {
                let found = store.dead_letters(p, Some(below), limit + 1)?;
                fetched[usize::from(p)] = found.len();
                candidates.extend(found);
            }
        }
        candidates.sort_by(|a, b| {
            b.recorded_at_ms
                .cmp(&a.recorded_at_ms)
                .then(a.partition.cmp(&b.partition))
                .then(b.sequence.cmp(&a.sequence))
        });
        candidates.truncate(limit);
        let mut resume = starts.clone();
        let mut taken = vec![0usize; usize::from(partitions)];
        for r in &candidates {
            let i = usize::from(r.partition);
            taken[i] += 1;
            // Newest first within a partition: the last one is the oldest.
            resume[i] = Some(r.sequence);
        }
        let parts: Vec<String> = (0..partitions)
            .filter(|&p| fetched[usize::from(p)] > taken[usize::from(p)])
            .filter_map(|p| resume[usize::from(p)].map(|s| format!("{p}.{s}")))
            .collect();
        let next = (!parts.is_empty()).then(|| parts.join("-"));
        Ok((candidates, next))
    })
    .await?;
    Ok(Json(Response {
        dead_letters: records
            .into_iter()
            .map(|r| Item {
                partition: r.partition,
                sequence: r.sequence,
                reason: r.reason,
                event_time: format_rfc3339_ms(r.event_ms),
                recorded_at: format_rfc3339_ms(r.recorded_at_ms),
                event: serde_json::from_str(&r.event_json)
                    .unwrap_or(serde_json::Value::String(r.event_json)),
            })
            .collect(),
        next_cursor,
    }))
}
