//! `Admin`: the operator API behind `quicmesh ctl`.
//!
//! Every call must carry the admin token (checked by [`AdminAuth`] before the handler runs, so an
//! unauthenticated call can change nothing). Handlers parse the request into model types and let
//! [`State`] validate and apply it; errors map to statuses in one place (`error.rs`).

use std::sync::Arc;

use quicmesh_proto::controller::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    auth,
    error::ApiError,
    error::Capped,
    model::{FieldError, Kind},
    resources::WriteMode,
    state::State,
    stats::{Figures, StatsStore, Window},
    tap::TapHub,
};

/// Largest request an operator may send.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// Checks the admin bearer token on every request.
#[derive(Clone)]
pub struct AdminAuth {
    sha256: Arc<str>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth(..)")
    }
}

impl AdminAuth {
    /// Accepts the token whose SHA-256 is `sha256` (hex).
    pub fn new(sha256: &str) -> Self {
        Self {
            sha256: sha256.into(),
        }
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        auth::check_bearer(header, &self.sha256).map_err(|m| {
            let peer = req.extensions().get::<auth::PeerInfo>().map(|p| p.remote);
            tracing::info!(?peer, "admin call refused: {}", Capped(m));
            Status::unauthenticated(m)
        })?;
        Ok(req)
    }
}

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<State>,
    stats: Arc<StatsStore>,
    tap: Arc<TapHub>,
}

impl AdminService {
    /// A service over `state`, reading traffic statistics from `stats` and live samples from `tap`.
    pub fn new(state: Arc<State>, stats: Arc<StatsStore>, tap: Arc<TapHub>) -> Self {
        Self { state, stats, tap }
    }

    async fn put(
        &self,
        r: pb::Resource,
        mode: WriteMode,
    ) -> Result<Response<pb::Resource>, Status> {
        let r = convert::resource_from_pb(r).map_err(ApiError::from)?;
        let stored = self.state.put(r, mode).await?;
        tracing::info!(kind = %stored.kind(), key = %stored.key(), version = stored.metadata().version, ?mode, "resource written");
        Ok(Response::new(self.to_pb(&stored)))
    }

    fn to_pb(&self, r: &crate::model::Resource) -> pb::Resource {
        match r {
            // Identities carry their SPIFFE ID on the way out.
            crate::model::Resource::Identity(o) => pb::Resource {
                resource: Some(pb::resource::Resource::Identity(convert::identity_to_pb(
                    o,
                    self.state.trust_domain(),
                ))),
            },
            r => convert::resource_to_pb(r),
        }
    }
}

