//! Who may call which route: the one table of route rules, and the layer
//! that applies it to every matched request before its handler runs, so a
//! refused request costs nothing (no limiter unit, no quota, no state).
//!
//! A request carries `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
//! No key: 401. A key that is unknown, wrong, expired, revoked, out of
//! scope, outside its clients or its allowlist: 403, one text for all;
//! the cause goes to the log (with the public key id, never the secret)
//! and to `tally_auth_refusals_total{reason}`.
//!
//! Handlers whose body names clients (`/v1/events`, `/v1/check`) check
//! those against the [`Principal`] this layer leaves in the request's
//! extensions, with [`permit_client`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::counter;
use tally_actors::telemetry::AUTH_REFUSALS;
use tally_pipelines::access::{Principal, Refusal, Scope};
use tally_state::retention::wall_clock_ms;

use super::AppState;
use crate::access::Origin;
use crate::audit::AuditEntry;
use crate::error::ApiError;
use crate::jwt::{JwtRefusal, JwtVerifier};

/// What a route asks of a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Never keyed (liveness).
    Open,
    /// Readiness and metrics: open unless configured keyed (then `read`).
    Ops,
    /// A key with this scope; `all_clients` when the route spans clients
    /// (a key limited to some clients may not list everyone's).
    Need { scope: Scope, all_clients: bool },
}

const fn need(scope: Scope) -> Rule {
    Rule::Need {
        scope,
        all_clients: false,
    }
}

const fn need_all(scope: Scope) -> Rule {
    Rule::Need {
        scope,
        all_clients: true,
    }
}

/// The rule of a matched route (its template). Routes not named here
/// need an unrestricted admin key: a new route is closed until it is
/// given a rule.
pub fn rule(method: &Method, route: &str) -> Rule {
    let write = !matches!(*method, Method::GET | Method::HEAD);
    match route {
        "/health/live" => Rule::Open,
        "/health/ready" | "/metrics" => Rule::Ops,
        // Carries internal detail (owners, broker errors).
        "/health/detailed" => need_all(Scope::Admin),
        "/v1/events" => need(Scope::Ingest),
        // Series belong to no client: a key limited to some clients
        // neither posts nor reads them.
        "/v1/telemetry" if write => need_all(Scope::Ingest),
        "/v1/telemetry" | "/v1/telemetry/{series}" | "/v1/telemetry/correlate" => {
            need_all(Scope::Read)
        }
        "/v1/check" => need(Scope::Check),
        "/v1/queue-health" if write => need_all(Scope::Admin),
        "/v1/queue-health" => need_all(Scope::Read),
        "/v1/clients/{client_id}/limits"
        | "/v1/clients/{client_id}/limits/counters"
        | "/v1/clients/{client_id}/quota"
            if write =>
        {
            need(Scope::Admin)
        }
        "/v1/clients/{client_id}/limits"
        | "/v1/clients/{client_id}/limits/status"
        | "/v1/clients/{client_id}/quota"
        | "/v1/clients/{client_id}/quota/status"
        | "/v1/clients/{client_id}/usage"
        | "/v1/clients/{client_id}/usage/endpoints"
        | "/v1/clients/{client_id}/usage/history"
        | "/v1/clients/{client_id}/anomalies" => need(Scope::Read),
        "/v1/clients/{client_id}/plan" | "/v1/clients/{client_id}/adjustments" if write => {
            need(Scope::Admin)
        }
        "/v1/clients/{client_id}/reports/billing"
        | "/v1/clients/{client_id}/plan"
        | "/v1/clients/{client_id}/adjustments" => need(Scope::Billing),
        "/v1/plans" | "/v1/plans/{plan_id}" if write => need_all(Scope::Admin),
        "/v1/plans" | "/v1/plans/{plan_id}" | "/v1/reports/billing" => need_all(Scope::Billing),
        "/v1/usage/top"
        | "/v1/anomalies"
        | "/v1/alerts/stream"
        | "/v1/alerts/ws"
        | "/v1/dead-letters"
        | "/v1/dead-letters/kafka" => need_all(Scope::Read),
        // Key management: a restricted admin key manages its own subtree
        // (the handlers check which keys).
        "/v1/keys" | "/v1/keys/{key_id}" | "/v1/keys/{key_id}/rotate" => need(Scope::Admin),
        "/v1/webhooks" | "/v1/webhooks/{id}" | "/v1/audit" => need_all(Scope::Admin),
        _ => need_all(Scope::Admin),
    }
}

