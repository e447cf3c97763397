//! Reading what a certificate says about itself: its SPIFFE ID, validity window and serial.
//!
//! The controller needs this to record issued certificates and report expiry, and a proxy needs it to
//! schedule renewal; both only hold PEM or DER bytes. Parsing is strict, as the SPIFFE X.509 profile
//! asks: a workload certificate carries exactly one URI SAN, and it is a SPIFFE ID; no SPIFFE URI, a
//! second URI beside it, or a malformed ID each get their own error, so refusals say which it was.
//! The key type is read too ([`KeyType`]): the verifiers refuse keys too weak to trust.

use std::fmt;

use time::OffsetDateTime;
use x509_parser::{
    extensions::GeneralName,
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
    },
    prelude::FromDer,
    x509::SubjectPublicKeyInfo,
};

use super::spiffe::SpiffeId;

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The input holds no PEM `CERTIFICATE` block.
    #[error("no PEM certificate found")]
    NoPem,
    /// The PEM or DER encoding is broken.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The certificate has no `spiffe://` URI SAN.
    #[error("certificate carries no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate has more than one URI SAN (SPIFFE or not); the SPIFFE profile allows one.
    #[error("certificate carries {0} URI SANs; a SPIFFE certificate carries exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a quicmesh SPIFFE ID.
    #[error(transparent)]
    Spiffe(#[from] super::spiffe::SpiffeIdError),
}

/// What a workload certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The one SPIFFE ID in the URI SANs.
    pub spiffe_id: SpiffeId,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number, lowercase hex without separators.
    pub serial_hex: String,
    /// Issuer distinguished name, RFC 4514 text.
    pub issuer: String,
    /// The subject's public key type.
    pub key: KeyType,
}

/// The type of a subject public key, as far as a mesh needs to tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// ECDSA on NIST P-521.
    EcdsaP521,
    /// ECDSA on secp256k1.
    EcdsaSecp256k1,
    /// ECDSA on another named curve (its OID).
    EcdsaOther(String),
    /// Ed25519.
    Ed25519,
    /// Ed448.
    Ed448,
    /// RSA with this modulus size in bits.
    Rsa(usize),
    /// Any other algorithm (its OID).
    Other(String),
}

impl KeyType {
    /// Classifies a SubjectPublicKeyInfo (of a certificate or a CSR).
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Self {
        let alg = &spki.algorithm;
        if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => Self::EcdsaP256,
                Some(c) if c == OID_NIST_EC_P384 => Self::EcdsaP384,
                Some(c) if c == OID_NIST_EC_P521 => Self::EcdsaP521,
                Some(c) if c.to_id_string() == "1.3.132.0.10" => Self::EcdsaSecp256k1,
                Some(c) => Self::EcdsaOther(c.to_id_string()),
                None => Self::EcdsaOther("(no named curve)".into()),
            };
        }
        if alg.algorithm == OID_SIG_ED25519 {
            return Self::Ed25519;
        }
        if alg.algorithm == OID_SIG_ED448 {
            return Self::Ed448;
        }
        if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
            return Self::Rsa(spki.parsed().map_or(0, |k| k.key_size()));
        }
        Self::Other(alg.algorithm.to_id_string())
    }

    /// Whether a peer presenting this key is trusted with mesh traffic: ECDSA P-256/P-384, Ed25519, or
    /// RSA of at least 2048 bits (what the TLS stack verifies; anything weaker is refused by name).
    pub fn acceptable_for_peers(&self) -> bool {
        match self {
            Self::EcdsaP256 | Self::EcdsaP384 | Self::Ed25519 => true,
            Self::Rsa(bits) => *bits >= 2048,
            _ => false,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::EcdsaP521 => f.write_str("ECDSA P-521"),
            Self::EcdsaSecp256k1 => f.write_str("ECDSA secp256k1"),
            Self::EcdsaOther(oid) => write!(f, "ECDSA on curve {oid}"),
            Self::Ed25519 => f.write_str("Ed25519"),
            Self::Ed448 => f.write_str("Ed448"),
            Self::Rsa(bits) => write!(f, "RSA-{bits}"),
            Self::Other(oid) => write!(f, "key algorithm {oid}"),
        }
    }
}

impl CertInfo {
    /// Reads the first `CERTIFICATE` block of a PEM string.
    pub fn from_pem(pem: &str) -> Result<Self, InspectError> {
        let der = first_cert_der(pem)?;
        Self::from_der(&der)
    }

    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, InspectError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| InspectError::Malformed(e.to_string()))?;
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
        if !uris.iter().any(|u| u.starts_with("spiffe://")) {
            return Err(InspectError::NoSpiffeId);
        }
        let [uri] = uris.as_slice() else {
            return Err(InspectError::UriSanCount(uris.len()));
        };
        let validity = cert.validity();
        Ok(Self {
            spiffe_id: uri.parse()?,
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            serial_hex: cert.raw_serial_as_string().replace(':', ""),
            issuer: cert.issuer().to_string(),
            key: KeyType::of_spki(cert.public_key()),
        })
    }
}

/// The DER bytes of the first `CERTIFICATE` block in `pem`.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, InspectError> {
    match super::pem::first_cert(pem.as_bytes()) {
        Ok(der) => Ok(der.to_vec()),
        Err(super::pem::PemError::Missing(_)) => Err(InspectError::NoPem),
        Err(e) => Err(InspectError::Malformed(e.to_string())),
    }
}

/// Validity end of a certificate without a SPIFFE ID (a root CA), from PEM.
pub fn not_after_of_pem(pem: &str) -> Result<OffsetDateTime, InspectError> {
    let der = first_cert_der(pem)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| InspectError::Malformed(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;

    #[test]
    fn reads_issued_leaf() {
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate("mesh.local", now + time::Duration::days(1))
            .expect("ca");
        let id = SpiffeId::new("mesh.local", "shop", "cart").expect("id");
        let leaf = ca
            .issue(&id, now, now + time::Duration::hours(1))
            .expect("leaf");
        let info = CertInfo::from_pem(&leaf.cert_pem).expect("info");
        assert_eq!(info.spiffe_id, id);
        assert_eq!(
            info.not_after.unix_timestamp(),
            (now + time::Duration::hours(1)).unix_timestamp()
        );
        assert!(!info.serial_hex.is_empty());
        assert_eq!(info.key, KeyType::EcdsaP256);
        assert!(info.key.acceptable_for_peers());
        assert!(info.issuer.contains("quicmesh root"));
        // A root has no SPIFFE ID.
        assert!(matches!(
            CertInfo::from_pem(ca.cert_pem()),
            Err(InspectError::NoSpiffeId)
        ));
        assert!(not_after_of_pem(ca.cert_pem()).is_ok());
        assert!(matches!(
            CertInfo::from_pem("junk"),
            Err(InspectError::NoPem)
        ));
    }
}
