//! The mesh certificate authority: roots, the trust bundle, and signing of workload CSRs.
//!
//! Signing itself is `quicmesh_transport::identity::CertificateAuthority`; this module decides *what* may be
//! signed and keeps the roots' lifecycle. A CSR contributes only its public key, and if it names a SPIFFE
//! ID that ID must be the one the caller's credential grants. Roots rotate without an outage: the new root
//! joins the bundle and signs from then on, the old root stays in the bundle until the last leaf it signed
//! has expired, then leaves it. Root records are stored so a restart keeps the same bundle (their private
//! keys sealed, see [`crate::keystore`]).
//!
//! Key types: a CSR is signed only for ECDSA P-256 keys, the type the proxies generate and the one every
//! test handshakes with. Any other key (P-384, RSA, Ed25519, ...) is refused with its name before the
//! signature is even checked, and every signed leaf is checked to carry exactly the CSR's public key.

use std::{net::IpAddr, sync::Arc, time::Duration};

use quicmesh_transport::identity::{CaError, CertificateAuthority, SpiffeId, inspect};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::SectionKind;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{auth, model::SYSTEM_NAMESPACE};

/// Largest CSR accepted, bytes of PEM.
pub const MAX_CSR_PEM: usize = 16 * 1024;
/// Validity of a generated root.
const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);
/// Leaves start this long before "now", for peers whose clocks run a little behind.
pub const BACKDATE: time::Duration = time::Duration::seconds(30);

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR is malformed, too large or its signature does not verify.
    #[error("{0}")]
    Csr(String),
    /// The CSR asks for an identity the credential does not grant.
    #[error("CSR asks for {requested}, credential grants {granted}")]
    Identity {
        /// In the CSR.
        requested: String,
        /// By the credential.
        granted: String,
    },
    /// The CA failed to load or sign.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A root record could not be read.
    #[error("root certificate: {0}")]
    Root(String),
}

/// A root: in memory with its key in `key_pem`; as stored with the key only in `key_sealed`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootRecord {
    /// SHA-256 of the DER, hex; also the storage key.
    pub fingerprint: String,
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 key, PEM. Never written to the store by this build (older data directories may hold it;
    /// they are sealed at the next start).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_pem: String,
    /// The key sealed with the key-encryption key ([`crate::keystore::Kek::seal`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_sealed: String,
    /// When it became a root of this mesh.
    pub created_unix: i64,
    /// End of the root's own validity.
    pub not_after_unix: i64,
    /// Whether it signs new leaves. Exactly one root is active.
    pub active: bool,
    /// Latest expiry of any leaf it signed.
    pub max_leaf_not_after_unix: i64,
}

impl RootRecord {
    /// Wraps a CA as a record.
    pub fn from_ca(ca: &CertificateAuthority, now: OffsetDateTime) -> Result<Self, IssueError> {
        let der =
            inspect::first_cert_der(ca.cert_pem()).map_err(|e| IssueError::Root(e.to_string()))?;
        let not_after = inspect::not_after_of_pem(ca.cert_pem())
            .map_err(|e| IssueError::Root(e.to_string()))?;
        Ok(Self {
            fingerprint: auth::sha256_hex(&der),
            cert_pem: ca.cert_pem().to_owned(),
            key_pem: ca.key_pem().to_owned(),
            key_sealed: String::new(),
            created_unix: now.unix_timestamp(),
            not_after_unix: not_after.unix_timestamp(),
            active: true,
            max_leaf_not_after_unix: 0,
        })
    }

    /// Whether the root still belongs in the trust bundle at `now`: active, or some leaf it signed is valid.
    pub fn in_bundle(&self, now: OffsetDateTime) -> bool {
        self.active || self.max_leaf_not_after_unix >= now.unix_timestamp()
    }
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Leaf certificate, PEM.
    pub cert_pem: String,
    /// Its identity.
    pub spiffe_id: SpiffeId,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// Serial, hex.
    pub serial_hex: String,
    /// Fingerprint of the signing root.
    pub root_fingerprint: String,
}

