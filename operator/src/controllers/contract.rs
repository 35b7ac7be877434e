//! The contract between the reconcile runtime and the kinds: what a kind implements ([`Reconcilable`]), what it
//! hands back ([`Desired`], [`Cond`]), what it may fail with ([`Error`]) and the shared state it is given
//! ([`Context`]). The runtime (`crate::runtime`) drives it; nothing here knows the process around it.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::core::DeserializeGuard;
use kube::{Client, Resource};
use serde_json::Value;

use crate::api::condition::{EventReason, Gate, Reason, Status};
use crate::api::{AccessPolicy, CrmBackupPolicy};
use crate::controllers::BuildContext;
use crate::k8s::apply::{ApplyError, ObjectPatch};
use crate::k8s::events::Recorder;
use crate::k8s::meta::Owner;
use crate::metrics::Metrics;
use crate::validation::FieldError;

/// Shared state of all controllers.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Consecutive failures per object, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Injected clock.
    pub now: fn() -> jiff::Timestamp,
    /// Requeue interval in steady state.
    pub resync: Duration,
    /// The operator's Vault logins (AccessPolicy).
    pub vault: Arc<crate::vault::admin::Sessions>,
    /// Every write, as an audit record.
    pub audit: crate::audit::Auditor,
    /// What the watches hold (children, pods, namespaces) and what was last read or written.
    pub cache: Arc<crate::k8s::cache::Cache>,
    /// The backup policies as their controllers' watches hold them (a restore's policy), once they have listed them.
    pub backup_policies: std::sync::OnceLock<Vec<kube::runtime::reflector::Store<DeserializeGuard<CrmBackupPolicy>>>>,
    /// The AccessPolicies as their controllers' watches hold them (the AccessMonitor's attribution), once listed.
    pub access_policies: std::sync::OnceLock<Vec<kube::runtime::reflector::Store<DeserializeGuard<AccessPolicy>>>>,
    /// Where AccessMonitors' findings and incidents are alerted (`--alertmanager-url`), if anywhere.
    pub alertmanagers: Option<crate::alerting::Alertmanagers>,
    /// Which policy-report API the cluster serves (AccessMonitors' findings reports).
    pub reports: crate::k8s::reports::Served,
    /// When the controllers started (a restore waits quietly for its policy's first pass for a while after it).
    pub started: Instant,
}

impl Context {
    /// The backup policy `name` in `namespace` as the watch shows it; `None` when the watch does not show it (or
    /// not as a valid object), which only a read can confirm. Right after the start this waits (up to 5 s) for
    /// the backup policies' watches to list them.
    pub async fn watched_backup_policy(&self, namespace: &str, name: &str) -> Option<CrmBackupPolicy> {
        let started = Instant::now();
        let stores = loop {
            match self.backup_policies.get() {
                Some(s) => break s,
                None if started.elapsed() > Duration::from_secs(5) => return None,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        stores.iter().find_map(|s| s.get(&key)).and_then(|g| g.0.as_ref().ok().cloned())
    }
}

impl Context {
    /// The pods of `namespace` that have not finished: from the watch of such pods, read from the server only until
    /// that watch has listed them.
    pub async fn unfinished_pods(&self, namespace: &str) -> Result<Vec<k8s_openapi::api::core::v1::Pod>, Error> {
        use k8s_openapi::api::core::v1::Pod;
        if let Some(pods) = self.cache.pods(namespace) {
            return Ok(pods);
        }
        let list = kube::Api::<Pod>::namespaced(self.client.clone(), namespace).list(&Default::default()).await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
            .collect())
    }

    /// The valid AccessPolicies of `namespace` as the watches show them; `None` until the watches have listed them.
    pub fn watched_access_policies(&self, namespace: &str) -> Option<Vec<AccessPolicy>> {
        let stores = self.access_policies.get()?;
        Some(
            stores
                .iter()
                .flat_map(|s| s.state())
                .filter_map(|g| g.0.as_ref().ok().cloned())
                .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
                .collect(),
        )
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("build", &self.build).finish_non_exhaustive()
    }
}

/// One condition a kind reports besides `Ready`: made only from a declared reason (`api::<kind>::conditions`, which the
/// CRDs' descriptions are generated from), never from a string.
/// `S` is the kind's status type: a condition another kind declares does not compile.
///
/// ```
/// use crmguard::api::AccessPolicyStatus;
/// use crmguard::api::access_policy::conditions::VaultConfigured;
/// use crmguard::api::condition::Status;
/// use crmguard::controllers::contract::Cond;
/// let _: Cond<AccessPolicyStatus> = Cond::new(VaultConfigured::Synced, Status::True, "synced");
/// ```
/// ```compile_fail
/// use crmguard::api::NetworkGuardStatus;
/// use crmguard::api::access_policy::conditions::VaultConfigured;
/// use crmguard::api::condition::Status;
/// use crmguard::controllers::contract::Cond;
/// let _: Cond<NetworkGuardStatus> = Cond::new(VaultConfigured::Synced, Status::True, "synced");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Cond<S> {
    pub type_: &'static str,
    pub gate: Gate,
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
    of: PhantomData<fn() -> S>,
}

