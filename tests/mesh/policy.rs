//! Policies applied with `ctl apply` are enforced live by proxies in controller mode (real processes):
//! a canary split lands in its proportions and moves under load without failed requests; a rate limit
//! set on a service holds for the service in total, shared by its endpoints, and is shared again when
//! one drains or is killed.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use tokio::process::Command;

use crate::{
    controller_mode::{Join, Proc, join_token, proxy_config, spawn, start_controller},
    http::{get_body, h1_client, http_app, named_app},
    support::*,
};

const BIN: &str = env!("CARGO_BIN_EXE_quicmesh");

/// A controller process, and what `ctl` and joining proxies need to reach it.
struct ControlPlane {
    dir: tempfile::TempDir,
    controller: Option<Proc>,
    addr: SocketAddr,
    admin: String,
    bundle: std::path::PathBuf,
}

impl ControlPlane {
    async fn start() -> Self {
        raise_fd_limit();
        let dir = tempfile::tempdir().expect("tempdir");
        let controller = start_controller(dir.path(), "127.0.0.1:0", "1h").await;
        let addr = controller.addr("grpc");
        let admin = controller.admin_token();
        let bundle = controller.trust_bundle();
        Self {
            dir,
            controller: Some(controller),
            addr,
            admin,
            bundle,
        }
    }

    async fn ctl(&self, args: &[&str]) -> String {
        ctl(self.addr, &self.bundle, &self.admin, args).await
    }

    async fn apply(&self, yaml: &str) {
        ctl_apply(self.addr, &self.bundle, &self.admin, self.dir.path(), yaml).await;
    }

    /// A proxy process `name` joined as account `sa`: top-level keys `top`, then its tables `body`.
    async fn proxy(&self, name: &str, sa: &str, top: &str, body: &str) -> Proc {
        let d = self.dir.path();
        let j = Join {
            controller: self.addr,
            bundle: &self.bundle,
            token: join_token(self.addr, &self.bundle, &self.admin, sa).await,
            sa,
        };
        let cfg = proxy_config(d, name, &j, top, body);
        spawn(
            &["proxy", "--config", cfg.to_str().expect("utf8")],
            &d.join(format!("{name}.log")),
        )
        .await
    }

    /// Kills the controller; the proxies keep running.
    fn stop_controller(&mut self) {
        self.controller = None;
    }
}

/// Runs `quicmesh ctl ARGS` against the controller; its stdout, after checking it succeeded.
pub(crate) async fn ctl(
    controller: SocketAddr,
    bundle: &Path,
    token: &str,
    args: &[&str],
) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN)
            .arg("ctl")
            .args(["--controller", &controller.to_string()])
            .arg("--ca")
            .arg(bundle)
            .args(args)
            .env("QUICMESH_ADMIN_TOKEN", token)
            .env("QUICMESH_LOG", "warn")
            .output(),
    )
    .await
    .expect("ctl in time")
    .expect("run ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn ctl_apply(controller: SocketAddr, bundle: &Path, token: &str, dir: &Path, yaml: &str) {
    let file = dir.join(format!("apply-{}.yaml", rand::random::<u32>()));
    std::fs::write(&file, yaml).expect("write");
    ctl(
        controller,
        bundle,
        token,
        &["apply", "-f", file.to_str().expect("utf8")],
    )
    .await;
}

