//! The controller's resources as plain Rust values, and the rules every one of them must satisfy.
//!
//! The same types are read from YAML by `quicmesh ctl apply`, stored as JSON in sled and mapped to protobuf
//! by the APIs, so validation lives here once, as pure functions: a resource that passes
//! [`Resource::validate`] is safe to store and serve. Errors name the field (`spec.ports[1].port`) and the
//! problem, which is what the admin API returns as `INVALID_ARGUMENT`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    clip::clip,
    identity::{SpiffeId, naming::ServerNames},
};

pub mod pb;

/// Longest leaf lifetime the controller will issue (30 days).
pub const MAX_LEAF_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Longest list (ports, rules, backends, ...) a resource may hold.
pub const MAX_LIST: usize = 256;
/// The namespace and service account of the controller's own serving certificate.
pub const SYSTEM_NAMESPACE: &str = "quicmesh-system";

/// A resource field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.ports[0].port`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The kinds of resources the admin API manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// The singleton trust domain settings.
    TrustDomain,
    /// A workload identity.
    Identity,
    /// A service.
    Service,
    /// A proxy address serving a service.
    Endpoint,
    /// An authorization, rate limit, timeout or traffic split policy.
    Policy,
}

impl Kind {
    /// Every kind, in display order.
    pub const ALL: [Kind; 5] = [
        Kind::TrustDomain,
        Kind::Identity,
        Kind::Service,
        Kind::Endpoint,
        Kind::Policy,
    ];

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::TrustDomain)
    }

    /// The name used in YAML and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TrustDomain => "TrustDomain",
            Kind::Identity => "Identity",
            Kind::Service => "Service",
            Kind::Endpoint => "Endpoint",
            Kind::Policy => "Policy",
        }
    }

    /// Parses a kind as typed on the command line: `service`, `services`, `svc`, `Service`, ...
    pub fn parse_cli(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "trustdomain" | "trustdomains" | "trust-domain" | "td" => Some(Kind::TrustDomain),
            "identity" | "identities" | "id" => Some(Kind::Identity),
            "service" | "services" | "svc" => Some(Kind::Service),
            "endpoint" | "endpoints" | "ep" => Some(Kind::Endpoint),
            "policy" | "policies" | "pol" => Some(Kind::Policy),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Name, namespace and bookkeeping common to every resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Name, unique per kind and namespace.
    pub name: String,
    /// Namespace; empty for cluster-wide kinds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Store revision of the last write (output; on input, 0 or the version the writer last read).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
    /// Creation time, Unix seconds (output only).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub created_unix: i64,
    /// Last update time, Unix seconds (output only).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub updated_unix: i64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// A resource: `kind`, `metadata` and `spec`, the shape of a YAML document for `ctl apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    /// See [`TrustDomainSpec`].
    TrustDomain(Object<TrustDomainSpec>),
    /// See [`IdentitySpec`].
    Identity(Object<IdentitySpec>),
    /// See [`ServiceSpec`].
    Service(Object<ServiceSpec>),
    /// See [`EndpointSpec`].
    Endpoint(Object<EndpointSpec>),
    /// See [`PolicySpec`].
    Policy(Object<PolicySpec>),
}

/// Metadata plus a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object<T> {
    /// Name, namespace, version.
    #[serde(deserialize_with = "mapping")]
    pub metadata: Metadata,
    /// What the resource says.
    #[serde(default, deserialize_with = "mapping")]
    #[serde(bound(deserialize = "T: Deserialize<'de> + Default"))]
    pub spec: T,
}

/// Deserializes a struct from a mapping only. serde also fills structs from sequences, by position, so
/// `metadata: [a, b]` would otherwise become name `a` in namespace `b`.
fn mapping<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(Visitor(std::marker::PhantomData))
}

/// Trust domain settings (singleton `default`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainSpec {
    /// The trust domain, fixed at first start.
    pub trust_domain: String,
    /// Leaf certificate lifetime, seconds.
    pub leaf_ttl_seconds: u64,
}

