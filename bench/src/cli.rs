//! The `bench` command line: `compare` (the whole side-by-side comparison), `loss` (packet loss in network
//! namespaces), `load` (one run against an address), `serve` (the matching servers), `quic-ceiling`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use tokio::io::AsyncBufReadExt;

use crate::{
    bulk,
    client::Protocol,
    compare::{self, CompareEnv, CompareSettings},
    instructions::{self, InstructionOutcome, InstructionSettings},
    load::{self, LoadSpec, Mode},
    loss::{self, LossSettings},
    report,
    server::{AppServer, StallPlan},
    topology::{self, Target},
};

/// `quicmesh bench`: load generator, matching servers and the side-by-side comparison.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Everything with default settings: `compare`, then `loss` (which skips, saying why, when not root).
    All {
        /// The quicmesh binary (default: target/release/quicmesh, or next to this executable).
        #[arg(long)]
        quicmesh_bin: Option<PathBuf>,
        /// Results directory.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Run every scenario against direct, quicmesh and the HAProxy mTLS pair, side by side.
    Compare(CompareArgs),
    /// Packet loss: client and server side in two network namespaces, loss by nftables (root only).
    Loss(LossArgs),
    /// The HTTP/3 ingress against an HAProxy HTTP/2-over-TLS ingress, outside clients across the loss
    /// scenario's lossy link (root only).
    Ingress(IngressArgs),
    /// Node gateway vs one sidecar per workload: req/s, proxy CPU per request and memory per workload,
    /// the same workloads and load in the same run.
    Gateway(GatewayArgs),
    /// Instructions per tunneled request and per tunneled MiB in every proxy, counted by callgrind.
    Instructions(InstructionArgs),
    /// One load run against an address.
    Load(LoadArgs),
    /// Serve TCP echo/sink, HTTP/1.1, HTTP/2 and gRPC echo on one port.
    Serve(ServeArgs),
    /// Closed-loop HTTP/3 load against an address (the proxy's `[ingress]`), or HTTP/2 over TLS
    /// (`--wire h2`): POSTs of `--payload` bytes, each answer read whole; prints one JSON line.
    H3Load {
        /// The ingress's address (UDP for h3, TCP for h2).
        #[arg(long)]
        target: SocketAddr,
        /// `h3` (HTTP/3) or `h2` (HTTP/2 over TLS, for an ingress to compare with).
        #[arg(long, default_value = "h3")]
        wire: crate::h3load::Wire,
        /// Connect, print `{"event":"connected"}`, then wait for a line on stdin before the load.
        #[arg(long)]
        gate_stdin: bool,
        /// CA certificates (PEM) that verify the gateway's certificate.
        #[arg(long)]
        ca: PathBuf,
        /// TLS server name and `:authority`.
        #[arg(long)]
        host: String,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// QUIC connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Concurrent requests per connection.
        #[arg(long, default_value_t = 16)]
        streams: usize,
        /// Request size, bytes.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// Measured length.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Bulk throughput of one TCP connection into the sink of `bench serve` at `--target` (directly or
    /// through a proxy): for profiling one path on its own.
    Bulk {
        /// The sink (a `bench serve` port, or a proxy listener in front of one).
        #[arg(long)]
        target: SocketAddr,
        /// Byte cap.
        #[arg(long, default_value_t = 8 << 30)]
        bytes: u64,
        /// Time cap.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Print the outcome as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Bulk throughput of quinn alone (one stream, loopback): the ceiling for the tunnel.
    QuicCeiling {
        /// Byte cap.
        #[arg(long, default_value_t = 8 << 30)]
        bytes: u64,
        /// Time cap.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Wait until an address accepts TCP connections (used inside network namespaces).
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Wait instead until `GET` of this path answers 200 (a readiness endpoint).
        #[arg(long)]
        http_path: Option<String>,
    },
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// The quicmesh binary (default: target/release/quicmesh, or next to this executable).
    #[arg(long)]
    quicmesh_bin: Option<PathBuf>,
    /// Workloads on the node.
    #[arg(long, default_value_t = 10)]
    workloads: usize,
    /// Closed-loop connections per workload.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Request size, bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Load before the measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured window of each topology.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Results directory (gateway.json).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Print only.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The quicmesh binary (default: target/release/quicmesh, or next to this executable).
    #[arg(long)]
    quicmesh_bin: Option<PathBuf>,
    /// Paths to compare besides direct: quicmesh, peer (HAProxy `mode tcp`), and the HTTP-aware
    /// quicmesh-l7 and peer-http (HAProxy `mode http`), which run no raw-TCP scenario; quicmesh-l7-policy
    /// is quicmesh-l7 enforcing 100 authorization rules and a rate limit (compare it with quicmesh-l7);
    /// ztunnel (Istio's, given with --ztunnel; root).
    #[arg(long, value_delimiter = ',', default_value = "quicmesh,peer")]
    targets: Vec<Target>,
    /// The ztunnel binary for the `ztunnel` target, built by hand (see bench/README.md); default: the
    /// QUICMESH_BENCH_ZTUNNEL environment variable. Without either the target is skipped.
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// Concurrent clients of the new-connections scenario (connect, one exchange, close); 0 skips it.
    #[arg(long, default_value_t = 64)]
    new_conns: usize,
    /// Measured length of each load run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repeat the whole scenario list this many times (results merged).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Open-loop rates (req/s) for the added-latency figures.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<f64>,
    /// Protocols of the added-latency figures.
    #[arg(long, value_delimiter = ',', default_value = "http1")]
    latency_protocols: Vec<Protocol>,
    /// Concurrent requests per HTTP/2 connection in the max-throughput scenario.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Connections of the fixed-rate and max-throughput scenarios.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Protocols of the max-throughput scenario.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tcp,http1,http2,grpc-unary,grpc-stream"
    )]
    protocols: Vec<Protocol>,
    /// Connection counts of the small request/response scenario.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    rr_connections: Vec<usize>,
    /// Connections held open for the proxy memory figure.
    #[arg(long, default_value_t = 1000)]
    memory_connections: usize,
    /// Byte cap of the bulk transfer.
    #[arg(long, default_value_t = 8 << 30)]
    bulk_bytes: u64,
    /// Time cap of the bulk transfer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    bulk_duration: Duration,
    /// Skip the raw QUIC ceiling.
    #[arg(long)]
    no_quic_ceiling: bool,
    /// `nbthread` of each HAProxy.
    #[arg(long, default_value_t = 1)]
    haproxy_threads: usize,
    /// Seconds-long run with tiny rates (what the smoke test runs).
    #[arg(long)]
    smoke: bool,
    /// Lines of a `[quic]` section for the quicmesh proxies, e.g. `congestion_controller = "bbr"`.
    #[arg(long, default_value = "")]
    quic_toml: String,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Write no files.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Args)]
