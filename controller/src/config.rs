//! `quicmesh controller` flags and how they become [`StateOptions`].
//!
//! One place for every setting and its default, so `--help`, the start-up log line and the code agree.
//! Durations are written the human way (`90s`, `10m`, `1h`, `30d`), parsed by `humantime`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    ca::Retention,
    error::StartError,
    keystore::KEK_ENV,
    state::StateOptions,
    store::etcd::{DEFAULT_MAX_TXN_OPS, DEFAULT_PREFIX, EtcdOptions, EtcdTls},
    tls::Limits,
};

/// Environment variable holding the etcd password of --etcd-user.
pub const ETCD_PASSWORD_ENV: &str = "QUICMESH_ETCD_PASSWORD";

/// Flags of `quicmesh controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Where the state lives, and how to reach etcd (boxed: the flags of `quicmesh controller` are one
    /// variant of the CLI's command enum).
    #[command(flatten)]
    pub store: Box<StoreArgs>,
    /// Directory for the sled database, the trust bundle file and the default KEK file (created if
    /// missing).
    #[arg(long, env = "QUICMESH_DATA_DIR", default_value = "quicmesh-data")]
    pub data_dir: PathBuf,
    /// Address of the gRPC listener (TLS; proxy API, admin API, health, reflection). Port 0 picks one.
    #[arg(
        long,
        env = "QUICMESH_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:7443"
    )]
    pub listen: SocketAddr,
    /// Address of the controller's own Prometheus `/metrics` (plain HTTP, no token: the mesh's golden
    /// metrics and the controller's counters). Off unless given; port 0 picks one.
    #[arg(long, env = "QUICMESH_CONTROLLER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Address of the web dashboard (plain HTTP; its data needs the admin token). Off unless given;
    /// keep it on loopback and reach it through a tunnel.
    #[arg(long, env = "QUICMESH_CONTROLLER_DASHBOARD_ADDR")]
    pub dashboard_addr: Option<SocketAddr>,
    /// Trust domain of a new mesh (default quicmesh.local); must match an existing data directory.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Lifetime of issued leaf certificates, e.g. `1h` (default), `10s`. Replaces the stored setting.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub leaf_ttl: Option<Duration>,
    /// Operator-provided root certificate (PEM) for a new mesh; needs --root-key.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// Private key (PKCS#8 PEM) of --root-cert.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Extra DNS name or IP for the controller's TLS certificate (repeatable); localhost and loopback are
    /// always included.
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// How long a spent, revoked or expired join token is kept (listed by `ctl tokens list`) before it
    /// is deleted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub token_retention: Duration,
    /// How long an audit record is kept after its certificate expired.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
    pub audit_retention: Duration,
    /// File holding the key-encryption key that seals the root CA keys in the database (generated,
    /// owner-only, on the first start of a new mesh). Default `<data-dir>/kek`; keep it apart from the
    /// data directory's backups. The env variable QUICMESH_KEK (base64 of 32 bytes) wins over it.
    #[arg(long)]
    pub kek_file: Option<PathBuf>,
    /// Watch streams one identity may hold at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = crate::registry::DEFAULT_MAX_WATCHES)]
    pub max_watches_per_identity: usize,
    /// TCP connections to the gRPC listener at once (handshaking or established); more are closed at
    /// once.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// TLS handshakes in progress at once; more connections are closed at once.
    #[arg(long, default_value_t = Limits::default().max_handshakes)]
    pub max_handshakes: usize,
    /// Deadline of one TLS handshake.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub handshake_timeout: Duration,
    /// How long an endpoint a proxy registered stays after that proxy's connection to this controller
    /// closed (killed, host gone) before it is withdrawn; a proxy that reconnects registers it again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub endpoint_grace: Duration,
    /// Kubernetes bootstrap: the cluster's service-account issuer keys as a JWKS file (`kubectl get
    /// --raw /openid/v1/jwks`). With it, a proxy may bootstrap with its projected service-account token
    /// instead of a join token; the file is read again when it changes. Needs --k8s-issuer.
    #[arg(long, requires = "k8s_issuer", conflicts_with = "k8s_discovery")]
    pub k8s_jwks: Option<PathBuf>,
    /// Kubernetes bootstrap with the issuer's keys fetched from its OpenID discovery document
    /// (`<k8s-issuer>/.well-known/openid-configuration`, then its `jwks_uri`) over HTTPS verified
    /// against --k8s-discovery-ca; fetched again every --k8s-discovery-refresh, and early (at most
    /// every 30 s) when a token names a key the held ones lack. Needs --k8s-issuer.
    #[arg(long, requires_all = ["k8s_issuer", "k8s_discovery_ca"])]
    pub k8s_discovery: bool,
    /// The CA bundle (PEM) the issuer's HTTPS server is verified against (in a pod:
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt).
    #[arg(long, requires = "k8s_discovery")]
    pub k8s_discovery_ca: Option<PathBuf>,
    /// A bearer token sent with the discovery requests, read at each fetch (clusters whose
    /// discovery endpoints are not anonymous: the controller's own service-account token).
    #[arg(long, requires = "k8s_discovery")]
    pub k8s_discovery_token_file: Option<PathBuf>,
    /// How old discovered keys may get before they are fetched again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub k8s_discovery_refresh: Duration,
    /// The `iss` the service-account tokens must carry (the cluster's --service-account-issuer).
    #[arg(long)]
    pub k8s_issuer: Option<String>,
    /// An audience the tokens must carry (repeatable): what the pod's projected token asks for.
    #[arg(long = "k8s-audience", default_value = "quicmesh")]
    pub k8s_audiences: Vec<String>,
}

