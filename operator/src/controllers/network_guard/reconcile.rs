//! NetworkGuard: validate -> build -> policies applied; status counts the pods the guard covers.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::{build, validate};
use crate::api::NetworkGuard;
use crate::api::condition::Status;
use crate::k8s::selector::to_query;
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

impl Reconcilable for NetworkGuard {
    const CONTROLLER: &'static str = "networkguard";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let policies = build::build(&v);
        let names: Vec<String> = policies.iter().filter_map(|p| p.metadata.name.clone()).collect();
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
        let covered = pods.list(&ListParams::default().labels(&to_query(&self.spec.pod_selector))).await?.items.len();
        let mut d = Desired {
            owner: Some(v.owner.clone()),
            children: policies.iter().filter_map(|p| serde_json::to_value(p).ok()).collect(),
            prune: vec![("networking.k8s.io/v1", "NetworkPolicy")],
            required: vec!["PoliciesApplied"],
            ..Desired::default()
        };
        d.conditions.push(Cond::new(
            "PoliciesApplied",
            Status::True,
            "Applied",
            format!("{} NetworkPolicies in effect", names.len()),
        ));
        d.status.insert("policies".into(), json!(names));
        d.status.insert("coveredPods".into(), json!(covered));
        Ok(Ok(d))
    }
}
