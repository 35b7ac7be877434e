//! CrmRestore: resolve the policy -> validate -> the restore Job -> phase from the Job's status.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};

use super::{build, validate};
use crate::api::condition::{READY, Reason, ReasonSet, Status};
use crate::api::job::{JobReason, JobReport};
use crate::api::restore::conditions::{Restored, Verified};
use crate::api::restore::{CrmRestoreStatus, RestorePhase};
use crate::api::{CrmBackupPolicy, CrmRestore};
use crate::controllers::contract::{Cond, Context, Desired, Error, Other, Reconcilable, Watch};
use crate::k8s::cache::{JobProgress, Meta};
use crate::k8s::meta::{LABEL_NAME_MAX, child_name};
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

/// How long after its creation, or the operator's start, a restore waits without a status for its policy's first
/// pass.
const QUIET_WAIT: Duration = Duration::from_secs(300);

/// Whether a restore whose policy's ServiceAccount is missing waits quietly, and how long at the most: while the
/// policy's controller has not finished a pass of the policy's generation, the restore has written no status yet, and
/// it was created, or the operator started, less than [`QUIET_WAIT`] ago (an unknown age counts as old). It does not
/// look again by itself before the wait is over: the policy's first pass (a status write: the policy changes) and the
/// ServiceAccount's coming reconcile it. (Looking every few seconds instead, 2,500 restores waiting through a
/// 150 s cold start were reconciled 21 times each.)
fn quiet_wait(
    first_pass_done: bool,
    has_status: bool,
    since_created: Option<Duration>,
    since_start: Duration,
) -> Option<Duration> {
    let waited = since_created.unwrap_or(QUIET_WAIT).min(since_start);
    (!first_pass_done && !has_status && waited < QUIET_WAIT).then(|| QUIET_WAIT - waited)
}

/// A Job whose ServiceAccount does not exist gets no pod, and the Job controller backs off for minutes: until the
/// policy's ServiceAccount exists (its controller creates it), the restore waits with the Job not created. The
/// restore controller watches crmguard's ServiceAccounts: the one awaited reconciles the restore when it comes; so
/// does a change of the policy (e.g. its first pass's status).
///
/// A restore applied together with its policy (a GitOps sync, or an operator starting on both) waits quietly, with
/// no status and no Event, while the policy's controller has not finished its first pass ([`quiet_wait`]): a Warning
/// about a wait of moments would tell nobody anything. Before the wait is reported, the ServiceAccount is read (its
/// watch may not show it yet when the policy's status already does).
async fn service_account_missing(
    ctx: &Context,
    restore: &CrmRestore,
    job: &Job,
    policy: &CrmBackupPolicy,
) -> Result<Option<Desired<CrmRestoreStatus>>, Error> {
    let (Some(ns), Some(sa), Some(job_name)) = (
        restore.metadata.namespace.as_deref(),
        job.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|s| s.service_account_name.clone()),
        job.metadata.name.as_deref(),
    ) else {
        return Ok(None);
    };
    let known = !ctx.cache.synced("ServiceAccount") || ctx.cache.get("ServiceAccount", ns, &sa).is_some();
    if known || ctx.cache.get("Job", ns, job_name).is_some() {
        return Ok(None);
    }
    let first_pass_done = policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| c.type_ == READY && c.observed_generation == policy.metadata.generation)
    });
    let since_created = restore
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| Duration::try_from((ctx.now)().duration_since(t.0)).ok());
    if let Some(after) = quiet_wait(first_pass_done, restore.status.is_some(), since_created, ctx.started.elapsed()) {
        return Ok(Some(Desired { wait: Some(after), ..Desired::default() }));
    }
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    if sas.get_opt(&sa).await?.is_some() {
        return Ok(None);
    }
    let policy = policy.metadata.name.as_deref().unwrap_or_default();
    let message = format!(
        "waiting for ServiceAccount {sa}, which CrmBackupPolicy {policy} creates for its jobs; Job {job_name} is \
         created once it exists"
    );
    let mut d = Desired::<CrmRestoreStatus> {
        conditions: vec![Cond::new(Restored::WaitingForServiceAccount, Status::False, message)],
        ..Desired::default()
    };
    d.status.phase = Some(RestorePhase::Pending);
    Ok(Some(d))
}

