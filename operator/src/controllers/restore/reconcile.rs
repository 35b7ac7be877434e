//! CrmRestore: resolve the policy -> validate -> the restore Job -> phase from the Job's status.

use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use serde_json::json;

use super::{build, validate};
use crate::api::condition::Status;
use crate::api::{CrmBackupPolicy, CrmRestore};
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

impl Reconcilable for CrmRestore {
    const CONTROLLER: &'static str = "restore";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let ns = self.metadata.namespace.clone().unwrap_or_default();
        let policies: Api<CrmBackupPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        let policy = policies.get_opt(&self.spec.policy_ref.name).await?;
        let v = match validate::validate(self, policy.as_ref()) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let job = build::build(&v, &ctx.build);
        let job_name = job.metadata.name.clone().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
        let status = jobs.get_opt(&job_name).await?.and_then(|j| j.status).unwrap_or_default();
        let (phase, cond) = if status.succeeded.unwrap_or(0) > 0 {
            ("Succeeded", Cond::new("Restored", Status::True, "Succeeded", "the restore Job completed"))
        } else if status.failed.unwrap_or(0) > 0 {
            (
                "Failed",
                Cond::new("Restored", Status::False, "JobFailed", format!("Job {job_name} failed; see its logs")),
            )
        } else if status.active.unwrap_or(0) > 0 {
            ("Running", Cond::new("Restored", Status::False, "Running", format!("Job {job_name} is running")))
        } else {
            ("Pending", Cond::new("Restored", Status::False, "Pending", format!("Job {job_name} has not started")))
        };
        let mut d = Desired {
            owner: Some(v.owner.clone()),
            children: serde_json::to_value(&job).ok().into_iter().collect(),
            prune: vec![("batch/v1", "Job")],
            required: vec!["Restored"],
            ..Desired::default()
        };
        d.conditions.push(cond);
        d.status.insert("phase".into(), json!(phase));
        d.status.insert("jobName".into(), json!(job_name));
        if let Some(t) = status.start_time {
            d.status.insert("startTime".into(), json!(t.0.to_string()));
        }
        if let Some(t) = status.completion_time {
            d.status.insert("completionTime".into(), json!(t.0.to_string()));
        }
        Ok(Ok(d))
    }
}
