//! HTTP and gRPC across the mesh: requests, not just bytes.
//!
//! A port declared `http` or `grpc` in its `Service` is served request by request: the source proxy
//! terminates the application's HTTP/1.1 or HTTP/2 connection ([`outbound`]) and sends each request as
//! its own QUIC stream ([`frame`]: head, body, trailers), the destination proxy forwards it to its
//! application over a pooled client ([`inbound`]). Per-request decisions — deadline, retries, the answer
//! when the mesh fails — are pure functions in [`policy`]; admission is [`crate::state::MeshState::admit`]
//! with the method and path. Ports declared `tcp`, and undeclared ones, keep the opaque tunnel.

pub mod app;
pub mod frame;
pub mod headers;
pub mod inbound;
pub mod io;
pub mod outbound;
pub mod policy;

/// The executor hyper spawns its per-request tasks on (an HTTP/2 server's task per stream, an HTTP/2
/// client's response and body tasks). hyper hands over futures that are several kilobytes (its
/// connection task's enum is the size of its largest variant), and `tokio::spawn` moves a future
/// through several frames into its task cell: boxing it first moves it once, and the task holds a
/// pointer. Measured with callgrind on HTTP/2 with 100 streams: the copies of spawned futures were
/// about a third of each proxy's `memcpy`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BoxedSpawn;

impl<F> hyper::rt::Executor<F> for BoxedSpawn
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// A path as a tap, the access log's neighbours and a span show it: at most 256 bytes, cut at a
/// character boundary.
pub(crate) fn clip_path(p: &str) -> String {
    let mut end = p.len().min(256);
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    p[..end].to_owned()
}
