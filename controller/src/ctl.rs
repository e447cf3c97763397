//! `quicmesh ctl`: the operator's command line for the admin API.
//!
//! kubectl habits: `apply -f` takes a YAML stream of resources, `get`/`delete` take a kind and a name,
//! output is a table unless `-o json|yaml` asks for something scripts can read (`get -o yaml` prints
//! documents that `apply -f` accepts again). Errors say which document or field failed and why.

use std::{path::PathBuf, time::Duration};

use quicmesh_proto::controller as pb;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    api::convert,
    client::{self, Admin, ClientError},
    model::{self, Kind, Resource},
};

/// Flags of `quicmesh ctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// Controller address, host:port.
    #[arg(
        long,
        env = "QUICMESH_CONTROLLER",
        default_value = "127.0.0.1:7443",
        global = true
    )]
    pub controller: String,
    /// Admin token (printed once by the controller's first start).
    #[arg(
        long,
        env = "QUICMESH_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Trust bundle PEM to verify the controller with (the controller writes it to its data directory).
    #[arg(
        long,
        env = "QUICMESH_CA",
        default_value = "quicmesh-data/trust-bundle.pem",
        global = true
    )]
    pub ca: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Deadline of each call, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", global = true)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
    /// YAML for scripts (and `apply -f`).
    Yaml,
}