/// The key a request presents, if any: `Authorization: Bearer` first,
/// then `X-Api-Key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(token) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(token.trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Logs, counts and audits a refusal; answers the one 403. The key id is
/// public and base62 when it parsed; nothing else of the presented text
/// is logged (no log injection, no secret by accident).
fn refuse(
    state: &AppState,
    route: &str,
    cause: &'static str,
    key_id: Option<&str>,
    client_id: Option<&str>,
    origin: &Origin,
) -> Response {
    counter!(AUTH_REFUSALS, "reason" => cause).increment(1);
    tracing::warn!(
        route,
        cause,
        key_id = key_id.unwrap_or("-"),
        peer = origin.ip.as_deref().unwrap_or("-"),
        "request refused"
    );
    state.audit.record(&AuditEntry {
        at_ms: wall_clock_ms(),
        actor: key_id.unwrap_or("-").to_string(),
        action: "request.refused".into(),
        target: route.to_string(),
        client_ids: client_id.map(|c| vec![c.to_string()]).unwrap_or_default(),
        request_id: origin.request_id.clone(),
        ip: origin.ip.clone(),
        result: cause.to_string(),
    });
    ApiError::Forbidden.into_response()
}

/// The request id (set by the request-id layer, or the caller's) and the
/// peer address, for the audit trail.
fn origin_of(state: &AppState, req: &Request) -> Origin {
    Origin {
        request_id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(128).collect()),
        ip: peer_of(state, req).map(|ip| ip.to_string()),
    }
}

/// The address a request comes from: the connection's peer, or, for a
/// request another live instance of the cluster forwarded (the connection
/// comes from a member's advertised address), the caller's address that
/// instance saw (`x-tally-peer-ip`), so key allowlists judge the caller,
/// not the forwarder.
fn peer_of(state: &AppState, req: &Request) -> Option<IpAddr> {
    let direct = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| canonical_ip(c.0.ip()))?;
    let forwarded = req
        .headers()
        .get(&super::forward::PEER_IP)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    let from_member = || {
        req.headers().contains_key(&super::forward::FORWARDED_BY)
            && state.membership.as_ref().is_some_and(|m| {
                m.live_peers()
                    .iter()
                    .any(|address| member_ip(address) == Some(direct))
            })
    };
    match forwarded {
        Some(ip) if from_member() => Some(canonical_ip(ip)),
        _ => Some(direct),
    }
}

/// The IP of a member's advertised address (`http://10.0.0.5:8080`,
/// `http://[::1]:8080`); `None` for a host name.
fn member_ip(address: &str) -> Option<IpAddr> {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.parse::<IpAddr>().ok().map(canonical_ip)
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn refusal_cause(r: Refusal) -> &'static str {
    match r {
        Refusal::Malformed(_) => "malformed",
        Refusal::UnknownKey => "unknown",
        Refusal::WrongSecret => "wrong_secret",
        Refusal::Expired => "expired",
        Refusal::Revoked => "revoked",
        Refusal::ParentInvalid => "parent_invalid",
        Refusal::AddressNotAllowed => "address",
    }
}