/// A workload identity; its SPIFFE ID follows from namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Revoked identities get no certificate, and peers refuse them.
    #[serde(default)]
    pub revoked: bool,
    /// When it was revoked, Unix seconds.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub revoked_unix: i64,
    /// Placement: the SPIFFE IDs of the node gateways this identity is placed on. Such a node,
    /// authenticated with its own certificate, may obtain this identity's certificate for the
    /// workload it serves; any other node asking for it is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// The application protocol a service port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1 or HTTP/2.
    Http,
    /// gRPC.
    Grpc,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port number, 1..=65535.
    pub port: u32,
    /// Declared protocol.
    pub protocol: PortProtocol,
    /// Optional name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// A service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// At least one port.
    pub ports: Vec<ServicePort>,
    /// Version labels, targets of traffic splits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// Identities allowed to serve it: service account names in the same namespace or full SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// A proxy address serving a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Service name in the endpoint's namespace.
    pub service: String,
    /// `host:port` of the proxy's QUIC endpoint.
    pub address: String,
    /// The proxy's identity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spiffe_id: String,
    /// Version label of the workload behind it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_version: String,
    /// Relative weight among the endpoints of its version, 1..=10000 (0 or absent: 1).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub weight: u32,
}

/// Enforce or only log authorization decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Would-be denials are logged.
    Audit,
}

/// What happens to a request no rule allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    /// Allowed.
    #[default]
    Allow,
    /// Denied.
    Deny,
}

/// One allow rule; empty lists match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Source SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_identities: Vec<String>,
    /// Source namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_namespaces: Vec<String>,
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// HTTP path prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
}

/// Authorization for a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// Enforce (default) or audit.
    #[serde(default)]
    pub mode: AuthzMode,
    /// Action when no rule matches.
    #[serde(default)]
    pub default_action: AuthzAction,
    /// Allow rules.
    #[serde(default)]
    pub allow: Vec<AuthzRule>,
}

/// A request rate limit for a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst above the rate.
    #[serde(default)]
    pub burst: u32,
    /// Per source identity instead of in total.
    #[serde(default)]
    pub per_source: bool,
}

/// Retries of HTTP requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries per request.
    pub max_retries: u32,
    /// Timeout of each try, milliseconds (0 = none).
    #[serde(default)]
    pub per_try_timeout_ms: u64,
    /// Extra load retries may add, percent.
    #[serde(default)]
    pub budget_percent: u32,
    /// Conditions: `5xx`, `connect-failure`, `reset`, `deadline-exceeded`; `non-idempotent` extends them
    /// to methods that are not idempotent (POST, PATCH).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
}

/// Timeouts and retries for a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Whole-request timeout, milliseconds (0 = none).
    #[serde(default)]
    pub request_timeout_ms: u64,
    /// Connect timeout, milliseconds (0 = default).
    #[serde(default)]
    pub connect_timeout_ms: u64,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// One weighted backend of a split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitBackend {
    /// Version label of the target service.
    pub service_version: String,
    /// Relative weight.
    pub weight: u32,
}

/// A weighted traffic split between versions of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplit {
    /// Backends and weights.
    pub backends: Vec<SplitBackend>,
}

/// A policy for one service; exactly one of the four kinds is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Service in the policy's namespace.
    pub target_service: String,
    /// Authorization rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    /// Rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Timeouts and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Traffic split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_split: Option<TrafficSplit>,
}

