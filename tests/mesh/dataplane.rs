//! In-process tier: real proxies (real UDP/QUIC, real TCP) in the test process.

use std::{net::SocketAddr, time::Duration};

use bytes::BytesMut;
use prost::Message;
use quicmesh_proto::tunnel::{StatusCode, StreamHeader, StreamStatus};
use rand::{Rng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::support::*;

const LONG: Duration = Duration::from_secs(60);

/// A thousand connections at once, up to 1 MiB each way. The server proxy and the echo app run as
/// child processes (`quicmesh proxy`, `quicmesh bench serve`), so each process holds about a thousand
/// sockets per side it serves and this one holds the clients' and the client proxy's (~2,000): the
/// four sockets of every connection in one process would need a hard open-file limit above 4,096.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_echo_byte_for_byte_over_one_quic_connection() {
    let limit = raise_fd_limit();
    assert!(
        limit >= 2_600,
        "this test holds ~2,200 sockets in its process but the open-file limit is {limit}: raise the hard limit (ulimit -Hn)"
    );
    let _heavy = heavy().await;
    let pki = Pki::new();
    let (_echo, ready) = spawn_ready(
        &["bench", "serve", "--max-time", "5m"],
        &pki.path().join("echo.log"),
    )
    .await;
    let echo = ready_addr(&ready, "/addr");
    pki.issue("server", "echo");
    let cfg = pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{echo}\" }}]\n"
        ),
    );
    let cfg = cfg.to_str().expect("utf-8 path");
    let (_server, ready) =
        spawn_ready(&["proxy", "--config", cfg], &pki.path().join("server.log")).await;
    let server_admin = ready_addr(&ready, "/admin");
    pki.issue("client", "client");
    let client = client_proxy(
        &pki,
        "client",
        &[ready_addr(&ready, "/inbound")],
        "connect_timeout = \"30s\"",
    )
    .await;
    let target = client.outbound(0);

    let tasks: Vec<_> = (0..1000u64)
        .map(|i| {
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i);
                let len = rng.random_range(1..=1 << 20);
                // `bench serve` echoes what follows its 4-byte echo magic.
                let mut payload = vec![0u8; 4 + len];
                payload[..4].copy_from_slice(quicmesh_bench::server::MAGIC_ECHO);
                rng.fill_bytes(&mut payload[4..]);
                let back = roundtrip(target, &payload, LONG).await;
                (i, len, back.map(|b| b == payload[4..]))
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        let (i, len, r) = t.await.expect("task");
        if !matches!(r, Ok(true)) {
            failed.push((i, len, r));
        }
    }
    let m = client.metrics().await;
    assert!(
        failed.is_empty(),
        "{} of 1000 failed, e.g. {:?}\nclient proxy:\n{m}\nserver proxy log:\n{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        std::fs::read_to_string(pki.path().join("server.log")).unwrap_or_default()
    );

    assert_eq!(
        metric(&m, "quicmesh_quic_connections", &[]),
        1.0,
        "one QUIC connection carried all:\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "quicmesh_tunnel_opened_total",
            &["direction=\"outbound\""]
        ),
        1000.0
    );
    // Every header and status got through on the first stream although bulk data kept the connection's
    // flow-control window spent (see `proxy::lane`): no header timed out, nothing was retried.
    assert_eq!(metric(&m, "quicmesh_retries_total", &[]), 0.0, "{m}");
    let s = scrape(server_admin, "/metrics").await.1;
    assert_eq!(
        metric(
            &s,
            "quicmesh_tunnel_opened_total",
            &["spiffe://mesh.local/ns/default/sa/client"]
        ),
        1000.0
    );
    assert_eq!(
        metric(&s, "quicmesh_protocol_errors_total", &[]),
        0.0,
        "{s}"
    );
    client.shutdown().await;
}