/// The active root's signing key, shared: what signing a CSR needs (no lock, any thread).
#[derive(Clone)]
pub struct Signer {
    ca: Arc<CertificateAuthority>,
    root_fingerprint: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("root", &self.root_fingerprint)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Signs `csr_pem` for `granted`, valid from `now - BACKDATE` for `ttl`: CPU only (CSR signature
    /// check, signing, checking the leaf carries the CSR's key).
    pub fn sign(
        &self,
        csr_pem: &str,
        granted: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Signed, IssueError> {
        // Sign the very CSR that was checked (parsed and verified once), not whatever another PEM
        // reader takes first.
        let (csr, csr_key) = checked_csr(csr_pem, granted)?;
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        let cert = self
            .ca
            .sign_csr_params(&csr, granted, not_before, not_after)
            .map_err(|e| match e {
                CaError::Csr(e) => IssueError::Csr(e.to_string()),
                e => IssueError::Ca(e),
            })?;
        // Checked as signed (DER), and handed out as PEM.
        let leaf = checked_leaf(&csr_key, granted, cert.der())?;
        Ok(Signed {
            cert_pem: cert.pem(),
            spiffe_id: granted.clone(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            serial_hex: leaf.serial_hex,
            root_fingerprint: self.root_fingerprint.clone(),
        })
    }
}

/// The CA state in memory: the active root and every root still in the bundle.
pub struct Issuer {
    active: Arc<CertificateAuthority>,
    roots: Vec<RootRecord>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field(
                "roots",
                &self
                    .roots
                    .iter()
                    .map(|r| &r.fingerprint)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Issuer {
    /// Builds the issuer from stored roots (one must be active).
    pub fn from_records(mut roots: Vec<RootRecord>) -> Result<Self, IssueError> {
        roots.sort_by_key(|r| r.created_unix);
        let active = roots
            .iter()
            .rev()
            .find(|r| r.active)
            .ok_or_else(|| IssueError::Root("no active root in the store".into()))?;
        let ca = CertificateAuthority::from_pem(&active.cert_pem, &active.key_pem)?;
        Ok(Self {
            active: Arc::new(ca),
            roots,
        })
    }

    /// Generates a new root for `trust_domain`.
    pub fn generate_root(
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<RootRecord, IssueError> {
        let ca = CertificateAuthority::generate(trust_domain, now + ROOT_LIFETIME)?;
        RootRecord::from_ca(&ca, now)
    }

    /// Loads an operator-provided root from PEM.
    pub fn load_root(
        cert_pem: &str,
        key_pem: &str,
        now: OffsetDateTime,
    ) -> Result<RootRecord, IssueError> {
        let ca = CertificateAuthority::from_pem(cert_pem, key_pem)?;
        RootRecord::from_ca(&ca, now)
    }

    /// Every root record (active and retiring).
    pub fn roots(&self) -> &[RootRecord] {
        &self.roots
    }

    /// The active root's record.
    pub fn active_record(&self) -> Option<&RootRecord> {
        self.roots.iter().rev().find(|r| r.active)
    }

    /// The trust bundle at `now`, PEMs, newest root first.
    pub fn bundle(&self, now: OffsetDateTime) -> Vec<String> {
        self.roots
            .iter()
            .rev()
            .filter(|r| r.in_bundle(now))
            .map(|r| r.cert_pem.clone())
            .collect()
    }

    /// Makes `new` the active root; the previous ones stop signing. Returns every changed record.
    pub fn rotate_to(&mut self, new: RootRecord) -> Result<Vec<RootRecord>, IssueError> {
        let ca = CertificateAuthority::from_pem(&new.cert_pem, &new.key_pem)?;
        let mut changed = Vec::new();
        for r in &mut self.roots {
            if r.active {
                r.active = false;
                changed.push(r.clone());
            }
        }
        changed.push(new.clone());
        self.roots.push(new);
        self.active = Arc::new(ca);
        Ok(changed)
    }

    /// Raises each root's latest leaf expiry to what `stored` records (leaves another controller
    /// issued from the same root).
    pub fn merge_leaf_expiry(&mut self, stored: &[RootRecord]) {
        for r in &mut self.roots {
            if let Some(s) = stored.iter().find(|s| s.fingerprint == r.fingerprint) {
                r.max_leaf_not_after_unix =
                    r.max_leaf_not_after_unix.max(s.max_leaf_not_after_unix);
            }
        }
    }

    /// Roots that left the bundle at `now`; they are dropped from memory and returned for deletion.
    pub fn take_retired(&mut self, now: OffsetDateTime) -> Vec<RootRecord> {
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.roots)
            .into_iter()
            .partition(|r| r.in_bundle(now));
        self.roots = keep;
        gone
    }

    /// Signs `csr_pem` for `granted` with the active root, valid from `now - BACKDATE` for `ttl`. Records the
    /// leaf's expiry on the active root and returns the updated root record with the leaf.
    pub fn sign(
        &mut self,
        csr_pem: &str,
        granted: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<(Signed, RootRecord), IssueError> {
        let signed = self.signer()?.sign(csr_pem, granted, now, ttl)?;
        let root = self.record_leaf(&signed)?;
        Ok((signed, root))
    }

    /// The active root as a [`Signer`]: signing needs no lock on the issuer, so certificates are
    /// signed in parallel; [`Issuer::record_leaf`] then records each leaf on its root.
    pub fn signer(&self) -> Result<Signer, IssueError> {
        let root = self
            .active_record()
            .ok_or_else(|| IssueError::Root("no active root".into()))?;
        Ok(Signer {
            ca: self.active.clone(),
            root_fingerprint: root.fingerprint.clone(),
        })
    }

    /// Records `signed`'s expiry on the root that signed it (a root leaves the bundle only after its
    /// last leaf expired); the updated record. Fails if that root is gone (retired meanwhile).
    pub fn record_leaf(&mut self, signed: &Signed) -> Result<RootRecord, IssueError> {
        let root = self
            .roots
            .iter_mut()
            .find(|r| r.fingerprint == signed.root_fingerprint)
            .ok_or_else(|| {
                IssueError::Root(format!(
                    "root {} left the bundle while the certificate was signed",
                    signed.root_fingerprint
                ))
            })?;
        root.max_leaf_not_after_unix = root
            .max_leaf_not_after_unix
            .max(signed.not_after.unix_timestamp());
        Ok(root.clone())
    }

    /// Issues the controller's own TLS certificate with a fresh key, signed by the oldest root in the
    /// bundle: the controller's SPIFFE ID plus DNS and
    /// IP names (`localhost`, loopback, and `extra_names`) so ordinary TLS clients verify it by host name.
    /// Returns `(cert_pem, key_pem, not_after)`.
    pub fn serving_cert(
        &self,
        trust_domain: &str,
        extra_names: &[String],
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<(String, String, OffsetDateTime), IssueError> {
        let id = controller_id(trust_domain).map_err(|e| IssueError::Root(e.to_string()))?;
        // Signed by the oldest root still in the bundle: during a rotation every client trusts it, even one
        // that has not yet learnt the new root.
        let (root_cert, root_key) = self
            .roots
            .iter()
            .find(|r| r.in_bundle(now))
            .map(|r| (r.cert_pem.as_str(), r.key_pem.as_str()))
            .unwrap_or((self.active.cert_pem(), self.active.key_pem()));
        let root_key = KeyPair::from_pem(root_key).map_err(|e| IssueError::Root(e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(root_cert, root_key)
            .map_err(|e| IssueError::Root(e.to_string()))?;
        let key = KeyPair::generate().map_err(|e| IssueError::Root(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let mut sans =
            vec![SanType::URI(id.as_str().try_into().map_err(
                |e: rcgen::Error| IssueError::Root(e.to_string()),
            )?)];
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(extra_names.iter().cloned());
        names.dedup();
        for n in names {
            if let Ok(ip) = n.parse::<IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else if let Ok(dns) = n.as_str().try_into() {
                sans.push(SanType::DnsName(dns));
            }
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        let not_after = now + lifetime;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| IssueError::Root(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem(), not_after))
    }
}

/// The controller's own identity in `trust_domain`.
pub fn controller_id(
    trust_domain: &str,
) -> Result<SpiffeId, quicmesh_transport::identity::SpiffeIdError> {
    SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, "controller")
}

/// The key types the CA signs for.
pub const SUPPORTED_KEY_TYPES: &str = "ECDSA P-256";

/// The DER of the single PEM block of `kind` in `pem`.
fn pem_der(pem: &str, kind: SectionKind) -> Result<Vec<u8>, IssueError> {
    quicmesh_transport::identity::pem::sole_block(pem.as_bytes(), kind)
        .map_err(|e| IssueError::Csr(e.to_string()))
}

/// What the audit record and the answer need of a signed leaf.
#[derive(Debug)]
struct LeafFacts {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial_hex: String,
}

/// Checks that the signed leaf (DER) carries exactly `csr_key`, the CSR's subject public key info,
/// and names exactly `granted` (guards the signer itself); its validity and serial, from the same
/// parse.
fn checked_leaf(
    csr_key: &[u8],
    granted: &SpiffeId,
    cert_der: &[u8],
) -> Result<LeafFacts, IssueError> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| IssueError::Root(format!("signed leaf does not parse: {e}")))?;
    if cert.tbs_certificate.subject_pki.raw != csr_key {
        return Err(IssueError::Root(
            "the signed leaf does not carry the CSR's public key; refusing to hand it out".into(),
        ));
    }
    let names_granted = match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            let mut uris = san.value.general_names.iter().filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
            uris.next() == Some(granted.as_str()) && uris.next().is_none()
        }
        _ => false,
    };
    if !names_granted {
        return Err(IssueError::Root(format!(
            "the signed leaf does not name exactly {granted}; refusing to hand it out"
        )));
    }
    let validity = cert.validity();
    Ok(LeafFacts {
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        serial_hex: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// Parses and verifies a CSR: one PEM block, a supported key type (named when refused), a valid
/// signature; if it carries URI SANs, each must be `granted`.
pub fn check_csr(csr_pem: &str, granted: &SpiffeId) -> Result<(), IssueError> {
    checked_csr(csr_pem, granted).map(|_| ())
}

/// [`check_csr`], returning the checked (parsed, signature-verified) request and its subject public key
/// info (DER), read once.
fn checked_csr(
    csr_pem: &str,
    granted: &SpiffeId,
) -> Result<(CertificateSigningRequestParams, Vec<u8>), IssueError> {
    if csr_pem.is_empty() {
        return Err(IssueError::Csr("must not be empty".into()));
    }
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(IssueError::Csr(format!(
            "{} bytes, larger than the limit of {MAX_CSR_PEM}",
            csr_pem.len()
        )));
    }
    let der = pem_der(csr_pem, SectionKind::Csr)?;
    let key = check_key_type(&der)?;
    let der = rustls::pki_types::CertificateSigningRequestDer::from(der);
    let csr = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| IssueError::Csr(e.to_string()))?;
    let uris = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        });
    if let Some(other) = crate::ca::rules::foreign_uri(uris, granted) {
        return Err(IssueError::Identity {
            requested: other.to_owned(),
            granted: granted.to_string(),
        });
    }
    Ok((csr, key))
}

/// The one key type issued: ECDSA P-256 signed with SHA-256, what proxies generate and what the handshake
/// tests use. rcgen derives the leaf's key algorithm from the CSR's *signature* algorithm, so any other
/// pairing (e.g. a P-384 key signed with SHA-256) would yield a leaf whose key OID contradicts its key.
/// Checked before the signature, so an unsupported key is refused by name, not as "invalid signature".
/// Returns the request's subject public key info (DER).
fn check_key_type(der: &[u8]) -> Result<Vec<u8>, IssueError> {
    use x509_parser::{
        certification_request::X509CertificationRequest, oid_registry as oid, prelude::FromDer,
    };
    let (_, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| IssueError::Csr(format!("not a PKCS#10 request: {e}")))?;
    let key = inspect::KeyType::of_spki(&csr.certification_request_info.subject_pki);
    if key != inspect::KeyType::EcdsaP256 {
        return Err(IssueError::Csr(format!(
            "key type {key} is not supported; use {SUPPORTED_KEY_TYPES}"
        )));
    }
    let sig = &csr.signature_algorithm.algorithm;
    if *sig != oid::OID_SIG_ECDSA_WITH_SHA256 {
        return Err(IssueError::Csr(format!(
            "signature algorithm {sig} does not match its ECDSA P-256 key: sign with ecdsa-with-SHA256"
        )));
    }
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

#[cfg(test)]
mod tests {
    use quicmesh_transport::identity::ca::generate_csr;

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("mesh.local", "shop", sa).expect("id")
    }

    #[test]
    fn signs_only_the_granted_identity() {
        let now = OffsetDateTime::now_utc();
        let root = Issuer::generate_root("mesh.local", now).expect("root");
        let mut issuer = Issuer::from_records(vec![root]).expect("issuer");
        let (csr, _key) = generate_csr(&id("cart")).expect("csr");
        let (signed, root) = issuer
            .sign(&csr, &id("cart"), now, Duration::from_secs(60))
            .expect("sign");
        assert_eq!(signed.spiffe_id, id("cart"));
        assert_eq!(
            root.max_leaf_not_after_unix,
            signed.not_after.unix_timestamp()
        );
        assert_eq!(
            signed.not_after.unix_timestamp(),
            (now + time::Duration::seconds(60)).unix_timestamp()
        );
        let err = issuer
            .sign(&csr, &id("admin"), now, Duration::from_secs(60))
            .expect_err("other identity");
        assert!(matches!(err, IssueError::Identity { .. }), "{err}");
        assert!(matches!(
            check_csr("garbage", &id("cart")),
            Err(IssueError::Csr(_))
        ));
        assert!(matches!(
            check_csr(&"x".repeat(MAX_CSR_PEM + 1), &id("cart")),
            Err(IssueError::Csr(_))
        ));
    }

    /// A CSR for `id` with a key of `alg`, made by rcgen (ring can make P-384 and Ed25519 keys).
    fn csr_with(alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id("cart").as_str().try_into().expect("uri"))];
        params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    #[test]
    fn only_p256_keys_are_signed_and_others_are_named() {
        let now = OffsetDateTime::now_utc();
        let root = Issuer::generate_root("mesh.local", now).expect("root");
        let mut issuer = Issuer::from_records(vec![root]).expect("issuer");
        assert!(check_csr(&csr_with(&rcgen::PKCS_ECDSA_P256_SHA256), &id("cart")).is_ok());
        for (alg, name) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ECDSA P-384"),
            (&rcgen::PKCS_ED25519, "Ed25519"),
        ] {
            let csr = csr_with(alg);
            let e = issuer
                .sign(&csr, &id("cart"), now, Duration::from_secs(60))
                .expect_err(name);
            assert!(
                matches!(&e, IssueError::Csr(m) if m.contains(name) && m.contains("not supported")),
                "{name}: {e}"
            );
        }
    }

    /// DER CSRs made with the openssl CLI (the fuzz target's seeds), as PEM.
    fn openssl_csr(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    }

    #[test]
    fn only_p256_keys_are_issued_and_others_are_named() {
        let cart = id("cart");
        // Found by the `csr` fuzz target: a P-384 key signed with SHA-256 was issued a leaf that declared
        // a P-256 key holding a P-384 point.
        for (der, named) in [
            (
                &include_bytes!("../../fuzz/corpus/csr/p384-sha256.der")[..],
                "ECDSA P-384",
            ),
            (
                include_bytes!("../../fuzz/corpus/csr/p384.der"),
                "ECDSA P-384",
            ),
            (
                include_bytes!("../../fuzz/corpus/csr/p521.der"),
                "ECDSA P-521",
            ),
            (
                include_bytes!("../../fuzz/corpus/csr/rsa1024.der"),
                "RSA-1024",
            ),
            (
                include_bytes!("../../fuzz/corpus/csr/rsa2048.der"),
                "RSA-2048",
            ),
            (
                include_bytes!("../../fuzz/corpus/csr/ed25519.der"),
                "Ed25519",
            ),
        ] {
            let err = check_csr(&openssl_csr(der), &cart).expect_err(named);
            assert!(
                err.to_string()
                    .contains(&format!("key type {named} is not supported")),
                "{named}: {err}"
            );
        }
        let p256 = openssl_csr(include_bytes!("../../fuzz/corpus/csr/p256.der"));
        check_csr(&p256, &cart).expect("P-256 with SHA-256");
        let now = OffsetDateTime::now_utc();
        let mut issuer = Issuer::from_records(vec![
            Issuer::generate_root("mesh.local", now).expect("root"),
        ])
        .expect("issuer");
        issuer
            .sign(&p256, &cart, now, Duration::from_secs(60))
            .expect("an openssl P-256 CSR is signed");
        let (leaf, _) = issuer
            .sign(&p256, &cart, now, Duration::from_secs(60))
            .expect("signed");
        // A P-384 CSR under another label first, then the P-256 one: one block only, so nothing is
        // signed that was not checked.
        let p384 = openssl_csr(include_bytes!("../../fuzz/corpus/csr/p384-sha256.der"))
            .replace("CERTIFICATE REQUEST", "X509 CRL");
        issuer
            .sign(
                &format!("{p384}{p256}"),
                &cart,
                now,
                Duration::from_secs(60),
            )
            .expect_err("two PEM blocks");
        let leaf_der = inspect::first_cert_der(&leaf.cert_pem).expect("leaf");
        let p256_der = include_bytes!("../../fuzz/corpus/csr/p256.der");
        let spki = |der: &[u8], cert: bool| {
            use x509_parser::prelude::*;
            if cert {
                let (_, c) = X509Certificate::from_der(der).expect("cert");
                c.tbs_certificate.subject_pki.raw.to_vec()
            } else {
                let (_, c) = X509CertificationRequest::from_der(der).expect("csr");
                c.certification_request_info.subject_pki.raw.to_vec()
            }
        };
        assert_eq!(spki(&leaf_der, true), spki(p256_der, false));
        let err = check_csr(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            &cart,
        )
        .expect_err("not a CSR");
        assert!(err.to_string().contains("CERTIFICATE REQUEST"), "{err}");
    }

    #[test]
    fn a_leaf_is_handed_out_only_with_the_csr_key_and_the_granted_identity() {
        let now = OffsetDateTime::now_utc();
        let mut issuer = Issuer::from_records(vec![
            Issuer::generate_root("mesh.local", now).expect("root"),
        ])
        .expect("issuer");
        let (csr, _) = generate_csr(&id("cart")).expect("csr");
        let (signed, _) = issuer
            .sign(&csr, &id("cart"), now, Duration::from_secs(60))
            .expect("sign");
        let leaf = inspect::first_cert_der(&signed.cert_pem).expect("leaf");
        let csr_der = pem_der(&csr, SectionKind::Csr).expect("csr der");
        let key = check_key_type(&csr_der).expect("key");
        let facts = checked_leaf(&key, &id("cart"), &leaf).expect("the leaf as signed");
        let info = inspect::CertInfo::from_der(&leaf).expect("info");
        assert_eq!(facts.serial_hex, info.serial_hex);
        assert_eq!(facts.not_before, info.not_before);
        assert_eq!(facts.not_after, info.not_after);
        assert_eq!(
            (signed.not_after, signed.serial_hex),
            (info.not_after, info.serial_hex)
        );
        let e = checked_leaf(&key, &id("admin"), &leaf).expect_err("another identity");
        assert!(e.to_string().contains("does not name exactly"), "{e}");
        let (other, _) = generate_csr(&id("cart")).expect("csr");
        let other_key =
            check_key_type(&pem_der(&other, SectionKind::Csr).expect("der")).expect("key");
        let e = checked_leaf(&other_key, &id("cart"), &leaf).expect_err("another key");
        assert!(e.to_string().contains("public key"), "{e}");
    }

    #[test]
    fn rotation_keeps_old_root_until_its_leaves_expire() {
        let now = OffsetDateTime::now_utc();
        let first = Issuer::generate_root("mesh.local", now).expect("root");
        let mut issuer = Issuer::from_records(vec![first.clone()]).expect("issuer");
        let (csr, _) = generate_csr(&id("cart")).expect("csr");
        issuer
            .sign(&csr, &id("cart"), now, Duration::from_secs(10))
            .expect("sign");
        let second = Issuer::generate_root("mesh.local", now).expect("root2");
        let changed = issuer.rotate_to(second.clone()).expect("rotate");
        assert_eq!(changed.len(), 2);
        assert_eq!(
            issuer.bundle(now),
            vec![second.cert_pem.clone(), first.cert_pem.clone()]
        );
        let (signed, _) = issuer
            .sign(&csr, &id("cart"), now, Duration::from_secs(10))
            .expect("sign");
        assert_eq!(signed.root_fingerprint, second.fingerprint);
        assert!(issuer.take_retired(now).is_empty());
        let later = now + time::Duration::seconds(11);
        let gone = issuer.take_retired(later);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].fingerprint, first.fingerprint);
        assert_eq!(issuer.bundle(later), vec![second.cert_pem]);
    }

    #[test]
    fn serving_cert_names_controller() {
        let now = OffsetDateTime::now_utc();
        let issuer = Issuer::from_records(vec![
            Issuer::generate_root("mesh.local", now).expect("root"),
        ])
        .expect("i");
        let (cert, _key, _) = issuer
            .serving_cert(
                "mesh.local",
                &["ctl.example".into()],
                now,
                Duration::from_secs(60),
            )
            .expect("serving");
        let info = inspect::CertInfo::from_pem(&cert).expect("info");
        assert_eq!(
            info.spiffe_id.as_str(),
            "spiffe://mesh.local/ns/quicmesh-system/sa/controller"
        );
    }
}