impl Resource {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::TrustDomain(_) => Kind::TrustDomain,
            Resource::Identity(_) => Kind::Identity,
            Resource::Service(_) => Kind::Service,
            Resource::Endpoint(_) => Kind::Endpoint,
            Resource::Policy(_) => Kind::Policy,
        }
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::TrustDomain(o) => &o.metadata,
            Resource::Identity(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::Endpoint(o) => &o.metadata,
            Resource::Policy(o) => &o.metadata,
        }
    }

    /// The metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::TrustDomain(o) => &mut o.metadata,
            Resource::Identity(o) => &mut o.metadata,
            Resource::Service(o) => &mut o.metadata,
            Resource::Endpoint(o) => &mut o.metadata,
            Resource::Policy(o) => &mut o.metadata,
        }
    }

    /// The storage key: `namespace/name`, or `name` for cluster-wide kinds.
    pub fn key(&self) -> String {
        let m = self.metadata();
        key_of(self.kind(), &m.namespace, &m.name)
    }

    /// Checks every rule. `trust_domain` is the mesh's, for SPIFFE IDs inside the resource.
    pub fn validate(&self, trust_domain: &str) -> Result<(), FieldError> {
        let m = self.metadata();
        if self.kind().namespaced() {
            check_name("metadata.name", &m.name)?;
            check_name("metadata.namespace", &m.namespace)?;
        } else {
            if m.name != "default" {
                return Err(FieldError::new(
                    "metadata.name",
                    format!(
                        "the trust domain settings are a singleton named \"default\", got {:?}",
                        m.name
                    ),
                ));
            }
            if !m.namespace.is_empty() {
                return Err(FieldError::new(
                    "metadata.namespace",
                    "must be empty for TrustDomain",
                ));
            }
        }
        match self {
            Resource::TrustDomain(o) => validate_trust_domain(&o.spec, trust_domain),
            Resource::Identity(o) => {
                if m.namespace == SYSTEM_NAMESPACE {
                    return Err(FieldError::new(
                        "metadata.namespace",
                        format!("{SYSTEM_NAMESPACE} is reserved for the controller"),
                    ));
                }
                SpiffeId::new(trust_domain, &m.namespace, &m.name)
                    .map_err(|e| FieldError::new("metadata.name", e.to_string()))?;
                if o.spec.revoked_unix < 0 {
                    return Err(FieldError::new("spec.revoked_unix", "must not be negative"));
                }
                check_len("spec.nodes", &o.spec.nodes)?;
                for (i, n) in o.spec.nodes.iter().enumerate() {
                    check_spiffe(&format!("spec.nodes[{i}]"), n, trust_domain)?;
                }
                Ok(())
            }
            Resource::Service(o) => validate_service(&o.spec, &m.namespace, &m.name, trust_domain),
            Resource::Endpoint(o) => validate_endpoint(&o.spec, trust_domain),
            Resource::Policy(o) => validate_policy(&o.spec, trust_domain),
        }
    }
}

/// The storage key of a resource.
pub fn key_of(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

/// Names and namespaces: 1..=63 characters, lowercase letters, digits, `-` and `.`, starting and ending
/// with a letter or digit (a DNS label with dots, so it fits a SPIFFE path segment and a Kubernetes name).
pub fn check_name(field: &str, s: &str) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(FieldError::new(
            field,
            format!("must be at most 63 characters, got {}", s.len()),
        ));
    }
    let ok_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    if !bytes.iter().all(|&b| ok_char(b) || b == b'-' || b == b'.')
        || !bytes.first().is_some_and(|&b| ok_char(b))
        || !bytes.last().is_some_and(|&b| ok_char(b))
    {
        return Err(FieldError::new(
            field,
            format!(
                "\"{}\" must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit",
                clip(s)
            ),
        ));
    }
    Ok(())
}

fn check_len<T>(field: &str, v: &[T]) -> Result<(), FieldError> {
    if v.len() > MAX_LIST {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_LIST} entries, got {}", v.len()),
        ));
    }
    Ok(())
}

