//! What the operator's watches already hold, so that a reconcile asks the API server only for what the cache
//! cannot vouch for: crmguard's children (metadata only), the pods that have not finished (labels and crmguard's
//! annotations), and namespaces that are being deleted. The runtime feeds each table from a watch
//! ([`Cache::feed`]); the controllers read.
//!
//! A custom resource's status is read once per resourceVersion ([`Cache::status`]): a resync of an object that
//! did not change reads nothing.
//!
//! Children are compared without reading them: after a child was found or made as desired, the cache remembers
//! its resourceVersion and a digest of what was desired ([`Cache::verified`]). While the watch shows the same
//! resourceVersion and the desired object has not changed, the child is as desired and nobody needs to look.
//! Anyone else's change gives it a new resourceVersion, and then the child is read and compared again.
//!
//! `kept`: what the cache keeps of an object, and the digests it compares.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use serde_json::Value;

use super::meta::OWNER_LABEL;

mod kept;
#[cfg(test)]
mod tests;

use kept::digest;
pub use kept::{JobProgress, Meta, content_of, digest_of, pod_digest};

/// A table: the kinds fed from watches (`Kind` as in `CHILD_KINDS`), and the two that are not children.
pub type Table = &'static str;
/// Pods of the watched namespaces that have not finished.
pub const PODS: Table = "Pod";
/// Namespaces (cluster-wide).
pub const NAMESPACES: Table = "Namespace";

type Key = (String, String);
/// (resourceVersion, digest of the desired object, [`content_of`] the object) of a child found as desired.
type Verified = (String, u64, Option<u64>);
/// (kind, namespace, name) of a child.
type ChildKey = (Table, String, String);

/// One table, fed by one watch per scope (a watched namespace, or `""` for all).
#[derive(Debug, Default)]
struct Objects {
    /// Scopes whose watch has delivered a full list.
    synced: BTreeSet<String>,
    /// Ordered by namespace, then name: a namespace's objects are one range.
    by_key: BTreeMap<Key, Meta>,
    /// Objects of a re-list in progress per scope, swapped in when it is complete.
    relisting: HashMap<String, HashMap<Key, Meta>>,
}

impl Objects {
    /// The objects of one namespace.
    fn in_namespace<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = (&'a str, &'a Meta)> + 'a {
        self.by_key
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|((_, name), m)| (name.as_str(), m))
    }

    /// The objects of one namespace that carry the owner label `owner_label`.
    fn labelled<'a>(
        &'a self,
        namespace: &'a str,
        owner_label: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Meta)> + 'a {
        self.in_namespace(namespace).filter(move |(_, m)| m.owner_label.as_deref() == Some(owner_label))
    }
}

type Memo = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// The grant ceiling as its watch shows it, and a re-list in progress.
#[derive(Debug, Default)]
struct Ceiling {
    current: Option<Option<Vec<PolicyRule>>>,
    listing: Option<Option<Vec<PolicyRule>>>,
}

/// The operator's view of the objects its watches hold.
#[derive(Debug, Default)]
pub struct Cache {
    tables: HashMap<Table, RwLock<Objects>>,
    /// The scopes every table is watched in.
    scopes: BTreeSet<String>,
    /// (table, scope) pairs a watch already feeds (a kind several controllers watch is fed by one of them).
    fed: Mutex<BTreeSet<(Table, String)>>,
    /// (kind, namespace, name) -> (resourceVersion, digest of the desired object, [`content_of`] the object) of
    /// children found as desired.
    verified: Mutex<HashMap<ChildKey, Verified>>,
    /// The grant ceiling ClusterRole's rules once its watch has listed it (`Some(None)`: it does not exist).
    ceiling: RwLock<Ceiling>,
    /// (kind, uid) -> (digest of the cached inputs, what a reconcile computed from reads they vouch for).
    memos: Mutex<HashMap<(Table, String), (u64, Memo)>>,
    /// (kind, uid) of a custom resource -> its status as the server holds it, as last read or written.
    statuses: Mutex<HashMap<(Table, String), Remembered>>,
    created: Option<Instant>,
    /// Set once the waiting of [`Self::until_synced`] is over (every later reconcile goes on at once).
    settled: std::sync::atomic::AtomicBool,
}

