//! The etcd v3 client of [`super::EtcdStore`]: the few calls the store makes (Range, Put, Txn, Watch,
//! Authenticate), on stubs generated at build time from our own subset of etcd's API (`proto/etcd`, by
//! protox), so building the controller needs nothing but Rust. A general-purpose etcd crate would run
//! `protoc` in its build.
//!
//! Members: one lazily connected HTTP/2 channel per endpoint. Calls go to the current member and move
//! on to the next only when the request provably did nothing: the connection (TCP or TLS) failed, the
//! member has no leader (every request says `hasleader`, so such a member refuses before doing
//! anything), or a read lost its leader. A request that may have been applied is never resent here.
//! The member that answered stays current, so one controller keeps one connection busy.
//!
//! TLS is rustls with ring through our own connector (tonic's TLS features are off in this workspace).
//! With a user and password, the client authenticates before its first call and sends the token in
//! the `token` header; when etcd says the token is stale (expired, or revoked by a password change) it
//! authenticates again, once per call, and resends.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tokio_util::either::Either;
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint, Uri},
};

use super::EtcdOptions;

/// Generated from `controller/proto/etcd`.
pub mod pb {
    /// etcd's storage types.
    pub mod mvccpb {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("mvccpb");
    }
    /// etcd's gRPC API (KV, Watch, Auth.Authenticate).
    pub mod etcdserverpb {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::{
    self as rpc, auth_client::AuthClient, kv_client::KvClient, watch_client::WatchClient,
};

/// Largest etcd response accepted (a page of values, a watch response of one batch).
const MAX_MESSAGE: usize = 64 << 20;
/// Start of the message of every failed connection to a member (the request was not sent).
const UNREACHABLE: &str = "etcd member unreachable";
/// etcd's refusal of a request marked `hasleader` by a member without a leader (nothing was done).
const NO_LEADER: &str = "etcdserver: no leader";
/// etcd's failure of a linearizable read when the leader changed under it (a read: nothing was done).
const LEADER_CHANGED: &str = "etcdserver: leader changed";
/// etcd's answers to a token it no longer accepts, or to a missing one once auth is on.
const STALE_TOKEN: [&str; 3] = [
    "etcdserver: invalid auth token",
    "etcdserver: user name is empty",
    "etcdserver: revision of auth store is old",
];
/// Why etcd cancels a watch created with a stale token (it also says so for a watch the user may not make),
/// inside a longer reason.
const WATCH_DENIED: &str = "etcdserver: permission denied";
/// Start of the status a new watch canceled for [`WATCH_DENIED`] or a stale token becomes.
const WATCH_REFUSED: &str = "etcd refused the watch";
/// HTTP/2 keep-alive ping interval: finds a dead member under a long watch.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An endpoint is not `host:port`.
    #[error("etcd endpoint {0:?}: {1}")]
    Endpoint(String, String),
    /// The TLS settings are not usable.
    #[error("etcd TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The call failed: etcd's answer, or the connection's failure.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(Box<Status>),
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Rpc(Box::new(s))
    }
}

impl Error {
    /// Whether the request did nothing on any member tried (each was unreachable, had no leader, or
    /// lost it during a read), so it may be sent again.
    pub fn unsent(&self) -> bool {
        matches!(self, Error::Rpc(s) if member_refused(s))
    }
}

fn member_refused(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && (s.message().starts_with(UNREACHABLE)
            || s.message() == NO_LEADER
            || s.message() == LEADER_CHANGED)
}

fn stale_token(s: &Status) -> bool {
    s.message().starts_with(WATCH_REFUSED) || STALE_TOKEN.iter().any(|m| s.message().contains(m))
}

/// A watch's responses.
pub struct Watch {
    first: Option<rpc::WatchResponse>,
    stream: tonic::Streaming<rpc::WatchResponse>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// The next response; `None` once the member ended the stream.
    pub async fn message(&mut self) -> Result<Option<rpc::WatchResponse>, Error> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        Ok(self.stream.message().await?)
    }
}