fn check_spiffe(field: &str, s: &str, trust_domain: &str) -> Result<SpiffeId, FieldError> {
    let id: SpiffeId = s
        .parse()
        .map_err(|e: crate::identity::SpiffeIdError| FieldError::new(field, e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(FieldError::new(
            field,
            format!("{s:?} is not in this mesh's trust domain {trust_domain:?}"),
        ));
    }
    Ok(id)
}

fn validate_trust_domain(spec: &TrustDomainSpec, trust_domain: &str) -> Result<(), FieldError> {
    if spec.trust_domain != trust_domain {
        return Err(FieldError::new(
            "spec.trust_domain",
            format!(
                "cannot change: the mesh's trust domain is {trust_domain:?}, got {:?}",
                spec.trust_domain
            ),
        ));
    }
    if spec.leaf_ttl_seconds == 0 || spec.leaf_ttl_seconds > MAX_LEAF_TTL_SECONDS {
        return Err(FieldError::new(
            "spec.leaf_ttl_seconds",
            format!(
                "must be 1..={MAX_LEAF_TTL_SECONDS} (30 days), got {}",
                spec.leaf_ttl_seconds
            ),
        ));
    }
    Ok(())
}

fn validate_service(
    spec: &ServiceSpec,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<(), FieldError> {
    if spec.ports.is_empty() {
        return Err(FieldError::new(
            "spec.ports",
            "at least one port is required",
        ));
    }
    check_len("spec.ports", &spec.ports)?;
    let mut seen = std::collections::HashSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.port == 0 || p.port > 65535 {
            return Err(FieldError::new(
                format!("spec.ports[{i}].port"),
                format!("must be 1..=65535, got {}", p.port),
            ));
        }
        if !seen.insert(p.port) {
            return Err(FieldError::new(
                format!("spec.ports[{i}].port"),
                format!("port {} is listed twice", p.port),
            ));
        }
        if !p.name.is_empty() {
            check_name(&format!("spec.ports[{i}].name"), &p.name)?;
        }
    }
    check_len("spec.versions", &spec.versions)?;
    for (i, v) in spec.versions.iter().enumerate() {
        check_name(&format!("spec.versions[{i}]"), v)?;
    }
    check_len("spec.identities", &spec.identities)?;
    for (i, id) in spec.identities.iter().enumerate() {
        let field = format!("spec.identities[{i}]");
        if id.starts_with("spiffe://") {
            check_spiffe(&field, id, trust_domain)?;
        } else {
            check_name(&field, id)?;
        }
    }
    // The rule the proxies apply: a stored service always resolves.
    ServerNames::resolve(trust_domain, namespace, name, &spec.identities)
        .map_err(|e| FieldError::new("spec.identities", e.to_string()))?;
    Ok(())
}

/// Checks `host:port`: a non-empty host without spaces and a port 1..=65535.
pub fn check_address(field: &str, s: &str) -> Result<(), FieldError> {
    let bad = || {
        FieldError::new(
            field,
            format!(
                "\"{}\" must be host:port with a port 1..=65535, e.g. 10.0.0.7:4433",
                clip(s)
            ),
        )
    };
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return if a.port() == 0 { Err(bad()) } else { Ok(()) };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0
        || host.is_empty()
        || host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad());
    }
    Ok(())
}

fn validate_endpoint(spec: &EndpointSpec, trust_domain: &str) -> Result<(), FieldError> {
    check_name("spec.service", &spec.service)?;
    check_address("spec.address", &spec.address)?;
    if spec.spiffe_id.is_empty() {
        return Err(FieldError::new(
            "spec.spiffe_id",
            "is required: the identity of the proxy serving the endpoint, one the Service allows",
        ));
    }
    check_spiffe("spec.spiffe_id", &spec.spiffe_id, trust_domain)?;
    if !spec.service_version.is_empty() {
        check_name("spec.service_version", &spec.service_version)?;
    }
    if spec.weight > 10_000 {
        return Err(FieldError::new(
            "spec.weight",
            format!("must be 0..=10000, got {}", spec.weight),
        ));
    }
    Ok(())
}

const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
const RETRY_ON: [&str; 5] = [
    "5xx",
    "connect-failure",
    "reset",
    "deadline-exceeded",
    "non-idempotent",
];

