//! QUIC endpoints and their TLS: the settings every mesh connection shares.
//!
//! Defaults in quinn suit a browser, not a tunnel: 100 concurrent streams, 208 KiB kernel UDP buffers and
//! modest windows. A proxy multiplexes thousands of tunneled connections over one QUIC connection at
//! multi-gigabit rates, so the stream limit, flow-control windows and socket buffers are set here, on
//! purpose, from [`QuicConfig`]. TLS is 1.3 only, ALPN `quicmesh/1`, mutual, with our SPIFFE verifiers.
//!
//! Two settings bound what a peer can cost before it authenticates. quinn builds a table entry for every
//! stream the peer may open when it creates a connection, that is when it accepts the first Initial: at
//! 8192 streams that was ~0.7 MB per unanswered Initial. So a server connection starts with
//! [`STREAMS_BEFORE_AUTH`] and the inbound side raises the limit as the verified peer uses it; a dialled
//! connection allows the peer none (servers never open streams). And an endpoint's stateless-reset key
//! (and the key its connection IDs are checked with) can come from a persistent secret
//! ([`endpoint_keys`]), so that after a restart the endpoint answers packets of connections its previous
//! instance held with a reset their peers recognise, and they redial at once instead of waiting out the
//! idle timeout.

pub mod loss;

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::metrics::{counter::Counter, family::Family};
use quinn::{
    AckFrequencyConfig, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TokioRuntime,
    TransportConfig, VarInt, congestion,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use quinn_proto::HashedConnectionIdGenerator;
use ring::{hkdf, hmac};
use rustls::crypto::CryptoProvider;

use crate::{
    config::{CongestionController, QuicConfig},
    identity::{
        Credentials, SpiffeId,
        verify::{PeerClientVerifier, PeerServerVerifier},
    },
    metrics::RefusalLabels,
    state::StateHandle,
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

/// The crypto provider every config uses: ring only. Configs name it explicitly, so a second provider
/// compiled into the process can never make rustls' default choice ambiguous (it panics then).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes [`provider`] the process default, for libraries that build TLS configs without one (tonic's
/// clients). Call at the top of `main`; later calls do nothing.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    // Path MTU discovery searches up to the configured datagram size: on loopback and jumbo-frame links
    // bigger packets mean fewer per-packet costs (AEAD calls, headers, acknowledgements); on a
    // 1500-byte path the probes above it are lost and the search settles below.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    let mut ack = AckFrequencyConfig::default();
    ack.max_ack_delay(Some(cfg.max_ack_delay));
    t.ack_frequency_config(Some(ack));
    let inner: Arc<dyn congestion::ControllerFactory + Send + Sync> =
        match cfg.congestion_controller {
            CongestionController::Cubic => Arc::new(congestion::CubicConfig::default()),
            CongestionController::Bbr => Arc::new(congestion::BbrConfig::default()),
            CongestionController::NewReno => Arc::new(congestion::NewRenoConfig::default()),
        };
    t.congestion_controller_factory(Arc::new(loss::FilteredFactory::new(
        inner,
        loss::LossFilterConfig {
            loss_threshold: cfg.loss_threshold,
            queue_delay: cfg.queue_delay,
        },
    )));
    t
}

/// Server side: mutual TLS with client certificates checked by [`PeerClientVerifier`] against
/// `creds`' roots; `certs` picks what we present (a sidecar's `creds`, or a gateway's workloads).
pub fn server_config(
    creds: &Credentials,
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    state: &StateHandle,
    cfg: &QuicConfig,
    refusals: Family<RefusalLabels, Counter>,
) -> Result<quinn::ServerConfig, QuicError> {
    let provider = provider();
    let verifier =
        PeerClientVerifier::new(creds.clone(), state.clone(), provider.clone(), refusals)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed handshake exchanges no certificates, so the peer would keep the
    // identity (and expiry) of the first handshake across rotations and revocations. Full handshakes
    // happen once per pair of proxies, so they cost little.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config(cfg);
    transport.max_concurrent_bidi_streams(VarInt::from_u32(
        cfg.max_concurrent_streams.min(STREAMS_BEFORE_AUTH),
    ));
    server
        .transport_config(Arc::new(transport))
        // Connection attempts quinn queues before our accept loop decides on them, and the bytes they
        // may buffer meanwhile (quinn's defaults: 65,536 and 100 MB); beyond, Initials are dropped.
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(4 << 20);
    Ok(server)
}

/// Concurrent streams a client may open on a new connection (transport parameter), before the inbound
/// side has verified it; more are granted with use (`proxy/admission.rs`). Not smaller: a client opens
/// its first burst of tunnels as soon as its handshake ends, before a raise could reach it, and streams
/// that wait for credit there had their headers starved by the first streams' bulk data.
pub const STREAMS_BEFORE_AUTH: u32 = 1024;

/// Connection attempts quinn holds for the accept loop at once.
const MAX_INCOMING: usize = 1024;

/// Client side: presents our certificate and checks the server with [`PeerServerVerifier`].
pub fn client_config(
    creds: &Credentials,
    state: &StateHandle,
    cfg: &QuicConfig,
    refusals: Family<RefusalLabels, Counter>,
    expected: Option<SpiffeId>,
) -> Result<quinn::ClientConfig, QuicError> {
    let provider = provider();
    let verifier = PeerServerVerifier::new(
        creds.clone(),
        state.clone(),
        provider.clone(),
        refusals,
        expected,
    );
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(creds.clone()));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config(cfg);
    // The acceptor never opens streams towards us: no stream table for it.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// The keys of an endpoint that must outlive a restart, derived from `secret` and the bound address:
/// the stateless-reset key and the key that marks our connection IDs.
///
/// Safe because HKDF-SHA256 is one-way: reset tokens are HMACs under a derived key and reveal nothing
/// of `secret`; only a holder of `secret` (who could already impersonate this proxy) can forge them.
/// The bound address is part of the derivation, so endpoints sharing a secret never share a key
/// (RFC 9000 section 10.3.2: a reset token must not be usable against another endpoint).
pub fn endpoint_keys(secret: &[u8], addr: SocketAddr) -> (hmac::Key, u64) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"quicmesh endpoint keys v1").extract(secret);
    let addr = addr.to_string();
    let reset = prk
        .expand(&[b"stateless reset", addr.as_bytes()], hmac::HMAC_SHA256)
        .map(hmac::Key::from);
    let mut cid = [0u8; 8];
    let cid_ok = prk
        .expand(&[b"connection id", addr.as_bytes()], Len(cid.len()))
        .and_then(|okm| okm.fill(&mut cid));
    match (reset, cid_ok) {
        (Ok(reset), Ok(())) => (reset, u64::from_le_bytes(cid)),
        // Unreachable: both lengths are far below HKDF-SHA256's limit. Random keys keep it harmless.
        _ => (
            hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()),
            rand::random(),
        ),
    }
}

