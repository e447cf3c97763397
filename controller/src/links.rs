//! Peer links: the QUIC connections between proxies, as the proxies at their ends report them, for
//! `quicmesh ctl stat --peers` (`Admin.GetStats` with `peers`).
//!
//! Why: request latency says a call is slow, not whether the network under it is. Each traffic report
//! carries the reporter's live connections to other proxies (smoothed RTT and congestion window at
//! the interval's end, packets sent and declared lost during it); here they are kept per link
//! (reporter identity, peer identity, peer address, which side dialed) with the latest RTT and window
//! and the packet counts summed over the same sliding windows as the edges ([`crate::stats`]), so an
//! operator reads each link's loss rate over the last minute, ten minutes or hour.
//!
//! Replicas of one identity calling the same address share a link (their counts add up, the RTT is the
//! latest reported). Memory is bounded like the edges': at most [`MAX_LINKS`] links, at most
//! [`MAX_LINKS_PER_REPORTER`] per reporting identity (the rest are counted refused as `peers_full`),
//! at most [`MAX_REPORT_PEERS`] per report, and a link not reported for an hour is dropped. Pure over
//! a caller-given clock, unit-tested with fake time.

use std::collections::HashMap;

use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::SpiffeId;

use crate::stats::{Refusal, Ring, STALE_MS, Side, Slot, WINDOWS, Window};

/// Most peer connections one report may carry (what a proxy sends at most).
pub const MAX_REPORT_PEERS: usize = quicmesh_transport::control::report::MAX_PEERS;
/// Most links held.
pub const MAX_LINKS: usize = 4096;
/// Most links one reporting identity may create.
pub const MAX_LINKS_PER_REPORTER: usize = 256;
/// A link not reported for this long is dropped, ms.
const KEEP_MS: u64 = 3_600_000;
/// Longest address accepted (an IPv6 literal with port fits in 47).
const MAX_ADDRESS: usize = 64;

/// Packets sent and declared lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packets {
    /// Sent.
    pub sent: u64,
    /// Declared lost.
    pub lost: u64,
}

impl Slot for Packets {
    fn merge(&mut self, o: &Self) {
        self.sent = self.sent.saturating_add(o.sent);
        self.lost = self.lost.saturating_add(o.lost);
    }
}

/// A link: one reporter's connection(s) to one peer at one address, dialed by one side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    /// The reporting proxy's identity.
    pub reporter: String,
    /// The other proxy's identity.
    pub peer: String,
    /// Its UDP address.
    pub address: String,
    /// Outbound: the reporter dialed.
    pub side: Side,
}

/// One validated peer of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInput {
    /// The link.
    pub id: LinkId,
    /// Smoothed RTT at the interval's end, µs.
    pub rtt_us: u32,
    /// Congestion window then, bytes.
    pub cwnd: u64,
    /// During the interval.
    pub packets: Packets,
}

/// Checks the peers of a report from `reporter`.
pub fn validate(reporter: &SpiffeId, peers: &[pb::PeerSummary]) -> Result<Vec<LinkInput>, Refusal> {
    if peers.len() > MAX_REPORT_PEERS {
        return Err(Refusal::TooManyPeers(peers.len()));
    }
    peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bad = |m: String| Refusal::MalformedPeer(i, m);
            let side = match pb::EdgeDirection::try_from(p.direction) {
                Ok(pb::EdgeDirection::Inbound) => Side::Inbound,
                Ok(pb::EdgeDirection::Outbound) => Side::Outbound,
                _ => {
                    return Err(bad(format!(
                        "direction {} is not inbound or outbound",
                        p.direction
                    )));
                }
            };
            let peer = p
                .peer
                .parse::<SpiffeId>()
                .map_err(|e| bad(format!("peer {:?}: {e}", crate::error::Capped(&p.peer))))?;
            if p.address.len() > MAX_ADDRESS || p.address.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(format!(
                    "address {:?} is not ip:port",
                    crate::error::Capped(&p.address)
                )));
            }
            Ok(LinkInput {
                id: LinkId {
                    reporter: reporter.to_string(),
                    peer: peer.to_string(),
                    address: p.address.clone(),
                    side,
                },
                rtt_us: p.rtt_us,
                cwnd: p.cwnd_bytes,
                packets: Packets {
                    sent: p.sent_packets,
                    lost: p.lost_packets,
                },
            })
        })
        .collect()
}

