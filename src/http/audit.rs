//! `GET /v1/audit?actor=&action=&client_id=&from=&to=&cursor=&limit=`:
//! control changes and refused requests, newest first.
//!
//! In Kafka mode every instance applies every control change, so each
//! holds the whole history of changes; refused requests are audited
//! where they were refused. A query at any instance answers for the
//! cluster: its own records, merged with the refusals of every other
//! live instance. The order is (time, instance, sequence), newest first;
//! a cursor names a position in it, and each instance works out from the
//! cursor where its own records continue, so pages neither skip nor
//! repeat a record.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant};

use super::forward::FORWARDED_BY;
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

#[derive(Serialize, Deserialize)]
struct Shown {
    /// The record's position: pass it as `cursor` to continue after it.
    id: String,
    at: String,
    /// The instance that wrote it (Kafka mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    instance: String,
    #[serde(flatten)]
    entry: AuditEntry,
}

#[derive(Serialize, Deserialize)]
struct AuditPage {
    records: Vec<Shown>,
    next_cursor: Option<String>,
}

/// Records read at most per request, matching or not.
const SCAN_LIMIT: usize = 50_000;
/// The one action recorded only where it happened.
const REFUSED: &str = "request.refused";

fn bad(field: &str, reason: String) -> ApiError {
    ApiError::bad_request(
        "invalid query parameters",
        vec![FieldProblem::field(field, reason)],
    )
}

/// A place in the cluster-wide order: newest first by time, then
/// instance, then the instance's own sequence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    at_ms: i64,
    instance: String,
    seq: u64,
}

impl Position {
    /// `at.seq` alone, `at.seq.<instance as hex>` in a cluster.
    fn encode(&self) -> String {
        if self.instance.is_empty() {
            return format!("{}.{}", self.at_ms, self.seq);
        }
        let hex: String = self.instance.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}.{}.{hex}", self.at_ms, self.seq)
    }

    fn decode(c: &str) -> Option<Position> {
        let mut parts = c.splitn(3, '.');
        let at_ms = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let instance = match parts.next() {
            None => String::new(),
            Some(hex) => {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect::<Option<Vec<u8>>>()?;
                String::from_utf8(bytes).ok()?
            }
        };
        Some(Position {
            at_ms,
            instance,
            seq,
        })
    }

    /// Where `me`'s own records continue after this position (the store's
    /// exclusive `(at, seq)` bound).
    fn continue_at(&self, me: &str) -> (i64, u64) {
        match me.cmp(self.instance.as_str()) {
            std::cmp::Ordering::Equal => (self.at_ms, self.seq),
            // Mine come after the cursor's instance at the same time.
            std::cmp::Ordering::Less => (self.at_ms, u64::MAX),
            std::cmp::Ordering::Greater => (self.at_ms, 0),
        }
    }
}

/// One instance's records, and where it stopped reading (if it did
/// before the start of the range).
struct Source {
    records: Vec<(Position, Shown)>,
    stop: Option<Position>,
}

async fn list(
    State(state): State<AppState>,
    origin: Option<Extension<crate::access::Origin>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
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
    let cursor = match &q.cursor {
        Some(c) => Some(Position::decode(c).ok_or_else(page::bad_cursor)?),
        None => None,
    };
    let me = state
        .membership
        .as_ref()
        .map(|m| m.address().to_string())
        .unwrap_or_default();
    // Asked by another instance: only what happened here.
    let forwarded = headers.contains_key(&FORWARDED_BY);
    let mut before = cursor.as_ref().map(|c| c.continue_at(&me));
    // `to` is exclusive: start just before it unless the cursor is older.
    if let Some(to) = to_ms {
        let at_to = (to, 0);
        if before.is_none_or(|b| b > at_to) {
            before = Some(at_to);
        }
    }
    let local = read_local(&state, &q, &me, before, from_ms, limit, forwarded).await?;
    if forwarded {
        return Ok(Json(AuditPage {
            next_cursor: local.stop.as_ref().map(Position::encode),
            records: local.records.into_iter().map(|(_, r)| r).collect(),
        }));
    }
    let mut sources = vec![local];
    let peers = state
        .membership
        .as_ref()
        .map(|m| m.live_peers())
        .unwrap_or_default();
    let mut credentials = reqwest::header::HeaderMap::new();
    for name in [header::AUTHORIZATION.as_str(), "x-api-key", "x-request-id"] {
        if let Some(v) = headers.get(name) {
            if let (Ok(n), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                credentials.insert(n, v);
            }
        }
    }
    // The caller's address as judged here: the peer judges its key's
    // allowlist against it (see `auth::peer_of`).
    let caller = origin
        .as_ref()
        .and_then(|Extension(o)| o.ip.as_deref())
        .and_then(|ip| reqwest::header::HeaderValue::from_str(ip).ok());
    if let Some(ip) = caller {
        credentials.insert(
            reqwest::header::HeaderName::from_static("x-tally-peer-ip"),
            ip,
        );
    }
    let query = raw.as_deref().unwrap_or("");
    for peer in peers {
        sources.push(ask(&state, &me, &peer, query, credentials.clone()).await?);
    }
    Ok(Json(merge(sources, limit)))
}