impl Reconcilable for CrmRestore {
    const CONTROLLER: &'static str = "restore";
    type Status = CrmRestoreStatus;
    /// A restore waits for its policy's ServiceAccount, and quietly for its policy's first pass: it is reconciled
    /// when a ServiceAccount of its namespace comes or goes and when its policy changes (its status too).
    const WATCHES: &'static [Watch] = &[
        Watch::OwnsWhole(Other::Job),
        Watch::InNamespace(Other::ServiceAccount),
        Watch::Resources(<CrmBackupPolicy as Reconcilable>::CONTROLLER),
    ];

    /// Only its own policy's changes concern a restore.
    fn concerned_by(&self, _controller: &str, name: &str) -> bool {
        self.spec.policy_ref.name == name
    }

    /// A restore runs once. Its Job is created once and then followed, never changed (a Job's pod template cannot
    /// change: a later edit of the policy would be refused) and never created again (that would restore the
    /// backup a second time, over whatever was written since).
    async fn desired(&self, ctx: &Context) -> Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error> {
        let uid = self.metadata.uid.clone().unwrap_or_default();
        let ns = self.metadata.namespace.clone().unwrap_or_default();
        let job_name = child_name(&self.metadata.name.clone().unwrap_or_default(), "restore", LABEL_NAME_MAX);
        match job(ctx, &ns, &job_name).await? {
            Some(job) if job.controller.as_deref() != Some(uid.as_str()) => Ok(Ok(failed(
                Restored::JobNameTaken,
                format!(
                    "a Job {job_name} exists that this restore did not create; delete it, or restore under another \
                     CrmRestore name"
                ),
            ))),
            Some(job) => {
                // What the restore reports follows from the restore and its Job alone: computed again only when
                // either changed (their resourceVersions), since a finished Job's report is read from its pod.
                let digest = crate::k8s::cache::digest_of(&[
                    self.metadata.resource_version.as_deref().unwrap_or_default(),
                    &job.resource_version,
                ]);
                if let Some(d) = ctx.cache.memo::<Desired<CrmRestoreStatus>>(Self::CONTROLLER, &uid, digest) {
                    return Ok(Ok(d));
                }
                let d = follow(ctx, &ns, &job_name, &job.job.map(|p| *p).unwrap_or_default()).await?;
                ctx.cache.remember(Self::CONTROLLER, &uid, digest, d.clone());
                Ok(Ok(d))
            }
            None if self.job_created(ctx, &uid) => Ok(Ok(self.job_gone(&job_name))),
            None => self.create(ctx, &ns).await,
        }
    }
}

/// What the cache keeps of the restore's Job (read before the watch has listed).
async fn job(ctx: &Context, ns: &str, name: &str) -> Result<Option<Meta>, Error> {
    if let Some(m) = ctx.cache.get("Job", ns, name) {
        return Ok(Some(m));
    }
    if ctx.cache.absent("Job", ns, name) {
        return Ok(None);
    }
    let read = Api::<Job>::namespaced(ctx.client.clone(), ns).get_opt(name).await?;
    Ok(read.map(|j| Meta::of_object("Job", &j)))
}

/// A restore that ended without a Job to follow.
fn failed(reason: Restored, message: String) -> Desired<CrmRestoreStatus> {
    let mut d = Desired::<CrmRestoreStatus> {
        conditions: vec![Cond::new(reason, Status::False, message)],
        ..Desired::default()
    };
    d.status.phase = Some(RestorePhase::Failed);
    d
}

/// The phase, conditions and figures of a restore whose Job exists, from the Job's progress and, once it ended,
/// the report its pod left.
async fn follow(
    ctx: &Context,
    ns: &str,
    job_name: &str,
    status: &JobProgress,
) -> Result<Desired<CrmRestoreStatus>, Error> {
    let finished = status.succeeded > 0 || status.failed > 0;
    // The restore pod's termination message is `crmguard restore run`'s report.
    let report = if finished { job_report(ctx, ns, job_name).await? } else { None };
    Ok(outcome(job_name, status, report.as_ref()))
}

