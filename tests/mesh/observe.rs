//! Observability acceptance (real processes): a controller, three services (HTTP `web` on two
//! replicas failing 10% of requests, gRPC `api`, TCP `db`) and five proxies; a bounded open-loop load
//! generator drives mixed traffic through the client's proxy and measures it itself; `quicmesh ctl stat
//! -o json` must agree with it: each service's req/s within ±10%, success rate within ±1 point, p99
//! within ±20%, and every TCP connection counted and closed. The controller's own `/metrics` must
//! say the same, and its dashboard (curl as the browser: token login, session cookie, JSON) must show
//! every service, the caller's edge and each proxy's certificate expiry, and refuse strangers.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use quicmesh_proto::{controller as pb, echo::EchoMessage};
use tokio::{net::TcpListener, process::Command};

use crate::{
    controller_mode::{Proc, admin_client, join_token, spawn, start_controller},
    http::{Body, grpc_app, grpc_client, h1_client},
    support::*,
};

/// The dashboard in headless Chromium.
mod chromium;

const BIN: &str = env!("CARGO_BIN_EXE_quicmesh");
/// How long the generator runs, and its rates (requests or connections per second).
const LOAD: Duration = Duration::from_secs(8);
const WEB_RPS: u64 = 100;
const API_RPS: u64 = 50;
const DB_CPS: u64 = 10;

