//! Per-request decisions, pure: deadlines, retries, and what a caller is answered when the mesh fails.
//!
//! Retries follow one rule. A failure before the acceptor said OK reached no application and is retried
//! on another endpoint for any method (as for opaque streams). After that, by default only idempotent
//! methods are retried, and only on a reset stream, 502/503/504, or gRPC `UNAVAILABLE` in a trailers-only
//! response; a `Timeouts` policy with a `retry` section replaces that default with its own count, try
//! timeout and conditions (`5xx`, `reset`, `deadline-exceeded`), still for idempotent methods only unless
//! its `retry_on` also names `non-idempotent`. A request whose body outgrew [`MAX_REPLAY_BODY`] is never retried, and
//! every retry spends the retry budget and fits inside the request's deadline.

use std::time::Duration;

use http::{Method, StatusCode};

use crate::model::{RetryPolicy, Timeouts};

/// Largest request body kept for replay, bytes; a request with a larger body is never retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Retries per request when no policy says otherwise.
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// gRPC status codes used here.
pub mod grpc {
    /// `DEADLINE_EXCEEDED`.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// `PERMISSION_DENIED`.
    pub const PERMISSION_DENIED: u32 = 7;
    /// `RESOURCE_EXHAUSTED`.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// `UNIMPLEMENTED`.
    pub const UNIMPLEMENTED: u32 = 12;
    /// `UNAVAILABLE`.
    pub const UNAVAILABLE: u32 = 14;
}

/// Parses a `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time a request has: the shorter of the policy's request timeout and the client's own
/// (`grpc-timeout`); `None` when neither sets one.
pub fn request_timeout(policy: Option<&Timeouts>, client: Option<Duration>) -> Option<Duration> {
    let p = policy
        .map(|t| t.request_timeout_ms)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    match (p, client) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Methods that may be repeated without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// How one try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing reached the application (no connection, no endpoint, refused before OK).
    NotSent,
    /// The stream was reset or broke after the request was sent.
    Reset,
    /// The try's own timeout expired.
    TryTimeout,
    /// A response head with this status; `grpc` is the `grpc-status` of a trailers-only response.
    Response {
        /// HTTP status.
        status: u16,
        /// gRPC status in the head, if any.
        grpc: Option<u32>,
    },
}

/// Which failures are retried, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRule {
    /// Retries after the first try.
    pub max_retries: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// `Some`: the policy's conditions, for every method. `None`: the default rule.
    pub retry_on: Option<Vec<String>>,
}

impl RetryRule {
    /// The rule of a service's timeouts policy, or the default.
    pub fn from_policy(t: Option<&Timeouts>) -> Self {
        match t.and_then(|t| t.retry.as_ref()) {
            Some(RetryPolicy {
                max_retries,
                per_try_timeout_ms,
                retry_on,
                ..
            }) => Self {
                max_retries: *max_retries,
                per_try_timeout: (*per_try_timeout_ms > 0)
                    .then(|| Duration::from_millis(*per_try_timeout_ms)),
                retry_on: Some(if retry_on.is_empty() {
                    vec!["connect-failure".into(), "reset".into(), "5xx".into()]
                } else {
                    retry_on.clone()
                }),
            },
            None => Self {
                max_retries: DEFAULT_MAX_RETRIES,
                per_try_timeout: None,
                retry_on: None,
            },
        }
    }

    /// Whether a try that ended with `outcome` is retried (`retries` made so far), and the counter
    /// label of the retry. The budget and the deadline are checked by the caller.
    pub fn retry(
        &self,
        method: &Method,
        outcome: Outcome,
        retries: u32,
        replayable: bool,
    ) -> Option<&'static str> {
        if retries >= self.max_retries || !replayable {
            return None;
        }
        let reason = match outcome {
            Outcome::NotSent => return Some("connect_failure"),
            Outcome::Reset => "reset",
            Outcome::TryTimeout => "per_try_timeout",
            Outcome::Response { status, grpc } => match (status, grpc) {
                (_, Some(grpc::UNAVAILABLE)) => "grpc_unavailable",
                (500..=599, _) => "5xx",
                _ => return None,
            },
        };
        let wanted = match &self.retry_on {
            None => {
                is_idempotent(method)
                    && match outcome {
                        Outcome::Reset => true,
                        Outcome::Response { status, grpc } => {
                            matches!(status, 502..=504) || grpc == Some(grpc::UNAVAILABLE)
                        }
                        _ => false,
                    }
            }
            Some(on) => {
                let has = |c: &str| on.iter().any(|x| x == c);
                (is_idempotent(method) || has("non-idempotent"))
                    && match outcome {
                        Outcome::Reset => has("reset"),
                        Outcome::TryTimeout => has("deadline-exceeded"),
                        Outcome::Response { .. } => has("5xx"),
                        Outcome::NotSent => true,
                    }
            }
        };
        wanted.then_some(reason)
    }
}

/// Why the mesh itself could not get a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No endpoint, no connection, or every try failed before reaching the app.
    Unavailable,
    /// The stream broke after the request was sent, or the peer broke the protocol.
    BadGateway,
    /// The deadline expired.
    Deadline,
    /// The destination refused the caller.
    Forbidden,
    /// The destination does not serve this service or port.
    NoRoute,
    /// The destination's rate limit refused the request; the caller may retry after this many seconds.
    RateLimited {
        /// Whole seconds, at least 1 (the unit of `Retry-After`).
        retry_after_s: u32,
    },
}

