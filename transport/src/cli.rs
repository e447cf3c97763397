//! The proxy's process edge, shared by `quicmesh proxy` and the slim `quicmesh-proxy` binary: arguments,
//! runtime, the ready line, SIGTERM.
//!
//! The slim binary exists for memory: a sidecar maps the pages of the executable it runs, and the full
//! `quicmesh` binary also carries the controller, the CLI and the load harness. The proxy alone is a
//! third of that.

use std::path::PathBuf;

use crate::{ConfigError, Proxy, ProxyConfig};

/// Arguments of a proxy process.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Configuration file (TOML): static certificate files, or a controller to bootstrap from.
    #[arg(long, short, env = "QUICMESH_CONFIG")]
    pub config: PathBuf,
    /// Runtime threads. 1 (the default, as for a sidecar beside one workload) runs the whole proxy on one
    /// thread: no cross-thread wake-ups or lock contention, which measured here about a third less CPU per
    /// request than a thread per core. Raise it for a proxy that serves many busy peers.
    #[arg(long, env = "QUICMESH_WORKERS", default_value_t = 1)]
    pub workers: usize,
}

/// Why a proxy process stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration (or what it points at) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The ready line could not be encoded.
    #[error("encoding the ready line: {0}")]
    Encode(#[from] serde_json::Error),
    /// The runtime (or a signal handler) could not be set up.
    #[error("starting the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// `quicmesh run`: the sidecar did not become ready, so the app was not started.
    #[error("the sidecar is not ready, the app was not started: {0}")]
    NotReady(String),
    /// `quicmesh run` without a command after `--`.
    #[error("no command to run (give it after `--`)")]
    NoCommand,
}

/// `quicmesh capture install|remove`: the nftables rules of transparent capture.
#[derive(Debug, clap::Subcommand)]
pub enum CaptureCommand {
    /// Writes (or replaces) the `inet quicmesh` table: locally originated TCP to each `capture`
    /// address of the proxy's `[[outbound]]` tables is redirected to its `[capture]` listener.
    Install {
        /// The proxy's configuration file.
        #[arg(long, short, env = "QUICMESH_CONFIG")]
        config: PathBuf,
        /// The user the proxy runs as: its own connections are never redirected.
        #[arg(long)]
        exempt_uid: Option<u32>,
    },
    /// Removes the `inet quicmesh` table; nothing else. Succeeds when it is already gone.
    Remove,
}

/// Why `quicmesh capture` failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The configuration is unusable for capture.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `nft` could not be run, or refused the rules.
    #[error(transparent)]
    Rules(#[from] crate::proxy::capture::RulesError),
}

/// Runs `quicmesh capture`.
pub fn capture(cmd: &CaptureCommand) -> Result<(), CaptureError> {
    use crate::proxy::capture;
    let script = match cmd {
        CaptureCommand::Install { config, exempt_uid } => {
            let cfg = ProxyConfig::load(config)?;
            let Some(c) = &cfg.capture else {
                return Err(
                    ConfigError::new(config, "capture", "missing: no [capture] listener").into(),
                );
            };
            let captured: Vec<_> = cfg.outbound.iter().filter_map(|o| o.capture).collect();
            if captured.is_empty() {
                return Err(ConfigError::new(
                    config,
                    "outbound",
                    "no [[outbound]] table has a capture address",
                )
                .into());
            }
            capture::nft_install_script(
                &captured,
                c.listen.port(),
                *exempt_uid,
                !cfg.workloads.is_empty(),
            )
        }
        CaptureCommand::Remove => capture::nft_remove_script(),
    };
    Ok(capture::apply_nft(&script)?)
}

/// Logs to stderr, filtered by `QUICMESH_LOG` (default `info`); the same for every quicmesh binary.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUICMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The runtime for `workers` threads: a current-thread runtime for 1.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// Loads the configuration, binds, waits for a certificate (controller mode), prints the ready line
/// (one JSON object on stdout: scripts and tests wait for it instead of sleeping), serves until SIGTERM,
/// then drains.
pub async fn run(args: &ProxyArgs) -> Result<(), RunError> {
    raise_open_file_limit();
    let cfg = ProxyConfig::load(&args.config)?;
    let proxy = Proxy::bind(&cfg, &args.config).await?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let creds = proxy.credentials().clone();
    let mut ready = serde_json::to_value(proxy.addresses())?;
    // The ready line is printed once the proxy reports ready: its certificate (a gateway: every
    // workload's too) and, in controller mode, its first configuration. The admin endpoint serves
    // before that, so `/ready` says what is missing.
    let print_ready = move || {
        ready["event"] = "ready".into();
        if let Some(leaf) = creds.leaf() {
            ready["id"] = leaf.info.id.to_string().into();
            ready["cert_not_after_unix"] = leaf.info.not_after.unix_timestamp().into();
        }
        println!("{ready}");
    };
    proxy.run_notify(shutdown, print_ready).await;
    Ok(())
}

/// Raises the soft limit on open files to the hard one, as a process that holds one descriptor per
/// connection needs: distributions start processes at a soft 1,024 whatever the hard limit allows, and
/// a proxy tunneling a thousand connections holds two descriptors for each. Returns the limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            tracing::debug!(limit = n, "open-file limit");
            Some(n)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
