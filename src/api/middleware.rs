//! What wraps every request: security headers, `HEAD` as `GET`, the client
//! timeout on request bodies, and rate limits.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::{DefaultHeaders, Next};
use actix_web::{web, Error, HttpMessage, HttpResponse};
use futures::StreamExt;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

use crate::api::error::error_body;
use crate::api::AppState;
use crate::auth::Claims;
use crate::configuration::Limits;

/// On every response, errors and 429s included. No response of this API is
/// meant for a cache, a frame or a browser's content sniffing.
pub fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("Referrer-Policy", "no-referrer"))
        .add(("X-Frame-Options", "DENY"))
        .add((
            "Content-Security-Policy",
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .add(("Cache-Control", "no-store"))
}

/// `HEAD` is answered wherever `GET` is: routed as `GET`; the server sends
/// the headers (Content-Length included) and no body.
pub async fn head_as_get(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    if req.method() == Method::HEAD {
        req.head_mut().method = Method::GET;
    }
    next.call(req).await
}

/// The marker error of a body that stalled ([`body_timeout`]); the JSON
/// extractor's error handler answers it with 408.
pub const BODY_TIMEOUT_MESSAGE: &str = "the request body did not arrive in time";

/// A request body must keep coming: no gap longer than the client timeout,
/// and all of it within twice that. Otherwise the read fails, the request
/// gets 408 and the connection is closed (a client that declares a body and
/// sends one byte no longer holds a socket for good).
pub async fn body_timeout(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.client_timeout)
        .unwrap_or(Duration::from_secs(10));
    let has_body = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() != "0")
        || req
            .headers()
            .contains_key(actix_web::http::header::TRANSFER_ENCODING);
    if has_body {
        let (_, payload) = req.parts_mut();
        let inner = payload.take();
        let deadline = tokio::time::Instant::now() + limit * 2;
        let stream = futures::stream::unfold(Some(inner), move |state| async move {
            let mut inner = state?;
            let wait = (tokio::time::Instant::now() + limit).min(deadline);
            match tokio::time::timeout_at(wait, inner.next()).await {
                Ok(Some(item)) => Some((item, Some(inner))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(actix_web::error::PayloadError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        BODY_TIMEOUT_MESSAGE,
                    ))),
                    None,
                )),
            }
        });
        req.set_payload(Payload::from(Box::pin(stream)
            as std::pin::Pin<
                Box<
                    dyn futures::Stream<
                        Item = Result<actix_web::web::Bytes, actix_web::error::PayloadError>,
                    >,
                >,
            >));
    }
    next.call(req).await
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One limiter per class of request.
struct Limiter<K: std::hash::Hash + Eq + Clone> {
    per_minute: u32,
    limiter: Option<Keyed<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Limiter<K> {
    fn new(per_minute: u32) -> Self {
        Limiter {
            per_minute,
            limiter: NonZeroU32::new(per_minute).map(|n| {
                RateLimiter::keyed(Quota::per_minute(n))
                    .with_middleware::<StateInformationMiddleware>()
            }),
        }
    }

    fn check(&self, key: &K) -> Option<Decision> {
        let limiter = self.limiter.as_ref()?;
        let per_token = 60.0 / f64::from(self.per_minute);
        Some(match limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    limit: self.per_minute,
                    remaining,
                    // Until the bucket is full again.
                    reset: (f64::from(self.per_minute - remaining) * per_token).ceil() as u64,
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64;
                Decision {
                    limit: self.per_minute,
                    remaining: 0,
                    reset: wait,
                    retry_after: Some(wait),
                }
            }
        })
    }

    fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

struct Decision {
    limit: u32,
    remaining: u32,
    reset: u64,
    retry_after: Option<u64>,
}

/// The three rate limits of `TENANTRY_RATE_LIMIT_*`. Each is counted in
/// this process (governor); the per-IP ones (`auth`, `anon`) are then
/// counted again in the database, across every process on it
/// ([`SHARED_TAKE`]), which decides. Per user stays in this process: it is
/// the one every data request pays, and a client's requests spread over N
/// processes get at most N times its limit.
pub struct RateLimits {
    auth: Limiter<IpAddr>,
    anon: Limiter<IpAddr>,
    user: Limiter<Uuid>,
    trusted_proxies: Arc<Vec<IpAddr>>,
    shared: bool,
    shared_user: bool,
    /// Places for [`SHARED_CHECKS`].
    asking: Arc<tokio::sync::Semaphore>,
}

