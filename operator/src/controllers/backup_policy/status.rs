//! Backup health from what the jobs reported: every backup and drill pod writes a small JSON report as its
//! termination message (`crmguard backup run` after the commit and retention, `crmguard restore run --drill`
//! after comparing row counts). The operator reads those reports from the pods of the policy's Jobs, so it
//! needs neither S3 nor Vault credentials; the report's catalog facts (backup count, newest backup) come from
//! the manifests the job just listed.
//!
//! Pure: observations and the previous status in, conditions and status fields out.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::backup_policy::conditions::{BackupHealthy, RestoreVerified};
use crate::api::backup_policy::{BackupRecord, CrmBackupPolicyStatus, VerifiedRestore};
use crate::api::condition::Status;
use crate::api::job::{JobKind, JobReason, JobReport};
use crate::controllers::contract::Cond;

/// What one Job of the policy shows.
#[derive(Clone, Debug, PartialEq)]
pub struct JobObservation {
    pub name: String,
    /// `backup` or `restore-drill`.
    pub component: String,
    pub active: bool,
    pub succeeded: bool,
    pub failed: bool,
    /// When the Job finished (completion time, or the failure condition's time).
    pub finished: Option<Timestamp>,
    /// The pod's termination message, when it parsed.
    pub report: Option<JobReport>,
    /// Why the Job failed when there is no report (e.g. `OOMKilled`, `BackoffLimitExceeded`, `DeadlineExceeded`).
    pub failure_hint: Option<String>,
}

/// Conditions and status fields derived from the jobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub conditions: Vec<Cond<CrmBackupPolicyStatus>>,
    pub last_successful_backup: Option<BackupRecord>,
    pub last_failure_time: Option<Time>,
    pub backup_count: Option<i64>,
    pub last_verified_restore: Option<VerifiedRestore>,
    /// When to look again (a running job, or the moment the newest backup becomes older than the RPO).
    pub requeue_after: Option<Duration>,
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m", s / 60)
    }
}

/// `t + d`, for messages.
fn plus(t: Timestamp, d: Duration) -> String {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| "a time beyond the calendar".into())
}

fn to_time(t: Timestamp) -> Time {
    Time(t)
}

fn failure_text(o: &JobObservation) -> (JobReason, String) {
    match &o.report {
        Some(r) if !r.ok => {
            (r.reason.unwrap_or(JobReason::JobFailed), r.message.clone().unwrap_or_else(|| "no message".into()))
        }
        _ => (
            JobReason::JobFailed,
            format!(
                "Job {} failed{}; see `kubectl logs job/{}`",
                o.name,
                o.failure_hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default(),
                o.name
            ),
        ),
    }
}

