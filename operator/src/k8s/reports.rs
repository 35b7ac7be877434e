//! Policy reports, the API that Kyverno, Falco and Policy Reporter share: OpenReports' `Report`
//! (`openreports.io/v1alpha1`, the Working Group's API as it is maintained now) where the cluster serves it, else
//! the older `PolicyReport` (`wgpolicyk8s.io/v1alpha2`). Both carry the same results and summary; crmguard writes
//! to one of them, the first that is served, asked of discovery at most once a minute.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

/// A policy-report API: group/version, kind, plural.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportKind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

/// OpenReports' namespaced report.
pub const OPEN_REPORTS: ReportKind =
    ReportKind { api_version: "openreports.io/v1alpha1", kind: "Report", plural: "reports" };
/// The Policy Working Group's namespaced report.
pub const WG_POLICY: ReportKind =
    ReportKind { api_version: "wgpolicyk8s.io/v1alpha2", kind: "PolicyReport", plural: "policyreports" };

/// In order of preference.
pub const KINDS: [ReportKind; 2] = [OPEN_REPORTS, WG_POLICY];

impl ReportKind {
    pub fn api(&self, client: &Client, namespace: &str) -> Api<DynamicObject> {
        let (group, version) = self.api_version.split_once('/').unwrap_or(("", self.api_version));
        let gvk = GroupVersionKind::gvk(group, version, self.kind);
        Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, self.plural))
    }

    /// `report` (a results/summary body) as this kind.
    pub fn stamp(&self, mut report: serde_json::Value) -> serde_json::Value {
        report["apiVersion"] = self.api_version.into();
        report["kind"] = self.kind.into();
        report
    }
}

/// The first of [`KINDS`] the API server serves, `None` when it serves none: one discovery request per kind.
pub async fn served(client: &Client) -> Result<Option<ReportKind>, kube::Error> {
    for k in KINDS {
        match client.list_api_group_resources(k.api_version).await {
            Ok(list) if list.resources.iter().any(|r| r.name == k.plural) => return Ok(Some(k)),
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Said (once) when neither CRD is served.
pub const NOT_SERVED: &str = "no policy report CRD is installed (OpenReports' reports.openreports.io, or \
                              policyreports.wgpolicyk8s.io): findings are on /metrics, in status and Events, and \
                              `crmguard report` prints the posture";

/// How long an answer of discovery is trusted: a CRD installed later is used within this.
pub const ASK_AGAIN: Duration = Duration::from_secs(60);

/// [`served`], asked at most once per [`ASK_AGAIN`] (shared by the controllers).
#[derive(Debug, Default)]
pub struct Served {
    known: Mutex<Option<(Instant, Option<ReportKind>)>>,
}

impl Served {
    pub async fn get(&self, client: &Client) -> Result<Option<ReportKind>, kube::Error> {
        let held = *self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, kind)) = held
            && at.elapsed() < ASK_AGAIN
        {
            return Ok(kind);
        }
        let kind = served(client).await?;
        *self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), kind));
        Ok(kind)
    }
}
