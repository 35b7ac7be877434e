//! CrmBackupPolicy: validate -> CronJobs, ServiceAccount, config -> applied; status with the next run and the
//! backup health that the jobs reported (see `status.rs`).

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};

use super::{build, status, validate};
use crate::api::CrmBackupPolicy;
use crate::api::backup_policy::conditions::{
    BackupHealthy, EncryptedInTransit, ReportsTrusted, ScheduleReady, VaultConfigured,
};
use crate::api::backup_policy::{BackupPolicyEvent, RejectedReport, TlsMode};
use crate::api::condition::{Reason, Status};
use crate::controllers::contract::{Cond, Context, Desired, Error, Note, Other, Reconcilable, Watch};
use crate::controllers::schedule::next_run;
use crate::k8s::meta::{OWNER_LABEL, Owner};
use crate::validation::FieldError;

/// What the policy's Jobs show: the runs the operator can prove are its own, and the ones it ignored.
#[derive(Clone)]
struct Observed {
    jobs: Vec<status::JobObservation>,
    /// (job, reason) of every labelled Job whose report does not count.
    rejected: Vec<(String, String)>,
}

/// The report key and what the Jobs show, read from the server only when the policy's Jobs or CronJobs changed
/// since the last time (their resourceVersions in the watches): a Job's status changes after its pod ended, so
/// its report is in place by then. The key is read (and created when missing) at the first reconcile, before a
/// Job can need it, and again only when there are Jobs to check; `new`: the policy was never reconciled, so its
/// key is most likely still to be made.
async fn observe(
    ctx: &Context,
    owner: &Owner,
    names: &build::Names,
    new: bool,
) -> Result<(Result<Vec<u8>, String>, Observed), Error> {
    let label = owner.owner_label_value();
    let digest = match (
        ctx.cache.digest_owned("Job", &owner.namespace, &label),
        ctx.cache.digest_owned("CronJob", &owner.namespace, &label),
    ) {
        (Some(jobs), Some(cron_jobs)) => Some(jobs ^ cron_jobs.rotate_left(1)),
        _ => None,
    };
    let remembered = |d| ctx.cache.memo::<Seen>(CrmBackupPolicy::CONTROLLER, &owner.uid, d);
    if let Some(seen) = digest.and_then(remembered).filter(|s| s.key.is_ok()) {
        return Ok((seen.key, seen.observed));
    }
    // The key as last read serves while the policy has no Job whose report needs it (a change of its CronJob
    // needs none); an unusable key is read again at every reconcile, so that its repair is seen.
    let no_jobs = ctx.cache.labelled("Job", &owner.namespace, &label) == Some(0);
    let last =
        ctx.cache.last_memo::<Seen>(CrmBackupPolicy::CONTROLLER, &owner.uid).filter(|s| no_jobs && s.key.is_ok());
    let key = match last {
        Some(seen) => seen.key,
        None => report_key(ctx, owner, &names.report_key, new).await?,
    };
    let observed = observe_jobs(ctx, owner, names, key.as_ref().ok().map(Vec::as_slice)).await?;
    if let Some(d) = digest {
        let seen = Seen { key: key.clone(), observed: observed.clone() };
        ctx.cache.remember(CrmBackupPolicy::CONTROLLER, &owner.uid, d, seen);
    }
    Ok((key, observed))
}

/// The report key and the Jobs' observation, as last read.
#[derive(Clone)]
struct Seen {
    key: Result<Vec<u8>, String>,
    observed: Observed,
}

