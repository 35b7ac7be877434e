//! `crmguard run`: one kube-runtime Controller per kind, leader election, metrics and health endpoints,
//! graceful shutdown.

pub mod http;
pub mod leader;
pub mod posture;
pub mod reconcile;
pub mod watches;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Config as WatcherConfig};
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Client, Resource};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::api::{AccessPolicy, CrmBackupPolicy, CrmRestore, NetworkGuard};
use crate::controllers::BuildContext;
use crate::controllers::contract::{Context, Other, Reconcilable, Watch};
use crate::k8s::cache::{self, Cache};
use crate::metrics;
use reconcile::{error_policy, reconcile};

/// Options of `crmguard run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// This replica's name (the pod's): in the User-Agent of every request, and the lease holder's identity.
    pub identity: String,
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
    /// Address of the metrics/health server.
    pub http_addr: SocketAddr,
    /// Leader election lease; None disables leader election (single replica only).
    pub lease: Option<leader::LeaseConfig>,
    pub build: BuildContext,
    /// Steady-state requeue interval.
    pub resync: Duration,
    /// How often the posture PolicyReports are recomputed.
    pub posture_every: Duration,
    /// Where audit segments go (the log gets every record regardless).
    pub audit: Option<crate::audit::Shipping>,
    /// How the operator logs in to Vault (AccessPolicy); the address is `build.vault_addr` unless a policy
    /// names its own.
    pub vault_auth: crate::vault::admin::OperatorAuth,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "the API server refused crmguard's credentials: {0}. Check the kubeconfig, or the ServiceAccount token the \
         pod mounts"
    )]
    Unauthorized(#[source] kube::Error),
    #[error(
        "the {0} CustomResourceDefinition is not installed (the API answers 404 for it). Install the CRDs with \
         `kubectl apply -f crds/` (or `crmguard crd | kubectl apply -f -`, or the Helm chart), then start crmguard again"
    )]
    CrdMissing(&'static str),
    #[error("cannot list {0}: {1}")]
    Startup(&'static str, #[source] kube::Error),
    #[error(
        "the API server runs Kubernetes {0}, older than {MIN_KUBERNETES}, the oldest version crmguard supports: its \
         CRDs use validation rules that older API servers cannot enforce. Upgrade the cluster, or run a crmguard \
         release that supports {0}"
    )]
    UnsupportedKubernetes(String),
    #[error("the API server reports a version that is not major.minor: {0}")]
    UnknownKubernetes(String),
    #[error("cannot serve metrics and health on {0}: {1}")]
    Http(SocketAddr, #[source] std::io::Error),
    #[error(
        "lost leadership: {0}; exiting so that only one replica writes (restarted, it waits for the API server and \
         stands for leadership again)"
    )]
    LostLease(String),
}

/// The oldest Kubernetes minor version crmguard supports (the chart's `kubeVersion`, the README and
/// e2e/kube/oldest say the same; a test keeps them in step). The CRDs' CEL rules use the CIDR/IP and URL
/// libraries (1.31+), and the operator is built against the 1.33 API.
pub const MIN_KUBERNETES: KubeVersion = KubeVersion { major: 1, minor: 33 };

/// A Kubernetes major.minor version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl KubeVersion {
    /// Reads `/version`'s major and minor, as providers report them (`"1"`, `"33+"`).
    pub fn parse(major: &str, minor: &str) -> Option<KubeVersion> {
        let num = |s: &str| s.trim_end_matches('+').parse().ok();
        Some(KubeVersion { major: num(major)?, minor: num(minor)? })
    }
}

/// Refuses an API server older than [`MIN_KUBERNETES`].
pub fn check_kubernetes_version(info: &k8s_openapi::apimachinery::pkg::version::Info) -> Result<KubeVersion, RunError> {
    let v = KubeVersion::parse(&info.major, &info.minor).ok_or_else(|| {
        RunError::UnknownKubernetes(format!("{:?}.{:?} ({})", info.major, info.minor, info.git_version))
    })?;
    if v < MIN_KUBERNETES {
        return Err(RunError::UnsupportedKubernetes(info.git_version.clone()));
    }
    Ok(v)
}

