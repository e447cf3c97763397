//! The dashboard in a real browser (issue 11's acceptance): Debian's headless Chromium loads the
//! controller's dashboard of a running mesh (controller, HTTP `web`, gRPC `api`, TCP `db`, their
//! proxies and a client's proxy under traffic), logs in with the admin token and draws the page with
//! its own script; the dumped DOM must show every service as a node of the graph, and the numbers on
//! the client's edge to `web` must change between two loads a few seconds apart while the load
//! doubles. The second load's screenshot is kept as `target/test-artifacts/dashboard.png`.
//!
//! Login: the page's own `#token=...` form of the address (the fragment never reaches the server; the
//! script posts the token to `/login` and takes a session cookie, then drops the fragment), so the
//! browser goes through the same login a person does and nothing in the controller changes for the
//! test. Skipped with a printed reason when no Chromium is installed (`.ci/run` installs it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use quicmesh_proto::{controller as pb, echo::EchoMessage};
use tokio::process::Command;

use super::{caller, config, failing_app, start_observed_controller};
use crate::{
    controller_mode::{Proc, admin_client, join_token, spawn},
    http::{grpc_app, grpc_client, h1_client},
    support::*,
};

/// Longest a test browser run may take.
const BROWSER_LIMIT: Duration = Duration::from_secs(60);
/// Longest the background traffic runs, whatever happens to the test.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(90);

/// The Chromium binary on `PATH` (Debian's `chromium`, or Google's build), or `None`.
async fn chromium() -> Option<&'static str> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let ok = Command::new(name)
            .arg("--version")
            .output()
            .await
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(name);
        }
    }
    None
}

/// Loads `url` in headless Chromium (fresh profile in `profile`), runs the page's script for
/// `budget` of virtual time, and returns the DOM as drawn; with `screenshot`, writes it there too.
async fn load(
    browser: &str,
    url: &str,
    profile: &Path,
    budget: Duration,
    screenshot: Option<&Path>,
) -> String {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        // Root in a container has no user namespace for the sandbox; the page is our own, on loopback.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1400,1100",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--virtual-time-budget={}", budget.as_millis()))
    .arg("--dump-dom")
    .kill_on_drop(true);
    if let Some(path) = screenshot {
        cmd.arg(format!("--screenshot={}", path.display()));
    }
    let out = tokio::time::timeout(BROWSER_LIMIT, cmd.arg(url).output())
        .await
        .expect("chromium within its time bound")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `name` in `tag`, the text of a start tag after its name.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = if tag.starts_with(&key) {
        key.len()
    } else {
        tag.find(&format!(" {key}"))? + key.len() + 1
    };
    tag[start..].split('"').next()
}

/// The graph's nodes (`data-node`) in a dumped page.
fn nodes(page: &str) -> Vec<String> {
    page.split("<g ")
        .skip(1)
        .filter_map(|g| {
            let tag = g.split('>').next()?;
            attr(tag, "data-node").map(str::to_owned)
        })
        .collect()
}

/// The graph's edge labels by (from, to) in a dumped page: the `<text>` of each `g.edge`.
fn edge_labels(page: &str) -> BTreeMap<(String, String), String> {
    page.split("<g ")
        .skip(1)
        .filter_map(|g| {
            let tag = g.split('>').next()?;
            if !attr(tag, "class").is_some_and(|c| c.split(' ').any(|c| c == "edge")) {
                return None;
            }
            let from = attr(tag, "data-from")?.to_owned();
            let to = attr(tag, "data-to")?.to_owned();
            let text = g.split("<text").nth(1)?.split_once('>')?.1;
            let label = text.split("</text>").next()?.to_owned();
            Some(((from, to), label))
        })
        .collect()
}

/// The `requests` column (the last) of the edges table's row from `from` (short name) to `to`.
fn table_requests(page: &str, from: &str, to: &str) -> Option<u64> {
    let table = page
        .split("<table id=\"edges\">")
        .nth(1)?
        .split("</table>")
        .next()?;
    table.split("<tr>").skip(1).find_map(|row| {
        let cells: Vec<&str> = row
            .split("<td")
            .skip(1)
            .filter_map(|c| c.split_once('>').map(|(_, rest)| rest))
            .filter_map(|c| c.split("</td>").next())
            .collect();
        (cells.first() == Some(&from) && cells.get(1) == Some(&to))
            .then(|| cells.last()?.parse().ok())
            .flatten()
    })
}

/// Whether `bytes` is a PNG image; its width and height.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    // Signature, then the IHDR chunk: length, type, width, height (big-endian).
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// Where test artifacts are kept: `target/test-artifacts` of the build's target directory.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact directory");
    dir
}

