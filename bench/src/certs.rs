//! Certificates for the proxy pairs the harness starts: one root and two SPIFFE leaves (client side and
//! server side), valid for both TLS client and server authentication like the mesh's own. HAProxy reads
//! them as PEM files with the key appended; quicmesh reads them as separate PEM files.
//!
//! Generated here with rcgen rather than through `quicmesh ca` so that the peer scenarios run even when
//! no quicmesh binary is at hand.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Trust domain of the harness's identities.
pub const TRUST_DOMAIN: &str = "mesh.local";

/// PEM files of one identity.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Certificate, PEM.
    pub cert: PathBuf,
    /// PKCS#8 key, PEM.
    pub key: PathBuf,
    /// Certificate followed by key (HAProxy's `crt`).
    pub combined: PathBuf,
}

/// The CA and the two leaves, written under one directory.
#[derive(Debug, Clone)]
pub struct Certs {
    /// Root certificate, PEM (the trust bundle).
    pub ca: PathBuf,
    /// Client-side proxy identity.
    pub client: Leaf,
    /// Server-side proxy identity.
    pub server: Leaf,
    /// The ingress's serving certificate, for [`INGRESS_HOST`] (outside clients' view).
    pub ingress: Leaf,
}

/// Host name of the ingress benchmark (its certificate's DNS name, the route's host).
pub const INGRESS_HOST: &str = "shop.bench.example";

fn leaf(dir: &Path, name: &str, issuer: &Issuer<'_, KeyPair>) -> anyhow::Result<Leaf> {
    let id = format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{name}");
    leaf_for(dir, name, SanType::URI(id.as_str().try_into()?), issuer)
}

fn leaf_for(
    dir: &Path,
    name: &str,
    san: SanType,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<Leaf> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(1);
    let cert = params.signed_by(&key, issuer)?;
    let out = Leaf {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        combined: dir.join(format!("{name}.combined.pem")),
    };
    std::fs::write(&out.cert, cert.pem())?;
    std::fs::write(&out.key, key.serialize_pem())?;
    std::fs::write(
        &out.combined,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(out)
}

/// Generates a root and the `client` and `server` leaves into `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<Certs> {
    let (ca, mut leaves, ingress) = root_and_leaves(dir, &["client", "server"])?;
    let server = leaves
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no server leaf"))?;
    let client = leaves
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no client leaf"))?;
    Ok(Certs {
        ca,
        client,
        server,
        ingress,
    })
}

/// Generates a root (its certificate's path is returned first) and one leaf per name, each for
/// `spiffe://<td>/ns/bench/sa/<name>`, into `dir`.
pub fn generate_named(dir: &Path, names: &[&str]) -> anyhow::Result<(PathBuf, Vec<Leaf>)> {
    let (ca, leaves, _ingress) = root_and_leaves(dir, names)?;
    Ok((ca, leaves))
}

/// A root, one SPIFFE leaf per name and the ingress's serving leaf.
fn root_and_leaves(dir: &Path, names: &[&str]) -> anyhow::Result<(PathBuf, Vec<Leaf>, Leaf)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "quicmesh bench root");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(2);
    let root = params.self_signed(&key)?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, root.pem())?;
    let issuer = Issuer::new(params, key);
    let leaves = names
        .iter()
        .map(|n| leaf(dir, n, &issuer))
        .collect::<anyhow::Result<_>>()?;
    let ingress = leaf_for(
        dir,
        "ingress",
        SanType::DnsName(INGRESS_HOST.try_into()?),
        &issuer,
    )?;
    Ok((ca, leaves, ingress))
}
