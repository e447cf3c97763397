//! What the inbound endpoint lets a peer cost before it has earned it.
//!
//! An Initial packet is cheap to send and, once accepted, makes the server hold a connection (TLS
//! state, packet spaces, stream tables) until the handshake ends; a stream that never sends its header
//! holds a task until the header timeout. Without bounds, 2,000 Initials took a proxy to 1.4 GB. The
//! decisions here are pure functions over counts, unit-tested without sockets; `inbound.rs` applies them:
//! - a new connection attempt is accepted while few handshakes are in progress; beyond
//!   [`InboundLimits::retry_above`] the client must first prove its address with a QUIC Retry (stateless
//!   for us: a flood from silent or spoofed sources then costs nothing), and beyond
//!   [`InboundLimits::max_handshakes`] it is turned away;
//! - a stream is taken only while its connection has fewer than its share of streams waiting for a
//!   header (otherwise the connection's next streams wait unaccepted, under its QUIC stream limit), and
//!   while all connections together are under the global cap (otherwise the stream is reset, counted);
//! - a verified connection's stream limit starts at [`FIRST_GRANT`] and doubles, up to the configured
//!   maximum, as its streams are put to real use (past their header), so the state quinn keeps for
//!   open streams grows with proven use, not with what a peer opens.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::config::InboundLimits;

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start the handshake.
    Accept,
    /// Answer with a Retry: the client comes back with a token that proves its address.
    Retry,
    /// Answer `CONNECTION_REFUSED`: the address is proven, so the answer reaches a real client.
    Refuse,
    /// Drop the packet silently: answering an unproven address could reflect traffic at a victim.
    Ignore,
}

impl Admission {
    /// Counter label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Retry => "retry",
            Self::Refuse => "refuse",
            Self::Ignore => "ignore",
        }
    }
}

/// Decides on a connection attempt, given the handshakes in progress and whether the client's address
/// is validated (it echoed a Retry token) or may still be asked to validate it.
pub fn admit(
    handshakes: usize,
    validated: bool,
    may_retry: bool,
    limits: &InboundLimits,
) -> Admission {
    if handshakes >= limits.max_handshakes {
        return if validated {
            Admission::Refuse
        } else {
            Admission::Ignore
        };
    }
    if !validated && handshakes >= limits.retry_above {
        return if may_retry {
            Admission::Retry
        } else {
            Admission::Ignore
        };
    }
    Admission::Accept
}

/// What to do with the next stream of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAdmission {
    /// Take it and read its header.
    Take,
    /// Do not accept from this connection until one of its streams stops waiting for a header.
    Hold,
    /// Accept it only to reset it: every connection together is at the global cap.
    Refuse,
}

/// Decides on a connection's next stream from the streams waiting for a header on this connection and
/// on all of them. The per-connection share comes first, so one hostile peer holds back only itself.
pub fn admit_stream(here: usize, all: usize, limits: &InboundLimits) -> StreamAdmission {
    if here >= limits.max_header_waits_per_connection {
        StreamAdmission::Hold
    } else if all >= limits.max_header_waits {
        StreamAdmission::Refuse
    } else {
        StreamAdmission::Take
    }
}

/// Streams granted to a connection when its peer is verified, as before (or the configured maximum if
/// lower). More come as the peer puts them to use ([`stream_grant`]): a peer that opens streams and
/// never sends a header keeps this many, and the state quinn holds for them, at most.
pub const FIRST_GRANT: u32 = crate::quic::STREAMS_BEFORE_AUTH;

/// The stream limit of a verified connection once `tunnels` of its streams are past their header:
/// doubled as soon as half of the current grant is in real use, never above `max`; `None` to keep it.
pub fn stream_grant(tunnels: usize, granted: u32, max: u32) -> Option<u32> {
    let half = usize::try_from(granted / 2).unwrap_or(usize::MAX);
    (granted < max && tunnels >= half.max(1)).then(|| granted.saturating_mul(2).min(max))
}

/// A live count that a guard decrements on drop; it can be the gauge a scrape reads.
#[derive(Debug, Default)]
pub struct Count {
    n: Gauge,
    dropped: Notify,
}

