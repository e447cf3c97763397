//! The live credentials of one workload: its certificate, key and trust bundle, swappable at run time.
//!
//! rustls asks the resolver for a certificate on every handshake, so replacing the key here changes what
//! new connections present while established ones keep theirs: certificate rotation drops no stream. The
//! lock is a std `RwLock` held only to clone an `Arc`, never across an await.

use std::sync::{Arc, RwLock};

use rustls::{
    RootCertStore, SignatureScheme,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::spiffe::SpiffeId;

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// No PEM certificate in the input.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// The PEM is malformed.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// The private key is not usable for TLS.
    #[error("unusable private key: {0}")]
    Key(rustls::Error),
    /// The certificate is not valid X.509.
    #[error("malformed certificate: {0}")]
    X509(String),
    /// The leaf does not carry exactly one `spiffe://` URI SAN.
    #[error("certificate carries no SPIFFE ID (a spiffe:// URI SAN)")]
    NoSpiffeId,
    /// The SPIFFE URI SAN is not a quicmesh identity.
    #[error(transparent)]
    SpiffeId(#[from] super::SpiffeIdError),
    /// The certificate's key does not match the private key.
    #[error("certificate and private key do not match")]
    KeyMismatch,
    /// A trust bundle certificate was refused.
    #[error("trust bundle: {0}")]
    Bundle(rustls::Error),
}

/// Parses every certificate of a PEM text.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CredentialsError::NoCertificate);
    }
    Ok(certs)
}

/// What a leaf certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The SPIFFE ID in its URI SAN.
    pub id: SpiffeId,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Reads the SPIFFE ID and validity of a DER certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, CredentialsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CredentialsError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CredentialsError::X509(e.to_string()))?
        .ok_or(CredentialsError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(CredentialsError::NoSpiffeId);
    };
    Ok(LeafInfo {
        id: uri.parse()?,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// Builds a root store from a PEM trust bundle.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, CredentialsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(pem)? {
        roots.add(c).map_err(CredentialsError::Bundle)?;
    }
    Ok(roots)
}

/// One certificate with its key, checked and ready for rustls.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// rustls' form: chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// Identity and validity.
    pub info: LeafInfo,
}

impl Leaf {
    /// Parses a PEM chain (leaf first) and PKCS#8 PEM key, checking that they belong together.
    pub fn from_pem(
        provider: &CryptoProvider,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, CredentialsError> {
        let chain = certs_from_pem(cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| CredentialsError::Pem(e.to_string()))?;
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(CredentialsError::Key)?;
        let info = leaf_info(&chain[0])?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(CredentialsError::KeyMismatch),
        }
        Ok(Self {
            key: Arc::new(certified),
            info,
        })
    }
}

/// The current leaf and trust bundle of a workload. Cloning shares the same state.
#[derive(Debug, Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    trust_domain: String,
    leaf: RwLock<Leaf>,
    roots: RwLock<Arc<RootCertStore>>,
}

impl Credentials {
    /// Credentials from a leaf and a trust bundle; peers must share the leaf's trust domain.
    pub fn new(leaf: Leaf, roots: RootCertStore) -> Self {
        let td = leaf.info.id.trust_domain().to_owned();
        Self::with_trust_domain(leaf, roots, td)
    }

    /// Credentials whose peers must belong to `trust_domain`.
    pub fn with_trust_domain(leaf: Leaf, roots: RootCertStore, trust_domain: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                trust_domain,
                leaf: RwLock::new(leaf),
                roots: RwLock::new(Arc::new(roots)),
            }),
        }
    }

    /// The current leaf.
    pub fn leaf(&self) -> Leaf {
        self.inner
            .leaf
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This workload's identity.
    pub fn id(&self) -> SpiffeId {
        self.leaf().info.id
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The current trust anchors.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner
            .roots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Presents `leaf` on every handshake from now on.
    pub fn set_leaf(&self, leaf: Leaf) {
        *self.inner.leaf.write().unwrap_or_else(|p| p.into_inner()) = leaf;
    }

    /// Trusts `roots` for every handshake from now on.
    pub fn set_roots(&self, roots: RootCertStore) {
        *self.inner.roots.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(roots);
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.leaf().key)
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.leaf().key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}
