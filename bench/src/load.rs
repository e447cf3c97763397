//! The load loops: closed loop (N connections, each sending its next request as soon as the last one is
//! answered) and open loop (a fixed request rate, each request's latency measured from the moment the
//! schedule says it should have been sent, so a stalled server cannot hide behind clients that stopped
//! sending: no coordinated omission).
//!
//! Open loop, precisely: a request whose connection was still busy at its intended send time is measured
//! from that intended time (it queued behind a slow answer, and that wait is the server's doing); one whose
//! connection was idle is measured from its actual send, so the timer's 1 ms granularity is not counted
//! as server latency. A stalled server keeps its connections busy, so every request it delays counts.
//!
//! Every loop is bounded in time (the run's duration, plus one request timeout to drain) and in count
//! (`max_requests`). Each worker records into its own histograms; they are merged once at the end.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{Conn, ErrorKind, Protocol};

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Mode {
    /// Each connection sends as fast as its answers come back.
    Closed,
    /// A constant total rate, requests spread round-robin over the connections.
    Open {
        /// Requests per second, all connections together.
        rate: f64,
    },
}

/// One load run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Protocol of every request.
    pub protocol: Protocol,
    /// Closed or open loop.
    pub mode: Mode,
    /// Concurrent connections (closed loop: concurrent clients).
    pub connections: usize,
    /// Concurrent requests on each connection where the protocol multiplexes (HTTP/2, gRPC unary): each
    /// connection gets this many workers sharing it. Ignored (1) for the others.
    #[serde(default = "one")]
    pub streams: usize,
    /// Length of the measured run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Hard cap on requests sent.
    pub max_requests: u64,
    /// Request (and echoed response) size in bytes.
    pub payload: usize,
    /// Per-request timeout; also the drain time after `duration`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Log progress every few seconds.
    pub progress: bool,
}

impl LoadSpec {
    /// A spec with the harness defaults: 1 KiB payload, 5 s timeout, 10 M request cap.
    pub fn new(protocol: Protocol, mode: Mode, connections: usize, duration: Duration) -> Self {
        Self {
            protocol,
            mode,
            connections,
            streams: 1,
            duration,
            max_requests: 10_000_000,
            payload: 1024,
            timeout: Duration::from_secs(5),
            progress: duration >= Duration::from_secs(10),
        }
    }
}

fn one() -> usize {
    1
}

/// Raw result of one run: histograms in nanoseconds.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// The spec that produced it.
    pub spec: LoadSpec,
    /// Latency: closed loop from the send; open loop from the intended send time when the connection was
    /// busy then, else from the send (see the module doc).
    pub latency: Histogram<u64>,
    /// Latency from the actual send time (service time), both modes.
    pub service: Histogram<u64>,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Connections that could be opened.
    pub connected: usize,
    /// Wall time from the first scheduled request to the last answer.
    pub elapsed: Duration,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 5 min at 3 significant figures; bounds are constants, so this cannot fail.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1_000, 300_000_000_000, 3).unwrap()
}

#[derive(Default)]
struct WorkerOut {
    latency: Option<Histogram<u64>>,
    service: Option<Histogram<u64>>,
    ok: u64,
    errors: BTreeMap<ErrorKind, u64>,
}

impl WorkerOut {
    fn new() -> Self {
        Self {
            latency: Some(new_hist()),
            service: Some(new_hist()),
            ..Default::default()
        }
    }
    fn record(&mut self, hist_latency: Duration, service: Duration) {
        self.ok += 1;
        if let Some(h) = &mut self.latency {
            h.saturating_record(hist_latency.as_nanos() as u64);
        }
        if let Some(h) = &mut self.service {
            h.saturating_record(service.as_nanos() as u64);
        }
    }
    fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Opens `n` connections, at most 128 handshakes at a time.
pub async fn connect_all(
    protocol: Protocol,
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> (Vec<Conn>, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            Conn::connect(protocol, addr, timeout).await
        });
    }
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            _ => failed += 1,
        }
    }
    (conns, failed)
}