/// A server that reads until EOF, then answers with the byte count: it only replies after a half-close.
async fn count_until_eof_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                if s.read_to_end(&mut sink).await.is_ok() {
                    let reply = format!("got {} bytes", sink.len()).repeat(1000);
                    let _ = s.write_all(reply.as_bytes()).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_receives_the_whole_reply() {
    let pki = Pki::new();
    let app = count_until_eof_server().await;
    let server = server_proxy(&pki, app).await;
    pki.issue("client", "client");
    let client = client_proxy(&pki, "client", &[server.inbound()], "").await;

    let reply = roundtrip(client.outbound(0), &[7u8; 100_000], LONG)
        .await
        .expect("roundtrip");
    assert_eq!(reply, "got 100000 bytes".repeat(1000).into_bytes());
    client.shutdown().await;
    server.shutdown().await;
}

/// Connects through `client` and expects the tunnel to fail: the app connection ends with no data.
async fn expect_tunnel_refused(target: SocketAddr) {
    let r = roundtrip(target, b"hello", Duration::from_secs(20)).await;
    match r {
        Ok(b) => assert!(b.is_empty(), "got data through a refused tunnel"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "tunnel neither failed nor worked"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_foreign_ca_other_trust_domain_or_expired_certs_are_refused() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;

    // Another CA, same trust domain.
    let foreign = Pki::new();
    foreign.issue("stranger", "client");
    pki.adopt(&foreign, "stranger");
    // Our CA, another trust domain.
    pki.issue_at(
        "otherdomain",
        "spiffe://other.example/ns/default/sa/client",
        -time::Duration::minutes(1),
        time::Duration::hours(1),
    );
    // Our CA, expired an hour ago.
    pki.issue_at(
        "expired",
        "spiffe://mesh.local/ns/default/sa/client",
        -time::Duration::hours(2),
        -time::Duration::hours(1),
    );

    for (name, reason) in [
        ("stranger", "unknown_ca"),
        ("otherdomain", "wrong_trust_domain"),
        ("expired", "expired"),
    ] {
        // Each client trusts our server, so that the server is the one to judge the client's certificate.
        let identity = "trust_domain = \"mesh.local\"";
        let client = client_proxy_with(
            &pki,
            name,
            identity,
            &[server.inbound()],
            "handshake_timeout = \"2s\"\nmax_attempts = 1",
        )
        .await;
        expect_tunnel_refused(client.outbound(0)).await;
        let ok = eventually(Duration::from_secs(5), || async {
            metric(
                &server.metrics().await,
                "quicmesh_peer_refusals_total",
                &["direction=\"inbound\"", &format!("reason=\"{reason}\"")],
            ) >= 1.0
        })
        .await;
        assert!(
            ok,
            "{name}: server did not count a {reason} refusal:\n{}",
            server.metrics().await
        );
        let cm = client.metrics().await;
        assert!(
            metric(
                &cm,
                "quicmesh_tunnel_failures_total",
                &["direction=\"outbound\""]
            ) >= 1.0,
            "{name}: client did not count the failure:\n{cm}"
        );
        assert_eq!(metric(&cm, "quicmesh_tunnel_opened_total", &[]), 0.0);
        client.shutdown().await;
    }
    let s = server.metrics().await;
    assert_eq!(
        metric(&s, "quicmesh_tunnel_opened_total", &[]),
        0.0,
        "no stream reached the app:\n{s}"
    );

    // The other way round: a good client refuses a server whose certificate comes from another CA.
    let foreign_app = echo_server().await;
    let rogue = {
        foreign.issue("server", "echo");
        let cfg = foreign.config(
            "server",
            &format!("[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{foreign_app}\" }}]\n"),
        );
        start_proxy(&cfg).await
    };
    pki.issue("client", "client");
    let client = client_proxy(&pki, "client", &[rogue.inbound()], "max_attempts = 1").await;
    expect_tunnel_refused(client.outbound(0)).await;
    let cm = client.metrics().await;
    assert!(
        metric(
            &cm,
            "quicmesh_peer_refusals_total",
            &["direction=\"outbound\"", "reason=\"unknown_ca\""]
        ) >= 1.0,
        "client did not count the rogue server:\n{cm}"
    );
    client.shutdown().await;
    rogue.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_endpoint_down_every_connection_succeeds() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    // An address where no proxy listens: bind a UDP port, then free it.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("udp")
        .local_addr()
        .expect("addr");
    pki.issue("client", "client");
    let client = client_proxy(
        &pki,
        "client",
        &[dead, server.inbound()],
        "handshake_timeout = \"300ms\"",
    )
    .await;
    let target = client.outbound(0);

    for round in 0..4 {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                tokio::spawn(async move {
                    roundtrip(target, format!("round {round} conn {i}").as_bytes(), LONG).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let back = t.await.expect("task").expect("roundtrip");
            assert_eq!(back, format!("round {round} conn {i}").into_bytes());
        }
    }
    let m = client.metrics().await;
    assert_eq!(metric(&m, "quicmesh_tunnel_opened_total", &[]), 200.0);
    assert!(
        metric(&m, "quicmesh_retries_total", &[]) >= 1.0,
        "the dead endpoint was never tried:\n{m}"
    );
    assert_eq!(metric(&m, "quicmesh_tunnel_failures_total", &[]), 0.0);
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_that_never_accepts_closes_within_the_deadline() {
    // A listener with a backlog of one whose queue we fill: further SYNs are dropped, connect() hangs.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    sock.listen(0).expect("listen");
    let stuck: SocketAddr = sock.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(stuck)).await
        {
            fillers.push(s);
        }
    }
    let pki = Pki::new();
    let server = server_proxy(&pki, stuck).await;
    pki.issue("client", "client");
    let client = client_proxy(
        &pki,
        "client",
        &[server.inbound()],
        "connect_timeout = \"1s\"",
    )
    .await;

    let t0 = std::time::Instant::now();
    expect_tunnel_refused(client.outbound(0)).await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1800),
        "connection closed after {took:?}, deadline 1s"
    );

    // A destination that accepts but never answers: the total deadline resets the tunneled connection.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let server2 = {
        let cfg = pki.config(
            "server",
            &format!("[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{silent_addr}\" }}]\n"),
        );
        start_proxy(&cfg).await
    };
    // 3 s: the deadline also bounds the connect phase (a fresh QUIC handshake), which must fit in it
    // even while the rest of the suite keeps both cores busy.
    let client2 = client_proxy(&pki, "client", &[server2.inbound()], "deadline = \"3s\"").await;
    let t0 = std::time::Instant::now();
    let mut s = TcpStream::connect(client2.outbound(0))
        .await
        .expect("connect");
    s.write_all(b"anyone there?").await.expect("write");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed before 10s");
    let took = t0.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "unexpected data {r:?}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
        "closed after {took:?}, deadline 3s"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        metric(
            &client2.metrics().await,
            "quicmesh_tunnel_closed_total",
            &["outcome=\"deadline_exceeded\""],
        ) == 1.0
    })
    .await;
    assert!(
        counted,
        "client side counts the deadline:\n{}",
        client2.metrics().await
    );
    for p in [client, server, client2, server2] {
        p.shutdown().await;
    }
    drop(fillers);
}