struct InstructionArgs {
    /// Paths (every proxy runs under callgrind).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "quicmesh,peer,quicmesh-l7,peer-http"
    )]
    targets: Vec<Target>,
    /// Requests of the request/response run.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Protocol of the requests on the HTTP-aware paths (the opaque ones echo TCP).
    #[arg(long, default_value = "http1")]
    l7_protocol: Protocol,
    /// Concurrent requests per connection where that protocol multiplexes (http2, grpc-unary).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Its concurrent connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Bytes per request and response.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// MiB of the bulk run (opaque paths); 0 skips it.
    #[arg(long, default_value_t = 32)]
    bulk_mib: u64,
    /// Keep the callgrind dumps (for `callgrind_annotate`); their directory is printed.
    #[arg(long)]
    keep_dumps: bool,
    /// Trace on the quicmesh proxies: `[tracing] sample_percent` (0-100), spans exported over OTLP
    /// to a collector in the harness (default: tracing off, as the proxies' default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    tracing_percent: Option<u32>,
    /// Lines of a `[quic]` section for the quicmesh proxies.
    #[arg(long, default_value = "")]
    quic_toml: String,
    /// The quicmesh binary.
    #[arg(long)]
    quicmesh_bin: Option<PathBuf>,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Write no files.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Args)]
