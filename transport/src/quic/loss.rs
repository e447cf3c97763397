//! How a mesh connection answers packet loss: random loss is retransmitted, not taken as congestion.
//!
//! RFC 9002's controllers (CUBIC, NewReno) shrink the window on every loss. Their throughput under a
//! random loss rate `p` is about `window / RTT` with a window near `1.2 / sqrt(p)` packets, so it falls
//! with RTT. Kernel TCP between two hosts sees RTTs of tens of microseconds and keeps multi-gigabit rates
//! at 1% loss; a userspace QUIC endpoint sees hundreds of microseconds (batched sends, acknowledgement
//! delay, wake-ups) and dropped to a third of the TCP peers' rate at 1% loss, a fifth at 5%.
//!
//! So the loss signal is filtered before the controller sees it ([`LossFilter`], a pure state machine).
//! A loss counts as congestion when something says a queue is full: the connection's smoothed RTT stands
//! `queue_delay` above its minimum (a queue is building on the path), the share of bytes lost over the
//! last two rounds reaches `loss_threshold` (a shallow buffer overflowing drops a burst), the loss is
//! persistent congestion, or the peer marked ECN congestion. Any other loss is retransmitted and the window
//! kept. Setting `loss_threshold` to 0 passes every loss through, as RFC 9002 does.
//!
//! The cost is the usual one of loss-tolerant controllers: on a bottleneck with a shallow buffer and no
//! delay signal, a flow may run at up to `loss_threshold` loss before backing off.

use std::{any::Any, sync::Arc, time::Duration};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use std::time::Instant;

/// Fewest bytes two rounds must carry before their loss share is trusted; below this a single lost
/// packet would read as a heavy loss rate.
const MIN_SAMPLE_BYTES: u64 = 16 * 1200;

/// Shortest round, so that a sub-millisecond RTT still gives rounds long enough to count loss over.
const MIN_ROUND: Duration = Duration::from_millis(1);

/// What [`LossFilter`] makes of a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossVerdict {
    /// Persistent congestion, ECN, a standing queue or heavy loss: the controller must back off.
    Congestion,
    /// An isolated loss on an unqueued path: retransmit, keep the window.
    Random,
}

/// Thresholds of [`LossFilter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossFilterConfig {
    /// Share of bytes lost over the last two rounds from which loss is congestion; 0 makes every loss
    /// congestion.
    pub loss_threshold: f64,
    /// Smoothed RTT above the minimum from which loss is congestion.
    pub queue_delay: Duration,
}

/// Loss accounting over rounds of about one smoothed RTT. Pure: time comes in as arguments.
#[derive(Debug, Clone)]
pub struct LossFilter {
    cfg: LossFilterConfig,
    round_start: Option<Instant>,
    acked: u64,
    lost: u64,
    prev_acked: u64,
    prev_lost: u64,
    srtt: Duration,
    min_rtt: Duration,
}

impl LossFilter {
    /// A filter with no history.
    pub fn new(cfg: LossFilterConfig) -> Self {
        Self {
            cfg,
            round_start: None,
            acked: 0,
            lost: 0,
            prev_acked: 0,
            prev_lost: 0,
            srtt: Duration::ZERO,
            min_rtt: Duration::ZERO,
        }
    }

    fn roll(&mut self, now: Instant) {
        let round = self.srtt.max(MIN_ROUND);
        match self.round_start {
            Some(start) if now.saturating_duration_since(start) < round => {}
            Some(start) => {
                // A gap of more than one round leaves nothing of the older rounds to count.
                let idle = now.saturating_duration_since(start) >= round * 2;
                self.prev_acked = if idle { 0 } else { self.acked };
                self.prev_lost = if idle { 0 } else { self.lost };
                self.acked = 0;
                self.lost = 0;
                self.round_start = Some(now);
            }
            None => self.round_start = Some(now),
        }
    }

    /// Bytes acknowledged, with the connection's RTT estimates at that moment.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, srtt: Duration, min_rtt: Duration) {
        self.srtt = srtt;
        self.min_rtt = min_rtt;
        self.roll(now);
        self.acked = self.acked.saturating_add(bytes);
    }

    /// Share of bytes lost over the last two rounds, when they carried enough to say.
    pub fn loss_share(&self) -> Option<f64> {
        let lost = self.lost + self.prev_lost;
        let total = lost + self.acked + self.prev_acked;
        (total >= MIN_SAMPLE_BYTES).then(|| lost as f64 / total as f64)
    }

    /// A loss of `lost_bytes` (0: an ECN congestion mark), and whether it is congestion.
    pub fn on_loss(&mut self, now: Instant, lost_bytes: u64, persistent: bool) -> LossVerdict {
        self.roll(now);
        self.lost = self.lost.saturating_add(lost_bytes);
        let queued = self.srtt.saturating_sub(self.min_rtt) >= self.cfg.queue_delay;
        let heavy = self
            .loss_share()
            .is_some_and(|s| s >= self.cfg.loss_threshold);
        if persistent || lost_bytes == 0 || queued || heavy || self.cfg.loss_threshold <= 0.0 {
            LossVerdict::Congestion
        } else {
            LossVerdict::Random
        }
    }
}

/// Builds an inner controller wrapped in a [`LossFilter`].
#[derive(Clone)]
pub struct FilteredFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    cfg: LossFilterConfig,
}

