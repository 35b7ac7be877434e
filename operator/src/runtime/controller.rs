//! Each kind's controller: its own watch (the cache of its resources and which of their versions it showed), the
//! watches it declares (`Reconcilable::WATCHES`: owned children, objects named by an annotation, pods, the
//! namespace's resources, another kind's resources as that kind's own watch passes them on) feeding the shared cache
//! and mapped back to the resources they concern, and the sweep of what deleted resources leave in metrics and
//! cache.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Config as WatcherConfig};
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Client, Resource};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use super::reconcile::{error_policy, reconcile};
use super::watches;
use crate::controllers::contract::{Context, Other, Reconcilable, Watch};
use crate::k8s::cache::{self, Cache};

pub(super) fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub(super) type Running<K> =
    (BoxFuture<'static, ()>, BoxFuture<'static, ()>, kube::runtime::reflector::Store<DeserializeGuard<K>>);

/// A namespaced object as a watch delivers it.
trait Object:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<T> Object for T where
    T: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A namespaced kind a controller watches besides its own.
trait Watched: Object + k8s_openapi::Resource {}

impl<T: Object + k8s_openapi::Resource> Watched for T {}

/// How a watched kind `C` arrives: its metadata (`PartialObjectMeta<C>`) or `C` itself.
trait WatchedAs<C>: Object {}

impl<C: Watched> WatchedAs<C> for PartialObjectMeta<C> {}
impl<C: Watched> WatchedAs<C> for C {}

/// What a controller watches besides its own kind, each through [`watches::events`], feeding the cache.
struct Watches<'a, K: Reconcilable + Resource<Scope = k8s_openapi::NamespaceResourceScope>> {
    client: &'a Client,
    ns: Option<&'a str>,
    restarts: &'a watches::Restarts,
    cache: &'a Arc<Cache>,
    fanout: &'a watches::Fanout,
    controller: Controller<DeserializeGuard<K>>,
    /// The kind's resources by namespace.
    index: Index,
}

