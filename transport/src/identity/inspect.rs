//! Reading what a certificate says about itself: its SPIFFE ID, validity window and serial.
//!
//! The controller needs this to record issued certificates and report expiry, and a proxy needs it to
//! schedule renewal; both only hold PEM or DER bytes. Parsing is strict: a certificate with no SPIFFE URI
//! SAN, or with more than one, is not a mesh workload certificate.

use time::OffsetDateTime;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

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
    /// The certificate has no URI SAN, or more than one SPIFFE URI SAN.
    #[error("certificate must carry exactly one spiffe:// URI SAN, found {0}")]
    SanCount(usize),
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
        let mut ids = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    ids.push(*uri);
                }
            }
        }
        let [uri] = ids.as_slice() else {
            return Err(InspectError::SanCount(ids.len()));
        };
        let validity = cert.validity();
        Ok(Self {
            spiffe_id: uri.parse()?,
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            serial_hex: cert.raw_serial_as_string().replace(':', ""),
            issuer: cert.issuer().to_string(),
        })
    }
}

/// The DER bytes of the first `CERTIFICATE` block in `pem`.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, InspectError> {
    let mut reader = pem.as_bytes();
    match rustls_pemfile::certs(&mut reader).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(InspectError::Malformed(e.to_string())),
        None => Err(InspectError::NoPem),
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
        assert!(info.issuer.contains("quicmesh root"));
        // A root has no SPIFFE ID.
        assert!(matches!(
            CertInfo::from_pem(ca.cert_pem()),
            Err(InspectError::SanCount(0))
        ));
        assert!(not_after_of_pem(ca.cert_pem()).is_ok());
        assert!(matches!(
            CertInfo::from_pem("junk"),
            Err(InspectError::NoPem)
        ));
    }
}