/// An HTTP app answering after 5-25 ms, 500 to every tenth request it gets (`served` is shared by
/// the replicas, so the service fails 10% whichever replica answers).
async fn failing_app(served: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            let served = served.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let ms = 5 + rand::random::<u64>() % 21;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let mut r: Response<Body> =
                            Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
                        if n % 10 == 9 {
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A controller-mode proxy configuration reporting every 200 ms.
fn config(
    dir: &Path,
    name: &str,
    controller: SocketAddr,
    bundle: &Path,
    sa: &str,
    token: &str,
    body: &str,
) -> String {
    std::fs::write(dir.join(format!("{name}.token")), token).expect("token file");
    let text = format!(
        "[controller]\naddress = \"{controller}\"\ntrust_bundle = \"{}\"\njoin_token_file = \"{name}.token\"\nidentity = \"spiffe://{TD}/ns/default/sa/{sa}\"\nreport_interval = \"200ms\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}",
        bundle.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    path.to_str().expect("utf8").to_owned()
}

/// What the generator measured for one service.
#[derive(Default)]
struct Measured {
    sent: AtomicU64,
    ok: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

impl Measured {
    fn record(&self, ok: bool, took: Duration) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(took);
    }

    fn p99_ms(&self) -> f64 {
        let mut l = self
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        l.sort();
        let rank = ((l.len() as f64 * 0.99).ceil() as usize).clamp(1, l.len().max(1));
        l.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// Fires `per_second` tasks a second for `LOAD`, open loop (one task per request), and waits for them
/// (each bounded by its own timeout).
async fn open_loop<F, Fut>(per_second: u64, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let every = Duration::from_secs(1) / per_second as u32;
    let n = LOAD.as_secs() * per_second;
    let mut tick = tokio::time::interval(every);
    let mut tasks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        tick.tick().await;
        tasks.push(tokio::spawn(f()));
    }
    for t in tasks {
        t.await.expect("load task");
    }
}

/// `quicmesh ctl stat -o json ARGS`, parsed.
async fn ctl_stat(
    controller: SocketAddr,
    bundle: &Path,
    token: &str,
    args: &[&str],
) -> serde_json::Value {
    let mut all = vec!["stat", "-o", "json"];
    all.extend_from_slice(args);
    let out = crate::policy::ctl(controller, bundle, token, &all).await;
    serde_json::from_str(&out).expect("ctl stat -o json")
}

/// The client proxy (account `client`) calling web (port 80), api (50051) and db (5432), with
/// `extra` config lines ahead of its listeners; returned with its entries for the three once every
/// proxy of `servers` is an endpoint in its mesh state (so the load starts on a complete mesh).
pub(super) async fn caller(
    d: &Path,
    controller: SocketAddr,
    bundle: &Path,
    admin: &str,
    extra: &str,
    servers: &[Proc],
) -> (Proc, [SocketAddr; 3]) {
    let token = join_token(controller, bundle, admin, "client").await;
    let mut body = extra.to_owned();
    for (svc, port) in [("web", 80), ("api", 50051), ("db", 5432)] {
        body.push_str(&format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"{svc}\"\nport = {port}\n\n"
        ));
    }
    let cfg = config(d, "client", controller, bundle, "client", &token, &body);
    let client = spawn(&["proxy", "--config", &cfg], &d.join("client.log")).await;
    let entries =
        ["/outbound/0", "/outbound/1", "/outbound/2"].map(|p| ready_addr(&client.ready, p));
    for s in servers {
        let inbound = s.addr("inbound").to_string();
        assert!(
            eventually(Duration::from_secs(5), || async {
                scrape(client.addr("admin"), "/config")
                    .await
                    .1
                    .contains(&inbound)
            })
            .await,
            "{inbound} not in the client's state"
        );
    }
    (client, entries)
}

/// A controller serving `/metrics` and the dashboard too.
async fn start_observed_controller(d: &Path) -> Proc {
    let data = d.join("data");
    spawn(
        &[
            "controller",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            TD,
            "--leaf-ttl",
            "1h",
            "--metrics-addr",
            "127.0.0.1:0",
            "--dashboard-addr",
            "127.0.0.1:0",
        ],
        &d.join("controller.log"),
    )
    .await
}

/// `curl ARGS` (an independent HTTP client): status code and body.
async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new("curl")
            .args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output(),
    )
    .await
    .expect("curl in time")
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The dashboard's overview through the session in cookie `jar`.
async fn overview(base: &str, jar: &Path) -> serde_json::Value {
    let (code, body) = curl(&[
        "-b",
        jar.to_str().expect("utf8"),
        &format!("{base}/api/overview"),
    ])
    .await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("overview JSON")
}

/// The dashboard as its script draws it (`dashboard_dom.js` under node, a minimal DOM, real HTTP),
/// or `None` when node is not installed.
async fn drawn_dashboard(base: &str, token: &str) -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("node")
            .arg(format!("{dir}/tests/mesh/dashboard_dom.js"))
            .arg(format!("{dir}/controller/src/dashboard/app.js"))
            .arg(base)
            .arg(token)
            .output(),
    )
    .await
    .expect("node in time");
    let Ok(out) = out else {
        println!("node is not installed: the dashboard's script is not run");
        return None;
    };
    assert!(
        out.status.success(),
        "dashboard script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn row<'a>(stat: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    stat["rows"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["service"] == service))
        .unwrap_or_else(|| panic!("{service} in {stat:#}"))
}

fn within(what: &str, got: f64, want: f64, share: f64) {
    assert!(
        (got - want).abs() <= want * share,
        "{what}: ctl stat says {got:.3}, the generator measured {want:.3} (±{:.0}%)",
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_stat_agrees_with_the_load_generator() {
    let _heavy = heavy().await;
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let controller = start_observed_controller(d).await;
    let addr = controller.addr("grpc");
    let admin = controller.admin_token();
    let bundle = controller.trust_bundle();
    let mut a = admin_client(addr, &bundle, &admin).await;
    let mut apply = Vec::new();
    for (name, port, protocol) in [
        ("web", 80, pb::PortProtocol::Http),
        ("api", 50051, pb::PortProtocol::Grpc),
        ("db", 5432, pb::PortProtocol::Tcp),
    ] {
        apply.push(pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: name.into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![pb::ServicePort {
                    port,
                    protocol: protocol as i32,
                    name: String::new(),
                }],
                ..Default::default()
            })),
        });
    }
    a.apply_all(pb::ApplyAllRequest { resources: apply })
        .await
        .expect("services");

    // Five proxies: web twice (one account), api, db, and the client calling all three.
    let served = Arc::new(AtomicU64::new(0));
    let (api_app, _) = grpc_app().await;
    let db_app = echo_server().await;
    let mut servers: Vec<Proc> = Vec::new();
    for (name, sa, port, app) in [
        ("web-0", "web", 80, failing_app(served.clone()).await),
        ("web-1", "web", 80, failing_app(served.clone()).await),
        ("api", "api", 50051, api_app),
        ("db", "db", 5432, db_app),
    ] {
        let token = join_token(addr, &bundle, &admin, sa).await;
        // The TCP service's proxy and the client keep access logs.
        let log = if name == "db" {
            "[access_log]\npath = \"db-access.log\"\n\n"
        } else {
            ""
        };
        let cfg = config(
            d,
            name,
            addr,
            &bundle,
            sa,
            &token,
            &format!(
                "{log}[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = {port}, app = \"{app}\" }}]\nservices = [\"{sa}\"]\n"
            ),
        );
        servers.push(spawn(&["proxy", "--config", &cfg], &d.join(format!("{name}.log"))).await);
    }
    // The client keeps an access log too.
    let (client, [web, api, db]) = caller(
        d,
        addr,
        &bundle,
        &admin,
        "[access_log]\npath = \"client-access.log\"\n\n",
        &servers,
    )
    .await;

    // The dashboard: its data needs the token (refused without, or with a wrong one); a login
    // gives a session cookie; the overview before the load shows every service, idle.
    let base = format!("http://{}", controller.addr("dashboard"));
    let (code, page) = curl(&[&format!("{base}/")]).await;
    assert!(code == 200 && page.contains("<svg"), "{code} {page}");
    let (code, body) = curl(&[&format!("{base}/api/overview")]).await;
    assert_eq!(code, 401, "no token: {body}");
    let (code, _) = curl(&["-d", "token=qma_wrong", &format!("{base}/login")]).await;
    assert_eq!(code, 401, "wrong token");
    let (code, _) = curl(&[
        "-H",
        "authorization: Bearer qma_wrong",
        &format!("{base}/api/overview"),
    ])
    .await;
    assert_eq!(code, 401, "wrong bearer");
    let jar = d.join("cookies.txt");
    let (code, body) = curl(&[
        "-c",
        jar.to_str().expect("utf8"),
        "--data-urlencode",
        &format!("token={admin}"),
        &format!("{base}/login"),
    ])
    .await;
    assert_eq!(code, 303, "login: {body}");
    let before = overview(&base, &jar).await;
    for s in ["web.default", "api.default", "db.default"] {
        assert!(
            before["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == s)),
            "{s} in the graph: {before:#}"
        );
    }

    let (mw, ma, md) = (
        Arc::new(Measured::default()),
        Arc::new(Measured::default()),
        Arc::new(Measured::default()),
    );
    let h1 = h1_client();
    let grpc = grpc_client(api).await;
    let started = Instant::now();
    let load_web = open_loop(WEB_RPS, || {
        let (h1, m) = (h1.clone(), mw.clone());
        async move {
            let t = Instant::now();
            let req = Request::get(format!("http://{web}/"))
                .body(Full::new(Bytes::new()).boxed())
                .expect("request");
            let ok = match tokio::time::timeout(Duration::from_secs(5), h1.request(req)).await {
                Ok(Ok(r)) => {
                    let ok = r.status() == StatusCode::OK;
                    let _ = r.into_body().collect().await;
                    ok
                }
                _ => false,
            };
            m.record(ok, t.elapsed());
        }
    });
    let load_api = open_loop(API_RPS, || {
        let (mut g, m) = (grpc.clone(), ma.clone());
        async move {
            let t = Instant::now();
            let msg = EchoMessage {
                payload: vec![7; 64],
                delay_ms: 5 + rand::random::<u64>() % 21,
                fail_with: 0,
            };
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(5), g.unary(msg)).await,
                Ok(Ok(_))
            );
            m.record(ok, t.elapsed());
        }
    });
    let load_db = open_loop(DB_CPS, || {
        let m = md.clone();
        async move {
            let t = Instant::now();
            let ok = roundtrip(db, b"select 1", Duration::from_secs(5))
                .await
                .is_ok_and(|b| b == b"select 1");
            m.record(ok, t.elapsed());
        }
    });
    tokio::join!(load_web, load_api, load_db);
    let ran = started.elapsed().as_secs_f64();

    // Wait (bounded) until the reports hold every request the generator finished.
    let admin_api = admin_client(addr, &bundle, &admin).await;
    let (sent_web, sent_api, sent_db) = (
        mw.sent.load(Ordering::Relaxed),
        ma.sent.load(Ordering::Relaxed),
        md.sent.load(Ordering::Relaxed),
    );
    let complete = eventually(Duration::from_secs(5), || {
        let mut admin_api = admin_api.clone();
        async move {
            let r = admin_api
                .get_stats(pb::StatsRequest {
                    window_seconds: 60,
                    service: String::new(),
                    edges: true,
                    peers: false,
                })
                .await
                .expect("GetStats")
                .into_inner();
            // The web proxies' own (inbound) reports may trail the client's by an interval.
            let inbound_web: u64 = r
                .edges
                .iter()
                .filter(|e| e.service == "web.default" && e.direction == "inbound")
                .map(|e| e.requests)
                .sum();
            let of = |s: &str| {
                r.services
                    .iter()
                    .find(|x| x.service == s)
                    .cloned()
                    .unwrap_or_default()
            };
            of("web.default").requests == sent_web
                && inbound_web == sent_web
                && of("api.default").requests == sent_api
                && of("db.default").tcp_opened == sent_db
                && of("db.default").tcp_open == 0
        }
    })
    .await;
    let stat = ctl_stat(addr, &bundle, &admin, &[]).await;
    assert!(complete, "the reports never held all the traffic: {stat:#}");
    let (web_s, api_s, db_s) = (
        row(&stat, "web.default"),
        row(&stat, "api.default"),
        row(&stat, "db.default"),
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    println!(
        "generator: web {sent_web} ({:.1}/s, ok {}, p99 {:.1} ms), api {sent_api} ({:.1}/s, p99 {:.1} ms), db {sent_db} connections, in {ran:.1} s\nctl stat: {stat:#}",
        sent_web as f64 / ran,
        mw.ok.load(Ordering::Relaxed),
        mw.p99_ms(),
        sent_api as f64 / ran,
        ma.p99_ms(),
    );
    within(
        "web req/s",
        f(web_s, "requests_per_second"),
        sent_web as f64 / ran,
        0.10,
    );
    within(
        "api req/s",
        f(api_s, "requests_per_second"),
        sent_api as f64 / ran,
        0.10,
    );
    let web_rate = mw.ok.load(Ordering::Relaxed) as f64 / sent_web as f64;
    assert!(
        (f(web_s, "success_rate") - web_rate).abs() <= 0.01,
        "web success rate: ctl stat {}, generator {web_rate:.4}",
        f(web_s, "success_rate")
    );
    assert!(
        (0.89..=0.91).contains(&web_rate),
        "the app fails 10%: {web_rate}"
    );
    assert_eq!(f(api_s, "success_rate"), 1.0);
    assert_eq!(ma.ok.load(Ordering::Relaxed), sent_api);
    within("web p99", f(web_s, "p99_ms"), mw.p99_ms(), 0.20);
    within("api p99", f(api_s, "p99_ms"), ma.p99_ms(), 0.20);
    assert_eq!(
        md.ok.load(Ordering::Relaxed),
        sent_db,
        "every TCP exchange succeeded"
    );
    assert_eq!(db_s["tcp_opened"], sent_db);
    assert_eq!(db_s["tcp_open"], 0);
    assert_eq!(
        db_s["bytes"],
        sent_db * 16,
        "8 bytes each way per connection"
    );
    for s in [web_s, api_s, db_s] {
        assert_eq!(f(s, "mtls_share"), 1.0, "{s}");
        assert_eq!(s["direction"], "outbound", "callers' view: {s}");
    }
    assert_eq!(
        web_s["failures"]["server"],
        sent_web - mw.ok.load(Ordering::Relaxed)
    );

    // Edges: the client's view and each destination's, with the client's identity as the source.
    // The destinations report on their own schedule: wait (bounded) for both views to hold it all.
    let client_id = format!("spiffe://{TD}/ns/default/sa/client");
    let mut edges = serde_json::Value::Null;
    for _ in 0..50 {
        edges = ctl_stat(addr, &bundle, &admin, &["--edges", "web"]).await;
        let rows = edges["rows"].as_array().map_or(&[][..], Vec::as_slice);
        if rows.len() == 2 && rows.iter().all(|r| r["requests"] == sent_web) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = edges["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{edges:#}");
    for r in rows {
        assert_eq!(r["source"], client_id.as_str());
        assert_eq!(r["requests"], sent_web, "{r}");
    }

    // The QUIC connections under it, from both ends: the client's proxy dialed web's, and web's
    // reports the same link from its side, each with an RTT, a window and the packets it sent.
    let links = ctl_stat(addr, &bundle, &admin, &["--peers"]).await;
    let web_proxy = format!("spiffe://{TD}/ns/default/sa/web");
    let link = |reporter: &str, peer: &str, dir: &str| {
        links["peers"].as_array().and_then(|l| {
            l.iter()
                .find(|p| p["reporter"] == reporter && p["peer"] == peer && p["direction"] == dir)
                .cloned()
        })
    };
    for (reporter, peer, dir) in [
        (client_id.as_str(), web_proxy.as_str(), "outbound"),
        (web_proxy.as_str(), client_id.as_str(), "inbound"),
    ] {
        let l = link(reporter, peer, dir)
            .unwrap_or_else(|| panic!("{reporter} -> {peer} ({dir}) in {links:#}"));
        assert!(f(&l, "rtt_ms") > 0.0 && f(&l, "rtt_ms") < 1000.0, "{l}");
        assert!(l["cwnd_bytes"].as_u64() > Some(0), "{l}");
        assert!(l["sent_packets"].as_u64() > Some(0), "{l}");
        assert!(f(&l, "loss_rate") < 0.05, "loopback: {l}");
    }

    // The controller's own /metrics says what ctl stat says.
    let (code, m) = scrape(controller.addr("metrics"), "/metrics").await;
    assert_eq!(code, 200);
    let web_l = ["service=\"web.default\"", "direction=\"outbound\""];
    let series = |name: &str, extra: &[&str]| {
        let mut l = web_l.to_vec();
        l.extend_from_slice(extra);
        metric(&m, name, &l)
    };
    assert_eq!(
        series("quicmesh_controller_service_requests", &[]),
        sent_web as f64,
        "{m}"
    );
    within(
        "web req/s (/metrics)",
        series("quicmesh_controller_service_requests_per_second", &[]),
        sent_web as f64 / ran,
        0.10,
    );
    assert!(
        (series("quicmesh_controller_service_success_rate", &[]) - web_rate).abs() <= 0.01,
        "{m}"
    );
    within(
        "web p99 (/metrics)",
        series(
            "quicmesh_controller_service_latency_seconds",
            &["quantile=\"0.99\""],
        ) * 1000.0,
        mw.p99_ms(),
        0.20,
    );
    assert_eq!(
        metric(
            &m,
            "quicmesh_controller_edge_requests",
            &[
                "service=\"web.default\"",
                "direction=\"inbound\"",
                &format!("source=\"{client_id}\""),
            ]
        ),
        sent_web as f64
    );
    assert_eq!(
        metric(&m, "quicmesh_controller_proxies_connected", &[]),
        5.0
    );
    assert!(metric(&m, "quicmesh_controller_reports_accepted_total", &[]) > 0.0);
    assert_eq!(
        metric(&m, "quicmesh_controller_reports_refused_total", &[]),
        0.0,
        "{m}"
    );
    assert!(metric(&m, "quicmesh_controller_stats_bytes", &[]) > 0.0);

    // The dashboard after the load: the client's arrow to web with the generator's requests (it
    // was not there before), each proxy's certificate expiry within the 1 h leaf lifetime.
    let after = overview(&base, &jar).await;
    let arrow = |o: &serde_json::Value| {
        o["edges"].as_array().and_then(|e| {
            e.iter()
                .find(|e| e["from"] == client_id.as_str() && e["to"] == "web.default")
                .cloned()
        })
    };
    assert!(arrow(&before).is_none(), "{before:#}");
    let web_arrow = arrow(&after).unwrap_or_else(|| panic!("client -> web in {after:#}"));
    assert_eq!(web_arrow["requests"], sent_web);
    within(
        "web req/s (dashboard)",
        f(&web_arrow, "rps"),
        sent_web as f64 / ran,
        0.10,
    );
    assert!(f(&web_arrow, "p99_ms") > 0.0);
    let proxies = after["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 5, "{after:#}");
    for p in proxies {
        let left = p["cert_expires_in_s"].as_i64().expect("expiry");
        assert!((1..=3600).contains(&left), "{p}");
    }
    // The page's own script draws it: every service a node, the client's arrow to web labelled with
    // its numbers (node runs app.js over a minimal DOM; the arrow was absent before the load).
    if let Some(page) = drawn_dashboard(&base, &admin).await {
        for s in ["web.default", "api.default", "db.default"] {
            assert!(
                page.contains(&format!("data-node=\"{s}\"")),
                "{s} in\n{page}"
            );
        }
        let arrow = page
            .lines()
            .skip_while(|l| {
                !l.contains(&format!(
                    "data-from=\"{client_id}\" data-to=\"web.default\""
                ))
            })
            .take(4)
            .collect::<Vec<_>>()
            .join("\n");
        let rps: f64 = arrow
            .split_once(" rps · ")
            .and_then(|(before, _)| before.rsplit(['>', ' ']).next()?.parse().ok())
            .unwrap_or_else(|| panic!("req/s on the client -> web arrow: {arrow}\n{page}"));
        assert!(rps > 0.0 && arrow.contains("p99 "), "{arrow}");
        std::fs::write(
            std::env::temp_dir().join("quicmesh-dashboard-drawn.txt"),
            &page,
        )
        .expect("keep the drawn page");
    }

    // Every TCP connection has its access log line on both sides, with its bytes.
    let db_lines = json_lines(&d.join("db-access.log"), |l| l.len() as u64 >= sent_db).await;
    assert_eq!(db_lines.len() as u64, sent_db);
    for l in &db_lines {
        assert_eq!(l["kind"], "tcp", "{l}");
        assert_eq!(l["direction"], "inbound");
        assert_eq!(l["service"], "db.default");
        assert_eq!(l["source"], client_id.as_str());
        assert_eq!(l["bytes"], 16);
        assert_eq!(l["ok"], true);
    }
    let client_lines =
        json_lines(&d.join("client-access.log"), |l| l.len() as u64 >= sent_db).await;
    let tcp_out: Vec<_> = client_lines.iter().filter(|l| l["kind"] == "tcp").collect();
    assert_eq!(tcp_out.len() as u64, sent_db);
    assert!(
        tcp_out.iter().all(|l| l["direction"] == "outbound"
            && l["destination"] == format!("spiffe://{TD}/ns/default/sa/db")),
        "{tcp_out:#?}"
    );

    // A bearer token reads it too; after logging out the cookie reads nothing.
    let (code, _) = curl(&[
        "-H",
        &format!("authorization: Bearer {admin}"),
        &format!("{base}/api/overview"),
    ])
    .await;
    assert_eq!(code, 200);
    let (code, _) = curl(&[
        "-b",
        jar.to_str().expect("utf8"),
        "-X",
        "POST",
        &format!("{base}/logout"),
    ])
    .await;
    assert_eq!(code, 303);
    let (code, _) = curl(&[
        "-b",
        jar.to_str().expect("utf8"),
        &format!("{base}/api/overview"),
    ])
    .await;
    assert_eq!(code, 401, "the session ended");
    drop(client);
    drop(servers);
}

/// A controller, the `web` service declared HTTP, its proxy in front of `app` (`web_extra`: config
/// lines ahead of its `[inbound]`) and a client proxy calling it.
struct WebHop {
    controller: Proc,
    addr: SocketAddr,
    admin: String,
    bundle: std::path::PathBuf,
    server: Proc,
    client: Proc,
}

async fn web_hop(d: &Path, app: SocketAddr, web_extra: &str, client_extra: &str) -> WebHop {
    let controller = start_controller(d, "127.0.0.1:0", "1h").await;
    let addr = controller.addr("grpc");
    let admin = controller.admin_token();
    let bundle = controller.trust_bundle();
    let mut a = admin_client(addr, &bundle, &admin).await;
    a.apply(pb::Resource {
        resource: Some(pb::resource::Resource::Service(pb::Service {
            metadata: Some(pb::Metadata {
                name: "web".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            ports: vec![pb::ServicePort {
                port: 80,
                protocol: pb::PortProtocol::Http as i32,
                name: String::new(),
            }],
            ..Default::default()
        })),
    })
    .await
    .expect("service");
    let token = join_token(addr, &bundle, &admin, "web").await;
    let cfg = config(
        d,
        "web",
        addr,
        &bundle,
        "web",
        &token,
        &format!(
            "{web_extra}[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\n"
        ),
    );
    let server = spawn(&["proxy", "--config", &cfg], &d.join("web.log")).await;
    let token = join_token(addr, &bundle, &admin, "client").await;
    let cfg = config(
        d,
        "client",
        addr,
        &bundle,
        "client",
        &token,
        &format!(
            "{client_extra}[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n"
        ),
    );
    let client = spawn(&["proxy", "--config", &cfg], &d.join("client.log")).await;
    WebHop {
        controller,
        addr,
        admin,
        bundle,
        server,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_shows_requests_within_a_second_and_stops_at_the_proxies() {
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let app = failing_app(Arc::new(AtomicU64::new(0))).await;
    let WebHop {
        controller: _controller,
        addr,
        admin,
        bundle,
        server,
        client,
    } = web_hop(d, app, "", "").await;
    let mut a = admin_client(addr, &bundle, &admin).await;
    let web = client.outbound();
    let h1 = h1_client();
    let get = |path: &'static str| {
        let h1 = h1.clone();
        async move {
            let req = Request::get(format!("http://{web}{path}"))
                .header("x-secret", "hunter2")
                .body(Full::new(Bytes::new()).boxed())
                .expect("request");
            let r = tokio::time::timeout(Duration::from_secs(5), h1.request(req))
                .await
                .expect("in time")
                .expect("response");
            let _ = r.into_body().collect().await;
        }
    };
    get("/warm").await;
    let tapping = |on: bool| {
        let admin = server.addr("admin");
        async move {
            eventually(Duration::from_secs(5), || async {
                let m = scrape(admin, "/metrics").await.1;
                (metric(&m, "quicmesh_tap_active", &[]) == 1.0) == on
            })
            .await
        }
    };
    assert!(tapping(false).await, "nobody taps yet");

    // Without the admin token: UNAUTHENTICATED.
    let pem = std::fs::read_to_string(&bundle).expect("bundle");
    let ch = quicmesh_controller::client::connect(&addr.to_string(), &[pem], None, None)
        .await
        .expect("connect");
    let mut stranger = quicmesh_controller::client::admin(ch, "qma_not-the-token").expect("client");
    let e = stranger
        .tap(pb::TapRequest {
            service: "web".into(),
            max_per_second: 10,
        })
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(tapping(false).await, "a refused tap starts nothing");

    let mut stream = a
        .tap(pb::TapRequest {
            service: "web".into(),
            max_per_second: 50,
        })
        .await
        .expect("tap")
        .into_inner();
    assert!(
        tapping(true).await,
        "the server's proxy never started sampling"
    );
    let sent = Instant::now();
    get("/orders?id=7").await;
    let e = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("a tapped request within 1 s")
        .expect("tap stream")
        .expect("an event");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(e.service, "web.default");
    assert_eq!(
        (e.method.as_str(), e.path.as_str()),
        ("GET", "/orders?id=7")
    );
    assert_eq!(e.source, format!("spiffe://{TD}/ns/default/sa/client"));
    assert_eq!(e.destination, format!("spiffe://{TD}/ns/default/sa/web"));
    assert!(matches!(e.status, 200 | 500), "{e:?}");
    assert_eq!(e.request_id.len(), 32, "{e:?}");
    assert!(e.latency_us > 0);
    assert!(
        !format!("{e:?}").contains("hunter2"),
        "no header values: {e:?}"
    );

    // The operator goes away: the proxies stop sampling.
    drop(stream);
    assert!(tapping(false).await, "sampling went on after the tap ended");

    // The same through `ctl tap`, as an operator runs it.
    let mut ctl = Command::new(BIN)
        .arg("ctl")
        .args(["--controller", &addr.to_string()])
        .arg("--ca")
        .arg(&bundle)
        .args([
            "tap",
            "web",
            "--count",
            "1",
            "--duration",
            "20s",
            "-o",
            "json",
        ])
        .env("QUICMESH_ADMIN_TOKEN", &admin)
        .env("QUICMESH_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ctl tap");
    assert!(tapping(true).await, "ctl tap never started sampling");
    get("/from-ctl").await;
    let out = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = String::new();
        let mut o = ctl.stdout.take().expect("stdout");
        tokio::io::AsyncReadExt::read_to_string(&mut o, &mut s)
            .await
            .expect("read");
        s
    })
    .await
    .expect("ctl tap ended after one request");
    let row: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("a line")).expect("json");
    assert_eq!(row["path"], "/from-ctl", "{row}");
    assert_eq!(row["method"], "GET");
    assert!(
        tapping(false).await,
        "sampling went on after ctl tap exited"
    );

    // `ctl top`: the busiest paths of the tapped service, refreshed; ends after its iterations.
    let top = crate::policy::ctl(
        addr,
        &bundle,
        &admin,
        &[
            "top",
            "web",
            "--iterations",
            "5",
            "--interval",
            "500ms",
            "-o",
            "json",
        ],
    );
    let traffic = async {
        assert!(tapping(true).await, "ctl top never started sampling");
        for _ in 0..3 {
            get("/top-busy").await;
        }
        get("/top-quiet").await;
    };
    let (out, ()) = tokio::join!(top, traffic);
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a refresh")).expect("json");
    assert_eq!(out.lines().count(), 5, "one line per refresh: {out}");
    let rows = last["rows"].as_array().expect("rows");
    assert_eq!(rows[0]["path"], "/top-busy", "{last:#}");
    assert_eq!(rows[0]["count"], 3);
    assert_eq!(rows[1]["path"], "/top-quiet");
    assert_eq!(
        rows[0]["source"],
        format!("spiffe://{TD}/ns/default/sa/client")
    );
    assert!(
        tapping(false).await,
        "sampling went on after ctl top exited"
    );
    drop(client);
    drop(server);
}

/// An HTTP app answering 200 with the `traceparent` it received (empty if none) as the body.
async fn trace_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = req
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Full::new(Bytes::from(seen)).boxed(),
                        ))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Lines of a JSON-lines file once `done` holds for them (bounded wait: the writer is
/// asynchronous); the lines as they are when the wait ends either way.
async fn json_lines(
    path: &Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    eventually(Duration::from_secs(5), || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        let ok = done(&lines);
        async move { ok }
    })
    .await;
    lines
}

type H1Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A GET through `web` (the client proxy's outbound listener) with an optional `traceparent`;
/// the app's answer (the `traceparent` it saw).
async fn traced_get(
    h1: &H1Client,
    web: SocketAddr,
    path: &str,
    traceparent: Option<&str>,
) -> String {
    let mut req = Request::get(format!("http://{web}{path}"));
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let req = req.body(Full::new(Bytes::new()).boxed()).expect("request");
    let r = tokio::time::timeout(Duration::from_secs(5), h1.request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf8")
}

/// Waits until `web` answers (the endpoint may take a moment to reach the client's state).
async fn wait_for_web(h1: &H1Client, web: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            let req = Request::get(format!("http://{web}/warm"))
                .body(Full::new(Bytes::new()).boxed())
                .expect("request");
            matches!(
                tokio::time::timeout(Duration::from_secs(2), h1.request(req)).await,
                Ok(Ok(r)) if r.status() == StatusCode::OK
            )
        })
        .await,
        "web never answered"
    );
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_and_an_untouched_traceparent_without_tracing() {
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let app = trace_app().await;
    // The controller lives as long as its handle.
    let WebHop {
        controller: _controller,
        server,
        client,
        ..
    } = web_hop(
        d,
        app,
        "[access_log]\npath = \"web-access.log\"\n\n",
        "[access_log]\npath = \"client-access.log\"\n\n",
    )
    .await;
    let web = client.outbound();
    let h1 = h1_client();
    wait_for_web(&h1, web).await;

    // Tracing is off: the caller's context reaches the app as it was sent, and none is invented.
    assert_eq!(traced_get(&h1, web, "/traced?x=1", Some(SENT)).await, SENT);
    assert_eq!(traced_get(&h1, web, "/untraced", None).await, "");

    // The web proxy's access log: one line per request, with identities, status and trace.
    let lines = json_lines(&d.join("web-access.log"), |l| {
        ["/traced?x=1", "/untraced"]
            .iter()
            .all(|p| l.iter().any(|x| x["path"] == *p))
    })
    .await;
    let traced = lines
        .iter()
        .find(|l| l["path"] == "/traced?x=1")
        .unwrap_or_else(|| panic!("/traced in {lines:#?}"));
    assert_eq!(traced["kind"], "http");
    assert_eq!(traced["direction"], "inbound");
    assert_eq!(traced["method"], "GET");
    assert_eq!(traced["status"], 200);
    assert_eq!(traced["service"], "web.default");
    assert_eq!(
        traced["source"],
        format!("spiffe://{TD}/ns/default/sa/client")
    );
    assert_eq!(
        traced["destination"],
        format!("spiffe://{TD}/ns/default/sa/web")
    );
    assert_eq!(traced["request_id"].as_str().map(str::len), Some(32));
    assert!(traced["duration_ms"].as_f64().is_some_and(|d| d > 0.0));
    assert_eq!(traced["traceparent"], SENT);
    let untraced = lines
        .iter()
        .find(|l| l["path"] == "/untraced")
        .unwrap_or_else(|| panic!("/untraced in {lines:#?}"));
    assert!(untraced.get("traceparent").is_none(), "{untraced}");
    // The caller's proxy logs the same request from its side, under the same request id.
    let out = json_lines(&d.join("client-access.log"), |l| {
        l.iter().any(|x| x["path"] == "/traced?x=1")
    })
    .await;
    let sent = out
        .iter()
        .find(|l| l["path"] == "/traced?x=1")
        .unwrap_or_else(|| panic!("/traced in {out:#?}"));
    for (k, v) in [
        ("kind", "http"),
        ("direction", "outbound"),
        ("method", "GET"),
        ("service", "web.default"),
        ("traceparent", SENT),
    ] {
        assert_eq!(sent[k], v, "{k} in {sent}");
    }
    assert_eq!(sent["status"], 200);
    assert_eq!(sent["request_id"], traced["request_id"], "{sent}");
    assert_eq!(sent["source"], traced["source"]);
    assert_eq!(sent["destination"], traced["destination"]);
    assert!(sent["duration_ms"].as_f64() >= traced["duration_ms"].as_f64());
    let m = server.metrics().await;
    assert!(
        metric(&m, "quicmesh_access_log_lines_total", &[]) >= 2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "quicmesh_access_log_dropped_total", &[]), 0.0);
    assert_eq!(metric(&m, "quicmesh_trace_spans_exported_total", &[]), 0.0);
    drop(client);
    drop(server);
}

