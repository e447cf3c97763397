//! Service-account issuer keys from the issuer's OpenID discovery document, for clusters whose keys
//! rotate: the controller reads `<issuer>/.well-known/openid-configuration`, checks that it names the
//! configured issuer, and fetches the JWKS its `jwks_uri` points at, over HTTPS verified against a CA
//! bundle the operator gives (a cluster's API server is signed by the cluster CA, not a public one).
//!
//! When to fetch is a pure decision ([`plan`]): keys are fetched on first use, again when they are older
//! than the refresh interval, and early when a token names a key id the current keys do not have (a
//! rotation), but never more often than once per [`MIN_REFETCH`] so that tokens with made-up key ids
//! cannot turn the controller into a request amplifier against the API server. A failed fetch keeps the
//! last good keys. Every fetch is bounded: one connection, no redirects, [`FETCH_TIMEOUT`] for the
//! whole exchange, at most [`MAX_DOCUMENT`] bytes of body.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::{net::TcpStream, sync::Mutex, time::Instant};

use crate::k8s::{Key, parse_jwks};

/// Deadline of one HTTPS exchange (connect, TLS, request, whole body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document or JWKS read.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// Shortest time between two fetches that are not due to age (unknown key ids, retries after a failure).
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Where the discovery document lives under the issuer URL.
const WELL_KNOWN: &str = "/.well-known/openid-configuration";

/// Why the issuer's keys could not be fetched. Each names the URL and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The issuer or `jwks_uri` is not an `https://host[:port][/path]` URL.
    #[error("{0:?} is not an https URL without query or fragment: {1}")]
    Url(String, String),
    /// Connecting, TLS, or HTTP failed, or the deadline passed.
    #[error("GET {0}: {1}")]
    Fetch(String, String),
    /// The server answered with another status than 200.
    #[error("GET {0}: status {1}")]
    Status(String, u16),
    /// The discovery document is malformed or names another issuer.
    #[error("discovery document {0}: {1}")]
    Document(String, String),
    /// The JWKS is malformed or has no usable key.
    #[error("JWKS {0}: {1}")]
    Jwks(String, String),
    /// The CA bundle or token file is unusable.
    #[error("{0}")]
    Config(String),
}

/// An https URL split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (443 by default).
    pub port: u16,
    /// Path with leading `/`.
    pub path: String,
}