impl<S> Cond<S> {
    pub fn new<R: Reason<Status = S>>(reason: R, status: Status, message: impl Into<String>) -> Self {
        let (type_, gate, reason) = (R::TYPE, R::GATE, reason.as_str());
        Cond { type_, gate, status, reason, message: message.into(), of: PhantomData }
    }

    /// Whether it holds `Ready` back.
    pub fn holds_back(&self) -> bool {
        self.gate.holds_back(self.status)
    }
}

/// What a kind wants: children, their kinds to prune, its status (`S`, the kind's status type) and conditions.
#[derive(Clone, Debug, Default)]
pub struct Desired<S> {
    pub owner: Option<Owner>,
    pub children: Vec<Value>,
    pub prune: Vec<(&'static str, &'static str)>,
    /// Specific conditions, computed before apply; their gates decide `Ready`.
    pub conditions: Vec<Cond<S>>,
    /// The status; its `observedGeneration` and `conditions` are the runtime's (what is set there is replaced).
    pub status: S,
    /// Requeue sooner than the resync (e.g. at a grant's expiry).
    pub requeue_after: Option<Duration>,
    /// Merge patches to objects the resource does not own (applied after the children).
    pub patches: Vec<ObjectPatch>,
    /// Events to record once the changes are made.
    pub events: Vec<Note<S>>,
    /// Per-object metric samples (see `metrics::OBJECT_GAUGES`); `resource_ready` is added by the runtime.
    pub gauges: Vec<crate::metrics::ObjectSample>,
    /// Writes made to Vault while computing this, for the audit trail.
    pub audit: Vec<VaultWrite>,
    /// Nothing is written, no status either: the resource waits for another controller's first pass and is
    /// reconciled again after this (or when an object it watches changes).
    pub wait: Option<Duration>,
}

/// An Event to record about the resource once the changes are made; `S` is the kind's status type (another kind's
/// Event reason does not compile).
#[derive(Clone, Debug, PartialEq)]
pub struct Note<S> {
    pub warning: bool,
    /// A declared Event reason (`api::<kind>::*Event`).
    pub reason: &'static str,
    pub note: String,
    /// A second object the Event is about (its `related`). Repeats of the same reason, note and objects fold into
    /// one series (`k8s::events`).
    pub related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    of: PhantomData<fn() -> S>,
}

impl<S> Note<S> {
    pub fn normal(reason: impl EventReason<Status = S>, note: impl Into<String>) -> Self {
        Note { warning: false, reason: reason.as_str(), note: note.into(), related: None, of: PhantomData }
    }

    pub fn warning(reason: impl EventReason<Status = S>, note: impl Into<String>) -> Self {
        Note { warning: true, reason: reason.as_str(), note: note.into(), related: None, of: PhantomData }
    }

    /// The same Event, about `object` too.
    pub fn about(self, object: k8s_openapi::api::core::v1::ObjectReference) -> Self {
        Note { related: Some(object), ..self }
    }
}

/// What crmguard did in Vault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaultAction {
    /// A policy, role or database connection written.
    Write,
    /// A stale policy, role or database connection deleted.
    Delete,
    /// A database credential lease issued.
    LeaseIssue,
    /// A lease renewed.
    LeaseRenew,
    /// A lease revoked.
    LeaseRevoke,
}

impl VaultAction {
    /// The audit trail's action.
    pub fn as_str(self) -> &'static str {
        match self {
            VaultAction::Write => "vault-write",
            VaultAction::Delete => "vault-delete",
            VaultAction::LeaseIssue => "lease-issue",
            VaultAction::LeaseRenew => "lease-renew",
            VaultAction::LeaseRevoke => "lease-revoke",
        }
    }
}

/// A write to Vault, for the audit trail: what, where (a Vault path, or the Secret whose leases were revoked), why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultWrite {
    pub action: VaultAction,
    pub path: String,
    pub reason: String,
}