/// Starts `tests/peers/otlp_collector.py` (grpcio, opentelemetry-proto): its port and its span
/// lines; None, with the reason printed, when python3 or the packages are missing.
async fn otlp_collector() -> Option<(
    tokio::process::Child,
    u16,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
)> {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, opentelemetry.proto.collector.trace.v1"])
        .output()
        .await;
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIP: python3 with grpcio and opentelemetry-proto not found (pip install grpcio opentelemetry-proto)"
        );
        return None;
    }
    python_peer(
        "otlp_collector.py",
        &["--max-seconds".as_ref(), "120".as_ref()],
    )
    .await
}

/// Spans of `trace` from `rx` until `n` arrived (bounded wait: proxies batch for up to a second).
async fn spans_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    seen: &mut Vec<serde_json::Value>,
    trace: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let of: Vec<_> = seen
            .iter()
            .filter(|s| s["trace_id"] == trace)
            .cloned()
            .collect();
        if of.len() >= n {
            return of;
        }
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(s)) => seen.push(s),
            _ => panic!(
                "{} of {n} spans of {trace} within 10 s; all: {seen:#?}",
                of.len()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_of_both_hops_reach_an_independent_collector() {
    raise_fd_limit();
    let Some((_collector, port, mut rx)) = otlp_collector().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let app = trace_app().await;
    let tracing =
        format!("[tracing]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nsample_percent = 100\n\n");
    let WebHop {
        controller: _controller,
        server,
        client,
        ..
    } = web_hop(d, app, &tracing, &tracing).await;
    let web = client.outbound();
    let h1 = h1_client();
    wait_for_web(&h1, web).await;
    let mut seen = Vec::new();

    // A caller's sampled trace goes on: the client proxy's span is the child of the caller's, the
    // web proxy's the child of the client proxy's, and the app sees the web proxy's span as parent.
    let at_app = traced_get(&h1, web, "/traced?x=1", Some(SENT)).await;
    let spans = spans_of(&mut rx, &mut seen, TRACE, 2).await;
    let kind = |k: i64| {
        spans
            .iter()
            .find(|s| s["kind"] == k)
            .unwrap_or_else(|| panic!("kind {k} in {spans:#?}"))
    };
    let (out, inb) = (kind(3), kind(2));
    assert_eq!(out["parent_span_id"], "00f067aa0ba902b7", "{out}");
    assert_eq!(inb["parent_span_id"], out["span_id"], "{inb}");
    assert_eq!(
        at_app,
        format!("00-{TRACE}-{}-01", inb["span_id"].as_str().expect("id"))
    );
    let client_id = format!("spiffe://{TD}/ns/default/sa/client");
    let web_id = format!("spiffe://{TD}/ns/default/sa/web");
    assert_eq!(out["resource"]["quicmesh.identity"], client_id.as_str());
    assert_eq!(
        out["attributes"]["quicmesh.destination_identity"],
        web_id.as_str()
    );
    assert_eq!(inb["resource"]["quicmesh.identity"], web_id.as_str());
    assert_eq!(
        inb["attributes"]["quicmesh.source_identity"],
        client_id.as_str()
    );
    for s in [out, inb] {
        assert_eq!(s["attributes"]["http.request.method"], "GET", "{s}");
        assert_eq!(s["attributes"]["url.path"], "/traced?x=1", "{s}");
        assert_eq!(s["attributes"]["http.response.status_code"], "200", "{s}");
        assert_eq!(s["attributes"]["quicmesh.service"], "web.default", "{s}");
        assert_eq!(s["status"], 0, "unset: no error: {s}");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
    }
    assert_eq!(
        out["attributes"]["quicmesh.request_id"], inb["attributes"]["quicmesh.request_id"],
        "one request id across the hops"
    );

    // No context: the caller's proxy starts a trace (sampled at 100%), a root span.
    let fresh = traced_get(&h1, web, "/untraced", None).await;
    let trace = fresh.get(3..35).expect("a traceparent").to_owned();
    assert_ne!(trace, TRACE);
    let spans = spans_of(&mut rx, &mut seen, &trace, 2).await;
    assert!(
        spans
            .iter()
            .any(|s| s["kind"] == 3 && s["parent_span_id"] == ""),
        "{spans:#?}"
    );
    // An unsampled context passes untouched and records nothing.
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-00";
    assert_eq!(
        traced_get(&h1, web, "/unsampled", Some(unsampled)).await,
        unsampled
    );
    let m = client.metrics().await;
    assert_eq!(
        metric(&m, "quicmesh_trace_spans_dropped_total", &[]),
        0.0,
        "{m}"
    );
    assert!(
        metric(&m, "quicmesh_trace_spans_exported_total", &[]) >= 2.0,
        "{m}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4737"),
        "an unsampled request was recorded"
    );
    drop(client);
    drop(server);
}

/// Every series name a Prometheus text exposition declares, with the suffixes its type implies.
fn exposed_names(text: &str) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_metric_names_the_proxy_exposes() {
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json"),
    )
    .expect("deploy/grafana-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let exprs: Vec<String> = json["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("quicmesh_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            used.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    assert!(used.len() >= 10, "the dashboard uses {used:?}");
    // What a client and a server proxy expose after one HTTP request between them (families with
    // labels appear with their first sample).
    let (app, _) = crate::http::http_app().await;
    let (_pki, server, client) = crate::http::mesh_pair(app, "http", "").await;
    let req = Request::get(format!("http://{}/echo", client.outbound(0)))
        .body(Full::new(Bytes::new()).boxed())
        .expect("request");
    let r = h1_client().request(req).await.expect("response");
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r.into_body().collect().await;
    let mut exposed = exposed_names(&server.metrics().await);
    exposed.extend(exposed_names(&client.metrics().await));
    let unknown: Vec<_> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics the proxy does not expose: {unknown:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
}