/// GCRA in one statement: take one request from bucket `$1`, which refills
/// one request every `$2` milliseconds up to `$3`. A row (the bucket's
/// theoretical arrival time less now, in microseconds, after the take)
/// when taken; none when refused, which changes nothing ([`SHARED_AHEAD`]
/// then says for how long). "Now" is `clock_timestamp()`, read once the
/// row is ours: `now()` is when the statement began, and a take that began
/// before the one it then waited for would count as early and be refused.
pub const SHARED_TAKE: &str = "
INSERT INTO tenantry.rate_limits AS r (bucket, tat)
VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond')
ON CONFLICT (bucket) DO UPDATE
   SET tat = greatest(r.tat, clock_timestamp()) + $2 * interval '1 millisecond'
 WHERE greatest(r.tat, clock_timestamp()) + $2 * interval '1 millisecond'
       <= clock_timestamp() + $3 * $2 * interval '1 millisecond'
RETURNING (extract(epoch FROM tat - clock_timestamp()) * 1000000)::int8";

/// A refused bucket's arrival time less now, in microseconds (a statement
/// of its own: it sees what the refusing take saw committed).
pub const SHARED_AHEAD: &str = "
SELECT (extract(epoch FROM tat - now()) * 1000000)::int8 FROM tenantry.rate_limits WHERE bucket = $1";

/// How many requests of this process ask the database at once; past it, the
/// process's own count decides (a flood must not take the pool).
const SHARED_CHECKS: usize = 4;

/// How long a request waits for the database's count before the process's
/// own count decides.
const SHARED_WAIT: Duration = Duration::from_millis(300);

/// What a client is limited as: its address, an IPv4-mapped IPv6 address as
/// IPv4, and an IPv6 address by its /64 (what one subscriber gets).
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(network))
        }
        v4 => v4,
    }
}

impl RateLimits {
    pub fn new(limits: &Limits) -> RateLimits {
        RateLimits {
            auth: Limiter::new(limits.auth_per_minute),
            anon: Limiter::new(limits.anon_per_minute),
            user: Limiter::new(limits.user_per_minute),
            trusted_proxies: Arc::new(limits.trusted_proxies.clone()),
            shared: limits.shared,
            shared_user: limits.shared_user,
            asking: Arc::new(tokio::sync::Semaphore::new(SHARED_CHECKS)),
        }
    }

    /// Drop the state of keys that are full again (memory stays bounded by
    /// the clients of the last minute).
    pub fn forget_idle(&self) {
        self.auth.forget_idle();
        self.anon.forget_idle();
        self.user.forget_idle();
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy,
    /// then the right-most address of `X-Forwarded-For` that is not one.
    pub fn client_ip(&self, req: &actix_web::HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let mut client = peer;
        for value in req.headers().get_all("x-forwarded-for") {
            let Ok(list) = value.to_str() else {
                return Some(peer);
            };
            for hop in list.split(',').rev() {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) if self.trusted_proxies.contains(&ip) => client = ip,
                    Ok(ip) => return Some(ip),
                    Err(_) => return Some(client),
                }
            }
        }
        Some(client)
    }
}

/// The caller's verified access-token claims, put in the request's
/// extensions by [`rate_limit`] so the extractor need not verify twice.
#[derive(Clone)]
pub struct VerifiedClaims(pub Option<Claims>);

/// Verify the bearer token of a request, once.
pub fn bearer_claims(req: &actix_web::HttpRequest) -> Option<Claims> {
    if let Some(v) = req.extensions().get::<VerifiedClaims>() {
        return v.0.clone();
    }
    let state = req.app_data::<web::Data<AppState>>()?;
    state.jwt.verify(bearer_token(req)?)
}

/// The token of `Authorization: Bearer <token>` (the scheme is
/// case-insensitive, RFC 9110 §11.1).
pub fn bearer_token(req: &actix_web::HttpRequest) -> Option<&str> {
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION)?;
    let (scheme, token) = header.to_str().ok()?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Per client IP on `/api/auth/*`, per user with a valid access token,
