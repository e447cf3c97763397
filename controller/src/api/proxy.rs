//! `ProxyApi`: what proxies call to get certificates, follow configuration and announce endpoints.
//!
//! Credentials come from the connection, never from a request field: `Certify` accepts a join token or the
//! verified client certificate, `Watch` and `RegisterEndpoint` only the client certificate, and a revoked
//! identity gets nothing. A Watch stream sends the current snapshot at once (unless it is the version the
//! proxy says it holds, when it resumes after losing a controller), then the newest one after each
//! change (intermediate versions may be skipped: a snapshot is whole), or to a proxy that asked for
//! deltas only what changed since the version it was last sent (`quicmesh_transport::control::delta`,
//! computed once per pair of snapshots; whole again when the delta would not be smaller), and to a proxy
//! that declared an interest only its part of the mesh ([`crate::interest`]); one identity may hold a
//! bounded number of them (`RESOURCE_EXHAUSTED` past it), and they end with `PERMISSION_DENIED` when the identity
//! is revoked. `Report` takes traffic summaries only from an identity with a Watch stream open, checks
//! them ([`stats::validate`]: an inbound edge only for a service the reporter may serve, an outbound one
//! always with the reporter as its source) and files them in [`StatsStore`]; refusals are counted by
//! reason. Strings a peer sends are capped before they are logged.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use quicmesh_proto::controller::{self as pb, proxy_api_server::ProxyApi};
use quicmesh_transport::{control::delta, identity::SpiffeId};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    auth::PeerInfo,
    error::{ApiError, Capped},
    interest::{Interest, View},
    registry::WatchGuard,
    snapshot::Snapshot,
    state::State,
    stats::{self, StatsStore},
    tap::TapHub,
};

/// Whether `id` may serve `service` (`name.namespace`) in the current snapshot.
fn serves(state: &State, id: &SpiffeId, service: &str) -> bool {
    let snap = state.subscribe().borrow().clone();
    snap.services.iter().any(|s| {
        service
            .split_once('.')
            .is_some_and(|(n, ns)| s.metadata.name == n && s.metadata.namespace == ns)
            && crate::naming::server_names(state.trust_domain(), s).is_ok_and(|n| n.allows(id))
    })
}