/// How long a reconcile of an object the watch shows from before this process's own status write waits for the
/// watch to bring that write, before it reads the status from the API server instead.
pub const WRITE_LAG: Duration = Duration::from_secs(5);

/// The status the server holds for a custom resource, as last read or written.
#[derive(Debug)]
struct Remembered {
    /// The resourceVersion the status was held at.
    version: String,
    /// The status, as JSON text.
    status: String,
    /// When this process wrote it, until the watch has shown that version.
    unseen_write: Option<Instant>,
}

fn scope_of(scope: Option<&str>) -> String {
    scope.unwrap_or_default().to_string()
}

fn key(m: &ObjectMeta) -> Key {
    (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

impl Cache {
    /// A cache with these tables, each watched in every one of `namespaces` (all when empty). Tables not named
    /// stay unknown: their reads go to the API server.
    pub fn new(tables: &[Table], namespaces: &[String]) -> Cache {
        let scopes = if namespaces.is_empty() { [String::new()].into() } else { namespaces.iter().cloned().collect() };
        Cache {
            tables: tables.iter().map(|t| (*t, RwLock::default())).collect(),
            scopes,
            created: Some(Instant::now()),
            ..Cache::default()
        }
    }

    /// Whether the tables are watched in one scope (one namespace, or all).
    pub fn single_scope(&self) -> bool {
        self.scopes.len() == 1
    }

    /// Claims feeding `table` in `scope` (`None`: all namespaces): true for the first caller only.
    pub fn claim(&self, table: Table, scope: Option<&str>) -> bool {
        self.has(table) && self.fed.lock().unwrap_or_else(PoisonError::into_inner).insert((table, scope_of(scope)))
    }

    /// Whether `table` is fed by a watch.
    pub fn has(&self, table: Table) -> bool {
        self.tables.contains_key(table)
    }

    /// Applies one watch event of the watch of `table` in `scope` (`None`: all namespaces).
    pub fn feed<O: kube::Resource + 'static>(&self, table: Table, scope: Option<&str>, event: &Event<O>) {
        let Some(t) = self.tables.get(table) else { return };
        let mut t = t.write().unwrap_or_else(PoisonError::into_inner);
        let scope = scope_of(scope);
        match event {
            Event::Apply(o) => {
                t.by_key.insert(key(o.meta()), Meta::of_object(table, o));
            }
            Event::Delete(o) => {
                let k = key(o.meta());
                t.by_key.remove(&k);
                self.forget(table, &k);
            }
            Event::Init => {
                t.relisting.insert(scope, HashMap::new());
            }
            Event::InitApply(o) => {
                t.relisting.entry(scope).or_default().insert(key(o.meta()), Meta::of_object(table, o));
            }
            Event::InitDone => {
                let fresh = t.relisting.remove(&scope).unwrap_or_default();
                let gone: Vec<Key> = t
                    .by_key
                    .keys()
                    .filter(|k| (scope.is_empty() || k.0 == scope) && !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    t.by_key.remove(&k);
                    self.forget(table, &k);
                }
                t.by_key.extend(fresh);
                t.synced.insert(scope);
            }
        }
    }

    /// What the cache holds of an object: `None` when the table is not fed or the object is absent (which is
    /// only certain after [`Self::synced`]).
    pub fn get(&self, table: Table, namespace: &str, name: &str) -> Option<Meta> {
        let t = self.tables.get(table)?.read().unwrap_or_else(PoisonError::into_inner);
        t.by_key.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Whether the watch of `table` shows no object of this name: certain only for objects it selects (crmguard's
    /// label), so a write after this must still refuse to replace one it does not select. False until synced.
    pub fn absent(&self, table: Table, namespace: &str, name: &str) -> bool {
        self.listed(table).is_some_and(|t| !t.by_key.contains_key(&(namespace.to_string(), name.to_string())))
    }

    /// Waits until every table has seen a full list in every scope, as a controller's workers wait for their
    /// informers (a reconcile before that would read what the watches are about to show), but not past `limit`
    /// after the cache was made: a watch that cannot list (e.g. forbidden) must not hold reconciles back.
    pub async fn until_synced(&self, limit: Duration) {
        if self.settled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        while self.created.is_some_and(|c| c.elapsed() < limit) && !self.tables.keys().all(|t| self.synced(t)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.settled.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let unlisted: Vec<&str> = self.tables.keys().copied().filter(|t| !self.synced(t)).collect();
            if !unlisted.is_empty() {
                tracing::warn!(?unlisted, "these watches have not listed yet; reads stand in for them meanwhile");
            }
        }
    }

    /// Whether `table` is fed and has seen a full list in every scope.
    pub fn synced(&self, table: Table) -> bool {
        self.listed(table).is_some()
    }

    /// A table watched in all namespaces (the namespaces themselves) is complete for every scope.
    fn complete(&self, t: &Objects) -> bool {
        t.synced.contains("") || self.scopes.iter().all(|s| t.synced.contains(s))
    }

    /// `table` for reading, once it has seen a full list in every scope.
    fn listed(&self, table: Table) -> Option<std::sync::RwLockReadGuard<'_, Objects>> {
        let t = self.tables.get(table)?.read().unwrap_or_else(PoisonError::into_inner);
        self.complete(&t).then_some(t)
    }

    /// Names (sorted) of the objects of `table` in `namespace` whose controller is `owner_uid` and that carry
    /// the owner label `owner_label`; `None` when the table is not fed or not yet synced.
    pub fn owned_by(&self, table: Table, namespace: &str, owner_uid: &str, owner_label: &str) -> Option<Vec<String>> {
        let t = self.listed(table)?;
        let mut names: Vec<String> = t
            .in_namespace(namespace)
            .filter(|(_, m)| {
                m.controller.as_deref() == Some(owner_uid) && m.owner_label.as_deref() == Some(owner_label)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        Some(names)
    }

    /// The pods of `namespace` that have not finished, as pods carrying only name, uid, labels and crmguard's
    /// annotations; `None` when pods are not watched or not yet synced.
    pub fn pods(&self, namespace: &str) -> Option<Vec<Pod>> {
        let t = self.listed(PODS)?;
        let mut pods: Vec<Pod> = t
            .in_namespace(namespace)
            .map(|(name, m)| Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    uid: Some(m.uid.clone()),
                    labels: Some(m.labels.clone()),
                    annotations: Some(m.annotations.clone()),
                    ..ObjectMeta::default()
                },
                ..Pod::default()
            })
            .collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Some(pods)
    }

    /// Whether `namespace` is being deleted (false when namespaces are not watched).
    pub fn terminating(&self, namespace: &str) -> bool {
        self.get(NAMESPACES, "", namespace).is_some_and(|m| m.terminating)
    }

    /// Whether the child is known to be as `desired` without reading it: the watch shows the resourceVersion
    /// it had when it was last found or made as desired, and `desired` is what it was then.
    pub fn is_verified(&self, table: Table, namespace: &str, name: &str, desired: &Value) -> bool {
        let Some(current) = self.get(table, namespace, name) else { return false };
        let v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        // A newer version whose content is the same (a Job whose status changed) is as desired too.
        v.get(&(table, namespace.to_string(), name.to_string())).is_some_and(|(rv, d, content)| {
            (*rv == current.resource_version || content.is_some_and(|c| current.content == Some(c)))
                && *d == digest(desired)
        })
    }

    /// Records that the child at `resource_version`, `server` as the API server answered, is as `desired`.
    pub fn verified(
        &self,
        table: Table,
        namespace: &str,
        name: &str,
        resource_version: &str,
        desired: &Value,
        server: &impl serde::Serialize,
    ) {
        if !self.has(table) || resource_version.is_empty() {
            return;
        }
        let entry = (resource_version.to_string(), digest(desired), content_of(table, server));
        let mut v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        v.insert((table, namespace.to_string(), name.to_string()), entry);
    }

    fn forget(&self, table: Table, (namespace, name): &Key) {
        let mut v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        v.remove(&(table, namespace.clone(), name.clone()));
    }

    /// Forgets a child that was deleted.
    pub fn deleted(&self, table: Table, namespace: &str, name: &str) {
        self.forget(table, &(namespace.to_string(), name.to_string()));
    }

    /// Remembers the status the server holds for the custom resource `uid` of `kind` at `resource_version`, as
    /// read (or as the watch showed it).
    pub fn remember_status(&self, kind: Table, uid: &str, resource_version: Option<&str>, status: &Value) {
        self.hold_status(kind, uid, resource_version, status, None);
    }

    /// Remembers the status this process's status write left on the custom resource `uid` of `kind` (the version
    /// the write returned): until the watch shows that version, its objects of `uid` predate the write.
    pub fn remember_written_status(&self, kind: Table, uid: &str, resource_version: Option<&str>, status: &Value) {
        self.hold_status(kind, uid, resource_version, status, Some(Instant::now()));
    }

    fn hold_status(&self, kind: Table, uid: &str, rv: Option<&str>, status: &Value, written: Option<Instant>) {
        let mut s = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (kind, uid.to_string());
        match rv {
            Some(rv) if !uid.is_empty() => {
                let held = Remembered { version: rv.to_string(), status: status.to_string(), unseen_write: written };
                s.insert(key, held)
            }
            _ => s.remove(&key),
        };
    }

    /// The watch of `kind` showed `uid` at `resource_version` (a watch shows an object's versions in order: once
    /// it showed the version a status write returned, what it shows after is newer than the write).
    pub fn watched(&self, kind: Table, uid: &str, resource_version: &str) {
        let mut s = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = s.get_mut(&(kind, uid.to_string()))
            && r.unseen_write.is_some()
            && r.version == resource_version
        {
            r.unseen_write = None;
        }
    }

    /// Whether the object of `uid` at `resource_version` the watch shows predates this process's last status write
    /// on it, written less than [`WRITE_LAG`] ago: the watch is about to show the write (and reconcile it then).
    pub fn predates_own_write(&self, kind: Table, uid: &str, resource_version: &str) -> bool {
        self.predates_own_write_at(kind, uid, resource_version, Instant::now())
    }

    fn predates_own_write_at(&self, kind: Table, uid: &str, resource_version: &str, now: Instant) -> bool {
        let s = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        s.get(&(kind, uid.to_string())).is_some_and(|r| {
            r.version != resource_version
                && r.unseen_write.is_some_and(|at| now.saturating_duration_since(at) < WRITE_LAG)
        })
    }

    /// The status the server holds for `uid` of `kind` at `resource_version`, when it was seen at that version;
    /// `None` when the object changed since (or was never seen): then it must be read.
    pub fn status(&self, kind: Table, uid: &str, resource_version: &str) -> Option<Value> {
        let s = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        s.get(&(kind, uid.to_string()))
            .filter(|r| r.version == resource_version)
            .and_then(|r| serde_json::from_str(&r.status).ok())
    }

    /// The status last read or written for `uid` of `kind`, whatever resourceVersion it had.
    pub fn remembered_status(&self, kind: Table, uid: &str) -> Option<Value> {
        let s = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        s.get(&(kind, uid.to_string())).and_then(|r| serde_json::from_str(&r.status).ok())
    }

    /// Forgets what was remembered of the custom resources of `kind` whose uid is not in `live` (resources that
    /// were deleted get no reconcile that could forget them).
    pub fn retain(&self, kind: Table, live: &BTreeSet<String>) {
        let keep = |(k, uid): &(Table, String)| *k != kind || live.contains(uid);
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner).retain(|k, _| keep(k));
        self.memos.lock().unwrap_or_else(PoisonError::into_inner).retain(|k, _| keep(k));
    }

    /// How many objects of `table` in `namespace` carry the owner label `owner_label`; `None` until synced.
    pub fn labelled(&self, table: Table, namespace: &str, owner_label: &str) -> Option<usize> {
        let t = self.listed(table)?;
        Some(t.labelled(namespace, owner_label).count())
    }

    /// A digest of the objects of `table` in `namespace` with the owner label `owner_label` (their names and
    /// resourceVersions): it changes whenever one of them comes, goes or changes. `None` until the table is synced.
    pub fn digest_owned(&self, table: Table, namespace: &str, owner_label: &str) -> Option<u64> {
        let t = self.listed(table)?;
        let mut owned: Vec<(&str, &str)> =
            t.labelled(namespace, owner_label).map(|(name, m)| (name, m.resource_version.as_str())).collect();
        owned.sort_unstable();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        owned.hash(&mut h);
        Some(h.finish())
    }

    /// What was computed for the object `uid` of `kind` from inputs whose digest was `digest`, if it still is.
    pub fn memo<T: Clone + Send + Sync + 'static>(&self, kind: Table, uid: &str, digest: u64) -> Option<T> {
        self.memo_of(kind, uid, Some(digest))
    }

    /// What was last remembered for `uid` of `kind`, whatever inputs it was computed from.
    pub fn last_memo<T: Clone + Send + Sync + 'static>(&self, kind: Table, uid: &str) -> Option<T> {
        self.memo_of(kind, uid, None)
    }

    /// What was remembered for `uid` of `kind`, from inputs of digest `digest` when one is given.
    fn memo_of<T: Clone + Send + Sync + 'static>(&self, kind: Table, uid: &str, digest: Option<u64>) -> Option<T> {
        let m = self.memos.lock().unwrap_or_else(PoisonError::into_inner);
        let (d, value) = m.get(&(kind, uid.to_string()))?;
        if digest.is_some_and(|digest| digest != *d) {
            return None;
        }
        value.downcast_ref::<T>().cloned()
    }

    /// Remembers what was computed for `uid` of `kind` from inputs whose digest is `digest`.
    pub fn remember<T: Send + Sync + 'static>(&self, kind: Table, uid: &str, digest: u64, value: T) {
        let mut m = self.memos.lock().unwrap_or_else(PoisonError::into_inner);
        m.insert((kind, uid.to_string()), (digest, std::sync::Arc::new(value)));
    }

    /// Forgets what was remembered for `uid` of `kind`.
    pub fn forget_memo(&self, kind: Table, uid: &str) {
        self.memos.lock().unwrap_or_else(PoisonError::into_inner).remove(&(kind, uid.to_string()));
    }

    /// Applies one event of the watch of the grant ceiling ClusterRole (a watch of that one name).
    pub fn feed_ceiling(&self, event: &Event<ClusterRole>) {
        let mut c = self.ceiling.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Apply(r) => c.current = Some(Some(r.rules.clone().unwrap_or_default())),
            Event::Delete(_) => c.current = Some(None),
            Event::Init => c.listing = Some(None),
            Event::InitApply(r) => c.listing = Some(Some(r.rules.clone().unwrap_or_default())),
            // The list is complete: what it held (nothing: the ceiling does not exist).
            Event::InitDone => c.current = Some(c.listing.take().flatten()),
        }
    }

    /// The grant ceiling's rules as its watch shows them: `None` until the watch has listed it, `Some(None)` when
    /// it does not exist.
    pub fn ceiling(&self) -> Option<Option<Vec<PolicyRule>>> {
        self.ceiling.read().unwrap_or_else(PoisonError::into_inner).current.clone()
    }

    /// Forgets what was remembered of a custom resource that is going away (its status, its memos).
    pub fn forget_object(&self, kind: Table, uid: &str) {
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner).remove(&(kind, uid.to_string()));
        self.memos.lock().unwrap_or_else(PoisonError::into_inner).remove(&(kind, uid.to_string()));
    }
}
