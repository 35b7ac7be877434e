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

/// A table: the kinds fed from watches (`Kind` as in `CHILD_KINDS`), and the two that are not children.
pub type Table = &'static str;
/// Pods of the watched namespaces that have not finished.
pub const PODS: Table = "Pod";
/// Namespaces (cluster-wide).
pub const NAMESPACES: Table = "Namespace";

/// What the cache keeps of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub uid: String,
    pub resource_version: String,
    /// The uid of the object's controller (owner reference with `controller: true`).
    pub controller: Option<String>,
    /// The value of crmguard's owner label.
    pub owner_label: Option<String>,
    /// Pods only: all labels and crmguard's annotations (`crmguard.io/...`).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Namespaces only: being deleted.
    pub terminating: bool,
    /// Jobs only: the progress its status reports.
    pub job: Option<Box<JobProgress>>,
    /// Objects watched whole (Jobs): a digest of what a status update leaves as it was ([`content_of`]).
    pub content: Option<u64>,
}

/// What a Job's status says of its progress (what a restore reports), kept instead of the Job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    pub active: i32,
    pub ready: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub start_time: Option<jiff::Timestamp>,
    pub completion_time: Option<jiff::Timestamp>,
}

impl From<&JobStatus> for JobProgress {
    fn from(s: &JobStatus) -> JobProgress {
        JobProgress {
            active: s.active.unwrap_or(0),
            ready: s.ready.unwrap_or(0),
            succeeded: s.succeeded.unwrap_or(0),
            failed: s.failed.unwrap_or(0),
            start_time: s.start_time.as_ref().map(|t| t.0),
            completion_time: s.completion_time.as_ref().map(|t| t.0),
        }
    }
}

impl Meta {
    /// What is kept of `o`, an object of `table` (metadata, or a Job).
    pub fn of_object<O: kube::Resource + 'static>(table: Table, o: &O) -> Meta {
        let mut m = Meta::of(table, o.meta());
        if let Some(job) = (o as &dyn std::any::Any).downcast_ref::<Job>() {
            m.job = Some(Box::new(job.status.as_ref().map(JobProgress::from).unwrap_or_default()));
            m.content = Some(job_content(job));
        }
        m
    }

    fn of(table: Table, m: &ObjectMeta) -> Meta {
        let labels = m.labels.clone().unwrap_or_default();
        let pod = table == PODS;
        Meta {
            uid: m.uid.clone().unwrap_or_default(),
            resource_version: m.resource_version.clone().unwrap_or_default(),
            controller: m.owner_references.iter().flatten().find(|r| r.controller == Some(true)).map(|r| r.uid.clone()),
            owner_label: labels.get(OWNER_LABEL).cloned(),
            annotations: if pod {
                m.annotations.iter().flatten().filter(|(k, _)| k.starts_with("crmguard.io/")).map(clone2).collect()
            } else {
                BTreeMap::new()
            },
            labels: if pod { labels } else { BTreeMap::new() },
            terminating: table == NAMESPACES && m.deletion_timestamp.is_some(),
            job: None,
            content: None,
        }
    }
}

fn clone2((k, v): (&String, &String)) -> (String, String) {
    (k.clone(), v.clone())
}

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

/// A digest of what the cache keeps of a pod (labels, crmguard's annotations).
pub fn pod_digest(m: &ObjectMeta) -> u64 {
    let kept = Meta::of(PODS, m);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kept.labels, kept.annotations).hash(&mut h);
    h.finish()
}

