//! The access log: one JSON line per request (and per tunneled TCP connection) this proxy served or
//! sent, to stdout or a file, when `[access_log]` is configured (off by default).
//!
//! Why it never slows traffic: the data plane formats the line and hands it to a bounded queue with
//! `try_send`; a writer task drains the queue into a buffered file and flushes when it runs dry. A
//! writer that falls behind (slow disk, a stdout nobody reads) loses lines, counted in
//! `quicmesh_access_log_dropped`, never stalls a request. Off, the cost is one atomic load
//! ([`AccessLog::is_on`]). Strings are clipped ([`MAX_FIELD`]) so a line is bounded; header values
//! and bodies are never logged, only the request line.

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use crate::metrics::Direction;

/// Longest string field logged, bytes (cut at a character boundary).
pub const MAX_FIELD: usize = 1024;

/// `[access_log]` of the proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `-` for stdout, else a file appended to (created owner-readable if missing).
    pub path: String,
    /// Lines waiting for the writer; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_queue() -> usize {
    4096
}

impl AccessLogConfig {
    /// Checks the values; the message names the key.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.path.is_empty() {
            return Err(("path", "empty: use \"-\" for stdout or a file path".into()));
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return Err(("queue", format!("{} is not within 1..=1000000", self.queue)));
        }
        Ok(())
    }
}

/// One line of the log.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// `http` or `tcp`.
    pub kind: &'static str,
    /// `inbound` (this proxy served it) or `outbound` (this proxy's app sent it).
    pub direction: Direction,
    /// The peer's identity (the caller inbound, the destination's proxy outbound), when known.
    pub peer: &'a str,
    /// Destination service, `name.namespace`.
    pub service: &'a str,
    /// Request method (HTTP).
    pub method: Option<&'a str>,
    /// Path and query (HTTP).
    pub path: Option<&'a str>,
    /// Status code (HTTP).
    pub status: Option<u16>,
    /// gRPC status, if any.
    pub grpc_status: Option<u32>,
    /// Request head to response head (HTTP); open to close (TCP).
    pub duration: Duration,
    /// Bytes carried both ways (TCP; HTTP: not counted).
    pub bytes: Option<u64>,
    /// Whether a TCP connection ended cleanly.
    pub ok: Option<bool>,
    /// Request id, hex.
    pub request_id: &'a str,
    /// W3C `traceparent` the request carried, if any.
    pub traceparent: Option<&'a str>,
}

/// `s` cut to [`MAX_FIELD`] bytes (JSON escapes what is left; `crate::clip` is for log text).
fn cut(s: &str) -> &str {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The JSON line of `e` at `unix` (seconds, fractional), from this proxy (`local` identity).
pub fn line(e: &Entry<'_>, local: &str, unix: Duration) -> String {
    let (source, destination) = match e.direction {
        Direction::Inbound => (cut(e.peer), local),
        Direction::Outbound => (local, cut(e.peer)),
    };
    let time = time::OffsetDateTime::UNIX_EPOCH + unix;
    let time = time
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut v = serde_json::json!({
        "time": time,
        "kind": e.kind,
        "direction": match e.direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        },
        "source": source,
        "destination": destination,
        "service": cut(e.service),
        "duration_ms": (e.duration.as_secs_f64() * 1e6).round() / 1e3,
        "request_id": cut(e.request_id),
    });
    let m = v.as_object_mut().expect("a JSON object");
    let mut put = |k: &str, x: serde_json::Value| {
        if !x.is_null() {
            m.insert(k.to_owned(), x);
        }
    };
    put("method", e.method.map(cut).into());
    put("path", e.path.map(cut).into());
    put("status", e.status.into());
    put("grpc_status", e.grpc_status.into());
    put("bytes", e.bytes.into());
    put("ok", e.ok.into());
    put("traceparent", e.traceparent.map(cut).into());
    v.to_string()
}

#[derive(Debug)]
struct Sink {
    tx: mpsc::Sender<String>,
    local: String,
}

/// The proxy's access log: off until [`AccessLog::start`].
#[derive(Debug, Default)]
pub struct AccessLog {
    sink: OnceLock<Sink>,
    /// Lines queued for the writer.
    pub lines: Counter,
    /// Lines dropped: the queue was full or the writer failed.
    pub dropped: Counter,
}

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file could not be opened.
    #[error("access log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Started twice.
    #[error("the access log is already started")]
    Started,
}

impl AccessLog {
    /// Whether lines are written (one atomic load).
    pub fn is_on(&self) -> bool {
        self.sink.get().is_some()
    }

