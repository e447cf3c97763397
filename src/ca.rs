//! `quicmesh ca`: a development CA so that static mode needs no outside tool.
//!
//! Writes PEM files only; the private keys are created with mode 0600.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use quicmesh_transport::identity::{CertificateAuthority, SpiffeId};
use time::{Duration, OffsetDateTime};

#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Create a root CA: DIR/ca.pem and DIR/ca.key.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain the root serves.
        #[arg(long, default_value = "mesh.local")]
        trust_domain: String,
        /// Root lifetime in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Issue a workload certificate signed by DIR/ca.pem: OUT.pem and OUT.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE ID, spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        id: SpiffeId,
        /// Output path without extension.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 1h, 30m, 90s.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        lifetime: std::time::Duration,
        /// Start of validity relative to now, in seconds (negative: in the past; for tests of expiry).
        #[arg(long, default_value_t = -60, allow_hyphen_values = true)]
        not_before_offset: i64,
    },
}

fn write(path: &Path, data: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            days,
        } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let ca = CertificateAuthority::generate(
                &trust_domain,
                OffsetDateTime::now_utc() + Duration::days(days),
            )?;
            write(&dir.join("ca.pem"), ca.cert_pem(), 0o644)?;
            write(&dir.join("ca.key"), ca.key_pem(), 0o600)?;
            println!(
                "root CA for {trust_domain} written to {}",
                dir.join("ca.pem").display()
            );
        }
        CaCommand::Issue {
            dir,
            id,
            out,
            lifetime,
            not_before_offset,
        } => {
            let read = |name: &str| {
                let p = dir.join(name);
                std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
            };
            let ca = CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca.key")?)?;
            let nb = OffsetDateTime::now_utc() + Duration::seconds(not_before_offset);
            let na = nb + Duration::try_from(lifetime).context("lifetime too long")?;
            let leaf = ca.issue(&id, nb, na)?;
            write(&out.with_extension("pem"), &leaf.cert_pem, 0o644)?;
            write(&out.with_extension("key"), &leaf.key_pem, 0o600)?;
            println!(
                "certificate for {id} written to {}",
                out.with_extension("pem").display()
            );
        }
    }
    Ok(())
}
