//! The typed mesh state in static mode: a mesh file in the YAML `ctl apply` takes gives the proxies
//! their endpoints, servers and policies, the same way a controller snapshot does; `/config` shows it.

use std::{net::SocketAddr, time::Duration};

use quicmesh_transport::{Proxy, ProxyConfig};

use crate::support::*;

const LONG: Duration = Duration::from_secs(10);

fn write_mesh(pki: &Pki, name: &str, yaml: &str) {
    std::fs::write(pki.path().join(name), yaml).expect("write mesh file");
}

/// A client proxy `name` whose only outbound service is `echo`, with its endpoints from `mesh.yaml`.
async fn mesh_client(pki: &Pki, name: &str, mesh: &str) -> Running {
    pki.issue(name, name);
    let file = format!("{name}-mesh.yaml");
    write_mesh(pki, &file, mesh);
    let cfg = pki.config_with(
        name,
        &format!("mesh = \"{file}\""),
        "",
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nmax_attempts = 1\n",
    );
    start_proxy(&cfg).await
}

fn client_mesh(server: SocketAddr) -> String {
    format!(
        r#"
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{port: 7, protocol: tcp}}], identities: [echo]}}
---
kind: Endpoint
metadata: {{name: echo-0, namespace: default}}
spec: {{service: echo, address: "{server}", spiffe_id: "spiffe://mesh.local/ns/default/sa/echo"}}
---
kind: Endpoint
metadata: {{name: evil-0, namespace: default}}
spec: {{service: echo, address: "127.0.0.1:9", spiffe_id: "spiffe://mesh.local/ns/default/sa/evil"}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_source_rate_limit_refuses_each_callers_tcp_connections_separately() {
    let pki = Pki::new();
    let app = echo_server().await;
    pki.issue("server", "echo");
    write_mesh(
        &pki,
        "server-mesh.yaml",
        r#"
kind: Policy
metadata: {name: limit, namespace: default}
spec:
  target_service: echo
  rate_limit: {requests_per_second: 1, burst: 4, per_source: true}
"#,
    );
    let cfg = pki.config_with(
        "server",
        "mesh = \"server-mesh.yaml\"",
        "",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{app}\" }}]\n"
        ),
    );
    let server = start_proxy(&cfg).await;
    let a = mesh_client(&pki, "a", &client_mesh(server.inbound())).await;
    let b = mesh_client(&pki, "b", &client_mesh(server.inbound())).await;
    // Each caller gets its burst and first connection (5), plus at most one more if a second passes.
    for c in [&a, &b] {
        let mut ok = 0;
        for i in 0..10u8 {
            let msg = [b'r', i];
            if roundtrip(c.outbound(0), &msg, LONG).await.ok().as_deref() == Some(&msg[..]) {
                ok += 1;
            }
        }
        assert!((5..=6).contains(&ok), "{ok} of 10 connections got through");
    }
    let m = server.metrics().await;
    let denied = metric(
        &m,
        "quicmesh_policy_denials_total",
        &["policy=\"rate_limit\"", "mode=\"enforce\""],
    );
    assert!((8.0..=10.0).contains(&denied), "{denied}: {m}");
    let c = a.metrics().await;
    assert!(
        metric(
            &c,
            "quicmesh_tunnel_failures_total",
            &["reason=\"rate_limited\""]
        ) >= 4.0,
        "{c}"
    );
    for p in [a, b, server] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_mesh_file_gives_endpoints_and_its_authorization_policy_is_enforced() {
    let pki = Pki::new();
    let app = echo_server().await;
    pki.issue("server", "echo");
    write_mesh(
        &pki,
        "server-mesh.yaml",
        r#"
kind: Policy
metadata: {name: only-good, namespace: default}
spec:
  target_service: echo
  authorization:
    default_action: deny
    allow: [{from_identities: ["spiffe://mesh.local/ns/default/sa/good"]}]
"#,
    );
    let cfg = pki.config_with(
        "server",
        "mesh = \"server-mesh.yaml\"",
        "",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{app}\" }}]\n"
        ),
    );
    let server = start_proxy(&cfg).await;

    let good = mesh_client(&pki, "good", &client_mesh(server.inbound())).await;
    let bad = mesh_client(&pki, "bad", &client_mesh(server.inbound())).await;

    // The endpoint came from the mesh file alone (the TOML names none); the one registered by an
    // identity the Service does not allow was left out, so every connection reaches the server.
    for i in 0..20u8 {
        let msg = [b'm', i];
        assert_eq!(
            roundtrip(good.outbound(0), &msg, LONG)
                .await
                .expect("good client"),
            msg
        );
    }
    // The policy refuses the other identity with FORBIDDEN before the app is reached.
    let back = roundtrip(bad.outbound(0), b"let me in", LONG).await;
    assert!(
        back.as_ref().map_or(true, |b| b.is_empty()),
        "refused client got {back:?}"
    );
    let s = server.metrics().await;
    assert_eq!(
        metric(
            &s,
            "quicmesh_tunnel_failures_total",
            &["reason=\"unauthorized\""]
        ),
        1.0,
        "{s}"
    );
    let c = bad.metrics().await;
    assert_eq!(
        metric(
            &c,
            "quicmesh_tunnel_failures_total",
            &["reason=\"forbidden\""]
        ),
        1.0,
        "{c}"
    );

    // /config shows the effective state each proxy decides on.
    let (code, body) = scrape(server.addrs.admin, "/config").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["identity"], "spiffe://mesh.local/ns/default/sa/echo");
    assert_eq!(
        v["mesh"]["services"]["echo.default"]["policy"]["authorization"]["default_action"], "deny",
        "{body}"
    );
    let (_, body) = scrape(good.addrs.admin, "/config").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let eps = &v["mesh"]["services"]["echo.default"]["endpoints"];
    assert_eq!(eps.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(eps[0]["address"], server.inbound().to_string());
    assert!(
        v["mesh"]["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("sa/evil")))),
        "{body}"
    );
    assert_eq!(v["listeners"]["outbound"][0]["service"], "echo");

    for p in [good, bad, server] {
        p.shutdown().await;
    }
}

#[tokio::test]
async fn a_bad_mesh_file_stops_start_up_naming_the_file_the_resource_and_the_field() {
    let pki = Pki::new();
    pki.issue("client", "client");
    let cases = [
        (
            "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 0, protocol: tcp}]}\n",
            "spec.ports[0].port",
        ),
        (
            "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 80, protocol: tcp}]}\n---\nkind: Nope\n",
            "document 2",
        ),
        (
            "kind: TrustDomain\nmetadata: {name: default}\nspec: {trust_domain: other, leaf_ttl_seconds: 60}\n",
            "the trust domain comes from the certificate",
        ),
        ("[[[[", "mesh.yaml"),
    ];
    for (yaml, want) in cases {
        write_mesh(&pki, "mesh.yaml", yaml);
        let path = pki.config_with(
            "client",
            "mesh = \"mesh.yaml\"",
            "",
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n",
        );
        let cfg = ProxyConfig::load(&path).expect("the TOML itself is fine");
        let err = match Proxy::bind(&cfg, &path).await {
            Ok(_) => panic!("a bad mesh file was accepted: {yaml}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("mesh"), "{err}");
        assert!(err.contains("mesh.yaml"), "{err}");
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    // A missing file says so.
    std::fs::remove_file(pki.path().join("mesh.yaml")).expect("rm");
    let path = pki.config_with("client", "mesh = \"mesh.yaml\"", "", "");
    let cfg = ProxyConfig::load(&path).expect("toml");
    let err = match Proxy::bind(&cfg, &path).await {
        Ok(_) => panic!("a missing mesh file was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot read"), "{err}");
}