impl<K> Watches<'_, K>
where
    K: Reconcilable + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    /// crmguard's objects of kind `C` (its label) as `O` (their metadata, or whole), feeding the cache's table of
    /// that kind.
    /// One watch per kind and scope ([`watches::Fanout`]).
    fn labelled<C: Watched, O: WatchedAs<C>>(&self) -> BoxStream<'static, Result<WatchEvent<O>, WatchError>> {
        match self.fanout.subscribe::<O>(C::KIND, self.ns) {
            watches::Subscription::Lead(followers) => {
                let events = watches::events(api::<O>(self.client, self.ns), owns_cfg(), self.restarts);
                watches::lead(feeding(self.cache, C::KIND, self.ns, events), followers).boxed()
            }
            watches::Subscription::Follow(events) => events.map(Ok).boxed(),
        }
    }

    /// Children the kind owns (owner references), watched as metadata only, filtered to crmguard's label.
    fn owns<C: Watched>(self) -> Self {
        self.owns_as::<C, PartialObjectMeta<C>>()
    }

    /// Children the kind owns, watched as `O` (whole objects where the cache keeps more than their metadata).
    fn owns_as<C: Watched, O: WatchedAs<C>>(mut self) -> Self {
        let children = self.labelled::<C, O>();
        self.controller = self.controller.owns_stream(children.touched_objects());
        self
    }

    /// Other objects (crmguard's label), watched as `O`, mapped to the resource they concern.
    fn watches<C: Watched, O: WatchedAs<C>, I>(mut self, mapper: impl Fn(O) -> I + Send + Sync + 'static) -> Self
    where
        I: IntoIterator<Item = ObjectRef<DeserializeGuard<K>>> + 'static,
        I::IntoIter: Send,
    {
        let others = self.labelled::<C, O>();
        self.controller = self.controller.watches_stream(others.touched_objects(), mapper);
        self
    }

    /// Objects of kind `C` (metadata, crmguard's label): one that comes or goes reconciles every resource of its
    /// namespace (e.g. a ServiceAccount a restore waits for).
    fn namespace_of<C: Watched>(mut self) -> Self {
        let index = self.index.clone();
        // Coming and going only, across a re-list too (one that comes while the watch restarts arrives in the list).
        let events = changes(self.labelled::<C, PartialObjectMeta<C>>(), |_| 0);
        let refs = events.flat_map(move |ns| futures::stream::iter(in_namespace(&index, &ns)));
        self.controller = self.controller.reconcile_on(refs);
        self
    }

    /// Adds one of the watches the kind declares ([`Reconcilable::WATCHES`]).
    fn add(self, watch: Watch) -> Self {
        use k8s_openapi::api::batch::v1::CronJob;
        use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
        // `$C` is the Rust type of the watched kind within `$body`.
        macro_rules! of {
            ($other:expr, $C:ident => $body:expr) => {
                match $other {
                    Other::ConfigMap => {
                        type $C = ConfigMap;
                        $body
                    }
                    Other::CronJob => {
                        type $C = CronJob;
                        $body
                    }
                    Other::Job => {
                        type $C = Job;
                        $body
                    }
                    Other::NetworkPolicy => {
                        type $C = NetworkPolicy;
                        $body
                    }
                    Other::Role => {
                        type $C = Role;
                        $body
                    }
                    Other::RoleBinding => {
                        type $C = RoleBinding;
                        $body
                    }
                    Other::ServiceAccount => {
                        type $C = ServiceAccount;
                        $body
                    }
                }
            };
        }
        match watch {
            Watch::Owns(other) => of!(other, C => self.owns::<C>()),
            Watch::OwnsWhole(other) => of!(other, C => self.owns_as::<C, C>()),
            Watch::NamedBy(other, annotation) => of!(other, C => self.watches::<C, C, _>(move |o: C| {
                let ns = o.meta().namespace.clone()?;
                let name = o.meta().annotations.as_ref()?.get(annotation)?;
                Some(ObjectRef::new(name).within(&ns))
            })),
            Watch::InNamespace(other) => of!(other, C => self.namespace_of::<C>()),
            Watch::Pods => self.pods(),
            Watch::Resources(controller) => self.resources_of(controller),
        }
    }

    /// Another of crmguard's kinds (by its controller's name): a resource of it that changes or goes reconciles the
    /// resources of this kind in its namespace it concerns (one that cannot be read is not concerned: its outcome
    /// does not depend on others). No watch: that controller's own watch passes them on.
    fn resources_of(mut self, controller: &'static str) -> Self {
        let (index, store) = (self.index.clone(), self.controller.store());
        let refs = self.fanout.shown_by(controller, self.ns).flat_map(move |(ns, name)| {
            let concerned = in_namespace(&index, &ns)
                .into_iter()
                .filter(|r| store.get(r).is_none_or(|o| o.0.as_ref().is_ok_and(|k| k.concerned_by(controller, &name))));
            futures::stream::iter(concerned.collect::<Vec<_>>())
        });
        self.controller = self.controller.reconcile_on(refs);
        self
    }

    /// The pods that have not finished (metadata only), feeding the cache; every resource in a namespace is
    /// reconciled when a pod of it comes, goes, or changes its labels or crmguard's annotations (not on the
    /// status updates that make up most pod changes).
    fn pods(mut self) -> Self {
        let cfg = WatcherConfig::default().fields(UNFINISHED_PODS);
        let events = watches::events(api::<PartialObjectMeta<Pod>>(self.client, self.ns), cfg, self.restarts);
        let events = feeding(self.cache, cache::PODS, self.ns, events);
        let index = self.index.clone();
        let refs =
            changes(events, cache::pod_digest).flat_map(move |ns| futures::stream::iter(in_namespace(&index, &ns)));
        self.controller = self.controller.reconcile_on(refs);
        self
    }
}

/// A kind's resources by namespace (name -> resourceVersion), as its own watch shows them (as the kind's store
/// holds them: a re-list takes effect once complete). A pod or ServiceAccount event finds the resources of its
/// namespace here without going through every resource of the kind.
#[derive(Debug, Default)]
struct ByNamespace {
    current: std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
    relisting: Option<std::collections::HashMap<String, std::collections::BTreeMap<String, String>>>,
    /// A list was complete before: a re-list's differences are changes.
    listed: bool,
}

