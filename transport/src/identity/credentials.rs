//! The live credentials of one workload: its certificate, key and trust bundle, swappable at run time.
//!
//! rustls asks the resolver for a certificate on every handshake, so replacing the key here changes what
//! new connections present while established ones keep theirs: certificate rotation drops no stream. The
//! lock is a std `RwLock` held only to clone an `Arc`, never across an await. In controller mode a proxy
//! starts with no leaf at all ([`Credentials::pending`]): handshakes fail until the first certificate
//! arrives, and [`Credentials::wait_leaf`] tells readiness when it has.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use rustls::{
    RootCertStore, SignatureScheme,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::CertificateDer,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use time::OffsetDateTime;

use super::{
    inspect::{CertInfo, InspectError},
    spiffe::SpiffeId,
};

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
    /// The leaf carries no `spiffe://` URI SAN.
    #[error("certificate carries no SPIFFE ID (a spiffe:// URI SAN)")]
    NoSpiffeId,
    /// The leaf carries more than one URI SAN.
    #[error("certificate carries {0} URI SANs; a SPIFFE certificate carries exactly one")]
    UriSanCount(usize),
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
    super::pem::certs(pem).map_err(|e| match e {
        super::pem::PemError::Missing(_) => CredentialsError::NoCertificate,
        e => CredentialsError::Pem(e.to_string()),
    })
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

/// Reads the SPIFFE ID and validity of a DER certificate (one parser: [`CertInfo`]).
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, CredentialsError> {
    let info = CertInfo::from_der(der).map_err(|e| match e {
        InspectError::NoSpiffeId => CredentialsError::NoSpiffeId,
        InspectError::UriSanCount(n) => CredentialsError::UriSanCount(n),
        InspectError::Spiffe(e) => CredentialsError::SpiffeId(e),
        e => CredentialsError::X509(e.to_string()),
    })?;
    Ok(LeafInfo {
        id: info.spiffe_id,
        not_before: info.not_before,
        not_after: info.not_after,
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
        let key =
            super::pem::private_key(key_pem).map_err(|e| CredentialsError::Pem(e.to_string()))?;
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
    leaf: RwLock<Option<Leaf>>,
    roots: RwLock<Arc<RootCertStore>>,
    /// The namespace of our identity, known once a leaf is held; a renewal keeps the identity, so it is
    /// read without locking or cloning the leaf on the per-stream path.
    namespace: std::sync::OnceLock<Arc<str>>,
    /// Bumped by every `set_leaf`: connections made under an older leaf know they are stale.
    generation: AtomicU64,
    /// Notified on every change of leaf or roots.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Credentials {
    /// Credentials from a leaf and a trust bundle; peers must share the leaf's trust domain.
    pub fn new(leaf: Leaf, roots: RootCertStore) -> Self {
        let td = leaf.info.id.trust_domain().to_owned();
        Self::with_trust_domain(leaf, roots, td)
    }

    /// Credentials whose peers must belong to `trust_domain`.
    pub fn with_trust_domain(leaf: Leaf, roots: RootCertStore, trust_domain: String) -> Self {
        Self::build(Some(leaf), roots, trust_domain)
    }

    /// Credentials still waiting for their first leaf (controller mode): until [`Credentials::set_leaf`],
    /// every handshake fails for want of a certificate.
    pub fn pending(roots: RootCertStore, trust_domain: String) -> Self {
        Self::build(None, roots, trust_domain)
    }

    fn build(leaf: Option<Leaf>, roots: RootCertStore, trust_domain: String) -> Self {
        let namespace = std::sync::OnceLock::new();
        if let Some(l) = &leaf {
            let _ = namespace.set(Arc::from(l.info.id.namespace()));
        }
        Self {
            inner: Arc::new(Inner {
                namespace,
                trust_domain,
                leaf: RwLock::new(leaf),
                roots: RwLock::new(Arc::new(roots)),
                generation: AtomicU64::new(0),
                changed: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// The namespace of our identity, once a leaf is held.
    pub fn namespace(&self) -> Option<Arc<str>> {
        self.inner.namespace.get().cloned()
    }

    /// The current leaf, if one is held yet.
    pub fn leaf(&self) -> Option<Leaf> {
        self.inner
            .leaf
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This workload's identity, once a leaf is held.
    pub fn id(&self) -> Option<SpiffeId> {
        self.leaf().map(|l| l.info.id)
    }

    /// How many times the leaf was replaced; a connection remembers it to notice it predates a rotation.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Resolves once a leaf is held (at once if it already is).
    pub async fn wait_leaf(&self) {
        let mut rx = self.inner.changed.subscribe();
        while self.leaf().is_none() {
            // The sender lives in `self`, so `changed` cannot fail while we wait.
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A receiver notified on every change of leaf or roots.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
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
        self.inner
            .namespace
            .get_or_init(|| Arc::from(leaf.info.id.namespace()));
        *self.inner.leaf.write().unwrap_or_else(|p| p.into_inner()) = Some(leaf);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// Trusts `roots` for every handshake from now on.
    pub fn set_roots(&self, roots: RootCertStore) {
        *self.inner.roots.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(roots);
        self.inner.changed.send_modify(|v| *v += 1);
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.leaf().map(|l| l.key)
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.leaf().map(|l| l.key)
    }

    fn has_certs(&self) -> bool {
        self.leaf().is_some()
    }
}
