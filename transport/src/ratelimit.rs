//! Rate limits, decided on the destination's side before a stream or request reaches its application.
//!
//! A `RateLimit` policy is a limit for the service as a whole, not for each of its proxies: every inbound
//! proxy enforces its share, the limit divided by the service's endpoints in the mesh state. The
//! controller's endpoint registrations are what shares the limit out, so no request waits on the
//! controller, a change of endpoints reshares it with the next snapshot, and a proxy that loses the
//! controller keeps its last share. With `per_source` each caller identity gets that share on its own.
//!
//! The algorithm is GCRA (a virtual-scheduling token bucket: one timestamp per key, no timer), as a pure
//! function of the stored timestamp and `now`; [`Limiters`] only keeps the timestamps.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    identity::SpiffeId,
    model::RateLimit,
    state::{Admission, MeshState, Request, ServiceRef},
};

/// Callers tracked per service with `per_source`; beyond it, idle callers are forgotten first and a
/// flood of new identities is refused rather than let through untracked.
pub const MAX_SOURCES: usize = 10_000;

/// One limit: requests are spaced `interval` apart on average, and may run up to `tolerance` ahead of
/// that schedule (the burst).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    /// Time one request costs.
    pub interval: Duration,
    /// How far ahead of the schedule requests may run.
    pub tolerance: Duration,
}

impl Gcra {
    /// `rate` requests per second with `burst` more at once; `None` unless `rate` is positive and finite.
    pub fn new(rate: f64, burst: u32) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let interval = Duration::try_from_secs_f64(1.0 / rate).ok()?;
        Some(Self {
            interval,
            tolerance: interval.saturating_mul(burst),
        })
    }

    /// Decides one request at `now` given the stored theoretical arrival time `tat`: the new `tat` when
    /// admitted, or how long to wait before one would be.
    pub fn check(&self, tat: Option<Instant>, now: Instant) -> Result<Instant, Duration> {
        let tat = tat.map_or(now, |t| t.max(now));
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        Ok(tat + self.interval)
    }
}

/// The limit this proxy enforces for `limit` when the service has `endpoints` endpoints: an even share
/// of the rate and of the burst (rounded up, so a burst is never 0 where the total was not).
pub fn share(limit: &RateLimit, endpoints: usize) -> Option<Gcra> {
    let n = endpoints.max(1);
    let burst = limit.burst.div_ceil(u32::try_from(n).unwrap_or(u32::MAX));
    Gcra::new(limit.requests_per_second / n as f64, burst)
}

/// What a rate limit says about one stream or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    /// Within the limit (or no limit).
    Allow,
    /// Over the limit: the caller may try again after this long.
    Limited {
        /// Wait before the next request would be admitted.
        retry_after: Duration,
    },
}

/// A stream or request's admission by policy, then (if admitted) the rate limit, on one look at the
/// mesh state.
pub fn decide(
    state: &MeshState,
    limiters: &Limiters,
    req: &Request<'_>,
    now: Instant,
) -> (Admission, RateVerdict) {
    let admission = state.admit(req);
    let rate = match admission {
        Admission::Refuse { .. } => RateVerdict::Allow,
        Admission::Admit { .. } => limiters.check(state, req.service, req.peer, now),
    };
    (admission, rate)
}

struct ServiceLimiter {
    gcra: Gcra,
    per_source: bool,
    total: Option<Instant>,
    sources: HashMap<SpiffeId, Instant>,
}

/// The timestamps of every limited service this proxy serves.
#[derive(Default)]
pub struct Limiters {
    services: Mutex<HashMap<ServiceRef, ServiceLimiter>>,
}