/// per client IP otherwise; health probes are not limited. Every limited
/// response carries `X-RateLimit-Limit`, `-Remaining` and `-Reset`
/// (seconds); past the limit: 429 with `Retry-After`.
pub async fn rate_limit(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let Some(limits) = req.app_data::<web::Data<RateLimits>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let path = req.path();
    let decision = if path == "/health" || path.starts_with("/health/") {
        None
    } else if path.starts_with("/api/auth/") {
        match limits.client_ip(req.request()) {
            Some(ip) => {
                shared(
                    &req,
                    &limits,
                    limits.shared,
                    "auth",
                    &limits.auth,
                    limit_key(ip),
                )
                .await
            }
            None => None,
        }
    } else {
        let claims = bearer_claims(req.request());
        req.extensions_mut().insert(VerifiedClaims(claims.clone()));
        match claims {
            Some(c) => {
                shared(
                    &req,
                    &limits,
                    limits.shared_user,
                    "user",
                    &limits.user,
                    c.sub,
                )
                .await
            }
            None => match limits.client_ip(req.request()) {
                Some(ip) => {
                    shared(
                        &req,
                        &limits,
                        limits.shared,
                        "anon",
                        &limits.anon,
                        limit_key(ip),
                    )
                    .await
                }
                None => None,
            },
        }
    };
    let Some(decision) = decision else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let headers = [
        ("x-ratelimit-limit", decision.limit.to_string()),
        ("x-ratelimit-remaining", decision.remaining.to_string()),
        ("x-ratelimit-reset", decision.reset.to_string()),
    ];
    let mut response = match decision.retry_after {
        Some(wait) => {
            let response = HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", wait.to_string()))
                .json(error_body(
                    "rate_limited",
                    &format!("too many requests; retry in {wait} s"),
                ));
            req.into_response(response).map_into_right_body()
        }
        None => next.call(req).await?.map_into_left_body(),
    };
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// A per-IP limit: this process's count first (what it refuses never
/// reaches the database), then the database's across every process, which
/// decides. Without a database answer (it is down, the pool is saturated)
/// the process's own count stands.
async fn shared<K: std::hash::Hash + Eq + Clone + std::fmt::Display>(
    req: &ServiceRequest,
    limits: &RateLimits,
    enabled: bool,
    class: &str,
    limiter: &Limiter<K>,
    key: K,
) -> Option<Decision> {
    let local = limiter.check(&key)?;
    if local.retry_after.is_some() || !enabled {
        return Some(local);
    }
    let state = req.app_data::<web::Data<AppState>>()?;
    let Ok(_asking) = limits.asking.try_acquire() else {
        crate::metrics::database_error("rate_limit_busy");
        return Some(local);
    };
    let per_minute = limiter.per_minute;
    let interval_ms = 60_000.0 / f64::from(per_minute);
    // Keyed like the throttle's names: no address stored in clear.
    let bucket = format!("{class}:{}", state.pseudonyms.name(&key.to_string()));
    let answer = tokio::time::timeout(SHARED_WAIT, async {
        let client = state.pool.get().await.ok()?;
        let take = client.prepare_cached(SHARED_TAKE).await.ok()?;
        let taken = client
            .query_opt(&take, &[&bucket, &interval_ms, &f64::from(per_minute)])
            .await
            .ok()?;
        Some(match taken {
            Some(row) => (true, Some(row.get::<_, i64>(0))),
            None => {
                let ahead = client.query_opt(SHARED_AHEAD, &[&bucket]).await.ok()?;
                (false, ahead.map(|r| r.get::<_, i64>(0)))
            }
        })
    });
    let Some((taken, ahead_us)) = answer.await.ok().flatten() else {
        crate::metrics::database_error("rate_limit");
        return Some(local);
    };
    let interval_us = interval_ms * 1000.0;
    let ahead = ahead_us.unwrap_or(0).max(0) as f64;
    Some(if taken {
        let capacity = f64::from(per_minute) * interval_us;
        Decision {
            limit: per_minute,
            // (The arrival time is rounded to the microsecond.)
            remaining: ((capacity - ahead) / interval_us + 1e-3).floor().max(0.0) as u32,
            reset: (ahead / 1e6).ceil() as u64,
            retry_after: None,
        }
    } else {
        // Taken again once the arrival time is within the burst.
        let wait_us = ahead - f64::from(per_minute - 1) * interval_us;
        let wait = (wait_us / 1e6).ceil().max(1.0) as u64;
        Decision {
            limit: per_minute,
            remaining: 0,
            reset: wait,
            retry_after: Some(wait),
        }
    })
}

/// The request's id: its `X-Request-Id` when well-formed (1 to 128 of
/// `A-Z a-z 0-9 . _ -`), a new UUID otherwise.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn well_formed(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A span per request (id, method, route; handlers add tenant and user),
/// `X-Request-Id` on every response, one log line per request, and the
/// HTTP metrics (by route pattern, never by raw path).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    use tracing::Instrument;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| well_formed(v))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().to_string();
    let span =
        tracing::info_span!("request", id = %id, method = %method, route = tracing::field::Empty);
    let started = std::time::Instant::now();
    let result = next.call(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let (status, route) = match &result {
        Ok(res) => (
            res.status().as_u16(),
            res.request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".into()),
        ),
        Err(e) => (
            e.as_response_error().status_code().as_u16(),
            "unmatched".into(),
        ),
    };
    span.record("route", route.as_str());
    let status_label = status.to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status_label.clone()).increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method.clone(), "route" => route.clone(), "status" => status_label).record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            ms = elapsed.as_secs_f64() * 1000.0,
            "{method} {route}"
        );
    });
    let mut res = result?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_limited_by_address_and_ipv6_by_its_64() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(limit_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_eq!(limit_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(limit_key(a), limit_key(other));
    }
}
