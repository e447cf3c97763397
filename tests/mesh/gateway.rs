//! Node gateway mode on loopback: one proxy serves three workloads (`a`, `b`, `c`), each with its own
//! certificate, its app bound behind the gateway and its connections coming from its own source address
//! (127.0.0.2-4). Each workload calls the other two through the gateway; the callee's app sees the
//! caller's own SPIFFE ID in `x-quicmesh-client-id` (what the inbound side verified from the QUIC
//! client certificate) and the gateway counts each request under the caller's identity. A connection from
//! an address of no workload is refused. An independent QUIC client (aioquic) checks the certificate
//! choice from outside: asking for `b` gets `b`'s certificate, asking for an identity not on the node gets
//! no handshake.

use std::{net::SocketAddr, path::Path, time::Duration};

use quicmesh_transport::{
    identity::{ServerNames, SpiffeId},
    model,
    state::MeshState,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

use crate::{http::http_app, support::*};

const WORKLOADS: [(&str, &str); 3] = [("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")];

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

/// The mesh: services `a`, `b`, `c` (HTTP on port 80, each served by its own account), with endpoints
/// at `endpoint` when given.
fn mesh(endpoint: Option<SocketAddr>) -> String {
    let mut y = String::new();
    for (w, _) in WORKLOADS {
        y.push_str(&format!(
            "---\nkind: Service\nmetadata: {{name: {w}, namespace: default}}\nspec: {{ports: [{{port: 80, protocol: http}}]}}\n"
        ));
        if let Some(e) = endpoint {
            y.push_str(&format!(
                "---\nkind: Endpoint\nmetadata: {{name: {w}-gw, namespace: default}}\nspec: {{service: {w}, address: \"{e}\", spiffe_id: \"{}\"}}\n",
                id(w)
            ));
        }
    }
    y
}

/// A gateway for the three workloads, identity `node` (its own account in `quicmesh-system`), with an
/// outbound listener per service; the mesh state then names the gateway's own inbound address as every
/// service's endpoint (what a controller would send).
async fn gateway(pki: &Pki, apps: &[SocketAddr; 3]) -> Running {
    pki.issue_at(
        "node",
        &format!("spiffe://{TD}/ns/quicmesh-system/sa/node"),
        -time::Duration::minutes(1),
        time::Duration::hours(1),
    );
    let mut body = String::from("[inbound]\nlisten = \"127.0.0.1:0\"\n");
    for (w, _) in WORKLOADS {
        body.push_str(&format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"{w}.default\"\nport = 80\n"
        ));
    }
    for ((w, source), app) in WORKLOADS.iter().zip(apps) {
        pki.issue(w, w);
        body.push_str(&format!(
            "[[workload]]\nname = \"{w}\"\nsources = [\"{source}\"]\ncert = \"{w}.pem\"\nkey = \"{w}.key\"\nports = [{{ port = 80, app = \"{app}\" }}]\n"
        ));
    }
    std::fs::write(pki.path().join("mesh.yaml"), mesh(None)).expect("mesh");
    let cfg = pki.config_with("node", "mesh = \"mesh.yaml\"", "", &body);
    let gw = start_proxy(&cfg).await;
    let rs = model::parse_yaml_documents(&mesh(Some(gw.inbound()))).expect("mesh yaml");
    gw.state.store(MeshState::from_resources(1, TD, rs, []));
    gw
}

