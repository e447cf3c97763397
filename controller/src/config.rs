//! `quicmesh controller` flags and how they become [`StateOptions`].
//!
//! One place for every setting and its default, so `--help`, the start-up log line and the code agree.
//! Durations are written the human way (`90s`, `10m`, `1h`), parsed by [`parse_duration`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::state::{StartError, StateOptions};

/// Flags of `quicmesh controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Directory for the sled database and the trust bundle file (created if missing).
    #[arg(long, env = "QUICMESH_DATA_DIR", default_value = "quicmesh-data")]
    pub data_dir: PathBuf,
    /// Address of the gRPC listener (TLS; proxy API, admin API, health, reflection). Port 0 picks one.
    #[arg(
        long,
        env = "QUICMESH_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:7443"
    )]
    pub listen: SocketAddr,
    /// Trust domain of a new mesh (default quicmesh.local); must match an existing data directory.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Lifetime of issued leaf certificates, e.g. `1h` (default), `10s`. Replaces the stored setting.
    #[arg(long, value_parser = parse_duration)]
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
}

impl ControllerArgs {
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
        Ok(StateOptions {
            data_dir: self.data_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            leaf_ttl: self.leaf_ttl,
            root_pem,
            tls_names,
        })
    }
}

/// Parses `500ms`, `90s`, `10m`, `1h`, `2d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by ms, s, m, h or d"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
    }
}
