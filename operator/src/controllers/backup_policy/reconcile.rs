//! CrmBackupPolicy: validate -> CronJobs, ServiceAccount, config -> applied; status with the next run and the
//! backup health that the jobs reported (see `status.rs`).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::{build, status, validate};
use crate::api::CrmBackupPolicy;
use crate::api::backup_policy::TlsMode;
use crate::api::condition::Status;
use crate::controllers::schedule::next_run;
use crate::k8s::meta::{OWNER_LABEL, Owner};
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

/// The policy's Jobs (from both CronJobs, and any created by hand with `kubectl create job --from`) with the
/// reports their pods left as termination messages.
async fn observe_jobs(ctx: &Context, owner: &Owner) -> Result<Vec<status::JobObservation>, Error> {
    let selector = format!("{OWNER_LABEL}={}", owner.owner_label_value());
    let lp = ListParams::default().labels(&selector);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let job_list = jobs.list(&lp).await?;
    if job_list.items.is_empty() {
        return Ok(Vec::new());
    }
    let pod_list = pods.list(&lp).await?;
    let mut out = Vec::new();
    for job in job_list.items {
        let name = job.metadata.name.clone().unwrap_or_default();
        let labels = job.metadata.labels.clone().unwrap_or_default();
        let component = labels.get("app.kubernetes.io/component").cloned().unwrap_or_default();
        let st = job.status.clone().unwrap_or_default();
        let conditions = st.conditions.clone().unwrap_or_default();
        let finished_cond = |t: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == t && c.status == "True")
                .map(|c| (c.last_transition_time.as_ref().map(|t| t.0), c.reason.clone().unwrap_or_default()))
        };
        let complete = finished_cond("Complete");
        let failed = finished_cond("Failed");
        // The newest pod of the Job carries the report.
        let mut job_pods: Vec<&Pod> = pod_list
            .items
            .iter()
            .filter(|p| {
                let l = p.metadata.labels.clone().unwrap_or_default();
                l.get("batch.kubernetes.io/job-name").or(l.get("job-name")) == Some(&name)
            })
            .collect();
        job_pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let terminated = job_pods.last().and_then(|p| {
            p.status.as_ref()?.container_statuses.as_ref()?.iter().find_map(|c| c.state.as_ref()?.terminated.clone())
        });
        let report = terminated
            .as_ref()
            .and_then(|t| t.message.as_deref())
            .and_then(|m| serde_json::from_str::<crate::backup::cli::JobReport>(m.trim()).ok());
        let hint = terminated
            .as_ref()
            .and_then(|t| t.reason.clone())
            .filter(|r| r != "Completed" && r != "Error")
            .or_else(|| failed.as_ref().map(|f| f.1.clone()).filter(|r| !r.is_empty()));
        out.push(status::JobObservation {
            name,
            component,
            active: st.active.unwrap_or(0) > 0,
            succeeded: complete.is_some() || st.succeeded.unwrap_or(0) > 0 && failed.is_none(),
            failed: failed.is_some(),
            finished: st.completion_time.map(|t| t.0).or(complete.and_then(|c| c.0)).or(failed.and_then(|f| f.0)),
            report,
            failure_hint: hint,
        });
    }
    Ok(out)
}