/// What a restore reports from its Job's progress and, once the Job ended, its report. The start time is shown once
/// the Pod runs: until then the restore has not started (the Job controller stamps the Job's start time when it
/// first syncs it, which was a status write of its own at every restore's creation).
fn outcome(job_name: &str, status: &JobProgress, report: Option<&JobReport>) -> Desired<CrmRestoreStatus> {
    let (phase, cond) = phase_of(job_name, status, report);
    let started = phase != RestorePhase::Pending;
    let mut d = Desired::<CrmRestoreStatus>::default();
    d.conditions.push(cond);
    d.status.phase = Some(phase);
    d.status.job_name = Some(job_name.to_string());
    if let Some(r) = report.filter(|r| r.ok) {
        d.status.backup_id = r.backup_id.clone();
        d.status.restored_bytes = r.raw_bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        d.status.duration_seconds = r.duration_seconds.map(|secs| secs.round() as i64);
        d.conditions.push(match r.row_counts_verified {
            Some(true) => Cond::new(
                Verified::RowCountsMatch,
                Status::True,
                "every table has the row count recorded at backup time",
            ),
            _ => Cond::new(
                Verified::NotChecked,
                Status::False,
                "row counts were not compared (options.verifyRowCounts is false, or the backup has none)",
            ),
        });
    }
    d.status.start_time = status.start_time.filter(|_| started).map(Time);
    d.status.completion_time = status.completion_time.map(Time);
    d
}

/// The phase and `Restored` condition of a restore from its Job's progress and, once the Job ended, its report.
fn phase_of(
    job_name: &str,
    status: &JobProgress,
    report: Option<&JobReport>,
) -> (RestorePhase, Cond<CrmRestoreStatus>) {
    if status.succeeded > 0 {
        (RestorePhase::Succeeded, Cond::new(Restored::Succeeded, Status::True, "the backup was verified and restored"))
    } else if status.failed > 0 {
        let (reason, message) = match report {
            Some(r) if !r.ok => (r.reason.unwrap_or(JobReason::JobFailed), r.message.clone().unwrap_or_default()),
            _ => (JobReason::JobFailed, format!("Job {job_name} failed; see `kubectl logs job/{job_name}`")),
        };
        (RestorePhase::Failed, Cond::new(Restored::from(reason), Status::False, message))
    } else if status.ready > 0 {
        (RestorePhase::Running, Cond::new(Restored::Running, Status::False, format!("Job {job_name} is running")))
    } else {
        // The Job controller counts a Pod as active from its creation; until it runs (scheduled, image
        // pulled, started) the restore has not begun.
        (RestorePhase::Pending, not_started(job_name))
    }
}

/// A restore whose Job's Pod is not running yet: the same whether the Job controller has created the Pod or not
/// (it does within moments of the Job: a second status write for that would tell nobody anything).
fn not_started(job_name: &str) -> Cond<CrmRestoreStatus> {
    let message = format!("the Pod of Job {job_name} has not started yet (see `kubectl describe job/{job_name}`)");
    Cond::new(Restored::Pending, Status::False, message)
}

impl CrmRestore {
    /// Whether this restore created its Job before: its status names the Job (as the watch shows it, or as this
    /// process last wrote it, which the watch may not show yet).
    fn job_created(&self, ctx: &Context, uid: &str) -> bool {
        self.status.as_ref().is_some_and(|s| s.job_name.is_some())
            || ctx
                .cache
                .remembered_status(<Self as Reconcilable>::CONTROLLER, uid)
                .is_some_and(|s| s.get("jobName").is_some_and(|n| !n.is_null()))
    }

