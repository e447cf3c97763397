//! The HTTP/3 ingress: an independent HTTP/3 client (Python `aioquic`, `tests/peers/h3_client.py`)
//! calls a gateway proxy, which routes by host and path to an HTTP service behind a second proxy. Real
//! sockets, real proxies, a hyper app at the end. Skipped with a printed reason when `aioquic` is
//! missing (CI installs it).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{io::AsyncBufReadExt, net::TcpListener, process::Command};

use crate::support::*;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/h3_client.py");
const GATEWAY_ID: &str = "spiffe://mesh.local/ns/default/sa/gateway";
const BIG: usize = 10 << 20;

/// Whether python3 with aioquic is here; prints why not otherwise (the caller skips).
fn aioquic_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import aioquic"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!(
            "SKIPPED: needs python3 with aioquic (pip install aioquic) for an independent HTTP/3 client"
        );
    }
    ok
}

/// The byte pattern both the app and the client make: 0, 1, ..., 250, 0, ...
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What the app saw.
#[derive(Default)]
struct Seen {
    /// `/hold` requests whose body began to arrive.
    held: AtomicU64,
    /// `/hold` requests whose body was cut off (the caller cancelled).
    aborted: AtomicU64,
}

type AppBody = BoxBody<Bytes, Infallible>;