/// `--store` and the etcd flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where the state lives: `sled` (default: a database in --data-dir) or
    /// `etcd://host:port[,host:port...]` (an etcd v3 cluster several controllers share; every one of
    /// them needs the same key-encryption key, --kek-file or QUICMESH_KEK).
    #[arg(long, env = "QUICMESH_STORE", default_value = "sled")]
    pub store: String,
    /// Key prefix of the mesh in etcd (several meshes can share one etcd under different prefixes).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) of the etcd members; turns TLS to etcd on.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate auth; needs --etcd-key and --etcd-ca.
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name (etcd auth); the password comes from the env variable QUICMESH_ETCD_PASSWORD.
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// Deadline of one etcd request; a write that does not finish in it fails with UNAVAILABLE.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub etcd_timeout: Duration,
    /// The etcd cluster's --max-txn-ops (etcd's default 128): a batch takes one operation more than
    /// its writes, and larger batches are refused before they are sent.
    #[arg(long, default_value_t = DEFAULT_MAX_TXN_OPS)]
    pub etcd_max_txn_ops: usize,
}

impl StoreArgs {
    /// The etcd settings when --store names etcd.
    pub fn etcd_options(&self) -> Result<Option<EtcdOptions>, StartError> {
        if self.store == "sled" {
            return Ok(None);
        }
        let mut o = EtcdOptions::from_url(&self.store)
            .map_err(|e| StartError::Config(format!("--store: {e}")))?;
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| StartError::Io {
                path: p.clone(),
                source,
            })
        };
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            return Err(StartError::Config(format!(
                "--etcd-prefix {:?}: must start and end with /",
                self.etcd_prefix
            )));
        }
        o.prefix = self.etcd_prefix.clone();
        if let Some(ca) = &self.etcd_ca {
            let identity = match (&self.etcd_cert, &self.etcd_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            };
            o.tls = Some(EtcdTls {
                ca_pem: read(ca)?,
                identity,
            });
        }
        if let Some(user) = &self.etcd_user {
            let password = std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
                StartError::Config(format!(
                    "--etcd-user needs the password in {ETCD_PASSWORD_ENV}"
                ))
            })?;
            o.user = Some((user.clone(), password));
        }
        if self.etcd_timeout.is_zero() || self.etcd_max_txn_ops < 2 {
            return Err(StartError::Config(
                "--etcd-timeout must be positive and --etcd-max-txn-ops at least 2".into(),
            ));
        }
        o.timeout = self.etcd_timeout;
        o.max_txn_ops = self.etcd_max_txn_ops;
        Ok(Some(o))
    }
}

impl ControllerArgs {
    /// The etcd settings when --store names etcd.
    pub fn etcd_options(&self) -> Result<Option<EtcdOptions>, StartError> {
        self.store.etcd_options()
    }

