//! Kubernetes bootstrap: a proxy proves its workload identity with the projected service-account token
//! the kubelet mounts into its pod (a JWT whose audience is this controller), instead of a join token.
//!
//! The controller verifies the token offline against the cluster's service-account issuer keys, given as
//! a JWKS file (what `kubectl get --raw /openid/v1/jwks` prints): no call to the API server, so the
//! controller needs no cluster credentials and a bootstrap does not depend on the API server being up.
//! Or the keys are fetched from the issuer's discovery document ([`crate::oidc`]) and follow its
//! rotations; either way the last good keys stay when a new read fails.
//! [`Verifier::verify`] is a pure function of the token, the keys and the time: signature (RS256 or
//! ES256 only; `none` and every other algorithm are refused before any key is looked at), issuer,
//! audience, expiry and not-before with a small leeway. The token's namespace and service account
//! (the `kubernetes.io` claim, or `sub = system:serviceaccount:NS:SA`; both must agree when both are
//! there) become `spiffe://<td>/ns/NS/sa/SA`, the only identity the certificate is issued for.
//!
//! JWT crates were considered: jsonwebtoken's releases sign and verify with aws-lc-rs or the RustCrypto
//! `rsa` crate only, and ring is this project's one crypto provider, so the two signature checks are
//! ring's (`RSA_PKCS1_2048_8192_SHA256`, `ECDSA_P256_SHA256_FIXED`) and the rest is serde_json.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use base64::Engine;
use quicmesh_transport::identity::SpiffeId;
use ring::signature;
use serde::Deserialize;

/// Longest token looked at (Kubernetes tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 8192;
/// Largest JWKS file read.
const MAX_JWKS_LEN: u64 = 1 << 20;
/// Clock skew allowed on `exp`, `nbf` and `iat`, seconds.
pub const LEEWAY_SECS: i64 = 30;

/// Why a service-account token is refused. Each reason names what was wrong, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts with JSON header and claims.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// An algorithm other than RS256 and ES256 (`none` included).
    #[error("algorithm {0:?} is not accepted (RS256 or ES256 only)")]
    Algorithm(String),
    /// No key of the JWKS has the token's `kid` (or, without one, the token's key type).
    #[error("no issuer key for kid {0:?}")]
    UnknownKey(String),
    /// The signature does not verify with the issuer's key.
    #[error("signature does not verify")]
    Signature,
    /// `iss` is not the configured issuer.
    #[error("issuer {0:?} is not the configured one")]
    Issuer(String),
    /// No `aud` entry is an accepted audience.
    #[error("audience {0:?} is not this controller's")]
    Audience(Vec<String>),
    /// `exp` is past (or missing).
    #[error("expired")]
    Expired,
    /// `nbf` or `iat` is in the future.
    #[error("not valid yet")]
    NotYetValid,
    /// The claims name no service account, or two that disagree, or one that is not a valid SPIFFE
    /// path segment.
    #[error("service account: {0}")]
    ServiceAccount(String),
    /// The issuer's keys could not be fetched (discovery) and none are held.
    #[error("issuer keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// Why a JWKS file is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct JwksError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

/// One verification key of the issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Key id (`kid`), matched against the token header's.
    pub kid: Option<String>,
    /// The public key.
    pub material: KeyMaterial,
}

/// Public key material of the two accepted algorithms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// RSA modulus and exponent, big-endian without leading zeros (RS256).
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point, `04 || x || y` (ES256).
    P256(Vec<u8>),
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let z = v.iter().take_while(|b| **b == 0).count();
    v.drain(..z.min(v.len().saturating_sub(1)));
    v
}