/// `GET /echo` over HTTP/1.1 from `source` to `target`: (status, the identity the app saw).
async fn get_from(source: &str, target: SocketAddr) -> std::io::Result<(u16, String)> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source.parse().expect("source ip"), 0))?;
    let mut s = sock.connect(target).await?;
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let seen = text
        .lines()
        .find_map(|l| l.strip_prefix("x-seen-client-id: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok((status, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workloads_call_each_other_through_one_gateway_under_their_own_identities() {
    let pki = Pki::new();
    let apps = [http_app().await.0, http_app().await.0, http_app().await.0];
    let gw = gateway(&pki, &apps).await;
    for (i, (caller, source)) in WORKLOADS.iter().enumerate() {
        for (j, (callee, _)) in WORKLOADS.iter().enumerate() {
            if i == j {
                continue;
            }
            let (status, seen) = get_from(source, gw.outbound(j))
                .await
                .unwrap_or_else(|e| panic!("{caller} -> {callee}: {e}"));
            assert_eq!(status, 200, "{caller} -> {callee}");
            assert_eq!(
                seen,
                id(caller),
                "{callee}'s app sees {caller}'s own identity"
            );
        }
    }
    let m = gw.metrics().await;
    for (caller, _) in WORKLOADS {
        for (callee, _) in WORKLOADS {
            let n = metric(
                &m,
                "quicmesh_requests_total",
                &[
                    "direction=\"inbound\"",
                    &format!("peer=\"{}\"", id(caller)),
                    &format!("service=\"{callee}.default\""),
                    "status_code=\"200\"",
                ],
            );
            let want = if caller == callee { 0.0 } else { 1.0 };
            assert_eq!(n, want, "{caller} -> {callee} counted at the callee:\n{m}");
        }
        // The caller's side counts it with the server's identity: the callee's own certificate.
        let out = metric(
            &m,
            "quicmesh_requests_total",
            &[
                "direction=\"outbound\"",
                &format!("peer=\"{}\"", id(caller)),
            ],
        );
        assert_eq!(out, 2.0, "{caller} answered twice as the server:\n{m}");
    }
    // One QUIC connection per (calling workload, serving workload) pair: six, each seen by both
    // ends of the one gateway.
    for direction in ["outbound", "inbound"] {
        let n = metric(
            &m,
            "quicmesh_peer_handshakes_total",
            &[&format!("direction=\"{direction}\"")],
        );
        assert_eq!(n, 6.0, "{direction} handshakes:\n{m}");
    }

    // An address of no workload gets nothing: not even the node's identity.
    let refused = get_from("127.0.0.9", gw.outbound(0)).await;
    assert!(
        !matches!(refused, Ok((200, _))),
        "a connection from an unknown source was served: {refused:?}"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        metric(
            &gw.metrics().await,
            "quicmesh_tunnel_failures_total",
            &["reason=\"unknown_workload\""],
        ) == 1.0
    })
    .await;
    assert!(counted, "refusal counted:\n{}", gw.metrics().await);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_presents_the_certificate_asked_for_and_none_for_an_identity_it_lacks() {
    let pki = Pki::new();
    let apps = [http_app().await.0, http_app().await.0, http_app().await.0];
    let gw = gateway(&pki, &apps).await;
    pki.issue("caller", "caller");
    let ask = |sa: &str| {
        ServerNames::from_ids([id(sa).parse::<SpiffeId>().expect("id")])
            .sni()
            .to_string()
    };
    for (w, _) in WORKLOADS {
        let (ok, err, server) = probe(pki.path(), gw.inbound(), "caller", &ask(w)).await;
        assert!(ok, "handshake asking for {w}: {err}");
        assert_eq!(
            server,
            id(w),
            "the certificate presented when asking for {w}"
        );
    }
    // The node's own identity and one not on this node are not served by any workload.
    for other in ["stranger", "node"] {
        let (ok, _, server) = probe(pki.path(), gw.inbound(), "caller", &ask(other)).await;
        assert!(!ok, "asking for {other} got a handshake with {server}");
    }
    // The name a caller without a target would send gets no certificate either.
    let (ok, _, _) = probe(pki.path(), gw.inbound(), "caller", "peer.quicmesh.invalid").await;
    assert!(!ok);
    gw.shutdown().await;
}

/// Presents `name.pem` to `target` asking for server name `sni` with the aioquic probe: (accepted,
/// error, the SPIFFE ID of the certificate the server presented).
async fn probe(d: &Path, target: SocketAddr, name: &str, sni: &str) -> (bool, String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/mtls_probe.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(target.ip().to_string())
        .arg(target.port().to_string())
        .arg(d.join(format!("{name}.pem")))
        .arg(d.join(format!("{name}.key")))
        .arg(sni)
        .output()
        .await
        .expect("run the probe");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!(
            "probe output {line:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        v["accepted"].as_bool().unwrap_or(false),
        v["error"].as_str().unwrap_or_default().to_owned(),
        v["server_id"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Controller mode: the node authenticates once (its join token) and asks for its workloads'
/// certificates with its own. The controller signs `a` (placed on this node by its Identity resource)
/// and refuses `b` (placed on another node), `c` (placed nowhere) and the node's own identity by this
/// way; a caller without a node certificate gets nothing. (A gateway process doing the same by itself
/// is the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_controller_mode_a_node_obtains_only_the_identities_placed_on_it() {
    use crate::controller_mode::{admin_client, join_token, start_controller};
    use quicmesh_controller::client;
    use quicmesh_proto::controller as pb;
    use quicmesh_transport::identity::ca::generate_csr;

    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let controller = start_controller(d, "127.0.0.1:0", "1h").await;
    let addr = controller.addr("grpc");
    let admin_token = controller.admin_token();
    let bundle = controller.trust_bundle();
    let node = |n: &str| format!("spiffe://{TD}/ns/default/sa/{n}");
    let mut admin = admin_client(addr, &bundle, &admin_token).await;
    for (sa, on) in [("a", "node-1"), ("b", "node-2")] {
        admin
            .apply(pb::Resource {
                resource: Some(pb::resource::Resource::Identity(pb::Identity {
                    metadata: Some(pb::Metadata {
                        name: sa.into(),
                        namespace: "default".into(),
                        ..Default::default()
                    }),
                    nodes: vec![node(on)],
                    ..Default::default()
                })),
            })
            .await
            .unwrap_or_else(|e| panic!("place {sa} on {on}: {e}"));
    }

    // By hand: the node's certificate for its join token...
    let bundle_pem = std::fs::read_to_string(&bundle).expect("bundle");
    let timeout = Some(Duration::from_secs(10));
    let anonymous = client::connect(
        &addr.to_string(),
        std::slice::from_ref(&bundle_pem),
        None,
        timeout,
    )
    .await
    .expect("connect");
    let mut anonymous = client::proxy(anonymous);
    let node_id: SpiffeId = node("node-1").parse().expect("id");
    let (csr, node_key) = generate_csr(&node_id).expect("csr");
    let token = join_token(addr, &bundle, &admin_token, "node-1").await;
    let issued = anonymous
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: token,
            ..Default::default()
        })
        .await
        .expect("the node bootstraps")
        .into_inner();
    let node_chain = issued.cert_chain_pem.join("");
    std::fs::write(d.join("node.pem"), &node_chain).expect("write");
    std::fs::write(d.join("node.key"), &node_key).expect("write");
    // ...then its workloads' certificates, authenticated with it.
    let ch = client::connect(
        &addr.to_string(),
        std::slice::from_ref(&bundle_pem),
        Some((&node_chain, &node_key)),
        timeout,
    )
    .await
    .expect("connect with the node's certificate");
    let mut as_node = client::proxy(ch);
    let ask = |sa: &str| {
        let w: SpiffeId = id(sa).parse().expect("id");
        let (csr, _) = generate_csr(&w).expect("csr");
        pb::CertifyRequest {
            csr_pem: csr,
            workload_spiffe_id: w.to_string(),
            ..Default::default()
        }
    };
    let a = as_node
        .certify(ask("a"))
        .await
        .expect("a is placed on node-1")
        .into_inner();
    assert_eq!(a.spiffe_id, id("a"));
    for sa in ["b", "c", "node-1"] {
        let e = as_node
            .certify(ask(sa))
            .await
            .expect_err("not placed on node-1");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{sa}: {e}");
        assert!(e.message().contains("not placed on node"), "{sa}: {e}");
    }
    let e = anonymous
        .certify(ask("a"))
        .await
        .expect_err("no node certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
}

/// Applies Service `name` in `default` (HTTP on port 80, served by the account named like it).
async fn http_service(admin: &mut quicmesh_controller::client::Admin, name: &str) {
    use quicmesh_proto::controller as pb;
    admin
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: name.into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![pb::ServicePort {
                    port: 80,
                    protocol: pb::PortProtocol::Http as i32,
                    name: String::new(),
                }],
                versions: vec![],
                identities: vec![],
            })),
        })
        .await
        .unwrap_or_else(|e| panic!("service {name}: {e}"));
}