/// `quicmesh ctl` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Creates or updates every resource in a YAML file (documents separated by `---`; `-` = stdin), as
    /// one batch: every document is validated first, and a file with one bad document stores nothing.
    Apply {
        /// The file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Lists resources of a kind, or shows one.
    Get {
        /// services, endpoints, policies, identities, trustdomain.
        kind: String,
        /// One resource by name.
        name: Option<String>,
        /// Namespace (default: all for lists).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// What the proxies make of a service: its ports, endpoints (those allowed to serve it) with versions
    /// and weights, the effective policy of each kind, each endpoint's share of its rate limit, the
    /// traffic split's groups, and any resource left out and why.
    Describe {
        /// `service` (the only kind described so far).
        kind: String,
        /// Service name.
        name: String,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Deletes a resource.
    Delete {
        /// services, endpoints, policies, identities.
        kind: String,
        /// Name.
        name: String,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Join tokens.
    Tokens {
        /// create, revoke or list.
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Revokes an identity: no more certificates; peers refuse it once they get the next snapshot.
    RevokeIdentity {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
    },
    /// Proxies connected to the controller.
    Proxies,
    /// The CA and the newest issued certificates.
    Certs {
        /// How many issued certificates to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Starts a root rotation.
    RotateRoot,
    /// Checks the controller is reachable, its CA valid, clocks agree and proxies are up to date.
    Check,
    /// Golden metrics from the proxies' traffic reports: req/s, success rate, latency p50/p95/p99,
    /// TCP connections and mTLS share, per service (as their callers' proxies saw them, or their own
    /// proxies when no caller reported), or per edge with `--edges`; or, with `--peers`, each QUIC
    /// connection between proxies: RTT, congestion window and packet loss.
    Stat {
        /// One service, `name` or `name.namespace` (default: every service).
        service: Option<String>,
        /// Per edge: caller identity -> service, as each side counted it.
        #[arg(long)]
        edges: bool,
        /// The QUIC connections between proxies, as the proxy at each end reports them.
        #[arg(long, conflicts_with_all = ["edges", "service"])]
        peers: bool,
        /// Sliding window: 1m, 10m or 1h.
        #[arg(long, default_value = "1m")]
        window: String,
    },
    /// Live requests served by a service's proxies (method, path, status, latency, caller and
    /// destination identities, request id), sampled at most `--max-rate` a second; never bodies or
    /// header values. Runs until `--count` requests, `--duration`, or Ctrl-C; the proxies stop sampling
    /// when the last tap ends.
    Tap {
        /// Service, `name` (namespace `default`) or `name.namespace`.
        service: String,
        /// Most requests a second (at most 100).
        #[arg(long, default_value_t = 10)]
        max_rate: u32,
        /// Stop after this many requests.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// The busiest request paths of a service, from its live tap (like `linkerd viz top`): samples
    /// per caller, method and path with success rate and best, worst and last latency, redrawn every
    /// `--interval` until Ctrl-C or `--iterations` refreshes.
    Top {
        /// Service, `name` (namespace `default`) or `name.namespace`.
        service: String,
        /// Most samples a second the proxies send (at most 100).
        #[arg(long, default_value_t = 100)]
        max_rate: u32,
        /// Time between refreshes, e.g. 1s.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        /// Stop after this many refreshes.
        #[arg(long)]
        iterations: Option<u64>,
        /// Rows shown.
        #[arg(long, default_value_t = 20)]
        rows: usize,
    },
}

/// `quicmesh ctl tokens` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokensCommand {
    /// Creates a join token for namespace/service-account; prints the secret once.
    Create {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
        /// Lifetime, e.g. 1h (default), 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Usable until it expires instead of once.
        #[arg(long)]
        reusable: bool,
    },
    /// Revokes a token by id.
    Revoke {
        /// The id (the 12 hex digits after `qmt_`).
        id: String,
    },
    /// Lists tokens (ids and state, never secrets).
    List,
}

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad command-line input or file.
    #[error("{0}")]
    Usage(String),
    /// Could not connect.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The controller refused or failed.
    #[error("{context}: {code:?}: {message}")]
    Rpc {
        /// What was being done.
        context: String,
        /// gRPC code.
        code: tonic::Code,
        /// The controller's message.
        message: String,
    },
    /// `check` found problems.
    #[error("{0} check(s) failed")]
    CheckFailed(usize),
}

fn rpc(context: impl Into<String>) -> impl FnOnce(tonic::Status) -> CtlError {
    let context = context.into();
    move |s| CtlError::Rpc {
        context,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

async fn connect(args: &CtlArgs) -> Result<Admin, CtlError> {
    let token = args.token.clone().ok_or_else(|| {
        CtlError::Usage("no admin token: pass --token or set QUICMESH_ADMIN_TOKEN".into())
    })?;
    let bundle = std::fs::read_to_string(&args.ca)
        .map_err(|e| CtlError::Usage(format!("--ca {}: {e}", args.ca.display())))?;
    let channel = client::connect(&args.controller, &[bundle], None, Some(args.timeout)).await?;
    Ok(client::admin(channel, &token)?)
}

/// Runs one `quicmesh ctl` command, printing its result on stdout.
pub async fn run_ctl(args: CtlArgs) -> Result<(), CtlError> {
    let out = args.output;
    match &args.command {
        CtlCommand::Apply { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| CtlError::Usage(format!("stdin: {e}")))?
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?
            };
            let docs = model::parse_yaml_numbered(&text)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
            if docs.is_empty() {
                return Err(CtlError::Usage(format!("{}: no resources", file.display())));
            }
            // The controller names a failing resource by its index; say which document that is.
            let numbers: Vec<String> = docs
                .iter()
                .enumerate()
                .map(|(i, (n, _))| format!("resources[{i}] is document {n}"))
                .collect();
            let mut admin = connect(&args).await?;
            let resp = admin
                .apply_all(pb::ApplyAllRequest {
                    resources: docs
                        .iter()
                        .map(|(_, r)| convert::resource_to_pb(r))
                        .collect(),
                })
                .await
                .map_err(|s| {
                    let doc = s
                        .message()
                        .strip_prefix("resources[")
                        .and_then(|m| m.split_once(']'))
                        .and_then(|(i, _)| i.parse::<usize>().ok())
                        .and_then(|i| numbers.get(i));
                    let context = match doc {
                        Some(d) => format!("apply -f {} ({d})", file.display()),
                        None => format!("apply -f {}", file.display()),
                    };
                    rpc(context)(s)
                })?
                .into_inner();
            let applied = resp
                .resources
                .into_iter()
                .map(convert::resource_from_pb)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CtlError::Usage(format!("controller answer: {e}")))?;
            if out == Output::Table {
                for stored in &applied {
                    println!(
                        "{}/{} applied (version {})",
                        stored.kind().as_str().to_lowercase(),
                        stored.key(),
                        stored.metadata().version
                    );
                }
            } else {
                print_resources(out, &applied)?;
            }
        }
        CtlCommand::Get {
            kind,
            name,
            namespace,
        } => {
            let kind = parse_kind(kind)?;
            let mut admin = connect(&args).await?;
            let items = match name {
                Some(name) => {
                    let ns = if kind.namespaced() {
                        namespace.clone().unwrap_or_else(|| "default".into())
                    } else {
                        String::new()
                    };
                    vec![
                        admin
                            .get(pb::ResourceRef {
                                kind: convert::kind_to_pb(kind) as i32,
                                namespace: ns,
                                name: name.clone(),
                            })
                            .await
                            .map_err(rpc(format!("get {kind} {name}")))?
                            .into_inner(),
                    ]
                }
                None => {
                    admin
                        .list(pb::ListRequest {
                            kind: convert::kind_to_pb(kind) as i32,
                            namespace: namespace.clone().unwrap_or_default(),
                        })
                        .await
                        .map_err(rpc(format!("list {kind}")))?
                        .into_inner()
                        .items
                }
            };
            let identities: Vec<String> = items
                .iter()
                .map(|i| match &i.resource {
                    Some(pb::resource::Resource::Identity(x)) => x.spiffe_id.clone(),
                    _ => String::new(),
                })
                .collect();
            let resources = items
                .into_iter()
                .map(convert::resource_from_pb)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CtlError::Usage(format!("controller answer: {e}")))?;
            if out == Output::Table {
                print_resource_table(kind, &resources, &identities);
            } else {
                print_resources(out, &resources)?;
            }
        }
        CtlCommand::Describe {
            kind,
            name,
            namespace,
        } => describe(&args, kind, name, namespace).await?,
        CtlCommand::Delete {
            kind,
            name,
            namespace,
        } => {
            let kind = parse_kind(kind)?;
            let mut admin = connect(&args).await?;
            let resp = admin
                .delete(pb::ResourceRef {
                    kind: convert::kind_to_pb(kind) as i32,
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(rpc(format!("delete {kind} {namespace}/{name}")))?
                .into_inner();
            emit(
                out,
                &serde_json::json!({"deleted": format!("{kind} {namespace}/{name}"), "version": resp.version}),
                || {
                    println!(
                        "{}/{namespace}/{name} deleted (version {})",
                        kind.as_str().to_lowercase(),
                        resp.version
                    )
                },
            )?;
        }
        CtlCommand::Tokens { command } => tokens(&args, command).await?,
        CtlCommand::Stat {
            service: _,
            edges: _,
            peers: true,
            window,
        } => peers(&args, window).await?,
        CtlCommand::Stat {
            service,
            edges,
            peers: false,
            window,
        } => stat(&args, service.as_deref(), *edges, window).await?,
        CtlCommand::Tap {
            service,
            max_rate,
            count,
            duration,
        } => tap(&args, service, *max_rate, *count, *duration).await?,
        CtlCommand::Top {
            service,
            max_rate,
            interval,
            iterations,
            rows,
        } => top(&args, service, *max_rate, *interval, *iterations, *rows).await?,
        CtlCommand::RevokeIdentity {
            namespace,
            service_account,
        } => {
            let mut admin = connect(&args).await?;
            let id = admin
                .revoke_identity(pb::RevokeIdentityRequest {
                    namespace: namespace.clone(),
                    service_account: service_account.clone(),
                })
                .await
                .map_err(rpc("revoke identity"))?
                .into_inner();
            emit(out, &serde_json::json!({"revoked": id.spiffe_id}), || {
                println!("{} revoked", id.spiffe_id)
            })?;
        }
        CtlCommand::Proxies => {
            let mut admin = connect(&args).await?;
            let resp = admin
                .list_proxies(pb::ListProxiesRequest {})
                .await
                .map_err(rpc("list proxies"))?
                .into_inner();
            let rows: Vec<ProxyRow> = resp
                .proxies
                .iter()
                .map(|p| ProxyRow {
                    name: p.proxy_name.clone(),
                    spiffe_id: p.spiffe_id.clone(),
                    address: p.peer_address.clone(),
                    config_version: p.config_version,
                    connected: fmt_time(p.connected_unix),
                    cert_expires: fmt_time(p.cert_not_after_unix),
                })
                .collect();
            emit(out, &rows, || {
                print_table(
                    &[
                        "NAME",
                        "IDENTITY",
                        "ADDRESS",
                        "CONFIG",
                        "CONNECTED",
                        "CERT EXPIRES",
                    ],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.name.clone(),
                                r.spiffe_id.clone(),
                                r.address.clone(),
                                r.config_version.to_string(),
                                r.connected.clone(),
                                r.cert_expires.clone(),
                            ]
                        })
                        .collect(),
                )
            })?;
        }
        CtlCommand::Certs { limit } => {
            let mut admin = connect(&args).await?;
            let ca = admin
                .ca_status(pb::CaStatusRequest {})
                .await
                .map_err(rpc("CA status"))?
                .into_inner();
            let certs = admin
                .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: *limit })
                .await
                .map_err(rpc("issued certificates"))?
                .into_inner()
                .certificates;
            let view = CertsView {
                trust_domain: ca.trust_domain.clone(),
                leaf_ttl_seconds: ca.leaf_ttl_seconds,
                roots: ca.roots.iter().map(RootRow::from).collect(),
                issued: certs.iter().map(IssuedRow::from).collect(),
            };
            emit(out, &view, || {
                println!(
                    "trust domain {}, leaf lifetime {}s",
                    view.trust_domain, view.leaf_ttl_seconds
                );
                print_table(
                    &["ROOT", "ACTIVE", "EXPIRES", "LEAVES BUNDLE AFTER"],
                    view.roots
                        .iter()
                        .map(|r| {
                            vec![
                                r.fingerprint.get(..16).unwrap_or(&r.fingerprint).to_owned(),
                                r.active.to_string(),
                                r.not_after.clone(),
                                r.retire_after.clone(),
                            ]
                        })
                        .collect(),
                );
                println!();
                print_table(
                    &["SERIAL", "IDENTITY", "ISSUED", "EXPIRES", "CREDENTIAL"],
                    view.issued
                        .iter()
                        .map(|c| {
                            vec![
                                c.serial.get(..16).unwrap_or(&c.serial).to_owned(),
                                c.spiffe_id.clone(),
                                c.issued.clone(),
                                c.expires.clone(),
                                c.credential.clone(),
                            ]
                        })
                        .collect(),
                );
            })?;
        }
        CtlCommand::RotateRoot => {
            let mut admin = connect(&args).await?;
            let ca = admin
                .rotate_root(pb::RotateRootRequest {})
                .await
                .map_err(rpc("rotate root"))?
                .into_inner();
            let roots: Vec<RootRow> = ca.roots.iter().map(RootRow::from).collect();
            emit(out, &roots, || {
                println!(
                    "rotation started: the new root signs from now on; the old one stays trusted until its leaves expire"
                );
                for r in &roots {
                    println!(
                        "  {} active={} leaves bundle after {}",
                        r.fingerprint, r.active, r.retire_after
                    );
                }
            })?;
        }
        CtlCommand::Check => check(&args).await?,
    }
    Ok(())
}

