//! Connections from the destination proxy to its local applications: HTTP/1.1 connections kept alive
//! and reused one request at a time, one multiplexed HTTP/2 connection per application address.
//!
//! Our own small pool over hyper's connection API rather than a general client: every destination is
//! a known local address, so a request costs a map lookup and, for HTTP/1.1, a pop from an idle list
//! (measured here, the general client's pool key, scheme checks and per-request tasks were about a
//! tenth of the destination proxy's instructions per request). An HTTP/1.1 connection returns to the
//! idle list when its response body has been read to the end; one whose body is dropped early is
//! closed (its remaining bytes are unknown).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, uri::Authority};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::io::StreamBody;

/// Idle HTTP/1.1 connections kept per application address; more are closed when they come back.
const MAX_IDLE: usize = 256;

/// How long a connection that is still busy may take to become free before it is closed.
const IDLE_WAIT: Duration = Duration::from_secs(90);

/// Why a request did not get a response head from the application.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection to the application: refused, timed out or the handshake failed. The
    /// application never saw the request.
    #[error("connecting to the application: {0}")]
    Connect(String),
    /// The connection broke or the application answered with something that is not HTTP.
    #[error("application request failed: {0}")]
    Request(#[from] hyper::Error),
}

impl AppError {
    /// Whether the application never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// Pooled connections to the local applications. Cheap to clone (shared).
#[derive(Clone)]
pub struct AppClients {
    inner: Arc<Inner>,
}

struct Inner {
    connect_timeout: Duration,
    apps: Mutex<HashMap<SocketAddr, Arc<App>>>,
}

/// An application address as [`AppClients::target`] found it.
pub struct AppTarget(Arc<App>);

impl AppTarget {
    /// The authority (`ip:port`) requests to it carry; formatted once per address.
    pub fn authority(&self) -> &Authority {
        &self.0.authority
    }
}

/// One application address and its connections.
struct App {
    addr: SocketAddr,
    authority: Authority,
    idle: Mutex<Vec<http1::SendRequest<StreamBody>>>,
    h2: Mutex<Option<http2::SendRequest<StreamBody>>>,
}

impl AppClients {
    /// Clients that connect within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connect_timeout,
                apps: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The application at `addr` (looked up once per request: its authority and its connections).
    pub fn target(&self, addr: SocketAddr) -> AppTarget {
        AppTarget(self.app(addr))
    }

    fn app(&self, addr: SocketAddr) -> Arc<App> {
        let mut apps = self.inner.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(addr)
            .or_insert_with(|| {
                Arc::new(App {
                    addr,
                    // An address always formats to a valid authority.
                    authority: Authority::try_from(addr.to_string())
                        .unwrap_or_else(|_| Authority::from_static("localhost")),
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(None),
                })
            })
            .clone()
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, AppError> {
        let tcp = tokio::time::timeout(self.inner.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| AppError::Connect(format!("no connection to {addr} in time")))?
            .map_err(|e| AppError::Connect(format!("{addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        Ok(TokioIo::new(tcp))
    }

    /// Sends `req` (origin-form URI and `Host` for HTTP/1.1, absolute URI for HTTP/2) to the
    /// application `target` over HTTP/1.1 or HTTP/2 (`h2`).
    pub async fn send(
        &self,
        target: &AppTarget,
        h2: bool,
        req: Request<StreamBody>,
    ) -> Result<Response<AppBody>, AppError> {
        let app = target.0.clone();
        if h2 {
            self.send_h2(&app, req).await
        } else {
            self.send_h1(app, req).await
        }
    }

    async fn send_h2(
        &self,
        app: &App,
        req: Request<StreamBody>,
    ) -> Result<Response<AppBody>, AppError> {
        let held = app
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match held {
            Some(s) => s,
            None => {
                let io = self.connect(app.addr).await?;
                let (sender, conn) = http2::handshake(super::BoxedSpawn, io)
                    .await
                    .map_err(|e| AppError::Connect(format!("{}: {e}", app.addr)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "application connection ended");
                    }
                });
                *app.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
                sender
            }
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        Ok(resp.map(AppBody::plain))
    }

    async fn send_h1(
        &self,
        app: Arc<App>,
        mut req: Request<StreamBody>,
    ) -> Result<Response<AppBody>, AppError> {
        // An idle connection the application closed meanwhile gives the request back unsent; it
        // then goes on another one, at worst a new one.
        loop {
            let pooled = app.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let (mut sender, fresh) = match pooled {
                Some(mut s) => {
                    // Only a connection that is free now: one still sending an earlier request's
                    // body (its answer came first) must not hold this request back.
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    match s.poll_ready(&mut cx) {
                        Poll::Ready(Ok(())) => (s, false),
                        Poll::Ready(Err(_)) => continue,
                        Poll::Pending => {
                            let app = app.clone();
                            tokio::spawn(async move {
                                if let Ok(Ok(())) = tokio::time::timeout(IDLE_WAIT, s.ready()).await
                                {
                                    let mut idle =
                                        app.idle.lock().unwrap_or_else(|p| p.into_inner());
                                    if idle.len() < MAX_IDLE {
                                        idle.push(s);
                                    }
                                }
                            });
                            continue;
                        }
                    }
                }
                None => {
                    let io = self.connect(app.addr).await?;
                    let (sender, conn) = http1::handshake(io)
                        .await
                        .map_err(|e| AppError::Connect(format!("{}: {e}", app.addr)))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "application connection ended");
                        }
                    });
                    (sender, true)
                }
            };
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(AppError::Connect(format!(
                        "{}: connection closed at once",
                        app.addr
                    )));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|b| AppBody {
                        inner: b,
                        back: Some((app.clone(), sender)),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(AppError::Request(e.into_error())),
                },
            }
        }
    }
}

/// A response body from an application; an HTTP/1.1 connection goes back to the idle list once the
/// body has been read to its end (seen when it is dropped, or when it reports its end).
pub struct AppBody {
    inner: Incoming,
    back: Option<(Arc<App>, http1::SendRequest<StreamBody>)>,
}

impl AppBody {
    fn plain(inner: Incoming) -> Self {
        Self { inner, back: None }
    }

    /// Returns the connection to the idle list, if the body was all read.
    fn release(&mut self, ended: bool) {
        if !ended {
            return;
        }
        if let Some((app, sender)) = self.back.take() {
            let mut idle = app.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
        }
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream();
        self.release(ended);
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(true),
            // A connection whose response broke is not reused.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