/// Parses a JWKS document: RSA and P-256 signing keys; keys for encryption or of other types are
/// skipped (a cluster may publish them), a malformed RSA or EC key is an error.
pub fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let raw: RawJwks = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        if k.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let bad = |what: &str| format!("keys[{i}]: {what}");
        let material = match k.kty.as_str() {
            "RSA" => {
                if k.alg.as_deref().is_some_and(|a| a != "RS256") {
                    continue;
                }
                let n = k.n.as_deref().and_then(b64).ok_or_else(|| bad("bad n"))?;
                let e = k.e.as_deref().and_then(b64).ok_or_else(|| bad("bad e"))?;
                KeyMaterial::Rsa {
                    n: strip_zeros(n),
                    e: strip_zeros(e),
                }
            }
            "EC" => {
                if k.crv.as_deref() != Some("P-256")
                    || k.alg.as_deref().is_some_and(|a| a != "ES256")
                {
                    continue;
                }
                let x = k.x.as_deref().and_then(b64).ok_or_else(|| bad("bad x"))?;
                let y = k.y.as_deref().and_then(b64).ok_or_else(|| bad("bad y"))?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(bad("x and y must be 32 bytes for P-256"));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::P256(point)
            }
            _ => continue,
        };
        keys.push(Key {
            kid: k.kid,
            material,
        });
    }
    if keys.is_empty() {
        return Err("no RS256 or ES256 signing key".into());
    }
    Ok(keys)
}

/// The service account a token was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Service account name.
    pub name: String,
}

impl ServiceAccount {
    /// `spiffe://<td>/ns/<namespace>/sa/<name>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, TokenError> {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.name
        )
        .parse()
        .map_err(|e| TokenError::ServiceAccount(format!("not a valid SPIFFE ID: {e}")))
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct KubernetesClaim {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    serviceaccount: Option<NamedClaim>,
}

#[derive(Deserialize)]
struct NamedClaim {
    name: String,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

/// What a token must match: the issuer, the accepted audiences, the issuer's keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Expected `iss`.
    pub issuer: String,
    /// Accepted `aud` values (one must be present in the token).
    pub audiences: Vec<String>,
    /// The issuer's keys.
    pub keys: Vec<Key>,
}

impl Verifier {
    /// Verifies `token` at `now` (Unix seconds) and returns the service account it names.
    pub fn verify(&self, token: &str, now: i64) -> Result<ServiceAccount, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 8 KiB"));
        }
        let mut parts = token.trim().split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };
        let header: Header = b64(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("header is not base64url JSON"))?;
        let alg = match header.alg.as_str() {
            "RS256" | "ES256" => header.alg.as_str(),
            other => return Err(TokenError::Algorithm(other.to_owned())),
        };
        let sig = b64(s).ok_or(TokenError::Malformed("signature is not base64url"))?;
        let signed = &token.trim().as_bytes()[..h.len() + 1 + c.len()];
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .filter(|k| {
                matches!(
                    (alg, &k.material),
                    ("RS256", KeyMaterial::Rsa { .. }) | ("ES256", KeyMaterial::P256(_))
                )
            })
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey(header.kid.unwrap_or_default()));
        }
        let verified = candidates.iter().any(|k| match &k.material {
            KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                .is_ok(),
            KeyMaterial::P256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, &sig)
                    .is_ok()
            }
        });
        if !verified {
            return Err(TokenError::Signature);
        }
        // Only now, with the issuer's signature checked, are the claims worth reading.
        let claims: Claims = b64(c)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("claims are not base64url JSON"))?;
        let iss = claims.iss.unwrap_or_default();
        if iss != self.issuer {
            return Err(TokenError::Issuer(iss));
        }
        let aud = match claims.aud {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(v)) => v,
            None => Vec::new(),
        };
        if !aud.iter().any(|a| self.audiences.contains(a)) {
            return Err(TokenError::Audience(aud));
        }
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(LEEWAY_SECS) => {}
            _ => return Err(TokenError::Expired),
        }
        if [claims.nbf, claims.iat]
            .into_iter()
            .flatten()
            .any(|t| t > now.saturating_add(LEEWAY_SECS))
        {
            return Err(TokenError::NotYetValid);
        }
        service_account(claims.sub.as_deref(), claims.kubernetes)
    }
}

