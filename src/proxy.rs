//! `quicmesh proxy`: load the configuration, bind, wait for a certificate (controller mode), announce
//! readiness, serve until SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use quicmesh_transport::{Proxy, ProxyConfig};

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Static configuration file (TOML).
    #[arg(long, short, env = "QUICMESH_CONFIG")]
    config: PathBuf,
    /// Runtime threads. 1 (the default, as for a sidecar beside one workload) runs the whole proxy on one
    /// thread: no cross-thread wake-ups or lock contention, which measured here about a third less CPU per
    /// request and more bulk throughput than a thread per core. Raise it for a proxy that serves many
    /// busy peers.
    #[arg(long, env = "QUICMESH_WORKERS", default_value_t = 1)]
    pub workers: usize,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let cfg = ProxyConfig::load(&args.config)?;
    let proxy = Proxy::bind(&cfg, &args.config).await?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Controller mode: ready only once the first certificate and configuration are held.
    let creds = proxy.credentials().clone();
    let readiness = proxy.readiness();
    tokio::select! {
        _ = readiness.wait() => {}
        _ = &mut shutdown => {
            tracing::info!("stopped before the first certificate arrived");
            return Ok(());
        }
    }
    // One JSON line on stdout: tests and scripts wait for it instead of sleeping.
    let mut ready = serde_json::to_value(proxy.addresses()).context("encoding addresses")?;
    ready["event"] = "ready".into();
    if let Some(leaf) = creds.leaf() {
        ready["id"] = leaf.info.id.to_string().into();
        ready["cert_not_after_unix"] = leaf.info.not_after.unix_timestamp().into();
    }
    println!("{ready}");
    proxy.run(shutdown).await;
    Ok(())
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
