//! Live tap: who taps which service, and what each proxy must sample.
//!
//! An operator's `Admin.Tap` call subscribes to one service; the union of subscribed services (and the
//! largest requested rate, capped) is published on a watch channel that every proxy's `ProxyApi.Tap`
//! call forwards, so proxies sample only while someone taps. Dropping a subscription (the operator's
//! stream went away) recomputes the union at once; the last one gone turns sampling off at the proxies.
//! Samples go to every subscriber of their service with `try_send`: a slow reader loses samples, never
//! slows a proxy's call. What to publish is a pure function ([`control_for`]).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use quicmesh_proto::controller as pb;
use tokio::sync::{mpsc, watch};

/// Most samples a second an operator may ask for.
pub const MAX_PER_SECOND: u32 = 100;
/// Samples queued per subscriber.
const QUEUE: usize = 256;

#[derive(Debug)]
struct Sub {
    service: String,
    max_per_second: u32,
    tx: mpsc::Sender<pb::TapEvent>,
}

/// The subscriptions and the control every proxy follows.
#[derive(Debug)]
pub struct TapHub {
    subs: Mutex<(u64, HashMap<u64, Sub>)>,
    control: watch::Sender<pb::TapControl>,
}

impl Default for TapHub {
    fn default() -> Self {
        Self {
            subs: Mutex::new((0, HashMap::new())),
            control: watch::Sender::new(pb::TapControl::default()),
        }
    }
}

/// What proxies sample for the subscriptions `(service, max_per_second)`: each service once, at the
/// highest rate asked (0 = 10), capped at [`MAX_PER_SECOND`].
pub fn control_for<'a>(subs: impl Iterator<Item = (&'a str, u32)>) -> pb::TapControl {
    let mut services = BTreeSet::new();
    let mut rate = 0;
    for (s, r) in subs {
        services.insert(s.to_owned());
        rate = rate.max(if r == 0 { 10 } else { r });
    }
    pb::TapControl {
        services: services.into_iter().collect(),
        max_per_second: rate.min(MAX_PER_SECOND),
    }
}

/// A subscription; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<TapHub>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.lock().1.remove(&self.id);
        self.hub.publish();
    }
}

impl TapHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Sub>)> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self) {
        let c = {
            let subs = self.lock();
            control_for(
                subs.1
                    .values()
                    .map(|s| (s.service.as_str(), s.max_per_second)),
            )
        };
        self.control.send_if_modified(|cur| {
            let changed = *cur != c;
            *cur = c;
            changed
        });
    }

    /// Subscribes to `service` (`name.namespace`).
    pub fn subscribe(
        self: &Arc<Self>,
        service: String,
        max_per_second: u32,
    ) -> (Subscription, mpsc::Receiver<pb::TapEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = {
            let mut subs = self.lock();
            subs.0 += 1;
            let id = subs.0;
            subs.1.insert(
                id,
                Sub {
                    service,
                    max_per_second,
                    tx,
                },
            );
            id
        };
        self.publish();
        (
            Subscription {
                hub: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Operators' taps open now.
    pub fn subscribers(&self) -> usize {
        self.lock().1.len()
    }

    /// What proxies should sample, now and on every change.
    pub fn control(&self) -> watch::Receiver<pb::TapControl> {
        self.control.subscribe()
    }

    /// Hands a sample to the subscribers of its service.
    pub fn publish_event(&self, e: &pb::TapEvent) {
        for s in self.lock().1.values() {
            if s.service == e.service {
                let _ = s.tx.try_send(e.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_sample_the_union_at_the_highest_rate_asked() {
        let c = control_for([("web.a", 5), ("api.a", 0), ("web.a", 50)].into_iter());
        assert_eq!(c.services, ["api.a", "web.a"]);
        assert_eq!(c.max_per_second, 50);
        assert_eq!(
            control_for([("x.a", 1000)].into_iter()).max_per_second,
            MAX_PER_SECOND
        );
        assert_eq!(control_for(std::iter::empty()), pb::TapControl::default());
    }

    #[tokio::test]
    async fn the_last_subscription_gone_turns_sampling_off() {
        let hub = Arc::new(TapHub::default());
        let mut control = hub.control();
        let (a, mut rx) = hub.subscribe("web.a".into(), 10);
        let (b, _) = hub.subscribe("api.a".into(), 10);
        assert_eq!(control.borrow_and_update().services, ["api.a", "web.a"]);
        hub.publish_event(&pb::TapEvent {
            service: "web.a".into(),
            ..Default::default()
        });
        hub.publish_event(&pb::TapEvent {
            service: "other.a".into(),
            ..Default::default()
        });
        assert_eq!(rx.try_recv().map(|e| e.service).ok(), Some("web.a".into()));
        assert!(rx.try_recv().is_err());
        drop(a);
        assert_eq!(control.borrow_and_update().services, ["api.a"]);
        drop(b);
        assert!(control.borrow_and_update().services.is_empty());
    }
}