impl<S> Desired<S> {
    /// Adds a child. One that cannot be serialized fails the reconcile: left out, it would be pruned, i.e. the
    /// live object deleted.
    pub fn child(&mut self, object: &impl serde::Serialize) -> Result<(), Error> {
        let value = serde_json::to_value(object).map_err(|e| Error::Serialize(e.to_string()))?;
        self.children.push(value);
        Ok(())
    }
}

/// Errors of a reconcile that are worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Removing what a resource left outside the cluster (e.g. in Vault) failed; deletion waits for it.
    #[error("cleanup before deletion: {0}")]
    Cleanup(String),
    /// A child could not be serialized (a bug in its builder).
    #[error("a child could not be serialized: {0}")]
    Serialize(String),
}

impl Error {
    /// Category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Cleanup(_) => "cleanup",
            Error::Serialize(_) => "bug",
            Error::Apply(ApplyError::UnknownKind(_)) => "bug",
            Error::Apply(ApplyError::OwnedByAnother(_)) => "conflict",
            Error::Apply(ApplyError::Kube { source, .. }) | Error::Kube(source) => match source {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 403 || s.code == 401 => "forbidden",
                kube::Error::Api(s) if s.code >= 500 => "apiserver",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
        }
    }
}

/// A kind of object a controller watches besides its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Other {
    ConfigMap,
    CronJob,
    Job,
    NetworkPolicy,
    Role,
    RoleBinding,
    ServiceAccount,
}

/// What a kind watches besides itself, and which of its resources an event of a watched object reconciles. Every
/// watched object but pods carries crmguard's label; the watches feed the cache the kind reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Children it owns (owner references), as metadata: the owner is reconciled.
    Owns(Other),
    /// Children it owns, whole (the cache keeps more than their metadata, e.g. a Job's progress).
    OwnsWhole(Other),
    /// Objects, whole, whose annotation of this name names the resource (in their namespace).
    NamedBy(Other, &'static str),
    /// Objects, as metadata: one that comes or goes (also across a re-list) reconciles every resource of its
    /// namespace (e.g. a ServiceAccount a restore waits for).
    InNamespace(Other),
    /// Pods that have not finished, as metadata: one that comes, goes, or changes its labels or crmguard's
    /// annotations reconciles every resource of its namespace.
    Pods,
    /// Resources of another of crmguard's kinds, named by its controller ([`Reconcilable::CONTROLLER`]): one that
    /// changes (its status too), comes or goes (also across a re-list) reconciles the resources of its namespace it
    /// concerns
    /// ([`Reconcilable::concerned_by`]; e.g. a policy whose first pass a restore waits for). No watch of its own:
    /// that kind's controller passes on what its watch shows.
    Resources(&'static str),
}

/// A custom resource kind with a controller.
pub trait Reconcilable:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Controller name; the field manager is `crmguard/<name>`.
    const CONTROLLER: &'static str;
    /// The kind's status type.
    type Status: serde::Serialize + Clone + std::fmt::Debug + Default + Send + Sync + 'static;
    /// What it watches besides itself.
    const WATCHES: &'static [Watch];
    /// Resolve, validate and build. Field errors mean the spec is invalid (Ready=False, wait for a change).
    #[allow(clippy::type_complexity)]
    fn desired(
        &self,
        ctx: &Context,
    ) -> impl Future<Output = Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error>> + Send;

    /// A finalizer for kinds that leave state outside the cluster (children inside it go with owner references).
    const FINALIZER: Option<&'static str> = None;

    /// Whether this object currently needs [`Self::FINALIZER`] (it is added before anything is created outside).
    fn needs_finalizer(&self) -> bool {
        false
    }

    /// Whether a change of the resource `name` (of this object's namespace) of the kind whose controller is
    /// `controller` concerns this object ([`Watch::Resources`]): every object of the namespace, unless the kind says.
    fn concerned_by(&self, _controller: &str, _name: &str) -> bool {
        true
    }

    /// Removes the state outside the cluster while the object is being deleted; retried until it succeeds,
    /// then the finalizer is removed. "Already gone" must count as success.
    fn cleanup(&self, _ctx: &Context) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_cannot_be_serialized_fails_the_reconcile_instead_of_being_left_out() {
        let mut d = Desired::<()>::default();
        d.child(&serde_json::json!({"kind": "ConfigMap"})).unwrap();
        // JSON object keys must be strings: this map has no JSON form.
        let unserializable: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let e = d.child(&unserializable).unwrap_err();
        assert_eq!(e.category(), "bug");
        assert!(e.to_string().starts_with("a child could not be serialized"), "{e}");
        assert_eq!(d.children.len(), 1);
    }
}
