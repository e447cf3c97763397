//! The proxy's static configuration file (TOML).
//!
//! Static mode lets a proxy run with no controller: tests, the quick start, and operators who want to try
//! the data plane alone. Unknown keys are errors, not warnings: a typo in `conect_timeout` must not
//! silently leave the default in place. Every error names the file, the key and the problem.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// A configuration problem, located by file and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {problem}", file.display())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// Dotted path of the offending key (`outbound[0].listen`), or `-` for the file as a whole.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key` in `file`.
    pub fn new(file: &Path, key: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self {
            file: file.to_owned(),
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Static mode: the workload identity this proxy presents and the CAs it trusts, as files.
    /// Exactly one of `identity` and `controller` is given.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Controller mode: bootstrap with a join token, renew, and follow the controller's configuration.
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// The QUIC endpoint that accepts tunnels for the local application. Absent: client-only proxy.
    pub inbound: Option<InboundConfig>,
    /// Plain TCP listeners on loopback, each tunnelling to one upstream service.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// Transparent capture: the listener nftables redirects the app's connections to (see
    /// `quicmesh capture install`); each `[[outbound]]` with a `capture` address is reachable there.
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    /// Static mode: a file of mesh resources (`Service`, `Endpoint`, `Policy`, revoked `Identity`) in
    /// the YAML `quicmesh ctl apply` takes: what the controller would otherwise send.
    #[serde(default)]
    pub mesh: Option<PathBuf>,
    /// The admin HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// QUIC transport settings shared by every connection.
    #[serde(default)]
    pub quic: QuicConfig,
    /// Retry budget shared by every outbound listener.
    #[serde(default)]
    pub retry: RetryConfig,
    /// How long open streams may run after SIGTERM before they are reset.
    #[serde(default = "defaults::drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// One JSON line per request and tunneled connection, to stdout or a file (off unless given).
    #[serde(default)]
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    /// HTTP/3 ingress: outside clients call mesh services through this proxy, under its identity.
    #[serde(default)]
    pub ingress: Option<IngressConfig>,
    /// A span per request per hop, exported with OTLP (off unless given).
    #[serde(default)]
    pub tracing: Option<crate::trace::TracingConfig>,
    /// Node gateway mode (`[[workload]]`): the local workloads this proxy serves, each with its own
    /// identity. Empty: a sidecar for one workload, whose identity is `[identity]`'s.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadConfig>,
}

/// One workload of a node gateway (`[[workload]]`): who it is, where its app's connections come
/// from, and what it serves. The gateway's `[identity]` or `[controller]` is the node's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// A name for logs and `/config`, unique on the node.
    pub name: String,
    /// The source IP addresses of the workload's app connections: an outbound or captured
    /// connection from one of them is made under this workload's identity. Unique on the node.
    pub sources: Vec<std::net::IpAddr>,
    /// Static mode: the workload's certificate (PEM chain, leaf first).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Static mode: the workload's private key (PKCS#8 PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Controller mode: the SPIFFE ID the node asks the controller to certify for this workload.
    #[serde(default)]
    pub identity: Option<String>,
    /// Services the workload serves, in its namespace; empty means the one named like its
    /// service account. A stream for another service on a connection made to it gets `NO_ROUTE`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Its service ports and the app addresses behind them.
    pub ports: Vec<PortMapping>,
}

/// The HTTP/3 ingress gateway (`[ingress]`): a UDP listener for outside HTTP/3 clients, with an
/// ordinary TLS certificate (not a SPIFFE one) and routes by host and path prefix to mesh services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// UDP address outside clients connect to.
    pub listen: SocketAddr,
    /// The certificate chain shown to outside clients, PEM (leaf first).
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// Where requests go, by host and path prefix; a request no route matches gets 404.
    #[serde(default)]
    pub routes: Vec<IngressRoute>,
    /// Client connections at once (handshakes included); beyond it new ones are refused.
    #[serde(default = "defaults::ingress_max_connections")]
    pub max_connections: usize,
    /// Concurrent requests (bidirectional streams) one client connection may have open.
    #[serde(default = "defaults::ingress_max_streams")]
    pub max_streams_per_connection: u32,
    /// Largest request header section, bytes (HTTP/3 `SETTINGS_MAX_FIELD_SECTION_SIZE`); larger
    /// heads get 431.
    #[serde(default = "defaults::ingress_max_header_size")]
    pub max_header_size: u64,
    /// A client connection with no traffic for this long is closed.
    #[serde(default = "defaults::ingress_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest time a client may take to complete its handshake, and to send a request's head.
    #[serde(default = "defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed to reach the destination application, retries included.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// One ingress route: requests for `host` whose path starts with `path_prefix` go to `service:port`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    /// The request's host (`:authority` without its port), matched exactly, case-insensitively.
    pub host: String,
    /// Path prefix, matched on whole segments (`/api` matches `/api` and `/api/x`, not `/apix`);
    /// the longest matching prefix of the host's routes wins. Default `/`.
    #[serde(default = "defaults::path_prefix")]
    pub path_prefix: String,
    /// The mesh service (`name`, or `name.namespace`; without a namespace, the proxy's own).
    pub service: String,
    /// The service's port; it must be an HTTP or gRPC port of the destination.
    pub port: u16,
}

/// Certificate, key and trust bundle, as PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Leaf certificate (and intermediates), PEM.
    pub cert: PathBuf,
    /// The leaf's private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// The CA certificates this proxy trusts, PEM.
    pub trust_bundle: PathBuf,
    /// Trust domain every peer must belong to; defaults to the one in our own certificate.
    #[serde(default)]
    pub trust_domain: Option<String>,
}

