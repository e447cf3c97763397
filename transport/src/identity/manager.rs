//! The certificate lifecycle of a proxy in controller mode: bootstrap, renew, and keep serving.
//!
//! One worker task owns it. The key pair is generated here and never leaves the proxy: the CA only sees a
//! CSR. The first certificate is bought with the join token; after that the proxy renews over mTLS with
//! its current certificate, at a jittered share of the lifetime (so a fleet does not renew in step). A
//! failed renewal is retried with exponential backoff while the still-valid certificate keeps being
//! presented; a new one is installed with [`Credentials::set_leaf`], which rustls reads per handshake, so
//! established connections and streams are untouched. The CA is reached through the [`CaClient`] trait,
//! so tests drive the schedule with a fake CA on paused time.
//!
//! A certificate that expires anyway (the controller was down longer than its lifetime) cannot renew over
//! mTLS: the controller refuses the expired client certificate. The way back is the join token again:
//! once the leaf has expired, every attempt bootstraps with the token re-read from `join_token_file`
//! (or the configured `join_token`), so the operator writes a fresh token into that file and the proxy
//! rejoins without a restart ([`credential_for`]).

use std::{path::PathBuf, time::Duration};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{
    Credentials, Leaf, SpiffeId,
    ca::generate_csr,
    credentials::{CredentialsError, LeafInfo, roots_from_pem},
    inspect::CertInfo,
};
use crate::metrics::{IdentityMetrics, ResultLabels};

/// What the CA returned for a CSR.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, PEM.
    pub cert_chain_pem: Vec<String>,
    /// Every root the mesh trusts now, PEM.
    pub trust_bundle_pem: Vec<String>,
}

/// Why the CA did not sign.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaClientError {
    /// The CA could not be reached or did not answer in time: worth retrying soon.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// The CA answered with a refusal (bad or spent token, revoked identity, wrong identity).
    #[error("CA refused: {0}")]
    Refused(String),
}

/// A certificate authority the manager can ask for certificates.
pub trait CaClient: Send + Sync + 'static {
    /// Signs `csr_pem`. With `join_token` the caller bootstraps; without, it authenticates with its current
    /// certificate (read from the credentials the implementation holds).
    fn certify(
        &self,
        csr_pem: String,
        join_token: Option<String>,
    ) -> impl Future<Output = Result<Issued, CaClientError>> + Send;
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ObtainError {
    /// The CSR could not be made.
    #[error("cannot make a CSR: {0}")]
    Csr(#[from] super::CaError),
    /// The CA did not sign.
    #[error(transparent)]
    Ca(#[from] CaClientError),
    /// The CA's answer is not usable.
    #[error("unusable certificate from the CA: {0}")]
    Certificate(#[from] CredentialsError),
    /// The CA signed another identity than the one asked for.
    #[error("CA issued {got}, expected {want}")]
    WrongIdentity {
        /// Asked for.
        want: SpiffeId,
        /// Received.
        got: SpiffeId,
    },
}

/// What the bootstrap credential is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenKind {
    /// A quicmesh join token (`qmt_...`), made with `quicmesh ctl tokens create`.
    #[default]
    Join,
    /// A Kubernetes projected service-account token (a JWT the kubelet rotates in its file): read
    /// again from the file for every bootstrap.
    ServiceAccount,
}

/// Settings of the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The identity asked for.
    pub id: SpiffeId,
    /// What `join_token` is.
    pub kind: TokenKind,
    /// The bootstrap credential; spent by the first success.
    pub join_token: String,
    /// Where `join_token` was read from, re-read to bootstrap again after the certificate expired.
    pub join_token_file: Option<PathBuf>,
    /// Share of the lifetime after which a certificate is renewed (jittered by ±0.1).
    pub renew_fraction: f64,
}

/// Why the first certificate has not come yet, published for whoever waits on it (`quicmesh run` fails
/// with it instead of waiting in silence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapProblem {
    /// The last failure, in words.
    pub message: String,
    /// The controller answered and said no (a bad or spent token): retrying the same credential will
    /// not help. Otherwise the controller was unreachable.
    pub refused: bool,
}