/// Computes backup health. `created` is the policy's creation time: a policy younger than its RPO without
/// a backup yet is not unhealthy, just new.
pub fn health(
    now: Timestamp,
    created: Option<Timestamp>,
    rpo: Duration,
    previous: Option<&CrmBackupPolicyStatus>,
    jobs: &[JobObservation],
    drill_configured: bool,
) -> Health {
    let mut last_ok = previous.and_then(|s| s.last_successful_backup.clone());
    let mut last_failure = previous.and_then(|s| s.last_failure_time.clone());
    let mut count = previous.and_then(|s| s.backup_count);
    let mut verified_restore = previous.and_then(|s| s.last_verified_restore.clone());
    let mut newest_count_time: Option<Timestamp> =
        last_ok.as_ref().and_then(|b| b.completion_time.as_ref().map(|t| t.0));

    let mut finished: Vec<&JobObservation> = jobs.iter().filter(|j| j.succeeded || j.failed).collect();
    finished.sort_by_key(|j| j.finished);
    let mut newest_backup_run: Option<&JobObservation> = None;
    let mut newest_drill_run: Option<&JobObservation> = None;
    for j in &finished {
        if j.component == "restore-drill" {
            newest_drill_run = Some(j);
        } else {
            newest_backup_run = Some(j);
        }
        let Some(r) = &j.report else {
            if j.failed && j.component != "restore-drill" {
                let t = j.finished.map(to_time);
                if t.as_ref().map(|t| t.0) > last_failure.as_ref().map(|t| t.0) {
                    last_failure = t;
                }
            }
            continue;
        };
        match (r.kind, r.ok) {
            (JobKind::Backup, true) => {
                let completed = r.completed.or(j.finished);
                if completed > last_ok.as_ref().and_then(|b| b.completion_time.as_ref().map(|t| t.0)) {
                    last_ok = Some(BackupRecord {
                        id: r.backup_id.clone().unwrap_or_default(),
                        completion_time: completed.map(to_time),
                        stored_bytes: r.stored_bytes.map(|b| b as i64),
                        sha256: r.sha256.clone(),
                        duration_seconds: r.duration_seconds.map(|d| d.round() as i64),
                    });
                }
                if completed >= newest_count_time {
                    newest_count_time = completed;
                    if let Some(c) = r.backup_count {
                        count = Some(c as i64);
                    }
                }
            }
            (JobKind::Backup, false) => {
                let t = j.finished.map(to_time);
                if t.as_ref().map(|t| t.0) > last_failure.as_ref().map(|t| t.0) {
                    last_failure = t;
                }
            }
            (JobKind::Drill, true) => {
                let time = r.completed.or(j.finished);
                if time > verified_restore.as_ref().and_then(|v| v.time.as_ref().map(|t| t.0)) {
                    verified_restore = Some(VerifiedRestore {
                        backup_id: r.backup_id.clone().unwrap_or_default(),
                        time: time.map(to_time),
                        duration_seconds: r.duration_seconds.map(|d| d.round() as i64),
                    });
                }
            }
            _ => {}
        }
    }

    let mut conditions = Vec::new();
    let mut requeue: Option<Duration> = None;
    let ok_time = last_ok.as_ref().and_then(|b| b.completion_time.as_ref().map(|t| t.0));
    let failed_last = match newest_backup_run {
        Some(j) if j.failed || j.report.as_ref().is_some_and(|r| !r.ok) => Some(j),
        _ => None,
    };
    let age = ok_time.map(|t| Duration::from_secs(now.duration_since(t).as_secs().max(0) as u64));
    let healthy = match (failed_last, ok_time, age) {
        (Some(j), _, _) => {
            let (reason, message) = failure_text(j);
            let since = ok_time
                .map(|t| format!("; the newest verified backup is from {t}"))
                .unwrap_or_else(|| "; there is no verified backup".into());
            Cond::new(BackupHealthy::from(reason), Status::False, format!("the last backup failed: {message}{since}"))
        }
        (None, Some(t), Some(age)) if age > rpo => Cond::new(
            BackupHealthy::BackupTooOld,
            Status::False,
            // No age in messages: a message that changes with the clock rewrites the status on every reconcile.
            format!("the newest verified backup is from {t}, beyond the RPO of {} since {}", human(rpo), plus(t, rpo)),
        ),
        (None, Some(t), Some(age)) => {
            requeue = Some(rpo.saturating_sub(age) + Duration::from_secs(1));
            Cond::new(
                BackupHealthy::BackupVerified,
                Status::True,
                format!(
                    "the newest verified backup is from {t}, within the RPO of {} until {}",
                    human(rpo),
                    plus(t, rpo)
                ),
            )
        }
        _ => {
            let young =
                created.is_some_and(|c| Duration::from_secs(now.duration_since(c).as_secs().max(0) as u64) <= rpo);
            if young {
                // A new policy is not unhealthy; it is not Ready either until it has a verified backup.
                Cond::new(
                    BackupHealthy::NoBackupYet,
                    Status::Unknown,
                    "no verified backup exists yet; it appears here after the first scheduled run (or run one now with `kubectl create job --from=cronjob/<name>`)",
                )
            } else {
                Cond::new(
                    BackupHealthy::NoBackup,
                    Status::False,
                    format!("no verified backup exists although the policy is older than its RPO ({})", human(rpo)),
                )
            }
        }
    };
    conditions.push(healthy);

    if drill_configured {
        match newest_drill_run {
            Some(j) if j.failed || j.report.as_ref().is_some_and(|r| !r.ok) => {
                let (reason, message) = failure_text(j);
                conditions.push(Cond::new(
                    RestoreVerified::from(reason),
                    Status::False,
                    format!("the last restore drill failed: {message}"),
                ));
            }
            _ => match &verified_restore {
                Some(v) => conditions.push(Cond::new(
                    RestoreVerified::DrillPassed,
                    Status::True,
                    format!(
                        "backup {} was restored into the scratch database with matching row counts{}",
                        v.backup_id,
                        v.duration_seconds.map(|d| format!(" in {d}s")).unwrap_or_default()
                    ),
                )),
                None => conditions.push(Cond::new(
                    RestoreVerified::NoDrillYet,
                    Status::Unknown,
                    "no restore drill has run yet",
                )),
            },
        }
    }
    if jobs.iter().any(|j| j.active) {
        requeue = Some(requeue.map_or(Duration::from_secs(30), |r| r.min(Duration::from_secs(30))));
    }
    Health {
        conditions,
        last_successful_backup: last_ok,
        last_failure_time: last_failure,
        backup_count: count,
        last_verified_restore: verified_restore,
        requeue_after: requeue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn backup_ok(name: &str, at: &str, count: usize) -> JobObservation {
        JobObservation {
            name: name.into(),
            component: "backup".into(),
            active: false,
            succeeded: true,
            failed: false,
            finished: Some(ts(at)),
            report: Some(JobReport {
                ok: true,
                backup_id: Some(format!("id-{name}")),
                completed: Some(ts(at)),
                stored_bytes: Some(1000),
                sha256: Some("ab".into()),
                duration_seconds: Some(12.4),
                backup_count: Some(count),
                ..JobReport::new(JobKind::Backup)
            }),
            failure_hint: None,
        }
    }

    fn backup_failed(name: &str, at: &str, reason: &str, message: &str) -> JobObservation {
        JobObservation {
            name: name.into(),
            component: "backup".into(),
            active: false,
            succeeded: false,
            failed: true,
            finished: Some(ts(at)),
            report: Some(JobReport {
                ok: false,
                reason: Some(JobReason::parse(reason)),
                message: Some(message.into()),
                ..JobReport::new(JobKind::Backup)
            }),
            failure_hint: None,
        }
    }

    const DAY: Duration = Duration::from_secs(26 * 3600);

    #[test]
    fn a_recent_verified_backup_is_healthy_and_requeues_when_it_will_be_too_old() {
        let now = ts("2026-11-29T10:00:00Z");
        let h = health(now, None, DAY, None, &[backup_ok("a", "2026-11-29T02:15:00Z", 7)], false);
        assert_eq!(h.conditions[0].status, Status::True, "{:?}", h.conditions);
        assert_eq!(h.conditions[0].reason, "BackupVerified");
        let b = h.last_successful_backup.unwrap();
        assert_eq!((b.id.as_str(), b.stored_bytes, b.duration_seconds), ("id-a", Some(1000), Some(12)));
        assert_eq!(h.backup_count, Some(7));
        // 26h after 02:15 is 04:15 tomorrow: 18h15m from now, plus a second.
        assert_eq!(h.requeue_after, Some(Duration::from_secs(18 * 3600 + 15 * 60 + 1)));
    }

    /// A status that remembers a successful backup completed at `completed` (no job of it is left).
    fn remembered(completed: &str) -> CrmBackupPolicyStatus {
        CrmBackupPolicyStatus {
            last_successful_backup: Some(BackupRecord {
                id: "old".into(),
                completion_time: Some(Time(ts(completed))),
                ..BackupRecord::default()
            }),
            ..CrmBackupPolicyStatus::default()
        }
    }

    #[test]
    fn a_backup_older_than_the_rpo_is_unhealthy_even_when_remembered_only_in_status() {
        let now = ts("2026-12-01T10:00:00Z");
        let prev = remembered("2026-11-29T02:15:00Z");
        let h = health(now, None, DAY, Some(&prev), &[], false);
        assert_eq!((h.conditions[0].status, h.conditions[0].reason), (Status::False, "BackupTooOld"));
        let m = &h.conditions[0].message;
        assert!(m.contains("from 2026-11-29T02:15:00Z, beyond the RPO of 1d2h since 2026-11-30T04:15:00Z"), "{m}");
    }

    /// A steady state writes nothing: the same facts an hour apart give the same conditions (the status is
    /// patched only when it changes, so a message with the backup's age in it was rewritten every reconcile).
    #[test]
    fn conditions_do_not_change_with_the_clock_alone() {
        let jobs = [backup_ok("a", "2026-11-29T02:15:00Z", 7)];
        let at = |t: &str| health(ts(t), None, DAY, None, &jobs, false).conditions;
        assert_eq!(at("2026-11-29T03:00:00Z"), at("2026-11-29T04:01:00Z"));
        let prev = remembered("2026-11-20T02:15:00Z");
        let too_old = |t: &str| health(ts(t), None, DAY, Some(&prev), &[], false).conditions;
        assert_eq!(too_old("2026-11-29T03:00:00Z"), too_old("2026-11-30T05:00:00Z"));
    }

    #[test]
    fn the_last_run_failing_is_reported_with_its_reason_and_a_later_success_heals_it() {
        let now = ts("2026-11-29T10:00:00Z");
        let jobs = vec![
            backup_ok("a", "2026-11-28T02:15:00Z", 3),
            backup_failed("b", "2026-11-29T02:16:00Z", "WrongKey", "wrong encryption key: ..."),
        ];
        let h = health(now, None, DAY, None, &jobs, false);
        let c = &h.conditions[0];
        assert_eq!((c.status, c.reason), (Status::False, "WrongKey"));
        assert!(c.message.contains("the last backup failed: wrong encryption key"), "{}", c.message);
        assert_eq!(h.last_failure_time.map(|t| t.0), Some(ts("2026-11-29T02:16:00Z")));
        assert_eq!(h.last_successful_backup.unwrap().id, "id-a");

        let mut jobs = jobs;
        jobs.push(backup_ok("c", "2026-11-29T09:00:00Z", 4));
        let h = health(now, None, DAY, None, &jobs, false);
        assert_eq!(h.conditions[0].status, Status::True, "one failed run never blocks later ones");
        assert_eq!(h.backup_count, Some(4));
    }

    #[test]
    fn a_failed_job_without_a_report_still_says_why() {
        let now = ts("2026-11-29T10:00:00Z");
        let j = JobObservation {
            report: None,
            failure_hint: Some("OOMKilled".into()),
            ..backup_failed("d", "2026-11-29T02:20:00Z", "", "")
        };
        let h = health(now, None, DAY, None, &[j], false);
        assert_eq!(h.conditions[0].reason, "JobFailed");
        assert!(
            h.conditions[0].message.contains("OOMKilled") && h.conditions[0].message.contains("kubectl logs job/d")
        );
    }

    #[test]
    fn new_policies_wait_for_their_first_backup_and_old_ones_without_backups_are_unhealthy() {
        let now = ts("2026-11-29T10:00:00Z");
        let h = health(now, Some(ts("2026-11-29T09:00:00Z")), DAY, None, &[], false);
        assert_eq!((h.conditions[0].status, h.conditions[0].reason), (Status::Unknown, "NoBackupYet"));
        let h = health(now, Some(ts("2026-11-20T09:00:00Z")), DAY, None, &[], false);
        assert_eq!((h.conditions[0].status, h.conditions[0].reason), (Status::False, "NoBackup"));
    }

    #[test]
    fn a_drill_not_run_yet_does_not_hold_ready_back_but_no_backup_yet_does() {
        let now = ts("2026-11-29T10:00:00Z");
        let h = health(now, None, DAY, None, &[backup_ok("a", "2026-11-29T02:15:00Z", 1)], true);
        let drill = &h.conditions[1];
        assert_eq!((drill.type_, drill.status, drill.reason), ("RestoreVerified", Status::Unknown, "NoDrillYet"));
        assert!(!drill.holds_back());
        let h = health(now, Some(ts("2026-11-29T09:00:00Z")), DAY, None, &[], true);
        assert_eq!((h.conditions[0].status, h.conditions[0].reason), (Status::Unknown, "NoBackupYet"));
        assert!(h.conditions[0].holds_back(), "a policy without a verified backup is not Ready");
    }

    #[test]
    fn drills_record_the_verified_restore_and_a_failed_drill_blocks_ready() {
        let now = ts("2026-11-29T10:00:00Z");
        let drill_ok = JobObservation {
            name: "drill-1".into(),
            component: "restore-drill".into(),
            report: Some(JobReport {
                ok: true,
                backup_id: Some("id-a".into()),
                completed: Some(ts("2026-11-29T05:10:00Z")),
                duration_seconds: Some(42.0),
                row_counts_verified: Some(true),
                ..JobReport::new(JobKind::Drill)
            }),
            ..backup_ok("drill-1", "2026-11-29T05:10:00Z", 0)
        };
        let jobs = vec![backup_ok("a", "2026-11-29T02:15:00Z", 1), drill_ok.clone()];
        let h = health(now, None, DAY, None, &jobs, true);
        let v = h.last_verified_restore.clone().unwrap();
        assert_eq!((v.backup_id.as_str(), v.duration_seconds), ("id-a", Some(42)));
        assert_eq!(h.conditions[1].status, Status::True);
        assert!(!h.conditions.iter().any(Cond::holds_back), "a healthy policy whose drill passed is Ready");

        let drill_bad = JobObservation {
            name: "drill-2".into(),
            component: "restore-drill".into(),
            succeeded: false,
            failed: true,
            finished: Some(ts("2026-11-29T06:00:00Z")),
            report: Some(JobReport {
                ok: false,
                reason: Some(JobReason::RowCountMismatch),
                message: Some("public.contacts: 5000 rows at backup time, 4999 restored".into()),
                ..JobReport::new(JobKind::Drill)
            }),
            failure_hint: None,
            active: false,
        };
        let h = health(now, None, DAY, None, &[jobs[0].clone(), drill_ok, drill_bad], true);
        assert_eq!((h.conditions[1].status, h.conditions[1].reason), (Status::False, "RowCountMismatch"));
        assert!(h.conditions[1].holds_back(), "a failed drill holds Ready back");
        assert_eq!(h.last_verified_restore.unwrap().backup_id, "id-a", "the last good drill is kept");
    }
}