/// A QUIC connection made by hand (quinn with our certificate for `raw-client`, no proxy) to a proxy's
/// inbound endpoint, to send it bytes no proxy would.
pub async fn raw_connection(
    pki: &Pki,
    to: std::net::SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    pki.issue("raw", "raw-client");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = ep
        .connect_with(raw_client_config(pki), to, "peer.quicmesh.invalid")
        .expect("connect")
        .await
        .expect("handshake");
    (ep, conn)
}

fn raw_client_config(pki: &Pki) -> quinn::ClientConfig {
    use quicmesh_transport::{config::QuicConfig, identity::credentials, quic};
    let provider = quic::provider();
    let cert = std::fs::read(pki.path().join("raw.pem")).expect("cert");
    let key = std::fs::read(pki.path().join("raw.key")).expect("key");
    let leaf = credentials::Leaf::from_pem(&provider, &cert, &key).expect("leaf");
    let roots = credentials::roots_from_pem(&std::fs::read(pki.path().join("ca.pem")).expect("ca"))
        .expect("roots");
    let creds = quicmesh_transport::identity::Credentials::new(leaf, roots);
    let state = quicmesh_transport::state::StateHandle::new(Default::default());
    quic::client_config(
        &creds,
        &state,
        &QuicConfig::default(),
        Default::default(),
        None,
    )
    .expect("client config")
}

