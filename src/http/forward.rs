//! Requests for clients owned by another instance (Kafka mode): a client's
//! usage, limits and quota live on the instance that owns its partition,
//! so a request is answered there, forwarded once from whichever instance
//! received it.
//! A forwarded request that lands on a non-owner (ownership moved in
//! between) is refused with 503 + Retry-After rather than bounced around.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tally_actors::kafka::membership::Owner;

use super::AppState;
use crate::error::ApiError;

/// Marks a forwarded request (and names the instance that forwarded it).
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-tally-forwarded-by");
/// The instance that answered.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-tally-served-by");
/// On a forwarded request: the address of the original caller, which the
/// owner judges key allowlists against (taken only from a live member).
pub const PEER_IP: HeaderName = HeaderName::from_static("x-tally-peer-ip");
/// On a read answered from local state while its partition has no owner:
/// the last offset of the request topic applied to that state.
pub const AS_OF_OFFSET: HeaderName = HeaderName::from_static("x-tally-as-of-offset");

const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Client routes take small JSON bodies (configurations).
const MAX_FORWARDED_BODY: usize = 1 << 20;

/// Route layer for `/v1/clients/{client_id}/...` reads.
pub async fn to_owner(
    State(state): State<AppState>,
    path: Result<Path<HashMap<String, String>>, PathRejection>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(membership), Ok(Path(params))) = (&state.membership, path) else {
        return next.run(req).await;
    };
    let Some(client) = params.get("client_id") else {
        return next.run(req).await;
    };
    match owner_of(&state, client, req.headers()) {
        Ok(None) => {
            let mut response = next.run(req).await;
            if let Ok(v) = HeaderValue::from_str(membership.address()) {
                response.headers_mut().insert(SERVED_BY, v);
            }
            response
        }
        Ok(Some(owner)) => match forward(&state, membership.address(), &owner, req).await {
            Ok(response) => response,
            Err(detail) => ApiError::OwnerUnreachable {
                partition: state.shards.partition_of(client),
                owner,
                detail,
            }
            .into_response(),
        },
        Err(e) => {
            // No instance owns the partition right now (a restart, a
            // rebalance): a read is answered from this instance's copy if
            // it has one, marked with how far that copy goes.
            let partition = state.shards.partition_of(client);
            let unowned = matches!(membership.owner(partition), Owner::Unknown);
            match local_as_of(&state, partition) {
                Some(offset) if unowned && req.method() == axum::http::Method::GET => {
                    let mut response = next.run(req).await;
                    response
                        .headers_mut()
                        .insert(AS_OF_OFFSET, HeaderValue::from(offset));
                    if let Ok(v) = HeaderValue::from_str(membership.address()) {
                        response.headers_mut().insert(SERVED_BY, v);
                    }
                    response
                }
                _ => e.into_response(),
            }
        }
    }
}

/// The last request-topic offset applied to this instance's state of
/// `partition`, if it ever applied any.
fn local_as_of(state: &AppState, partition: u16) -> Option<u64> {
    let key = state.config.kafka.as_ref()?.position_key();
    let checkpoint = state.store.load_checkpoint(partition).ok()?;
    checkpoint.positions.get(&key).copied()
}

pub(crate) async fn forward(
    state: &AppState,
    me: &str,
    owner: &str,
    req: Request,
) -> Result<Response, String> {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    // The caller's address as this instance judged it (a caller's own
    // header of that name is not taken: only a member's).
    headers.remove(&PEER_IP);
    let caller = req
        .extensions()
        .get::<crate::access::Origin>()
        .and_then(|o| o.ip.as_deref())
        .and_then(|ip| HeaderValue::from_str(ip).ok());
    if let Some(ip) = caller {
        headers.insert(PEER_IP, ip);
    }
    let body = axum::body::to_bytes(req.into_body(), MAX_FORWARDED_BODY)
        .await
        .map_err(|e| e.to_string())?;
    send(state, me, owner, &method, &path, &headers, body).await
}

/// `headers` to pass on to another member: the caller's address as this
/// instance judged it (`origin`), never a caller's own header of that name.
pub fn with_caller_address(
    headers: &HeaderMap,
    origin: Option<&crate::access::Origin>,
) -> HeaderMap {
    let mut pass_on = headers.clone();
    pass_on.remove(&PEER_IP);
    if let Some(ip) = origin
        .and_then(|o| o.ip.as_deref())
        .and_then(|ip| HeaderValue::from_str(ip).ok())
    {
        pass_on.insert(PEER_IP, ip);
    }
    pass_on
}

/// Where a request about `client` must be answered: `Ok(None)` here,
/// `Ok(Some(owner))` at another instance, `Err` nowhere right now.
pub fn owner_of(
    state: &AppState,
    client: &str,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let Some(membership) = &state.membership else {
        return Ok(None);
    };
    let partition = state.shards.partition_of(client);
    match membership.owner(partition) {
        Owner::Local => Ok(None),
        Owner::Remote(owner) if !headers.contains_key(&FORWARDED_BY) => Ok(Some(owner)),
        Owner::Remote(_) | Owner::Unknown => Err(ApiError::PartitionMoving { partition }),
    }
}

/// Sends one request to `owner` and relays its answer.
pub async fn send(
    state: &AppState,
    me: &str,
    owner: &str,
    method: &axum::http::Method,
    path: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, String> {
    let method =
        reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut outgoing = state
        .http_client
        .request(method, format!("{owner}{path}"))
        .timeout(FORWARD_TIMEOUT)
        .header(FORWARDED_BY.as_str(), me);
    // The owner judges the key again (it has the same key ring).
    for name in [
        "x-request-id",
        "content-type",
        "authorization",
        "x-api-key",
        "if-match",
        PEER_IP.as_str(),
    ] {
        if let Some(v) = headers.get(name) {
            outgoing = outgoing.header(name, v.as_bytes());
        }
    }
    let answer = outgoing
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let body = answer.bytes().await.map_err(|e| e.to_string())?;
    let mut response = Response::builder()
        .status(status.as_u16())
        .body(Body::from(body))
        .map_err(|e| e.to_string())?;
    for name in [
        "content-type",
        "retry-after",
        "ratelimit",
        "ratelimit-policy",
        "etag",
        SERVED_BY.as_str(),
    ] {
        if let Some(v) = answer_headers
            .get(name)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                response.headers_mut().insert(name, v);
            }
        }
    }
    Ok(response)
}