impl ByNamespace {
    /// Takes a watch event in; returns the resources (namespace, name) that changed or went by it: the object of a
    /// change or deletion, and what a re-list (after an outage, or a 410 Gone) shows new, changed or gone once it is
    /// complete. The first list changes nothing.
    fn observe<K: Resource>(&mut self, event: &WatchEvent<K>) -> Vec<(String, String)> {
        let key = |o: &K| (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default());
        let version = |o: &K| o.meta().resource_version.clone().unwrap_or_default();
        match event {
            WatchEvent::Apply(o) => {
                let (ns, name) = key(o);
                self.current.entry(ns.clone()).or_default().insert(name.clone(), version(o));
                vec![(ns, name)]
            }
            WatchEvent::Delete(o) => {
                let (ns, name) = key(o);
                if let Some(names) = self.current.get_mut(&ns) {
                    names.remove(&name);
                    if names.is_empty() {
                        self.current.remove(&ns);
                    }
                }
                vec![(ns, name)]
            }
            WatchEvent::Init => {
                self.relisting = Some(Default::default());
                vec![]
            }
            WatchEvent::InitApply(o) => {
                let (ns, name) = key(o);
                self.relisting.get_or_insert_default().entry(ns).or_default().insert(name, version(o));
                vec![]
            }
            WatchEvent::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.current, listed);
                if !std::mem::replace(&mut self.listed, true) {
                    return vec![];
                }
                let differs = |a: &std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
                               b: &std::collections::HashMap<String, std::collections::BTreeMap<String, String>>| {
                    a.iter()
                        .flat_map(|(ns, names)| names.iter().map(move |(n, v)| (ns, n, v)))
                        .filter(|(ns, n, v)| b.get(*ns).and_then(|names| names.get(*n)) != Some(*v))
                        .map(|(ns, n, _)| (ns.clone(), n.clone()))
                        .collect::<std::collections::BTreeSet<_>>()
                };
                let mut changed = differs(&self.current, &old);
                changed.extend(differs(&old, &self.current));
                changed.into_iter().collect()
            }
        }
    }

    /// The resources in namespace `ns`.
    fn refs<K: Resource<DynamicType = ()>>(&self, ns: &str) -> Vec<ObjectRef<K>> {
        self.current
            .get(ns)
            .map(|names| names.keys().map(|n| ObjectRef::new(n).within(ns)).collect())
            .unwrap_or_default()
    }
}

type Index = Arc<std::sync::RwLock<ByNamespace>>;

/// The resources of namespace `ns` in `index`.
fn in_namespace<K: Resource<DynamicType = ()>>(index: &Index, ns: &str) -> Vec<ObjectRef<K>> {
    index.read().unwrap_or_else(std::sync::PoisonError::into_inner).refs(ns)
}

/// Pods that are pending or running: finished pods leave the watch (and the cache) as they finish.
const UNFINISHED_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

type WatchEvent<K> = watcher::Event<K>;
type WatchError = watcher::Error;

/// `events`, each applied to the cache's `table` first when this watch is the one that feeds it.
pub(super) fn feeding<O, S>(
    cache: &Arc<Cache>,
    table: cache::Table,
    ns: Option<&str>,
    events: S,
) -> impl Stream<Item = Result<WatchEvent<O>, WatchError>> + Send + 'static + use<O, S>
where
    O: Resource + Send + 'static,
    S: Stream<Item = Result<WatchEvent<O>, WatchError>> + Send + 'static,
{
    let feeds = cache.claim(table, ns).then(|| cache.clone());
    let scope = ns.map(str::to_string);
    events.inspect(move |e| {
        if let (Some(c), Ok(e)) = (&feeds, e) {
            c.feed(table, scope.as_deref(), e);
        }
    })
}

/// The namespaces of objects that appeared, disappeared (also across a re-list) or changed their `digest` (for
/// pods: what the cache keeps of them, labels and crmguard's annotations; a constant: only coming and going counts).
fn changes<O: Resource + Send + 'static>(
    events: impl Stream<Item = Result<WatchEvent<O>, WatchError>> + Send + 'static,
    digest: fn(&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64,
) -> impl Stream<Item = String> + Send + 'static {
    let mut seen: std::collections::HashMap<(String, String), u64> = Default::default();
    let mut listed: Option<std::collections::HashSet<(String, String)>> = None;
    events
        .map(move |e| {
            let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
            };
            let changed: Vec<String> = match e {
                Ok(WatchEvent::Apply(p) | WatchEvent::InitApply(p)) => {
                    let k = key(p.meta());
                    if let Some(l) = listed.as_mut() {
                        l.insert(k.clone());
                    }
                    let digest = digest(p.meta());
                    (seen.insert(k.clone(), digest) != Some(digest)).then_some(k.0).into_iter().collect()
                }
                Ok(WatchEvent::Delete(p)) => {
                    let k = key(p.meta());
                    seen.remove(&k);
                    vec![k.0]
                }
                Ok(WatchEvent::Init) => {
                    listed = Some(Default::default());
                    vec![]
                }
                Ok(WatchEvent::InitDone) => {
                    let listed = listed.take().unwrap_or_default();
                    let gone: Vec<(String, String)> = seen.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                    gone.into_iter().filter_map(|k| seen.remove(&k).map(|_| k.0)).collect()
                }
                Err(_) => vec![],
            };
            futures::stream::iter(changed)
        })
        .flatten()
}

