//! Running the controller: open the state, bind, announce readiness, serve until told to stop.
//!
//! The listener is bound before anything is announced, so a bad address fails start-up. Readiness is one
//! JSON line on stdout (`{"event":"ready","grpc":"127.0.0.1:PORT",...}`) that scripts and tests read
//! instead of sleeping; the admin token of a new mesh appears in it once and never again.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quicmesh_proto::controller::{admin_server::AdminServer, proxy_api_server::ProxyApiServer};
use tokio::net::TcpListener;

use crate::{
    api::{
        admin::{self, AdminAuth, AdminService},
        proxy::{self, ProxyService},
    },
    dashboard::Dashboard,
    error::StartError,
    metrics,
    state::{State, StateOptions},
    stats::StatsStore,
    tap::TapHub,
    tls,
};

/// Connections the kernel may queue before they are accepted (capped by `net.core.somaxconn`): after a
/// controller restart every proxy reconnects at once, and tokio's default of 1,024 dropped the rest of
/// 10,000 simultaneous connects until their SYN retries timed out.
const LISTEN_BACKLOG: u32 = 16_384;

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Deadline of one unary request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time calls in progress get to finish after SIGTERM before the rest are closed.
const DRAIN: Duration = Duration::from_secs(5);

/// Why the controller stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Start-up failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// Reflection service setup failed.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// A started controller, bound and ready to serve.
#[derive(Debug)]
pub struct Controller {
    state: Arc<State>,
    listener: TcpListener,
    addr: SocketAddr,
    admin_token: Option<String>,
    /// `/metrics` listener, when asked for.
    metrics: Option<(TcpListener, SocketAddr)>,
    /// Dashboard listener, when asked for.
    dashboard: Option<(TcpListener, SocketAddr)>,
}

/// Binds a plain HTTP listener of the controller.
async fn bind_plain(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = l
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((l, bound))
}

/// Serves `app` on `listener` until the task is aborted, with bounded connections and head reads.
async fn serve_http(what: &'static str, listener: TcpListener, app: axum::Router) {
    quicmesh_transport::http_server::serve(what, listener, app, Default::default()).await;
}

impl Controller {
    /// Opens the state and binds the listener.
    pub async fn bind(opts: StateOptions, listen: SocketAddr) -> Result<Self, ServeError> {
        let (state, admin_token) = tokio::task::spawn_blocking(move || State::open(opts))
            .await
            .map_err(|e| StartError::Config(format!("start-up task: {e}")))??;
        let listener = listen_on(listen).map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
        if let Some(authority) = state.service_account_tokens() {
            // A wrong issuer URL or CA shows in the log at start, not at the first pod's bootstrap.
            tokio::spawn(async move { authority.prefetch().await });
        }
        Ok(Self {
            state,
            listener,
            addr,
            admin_token,
            metrics: None,
            dashboard: None,
        })
    }