/// Controller mode: where the controller is and how to join the mesh.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The controller's gRPC address, `host:port` (the host is verified against its certificate).
    /// Give this, `addresses`, or both (the lists are joined).
    #[serde(default)]
    pub address: Option<String>,
    /// Several controllers of one mesh: the proxy starts at a random one and fails over to the next
    /// when it loses it.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// CA certificates (PEM) that verify the controller at bootstrap, e.g. its `trust-bundle.pem`.
    pub trust_bundle: PathBuf,
    /// Join token for the first certificate (or use `join_token_file`).
    #[serde(default)]
    pub join_token: Option<String>,
    /// File holding the join token (kept out of the configuration file).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Kubernetes: the projected service-account token file (audience: the controller's
    /// `--k8s-audience`), used instead of a join token and read again for every bootstrap, since the
    /// kubelet rotates it. The controller issues the identity of the token's namespace and account.
    #[serde(default)]
    pub service_account_token_file: Option<PathBuf>,
    /// The SPIFFE ID asked for, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`; the token must grant it.
    pub identity: String,
    /// Share of a certificate's lifetime after which it is renewed (jittered by ±0.1).
    #[serde(default = "defaults::renew_fraction")]
    pub renew_fraction: f64,
    /// Name shown by `quicmesh ctl proxies`; defaults to the identity's service account.
    #[serde(default)]
    pub proxy_name: Option<String>,
    /// Address registered for the inbound endpoint; defaults to the bound one (loopback if unspecified).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// How often the proxy sends the controller a traffic summary (`quicmesh ctl stat`); `0s` turns
    /// the reports off. At least 100 ms.
    #[serde(default = "defaults::report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
}

impl ControllerConfig {
    /// Every configured controller address, `addresses` then `address`, without repeats.
    pub fn all_addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for a in self.addresses.iter().chain(self.address.as_ref()) {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        all
    }
}

/// The inbound QUIC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Shorthand for one port: the local application, serving the service port equal to its own port.
    /// Give either `app` or `ports`.
    #[serde(default)]
    pub app: Option<SocketAddr>,
    /// Every service port this proxy serves and the local application address behind it. A stream for
    /// a port not listed gets `NO_ROUTE`.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Service names this proxy serves; empty accepts any. Streams for others get `NO_ROUTE`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Version label of the workload behind this proxy (controller mode registers its endpoint with
    /// it), the unit of traffic splits; empty for none.
    #[serde(default)]
    pub version: String,
    /// Longest time to connect to the application when the stream header asks for no shorter one.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest time a peer may take to send a stream header.
    #[serde(default = "defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// What peers may cost this endpoint before and after they authenticate (`[inbound.limits]`).
    #[serde(default)]
    pub limits: InboundLimits,
}

/// Bounds on the state peers can make the inbound endpoint hold. A handshake in progress costs a few
/// kilobytes and a stream waiting for its header a few more; these caps keep both bounded whatever an
/// unauthenticated (or authenticated but hostile) peer sends. See ARCHITECTURE.md, "Memory bounds".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundLimits {
    /// Handshakes in progress from which a new client must first prove its address (QUIC Retry): a
    /// flood of Initials from spoofed or silent sources then creates no state at all.
    #[serde(default = "defaults::retry_above")]
    pub retry_above: usize,
    /// Handshakes in progress from which new ones are turned away (refused if the address is proven,
    /// ignored otherwise).
    #[serde(default = "defaults::max_handshakes")]
    pub max_handshakes: usize,
    /// Longest time a client may take to complete its handshake.
    #[serde(
        default = "defaults::inbound_handshake_timeout",
        with = "humantime_serde"
    )]
    pub handshake_timeout: Duration,
    /// Streams waiting for their header at once, over all connections; beyond it a new stream is reset.
    #[serde(default = "defaults::max_header_waits")]
    pub max_header_waits: usize,
    /// Streams of one connection waiting for their header at once; beyond it that connection's next
    /// streams wait, unaccepted, under its QUIC stream limit.
    #[serde(default = "defaults::max_header_waits_per_connection")]
    pub max_header_waits_per_connection: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self {
            retry_above: defaults::retry_above(),
            max_handshakes: defaults::max_handshakes(),
            handshake_timeout: defaults::inbound_handshake_timeout(),
            max_header_waits: defaults::max_header_waits(),
            max_header_waits_per_connection: defaults::max_header_waits_per_connection(),
        }
    }
}

/// One served port of the inbound side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// The service port callers ask for (the stream header's port).
    pub port: u16,
    /// The local application address behind it.
    pub app: SocketAddr,
}

impl InboundConfig {
    /// The application address serving service port `port`, if this proxy serves it.
    pub fn app_for(&self, port: u32) -> Option<SocketAddr> {
        match self.app {
            Some(app) if u32::from(app.port()) == port => Some(app),
            _ => self
                .ports
                .iter()
                .find(|m| u32::from(m.port) == port)
                .map(|m| m.app),
        }
    }

    /// Every served `(port, app)` pair.
    pub fn served(&self) -> Vec<PortMapping> {
        let mut v: Vec<PortMapping> = self
            .app
            .map(|app| PortMapping {
                port: app.port(),
                app,
            })
            .into_iter()
            .chain(self.ports.iter().copied())
            .collect();
        v.sort_by_key(|m| m.port);
        v
    }
}

/// The capture listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// TCP address nftables redirects to (loopback: locally originated connections are redirected to
    /// 127.0.0.1 and this port).
    pub listen: SocketAddr,
    /// The proxy writes its nftables rules itself when it starts (replacing stale ones) and removes
    /// them when it exits, instead of `quicmesh capture install` / `remove` (needs root / CAP_NET_ADMIN).
    #[serde(default)]
    pub install: bool,
    /// With `install`: the user whose connections are never redirected (the proxy's own).
    #[serde(default)]
    pub exempt_uid: Option<u32>,
}

/// One outbound listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// TCP address the application connects to (loopback).
    pub listen: SocketAddr,
    /// Destination service name, sent in the stream header.
    pub service: String,
    /// Destination service port, sent in the stream header.
    pub port: u16,
    /// Inbound QUIC addresses of the proxies serving the service. In controller mode they may be
    /// left out: the controller's endpoints for `service` replace them on every snapshot.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Time allowed to reach the destination application, retries included.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one QUIC handshake before the next endpoint is tried.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Total lifetime of a tunneled connection; absent means none.
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// Attempts per tunneled connection, the first included.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Static mode: the identities allowed to serve the service (SPIFFE IDs, or service account names
    /// in the service's namespace). Empty means the account named like the service, in its namespace
    /// (the namespace after a `.` in `service`, else ours). In controller mode the Service resource says.
    #[serde(default)]
    pub server_identities: Vec<String>,
    /// Transparent capture: the service's real address (e.g. its cluster IP and port). Connections the
    /// app makes to it are redirected to the `[capture]` listener and tunneled like this listener's.
    #[serde(default)]
    pub capture: Option<SocketAddr>,
}

