//! The admin HTTP endpoint: `/live`, `/ready`, `/metrics` and `/config`, on loopback.
//!
//! `/ready` turns true only once every listener is bound and the identity is loaded, and false again
//! as soon as a drain begins, so an orchestrator stops sending new work before the proxy stops taking it.
//! `/config` is the effective configuration as JSON: the mesh state every decision is made on (services,
//! endpoints, policies, revoked identities, what was skipped and why), the identity, and the local
//! listeners, so an operator can see what this proxy believes without reading its logs.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{identity::Credentials, state::StateHandle};

/// Says why the proxy is not ready (None: nothing is missing, e.g. it is draining).
type Explain = Box<dyn Fn() -> Option<String> + Send + Sync>;

struct AdminState {
    registry: Registry,
    ready: Arc<AtomicBool>,
    config: ConfigView,
    explain: Option<Explain>,
}

/// What `/config` shows.
pub struct ConfigView {
    /// The live mesh state.
    pub state: StateHandle,
    /// Our credentials (identity, certificate expiry).
    pub creds: Credentials,
    /// The listeners, fixed at start-up.
    pub listeners: serde_json::Value,
}

/// The bound admin endpoint.
pub struct Admin {
    listener: TcpListener,
    state: AdminState,
}

impl Admin {
    /// Binds the admin listener.
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        ready: Arc<AtomicBool>,
        config: ConfigView,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            state: AdminState {
                registry,
                ready,
                config,
                explain: None,
            },
        })
    }

    /// `/ready` answers 503 with what `why` says is missing (e.g. the workload without a certificate
    /// and the controller's reason). Called before [`Admin::run`].
    pub fn explain(mut self, why: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        self.state.explain = Some(Box::new(why));
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        let app = Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/config", get(config))
            .with_state(Arc::new(self.state));
        crate::http_server::serve("admin", self.listener, app, Default::default()).await;
    }
}

async fn ready(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    let why = s.explain.as_ref().and_then(|f| f());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        match why {
            Some(w) => format!("not ready: {w}\n"),
            None => "not ready\n".to_owned(),
        },
    )
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut body = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

async fn config(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let c = &s.config;
    let leaf = c.creds.leaf();
    let body = serde_json::json!({
        "identity": leaf.as_ref().map(|l| l.info.id.to_string()),
        "certificate_not_after_unix": leaf.as_ref().map(|l| l.info.not_after.unix_timestamp()),
        "listeners": c.listeners,
        "mesh": *c.state.load(),
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        format!("{body:#}\n"),
    )
}