/// Runs `spec` against `addr`. Connections are opened and each makes one unmeasured exchange first; `gate`
/// is awaited after that and before the clock starts (the loss scenario switches loss on there).
pub async fn run(
    spec: &LoadSpec,
    addr: SocketAddr,
    gate: impl Future<Output = ()>,
) -> anyhow::Result<LoadOutcome> {
    anyhow::ensure!(spec.connections > 0, "need at least one connection");
    let (conns, failed) = connect_all(spec.protocol, addr, spec.connections, spec.timeout).await;
    if conns.is_empty() {
        anyhow::bail!(
            "no {} connection to {addr} could be opened ({failed} attempts failed)",
            spec.protocol.name()
        );
    }
    // One exchange on each connection before the clock starts: proxies set up their upstream side (TLS
    // handshakes, QUIC streams) lazily, and that start-up is not what the run measures.
    let payload = Bytes::from(vec![0x5au8; spec.payload]);
    let mut warm = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    for mut c in conns {
        let (payload, sem, timeout) = (payload.clone(), sem.clone(), spec.timeout);
        warm.spawn(async move {
            let _permit = sem.acquire_owned().await;
            c.request(&payload, timeout).await.map(|()| c)
        });
    }
    let mut conns = Vec::with_capacity(spec.connections);
    let mut failed = failed;
    while let Some(r) = warm.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            _ => failed += 1,
        }
    }
    anyhow::ensure!(
        !conns.is_empty(),
        "no connection to {addr} answered its first request"
    );
    let connected = conns.len();
    if failed > 0 {
        tracing::warn!(failed, connected, %addr, "some connections could not be opened");
    }
    // Several workers per connection where it multiplexes requests: a worker still carries one request
    // at a time, so `streams` workers keep up to `streams` requests in flight on each connection.
    if spec.streams > 1 {
        let mut workers = Vec::with_capacity(conns.len() * spec.streams);
        for c in conns {
            workers.extend((1..spec.streams).map_while(|_| c.share()));
            workers.push(c);
        }
        conns = workers;
    }
    gate.await;
    let start = Instant::now();
    let hard_deadline = start + spec.duration + spec.timeout;
    let done = Arc::new(AtomicU64::new(0));
    let progress = spec.progress.then(|| {
        let done = done.clone();
        let duration = spec.duration;
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(start + Duration::from_secs(5), Duration::from_secs(5));
            loop {
                tick.tick().await;
                let el = start.elapsed();
                if el > duration {
                    break;
                }
                tracing::info!(
                    "progress: {:>3.0}% {} requests in {:.0?}",
                    100.0 * el.as_secs_f64() / duration.as_secs_f64(),
                    done.load(Ordering::Relaxed),
                    el
                );
            }
        })
    });
    let n = conns.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for (w, conn) in conns.into_iter().enumerate() {
        let spec = spec.clone();
        let payload = payload.clone();
        let done = done.clone();
        tasks.spawn(async move {
            match spec.mode {
                Mode::Closed => closed_worker(conn, addr, &spec, &payload, start, &done).await,
                Mode::Open { rate } => {
                    open_worker(
                        conn,
                        addr,
                        &spec,
                        &payload,
                        start,
                        hard_deadline,
                        rate,
                        w as u64,
                        n,
                        &done,
                    )
                    .await
                }
            }
        });
    }
    let (latency, service, ok, mut errors) = merge_workers(&mut tasks).await?;
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    if failed > 0 {
        *errors.entry(ErrorKind::Connect).or_default() += failed;
    }
    Ok(LoadOutcome {
        spec: spec.clone(),
        latency,
        service,
        ok,
        errors,
        connected,
        elapsed,
    })
}

/// New connections per second: `spec.connections` clients, each connecting, making one exchange of
/// `spec.payload` bytes and closing, over and over for `spec.duration`. Latency is the whole cycle
/// (connect, handshake with the proxy, exchange). One cycle runs before the clock starts, so a proxy's
/// lazily built upstream (a QUIC or pooled TLS connection) is not counted; a proxy that builds one per
/// client connection pays it in every cycle, as it would in production.
pub async fn new_connections(spec: &LoadSpec, addr: SocketAddr) -> anyhow::Result<LoadOutcome> {
    anyhow::ensure!(spec.connections > 0, "need at least one client");
    anyhow::ensure!(
        spec.protocol == Protocol::Tcp,
        "the new-connections scenario is TCP only"
    );
    let payload = Bytes::from(vec![0x5au8; spec.payload]);
    let mut first = Conn::connect(spec.protocol, addr, spec.timeout)
        .await
        .map_err(|e| anyhow::anyhow!("no connection to {addr}: {}", e.name()))?;
    first
        .request(&payload, spec.timeout)
        .await
        .map_err(|e| anyhow::anyhow!("first exchange with {addr} failed: {}", e.name()))?;
    drop(first);
    let start = Instant::now();
    let end = start + spec.duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.connections {
        let (spec, payload, done) = (spec.clone(), payload.clone(), done.clone());
        tasks.spawn(async move {
            let mut out = WorkerOut::new();
            while Instant::now() < end && done.fetch_add(1, Ordering::Relaxed) < spec.max_requests {
                let t0 = Instant::now();
                let mut c = match Conn::connect(spec.protocol, addr, spec.timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        out.error(e);
                        continue;
                    }
                };
                match c.request(&payload, spec.timeout).await {
                    Ok(()) => {
                        let d = t0.elapsed();
                        out.record(d, d);
                    }
                    Err(e) => out.error(e),
                }
            }
            out
        });
    }
    let (latency, service, ok, errors) = merge_workers(&mut tasks).await?;
    Ok(LoadOutcome {
        spec: spec.clone(),
        latency,
        service,
        ok,
        errors,
        connected: spec.connections,
        elapsed: start.elapsed(),
    })
}