struct LossArgs {
    /// Loss percentages, each applied to packets arriving in either namespace.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss: Vec<u32>,
    /// Open-loop rate, req/s.
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    /// Concurrent connections (quicmesh: streams over one tunnel).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Concurrent requests per connection where the protocol multiplexes (http2, grpc-unary).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Measured length of each run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Protocol.
    #[arg(long, default_value = "http1")]
    protocol: Protocol,
    /// Paths besides direct (quicmesh, peer, quicmesh-l7, peer-http, ztunnel).
    #[arg(long, value_delimiter = ',', default_value = "quicmesh,peer")]
    targets: Vec<Target>,
    /// The ztunnel binary for the `ztunnel` target (default: QUICMESH_BENCH_ZTUNNEL); without either
    /// the target is skipped.
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// The quicmesh binary.
    #[arg(long)]
    quicmesh_bin: Option<PathBuf>,
    /// `nbthread` of each HAProxy.
    #[arg(long, default_value_t = 1)]
    haproxy_threads: usize,
    /// Bulk transfer (one TCP connection) at each loss level on each path that carries raw TCP; `0s`
    /// skips it.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    bulk_duration: Duration,
    /// Lines of a `[quic]` section for the quicmesh proxies, e.g. `congestion_controller = "bbr"`.
    #[arg(long, default_value = "")]
    quic_toml: String,
    /// The harness binary run inside the namespaces (default: this executable).
    #[arg(long)]
    bench_bin: Option<PathBuf>,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Write no files.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Args)]
struct IngressArgs {
    /// Loss percentages, each applied to packets arriving in either namespace.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss: Vec<u32>,
    /// Client connections per ingress.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent requests per connection.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Request size, bytes (echoed back).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Measured length of each run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// `nbthread` of HAProxy.
    #[arg(long, default_value_t = 1)]
    haproxy_threads: usize,
    /// The quicmesh binary.
    #[arg(long)]
    quicmesh_bin: Option<PathBuf>,
    /// The harness binary run inside the namespaces (default: this executable).
    #[arg(long)]
    bench_bin: Option<PathBuf>,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Write no files.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Address to load.
    #[arg(long)]
    target: SocketAddr,
    /// Protocol.
    #[arg(long, default_value = "http1")]
    protocol: Protocol,
    /// Open loop at this many req/s; without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections (closed loop: concurrent clients).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Concurrent requests per connection where the protocol multiplexes (http2, grpc-unary).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Measured length.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Request size, bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Request cap.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Once connected, print `{"event":"connected"}` and wait for a line on stdin before starting.
    #[arg(long)]
    gate_stdin: bool,
    /// Print the summary as one JSON line on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON and a plot into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Pause every response this long after the first request...
    #[arg(long, value_parser = humantime::parse_duration)]
    stall_after: Option<Duration>,
    /// ...for this long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    stall_for: Duration,
    /// Exit after this long (bounded even if nobody stops it).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    max_time: Duration,
    /// Also serve the count of answered requests, `{"requests": N}`, over HTTP on this address.
    #[arg(long)]
    stats_listen: Option<SocketAddr>,
}

fn bench_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p),
        None => Ok(std::env::current_exe()?),
    }
}

