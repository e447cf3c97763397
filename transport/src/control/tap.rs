//! Live tap: while connected, the proxy keeps one `ProxyApi.Tap` call open to the controller. The
//! controller sends which services are tapped; the proxy samples the requests it serves for them
//! ([`crate::metrics::Tap`], rate-bounded, never waiting on the data path) and streams the samples back.
//! When nobody taps the controller sends an empty list and sampling stops; when the call breaks the tap
//! is turned off before the proxy reconnects.

use std::{sync::Arc, time::Duration};

use quicmesh_proto::controller as pb;
use tokio_util::sync::CancellationToken;

use super::Controller;
use crate::{
    clip::clip,
    metrics::{Tap, TapSample},
};

/// Samples queued for the controller; more are skipped.
const QUEUE: usize = 256;
/// Most samples a second, whatever the controller asks.
pub const MAX_PER_SECOND: u32 = 100;

/// Keeps the tap call open until `shutdown`.
#[derive(Debug)]
pub struct Tapper {
    /// The controller.
    pub controller: Controller,
    /// The data plane's tap.
    pub tap: Arc<Tap>,
}

fn event(s: TapSample) -> pb::TapEvent {
    pb::TapEvent {
        service: s.service,
        method: s.method,
        path: s.path,
        status: u32::from(s.status),
        grpc_status_plus_one: s.grpc.map_or(0, |g| g.saturating_add(1)),
        latency_us: u64::try_from(s.latency.as_micros()).unwrap_or(u64::MAX),
        source: s.source,
        destination: String::new(),
        request_id: s.request_id,
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    }
}

impl Tapper {
    /// Runs until `shutdown`, reconnecting after a pause when the call ends.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.controller.creds.wait_leaf() => {}
        }
        loop {
            let err = tokio::select! {
                _ = shutdown.cancelled() => break,
                e = self.once() => e,
            };
            self.tap.set(Vec::new(), 0, None);
            self.controller.drop_shared().await;
            tracing::debug!(error = %clip(&err), "tap call ended");
            let pause = Duration::from_millis(500 + rand::random::<u64>() % 1500);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.tap.set(Vec::new(), 0, None);
    }

    async fn once(&self) -> String {
        let mut client = match self.controller.shared_client().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<TapSample>(QUEUE);
        let out = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|s| (event(s), rx))
        });
        let mut controls = match tokio::time::timeout(super::CALL_TIMEOUT, client.tap(out)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return format!("Tap: {:?}: {}", s.code(), s.message()),
            Err(_) => return "Tap timed out".into(),
        };
        loop {
            match controls.message().await {
                Ok(Some(c)) => {
                    let on = !c.services.is_empty();
                    tracing::info!(services = ?c.services, "tap {}", if on { "on" } else { "off" });
                    self.tap.set(
                        c.services,
                        c.max_per_second.min(MAX_PER_SECOND),
                        on.then(|| tx.clone()),
                    );
                }
                Ok(None) => return "Tap stream ended".into(),
                Err(s) => return format!("Tap: {:?}: {}", s.code(), s.message()),
            }
        }
    }
}
