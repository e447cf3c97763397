//! QUIC endpoints and their TLS: the settings every mesh connection shares.
//!
//! Defaults in quinn suit a browser, not a tunnel: 100 concurrent streams, 208 KiB kernel UDP buffers and
//! modest windows. A proxy multiplexes thousands of tunneled connections over one QUIC connection at
//! multi-gigabit rates, so the stream limit, flow-control windows and socket buffers are set here, on
//! purpose, from [`QuicConfig`]. TLS is 1.3 only, ALPN `quicmesh/1`, mutual, with our SPIFFE verifiers.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::metrics::{counter::Counter, family::Family};
use quinn::{
    AckFrequencyConfig, Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig,
    VarInt, congestion,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use rustls::crypto::CryptoProvider;

use crate::{
    config::{CongestionController, QuicConfig},
    identity::{
        Credentials, SpiffeId,
        verify::{PeerClientVerifier, PeerServerVerifier},
    },
    metrics::RefusalLabels,
    tunnel::ALPN,
};

/// Why an endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The UDP socket could not be created or bound.
    #[error("cannot bind UDP {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// quinn refused the crypto configuration.
    #[error("QUIC crypto configuration: {0}")]
    Crypto(String),
}

/// The crypto provider every config uses: ring only (see STACK.md: two providers panic).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The transport parameters of every mesh connection.
pub fn transport_config(cfg: &QuicConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(cfg.stream_window))
        .receive_window(VarInt::from_u32(cfg.connection_window))
        .send_window(u64::from(cfg.connection_window))
        .keep_alive_interval(Some(cfg.keep_alive))
        .datagram_receive_buffer_size(None);
    if let Ok(idle) = IdleTimeout::try_from(cfg.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    let mut ack = AckFrequencyConfig::default();
    ack.max_ack_delay(Some(cfg.max_ack_delay));
    t.ack_frequency_config(Some(ack));
    match cfg.congestion_controller {
        CongestionController::Cubic => {
            t.congestion_controller_factory(Arc::new(congestion::CubicConfig::default()))
        }
        CongestionController::Bbr => {
            t.congestion_controller_factory(Arc::new(congestion::BbrConfig::default()))
        }
        CongestionController::NewReno => {
            t.congestion_controller_factory(Arc::new(congestion::NewRenoConfig::default()))
        }
    };
    t
}

/// Server side: mutual TLS with client certificates checked by [`PeerClientVerifier`].
pub fn server_config(
    creds: &Credentials,
    cfg: &QuicConfig,
    refusals: Family<RefusalLabels, Counter>,
) -> Result<quinn::ServerConfig, QuicError> {
    let provider = provider();
    let verifier = PeerClientVerifier::new(creds.clone(), provider.clone(), refusals)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(creds.clone()));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed handshake exchanges no certificates, so the peer would keep the
    // identity (and expiry) of the first handshake across rotations and revocations. Full handshakes
    // happen once per pair of proxies, so they cost little.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));
    Ok(server)
}

/// Client side: presents our certificate and checks the server with [`PeerServerVerifier`].
pub fn client_config(
    creds: &Credentials,
    cfg: &QuicConfig,
    refusals: Family<RefusalLabels, Counter>,
    expected: Option<SpiffeId>,
) -> Result<quinn::ClientConfig, QuicError> {
    let provider = provider();
    let verifier = PeerServerVerifier::new(creds.clone(), provider.clone(), refusals, expected);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(creds.clone()));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(cfg)));
    Ok(client)
}

/// Binds a UDP socket with the configured buffers and wraps it in a quinn endpoint.
pub fn endpoint(
    addr: SocketAddr,
    cfg: &QuicConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, QuicError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = |e| QuicError::Bind(addr, e);
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind)?;
    if addr.is_ipv6() {
        // Dual-stack when bound to [::]: one endpoint reaches v4 and v6 peers.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max; we log what we got.
    let _ = socket.set_recv_buffer_size(cfg.udp_buffer);
    let _ = socket.set_send_buffer_size(cfg.udp_buffer);
    socket.bind(&addr.into()).map_err(bind)?;
    let std_socket: std::net::UdpSocket = socket.into();
    let rcv = socket2::SockRef::from(&std_socket)
        .recv_buffer_size()
        .unwrap_or(0);
    let snd = socket2::SockRef::from(&std_socket)
        .send_buffer_size()
        .unwrap_or(0);
    let ep = Endpoint::new(
        EndpointConfig::default(),
        server,
        std_socket,
        Arc::new(TokioRuntime),
    )
    .map_err(bind)?;
    tracing::debug!(local = ?ep.local_addr().ok(), udp_rcvbuf = rcv, udp_sndbuf = snd, "QUIC endpoint bound");
    if rcv < cfg.udp_buffer {
        tracing::info!(
            wanted = cfg.udp_buffer,
            got = rcv,
            "UDP receive buffer capped by net.core.rmem_max"
        );
    }
    Ok(ep)
}
