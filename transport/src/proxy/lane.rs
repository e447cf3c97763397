//! Control frames before bulk bytes on a shared QUIC connection.
//!
//! Every stream of a connection draws on one connection-level flow-control window. When many tunneled
//! connections stream bulk data, that window is spent as soon as the peer returns credit, and a new
//! stream's header (or the inbound side's status answer) waits behind it: quinn wakes the writers that
//! were blocked on the window in no particular order, so under load a header was seen waiting more than
//! ten seconds while a thousand bulk streams took every credit. The lane fixes the order: while a control
//! frame waits, bulk writers on that connection hold back (for at most [`MAX_YIELD`]), so the next
//! credit goes to the frame that opens or answers a stream. A header costs a hundred bytes; the bulk
//! streams lose nothing measurable.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tokio::sync::Notify;

/// Longest a bulk write holds back for a waiting control frame: a bound, so that a control frame
/// stuck for another reason can never stall the data.
pub const MAX_YIELD: Duration = Duration::from_millis(20);

/// Per-connection count of control frames waiting for flow-control credit.
#[derive(Debug, Default)]
pub struct Lane {
    waiting: AtomicUsize,
    clear: Notify,
}

impl Lane {
    /// Runs `write` (a control frame's write) with the bulk writers of this connection held back until
    /// it completes or is dropped.
    pub async fn control<F: Future>(&self, write: F) -> F::Output {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _done = Waiting(self);
        write.await
    }

    /// Called by a bulk writer before each write: returns at once unless a control frame is waiting.
    pub async fn yield_to_control(&self) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let notified = self.clear.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let _ = tokio::time::timeout(MAX_YIELD, notified).await;
    }
}

/// Ends one control frame's wait, also when its future is dropped.
struct Waiting<'a>(&'a Lane);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.clear.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bulk_writers_wait_for_a_control_frame_and_no_longer_than_the_bound() {
        let lane = std::sync::Arc::new(Lane::default());
        // Nothing waiting: no hold-back.
        tokio::time::timeout(Duration::from_millis(1), lane.yield_to_control())
            .await
            .expect("immediate");

        // A control frame that completes after 5 ms releases the bulk writer then.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let l = lane.clone();
        let frame = tokio::spawn(async move { l.control(rx).await });
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let l = lane.clone();
        let bulk = tokio::spawn(async move { l.yield_to_control().await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !bulk.is_finished(),
            "bulk writer held back while the frame waits"
        );
        tx.send(()).expect("send");
        let _ = frame.await;
        bulk.await.expect("bulk");
        assert!(start.elapsed() < MAX_YIELD);

        // A control frame that never completes holds bulk writers back for MAX_YIELD at most.
        let l = lane.clone();
        let stuck = tokio::spawn(async move { l.control(std::future::pending::<()>()).await });
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        lane.yield_to_control().await;
        assert_eq!(start.elapsed(), MAX_YIELD);
        stuck.abort();
        let _ = stuck.await;
        assert_eq!(
            lane.waiting.load(Ordering::Acquire),
            0,
            "a dropped frame stops waiting"
        );
    }
}