/// First retry delay after a failure; doubled per consecutive failure.
const BASE_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// When to renew a certificate received at `now`: at `fraction` of its useful lifetime, moved by
/// `jitter` (in -1..=1) times 0.1 of it, never before 5% or after 95% of it. The useful lifetime starts
/// at `now` when `not_before` is earlier: CAs backdate `not_before` for clock skew, and counting the
/// backdated part would renew a short-lived certificate at once, again and again.
pub fn renew_at(
    info: &LeafInfo,
    now: OffsetDateTime,
    fraction: f64,
    jitter: f64,
) -> OffsetDateTime {
    let start = info.not_before.max(now).min(info.not_after);
    let lifetime = info.not_after - start;
    let share = (fraction + 0.1 * jitter.clamp(-1.0, 1.0)).clamp(0.05, 0.95);
    start + lifetime * share
}

/// Delay before retry number `failures` (1 = first retry): exponential with jitter (`jitter01` in 0..1
/// scales it to 50–100%), capped at [`MAX_BACKOFF`] and, while a certificate is still valid, at a quarter
/// of its remaining life so several attempts fit before it expires.
pub fn backoff(failures: u32, jitter01: f64, remaining: Option<Duration>) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1 << failures.clamp(1, 16).saturating_sub(1));
    let mut d = exp.min(MAX_BACKOFF);
    if let Some(r) = remaining.filter(|r| !r.is_zero()) {
        d = d.min((r / 4).max(BASE_BACKOFF));
    }
    d.mul_f64(0.5 + 0.5 * jitter01.clamp(0.0, 1.0))
}

/// What the next attempt presents to the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No certificate yet: the configured join token.
    FirstToken,
    /// A valid certificate: renew over mTLS.
    Certificate,
    /// The certificate expired: a join token read again from `join_token_file`.
    FreshToken,
}

/// The credential for an attempt at `now`, given the current leaf's expiry (if any).
pub fn credential_for(not_after: Option<OffsetDateTime>, now: OffsetDateTime) -> Credential {
    match not_after {
        None => Credential::FirstToken,
        Some(t) if t > now => Credential::Certificate,
        Some(_) => Credential::FreshToken,
    }
}

