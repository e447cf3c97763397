//! Connections that leave HTTP (WebSocket upgrades, `CONNECT`) on an `http` port travel as opaque
//! tunnels, and requests whose body stops arriving end at their deadline. The client and the backend
//! speak raw HTTP/1.1 written here, so nothing of hyper is on either end.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use rand::RngCore;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    http::{http_app, mesh_pair},
    support::*,
};

const IO_LIMIT: Duration = Duration::from_secs(10);

/// Reads one HTTP/1.1 head (up to the blank line), bounded in size and time; `None` at EOF.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 16 * 1024, "head too large");
        match tokio::time::timeout(IO_LIMIT, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => return None,
            Err(_) => panic!("no head within {IO_LIMIT:?}"),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Reads a response: its head, then a body of `Content-Length` bytes.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s).await.expect("a response head");
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(IO_LIMIT, s.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (head, body)
}

/// Echoes bytes until the peer closes.
async fn echo(s: &mut TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(IO_LIMIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// A backend written by hand: plain requests get `200 ok`, a WebSocket upgrade to `/chat` gets 101
/// and then an echo, one to `/refuse` gets 426, a `CONNECT` gets 200 and then an echo. Every request
/// head it receives is kept.
async fn raw_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut s).await {
                    h.lock().expect("heads").push(head.clone());
                    let lower = head.to_ascii_lowercase();
                    if head.starts_with("CONNECT ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                            .await;
                        echo(&mut s).await;
                        return;
                    }
                    if lower.contains("\r\nupgrade: websocket") {
                        if head.starts_with("GET /refuse ") {
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope",
                                )
                                .await;
                            continue;
                        }
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                            )
                            .await;
                        echo(&mut s).await;
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    (addr, heads)
}

/// Sends `n` random bytes on `s` while reading them back, and checks they return unchanged.
async fn echoed(s: TcpStream, n: usize) {
    let mut data = vec![0u8; n];
    rand::rng().fill_bytes(&mut data);
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(16 * 1024) {
            w.write_all(chunk).await.expect("write");
        }
        w.shutdown().await.expect("half-close");
    });
    let mut back = Vec::new();
    tokio::time::timeout(IO_LIMIT, r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    writer.await.expect("writer");
    assert_eq!(back.len(), n, "bytes lost or added");
    assert!(back == data, "bytes changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_after_a_request_becomes_an_opaque_tunnel_without_a_forged_identity() {
    let (app, heads) = raw_backend().await;
    let (_pki, server, client) = mesh_pair(app, "http", "").await;
    let mut s = TcpStream::connect(client.outbound(0))
        .await
        .expect("connect");
    // A plain request first: the connection is served request by request.
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    // Then an upgrade on the same connection, with an identity header the app made up.
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nx-quicmesh-client-id: spiffe://mesh.local/ns/default/sa/admin\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_head(&mut s).await.expect("an answer to the upgrade");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    echoed(s, 1 << 20).await;
    let seen = heads.lock().expect("heads").clone();
    let upgrade = seen
        .iter()
        .find(|h| h.starts_with("GET /chat "))
        .expect("the backend got the upgrade");
    let lower = upgrade.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket"), "{upgrade}");
    assert!(
        !lower.contains("x-quicmesh-client-id"),
        "forged identity passed: {upgrade}"
    );
    let m = client.metrics().await;
    assert!(
        metric(&m, "quicmesh_requests_total", &["status_code=\"101\""]) >= 1.0,
        "{m}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_bytes_and_a_refused_upgrade_leaves_the_connection_serving_requests() {
    let (app, _heads) = raw_backend().await;
    let (_pki, server, client) = mesh_pair(app, "http", "").await;
    let target = client.outbound(0);
    let mut s = TcpStream::connect(target).await.expect("connect");
    s.write_all(
        b"GET /refuse HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert_eq!(body, b"nope");
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");

    let mut c = TcpStream::connect(target).await.expect("connect");
    c.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut c).await.expect("an answer to CONNECT");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echoed(c, 256 * 1024).await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_ends_at_the_deadline() {
    const POLICY: &str = r#"---
kind: Policy
metadata: {name: timeouts, namespace: default}
spec:
  target_service: echo
  timeouts: {request_timeout_ms: 300}
"#;
    let (app, seen) = http_app().await;
    let (_pki, server, client) = mesh_pair(app, "http", POLICY).await;
    let mut s = TcpStream::connect(client.outbound(0))
        .await
        .expect("connect");
    let started = tokio::time::Instant::now();
    // 10 of the 1,000 bytes announced, then nothing.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s).await;
    let took = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    assert!(seen.requests.load(Ordering::Relaxed) <= 1);
    let m = client.metrics().await;
    assert!(
        metric(&m, "quicmesh_requests_total", &["status_code=\"504\""]) >= 1.0,
        "{m}"
    );
    client.shutdown().await;
    server.shutdown().await;
}
