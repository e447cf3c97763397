//! Which endpoint a tunneled connection tries, and in which order after a failure.
//!
//! The endpoints come from the mesh state; what this module adds is what the proxy learnt by trying
//! them: an endpoint whose handshake failed is avoided for a backoff that doubles with each failure in
//! a row (0.5 s up to 30 s) and forgotten at its first success. The order is a pure function of the
//! endpoint list, a rotating start and that record, so it is tested without sockets.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Longest time a failed endpoint is avoided.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const BASE_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
struct Down {
    failures: u32,
    until: Instant,
}

/// What the proxy learnt about endpoints by dialling them, shared by its outbound listeners.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    down: Mutex<HashMap<SocketAddr, Down>>,
}

impl EndpointHealth {
    /// Records that `addr` could not be reached: it is avoided for a growing backoff.
    pub fn mark_down(&self, addr: SocketAddr, now: Instant) {
        let mut h = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let e = h.entry(addr).or_insert(Down {
            failures: 0,
            until: now,
        });
        e.failures = e.failures.saturating_add(1);
        e.until = now + backoff(e.failures);
    }

    /// Records a success with `addr`.
    pub fn mark_up(&self, addr: SocketAddr) {
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }

    /// The order in which to try `endpoints`, starting from `start`.
    pub fn attempt_order(
        &self,
        endpoints: &[SocketAddr],
        start: usize,
        now: Instant,
    ) -> Vec<SocketAddr> {
        let h = self.down.lock().unwrap_or_else(|p| p.into_inner());
        attempt_order(endpoints, start, |a| {
            h.get(a).is_some_and(|x| x.until > now)
        })
    }
}

/// How long an endpoint is avoided after `failures` failures in a row.
fn backoff(failures: u32) -> Duration {
    BASE_BACKOFF
        .saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1))
        .min(MAX_BACKOFF)
}

/// Rotates `endpoints` to begin at `start`, healthy endpoints first; endpoints that are down come last
/// (still worth a try when nothing else is left).
pub fn attempt_order(
    endpoints: &[SocketAddr],
    start: usize,
    is_down: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let n = endpoints.len();
    let rotated = (0..n).map(|i| endpoints[(start + i) % n]);
    let (up, down): (Vec<_>, Vec<_>) = rotated.partition(|a| !is_down(a));
    up.into_iter().chain(down).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i)))
            .collect()
    }

    #[test]
    fn rotates_from_start() {
        let e = addrs(3);
        assert_eq!(attempt_order(&e, 1, |_| false), vec![e[1], e[2], e[0]]);
        assert_eq!(attempt_order(&e, 4, |_| false), vec![e[1], e[2], e[0]]);
    }

    #[test]
    fn down_endpoints_go_last() {
        let e = addrs(3);
        assert_eq!(attempt_order(&e, 0, |a| *a == e[0]), vec![e[1], e[2], e[0]]);
        assert_eq!(attempt_order(&e, 0, |_| true), vec![e[0], e[1], e[2]]);
        assert!(attempt_order(&[], 0, |_| false).is_empty());
    }

    #[test]
    fn a_failed_endpoint_is_avoided_for_a_doubling_backoff_until_it_succeeds() {
        let e = addrs(2);
        let h = EndpointHealth::default();
        let t0 = Instant::now();
        h.mark_down(e[0], t0);
        assert_eq!(h.attempt_order(&e, 0, t0), vec![e[1], e[0]]);
        assert_eq!(h.attempt_order(&e, 0, t0 + BASE_BACKOFF), vec![e[0], e[1]]);
        h.mark_down(e[0], t0);
        assert_eq!(h.attempt_order(&e, 0, t0 + BASE_BACKOFF), vec![e[1], e[0]]);
        assert_eq!(backoff(2), BASE_BACKOFF * 2);
        assert_eq!(backoff(100), MAX_BACKOFF);
        h.mark_up(e[0]);
        assert_eq!(h.attempt_order(&e, 0, t0), vec![e[0], e[1]]);
    }
}