/// An etcd cluster; cheap to clone (clones share the connections and the token).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` and its channel, in the configured order.
    members: Vec<(String, Channel)>,
    /// Index of the member calls go to first.
    current: AtomicUsize,
    user: Option<(String, String)>,
    token: RwLock<Option<AsciiMetadataValue>>,
    /// One authentication at a time: calls that found the same stale token authenticate once.
    authenticating: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field(
                "members",
                &self
                    .inner
                    .members
                    .iter()
                    .map(|(a, _)| a)
                    .collect::<Vec<_>>(),
            )
            .field("user", &self.inner.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// What the connector returns: TCP, or TLS over it.
type Io = TokioIo<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>;

/// Connects to `addr`, with TLS when `tls` is given, each step within `timeout`. Every failure message
/// starts with [`UNREACHABLE`], which is how a caller knows the request was never sent.
fn connector(
    addr: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
) -> impl tower::Service<
    Uri,
    Response = Io,
    Error = std::io::Error,
    Future = impl Future<Output = Result<Io, std::io::Error>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let (addr, tls) = (addr.clone(), tls.clone());
        async move {
            let unreachable = |e: std::io::Error| {
                std::io::Error::new(e.kind(), format!("{UNREACHABLE}: {addr}: {e}"))
            };
            let timed_out = |what: &str| {
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{what} timed out"),
                ))
            };
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| timed_out("TCP connect"))?
                .map_err(unreachable)?;
            let _ = tcp.set_nodelay(true);
            let io = match tls {
                None => Either::Left(tcp),
                Some((tls, name)) => Either::Right(
                    tokio::time::timeout(timeout, tls.connect(name, tcp))
                        .await
                        .map_err(|_| timed_out("TLS handshake"))?
                        .map_err(unreachable)?,
                ),
            };
            Ok(TokioIo::new(io))
        }
    })
}

/// The rustls configuration for the members: their CA, our certificate if any; TLS 1.2 or 1.3.
fn tls_config(tls: &super::EtcdTls) -> Result<Arc<rustls::ClientConfig>, Error> {
    use crate::tls;
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(tls::TlsError::from)?
        .with_root_certificates(tls::root_store(std::slice::from_ref(&tls.ca_pem))?);
    let mut cfg = match &tls.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(tls::certs_from_pem(cert)?, tls::key_from_pem(key)?)
            .map_err(tls::TlsError::from)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// `msg` with the metadata every call carries: `hasleader`, and the token if there is one.
fn request<T>(msg: T, token: Option<&AsciiMetadataValue>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("hasleader", AsciiMetadataValue::from_static("true"));
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.clone());
    }
    r
}