/// The join token to bootstrap with again: `join_token_file` re-read, or the configured token.
async fn fresh_token(cfg: &ManagerConfig) -> Result<String, String> {
    let Some(path) = &cfg.join_token_file else {
        return Ok(cfg.join_token.clone());
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("join_token_file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("join_token_file {}: empty", path.display()));
    }
    Ok(token.to_owned())
}

/// Generates a key, has the CA sign it, and checks the answer.
pub async fn obtain<C: CaClient>(
    ca: &C,
    id: &SpiffeId,
    join_token: Option<String>,
) -> Result<(Leaf, Option<rustls::RootCertStore>, String), ObtainError> {
    let (csr, key_pem) = generate_csr(id)?;
    let issued = ca.certify(csr, join_token).await?;
    let chain = issued.cert_chain_pem.join("\n");
    let leaf = Leaf::from_pem(
        &crate::quic::provider(),
        chain.as_bytes(),
        key_pem.as_bytes(),
    )?;
    if &leaf.info.id != id {
        return Err(ObtainError::WrongIdentity {
            want: id.clone(),
            got: leaf.info.id,
        });
    }
    let serial = CertInfo::from_pem(&chain)
        .map(|i| i.serial_hex)
        .unwrap_or_default();
    let roots = if issued.trust_bundle_pem.is_empty() {
        None
    } else {
        Some(roots_from_pem(
            issued.trust_bundle_pem.join("\n").as_bytes(),
        )?)
    };
    Ok((leaf, roots, serial))
}

/// The worker: obtains the first certificate, then renews it for as long as `shutdown` is not cancelled.
/// Until the first certificate is held, each failure is published on `problems`.
pub async fn run<C: CaClient>(
    ca: C,
    creds: Credentials,
    cfg: ManagerConfig,
    metrics: IdentityMetrics,
    problems: tokio::sync::watch::Sender<Option<BootstrapProblem>>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut was_expired = false;
    // Due now: there is no certificate yet.
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let not_after = creds.leaf().map(|l| l.info.not_after);
        let credential = credential_for(not_after, OffsetDateTime::now_utc());
        let expired = credential == Credential::FreshToken;
        if expired && !was_expired {
            // A new phase: try at once, and back off from the start.
            failures = 0;
            tracing::error!(
                join_token_file = ?cfg.join_token_file,
                "the certificate expired before it could be renewed; bootstrapping again with the join token (write a fresh token into join_token_file)"
            );
        }
        was_expired = expired;
        let token = match credential {
            // A service-account token is rotated by the kubelet: the file's current one, every time.
            Credential::FirstToken if cfg.kind == TokenKind::ServiceAccount => {
                fresh_token(&cfg).await.map(Some)
            }
            Credential::FirstToken => Ok(Some(cfg.join_token.clone())),
            Credential::Certificate => Ok(None),
            Credential::FreshToken => fresh_token(&cfg).await.map(Some),
        };
        let result = match token {
            Ok(token) => tokio::select! {
                _ = shutdown.cancelled() => return,
                r = obtain(&ca, &cfg.id, token) => r,
            },
            Err(e) => Err(ObtainError::Ca(CaClientError::Refused(e))),
        };
        let now = OffsetDateTime::now_utc();
        let bootstrap = credential != Credential::Certificate;
        match result {
            Ok((leaf, roots, serial)) => {
                failures = 0;
                metrics
                    .certify
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                metrics
                    .cert_expiry
                    .set(leaf.info.not_after.unix_timestamp());
                let at = renew_at(
                    &leaf.info,
                    now,
                    cfg.renew_fraction,
                    rand::random_range(-1.0..=1.0),
                );
                delay = duration_between(now, at);
                tracing::info!(
                    id = %leaf.info.id,
                    %serial,
                    not_after = %leaf.info.not_after,
                    renew_in = ?delay,
                    bootstrap,
                    "certificate installed"
                );
                if let Some(r) = roots {
                    creds.set_roots(r);
                }
                creds.set_leaf(leaf);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics
                    .certify
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                let remaining = creds
                    .leaf()
                    .map(|l| duration_between(now, l.info.not_after));
                delay = backoff(failures, rand::random(), remaining);
                match remaining {
                    Some(r) if !r.is_zero() => {
                        // The first bootstrap attempt comes right at expiry.
                        delay = delay.min(r);
                        tracing::warn!(
                            error = %e, failures, retry_in = ?delay, still_valid_for = ?r,
                            "certificate renewal failed; serving with the current certificate"
                        )
                    }
                    Some(_) => tracing::error!(
                        error = %e, failures, retry_in = ?delay, join_token_file = ?cfg.join_token_file,
                        "the certificate has expired and bootstrapping again failed; peers refuse it until a fresh join token is in join_token_file"
                    ),
                    None => {
                        tracing::warn!(
                            error = %e, failures, retry_in = ?delay,
                            "cannot obtain the first certificate"
                        );
                        problems.send_replace(Some(BootstrapProblem {
                            refused: matches!(e, ObtainError::Ca(CaClientError::Refused(_))),
                            message: e.to_string(),
                        }));
                    }
                }
            }
        }
    }
}

