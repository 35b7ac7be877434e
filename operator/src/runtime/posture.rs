//! The posture writer: every interval, one policy report (name `crmguard`; OpenReports' `Report` where served,
//! else `wgpolicyk8s.io/v1alpha2` PolicyReport, see `k8s::reports`) per namespace that holds crmguard resources,
//! computed from the controllers' caches, written only when a result changed; removed when the namespace's last
//! crmguard resource goes. Scores also go to /metrics. Clusters without either CRD still get the metrics and
//! `crmguard report`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::api::{AccessPolicy, CrmBackupPolicy, NetworkGuard};
use crate::k8s::reports::{self, ReportKind};
use crate::metrics::Metrics;
use crate::posture::{self, Inputs, Outcome};

/// The controllers' caches (one per watched namespace, or one for all).
#[derive(Default)]
pub struct Stores {
    pub backups: Vec<Store<DeserializeGuard<CrmBackupPolicy>>>,
    pub guards: Vec<Store<DeserializeGuard<NetworkGuard>>>,
    pub access: Vec<Store<DeserializeGuard<AccessPolicy>>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stores")
    }
}

/// The objects of `stores` by namespace, shared with the stores (not copied).
fn by_namespace<K: Clone + kube::Resource<DynamicType = ()>>(
    stores: &[Store<DeserializeGuard<K>>],
) -> BTreeMap<String, Vec<Arc<DeserializeGuard<K>>>> {
    let mut by_ns: BTreeMap<String, Vec<Arc<DeserializeGuard<K>>>> = BTreeMap::new();
    for o in stores.iter().flat_map(Store::state) {
        by_ns.entry(o.namespace().unwrap_or_default()).or_default().push(o);
    }
    by_ns
}

/// The resources the caches hold, by namespace; a namespace's [`Inputs`] (copies of its valid resources) are
/// made when it is assessed, so a pass holds copies of one namespace at a time.
struct Held {
    backups: BTreeMap<String, Vec<Arc<DeserializeGuard<CrmBackupPolicy>>>>,
    guards: BTreeMap<String, Vec<Arc<DeserializeGuard<NetworkGuard>>>>,
    access: BTreeMap<String, Vec<Arc<DeserializeGuard<AccessPolicy>>>>,
}

impl Held {
    fn of(stores: &Stores) -> Held {
        Held {
            backups: by_namespace(&stores.backups),
            guards: by_namespace(&stores.guards),
            access: by_namespace(&stores.access),
        }
    }

    /// Every namespace with crmguard resources.
    fn namespaces(&self) -> BTreeSet<String> {
        self.backups.keys().chain(self.guards.keys()).chain(self.access.keys()).cloned().collect()
    }

    fn inputs(&self, namespace: &str) -> Inputs {
        fn valid<K: Clone>(held: &BTreeMap<String, Vec<Arc<DeserializeGuard<K>>>>, ns: &str) -> Vec<K> {
            held.get(ns).into_iter().flatten().filter_map(|o| o.0.as_ref().ok().cloned()).collect()
        }
        Inputs {
            namespace: namespace.to_string(),
            backups: valid(&self.backups, namespace),
            guards: valid(&self.guards, namespace),
            access: valid(&self.access, namespace),
            with_status: true,
        }
    }
}

/// Results without their timestamps, to tell a real change from the clock moving.
fn comparable(report: &Value) -> Value {
    let mut r = report.clone();
    if let Some(results) = r["results"].as_array_mut() {
        for x in results {
            if let Some(o) = x.as_object_mut() {
                o.remove("timestamp");
            }
        }
    }
    serde_json::json!([r["results"], r["summary"], r["metadata"]["annotations"]["crmguard.io/score"]])
}