impl Count {
    /// A count kept in `gauge` (registered elsewhere).
    pub fn in_gauge(gauge: Gauge) -> Self {
        Self {
            n: gauge,
            dropped: Notify::new(),
        }
    }

    /// The current value.
    pub fn get(&self) -> usize {
        usize::try_from(self.n.get()).unwrap_or(0)
    }

    /// Counts one more until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> CountGuard {
        self.n.inc();
        CountGuard(self.clone())
    }

    /// Resolves once `holds` is false, re-checked after every guard drop.
    pub async fn wait_until(&self, holds: impl Fn(usize) -> bool) {
        loop {
            let dropped = self.dropped.notified();
            tokio::pin!(dropped);
            dropped.as_mut().enable();
            if !holds(self.get()) {
                return;
            }
            dropped.await;
        }
    }
}

/// One unit of a [`Count`].
#[derive(Debug)]
pub struct CountGuard(Arc<Count>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.n.dec();
        self.0.dropped.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> InboundLimits {
        InboundLimits {
            retry_above: 2,
            max_handshakes: 4,
            max_header_waits: 10,
            max_header_waits_per_connection: 3,
            ..InboundLimits::default()
        }
    }

    #[test]
    fn handshakes_are_accepted_then_retried_then_turned_away() {
        let l = limits();
        assert_eq!(admit(0, false, true, &l), Admission::Accept);
        assert_eq!(admit(1, false, true, &l), Admission::Accept);
        // Busy: unproven addresses must come back with a token first.
        assert_eq!(admit(2, false, true, &l), Admission::Retry);
        assert_eq!(admit(3, false, true, &l), Admission::Retry);
        // A client that proved its address is taken until the hard cap.
        assert_eq!(admit(3, true, false, &l), Admission::Accept);
        // At the cap: a proven client hears a refusal, an unproven source nothing at all.
        assert_eq!(admit(4, true, false, &l), Admission::Refuse);
        assert_eq!(admit(4, false, true, &l), Admission::Ignore);
        assert_eq!(admit(usize::MAX, false, true, &l), Admission::Ignore);
        // Cannot be retried (already carries a token) yet unproven: never start a handshake for it.
        assert_eq!(admit(2, false, false, &l), Admission::Ignore);
    }

    #[test]
    fn streams_are_held_per_connection_before_they_are_refused_globally() {
        let l = limits();
        assert_eq!(admit_stream(0, 0, &l), StreamAdmission::Take);
        assert_eq!(admit_stream(2, 9, &l), StreamAdmission::Take);
        assert_eq!(admit_stream(3, 3, &l), StreamAdmission::Hold);
        assert_eq!(admit_stream(3, 10, &l), StreamAdmission::Hold);
        assert_eq!(admit_stream(0, 10, &l), StreamAdmission::Refuse);
        assert_eq!(admit_stream(1, 11, &l), StreamAdmission::Refuse);
    }

    #[test]
    fn the_stream_grant_grows_with_streams_in_use_up_to_the_maximum() {
        assert_eq!(stream_grant(0, 1024, 8192), None);
        assert_eq!(stream_grant(511, 1024, 8192), None);
        assert_eq!(stream_grant(512, 1024, 8192), Some(2048));
        assert_eq!(stream_grant(3000, 4096, 8192), Some(8192));
        assert_eq!(stream_grant(8000, 8192, 8192), None);
        // A maximum below the first grant: never raised.
        assert_eq!(stream_grant(100, 100, 100), None);
        assert_eq!(stream_grant(1, 1, 2), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_wakes_its_waiter_when_a_guard_drops() {
        let c = Arc::new(Count::default());
        let guards: Vec<_> = (0..3).map(|_| c.enter()).collect();
        assert_eq!(c.get(), 3);
        // Below the bound: returns at once.
        tokio::time::timeout(Duration::from_millis(1), c.wait_until(|n| n >= 4))
            .await
            .expect("not held");
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_until(|n| n >= 3).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "held while at the bound");
        drop(guards);
        tokio::time::timeout(Duration::from_millis(1), waiter)
            .await
            .expect("released by a drop")
            .expect("task");
        assert_eq!(c.get(), 0);
    }
}
