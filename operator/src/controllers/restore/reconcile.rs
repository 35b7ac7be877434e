//! CrmRestore: resolve the policy -> validate -> the restore Job -> phase from the Job's status.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::{build, validate};
use crate::api::condition::Status;
use crate::api::{CrmBackupPolicy, CrmRestore};
use crate::backup::cli::JobReport;
use crate::k8s::cache::JobProgress;
use crate::k8s::meta::{LABEL_NAME_MAX, child_name};
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

/// The report `crmguard restore run` left as the termination message of the Job's newest pod.
async fn job_report(ctx: &Context, ns: &str, job: &str) -> Result<Option<JobReport>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut list =
        pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"))).await?.items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    Ok(list.last().and_then(|p| {
        let message = p
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())?;
        serde_json::from_str(message.trim()).ok()
    }))
}

/// A Job whose ServiceAccount does not exist gets no pod, and the Job controller backs off for minutes: until the
/// policy's ServiceAccount exists (its controller creates it), the restore waits with the Job not created. The
/// restore controller watches crmguard's ServiceAccounts: the one awaited reconciles the restore when it comes.
fn service_account_missing(ctx: &Context, ns: &str, job: &Job, policy: &str) -> Option<Desired> {
    let sa = job.spec.as_ref()?.template.spec.as_ref()?.service_account_name.clone()?;
    let job_name = job.metadata.name.as_deref()?;
    let known = !ctx.cache.synced("ServiceAccount") || ctx.cache.get("ServiceAccount", ns, &sa).is_some();
    if known || ctx.cache.get("Job", ns, job_name).is_some() {
        return None;
    }
    let message = format!(
        "waiting for ServiceAccount {sa}, which CrmBackupPolicy {policy} creates for its jobs; Job {job_name} is \
         created once it exists"
    );
    let mut d = Desired {
        conditions: vec![Cond::new("Restored", Status::False, "WaitingForServiceAccount", message)],
        required: vec!["Restored"],
        ..Desired::default()
    };
    d.status.insert("phase".into(), json!("Pending"));
    Some(d)
}

impl Reconcilable for CrmRestore {
    const CONTROLLER: &'static str = "restore";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        // Once the Job exists, what the restore wants follows from the restore and the Job alone (a Job's pod
        // template cannot change, so later edits of the policy do not reach it): computed again only when either
        // changed (their resourceVersions in the watches).
        let uid = self.metadata.uid.clone().unwrap_or_default();
        let ns = self.metadata.namespace.clone().unwrap_or_default();
        let job_name = child_name(&self.metadata.name.clone().unwrap_or_default(), "restore", LABEL_NAME_MAX);
        let digest = ctx.cache.get("Job", &ns, &job_name).map(|job| {
            crate::k8s::cache::digest_of(&[
                self.metadata.resource_version.as_deref().unwrap_or_default(),
                &job.resource_version,
            ])
        });
        if let Some(d) = digest.and_then(|d| ctx.cache.memo::<Decided>(Self::CONTROLLER, &uid, d)?.desired()) {
            return Ok(Ok(d));
        }
        let desired = self.read_and_decide(ctx, &ns).await?;
        if let (Some(d), Ok(wanted)) = (digest, &desired) {
            ctx.cache.remember(Self::CONTROLLER, &uid, d, Decided::of(wanted));
        }
        Ok(desired)
    }
}

/// A decision kept between reconciles, its children as JSON text (a parsed Job takes several times the memory).
#[derive(Clone)]
struct Decided {
    rest: Desired,
    children: Vec<String>,
}

impl Decided {
    fn of(d: &Desired) -> Decided {
        Decided {
            rest: Desired { children: Vec::new(), ..d.clone() },
            children: d.children.iter().map(ToString::to_string).collect(),
        }
    }

    /// The decision again; `None` (decide anew) if a child does not parse: a child missing from it would be
    /// pruned.
    fn desired(&self) -> Option<Desired> {
        let children = self.children.iter().map(|c| serde_json::from_str(c).ok()).collect::<Option<Vec<_>>>()?;
        Some(Desired { children, ..self.rest.clone() })
    }
}