/// Opens a stream, sends `bytes` and finishes; returns the reset code the peer answers with, if any.
pub async fn send_raw(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Result<Vec<u8>, quinn::ReadToEndError> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(bytes).await.expect("write");
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1 << 20))
        .await
        .expect("answer in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_or_oversized_headers_reset_only_that_stream() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    let (_ep, conn) = raw_connection(&pki, server.inbound()).await;

    let protocol_error = Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(
        quicmesh_transport::tunnel::code::PROTOCOL_ERROR,
    )));
    // Not protobuf: wire type 7 does not exist.
    assert_eq!(
        send_raw(&conn, &[0, 4, 0xff, 0xff, 0xff, 0xff]).await,
        protocol_error
    );
    // Length says 100, 3 bytes follow, then FIN.
    assert_eq!(send_raw(&conn, &[0, 100, 1, 2, 3]).await, protocol_error);
    // Length beyond the 8 KiB limit.
    assert_eq!(send_raw(&conn, &[0xff, 0xff, 0]).await, protocol_error);
    // A well-formed protobuf that names no service.
    let empty = StreamHeader {
        port: 7,
        ..Default::default()
    };
    let mut f = BytesMut::new();
    f.extend_from_slice(&(empty.encoded_len() as u16).to_be_bytes());
    empty.encode(&mut f).expect("encode");
    assert_eq!(send_raw(&conn, &f).await, protocol_error);

    // The connection lives on: a proper stream on it still works end to end.
    let back = send_raw(&conn, &header_frame("echo", 7, b"still alive"))
        .await
        .expect("good stream");
    let (status, rest) = status_and_rest(&back);
    assert_eq!(status.code, StatusCode::Ok as i32);
    assert_eq!(rest, b"still alive");
    assert!(conn.close_reason().is_none());

    let m = server.metrics().await;
    for reason in ["malformed", "truncated", "oversized"] {
        assert!(
            metric(
                &m,
                "quicmesh_protocol_errors_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{reason}:\n{m}"
        );
    }
    assert_eq!(metric(&m, "quicmesh_protocol_errors_total", &[]), 4.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_reports_live_ready_and_metrics() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    let admin = server.addrs.admin;
    assert_eq!(scrape(admin, "/live").await.0, 200);
    assert_eq!(scrape(admin, "/ready").await.0, 200);
    let (code, body) = scrape(admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE quicmesh_retries_budget_exhausted counter"),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_identities_are_refused_once_the_revocation_arrives() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    pki.issue("client", "client");
    let client = client_proxy(&pki, "client", &[server.inbound()], "max_attempts = 1").await;
    assert_eq!(
        roundtrip(client.outbound(0), b"before", LONG)
            .await
            .expect("roundtrip"),
        b"before"
    );

    // What a Watch snapshot listing the client in revoked_spiffe_ids does to the server.
    let client_id: quicmesh_transport::identity::SpiffeId =
        "spiffe://mesh.local/ns/default/sa/client"
            .parse()
            .expect("id");
    let revoked = server.state.load().with_revoked([client_id]);
    server.state.store(revoked);

    // New streams on the established connection are refused...
    expect_tunnel_refused(client.outbound(0)).await;
    let s = server.metrics().await;
    assert_eq!(
        metric(
            &s,
            "quicmesh_tunnel_failures_total",
            &["reason=\"revoked\""]
        ),
        1.0,
        "{s}"
    );
    let c = client.metrics().await;
    assert_eq!(
        metric(
            &c,
            "quicmesh_tunnel_failures_total",
            &["reason=\"forbidden\""]
        ),
        1.0,
        "{c}"
    );

    // ...and a new connection is refused at the handshake.
    let fresh = client_proxy(&pki, "client", &[server.inbound()], "max_attempts = 1").await;
    expect_tunnel_refused(fresh.outbound(0)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                &server.metrics().await,
                "quicmesh_peer_refusals_total",
                &["reason=\"revoked_identity\""],
            ) >= 1.0
        })
        .await
    );
    for p in [client, fresh, server] {
        p.shutdown().await;
    }
}

/// A header frame for `service`/`port` followed by `payload`.
fn header_frame(service: &str, port: u32, payload: &[u8]) -> BytesMut {
    let h = StreamHeader {
        service: service.into(),
        port,
        ..Default::default()
    };
    let mut f = BytesMut::new();
    f.extend_from_slice(&(h.encoded_len() as u16).to_be_bytes());
    h.encode(&mut f).expect("encode");
    f.extend_from_slice(payload);
    f
}

/// Splits an answer into its status and the bytes after it.
pub fn status_and_rest(back: &[u8]) -> (StreamStatus, Vec<u8>) {
    let len = u16::from_be_bytes([back[0], back[1]]) as usize;
    let status = StreamStatus::decode(&back[2..2 + len]).expect("status");
    (status, back[2 + len..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_port_reaches_its_own_app_and_other_ports_get_no_route() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let (metrics_app, _) = crate::naming::tagged_app("metrics").await;
    pki.issue("server", "echo");
    let server = start_proxy(&pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nservices = [\"echo\"]\nports = [{{ port = 7, app = \"{echo}\" }}, {{ port = 9090, app = \"{metrics_app}\" }}]\n"
        ),
    ))
    .await;
    let (_ep, conn) = raw_connection(&pki, server.inbound()).await;

    let (status, rest) = status_and_rest(
        &send_raw(&conn, &header_frame("echo", 7, b"to 7"))
            .await
            .expect("port 7"),
    );
    assert_eq!(
        (status.code, rest.as_slice()),
        (StatusCode::Ok as i32, &b"to 7"[..])
    );
    let (status, rest) = status_and_rest(
        &send_raw(&conn, &header_frame("echo", 9090, b"scrape"))
            .await
            .expect("port 9090"),
    );
    assert_eq!(
        (status.code, rest.as_slice()),
        (StatusCode::Ok as i32, &b"metrics"[..])
    );
    // A port the destination does not serve (ssh, say) is refused, not sent to some app.
    for (service, port) in [("echo", 22), ("other", 7)] {
        let (status, rest) = status_and_rest(
            &send_raw(&conn, &header_frame(service, port, b"hello"))
                .await
                .expect("answered"),
        );
        assert_eq!(status.code, StatusCode::NoRoute as i32, "{service}:{port}");
        assert!(rest.is_empty());
    }
    let m = server.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_tunnel_failures_total",
            &["reason=\"no_route\""]
        ),
        2.0,
        "{m}"
    );
    server.shutdown().await;
}