/// A digest of some strings (e.g. resourceVersions), for [`Cache::memo`].
pub fn digest_of(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A digest of a desired object (same value, same digest, within one process).
/// For a Job (the kind watched whole): a digest of its spec, labels, annotations and owner references, which a
/// status update leaves as they were; `None` for the other kinds. Read through the Job type on both sides (the
/// watch's objects and the API server's answers to writes), so that fields one side does not know do not count.
pub fn content_of(table: Table, object: &impl serde::Serialize) -> Option<u64> {
    if table != "Job" {
        return None;
    }
    let job: Job = serde_json::to_value(object).ok().and_then(|v| serde_json::from_value(v).ok())?;
    Some(job_content(&job))
}

fn job_content(job: &Job) -> u64 {
    let m = &job.metadata;
    let kept = serde_json::json!([job.spec, m.labels, m.annotations, m.owner_references]);
    digest(&kept)
}

fn digest(v: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::PartialObjectMeta;
    use serde_json::json;

    fn meta(ns: &str, name: &str, rv: &str, owner: Option<&str>) -> PartialObjectMeta<Pod> {
        let v = json!({"apiVersion": "v1", "kind": "PartialObjectMetadata", "metadata": {
            "namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": rv,
            "labels": {"app": "crm", OWNER_LABEL: "g"},
            "annotations": {"crmguard.io/quarantine-by": "g", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "ownerReferences": owner.map(|u| vec![json!({"apiVersion": "v1", "kind": "X", "name": "o", "uid": u, "controller": true})]).unwrap_or_default()
        }});
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_relist_replaces_the_table_only_when_complete() {
        let c = Cache::new(&["NetworkPolicy"], &[]);
        c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("NetworkPolicy", None, &Event::InitApply(meta("a", "old", "1", Some("u"))));
        assert!(!c.synced("NetworkPolicy") && c.owned_by("NetworkPolicy", "a", "u", "g").is_none());
        c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
        assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["old".to_string()]));
        c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("NetworkPolicy", None, &Event::InitApply(meta("a", "new", "2", Some("u"))));
        // During the re-list the last complete view holds.
        assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["old".to_string()]));
        c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
        assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["new".to_string()]));
        assert_eq!(c.owned_by("NetworkPolicy", "a", "other", "g"), Some(vec![]));
        assert_eq!(c.owned_by("NetworkPolicy", "b", "u", "g"), Some(vec![]));
        assert!(c.owned_by("Role", "a", "u", "g").is_none(), "a table nobody feeds knows nothing");
    }

    #[test]
    fn each_namespace_watch_replaces_only_its_own_namespace() {
        let c = Cache::new(&["NetworkPolicy"], &["a".to_string(), "b".to_string()]);
        for (scope, name) in [("a", "pa"), ("b", "pb")] {
            c.feed("NetworkPolicy", Some(scope), &Event::<PartialObjectMeta<Pod>>::Init);
            c.feed("NetworkPolicy", Some(scope), &Event::InitApply(meta(scope, name, "1", Some("u"))));
            c.feed("NetworkPolicy", Some(scope), &Event::<PartialObjectMeta<Pod>>::InitDone);
        }
        assert!(c.synced("NetworkPolicy"));
        // b's watch restarts and lists nothing: a keeps its policy.
        c.feed("NetworkPolicy", Some("b"), &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("NetworkPolicy", Some("b"), &Event::<PartialObjectMeta<Pod>>::InitDone);
        assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["pa".to_string()]));
        assert_eq!(c.owned_by("NetworkPolicy", "b", "u", "g"), Some(vec![]));
        assert!(c.claim("NetworkPolicy", Some("a")) && !c.claim("NetworkPolicy", Some("a")));
        assert!(!c.claim("Role", Some("a")), "a table the cache does not have is not fed");
    }

    #[test]
    fn absence_is_known_once_listed_and_a_cluster_wide_table_serves_every_watched_namespace() {
        let c = Cache::new(&["Role", NAMESPACES], &["a".to_string()]);
        assert!(!c.absent("Role", "a", "r"), "not listed yet: absence is unknown");
        c.feed("Role", Some("a"), &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("Role", Some("a"), &Event::InitApply(meta("a", "there", "1", None)));
        c.feed("Role", Some("a"), &Event::<PartialObjectMeta<Pod>>::InitDone);
        assert!(c.absent("Role", "a", "r") && !c.absent("Role", "a", "there"));
        assert!(!c.absent("Pod", "a", "r"), "a table nobody feeds knows nothing");
        // The namespaces are watched in all namespaces although the tables are watched in "a" only.
        c.feed(NAMESPACES, None, &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed(NAMESPACES, None, &Event::<PartialObjectMeta<Pod>>::InitDone);
        assert!(c.synced(NAMESPACES));
    }

    #[test]
    fn a_watched_job_keeps_its_progress_and_metadata_keeps_none() {
        let c = Cache::new(&["Job"], &[]);
        let job: Job = serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "j", "resourceVersion": "3"},
            "status": {"active": 1, "ready": 1, "startTime": "2026-12-01T10:00:00Z"}
        }))
        .unwrap();
        c.feed("Job", None, &Event::Apply(job));
        let kept = c.get("Job", "a", "j").unwrap();
        assert_eq!(kept.resource_version, "3");
        let progress = kept.job.unwrap();
        assert_eq!((progress.active, progress.ready, progress.succeeded, progress.failed), (1, 1, 0, 0));
        assert_eq!(progress.start_time.map(|t| t.to_string()).as_deref(), Some("2026-12-01T10:00:00Z"));
        assert_eq!(progress.completion_time, None);
        c.feed("Job", None, &Event::Apply(meta("a", "m", "4", None)));
        assert_eq!(c.get("Job", "a", "m").unwrap().job, None, "metadata says nothing of progress");
    }

    #[tokio::test]
    async fn reconciles_wait_for_the_watches_to_list_but_not_past_the_limit() {
        let c = Cache::new(&["Role"], &[]);
        let limit = Duration::from_millis(500);
        let started = Instant::now();
        c.until_synced(limit).await;
        assert!(started.elapsed() >= limit - Duration::from_millis(50), "it waited for the list");
        // The limit counts from the start, not per reconcile (a per-call limit would wait 500 ms again).
        let again = Instant::now();
        c.until_synced(limit).await;
        assert!(again.elapsed() < Duration::from_millis(400), "past the limit nobody waits");
    }

    #[test]
    fn a_child_is_verified_only_at_the_version_it_was_verified_at_and_for_the_same_desire() {
        let c = Cache::new(&["NetworkPolicy"], &[]);
        let desired = json!({"spec": {"a": 1}});
        c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "5", Some("u"))));
        assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
        c.verified("NetworkPolicy", "a", "p", "5", &desired, &desired);
        assert!(c.is_verified("NetworkPolicy", "a", "p", &desired));
        assert!(!c.is_verified("NetworkPolicy", "a", "p", &json!({"spec": {"a": 2}})), "the desire changed");
        // Someone else's edit: a new resourceVersion.
        c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "6", Some("u"))));
        assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
        c.verified("NetworkPolicy", "a", "p", "6", &desired, &desired);
        c.feed("NetworkPolicy", None, &Event::Delete(meta("a", "p", "6", Some("u"))));
        assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
        c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "6", Some("u"))));
        assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired), "a deleted child's verification is forgotten");
    }

    #[test]
    fn a_job_stays_verified_through_status_updates_but_not_through_someone_elses_edit() {
        let c = Cache::new(&["Job"], &[]);
        let desired = json!({"metadata": {"name": "j", "labels": {"a": "1"}}, "spec": {"backoffLimit": 0}});
        let job = |rv: &str, labels: Value, status: Value| -> Job {
            serde_json::from_value(json!({
                "metadata": {"namespace": "a", "name": "j", "resourceVersion": rv, "labels": labels},
                "spec": {"backoffLimit": 0, "template": {"spec": {"containers": []}}},
                "status": status
            }))
            .unwrap()
        };
        let created = job("5", json!({"a": "1"}), json!({}));
        c.feed("Job", None, &Event::Apply(created.clone()));
        c.verified("Job", "a", "j", "5", &desired, &created);
        assert!(c.is_verified("Job", "a", "j", &desired));
        // The Job controller reports progress: a new resourceVersion, the same Job.
        c.feed("Job", None, &Event::Apply(job("6", json!({"a": "1"}), json!({"active": 1}))));
        assert!(c.is_verified("Job", "a", "j", &desired), "a status update changes nothing crmguard wants");
        // Someone relabels it.
        c.feed("Job", None, &Event::Apply(job("7", json!({"a": "2"}), json!({"active": 1}))));
        assert!(!c.is_verified("Job", "a", "j", &desired), "a changed label is read and compared again");
        // Other kinds are verified at their resourceVersion only.
        assert_eq!(content_of("NetworkPolicy", &desired), None);
    }

    #[test]
    fn a_memo_holds_while_the_owned_objects_do_not_change() {
        let c = Cache::new(&["Job"], &[]);
        assert_eq!(c.digest_owned("Job", "a", "g"), None, "not synced");
        c.feed("Job", None, &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("Job", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
        let empty = c.digest_owned("Job", "a", "g").unwrap();
        c.remember("X", "u", empty, 7u32);
        assert_eq!(c.memo::<u32>("X", "u", empty), Some(7));
        assert_eq!(c.memo::<String>("X", "u", empty), None, "another type is not this memo");
        c.feed("Job", None, &Event::Apply(meta("a", "j", "1", Some("u"))));
        let one = c.digest_owned("Job", "a", "g").unwrap();
        assert_ne!(one, empty);
        assert_eq!(c.memo::<u32>("X", "u", one), None, "a job came");
        c.feed("Job", None, &Event::Apply(meta("b", "j", "1", Some("u"))));
        assert_eq!(c.digest_owned("Job", "a", "g"), Some(one), "another namespace's jobs do not matter");
        c.feed("Job", None, &Event::Apply(meta("a", "j", "2", Some("u"))));
        assert_ne!(c.digest_owned("Job", "a", "g"), Some(one), "the job changed");
        c.forget_memo("X", "u");
        assert_eq!(c.memo::<u32>("X", "u", empty), None);
    }

    #[test]
    fn pods_keep_labels_and_only_crmguards_annotations() {
        let c = Cache::new(&[PODS], &[]);
        assert!(c.pods("a").is_none(), "not synced yet");
        c.feed(PODS, None, &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed(PODS, None, &Event::InitApply(meta("a", "web-0", "1", None)));
        c.feed(PODS, None, &Event::<PartialObjectMeta<Pod>>::InitDone);
        let pods = c.pods("a").unwrap();
        assert_eq!(pods.len(), 1);
        let m = &pods[0].metadata;
        assert_eq!(m.labels.as_ref().unwrap().get("app").map(String::as_str), Some("crm"));
        assert_eq!(m.annotations.as_ref().unwrap().keys().collect::<Vec<_>>(), vec!["crmguard.io/quarantine-by"]);
        assert_eq!(c.pods("b").unwrap().len(), 0);
    }

    #[test]
    fn a_remembered_status_serves_only_the_version_it_was_seen_at() {
        let c = Cache::default();
        assert_eq!(c.status("K", "u", "3"), None, "never seen: read it");
        c.remember_status("K", "u", Some("4"), &json!({"observedGeneration": 2}));
        assert_eq!(c.status("K", "u", "4"), Some(json!({"observedGeneration": 2})));
        assert_eq!(c.status("K", "u", "3"), None, "the cached object predates the write");
        assert_eq!(c.status("K", "u", "5"), None, "changed since");
        assert_eq!(c.status("Other", "u", "4"), None);
        c.remember("K", "u", 1, 1u8);
        c.forget_object("K", "u");
        assert_eq!(c.status("K", "u", "4"), None);
        assert_eq!(c.memo::<u8>("K", "u", 1), None);
    }

    #[test]
    fn an_object_from_before_an_own_status_write_waits_for_the_watch_to_show_the_write() {
        let c = Cache::default();
        c.remember_status("K", "u", Some("4"), &json!({}));
        assert!(!c.predates_own_write("K", "u", "3"), "a read status: the object is as the watch shows it");
        c.remember_written_status("K", "u", Some("6"), &json!({"observedGeneration": 2}));
        assert!(c.predates_own_write("K", "u", "5"), "the watch has not shown the write yet");
        assert!(!c.predates_own_write("K", "u", "6"), "the write itself");
        assert!(!c.predates_own_write("Other", "u", "5"));
        let later = Instant::now() + WRITE_LAG;
        assert!(!c.predates_own_write_at("K", "u", "5", later), "the watch is late: read instead");
        c.watched("K", "u", "5");
        assert!(c.predates_own_write("K", "u", "5"), "an older version shown does not count");
        c.watched("K", "u", "6");
        assert!(!c.predates_own_write("K", "u", "7"), "shown after the write: newer than it");
        assert_eq!(c.status("K", "u", "6"), Some(json!({"observedGeneration": 2})));
    }

    #[test]
    fn what_is_remembered_of_deleted_resources_is_swept() {
        let c = Cache::default();
        for uid in ["live", "gone"] {
            c.remember_status("K", uid, Some("1"), &json!({}));
            c.remember("K", uid, 1, 1u8);
        }
        c.remember_status("Other", "gone", Some("1"), &json!({}));
        c.retain("K", &["live".to_string()].into());
        assert!(c.status("K", "live", "1").is_some() && c.memo::<u8>("K", "live", 1).is_some());
        assert!(c.status("K", "gone", "1").is_none() && c.memo::<u8>("K", "gone", 1).is_none());
        assert!(c.status("Other", "gone", "1").is_some(), "another kind's sweep decides for that kind");
    }

    #[test]
    fn the_ceiling_is_known_once_listed_and_a_relist_without_it_means_gone() {
        let c = Cache::default();
        let role: ClusterRole = serde_json::from_value(json!({"metadata": {"name": "g"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}))
        .unwrap();
        assert_eq!(c.ceiling(), None);
        c.feed_ceiling(&Event::Init);
        c.feed_ceiling(&Event::InitApply(role.clone()));
        assert_eq!(c.ceiling(), None, "not until the list is complete");
        c.feed_ceiling(&Event::InitDone);
        assert_eq!(c.ceiling().flatten().map(|r| r.len()), Some(1));
        c.feed_ceiling(&Event::Init);
        c.feed_ceiling(&Event::InitDone);
        assert_eq!(c.ceiling(), Some(None), "deleted while the watch was away");
        c.feed_ceiling(&Event::Apply(role));
        assert!(c.ceiling().flatten().is_some());
    }

    #[test]
    fn namespaces_being_deleted_are_known() {
        let c = Cache::new(&[NAMESPACES], &[]);
        let ns = |deleting: bool| -> PartialObjectMeta<k8s_openapi::api::core::v1::Namespace> {
            let mut m =
                json!({"apiVersion": "v1", "kind": "PartialObjectMetadata", "metadata": {"name": "crm", "uid": "n"}});
            if deleting {
                m["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
            }
            serde_json::from_value(m).unwrap()
        };
        c.feed(NAMESPACES, None, &Event::Apply(ns(false)));
        assert!(!c.terminating("crm"));
        c.feed(NAMESPACES, None, &Event::Apply(ns(true)));
        assert!(c.terminating("crm"));
        assert!(!c.terminating("other"));
    }
}