    /// The restore's Job is gone (deleted by someone, or cleaned up): a finished restore keeps its outcome; an
    /// unfinished one failed, and is not run again.
    fn job_gone(&self, job_name: &str) -> Desired<CrmRestoreStatus> {
        let prev = self.status.clone().unwrap_or_default();
        if !matches!(prev.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed)) {
            let mut d = failed(
                Restored::JobDeleted,
                format!(
                    "Job {job_name} was deleted before the restore finished; a restore is never run twice (it would \
                     overwrite what was written since): create a new CrmRestore to restore again"
                ),
            );
            // Still named: it is what tells the next reconcile that the Job was made.
            d.status.job_name = Some(job_name.to_string());
            return d;
        }
        let mut d = Desired::default();
        let kept = |t: &str| prev.conditions.iter().find(|c| c.type_ == t);
        if let Some(c) = kept(Restored::TYPE) {
            let (status, reason) = if c.status == "True" {
                (Status::True, Restored::Succeeded)
            } else if c.reason == Restored::JobDeleted.as_str() {
                (Status::False, Restored::JobDeleted)
            } else {
                (Status::False, Restored::from(JobReason::parse(&c.reason)))
            };
            d.conditions.push(Cond::new(reason, status, c.message.clone()));
        }
        if let Some(c) = kept(Verified::TYPE) {
            let (status, reason) = if c.reason == Verified::RowCountsMatch.as_str() {
                (Status::True, Verified::RowCountsMatch)
            } else {
                (Status::False, Verified::NotChecked)
            };
            d.conditions.push(Cond::new(reason, status, c.message.clone()));
        }
        d.status = prev;
        d
    }

    /// The restore's Job, created: reads the policy (from the watch), validates, builds the Job; waits for the
    /// policy's ServiceAccount first.
    async fn create(
        &self,
        ctx: &Context,
        ns: &str,
    ) -> Result<Result<Desired<CrmRestoreStatus>, Vec<FieldError>>, Error> {
        let name = &self.spec.policy_ref.name;
        let policy = match ctx.watched_backup_policy(ns, name).await {
            Some(p) => Some(p),
            // Absent from the watch: just created, not valid, or really absent (then the read says so).
            None => Api::<CrmBackupPolicy>::namespaced(ctx.client.clone(), ns).get_opt(name).await?,
        };
        let v = match validate::validate(self, policy.as_ref()) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let job = build::build(&v, &ctx.build);
        let job_name = job.metadata.name.clone().unwrap_or_default();
        if let Some(p) = &policy
            && let Some(waiting) = service_account_missing(ctx, self, &job, p).await?
        {
            return Ok(Ok(waiting));
        }
        let mut d = Desired::<CrmRestoreStatus> {
            owner: Some(v.owner.clone()),
            prune: vec![("batch/v1", "Job")],
            ..Desired::default()
        };
        d.child(&job)?;
        d.conditions.push(not_started(&job_name));
        d.status.phase = Some(RestorePhase::Pending);
        d.status.job_name = Some(job_name);
        Ok(Ok(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn restore(status: serde_json::Value) -> CrmRestore {
        serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "CrmRestore",
            "metadata": {"name": "crm-db-check", "namespace": "crm", "uid": "u1"},
            "spec": {"policyRef": {"name": "crm-db"}, "backup": {"latest": true},
                     "target": {"database": "crm_check"}},
            "status": status
        }))
        .unwrap()
    }

    /// The Job controller creates a Job's Pod within moments of the Job: the restore's phase and condition are the
    /// same before and after (one status write at a cold start, not two), and only a Pod that runs makes it Running.
    #[test]
    fn a_pod_created_but_not_running_yet_changes_nothing_in_the_status() {
        let job = "crm-db-check-restore";
        let of = |active, ready| {
            let (phase, c) = phase_of(job, &JobProgress { active, ready, ..JobProgress::default() }, None);
            (phase, c.reason, c.message)
        };
        let no_pod = of(0, 0);
        assert_eq!(no_pod.0, RestorePhase::Pending);
        assert!(no_pod.2.contains("has not started yet") && no_pod.2.contains("kubectl describe job/"), "{no_pod:?}");
        assert_eq!(of(1, 0), no_pod);
        assert_eq!(of(1, 1).0, RestorePhase::Running);
        // The Job controller stamps the Job's start time at its first sync, with the Pod: the restore's status
        // stays as it was written at the Job's creation until the Pod runs.
        let t: jiff::Timestamp = "2026-12-01T02:15:00Z".parse().unwrap();
        let synced = JobProgress { active: 1, start_time: Some(t), ..JobProgress::default() };
        let pending = outcome(job, &synced, None);
        assert_eq!(pending.status.start_time, None);
        assert_eq!(pending.status, outcome(job, &JobProgress::default(), None).status);
        let running = outcome(job, &JobProgress { ready: 1, ..synced }, None);
        assert_eq!(running.status.start_time.map(|s| s.0), Some(t));
    }

    /// Expected from the restore's documentation (README, "What crmguard watches"): quiet only before the policy's
    /// first pass, before any status, and within 5 minutes of the creation or the start; no look of its own before
    /// the wait is over (the policy's pass and the ServiceAccount reconcile it).
    #[test]
    fn a_restore_waits_quietly_only_for_a_policys_first_pass_and_not_for_long() {
        let s = Duration::from_secs;
        assert_eq!(quiet_wait(false, false, Some(s(1)), s(600)), Some(s(299)));
        assert_eq!(quiet_wait(false, false, Some(s(3600)), s(2)), Some(s(298)), "an operator that just started");
        assert_eq!(quiet_wait(false, false, Some(s(120)), s(200)), Some(s(180)));
        assert_eq!(quiet_wait(true, false, Some(s(1)), s(1)), None, "the policy's pass is done: reported");
        assert_eq!(quiet_wait(false, true, Some(s(1)), s(1)), None, "a status written before stays true");
        assert_eq!(quiet_wait(false, false, Some(s(300)), s(300)), None, "waited long enough");
        assert_eq!(quiet_wait(false, false, None, s(400)), None, "an unknown age is old");
        assert_eq!(quiet_wait(false, false, None, s(10)), Some(s(290)), "unless the operator just started");
    }

    #[test]
    fn only_its_own_policys_changes_concern_a_restore() {
        let r = restore(json!(null));
        assert!(r.concerned_by("backuppolicy", "crm-db"));
        assert!(!r.concerned_by("backuppolicy", "crm-db-2"), "another policy of the namespace");
    }

    #[test]
    fn a_finished_restore_keeps_its_outcome_when_its_job_is_gone() {
        let r = restore(json!({
            "phase": "Succeeded", "jobName": "crm-db-check-restore", "backupId": "20261201T021500Z",
            "restoredBytes": 1234, "observedGeneration": 1,
            "conditions": [
                {"type": "Restored", "status": "True", "reason": "Succeeded", "message": "restored",
                 "lastTransitionTime": "2026-12-01T02:20:00Z"},
                {"type": "Verified", "status": "True", "reason": "RowCountsMatch", "message": "counts match",
                 "lastTransitionTime": "2026-12-01T02:20:00Z"}]
        }));
        let d = r.job_gone("crm-db-check-restore");
        let conds: Vec<_> = d.conditions.iter().map(|c| (c.type_, c.status, c.reason)).collect();
        assert_eq!(conds, vec![("Restored", Status::True, "Succeeded"), ("Verified", Status::True, "RowCountsMatch")]);
        assert_eq!(d.status.phase, Some(RestorePhase::Succeeded));
        assert_eq!((d.status.backup_id.as_deref(), d.status.restored_bytes), (Some("20261201T021500Z"), Some(1234)));
        assert!(d.owner.is_none() && d.children.is_empty());
    }

    #[test]
    fn an_unfinished_restore_whose_job_is_gone_failed_and_is_not_run_again() {
        for phase in [json!("Pending"), json!("Running")] {
            let d =
                restore(json!({"phase": phase, "jobName": "crm-db-check-restore"})).job_gone("crm-db-check-restore");
            let c = &d.conditions[0];
            assert_eq!((c.type_, c.status, c.reason), ("Restored", Status::False, "JobDeleted"));
            assert_eq!(d.status.phase, Some(RestorePhase::Failed));
            assert!(d.owner.is_none() && d.children.is_empty() && d.prune.is_empty(), "nothing is created or pruned");
            assert_eq!(d.status.job_name.as_deref(), Some("crm-db-check-restore"), "what says the Job was made stays");
            // The next reconcile, from the status this one writes, decides the same.
            let written = json!({"phase": d.status.phase, "jobName": d.status.job_name, "conditions": [
                {"type": "Restored", "status": "False", "reason": c.reason, "message": c.message,
                 "lastTransitionTime": "2026-12-01T02:20:00Z"}]});
            let again = restore(written).job_gone("crm-db-check-restore");
            let again_c = &again.conditions[0];
            // The runtime writes its own conditions and observedGeneration.
            let fields =
                |s: &CrmRestoreStatus| CrmRestoreStatus { conditions: vec![], observed_generation: None, ..s.clone() };
            assert_eq!(
                (again_c.reason, &again_c.message, fields(&again.status)),
                (c.reason, &c.message, fields(&d.status))
            );
        }
    }
}
