//! Prometheus metrics of the operator. Controller metrics carry no object names. Per-object gauges (backup
//! age and size, credential expiry, quarantined pods, readiness) carry `namespace` and `name` (plus `team` or
//! `kind`): one series per crmguard resource, replaced on every reconcile and removed with the resource, so the
//! cardinality is that of the resources themselves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    controller: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerbLabel {
    verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    category: String,
}

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
/// (kind, namespace, name) -> the series that object set.
type Owned = BTreeMap<(String, String, String), Vec<(&'static str, Labels)>>;

/// Per-object gauges: (metric name without prefix, help). Controllers may set only these.
pub const OBJECT_GAUGES: [(&str, &str); 14] = [
    ("resource_ready", "1 when the resource's Ready condition is True, else 0 (labels: kind, namespace, name)"),
    ("backup_last_success_timestamp_seconds", "Completion time of the newest verified backup of a CrmBackupPolicy"),
    ("backup_last_success_size_bytes", "Stored size of the newest verified backup"),
    ("backup_last_success_duration_seconds", "Duration of the newest verified backup, verification included"),
    ("backup_last_failure_timestamp_seconds", "Time of the newest failed backup run"),
    ("backup_rpo_seconds", "The policy's RPO: the newest verified backup should never be older than this"),
    ("backup_healthy", "1 while BackupHealthy is True (a verified backup within the RPO, last run fine), else 0"),
    ("restore_last_verified_timestamp_seconds", "Time of the newest verified restore drill of a CrmBackupPolicy"),
    ("credentials_expiry_timestamp_seconds", "When a team's current database credential lease ends (label team)"),
    ("quarantined_pods", "Pods a NetworkGuard currently isolates"),
    ("posture_score", "Security posture score of a namespace, 0-100 (name: the PolicyReport, crmguard)"),
    ("posture_findings", "Posture findings of a namespace by result (fail, warn, pass, skip)"),
    ("access_entries", "Audit entries an AccessMonitor has read from its database's log"),
    ("access_findings", "Findings an AccessMonitor has made (status.findingCount)"),
];

/// The Kubernetes verb of an API request: a GET is `watch` with `watch=true`, else `list` or `get` by whether
/// its path names an object (an odd number of segments after the group/version: `.../pods` vs `.../pods/x`).
pub fn api_verb(method: &http::Method, uri: &http::Uri) -> &'static str {
    match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        http::Method::GET if uri.query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1")) => {
            "watch"
        }
        http::Method::GET => {
            let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
            // /api/v1/..., /apis/group/v1/...
            let rest = match segments.first() {
                Some(&"api") => segments.get(2..).unwrap_or_default(),
                Some(&"apis") => segments.get(3..).unwrap_or_default(),
                _ => return "nonresource", // /version (the contact probe), /healthz
            };
            // namespaces/<ns>/<plural>[/<name>[/<sub>]] or <plural>[/<name>[/<sub>]]
            let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
            if rest.len() >= 2 { "get" } else { "list" }
        }
        _ => "other",
    }
}

/// One sample of a per-object gauge: metric (from [`OBJECT_GAUGES`]), extra labels, value.
pub type ObjectSample = (&'static str, Vec<(&'static str, String)>, f64);

