//! The stored resources: read, validate, write, delete.
//!
//! Every write is a batch (one resource for `Apply`, a whole file for `ctl apply -f`): each resource is
//! validated on its own ([`Resource::validate`]), then, under the store's write lock, against the data
//! (create/update mode, optimistic version, a revoked identity stays revoked, an endpoint's service must
//! exist and allow its identity, see [`crate::naming`]), and only if all pass is the batch applied, as
//! one store revision. A refused batch stores nothing.

use std::sync::Arc;

use quicmesh_transport::identity::SpiffeId;
use time::OffsetDateTime;

use crate::{
    error::{ApiError, Capped},
    model::{
        self, EndpointSpec, FieldError, IdentitySpec, Kind, Metadata, Object, PolicySpec, Resource,
    },
    naming,
    snapshot::Inputs,
    store::{self, Db, Op, StoreError, Tree},
};

/// Most resources one batch may hold.
pub const MAX_BATCH: usize = 1000;

/// How a resource write treats an existing resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Must not exist.
    Create,
    /// Must exist.
    Update,
    /// Either.
    Apply,
}

/// The tree that holds resources of `kind`.
pub fn tree_of(kind: Kind) -> Tree {
    match kind {
        Kind::TrustDomain => Tree::TrustDomains,
        Kind::Identity => Tree::Identities,
        Kind::Service => Tree::Services,
        Kind::Endpoint => Tree::Endpoints,
        Kind::Policy => Tree::Policies,
    }
}