    /// Binds the optional plain HTTP listeners: the controller's `/metrics` and the dashboard.
    pub async fn bind_http(
        mut self,
        metrics: Option<SocketAddr>,
        dashboard: Option<SocketAddr>,
    ) -> Result<Self, ServeError> {
        if let Some(a) = metrics {
            self.metrics = Some(bind_plain(a).await?);
        }
        if let Some(a) = dashboard {
            self.dashboard = Some(bind_plain(a).await?);
        }
        Ok(self)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin token, on first start only.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The readiness line.
    pub fn ready_line(&self) -> String {
        serde_json::json!({
            "event": "ready",
            "grpc": self.addr.to_string(),
            "trust_domain": self.state.trust_domain(),
            "trust_bundle": self.state.bundle_path(),
            "leaf_ttl_seconds": self.state.leaf_ttl().as_secs(),
            "store_version": self.state.revision(),
            "admin_token": self.admin_token,
            "metrics": self.metrics.as_ref().map(|(_, a)| a.to_string()),
            "dashboard": self.dashboard.as_ref().map(|(_, a)| a.to_string()),
        })
        .to_string()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let state = self.state.clone();
        let ticker = tokio::spawn(tick_loop(state.clone()));
        let expiry = tokio::spawn(expiry_loop(state.clone()));
        // On a shared store (etcd): what other controllers write reaches this one's watchers.
        let follower = tokio::spawn(state.clone().follow_store());

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<ProxyApiServer<ProxyService>>()
            .await;
        health_reporter
            .set_serving::<AdminServer<AdminService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(quicmesh_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let stats = Arc::new(StatsStore::default());
        let tap = Arc::new(TapHub::default());
        let mut http = Vec::new();
        if let Some((l, _)) = self.metrics {
            let app = metrics_router(state.clone(), stats.clone(), tap.clone());
            http.push(tokio::spawn(serve_http("metrics", l, app)));
        }
        if let Some((l, _)) = self.dashboard {
            let app = Dashboard::new(state.clone(), stats.clone()).router();
            http.push(tokio::spawn(serve_http("dashboard", l, app)));
        }
        let proxy_svc =
            ProxyApiServer::new(ProxyService::new(state.clone(), stats.clone(), tap.clone()))
                .max_decoding_message_size(proxy::MAX_REQUEST);
        let admin_svc = tonic::service::interceptor::InterceptedService::new(
            AdminServer::new(AdminService::new(state.clone(), stats, tap))
                .max_decoding_message_size(admin::MAX_REQUEST),
            AdminAuth::new(state.admin_sha256()),
        );

        // After the signal, calls in progress get `DRAIN` to finish; Watch streams never end by
        // themselves, so what is left then is dropped (the proxies reconnect, to another controller
        // where there is one).
        let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = fired_tx.send(());
        };
        let drained = async move {
            match fired_rx.await {
                Ok(()) => tokio::time::sleep(DRAIN).await,
                Err(_) => std::future::pending().await,
            }
        };
        let serve = tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(1024))
            .add_service(health)
            .add_service(reflection)
            .add_service(proxy_svc)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(
                tls::incoming(
                    self.listener,
                    state.serving_config(),
                    state.registry().clone(),
                    state.limits(),
                ),
                shutdown,
            );
        let result = tokio::select! {
            r = serve => r,
            () = drained => {
                tracing::info!(after = ?DRAIN, "stopping: closing the streams still open");
                Ok(())
            }
        };
        ticker.abort();
        expiry.abort();
        follower.abort();
        for h in http {
            h.abort();
        }
        Ok(result?)
    }
}

/// Withdraws endpoints whose proxy disconnected longer than the grace ago; checks a few times per grace.
async fn expiry_loop(state: Arc<State>) {
    let every =
        (state.endpoint_grace() / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = state.expire_endpoints(std::time::Instant::now()).await {
            tracing::warn!(error = %e, "withdrawing endpoints of disconnected proxies failed");
        }
    }
}

async fn tick_loop(state: Arc<State>) {
    loop {
        let every = (state.leaf_ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::time::sleep(every).await;
        if let Err(e) = state.tick().await {
            tracing::warn!(error = %e, "periodic CA maintenance failed");
        }
    }
}

/// `/metrics`: a [`metrics::Scrape`] of the 1-minute window, rendered.
fn metrics_router(state: Arc<State>, stats: Arc<StatsStore>, tap: Arc<TapHub>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (state, stats, tap) = (state.clone(), stats.clone(), tap.clone());
            async move {
                let w = crate::stats::WINDOWS[0];
                let proxies_connected = state.registry().proxies().len();
                let now = stats.now_ms();
                let s = stats.lock();
                let services = s.services(w, now, None);
                let edges = s.edges(w, now, None);
                let body = metrics::render(&metrics::Scrape {
                    window_seconds: w.seconds,
                    services: &services,
                    edges: &edges,
                    reports_accepted: s.accepted,
                    reports_refused: Some(&s.refused),
                    edges_held: s.len(),
                    edges_max: s.max_edges(),
                    stats_bytes: s.approx_bytes(),
                    proxies_connected,
                    tap_subscribers: tap.subscribers(),
                });
                (
                    [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                    body,
                )
            }
        }),
    )
}