/// The admin HTTP endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address; keep it on loopback.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
        }
    }
}

/// QUIC transport settings. The defaults are sized for a mesh tunnel: thousands of concurrent streams on
/// one connection and windows large enough for multi-gigabit loopback.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// Concurrent bidirectional streams a peer may open on one connection.
    #[serde(default = "defaults::max_streams")]
    pub max_concurrent_streams: u32,
    /// Per-stream receive window, bytes.
    #[serde(default = "defaults::stream_window")]
    pub stream_window: u32,
    /// Per-connection receive and send window, bytes.
    #[serde(default = "defaults::connection_window")]
    pub connection_window: u32,
    /// UDP socket send and receive buffer, bytes (capped by net.core.[rw]mem_max).
    #[serde(default = "defaults::udp_buffer")]
    pub udp_buffer: usize,
    /// Idle time after which a connection is closed.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Keep-alive interval; keeps pooled connections and NAT bindings alive.
    #[serde(default = "defaults::keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest time the peer may hold back an acknowledgement (QUIC ACK frequency extension). Loss
    /// recovery waits on acknowledgements, so on low-RTT paths quinn's 25 ms default sets the tail under
    /// loss; 1 ms keeps recovery close to the path RTT.
    #[serde(default = "defaults::max_ack_delay", with = "humantime_serde")]
    pub max_ack_delay: Duration,
    /// Congestion controller: `cubic` (default), `bbr` (quinn marks it experimental) or `newreno`.
    #[serde(default)]
    pub congestion_controller: CongestionController,
    /// Share of bytes lost over the last two RTTs from which a loss is congestion even on a path with
    /// no queueing delay; below it, and with no queue, a loss is retransmitted and the window kept.
    /// 0 makes every loss congestion (RFC 9002). See `quic::loss`.
    #[serde(default = "defaults::loss_threshold")]
    pub loss_threshold: f64,
    /// Largest UDP payload, bytes (1200-65527): the most this endpoint accepts and the upper bound of
    /// path MTU discovery, which starts at 1200 and settles below the path's MTU (1472 on Ethernet).
    /// On loopback 5888 cut the instructions per tunneled MiB by 43% against 1472; larger sizes cost
    /// more again (bench/README.md).
    #[serde(default = "defaults::max_udp_payload")]
    pub max_udp_payload: u16,
    /// Smoothed RTT above the path's minimum from which every loss is congestion.
    #[serde(default = "defaults::queue_delay", with = "humantime_serde")]
    pub queue_delay: Duration,
}

/// QUIC congestion controllers quinn offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionController {
    /// RFC 9438 CUBIC.
    #[default]
    Cubic,
    /// BBR (quinn's implementation is experimental).
    Bbr,
    /// RFC 9002 NewReno.
    NewReno,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: defaults::max_streams(),
            stream_window: defaults::stream_window(),
            connection_window: defaults::connection_window(),
            udp_buffer: defaults::udp_buffer(),
            idle_timeout: defaults::idle_timeout(),
            keep_alive: defaults::keep_alive(),
            max_ack_delay: defaults::max_ack_delay(),
            congestion_controller: CongestionController::default(),
            loss_threshold: defaults::loss_threshold(),
            max_udp_payload: defaults::max_udp_payload(),
            queue_delay: defaults::queue_delay(),
        }
    }
}

/// Retry budget: retries may add at most `ratio` of the tunneled connections, plus `min_per_second`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Share of new tunneled connections that may be retried.
    #[serde(default = "defaults::retry_ratio")]
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default = "defaults::retry_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            ratio: defaults::retry_ratio(),
            min_per_second: defaults::retry_min_per_second(),
        }
    }
}

mod defaults {
    use std::{net::SocketAddr, time::Duration};

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn drain_grace() -> Duration {
        Duration::from_secs(10)
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15000))
    }
    pub fn max_streams() -> u32 {
        8192
    }
    pub fn stream_window() -> u32 {
        2 << 20
    }
    pub fn connection_window() -> u32 {
        32 << 20
    }
    pub fn udp_buffer() -> usize {
        4 << 20
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn keep_alive() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_ack_delay() -> Duration {
        Duration::from_millis(1)
    }
    pub fn loss_threshold() -> f64 {
        0.1
    }
    pub fn max_udp_payload() -> u16 {
        5888
    }
    pub fn queue_delay() -> Duration {
        Duration::from_millis(2)
    }
    pub fn report_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn renew_fraction() -> f64 {
        0.6
    }
    pub fn retry_ratio() -> f64 {
        0.2
    }
    pub fn retry_min_per_second() -> u32 {
        10
    }
    pub fn retry_above() -> usize {
        32
    }
    pub fn max_handshakes() -> usize {
        256
    }
    pub fn inbound_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_header_waits() -> usize {
        4096
    }
    pub fn max_header_waits_per_connection() -> usize {
        256
    }
    pub fn ingress_max_connections() -> usize {
        1024
    }
    pub fn ingress_max_streams() -> u32 {
        100
    }
    pub fn ingress_max_header_size() -> u64 {
        64 << 10
    }
    pub fn ingress_idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn path_prefix() -> String {
        "/".into()
    }
}