/// `/echo` answers the body back with the identity header it got; `/big` answers 10 MiB of the
/// pattern in 64 KiB pieces; `/hold` reads the body to its end and counts it if it was cut off.
async fn app() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(answer(req, &s).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(req: Request<Incoming>, seen: &Seen) -> Response<AppBody> {
    let id = req
        .headers()
        .get("x-quicmesh-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    let mut resp = match path.as_str() {
        "/big" => {
            let block = Bytes::from(pattern((64 << 10) + 251));
            let mut left = BIG;
            let mut offset = 0usize;
            let pieces: Vec<Result<Frame<Bytes>, Infallible>> = std::iter::from_fn(|| {
                if left == 0 {
                    return None;
                }
                let n = left.min(64 << 10);
                // The pattern repeats every 251 bytes: slice the block at the current phase.
                let start = offset % 251;
                let piece = block.slice(start..start + n);
                left -= n;
                offset += n;
                Some(Ok(Frame::data(piece)))
            })
            .collect();
            Response::new(StreamBody::new(futures::stream::iter(pieces)).boxed())
        }
        "/hold" => {
            let mut first = true;
            let whole = loop {
                match body.frame().await {
                    Some(Ok(_)) => {
                        if first {
                            seen.held.fetch_add(1, Ordering::SeqCst);
                            first = false;
                        }
                    }
                    Some(Err(_)) => break false,
                    None => break true,
                }
            };
            if !whole {
                seen.aborted.fetch_add(1, Ordering::SeqCst);
            }
            Response::new(Full::new(Bytes::from_static(b"held")).boxed())
        }
        "/echo" => {
            let b = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::new(Full::new(b).boxed())
        }
        _ => Response::new(Full::new(Bytes::from_static(b"private")).boxed()),
    };
    resp.headers_mut()
        .insert("x-seen-client-id", id.parse().expect("header"));
    resp.headers_mut()
        .insert("x-seen-method", method.parse().expect("header"));
    resp
}

/// A gateway proxy (identity `gateway`) with an ingress for `shop.example`, in front of a server
/// proxy (identity `echo`) for the app on port 80, whose policy lets the gateway reach `/echo`,
/// `/big` and `/hold` only.
struct Mesh {
    pki: Pki,
    seen: Arc<Seen>,
    _server: Running,
    gateway: Running,
}

impl Mesh {
    /// The mesh, with extra `[ingress]` keys in `ingress`.
    async fn new(ingress: &str) -> Self {
        let (app, seen) = app().await;
        let pki = Pki::new();
        pki.issue("server", "echo");
        std::fs::write(
            pki.path().join("server-mesh.yaml"),
            format!(
                r#"
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{port: 80, protocol: http}}]}}
---
kind: Policy
metadata: {{name: gateway-only, namespace: default}}
spec:
  target_service: echo
  authorization:
    mode: enforce
    default_action: deny
    allow:
      - from_identities: ["{GATEWAY_ID}"]
        path_prefixes: [/echo, /big, /hold]
"#
            ),
        )
        .expect("server mesh file");
        let cfg = pki.config_with(
            "server",
            "mesh = \"server-mesh.yaml\"",
            "",
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\n"
            ),
        );
        let server = start_proxy(&cfg).await;

        // The outside-facing certificate: an ordinary self-signed one for the host name.
        let cert = rcgen::generate_simple_self_signed(vec!["shop.example".to_owned()])
            .expect("ingress certificate");
        std::fs::write(pki.path().join("ingress.pem"), cert.cert.pem()).expect("write");
        std::fs::write(
            pki.path().join("ingress.key"),
            cert.signing_key.serialize_pem(),
        )
        .expect("write");
        pki.issue("gateway", "gateway");
        std::fs::write(
            pki.path().join("gateway-mesh.yaml"),
            format!(
                r#"
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{port: 80, protocol: http}}]}}
---
kind: Endpoint
metadata: {{name: echo-0, namespace: default}}
spec: {{service: echo, address: "{}", spiffe_id: "spiffe://mesh.local/ns/default/sa/echo"}}
"#,
                server.inbound()
            ),
        )
        .expect("gateway mesh file");
        let cfg = pki.config_with(
            "gateway",
            "mesh = \"gateway-mesh.yaml\"",
            "",
            &format!(
                r#"
[ingress]
listen = "127.0.0.1:0"
cert = "ingress.pem"
key = "ingress.key"
idle_timeout = "2s"
{ingress}

[[ingress.routes]]
host = "shop.example"
service = "echo"
port = 80
"#
            ),
        );
        let gateway = start_proxy(&cfg).await;
        Self {
            pki,
            seen,
            _server: server,
            gateway,
        }
    }

    fn ingress(&self) -> SocketAddr {
        self.gateway.addrs.ingress.expect("ingress bound")
    }

    fn client_args(&self) -> Vec<String> {
        let cafile: PathBuf = self.pki.path().join("ingress.pem");
        vec![
            CLIENT.to_owned(),
            "127.0.0.1".to_owned(),
            self.ingress().port().to_string(),
            cafile.display().to_string(),
            "shop.example".to_owned(),
        ]
    }

    /// Runs the client with `requests` on one connection: one answer per request.
    async fn requests(&self, requests: Value) -> Vec<Value> {
        let mut args = self.client_args();
        args.push(requests.to_string());
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new("python3")
                .args(&args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("client in time")
        .expect("run client");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

fn get(path: &str) -> Value {
    json!({"method": "GET", "authority": "shop.example", "path": path})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_requests_reach_the_mesh_service_under_the_gateway_identity() {
    if !aioquic_available() {
        return;
    }
    let mesh = Mesh::new("").await;
    let post_size = 300 * 1024;
    let answers = mesh
        .requests(json!([
            get("/echo"),
            {"method": "POST", "authority": "shop.example:443", "path": "/echo", "body_size": post_size},
            get("/big"),
            {"method": "GET", "authority": "unknown.example", "path": "/echo"},
            get("/private"),
            {"method": "GET", "authority": "shop.example", "malformed": true},
            {"method": "GET", "authority": "shop.example", "path": "/echo", "big_header": 70_000},
            get("/echo"),
        ]))
        .await;
    assert_eq!(answers.len(), 8, "{answers:?}");
    let [
        get_echo,
        post,
        big,
        unknown,
        private,
        malformed,
        too_big,
        after,
    ] = &answers[..]
    else {
        unreachable!()
    };

    // GET and POST arrive with the gateway's verified identity, never the client's forged header.
    for a in [get_echo, post] {
        assert_eq!(a["status"], 200, "{a}");
        assert_eq!(a["headers"]["x-seen-client-id"], GATEWAY_ID, "{a}");
    }
    assert_eq!(get_echo["headers"]["x-seen-method"], "GET");
    assert_eq!(post["headers"]["x-seen-method"], "POST");
    assert_eq!(post["length"], post_size, "{post}");
    assert_eq!(
        post["sha256"], post["sent_sha256"],
        "POST body echoed byte for byte"
    );

    // 10 MiB, byte for byte.
    assert_eq!(big["status"], 200, "{big}");
    assert_eq!(big["length"], BIG);
    assert_eq!(
        big["sha256"],
        sha256_hex(&pattern(BIG)),
        "10 MiB body intact"
    );

    // No route for the host: 404 from the gateway; the policy refuses a path: 403 from the mesh.
    assert_eq!(unknown["status"], 404, "{unknown}");
    assert_eq!(private["status"], 403, "{private}");
    assert_eq!(private["headers"]["x-quicmesh-error"], "mesh", "{private}");

    // Missing :path: the stream is reset with H3_MESSAGE_ERROR (0x10e); a header section over the
    // 64 KiB limit gets 431; the connection serves on.
    assert_eq!(malformed["reset"], 0x10e, "{malformed}");
    assert_eq!(too_big["status"], 431, "{too_big}");
    assert_eq!(after["status"], 200, "{after}");

    let m = mesh.gateway.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_requests_total",
            &["status_code=\"200\""]
        ),
        4.0,
        "{m}"
    );
    for code in ["404", "403", "431"] {
        let label = format!("status_code=\"{code}\"");
        assert_eq!(
            metric(&m, "quicmesh_ingress_requests_total", &[&label]),
            1.0,
            "{m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_errors_total",
            &["reason=\"malformed_request\""]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_request_frees_its_connection_slot_and_cancels_the_upstream_request()
 {
    if !aioquic_available() {
        return;
    }
    let mesh = Mesh::new("max_connections = 1").await;
    let mut args = mesh.client_args();
    args.extend(["--vanish".into(), "shop.example".into(), "/hold".into()]);
    let mut child = Command::new("python3")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn client");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("client sent in time")
        .expect("read");
    assert_eq!(line.as_deref(), Some("sent"));
    // The request is at the app, its body half sent; the gateway holds one client connection.
    assert!(
        eventually(Duration::from_secs(10), || async {
            mesh.seen.held.load(Ordering::SeqCst) == 1
        })
        .await,
        "the app never saw the request"
    );
    let m = mesh.gateway.metrics().await;
    assert_eq!(metric(&m, "quicmesh_ingress_connections", &[]), 1.0, "{m}");
    // It holds the only connection slot: another client is refused, and the gateway serves on.
    let refused = mesh.requests(json!([get("/echo")])).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0]["status"].is_null(), "{refused:?}");
    let m = mesh.gateway.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_errors_total",
            &["reason=\"connections_over_limit\""]
        ),
        1.0,
        "{m}"
    );

    // Killed without a word: the gateway finds out by the idle timeout (2 s here).
    child.kill().await.expect("kill client");
    assert!(
        eventually(Duration::from_secs(10), || async {
            mesh.seen.aborted.load(Ordering::SeqCst) == 1
        })
        .await,
        "the app's request was not cancelled"
    );
    let freed = eventually(Duration::from_secs(10), || async {
        metric(
            &mesh.gateway.metrics().await,
            "quicmesh_ingress_connections",
            &[],
        ) == 0.0
    })
    .await;
    let m = mesh.gateway.metrics().await;
    assert!(freed, "connection still held: {m}");
    assert_eq!(
        metric(
            &m,
            "quicmesh_ingress_errors_total",
            &["reason=\"client_gone\""]
        ),
        1.0,
        "{m}"
    );

    // The next client is served.
    let answers = mesh.requests(json!([get("/echo")])).await;
    assert_eq!(answers[0]["status"], 200, "{answers:?}");
}