    /// Reads the files the flags name and builds the state options.
    pub fn state_options(&self) -> Result<StateOptions, StartError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| StartError::Io {
                path: p.clone(),
                source,
            })
        };
        let root_pem = match (&self.root_cert, &self.root_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let mut tls_names = self.tls_names.clone();
        if !self.listen.ip().is_unspecified() {
            tls_names.push(self.listen.ip().to_string());
        }
        if let Some(ttl) = self.leaf_ttl
            && (ttl.as_secs() == 0 || ttl.as_secs() > crate::model::MAX_LEAF_TTL_SECONDS)
        {
            return Err(StartError::Config(format!(
                "--leaf-ttl must be between 1s and 30 days, got {ttl:?}"
            )));
        }
        if self.max_watches_per_identity == 0
            || self.max_connections == 0
            || self.max_handshakes == 0
        {
            return Err(StartError::Config(
                "--max-watches-per-identity, --max-connections and --max-handshakes must be at least 1"
                    .into(),
            ));
        }
        let service_account_tokens = match (&self.k8s_jwks, &self.k8s_issuer) {
            (Some(jwks), Some(issuer)) => Some(std::sync::Arc::new(
                crate::k8s::TokenAuthority::load(
                    jwks.clone(),
                    issuer.clone(),
                    self.k8s_audiences.clone(),
                )
                .map_err(|e| StartError::Config(format!("--k8s-jwks {e}")))?,
            )),
            (None, Some(issuer)) if self.k8s_discovery => {
                let ca = self.k8s_discovery_ca.as_deref().ok_or_else(|| {
                    StartError::Config("--k8s-discovery needs --k8s-discovery-ca".into())
                })?;
                let discovery = crate::oidc::Discovery::new(
                    issuer,
                    ca,
                    self.k8s_discovery_token_file.clone(),
                    self.k8s_discovery_refresh,
                )
                .map_err(|e| StartError::Config(format!("--k8s-discovery: {e}")))?;
                Some(std::sync::Arc::new(
                    crate::k8s::TokenAuthority::discover(
                        discovery,
                        issuer.clone(),
                        self.k8s_audiences.clone(),
                    )
                    .map_err(|e| StartError::Config(format!("--k8s-issuer: {e}")))?,
                ))
            }
            (None, Some(_)) => {
                return Err(StartError::Config(
                    "--k8s-issuer needs --k8s-jwks or --k8s-discovery".into(),
                ));
            }
            _ => None,
        };
        Ok(StateOptions {
            service_account_tokens,
            data_dir: self.data_dir.clone(),
            etcd: self.etcd_options()?,
            trust_domain: self.trust_domain.clone(),
            leaf_ttl: self.leaf_ttl,
            root_pem,
            tls_names,
            retention: Retention {
                tokens: self.token_retention,
                audit: self.audit_retention,
            },
            kek_file: self.kek_file.clone(),
            kek: std::env::var(KEK_ENV).ok().filter(|v| !v.is_empty()),
            max_watches_per_identity: self.max_watches_per_identity,
            endpoint_grace: self.endpoint_grace,
            limits: Limits {
                handshake_timeout: self.handshake_timeout,
                max_handshakes: self.max_handshakes,
                max_connections: self.max_connections,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn retention_defaults_and_human_durations() {
        let a = Cli::try_parse_from(["x"]).expect("defaults").args;
        assert_eq!(a.token_retention, Duration::from_secs(24 * 3600));
        assert_eq!(a.audit_retention, Duration::from_secs(30 * 24 * 3600));
        let a = Cli::try_parse_from(["x", "--token-retention", "90s", "--leaf-ttl", "10m"])
            .expect("parse")
            .args;
        assert_eq!(a.token_retention, Duration::from_secs(90));
        assert_eq!(a.leaf_ttl, Some(Duration::from_secs(600)));
        assert!(Cli::try_parse_from(["x", "--audit-retention", "5 weeks ago"]).is_err());
    }

    #[test]
    fn store_flags_name_etcd_or_sled() {
        let a = Cli::try_parse_from(["x"]).expect("defaults").args;
        assert!(a.etcd_options().expect("sled").is_none());
        let a = Cli::try_parse_from([
            "x",
            "--store",
            "etcd://127.0.0.1:2379,127.0.0.1:22379",
            "--etcd-prefix",
            "/m1/",
            "--etcd-timeout",
            "2s",
            "--etcd-max-txn-ops",
            "1024",
        ])
        .expect("parse")
        .args;
        let o = a.etcd_options().expect("etcd").expect("etcd options");
        assert_eq!(o.endpoints, ["127.0.0.1:2379", "127.0.0.1:22379"]);
        assert_eq!(o.prefix, "/m1/");
        assert_eq!(o.timeout, Duration::from_secs(2));
        assert_eq!(o.max_txn_ops, 1024);
        assert!(o.tls.is_none() && o.user.is_none());
        for (flags, expect) in [
            (&["--store", "etcd:/h:1"][..], "--store"),
            (
                &["--store", "etcd://h:1", "--etcd-prefix", "m1"][..],
                "--etcd-prefix",
            ),
            (
                &["--store", "etcd://h:1", "--etcd-max-txn-ops", "1"][..],
                "max-txn-ops",
            ),
        ] {
            let a = Cli::try_parse_from(["x"].iter().chain(flags))
                .expect("parse")
                .args;
            let e = a.etcd_options().expect_err("refused").to_string();
            assert!(e.contains(expect), "{flags:?}: {e}");
        }
        // A client certificate needs its key and the CA.
        assert!(Cli::try_parse_from(["x", "--etcd-cert", "c.pem"]).is_err());
    }
}