impl FilteredFactory {
    /// Wraps `inner`'s controllers.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>, cfg: LossFilterConfig) -> Self {
        Self { inner, cfg }
    }
}

impl ControllerFactory for FilteredFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Filtered {
            inner: self.inner.clone().build(now, current_mtu),
            filter: LossFilter::new(self.cfg),
        })
    }
}

/// A controller that hears only the losses its [`LossFilter`] calls congestion.
struct Filtered {
    inner: Box<dyn Controller>,
    filter: LossFilter,
}

impl Controller for Filtered {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.filter.on_ack(now, bytes, rtt.get(), rtt.min());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self
            .filter
            .on_loss(now, lost_bytes, is_persistent_congestion)
            == LossVerdict::Congestion
        {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self {
            inner: self.inner.clone_box(),
            filter: self.filter.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PKT: u64 = 1200;

    fn filter(threshold: f64) -> LossFilter {
        LossFilter::new(LossFilterConfig {
            loss_threshold: threshold,
            queue_delay: Duration::from_millis(2),
        })
    }

    /// Acks `packets` packets over `span`, one every `span / packets`, from `start`; returns the end.
    fn ack_run(
        f: &mut LossFilter,
        start: Instant,
        packets: u32,
        span: Duration,
        srtt: Duration,
    ) -> Instant {
        let step = span / packets;
        let mut now = start;
        for _ in 0..packets {
            now += step;
            f.on_ack(now, PKT, srtt, Duration::from_micros(200));
        }
        now
    }

    #[test]
    fn isolated_loss_on_an_unqueued_path_is_random() {
        let mut f = filter(0.1);
        let t0 = Instant::now();
        let now = ack_run(
            &mut f,
            t0,
            100,
            Duration::from_millis(2),
            Duration::from_micros(400),
        );
        assert_eq!(f.on_loss(now, PKT, false), LossVerdict::Random);
    }

    #[test]
    fn a_standing_queue_makes_loss_congestion() {
        let mut f = filter(0.1);
        let t0 = Instant::now();
        // Smoothed RTT 3 ms over a 0.2 ms minimum: 2.8 ms of queue.
        let now = ack_run(
            &mut f,
            t0,
            100,
            Duration::from_millis(6),
            Duration::from_millis(3),
        );
        assert_eq!(f.on_loss(now, PKT, false), LossVerdict::Congestion);
    }

    #[test]
    fn heavy_loss_is_congestion_even_without_delay() {
        let mut f = filter(0.1);
        let t0 = Instant::now();
        let mut now = ack_run(
            &mut f,
            t0,
            50,
            Duration::from_millis(1),
            Duration::from_micros(400),
        );
        // 6 of 56 packets lost (10.7%) within the same two rounds.
        let mut verdicts = Vec::new();
        for _ in 0..6 {
            now += Duration::from_micros(10);
            verdicts.push(f.on_loss(now, PKT, false));
        }
        assert_eq!(verdicts[0], LossVerdict::Random);
        assert_eq!(verdicts[5], LossVerdict::Congestion);
        assert!(f.loss_share().is_some_and(|s| s > 0.1));
    }

    #[test]
    fn loss_share_forgets_after_an_idle_gap() {
        let mut f = filter(0.1);
        let t0 = Instant::now();
        let now = ack_run(
            &mut f,
            t0,
            50,
            Duration::from_millis(1),
            Duration::from_micros(400),
        );
        for _ in 0..10 {
            f.on_loss(now, PKT, false);
        }
        // A second later the old rounds no longer count, and too few bytes are left to judge.
        let later = now + Duration::from_secs(1);
        f.on_ack(
            later,
            PKT,
            Duration::from_micros(400),
            Duration::from_micros(200),
        );
        assert_eq!(f.loss_share(), None);
        assert_eq!(f.on_loss(later, PKT, false), LossVerdict::Random);
    }

    #[test]
    fn persistent_congestion_ecn_and_a_zero_threshold_always_pass() {
        let t0 = Instant::now();
        let srtt = Duration::from_micros(400);
        let mut f = filter(0.1);
        let now = ack_run(&mut f, t0, 100, Duration::from_millis(2), srtt);
        assert_eq!(f.on_loss(now, PKT, true), LossVerdict::Congestion);
        assert_eq!(f.on_loss(now, 0, false), LossVerdict::Congestion);
        let mut strict = filter(0.0);
        let now = ack_run(&mut strict, t0, 100, Duration::from_millis(2), srtt);
        assert_eq!(strict.on_loss(now, PKT, false), LossVerdict::Congestion);
    }

    #[test]
    fn filtered_cubic_keeps_its_window_on_random_loss_only() {
        let cfg = LossFilterConfig {
            loss_threshold: 0.1,
            queue_delay: Duration::from_millis(2),
        };
        let factory = Arc::new(FilteredFactory::new(
            Arc::new(quinn::congestion::CubicConfig::default()),
            cfg,
        ));
        let t0 = Instant::now();
        let mut c = factory.clone().build(t0, 1200);
        let before = c.window();
        c.on_congestion_event(t0, t0, false, PKT);
        assert_eq!(
            c.window(),
            before,
            "an isolated loss must not shrink the window"
        );
        c.on_congestion_event(t0, t0, true, PKT);
        assert!(c.window() < before, "persistent congestion must");
    }
}
