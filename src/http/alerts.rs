//! The event channel for people and systems: `GET /v1/alerts/stream`
//! (Server-Sent Events) and `GET /v1/alerts/ws` (WebSocket, one JSON text
//! message per event, whose `stream_id` is the event's SSE id), with the
//! same filters.
//!
//! With `Last-Event-ID` (header, or `last_event_id` in the query) the
//! stream first replays the persisted log after that id, then continues
//! live; without it, it starts live. In Kafka mode the streams carry the
//! whole cluster's events (mirrored from the alert topic, see
//! `tally_actors::kafka::alert_mirror`) and an id is a position in that
//! topic (`c` and one offset per partition), valid at every instance. A subscriber that falls behind the
//! bounded live buffer catches up from the log, so it misses nothing; the
//! engine never waits for it.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use tally_actors::alerts::{AlertEvent, AlertLog, EVENT_TYPES};
use tally_actors::kafka::alert_mirror::{ClusterAlerts, ClusterEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use super::AppState;
use crate::error::{ApiError, FieldProblem};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/alerts/stream", get(stream))
        .route("/v1/alerts/ws", get(websocket))
}

/// Log entries read per catch-up step.
const CATCH_UP_BATCH: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    client_id: Option<String>,
    /// Comma-separated event types.
    types: Option<String>,
    last_event_id: Option<String>,
}

struct Filter {
    client: Option<String>,
    types: Option<BTreeSet<String>>,
}

impl Filter {
    fn matches(&self, e: &AlertEvent) -> bool {
        self.client.as_ref().is_none_or(|c| *c == e.client_id)
            && self
                .types
                .as_ref()
                .is_none_or(|t| t.contains(&e.event_type))
    }
}

/// Where a subscription reads from: this instance's log, or (Kafka mode)
/// the whole cluster's, mirrored from the alert topic.
enum Feed {
    Local {
        log: Arc<AlertLog>,
        live: Receiver<Arc<AlertEvent>>,
        /// The last event id handled (sent or filtered out).
        cursor: u64,
    },
    Cluster {
        mirror: Arc<ClusterAlerts>,
        live: Receiver<Arc<ClusterEvent>>,
        /// Per alert topic partition, the next offset not handled yet.
        cursor: Vec<u64>,
    },
}

/// Where a cluster stream stands, as its SSE ids carry it: `c` and the
/// next offset of each alert topic partition, dot-separated. The same at
/// every instance, since every instance mirrors the same topic.
fn cluster_cursor(cursor: &[u64]) -> String {
    let mut id = String::from("c");
    for (i, o) in cursor.iter().enumerate() {
        if i > 0 {
            id.push('.');
        }
        id.push_str(&o.to_string());
    }
    id
}

fn parse_cluster_cursor(id: &str, partitions: u16) -> Option<Vec<u64>> {
    let offsets: Vec<u64> = id
        .strip_prefix('c')?
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    (offsets.len() == usize::from(partitions)).then_some(offsets)
}

struct Subscription {
    feed: Feed,
    /// Events read from the log, not sent yet.
    pending: VecDeque<Pending>,
    /// Still replaying the log (live events wait in the broadcast buffer).
    catching_up: bool,
    filter: Filter,
    /// One of the bounded subscription slots, given back when the stream
    /// ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// An event read and where it came from (cluster: topic partition and
/// offset).
struct Pending {
    event: AlertEvent,
    at: Option<(u16, u64)>,
}

/// An event to send, with the SSE id that resumes right after it.
struct Next {
    event: AlertEvent,
    id: String,
}

fn sse(n: &Next) -> Event {
    Event::default()
        .id(n.id.clone())
        .event(n.event.event_type.clone())
        .data(&*n.event.to_json())
}

/// A WebSocket message: the event's JSON with `stream_id` first, the id
/// an SSE stream would give it (resume with `?last_event_id=`), since a
/// WebSocket has no id of its own to carry it.
fn ws_text(n: &Next) -> String {
    let json = n.event.to_json();
    let id = serde_json::Value::String(n.id.clone());
    match json.strip_prefix('{') {
        Some(rest) if rest.trim_start() != "}" => format!("{{\"stream_id\":{id},{rest}"),
        _ => format!("{{\"stream_id\":{id}}}"),
    }
}

impl Subscription {
    /// Moves the cursor past `p`; the event if it passes the filter.
    fn handle(&mut self, p: Pending) -> Option<Next> {
        let id = match (&mut self.feed, p.at) {
            (Feed::Local { cursor, .. }, _) => {
                *cursor = p.event.event_id;
                p.event.event_id.to_string()
            }
            (Feed::Cluster { cursor, .. }, Some((partition, offset))) => {
                if let Some(c) = cursor.get_mut(usize::from(partition)) {
                    *c = offset + 1;
                }
                cluster_cursor(cursor)
            }
            (Feed::Cluster { .. }, None) => return None,
        };
        self.filter
            .matches(&p.event)
            .then_some(Next { event: p.event, id })
    }