/// Waits for every worker and adds up what they measured: latency and service-time histograms,
/// successes, errors by kind.
async fn merge_workers(
    tasks: &mut tokio::task::JoinSet<WorkerOut>,
) -> anyhow::Result<(
    Histogram<u64>,
    Histogram<u64>,
    u64,
    BTreeMap<ErrorKind, u64>,
)> {
    let mut latency = new_hist();
    let mut service = new_hist();
    let mut ok = 0;
    let mut errors: BTreeMap<ErrorKind, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let out = r?;
        if let Some(h) = out.latency {
            latency.add(h)?;
        }
        if let Some(h) = out.service {
            service.add(h)?;
        }
        ok += out.ok;
        for (k, v) in out.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    Ok((latency, service, ok, errors))
}

async fn closed_worker(
    conn: Conn,
    addr: SocketAddr,
    spec: &LoadSpec,
    payload: &Bytes,
    start: Instant,
    done: &AtomicU64,
) -> WorkerOut {
    let mut out = WorkerOut::new();
    let end = start + spec.duration;
    let mut conn = Some(conn);
    loop {
        let now = Instant::now();
        if now >= end || done.fetch_add(1, Ordering::Relaxed) >= spec.max_requests {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(spec.protocol, addr, spec.timeout).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    out.error(e);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match c.request(payload, spec.timeout).await {
            Ok(()) => {
                let d = sent.elapsed();
                out.record(d, d);
            }
            Err(e) => {
                out.error(e);
                conn = None;
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn open_worker(
    conn: Conn,
    addr: SocketAddr,
    spec: &LoadSpec,
    payload: &Bytes,
    start: Instant,
    hard_deadline: Instant,
    rate: f64,
    w: u64,
    n: u64,
    done: &AtomicU64,
) -> WorkerOut {
    let mut out = WorkerOut::new();
    let total = ((rate * spec.duration.as_secs_f64()) as u64).min(spec.max_requests);
    let interval_ns = 1e9 / rate;
    let mut conn = Some(conn);
    let mut busy_until = start;
    let mut i = w;
    while i < total {
        let intended = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        i += n;
        if Instant::now() >= hard_deadline {
            out.error(ErrorKind::NotSent);
            continue;
        }
        tokio::time::sleep_until(intended).await;
        let woke = Instant::now();
        done.fetch_add(1, Ordering::Relaxed);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(spec.protocol, addr, spec.timeout).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    out.error(e);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let from = if busy_until > intended {
            intended
        } else {
            woke
        };
        let result = c.request(payload, spec.timeout).await;
        busy_until = Instant::now();
        match result {
            Ok(()) => {
                out.record(busy_until - from, busy_until - sent);
            }
            Err(e) => {
                out.error(e);
                conn = None;
            }
        }
    }
    out
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value seen.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Reads the standard percentiles from a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |v: u64| v as f64 / 1e6;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e6,
        }
    }
}

/// The serializable summary of one run: what the JSON files, the table and the plots are made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The spec of the run.
    pub spec: LoadSpec,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connections opened.
    pub connected: usize,
    /// Measured seconds.
    pub elapsed_s: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Latency (from the intended send time in open loop), ms.
    pub latency_ms: Percentiles,
    /// Service time (from the actual send), ms.
    pub service_ms: Percentiles,
    /// Percentile curve of `latency_ms` for plots: (percentile, ms).
    pub curve: Vec<(f64, f64)>,
}

/// The percentiles at which curves are sampled: 0 .. 99.999 evenly on a log(1/(1-p)) axis.
pub fn curve_points() -> Vec<f64> {
    (0..=50)
        .map(|i| 100.0 * (1.0 - 10f64.powf(-(i as f64) / 10.0)))
        .collect()
}

impl LoadOutcome {
    /// Total failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Summarizes for the report.
    pub fn summary(&self) -> Summary {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let curve = if self.latency.is_empty() {
            Vec::new()
        } else {
            curve_points()
                .into_iter()
                .map(|p| (p, self.latency.value_at_percentile(p) as f64 / 1e6))
                .collect()
        };
        Summary {
            spec: self.spec.clone(),
            ok: self.ok,
            errors: self
                .errors
                .iter()
                .map(|(k, v)| (k.name().to_owned(), *v))
                .collect(),
            connected: self.connected,
            elapsed_s: secs,
            throughput_rps: self.ok as f64 / secs,
            latency_ms: Percentiles::of(&self.latency),
            service_ms: Percentiles::of(&self.service),
            curve,
        }
    }
}

impl Summary {
    /// Total failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_histogram() {
        let mut h = new_hist();
        for ms in 1..=1000u64 {
            h.saturating_record(ms * 1_000_000);
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 1.5, "{p:?}");
        assert!((p.max - 1000.0).abs() < 1.5, "{p:?}");
    }

    #[test]
    fn curve_is_increasing_and_reaches_five_nines() {
        let c = curve_points();
        assert_eq!(c[0], 0.0);
        assert!(c.windows(2).all(|w| w[1] > w[0]));
        assert!((c[50] - 99.999).abs() < 1e-9);
    }
}
