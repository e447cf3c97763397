//! `ProxyApi`: what proxies call to get certificates, follow configuration and announce endpoints.
//!
//! Credentials come from the connection, never from a request field: `Certify` accepts a join token or the
//! verified client certificate, `Watch` and `RegisterEndpoint` only the client certificate. A Watch stream
//! sends the current snapshot at once, then the newest one after each change (intermediate versions may be
//! skipped: a snapshot is whole), and ends with `PERMISSION_DENIED` if the caller's identity is revoked.

use std::{pin::Pin, sync::Arc};

use quicmesh_proto::controller::{self as pb, proxy_api_server::ProxyApi};
use quicmesh_transport::identity::SpiffeId;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{auth::PeerInfo, state::State};

/// Largest request a proxy may send.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The `ProxyApi` service.
#[derive(Debug, Clone)]
pub struct ProxyService {
    state: Arc<State>,
}

impl ProxyService {
    /// A service over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn peer<T>(req: &Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

fn mesh_identity<T>(req: &Request<T>) -> Result<(PeerInfo, SpiffeId), Status> {
    let p = peer(req).ok_or_else(|| Status::unauthenticated("no TLS connection information"))?;
    let id = p.spiffe_id.clone().ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a mesh client certificate (bootstrap with Certify first)",
        )
    })?;
    Ok((p, id))
}

/// Sends the current snapshot, then each newer one, until the client goes away or its identity is revoked.
async fn forward_snapshots(
    mut rx: tokio::sync::watch::Receiver<Arc<pb::Snapshot>>,
    tx: tokio::sync::mpsc::Sender<Result<pb::Snapshot, Status>>,
    id: SpiffeId,
    guard: crate::state::ProxyGuard,
) {
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.revoked_spiffe_ids.iter().any(|r| r == id.as_str()) {
            let _ = tx
                .send(Err(Status::permission_denied(format!(
                    "identity {id} was revoked"
                ))))
                .await;
            return;
        }
        if tx.send(Ok(pb::Snapshot::clone(&snap))).await.is_err() {
            return;
        }
        guard.sent(snap.version);
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ProxyApi for ProxyService {
    async fn certify(
        &self,
        req: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let p = peer(&req);
        let body = req.into_inner();
        let resp = self
            .state
            .certify(&body.csr_pem, &body.join_token, p.as_ref())
            .await
            .map_err(|e| {
                tracing::info!(peer = ?p.as_ref().map(|p| p.remote), error = %e, "Certify refused");
                Status::from(e)
            })?;
        Ok(Response::new(resp))
    }

    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (p, id) = mesh_identity(&req)?;
        let body = req.into_inner();
        let rx = self.state.subscribe();
        if rx
            .borrow()
            .revoked_spiffe_ids
            .iter()
            .any(|r| r == id.as_str())
        {
            return Err(Status::permission_denied(format!(
                "identity {id} is revoked"
            )));
        }
        let guard = self.state.proxy_connected(&body.proxy_name, &p, &id);
        tracing::info!(proxy = %body.proxy_name, %id, peer = %p.remote, "proxy watching");
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(forward_snapshots(rx, tx, id, guard));
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_endpoint(
        &self,
        req: Request<pb::RegisterEndpointRequest>,
    ) -> Result<Response<pb::RegisterEndpointResponse>, Status> {
        let (_, id) = mesh_identity(&req)?;
        let endpoint = req
            .into_inner()
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint: is required"))?;
        let version = self.state.register_endpoint(endpoint, &id).await?;
        Ok(Response::new(pb::RegisterEndpointResponse { version }))
    }
}