/// The access layer (a `route_layer`: it runs once the route is known).
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let origin = origin_of(&state, &req);
    req.extensions_mut().insert(origin.clone());
    let rule = rule(req.method(), &route);
    let (scope, all_clients) = match rule {
        Rule::Open => return next.run(req).await,
        Rule::Ops if !state.config.keyed_ops => return next.run(req).await,
        Rule::Ops => (Scope::Read, false),
        Rule::Need { scope, all_clients } => (scope, all_clients),
    };
    if !state.access.enforced() {
        return next.run(req).await;
    }
    let peer = origin
        .ip
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let Some(presented) = presented_key(req.headers()).filter(|k| !k.is_empty()) else {
        counter!(AUTH_REFUSALS, "reason" => "missing").increment(1);
        return ApiError::Unauthenticated.into_response();
    };
    let now = wall_clock_ms();
    let jwt = JwtVerifier::looks_like_jwt(presented)
        .then(|| state.access.verify_jwt(presented))
        .flatten();
    let principal = match jwt {
        Some(Ok(p)) => p,
        Some(Err(r)) => {
            let cause = match r {
                JwtRefusal::NoKey => "jwt_no_key",
                JwtRefusal::Invalid => "jwt_invalid",
                JwtRefusal::Expired => "jwt_expired",
            };
            return refuse(&state, &route, cause, None, None, &origin);
        }
        None => match state.access.verify(presented, peer, now) {
            Ok(p) => p,
            Err(r) => {
                let id = tally_pipelines::access::token::parse(presented).ok();
                return refuse(&state, &route, refusal_cause(r), id, None, &origin);
            }
        },
    };
    let key_id = Some(principal.key_id.as_str());
    if !principal.may(scope) {
        return refuse(&state, &route, "scope", key_id, None, &origin);
    }
    if all_clients && !principal.all_clients() {
        return refuse(&state, &route, "clients", key_id, None, &origin);
    }
    // A route that names its client in the path is judged here; one that
    // names clients in its body, by its handler (`permit_client`).
    let (mut parts, body) = req.into_parts();
    if route.contains("{client_id}") {
        if let Ok(Path(params)) =
            Path::<HashMap<String, String>>::from_request_parts(&mut parts, &state).await
        {
            if let Some(client) = params.get("client_id") {
                if !principal.may_client(client) {
                    return refuse(&state, &route, "clients", key_id, Some(client), &origin);
                }
            }
        }
    }
    if let Err(wait_ms) = state.access.charge(&principal, now) {
        return ApiError::KeyRateLimited {
            retry_after_secs: u64::try_from(wait_ms).unwrap_or(1).div_ceil(1000).max(1),
        }
        .into_response();
    }
    let mut req = Request::from_parts(parts, body);
    req.extensions_mut().insert(std::sync::Arc::new(principal));
    next.run(req).await
}

/// For handlers whose body names clients: refuses (403, the same answer
/// as the layer's, audited alike) a client the request's key may not act
/// for.
pub fn permit_client(
    state: &AppState,
    principal: Option<&Principal>,
    origin: Option<&Origin>,
    route: &str,
    client: &str,
) -> Result<(), ApiError> {
    match principal {
        Some(p) if !p.may_client(client) => {
            let origin = origin.cloned().unwrap_or_default();
            refuse(
                state,
                route,
                "clients",
                Some(&p.key_id),
                Some(client),
                &origin,
            );
            Err(ApiError::Forbidden)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_address_gives_its_ip_and_a_host_name_none() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(member_ip("http://10.0.0.5:8080"), Some(v4));
        assert_eq!(member_ip("http://10.0.0.5"), Some(v4));
        assert_eq!(member_ip("https://10.0.0.5:8443/base"), Some(v4));
        assert_eq!(member_ip("http://[::1]:8080"), Some("::1".parse().unwrap()));
        assert_eq!(member_ip("http://[::ffff:10.0.0.5]:80"), Some(v4));
        assert_eq!(member_ip("http://tally-1.internal:8080"), None);
    }

    #[test]
    fn every_write_to_configuration_needs_admin_and_reads_need_read() {
        let put = Method::PUT;
        let get = Method::GET;
        for route in [
            "/v1/clients/{client_id}/limits",
            "/v1/clients/{client_id}/quota",
        ] {
            assert_eq!(rule(&put, route), need(Scope::Admin), "{route}");
            assert_eq!(rule(&get, route), need(Scope::Read), "{route}");
        }
        assert_eq!(
            rule(&Method::DELETE, "/v1/clients/{client_id}/limits/counters"),
            need(Scope::Admin)
        );
        assert_eq!(rule(&put, "/v1/queue-health"), need_all(Scope::Admin));
        assert_eq!(rule(&Method::POST, "/v1/webhooks"), need_all(Scope::Admin));
        assert_eq!(rule(&Method::POST, "/v1/check"), need(Scope::Check));
        assert_eq!(rule(&Method::POST, "/v1/events"), need(Scope::Ingest));
        assert_eq!(rule(&get, "/health/live"), Rule::Open);
        assert_eq!(rule(&get, "/metrics"), Rule::Ops);
    }

    #[test]
    fn an_unlisted_route_is_closed_to_all_but_unrestricted_admins() {
        assert_eq!(
            rule(&Method::GET, "/v1/something/new"),
            need_all(Scope::Admin)
        );
        assert_eq!(rule(&Method::GET, ""), need_all(Scope::Admin));
    }

    #[test]
    fn the_key_comes_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "tly_b".parse().unwrap());
        assert_eq!(presented_key(&h), Some("tly_b"));
        h.insert(header::AUTHORIZATION, "Bearer  tly_a ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("tly_a"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("tly_b"));
    }
}