impl ProxyConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "-", format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses and checks configuration text; `path` is used in messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: ProxyConfig = toml::from_str(text).map_err(|e| {
            let key = toml_error_key(&e, text);
            ConfigError::new(path, key, e.message())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths: Vec<&mut PathBuf> = Vec::new();
        if let Some(i) = &mut cfg.identity {
            paths.extend([&mut i.cert, &mut i.key, &mut i.trust_bundle]);
        }
        paths.extend(cfg.mesh.as_mut());
        if let Some(c) = &mut cfg.controller {
            paths.push(&mut c.trust_bundle);
            paths.extend(c.join_token_file.as_mut());
            paths.extend(c.service_account_token_file.as_mut());
        }
        if let Some(i) = &mut cfg.ingress {
            paths.extend([&mut i.cert, &mut i.key]);
        }
        for w in &mut cfg.workloads {
            paths.extend(w.cert.as_mut());
            paths.extend(w.key.as_mut());
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(a) = &mut cfg.access_log
            && a.path != "-"
            && !a.path.is_empty()
            && Path::new(&a.path).is_relative()
        {
            a.path = base.join(&a.path).to_string_lossy().into_owned();
        }
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        match (&self.identity, &self.controller) {
            (None, None) => {
                return Err(ConfigError::new(
                    path,
                    "identity",
                    "missing: give [identity] (static certificate files) or [controller]",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    path,
                    "controller",
                    "give either [identity] or [controller], not both",
                ));
            }
            _ => {}
        }
        if self.controller.is_some() && self.mesh.is_some() {
            return Err(ConfigError::new(
                path,
                "mesh",
                "static mode only: in controller mode the controller sends the mesh",
            ));
        }
        if let Some(a) = &self.access_log {
            a.check()
                .map_err(|(k, m)| ConfigError::new(path, format!("access_log.{k}"), m))?;
        }
        if let Some(t) = &self.tracing {
            t.check()
                .map_err(|(k, m)| ConfigError::new(path, format!("tracing.{k}"), m))?;
        }
        let mut captured = std::collections::HashSet::new();
        for (i, o) in self.outbound.iter().enumerate() {
            if let Some(a) = o.capture {
                if self.capture.is_none() {
                    return Err(ConfigError::new(
                        path,
                        format!("outbound[{i}].capture"),
                        "needs a [capture] listener",
                    ));
                }
                if !captured.insert(a) {
                    return Err(ConfigError::new(
                        path,
                        format!("outbound[{i}].capture"),
                        format!("{a} is captured by an earlier outbound listener too"),
                    ));
                }
            }
        }
        if self.capture.as_ref().is_some_and(|c| c.install) && captured.is_empty() {
            return Err(ConfigError::new(
                path,
                "capture.install",
                "no [[outbound]] table has a capture address to redirect",
            ));
        }
        if self
            .capture
            .as_ref()
            .is_some_and(|c| c.exempt_uid.is_some() && !c.install)
        {
            return Err(ConfigError::new(
                path,
                "capture.exempt_uid",
                "only with install = true (`quicmesh capture install --exempt-uid` otherwise)",
            ));
        }
        if let Some(c) = &self.controller {
            let given = [
                c.join_token.is_some(),
                c.join_token_file.is_some(),
                c.service_account_token_file.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ConfigError::new(
                    path,
                    "controller.join_token",
                    "give exactly one of join_token, join_token_file and service_account_token_file",
                ));
            }
            if !c.report_interval.is_zero() && c.report_interval < Duration::from_millis(100) {
                return Err(ConfigError::new(
                    path,
                    "controller.report_interval",
                    format!(
                        "must be 0s (off) or at least 100ms, got {:?}",
                        c.report_interval
                    ),
                ));
            }
            if !(0.1..=0.9).contains(&c.renew_fraction) {
                return Err(ConfigError::new(
                    path,
                    "controller.renew_fraction",
                    format!("must be between 0.1 and 0.9, got {}", c.renew_fraction),
                ));
            }
            if c.address.is_none() && c.addresses.is_empty() {
                return Err(ConfigError::new(
                    path,
                    "controller.address",
                    "missing: give address or addresses",
                ));
            }
            if let Some(a) = c.address.as_ref().filter(|a| !a.contains(':')) {
                return Err(ConfigError::new(
                    path,
                    "controller.address",
                    format!("{a:?} is not host:port"),
                ));
            }
            if let Some((i, a)) = c
                .addresses
                .iter()
                .enumerate()
                .find(|(_, a)| !a.contains(':'))
            {
                return Err(ConfigError::new(
                    path,
                    format!("controller.addresses[{i}]"),
                    format!("{a:?} is not host:port"),
                ));
            }
        }
        self.check_workloads(path)?;
        if let Some(i) = self.inbound.as_ref().filter(|_| self.workloads.is_empty()) {
            match (i.app, i.ports.is_empty()) {
                (Some(_), false) => {
                    return Err(ConfigError::new(
                        path,
                        "inbound.ports",
                        "give either app (one port) or ports, not both",
                    ));
                }
                (None, true) => {
                    return Err(ConfigError::new(
                        path,
                        "inbound.app",
                        "missing: give app (the local application) or ports",
                    ));
                }
                _ => {}
            }
            let mut seen = std::collections::HashSet::new();
            for (j, m) in i.ports.iter().enumerate() {
                if m.port == 0 {
                    return Err(ConfigError::new(
                        path,
                        format!("inbound.ports[{j}].port"),
                        "must be 1..=65535",
                    ));
                }
                if !seen.insert(m.port) {
                    return Err(ConfigError::new(
                        path,
                        format!("inbound.ports[{j}].port"),
                        format!("port {} is listed twice", m.port),
                    ));
                }
            }
        }
        for (i, o) in self.outbound.iter().enumerate() {
            let key = |k: &str| format!("outbound[{i}].{k}");
            if self.controller.is_some() && !o.server_identities.is_empty() {
                return Err(ConfigError::new(
                    path,
                    key("server_identities"),
                    "static mode only: in controller mode the Service's identities decide",
                ));
            }
            if o.port == 0 {
                return Err(ConfigError::new(path, key("port"), "must be 1..=65535"));
            }
            if o.service.is_empty() {
                return Err(ConfigError::new(path, key("service"), "must not be empty"));
            }
            if o.endpoints.is_empty() && self.controller.is_none() && self.mesh.is_none() {
                return Err(ConfigError::new(
                    path,
                    key("endpoints"),
                    "needs at least one address (or a mesh file with the service's endpoints)",
                ));
            }
            if o.max_attempts == 0 {
                return Err(ConfigError::new(
                    path,
                    key("max_attempts"),
                    "must be at least 1",
                ));
            }
            if o.connect_timeout.is_zero() {
                return Err(ConfigError::new(
                    path,
                    key("connect_timeout"),
                    "must be positive",
                ));
            }
            if o.deadline.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::new(path, key("deadline"), "must be positive"));
            }
        }
        if let Some(i) = &self.ingress {
            if self.controller.is_none() && self.mesh.is_none() {
                return Err(ConfigError::new(
                    path,
                    "ingress.routes",
                    "static mode: give a mesh file declaring the routes' services and endpoints",
                ));
            }
            i.check()
                .map_err(|(k, m)| ConfigError::new(path, format!("ingress.{k}"), m))?;
        }
        if !(0.0..=10.0).contains(&self.retry.ratio) {
            return Err(ConfigError::new(
                path,
                "retry.ratio",
                "must be between 0 and 10",
            ));
        }
        if let Some(i) = &self.inbound {
            let l = &i.limits;
            let positive = [
                ("max_handshakes", l.max_handshakes),
                ("max_header_waits", l.max_header_waits),
                (
                    "max_header_waits_per_connection",
                    l.max_header_waits_per_connection,
                ),
            ];
            for (k, v) in positive {
                if v == 0 {
                    return Err(ConfigError::new(
                        path,
                        format!("inbound.limits.{k}"),
                        "must be at least 1",
                    ));
                }
            }
            if l.handshake_timeout.is_zero() {
                return Err(ConfigError::new(
                    path,
                    "inbound.limits.handshake_timeout",
                    "must be positive",
                ));
            }
        }
        if self.quic.max_concurrent_streams == 0 {
            return Err(ConfigError::new(
                path,
                "quic.max_concurrent_streams",
                "must be positive",
            ));
        }
        if !(1200..=65_527).contains(&self.quic.max_udp_payload) {
            return Err(ConfigError::new(
                path,
                "quic.max_udp_payload",
                "must be 1200-65527 (bytes of UDP payload)",
            ));
        }
        if !(0.0..1.0).contains(&self.quic.loss_threshold) {
            return Err(ConfigError::new(
                path,
                "quic.loss_threshold",
                "must be a share in [0, 1), e.g. 0.1 for 10%",
            ));
        }
        Ok(())
    }

    /// Node gateway mode's rules: each workload complete and distinct, and the parts of a sidecar
    /// configuration that name one workload left to the workloads.
    fn check_workloads(&self, path: &Path) -> Result<(), ConfigError> {
        if self.workloads.is_empty() {
            return Ok(());
        }
        let err = |k: String, m: &dyn fmt::Display| Err(ConfigError::new(path, k, m));
        if let Some(i) = &self.inbound
            && (i.app.is_some() || !i.ports.is_empty() || !i.services.is_empty())
        {
            return err(
                "inbound.ports".into(),
                &"a node gateway's [inbound] gives the listener and limits; each [[workload]] gives its services and ports",
            );
        }
        if self.ingress.is_some() {
            return err(
                "ingress".into(),
                &"not available in node gateway mode (run the ingress as its own proxy)",
            );
        }
        if let Some((i, o)) = self
            .outbound
            .iter()
            .enumerate()
            .find(|(_, o)| !o.service.contains('.'))
        {
            return err(
                format!("outbound[{i}].service"),
                &format!(
                    "{:?}: a node gateway's workloads may live in different namespaces, so name the namespace (name.namespace)",
                    o.service
                ),
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut sources = std::collections::HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let key = |k: &str| format!("workload[{i}].{k}");
            if w.name.is_empty() || !names.insert(w.name.as_str()) {
                return err(key("name"), &format!("{:?}: empty or used twice", w.name));
            }
            if w.sources.is_empty() {
                return err(
                    key("sources"),
                    &"missing: the addresses the workload's app connects from",
                );
            }
            for a in &w.sources {
                if !sources.insert(a.to_canonical()) {
                    return err(
                        key("sources"),
                        &format!("{a} is a source of an earlier workload too"),
                    );
                }
            }
            if w.ports.is_empty() {
                return err(
                    key("ports"),
                    &"missing: the service ports the workload serves",
                );
            }
            let mut seen = std::collections::HashSet::new();
            for (j, m) in w.ports.iter().enumerate() {
                if m.port == 0 || !seen.insert(m.port) {
                    return err(
                        format!("workload[{i}].ports[{j}].port"),
                        &format!("{}: must be 1..=65535 and listed once", m.port),
                    );
                }
            }
            match (&self.controller, &w.cert, &w.key, &w.identity) {
                (None, Some(_), Some(_), None) => {}
                (None, _, _, Some(_)) => {
                    return err(
                        key("identity"),
                        &"controller mode only: in static mode the certificate names the workload",
                    );
                }
                (None, None, _, _) => {
                    return err(
                        key("cert"),
                        &"missing: static mode needs the workload's certificate",
                    );
                }
                (None, _, None, _) => {
                    return err(key("key"), &"missing: static mode needs the workload's key");
                }
                (Some(_), None, None, Some(id)) => {
                    if let Err(e) = id.parse::<crate::identity::SpiffeId>() {
                        return err(key("identity"), &format!("{id:?}: {e}"));
                    }
                }
                (Some(_), None, None, None) => {
                    return err(
                        key("identity"),
                        &"missing: the SPIFFE ID to ask the controller for",
                    );
                }
                (Some(_), _, _, _) => {
                    return err(
                        key("cert"),
                        &"static mode only: in controller mode the node obtains the workload's certificate",
                    );
                }
            }
        }
        Ok(())
    }
}