#[allow(clippy::too_many_arguments)]
async fn read_local(
    state: &AppState,
    q: &AuditQuery,
    me: &str,
    before: Option<(i64, u64)>,
    from_ms: i64,
    limit: usize,
    refusals_only: bool,
) -> Result<Source, ApiError> {
    let audit = state.audit.clone();
    let (actor, action, client) = (q.actor.clone(), q.action.clone(), q.client_id.clone());
    let (records, stop) = blocking(move || {
        let keep = |json: &[u8]| {
            let Ok(e) = serde_json::from_slice::<AuditEntry>(json) else {
                return false;
            };
            (!refusals_only || e.action == REFUSED)
                && actor.as_ref().is_none_or(|a| &e.actor == a)
                && action.as_ref().is_none_or(|a| &e.action == a)
                && client.as_ref().is_none_or(|c| e.client_ids.contains(c))
        };
        Ok(audit
            .store()
            .audit_backward(before, from_ms, limit, SCAN_LIMIT, keep)?)
    })
    .await?;
    let at = |(at_ms, seq)| Position {
        at_ms,
        instance: me.to_string(),
        seq,
    };
    let records = records
        .into_iter()
        .filter_map(|r| {
            let entry = serde_json::from_slice::<AuditEntry>(&r.json).ok()?;
            let position = at((r.at_ms, r.seq));
            Some((
                position.clone(),
                Shown {
                    id: position.encode(),
                    at: format_rfc3339_ms(entry.at_ms),
                    instance: me.to_string(),
                    entry,
                },
            ))
        })
        .collect();
    Ok(Source {
        records,
        stop: stop.map(at),
    })
}

/// Another instance's refusals for the same query (which judges the
/// caller's key again: it has the same key ring).
async fn ask(
    state: &AppState,
    me: &str,
    peer: &str,
    query: &str,
    credentials: reqwest::header::HeaderMap,
) -> Result<Source, ApiError> {
    let unreachable = |detail: String| {
        tracing::error!(peer, error = %detail, "an instance did not answer an audit query");
        ApiError::Unavailable(
            "an instance of the cluster did not answer the audit query; retry shortly".into(),
        )
    };
    let answer = state
        .http_client
        .get(format!("{peer}/v1/audit?{query}"))
        .timeout(std::time::Duration::from_secs(10))
        .header(FORWARDED_BY.as_str(), me)
        .headers(credentials)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if !answer.status().is_success() {
        return Err(unreachable(format!("answered {}", answer.status())));
    }
    let page: AuditPage = answer
        .json()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut records = Vec::with_capacity(page.records.len());
    for r in page.records {
        let position =
            Position::decode(&r.id).ok_or_else(|| unreachable(format!("record id {:?}", r.id)))?;
        records.push((position, r));
    }
    let stop = match page.next_cursor {
        Some(c) => Some(Position::decode(&c).ok_or_else(|| unreachable(format!("cursor {c:?}")))?),
        None => None,
    };
    Ok(Source { records, stop })
}