/// The service account named by `sub` and the `kubernetes.io` claim; both must agree when both name one.
fn service_account(
    sub: Option<&str>,
    k8s: Option<KubernetesClaim>,
) -> Result<ServiceAccount, TokenError> {
    let from_sub = sub
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .map(|rest| {
            rest.split_once(':')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
                .map(|(ns, sa)| ServiceAccount {
                    namespace: ns.to_owned(),
                    name: sa.to_owned(),
                })
                .ok_or_else(|| {
                    TokenError::ServiceAccount("sub is not system:serviceaccount:NS:SA".into())
                })
        })
        .transpose()?;
    let from_claim = k8s.and_then(|k| match (k.namespace, k.serviceaccount) {
        (Some(namespace), Some(sa)) => Some(ServiceAccount {
            namespace,
            name: sa.name,
        }),
        _ => None,
    });
    match (from_sub, from_claim) {
        (Some(a), Some(b)) if a != b => Err(TokenError::ServiceAccount(
            "sub and the kubernetes.io claim name different accounts".into(),
        )),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Err(TokenError::ServiceAccount(
            "the token names no service account".into(),
        )),
    }
}

/// Where the issuer's keys come from.
#[derive(Debug)]
enum KeySource {
    /// A JWKS file, re-read when its modification time changes (what an operator or a sync job keeps
    /// current), with the keys of the last good read.
    File {
        path: PathBuf,
        current: Mutex<(Option<SystemTime>, Arc<Vec<Key>>)>,
    },
    /// The issuer's discovery document, fetched over HTTPS ([`crate::oidc`]).
    Discovery(Box<crate::oidc::Discovery>),
}

/// The controller's Kubernetes token settings and the issuer's current keys.
#[derive(Debug)]
pub struct TokenAuthority {
    source: KeySource,
    issuer: String,
    audiences: Vec<String>,
}