impl Client {
    /// A client of the members in `opts` (endpoints, TLS, user; `opts.timeout` bounds each connection
    /// attempt and each call). Connects lazily: nothing is sent until the first call. Must run inside a
    /// tokio runtime, which then carries the connections.
    pub fn new(opts: &EtcdOptions) -> Result<Client, Error> {
        if opts.endpoints.is_empty() {
            return Err(Error::Endpoint(String::new(), "no etcd endpoints".into()));
        }
        let tls = opts.tls.as_ref().map(tls_config).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::with_capacity(opts.endpoints.len());
        for addr in &opts.endpoints {
            let bad = |e: String| Error::Endpoint(addr.clone(), e);
            let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                .map_err(|e| bad(e.to_string()))?
                .timeout(opts.timeout)
                .http2_keep_alive_interval(KEEP_ALIVE)
                .keep_alive_timeout(opts.timeout);
            let tls = match &tls {
                None => None,
                Some(cfg) => {
                    let host = addr
                        .rsplit_once(':')
                        .map_or(addr.as_str(), |(h, _)| h)
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let name = ServerName::try_from(host).map_err(|e| bad(e.to_string()))?;
                    Some((tokio_rustls::TlsConnector::from(cfg.clone()), name))
                }
            };
            let channel =
                endpoint.connect_with_connector_lazy(connector(addr.clone(), tls, opts.timeout));
            members.push((addr.clone(), channel));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                members,
                current: AtomicUsize::new(0),
                user: opts.user.clone(),
                token: RwLock::new(None),
                authenticating: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Sends what `f` makes to the current member, and to the next ones while a member refuses before
    /// doing anything; the last such refusal when every member refused.
    async fn on_members<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let members = &self.inner.members;
        let first = self.inner.current.load(Ordering::Relaxed) % members.len();
        let mut refused = None;
        for k in 0..members.len() {
            let i = (first + k) % members.len();
            match f(members[i].1.clone()).await {
                Err(s) if member_refused(&s) => {
                    tracing::debug!(member = %members[i].0, error = %s.message(), "etcd member refused; trying the next");
                    refused = Some(s);
                }
                r => {
                    if k > 0 {
                        self.inner.current.store(i, Ordering::Relaxed);
                    }
                    return r;
                }
            }
        }
        Err(refused.unwrap_or_else(|| Status::unavailable(UNREACHABLE)))
    }

    fn token(&self) -> Option<AsciiMetadataValue> {
        self.inner
            .token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A fresh token in place of `stale` (None: none yet), unless another call already replaced it.
    async fn authenticate(
        &self,
        stale: Option<AsciiMetadataValue>,
    ) -> Result<Option<AsciiMetadataValue>, Error> {
        let Some((name, password)) = &self.inner.user else {
            return Ok(None);
        };
        let _one = self.inner.authenticating.lock().await;
        let now = self.token();
        if now.is_some() && now != stale {
            return Ok(now);
        }
        let req = rpc::AuthenticateRequest {
            name: name.clone(),
            password: password.clone(),
        };
        let resp = self
            .on_members(|ch| {
                let req = request(req.clone(), None);
                async move { AuthClient::new(ch).authenticate(req).await }
            })
            .await?
            .into_inner();
        let token = AsciiMetadataValue::try_from(resp.token.as_str())
            .map_err(|_| Status::internal("etcd sent a token that is not a valid header value"))?;
        *self.inner.token.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        tracing::debug!(user = %name, "authenticated to etcd");
        Ok(Some(token))
    }

    /// Sends what `f` makes with the current token (authenticating first if there is none yet), and
    /// once more with a new token if etcd finds it stale.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(Channel, Option<AsciiMetadataValue>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut token = self.token();
        if token.is_none() && self.inner.user.is_some() {
            token = self.authenticate(None).await?;
        }
        let mut renewed = false;
        loop {
            match self.on_members(|ch| f(ch, token.clone())).await {
                Err(s) if !renewed && self.inner.user.is_some() && stale_token(&s) => {
                    tracing::debug!(error = %s.message(), "etcd token stale; authenticating again");
                    renewed = true;
                    token = self.authenticate(token).await?;
                }
                r => return Ok(r?),
            }
        }
    }

    /// Reads a key or a range.
    pub async fn range(&self, req: rpc::RangeRequest) -> Result<rpc::RangeResponse, Error> {
        self.call(|ch, token| {
            let req = request(req.clone(), token.as_ref());
            async move {
                let mut kv = KvClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
                Ok(kv.range(req).await?.into_inner())
            }
        })
        .await
    }

    /// Writes one key.
    pub async fn put(&self, req: rpc::PutRequest) -> Result<rpc::PutResponse, Error> {
        self.call(|ch, token| {
            let req = request(req.clone(), token.as_ref());
            async move { Ok(KvClient::new(ch).put(req).await?.into_inner()) }
        })
        .await
    }

    /// Runs one transaction.
    pub async fn txn(&self, req: rpc::TxnRequest) -> Result<rpc::TxnResponse, Error> {
        self.call(|ch, token| {
            let req = request(req.clone(), token.as_ref());
            async move {
                let mut kv = KvClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
                Ok(kv.txn(req).await?.into_inner())
            }
        })
        .await
    }

    /// Opens a watch: one stream carrying one watcher. Its first response (created, or canceled) is
    /// already read: a watch etcd cancels for a stale token is opened again with a new one.
    pub async fn watch(&self, create: rpc::WatchCreateRequest) -> Result<Watch, Error> {
        self.call(|ch, token| {
            let create = rpc::WatchRequest {
                request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                    create.clone(),
                )),
            };
            // The request side stays open for the life of the watch.
            let requests = tokio_stream::once(create).chain(tokio_stream::pending());
            let req = request(requests, token.as_ref());
            async move {
                let mut wc = WatchClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
                let mut stream = wc.watch(req).await?.into_inner();
                let first = stream.message().await?;
                if let Some(r) = &first
                    && r.canceled
                    && (r.cancel_reason.contains(WATCH_DENIED)
                        || STALE_TOKEN.iter().any(|m| r.cancel_reason.contains(m)))
                {
                    // As a status, so that `call` authenticates again and reopens it.
                    return Err(Status::unauthenticated(format!(
                        "{WATCH_REFUSED}: {}",
                        r.cancel_reason
                    )));
                }
                Ok(Watch { first, stream })
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_before_any_work_are_resent_and_nothing_else() {
        let refused = Error::from(Status::unavailable(format!(
            "{UNREACHABLE}: 127.0.0.1:1: connection refused"
        )));
        assert!(refused.unsent());
        assert!(Error::from(Status::unavailable(NO_LEADER)).unsent());
        assert!(Error::from(Status::unavailable(LEADER_CHANGED)).unsent());
        // A connection that broke with the request in flight: it may have been applied.
        assert!(!Error::from(Status::unavailable("connection reset")).unsent());
        assert!(!Error::from(Status::invalid_argument(STALE_TOKEN[0])).unsent());
        assert!(stale_token(&Status::unauthenticated(
            "etcdserver: invalid auth token"
        )));
        assert!(!stale_token(&Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password"
        )));
    }
}