async fn check_crd<K>(client: &Client) -> Result<(), RunError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api: Api<DeserializeGuard<K>> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(RunError::CrdMissing(match K::kind(&()).as_ref() {
            "CrmBackupPolicy" => "crmbackuppolicies.crmguard.io",
            "CrmRestore" => "crmrestores.crmguard.io",
            "AccessPolicy" => "accesspolicies.crmguard.io",
            _ => "networkguards.crmguard.io",
        })),
        Err(e) => Err(RunError::Startup("custom resources", e)),
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

type Running<K> =
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
        let store = self.controller.store();
        let events = self.labelled::<C, PartialObjectMeta<C>>().filter_map(|e| {
            futures::future::ready(match e {
                Ok(WatchEvent::Apply(o) | WatchEvent::Delete(o)) => o.metadata.namespace,
                _ => None,
            })
        });
        let refs = events.flat_map(move |ns| futures::stream::iter(in_namespace(&store, &ns)));
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
        }
    }

    /// The pods that have not finished (metadata only), feeding the cache; every resource in a namespace is
    /// reconciled when a pod of it comes, goes, or changes its labels or crmguard's annotations (not on the
    /// status updates that make up most pod changes).
    fn pods(mut self) -> Self {
        let cfg = WatcherConfig::default().fields(UNFINISHED_PODS);
        let events = watches::events(api::<PartialObjectMeta<Pod>>(self.client, self.ns), cfg, self.restarts);
        let events = feeding(self.cache, cache::PODS, self.ns, events);
        let store = self.controller.store();
        let refs = pod_changes(events).flat_map(move |ns| futures::stream::iter(in_namespace(&store, &ns)));
        self.controller = self.controller.reconcile_on(refs);
        self
    }
}

/// The resources of `store` in namespace `ns`.
fn in_namespace<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &kube::runtime::reflector::Store<K>,
    ns: &str,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Pods that are pending or running: finished pods leave the watch (and the cache) as they finish.
const UNFINISHED_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

type WatchEvent<K> = watcher::Event<K>;
type WatchError = watcher::Error;