    /// Reads the next batch from the log into `pending`; false when the
    /// log has nothing after the cursor.
    fn catch_up(&mut self) -> bool {
        let read = match &self.feed {
            Feed::Local { log, cursor, .. } => log.after(*cursor, CATCH_UP_BATCH).map(|batch| {
                batch
                    .into_iter()
                    .map(|event| Pending { event, at: None })
                    .collect::<Vec<_>>()
            }),
            Feed::Cluster { mirror, cursor, .. } => {
                // A batch of each partition in turn: one busy partition
                // does not hold back the others.
                let mut all = Vec::new();
                let mut result = Ok(());
                for (p, from) in cursor.iter().enumerate() {
                    let Ok(p) = u16::try_from(p) else { break };
                    match mirror.from(p, *from, CATCH_UP_BATCH) {
                        Ok(batch) => all.extend(batch.into_iter().map(|c| Pending {
                            at: Some((c.partition, c.offset)),
                            event: c.event,
                        })),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result.map(|()| all)
            }
        };
        match read {
            Ok(batch) if !batch.is_empty() => {
                self.pending.extend(batch);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "alert log unreadable; continuing live");
                false
            }
        }
    }

    /// The next live event not handled yet; `None` when the channel closed.
    async fn live(&mut self) -> Option<Result<Pending, RecvError>> {
        match &mut self.feed {
            Feed::Local { live, cursor, .. } => loop {
                match live.recv().await {
                    Ok(e) if e.event_id <= *cursor => {}
                    Ok(e) => {
                        return Some(Ok(Pending {
                            event: (*e).clone(),
                            at: None,
                        }))
                    }
                    Err(RecvError::Closed) => return None,
                    Err(e) => return Some(Err(e)),
                }
            },
            Feed::Cluster { live, cursor, .. } => loop {
                match live.recv().await {
                    Ok(e)
                        if cursor
                            .get(usize::from(e.partition))
                            .is_none_or(|c| e.offset < *c) => {}
                    Ok(e) => {
                        return Some(Ok(Pending {
                            event: e.event.clone(),
                            at: Some((e.partition, e.offset)),
                        }))
                    }
                    Err(RecvError::Closed) => return None,
                    Err(e) => return Some(Err(e)),
                }
            },
        }
    }

    async fn next(&mut self) -> Option<Next> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                if let Some(n) = self.handle(p) {
                    return Some(n);
                }
                continue;
            }
            if self.catching_up && self.catch_up() {
                continue;
            }
            self.catching_up = false;
            match self.live().await? {
                Ok(p) => {
                    if let Some(n) = self.handle(p) {
                        return Some(n);
                    }
                }
                // Fell behind the live buffer: the log has everything.
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "slow alert subscriber catches up from the log");
                    self.catching_up = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn subscription(
    state: &AppState,
    headers: &HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Subscription, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let types = match &params.types {
        None => None,
        Some(list) => {
            let set: BTreeSet<String> = list
                .split(',')
                .map(|t| t.trim().to_ascii_uppercase())
                .filter(|t| !t.is_empty())
                .collect();
            if let Some(bad) = set.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
                return Err(ApiError::bad_request(
                    "invalid alert stream filter",
                    vec![FieldProblem::field(
                        "types",
                        format!("unknown event type {bad:?}; use {}", EVENT_TYPES.join(", ")),
                    )],
                ));
            }
            Some(set)
        }
    };
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let resume_from = header_id.or(params.last_event_id);
    // Subscribe before reading where the log ends, so nothing falls in
    // between.
    let feed = match &state.cluster_alerts {
        None => {
            let log = state.alerts.clone();
            let live = log.subscribe();
            let cursor = match &resume_from {
                None => log.last_id(),
                Some(id) => id.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid Last-Event-ID",
                        vec![FieldProblem::field(
                            "last_event_id",
                            format!(
                                "{id:?} is not an event id of this instance's stream (a number)"
                            ),
                        )],
                    )
                })?,
            };
            Feed::Local { log, live, cursor }
        }
        Some(mirror) => {
            let live = mirror.subscribe();
            let cursor = match &resume_from {
                None => mirror.ends(),
                Some(id) => parse_cluster_cursor(id, mirror.partitions()).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid Last-Event-ID",
                        vec![FieldProblem::field(
                            "last_event_id",
                            format!(
                                "{id:?} is not a position of the cluster's stream: resume with the id of the last event received (c and {} dot-separated offsets)",
                                mirror.partitions()
                            ),
                        )],
                    )
                })?,
            };
            Feed::Cluster {
                mirror: mirror.clone(),
                live,
                cursor,
            }
        }
    };
    let slot = state.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::Overloaded {
            detail: format!(
                "{} alert subscriptions are open, the configured maximum (max_subscribers); retry later",
                state.config.max_subscribers
            ),
            retry_after_secs: 5,
        }
    })?;
    Ok(Subscription {
        catching_up: resume_from.is_some(),
        feed,
        pending: VecDeque::new(),
        _slot: slot,
        filter: Filter {
            client: params.client_id,
            types,
        },
    })
}

async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let subscription = subscription(&state, &headers, q)?;
    let events = futures::stream::unfold(subscription, |mut s| async move {
        let n = s.next().await?;
        Some((Ok(sse(&n)), s))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn websocket(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let mut subscription = subscription(&state, &headers, q)?;
    Ok(upgrade.on_upgrade(move |mut socket: WebSocket| async move {
        loop {
            tokio::select! {
                event = subscription.next() => {
                    let Some(n) = event else { break };
                    let text = ws_text(&n);
                    // A slow reader holds this send (TCP back-pressure); the
                    // subscription meanwhile falls behind the live buffer
                    // and later catches up from the log: bounded memory.
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }))
}