/// Caps a string a proxy sent in a tap sample.
fn cap(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Largest request a proxy may send.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The `ProxyApi` service.
#[derive(Debug, Clone)]
pub struct ProxyService {
    state: Arc<State>,
    cache: Arc<PbCache>,
    stats: Arc<StatsStore>,
    tap: Arc<TapHub>,
    services: Arc<ServiceIndex>,
}

/// The services of the current snapshot by `name.namespace` (positions in its `services`), built
/// once per published snapshot: a traffic report looks its edges' services up instead of indexing
/// the whole mesh on every call.
#[derive(Debug, Default)]
struct ServiceIndex(std::sync::Mutex<Option<(Arc<Snapshot>, Positions)>>);

/// Positions in a snapshot's `services` by `name.namespace`.
type Positions = Arc<HashMap<String, usize>>;

impl ServiceIndex {
    fn of(&self, snap: &Arc<Snapshot>) -> Positions {
        let mut held = lock(&self.0);
        if let Some((s, index)) = held.as_ref()
            && Arc::ptr_eq(s, snap)
        {
            return index.clone();
        }
        let index: Positions = Arc::new(
            snap.services
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{}.{}", s.metadata.name, s.metadata.namespace), i))
                .collect(),
        );
        *held = Some((snap.clone(), index.clone()));
        index
    }
}

impl ProxyService {
    /// A service over `state`, filing traffic reports in `stats` and tap samples in `tap`.
    pub fn new(state: Arc<State>, stats: Arc<StatsStore>, tap: Arc<TapHub>) -> Self {
        Self {
            state,
            cache: Arc::default(),
            stats,
            tap,
            services: Arc::default(),
        }
    }

    /// The caller's mesh identity, refused when revoked.
    fn live_identity<T>(&self, req: &Request<T>) -> Result<(PeerInfo, SpiffeId), Status> {
        let (p, id) = mesh_identity(req)?;
        if self.state.is_revoked(&id)? {
            return Err(Status::permission_denied(format!(
                "identity {id} is revoked"
            )));
        }
        Ok((p, id))
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

/// Most filtered snapshots, or deltas, kept for one version; past it more are computed per stream.
const CACHE_ENTRIES: usize = 4096;

/// The proto form of the newest snapshot, converted once per version for every watcher; the newest
/// snapshot filtered for each interest, once per version and interest; and the deltas to the newest
/// version, once for every watcher moving between the same two snapshots.
#[derive(Debug, Default)]
struct PbCache {
    whole: std::sync::Mutex<Option<Arc<pb::Snapshot>>>,
    filtered: std::sync::Mutex<FilteredCache>,
    deltas: std::sync::Mutex<DeltaCache>,
}

#[derive(Debug, Default)]
struct FilteredCache {
    view: Option<Arc<View>>,
    by_interest: HashMap<Interest, Arc<pb::Snapshot>>,
}

/// Deltas to snapshots of `version`, by (held, next) snapshot; the key's snapshots are kept alive by
/// the entry, so their addresses are not reused while it exists.
#[derive(Debug, Default)]
struct DeltaCache {
    version: u64,
    entries: HashMap<(usize, usize), DeltaEntry>,
}

#[derive(Debug)]
struct DeltaEntry {
    _held: Arc<pb::Snapshot>,
    _next: Arc<pb::Snapshot>,
    delta: Arc<pb::Snapshot>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PbCache {
    /// What to send a delta-watching stream that was last sent `prev`: the delta to `next`, or `next`
    /// whole when the delta is not smaller.
    fn delta(&self, prev: &Arc<pb::Snapshot>, next: &Arc<pb::Snapshot>) -> Arc<pb::Snapshot> {
        use prost::Message;
        let key = (Arc::as_ptr(prev) as usize, Arc::as_ptr(next) as usize);
        let mut cache = lock(&self.deltas);
        if cache.version != next.version {
            cache.version = next.version;
            cache.entries.clear();
        }
        if let Some(e) = cache.entries.get(&key) {
            return e.delta.clone();
        }
        let d = delta::diff(prev, next);
        let d = if d.encoded_len() < next.encoded_len() {
            Arc::new(d)
        } else {
            next.clone()
        };
        if cache.entries.len() < CACHE_ENTRIES {
            cache.entries.insert(
                key,
                DeltaEntry {
                    _held: prev.clone(),
                    _next: next.clone(),
                    delta: d.clone(),
                },
            );
        }
        d
    }

    /// The whole snapshot as proto.
    fn get(&self, snap: &Snapshot) -> Arc<pb::Snapshot> {
        let mut cur = lock(&self.whole);
        match &*cur {
            Some(pb) if pb.version == snap.version => pb.clone(),
            _ => {
                let pb = Arc::new(convert::snapshot_to_pb(snap));
                *cur = Some(pb.clone());
                pb
            }
        }
    }

    /// `snap` as a proxy with `interest` sees it, as proto.
    fn filtered(&self, snap: &Arc<Snapshot>, interest: &Interest) -> Arc<pb::Snapshot> {
        let mut cache = lock(&self.filtered);
        let current = cache.view.as_ref().map(|v| v.snapshot().version);
        if current.is_some_and(|v| v > snap.version) {
            // A stream behind the newest version (it moves to the newest next): not cached.
            return Arc::new(convert::snapshot_to_pb(
                &View::new(snap.clone()).filter(interest),
            ));
        }
        if current != Some(snap.version) {
            cache.view = Some(Arc::new(View::new(snap.clone())));
            cache.by_interest.clear();
        }
        if let Some(pb) = cache.by_interest.get(interest) {
            return pb.clone();
        }
        let view = cache
            .view
            .clone()
            .unwrap_or_else(|| Arc::new(View::new(snap.clone())));
        let pb = Arc::new(convert::snapshot_to_pb(&view.filter(interest)));
        if cache.by_interest.len() < CACHE_ENTRIES {
            cache.by_interest.insert(interest.clone(), pb.clone());
        }
        pb
    }
}

/// Whether two snapshots configure a proxy the same way (only their versions may differ).
fn same_config(a: &pb::Snapshot, b: &pb::Snapshot) -> bool {
    a.trust_domain == b.trust_domain
        && a.services == b.services
        && a.endpoints == b.endpoints
        && a.policies == b.policies
        && a.trust_bundle_pem == b.trust_bundle_pem
        && a.revoked_spiffe_ids == b.revoked_spiffe_ids
}

/// Whether a Watch stream sends `version` first: not when the proxy already holds it.
fn send_first(version: u64, resume_version: u64) -> bool {
    resume_version == 0 || version != resume_version
}

/// What one Watch stream asked for.
#[derive(Debug)]
struct WatchArgs {
    resume_version: u64,
    deltas: bool,
    /// `None`: the whole mesh.
    interest: Option<Interest>,
}

/// Sends the current snapshot (unless the proxy holds that version), then each newer one, until the
/// client goes away or its identity is revoked. A proxy with an interest gets its part of each, and
/// nothing when its part did not change.
async fn forward_snapshots(
    mut rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    tx: tokio::sync::mpsc::Sender<Result<pb::Snapshot, Status>>,
    id: SpiffeId,
    guard: WatchGuard,
    cache: Arc<PbCache>,
    args: WatchArgs,
) {
    let revoked = || Status::permission_denied(format!("identity {id} was revoked"));
    let mut first = true;
    // What this stream's proxy holds (deltas are computed from it).
    let mut held: Option<Arc<pb::Snapshot>> = None;
    loop {
        let snap = rx.borrow_and_update().clone();
        if guard.closer().is_closed() || snap.revoked_spiffe_ids.iter().any(|r| r == id.as_str()) {
            let _ = tx.send(Err(revoked())).await;
            return;
        }
        let pb = match &args.interest {
            Some(i) => cache.filtered(&snap, i),
            None => cache.get(&snap),
        };
        // Filtered: a change elsewhere in the mesh leaves the proxy on the version it holds.
        let unchanged =
            args.interest.is_some() && held.as_ref().is_some_and(|h| same_config(h, &pb));
        if !unchanged {
            if !first || send_first(snap.version, args.resume_version) {
                let msg = match (&held, args.deltas) {
                    (Some(prev), true) => cache.delta(prev, &pb),
                    _ => pb.clone(),
                };
                if tx.send(Ok(pb::Snapshot::clone(&msg))).await.is_err() {
                    return;
                }
            }
            held = Some(pb);
        }
        first = false;
        guard.sent(snap.version);
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
            () = guard.closer().closed() => {
                let _ = tx.send(Err(revoked())).await;
                return;
            }
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
        let issued = if body.workload_spiffe_id.is_empty() {
            self.state
                .certify(
                    &body.csr_pem,
                    &body.join_token,
                    &body.service_account_token,
                    p.as_ref(),
                )
                .await
        } else if !body.join_token.is_empty() || !body.service_account_token.is_empty() {
            Err(ApiError::Unauthenticated(
                "workload_spiffe_id: a node asks with its own mesh certificate, not a token".into(),
            ))
        } else {
            self.state
                .certify_for_node(&body.csr_pem, &body.workload_spiffe_id, p.as_ref())
                .await
        }
        .map_err(|e| {
            tracing::info!(
                peer = ?p.as_ref().map(|p| p.remote),
                error = %Capped(&e.to_string()),
                "Certify refused"
            );
            Status::from(e)
        })?;
        Ok(Response::new(convert::issued_to_pb(issued)))
    }

    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (p, id) = self.live_identity(&req)?;
        let body = req.into_inner();
        let interest = body
            .interest
            .map(|i| Interest::declared(id.clone(), &i.calls))
            .transpose()
            .map_err(|e| Status::from(ApiError::from(e)))?;
        let guard = self.state.watch(&body.proxy_name, &p, &id).map_err(|e| {
            tracing::info!(%id, peer = %p.remote, error = %e, "Watch refused");
            Status::from(e)
        })?;
        let rx = self.state.subscribe();
        tracing::info!(
            proxy = %Capped(&body.proxy_name), %id, peer = %p.remote, resume_version = body.resume_version,
            calls = interest.as_ref().map(|i| i.calls.len()), "proxy watching"
        );
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(forward_snapshots(
            rx,
            tx,
            id,
            guard,
            self.cache.clone(),
            WatchArgs {
                resume_version: body.resume_version,
                deltas: body.deltas,
                interest,
            },
        ));
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_endpoint(
        &self,
        req: Request<pb::RegisterEndpointRequest>,
    ) -> Result<Response<pb::RegisterEndpointResponse>, Status> {
        let (p, id) = self.live_identity(&req)?;
        let endpoint = req
            .into_inner()
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint: is required"))?;
        let obj = convert::endpoint_from_pb("endpoint", endpoint).map_err(ApiError::from)?;
        let service = obj.spec.service.clone();
        let version = self
            .state
            .register_endpoint(obj, &id, p.connection)
            .await
            .map_err(|e| {
            tracing::info!(
                %id, peer = %p.remote, service = %Capped(&service), error = %Capped(&e.to_string()),
                "RegisterEndpoint refused"
            );
            Status::from(e)
        })?;
        Ok(Response::new(pb::RegisterEndpointResponse { version }))
    }

    async fn deregister_endpoint(
        &self,
        req: Request<pb::DeregisterEndpointRequest>,
    ) -> Result<Response<pb::DeregisterEndpointResponse>, Status> {
        let (p, id) = self.live_identity(&req)?;
        let r = req.into_inner();
        let version = self
            .state
            .deregister_endpoint(&r.namespace, &r.name, &id)
            .await
            .map_err(|e| {
                tracing::info!(
                    %id, peer = %p.remote, name = %Capped(&r.name), error = %Capped(&e.to_string()),
                    "DeregisterEndpoint refused"
                );
                Status::from(e)
            })?;
        if version > 0 {
            tracing::info!(%id, name = %Capped(&r.name), version, "endpoint withdrawn");
        }
        Ok(Response::new(pb::DeregisterEndpointResponse { version }))
    }

    type TapStream = Pin<Box<dyn Stream<Item = Result<pb::TapControl, Status>> + Send>>;

    async fn tap(
        &self,
        req: Request<tonic::Streaming<pb::TapEvent>>,
    ) -> Result<Response<Self::TapStream>, Status> {
        let (_, id) = self.live_identity(&req)?;
        if !self.state.registry().is_watching(&id) {
            return Err(Status::permission_denied(format!(
                "{id} has no Watch stream open: only connected proxies tap"
            )));
        }
        let mut events = req.into_inner();
        let mut control = self.tap.control();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let c = control.borrow_and_update().clone();
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = control.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        let (hub, state) = (self.tap.clone(), self.state.clone());
        tokio::spawn(async move {
            // Samples only for services this proxy serves, and it is named as their destination.
            while let Ok(Some(mut e)) = events.message().await {
                if !serves(&state, &id, &e.service) {
                    continue;
                }
                e.destination = id.to_string();
                cap(&mut e.method, 32);
                cap(&mut e.path, 256);
                cap(&mut e.source, 512);
                cap(&mut e.request_id, 64);
                hub.publish_event(&e);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let refuse = |reason: &'static str, status: Status| {
            self.stats.lock().refuse(reason);
            status
        };
        let (p, id) = self
            .live_identity(&req)
            .map_err(|s| refuse("unauthenticated", s))?;
        if !self.state.registry().is_watching(&id) {
            return Err(refuse(
                "not_connected",
                Status::permission_denied(format!(
                    "{id} has no Watch stream open: only connected proxies report"
                )),
            ));
        }
        let body = req.into_inner();
        let snap = self.state.subscribe().borrow().clone();
        let index = self.services.of(&snap);
        let td = self.state.trust_domain();
        // A node gateway serves (and reports) on behalf of the identities placed on it.
        let placed = self.state.placed_on(&id).unwrap_or_default();
        let edges = stats::validate(
            &id,
            &body,
            |svc| index.contains_key(svc),
            |svc| {
                index
                    .get(svc)
                    .and_then(|i| snap.services.get(*i))
                    .is_some_and(|s| {
                        crate::naming::server_names(td, s)
                            .is_ok_and(|n| n.allows(&id) || placed.iter().any(|w| n.allows(w)))
                    })
            },
        )
        .and_then(|edges| Ok((edges, crate::links::validate(&id, &body.peers)?)));
        let (edges, links) = edges.map_err(|e| {
            tracing::info!(%id, peer = %p.remote, error = %Capped(&e.to_string()), "Report refused");
            refuse(e.reason(), Status::invalid_argument(e.to_string()))
        })?;
        let now = self.stats.now_ms();
        let end = now.saturating_sub(u64::from(body.age_ms));
        let mut stats = self.stats.lock();
        let accepted = stats.record(id.as_str(), edges, end, u64::from(body.interval_ms), now);
        for _ in 0..stats.links.record(links, end, now) {
            stats.refuse("peers_full");
        }
        drop(stats);
        Ok(Response::new(pb::ReportResponse {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::send_first;

    #[test]
    fn a_resumed_watch_skips_only_the_version_it_holds() {
        assert!(send_first(7, 0), "a new proxy gets the current snapshot");
        assert!(!send_first(7, 7), "the proxy holds it");
        assert!(send_first(8, 7), "newer than held");
        assert!(send_first(6, 7), "another store's history: sent whole");
    }
}