/// Places Identity `sa` in `default` on `node`.
async fn place(admin: &mut quicmesh_controller::client::Admin, sa: &str, node: &str) {
    use quicmesh_proto::controller as pb;
    admin
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Identity(pb::Identity {
                metadata: Some(pb::Metadata {
                    name: sa.into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                nodes: vec![node.into()],
                ..Default::default()
            })),
        })
        .await
        .unwrap_or_else(|e| panic!("place {sa} on {node}: {e}"));
}

/// Controller mode, as processes: a gateway (node `node-1`) with workloads `a` and `b`, of which
/// only `a` is placed on its node at first. `/ready` says 503 naming `b` and the controller's refusal;
/// once `b` is placed the gateway turns ready. Each workload registered its service's endpoint under
/// its own identity (`ctl proxies` lists each), so a client sidecar that knows only the controller
/// reaches `a` through the endpoint the controller hands out, and `a`'s app sees the client's
/// identity. When the gateway drains, its workloads' endpoints are withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_in_controller_mode_registers_its_workloads_and_is_ready_once_all_are_certified()
{
    use crate::controller_mode::{
        Join, admin_client, join_token, proxy_config, spawn, start_controller,
    };
    use quicmesh_proto::controller as pb;
    use tokio::io::AsyncBufReadExt;

    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let controller = start_controller(d, "127.0.0.1:0", "1h").await;
    let addr = controller.addr("grpc");
    let admin_token = controller.admin_token();
    let bundle = controller.trust_bundle();
    let mut admin = admin_client(addr, &bundle, &admin_token).await;
    for s in ["a", "b"] {
        http_service(&mut admin, s).await;
    }
    place(&mut admin, "a", &id("node-1")).await;

    // The gateway's admin port is fixed beforehand: it prints its ready line only once ready.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let gw_admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let (app_a, _) = http_app().await;
    let (app_b, _) = http_app().await;
    let body = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\n\n[[workload]]\nname = \"a\"\nidentity = \"{}\"\nsources = [\"127.0.0.2\"]\nports = [{{ port = 80, app = \"{app_a}\" }}]\n\n[[workload]]\nname = \"b\"\nidentity = \"{}\"\nsources = [\"127.0.0.3\"]\nports = [{{ port = 80, app = \"{app_b}\" }}]\n",
        id("a"),
        id("b"),
    );
    let join = Join {
        controller: addr,
        bundle: &bundle,
        token: join_token(addr, &bundle, &admin_token, "node-1").await,
        sa: "node-1",
    };
    let cfg = proxy_config(d, "gw", &join, "", &body);
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace(
            "listen = \"127.0.0.1:0\"\n\n[inbound]",
            &format!("listen = \"{gw_admin}\"\n\n[inbound]"),
        )
        .replace("[controller]\n", "[controller]\nproxy_name = \"gw\"\n");
    std::fs::write(&cfg, text).expect("config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("gw.log"))
        .expect("log");
    let mut gw = tokio::process::Command::new(QUICMESH)
        .args(["proxy", "--config", cfg.to_str().expect("utf8")])
        .env("QUICMESH_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the gateway");
    let mut lines = tokio::io::BufReader::new(gw.stdout.take().expect("stdout")).lines();

    // Not ready while b has no certificate, and /ready says which workload and why.
    let (named, last) = settle(
        Duration::from_secs(20),
        || async move {
            if tokio::net::TcpStream::connect(gw_admin).await.is_ok() {
                scrape(gw_admin, "/ready").await
            } else {
                (0, String::new())
            }
        },
        |(code, body)| {
            *code == 503 && body.contains("workload b") && body.contains("not placed on node")
        },
    )
    .await;
    assert!(named, "/ready names the refused workload: {last:?}");
    assert!(!last.1.contains("workload a"), "a is certified: {last:?}");

    // Placed: the gateway's next attempt for b succeeds and it turns ready.
    place(&mut admin, "b", &id("node-1")).await;
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the gateway is ready within 30 s of b's placement")
        .expect("read stdout")
        .expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready JSON");
    assert_eq!(ready["event"], "ready", "{line}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert_eq!(scrape(gw_admin, "/ready").await.0, 200);
    let inbound = ready_addr(&ready, "/inbound");

    // Each workload registered its endpoint (the gateway's inbound address) under its own identity,
    // and follows the controller under a name of its own.
    let (registered, listed) = settle(
        Duration::from_secs(10),
        || {
            let mut admin = admin.clone();
            async move { endpoints(&mut admin).await }
        },
        |listed| listed.len() == 2,
    )
    .await;
    assert!(registered, "two endpoints: {listed:?}");
    let mut seen: Vec<(String, String, String)> = listed
        .iter()
        .filter_map(|r| match &r.resource {
            Some(pb::resource::Resource::Endpoint(e)) => {
                Some((e.service.clone(), e.spiffe_id.clone(), e.address.clone()))
            }
            _ => None,
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a".to_owned(), id("a"), inbound.to_string()),
            ("b".to_owned(), id("b"), inbound.to_string())
        ]
    );
    // Each workload's Watch follows its registration on the same connection: wait for both.
    let (_, names) = settle(
        Duration::from_secs(10),
        || {
            let mut admin = admin.clone();
            async move {
                let proxies = admin
                    .list_proxies(pb::ListProxiesRequest::default())
                    .await
                    .expect("list proxies")
                    .into_inner()
                    .proxies;
                let mut names: Vec<String> = proxies.into_iter().map(|p| p.proxy_name).collect();
                names.sort_unstable();
                names
            }
        },
        |names| *names == ["gw", "gw-a", "gw-b"],
    )
    .await;
    assert_eq!(
        names,
        ["gw", "gw-a", "gw-b"],
        "ctl proxies lists the gateway and each workload"
    );

    // A client sidecar that knows only the controller reaches a through that endpoint.
    let join = Join {
        controller: addr,
        bundle: &bundle,
        token: join_token(addr, &bundle, &admin_token, "client").await,
        sa: "client",
    };
    let cfg = proxy_config(
        d,
        "client",
        &join,
        "",
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"a\"\nport = 80\n",
    );
    let client = spawn(
        &["proxy", "--config", cfg.to_str().expect("utf8")],
        &d.join("client.log"),
    )
    .await;
    let (_, got) = settle(
        Duration::from_secs(10),
        || get_from("127.0.0.1", client.outbound()),
        |got| matches!(got, Ok((200, _))),
    )
    .await;
    let seen = match got {
        Ok((200, seen)) => seen,
        other => panic!("client -> a through the controller's endpoint: {other:?}"),
    };
    assert_eq!(seen, id("client"), "a's app sees the client's own identity");

    // Draining withdraws the workloads' endpoints.
    sigterm(gw.id().expect("running"));
    let status = tokio::time::timeout(Duration::from_secs(15), gw.wait())
        .await
        .expect("the gateway drains within 15 s")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let left = endpoints(&mut admin).await;
    assert!(left.is_empty(), "withdrawn on drain: {left:?}");
}

/// An HTTP app on `10.77.N.2:8080` that answers every GET with the `x-quicmesh-client-id` it got.
const WHO: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (self.headers.get("x-quicmesh-client-id") or "none").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer((sys.argv[1], 8080), H)
s.timeout = 60
print("listening", flush=True)
s.serve_forever()
"#;

/// The acceptance: a node gateway in its own network namespace serves three workloads, each in a
/// network namespace of its own routed through the node's (a veth pair each). Every workload calls the
/// others by the services' real addresses (10.96.0.11-13:80, where nothing listens); the gateway's
/// `prerouting` capture redirects the calls into it, attributes each to its workload by source address,
/// and each callee's app answers with the identity it was told: the caller's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workloads_in_three_namespaces_call_each_other_through_capture() {
    use crate::capture::{Netns, path, quicmesh_in, spawn_line};
    let pid = std::process::id();
    let node = match Netns::named(&format!("qm-gw-node-{pid}")) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: gateway capture needs root, ip, nft, python3 and curl ({why})");
            return;
        }
    };
    let pki = Pki::new();
    let d = pki.path();
    let log = d.join("procs.log");
    let mut namespaces = Vec::new();
    let mut apps = Vec::new();
    for (i, (w, _)) in WORKLOADS.iter().enumerate() {
        let n = i + 1;
        let ns = Netns::named(&format!("qm-gw-{w}-{pid}")).expect("workload namespace");
        let (nv, wv) = (format!("qg{pid}{n}n"), format!("qg{pid}{n}w"));
        node.sh(&format!(
            "ip link add {nv} type veth peer name {wv} netns {} && ip addr add 10.77.{n}.1/24 dev {nv} && ip link set {nv} up",
            ns.0
        ))
        .expect("veth");
        ns.sh(&format!(
            "ip addr add 10.77.{n}.2/24 dev {wv} && ip link set {wv} up && ip route add default via 10.77.{n}.1"
        ))
        .expect("workload side");
        let ip = format!("10.77.{n}.2");
        apps.push(spawn_line(&ns.exec(&["python3", "-c", WHO, &ip]), &log, "listening").await);
        namespaces.push(ns);
    }

    // The gateway: static mode, the mesh naming its own inbound address as every service's endpoint
    // (the namespace is new: fixed ports are free).
    pki.issue_at(
        "node",
        &format!("spiffe://{TD}/ns/quicmesh-system/sa/node"),
        -time::Duration::minutes(1),
        time::Duration::hours(1),
    );
    let inbound: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    std::fs::write(d.join("mesh.yaml"), mesh(Some(inbound))).expect("mesh");
    let mut body =
        format!("[inbound]\nlisten = \"{inbound}\"\n\n[capture]\nlisten = \"0.0.0.0:15001\"\n\n");
    for (i, (w, _)) in WORKLOADS.iter().enumerate() {
        let n = i + 1;
        pki.issue(w, w);
        body.push_str(&format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"{w}.default\"\nport = 80\ncapture = \"10.96.0.1{n}:80\"\n\n[[workload]]\nname = \"{w}\"\nsources = [\"10.77.{n}.2\"]\ncert = \"{w}.pem\"\nkey = \"{w}.key\"\nports = [{{ port = 80, app = \"10.77.{n}.2:8080\" }}]\n\n"
        ));
    }
    let cfg = pki.config_with("node", "mesh = \"mesh.yaml\"", "", &body);
    let (gw, ready) = spawn_ready_with(
        "ip",
        &node.exec(&[QUICMESH, "proxy", "--config", path(&cfg)]),
        &log,
    )
    .await;
    let admin = ready_addr(&ready, "/admin");
    quicmesh_in(&node, &["capture", "install", "--config", path(&cfg)]).expect("capture install");
    let rules = node.sh("nft list table inet quicmesh").expect("table");
    assert!(rules.contains("prerouting"), "{rules}");

    for (i, (caller, _)) in WORKLOADS.iter().enumerate() {
        for (j, (callee, _)) in WORKLOADS.iter().enumerate() {
            if i == j {
                continue;
            }
            let seen = namespaces[i]
                .sh(&format!(
                    "curl -s --max-time 10 http://10.96.0.1{}:80/",
                    j + 1
                ))
                .unwrap_or_else(|e| panic!("{caller} -> {callee}: {e}"));
            assert_eq!(
                seen,
                id(caller),
                "{callee}'s app sees {caller}'s own identity"
            );
        }
    }
    let m = node
        .sh(&format!("curl -s http://{admin}/metrics"))
        .expect("scrape");
    for (caller, _) in WORKLOADS {
        for (callee, _) in WORKLOADS {
            let n = metric(
                &m,
                "quicmesh_requests_total",
                &[
                    "direction=\"inbound\"",
                    &format!("peer=\"{}\"", id(caller)),
                    &format!("service=\"{callee}.default\""),
                ],
            );
            let want = if caller == callee { 0.0 } else { 1.0 };
            assert_eq!(n, want, "{caller} -> {callee} at the callee:\n{m}");
        }
    }
    quicmesh_in(&node, &["capture", "remove"]).expect("capture remove");
    drop(gw);
    for (mut app, _) in apps {
        let _ = app.kill().await;
    }
}

/// The endpoints registered in namespace `default`.
async fn endpoints(
    admin: &mut quicmesh_controller::client::Admin,
) -> Vec<quicmesh_proto::controller::Resource> {
    use quicmesh_proto::controller as pb;
    admin
        .list(pb::ListRequest {
            kind: pb::Kind::Endpoint as i32,
            namespace: "default".into(),
        })
        .await
        .expect("list endpoints")
        .into_inner()
        .items
}
