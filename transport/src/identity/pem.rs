//! The one PEM reader of the project: certificates, private keys, and single blocks (CSRs).
//!
//! Every PEM input — certificate and key files, trust bundles, CSRs, the controller's serving
//! credentials — goes through these functions, so a malformed file gets the same error everywhere and no
//! two readers can disagree about which block of a file counts.

use rustls::pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject, SectionKind},
};

/// Why PEM text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// The PEM framing or its base64 is broken.
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// No block of the wanted kind.
    #[error("no PEM {0} block found")]
    Missing(&'static str),
    /// A single block of one kind was wanted; the text holds something else or more.
    #[error("expected exactly one PEM {expected} block, found {found}")]
    NotSole {
        /// The label wanted.
        expected: &'static str,
        /// What was found instead.
        found: String,
    },
}

fn malformed(e: pem::Error) -> PemError {
    PemError::Malformed(e.to_string())
}

/// Every `CERTIFICATE` block, in order; at least one.
pub fn certs(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed)?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

/// The first `CERTIFICATE` block.
pub fn first_cert(text: &[u8]) -> Result<CertificateDer<'static>, PemError> {
    match CertificateDer::pem_slice_iter(text).next() {
        Some(r) => r.map_err(malformed),
        None => Err(PemError::Missing("CERTIFICATE")),
    }
}

/// The first private key block (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(text: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(text).map_err(|e| match e {
        pem::Error::NoItemsFound => PemError::Missing("PRIVATE KEY"),
        e => malformed(e),
    })
}

/// The DER of the only block in `text`, which must be of `kind` (e.g. a CSR: what is checked is
/// exactly what gets signed, never a second block another reader might pick).
pub fn sole_block(text: &[u8], kind: SectionKind) -> Result<Vec<u8>, PemError> {
    let label = label(kind);
    let mut blocks = <(SectionKind, Vec<u8>)>::pem_slice_iter(text);
    let (found, der) = match blocks.next() {
        Some(r) => r.map_err(malformed)?,
        None => return Err(PemError::Missing(label)),
    };
    if found != kind {
        return Err(PemError::NotSole {
            expected: label,
            found: format!("a {} block", self::label(found)),
        });
    }
    if blocks.next().is_some() {
        return Err(PemError::NotSole {
            expected: label,
            found: "more than one block".into(),
        });
    }
    Ok(der)
}

fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::Crl => "X509 CRL",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSR: &str =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAEC\n-----END CERTIFICATE REQUEST-----\n";
    const CRL: &str = "-----BEGIN X509 CRL-----\nAAEC\n-----END X509 CRL-----\n";

    #[test]
    fn sole_block_wants_exactly_one_of_its_kind() {
        assert_eq!(
            sole_block(CSR.as_bytes(), SectionKind::Csr),
            Ok(vec![0, 1, 2])
        );
        assert!(matches!(
            sole_block(format!("{CRL}{CSR}").as_bytes(), SectionKind::Csr),
            Err(PemError::NotSole { .. })
        ));
        assert!(matches!(
            sole_block(format!("{CSR}{CSR}").as_bytes(), SectionKind::Csr),
            Err(PemError::NotSole { .. })
        ));
        assert_eq!(
            sole_block(b"junk", SectionKind::Csr),
            Err(PemError::Missing("CERTIFICATE REQUEST"))
        );
    }

    #[test]
    fn missing_and_malformed_are_told_apart() {
        assert_eq!(certs(b"junk"), Err(PemError::Missing("CERTIFICATE")));
        assert!(matches!(
            certs(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
            Err(PemError::Malformed(_))
        ));
        assert_eq!(
            private_key(CSR.as_bytes()),
            Err(PemError::Missing("PRIVATE KEY"))
        );
    }
}
