//! The web dashboard (`--dashboard-addr`): a service graph whose edges show req/s, success rate and
//! p99, per-service tables, each connected proxy's certificate expiry, refreshed every two seconds.
//!
//! Why this shape: an operator gets Linkerd's dashboard answers from the controller alone, with no
//! extra component and no network at build time. The page, script and style are embedded with
//! `include_str!` and carry no data, so they are served to anyone; the data (`/api/overview`, JSON)
//! needs the admin token, either as `authorization: Bearer` or as a session cookie got by posting the
//! token to `/login` (a form, or the page's script reading `#token=...` from the address, which
//! never reaches the server). Sessions are random 128-bit ids kept in memory (at most
//! [`MAX_SESSIONS`], [`SESSION_TTL`] each, oldest dropped), so the token itself never sits in a
//! browser's cookie jar. Plain HTTP: bind it on loopback and reach it through a tunnel, like the
//! proxies' admin port.
//!
//! Decisions (who is authorized, what the overview holds, which node an edge starts from) are pure
//! functions here, unit-tested; the axum handlers only apply them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State as AxState},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;

use crate::{
    auth,
    registry::ProxyStatus,
    state::State,
    stats::{Figures, Side, StatsStore, Window},
};

/// Sessions held at once; a new login past it drops the oldest.
pub const MAX_SESSIONS: usize = 64;
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Proxies listed (soonest certificate expiry first).
pub const MAX_PROXIES: usize = 500;
/// Largest request body (the login form).
const MAX_BODY: usize = 4096;
/// The session cookie's name.
pub const COOKIE: &str = "quicmesh_session";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Logged-in sessions, bounded, on a caller-given clock.
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: HashMap<String, Instant>,
}