/// Resolves once the store's watch has listed its objects.
pub(super) async fn listed<K: Resource<DynamicType = ()> + Clone + 'static>(store: kube::runtime::reflector::Store<K>) {
    // kube-runtime's store readiness keeps only the waker of its latest waiter, and the Controller waits on
    // the same store, so a second waiter may never be woken: poll again periodically instead.
    while tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await.is_err() {}
    tracing::debug!(kind = %K::kind(&()), "cache synced");
}

/// Builds one controller: the future that runs it, and a future that resolves once its cache is synced.
pub(super) fn controller<K>(
    ctx: Arc<Context>,
    ns: Option<&str>,
    concurrency: u16,
    restarts: &watches::Restarts,
    fanout: &watches::Fanout,
) -> Running<K>
where
    K: Reconcilable + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let writer = kube::runtime::reflector::store::Writer::<DeserializeGuard<K>>::default();
    let store = writer.as_reader();
    // managedFields are not needed and are often the larger part of an object: not kept.
    let own = watches::events(api::<DeserializeGuard<K>>(&ctx.client, ns), WatcherConfig::default(), restarts)
        .modify(|o| o.meta_mut().managed_fields = None);
    // Which versions the watch showed, once in the store: a reconcile can tell an object older than its own last
    // status write from a newer one.
    let shown = ctx.cache.clone();
    let index = Index::default();
    let indexed = index.clone();
    // Changes and deletions (a re-list's too, once complete) are passed on to the controllers that asked, after the
    // store has them.
    let passed = fanout.shown(K::CONTROLLER, ns);
    let own = kube::runtime::reflector(writer, own).inspect_ok(move |e| {
        let changed = indexed.write().unwrap_or_else(std::sync::PoisonError::into_inner).observe(e);
        for (ns, name) in changed {
            watches::pass_on(&passed, &ns, &name);
        }
        if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = e
            && let (Some(uid), Some(rv)) = (&o.meta().uid, &o.meta().resource_version)
        {
            shown.watched(K::CONTROLLER, uid, rv);
        }
    });
    let c = Controller::for_stream(own.applied_objects(), store.clone())
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .trigger_backoff(watches::WatchBackoff::default());
    let cache = ctx.cache.clone();
    let watching = Watches { client: &ctx.client, ns, restarts, cache: &cache, fanout, controller: c, index };
    let c = K::WATCHES.iter().fold(watching, |w, watch| w.add(*watch)).controller;
    let cache = store.clone();
    let ready = listed(store).boxed();
    // Per-object metric series and what the cache remembers of resources that were deleted (no reconcile runs for
    // those) are swept.
    let (swept, metrics, scope, remembered) =
        (c.store(), ctx.metrics.clone(), ns.map(str::to_string), ctx.cache.clone());
    let sweep = async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let objects = swept.state();
            let live = objects
                .iter()
                .map(|o| (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default()))
                .collect();
            metrics.retain_objects(&K::kind(&()), scope.as_deref(), &live);
            // With several watched namespaces each sweep sees only its own: the cache is swept when one namespace
            // is watched or all are.
            if remembered.single_scope() {
                remembered.retain(K::CONTROLLER, &objects.iter().filter_map(|o| o.meta().uid.clone()).collect());
            }
        }
    };
    let run = c.run(reconcile::<K>, error_policy::<K>, ctx).for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "controller event");
        }
    });
    let run = async move {
        futures::future::select(run.boxed(), sweep.boxed()).await;
    }
    .boxed();
    (run, ready, cache)
}

/// The tables of the cache: every kind a controller watches, the unfinished pods and the namespaces.
pub(super) const CACHED: [cache::Table; 9] = [
    "CronJob",
    "ConfigMap",
    "ServiceAccount",
    "Job",
    "Role",
    "RoleBinding",
    "NetworkPolicy",
    cache::PODS,
    cache::NAMESPACES,
];