fn validate_policy(spec: &PolicySpec, trust_domain: &str) -> Result<(), FieldError> {
    check_name("spec.target_service", &spec.target_service)?;
    let set = [
        spec.authorization.is_some(),
        spec.rate_limit.is_some(),
        spec.timeouts.is_some(),
        spec.traffic_split.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        return Err(FieldError::new(
            "spec",
            format!(
                "exactly one of authorization, rate_limit, timeouts, traffic_split must be set, got {set}"
            ),
        ));
    }
    if let Some(a) = &spec.authorization {
        check_len("spec.authorization.allow", &a.allow)?;
        for (i, r) in a.allow.iter().enumerate() {
            let f = format!("spec.authorization.allow[{i}]");
            check_len(&format!("{f}.from_identities"), &r.from_identities)?;
            for (j, id) in r.from_identities.iter().enumerate() {
                check_spiffe(&format!("{f}.from_identities[{j}]"), id, trust_domain)?;
            }
            check_len(&format!("{f}.from_namespaces"), &r.from_namespaces)?;
            for (j, ns) in r.from_namespaces.iter().enumerate() {
                check_name(&format!("{f}.from_namespaces[{j}]"), ns)?;
            }
            check_len(&format!("{f}.methods"), &r.methods)?;
            for (j, m) in r.methods.iter().enumerate() {
                if !HTTP_METHODS.contains(&m.as_str()) {
                    return Err(FieldError::new(
                        format!("{f}.methods[{j}]"),
                        format!(
                            "{m:?} is not an HTTP method (uppercase, one of {})",
                            HTTP_METHODS.join(", ")
                        ),
                    ));
                }
            }
            check_len(&format!("{f}.path_prefixes"), &r.path_prefixes)?;
            for (j, p) in r.path_prefixes.iter().enumerate() {
                if !p.starts_with('/') || p.len() > 1024 || p.chars().any(char::is_whitespace) {
                    return Err(FieldError::new(
                        format!("{f}.path_prefixes[{j}]"),
                        format!(
                            "{p:?} must start with '/', hold no whitespace and be at most 1024 bytes"
                        ),
                    ));
                }
            }
        }
    }
    if let Some(r) = &spec.rate_limit
        && !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0)
    {
        return Err(FieldError::new(
            "spec.rate_limit.requests_per_second",
            format!("must be a positive number, got {}", r.requests_per_second),
        ));
    }
    if let Some(t) = &spec.timeouts {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        for (field, v) in [
            ("spec.timeouts.request_timeout_ms", t.request_timeout_ms),
            ("spec.timeouts.connect_timeout_ms", t.connect_timeout_ms),
        ] {
            if v > DAY_MS {
                return Err(FieldError::new(
                    field,
                    format!("must be at most {DAY_MS} (a day), got {v}"),
                ));
            }
        }
        if let Some(r) = &t.retry {
            if r.max_retries > 10 {
                return Err(FieldError::new(
                    "spec.timeouts.retry.max_retries",
                    format!("must be at most 10, got {}", r.max_retries),
                ));
            }
            if r.budget_percent > 100 {
                return Err(FieldError::new(
                    "spec.timeouts.retry.budget_percent",
                    format!("must be 0..=100, got {}", r.budget_percent),
                ));
            }
            if r.per_try_timeout_ms > DAY_MS {
                return Err(FieldError::new(
                    "spec.timeouts.retry.per_try_timeout_ms",
                    format!("must be at most {DAY_MS}, got {}", r.per_try_timeout_ms),
                ));
            }
            if t.request_timeout_ms > 0 && r.per_try_timeout_ms > t.request_timeout_ms {
                return Err(FieldError::new(
                    "spec.timeouts.retry.per_try_timeout_ms",
                    format!(
                        "must not exceed spec.timeouts.request_timeout_ms ({}), got {}",
                        t.request_timeout_ms, r.per_try_timeout_ms
                    ),
                ));
            }
            for (j, c) in r.retry_on.iter().enumerate() {
                if !RETRY_ON.contains(&c.as_str()) {
                    return Err(FieldError::new(
                        format!("spec.timeouts.retry.retry_on[{j}]"),
                        format!("{c:?} is not one of {}", RETRY_ON.join(", ")),
                    ));
                }
            }
        }
    }
    if let Some(s) = &spec.traffic_split {
        if s.backends.is_empty() {
            return Err(FieldError::new(
                "spec.traffic_split.backends",
                "at least one backend is required",
            ));
        }
        check_len("spec.traffic_split.backends", &s.backends)?;
        let mut seen = std::collections::HashSet::new();
        for (i, b) in s.backends.iter().enumerate() {
            let f = format!("spec.traffic_split.backends[{i}]");
            check_name(&format!("{f}.service_version"), &b.service_version)?;
            if !seen.insert(b.service_version.as_str()) {
                return Err(FieldError::new(
                    format!("{f}.service_version"),
                    format!("{:?} is listed twice", b.service_version),
                ));
            }
            if b.weight > 10_000 {
                return Err(FieldError::new(
                    format!("{f}.weight"),
                    format!("must be 0..=10000, got {}", b.weight),
                ));
            }
        }
        if s.backends.iter().all(|b| b.weight == 0) {
            return Err(FieldError::new(
                "spec.traffic_split.backends",
                "weights must not all be 0",
            ));
        }
    }
    Ok(())
}