impl std::fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "https://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// Parses an `https://` URL; anything else (http, userinfo, query, fragment) is refused.
pub fn https_url(s: &str) -> Result<HttpsUrl, DiscoveryError> {
    let bad = |why: &str| DiscoveryError::Url(s.to_owned(), why.to_owned());
    let uri: http::Uri = s
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let auth = uri.authority().ok_or_else(|| bad("no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad("user information is not allowed"));
    }
    if uri.query().is_some() || s.contains('#') {
        return Err(bad("query and fragment are not allowed"));
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(HttpsUrl {
        host: host.to_owned(),
        port: auth.port_u16().unwrap_or(443),
        path: match uri.path() {
            "" => "/".to_owned(),
            p => p.to_owned(),
        },
    })
}

/// Where the discovery document of `issuer` is: its URL with the well-known path appended.
pub fn discovery_url(issuer: &str) -> Result<HttpsUrl, DiscoveryError> {
    let mut url = https_url(issuer)?;
    url.path = format!("{}{WELL_KNOWN}", url.path.trim_end_matches('/'));
    Ok(url)
}

#[derive(Deserialize)]
struct Document {
    issuer: String,
    jwks_uri: String,
}

/// The JWKS URL of a discovery document, which must name exactly `issuer` (OpenID Connect Discovery
/// 1.0, section 4.3: a document for another issuer is not this issuer's).
pub fn jwks_url(doc: &str, issuer: &str, from: &HttpsUrl) -> Result<HttpsUrl, DiscoveryError> {
    let bad = |why: String| DiscoveryError::Document(from.to_string(), why);
    let d: Document = serde_json::from_str(doc)
        .map_err(|e| bad(format!("not JSON with issuer and jwks_uri: {e}")))?;
    if d.issuer != issuer {
        return Err(bad(format!(
            "names issuer {:?}, not the configured {issuer:?}",
            d.issuer
        )));
    }
    https_url(&d.jwks_uri).map_err(|e| bad(format!("jwks_uri: {e}")))
}

/// What to do before verifying a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Verify with the keys held.
    UseHeld,
    /// Fetch first (then verify with the new keys, or the held ones if the fetch fails).
    Fetch,
}

/// When to fetch: with no keys, when they are older than `refresh`, or when a token's key id is not
/// among them; but never within [`MIN_REFETCH`] (or `refresh`, when shorter) of the last attempt.
pub fn plan(
    now: Instant,
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
    refresh: Duration,
    unknown_kid: bool,
) -> Plan {
    let cool_down = MIN_REFETCH.min(refresh);
    let cooled = last_attempt.is_none_or(|t| now.saturating_duration_since(t) >= cool_down);
    let aged = fetched.is_none_or(|t| now.saturating_duration_since(t) >= refresh);
    if (aged || unknown_kid) && cooled {
        Plan::Fetch
    } else {
        Plan::UseHeld
    }
}

/// The issuer's keys as the discovery document leads to them.
#[derive(Debug)]
pub struct Discovery {
    issuer: String,
    document: HttpsUrl,
    tls: Arc<rustls::ClientConfig>,
    bearer_file: Option<PathBuf>,
    refresh: Duration,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    keys: Option<Arc<Vec<Key>>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    last_error: Option<DiscoveryError>,
}

impl Discovery {
    /// Checks the issuer URL and reads the CA bundle; fetches nothing yet.
    pub fn new(
        issuer: &str,
        ca_bundle: &Path,
        bearer_file: Option<PathBuf>,
        refresh: Duration,
    ) -> Result<Self, DiscoveryError> {
        let document = discovery_url(issuer)?;
        let pem = std::fs::read_to_string(ca_bundle)
            .map_err(|e| DiscoveryError::Config(format!("{}: {e}", ca_bundle.display())))?;
        let roots = crate::tls::root_store(&[pem])
            .map_err(|e| DiscoveryError::Config(format!("{}: {e}", ca_bundle.display())))?;
        if roots.is_empty() {
            return Err(DiscoveryError::Config(format!(
                "{}: no certificate",
                ca_bundle.display()
            )));
        }
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| DiscoveryError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            issuer: issuer.to_owned(),
            document,
            tls: Arc::new(cfg),
            bearer_file,
            refresh,
            held: Mutex::new(Held::default()),
        })
    }

    /// The keys to verify with, fetched first when [`plan`] says so. `unknown_kid` asks for a fetch
    /// because a token named a key the held ones lack. Errors only when no key was ever fetched.
    pub async fn keys(&self, unknown_kid: bool) -> Result<Arc<Vec<Key>>, DiscoveryError> {
        let mut held = self.held.lock().await;
        let now = Instant::now();
        if plan(now, held.fetched, held.attempted, self.refresh, unknown_kid) == Plan::Fetch {
            held.attempted = Some(now);
            match self.fetch().await {
                Ok(keys) => {
                    tracing::info!(issuer = %self.issuer, keys = keys.len(), "service-account issuer keys fetched");
                    held.keys = Some(Arc::new(keys));
                    held.fetched = Some(Instant::now());
                    held.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the service-account issuer keys; keeping the last good ones");
                    held.last_error = Some(e);
                }
            }
        }
        match (&held.keys, &held.last_error) {
            (Some(k), _) => Ok(k.clone()),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(DiscoveryError::Fetch(
                self.document.to_string(),
                format!("not fetched yet (next attempt within {MIN_REFETCH:?})"),
            )),
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, DiscoveryError> {
        let doc = self.get(&self.document).await?;
        let jwks = jwks_url(&doc, &self.issuer, &self.document)?;
        let text = self.get(&jwks).await?;
        parse_jwks(&text).map_err(|e| DiscoveryError::Jwks(jwks.to_string(), e))
    }

    /// One GET over its own TLS connection, bounded in time and size; 200 only, no redirects.
    async fn get(&self, url: &HttpsUrl) -> Result<String, DiscoveryError> {
        let fail = |e: String| DiscoveryError::Fetch(url.to_string(), e);
        let bearer = match &self.bearer_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| DiscoveryError::Config(format!("{}: {e}", p.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let exchange = async {
            let tcp = TcpStream::connect((url.host.as_str(), url.port))
                .await
                .map_err(|e| fail(format!("connect: {e}")))?;
            let name = ServerName::try_from(url.host.clone()).map_err(|e| fail(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let driver = tokio::spawn(conn);
            let authority = if url.port == 443 {
                url.host.clone()
            } else {
                format!("{}:{}", url.host, url.port)
            };
            let mut req = http::Request::get(url.path.as_str())
                .header(http::header::HOST, authority)
                .header(http::header::ACCEPT, "application/json");
            if let Some(t) = &bearer {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| fail(e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| fail(e.to_string()));
            let out = match resp {
                Ok(r) if r.status() != http::StatusCode::OK => {
                    Err(DiscoveryError::Status(url.to_string(), r.status().as_u16()))
                }
                Ok(r) => match Limited::new(r.into_body(), MAX_DOCUMENT).collect().await {
                    Ok(b) => String::from_utf8(b.to_bytes().to_vec())
                        .map_err(|_| fail("body is not UTF-8".into())),
                    Err(e) => Err(fail(format!("body: {e}"))),
                },
                Err(e) => Err(e),
            };
            driver.abort();
            out
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {FETCH_TIMEOUT:?}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_without_query_or_credentials() {
        let u = https_url("https://kubernetes.default.svc.cluster.local").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("kubernetes.default.svc.cluster.local", 443, "/")
        );
        let u = https_url("https://[::1]:8443/keys").expect("v6");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8443, "/keys")
        );
        for bad in [
            "http://example.com",
            "https://user:pw@example.com/",
            "https://example.com/?x=1",
            "https://example.com/#f",
            "example.com",
            "",
        ] {
            assert!(https_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_document_sits_under_the_issuer_path() {
        let d = discovery_url("https://oidc.example.com/clusters/a/").expect("url");
        assert_eq!(d.path, "/clusters/a/.well-known/openid-configuration");
        let d = discovery_url("https://10.0.0.1:6443").expect("url");
        assert_eq!(
            d.to_string(),
            "https://10.0.0.1:6443/.well-known/openid-configuration"
        );
    }

    #[test]
    fn a_document_must_name_the_configured_issuer_and_an_https_jwks() {
        let from = discovery_url("https://a.example").expect("url");
        let ok =
            r#"{"issuer":"https://a.example","jwks_uri":"https://a.example:6443/openid/v1/jwks"}"#;
        let u = jwks_url(ok, "https://a.example", &from).expect("ok");
        assert_eq!((u.port, u.path.as_str()), (6443, "/openid/v1/jwks"));
        let other = r#"{"issuer":"https://b.example","jwks_uri":"https://a.example/jwks"}"#;
        let e = jwks_url(other, "https://a.example", &from).expect_err("other issuer");
        assert!(
            e.to_string().contains("names issuer \"https://b.example\""),
            "{e}"
        );
        let http = r#"{"issuer":"https://a.example","jwks_uri":"http://a.example/jwks"}"#;
        assert!(jwks_url(http, "https://a.example", &from).is_err());
        assert!(jwks_url("[]", "https://a.example", &from).is_err());
        assert!(
            jwks_url(
                r#"{"issuer":"https://a.example"}"#,
                "https://a.example",
                &from
            )
            .is_err()
        );
    }

    #[test]
    fn fetches_are_planned_by_age_and_unknown_keys_at_most_every_thirty_seconds() {
        let t0 = Instant::now();
        let refresh = Duration::from_secs(300);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Nothing held: fetch.
        assert_eq!(plan(t0, None, None, refresh, false), Plan::Fetch);
        // Fresh keys: use them, even for an unknown kid right after the fetch.
        assert_eq!(
            plan(at(10), Some(t0), Some(t0), refresh, false),
            Plan::UseHeld
        );
        assert_eq!(
            plan(at(10), Some(t0), Some(t0), refresh, true),
            Plan::UseHeld
        );
        // An unknown kid after the cool-down: fetch.
        assert_eq!(plan(at(31), Some(t0), Some(t0), refresh, true), Plan::Fetch);
        // Old keys: fetch.
        assert_eq!(
            plan(at(300), Some(t0), Some(t0), refresh, false),
            Plan::Fetch
        );
        // A failed attempt 5 s ago with nothing held: wait for the cool-down.
        assert_eq!(plan(at(5), None, Some(t0), refresh, false), Plan::UseHeld);
        assert_eq!(plan(at(30), None, Some(t0), refresh, false), Plan::Fetch);
        // A refresh interval under 30 s shortens the cool-down to it.
        let short = Duration::from_secs(2);
        assert_eq!(plan(at(1), Some(t0), Some(t0), short, true), Plan::UseHeld);
        assert_eq!(plan(at(2), Some(t0), Some(t0), short, false), Plan::Fetch);
    }
}