    /// Opens the destination of `cfg` and starts the writer task; `local` is this proxy's identity.
    pub async fn start(&self, cfg: &AccessLogConfig, local: String) -> Result<(), AccessLogError> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = if cfg.path == "-" {
            Box::new(tokio::io::stdout())
        } else {
            let path = PathBuf::from(&cfg.path);
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)
                .await
                .map_err(|source| AccessLogError::Open { path, source })?;
            Box::new(f)
        };
        let (tx, rx) = mpsc::channel(cfg.queue);
        self.sink
            .set(Sink { tx, local })
            .map_err(|_| AccessLogError::Started)?;
        tokio::spawn(write_loop(rx, out, self.dropped.clone()));
        Ok(())
    }

    /// Logs `e` if the log is on; never waits (a full queue drops the line).
    pub fn record(&self, e: &Entry<'_>) {
        let Some(s) = self.sink.get() else { return };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if s.tx.try_send(line(e, &s.local, unix)).is_ok() {
            self.lines.inc();
        } else {
            self.dropped.inc();
        }
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<String>,
    out: Box<dyn AsyncWrite + Send + Unpin>,
    dropped: Counter,
) {
    let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(l) = next {
            if failed {
                dropped.inc();
            } else if let Err(e) = write_line(&mut w, &l).await {
                tracing::warn!(error = %e, "access log write failed; further lines are dropped");
                failed = true;
                dropped.inc();
            }
            next = rx.try_recv().ok();
        }
        if !failed && let Err(e) = w.flush().await {
            tracing::warn!(error = %e, "access log flush failed; further lines are dropped");
            failed = true;
        }
    }
}

async fn write_line(w: &mut (impl AsyncWrite + Unpin), line: &str) -> std::io::Result<()> {
    w.write_all(line.as_bytes()).await?;
    w.write_all(b"\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http<'a>() -> Entry<'a> {
        Entry {
            kind: "http",
            direction: Direction::Inbound,
            peer: "spiffe://td/ns/a/sa/client",
            service: "web.a",
            method: Some("GET"),
            path: Some("/orders?id=7"),
            status: Some(200),
            grpc_status: None,
            duration: Duration::from_micros(12_345),
            bytes: None,
            ok: None,
            request_id: "00ff",
            traceparent: None,
        }
    }

    #[test]
    fn a_request_line_has_every_field_with_sides_by_direction() {
        let l = line(
            &http(),
            "spiffe://td/ns/a/sa/web",
            Duration::from_millis(1_796_283_817_250),
        );
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["time"], "2026-12-03T07:43:37.25Z");
        assert_eq!(v["source"], "spiffe://td/ns/a/sa/client");
        assert_eq!(v["destination"], "spiffe://td/ns/a/sa/web");
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/orders?id=7");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 12.345);
        assert_eq!(v["request_id"], "00ff");
        assert!(v.get("grpc_status").is_none() && v.get("bytes").is_none());
        assert!(!l.contains('\n'));

        let mut out = http();
        out.direction = Direction::Outbound;
        out.kind = "tcp";
        out.bytes = Some(16);
        out.ok = Some(true);
        let v: serde_json::Value =
            serde_json::from_str(&line(&out, "spiffe://td/ns/a/sa/client", Duration::ZERO))
                .expect("json");
        assert_eq!(v["source"], "spiffe://td/ns/a/sa/client");
        assert_eq!(v["destination"], "spiffe://td/ns/a/sa/client");
        assert_eq!(v["bytes"], 16);
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn fields_are_clipped_and_escaped() {
        let long = format!("/{}\"\n", "é".repeat(MAX_FIELD));
        let mut e = http();
        e.path = Some(&long);
        let l = line(&e, "x", Duration::ZERO);
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        assert!(v["path"].as_str().expect("path").len() <= MAX_FIELD);
        assert!(!l.contains('\n'));
    }

    #[test]
    fn bad_settings_are_named() {
        let c = AccessLogConfig {
            path: String::new(),
            queue: 1,
        };
        assert_eq!(c.check().map_err(|e| e.0), Err("path"));
        let c = AccessLogConfig {
            path: "-".into(),
            queue: 0,
        };
        assert_eq!(c.check().map_err(|e| e.0), Err("queue"));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::default();
        log.record(&http());
        assert_eq!(log.lines.get(), 0, "off: nothing queued");
        log.start(
            &AccessLogConfig {
                path: path.to_str().expect("utf8").into(),
                queue: 4,
            },
            "spiffe://td/ns/a/sa/web".into(),
        )
        .await
        .expect("start");
        // The writer task has not run yet (current-thread runtime): the fifth line finds the queue full.
        for _ in 0..5 {
            log.record(&http());
        }
        assert_eq!((log.lines.get(), log.dropped.get()), (4, 1));
        let mut text = String::new();
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            text = std::fs::read_to_string(&path).expect("read");
            if text.lines().count() == 4 {
                break;
            }
        }
        assert_eq!(text.lines().count(), 4, "{text}");
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line");
        }
    }
}