impl Limiters {
    /// Decides a stream or request from `peer` to `service` at `now`, under the mesh state's policy.
    pub fn check(
        &self,
        state: &MeshState,
        service: &ServiceRef,
        peer: &SpiffeId,
        now: Instant,
    ) -> RateVerdict {
        let Some(svc) = state.service(service) else {
            return RateVerdict::Allow;
        };
        let Some(limit) = &svc.policy.rate_limit else {
            return RateVerdict::Allow;
        };
        let Some(gcra) = share(limit, svc.endpoints.len()) else {
            return RateVerdict::Allow;
        };
        let fresh = || ServiceLimiter {
            gcra,
            per_source: limit.per_source,
            total: None,
            sources: HashMap::new(),
        };
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let l = match services.get_mut(service) {
            Some(l) => l,
            None => services.entry(service.clone()).or_insert_with(fresh),
        };
        if l.gcra != gcra || l.per_source != limit.per_source {
            // A new limit or share starts from a clean schedule.
            *l = fresh();
        }
        let verdict = |r: Result<Instant, Duration>, slot: &mut Option<Instant>| match r {
            Ok(tat) => {
                *slot = Some(tat);
                RateVerdict::Allow
            }
            Err(retry_after) => RateVerdict::Limited { retry_after },
        };
        if !l.per_source {
            let r = gcra.check(l.total, now);
            return verdict(r, &mut l.total);
        }
        if let Some(tat) = l.sources.get_mut(peer) {
            let mut slot = Some(*tat);
            let v = verdict(gcra.check(slot, now), &mut slot);
            if let Some(t) = slot {
                *tat = t;
            }
            return v;
        }
        if l.sources.len() >= MAX_SOURCES {
            // Callers whose schedule is behind `now` are indistinguishable from new ones: forget them.
            l.sources.retain(|_, tat| *tat > now);
            if l.sources.len() >= MAX_SOURCES {
                return RateVerdict::Limited {
                    retry_after: gcra.interval,
                };
            }
        }
        let mut slot = None;
        let v = verdict(gcra.check(None, now), &mut slot);
        if let Some(t) = slot {
            l.sources.insert(peer.clone(), t);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_yaml_documents;

    fn state(limit: &str, endpoints: usize) -> MeshState {
        let mut yaml = format!(
            "kind: Service\nmetadata: {{name: api, namespace: ns}}\nspec: {{ports: [{{port: 80, protocol: http}}]}}\n---\nkind: Policy\nmetadata: {{name: rl, namespace: ns}}\nspec: {{target_service: api, rate_limit: {limit}}}\n"
        );
        for i in 0..endpoints {
            yaml.push_str(&format!(
                "---\nkind: Endpoint\nmetadata: {{name: api-{i}, namespace: ns}}\nspec: {{service: api, address: \"127.0.0.1:{}\", spiffe_id: \"spiffe://td/ns/ns/sa/api\"}}\n",
                1000 + i
            ));
        }
        MeshState::from_resources(1, "td", parse_yaml_documents(&yaml).expect("yaml"), [])
    }

    fn api() -> ServiceRef {
        ServiceRef::parse("api.ns", "")
    }

    fn peer(name: &str) -> SpiffeId {
        format!("spiffe://td/ns/ns/sa/{name}").parse().expect("id")
    }

    /// Requests admitted when `offered` per second arrive evenly for `secs` seconds.
    fn admitted(l: &Limiters, s: &MeshState, who: &SpiffeId, offered: u32, secs: u32) -> u32 {
        let t0 = Instant::now();
        let step = Duration::from_secs(1) / offered;
        (0..offered * secs)
            .filter(|i| l.check(s, &api(), who, t0 + step * *i) == RateVerdict::Allow)
            .count() as u32
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let g = Gcra::new(100.0, 10).expect("limit");
        let now = Instant::now();
        let mut tat = None;
        let mut ok = 0;
        for _ in 0..50 {
            if let Ok(t) = g.check(tat, now) {
                tat = Some(t);
                ok += 1;
            }
        }
        assert_eq!(ok, 11, "the burst plus the first request");
        let wait = g.check(tat, now).expect_err("over the limit");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(10),
            "{wait:?}"
        );
        assert!(g.check(tat, now + wait).is_ok());
        assert!(Gcra::new(0.0, 1).is_none());
        assert!(Gcra::new(f64::NAN, 1).is_none());
        assert!(Gcra::new(-1.0, 1).is_none());
    }

    #[test]
    fn a_service_limit_holds_against_four_times_the_rate() {
        let s = state("{requests_per_second: 100, burst: 10}", 1);
        let l = Limiters::default();
        let n = admitted(&l, &s, &peer("a"), 400, 10);
        // 100/s for 10 s plus the burst.
        assert!((1000..=1011).contains(&n), "{n}");
    }

    #[test]
    fn per_source_limits_are_separate_and_a_total_limit_is_shared() {
        let s = state("{requests_per_second: 50, per_source: true}", 1);
        let l = Limiters::default();
        assert!((500..=501).contains(&admitted(&l, &s, &peer("a"), 200, 10)));
        assert!((500..=501).contains(&admitted(&l, &s, &peer("b"), 200, 10)));
        let s = state("{requests_per_second: 50}", 1);
        let l = Limiters::default();
        let a = admitted(&l, &s, &peer("a"), 200, 10);
        assert!((500..=501).contains(&a), "{a}");
    }

    #[test]
    fn each_of_three_endpoints_enforces_a_third_and_two_a_half() {
        let l = Limiters::default();
        // The burst lets the schedule catch up between the 2.5 ms steps of the offered load.
        let limit = "{requests_per_second: 300, burst: 30}";
        let n = admitted(&l, &state(limit, 3), &peer("a"), 400, 10);
        assert!((1000..=1011).contains(&n), "{n}");
        let l = Limiters::default();
        let n = admitted(&l, &state(limit, 2), &peer("a"), 400, 10);
        assert!((1500..=1516).contains(&n), "{n}");
        assert_eq!(
            share(
                &RateLimit {
                    requests_per_second: 300.0,
                    burst: 10,
                    per_source: false
                },
                3
            )
            .map(|g| g.tolerance),
            Gcra::new(100.0, 4).map(|g| g.tolerance)
        );
    }

    #[test]
    fn a_refused_caller_spends_no_token() {
        let s = state("{requests_per_second: 1}", 1);
        let l = Limiters::default();
        let (a, b) = (peer("a"), peer("b"));
        let svc = api();
        let req = |p| Request {
            peer: p,
            service: &svc,
            port: 80,
            method: None,
            path: None,
        };
        let now = Instant::now();
        let revoked = s.with_revoked([b.clone()]);
        let (adm, rate) = decide(&revoked, &l, &req(&b), now);
        assert!(matches!(adm, Admission::Refuse { .. }));
        assert_eq!(rate, RateVerdict::Allow);
        assert_eq!(decide(&s, &l, &req(&a), now).1, RateVerdict::Allow);
        assert!(matches!(
            decide(&s, &l, &req(&a), now).1,
            RateVerdict::Limited { .. }
        ));
    }

    #[test]
    fn no_policy_means_no_limit() {
        let yaml = "kind: Service\nmetadata: {name: api, namespace: ns}\nspec: {ports: [{port: 80, protocol: http}]}\n";
        let s = MeshState::from_resources(1, "td", parse_yaml_documents(yaml).expect("yaml"), []);
        let l = Limiters::default();
        assert_eq!(admitted(&l, &s, &peer("a"), 1000, 1), 1000);
    }

    #[test]
    fn a_flood_of_new_identities_is_bounded() {
        let s = state("{requests_per_second: 1, per_source: true}", 1);
        let l = Limiters::default();
        let now = Instant::now();
        for i in 0..MAX_SOURCES {
            assert_eq!(
                l.check(&s, &api(), &peer(&format!("p{i}")), now),
                RateVerdict::Allow
            );
        }
        assert!(matches!(
            l.check(&s, &api(), &peer("one-too-many"), now),
            RateVerdict::Limited { .. }
        ));
        // Once their schedules are behind, old callers make room.
        let later = now + Duration::from_secs(2);
        assert_eq!(
            l.check(&s, &api(), &peer("one-too-many"), later),
            RateVerdict::Allow
        );
    }
}