/// Runs one `bench` subcommand.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::All { quicmesh_bin, out } => {
            let bin = topology::find_quicmesh(quicmesh_bin.as_deref());
            let env = CompareEnv {
                quicmesh_bin: bin.clone(),
                bench_bin: bench_bin(None)?,
                out: Some(out.clone()),
            };
            compare::compare(
                CompareSettings::full(vec![Target::Quicmesh, Target::Peer]),
                env,
            )
            .await?;
            let settings = LossSettings {
                loss_percent: vec![0, 1, 5],
                rate: 3000.0,
                connections: 64,
                streams: 1,
                duration: Duration::from_secs(10),
                protocol: Protocol::Http1,
                targets: vec![Target::Quicmesh, Target::Peer],
                haproxy_threads: 1,
                bulk_duration: Duration::from_secs(5),
                quic_toml: String::new(),
                ztunnel_bin: None,
            };
            if let loss::LossOutcome::Skipped(why) =
                loss::run(settings, bin, bench_bin(None)?, Some(out)).await?
            {
                println!("loss scenario skipped: {why}");
            }
            Ok(())
        }
        BenchCommand::Compare(a) => {
            let targets = a.targets.clone();
            let mut s = if a.smoke {
                CompareSettings::smoke(targets)
            } else {
                let mut s = CompareSettings::full(targets);
                s.duration = a.duration;
                s.rates = a.rates;
                s.connections = a.connections;
                s.rr_connections = a.rr_connections;
                s.memory_connections = a.memory_connections;
                s.bulk_bytes = a.bulk_bytes;
                s.bulk_duration = a.bulk_duration;
                s
            };
            s.rounds = a.rounds.max(1);
            s.protocols = a.protocols;
            s.latency_protocols = a.latency_protocols;
            s.streams = a.streams.max(1);
            s.quic_ceiling = !a.no_quic_ceiling;
            s.haproxy_threads = a.haproxy_threads;
            s.quic_toml = a.quic_toml.clone();
            s.ztunnel_bin = a.ztunnel.clone();
            if !a.smoke {
                s.new_connections = a.new_conns;
            }
            let quicmesh_bin = if s.targets.iter().any(|t| {
                matches!(
                    t,
                    Target::Quicmesh | Target::QuicmeshL7 | Target::QuicmeshL7Policy
                )
            }) {
                topology::find_quicmesh(a.quicmesh_bin.as_deref())
            } else {
                None
            };
            let env = CompareEnv {
                quicmesh_bin,
                bench_bin: bench_bin(None)?,
                out: (!a.no_write).then_some(a.out),
            };
            compare::compare(s, env).await?;
            Ok(())
        }
        BenchCommand::Gateway(a) => {
            let bin = topology::find_quicmesh(a.quicmesh_bin.as_deref())
                .ok_or_else(|| anyhow::anyhow!("no quicmesh binary found (give --quicmesh-bin)"))?;
            let settings = crate::gateway::GatewaySettings {
                workloads: a.workloads,
                connections: a.connections,
                payload: a.payload,
                warmup: a.warmup,
                duration: a.duration,
            };
            crate::gateway::run(
                settings,
                &bin,
                bench_bin(None)?,
                (!a.no_write).then_some(a.out),
            )
            .await?;
            Ok(())
        }
        BenchCommand::Loss(a) => {
            let settings = LossSettings {
                loss_percent: a.loss,
                rate: a.rate,
                connections: a.connections,
                streams: a.streams.max(1),
                duration: a.duration,
                protocol: a.protocol,
                targets: a.targets.clone(),
                haproxy_threads: a.haproxy_threads,
                bulk_duration: a.bulk_duration,
                quic_toml: a.quic_toml.clone(),
                ztunnel_bin: a.ztunnel.clone(),
            };
            let quicmesh_bin = if a.targets.iter().any(|t| {
                matches!(
                    t,
                    Target::Quicmesh | Target::QuicmeshL7 | Target::QuicmeshL7Policy
                )
            }) {
                topology::find_quicmesh(a.quicmesh_bin.as_deref())
            } else {
                None
            };
            let out = (!a.no_write).then_some(a.out);
            match loss::run(settings, quicmesh_bin, bench_bin(a.bench_bin)?, out).await? {
                loss::LossOutcome::Skipped(why) => println!("loss scenario skipped: {why}"),
                loss::LossOutcome::Done(_) => {}
            }
            Ok(())
        }
        BenchCommand::Ingress(a) => {
            let settings = crate::ingress::IngressSettings {
                loss_percent: a.loss,
                connections: a.connections.max(1),
                streams: a.streams.max(1),
                payload: a.payload,
                duration: a.duration,
                haproxy_threads: a.haproxy_threads,
            };
            let quicmesh_bin = topology::find_quicmesh(a.quicmesh_bin.as_deref());
            let out = (!a.no_write).then_some(a.out);
            if let report::Outcome::Skipped(why) =
                crate::ingress::run(settings, quicmesh_bin, bench_bin(a.bench_bin)?, out).await?
            {
                println!("ingress scenario skipped: {why}");
            }
            Ok(())
        }
        BenchCommand::Instructions(a) => {
            let settings = InstructionSettings {
                targets: a.targets.clone(),
                requests: a.requests,
                l7_protocol: a.l7_protocol,
                streams: a.streams,
                connections: a.connections.max(1),
                payload: a.payload,
                bulk_mib: a.bulk_mib,
                keep_dumps: a.keep_dumps,
                quic_toml: a.quic_toml.clone(),
                tracing_percent: a.tracing_percent,
            };
            let quicmesh_bin = topology::find_quicmesh(a.quicmesh_bin.as_deref());
            let out = (!a.no_write).then_some(a.out);
            if let InstructionOutcome::Skipped(why) =
                instructions::run(settings, quicmesh_bin, bench_bin(None)?, out).await?
            {
                println!("instruction count skipped: {why}");
            }
            Ok(())
        }
        BenchCommand::Load(a) => run_load(a).await,
        BenchCommand::H3Load {
            target,
            wire,
            gate_stdin,
            ca,
            host,
            path,
            connections,
            streams,
            payload,
            duration,
        } => {
            let s = crate::h3load::run(crate::h3load::H3Load {
                target,
                wire,
                gate: gate_stdin,
                ca,
                host,
                path,
                connections,
                streams,
                payload,
                duration,
            })
            .await?;
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        BenchCommand::Serve(a) => {
            let stall = a.stall_after.map(|after| StallPlan {
                after,
                pause: a.stall_for,
            });
            let server = AppServer::spawn(a.listen, stall).await?;
            let stats = match a.stats_listen {
                Some(addr) => {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("--stats-listen: cannot bind {addr}: {e}"))?;
                    let bound = l.local_addr()?;
                    let task =
                        tokio::spawn(crate::server::serve_stats(l, server.answered_counter()));
                    Some((bound, task))
                }
                None => None,
            };
            println!(
                "{}",
                serde_json::json!({
                    "event": "ready",
                    "addr": server.addr().to_string(),
                    "stats": stats.as_ref().map(|(a, _)| a.to_string()),
                })
            );
            tokio::select! {
                _ = quicmesh_transport::cli::shutdown_signal() => {}
                _ = tokio::time::sleep(a.max_time) => {}
            }
            if let Some((_, task)) = stats {
                task.abort();
            }
            println!(
                "{}",
                serde_json::json!({"event": "stopped", "requests": server.answered()})
            );
            Ok(())
        }
        BenchCommand::Bulk {
            target,
            bytes,
            duration,
            json,
        } => {
            let b = bulk::tcp_bulk(target, bytes, duration).await?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
                return Ok(());
            }
            println!(
                "one TCP connection to {target}: {:.2} Gbit/s ({} MiB in {:.2} s)",
                b.gbit_s,
                b.bytes >> 20,
                b.secs
            );
            Ok(())
        }
        BenchCommand::QuicCeiling { bytes, duration } => {
            let b = bulk::quic_ceiling(bytes, duration).await?;
            println!(
                "raw QUIC, one stream: {:.2} Gbit/s ({} MiB in {:.2} s)",
                b.gbit_s,
                b.bytes >> 20,
                b.secs
            );
            Ok(())
        }
        BenchCommand::Probe {
            addr,
            timeout,
            http_path,
        } => match http_path {
            Some(path) => topology::probe_http(addr, &path, timeout).await,
            None => topology::probe(addr, timeout).await,
        },
    }
}