/// Resource storage and rules.
#[derive(Debug)]
pub struct Resources {
    db: Arc<Db>,
    trust_domain: String,
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl Resources {
    /// Resources of the mesh `trust_domain` in `db`.
    pub fn new(db: Arc<Db>, trust_domain: String) -> Self {
        Self { db, trust_domain }
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// One resource by storage key.
    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Resource>, StoreError> {
        self.db.get(tree_of(kind), key)
    }

    /// Every resource of `kind` in `namespace` (all namespaces if empty).
    pub fn list(&self, kind: Kind, namespace: &str) -> Result<Vec<Resource>, StoreError> {
        let prefix = if namespace.is_empty() || !kind.namespaced() {
            String::new()
        } else {
            format!("{namespace}/")
        };
        Ok(self
            .db
            .scan(tree_of(kind), &prefix, false, usize::MAX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// What a snapshot is made of.
    pub fn snapshot_inputs(&self) -> Result<Inputs, StoreError> {
        let mut inputs = Inputs::default();
        for r in self.list(Kind::Service, "")? {
            if let Resource::Service(o) = r {
                inputs.services.push(o);
            }
        }
        for r in self.list(Kind::Endpoint, "")? {
            if let Resource::Endpoint(o) = r {
                inputs.endpoints.push(o);
            }
        }
        for r in self.list(Kind::Policy, "")? {
            if let Resource::Policy(o) = r {
                inputs.policies.push(o);
            }
        }
        for r in self.list(Kind::Identity, "")? {
            if let Resource::Identity(o) = r {
                inputs.identities.push(o);
            }
        }
        Ok(inputs)
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let key = model::key_of(Kind::Identity, id.namespace(), id.service_account());
        Ok(matches!(
            self.get(Kind::Identity, &key)?,
            Some(Resource::Identity(o)) if o.spec.revoked
        ))
    }

    /// Writes one resource.
    pub async fn put(&self, r: Resource, mode: WriteMode) -> Result<Resource, ApiError> {
        let (mut stored, _) = self.write(vec![r], mode, false).await?;
        stored
            .pop()
            .ok_or_else(|| ApiError::Internal("empty write".into()))
    }

    /// Writes every resource of `rs` as one revision, or none of them.
    pub async fn put_all(
        &self,
        rs: Vec<Resource>,
        mode: WriteMode,
    ) -> Result<(Vec<Resource>, u64), ApiError> {
        if rs.is_empty() {
            return Err(FieldError::new("resources", "at least one resource is required").into());
        }
        if rs.len() > MAX_BATCH {
            return Err(FieldError::new(
                "resources",
                format!("at most {MAX_BATCH} per batch, got {}", rs.len()),
            )
            .into());
        }
        self.write(rs, mode, true).await
    }

    async fn write(
        &self,
        mut rs: Vec<Resource>,
        mode: WriteMode,
        batch: bool,
    ) -> Result<(Vec<Resource>, u64), ApiError> {
        let label =
            |i: usize, r: &Resource| format!("resources[{i}] ({} {})", r.kind(), Capped(&r.key()));
        let wrap = |i: usize, r: &Resource, e: ApiError| {
            if batch {
                ApiError::InBatch {
                    label: label(i, r),
                    source: Box::new(e),
                }
            } else {
                e
            }
        };
        for (i, r) in rs.iter().enumerate() {
            r.validate(&self.trust_domain)
                .map_err(|e| wrap(i, r, e.into()))?;
            if let Some(j) = rs[..i]
                .iter()
                .position(|o| o.kind() == r.kind() && o.key() == r.key())
            {
                return Err(wrap(
                    i,
                    r,
                    ApiError::Invalid(FieldError::new(
                        "metadata",
                        format!("the same resource as resources[{j}]; each may appear once"),
                    )),
                ));
            }
        }
        let guard = self.db.lock().await;
        let version = self.db.revision() + 1;
        let t = now();
        let mut ops = Vec::with_capacity(rs.len());
        for i in 0..rs.len() {
            let existing = self.get(rs[i].kind(), &rs[i].key())?;
            let (before, after) = rs.split_at_mut(i);
            let r = &mut after[0];
            self.check_against_store(r, existing.as_ref(), mode, before)
                .map_err(|e| wrap(i, r, e))?;
            let m = r.metadata_mut();
            m.version = version;
            m.created_unix = existing
                .as_ref()
                .map(|e| e.metadata().created_unix)
                .unwrap_or(t);
            m.updated_unix = t;
            ops.push(Op::Put(tree_of(r.kind()), r.key(), store::encode(&*r)?));
        }
        let rev = self.db.commit(guard, ops).await?;
        Ok((rs, rev))
    }

    /// The checks that need the stored data; `earlier` are the batch's resources before `r`.
    fn check_against_store(
        &self,
        r: &mut Resource,
        existing: Option<&Resource>,
        mode: WriteMode,
        earlier: &[Resource],
    ) -> Result<(), ApiError> {
        let label = format!("{} {}", r.kind(), r.key());
        match (existing, mode) {
            (Some(_), WriteMode::Create) => return Err(ApiError::AlreadyExists(label)),
            (None, WriteMode::Update) => return Err(ApiError::NotFound(label)),
            _ => {}
        }
        let asked = r.metadata().version;
        if asked != 0 {
            let have = existing.map(|e| e.metadata().version).unwrap_or(0);
            if have != asked {
                return Err(ApiError::FailedPrecondition(format!(
                    "{label} is at version {have}, not {asked}: read it again and retry"
                )));
            }
        }
        match (r, existing) {
            (Resource::Identity(new), Some(Resource::Identity(old))) if old.spec.revoked => {
                if !new.spec.revoked {
                    return Err(FieldError::new(
                        "spec.revoked",
                        "a revoked identity stays revoked; delete it and create it again to reuse the name",
                    )
                    .into());
                }
                new.spec.revoked_unix = old.spec.revoked_unix;
            }
            (Resource::Endpoint(ep), _) => {
                let key = model::key_of(Kind::Service, &ep.metadata.namespace, &ep.spec.service);
                let in_batch = earlier.iter().rev().find_map(|o| match o {
                    Resource::Service(s) if o.key() == key => Some(s.clone()),
                    _ => None,
                });
                let service = match in_batch {
                    Some(s) => Some(s),
                    None => match self.get(Kind::Service, &key)? {
                        Some(Resource::Service(s)) => Some(s),
                        _ => None,
                    },
                };
                naming::check_endpoint(&self.trust_domain, ep, service.as_ref())?;
            }
            (Resource::Policy(p), _) => self.check_policy(p, earlier)?,
            _ => {}
        }
        Ok(())
    }

    /// Policy rules that span resources: one authorization policy per service (a second would silently
    /// combine with the first), and split versions among those the `Service` declares, if it declares any.
    fn check_policy(&self, p: &Object<PolicySpec>, earlier: &[Resource]) -> Result<(), ApiError> {
        let ns = &p.metadata.namespace;
        let target = &p.spec.target_service;
        if p.spec.authorization.is_some() {
            let stored = self.list(Kind::Policy, ns)?;
            let other = earlier
                .iter()
                .chain(stored.iter())
                .filter_map(|r| match r {
                    Resource::Policy(o) => Some(o),
                    _ => None,
                })
                .find(|o| {
                    o.metadata.namespace == *ns
                        && o.metadata.name != p.metadata.name
                        && o.spec.target_service == *target
                        && o.spec.authorization.is_some()
                });
            if let Some(o) = other {
                return Err(FieldError::new(
                    "spec.authorization",
                    format!(
                        "service {} already has the authorization policy {}; change that one",
                        Capped(target),
                        Capped(&o.metadata.name)
                    ),
                )
                .into());
            }
        }
        if let Some(split) = &p.spec.traffic_split {
            let key = model::key_of(Kind::Service, ns, target);
            let service = match earlier.iter().rev().find_map(|o| match o {
                Resource::Service(s) if o.key() == key => Some(s.clone()),
                _ => None,
            }) {
                Some(s) => Some(s),
                None => match self.get(Kind::Service, &key)? {
                    Some(Resource::Service(s)) => Some(s),
                    _ => None,
                },
            };
            if let Some(svc) = service.filter(|s| !s.spec.versions.is_empty()) {
                for (i, b) in split.backends.iter().enumerate() {
                    if !svc.spec.versions.contains(&b.service_version) {
                        return Err(FieldError::new(
                            format!("spec.traffic_split.backends[{i}].service_version"),
                            format!(
                                "{:?} is not a version of service {} (declared: {})",
                                b.service_version,
                                Capped(target),
                                svc.spec.versions.join(", ")
                            ),
                        )
                        .into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes a resource; returns the store revision of the delete.
    pub async fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<u64, ApiError> {
        if kind == Kind::TrustDomain {
            return Err(ApiError::FailedPrecondition(
                "the trust domain settings cannot be deleted".into(),
            ));
        }
        model::check_name("namespace", namespace)?;
        model::check_name("name", name)?;
        let key = model::key_of(kind, namespace, name);
        let guard = self.db.lock().await;
        if self.get(kind, &key)?.is_none() {
            return Err(ApiError::NotFound(format!("{kind} {key}")));
        }
        Ok(self
            .db
            .commit(guard, vec![Op::Delete(tree_of(kind), key)])
            .await?)
    }

    /// The SPIFFE ID of `namespace/sa`, refusing bad names and the controller's namespace.
    pub fn identity_id(&self, namespace: &str, sa: &str) -> Result<SpiffeId, ApiError> {
        model::check_name("namespace", namespace)?;
        model::check_name("service_account", sa)?;
        if namespace == model::SYSTEM_NAMESPACE {
            return Err(FieldError::new(
                "namespace",
                format!("{namespace} is reserved for the controller"),
            )
            .into());
        }
        SpiffeId::new(&self.trust_domain, namespace, sa)
            .map_err(|e| FieldError::new("service_account", e.to_string()).into())
    }

    /// For a new join token of `namespace/sa` (write lock held): refuses a revoked identity, and returns
    /// the write that creates the identity if it does not exist yet.
    pub fn identity_for_token(
        &self,
        namespace: &str,
        sa: &str,
        version: u64,
        t: i64,
    ) -> Result<Option<Op>, ApiError> {
        let id = self.identity_id(namespace, sa)?;
        let key = model::key_of(Kind::Identity, namespace, sa);
        match self.get(Kind::Identity, &key)? {
            Some(Resource::Identity(o)) if o.spec.revoked => Err(ApiError::FailedPrecondition(
                format!("identity {id} is revoked"),
            )),
            Some(_) => Ok(None),
            None => {
                let r = Resource::Identity(Object {
                    metadata: Metadata {
                        name: sa.into(),
                        namespace: namespace.into(),
                        version,
                        created_unix: t,
                        updated_unix: t,
                    },
                    spec: IdentitySpec::default(),
                });
                Ok(Some(Op::Put(Tree::Identities, key, store::encode(&r)?)))
            }
        }
    }

    /// Marks an identity revoked.
    pub async fn revoke_identity(&self, namespace: &str, sa: &str) -> Result<Resource, ApiError> {
        self.identity_id(namespace, sa)?;
        let key = model::key_of(Kind::Identity, namespace, sa);
        let guard = self.db.lock().await;
        let Some(Resource::Identity(mut o)) = self.get(Kind::Identity, &key)? else {
            return Err(ApiError::NotFound(format!("Identity {key}")));
        };
        let t = now();
        if !o.spec.revoked {
            o.spec.revoked = true;
            o.spec.revoked_unix = t;
        }
        o.metadata.version = self.db.revision() + 1;
        o.metadata.updated_unix = t;
        let r = Resource::Identity(o);
        self.db
            .commit(
                guard,
                vec![Op::Put(Tree::Identities, key, store::encode(&r)?)],
            )
            .await?;
        Ok(r)
    }

    /// Removes the endpoint `namespace/name` if `peer` registered it: the new version, or `None` when
    /// there was no such endpoint.
    pub async fn deregister_endpoint(
        &self,
        namespace: &str,
        name: &str,
        peer: &SpiffeId,
    ) -> Result<Option<u64>, ApiError> {
        let namespace = if namespace.is_empty() {
            peer.namespace()
        } else {
            namespace
        };
        model::check_name("namespace", namespace)?;
        model::check_name("name", name)?;
        let key = model::key_of(Kind::Endpoint, namespace, name);
        let guard = self.db.lock().await;
        match self.get(Kind::Endpoint, &key)? {
            None => Ok(None),
            Some(Resource::Endpoint(old)) if old.spec.spiffe_id != peer.as_str() => {
                Err(ApiError::PermissionDenied(format!(
                    "endpoint {} belongs to {}",
                    Capped(&key),
                    old.spec.spiffe_id
                )))
            }
            Some(_) => Ok(Some(
                self.db
                    .commit(guard, vec![Op::Delete(tree_of(Kind::Endpoint), key)])
                    .await?,
            )),
        }
    }

    /// Withdraws endpoint `key` (`namespace/name`) whose proxy went away, if it is still the record
    /// `version` of `spiffe_id` (compare-and-set: an endpoint registered again meanwhile stays). The new
    /// store version, or `None` when nothing was removed.
    pub async fn withdraw_endpoint(
        &self,
        key: &str,
        spiffe_id: &str,
        version: u64,
    ) -> Result<Option<u64>, ApiError> {
        let guard = self.db.lock().await;
        match self.get(Kind::Endpoint, key)? {
            Some(Resource::Endpoint(o))
                if o.metadata.version == version && o.spec.spiffe_id == spiffe_id =>
            {
                Ok(Some(
                    self.db
                        .commit(
                            guard,
                            vec![Op::Delete(tree_of(Kind::Endpoint), key.to_owned())],
                        )
                        .await?,
                ))
            }
            _ => Ok(None),
        }
    }

    /// Records (or refreshes) `peer`'s endpoint `obj`: the identity is the caller's, the namespace the
    /// given one or the caller's, and the service must exist and allow the caller. Returns the
    /// endpoint's key (`namespace/name`) and the version of its record.
    pub async fn register_endpoint(
        &self,
        mut obj: Object<EndpointSpec>,
        peer: &SpiffeId,
    ) -> Result<(String, u64), ApiError> {
        if obj.metadata.namespace.is_empty() {
            obj.metadata.namespace = peer.namespace().to_owned();
        }
        if !obj.spec.spiffe_id.is_empty() && obj.spec.spiffe_id != peer.as_str() {
            return Err(ApiError::PermissionDenied(format!(
                "endpoint.spiffe_id: must be the caller's identity {peer}"
            )));
        }
        obj.spec.spiffe_id = peer.to_string();
        obj.metadata.version = 0;
        let key = model::key_of(Kind::Endpoint, &obj.metadata.namespace, &obj.metadata.name);
        if let Some(Resource::Endpoint(old)) = self.get(Kind::Endpoint, &key)?
            && old.spec.spiffe_id != peer.as_str()
        {
            return Err(ApiError::PermissionDenied(format!(
                "endpoint {} belongs to {}",
                Capped(&key),
                old.spec.spiffe_id
            )));
        }
        let r = self.put(Resource::Endpoint(obj), WriteMode::Apply).await?;
        Ok((key, r.metadata().version))
    }
}