/// The requests `GetStats` holds for the client's calls to `web` (1 min window).
async fn web_requests(admin: &quicmesh_controller::client::Admin) -> u64 {
    let r = admin
        .clone()
        .get_stats(pb::StatsRequest {
            window_seconds: 60,
            service: "web.default".into(),
            ..Default::default()
        })
        .await
        .expect("GetStats")
        .into_inner();
    r.services.iter().map(|s| s.requests).sum()
}

#[test]
fn pages_are_read_as_the_browser_dumps_them() {
    let page = concat!(
        "<svg id=\"graph\"><g class=\"edge bad\" data-from=\"spiffe://mesh.local/ns/default/sa/client\" ",
        "data-to=\"web.default\"><line x1=\"1\"></line><text x=\"2\" y=\"3\">12.5 rps · 90.00% · p99 24.3ms</text></g>",
        "<g class=\"node\" data-node=\"web.default\"><rect></rect><text>web</text><title>web.default</title></g>",
        "<g class=\"node\" data-node=\"api.default\"><rect></rect></g></svg>",
        "<table id=\"edges\"><thead><tr><th>from</th></tr></thead><tbody><tr><td class=\"name\">client</td>",
        "<td class=\"name\">web.default</td><td class=\"name\">spiffe://x</td><td class=\"bad\">90.00%</td>",
        "<td class=\"\">12.5</td><td class=\"\">24.3ms</td><td class=\"\">250</td></tr></tbody></table>",
    );
    let tag = "class=\"edge bad\" data-to=\"web.default\"";
    assert_eq!(attr(tag, "class"), Some("edge bad"));
    assert_eq!(attr(tag, "data-to"), Some("web.default"));
    assert_eq!(attr(tag, "to"), None, "only whole names");
    assert_eq!(nodes(page), ["web.default", "api.default"]);
    let labels = edge_labels(page);
    assert_eq!(
        labels.get(&(
            "spiffe://mesh.local/ns/default/sa/client".into(),
            "web.default".into()
        )),
        Some(&"12.5 rps · 90.00% · p99 24.3ms".to_owned())
    );
    assert_eq!(labels.len(), 1, "nodes are not edges");
    assert_eq!(table_requests(page, "client", "web.default"), Some(250));
    assert_eq!(table_requests(page, "client", "api.default"), None);
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&1400u32.to_be_bytes());
    png.extend_from_slice(&1100u32.to_be_bytes());
    assert_eq!(png_size(&png), Some((1400, 1100)));
    assert_eq!(png_size(b"GIF89a not a png at all...."), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_shows_every_service_and_live_edge_numbers() {
    let Some(browser) = chromium().await else {
        println!(
            "chromium is not installed: the dashboard is not loaded in a browser (apt-get install chromium)"
        );
        return;
    };
    let _heavy = heavy().await;
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let controller = start_observed_controller(d).await;
    let addr = controller.addr("grpc");
    let admin = controller.admin_token();
    let bundle = controller.trust_bundle();
    let a = admin_client(addr, &bundle, &admin).await;
    let services = [
        ("web", 80, pb::PortProtocol::Http),
        ("api", 50051, pb::PortProtocol::Grpc),
        ("db", 5432, pb::PortProtocol::Tcp),
    ];
    a.clone()
        .apply_all(pb::ApplyAllRequest {
            resources: services
                .iter()
                .map(|(name, port, protocol)| pb::Resource {
                    resource: Some(pb::resource::Resource::Service(pb::Service {
                        metadata: Some(pb::Metadata {
                            name: (*name).into(),
                            namespace: "default".into(),
                            ..Default::default()
                        }),
                        ports: vec![pb::ServicePort {
                            port: *port,
                            protocol: *protocol as i32,
                            name: String::new(),
                        }],
                        ..Default::default()
                    })),
                })
                .collect(),
        })
        .await
        .expect("services");

    let (api_app, _) = grpc_app().await;
    let mut servers: Vec<Proc> = Vec::new();
    for (sa, port, app) in [
        ("web", 80, failing_app(Arc::new(AtomicU64::new(0))).await),
        ("api", 50051, api_app),
        ("db", 5432, echo_server().await),
    ] {
        let token = join_token(addr, &bundle, &admin, sa).await;
        let cfg = config(
            d,
            sa,
            addr,
            &bundle,
            sa,
            &token,
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = {port}, app = \"{app}\" }}]\nservices = [\"{sa}\"]\n"
            ),
        );
        servers.push(spawn(&["proxy", "--config", &cfg], &d.join(format!("{sa}.log"))).await);
    }
    let (client, [web, api, db]) = caller(d, addr, &bundle, &admin, "", &servers).await;

    // Traffic on every edge until the test ends (bounded): web at `web_rps`, raised between the two
    // loads so the numbers on its edge must move; api and db steady.
    let web_rps = Arc::new(AtomicU64::new(20));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(traffic(web, api, db, web_rps.clone(), stop.clone()));
    let base = format!("http://{}", controller.addr("dashboard"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            web_requests(&a).await >= 20
        })
        .await,
        "the client's reports never reached the controller"
    );

    let url = format!("{base}/#token={admin}");
    let client_id = format!("spiffe://{TD}/ns/default/sa/client");
    let web_edge = (client_id.clone(), "web.default".to_owned());
    let first = load(
        browser,
        &url,
        &d.join("profile-1"),
        Duration::from_secs(3),
        None,
    )
    .await;
    let seen = web_requests(&a).await;
    // Twice the rate, and enough new requests that no rounding hides them.
    web_rps.store(40, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(15), || async {
            web_requests(&a).await >= seen + 100
        })
        .await,
        "web's requests did not grow under load"
    );
    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let second = load(
        browser,
        &url,
        &d.join("profile-2"),
        Duration::from_secs(3),
        Some(&shot),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    // Kept next to the screenshot: what the assertions below read.
    for (name, page) in [("first", &first), ("second", &second)] {
        std::fs::write(artifacts().join(format!("dashboard-{name}.html")), page)
            .expect("keep the dumped page");
    }

    for (name, page) in [("first", &first), ("second", &second)] {
        assert!(
            page.contains("id=\"view\"") && !page.contains("<section id=\"view\" hidden"),
            "{name} load: the graph is not shown (login failed?)\n{page}"
        );
        let drawn = nodes(page);
        for s in [
            "web.default",
            "api.default",
            "db.default",
            client_id.as_str(),
        ] {
            assert!(
                drawn.iter().any(|n| n == s),
                "{name} load: {s} is not a node of the graph {drawn:?}\n{page}"
            );
        }
        let labels = edge_labels(page);
        for to in ["web.default", "api.default", "db.default"] {
            assert!(
                labels.contains_key(&(client_id.clone(), to.to_owned())),
                "{name} load: no client -> {to} edge in {labels:?}"
            );
        }
    }
    let (l1, l2) = (edge_labels(&first), edge_labels(&second));
    let (w1, w2) = (&l1[&web_edge], &l2[&web_edge]);
    println!("client -> web: first load {w1:?}, second {w2:?}");
    assert!(w1.contains(" rps · ") && w1.contains("p99 "), "{w1}");
    assert_ne!(w1, w2, "the edge numbers did not change between the loads");
    let rps = |l: &str| -> f64 {
        l.split(" rps")
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("req/s in {l:?}"))
    };
    assert!(
        rps(w2) > rps(w1),
        "web's req/s did not rise with the load: {w1} then {w2}"
    );
    let (r1, r2) = (
        table_requests(&first, "client", "web.default"),
        table_requests(&second, "client", "web.default"),
    );
    assert!(
        matches!((r1, r2), (Some(a), Some(b)) if b >= a + 100),
        "the edges table's requests: {r1:?} then {r2:?}"
    );

    let png = std::fs::read(&shot).expect("the screenshot was written");
    let size = png_size(&png);
    assert_eq!(
        size,
        Some((1400, 1100)),
        "{} is a PNG of the window",
        shot.display()
    );
    println!("dashboard screenshot: {}", shot.display());
    drop(client);
    drop(servers);
}