impl Sessions {
    /// Adds session `id` made at `now`, dropping expired ones and, past the bound, the oldest.
    pub fn add(&mut self, id: String, now: Instant) {
        self.by_id
            .retain(|_, made| now.saturating_duration_since(*made) < SESSION_TTL);
        while self.by_id.len() >= MAX_SESSIONS {
            let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, made)| **made)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.by_id.remove(&oldest);
        }
        self.by_id.insert(id, now);
    }

    /// Whether `id` is a live session at `now`.
    pub fn is_live(&self, id: &str, now: Instant) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|made| now.saturating_duration_since(*made) < SESSION_TTL)
    }

    /// Ends session `id`.
    pub fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The value of cookie `name` in a `cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The value of `key` in an `application/x-www-form-urlencoded` body (`+` and `%XX` decoded);
/// `None` when absent or not UTF-8 once decoded.
pub fn form_value(body: &[u8], key: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let text = std::str::from_utf8(body).ok()?;
    let raw = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)?
        .1
        .as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < raw.len() => {
                out.push(hex(raw[i + 1])? << 4 | hex(raw[i + 2])?);
                i += 2;
            }
            b'%' => return None,
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Whether a request with these headers may read the dashboard's data: a valid admin bearer token,
/// or a live session cookie.
pub fn authorized(
    headers: &HeaderMap,
    admin_sha256: &str,
    sessions: &Sessions,
    now: Instant,
) -> bool {
    if let Some(a) = headers.get(header::AUTHORIZATION) {
        return auth::check_bearer(a.to_str().ok(), admin_sha256).is_ok();
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| cookie(v, COOKIE))
        .any(|id| sessions.is_live(id, now))
}

/// A service's row.
#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceRow {
    /// `name.namespace`.
    pub service: String,
    /// Side the figures come from.
    pub direction: &'static str,
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Share of successes.
    pub success_rate: f64,
    /// Latency quantiles, ms.
    pub p50_ms: f64,
    /// 95th.
    pub p95_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// TCP connections open.
    pub tcp_open: i64,
    /// mTLS share.
    pub mtls_share: f64,
}

/// An arrow of the graph: node to node.
#[derive(Debug, Serialize, PartialEq)]
pub struct GraphEdge {
    /// Node the calls come from (a service its caller serves, else the caller's identity).
    pub from: String,
    /// Service called.
    pub to: String,
    /// Caller identity.
    pub source: String,
    /// Side that counted.
    pub direction: &'static str,
    /// Requests per second.
    pub rps: f64,
    /// Share of successes.
    pub success_rate: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Requests in the window.
    pub requests: u64,
}

/// A connected proxy's row.
#[derive(Debug, Serialize, PartialEq)]
pub struct ProxyRow {
    /// Name it gave.
    pub name: String,
    /// Identity.
    pub identity: String,
    /// Peer address.
    pub address: String,
    /// Certificate expiry, Unix seconds.
    pub cert_not_after_unix: i64,
    /// Seconds until then (negative: expired).
    pub cert_expires_in_s: i64,
}

/// What `/api/overview` returns.
#[derive(Debug, Serialize, PartialEq)]
pub struct Overview {
    /// Window, seconds.
    pub window_seconds: u32,
    /// When it was made, Unix seconds.
    pub now_unix: i64,
    /// Graph nodes: every service of the mesh, then callers that serve none.
    pub nodes: Vec<String>,
    /// Graph arrows.
    pub edges: Vec<GraphEdge>,
    /// Per service (every service of the mesh, idle ones with zeros).
    pub services: Vec<ServiceRow>,
    /// Connected proxies, soonest certificate expiry first, at most [`MAX_PROXIES`].
    pub proxies: Vec<ProxyRow>,
    /// Connected proxies in all.
    pub proxies_connected: usize,
    /// Reports accepted.
    pub reports_accepted: u64,
    /// Reports refused, by reason.
    pub reports_refused: BTreeMap<String, u64>,
    /// Edges held, of at most `edges_max`.
    pub edges_held: usize,
    /// Bound on edges.
    pub edges_max: usize,
}

/// What the overview is made of.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Window, seconds.
    pub window_seconds: u32,
    /// Now, Unix seconds.
    pub now_unix: i64,
    /// Every service of the mesh, `name.namespace`.
    pub mesh_services: &'a [String],
    /// Per-service figures.
    pub services: &'a [Figures],
    /// Per-edge figures.
    pub edges: &'a [Figures],
    /// Connected proxies.
    pub proxies: &'a [ProxyStatus],
    /// Reports accepted.
    pub reports_accepted: u64,
    /// Refused by reason.
    pub reports_refused: &'a BTreeMap<&'static str, u64>,
    /// Edges held.
    pub edges_held: usize,
    /// Bound on edges.
    pub edges_max: usize,
}

/// The overview: `serving(identity)` names the service a caller's identity serves, if any, so an
/// arrow starts at the caller's service rather than at its bare identity.
pub fn overview(i: &Inputs<'_>, serving: impl Fn(&str) -> Option<String>) -> Overview {
    let row = |f: &Figures| ServiceRow {
        service: f.service.clone(),
        direction: f.side.as_str(),
        requests: f.agg.requests,
        rps: f.rps,
        success_rate: f.success_rate(),
        p50_ms: f.quantile_ms(0.5),
        p95_ms: f.quantile_ms(0.95),
        p99_ms: f.quantile_ms(0.99),
        tcp_open: f.tcp_open,
        mtls_share: f.mtls_share(),
    };
    let mut services: BTreeMap<String, ServiceRow> = i
        .services
        .iter()
        .map(|f| (f.service.clone(), row(f)))
        .collect();
    for s in i.mesh_services {
        services.entry(s.clone()).or_insert_with(|| ServiceRow {
            service: s.clone(),
            direction: Side::Outbound.as_str(),
            requests: 0,
            rps: 0.0,
            success_rate: 0.0,
            p50_ms: 0.0,
            p95_ms: 0.0,
            p99_ms: 0.0,
            tcp_open: 0,
            mtls_share: 0.0,
        });
    }
    // An arrow per edge counted on the side its service's row comes from (callers' when any).
    let side_of: HashMap<&str, Side> = i
        .services
        .iter()
        .map(|f| (f.service.as_str(), f.side))
        .collect();
    let mut nodes: BTreeSet<String> = services.keys().cloned().collect();
    let mut callers = BTreeSet::new();
    let edges: Vec<GraphEdge> = i
        .edges
        .iter()
        .filter(|e| side_of.get(e.service.as_str()) == Some(&e.side))
        .map(|e| {
            let from = serving(&e.source).unwrap_or_else(|| e.source.clone());
            if !nodes.contains(&from) {
                callers.insert(from.clone());
            }
            GraphEdge {
                from,
                to: e.service.clone(),
                source: e.source.clone(),
                direction: e.side.as_str(),
                rps: e.rps,
                success_rate: e.success_rate(),
                p99_ms: e.quantile_ms(0.99),
                requests: e.agg.requests,
            }
        })
        .collect();
    let mut node_list: Vec<String> = std::mem::take(&mut nodes).into_iter().collect();
    node_list.extend(callers);
    let mut proxies: Vec<ProxyRow> = i
        .proxies
        .iter()
        .map(|p| ProxyRow {
            name: p.proxy_name.clone(),
            identity: p.spiffe_id.clone(),
            address: p.peer_address.clone(),
            cert_not_after_unix: p.cert_not_after_unix,
            cert_expires_in_s: p.cert_not_after_unix - i.now_unix,
        })
        .collect();
    proxies.sort_by(|a, b| (a.cert_not_after_unix, &a.name).cmp(&(b.cert_not_after_unix, &b.name)));
    proxies.truncate(MAX_PROXIES);
    Overview {
        window_seconds: i.window_seconds,
        now_unix: i.now_unix,
        nodes: node_list,
        edges,
        services: services.into_values().collect(),
        proxies,
        proxies_connected: i.proxies.len(),
        reports_accepted: i.reports_accepted,
        reports_refused: i
            .reports_refused
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        edges_held: i.edges_held,
        edges_max: i.edges_max,
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct Dashboard {
    state: Arc<State>,
    stats: Arc<StatsStore>,
    sessions: Mutex<Sessions>,
    rng: ring::rand::SystemRandom,
}

impl Dashboard {
    /// Over the controller's state and statistics.
    pub fn new(state: Arc<State>, stats: Arc<StatsStore>) -> Arc<Self> {
        Arc::new(Self {
            state,
            stats,
            sessions: Mutex::default(),
            rng: ring::rand::SystemRandom::new(),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        authorized(
            headers,
            self.state.admin_sha256(),
            &self.sessions(),
            Instant::now(),
        )
    }

    /// The overview over window `w`, now.
    pub fn overview(&self, w: Window) -> Overview {
        let snap = self.state.subscribe().borrow().clone();
        let td = self.state.trust_domain();
        let mesh_services: Vec<String> = snap
            .services
            .iter()
            .map(|s| format!("{}.{}", s.metadata.name, s.metadata.namespace))
            .collect();
        let names: Vec<_> = snap
            .services
            .iter()
            .zip(&mesh_services)
            .filter_map(|(s, key)| Some((key, crate::naming::server_names(td, s).ok()?)))
            .collect();
        let proxies = self.state.registry().proxies();
        let now = self.stats.now_ms();
        let stats = self.stats.lock();
        let services = stats.services(w, now, None);
        let edges = stats.edges(w, now, None);
        let i = Inputs {
            window_seconds: w.seconds,
            now_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
            mesh_services: &mesh_services,
            services: &services,
            edges: &edges,
            proxies: &proxies,
            reports_accepted: stats.accepted,
            reports_refused: &stats.refused,
            edges_held: stats.len(),
            edges_max: stats.max_edges(),
        };
        overview(&i, |source| {
            let id: quicmesh_transport::identity::SpiffeId = source.parse().ok()?;
            names
                .iter()
                .find(|(_, n)| n.allows(&id))
                .map(|(k, _)| (*k).clone())
        })
    }

    /// The routes.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", get(index))
            .route(
                "/app.js",
                get(|| async { asset("text/javascript", APP_JS) }),
            )
            .route("/style.css", get(|| async { asset("text/css", STYLE_CSS) }))
            .route("/login", post(login))
            .route("/logout", post(logout))
            .route("/api/overview", get(api_overview))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn login(AxState(d): AxState<Arc<Dashboard>>, body: Bytes) -> Response {
    let token = form_value(&body, "token").unwrap_or_default();
    if auth::check_bearer(Some(&format!("Bearer {token}")), d.state.admin_sha256()).is_err() {
        tracing::info!("dashboard login refused");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "invalid admin token\n",
        )
            .into_response();
    }
    let mut raw = [0u8; 16];
    if ring::rand::SecureRandom::fill(&d.rng, &mut raw).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no randomness\n").into_response();
    }
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    d.sessions().add(id.clone(), Instant::now());
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
    )
        .into_response()
}

async fn logout(AxState(d): AxState<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    for v in headers.get_all(header::COOKIE).iter() {
        if let Some(id) = v.to_str().ok().and_then(|v| cookie(v, COOKIE)) {
            d.sessions().remove(id);
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
            (header::LOCATION, "/".into()),
        ],
    )
        .into_response()
}

/// `window` of a query string (`60`, `600`, `3600`; default 60).
fn window_of(uri: &Uri) -> Option<Window> {
    let seconds = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "window")
        .map_or(Some(60), |(_, v)| v.parse().ok())?;
    Window::of(seconds)
}

async fn api_overview(
    AxState(d): AxState<Arc<Dashboard>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let json = |code: StatusCode, body: String| {
        (
            code,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response()
    };
    if !d.authorized(&headers) {
        return json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"log in with the admin token (POST /login) or send authorization: Bearer <admin token>"}"#.into(),
        );
    }
    let Some(w) = window_of(&uri) else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"window must be 60, 600 or 3600"}"#.into(),
        );
    };
    match serde_json::to_string(&d.overview(w)) {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": e.to_string() }).to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Agg;

    #[test]
    fn sessions_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        s.add("a".into(), t0);
        assert!(s.is_live("a", t0 + Duration::from_secs(60)));
        assert!(!s.is_live("a", t0 + SESSION_TTL));
        assert!(!s.is_live("b", t0));
        for i in 0..MAX_SESSIONS + 10 {
            s.add(format!("s{i}"), t0 + Duration::from_secs(1 + i as u64));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            !s.is_live("a", t0 + Duration::from_secs(100)),
            "oldest dropped"
        );
        assert!(s.is_live(
            &format!("s{}", MAX_SESSIONS + 9),
            t0 + Duration::from_secs(100)
        ));
        s.remove(&format!("s{}", MAX_SESSIONS + 9));
        assert!(!s.is_live(
            &format!("s{}", MAX_SESSIONS + 9),
            t0 + Duration::from_secs(100)
        ));
    }

    #[test]
    fn cookies_and_form_values_are_read() {
        assert_eq!(
            cookie("a=1; quicmesh_session=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie("quicmesh_sessionx=1", COOKIE), None);
        assert_eq!(
            form_value(b"token=ab%2Bc+d&x=1", "token").as_deref(),
            Some("ab+c d")
        );
        assert_eq!(form_value(b"x=1", "token"), None);
        assert_eq!(form_value(b"token=%zz", "token"), None);
        assert_eq!(form_value(b"token=%4", "token"), None);
        assert_eq!(form_value(b"token=%41", "token").as_deref(), Some("A"));
        assert_eq!(form_value(b"token=%ff", "token"), None, "not UTF-8");
    }

    #[test]
    fn data_needs_the_token_or_a_live_session() {
        let sha = auth::sha256_hex(b"secret");
        let now = Instant::now();
        let mut sessions = Sessions::default();
        sessions.add("s1".into(), now);
        let h = |k: header::HeaderName, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(k, v.parse().expect("header"));
            m
        };
        assert!(!authorized(&HeaderMap::new(), &sha, &sessions, now));
        assert!(authorized(
            &h(header::AUTHORIZATION, "Bearer secret"),
            &sha,
            &sessions,
            now
        ));
        assert!(!authorized(
            &h(header::AUTHORIZATION, "Bearer wrong"),
            &sha,
            &sessions,
            now
        ));
        assert!(authorized(
            &h(header::COOKIE, "quicmesh_session=s1"),
            &sha,
            &sessions,
            now
        ));
        assert!(!authorized(
            &h(header::COOKIE, "quicmesh_session=s2"),
            &sha,
            &sessions,
            now
        ));
        assert!(
            !authorized(
                &h(header::COOKIE, "quicmesh_session=s1"),
                &sha,
                &sessions,
                now + SESSION_TTL
            ),
            "expired"
        );
    }

    fn fig(service: &str, source: &str, side: Side, requests: u64) -> Figures {
        Figures {
            service: service.into(),
            source: source.into(),
            side,
            agg: Agg {
                requests,
                successes: requests,
                ..Agg::default()
            },
            rps: requests as f64,
            covered_s: 1.0,
            tcp_open: 0,
        }
    }

    #[test]
    fn the_graph_has_every_service_and_arrows_from_the_callers_service() {
        const CLIENT: &str = "spiffe://td/ns/a/sa/client";
        const WEB: &str = "spiffe://td/ns/a/sa/web";
        let mesh = ["web.a".to_owned(), "api.a".to_owned(), "db.a".to_owned()];
        let edges = [
            fig("web.a", CLIENT, Side::Outbound, 10),
            fig("web.a", CLIENT, Side::Inbound, 10),
            fig("api.a", WEB, Side::Outbound, 5),
        ];
        let services = [
            fig("web.a", "", Side::Outbound, 10),
            fig("api.a", "", Side::Outbound, 5),
        ];
        let proxies = [
            ProxyStatus {
                proxy_name: "late".into(),
                spiffe_id: WEB.into(),
                peer_address: "127.0.0.1:1".into(),
                config_version: 1,
                connected_unix: 0,
                cert_not_after_unix: 2000,
            },
            ProxyStatus {
                proxy_name: "soon".into(),
                spiffe_id: CLIENT.into(),
                peer_address: "127.0.0.1:2".into(),
                config_version: 1,
                connected_unix: 0,
                cert_not_after_unix: 1500,
            },
        ];
        let refused = BTreeMap::new();
        let o = overview(
            &Inputs {
                window_seconds: 60,
                now_unix: 1000,
                mesh_services: &mesh,
                services: &services,
                edges: &edges,
                proxies: &proxies,
                reports_accepted: 3,
                reports_refused: &refused,
                edges_held: 3,
                edges_max: 10,
            },
            |id| (id == WEB).then(|| "web.a".to_owned()),
        );
        assert_eq!(o.nodes, ["api.a", "db.a", "web.a", CLIENT]);
        assert_eq!(
            o.edges.len(),
            2,
            "the inbound copy of web's edge is not drawn"
        );
        assert_eq!(
            (o.edges[0].from.as_str(), o.edges[0].to.as_str()),
            (CLIENT, "web.a")
        );
        assert_eq!(
            (o.edges[1].from.as_str(), o.edges[1].to.as_str()),
            ("web.a", "api.a")
        );
        assert_eq!(o.services.len(), 3, "idle db has a row");
        assert_eq!(o.proxies[0].name, "soon");
        assert_eq!(o.proxies[0].cert_expires_in_s, 500);
    }

    #[test]
    fn windows_come_from_the_query() {
        let w = |q: &str| window_of(&q.parse().expect("uri")).map(|w| w.seconds);
        assert_eq!(w("/api/overview"), Some(60));
        assert_eq!(w("/api/overview?window=600"), Some(600));
        assert_eq!(w("/api/overview?window=7"), None);
        assert_eq!(w("/api/overview?window=x"), None);
    }
}