/// The newest `limit` records of all sources. A source that stopped
/// reading early (its page was full, or it scanned its budget) may hold
/// more records older than where it stopped, so nothing older than the
/// newest such stop is answered on this page.
fn merge(sources: Vec<Source>, limit: usize) -> AuditPage {
    let frontier = sources.iter().filter_map(|s| s.stop.clone()).max();
    let mut all: Vec<(Position, Shown)> = sources.into_iter().flat_map(|s| s.records).collect();
    all.sort_by(|a, b| b.0.cmp(&a.0));
    let mut records = Vec::new();
    let mut last = None;
    for (position, shown) in all {
        if records.len() == limit || frontier.as_ref().is_some_and(|f| position < *f) {
            break;
        }
        last = Some(position);
        records.push(shown);
    }
    // A full page continues after its last record; a short one after
    // the frontier (every record before it is on this page).
    let next = if records.len() == limit {
        last
    } else {
        frontier.clone()
    };
    // Done only when every source was read to the start of the range and
    // every record fitted.
    let complete = frontier.is_none() && records.len() < limit;
    AuditPage {
        next_cursor: if complete {
            None
        } else {
            next.map(|p| p.encode())
        },
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: i64, action: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            actor: "k".into(),
            action: action.into(),
            target: "t".into(),
            client_ids: vec![],
            request_id: None,
            ip: None,
            result: "r".into(),
        }
    }

    /// One instance's log, read as the store reads it: newest first from
    /// an exclusive `(at, seq)` bound, at most `limit` kept records and
    /// `scan_limit` scanned ones.
    fn read(
        log: &[(i64, u64, bool)],
        me: &str,
        cursor: Option<&Position>,
        limit: usize,
        scan_limit: usize,
    ) -> Source {
        let before = cursor.map(|c| c.continue_at(me));
        let mut newest_first: Vec<&(i64, u64, bool)> = log
            .iter()
            .filter(|(at, seq, _)| before.is_none_or(|b| (*at, *seq) < b))
            .collect();
        newest_first.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
        let at = |at_ms: i64, seq: u64| Position {
            at_ms,
            instance: me.to_string(),
            seq,
        };
        let mut records = vec![];
        for (scanned, (at_ms, seq, kept)) in newest_first.into_iter().enumerate() {
            if *kept {
                let p = at(*at_ms, *seq);
                records.push((
                    p.clone(),
                    Shown {
                        id: p.encode(),
                        at: String::new(),
                        instance: me.to_string(),
                        entry: entry(*at_ms, REFUSED),
                    },
                ));
                if records.len() == limit {
                    return Source {
                        records,
                        stop: Some(p),
                    };
                }
            }
            if scanned + 1 >= scan_limit {
                return Source {
                    records,
                    stop: Some(at(*at_ms, *seq)),
                };
            }
        }
        Source {
            records,
            stop: None,
        }
    }

    #[test]
    fn pages_of_a_cluster_wide_audit_neither_skip_nor_repeat() {
        let instances = [
            "http://10.0.0.1:8080",
            "http://10.0.0.2:8080",
            "http://10.0.0.3:8080",
        ];
        // Times with many ties within and across instances; one record in
        // three is filtered out (so the scan budget also stops a read).
        let mut state = 7u64;
        let mut logs: Vec<Vec<(i64, u64, bool)>> = vec![];
        for _ in &instances {
            let mut log = vec![];
            for seq in 0..60u64 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = 1000 + (state >> 60) as i64;
                log.push((at, seq, (state >> 33) % 3 != 0));
            }
            logs.push(log);
        }
        let mut want: Vec<Position> = vec![];
        for (i, log) in logs.iter().enumerate() {
            for (at_ms, seq, kept) in log {
                if *kept {
                    want.push(Position {
                        at_ms: *at_ms,
                        instance: instances[i].to_string(),
                        seq: *seq,
                    });
                }
            }
        }
        want.sort_by(|a, b| b.cmp(a));
        for (limit, scan_limit) in [(1, 1000), (7, 1000), (5, 4), (1000, 1000), (3, 2)] {
            let mut got = vec![];
            let mut cursor: Option<Position> = None;
            for _ in 0..10_000 {
                let sources = instances
                    .iter()
                    .zip(&logs)
                    .map(|(me, log)| read(log, me, cursor.as_ref(), limit, scan_limit))
                    .collect();
                let page = merge(sources, limit);
                assert!(page.records.len() <= limit);
                got.extend(
                    page.records
                        .iter()
                        .map(|r| Position::decode(&r.id).unwrap()),
                );
                match page.next_cursor {
                    Some(c) => cursor = Some(Position::decode(&c).unwrap()),
                    None => break,
                }
            }
            assert_eq!(got, want, "limit {limit}, scan limit {scan_limit}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_an_old_one_still_reads() {
        let p = Position {
            at_ms: 1_764_000_000_000,
            instance: "http://[::1]:8080".into(),
            seq: 42,
        };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        let alone = Position::decode("17.3").unwrap();
        assert_eq!(
            (alone.at_ms, alone.seq, alone.instance.as_str()),
            (17, 3, "")
        );
        assert_eq!(Position::decode("17.3.zz"), None);
        assert_eq!(Position::decode("17"), None);
    }
}
