//! Prometheus metrics of the operator. Labels never carry object names, so cardinality stays bounded.

use std::sync::Arc;
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
struct WriteLabels {
    controller: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    category: String,
}

/// The operator's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    writes: Family<WriteLabels, Counter>,
    leader: Gauge,
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
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Metrics { registry: Arc::new(registry), reconciles, errors, durations, writes, leader }
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
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
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
}