impl CrmRestore {
    /// Reads the policy and the Job, and decides the Job, the phase and the conditions.
    async fn read_and_decide(&self, ctx: &Context, ns: &str) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let ns = ns.to_string();
        let name = &self.spec.policy_ref.name;
        let policy = match ctx.watched_backup_policy(&ns, name).await {
            Some(p) => Some(p),
            // Absent from the watch: just created, not valid, or really absent (then the read says so).
            None => Api::<CrmBackupPolicy>::namespaced(ctx.client.clone(), &ns).get_opt(name).await?,
        };
        let v = match validate::validate(self, policy.as_ref()) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let job = build::build(&v, &ctx.build);
        let job_name = job.metadata.name.clone().unwrap_or_default();
        if let Some(waiting) = service_account_missing(ctx, &ns, &job, &self.spec.policy_ref.name) {
            return Ok(Ok(waiting));
        }
        // The watch of crmguard's Jobs keeps their progress (and says when there is none); read only before it
        // listed.
        let status = match ctx.cache.get("Job", &ns, &job_name).and_then(|m| m.job) {
            Some(progress) => *progress,
            None if ctx.cache.absent("Job", &ns, &job_name) => JobProgress::default(),
            None => {
                let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
                jobs.get_opt(&job_name)
                    .await?
                    .and_then(|j| j.status)
                    .as_ref()
                    .map(JobProgress::from)
                    .unwrap_or_default()
            }
        };
        let finished = status.succeeded > 0 || status.failed > 0;
        // The restore pod's termination message is `crmguard restore run`'s report.
        let report = if finished { job_report(ctx, &ns, &job_name).await? } else { None };
        let (phase, cond) = if status.succeeded > 0 {
            ("Succeeded", Cond::new("Restored", Status::True, "Succeeded", "the backup was verified and restored"))
        } else if status.failed > 0 {
            let (reason, message) = match &report {
                Some(r) if !r.ok => (
                    crate::backup::known_reason(r.reason.as_deref().unwrap_or("JobFailed")),
                    r.message.clone().unwrap_or_default(),
                ),
                _ => ("JobFailed", format!("Job {job_name} failed; see `kubectl logs job/{job_name}`")),
            };
            ("Failed", Cond::new("Restored", Status::False, reason, message))
        } else if status.ready > 0 {
            ("Running", Cond::new("Restored", Status::False, "Running", format!("Job {job_name} is running")))
        } else if status.active > 0 {
            // The Job controller counts a Pod as active from its creation; until it runs (scheduled, image
            // pulled, started) the restore has not begun.
            let message =
                format!("the Pod of Job {job_name} has not started yet (see `kubectl describe job/{job_name}`)");
            ("Pending", Cond::new("Restored", Status::False, "Pending", message))
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
        if let Some(r) = report.as_ref().filter(|r| r.ok) {
            if let Some(id) = &r.backup_id {
                d.status.insert("backupId".into(), json!(id));
            }
            if let Some(b) = r.raw_bytes {
                d.status.insert("restoredBytes".into(), json!(b));
            }
            if let Some(secs) = r.duration_seconds {
                d.status.insert("durationSeconds".into(), json!(secs.round() as i64));
            }
            d.conditions.push(match r.row_counts_verified {
                Some(true) => Cond::new(
                    "Verified",
                    Status::True,
                    "RowCountsMatch",
                    "every table has the row count recorded at backup time",
                ),
                _ => Cond::new(
                    "Verified",
                    Status::False,
                    "NotChecked",
                    "row counts were not compared (options.verifyRowCounts is false, or the backup has none)",
                ),
            });
        }
        if let Some(t) = status.start_time {
            d.status.insert("startTime".into(), json!(t.to_string()));
        }
        if let Some(t) = status.completion_time {
            d.status.insert("completionTime".into(), json!(t.to_string()));
        }
        Ok(Ok(d))
    }
}