/// Runs until the process ends.
pub async fn run(
    client: Client,
    stores: Stores,
    metrics: Metrics,
    audit: crate::audit::Auditor,
    every: Duration,
    reread: Duration,
    now: fn() -> jiff::Timestamp,
) {
    // The namespaces written to, and the report kind used there.
    let mut reported: BTreeMap<String, ReportKind> = BTreeMap::new();
    // What each namespace's report held when it was last read or written: while the assessment is the same, the
    // report is read again only after `reread` (to repair an edit by someone else).
    let mut known: BTreeMap<String, (Value, tokio::time::Instant)> = BTreeMap::new();
    let mut missing_crd_logged = false;
    loop {
        tokio::time::sleep(every).await;
        // Passes are counted as the posture controller's reconciles (`crmguard_reconcile_total`).
        metrics.reconciled("posture");
        let held = Held::of(&stores);
        let all = held.namespaces();
        let t = now();
        // Which report CRD is served, asked once per pass and only when a report is to be read.
        let mut served: Option<Option<ReportKind>> = None;
        for ns in &all {
            let report = posture::assess(&held.inputs(ns), t);
            let mut samples = vec![("posture_score", vec![], f64::from(report.score))];
            for o in [Outcome::Fail, Outcome::Warn, Outcome::Pass, Outcome::Skip] {
                samples.push(("posture_findings", vec![("result", o.as_str().to_string())], report.count(o) as f64));
            }
            metrics.set_object("PolicyReport", ns, "crmguard", &samples);
            let desired = posture::policy_report(&report, t);
            let wanted = comparable(&desired);
            if known.get(ns).is_some_and(|(held, at)| *held == wanted && at.elapsed() < reread) {
                continue;
            }
            if served.is_none() {
                served = match reports::served(&client).await {
                    Ok(kind) => Some(kind),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot tell whether a policy report CRD is installed");
                        break;
                    }
                };
            }
            let Some(Some(kind)) = served else {
                // No report CRD: asked again at the next pass (one request for every namespace; a 404 of a
                // report would not tell a missing CRD from a missing report).
                if !missing_crd_logged {
                    tracing::warn!("{}", reports::NOT_SERVED);
                    missing_crd_logged = true;
                }
                continue;
            };
            let api = kind.api(&client, ns);
            let current = match api.get_opt("crmguard").await {
                Ok(c) => c.and_then(|c| serde_json::to_value(c).ok()),
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, kind = kind.kind, "cannot read the posture report");
                    continue;
                }
            };
            let before = reported.insert(ns.clone(), kind);
            if current.as_ref().is_some_and(|c| comparable(c) == wanted) {
                known.insert(ns.clone(), (wanted, tokio::time::Instant::now()));
                continue;
            }
            match api
                .patch("crmguard", &PatchParams::apply("crmguard/posture").force(), &Patch::Apply(&kind.stamp(desired)))
                .await
            {
                Ok(_) => {
                    known.insert(ns.clone(), (wanted, tokio::time::Instant::now()));
                    metrics.wrote("posture", "apply", 1);
                    let why = format!("score {}, {} failed", report.score, report.count(Outcome::Fail));
                    audit.record("posture", "apply", kind.kind, ns, "crmguard", &why);
                    // Written as the other kind before (the cluster's report CRDs changed): that one goes.
                    if let Some(old) = before.filter(|k| *k != kind)
                        && old.api(&client, ns).delete("crmguard", &DeleteParams::default()).await.is_ok()
                    {
                        audit.record("posture", "delete", old.kind, ns, "crmguard", "written as another kind now");
                    }
                    tracing::info!(namespace = %ns, score = report.score, fail = report.count(Outcome::Fail), "posture report written");
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, kind = kind.kind, "cannot write the posture report")
                }
            }
        }
        drop(held);
        let live: BTreeSet<(String, String)> = all.iter().map(|ns| (ns.clone(), "crmguard".to_string())).collect();
        metrics.retain_objects("PolicyReport", None, &live);
        known.retain(|ns, _| all.contains(ns));
        for (ns, kind) in reported.clone().iter().filter(|(ns, _)| !all.contains(*ns)) {
            match kind.api(&client, ns).delete("crmguard", &DeleteParams::default()).await {
                Ok(_) => {
                    metrics.wrote("posture", "delete", 1);
                    audit.record("posture", "delete", kind.kind, ns, "crmguard", "no crmguard resources left");
                    reported.remove(ns);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    reported.remove(ns);
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, kind = kind.kind, "cannot delete the posture report")
                }
            }
        }
    }
}
