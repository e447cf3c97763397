//! Which endpoint a tunneled connection or request tries, and in which order after a failure.
//!
//! The endpoints come from the mesh state; what this module adds is what the proxy learnt by trying
//! them:
//! - an endpoint whose handshake failed is avoided for a backoff that doubles with each failure in a row
//!   (0.5 s up to 30 s) and forgotten at its first success;
//! - requests (HTTP, gRPC) go to the better of two endpoints drawn at random (power of two choices),
//!   "better" being the lower peak-EWMA latency times the requests in flight plus one: a slow endpoint
//!   is seen at once (peaks are taken whole) and forgiven gradually (decay over 10 s); an endpoint
//!   without a sample starts from the RTT of its pooled QUIC connection;
//! - [`EJECT_AFTER`] failures in a row (5xx, reset, unreachable) eject an endpoint for a time that
//!   doubles with each ejection (2 s up to 5 min), never more than half of a service's endpoints;
//!   readmitted, it is on probation: its first answer decides, a failure ejects it again at once.
//!
//! Orders are pure functions of the endpoint list, the draw and that record, tested without sockets.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Longest time a failed endpoint is avoided.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const BASE_BACKOFF: Duration = Duration::from_millis(500);

/// Consecutive failed requests that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
const BASE_EJECTION: Duration = Duration::from_secs(2);
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// How fast a latency peak is forgotten.
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Down {
    failures: u32,
    until: Instant,
}

/// What requests taught about one endpoint.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    /// Peak-EWMA latency, seconds, and when it was last updated.
    cost: Option<(f64, Instant)>,
    in_flight: u32,
    failures_in_row: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// What the proxy learnt about endpoints by dialling them and sending requests, shared by its outbound
/// listeners.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    down: Mutex<HashMap<SocketAddr, Down>>,
    stats: Mutex<HashMap<SocketAddr, Stats>>,
}

/// The peak-EWMA cost after a `sample` at `now`, from the previous cost: a higher sample replaces it, a
/// lower one pulls it down with weight growing with the time since the last update.
pub fn peak_ewma(prev: Option<(f64, Instant)>, sample: f64, now: Instant) -> f64 {
    match prev {
        None => sample,
        Some((cost, _)) if sample > cost => sample,
        Some((cost, at)) => {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            let w = (-dt / DECAY.as_secs_f64()).exp();
            cost * w + sample * (1.0 - w)
        }
    }
}

/// How long the `n`-th ejection lasts.
pub fn ejection_time(n: u32) -> Duration {
    BASE_EJECTION
        .saturating_mul(1 << n.clamp(1, 9).saturating_sub(1))
        .min(MAX_EJECTION)
}

/// Whether another endpoint may be ejected when `ejected` of `total` already are: at most half.
pub fn may_eject(ejected: usize, total: usize) -> bool {
    (ejected + 1) * 2 <= total
}

/// Power of two choices: of two distinct candidates drawn at random (`a`, `b`; equal draws take the
/// next one), the one whose cost is lower. Costs are latency × (in flight + 1).
pub fn p2c(costs: &[f64], a: usize, b: usize) -> usize {
    let n = costs.len();
    if n < 2 {
        return 0;
    }
    let a = a % n;
    let mut b = b % n;
    if a == b {
        b = (a + 1) % n;
    }
    if costs[b] < costs[a] { b } else { a }
}

