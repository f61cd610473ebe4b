//! The event channel for people and systems: `GET /v1/alerts/stream`
//! (Server-Sent Events) and `GET /v1/alerts/ws` (WebSocket, one JSON text
//! message per event), with the same filters.
//!
//! With `Last-Event-ID` (header, or `last_event_id` in the query) the
//! stream first replays the persisted log after that id, then continues
//! live; without it, it starts live. A subscriber that falls behind the
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
    last_event_id: Option<u64>,
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

struct Subscription {
    log: Arc<AlertLog>,
    live: Receiver<Arc<AlertEvent>>,
    /// Events read from the log, not sent yet.
    pending: VecDeque<AlertEvent>,
    /// The last event id handled (sent or filtered out).
    cursor: u64,
    /// Still replaying the log (live events wait in the broadcast buffer).
    catching_up: bool,
    filter: Filter,
    /// One of the bounded subscription slots, given back when the stream
    /// ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

fn sse(e: &AlertEvent) -> Event {
    Event::default()
        .id(e.event_id.to_string())
        .event(e.event_type.clone())
        .data(&*e.to_json())
}

impl Subscription {
    async fn next(&mut self) -> Option<AlertEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.cursor = e.event_id;
                if self.filter.matches(&e) {
                    return Some(e);
                }
                continue;
            }
            if self.catching_up {
                match self.log.after(self.cursor, CATCH_UP_BATCH) {
                    Ok(batch) if !batch.is_empty() => {
                        self.pending.extend(batch);
                        continue;
                    }
                    Ok(_) => self.catching_up = false,
                    Err(e) => {
                        tracing::warn!(error = %e, "alert log unreadable; continuing live");
                        self.catching_up = false;
                    }
                }
            }
            match self.live.recv().await {
                Ok(e) if e.event_id <= self.cursor => {}
                Ok(e) => {
                    self.cursor = e.event_id;
                    if self.filter.matches(&e) {
                        return Some((*e).clone());
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
    let slot = state.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::Overloaded {
            detail: format!(
                "{} alert subscriptions are open, the configured maximum (max_subscribers); retry later",
                state.config.max_subscribers
            ),
            retry_after_secs: 5,
        }
    })?;
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
        .and_then(|v| v.trim().parse::<u64>().ok());
    let resume_from = header_id.or(params.last_event_id);
    let log = state.alerts.clone();
    // Subscribe before reading the log, so nothing falls in between.
    let live = log.subscribe();
    let subscription = Subscription {
        cursor: resume_from.unwrap_or_else(|| log.last_id()),
        catching_up: resume_from.is_some(),
        log,
        live,
        pending: VecDeque::new(),
        _slot: slot,
        filter: Filter {
            client: params.client_id,
            types,
        },
    };
    Ok(subscription)
}

async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let subscription = subscription(&state, &headers, q)?;
    let events = futures::stream::unfold(subscription, |mut s| async move {
        let e = s.next().await?;
        Some((Ok(sse(&e)), s))
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
                    let Some(e) = event else { break };
                    let text = e.to_json().to_string();
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