/// The policy's Jobs with the reports their pods left as termination messages. A Job counts only when the
/// operator can prove it is the policy's own: its controller is one of the policy's CronJobs (by uid; Jobs made
/// with `kubectl create job --from=cronjob/...` are owned by it too), its pod is the Job's (by uid) and runs as
/// the policy's ServiceAccount, and its report is signed with the policy's report key for that pod
/// (`backup::report`). Anything else carrying the policy's label is rejected, whatever it reports.
async fn observe_jobs(
    ctx: &Context,
    owner: &Owner,
    names: &build::Names,
    key: Option<&[u8]>,
) -> Result<Observed, Error> {
    let selector = format!("{OWNER_LABEL}={}", owner.owner_label_value());
    let lp = ListParams::default().labels(&selector);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let mut out = Observed { jobs: Vec::new(), rejected: Vec::new() };
    if ctx.cache.labelled("Job", &owner.namespace, &owner.owner_label_value()) == Some(0) {
        // The watch of crmguard's Jobs shows none with the policy's label (before the first scheduled run).
        return Ok(out);
    }
    let job_list = jobs.list(&lp).await?;
    if job_list.items.is_empty() {
        return Ok(out);
    }
    let cron_jobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let mut ours = Vec::new();
    for name in [&names.backup_cron_job, &names.drill_cron_job] {
        if let Some(c) = cron_jobs.get_opt(name).await?
            && c.metadata.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == owner.uid)
        {
            ours.extend(c.metadata.uid);
        }
    }
    let pod_list = pods.list(&lp).await?;
    let controller_uid = |refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
                          kind: &str| {
        refs.iter().flatten().find(|r| r.controller == Some(true) && r.kind == kind).map(|r| r.uid.clone())
    };
    for job in job_list.items {
        let name = job.metadata.name.clone().unwrap_or_default();
        if !controller_uid(&job.metadata.owner_references, "CronJob").is_some_and(|u| ours.contains(&u)) {
            out.rejected.push((name, "not created by the policy's CronJobs".into()));
            continue;
        }
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
        // The newest pod of the Job (owned by it, by uid) carries the report.
        let mut job_pods: Vec<&Pod> = pod_list
            .items
            .iter()
            .filter(|p| {
                job.metadata.uid.is_some() && controller_uid(&p.metadata.owner_references, "Job") == job.metadata.uid
            })
            .collect();
        job_pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let pod = job_pods.last();
        let sa = pod.and_then(|p| p.spec.as_ref()?.service_account_name.clone());
        if pod.is_some() && sa.as_deref() != Some(names.service_account.as_str()) {
            out.rejected.push((
                name,
                format!(
                    "its pod runs as ServiceAccount {:?}, not the policy's {}",
                    sa.unwrap_or_default(),
                    names.service_account
                ),
            ));
            continue;
        }
        let terminated = pod.and_then(|p| {
            p.status.as_ref()?.container_statuses.as_ref()?.iter().find_map(|c| c.state.as_ref()?.terminated.clone())
        });
        let message = terminated.as_ref().and_then(|t| t.message.clone()).filter(|m| !m.trim().is_empty());
        let report = match (message, key, pod.and_then(|p| p.metadata.uid.clone())) {
            (None, _, _) => None,
            (Some(m), Some(key), Some(uid)) => match crate::backup::report::verify(&m, key, &uid) {
                Ok(r) => Some(r),
                Err(e) => {
                    out.rejected.push((name, e.to_string()));
                    continue;
                }
            },
            (Some(_), _, _) => {
                out.rejected.push((name, "the policy's report key is not available to check the report".into()));
                continue;
            }
        };
        let hint = terminated
            .as_ref()
            .and_then(|t| t.reason.clone())
            .filter(|r| r != "Completed" && r != "Error")
            .or_else(|| failed.as_ref().map(|f| f.1.clone()).filter(|r| !r.is_empty()));
        out.jobs.push(status::JobObservation {
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

/// The policy's report key: read from its Secret, which the operator creates (random, owned by the policy) when
/// it is missing. `Err` (a message) when a Secret of that name exists that is not the policy's: then no report
/// can be trusted, since whoever made it knows the key. For a `new` policy the Secret is created without a read
/// first (one request instead of two; when it exists after all, the refused create is followed by the read).
async fn report_key(ctx: &Context, owner: &Owner, name: &str, new: bool) -> Result<Result<Vec<u8>, String>, Error> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::PostParams;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let found = if new { None } else { secrets.get_opt(name).await? };
    let existing = match found {
        Some(s) => s,
        None => {
            let key = match crate::backup::report::new_key() {
                Ok(k) => k,
                Err(e) => return Ok(Err(e)),
            };
            let secret = Secret {
                metadata: owner.child_meta(name.to_string(), "backup"),
                string_data: Some([(crate::backup::report::SECRET_KEY.to_string(), key)].into()),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            let pp = PostParams {
                field_manager: Some(format!("crmguard/{}", CrmBackupPolicy::CONTROLLER)),
                ..PostParams::default()
            };
            match secrets.create(&pp, &secret).await {
                Ok(s) => {
                    ctx.metrics.wrote(CrmBackupPolicy::CONTROLLER, "create", 1);
                    ctx.audit.record(
                        CrmBackupPolicy::CONTROLLER,
                        "create",
                        "Secret",
                        &owner.namespace,
                        name,
                        &format!("report key of CrmBackupPolicy {}/{}", owner.namespace, owner.name),
                    );
                    s
                }
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let owned =
        existing.metadata.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == owner.uid);
    let key = existing.data.as_ref().and_then(|d| d.get(crate::backup::report::SECRET_KEY)).map(|b| b.0.clone());
    Ok(match (owned, key) {
        (true, Some(k)) if k.len() >= 32 => Ok(k),
        (true, _) => {
            Err(format!("the report key Secret {name} has no usable key; delete it and crmguard creates a new one"))
        }
        (false, _) => Err(format!(
            "a Secret {name} exists that this policy does not own, so reports signed with it prove nothing; delete it \
             and crmguard creates the policy's own"
        )),
    })
}

/// The rejections to keep in status: every Job rejected now, and earlier ones seen in the last 7 days.
fn rejected_reports(
    now: jiff::Timestamp,
    previous: &[RejectedReport],
    rejected: &[(String, String)],
) -> Vec<RejectedReport> {
    let week = jiff::SignedDuration::from_hours(24 * 7);
    let mut out: Vec<RejectedReport> = rejected
        .iter()
        .map(|(job, reason)| {
            let seen = previous.iter().find(|p| &p.job == job).map_or(now, |p| p.time.0);
            RejectedReport { job: job.clone(), reason: reason.clone(), time: Time(seen) }
        })
        .collect();
    for p in previous {
        if !out.iter().any(|o| o.job == p.job) && now.duration_since(p.time.0) <= week {
            out.push(p.clone());
        }
    }
    out.sort_by(|a, b| b.time.0.cmp(&a.time.0).then(a.job.cmp(&b.job)));
    out.truncate(10);
    out
}

impl Reconcilable for CrmBackupPolicy {
    const CONTROLLER: &'static str = "backuppolicy";
    type Status = crate::api::CrmBackupPolicyStatus;
    /// Backup and drill Jobs belong to the CronJobs and name their policy; their results feed the policy's status.
    /// They are watched whole: the cache keeps their progress, which a restore reports.
    const WATCHES: &'static [Watch] = &[
        Watch::Owns(Other::CronJob),
        Watch::Owns(Other::ConfigMap),
        Watch::Owns(Other::ServiceAccount),
        Watch::NamedBy(Other::Job, build::POLICY_ANNOTATION),
    ];

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let c = build::build(&v, &ctx.build);
        let cron_job = c.backup.metadata.name.clone().unwrap_or_default();
        let mut d = Desired::<Self::Status> {
            owner: Some(v.owner.clone()),
            prune: vec![("batch/v1", "CronJob"), ("v1", "ConfigMap"), ("v1", "ServiceAccount")],
            ..Desired::default()
        };
        d.child(&c.service_account)?;
        d.child(&c.config_map)?;
        d.child(&c.backup)?;
        if let Some(drill) = &c.drill {
            d.child(drill)?;
        }
        let tz = self.spec.schedule.time_zone.clone().unwrap_or_else(|| "UTC".into());
        if self.spec.suspend {
            d.conditions.push(Cond::new(
                ScheduleReady::Suspended,
                Status::False,
                "spec.suspend is true: no new backups start",
            ));
        } else {
            d.conditions.push(Cond::new(
                ScheduleReady::Scheduled,
                Status::True,
                format!("CronJob {cron_job} runs {:?} ({tz})", self.spec.schedule.cron),
            ));
            if let Some(next) = next_run(&v.cron, v.time_zone.as_ref(), (ctx.now)()) {
                d.status.next_schedule_time = Some(Time(next));
            }
        }
        if build::uses_vault(&self.spec) && ctx.build.vault_addr.is_none() {
            d.conditions.push(Cond::new(
                VaultConfigured::VaultAddressMissing,
                Status::False,
                "this policy reads credentials or keys from Vault, but the operator has no Vault address: set \
                 vault.address in the Helm values (--vault-addr)",
            ));
        }
        let names = build::names(&v.owner);
        let new = self.status.as_ref().and_then(|s| s.observed_generation).is_none();
        let (key, observed) = observe(ctx, &v.owner, &names, new).await?;
        let previous = self.status.as_ref().map(|s| s.rejected_reports.as_slice()).unwrap_or_default();
        for (job, reason) in &observed.rejected {
            if !previous.iter().any(|p| &p.job == job) {
                let about = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some("batch/v1".into()),
                    kind: Some("Job".into()),
                    name: Some(job.clone()),
                    namespace: Some(v.owner.namespace.clone()),
                    ..Default::default()
                };
                let note = format!("Job {job}: {reason}; its report was ignored");
                d.events.push(Note::warning(BackupPolicyEvent::ForgedReport, note).about(about));
            }
        }
        let rejected = rejected_reports((ctx.now)(), previous, &observed.rejected);
        d.conditions.push(match (&key, rejected.is_empty()) {
            (Err(e), _) => Cond::new(ReportsTrusted::ReportKeyUnusable, Status::False, e.clone()),
            (Ok(_), true) => Cond::new(
                ReportsTrusted::OwnJobsOnly,
                Status::True,
                "status comes only from the policy's own jobs, with reports signed by its report key",
            ),
            (Ok(_), false) => Cond::new(
                ReportsTrusted::ForgedReport,
                Status::False,
                format!(
                    "ignored the reports of {}: they are not provably the policy's own jobs (status.rejectedReports)",
                    rejected.iter().map(|r| r.job.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ),
        });
        d.status.rejected_reports = rejected;
        let observations = observed.jobs;
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
        d.requeue_after = h.requeue_after;
        d.status.last_successful_backup = h.last_successful_backup.clone();
        d.status.last_failure_time = h.last_failure_time.clone();
        d.status.backup_count = h.backup_count;
        d.status.last_verified_restore = h.last_verified_restore.clone();
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
            Cond::new(EncryptedInTransit::TlsEverywhere, Status::True, "database, S3 and Vault are reached over TLS")
        } else {
            Cond::new(EncryptedInTransit::PlaintextEndpoint, Status::False, plaintext.join("; "))
        });
        d.status.cron_job_name = Some(cron_job);
        Ok(Ok(d))
    }
}

/// The policy's metric samples (see `metrics::OBJECT_GAUGES`).
fn gauges(h: &status::Health, rpo: std::time::Duration) -> Vec<crate::metrics::ObjectSample> {
    let secs = |t: &Time| t.0.as_second() as f64;
    let mut g = vec![("backup_rpo_seconds", vec![], rpo.as_secs_f64())];
    let healthy = h.conditions.iter().any(|c| c.type_ == BackupHealthy::TYPE && c.status == Status::True);
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
