//! `crmguard run`: one kube-runtime Controller per kind, leader election, metrics and health endpoints,
//! graceful shutdown.

mod controller;
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
use futures::{FutureExt, StreamExt};
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Config as WatcherConfig;
use kube::{Client, Resource};

use k8s_openapi::api::core::v1::Namespace;

use crate::api::{AccessMonitor, AccessPolicy, CrmBackupPolicy, CrmRestore, NetworkGuard};
use crate::controllers::BuildContext;
use crate::controllers::contract::Context;
use crate::k8s::cache::{self, Cache};
use crate::metrics;
use controller::{CACHED, controller, feeding, listed};

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
    /// Where AccessMonitors' findings and incidents are alerted.
    pub alertmanagers: Option<crate::alerting::Alertmanagers>,
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
            "AccessMonitor" => "accessmonitors.crmguard.io",
            _ => "networkguards.crmguard.io",
        })),
        Err(e) => Err(RunError::Startup("custom resources", e)),
    }
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
    check_crd::<AccessMonitor>(&client).await?;
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
            let (auditor, access_rx) = auditor.with_access_stream();
            tracing::info!(stream = %shipping.stream, location = %shipping.store.describe(&shipping.prefix), "shipping the audit trail");
            let access =
                crate::audit::Shipping { stream: crate::audit::access_stream(&shipping.stream), ..shipping.clone() };
            tokio::spawn(crate::audit::ship(shipping, rx));
            tokio::spawn(crate::audit::ship(access, access_rx));
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
        access_policies: Default::default(),
        alertmanagers: opts.alertmanagers.clone(),
        reports: Default::default(),
        started: std::time::Instant::now(),
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
        let (r, ready, _) = controller::<AccessMonitor>(ctx.clone(), ns, opts.concurrency, &restarts, &fanout);
        runs.push(r);
        readies.push(ready);
    }
    let (listing, policies) = (stores.access.clone(), ctx.clone());
    tokio::spawn(async move {
        futures::future::join_all(listing.iter().cloned().map(listed)).await;
        let _ = policies.access_policies.set(listing);
    });
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
