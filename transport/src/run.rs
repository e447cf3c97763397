//! `quicmesh run -- CMD ARGS`: the sidecar and its application as one process tree, for batch jobs and
//! for anything that must not start before the mesh can carry its traffic.
//!
//! Two problems of sidecars are solved here rather than in every deployment: start-up order (the app's
//! first connection fails if the proxy is not ready yet) and jobs that never finish (the app exits, the
//! sidecar keeps the pod alive). The proxy runs in this process; the app is started only once the proxy
//! holds its certificate and, in controller mode, its first configuration. If that cannot happen (bad
//! configuration, a refused token, no controller within `--ready-timeout`) the command fails with the
//! reason and the app never starts. Signals this process receives (SIGTERM, SIGINT, SIGHUP) are passed
//! to the app; when the app exits the proxy drains and the process exits with the app's code, or
//! 128 + N when the app died of signal N (the shell's convention).

use std::{ffi::OsString, path::PathBuf, time::Duration};

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{Proxy, ProxyAddresses, ProxyConfig, cli::RunError};

/// Arguments of `quicmesh run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The sidecar's configuration file (TOML), as for `quicmesh proxy`.
    #[arg(long, short, env = "QUICMESH_CONFIG")]
    pub config: PathBuf,
    /// Longest wait for the sidecar to become ready before giving up without starting the app.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub ready_timeout: Duration,
    /// Runtime threads of the sidecar (see `quicmesh proxy --workers`).
    #[arg(long, env = "QUICMESH_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// The application and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// The exit code for an app that ended with `code`, or was killed by `signal`: the code's low byte, or
/// 128 + N for signal N, as shells report it.
pub fn exit_code(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => u8::try_from(128 + s.clamp(0, 127)).unwrap_or(u8::MAX),
        (None, None) => 1,
    }
}

/// The exit code when the app cannot be started at all, as shells report it: 127 for a command that
/// does not exist, 126 for one that cannot be executed.
pub fn spawn_failure_code(kind: std::io::ErrorKind) -> u8 {
    match kind {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

/// Environment the app is started with, so it can find the sidecar's bound ports (useful when they are
/// configured as port 0): `QUICMESH_ADMIN`, `QUICMESH_INBOUND`, `QUICMESH_OUTBOUND_<i>` in configuration
/// order.
pub fn app_env(addresses: &ProxyAddresses) -> Vec<(String, String)> {
    let mut env = vec![("QUICMESH_ADMIN".to_owned(), addresses.admin.to_string())];
    if let Some(i) = addresses.inbound {
        env.push(("QUICMESH_INBOUND".to_owned(), i.to_string()));
    }
    for (i, o) in addresses.outbound.iter().enumerate() {
        env.push((format!("QUICMESH_OUTBOUND_{i}"), o.to_string()));
    }
    env
}

/// The signals passed on to the app.
struct Forwarded {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Forwarded {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal received, as its number.
    async fn next(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal as S;
        tokio::select! {
            _ = self.term.recv() => S::TERM,
            _ = self.int.recv() => S::INT,
            _ = self.hup.recv() => S::HUP,
        }
    }
}

/// Starts the sidecar, waits until it is ready, runs the app, and returns the app's exit code once the
/// sidecar has drained. Fails (without starting the app) if the sidecar cannot become ready.
pub async fn run(args: &RunArgs) -> Result<u8, RunError> {
    let Some((program, app_args)) = args.command.split_first() else {
        return Err(RunError::NoCommand);
    };
    // Watched from the start: a SIGTERM during start-up must not kill us with the default action.
    let mut signals = Forwarded::new()?;
    let cfg = ProxyConfig::load(&args.config)?;
    let proxy = Proxy::bind(&cfg, &args.config).await?;
    let readiness = proxy.readiness();
    tokio::select! {
        _ = readiness.wait() => {}
        p = readiness.refused() => {
            return Err(RunError::NotReady(format!("the controller refused the bootstrap: {}", p.message)));
        }
        _ = tokio::time::sleep(args.ready_timeout) => {
            let why = match readiness.problem() {
                Some(p) => p.message,
                None => "no certificate or configuration from the controller yet".to_owned(),
            };
            return Err(RunError::NotReady(format!(
                "not ready within {}: {why}",
                humantime::format_duration(args.ready_timeout)
            )));
        }
        s = signals.next() => {
            tracing::info!(signal = ?s, "stopped before the sidecar was ready; the app was not started");
            return Ok(exit_code(None, Some(s.as_raw())));
        }
    }
    let addresses = proxy.addresses().clone();
    let id = proxy
        .credentials()
        .id()
        .map(|i| i.to_string())
        .unwrap_or_default();
    tracing::info!(%id, ?addresses, app = ?program, "sidecar ready; starting the app");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sidecar = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    let code = match tokio::process::Command::new(program)
        .args(app_args)
        .envs(app_env(&addresses))
        .spawn()
    {
        Err(e) => {
            tracing::error!(app = ?program, error = %e, "cannot start the app");
            spawn_failure_code(e.kind())
        }
        Ok(mut child) => loop {
            tokio::select! {
                status = child.wait() => {
                    use std::os::unix::process::ExitStatusExt;
                    break match status {
                        Ok(s) => exit_code(s.code(), s.signal()),
                        Err(e) => {
                            tracing::error!(error = %e, "lost track of the app");
                            1
                        }
                    };
                }
                s = signals.next() => forward(child.id(), s),
            }
        },
    };
    tracing::info!(code, "the app exited; draining the sidecar");
    let _ = stop.send(());
    let _ = sidecar.await;
    Ok(code)
}

/// Passes signal `s` to the app (`pid`, absent once it has been reaped).
fn forward(pid: Option<u32>, s: rustix::process::Signal) {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    tracing::info!(signal = ?s, pid = pid.as_raw_nonzero().get(), "forwarding a signal to the app");
    if let Err(e) = rustix::process::kill_process(pid, s) {
        tracing::warn!(error = %e, "cannot forward the signal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Some(0), None), 0);
        assert_eq!(exit_code(Some(3), None), 3);
        assert_eq!(exit_code(Some(256 + 7), None), 7, "low byte only");
        assert_eq!(exit_code(None, Some(15)), 143, "SIGTERM");
        assert_eq!(exit_code(None, Some(9)), 137, "SIGKILL");
        assert_eq!(exit_code(None, None), 1);
        assert_eq!(spawn_failure_code(std::io::ErrorKind::NotFound), 127);
        assert_eq!(
            spawn_failure_code(std::io::ErrorKind::PermissionDenied),
            126
        );
    }

    #[test]
    fn the_app_learns_the_bound_ports() {
        let a = ProxyAddresses {
            admin: "127.0.0.1:15000".parse().expect("addr"),
            inbound: None,
            outbound: vec![
                "127.0.0.1:9000".parse().expect("addr"),
                "127.0.0.1:9001".parse().expect("addr"),
            ],
            capture: None,
            ingress: None,
        };
        let env = app_env(&a);
        assert_eq!(
            env,
            [
                ("QUICMESH_ADMIN", "127.0.0.1:15000"),
                ("QUICMESH_OUTBOUND_0", "127.0.0.1:9000"),
                ("QUICMESH_OUTBOUND_1", "127.0.0.1:9001"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