/// The operator's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    writes: Family<WriteLabels, Counter>,
    requests: Family<VerbLabel, Counter>,
    alerts: Family<ResultLabel, Counter>,
    leader: Gauge,
    objects: Arc<HashMap<&'static str, Family<Labels, FloatGauge>>>,
    /// The series each object set last time: (kind, namespace, name) -> (metric, labels).
    owned: Arc<Mutex<Owned>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("crmguard");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let leader = Gauge::default();
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register("reconcile", "Reconciles started, per controller", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried, per controller and category",
            errors.clone(),
        );
        registry.register("reconcile_duration_seconds", "Duration of reconciles, per controller", durations.clone());
        registry.register(
            "writes",
            "Write requests to the Kubernetes API, per controller and action (apply, prune, status)",
            writes.clone(),
        );
        let requests = Family::<VerbLabel, Counter>::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API, per verb (get, list, watch, create, update, patch, delete; nonresource \
             for /version)",
            requests.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let alerts = Family::<ResultLabel, Counter>::default();
        registry.register(
            "alerts",
            "Alerts posted to Alertmanager, by result (sent: alerts delivered; failed: posts no Alertmanager took)",
            alerts.clone(),
        );
        let mut objects = HashMap::new();
        for (name, help) in OBJECT_GAUGES {
            let family = Family::<Labels, FloatGauge>::default();
            registry.register(name, help, family.clone());
            objects.insert(name, family);
        }
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            errors,
            durations,
            writes,
            requests,
            alerts,
            leader,
            objects: Arc::new(objects),
            owned: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, controller: &str) {
        self.reconciles.get_or_create(&ControllerLabel { controller: controller.into() }).inc();
    }
    pub fn failed(&self, controller: &str, category: &str) {
        self.errors.get_or_create(&ErrorLabels { controller: controller.into(), category: category.into() }).inc();
    }
    pub fn observe_duration(&self, controller: &str, d: Duration) {
        self.durations.get_or_create(&ControllerLabel { controller: controller.into() }).observe(d.as_secs_f64());
    }
    pub fn wrote(&self, controller: &str, action: &str, n: usize) {
        self.writes
            .get_or_create(&WriteLabels { controller: controller.into(), action: action.into() })
            .inc_by(n as u64);
    }
    /// Counts alerts delivered (`sent`) or posts refused (`failed`).
    pub fn alerted(&self, result: &str, n: usize) {
        self.alerts.get_or_create(&ResultLabel { result: result.into() }).inc_by(n as u64);
    }
    /// Counts a request to the Kubernetes API (see [`api_verb`]).
    pub fn requested(&self, verb: &'static str) {
        self.requests.get_or_create(&VerbLabel { verb: verb.into() }).inc();
    }
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
    /// Replaces the per-object series of one resource with `samples` (series it no longer sets disappear).
    pub fn set_object(&self, kind: &str, namespace: &str, name: &str, samples: &[ObjectSample]) {
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        let mut fresh = Vec::new();
        for (metric, extra, value) in samples {
            let Some(family) = self.objects.get(metric) else { continue };
            let mut labels: Labels = vec![("namespace".into(), namespace.into()), ("name".into(), name.into())];
            labels.extend(extra.iter().map(|(k, v)| ((*k).to_string(), v.clone())));
            family.get_or_create(&labels).set(*value);
            fresh.push((*metric, labels));
        }
        let mut owned = self.owned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (metric, labels) in owned.remove(&key).unwrap_or_default() {
            if !fresh.contains(&(metric, labels.clone()))
                && let Some(family) = self.objects.get(metric)
            {
                family.remove(&labels);
            }
        }
        owned.insert(key, fresh);
    }

    /// Removes the series of resources of `kind` (in namespace `scope`, or all) that no longer exist (`live`:
    /// their namespace/name).
    pub fn retain_objects(&self, kind: &str, scope: Option<&str>, live: &BTreeSet<(String, String)>) {
        let mut owned = self.owned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        owned.retain(|(k, ns, n), series| {
            let keep = k != kind || scope.is_some_and(|s| s != ns) || live.contains(&(ns.clone(), n.clone()));
            if !keep {
                for (metric, labels) in series.iter() {
                    if let Some(family) = self.objects.get(metric) {
                        family.remove(labels);
                    }
                }
            }
            keep
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_their_kubernetes_verb() {
        let get = http::Method::GET;
        let cases = [
            (&get, "/api/v1/namespaces/a/pods", "list"),
            (&get, "/api/v1/namespaces/a/pods/web-0", "get"),
            (&get, "/api/v1/namespaces/a", "get"),
            (&get, "/api/v1/namespaces", "list"),
            (&get, "/api/v1/pods?watch=true&resourceVersion=5", "watch"),
            (&get, "/apis/crmguard.io/v1alpha1/namespaces/a/networkguards/g/status", "get"),
            (&get, "/apis/rbac.authorization.k8s.io/v1/clusterroles/x", "get"),
            (&get, "/version", "nonresource"),
            (&http::Method::PATCH, "/apis/networking.k8s.io/v1/namespaces/a/networkpolicies/p", "patch"),
            (&http::Method::DELETE, "/api/v1/namespaces/a/configmaps/c", "delete"),
        ];
        for (m, uri, verb) in cases {
            assert_eq!(api_verb(m, &uri.parse().unwrap()), verb, "{uri}");
        }
    }

    #[test]
    fn renders_counters_with_controller_labels() {
        let m = Metrics::default();
        m.reconciled("networkguard");
        m.reconciled("networkguard");
        m.failed("networkguard", "apiserver");
        m.observe_duration("networkguard", Duration::from_millis(20));
        let text = m.render();
        assert!(text.contains("crmguard_reconcile_total{controller=\"networkguard\"} 2"), "{text}");
        assert!(
            text.contains("crmguard_reconcile_errors_total{controller=\"networkguard\",category=\"apiserver\"} 1"),
            "{text}"
        );
        assert!(text.contains("crmguard_reconcile_duration_seconds_count{controller=\"networkguard\"} 1"), "{text}");
    }

    #[test]
    fn object_series_are_replaced_and_removed_with_their_resource() {
        let m = Metrics::default();
        let team = |t: &str, v: f64| ("credentials_expiry_timestamp_seconds", vec![("team", t.to_string())], v);
        m.set_object("AccessPolicy", "crm", "ap", &[team("sales", 10.0), team("finance", 20.0)]);
        let text = m.render();
        let series = "crmguard_credentials_expiry_timestamp_seconds{namespace=\"crm\",name=\"ap\",team=\"sales\"} 10";
        assert!(text.contains(series), "{text}");
        // finance lost its credentials: its series goes; sales is updated.
        m.set_object("AccessPolicy", "crm", "ap", &[team("sales", 11.0)]);
        let text = m.render();
        assert!(!text.contains("team=\"finance\""), "{text}");
        assert!(text.contains("team=\"sales\"} 11"), "{text}");
        m.set_object("NetworkGuard", "crm", "ng", &[("quarantined_pods", vec![], 2.0)]);
        m.retain_objects("AccessPolicy", Some("other"), &BTreeSet::new());
        assert!(m.render().contains("team=\"sales\"} 11"), "another namespace's sweep leaves it");
        m.retain_objects("AccessPolicy", None, &BTreeSet::new());
        let text = m.render();
        assert!(!text.contains("crmguard_credentials_expiry_timestamp_seconds{"), "{text}");
        assert!(text.contains("crmguard_quarantined_pods{namespace=\"crm\",name=\"ng\"} 2"), "{text}");
    }
}
