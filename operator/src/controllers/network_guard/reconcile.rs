//! NetworkGuard: validate -> build -> policies applied; status counts the pods the guard covers.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::build::QUARANTINE_LABEL;
use super::quarantine::{self, Change, PRE_QUARANTINE_LABEL};
use super::{build, validate};
use crate::api::NetworkGuard;
use crate::api::condition::Status;
use crate::api::network_guard::NetworkGuardEvent;
use crate::api::network_guard::conditions::{Covered, PoliciesApplied, Protecting, Quarantined};
use crate::controllers::contract::{Cond, Context, Desired, Error, Note, Other, Reconcilable, Watch};
use crate::k8s::apply::ObjectPatch;
use crate::k8s::meta::label_value;
use crate::netpol::selector_matches;
use crate::validation::FieldError;

impl Reconcilable for NetworkGuard {
    const CONTROLLER: &'static str = "networkguard";
    type Status = crate::api::NetworkGuardStatus;
    const WATCHES: &'static [Watch] = &[Watch::Owns(Other::NetworkPolicy), Watch::Pods];

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let policies = build::build(&v);
        let names: Vec<String> = policies.iter().filter_map(|p| p.metadata.name.clone()).collect();
        // Every pod of the CRM namespace that has not finished should be behind the guard: from the watch of such
        // pods (whose changes reconcile the guard), read from the server only until that watch has listed them.
        let running: Vec<Pod> = ctx.unfinished_pods(&v.owner.namespace).await?;
        // crmguard's own backup and restore job pods are short-lived and not the CRM: they do not count either.
        let ours = |p: &&Pod| {
            p.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/managed-by")).map(String::as_str)
                == Some(crate::k8s::meta::MANAGED_BY)
        };
        let (covered, uncovered): (Vec<&Pod>, Vec<&Pod>) = running
            .iter()
            .filter(|p| !ours(p))
            .partition(|p| selector_matches(&self.spec.pod_selector, &p.metadata.labels.clone().unwrap_or_default()));
        let mut uncovered: Vec<String> = uncovered.iter().filter_map(|p| p.metadata.name.clone()).collect();
        uncovered.sort();
        let mut d = Desired::<Self::Status> {
            owner: Some(v.owner.clone()),
            prune: vec![("networking.k8s.io/v1", "NetworkPolicy")],
            ..Desired::default()
        };
        for p in &policies {
            d.child(p)?;
        }
        d.conditions.push(Cond::new(
            PoliciesApplied::Applied,
            Status::True,
            format!("{} NetworkPolicies in effect", names.len()),
        ));
        // A guard that selects no pod protects nothing: not Ready, whatever policies exist.
        d.conditions.push(if covered.is_empty() {
            Cond::new(
                Protecting::NoPodsSelected,
                Status::False,
                "spec.podSelector selects no pod of this namespace that has not finished, so the guard protects \
                 nothing: check the selector against the CRM pods' labels (kubectl get pods --show-labels)",
            )
        } else {
            Cond::new(
                Protecting::PodsSelected,
                Status::True,
                format!("{} pod(s) selected by spec.podSelector are behind the guard", covered.len()),
            )
        });
        d.conditions.push(if uncovered.is_empty() {
            Cond::new(
                Covered::AllPodsCovered,
                Status::True,
                format!("all {} pod(s) of this namespace that have not finished are behind the guard", covered.len()),
            )
        } else {
            Cond::new(
                Covered::UncoveredPods,
                Status::False,
                format!(
                    "{} pod(s) of this namespace that have not finished (pending or running) are not selected by \
                     spec.podSelector and are not protected: {}",
                    uncovered.len(),
                    uncovered.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        });
        d.status.covered_pods = Some(count(covered.len()));
        d.status.uncovered_pods = uncovered.into_iter().take(20).collect();
        d.status.policies = names;

        // Quarantine: label the pods to isolate (the standing quarantine policy cuts them off), release expired ones.
        let now = (ctx.now)();
        let ttl = self.spec.quarantine.as_ref().zip(v.quarantine_ttl);
        let webhook_ttl = v.webhook.map(|w| w.ttl);
        // backupFirst isolations wait for the pre-quarantine backup Jobs the webhook started (gone counts as ended).
        let waits_for_backup = running.iter().any(|p| p.annotations().contains_key(quarantine::AFTER_BACKUP));
        let mut unfinished = std::collections::BTreeSet::new();
        if waits_for_backup {
            let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
            let lp = ListParams::default().labels(&format!("{}={}", PRE_QUARANTINE_LABEL, label_value(&v.owner.name)));
            for j in jobs.list(&lp).await?.items {
                let ended = j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                    c.iter().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                });
                if !ended {
                    unfinished.extend(j.metadata.name);
                }
            }
        }
        let backup_done = |job: &str| !unfinished.contains(job);
        let qp = quarantine::plan(&label_value(&v.owner.name), ttl, webhook_ttl, &backup_done, &running, now);
        for change in &qp.changes {
            let (pod, patch, event) = match change {
                Change::Isolate { pod, annotations } => {
                    let mut meta = json!({"labels": {QUARANTINE_LABEL: label_value(&v.owner.name)}});
                    if !annotations.is_empty() {
                        let mut a = json!(annotations);
                        // An isolation that waited for its backup waits no more.
                        a[quarantine::AFTER_BACKUP] = json!(null);
                        a[quarantine::BACKUP_DEADLINE] = json!(null);
                        meta["annotations"] = a;
                    }
                    let note = match annotations.get(quarantine::UNTIL) {
                        Some(until) => format!(
                            "pod {pod} isolated until {until}: {}",
                            annotations.get(quarantine::REASON).cloned().unwrap_or_default()
                        ),
                        None => format!("pod {pod} isolated again (its quarantine label had been removed)"),
                    };
                    (pod, json!({"metadata": meta}), Note::warning(NetworkGuardEvent::Quarantined, note))
                }
                Change::Release { pod, served } => {
                    let mut annotations: serde_json::Map<String, serde_json::Value> =
                        quarantine::ISOLATION_ANNOTATIONS.iter().map(|a| ((*a).to_string(), json!(null))).collect();
                    if let Some(reason) = served {
                        annotations.insert(quarantine::SERVED.into(), json!(reason));
                    }
                    (
                        pod,
                        json!({"metadata": {"labels": {QUARANTINE_LABEL: null}, "annotations": annotations}}),
                        Note::normal(NetworkGuardEvent::Released, format!("pod {pod} released from quarantine")),
                    )
                }
            };
            d.patches.push(ObjectPatch { api_version: "v1", kind: "Pod", name: pod.clone(), patch });
            d.events.push(event);
        }
        d.conditions.push(if qp.active > 0 {
            Cond::new(
                Quarantined::Isolated,
                Status::True,
                format!("{} pod(s) isolated; see status.quarantines", qp.active),
            )
        } else {
            Cond::new(Quarantined::NoneIsolated, Status::False, "no pod is isolated")
        });
        d.status.quarantined_pods = Some(count(qp.active));
        d.gauges.push(("quarantined_pods", vec![], qp.active as f64));
        d.status.quarantines = qp.records;
        if let Some(next) = qp.next_expiry {
            let wait = std::time::Duration::try_from(next.duration_since(now)).unwrap_or_default();
            d.requeue_after = Some(wait + std::time::Duration::from_secs(1));
        }
        Ok(Ok(d))
    }
}

/// A count as the status holds it.
fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