/// The cost an endpoint has at `now`: its peak-EWMA latency fading while it gets no request, so an
/// endpoint that was slow is tried again after a while instead of never.
pub fn current_cost(cost: (f64, Instant), now: Instant) -> f64 {
    let dt = now.saturating_duration_since(cost.1).as_secs_f64();
    cost.0 * (-dt / DECAY.as_secs_f64()).exp()
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

    /// The order in which a request tries `endpoints`: the better of two random draws first
    /// ([`p2c`]), then the others from there; ejected and down endpoints last. `rtt` gives the pooled
    /// connection's RTT for endpoints without a sample.
    pub fn pick_order(
        &self,
        endpoints: &[SocketAddr],
        draw: (usize, usize),
        now: Instant,
        rtt: impl Fn(&SocketAddr) -> Option<Duration>,
    ) -> Vec<SocketAddr> {
        // One endpoint (or none) has one order, however it is doing.
        if endpoints.len() < 2 {
            return endpoints.to_vec();
        }
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let avoided = |a: &SocketAddr| {
            down.get(a).is_some_and(|x| x.until > now)
                || stats
                    .get(a)
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|u| u > now)
        };
        let usable: Vec<SocketAddr> = endpoints.iter().copied().filter(|a| !avoided(a)).collect();
        let costs: Vec<f64> = usable
            .iter()
            .map(|a| {
                let s = stats.get(a).copied().unwrap_or_default();
                let latency = s
                    .cost
                    .map(|c| current_cost(c, now))
                    .or_else(|| rtt(a).map(|r| r.as_secs_f64()))
                    .unwrap_or(0.001);
                latency * f64::from(s.in_flight + 1)
            })
            .collect();
        let first = p2c(&costs, draw.0, draw.1);
        let mut order = attempt_order(&usable, first, |_| false);
        order.extend(endpoints.iter().copied().filter(|a| avoided(a)));
        order
    }

    /// A request to `addr` starts.
    pub fn begin(&self, addr: SocketAddr) {
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.entry(addr).or_default().in_flight += 1;
    }

    /// A request to `addr` that began was abandoned (e.g. its deadline passed): no verdict on the endpoint.
    pub fn abandon(&self, addr: SocketAddr) {
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = st.get_mut(&addr) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    /// A request to `addr` that began ended: `latency` until its answer if it got one, and whether it
    /// succeeded. `total` is the number of the service's endpoints (for the ejection cap). Returns true
    /// when this ejected the endpoint.
    pub fn end(
        &self,
        addr: SocketAddr,
        latency: Option<Duration>,
        ok: bool,
        total: usize,
        now: Instant,
    ) -> bool {
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = st
            .values()
            .filter(|s| s.ejected_until.is_some_and(|u| u > now))
            .count();
        let s = st.entry(addr).or_default();
        s.in_flight = s.in_flight.saturating_sub(1);
        if let Some(l) = latency {
            s.cost = Some((peak_ewma(s.cost, l.as_secs_f64(), now), now));
        }
        if ok {
            s.failures_in_row = 0;
            return false;
        }
        s.failures_in_row += 1;
        let still = s.ejected_until.is_some_and(|u| u > now);
        if s.failures_in_row >= EJECT_AFTER && !still && may_eject(ejected, total) {
            s.ejections = s.ejections.saturating_add(1);
            s.ejected_until = Some(now + ejection_time(s.ejections));
            // Probation once readmitted: one more failure ejects it again.
            s.failures_in_row = EJECT_AFTER - 1;
            return true;
        }
        false
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
    fn peaks_count_at_once_and_fade_with_time() {
        let t0 = Instant::now();
        assert_eq!(peak_ewma(None, 0.01, t0), 0.01);
        assert_eq!(peak_ewma(Some((0.01, t0)), 0.05, t0), 0.05);
        let later = peak_ewma(Some((0.05, t0)), 0.001, t0 + DECAY);
        assert!(later < 0.05 && later > 0.001, "{later}");
        let much_later = peak_ewma(Some((0.05, t0)), 0.001, t0 + DECAY * 10);
        assert!(much_later < 0.0011, "{much_later}");
    }

    #[test]
    fn two_choices_take_the_cheaper() {
        assert_eq!(p2c(&[0.05, 0.001], 0, 1), 1);
        assert_eq!(p2c(&[0.001, 0.05], 0, 1), 0);
        // Equal draws compare with the next one: two endpoints are always both compared.
        assert_eq!(p2c(&[0.05, 0.001], 0, 0), 1);
        assert_eq!(p2c(&[0.05, 0.001, 0.01], 1, 1), 1);
        assert_eq!(p2c(&[], 0, 1), 0);
        assert_eq!(p2c(&[0.3], 0, 1), 0);
        let t0 = Instant::now();
        assert!(current_cost((0.05, t0), t0 + DECAY * 5) < 0.001);
    }

    #[test]
    fn the_slow_endpoint_loses_most_draws() {
        let e = addrs(2);
        let h = EndpointHealth::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            h.begin(e[0]);
            h.end(e[0], Some(Duration::from_millis(50)), true, 2, t0);
            h.begin(e[1]);
            h.end(e[1], Some(Duration::from_millis(1)), true, 2, t0);
        }
        let mut fast = 0;
        for a in 0..2 {
            for b in 0..2 {
                if h.pick_order(&e, (a, b), t0, |_| None)[0] == e[1] {
                    fast += 1;
                }
            }
        }
        // Every draw compares both; the fast one wins all.
        assert_eq!(fast, 4);
    }

    #[test]
    fn failures_in_a_row_eject_for_a_growing_time_but_never_more_than_half() {
        let e = addrs(4);
        let h = EndpointHealth::default();
        let t0 = Instant::now();
        for i in 0..EJECT_AFTER {
            h.begin(e[0]);
            let ejected = h.end(e[0], None, false, 4, t0);
            assert_eq!(ejected, i + 1 == EJECT_AFTER);
        }
        let order = h.pick_order(&e, (0, 0), t0, |_| None);
        assert_eq!(order.last(), Some(&e[0]), "ejected goes last");
        // A second may go (2 of 4), a third may not.
        for _ in 0..EJECT_AFTER {
            h.begin(e[1]);
            h.end(e[1], None, false, 4, t0);
        }
        let mut third = false;
        for _ in 0..EJECT_AFTER {
            h.begin(e[2]);
            third |= h.end(e[2], None, false, 4, t0);
        }
        assert!(!third, "never more than half ejected");
        // Readmitted when the time is over; the next ejection lasts twice as long.
        let back = t0 + ejection_time(1);
        assert_eq!(h.pick_order(&e, (0, 0), back, |_| None)[0], e[0]);
        // On probation: its first failure ejects it again, for twice as long.
        h.begin(e[0]);
        assert!(h.end(e[0], None, false, 4, back));
        assert_eq!(
            h.pick_order(&e, (0, 0), back + ejection_time(1), |_| None)
                .last(),
            Some(&e[0])
        );
        // A success ends probation: the next ejection takes a full run of failures again.
        let later = back + ejection_time(2);
        h.begin(e[0]);
        assert!(!h.end(e[0], None, true, 4, later));
        for i in 0..EJECT_AFTER {
            h.begin(e[0]);
            assert_eq!(h.end(e[0], None, false, 4, later), i + 1 == EJECT_AFTER);
        }
        assert_eq!(ejection_time(2), ejection_time(1) * 2);
        assert_eq!(ejection_time(50), MAX_EJECTION);
        assert!(!may_eject(0, 1) && may_eject(0, 2) && !may_eject(1, 2));
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