/// Deepest nesting of flow collections (`[...]`, `{...}`) accepted in a YAML file; resources need 4.
pub const MAX_YAML_FLOW_DEPTH: usize = 32;

/// Parses a YAML stream of resources (documents separated by `---`), kubectl style. Empty documents are
/// skipped. Errors say which document failed and why.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Resource>, String> {
    Ok(parse_yaml_numbered(text)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`parse_yaml_documents`] with each resource's document number (1-based, counting empty ones).
/// Two documents naming the same kind, namespace and name are refused.
pub fn parse_yaml_numbered(text: &str) -> Result<Vec<(usize, Resource)>, String> {
    check_flow_depth(text)?;
    let mut out: Vec<(usize, Resource)> = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value =
            serde_yaml_ng::Value::deserialize(doc).map_err(|e| format!("document {n}: {e}"))?;
        if value.is_null() {
            continue;
        }
        let r: Resource =
            serde_yaml_ng::from_value(value).map_err(|e| format!("document {n}: {e}"))?;
        if let Some((first, _)) = out
            .iter()
            .find(|(_, o)| o.kind() == r.kind() && o.key() == r.key())
        {
            return Err(format!(
                "document {n}: {} {} is also document {first}; each resource may appear once",
                r.kind(),
                clip(&r.key())
            ));
        }
        out.push((n, r));
    }
    Ok(out)
}