impl Reconcilable for CrmBackupPolicy {
    const CONTROLLER: &'static str = "backuppolicy";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let c = build::build(&v, &ctx.build);
        let cron_job = c.backup.metadata.name.clone().unwrap_or_default();
        let mut d = Desired {
            owner: Some(v.owner.clone()),
            prune: vec![("batch/v1", "CronJob"), ("v1", "ConfigMap"), ("v1", "ServiceAccount")],
            required: vec!["ScheduleReady", "BackupHealthy"],
            ..Desired::default()
        };
        d.children.extend(serde_json::to_value(&c.service_account).ok());
        d.children.extend(serde_json::to_value(&c.config_map).ok());
        d.children.extend(serde_json::to_value(&c.backup).ok());
        d.children.extend(c.drill.as_ref().and_then(|j| serde_json::to_value(j).ok()));
        let tz = self.spec.schedule.time_zone.clone().unwrap_or_else(|| "UTC".into());
        if self.spec.suspend {
            d.conditions.push(Cond::new(
                "ScheduleReady",
                Status::False,
                "Suspended",
                "spec.suspend is true: no new backups start",
            ));
        } else {
            d.conditions.push(Cond::new(
                "ScheduleReady",
                Status::True,
                "Scheduled",
                format!("CronJob {cron_job} runs {:?} ({tz})", self.spec.schedule.cron),
            ));
            if let Some(next) = next_run(&v.cron, v.time_zone.as_ref(), (ctx.now)()) {
                d.status.insert("nextScheduleTime".into(), json!(next.to_string()));
            }
        }
        if build::uses_vault(&self.spec) && ctx.build.vault_addr.is_none() {
            d.conditions.push(Cond::new(
                "VaultConfigured",
                Status::False,
                "VaultAddressMissing",
                "this policy reads credentials or keys from Vault, but the operator has no Vault address: set \
                 vault.address in the Helm values (--vault-addr)",
            ));
            d.required.push("VaultConfigured");
        }
        let observations = observe_jobs(ctx, &v.owner).await?;
        let created = self.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let h = status::health(
            (ctx.now)(),
            created,
            v.rpo,
            self.status.as_ref(),
            &observations,
            self.spec.verification.restore_drill.is_some(),
        );
        d.conditions.extend(h.conditions.iter().cloned());
        d.required.retain(|r| *r != "BackupHealthy");
        d.required.extend(h.required.iter().copied());
        d.requeue_after = h.requeue_after;
        if let Some(b) = &h.last_successful_backup {
            d.status.insert("lastSuccessfulBackup".into(), serde_json::to_value(b).unwrap_or_default());
        }
        if let Some(t) = &h.last_failure_time {
            d.status.insert("lastFailureTime".into(), json!(t.0.to_string()));
        }
        if let Some(c) = h.backup_count {
            d.status.insert("backupCount".into(), json!(c));
        }
        if let Some(r) = &h.last_verified_restore {
            d.status.insert("lastVerifiedRestore".into(), serde_json::to_value(r).unwrap_or_default());
        }
        d.gauges = gauges(&h, v.rpo);
        let mut plaintext = Vec::new();
        if ctx.build.destination(&self.spec.destination).endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            plaintext.push("the S3 endpoint is plain http (use https://)");
        }
        if matches!(self.spec.source.tls_mode, TlsMode::Disable | TlsMode::Prefer) {
            plaintext.push("the database tlsMode does not require TLS (use require, verify-ca or verify-full)");
        }
        if build::uses_vault(&self.spec) && ctx.build.vault_addr.as_deref().is_some_and(|a| a.starts_with("http://")) {
            plaintext.push("the operator's Vault address is plain http (vault.address)");
        }
        d.conditions.push(if plaintext.is_empty() {
            Cond::new(
                "EncryptedInTransit",
                Status::True,
                "TlsEverywhere",
                "database, S3 and Vault are reached over TLS",
            )
        } else {
            Cond::new("EncryptedInTransit", Status::False, "PlaintextEndpoint", plaintext.join("; "))
        });
        d.status.insert("cronJobName".into(), json!(cron_job));
        Ok(Ok(d))
    }
}

/// The policy's metric samples (see `runtime::metrics::OBJECT_GAUGES`).
fn gauges(h: &status::Health, rpo: std::time::Duration) -> Vec<crate::runtime::metrics::ObjectSample> {
    let secs = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| t.0.as_second() as f64;
    let mut g = vec![("backup_rpo_seconds", vec![], rpo.as_secs_f64())];
    let healthy = h.conditions.iter().any(|c| c.type_ == "BackupHealthy" && c.status == Status::True);
    g.push(("backup_healthy", vec![], f64::from(u8::from(healthy))));
    if let Some(b) = &h.last_successful_backup {
        g.extend(b.completion_time.as_ref().map(|t| ("backup_last_success_timestamp_seconds", vec![], secs(t))));
        g.extend(b.stored_bytes.map(|n| ("backup_last_success_size_bytes", vec![], n as f64)));
        g.extend(b.duration_seconds.map(|n| ("backup_last_success_duration_seconds", vec![], n as f64)));
    }
    g.extend(h.last_failure_time.as_ref().map(|t| ("backup_last_failure_timestamp_seconds", vec![], secs(t))));
    if let Some(t) = h.last_verified_restore.as_ref().and_then(|r| r.time.as_ref()) {
        g.push(("restore_last_verified_timestamp_seconds", vec![], secs(t)));
    }
    g
}