/// Requests to `web` at `web_rps` a second, gRPC calls to `api` at 10 and TCP exchanges with `db`
/// at 5, each bounded by a timeout, until `stop` or [`TRAFFIC_LIMIT`].
async fn traffic(
    web: SocketAddr,
    api: SocketAddr,
    db: SocketAddr,
    web_rps: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let h1 = h1_client();
    let grpc = grpc_client(api).await;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < TRAFFIC_LIMIT {
        tick.tick().await;
        n += 1;
        for _ in 0..web_rps.load(Ordering::Relaxed) / 10 {
            let h1 = h1.clone();
            tasks.spawn(async move {
                let req = Request::get(format!("http://{web}/"))
                    .body(Full::new(Bytes::new()).boxed())
                    .expect("request");
                if let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_secs(5), h1.request(req)).await
                {
                    let _ = r.into_body().collect().await;
                }
            });
        }
        let mut g = grpc.clone();
        tasks.spawn(async move {
            let msg = EchoMessage {
                payload: vec![7; 64],
                delay_ms: 5,
                fail_with: 0,
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), g.unary(msg)).await;
        });
        if n.is_multiple_of(2) {
            tasks.spawn(async move {
                let _ = roundtrip(db, b"select 1", Duration::from_secs(5)).await;
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