/// An HKDF output length for ring.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn endpoint_config(secret: Option<&[u8]>, addr: SocketAddr, cfg: &QuicConfig) -> EndpointConfig {
    let mut c = match secret {
        None => EndpointConfig::default(),
        Some(secret) => {
            let (reset, cid_key) = endpoint_keys(secret, addr);
            let mut c = EndpointConfig::new(Arc::new(reset));
            // Connection IDs are checked against this key before a stateless reset is sent: a
            // restarted endpoint must recognise the IDs its previous instance issued.
            c.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
            c
        }
    };
    // The largest datagram this endpoint accepts (a transport parameter); validated with the config.
    let _ = c.max_udp_payload_size(cfg.max_udp_payload);
    c
}

/// Binds a UDP socket with the configured buffers and wraps it in a quinn endpoint. With `secret`, the
/// endpoint's reset and connection-ID keys derive from it and the bound address ([`endpoint_keys`]);
/// without, they are random.
pub fn endpoint(
    addr: SocketAddr,
    cfg: &QuicConfig,
    server: Option<quinn::ServerConfig>,
    secret: Option<&[u8]>,
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
    let bound = std_socket.local_addr().map_err(bind)?;
    let ep = Endpoint::new(
        endpoint_config(secret, bound, cfg),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(key: &hmac::Key, cid: &[u8]) -> Vec<u8> {
        hmac::sign(key, cid).as_ref().to_vec()
    }

    #[test]
    fn endpoint_keys_survive_a_restart_and_differ_per_address_and_secret() {
        let a: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:4434".parse().expect("addr");
        let (k1, c1) = endpoint_keys(b"secret", a);
        let (k2, c2) = endpoint_keys(b"secret", a);
        // Same secret and address (a restart): same reset token for a connection ID, same CID key.
        assert_eq!(token(&k1, b"cid-1"), token(&k2, b"cid-1"));
        assert_eq!(c1, c2);
        assert_ne!(token(&k1, b"cid-1"), token(&k1, b"cid-2"));
        // Another address or another secret: unrelated keys.
        let (k3, c3) = endpoint_keys(b"secret", b);
        let (k4, c4) = endpoint_keys(b"other", a);
        assert_ne!(token(&k1, b"cid-1"), token(&k3, b"cid-1"));
        assert_ne!(token(&k1, b"cid-1"), token(&k4, b"cid-1"));
        assert!(c1 != c3 && c1 != c4);
    }
}