fn read_jwks(path: &Path) -> Result<(Option<SystemTime>, Vec<Key>), JwksError> {
    let err = |problem: String| JwksError {
        path: path.to_owned(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_JWKS_LEN {
        return Err(err("larger than 1 MiB".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let keys = parse_jwks(&text).map_err(err)?;
    Ok((meta.modified().ok(), keys))
}

fn check_settings(issuer: &str, audiences: &[String]) -> Result<(), String> {
    if issuer.is_empty() || audiences.iter().all(String::is_empty) {
        return Err("an issuer and at least one audience are needed".into());
    }
    Ok(())
}

impl TokenAuthority {
    /// Reads the JWKS file; fails start-up if it is unusable.
    pub fn load(jwks: PathBuf, issuer: String, audiences: Vec<String>) -> Result<Self, JwksError> {
        check_settings(&issuer, &audiences).map_err(|problem| JwksError {
            path: jwks.clone(),
            problem,
        })?;
        let (mtime, keys) = read_jwks(&jwks)?;
        Ok(Self {
            source: KeySource::File {
                path: jwks,
                current: Mutex::new((mtime, Arc::new(keys))),
            },
            issuer,
            audiences,
        })
    }

    /// Keys from the issuer's discovery document; nothing is fetched until the first token (or
    /// [`TokenAuthority::prefetch`]).
    pub fn discover(
        discovery: crate::oidc::Discovery,
        issuer: String,
        audiences: Vec<String>,
    ) -> Result<Self, String> {
        check_settings(&issuer, &audiences)?;
        Ok(Self {
            source: KeySource::Discovery(Box::new(discovery)),
            issuer,
            audiences,
        })
    }

    /// Fetches discovered keys now (at start-up, so a wrong CA or URL shows in the log at once).
    pub async fn prefetch(&self) {
        if let KeySource::Discovery(d) = &self.source {
            let _ = d.keys(false).await;
        }
    }

    /// Verifies a token with the issuer's current keys. With discovered keys, a token naming a key id
    /// they lack makes them fetched again (at most every [`crate::oidc::MIN_REFETCH`]), then it is
    /// verified once more.
    pub async fn verify(&self, token: &str, now: i64) -> Result<ServiceAccount, TokenError> {
        let first = self.verifier(self.keys(false).await?).verify(token, now);
        match (&self.source, first) {
            (KeySource::Discovery(_), Err(TokenError::UnknownKey(_))) => {
                self.verifier(self.keys(true).await?).verify(token, now)
            }
            (_, result) => result,
        }
    }

    fn verifier(&self, keys: Arc<Vec<Key>>) -> Verifier {
        Verifier {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            keys: keys.as_ref().clone(),
        }
    }

    /// The current keys: the file is read again when its modification time changed (if it is unusable
    /// now, the last good keys stay and the problem is logged); discovered keys as [`crate::oidc`] plans.
    async fn keys(&self, unknown_kid: bool) -> Result<Arc<Vec<Key>>, TokenError> {
        match &self.source {
            KeySource::Discovery(d) => d
                .keys(unknown_kid)
                .await
                .map_err(|e| TokenError::KeysUnavailable(e.to_string())),
            KeySource::File { path, current } => {
                let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
                let mtime = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
                if mtime.is_some() && mtime != cur.0 {
                    match read_jwks(path) {
                        Ok((m, keys)) => {
                            tracing::info!(jwks = %path.display(), keys = keys.len(), "service-account issuer keys reloaded");
                            *cur = (m, Arc::new(keys));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot reload the service-account issuer keys; keeping the last good ones");
                            cur.0 = mtime;
                        }
                    }
                }
                Ok(cur.1.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
    };

    use super::*;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const NOW: i64 = 1_800_000_000;

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A P-256 signer and its JWKS entry.
    fn ec_key(kid: &str) -> (EcdsaKeyPair, Key) {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("gen");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let key = Key {
            kid: Some(kid.into()),
            material: KeyMaterial::P256(pair.public_key().as_ref().to_vec()),
        };
        (pair, key)
    }

    fn sign(pair: &EcdsaKeyPair, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let msg = format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let sig = pair
            .sign(&SystemRandom::new(), msg.as_bytes())
            .expect("sign");
        format!("{msg}.{}", enc(sig.as_ref()))
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({
            "iss": ISS,
            "aud": ["quicmesh"],
            "exp": NOW + 600,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "sub": "system:serviceaccount:shop:web",
            "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web", "uid": "u"}},
        })
    }

    fn verifier(keys: Vec<Key>) -> Verifier {
        Verifier {
            issuer: ISS.into(),
            audiences: vec!["quicmesh".into()],
            keys,
        }
    }

    #[test]
    fn a_valid_token_names_its_service_account() {
        let (pair, key) = ec_key("k1");
        let v = verifier(vec![key]);
        let t = sign(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k1"}),
            &claims(),
        );
        let sa = v.verify(&t, NOW).expect("valid");
        assert_eq!(
            sa,
            ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            }
        );
        assert_eq!(
            sa.spiffe_id("mesh.local").expect("id").to_string(),
            "spiffe://mesh.local/ns/shop/sa/web"
        );
        // A single-string audience and only the sub claim work too; no kid tries every key.
        let mut c = claims();
        c["aud"] = "quicmesh".into();
        c.as_object_mut().expect("object").remove("kubernetes.io");
        let t = sign(&pair, &serde_json::json!({"alg": "ES256"}), &c);
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn every_claim_is_checked() {
        let (pair, key) = ec_key("k1");
        let v = verifier(vec![key]);
        let h = serde_json::json!({"alg": "ES256", "kid": "k1"});
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            f(&mut c);
            v.verify(&sign(&pair, &h, &c), NOW)
        };
        assert_eq!(
            with(&|c| c["exp"] = (NOW - LEEWAY_SECS - 1).into()),
            Err(TokenError::Expired)
        );
        assert!(
            with(&|c| c["exp"] = (NOW - 5).into()).is_ok(),
            "within leeway"
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().expect("o").remove("exp");
            }),
            Err(TokenError::Expired)
        );
        assert_eq!(
            with(&|c| c["nbf"] = (NOW + 120).into()),
            Err(TokenError::NotYetValid)
        );
        assert!(matches!(
            with(&|c| c["aud"] = serde_json::json!(["https://kubernetes.default.svc"])),
            Err(TokenError::Audience(_))
        ));
        assert!(matches!(
            with(&|c| c["iss"] = "https://evil.example".into()),
            Err(TokenError::Issuer(_))
        ));
        assert!(matches!(
            with(&|c| c["sub"] = "system:serviceaccount:shop:admin".into()),
            Err(TokenError::ServiceAccount(_))
        ));
        assert!(matches!(
            with(&|c| {
                c["sub"] = "system:node:n1".into();
                c.as_object_mut().expect("o").remove("kubernetes.io");
            }),
            Err(TokenError::ServiceAccount(_))
        ));
        assert!(matches!(
            with(&|c| {
                c["sub"] = "system:serviceaccount:shop:we/b".into();
                c.as_object_mut().expect("o").remove("kubernetes.io");
            })
            .and_then(|sa| sa.spiffe_id("mesh.local")),
            Err(TokenError::ServiceAccount(_))
        ));
    }

    #[test]
    fn forged_unsigned_and_foreign_tokens_are_refused() {
        let (pair, key) = ec_key("k1");
        let (other, _) = ec_key("k1");
        let v = verifier(vec![key]);
        let h = serde_json::json!({"alg": "ES256", "kid": "k1"});
        // Signed by another key under the same kid.
        assert_eq!(
            v.verify(&sign(&other, &h, &claims()), NOW),
            Err(TokenError::Signature)
        );
        // Claims changed after signing.
        let t = sign(&pair, &h, &claims());
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c["sub"] = "system:serviceaccount:kube-system:admin".into();
        parts[1] = enc(c.to_string().as_bytes());
        assert_eq!(v.verify(&parts.join("."), NOW), Err(TokenError::Signature));
        // alg none, with or without a signature part.
        let none = format!(
            "{}.{}.",
            enc(br#"{"alg":"none"}"#),
            enc(claims().to_string().as_bytes())
        );
        assert_eq!(
            v.verify(&none, NOW),
            Err(TokenError::Algorithm("none".into()))
        );
        // HS256 (the classic confusion with a public key as HMAC secret) and an RS256 token for which
        // the issuer has only an EC key.
        assert!(matches!(
            v.verify(
                &sign(&pair, &serde_json::json!({"alg": "HS256"}), &claims()),
                NOW
            ),
            Err(TokenError::Algorithm(_))
        ));
        assert!(matches!(
            v.verify(
                &sign(
                    &pair,
                    &serde_json::json!({"alg": "RS256", "kid": "k1"}),
                    &claims()
                ),
                NOW
            ),
            Err(TokenError::UnknownKey(_))
        ));
        assert!(matches!(
            v.verify(
                &sign(
                    &pair,
                    &serde_json::json!({"alg": "ES256", "kid": "k2"}),
                    &claims()
                ),
                NOW
            ),
            Err(TokenError::UnknownKey(_))
        ));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.##",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(v.verify(bad, NOW), Err(TokenError::Malformed(_))),
                "{bad:.20}"
            );
        }
    }

    #[test]
    fn jwks_keys_are_read_and_checked() {
        let (_, key) = ec_key("k1");
        let KeyMaterial::P256(point) = &key.material else {
            panic!("ec")
        };
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
             "x": enc(&point[1..33]), "y": enc(&point[33..])},
            {"kty": "RSA", "kid": "r1", "n": enc(&[0, 0xc3, 0x01]), "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "kid": "skip", "x": "AA", "y": "AA"},
            {"kty": "RSA", "use": "enc", "kid": "skip2", "n": "AA", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
        ]});
        let keys = parse_jwks(&doc.to_string()).expect("jwks");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], key);
        assert_eq!(
            keys[1].material,
            KeyMaterial::Rsa {
                n: vec![0xc3, 0x01],
                e: vec![1, 0, 1]
            }
        );
        assert!(parse_jwks(r#"{"keys": []}"#).is_err());
        assert!(parse_jwks(r#"{"keys": [{"kty": "RSA", "n": "%%", "e": "AQAB"}]}"#).is_err());
        assert!(parse_jwks("not json").is_err());
    }
}
