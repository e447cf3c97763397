//! Peer certificate verification for both ends of a mesh connection.
//!
//! webpki checks chains and validity, but it only matches DNS names and IP addresses; a mesh peer is named
//! by its SPIFFE URI SAN. These verifiers run the webpki chain check against the live trust bundle, then
//! require exactly one URI SAN, a SPIFFE ID in our trust domain, and a key strong enough to trust (and,
//! when dialling, the identity we expect). Every refusal is logged with its reason and counted, so an
//! operator can tell "wrong CA" from "expired" from "two URI SANs". Which services a verified peer may
//! serve is decided per stream by the caller ([`super::naming`]), not here: one connection to a peer
//! carries streams for every service it serves.

use std::sync::{Arc, RwLock};

use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{
    Credentials, SpiffeId,
    inspect::{CertInfo, InspectError},
};
use crate::{
    metrics::{Direction, RefusalLabels},
    state::StateHandle,
};

/// A SPIFFE-level refusal: the chain was fine but the identity is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityRefusal {
    /// The certificate has no `spiffe://` URI SAN.
    #[error("peer certificate carries no SPIFFE ID")]
    NoSpiffeId,
    /// The certificate has more than one URI SAN.
    #[error("peer certificate carries {0} URI SANs; SPIFFE allows exactly one")]
    UriSanCount(usize),
    /// The SPIFFE URI is malformed (e.g. a `..` segment).
    #[error("peer SPIFFE ID refused: {0}")]
    InvalidSpiffeId(super::SpiffeIdError),
    /// The certificate could not be parsed past the chain check.
    #[error("peer certificate unreadable: {0}")]
    Malformed(String),
    /// The subject key is of a type or size we do not trust.
    #[error("peer key {0} is not accepted (ECDSA P-256/P-384, Ed25519 or RSA >= 2048 only)")]
    WeakKey(super::inspect::KeyType),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("peer identity {0} is outside trust domain {1}")]
    WrongTrustDomain(SpiffeId, String),
    /// The controller revoked this identity.
    #[error("peer identity {0} is revoked")]
    Revoked(SpiffeId),
    /// The peer is not the identity this connection was meant for.
    #[error("peer identity {0} is not the expected {1}")]
    UnexpectedIdentity(SpiffeId, SpiffeId),
}

impl IdentityRefusal {
    fn reason(&self) -> &'static str {
        match self {
            Self::NoSpiffeId => "no_spiffe_id",
            Self::UriSanCount(_) => "multiple_uri_sans",
            Self::InvalidSpiffeId(_) => "invalid_spiffe_id",
            Self::Malformed(_) => "invalid_certificate",
            Self::WeakKey(_) => "weak_key",
            Self::WrongTrustDomain(..) => "wrong_trust_domain",
            Self::UnexpectedIdentity(..) => "unexpected_identity",
            Self::Revoked(..) => "revoked_identity",
        }
    }
}

/// The counter label for a rustls verification error.
pub fn refusal_reason(err: &Error) -> &'static str {
    match err {
        Error::InvalidCertificate(c) => match c {
            // A chain whose signature does not verify was made by another CA (one with the same name,
            // e.g.): to an operator, the same as an unknown one.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::Other(o) => match o.0.downcast_ref::<IdentityRefusal>() {
                Some(r) => r.reason(),
                None => "invalid_certificate",
            },
            _ => "invalid_certificate",
        },
        Error::NoCertificatesPresented => "no_certificate",
        _ => "other",
    }
}

fn refuse(r: IdentityRefusal) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(r))))
}