pub(super) fn owns_cfg() -> WatcherConfig {
    WatcherConfig::default().labels("app.kubernetes.io/managed-by=crmguard")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn names(index: &ByNamespace, ns: &str) -> Vec<String> {
        index.refs::<ConfigMap>(ns).into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn the_namespace_index_follows_the_watch_and_takes_a_relist_once_complete() {
        let cm = |ns: &str, name: &str, rv: &str| -> ConfigMap {
            serde_json::from_value(
                serde_json::json!({"metadata": {"namespace": ns, "name": name, "resourceVersion": rv}}),
            )
            .unwrap()
        };
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        let mut index = ByNamespace::default();
        index.observe(&WatchEvent::<ConfigMap>::Init);
        assert!(index.observe(&WatchEvent::InitApply(cm("a", "x", "1"))).is_empty());
        assert!(names(&index, "a").is_empty(), "a list in progress is not yet the index");
        index.observe(&WatchEvent::InitApply(cm("a", "y", "1")));
        index.observe(&WatchEvent::InitApply(cm("b", "x", "1")));
        assert!(index.observe(&WatchEvent::<ConfigMap>::InitDone).is_empty(), "the first list changes nothing");
        assert_eq!(names(&index, "a"), ["x", "y"]);
        assert_eq!(names(&index, "b"), ["x"]);
        assert_eq!(index.refs::<ConfigMap>("a")[0].namespace.as_deref(), Some("a"));
        assert_eq!(index.observe(&WatchEvent::Apply(cm("b", "z", "2"))), [key("b", "z")]);
        assert_eq!(index.observe(&WatchEvent::Delete(cm("a", "x", "3"))), [key("a", "x")]);
        assert_eq!(names(&index, "a"), ["y"]);
        assert_eq!(names(&index, "b"), ["x", "z"]);
        // A re-list (after an outage or a 410 Gone): what changed, came or went meanwhile is passed on once it is
        // complete, what it shows as it was is not.
        index.observe(&WatchEvent::<ConfigMap>::Init);
        index.observe(&WatchEvent::InitApply(cm("b", "z", "2")));
        index.observe(&WatchEvent::InitApply(cm("b", "x", "4")));
        index.observe(&WatchEvent::InitApply(cm("c", "w", "5")));
        assert_eq!(names(&index, "a"), ["y"]);
        let changed = index.observe(&WatchEvent::<ConfigMap>::InitDone);
        assert_eq!(changed, [key("a", "y"), key("b", "x"), key("c", "w")]);
        assert!(names(&index, "a").is_empty());
        assert_eq!(names(&index, "b"), ["x", "z"]);
        assert!(!index.current.contains_key("a"), "an emptied namespace is dropped");
        assert!(names(&index, "d").is_empty());
    }

    /// A ServiceAccount (any object watched for its coming and going) that came while the watch restarted is seen in
    /// the re-list; one that went, when the re-list is complete; one that only changed is not.
    #[tokio::test]
    async fn coming_and_going_is_seen_across_a_relist() {
        let sa = |ns: &str, name: &str, label: &str| -> PartialObjectMeta<k8s_openapi::api::core::v1::ServiceAccount> {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"namespace": ns, "name": name, "labels": {"l": label}}
            }))
            .unwrap()
        };
        let events = vec![
            Ok(WatchEvent::Init),
            Ok(WatchEvent::InitApply(sa("a", "x", "1"))),
            Ok(WatchEvent::InitDone),
            Ok(WatchEvent::Apply(sa("a", "x", "2"))),
            Ok(WatchEvent::Init),
            Ok(WatchEvent::InitApply(sa("b", "y", "1"))),
            Ok(WatchEvent::InitDone),
        ];
        let seen: Vec<String> = changes(futures::stream::iter(events), |_| 0).collect().await;
        assert_eq!(seen, ["a", "b", "a"], "listed, came in the re-list, went with it (not: changed)");
    }

    #[test]
    fn what_is_passed_on_reaches_the_receivers_of_its_controller_and_scope_and_a_dropped_one_is_left_out() {
        let fanout = watches::Fanout::default();
        let scope = Some("crm");
        let (mut kept, dropped) = (fanout.shown_by("backuppolicy", scope), fanout.shown_by("backuppolicy", scope));
        let mut other = fanout.shown_by("networkguard", scope);
        let mut elsewhere = fanout.shown_by("backuppolicy", Some("other"));
        drop(dropped);
        let shown = fanout.shown("backuppolicy", scope);
        watches::pass_on(&shown, "crm", "crm-db");
        assert_eq!(shown.lock().unwrap().len(), 1, "the dropped receiver is left out");
        assert_eq!(kept.try_recv().unwrap(), ("crm".to_string(), "crm-db".to_string()));
        assert!(other.try_recv().is_err(), "another controller's receiver gets nothing");
        assert!(elsewhere.try_recv().is_err(), "nor does the same controller's of another watched namespace");
    }
}