#[derive(Debug, Clone)]
struct LinkStats {
    rings: [Ring<Packets>; 3],
    rtt_us: u32,
    cwnd: u64,
    last_ms: u64,
}

/// A link over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkFigures {
    /// The link.
    pub id: LinkId,
    /// Latest smoothed RTT, ms.
    pub rtt_ms: f64,
    /// Latest congestion window, bytes.
    pub cwnd: u64,
    /// Over the window.
    pub packets: Packets,
    /// Since the latest report, seconds.
    pub age_s: f64,
}

impl LinkFigures {
    /// Lost / sent over the window (0 without sends).
    pub fn loss_rate(&self) -> f64 {
        if self.packets.sent == 0 {
            0.0
        } else {
            self.packets.lost as f64 / self.packets.sent as f64
        }
    }
}

/// Every link's windows, bounded.
#[derive(Debug)]
pub struct Links {
    links: HashMap<LinkId, LinkStats>,
    per_reporter: HashMap<String, usize>,
    max: usize,
    max_per_reporter: usize,
    last_sweep_ms: Option<u64>,
}

impl Default for Links {
    fn default() -> Self {
        Self::new(MAX_LINKS, MAX_LINKS_PER_REPORTER)
    }
}

impl Links {
    /// Holding at most `max` links, at most `max_per_reporter` of one reporter.
    pub fn new(max: usize, max_per_reporter: usize) -> Self {
        Self {
            links: HashMap::new(),
            per_reporter: HashMap::new(),
            max,
            max_per_reporter,
            last_sweep_ms: None,
        }
    }

    /// Links held.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Adds the peers of a report whose interval ended at `end_ms`, at `now_ms`. Returns how many
    /// links a bound left out.
    pub fn record(&mut self, links: Vec<LinkInput>, end_ms: u64, now_ms: u64) -> usize {
        self.sweep(now_ms);
        let mut full = 0;
        for l in links {
            let st = match self.links.get_mut(&l.id) {
                Some(st) => st,
                None => {
                    let mine = self.per_reporter.get(&l.id.reporter).copied().unwrap_or(0);
                    if self.links.len() >= self.max || mine >= self.max_per_reporter {
                        full += 1;
                        continue;
                    }
                    *self.per_reporter.entry(l.id.reporter.clone()).or_default() += 1;
                    self.links.entry(l.id.clone()).or_insert_with(|| LinkStats {
                        rings: WINDOWS.map(|w| Ring::new(&w)),
                        rtt_us: l.rtt_us,
                        cwnd: l.cwnd,
                        last_ms: end_ms,
                    })
                }
            };
            for (ring, w) in st.rings.iter_mut().zip(WINDOWS.iter()) {
                ring.add(w, end_ms, &l.packets);
            }
            // A summary held back by an outage does not overwrite a newer reading.
            if end_ms >= st.last_ms {
                st.rtt_us = l.rtt_us;
                st.cwnd = l.cwnd;
                st.last_ms = end_ms;
            }
        }
        full
    }