fn parse_kind(s: &str) -> Result<Kind, CtlError> {
    Kind::parse_cli(s).ok_or_else(|| {
        CtlError::Usage(format!(
            "unknown kind {s:?}: use services, endpoints, policies, identities or trustdomain"
        ))
    })
}

async fn tokens(args: &CtlArgs, command: &TokensCommand) -> Result<(), CtlError> {
    let out = args.output;
    let mut admin = connect(args).await?;
    match command {
        TokensCommand::Create {
            namespace,
            service_account,
            ttl,
            reusable,
        } => {
            let resp = admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    namespace: namespace.clone(),
                    service_account: service_account.clone(),
                    ttl_seconds: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    reusable: *reusable,
                })
                .await
                .map_err(rpc("create join token"))?
                .into_inner();
            let info = resp.info.unwrap_or_default();
            let row = TokenRow::from(&info);
            emit(
                out,
                &serde_json::json!({"token": resp.token, "info": row}),
                || {
                    println!("{}", resp.token);
                    eprintln!(
                        "join token {} for {} (expires {}, {}); shown only now",
                        row.id,
                        row.spiffe_id,
                        row.expires,
                        if row.reusable {
                            "reusable"
                        } else {
                            "single use"
                        }
                    );
                },
            )
        }
        TokensCommand::Revoke { id } => {
            let info = admin
                .revoke_join_token(pb::RevokeJoinTokenRequest { id: id.clone() })
                .await
                .map_err(rpc(format!("revoke join token {id}")))?
                .into_inner();
            let row = TokenRow::from(&info);
            emit(out, &row, || println!("join token {} revoked", row.id))
        }
        TokensCommand::List => {
            let rows: Vec<TokenRow> = admin
                .list_join_tokens(pb::ListJoinTokensRequest {})
                .await
                .map_err(rpc("list join tokens"))?
                .into_inner()
                .tokens
                .iter()
                .map(TokenRow::from)
                .collect();
            emit(out, &rows, || {
                print_table(
                    &["ID", "IDENTITY", "EXPIRES", "REUSABLE", "USES", "REVOKED"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                r.spiffe_id.clone(),
                                r.expires.clone(),
                                r.reusable.to_string(),
                                r.uses.to_string(),
                                r.revoked.to_string(),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

#[derive(Debug, Serialize)]
struct CheckRow {
    check: &'static str,
    ok: bool,
    detail: String,
}

async fn check(args: &CtlArgs) -> Result<(), CtlError> {
    let mut rows = Vec::new();
    let mut push = |check, ok, detail: String| rows.push(CheckRow { check, ok, detail });
    match connect(args).await {
        Err(e) => push("controller reachable", false, e.to_string()),
        Ok(mut admin) => {
            push("controller reachable", true, args.controller.clone());
            match admin.ca_status(pb::CaStatusRequest {}).await {
                Err(s) => push(
                    "admin token accepted",
                    false,
                    format!("{:?}: {}", s.code(), s.message()),
                ),
                Ok(ca) => {
                    let ca = ca.into_inner();
                    push("admin token accepted", true, String::new());
                    let now = OffsetDateTime::now_utc().unix_timestamp();
                    let skew = (ca.server_time_unix - now).abs();
                    push(
                        "clock sane",
                        skew <= 5,
                        format!("controller clock differs from ours by {skew}s"),
                    );
                    match ca.roots.iter().find(|r| r.active) {
                        None => push("CA valid", false, "no active root".into()),
                        Some(r) => {
                            let days = (r.not_after_unix - now) / 86400;
                            push(
                                "CA valid",
                                days > 30,
                                format!(
                                    "active root {} expires in {days} days",
                                    r.fingerprint.get(..16).unwrap_or("")
                                ),
                            );
                        }
                    }
                    match admin.list_proxies(pb::ListProxiesRequest {}).await {
                        Err(s) => push("proxies connected", false, s.message().to_owned()),
                        Ok(p) => {
                            let p = p.into_inner();
                            let expired = p
                                .proxies
                                .iter()
                                .filter(|x| x.cert_not_after_unix < now)
                                .count();
                            push(
                                "proxies connected",
                                expired == 0,
                                format!(
                                    "{} connected, {expired} with an expired certificate",
                                    p.proxies.len()
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    emit(args.output, &rows, || {
        for r in &rows {
            println!(
                "[{}] {}{}",
                if r.ok { " ok " } else { "FAIL" },
                r.check,
                if r.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.detail)
                }
            );
        }
    })?;
    if failed > 0 {
        return Err(CtlError::CheckFailed(failed));
    }
    Ok(())
}

/// The effective state of one service, as the proxies compute it from the same resources.
#[derive(Serialize)]
struct Described<'a> {
    service: String,
    #[serde(flatten)]
    state: &'a quicmesh_transport::state::ServiceState,
    /// The rate limit each endpoint enforces (the service's limit over its endpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit_per_endpoint: Option<f64>,
    /// The traffic split's versions that have endpoints, with their weights.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    split: &'a [quicmesh_transport::state::SplitGroup],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

async fn describe(args: &CtlArgs, kind: &str, name: &str, ns: &str) -> Result<(), CtlError> {
    use quicmesh_transport::state::{MeshState, ServiceRef};
    if !matches!(kind, "service" | "services" | "svc") {
        return Err(CtlError::Usage(format!(
            "describe: {kind:?}: only services can be described"
        )));
    }
    let mut admin = connect(args).await?;
    let mut resources = Vec::new();
    for kind in [
        Kind::TrustDomain,
        Kind::Service,
        Kind::Endpoint,
        Kind::Policy,
    ] {
        let items = admin
            .list(pb::ListRequest {
                kind: convert::kind_to_pb(kind) as i32,
                namespace: if kind.namespaced() {
                    ns.to_owned()
                } else {
                    String::new()
                },
            })
            .await
            .map_err(rpc(format!("list {kind}")))?
            .into_inner()
            .items;
        for i in items {
            resources.push(
                convert::resource_from_pb(i)
                    .map_err(|e| CtlError::Usage(format!("controller answer: {e}")))?,
            );
        }
    }
    let trust_domain = resources
        .iter()
        .find_map(|r| match r {
            Resource::TrustDomain(t) => Some(t.spec.trust_domain.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let target = ServiceRef {
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    let state = MeshState::from_resources(0, &trust_domain, resources, []);
    let Some(svc) = state.service(&target) else {
        return Err(CtlError::Usage(format!(
            "service {target}: no Service, Endpoint or Policy names it"
        )));
    };
    let per_endpoint = svc.policy.rate_limit.as_ref().map(|l| {
        quicmesh_transport::ratelimit::share(l, svc.endpoints.len())
            .map_or(0.0, |g| 1.0 / g.interval.as_secs_f64())
    });
    let tag = format!("/{}/", target.name);
    let view = Described {
        service: target.to_string(),
        state: svc,
        rate_limit_per_endpoint: per_endpoint,
        split: &svc.upstream.split,
        warnings: state
            .warnings
            .iter()
            .filter(|w| w.contains(&target.name) || w.contains(&tag))
            .cloned()
            .collect(),
    };
    emit(args.output, &view, || print_described(&view))
}

fn print_described(v: &Described<'_>) {
    let s = v.state;
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| format!("{}/{:?}", p.port, p.protocol).to_lowercase())
        .collect();
    println!(
        "Service:    {}{}",
        v.service,
        if s.declared { "" } else { " (not declared)" }
    );
    println!("Ports:      {}", ports.join(", "));
    if !s.versions.is_empty() {
        println!("Versions:   {}", s.versions.join(", "));
    }
    println!("Serving:    {}", s.upstream.servers);
    println!("Endpoints:  {}", s.endpoints.len());
    for e in &s.endpoints {
        println!(
            "  {:<22} {:<8} weight {:<5} {}",
            e.address.to_string(),
            if e.version.is_empty() {
                "-"
            } else {
                &e.version
            },
            e.weight,
            e.identity.as_ref().map(|i| i.as_str()).unwrap_or("-")
        );
    }
    let p = &s.policy;
    match &p.authorization {
        Some(a) => println!(
            "Authorization: {:?}, default {:?}, {} allow rule(s)",
            a.mode,
            a.default_action,
            a.allow.len()
        ),
        None => println!("Authorization: none (any mesh identity may call)"),
    }
    if let Some(l) = &p.rate_limit {
        println!(
            "Rate limit: {} req/s, burst {}{}; {:.1} req/s per endpoint",
            l.requests_per_second,
            l.burst,
            if l.per_source { ", per caller" } else { "" },
            v.rate_limit_per_endpoint.unwrap_or(0.0)
        );
    }
    if let Some(t) = &p.timeouts {
        println!(
            "Timeouts:   request {} ms, connect {} ms{}",
            t.request_timeout_ms,
            t.connect_timeout_ms,
            t.retry.as_ref().map_or(String::new(), |r| format!(
                ", {} retries on [{}], per try {} ms",
                r.max_retries,
                r.retry_on.join(", "),
                r.per_try_timeout_ms
            ))
        );
    }
    if p.traffic_split.is_some() {
        let groups: Vec<String> = s
            .upstream
            .split
            .iter()
            .map(|g| {
                format!(
                    "{} {} ({} endpoints)",
                    g.version,
                    g.weight,
                    g.endpoints.len()
                )
            })
            .collect();
        println!(
            "Split:      {}",
            if groups.is_empty() {
                "no version of the split has an endpoint: all endpoints".to_owned()
            } else {
                groups.join(", ")
            }
        );
    }
    for w in &v.warnings {
        println!("Warning:    {w}");
    }
}

/// Seconds of a `--window` value: 1m, 10m or 1h (any spelling humantime reads, e.g. 60s).
fn parse_window(s: &str) -> Result<u32, CtlError> {
    let d = humantime::parse_duration(s)
        .map_err(|e| CtlError::Usage(format!("--window {s:?}: {e}")))?;
    match d.as_secs() {
        secs @ (60 | 600 | 3600) if d.subsec_nanos() == 0 => Ok(secs as u32),
        _ => Err(CtlError::Usage(format!(
            "--window {s:?}: the controller keeps 1m, 10m and 1h windows"
        ))),
    }
}

async fn stat(
    args: &CtlArgs,
    service: Option<&str>,
    edges: bool,
    window: &str,
) -> Result<(), CtlError> {
    let window_seconds = parse_window(window)?;
    let mut admin = connect(args).await?;
    let resp = admin
        .get_stats(pb::StatsRequest {
            window_seconds,
            service: service.unwrap_or_default().to_owned(),
            edges,
            peers: false,
        })
        .await
        .map_err(rpc("stat"))?
        .into_inner();
    let list = if edges { &resp.edges } else { &resp.services };
    let rows: Vec<StatRow> = list.iter().map(StatRow::from).collect();
    let view = StatView {
        window: window.to_owned(),
        edges,
        rows,
    };
    emit(args.output, &view, || print_stat(&view))
}

async fn peers(args: &CtlArgs, window: &str) -> Result<(), CtlError> {
    let window_seconds = parse_window(window)?;
    let mut admin = connect(args).await?;
    let resp = admin
        .get_stats(pb::StatsRequest {
            window_seconds,
            peers: true,
            ..Default::default()
        })
        .await
        .map_err(rpc("stat"))?
        .into_inner();
    let view = PeersView {
        window: window.to_owned(),
        peers: resp.peers.iter().map(PeerRow::from).collect(),
    };
    emit(args.output, &view, || print_peers(&view))
}

/// Opens a tap on `service`: the stream of its samples.
async fn open_tap(
    args: &CtlArgs,
    service: &str,
    max_rate: u32,
) -> Result<tonic::Streaming<pb::TapEvent>, CtlError> {
    let token = args.token.clone().ok_or_else(|| {
        CtlError::Usage("no admin token: pass --token or set QUICMESH_ADMIN_TOKEN".into())
    })?;
    let bundle = std::fs::read_to_string(&args.ca)
        .map_err(|e| CtlError::Usage(format!("--ca {}: {e}", args.ca.display())))?;
    // A tap is a long stream: no per-call deadline (the connect still has its own).
    let channel = client::connect(&args.controller, &[bundle], None, None).await?;
    let mut admin = client::admin(channel, &token)?;
    let stream = tokio::time::timeout(
        args.timeout,
        admin.tap(pb::TapRequest {
            service: service.to_owned(),
            max_per_second: max_rate,
        }),
    )
    .await
    .map_err(|_| {
        CtlError::Usage(format!(
            "tap {service}: no answer within {:?}",
            args.timeout
        ))
    })?
    .map_err(rpc(format!("tap {service}")))?
    .into_inner();
    Ok(stream)
}

async fn tap(
    args: &CtlArgs,
    service: &str,
    max_rate: u32,
    count: Option<u64>,
    duration: Option<Duration>,
) -> Result<(), CtlError> {
    let mut stream = open_tap(args, service, max_rate).await?;
    let until = duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let next = async {
            match until {
                Some(u) => tokio::time::timeout_at(u, stream.message()).await.ok(),
                None => Some(stream.message().await),
            }
        };
        let e = match next.await {
            None => break,
            Some(Ok(Some(e))) => e,
            Some(Ok(None)) => break,
            Some(Err(s)) => return Err(rpc(format!("tap {service}"))(s)),
        };
        seen += 1;
        let row = TapRow::from(&e);
        match args.output {
            Output::Table => println!(
                "{} {} -> {} {} {} {}{} {:.1}ms id={}",
                fmt_time(e.unix_ms / 1000),
                row.source,
                row.destination,
                row.method,
                row.path,
                row.status,
                row.grpc_status
                    .map(|g| format!(" grpc-status={g}"))
                    .unwrap_or_default(),
                row.latency_ms,
                row.request_id
            ),
            Output::Json => println!(
                "{}",
                serde_json::to_string(&row).map_err(|e| CtlError::Usage(e.to_string()))?
            ),
            Output::Yaml => print!(
                "---\n{}",
                serde_yaml_ng::to_string(&row).map_err(|e| CtlError::Usage(e.to_string()))?
            ),
        }
    }
    Ok(())
}

async fn top(
    args: &CtlArgs,
    service: &str,
    max_rate: u32,
    interval: Duration,
    iterations: Option<u64>,
    rows: usize,
) -> Result<(), CtlError> {
    use std::io::IsTerminal;
    if interval.is_zero() {
        return Err(CtlError::Usage("--interval must be above zero".into()));
    }
    let mut stream = open_tap(args, service, max_rate).await?;
    let mut table = crate::top::Top::default();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let clear = std::io::stdout().is_terminal() && args.output == Output::Table;
    let mut done = 0u64;
    let mut open = true;
    while iterations.is_none_or(|n| done < n) {
        tokio::select! {
            m = stream.message(), if open => match m {
                Ok(Some(e)) => table.add(&e),
                Ok(None) => open = false,
                Err(s) => return Err(rpc(format!("top {service}"))(s)),
            },
            _ = tick.tick() => {
                done += 1;
                let view = TopView { service: service.to_owned(), rows: table.rows(rows) };
                match args.output {
                    Output::Table => {
                        if clear {
                            // Cursor home, clear screen: the table redraws in place.
                            print!("\x1b[H\x1b[2J");
                        }
                        print_top(&view);
                    }
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string(&view).map_err(|e| CtlError::Usage(e.to_string()))?
                    ),
                    Output::Yaml => print!(
                        "---\n{}",
                        serde_yaml_ng::to_string(&view).map_err(|e| CtlError::Usage(e.to_string()))?
                    ),
                }
                if !open {
                    break;
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct TopView {
    service: String,
    rows: Vec<crate::top::TopRow>,
}

fn print_top(v: &TopView) {
    println!(
        "{} {}: busiest paths (sampled)",
        fmt_time(OffsetDateTime::now_utc().unix_timestamp()),
        v.service
    );
    if v.rows.is_empty() {
        println!("no requests yet");
        return;
    }
    let ms = |x: f64| format!("{x:.1}ms");
    print_table(
        &[
            "SOURCE", "METHOD", "PATH", "COUNT", "SUCCESS", "BEST", "WORST", "LAST",
        ],
        v.rows
            .iter()
            .map(|r| {
                vec![
                    r.source.clone(),
                    r.method.clone(),
                    r.path.clone(),
                    r.count.to_string(),
                    format!("{:.2}%", r.success_rate * 100.0),
                    ms(r.best_ms),
                    ms(r.worst_ms),
                    ms(r.last_ms),
                ]
            })
            .collect(),
    );
}

#[derive(Debug, Serialize)]
struct TapRow {
    service: String,
    method: String,
    path: String,
    status: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u32>,
    latency_ms: f64,
    source: String,
    destination: String,
    request_id: String,
    unix_ms: i64,
}

impl From<&pb::TapEvent> for TapRow {
    fn from(e: &pb::TapEvent) -> Self {
        Self {
            service: e.service.clone(),
            method: e.method.clone(),
            path: e.path.clone(),
            status: e.status,
            grpc_status: e.grpc_status_plus_one.checked_sub(1),
            latency_ms: e.latency_us as f64 / 1000.0,
            source: e.source.clone(),
            destination: e.destination.clone(),
            request_id: e.request_id.clone(),
            unix_ms: e.unix_ms,
        }
    }
}

fn print_stat(v: &StatView) {
    if v.rows.is_empty() {
        println!("no traffic reported in the last {}", v.window);
        return;
    }
    let pct = |x: f64| format!("{:.2}%", x * 100.0);
    let ms = |x: f64| format!("{x:.1}ms");
    let mut headers = vec!["SERVICE"];
    if v.edges {
        headers.extend(["SOURCE", "SIDE"]);
    }
    headers.extend([
        "SUCCESS", "RPS", "P50", "P95", "P99", "TCP_CONN", "MTLS", "REQUESTS",
    ]);
    let rows = v
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![r.service.clone()];
            if v.edges {
                row.extend([r.source.clone(), r.direction.clone()]);
            }
            let has_req = r.requests > 0;
            let or_dash = |s: String| if has_req { s } else { "-".into() };
            row.extend([
                or_dash(pct(r.success_rate)),
                format!("{:.1}", r.requests_per_second),
                or_dash(ms(r.p50_ms)),
                or_dash(ms(r.p95_ms)),
                or_dash(ms(r.p99_ms)),
                r.tcp_open.to_string(),
                pct(r.mtls_share),
                r.requests.to_string(),
            ]);
            row
        })
        .collect();
    print_table(&headers, rows);
}

#[derive(Debug, Serialize)]
struct PeersView {
    window: String,
    peers: Vec<PeerRow>,
}

#[derive(Debug, Serialize)]
struct PeerRow {
    reporter: String,
    peer: String,
    address: String,
    direction: String,
    rtt_ms: f64,
    cwnd_bytes: u64,
    sent_packets: u64,
    lost_packets: u64,
    loss_rate: f64,
    age_seconds: f64,
}

impl From<&pb::PeerLinkStats> for PeerRow {
    fn from(p: &pb::PeerLinkStats) -> Self {
        Self {
            reporter: p.reporter.clone(),
            peer: p.peer.clone(),
            address: p.address.clone(),
            direction: p.direction.clone(),
            rtt_ms: p.rtt_ms,
            cwnd_bytes: p.cwnd_bytes,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            loss_rate: p.loss_rate,
            age_seconds: p.age_seconds,
        }
    }
}

fn print_peers(v: &PeersView) {
    if v.peers.is_empty() {
        println!(
            "no QUIC connection between proxies reported in the last {}",
            v.window
        );
        return;
    }
    let headers = [
        "PROXY", "PEER", "ADDRESS", "DIALED", "RTT", "CWND", "SENT", "LOST", "LOSS",
    ];
    let rows = v
        .peers
        .iter()
        .map(|p| {
            vec![
                p.reporter.clone(),
                p.peer.clone(),
                p.address.clone(),
                if p.direction == "outbound" {
                    "by proxy"
                } else {
                    "by peer"
                }
                .into(),
                format!("{:.2}ms", p.rtt_ms),
                p.cwnd_bytes.to_string(),
                p.sent_packets.to_string(),
                p.lost_packets.to_string(),
                format!("{:.2}%", p.loss_rate * 100.0),
            ]
        })
        .collect();
    print_table(&headers, rows);
}

#[derive(Debug, Serialize)]
struct StatView {
    window: String,
    edges: bool,
    rows: Vec<StatRow>,
}

#[derive(Debug, Serialize)]
struct StatRow {
    service: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    source: String,
    direction: String,
    requests: u64,
    successes: u64,
    requests_per_second: f64,
    success_rate: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    tcp_open: i64,
    tcp_opened: u64,
    tcp_failed: u64,
    mtls_share: f64,
    bytes: u64,
    failures: FailureRow,
    covered_seconds: f64,
}

#[derive(Debug, Serialize)]
struct FailureRow {
    timeout: u64,
    unavailable: u64,
    server: u64,
    grpc: u64,
}

impl From<&pb::TrafficStats> for StatRow {
    fn from(t: &pb::TrafficStats) -> Self {
        Self {
            service: t.service.clone(),
            source: t.source.clone(),
            direction: t.direction.clone(),
            requests: t.requests,
            successes: t.successes,
            requests_per_second: t.requests_per_second,
            success_rate: t.success_rate,
            p50_ms: t.p50_ms,
            p95_ms: t.p95_ms,
            p99_ms: t.p99_ms,
            tcp_open: t.tcp_open,
            tcp_opened: t.tcp_opened,
            tcp_failed: t.tcp_failed,
            mtls_share: t.mtls_share,
            bytes: t.bytes,
            failures: FailureRow {
                timeout: t.failures_timeout,
                unavailable: t.failures_unavailable,
                server: t.failures_server,
                grpc: t.failures_grpc,
            },
            covered_seconds: t.covered_seconds,
        }
    }
}

// ----- output -----

fn emit<T: Serialize>(out: Output, value: &T, table: impl FnOnce()) -> Result<(), CtlError> {
    match out {
        Output::Table => table(),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).map_err(|e| CtlError::Usage(e.to_string()))?
        ),
        Output::Yaml => print!(
            "{}",
            serde_yaml_ng::to_string(value).map_err(|e| CtlError::Usage(e.to_string()))?
        ),
    }
    Ok(())
}

fn print_resources(out: Output, rs: &[Resource]) -> Result<(), CtlError> {
    match out {
        Output::Yaml => {
            // One document per resource, so the output can be applied again.
            for (i, r) in rs.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!(
                    "{}",
                    serde_yaml_ng::to_string(r).map_err(|e| CtlError::Usage(e.to_string()))?
                );
            }
            Ok(())
        }
        _ => emit(out, &rs, || {}),
    }
}

fn print_resource_table(kind: Kind, rs: &[Resource], identities: &[String]) {
    let (headers, rows): (&[&str], Vec<Vec<String>>) = match kind {
        Kind::TrustDomain => (
            &["NAME", "TRUST DOMAIN", "LEAF TTL", "VERSION"],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::TrustDomain(o) => Some(vec![
                        o.metadata.name.clone(),
                        o.spec.trust_domain.clone(),
                        format!("{}s", o.spec.leaf_ttl_seconds),
                        o.metadata.version.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Identity => (
            &["NAMESPACE", "NAME", "SPIFFE ID", "REVOKED", "VERSION"],
            rs.iter()
                .zip(identities)
                .filter_map(|(r, id)| match r {
                    Resource::Identity(o) => Some(vec![
                        o.metadata.namespace.clone(),
                        o.metadata.name.clone(),
                        id.clone(),
                        o.spec.revoked.to_string(),
                        o.metadata.version.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Service => (
            &["NAMESPACE", "NAME", "PORTS", "VERSIONS", "VERSION"],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Service(o) => Some(vec![
                        o.metadata.namespace.clone(),
                        o.metadata.name.clone(),
                        o.spec
                            .ports
                            .iter()
                            .map(|p| format!("{}/{:?}", p.port, p.protocol).to_lowercase())
                            .collect::<Vec<_>>()
                            .join(","),
                        o.spec.versions.join(","),
                        o.metadata.version.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Endpoint => (
            &[
                "NAMESPACE",
                "NAME",
                "SERVICE",
                "ADDRESS",
                "IDENTITY",
                "VERSION",
            ],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Endpoint(o) => Some(vec![
                        o.metadata.namespace.clone(),
                        o.metadata.name.clone(),
                        o.spec.service.clone(),
                        o.spec.address.clone(),
                        o.spec.spiffe_id.clone(),
                        o.metadata.version.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Policy => (
            &["NAMESPACE", "NAME", "TARGET", "KIND", "VERSION"],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Policy(o) => Some(vec![
                        o.metadata.namespace.clone(),
                        o.metadata.name.clone(),
                        o.spec.target_service.clone(),
                        if o.spec.authorization.is_some() {
                            "authorization"
                        } else if o.spec.rate_limit.is_some() {
                            "rate_limit"
                        } else if o.spec.timeouts.is_some() {
                            "timeouts"
                        } else {
                            "traffic_split"
                        }
                        .to_owned(),
                        o.metadata.version.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
    };
    print_table(headers, rows);
}

/// Prints aligned columns separated by two spaces.
pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", render_table(headers, &rows));
}

/// Renders aligned columns separated by two spaces (last column unpadded).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count())
                    + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn fmt_time(unix: i64) -> String {
    if unix == 0 {
        return "-".into();
    }
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[derive(Debug, Serialize)]
struct ProxyRow {
    name: String,
    spiffe_id: String,
    address: String,
    config_version: u64,
    connected: String,
    cert_expires: String,
}

#[derive(Debug, Serialize)]
struct TokenRow {
    id: String,
    spiffe_id: String,
    created: String,
    expires: String,
    reusable: bool,
    uses: u32,
    revoked: bool,
}

impl From<&pb::JoinTokenInfo> for TokenRow {
    fn from(i: &pb::JoinTokenInfo) -> Self {
        Self {
            id: i.id.clone(),
            spiffe_id: i.spiffe_id.clone(),
            created: fmt_time(i.created_unix),
            expires: fmt_time(i.expires_unix),
            reusable: i.reusable,
            uses: i.uses,
            revoked: i.revoked,
        }
    }
}

#[derive(Debug, Serialize)]
struct RootRow {
    fingerprint: String,
    active: bool,
    not_after: String,
    retire_after: String,
}

impl From<&pb::RootInfo> for RootRow {
    fn from(r: &pb::RootInfo) -> Self {
        Self {
            fingerprint: r.fingerprint.clone(),
            active: r.active,
            not_after: fmt_time(r.not_after_unix),
            retire_after: fmt_time(r.retire_after_unix),
        }
    }
}

#[derive(Debug, Serialize)]
struct IssuedRow {
    serial: String,
    spiffe_id: String,
    issued: String,
    expires: String,
    credential: String,
    root: String,
}

impl From<&pb::IssuedCertificate> for IssuedRow {
    fn from(c: &pb::IssuedCertificate) -> Self {
        Self {
            serial: c.serial_hex.clone(),
            spiffe_id: c.spiffe_id.clone(),
            issued: fmt_time(c.issued_unix),
            expires: fmt_time(c.not_after_unix),
            credential: c.credential.clone(),
            root: c.root_fingerprint.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct CertsView {
    trust_domain: String,
    leaf_ttl_seconds: u64,
    roots: Vec<RootRow>,
    issued: Vec<IssuedRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = render_table(
            &["NAME", "PORTS"],
            &[
                vec!["cart".into(), "80/http".into()],
                vec!["checkout-api".into(), "9090/grpc".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          PORTS\ncart          80/http\ncheckout-api  9090/grpc\n"
        );
    }

    #[test]
    fn stat_windows_from_the_command_line() {
        assert_eq!(super::parse_window("1m").ok(), Some(60));
        assert_eq!(super::parse_window("10m").ok(), Some(600));
        assert_eq!(super::parse_window("1h").ok(), Some(3600));
        assert_eq!(super::parse_window("60s").ok(), Some(60));
        assert!(super::parse_window("5m").is_err());
        assert!(super::parse_window("soon").is_err());
    }

    #[test]
    fn kinds_from_the_command_line() {
        assert_eq!(parse_kind("svc").ok(), Some(Kind::Service));
        assert_eq!(parse_kind("Policies").ok(), Some(Kind::Policy));
        assert!(parse_kind("gadgets").is_err());
    }
}