/// Checks the SPIFFE ID of an already chain-verified leaf.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    creds: &Credentials,
    state: &StateHandle,
    expected: Option<&SpiffeId>,
) -> Result<SpiffeId, Error> {
    let trust_domain = creds.trust_domain();
    let info = CertInfo::from_der(end_entity).map_err(|e| {
        refuse(match e {
            InspectError::NoSpiffeId => IdentityRefusal::NoSpiffeId,
            InspectError::UriSanCount(n) => IdentityRefusal::UriSanCount(n),
            InspectError::Spiffe(e) => IdentityRefusal::InvalidSpiffeId(e),
            e => IdentityRefusal::Malformed(e.to_string()),
        })
    })?;
    if !info.key.acceptable_for_peers() {
        return Err(refuse(IdentityRefusal::WeakKey(info.key)));
    }
    let id = info.spiffe_id;
    if state.load().is_revoked(&id) {
        return Err(refuse(IdentityRefusal::Revoked(id)));
    }
    if id.trust_domain() != trust_domain {
        return Err(refuse(IdentityRefusal::WrongTrustDomain(
            id,
            trust_domain.to_owned(),
        )));
    }
    if let Some(want) = expected
        && *want != id
    {
        return Err(refuse(IdentityRefusal::UnexpectedIdentity(
            id,
            want.clone(),
        )));
    }
    Ok(id)
}

#[derive(Debug)]
struct Shared {
    creds: Credentials,
    state: StateHandle,
    provider: Arc<CryptoProvider>,
    refusals: Family<RefusalLabels, Counter>,
    direction: Direction,
}

impl Shared {
    fn count<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            let reason = refusal_reason(e);
            tracing::warn!(direction = ?self.direction, reason, error = %e, "peer certificate refused");
            self.refusals
                .get_or_create(&RefusalLabels {
                    direction: self.direction,
                    reason,
                })
                .inc();
        }
        r
    }
}

/// Verifies the server a proxy dials: chain to the trust bundle, SPIFFE ID in our trust domain, and the
/// expected identity when the caller pinned one.
#[derive(Debug)]
pub struct PeerServerVerifier {
    shared: Shared,
    expected: Option<SpiffeId>,
}

impl PeerServerVerifier {
    /// A verifier for connections dialled with `creds`; `state` names the revoked identities.
    pub fn new(
        creds: Credentials,
        state: StateHandle,
        provider: Arc<CryptoProvider>,
        refusals: Family<RefusalLabels, Counter>,
        expected: Option<SpiffeId>,
    ) -> Self {
        Self {
            shared: Shared {
                creds,
                state,
                provider,
                refusals,
                direction: Direction::Outbound,
            },
            expected,
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let s = &self.shared;
        s.count((|| {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &s.creds.roots(),
                intermediates,
                now,
                s.provider.signature_verification_algorithms.all,
            )?;
            check_identity(end_entity, &s.creds, &s.state, self.expected.as_ref())?;
            Ok(ServerCertVerified::assertion())
        })())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.shared.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.shared.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.shared
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the clients of the inbound endpoint: client certificates are mandatory, chained to the live
/// trust bundle, with a SPIFFE ID in our trust domain.
#[derive(Debug)]
pub struct PeerClientVerifier {
    shared: Shared,
    /// webpki's verifier for the current roots, rebuilt when the bundle changes.
    cached: RwLock<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
}

impl PeerClientVerifier {
    /// A verifier for the inbound endpoint of `creds`; `state` names the revoked identities.
    pub fn new(
        creds: Credentials,
        state: StateHandle,
        provider: Arc<CryptoProvider>,
        refusals: Family<RefusalLabels, Counter>,
    ) -> Result<Self, Error> {
        let roots = creds.roots();
        let inner = build_client_verifier(&roots, &provider)?;
        Ok(Self {
            shared: Shared {
                creds,
                state,
                provider,
                refusals,
                direction: Direction::Inbound,
            },
            cached: RwLock::new((roots, inner)),
        })
    }

    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let roots = self.shared.creds.roots();
        {
            let c = self.cached.read().unwrap_or_else(|p| p.into_inner());
            if Arc::ptr_eq(&c.0, &roots) {
                return Ok(c.1.clone());
            }
        }
        let v = build_client_verifier(&roots, &self.shared.provider)?;
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = (roots, v.clone());
        Ok(v)
    }
}

fn build_client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::General(format!("trust bundle unusable: {e}")))
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; our clients have one certificate and present it regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let s = &self.shared;
        s.count((|| {
            self.inner()?
                .verify_client_cert(end_entity, intermediates, now)?;
            check_identity(end_entity, &s.creds, &s.state, None)?;
            Ok(ClientCertVerified::assertion())
        })())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.shared.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.shared.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.shared
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