    /// Drops links not reported for an hour, at most every 10 s (not a scan per report).
    fn sweep(&mut self, now_ms: u64) {
        if self.last_sweep_ms.is_some_and(|t| now_ms < t + 10_000) {
            return;
        }
        self.last_sweep_ms = Some(now_ms);
        let per = &mut self.per_reporter;
        self.links.retain(|id, st| {
            let keep = now_ms.saturating_sub(st.last_ms) < KEEP_MS;
            if !keep && let Some(n) = per.get_mut(&id.reporter) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per.remove(&id.reporter);
                }
            }
            keep
        });
    }

    /// Links reported within `w` (and, for the one-minute window, not stale: a connection that
    /// closed stops being reported), sorted by reporter, peer, address and side.
    pub fn figures(&self, w: Window, now_ms: u64) -> Vec<LinkFigures> {
        let ring = WINDOWS.iter().position(|x| *x == w).unwrap_or(0);
        let since = if ring == 0 {
            now_ms.saturating_sub(STALE_MS)
        } else {
            w.start(now_ms)
        };
        let mut out: Vec<_> = self
            .links
            .iter()
            .filter(|(_, st)| st.last_ms >= since)
            .map(|(id, st)| LinkFigures {
                id: id.clone(),
                rtt_ms: f64::from(st.rtt_us) / 1000.0,
                cwnd: st.cwnd,
                packets: st.rings[ring].sum(&w, now_ms),
                age_s: now_ms.saturating_sub(st.last_ms) as f64 / 1000.0,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("spiffe id")
    }

    fn peer(n: u32, sent: u64, lost: u64) -> pb::PeerSummary {
        pb::PeerSummary {
            direction: pb::EdgeDirection::Outbound as i32,
            peer: format!("spiffe://td/ns/shop/sa/p{n}"),
            address: format!("10.0.0.{n}:4433"),
            rtt_us: 2_000 + n,
            cwnd_bytes: 14_720,
            sent_packets: sent,
            lost_packets: lost,
        }
    }

    #[test]
    fn bad_peers_are_refused_by_index() {
        let me = id("spiffe://td/ns/shop/sa/web");
        assert_eq!(validate(&me, &[peer(1, 10, 0)]).map(|v| v.len()), Ok(1));
        let mut p = peer(1, 1, 0);
        p.peer = "https://evil".into();
        assert!(matches!(
            validate(&me, &[peer(2, 1, 0), p]),
            Err(Refusal::MalformedPeer(1, _))
        ));
        let mut p = peer(1, 1, 0);
        p.address = "not-an-address".into();
        assert!(matches!(
            validate(&me, &[p]),
            Err(Refusal::MalformedPeer(0, _))
        ));
        let mut p = peer(1, 1, 0);
        p.direction = 9;
        assert!(matches!(
            validate(&me, &[p]),
            Err(Refusal::MalformedPeer(0, _))
        ));
        let many: Vec<_> = (0..=MAX_REPORT_PEERS as u32)
            .map(|i| peer(i, 0, 0))
            .collect();
        assert_eq!(
            validate(&me, &many).map(|v| v.len()),
            Err(Refusal::TooManyPeers(MAX_REPORT_PEERS + 1))
        );
    }

    #[test]
    fn packets_sum_over_the_window_and_rtt_is_the_latest() {
        let me = id("spiffe://td/ns/shop/sa/web");
        let mut l = Links::default();
        let w = Window::of(60).expect("1m");
        let mut a = peer(1, 1000, 10);
        l.record(validate(&me, &[a.clone()]).expect("ok"), 5_000, 5_000);
        a.rtt_us = 9_000;
        a.sent_packets = 3000;
        a.lost_packets = 20;
        l.record(validate(&me, &[a.clone()]).expect("ok"), 10_000, 10_000);
        // A late summary counts its packets but keeps the newer RTT.
        a.rtt_us = 1;
        a.sent_packets = 1000;
        a.lost_packets = 0;
        l.record(validate(&me, &[a]).expect("ok"), 4_000, 10_500);
        let f = l.figures(w, 11_000);
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].packets,
            Packets {
                sent: 5000,
                lost: 30
            }
        );
        assert!((f[0].loss_rate() - 0.006).abs() < 1e-9);
        assert!((f[0].rtt_ms - 9.0).abs() < 1e-9);
        assert_eq!(f[0].id.side, Side::Outbound);
        assert!((f[0].age_s - 1.0).abs() < 1e-9);
        // Not reported for longer than the stale bound: gone from the minute, still in the hour.
        assert!(l.figures(w, 10_000 + STALE_MS + 1).is_empty());
        let hour = Window::of(3600).expect("1h");
        assert_eq!(l.figures(hour, 10_000 + STALE_MS + 1).len(), 1);
        // After an hour without reports the link is dropped.
        l.record(Vec::new(), KEEP_MS + 20_000, KEEP_MS + 20_000);
        assert!(l.is_empty());
    }

    #[test]
    fn links_are_bounded_in_all_and_per_reporter() {
        let mut l = Links::new(5, 3);
        let a = id("spiffe://td/ns/shop/sa/a");
        let b = id("spiffe://td/ns/shop/sa/b");
        let four: Vec<_> = (0..4).map(|i| peer(i, 1, 0)).collect();
        assert_eq!(l.record(validate(&a, &four).expect("ok"), 1, 1), 1);
        assert_eq!(l.record(validate(&b, &four).expect("ok"), 1, 1), 2);
        assert_eq!(l.len(), 5);
        // Links already held are updated past the bound.
        assert_eq!(l.record(validate(&a, &four[..3]).expect("ok"), 2, 2), 0);
    }
}