/// Refuses flow collections nested deeper than [`MAX_YAML_FLOW_DEPTH`] before the YAML scanner sees them:
/// its cost per token grows with the flow depth, so 20,000 `[` took over a minute (found by fuzzing).
/// Errs on the safe side: brackets count everywhere except in comments and quoted scalars, and a quote
/// opens a scalar only where YAML lets one start.
fn check_flow_depth(text: &str) -> Result<(), String> {
    let (mut depth, mut line) = (0usize, 1usize);
    // The previous character, and the previous non-blank one on this line ('\n' at its start).
    let (mut prev, mut last_solid) = ('\n', '\n');
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let scalar_start = matches!(prev, ' ' | '\t' | '\n' | '[' | '{' | ',')
            && matches!(last_solid, '\n' | '[' | '{' | ',' | ':' | '-' | '?');
        match c {
            '#' if matches!(prev, ' ' | '\t' | '\n') => {
                while chars.next_if(|&n| n != '\n').is_some() {}
            }
            '"' | '\'' if scalar_start => {
                while let Some(n) = chars.next() {
                    match n {
                        '\n' => line += 1,
                        '\\' if c == '"' => line += usize::from(chars.next() == Some('\n')),
                        '\'' if c == '\'' && chars.next_if_eq(&'\'').is_some() => {}
                        n if n == c => break,
                        _ => {}
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_YAML_FLOW_DEPTH {
                    return Err(format!(
                        "line {line}: collections nested deeper than {MAX_YAML_FLOW_DEPTH} levels"
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            '\n' => line += 1,
            _ => {}
        }
        if c == '\n' {
            last_solid = '\n';
        } else if !c.is_whitespace() {
            last_solid = c;
        }
        prev = c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "mesh.local";

    #[test]
    fn deep_flow_nesting_is_refused_quickly() {
        // Found by fuzzing `parse_yaml_documents`: the scanner's cost grew with the square of the depth.
        let deep = format!(
            "kind: Service\nmetadata: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let started = std::time::Instant::now();
        let e = parse_yaml_documents(&deep).expect_err("too deep");
        assert!(
            e.contains("line 2: collections nested deeper than 32"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let limit = format!("{}{}", "[".repeat(32), "]".repeat(32));
        let e = parse_yaml_documents(&limit).expect_err("not a resource");
        assert!(
            !e.contains("nested deeper"),
            "32 levels pass the depth check: {e}"
        );
        // Brackets in comments and quoted scalars do not count.
        let open = "[".repeat(40);
        let text = format!(
            "kind: Service # {open}\nmetadata: {{name: a, namespace: b}}\nspec:\n  \
             ports: [{{port: 80, protocol: http, name: \"{open}\\\"\"}}]\n  versions: ['{open}''']\n"
        );
        let rs = parse_yaml_documents(&text).expect("brackets in a comment and in strings");
        assert!(
            matches!(&rs[..], [Resource::Service(s)] if s.spec.versions[0] == format!("{open}'"))
        );
        // A quote inside a plain scalar opens nothing.
        let hidden = format!("a: it's\nb: {open}\n");
        let e = parse_yaml_documents(&hidden).expect_err("quote in a plain scalar");
        assert!(e.contains("line 2"), "{e}");
    }

    fn service(ports: Vec<ServicePort>) -> Resource {
        Resource::Service(Object {
            metadata: Metadata {
                name: "cart".into(),
                namespace: "shop".into(),
                ..Default::default()
            },
            spec: ServiceSpec {
                ports,
                ..Default::default()
            },
        })
    }

    fn port(port: u32) -> ServicePort {
        ServicePort {
            port,
            protocol: PortProtocol::Http,
            name: String::new(),
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "cart", "cart-v2", "a.b", "0abc"] {
            assert!(check_name("n", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Cart", "a_b", "a b", &"x".repeat(64)] {
            assert!(check_name("n", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_rules_name_the_field() {
        assert!(service(vec![port(80)]).validate(TD).is_ok());
        let e = service(vec![]).validate(TD).expect_err("no ports");
        assert_eq!(e.field, "spec.ports");
        let e = service(vec![port(80), port(0)])
            .validate(TD)
            .expect_err("port 0");
        assert_eq!(e.field, "spec.ports[1].port");
        let e = service(vec![port(80), port(80)])
            .validate(TD)
            .expect_err("dup");
        assert!(e.problem.contains("twice"), "{e}");
        let e = service(vec![port(70000)]).validate(TD).expect_err("big");
        assert_eq!(
            e.to_string(),
            "spec.ports[0].port: must be 1..=65535, got 70000"
        );
    }

    #[test]
    fn addresses() {
        for ok in ["10.0.0.7:4433", "[::1]:1", "proxy-a.shop:4433"] {
            assert!(check_address("a", ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.7", ":80", "host:0", "host:99999", "ho st:80", ""] {
            assert!(check_address("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_needs_exactly_one_kind() {
        let mut p = PolicySpec {
            target_service: "cart".into(),
            ..Default::default()
        };
        let wrap = |spec: PolicySpec| {
            Resource::Policy(Object {
                metadata: Metadata {
                    name: "p".into(),
                    namespace: "shop".into(),
                    ..Default::default()
                },
                spec,
            })
        };
        assert_eq!(
            wrap(p.clone()).validate(TD).expect_err("none").field,
            "spec"
        );
        p.traffic_split = Some(TrafficSplit {
            backends: vec![
                SplitBackend {
                    service_version: "v1".into(),
                    weight: 90,
                },
                SplitBackend {
                    service_version: "v2".into(),
                    weight: 10,
                },
            ],
        });
        assert!(wrap(p.clone()).validate(TD).is_ok());
        p.rate_limit = Some(RateLimit {
            requests_per_second: 5.0,
            ..Default::default()
        });
        assert_eq!(wrap(p.clone()).validate(TD).expect_err("two").field, "spec");
        p.traffic_split = None;
        p.rate_limit = Some(RateLimit {
            requests_per_second: f64::NAN,
            ..Default::default()
        });
        assert_eq!(
            wrap(p.clone()).validate(TD).expect_err("nan").field,
            "spec.rate_limit.requests_per_second"
        );
        p.rate_limit = None;
        p.authorization = Some(Authorization {
            allow: vec![AuthzRule {
                from_identities: vec!["spiffe://other.td/ns/a/sa/b".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let e = wrap(p).validate(TD).expect_err("foreign td");
        assert_eq!(e.field, "spec.authorization.allow[0].from_identities[0]");
    }

    #[test]
    fn trust_domain_is_fixed_and_ttl_bounded() {
        let td = |trust_domain: &str, ttl| {
            Resource::TrustDomain(Object {
                metadata: Metadata {
                    name: "default".into(),
                    ..Default::default()
                },
                spec: TrustDomainSpec {
                    trust_domain: trust_domain.into(),
                    leaf_ttl_seconds: ttl,
                },
            })
        };
        assert!(td(TD, 3600).validate(TD).is_ok());
        assert_eq!(
            td("x.y", 3600).validate(TD).expect_err("td").field,
            "spec.trust_domain"
        );
        assert_eq!(
            td(TD, 0).validate(TD).expect_err("ttl").field,
            "spec.leaf_ttl_seconds"
        );
    }

    #[test]
    fn yaml_stream_kubectl_style() {
        let text = r#"
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  versions: [v1, v2]
---
---
kind: Policy
metadata: {name: cart-split, namespace: shop}
spec:
  target_service: cart
  traffic_split:
    backends: [{service_version: v1, weight: 90}, {service_version: v2, weight: 10}]
"#;
        let rs = parse_yaml_documents(text).expect("parse");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].kind(), Kind::Service);
        assert_eq!(rs[1].key(), "shop/cart-split");
        for r in &rs {
            r.validate(TD).expect("valid");
        }
        let e = parse_yaml_documents(
            "kind: Service\nmetadata: {name: a, namespace: b}\nspec: {ports: [], prots: 1}\n",
        )
        .expect_err("typo");
        assert!(e.contains("document 1") && e.contains("prots"), "{e}");
        let e = parse_yaml_documents("kind: Gadget\nmetadata: {name: a}\n").expect_err("kind");
        assert!(e.contains("Gadget"), "{e}");
    }

    #[test]
    fn metadata_and_spec_must_be_mappings_and_resources_unique() {
        let e = parse_yaml_documents(
            "kind: Service\nmetadata: [a, b]\nspec: {ports: [{port: 1, protocol: tcp}]}\n",
        )
        .expect_err("sequence metadata");
        assert!(e.contains("document 1") && e.contains("mapping"), "{e}");
        let e =
            parse_yaml_documents("kind: Service\nmetadata: {name: a, namespace: b}\nspec: [[]]\n")
                .expect_err("sequence spec");
        assert!(e.contains("mapping"), "{e}");
        let svc = "kind: Service\nmetadata: {name: a, namespace: b}\nspec: {ports: [{port: 1, protocol: tcp}]}\n";
        let e = parse_yaml_documents(&format!("{svc}---\n---\n{svc}")).expect_err("dup");
        assert!(
            e.contains("document 3") && e.contains("also document 1"),
            "{e}"
        );
        // The same name in another kind is fine.
        let ok = format!("{svc}---\nkind: Identity\nmetadata: {{name: a, namespace: b}}\n");
        assert_eq!(parse_yaml_documents(&ok).expect("two kinds").len(), 2);
    }

    #[test]
    fn endpoints_need_a_port_and_an_identity_and_services_resolve() {
        let ep = |address: &str, spiffe_id: &str| {
            Resource::Endpoint(Object {
                metadata: Metadata {
                    name: "e".into(),
                    namespace: "shop".into(),
                    ..Default::default()
                },
                spec: EndpointSpec {
                    service: "cart".into(),
                    address: address.into(),
                    spiffe_id: spiffe_id.into(),
                    service_version: String::new(),
                    weight: 0,
                },
            })
        };
        let id = "spiffe://mesh.local/ns/shop/sa/cart";
        assert!(ep("10.0.0.1:4433", id).validate(TD).is_ok());
        assert_eq!(
            ep("10.0.0.1:0", id).validate(TD).expect_err("port 0").field,
            "spec.address"
        );
        assert_eq!(
            ep("10.0.0.1:4433", "")
                .validate(TD)
                .expect_err("no id")
                .field,
            "spec.spiffe_id"
        );
        let long = "x".repeat(8000);
        let e = check_name("name", &long).expect_err("long");
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
        assert!(e.to_string().contains("8000"), "{e}");
    }
}