/// The HTTP status, and the gRPC status for gRPC callers, a caller gets for `f`.
pub fn failure_status(f: Failure) -> (StatusCode, u32) {
    match f {
        Failure::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, grpc::UNAVAILABLE),
        Failure::BadGateway => (StatusCode::BAD_GATEWAY, grpc::UNAVAILABLE),
        Failure::Deadline => (StatusCode::GATEWAY_TIMEOUT, grpc::DEADLINE_EXCEEDED),
        Failure::Forbidden => (StatusCode::FORBIDDEN, grpc::PERMISSION_DENIED),
        Failure::NoRoute => (StatusCode::BAD_GATEWAY, grpc::UNIMPLEMENTED),
        Failure::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, grpc::RESOURCE_EXHAUSTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_with_every_unit_and_refuse_the_rest() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "1x", "-1m", "1.5S", "١m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_shorter_timeout_wins() {
        let t = Timeouts {
            request_timeout_ms: 500,
            ..Default::default()
        };
        let ms = Duration::from_millis;
        assert_eq!(request_timeout(Some(&t), Some(ms(200))), Some(ms(200)));
        assert_eq!(request_timeout(Some(&t), Some(ms(900))), Some(ms(500)));
        assert_eq!(request_timeout(Some(&t), None), Some(ms(500)));
        assert_eq!(request_timeout(None, Some(ms(7))), Some(ms(7)));
        assert_eq!(request_timeout(None, None), None);
    }

    fn resp(status: u16) -> Outcome {
        Outcome::Response { status, grpc: None }
    }

    #[test]
    fn by_default_only_idempotent_methods_are_retried_on_502_to_504_and_resets() {
        let r = RetryRule::from_policy(None);
        assert_eq!(r.retry(&Method::GET, resp(503), 0, true), Some("5xx"));
        assert_eq!(r.retry(&Method::GET, resp(500), 0, true), None);
        assert_eq!(r.retry(&Method::GET, resp(404), 0, true), None);
        assert_eq!(
            r.retry(&Method::PUT, Outcome::Reset, 1, true),
            Some("reset")
        );
        assert_eq!(r.retry(&Method::POST, resp(503), 0, true), None);
        assert_eq!(r.retry(&Method::POST, Outcome::Reset, 0, true), None);
        // Nothing reached the app: any method.
        assert_eq!(
            r.retry(&Method::POST, Outcome::NotSent, 0, true),
            Some("connect_failure")
        );
        // Limits: retries, replayable body.
        assert_eq!(
            r.retry(&Method::GET, resp(503), DEFAULT_MAX_RETRIES, true),
            None
        );
        assert_eq!(r.retry(&Method::GET, resp(503), 0, false), None);
        assert_eq!(r.retry(&Method::GET, Outcome::TryTimeout, 0, true), None);
        let grpc_unavailable = Outcome::Response {
            status: 200,
            grpc: Some(grpc::UNAVAILABLE),
        };
        // gRPC calls are POSTs: not retried without a policy.
        assert_eq!(r.retry(&Method::POST, grpc_unavailable, 0, true), None);
        assert_eq!(
            r.retry(&Method::GET, grpc_unavailable, 0, true),
            Some("grpc_unavailable")
        );
    }

    #[test]
    fn a_policy_opts_every_method_into_its_conditions() {
        let t = Timeouts {
            retry: Some(RetryPolicy {
                max_retries: 4,
                per_try_timeout_ms: 100,
                budget_percent: 20,
                retry_on: vec![
                    "5xx".into(),
                    "deadline-exceeded".into(),
                    "non-idempotent".into(),
                ],
            }),
            ..Default::default()
        };
        let r = RetryRule::from_policy(Some(&t));
        assert_eq!(r.per_try_timeout, Some(Duration::from_millis(100)));
        assert_eq!(r.retry(&Method::POST, resp(500), 3, true), Some("5xx"));
        assert_eq!(r.retry(&Method::POST, resp(500), 4, true), None);
        assert_eq!(
            r.retry(&Method::POST, Outcome::TryTimeout, 0, true),
            Some("per_try_timeout")
        );
        assert_eq!(r.retry(&Method::POST, Outcome::Reset, 0, true), None);
        let grpc_unavailable = Outcome::Response {
            status: 200,
            grpc: Some(grpc::UNAVAILABLE),
        };
        assert_eq!(
            r.retry(&Method::POST, grpc_unavailable, 0, true),
            Some("grpc_unavailable")
        );
    }

    #[test]
    fn a_policy_without_non_idempotent_leaves_posts_alone() {
        let t = Timeouts {
            retry: Some(RetryPolicy {
                max_retries: 5,
                retry_on: vec!["5xx".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = RetryRule::from_policy(Some(&t));
        assert_eq!(r.retry(&Method::GET, resp(500), 4, true), Some("5xx"));
        assert_eq!(r.retry(&Method::POST, resp(503), 0, true), None);
    }

    #[test]
    fn failures_map_to_http_and_grpc_statuses() {
        assert_eq!(
            failure_status(Failure::Deadline).0,
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(failure_status(Failure::Deadline).1, grpc::DEADLINE_EXCEEDED);
        assert_eq!(failure_status(Failure::Unavailable).1, grpc::UNAVAILABLE);
        assert_eq!(failure_status(Failure::Forbidden).0, StatusCode::FORBIDDEN);
        assert_eq!(
            failure_status(Failure::RateLimited { retry_after_s: 1 }),
            (StatusCode::TOO_MANY_REQUESTS, grpc::RESOURCE_EXHAUSTED)
        );
    }
}