/// `events`, each applied to the cache's `table` first when this watch is the one that feeds it.
fn feeding<O, S>(
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

/// The namespaces of pods that appeared, disappeared (also across a re-list) or changed what the cache keeps
/// of them (labels, crmguard's annotations).
fn pod_changes(
    events: impl Stream<Item = Result<WatchEvent<PartialObjectMeta<Pod>>, WatchError>> + Send + 'static,
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
                    let k = key(&p.metadata);
                    if let Some(l) = listed.as_mut() {
                        l.insert(k.clone());
                    }
                    let digest = cache::pod_digest(&p.metadata);
                    (seen.insert(k.clone(), digest) != Some(digest)).then_some(k.0).into_iter().collect()
                }
                Ok(WatchEvent::Delete(p)) => {
                    let k = key(&p.metadata);
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
async fn listed<K: Resource<DynamicType = ()> + Clone + 'static>(store: kube::runtime::reflector::Store<K>) {
    // kube-runtime's store readiness keeps only the waker of its latest waiter, and the Controller waits on
    // the same store, so a second waiter may never be woken: poll again periodically instead.
    while tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await.is_err() {}
    tracing::debug!(kind = %K::kind(&()), "cache synced");
}

/// Builds one controller: the future that runs it, and a future that resolves once its cache is synced.
fn controller<K>(
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
    let own = kube::runtime::reflector(writer, own).inspect_ok(move |e| {
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
    let watching = Watches { client: &ctx.client, ns, restarts, cache: &cache, fanout, controller: c };
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
const CACHED: [cache::Table; 9] = [
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

fn owns_cfg() -> WatcherConfig {
    WatcherConfig::default().labels("app.kubernetes.io/managed-by=crmguard")
}

/// Runs the operator until SIGTERM/SIGINT (Ok) or a fatal error.
pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let mut config = kube::Config::infer().await.map_err(|e| RunError::Client(kube::Error::InferConfig(e)))?;
    // Every request says which replica made it, so an API server's audit log tells replicas apart.
    if let Ok(agent) = hyper::header::HeaderValue::from_str(&user_agent(&opts.identity)) {
        config.headers.push((hyper::header::USER_AGENT, agent));
    }
    let metrics = metrics::Metrics::default();
    // Every request is counted by verb (crmguard_api_requests_total): the load the operator puts on the server.
    let counted = metrics.clone();
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(RunError::Client)?
        .with_layer(&tower::util::MapRequestLayer::new(move |req: ::http::Request<kube::client::Body>| {
            counted.requested(metrics::api_verb(req.method(), req.uri()));
            req
        }))
        .build();
    let health = Arc::new(http::Health::default());
    let webhook_slot = http::WebhookSlot::default();
    // Liveness answers from the start; readiness says what is awaited.
    let (bound, _http) = http::serve(opts.http_addr, metrics.clone(), health.clone(), webhook_slot.clone())
        .await
        .map_err(|e| RunError::Http(opts.http_addr, e))?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    let info = tokio::select! {
        info = wait_for_apiserver(&client) => info?,
        _ = &mut shutdown => return Ok(()),
    };
    let version = check_kubernetes_version(&info)?;
    tracing::info!(kubernetes = %info.git_version, supported = %format!(">= {MIN_KUBERNETES}"), %version, "connected to the API server");
    check_crd::<CrmBackupPolicy>(&client).await?;
    check_crd::<CrmRestore>(&client).await?;
    check_crd::<AccessPolicy>(&client).await?;
    check_crd::<NetworkGuard>(&client).await?;
    let (outage_ended, restarts) = watches::Restarts::channel();
    tokio::spawn(watches::watch_contact(client.clone(), health.clone(), outage_ended));

    let mut lost: BoxFuture<'static, String> = futures::future::pending().boxed();
    if let Some(cfg) = opts.lease.clone() {
        tracing::info!(identity = %cfg.identity, lease = %format!("{}/{}", cfg.namespace, cfg.name), "waiting for leadership");
        health.standby.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = leader::acquire(&client, &cfg) => {}
            _ = &mut shutdown => return Ok(()),
        }
        metrics.set_leader(true);
        health.standby.store(false, Ordering::Relaxed);
        tracing::info!(identity = %cfg.identity, "became leader");
        let c = client.clone();
        lost = async move { leader::hold(&c, &cfg).await }.boxed();
    }

    let audit = match opts.audit.clone() {
        Some(shipping) => {
            let (auditor, rx) = crate::audit::Auditor::shipping();
            tracing::info!(stream = %shipping.stream, location = %shipping.store.describe(&shipping.prefix), "shipping the audit trail");
            tokio::spawn(crate::audit::ship(shipping, rx));
            auditor
        }
        None => crate::audit::Auditor::default(),
    };
    // The webhook writes only now: as the leader, with the audit trail running.
    let _ = webhook_slot.set(webhook::Webhook { client: client.clone(), audit: audit.clone() });
    let cache = Arc::new(Cache::new(&CACHED, &opts.namespaces));
    // Namespaces being deleted get no writes: watched cluster-wide (metadata only).
    let namespace_events = feeding(
        &cache,
        cache::NAMESPACES,
        None,
        watches::events(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), WatcherConfig::default(), &restarts),
    );
    tokio::spawn(namespace_events.for_each(|e| async move {
        if let Err(e) = e {
            tracing::debug!(error = %e, "namespace watch");
        }
    }));
    // The grant ceiling (AccessPolicy): one ClusterRole, watched by name.
    let ceiling_events = watches::events(
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone()),
        WatcherConfig::default().fields(&format!("metadata.name={}", opts.build.access.grant_ceiling)),
        &restarts,
    );
    let fed = cache.clone();
    tokio::spawn(ceiling_events.for_each(move |e| {
        match e {
            Ok(e) => fed.feed_ceiling(&e),
            Err(e) => tracing::debug!(error = %e, "grant ceiling watch"),
        }
        futures::future::ready(())
    }));
    let ctx = Arc::new(Context {
        client: client.clone(),
        build: opts.build.clone(),
        metrics: metrics.clone(),
        recorder: crate::k8s::events::Recorder::new(
            client.clone(),
            "crmguard",
            opts.lease.as_ref().map(|l| l.identity.as_str()),
        ),
        failures: Default::default(),
        now: jiff::Timestamp::now,
        resync: opts.resync,
        vault: Arc::new(crate::vault::admin::Sessions::new(opts.vault_auth.clone(), opts.build.vault_addr.clone())),
        audit: audit.clone(),
        cache: cache.clone(),
        backup_policies: Default::default(),
    });
    let namespaces: Vec<Option<String>> =
        if opts.namespaces.is_empty() { vec![None] } else { opts.namespaces.iter().cloned().map(Some).collect() };
    let mut runs = Vec::new();
    let mut readies = Vec::new();
    let mut stores = posture::Stores::default();
    let fanout = watches::Fanout::default();
    for ns in &namespaces {
        let ns = ns.as_deref();
        let (r, ready, s) = controller::<CrmBackupPolicy>(ctx.clone(), ns, opts.concurrency, &restarts, &fanout);
        stores.backups.push(s);
        runs.push(r);
        readies.push(ready);
        let (r, ready, _) = controller::<CrmRestore>(ctx.clone(), ns, opts.concurrency, &restarts, &fanout);
        runs.push(r);
        readies.push(ready);
        let (r, ready, s) = controller::<AccessPolicy>(ctx.clone(), ns, opts.concurrency, &restarts, &fanout);
        stores.access.push(s);
        runs.push(r);
        readies.push(ready);
        let (r, ready, s) = controller::<NetworkGuard>(ctx.clone(), ns, opts.concurrency, &restarts, &fanout);
        stores.guards.push(s);
        runs.push(r);
        readies.push(ready);
    }
    let (listing, policies) = (stores.backups.clone(), ctx.clone());
    tokio::spawn(async move {
        futures::future::join_all(listing.iter().cloned().map(listed)).await;
        let _ = policies.backup_policies.set(listing);
    });
    tokio::spawn(posture::run(
        client.clone(),
        stores,
        metrics.clone(),
        audit,
        opts.posture_every,
        // A report someone else edited is repaired within ten minutes (or a resync, when that is longer).
        opts.resync.max(Duration::from_secs(600)),
        jiff::Timestamp::now,
    ));
    let h = health.clone();
    tokio::spawn(async move {
        futures::future::join_all(readies).await;
        h.ready.store(true, Ordering::Relaxed);
        tracing::info!("caches synced; ready");
    });
    let all = futures::future::join_all(runs);
    // The controllers (`all`) are dropped with the select, before the lease is released: nothing writes after.
    let stopped = tokio::select! {
        _ = all => false,
        _ = &mut shutdown => true,
        reason = &mut lost => {
            metrics.set_leader(false);
            return Err(RunError::LostLease(reason));
        }
    };
    if stopped {
        tracing::info!("shutting down");
        if let Some(cfg) = &opts.lease {
            metrics.set_leader(false);
            leader::release(&client, cfg).await;
        }
    }
    Ok(())
}

/// `crmguard/<version> (<identity>)`, with anything a header may not hold replaced by `_`.
pub fn user_agent(identity: &str) -> String {
    let id: String = identity.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    format!("crmguard/{} ({id})", env!("CARGO_PKG_VERSION"))
}

/// Asks the API server for its version until it answers: an operator started (or restarted after it gave up its
/// lease) while the API server is away waits for it, not ready but alive, instead of exiting into the kubelet's
/// growing restart back-off. Refused credentials are not worth waiting for.
async fn wait_for_apiserver(client: &Client) -> Result<k8s_openapi::apimachinery::pkg::version::Info, RunError> {
    let started = tokio::time::Instant::now();
    let mut said = None::<tokio::time::Instant>;
    loop {
        let why = match tokio::time::timeout(watches::CONTACT_EVERY, client.apiserver_version()).await {
            Ok(Ok(info)) => return Ok(info),
            Ok(Err(kube::Error::Api(s))) if s.code == 401 || s.code == 403 => {
                return Err(RunError::Unauthorized(kube::Error::Api(s)));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", watches::CONTACT_EVERY.as_secs()),
        };
        // One line now, then one every 30 s while it lasts.
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::warn!(error = %why, waited_seconds = started.elapsed().as_secs(), "waiting for the API server");
            said = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(watches::CONTACT_RETRY).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_user_agent_names_the_replica_and_stays_a_valid_header() {
        let agent = super::user_agent("crmguard-7d9f-x2k");
        assert_eq!(agent, format!("crmguard/{} (crmguard-7d9f-x2k)", env!("CARGO_PKG_VERSION")));
        let odd = super::user_agent("host\nname é");
        assert!(!odd.contains('\n') && odd.is_ascii(), "{odd}");
        assert!(hyper::header::HeaderValue::from_str(&odd).is_ok());
    }
}
