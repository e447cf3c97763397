//! The plain-HTTP listeners of quicmesh's own processes: the proxy's admin endpoint and the
//! controller's `/metrics` and dashboard.
//!
//! Why not `axum::serve`: it accepts without limit and waits on a silent client forever, so anyone
//! who can reach the port could hold descriptors and memory with idle or half-sent requests. Here
//! at most [`Limits::max_connections`] connections are served at once (further clients wait in the
//! listen backlog until one ends), and a connection is closed when its first byte, a whole request
//! head, or the next request on a kept-alive connection takes longer than [`Limits::idle_timeout`].
//! HTTP/1.1 only: these are scrapes, API calls and a polling page, not streams.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, time::Instant};
use tower::ServiceExt;

/// Bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest wait for a connection's first byte, for a request head once it started, and for the
    /// next request on an idle kept-alive connection.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// Requests in progress on one connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(now - *self.last.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Serves `app` on `listener` within `limits` until the task is dropped; `what` names the
/// listener in logs.
pub async fn serve(what: &'static str, listener: TcpListener, app: axum::Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A slot first: while every slot is taken, clients wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "{what} endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's head timer starts with the first byte: a client that sends nothing is ours.
            if !matches!(
                tokio::time::timeout(limits.idle_timeout, tcp.readable()).await,
                Ok(Ok(()))
            ) {
                tracing::debug!(%peer, "{what} endpoint: nothing sent in time");
                return;
            }
            let activity = Arc::new(Activity {
                busy: AtomicUsize::new(0),
                last: Mutex::new(Instant::now()),
            });
            let act = activity.clone();
            let svc = hyper::service::service_fn(move |req| {
                act.busy.fetch_add(1, Ordering::AcqRel);
                let act = act.clone();
                let call = app.clone().oneshot(req);
                async move {
                    let r = call.await;
                    *act.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    act.busy.fetch_sub(1, Ordering::AcqRel);
                    r
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.idle_timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            let mut check = tokio::time::interval(limits.idle_timeout / 2);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "{what} endpoint: connection ended");
                        }
                        return;
                    }
                    _ = check.tick(), if !closing => {
                        if activity
                            .idle_for(Instant::now())
                            .is_some_and(|d| d >= limits.idle_timeout)
                        {
                            // Closes at once when no request is in progress.
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
}
