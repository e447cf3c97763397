//! A certificate authority for SPIFFE workload certificates.
//!
//! Two users: `quicmesh ca` (a development CA, so the static mode needs no outside tool) and the
//! controller, which signs CSRs from proxies. Leaves carry exactly one URI SAN, the SPIFFE ID, no DNS names,
//! and are valid for both TLS client and server authentication: every mesh hop is mutual.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::spiffe::SpiffeId;

/// Why the CA could not load, or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA key PEM could not be parsed.
    #[error("CA private key: {0}")]
    Key(rcgen::Error),
    /// The CA certificate PEM could not be parsed.
    #[error("CA certificate: {0}")]
    Certificate(rcgen::Error),
    /// The CSR could not be parsed or its signature does not verify.
    #[error("certificate signing request: {0}")]
    Csr(rcgen::Error),
    /// rcgen refused to build the certificate.
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    /// A SPIFFE URI is not a valid IA5 string.
    #[error("SPIFFE ID cannot be encoded: {0}")]
    San(rcgen::Error),
}

/// A freshly issued leaf with its private key (development CA only; real proxies send CSRs).
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A root CA able to sign workload leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // keep the DER integer positive
    SerialNumber::from_slice(&b)
}

impl CertificateAuthority {
    /// Generates a new self-signed root for `trust_domain`, valid from now until `not_after`.
    pub fn generate(trust_domain: &str, not_after: OffsetDateTime) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "quicmesh");
        dn.push(
            DnType::CommonName,
            format!("quicmesh root for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        params.not_after = not_after;
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a root from its PEM certificate and PKCS#8 PEM key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::Certificate)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The root certificate, PEM: what goes into trust bundles.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn leaf_params(
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.as_str().try_into().map_err(CaError::San)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        Ok(params)
    }

    /// Issues a leaf for `id` with a fresh key pair (development CA).
    pub fn issue(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedLeaf, CaError> {
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let cert = Self::leaf_params(id, not_before, not_after)?
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the public key of a PEM CSR for `id`. Everything the CSR asks for besides its key is ignored:
    /// the caller decides the identity and the lifetime.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        self.sign_csr_params(&csr, id, not_before, not_after)
            .map(|c| c.pem())
    }

    /// [`Self::sign_csr`] for a DER CSR: lets a caller sign exactly the bytes it has checked.
    pub fn sign_csr_der(
        &self,
        csr_der: &rustls::pki_types::CertificateSigningRequestDer<'_>,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_der(csr_der).map_err(CaError::Csr)?;
        self.sign_csr_params(&csr, id, not_before, not_after)
            .map(|c| c.pem())
    }

    /// Signs a CSR already parsed (and so signature-checked: rcgen verifies it while parsing) as a leaf
    /// for `id`: a caller that inspected the CSR first does not pay for a second verification. Returns
    /// the certificate, whose DER a caller can check without decoding its PEM.
    pub fn sign_csr_params(
        &self,
        csr: &CertificateSigningRequestParams,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<rcgen::Certificate, CaError> {
        Self::leaf_params(id, not_before, not_after)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)
    }
}

/// Generates a key pair and a PEM CSR for `id`, returning `(csr_pem, key_pem)`. The key stays with the caller.
pub fn generate_csr(id: &SpiffeId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::Key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(CaError::San)?)];
    let csr = params.serialize_request(&key).map_err(CaError::Sign)?;
    let pem = csr.pem().map_err(CaError::Sign)?;
    Ok((pem, key.serialize_pem()))
}