use convert::token_to_pb as token_info;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create(&self, req: Request<pb::Resource>) -> Result<Response<pb::Resource>, Status> {
        self.put(req.into_inner(), WriteMode::Create).await
    }

    async fn update(&self, req: Request<pb::Resource>) -> Result<Response<pb::Resource>, Status> {
        self.put(req.into_inner(), WriteMode::Update).await
    }

    async fn apply(&self, req: Request<pb::Resource>) -> Result<Response<pb::Resource>, Status> {
        self.put(req.into_inner(), WriteMode::Apply).await
    }

    async fn apply_all(
        &self,
        req: Request<pb::ApplyAllRequest>,
    ) -> Result<Response<pb::ApplyAllResponse>, Status> {
        let items = req.into_inner().resources;
        let mut rs = Vec::with_capacity(items.len());
        for (i, r) in items.into_iter().enumerate() {
            rs.push(convert::resource_from_pb(r).map_err(|e| {
                ApiError::from(FieldError::new(
                    format!("resources[{i}].{}", e.field),
                    e.problem,
                ))
            })?);
        }
        let (stored, version) = self.state.put_all(rs, WriteMode::Apply).await?;
        tracing::info!(resources = stored.len(), version, "batch applied");
        Ok(Response::new(pb::ApplyAllResponse {
            resources: stored.iter().map(|r| self.to_pb(r)).collect(),
            version,
        }))
    }

    async fn get(&self, req: Request<pb::ResourceRef>) -> Result<Response<pb::Resource>, Status> {
        let r = req.into_inner();
        let kind = convert::kind_from_pb("kind", r.kind).map_err(ApiError::from)?;
        let found = self.state.get(kind, &r.namespace, &r.name).await?;
        Ok(Response::new(self.to_pb(&found)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let kind = convert::kind_from_pb("kind", r.kind).map_err(ApiError::from)?;
        let items = self.state.list(kind, &r.namespace).await?;
        Ok(Response::new(pb::ListResponse {
            items: items.iter().map(|i| self.to_pb(i)).collect(),
            store_version: self.state.revision(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::ResourceRef>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = req.into_inner();
        let kind = convert::kind_from_pb("kind", r.kind).map_err(ApiError::from)?;
        let namespace = if kind == Kind::TrustDomain {
            String::new()
        } else {
            r.namespace
        };
        let version = self.state.delete(kind, &namespace, &r.name).await?;
        tracing::info!(%kind, namespace = %Capped(&namespace), name = %Capped(&r.name), version, "resource deleted");
        Ok(Response::new(pb::DeleteResponse { version }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let r = req.into_inner();
        let (token, rec) = self
            .state
            .create_token(&r.namespace, &r.service_account, r.ttl_seconds, r.reusable)
            .await?;
        tracing::info!(id = %rec.id, spiffe_id = %rec.spiffe_id, "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            info: Some(token_info(&rec)),
        }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenInfo>, Status> {
        let rec = self.state.revoke_token(&req.into_inner().id).await?;
        tracing::info!(id = %rec.id, "join token revoked");
        Ok(Response::new(token_info(&rec)))
    }

    async fn list_join_tokens(
        &self,
        _req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        let tokens = self.state.list_tokens().await?;
        Ok(Response::new(pb::ListJoinTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_identity(
        &self,
        req: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let r = req.into_inner();
        let revoked = self
            .state
            .revoke_identity(&r.namespace, &r.service_account)
            .await?;
        tracing::warn!(
            namespace = %Capped(&r.namespace),
            service_account = %Capped(&r.service_account),
            "identity revoked"
        );
        match self.to_pb(&revoked).resource {
            Some(pb::resource::Resource::Identity(i)) => Ok(Response::new(i)),
            _ => Err(Status::internal("revoked resource is not an identity")),
        }
    }

    async fn list_proxies(
        &self,
        _req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        Ok(Response::new(pb::ListProxiesResponse {
            proxies: self
                .state
                .proxies()
                .iter()
                .map(convert::proxy_status_to_pb)
                .collect(),
            store_version: self.state.revision(),
        }))
    }

    async fn list_issued_certificates(
        &self,
        req: Request<pb::ListIssuedCertificatesRequest>,
    ) -> Result<Response<pb::ListIssuedCertificatesResponse>, Status> {
        let limit = match req.into_inner().limit {
            0 => 100,
            n if n > 10_000 => {
                return Err(ApiError::from(FieldError::new(
                    "limit",
                    format!("must be at most 10000, got {n}"),
                ))
                .into());
            }
            n => n as usize,
        };
        let certs = self.state.list_issued(limit).await?;
        Ok(Response::new(pb::ListIssuedCertificatesResponse {
            certificates: certs.into_iter().map(convert::audit_to_pb).collect(),
        }))
    }

    async fn ca_status(
        &self,
        _req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        Ok(Response::new(convert::ca_status_to_pb(
            self.state.ca_status(),
        )))
    }

    async fn rotate_root(
        &self,
        _req: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        Ok(Response::new(convert::ca_status_to_pb(
            self.state.rotate_root().await?,
        )))
    }

    type TapStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TapEvent, Status>> + Send>>;

    async fn tap(&self, req: Request<pb::TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        let r = req.into_inner();
        let service = if r.service.contains('.') {
            r.service
        } else {
            format!("{}.default", r.service)
        };
        let snap = self.state.subscribe().borrow().clone();
        let known = snap.services.iter().any(|s| {
            service
                .split_once('.')
                .is_some_and(|(n, ns)| s.metadata.name == n && s.metadata.namespace == ns)
        });
        if !known {
            return Err(Status::not_found(format!(
                "service {} does not exist",
                Capped(&service)
            )));
        }
        tracing::info!(service = %service, "tap started");
        let (sub, rx) = self.tap.subscribe(service, r.max_per_second);
        // The subscription lives as long as the stream: the caller going away ends the tap.
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            move |e| {
                let _ = &sub;
                Ok(e)
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let r = req.into_inner();
        let w = Window::of(r.window_seconds).ok_or_else(|| {
            Status::invalid_argument(format!(
                "window_seconds: {} is not one of 60, 600, 3600",
                r.window_seconds
            ))
        })?;
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let now = self.stats.now_ms();
        let stats = self.stats.lock();
        let services = stats.services(w, now, service);
        let edges = if r.edges {
            stats.edges(w, now, service)
        } else {
            Vec::new()
        };
        let peers = if r.peers {
            stats.links.figures(w, now)
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::StatsResponse {
            window_seconds: w.seconds,
            peers: peers.iter().map(link_to_pb).collect(),
            services: services.iter().map(figures_to_pb).collect(),
            edges: edges.iter().map(figures_to_pb).collect(),
            reports_accepted: stats.accepted,
            reports_refused: stats.refused.values().sum(),
            edges_held: stats.len() as u64,
            edges_max: stats.max_edges() as u64,
        }))
    }
}

fn link_to_pb(f: &crate::links::LinkFigures) -> pb::PeerLinkStats {
    pb::PeerLinkStats {
        reporter: f.id.reporter.clone(),
        peer: f.id.peer.clone(),
        address: f.id.address.clone(),
        direction: f.id.side.as_str().to_owned(),
        rtt_ms: f.rtt_ms,
        cwnd_bytes: f.cwnd,
        sent_packets: f.packets.sent,
        lost_packets: f.packets.lost,
        loss_rate: f.loss_rate(),
        age_seconds: f.age_s,
    }
}

fn figures_to_pb(f: &Figures) -> pb::TrafficStats {
    let a = &f.agg;
    pb::TrafficStats {
        service: f.service.clone(),
        source: f.source.clone(),
        direction: f.side.as_str().to_owned(),
        requests: a.requests,
        successes: a.successes,
        requests_per_second: f.rps,
        success_rate: f.success_rate(),
        p50_ms: f.quantile_ms(0.5),
        p95_ms: f.quantile_ms(0.95),
        p99_ms: f.quantile_ms(0.99),
        tcp_opened: a.tcp[0],
        tcp_open: f.tcp_open,
        tcp_failed: a.tcp[2],
        mtls_share: f.mtls_share(),
        bytes: a.bytes,
        failures_timeout: a.failures[0],
        failures_unavailable: a.failures[1],
        failures_server: a.failures[2],
        failures_grpc: a.failures[3],
        covered_seconds: f.covered_s,
    }
}
