//! The tower layer in front of both services: bearer-token authentication, load shedding,
//! client deadlines, one tracing span and the latency and in-flight metrics per call, and the
//! status of over-size messages (`RESOURCE_EXHAUSTED`, see [`super::size_limit`]).
//!
//! Health checks and reflection pass straight through: a load balancer must be able to probe an
//! instance that is saturated or that it holds no token for.
//!
//! Shedding: a call that finds `max_in_flight` calls already running is answered
//! `RESOURCE_EXHAUSTED` at once (`try_acquire`, never a wait), so an overloaded instance tells
//! clients to back off or go elsewhere instead of growing a queue whose answers would come too
//! late to be of use.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use super::convert::refused;
use super::size_limit;
use crate::config::AuthSettings;
use crate::metrics::{Metrics, RPCS, Refusal, rpc_index};

const QUOTA_PREFIX: &str = "/waquota.v1.QuotaService/";
const ADMIN_PREFIX: &str = "/waquota.v1.AdminService/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May call QuotaService.
    Sender,
    /// May call QuotaService and AdminService.
    Operator,
}

/// The configured bearer tokens. Tokens are compared in constant time and never logged.
#[derive(Clone, Default)]
pub struct Tokens {
    sender: Vec<Vec<u8>>,
    operator: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("sender", &self.sender.len())
            .field("operator", &self.operator.len())
            .finish()
    }
}

/// Equal bytes, in time that depends on the lengths only, never on where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if b.is_empty() {
        return false;
    }
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b[i % b.len()]);
    }
    std::hint::black_box(diff) == 0
}

impl Tokens {
    pub fn new(auth: &AuthSettings) -> Self {
        let bytes = |v: &[String]| {
            v.iter()
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_vec())
                .collect()
        };
        Tokens {
            sender: bytes(&auth.sender_tokens),
            operator: bytes(&auth.operator_tokens),
        }
    }

    /// The role of an `authorization: Bearer <token>` header value. Every configured token is
    /// compared, so the time taken does not tell which list (or which entry) matched.
    pub fn role(&self, header: Option<&http::HeaderValue>) -> Option<Role> {
        let value = header?.as_bytes();
        let (scheme, token) = value.split_at_checked(7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let token = token.trim_ascii();
        let operator = self
            .operator
            .iter()
            .fold(false, |hit, t| ct_eq(token, t) | hit);
        let sender = self
            .sender
            .iter()
            .fold(false, |hit, t| ct_eq(token, t) | hit);
        if operator {
            Some(Role::Operator)
        } else if sender {
            Some(Role::Sender)
        } else {
            None
        }
    }
}

#[derive(Clone)]
pub struct GuardLayer {
    state: Arc<State>,
}

struct State {
    /// `None`: authentication is off.
    tokens: Option<Tokens>,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl GuardLayer {
    pub fn new(auth: &AuthSettings, max_in_flight: usize, metrics: Arc<Metrics>) -> Self {
        GuardLayer {
            state: Arc::new(State {
                tokens: auth.enabled().then(|| Tokens::new(auth)),
                permits: Arc::new(Semaphore::new(
                    max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
                )),
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    state: Arc<State>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Why the guard answered a call itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing or invalid bearer token (authorization: Bearer <token>)")]
    Unauthenticated,
    #[error("AdminService needs an operator token")]
    PermissionDenied,
    #[error("too many requests in flight on this instance; retry with backoff")]
    Overloaded,
    #[error("the client's deadline passed")]
    DeadlineExceeded,
}

fn refuse<E>(r: Refused) -> BoxFuture<Result<http::Response<Body>, E>>
where
    E: Send + 'static,
{
    Box::pin(std::future::ready(Ok(refused(r).into_http())))
}

/// The `grpc-timeout` header: an integer of at most 8 digits and a unit (H M S m u n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let admin = path.starts_with(ADMIN_PREFIX);
        if !admin && !path.starts_with(QUOTA_PREFIX) {
            // Health, reflection, and unknown paths (which answer UNIMPLEMENTED by themselves).
            return Box::pin(self.inner.call(req));
        }
        let state = &self.state;
        let mut role = None;
        if let Some(tokens) = &state.tokens {
            match tokens.role(req.headers().get(http::header::AUTHORIZATION)) {
                None => {
                    tracing::debug!(
                        rpc = RPCS[rpc_index(path)],
                        "refused: no valid bearer token"
                    );
                    state.metrics.refused(Refusal::Unauthenticated);
                    return refuse(Refused::Unauthenticated);
                }
                Some(Role::Sender) if admin => {
                    tracing::debug!(
                        rpc = RPCS[rpc_index(path)],
                        "refused: sender token on AdminService"
                    );
                    state.metrics.refused(Refusal::PermissionDenied);
                    return refuse(Refused::PermissionDenied);
                }
                Some(r) => role = Some(r),
            }
        }
        let Ok(permit) = state.permits.clone().try_acquire_owned() else {
            tracing::debug!(rpc = RPCS[rpc_index(path)], "shed: max_in_flight reached");
            state.metrics.shed();
            return refuse(Refused::Overloaded);
        };
        let rpc = rpc_index(path);
        if let Some(role) = role {
            // The services read it: only an operator's `at` is honoured (ApiOptions::clock).
            req.extensions_mut().insert(role);
        }
        // Taken now, before tonic's own grpc-timeout timer starts, so this one fires first and
        // the answer is DEADLINE_EXCEEDED (tonic's would be CANCELLED).
        let deadline = grpc_timeout(req.headers()).map(|d| tokio::time::Instant::now() + d);
        let span = tracing::info_span!(
            "rpc",
            rpc = RPCS[rpc],
            sender = tracing::field::Empty,
            decision = tracing::field::Empty,
        );
        let metrics = state.metrics.clone();
        // The clone handed out by poll_ready is the ready one: keep it for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let _in_flight = metrics.in_flight();
                let start = Instant::now();
                let call = inner.call(req);
                // Dropping `call` when the deadline passes stops the work the client no longer
                // waits for (a Redis call already sent still completes there).
                let result = match deadline {
                    Some(at) => match tokio::time::timeout_at(at, call).await {
                        Ok(r) => r,
                        Err(_) => {
                            metrics.deadline_exceeded();
                            tracing::debug!("client deadline passed");
                            Ok(refused(Refused::DeadlineExceeded).into_http())
                        }
                    },
                    None => call.await,
                };
                metrics.rpc_latency(rpc, start.elapsed());
                drop(permit);
                result.map(size_limit::resource_exhausted_when_too_large)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn bearer_tokens_map_to_roles() {
        let t = Tokens::new(&AuthSettings {
            sender_tokens: vec!["s3nd".into()],
            operator_tokens: vec!["0p".into(), String::new()],
        });
        assert_eq!(t.role(Some(&header("Bearer s3nd"))), Some(Role::Sender));
        assert_eq!(t.role(Some(&header("bearer 0p"))), Some(Role::Operator));
        assert_eq!(t.role(Some(&header("Bearer s3n"))), None);
        assert_eq!(t.role(Some(&header("Bearer s3ndx"))), None);
        assert_eq!(t.role(Some(&header("Bearer "))), None);
        assert_eq!(t.role(Some(&header("Basic s3nd"))), None);
        assert_eq!(t.role(None), None);
    }

    #[test]
    fn grpc_timeout_units() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", header("250m"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", header("3S"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(3)));
        h.insert("grpc-timeout", header("x"));
        assert_eq!(grpc_timeout(&h), None);
    }
}