/// Waits until the proxy's effective state (`/config`) contains `needle`.
async fn enforced(p: &Proc, needle: &str) {
    let admin = p.addr("admin");
    assert!(
        eventually(Duration::from_secs(5), || async {
            scrape(admin, "/config").await.1.contains(needle)
        })
        .await,
        "{needle} not in the proxy's state within 5 s: {}",
        scrape(admin, "/config").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_split_and_a_service_rate_limit_apply_live_through_the_controller() {
    let _heavy = heavy().await;
    let mut cp = ControlPlane::start().await;
    cp.apply("kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 80, protocol: http}], versions: [v1, v2]}\n",
    )
    .await;

    // Two replicas of `web` (one account), versions v1 and v2, each in front of an app naming it.
    let mut servers = Vec::new();
    for v in ["v1", "v2"] {
        let app = named_app(v, Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
        servers.push(cp.proxy(&format!("web-{v}"), "web", "", &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\nservices = [\"web\"]\nversion = \"{v}\"\n"
            )).await);
    }
    let client = cp
        .proxy(
            "client",
            "client",
            "",
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n",
        )
        .await;
    let target = client.outbound();
    for s in &servers {
        enforced(&client, &s.addr("inbound").to_string()).await;
    }

    // 90/10.
    cp.apply("kind: Policy\nmetadata: {name: canary, namespace: default}\nspec: {target_service: web, traffic_split: {backends: [{service_version: v1, weight: 90}, {service_version: v2, weight: 10}]}}\n").await;
    enforced(&client, "\"weight\": 90").await;
    let c = h1_client();
    let v2 = Arc::new(AtomicU64::new(0));
    let total = 5_000u64;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, v2) = (c.clone(), v2.clone());
            tokio::spawn(async move {
                for _ in 0..total / 10 {
                    let (status, body) = get_body(&c, target).await;
                    assert_eq!(status, StatusCode::OK);
                    if body.as_ref() == b"v2" {
                        v2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("load task");
    }
    let share = v2.load(Ordering::Relaxed) as f64 / total as f64;
    assert!(
        (share - 0.10).abs() <= 0.03,
        "v2 got {share:.3} of requests"
    );

    // Moved to 0/100 under load: no request fails, and then every request lands on v2.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (c, stop, failed, sent) = (c.clone(), stop.clone(), failed.clone(), sent.clone());
            tokio::spawn(async move {
                // Bounded: at most 20,000 requests per task.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (status, _) = get_body(&c, target).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if status != StatusCode::OK {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    cp.apply("kind: Policy\nmetadata: {name: canary, namespace: default}\nspec: {target_service: web, traffic_split: {backends: [{service_version: v1, weight: 0}, {service_version: v2, weight: 100}]}}\n").await;
    enforced(&client, "\"weight\": 100").await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests",
        sent.load(Ordering::Relaxed)
    );
    for _ in 0..200 {
        assert_eq!(get_body(&c, target).await.1.as_ref(), b"v2");
    }

    // A limit of 40 req/s (burst 4) for the service, shared by its two endpoints; the split is removed
    // first so both endpoints take traffic.
    cp.apply("kind: Policy\nmetadata: {name: canary, namespace: default}\nspec: {target_service: web, traffic_split: {backends: [{service_version: v1, weight: 50}, {service_version: v2, weight: 50}]}}\n---\nkind: Policy\nmetadata: {name: limit, namespace: default}\nspec: {target_service: web, rate_limit: {requests_per_second: 40, burst: 4}}\n").await;
    for s in &servers {
        enforced(s, "\"requests_per_second\": 40").await;
    }
    enforced(&client, "\"weight\": 50").await;
    let started = tokio::time::Instant::now();
    let window = Duration::from_secs(3);
    let (mut ok, mut limited, mut retry_after) = (0u64, 0u64, true);
    while started.elapsed() < window {
        let req = http::Request::get(format!("http://{target}/"))
            .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
                bytes::Bytes::new(),
            )))
            .expect("request");
        let r = tokio::time::timeout(Duration::from_secs(10), c.request(req))
            .await
            .expect("in time")
            .expect("response");
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                retry_after &= r.headers().contains_key("retry-after");
            }
            s => panic!("unexpected status {s}"),
        }
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
        // About 200 requests a second: five times the limit.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 40/s over 3 s, plus each endpoint's burst (2) and first request.
    let expected = 40.0 * window.as_secs_f64();
    assert!(
        (ok as f64) >= expected * 0.9 && (ok as f64) <= expected * 1.1 + 6.0,
        "{ok} admitted, {limited} limited, expected about {expected}"
    );
    // The client offered well over the limit (its pace follows the machine's speed, so the
    // share refused is not fixed), and what the limit did not admit was refused with 429.
    assert!(
        (ok + limited) as f64 >= expected * 1.5 && limited > 0,
        "{limited} limited of {} offered",
        ok + limited
    );
    assert!(retry_after, "a 429 without Retry-After");
    let m = servers[0].metrics().await;
    assert!(
        metric(
            &m,
            "quicmesh_tunnel_failures_total",
            &["reason=\"rate_limited\""]
        ) > 0.0,
        "{m}"
    );
    cp.stop_controller();
}

/// `GET path` through `target`: the status.
async fn get_status(target: SocketAddr, path: &str) -> StatusCode {
    let req = http::Request::get(format!("http://{target}{path}"))
        .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
            bytes::Bytes::new(),
        )))
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(10), h1_client().request(req))
        .await
        .expect("in time")
        .expect("response");
    r.status()
}