impl IngressConfig {
    /// The mesh side of `route`: what an outbound listener for its service and port would be.
    pub fn target(&self, route: &IngressRoute) -> OutboundConfig {
        OutboundConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            service: route.service.clone(),
            port: route.port,
            endpoints: Vec::new(),
            connect_timeout: self.connect_timeout,
            handshake_timeout: defaults::handshake_timeout(),
            deadline: None,
            max_attempts: defaults::max_attempts(),
            server_identities: Vec::new(),
            capture: None,
        }
    }

    /// The problems of the table, as (key below `ingress`, problem).
    fn check(&self) -> Result<(), (String, String)> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            (
                "max_streams_per_connection",
                u64::from(self.max_streams_per_connection),
            ),
            ("max_header_size", self.max_header_size),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err((k.into(), "must be at least 1".into()));
            }
        }
        for (k, d) in [
            ("idle_timeout", self.idle_timeout),
            ("header_timeout", self.header_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err((k.into(), "must be positive".into()));
            }
        }
        if self.routes.is_empty() {
            return Err((
                "routes".into(),
                "give at least one [[ingress.routes]]".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            // A port would never match (routing ignores it); an IPv6 literal keeps its brackets.
            let v6 = r.host.starts_with('[') && r.host.ends_with(']');
            if r.host.is_empty()
                || r.host.contains(['/', ' '])
                || (r.host.contains(':') && !v6)
                || r.host.parse::<http::uri::Authority>().is_err()
            {
                return Err((
                    key("host"),
                    format!("{:?} is not a host name (no port, no path)", r.host),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err((
                    key("path_prefix"),
                    format!("{:?} must start with /", r.path_prefix),
                ));
            }
            if r.service.is_empty() {
                return Err((key("service"), "must not be empty".into()));
            }
            if r.port == 0 {
                return Err((key("port"), "must be 1..=65535".into()));
            }
            let host = r.host.to_ascii_lowercase();
            let prefix = r.path_prefix.trim_end_matches('/').to_owned();
            if !seen.insert((host, prefix)) {
                return Err((
                    key("path_prefix"),
                    format!(
                        "host {:?} has an earlier route with the prefix {:?}",
                        r.host, r.path_prefix
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Best effort at the dotted key a toml error is about: the key on the line the error points at.
fn toml_error_key(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return "-".into();
    };
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let mut table = String::new();
    for line in text[..line_start].lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (_, true) if !table.is_empty() => table,
        (_, true) => "-".into(),
        (true, false) => key.to_owned(),
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[identity]
cert = "a.pem"
key = "a.key"
trust_bundle = "ca.pem"

[[outbound]]
listen = "127.0.0.1:9000"
service = "echo"
port = 7
endpoints = ["127.0.0.1:4433"]
connect_timeout = "2s"
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let cfg = ProxyConfig::parse(Path::new("/etc/qm/p.toml"), BASE).expect("valid");
        let identity = cfg.identity.as_ref().expect("static identity");
        assert_eq!(identity.cert, PathBuf::from("/etc/qm/a.pem"));
        assert_eq!(cfg.outbound[0].connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.outbound[0].max_attempts, 3);
        assert!(cfg.inbound.is_none());
    }

    #[test]
    fn the_access_log_is_off_unless_given_and_its_settings_are_checked() {
        let cfg = ProxyConfig::parse(Path::new("/etc/qm/p.toml"), BASE).expect("valid");
        assert!(cfg.access_log.is_none());
        let with = |body: &str| {
            ProxyConfig::parse(
                Path::new("/etc/qm/p.toml"),
                &format!("[access_log]\n{body}\n{BASE}"),
            )
        };
        let file = with("path = \"access.log\"").expect("a file");
        let a = file.access_log.as_ref().expect("on");
        assert_eq!((a.path.as_str(), a.queue), ("/etc/qm/access.log", 4096));
        assert_eq!(
            with("path = \"-\"")
                .expect("stdout")
                .access_log
                .map(|a| a.path),
            Some("-".to_owned())
        );
        for (body, key) in [
            ("path = \"\"", "access_log.path"),
            ("path = \"-\"\nqueue = 0", "access_log.queue"),
            ("path = \"-\"\nformat = \"text\"", "access_log.format"),
        ] {
            let err = with(body).expect_err(body);
            assert_eq!(err.key, key, "{body}: {err}");
        }
        let err = with("queue = 10").expect_err("no path");
        assert!(err.problem.contains("missing field `path`"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = BASE.replace("connect_timeout = \"2s\"", "conect_timeout = \"2s\"");
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("typo");
        assert_eq!(err.key, "outbound.conect_timeout");
        assert!(
            err.problem.contains("unknown field `conect_timeout`"),
            "{err}"
        );
        assert!(err.to_string().starts_with("p.toml: "), "{err}");
    }

    #[test]
    fn inbound_ports_are_app_or_a_list_without_repeats() {
        let inbound = |body: &str| {
            let text = format!("{BASE}\n[inbound]\nlisten = \"127.0.0.1:0\"\n{body}\n");
            ProxyConfig::parse(Path::new("p.toml"), &text)
        };
        let one = inbound("app = \"127.0.0.1:8080\"").expect("app shorthand");
        assert_eq!(
            one.inbound.as_ref().and_then(|i| i.app_for(8080)),
            "127.0.0.1:8080".parse().ok()
        );
        for (body, key) in [
            ("", "inbound.app"),
            (
                "app = \"127.0.0.1:1\"\nports = [{ port = 2, app = \"127.0.0.1:2\" }]",
                "inbound.ports",
            ),
            (
                "ports = [{ port = 2, app = \"127.0.0.1:2\" }, { port = 2, app = \"127.0.0.1:3\" }]",
                "inbound.ports[1].port",
            ),
            (
                "ports = [{ port = 0, app = \"127.0.0.1:2\" }]",
                "inbound.ports[0].port",
            ),
        ] {
            let err = inbound(body).expect_err(body);
            assert_eq!(err.key, key, "{body}: {err}");
        }
    }

    #[test]
    fn server_identities_are_for_static_mode() {
        let text = CONTROLLER.replace("port = 7", "port = 7\nserver_identities = [\"web\"]");
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("controller mode");
        assert_eq!(err.key, "outbound[0].server_identities");
    }

    #[test]
    fn bad_values_are_named() {
        let text = BASE.replace("endpoints = [\"127.0.0.1:4433\"]", "endpoints = []");
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("empty");
        assert_eq!(err.key, "outbound[0].endpoints");
        let text = BASE.replace("127.0.0.1:9000", "not-an-address");
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("addr");
        assert_eq!(err.key, "outbound.listen");
        let text = format!("{BASE}\n[quic]\nloss_threshold = 1.5\n");
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("share");
        assert_eq!(err.key, "quic.loss_threshold");
    }

    const CONTROLLER: &str = r#"
[controller]
address = "127.0.0.1:7443"
trust_bundle = "bundle.pem"
join_token = "qmj_x"
identity = "spiffe://mesh.local/ns/default/sa/a"

[[outbound]]
listen = "127.0.0.1:9000"
service = "echo"
port = 7
"#;

    #[test]
    fn controller_mode_needs_no_static_endpoints() {
        let cfg = ProxyConfig::parse(Path::new("/etc/qm/p.toml"), CONTROLLER).expect("valid");
        let c = cfg.controller.as_ref().expect("controller");
        assert_eq!(c.trust_bundle, PathBuf::from("/etc/qm/bundle.pem"));
        assert!((c.renew_fraction - 0.6).abs() < 1e-9);
        assert!(cfg.identity.is_none() && cfg.outbound[0].endpoints.is_empty());
        assert_eq!(c.all_addresses(), ["127.0.0.1:7443"]);
    }

    #[test]
    fn controller_addresses_are_a_list_or_one() {
        let list = CONTROLLER.replace(
            "address = \"127.0.0.1:7443\"",
            "addresses = [\"127.0.0.1:1\", \"127.0.0.1:2\"]",
        );
        let cfg = ProxyConfig::parse(Path::new("p.toml"), &list).expect("list");
        let c = cfg.controller.as_ref().expect("controller");
        assert_eq!(c.all_addresses(), ["127.0.0.1:1", "127.0.0.1:2"]);
        let both = CONTROLLER.replace(
            "address = \"127.0.0.1:7443\"",
            "address = \"127.0.0.1:2\"\naddresses = [\"127.0.0.1:1\", \"127.0.0.1:2\"]",
        );
        let cfg = ProxyConfig::parse(Path::new("p.toml"), &both).expect("both");
        let c = cfg.controller.as_ref().expect("controller");
        assert_eq!(c.all_addresses(), ["127.0.0.1:1", "127.0.0.1:2"]);
        let none = CONTROLLER.replace("address = \"127.0.0.1:7443\"\n", "");
        let err = ProxyConfig::parse(Path::new("p.toml"), &none).expect_err("none");
        assert_eq!(err.key, "controller.address");
        let bad = CONTROLLER.replace(
            "address = \"127.0.0.1:7443\"",
            "addresses = [\"127.0.0.1:1\", \"nowhere\"]",
        );
        let err = ProxyConfig::parse(Path::new("p.toml"), &bad).expect_err("bad");
        assert_eq!(err.key, "controller.addresses[1]");
    }

    #[test]
    fn identity_source_must_be_exactly_one() {
        let none = CONTROLLER.replace("[controller]", "[other]");
        let err = ProxyConfig::parse(Path::new("p.toml"), &none).expect_err("unknown table");
        assert!(err.problem.contains("unknown field `other`"), "{err}");
        let mut only_outbound = CONTROLLER.to_owned();
        only_outbound.replace_range(..CONTROLLER.find("[[outbound]]").unwrap_or(0), "");
        let err = ProxyConfig::parse(Path::new("p.toml"), &only_outbound).expect_err("none");
        assert_eq!(err.key, "identity");
        let both = format!(
            "{BASE}{}",
            &CONTROLLER[..CONTROLLER.find("[[outbound]]").unwrap_or(0)]
        );
        let err = ProxyConfig::parse(Path::new("p.toml"), &both).expect_err("both");
        assert_eq!(err.key, "controller");
        let two_tokens = CONTROLLER.replace(
            "join_token = \"qmj_x\"",
            "join_token = \"qmj_x\"\njoin_token_file = \"t\"",
        );
        let err = ProxyConfig::parse(Path::new("p.toml"), &two_tokens).expect_err("two");
        assert_eq!(err.key, "controller.join_token");
        let sa = CONTROLLER.replace(
            "join_token = \"qmj_x\"",
            "service_account_token_file = \"token\"",
        );
        let cfg = ProxyConfig::parse(Path::new("/etc/qm/p.toml"), &sa).expect("k8s token");
        let c = cfg.controller.as_ref().expect("controller");
        assert_eq!(
            c.service_account_token_file.as_deref(),
            Some(Path::new("/etc/qm/token"))
        );
        let join_and_sa = CONTROLLER.replace(
            "join_token = \"qmj_x\"",
            "join_token = \"qmj_x\"\nservice_account_token_file = \"t\"",
        );
        let err = ProxyConfig::parse(Path::new("p.toml"), &join_and_sa).expect_err("two");
        assert_eq!(err.key, "controller.join_token");
    }

    #[test]
    fn capture_addresses_need_the_listener_and_are_unique() {
        let with = |top: &str, captures: &[&str]| {
            let mut text = format!(
                "{top}\n{}",
                &CONTROLLER[..CONTROLLER.find("[[outbound]]").unwrap_or(0)]
            );
            for (i, c) in captures.iter().enumerate() {
                text.push_str(&format!(
                    "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"s{i}\"\nport = 80\ncapture = \"{c}\"\n"
                ));
            }
            ProxyConfig::parse(Path::new("p.toml"), &text)
        };
        let listener = "[capture]\nlisten = \"127.0.0.1:15001\"";
        let cfg = with(listener, &["10.96.0.10:80", "10.96.0.11:80"]).expect("valid");
        assert_eq!(
            cfg.outbound[1].capture,
            Some("10.96.0.11:80".parse().expect("addr"))
        );
        let err = with("", &["10.96.0.10:80"]).expect_err("no listener");
        assert_eq!(err.key, "outbound[0].capture");
        let err = with(listener, &["10.96.0.10:80", "10.96.0.10:80"]).expect_err("twice");
        assert_eq!(err.key, "outbound[1].capture");
    }

    #[test]
    fn ingress_tables_are_checked_key_by_key() {
        let with = |body: &str| {
            let text = format!(
                "mesh = \"mesh.yaml\"\n{}\n[ingress]\nlisten = \"127.0.0.1:0\"\ncert = \"i.pem\"\nkey = \"i.key\"\n{body}",
                &BASE[..BASE.find("[[outbound]]").unwrap_or(0)]
            );
            ProxyConfig::parse(Path::new("/etc/qm/p.toml"), &text)
        };
        let route = "[[ingress.routes]]\nhost = \"shop.example\"\nservice = \"web\"\nport = 80\n";
        let cfg = with(route).expect("valid");
        let i = cfg.ingress.as_ref().expect("ingress");
        assert_eq!(i.cert, PathBuf::from("/etc/qm/i.pem"));
        assert_eq!(i.routes[0].path_prefix, "/");
        assert_eq!(
            (i.max_connections, i.max_streams_per_connection),
            (1024, 100)
        );
        let target = i.target(&i.routes[0]);
        assert_eq!((target.service.as_str(), target.port), ("web", 80));
        for (body, key) in [
            ("", "ingress.routes"),
            (
                &*route.replace("shop.example", "shop.example:443"),
                "ingress.routes[0].host",
            ),
            (
                &*route.replace("shop.example", "a/b"),
                "ingress.routes[0].host",
            ),
            (
                &*format!("{route}path_prefix = \"api\"\n"),
                "ingress.routes[0].path_prefix",
            ),
            (&*format!("{route}{route}"), "ingress.routes[1].path_prefix"),
            (
                &*route.replace("port = 80", "port = 0"),
                "ingress.routes[0].port",
            ),
            (
                &*route.replace("\"web\"", "\"\""),
                "ingress.routes[0].service",
            ),
            (
                &*format!("max_connections = 0\n{route}"),
                "ingress.max_connections",
            ),
            (
                &*format!("idle_timeout = \"0s\"\n{route}"),
                "ingress.idle_timeout",
            ),
        ] {
            let err = with(body).expect_err(body);
            assert_eq!(err.key, key, "{body}: {err}");
        }
        // Two prefixes of one host that differ only by a trailing slash are the same route.
        let twice = format!("{route}path_prefix = \"/api\"\n{route}path_prefix = \"/api/\"\n");
        assert_eq!(
            with(&twice).expect_err("same").key,
            "ingress.routes[1].path_prefix"
        );
        // Static mode without a mesh file would have no endpoints for the routes.
        let text = format!(
            "{BASE}\n[ingress]\nlisten = \"127.0.0.1:0\"\ncert = \"i.pem\"\nkey = \"i.key\"\n{route}"
        );
        let err = ProxyConfig::parse(Path::new("p.toml"), &text).expect_err("no mesh");
        assert_eq!(err.key, "ingress.routes");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../deploy/proxy.example.toml");
        let cfg = ProxyConfig::parse(Path::new("deploy/proxy.example.toml"), text)
            .expect("example is valid");
        assert_eq!(cfg.outbound[0].endpoints.len(), 2);
        assert_eq!(
            cfg.identity.as_ref().and_then(|i| i.trust_domain.clone()),
            None
        );
        assert_eq!(cfg.quic.max_concurrent_streams, 8192);
        let inbound = cfg.inbound.as_ref().expect("inbound");
        assert_eq!(inbound.served().len(), 2);
        assert_eq!(inbound.app_for(9090), "127.0.0.1:9090".parse().ok());
        assert_eq!(inbound.app_for(22), None);
    }

    #[test]
    fn a_gateways_workloads_are_checked_and_name_the_key_at_fault() {
        let gw = |outbound_service: &str, inbound: &str, workloads: &str| {
            let text = format!(
                "mesh = \"m.yaml\"\n[identity]\ncert = \"n.pem\"\nkey = \"n.key\"\ntrust_bundle = \"ca.pem\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\n{inbound}\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"{outbound_service}\"\nport = 80\n\n{workloads}"
            );
            ProxyConfig::parse(Path::new("/etc/qm/gw.toml"), &text)
        };
        let w = |name: &str, src: &str, extra: &str| {
            format!(
                "[[workload]]\nname = \"{name}\"\nsources = [\"{src}\"]\nports = [{{ port = 80, app = \"127.0.0.1:8080\" }}]\n{extra}\n"
            )
        };
        let files = "cert = \"w.pem\"\nkey = \"w.key\"\n";
        let two = format!(
            "{}{}",
            w("a", "127.0.0.2", files),
            w("b", "127.0.0.3", files)
        );
        let cfg = gw("web.shop", "", &two).expect("valid gateway");
        assert_eq!(cfg.workloads.len(), 2);
        assert_eq!(
            cfg.workloads[0].cert.as_deref(),
            Some(Path::new("/etc/qm/w.pem")),
            "relative to the file"
        );
        let cases = [
            (gw("web", "", &two), "outbound[0].service"),
            (
                gw("web.shop", "app = \"127.0.0.1:1\"\n", &two),
                "inbound.ports",
            ),
            (
                gw(
                    "web.shop",
                    "",
                    &format!(
                        "{}{}",
                        w("a", "127.0.0.2", files),
                        w("a", "127.0.0.3", files)
                    ),
                ),
                "workload[1].name",
            ),
            (
                gw(
                    "web.shop",
                    "",
                    &format!(
                        "{}{}",
                        w("a", "127.0.0.2", files),
                        w("b", "::ffff:127.0.0.2", files)
                    ),
                ),
                "workload[1].sources",
            ),
            (
                gw("web.shop", "", &w("a", "127.0.0.2", "key = \"w.key\"\n")),
                "workload[0].cert",
            ),
            (
                gw("web.shop", "", &w("a", "127.0.0.2", "cert = \"w.pem\"\n")),
                "workload[0].key",
            ),
            (
                gw(
                    "web.shop",
                    "",
                    &w(
                        "a",
                        "127.0.0.2",
                        &format!("{files}identity = \"spiffe://t/ns/a/sa/a\"\n"),
                    ),
                ),
                "workload[0].identity",
            ),
        ];
        for (res, key) in cases {
            let err = res.expect_err(key);
            assert_eq!(err.key, key, "{err}");
        }
    }
}
