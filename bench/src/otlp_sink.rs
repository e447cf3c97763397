//! An OTLP/gRPC trace collector that only counts what it receives, so a run with tracing on pays the
//! whole cost of exporting (encoding, gRPC, the collector's acknowledgement) and the harness can check
//! spans really left the proxies.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tokio_util::sync::{CancellationToken, DropGuard};

#[derive(Debug, Default)]
struct Counter {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running sink; stops when dropped.
#[derive(Debug)]
pub struct OtlpSink {
    addr: SocketAddr,
    spans: Arc<AtomicU64>,
    _stop: DropGuard,
}

impl OtlpSink {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counter = Counter::default();
        let spans = counter.spans.clone();
        let stop = CancellationToken::new();
        let done = stop.clone();
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(counter))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    done.cancelled_owned(),
                )
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "OTLP sink stopped");
            }
        });
        Ok(Self {
            addr,
            spans,
            _stop: stop.drop_guard(),
        })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}