/// `to - from`, zero if `to` is past.
fn duration_between(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    Duration::try_from(to - from).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;
    use crate::identity::CertificateAuthority;

    fn info(nb: i64, na: i64) -> LeafInfo {
        LeafInfo {
            id: "spiffe://t/ns/a/sa/b".parse().expect("id"),
            not_before: OffsetDateTime::from_unix_timestamp(nb).expect("ts"),
            not_after: OffsetDateTime::from_unix_timestamp(na).expect("ts"),
        }
    }

    #[test]
    fn renewal_falls_between_half_and_seventy_percent() {
        let i = info(1000, 1100);
        let ts = |t| OffsetDateTime::from_unix_timestamp(t).expect("ts");
        let at = |j| renew_at(&i, ts(1000), 0.6, j).unix_timestamp();
        assert_eq!(at(0.0), 1060);
        assert_eq!(at(-1.0), 1050);
        assert_eq!(at(1.0), 1070);
        assert_eq!(at(7.0), 1070, "jitter is clamped");
        assert_eq!(renew_at(&i, ts(1000), 0.9, 1.0).unix_timestamp(), 1095);
        // Backdated by 300 s, 10 s left when received: renew 6 s after receipt, not at once.
        let backdated = info(700, 1010);
        assert_eq!(
            renew_at(&backdated, ts(1000), 0.6, 0.0).unix_timestamp(),
            1006
        );
        // Received after expiry: now.
        assert_eq!(renew_at(&i, ts(1200), 0.6, 0.0).unix_timestamp(), 1100);
    }

    #[test]
    fn an_expired_certificate_bootstraps_again_with_a_fresh_token() {
        let ts = |t| OffsetDateTime::from_unix_timestamp(t).expect("ts");
        assert_eq!(credential_for(None, ts(100)), Credential::FirstToken);
        assert_eq!(
            credential_for(Some(ts(101)), ts(100)),
            Credential::Certificate
        );
        assert_eq!(
            credential_for(Some(ts(100)), ts(100)),
            Credential::FreshToken
        );
        assert_eq!(
            credential_for(Some(ts(50)), ts(100)),
            Credential::FreshToken
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1, 1.0, None), Duration::from_millis(500));
        assert_eq!(backoff(3, 1.0, None), Duration::from_secs(2));
        assert_eq!(backoff(40, 1.0, None), MAX_BACKOFF);
        assert_eq!(backoff(3, 0.0, None), Duration::from_secs(1));
        // 8 s of validity left: never wait more than 2 s.
        assert_eq!(
            backoff(10, 1.0, Some(Duration::from_secs(8))),
            Duration::from_secs(2)
        );
    }

    /// A CA signing for `lifetime`, failing renewals while `fail` is set (all of them when `u32::MAX`,
    /// as for an expired client certificate), accepting only tokens listed in `accept`, recording the
    /// tokens it saw.
    struct FakeCa {
        ca: CertificateAuthority,
        lifetime: time::Duration,
        fail: Arc<AtomicU32>,
        accept: Arc<Mutex<Vec<String>>>,
        tokens: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl CaClient for FakeCa {
        async fn certify(
            &self,
            csr_pem: String,
            join_token: Option<String>,
        ) -> Result<Issued, CaClientError> {
            self.tokens.lock().expect("lock").push(join_token.clone());
            if let Some(t) = &join_token {
                let mut accept = self.accept.lock().expect("lock");
                let Some(i) = accept.iter().position(|a| a == t) else {
                    return Err(CaClientError::Refused("join token spent".into()));
                };
                accept.remove(i);
            }
            if join_token.is_none()
                && self
                    .fail
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(CaClientError::Unavailable("down".into()));
            }
            let now = OffsetDateTime::now_utc();
            let id: SpiffeId = "spiffe://t.test/ns/a/sa/b".parse().expect("id");
            let cert = self
                .ca
                .sign_csr(
                    &csr_pem,
                    &id,
                    now - time::Duration::seconds(1),
                    now + self.lifetime,
                )
                .map_err(|e| CaClientError::Refused(e.to_string()))?;
            Ok(Issued {
                cert_chain_pem: vec![cert],
                trust_bundle_pem: vec![self.ca.cert_pem().to_owned()],
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bootstraps_renews_and_keeps_the_certificate_while_renewal_fails() {
        let ca = CertificateAuthority::generate(
            "t.test",
            OffsetDateTime::now_utc() + time::Duration::days(1),
        )
        .expect("ca");
        let roots = roots_from_pem(ca.cert_pem().as_bytes()).expect("roots");
        let fail = Arc::new(AtomicU32::new(0));
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let fake = FakeCa {
            ca,
            lifetime: time::Duration::seconds(60),
            fail: fail.clone(),
            accept: Arc::new(Mutex::new(vec!["qmj_one".into()])),
            tokens: tokens.clone(),
        };
        let creds = Credentials::pending(roots, "t.test".into());
        let metrics = IdentityMetrics::default();
        let stop = CancellationToken::new();
        let cfg = ManagerConfig {
            id: "spiffe://t.test/ns/a/sa/b".parse().expect("id"),
            kind: TokenKind::Join,
            join_token: "qmj_one".into(),
            join_token_file: None,
            renew_fraction: 0.5,
        };
        let task = tokio::spawn(run(
            fake,
            creds.clone(),
            cfg,
            metrics.clone(),
            tokio::sync::watch::Sender::new(None),
            stop.clone(),
        ));

        creds.wait_leaf().await;
        let first = creds.leaf().expect("leaf");
        assert_eq!(creds.generation(), 1);
        assert_eq!(tokens.lock().expect("lock")[0].as_deref(), Some("qmj_one"));

        // Renewal at 40–60% of 60 s: within 37 s the certificate changed, without the token.
        tokio::time::sleep(Duration::from_secs(37)).await;
        assert_eq!(creds.generation(), 2);
        assert_eq!(tokens.lock().expect("lock")[1], None);
        assert_ne!(
            creds.leaf().expect("leaf").key.cert[0],
            first.key.cert[0],
            "renewed"
        );

        // Three failed renewals: the current certificate stays, the manager backs off and retries.
        fail.store(3, Ordering::Release);
        let before = creds.leaf().expect("leaf").key.cert[0].clone();
        let errors = || {
            metrics
                .certify
                .get_or_create(&ResultLabels { result: "error" })
                .get()
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while errors() < 3 {
            assert!(tokio::time::Instant::now() < until, "renewal never failed");
            assert_eq!(
                creds.leaf().expect("leaf").key.cert[0],
                before,
                "kept while renewal fails"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(creds.generation(), 2);
        // Backoff after three failures is at most 2 s (a quarter of the remaining life caps it too).
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(creds.generation(), 3, "recovered after the failures");
        assert_ne!(creds.leaf().expect("leaf").key.cert[0], before);
        assert!(
            tokens.lock().expect("lock")[1..]
                .iter()
                .all(Option::is_none)
        );
        stop.cancel();
        task.await.expect("manager task");
    }

    /// The controller was down past the certificate's expiry: renewals keep failing, the leaf expires,
    /// the spent token in `join_token_file` is refused, and a fresh one written there brings the proxy
    /// back without a restart. Real time: the certificate lives 2 s.
    #[tokio::test]
    async fn an_expired_certificate_recovers_with_a_fresh_token_from_the_file() {
        let ca = CertificateAuthority::generate(
            "t.test",
            OffsetDateTime::now_utc() + time::Duration::days(1),
        )
        .expect("ca");
        let roots = roots_from_pem(ca.cert_pem().as_bytes()).expect("roots");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "qmt_first\n").expect("token file");
        let accept = Arc::new(Mutex::new(vec!["qmt_first".to_owned()]));
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let fake = FakeCa {
            ca,
            lifetime: time::Duration::seconds(2),
            // Every renewal fails, as with a controller that is down.
            fail: Arc::new(AtomicU32::new(u32::MAX)),
            accept: accept.clone(),
            tokens: tokens.clone(),
        };
        let creds = Credentials::pending(roots, "t.test".into());
        let stop = CancellationToken::new();
        let cfg = ManagerConfig {
            id: "spiffe://t.test/ns/a/sa/b".parse().expect("id"),
            kind: TokenKind::Join,
            join_token: "qmt_first".into(),
            join_token_file: Some(file.clone()),
            renew_fraction: 0.5,
        };
        let task = tokio::spawn(run(
            fake,
            creds.clone(),
            cfg,
            IdentityMetrics::default(),
            tokio::sync::watch::Sender::new(None),
            stop.clone(),
        ));
        creds.wait_leaf().await;
        assert_eq!(creds.generation(), 1);
        let count = |t: &str| {
            tokens
                .lock()
                .expect("lock")
                .iter()
                .filter(|x| x.as_deref() == Some(t))
                .count()
        };
        // After expiry the spent token is read again from the file and refused.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while count("qmt_first") < 2 {
            assert!(
                std::time::Instant::now() < until,
                "no bootstrap after expiry"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(creds.generation(), 1, "a spent token buys nothing");
        // The operator writes a fresh token: the proxy rejoins.
        accept.lock().expect("lock").push("qmt_fresh".into());
        std::fs::write(&file, "qmt_fresh\n").expect("fresh token");
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while creds.generation() < 2 {
            assert!(std::time::Instant::now() < until, "never rejoined");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count("qmt_fresh"), 1);
        let leaf = creds.leaf().expect("leaf");
        assert!(leaf.info.not_after > OffsetDateTime::now_utc());
        stop.cancel();
        task.await.expect("manager task");
    }
}