async fn run_load(a: LoadArgs) -> anyhow::Result<()> {
    let mode = match a.rate {
        Some(rate) if rate > 0.0 => Mode::Open { rate },
        Some(_) => anyhow::bail!("--rate must be positive"),
        None => Mode::Closed,
    };
    let mut spec = LoadSpec::new(a.protocol, mode, a.connections, a.duration);
    spec.payload = a.payload;
    spec.streams = a.streams.max(1);
    spec.timeout = a.timeout;
    spec.max_requests = a.max_requests;
    let gate = async {
        if a.gate_stdin {
            println!("{}", serde_json::json!({"event": "connected"}));
            let mut line = String::new();
            let _ = tokio::io::BufReader::new(tokio::io::stdin())
                .read_line(&mut line)
                .await;
        }
    };
    let outcome = load::run(&spec, a.target, gate).await?;
    let summary = outcome.summary();
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let mut t = report::Table::new([
            "protocol", "req/s", "p50", "p90", "p99", "p99.9", "max", "errors",
        ]);
        let p = summary.latency_ms;
        t.row([
            a.protocol.name().to_owned(),
            format!("{:.0}", summary.throughput_rps),
            report::ms(p.p50),
            report::ms(p.p90),
            report::ms(p.p99),
            report::ms(p.p999),
            report::ms(p.max),
            format!("{:?}", summary.errors),
        ]);
        println!("{t}");
    }
    if let Some(dir) = a.out {
        let stamp = crate::machine::machine_info().unix_time;
        let value = serde_json::json!({
            "machine": crate::machine::machine_info(),
            "target": a.target.to_string(),
            "summary": summary,
        });
        report::write_json(&dir, &format!("load-{stamp}.json"), &value)?;
        let svg = report::percentile_svg(
            &format!("{} against {}", a.protocol.name(), a.target),
            &[(a.target.to_string(), summary.curve.clone())],
        );
        std::fs::write(dir.join(format!("load-{stamp}.svg")), svg)?;
    }
    Ok(())
}