const AUTHZ: &str = "kind: Policy
metadata: {name: public-only, namespace: default}
spec:
  target_service: web
  authorization:
    mode: MODE
    default_action: deny
    allow: [{from_identities: [\"spiffe://mesh.local/ns/default/sa/good\"], methods: [GET], path_prefixes: [/public/]}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_with_an_allow_rule_then_audit_mode_through_the_controller() {
    let mut cp = ControlPlane::start().await;
    cp.apply("kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 80, protocol: http}, {port: 7, protocol: tcp}]}\n",
    )
    .await;
    let (app, _seen) = http_app().await;
    let echo = echo_server().await;
    let server = cp.proxy("web", "web", "", &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}, {{ port = 7, app = \"{echo}\" }}]\nservices = [\"web\"]\n"
        )).await;
    let mut clients = Vec::new();
    for sa in ["good", "bad"] {
        let p = cp
            .proxy(
                sa,
                sa,
                "",
                "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 7\nmax_attempts = 1\n",
            )
            .await;
        enforced(&p, &server.addr("inbound").to_string()).await;
        clients.push(p);
    }
    let http_of = |p: &Proc| ready_addr(&p.ready, "/outbound/0");
    let tcp_of = |p: &Proc| ready_addr(&p.ready, "/outbound/1");
    let (good, bad) = (&clients[0], &clients[1]);
    // No policy: anyone in the mesh gets through.
    assert_eq!(get_status(http_of(bad), "/admin").await, StatusCode::OK);

    cp.apply(&AUTHZ.replace("MODE", "enforce")).await;
    enforced(&server, "/public/").await;
    assert_eq!(get_status(http_of(good), "/public/x").await, StatusCode::OK);
    assert_eq!(
        get_status(http_of(good), "/admin").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get_status(http_of(bad), "/public/x").await,
        StatusCode::FORBIDDEN
    );
    // The only allow rule names a path: no opaque connection matches it.
    for p in [good, bad] {
        let r = roundtrip(tcp_of(p), b"ping", Duration::from_secs(5)).await;
        assert!(r.as_ref().map_or(true, |b| b.is_empty()), "{r:?}");
    }
    let m = server.metrics().await;
    let denied = |m: &str, mode: &str| {
        metric(
            m,
            "quicmesh_policy_denials_total",
            &[
                "policy=\"authorization\"",
                &format!("mode=\"{mode}\""),
                "service=\"web.default\"",
            ],
        )
    };
    assert_eq!(denied(&m, "enforce"), 4.0, "{m}");

    // Audit: everything passes, the would-be denials are counted.
    cp.apply(&AUTHZ.replace("MODE", "audit")).await;
    enforced(&server, "\"audit\"").await;
    assert_eq!(get_status(http_of(good), "/admin").await, StatusCode::OK);
    assert_eq!(get_status(http_of(bad), "/public/x").await, StatusCode::OK);
    let back = roundtrip(tcp_of(bad), b"ping", Duration::from_secs(5))
        .await
        .expect("tcp in audit mode");
    assert_eq!(back, b"ping");
    let m = server.metrics().await;
    assert_eq!(denied(&m, "audit"), 3.0, "{m}");
    assert_eq!(denied(&m, "enforce"), 4.0, "{m}");

    // Back to enforce, then the controller goes away: the proxies keep enforcing their last state.
    cp.apply(&AUTHZ.replace("MODE", "enforce")).await;
    enforced(&server, "\"mode\": \"enforce\"").await;
    cp.stop_controller();
    assert_eq!(get_status(http_of(good), "/public/x").await, StatusCode::OK);
    assert_eq!(
        get_status(http_of(bad), "/public/x").await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeouts_policy_applied_under_load_takes_effect_within_a_second() {
    let mut cp = ControlPlane::start().await;
    cp.apply("kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 80, protocol: http}]}\n",
    )
    .await;
    // Every answer takes 200 ms.
    let app = named_app(
        "slow",
        Duration::from_millis(200),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let server = cp.proxy("web", "web", "", &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\nservices = [\"web\"]\n"
        )).await;
    let client = cp
        .proxy(
            "client",
            "client",
            "",
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n",
        )
        .await;
    enforced(&client, &server.addr("inbound").to_string()).await;
    let target = client.outbound();
    // Load from 8 callers; each records when it last saw a 200 and when it first saw a 504.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = h1_client();
                let (mut last_ok, mut first_504) = (None, None);
                // Bounded: at most 200 requests of 200 ms each.
                for _ in 0..200 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = tokio::time::Instant::now();
                    match get_body(&c, target).await.0 {
                        StatusCode::OK => last_ok = Some(sent),
                        StatusCode::GATEWAY_TIMEOUT => {
                            first_504.get_or_insert(sent);
                        }
                        s => panic!("unexpected status {s}"),
                    }
                }
                (last_ok, first_504)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = tokio::time::Instant::now();
    cp.apply("kind: Policy\nmetadata: {name: fast, namespace: default}\nspec: {target_service: web, timeouts: {request_timeout_ms: 50}}\n").await;
    // Give the callers time to see the change, then stop them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let (last_ok, first_504) = c.await.expect("caller");
        let first_504 = first_504.expect("a caller never saw the timeout");
        assert!(
            first_504 < applied + Duration::from_secs(1),
            "first 504 {:?} after apply began",
            first_504 - applied
        );
        // No request sent a second after the apply got through.
        assert!(
            last_ok.is_none_or(|t| t < applied + Duration::from_secs(1)),
            "a request sent {:?} after apply began still took 200 ms",
            last_ok.map(|t| t - applied)
        );
    }
    cp.stop_controller();
}

/// A controller, service `web` (HTTP port 80) limited to `rps` with `burst` mesh-wide, three inbound
/// proxies `web-a`..`web-c` (each with `server_top` in its config) in front of apps naming themselves, and
/// a client proxy; returns once the client and every server enforce all three endpoints (each server's
/// share is then a third).
async fn three_limited_endpoints(
    rps: u32,
    burst: u32,
    server_top: &str,
) -> (ControlPlane, Vec<Proc>, Proc) {
    let cp = ControlPlane::start().await;
    cp.apply(&format!("kind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{ports: [{{port: 80, protocol: http}}]}}\n---\nkind: Policy\nmetadata: {{name: limit, namespace: default}}\nspec: {{target_service: web, rate_limit: {{requests_per_second: {rps}, burst: {burst}}}}}\n"),
    )
    .await;
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        let app = named_app(name, Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
        servers.push(cp.proxy(&format!("web-{name}"), "web", server_top, &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\nservices = [\"web\"]\n"
            )).await);
    }
    let client = cp
        .proxy(
            "client",
            "client",
            "",
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n",
        )
        .await;
    for s in &servers {
        enforced(&client, &s.addr("inbound").to_string()).await;
        for other in &servers {
            enforced(s, &other.addr("inbound").to_string()).await;
        }
    }
    (cp, servers, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_limit_holds_across_three_endpoints_and_is_reshared_when_one_drains() {
    let _heavy = heavy().await;
    let (mut cp, servers, client) = three_limited_endpoints(60, 6, "drain_grace = \"1s\"").await;
    let target = client.outbound();
    // Three callers at up to 150 requests a second each, over seven times the limit, for `window`: enough that
    // each endpoint is offered more than its share whatever the balancer's choices; what each app
    // admitted.
    let offer = |window: Duration| async move {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(async move {
                    let c = h1_client();
                    let started = tokio::time::Instant::now();
                    let mut admitted = std::collections::HashMap::<Vec<u8>, u64>::new();
                    let mut limited = 0u64;
                    while started.elapsed() < window {
                        let (status, body) = get_body(&c, target).await;
                        match status {
                            StatusCode::OK => *admitted.entry(body.to_vec()).or_default() += 1,
                            StatusCode::TOO_MANY_REQUESTS => limited += 1,
                            s => panic!("unexpected status {s}"),
                        }
                        tokio::time::sleep(Duration::from_micros(6600)).await;
                    }
                    (admitted, limited)
                })
            })
            .collect();
        let mut admitted = std::collections::HashMap::<Vec<u8>, u64>::new();
        let mut limited = 0;
        for w in workers {
            let (a, l) = w.await.expect("caller");
            for (k, v) in a {
                *admitted.entry(k).or_default() += v;
            }
            limited += l;
        }
        (admitted, limited)
    };
    // `ctl describe` shows the share each endpoint enforces.
    let described: serde_json::Value =
        serde_json::from_str(&cp.ctl(&["-o", "json", "describe", "service", "web"]).await)
            .expect("describe json");
    assert_eq!(described["rate_limit_per_endpoint"], 20.0, "{described}");
    assert_eq!(
        described["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{described}"
    );
    let table = cp.ctl(&["describe", "service", "web"]).await;
    assert!(table.contains("20.0 req/s per endpoint"), "{table}");
    let window = Duration::from_secs(3);
    let (admitted, limited) = offer(window).await;
    let total: u64 = admitted.values().sum();
    // 60/s in total, plus the bursts (6) and first requests.
    assert!(
        (162..=210).contains(&total) && limited > total,
        "{total} admitted ({admitted:?}), {limited} limited"
    );

    // One drains: it withdraws its endpoint; the two left enforce half each.
    servers[2].terminate();
    let gone = servers[2].addr("inbound").to_string();
    let admin_of = |p: &Proc| p.addr("admin");
    let (ca, sa) = (admin_of(&client), admin_of(&servers[0]));
    assert!(
        eventually(Duration::from_secs(2), || {
            let gone = gone.clone();
            async move {
                !scrape(ca, "/config").await.1.contains(&gone)
                    && !scrape(sa, "/config").await.1.contains(&gone)
            }
        })
        .await,
        "the drained endpoint was not withdrawn within 2 s"
    );
    let (admitted, limited) = offer(window).await;
    let total: u64 = admitted.values().sum();
    assert!(
        (162..=210).contains(&total) && limited > total,
        "{total} admitted ({admitted:?}), {limited} limited; server a: {}; client: {}",
        scrape(sa, "/config").await.1,
        scrape(ca, "/config").await.1
    );
    assert!(!admitted.contains_key(b"c".as_slice()), "{admitted:?}");
    cp.stop_controller();
}

/// One answer seen by the load: when its request was sent, its status, and the app that answered
/// (empty if none).
type Seen = (tokio::time::Instant, StatusCode, Vec<u8>);

/// Open-loop load on `target`: `pacers` each start a request every `1/rate` s without waiting for
/// earlier ones, until `stop`, for at most `limit` and `rate * limit` requests each; every answer.
async fn paced_load(
    target: SocketAddr,
    pacers: usize,
    rate: f64,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Seen> {
    let c = h1_client();
    let tasks: Vec<_> = (0..pacers)
        .map(|i| {
            let (stop, c) = (stop.clone(), c.clone());
            tokio::spawn(async move {
                let every = Duration::from_secs_f64(1.0 / rate);
                // Staggered starts, so the pacers' requests interleave.
                let start = tokio::time::Instant::now() + every.mul_f64(i as f64 / pacers as f64);
                let mut tick = tokio::time::interval_at(start, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let until = start + limit;
                let bound = (rate * limit.as_secs_f64()).ceil() as usize;
                let mut requests = Vec::with_capacity(bound);
                while requests.len() < bound && !stop.load(Ordering::Relaxed) {
                    let sent = tick.tick().await;
                    if sent >= until {
                        break;
                    }
                    let c = c.clone();
                    requests.push(tokio::spawn(async move {
                        let (status, body) = get_body(&c, target).await;
                        let app = if status == StatusCode::OK {
                            body.to_vec()
                        } else {
                            Vec::new()
                        };
                        (sent, status, app)
                    }));
                }
                let mut seen = Vec::with_capacity(requests.len());
                for r in requests {
                    seen.push(r.await.expect("request"));
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("pacer"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_wide_limit_is_reshared_within_two_seconds_when_an_endpoint_is_killed() {
    let _heavy = heavy().await;
    let (mut cp, mut servers, client) = three_limited_endpoints(300, 30, "").await;
    let target = client.outbound();
    // About 720 requests a second from 12 callers: over twice the limit, so that each endpoint is
    // offered more than its share before and after the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let started = tokio::time::Instant::now();
    let load = tokio::spawn(paced_load(
        target,
        12,
        60.0,
        Duration::from_secs(20),
        stop.clone(),
    ));
    // 3 s in the steady state, then kill -9 one of the three.
    let (warm, steady) = (Duration::from_secs(1), Duration::from_secs(3));
    tokio::time::sleep(warm + steady).await;
    let killed = tokio::time::Instant::now();
    servers[2].kill();
    let gone = servers[2].addr("inbound").to_string();
    let (ca, sa, sb) = (
        client.addr("admin"),
        servers[0].addr("admin"),
        servers[1].addr("admin"),
    );
    assert!(
        eventually(Duration::from_secs(2), || {
            let gone = gone.clone();
            async move {
                !scrape(ca, "/config").await.1.contains(&gone)
                    && !scrape(sa, "/config").await.1.contains(&gone)
                    && !scrape(sb, "/config").await.1.contains(&gone)
            }
        })
        .await,
        "the killed endpoint was not withdrawn within 2 s"
    );
    let withdrawn = killed.elapsed();
    // Measured from 2 s after the kill, for 3 s.
    let after = (
        killed + Duration::from_secs(2),
        killed + Duration::from_secs(5),
    );
    tokio::time::sleep_until(after.1).await;
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.expect("load");

    let admitted = |from: tokio::time::Instant, to: tokio::time::Instant| {
        let mut by_app = std::collections::BTreeMap::<String, u64>::new();
        let mut limited = 0u64;
        for (t, status, app) in &seen {
            if *t < from || *t >= to {
                continue;
            }
            match *status {
                StatusCode::OK => {
                    *by_app
                        .entry(String::from_utf8_lossy(app).into_owned())
                        .or_default() += 1
                }
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                s => panic!("unexpected status {s} {:?} after the start", *t - started),
            }
        }
        (by_app, limited)
    };
    let (before, limited) = admitted(started + warm, started + warm + steady);
    let total: u64 = before.values().sum();
    let want = 300.0 * steady.as_secs_f64();
    assert!(
        (total as f64 - want).abs() <= want * 0.1 && limited > 0,
        "{total} admitted in {steady:?} ({before:?}), {limited} limited; want {want} +-10%"
    );
    let (two, limited) = admitted(after.0, after.1);
    let want = 150.0 * (after.1 - after.0).as_secs_f64();
    for app in ["a", "b"] {
        let got = two.get(app).copied().unwrap_or(0) as f64;
        assert!(
            (got - want).abs() <= want * 0.1,
            "{app} admitted {got} in 3 s from 2 s after the kill ({two:?}, {limited} limited, withdrawn after {withdrawn:?}); want {want} +-10%"
        );
    }
    assert!(!two.contains_key("c"), "{two:?}");
    eprintln!(
        "mesh-wide 300 req/s: {total} admitted in {steady:?} by three ({before:?}); killed one, withdrawn after {withdrawn:?}; from 2 s after the kill, 3 s: {two:?}"
    );
    cp.stop_controller();
}

/// A controller, one `web` endpoint limited to 100 req/s with a burst of 10 (`per_source` or for the
/// service), and a caller proxy for each account in `callers`.
async fn limited_web(per_source: bool, callers: &[&str]) -> (ControlPlane, Proc, Vec<Proc>) {
    let cp = ControlPlane::start().await;
    cp.apply(&format!("kind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{ports: [{{port: 80, protocol: http}}]}}\n---\nkind: Policy\nmetadata: {{name: limit, namespace: default}}\nspec: {{target_service: web, rate_limit: {{requests_per_second: 100, burst: 10, per_source: {per_source}}}}}\n"))
    .await;
    let app = named_app("web", Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
    let server = cp.proxy("web", "web", "", &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\nservices = [\"web\"]\n"
        )).await;
    enforced(&server, "\"requests_per_second\": 100").await;
    let mut clients = Vec::new();
    for sa in callers {
        let p = cp
            .proxy(
                sa,
                sa,
                "",
                "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 80\n",
            )
            .await;
        enforced(&p, &server.addr("inbound").to_string()).await;
        clients.push(p);
    }
    (cp, server, clients)
}

/// Client-side counts of one caller's 10 s at 400 req/s: the admitted rate beyond the burst, after
/// checking the load was what it should be and every answer a 200 or a 429.
fn admitted_rate(who: &str, seen: &[Seen]) -> f64 {
    let first = seen.iter().map(|s| s.0).min().expect("requests");
    let last = seen.iter().map(|s| s.0).max().expect("requests");
    let span = (last - first).as_secs_f64();
    assert!(
        seen.len() >= 3_900 && span >= 9.5,
        "{who}: only {} requests over {span:.2} s",
        seen.len()
    );
    let ok = seen.iter().filter(|s| s.1 == StatusCode::OK).count();
    let limited = seen
        .iter()
        .filter(|s| s.1 == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + limited, seen.len(), "{who}: other statuses");
    let rate = (ok as f64 - 10.0) / span;
    eprintln!(
        "{who}: {} requests over {span:.2} s, {ok} admitted ({rate:.1} req/s beyond the burst), {limited} limited",
        seen.len()
    );
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_100_per_second_holds_within_5_percent_against_400_per_second() {
    let _heavy = heavy().await;
    let (mut cp, _server, clients) = limited_web(false, &["alice"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    // 8 pacers at 50 req/s: 400 req/s for 10 s, at most 4,000 requests.
    let seen = paced_load(
        clients[0].outbound(),
        8,
        50.0,
        Duration::from_secs(10),
        stop,
    )
    .await;
    let rate = admitted_rate("alice", &seen);
    assert!((rate - 100.0).abs() <= 5.0, "{rate:.1} req/s admitted");
    cp.stop_controller();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limits_hold_separately_for_two_callers() {
    let _heavy = heavy().await;
    let (mut cp, _server, clients) = limited_web(true, &["alice", "bob"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = clients
        .iter()
        .map(|c| {
            tokio::spawn(paced_load(
                c.outbound(),
                8,
                50.0,
                Duration::from_secs(10),
                stop.clone(),
            ))
        })
        .collect();
    let mut rates = Vec::new();
    for (who, l) in ["alice", "bob"].into_iter().zip(loads) {
        rates.push(admitted_rate(who, &l.await.expect("load")));
    }
    // Each caller gets its own 100 req/s: together twice what one limit for the service would admit.
    for (who, rate) in ["alice", "bob"].iter().zip(&rates) {
        assert!(
            (rate - 100.0).abs() <= 5.0,
            "{who}: {rate:.1} req/s admitted"
        );
    }
    cp.stop_controller();
}
