//! Reversible isolation, planned purely. The state lives on the pods themselves: the quarantine label (which
//! the standing quarantine NetworkPolicy selects) and annotations saying by whom, why, since and until when.
//! Status carries a bounded summary only, so isolating many pods never depends on status size.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::build::QUARANTINE_LABEL;
use crate::api::network_guard::{Quarantine, QuarantineRecord};
use crate::netpol::selector_matches;

/// Annotation: the guard that isolated the pod (its label value).
pub const BY: &str = "crmguard.io/quarantine-by";
/// Annotation: why.
pub const REASON: &str = "crmguard.io/quarantine-reason";
/// Annotation: who asked (`spec` or the webhook caller).
pub const REQUESTED_BY: &str = "crmguard.io/quarantine-requested-by";
/// Annotation: since (RFC 3339).
pub const SINCE: &str = "crmguard.io/quarantine-since";
/// Annotation: until (RFC 3339).
pub const UNTIL: &str = "crmguard.io/quarantine-until";
/// Annotation: a webhook isolation the guard's controller has not carried out yet, and the backup Jobs
/// (comma-separated; none without `backupFirst`) whose end it waits for.
pub const AFTER_BACKUP: &str = "crmguard.io/quarantine-after-backup";
/// Annotation: when the wait for those Jobs ends regardless (RFC 3339).
pub const BACKUP_DEADLINE: &str = "crmguard.io/quarantine-backup-deadline";
/// Annotation left after a spec quarantine is released: its reason, so the same reason does not isolate again.
pub const SERVED: &str = "crmguard.io/quarantine-served-reason";
/// Every annotation of an active or pending isolation (removed at release).
pub const ISOLATION_ANNOTATIONS: [&str; 7] = [BY, REASON, REQUESTED_BY, SINCE, UNTIL, AFTER_BACKUP, BACKUP_DEADLINE];
/// Label on the backup Jobs the webhook starts before isolating: the guard's label value.
pub const PRE_QUARANTINE_LABEL: &str = "crmguard.io/pre-quarantine-for";
/// How often a guard looks again while an isolation waits for its backup.
pub const BACKUP_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Records kept in status (active ones first, then the most recent).
pub const MAX_RECORDS: usize = 20;

/// A change to one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Label the pod and annotate it (values for [`BY`], [`REASON`], [`REQUESTED_BY`], [`SINCE`], [`UNTIL`]).
    Isolate { pod: String, annotations: BTreeMap<String, String> },
    /// Remove the label and the isolation's annotations; a spec quarantine's reason stays in [`SERVED`] so that
    /// it does not isolate again.
    Release { pod: String, served: Option<String> },
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuarantinePlan {
    pub changes: Vec<Change>,
    /// Bounded summary for status.
    pub records: Vec<QuarantineRecord>,
    /// Pods isolated after the changes.
    pub active: usize,
    /// The next instant an isolation expires.
    pub next_expiry: Option<Timestamp>,
}

fn ann<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

fn ts(s: Option<&str>) -> Option<Timestamp> {
    s?.parse().ok()
}

/// Whether the guard whose label value is `label` holds the pod: a webhook request not carried out yet, or an
/// isolation in force (what [`plan`] keeps isolated, re-labelling the pod if its label was removed). `spec_reason`
/// is the reason of the guard's `spec.quarantine`. A repeated alert for such a pod changes nothing.
pub fn holds(pod: &Pod, label: &str, spec_reason: Option<&str>, now: Timestamp) -> bool {
    (ann(pod, BY) == Some(label) && ann(pod, AFTER_BACKUP).is_some()) || in_force(pod, label, spec_reason, now)
}

/// Whether the pod's isolation by the guard `label` is in force at `now`: not expired and, for one the spec asked
/// for, still asked for (the spec's quarantine has the same reason).
fn in_force(pod: &Pod, label: &str, spec_reason: Option<&str>, now: Timestamp) -> bool {
    let spec_asked = ann(pod, REQUESTED_BY).unwrap_or("spec") == "spec";
    ann(pod, BY) == Some(label)
        && ts(ann(pod, UNTIL)).is_some_and(|u| u > now)
        && (!spec_asked || spec_reason.is_some_and(|r| ann(pod, REASON) == Some(r)))
}

/// Plans isolation for the guard whose label value is `label`.
///
/// A running pod matching `spec.podSelector` is isolated for `ttl`. When the TTL has passed it is released,
/// and it is not isolated again for the same reason (a new reason isolates anew). Removing `spec.quarantine`
/// releases the pods it isolated at once. A webhook isolation that waits for its backup (`backupFirst`) is
/// carried out, for `webhook_ttl`, once `backup_done` says every Job it waits for has ended (or is gone), or at
/// its deadline.
pub fn plan(
    label: &str,
    spec: Option<(&Quarantine, std::time::Duration)>,
    webhook_ttl: Option<std::time::Duration>,
    backup_done: &dyn Fn(&str) -> bool,
    pods: &[Pod],
    now: Timestamp,
) -> QuarantinePlan {
    let mut out = QuarantinePlan::default();
    let ttl = spec.map(|(_, d)| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX));
    let webhook_ttl = webhook_ttl.map(|d| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX));
    for pod in pods {
        if ann(pod, BY) == Some(label)
            && let Some(jobs) = ann(pod, AFTER_BACKUP)
        {
            pending(label, pod, jobs, webhook_ttl, backup_done, now, &mut out);
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let labelled = labels.get(QUARANTINE_LABEL).is_some_and(|v| v == label);
        let ours = ann(pod, BY) == Some(label);
        let until = if ours { ts(ann(pod, UNTIL)) } else { None };
        let requested_by = ann(pod, REQUESTED_BY).unwrap_or("spec");
        let active_now = in_force(pod, label, spec.map(|(q, _)| q.reason.as_str()), now);
        let mut record = ours.then(|| QuarantineRecord {
            pod: name.clone(),
            reason: ann(pod, REASON).unwrap_or_default().to_string(),
            requested_by: requested_by.to_string(),
            since: ts(ann(pod, SINCE)).map(Time),
            until: until.map(Time),
        });
        let new_request = spec.filter(|(q, _)| {
            selector_matches(&q.pod_selector, &labels)
                && !(ours && ann(pod, REASON) == Some(q.reason.as_str()))
                && ann(pod, SERVED) != Some(q.reason.as_str())
        });
        if let (Some((q, _)), Some(ttl)) = (new_request, ttl) {
            let until = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
            let annotations = BTreeMap::from([
                (BY.to_string(), label.to_string()),
                (REASON.to_string(), q.reason.clone()),
                (REQUESTED_BY.to_string(), "spec".to_string()),
                (SINCE.to_string(), now.to_string()),
                (UNTIL.to_string(), until.to_string()),
            ]);
            out.changes.push(Change::Isolate { pod: name.clone(), annotations });
            record = Some(QuarantineRecord {
                pod: name,
                reason: q.reason.clone(),
                requested_by: "spec".into(),
                since: Some(Time(now)),
                until: Some(Time(until)),
            });
            out.active += 1;
            out.next_expiry = Some(out.next_expiry.map_or(until, |n| n.min(until)));
        } else if active_now {
            if !labelled {
                out.changes.push(Change::Isolate { pod: name, annotations: BTreeMap::new() });
            }
            out.active += 1;
            if let Some(u) = until {
                out.next_expiry = Some(out.next_expiry.map_or(u, |n| n.min(u)));
            }
        } else if labelled || ours {
            let served = (requested_by == "spec").then(|| ann(pod, REASON).unwrap_or_default().to_string());
            out.changes.push(Change::Release { pod: name, served });
            // Released: no longer in status.
            record = None;
        }
        out.records.extend(record);
    }
    let active = |r: &QuarantineRecord| r.until.as_ref().is_none_or(|u| u.0 > now);
    out.records.sort_by_key(|r| (!active(r), std::cmp::Reverse(r.since.as_ref().map(|t| t.0)), r.pod.clone()));
    out.records.truncate(MAX_RECORDS);
    out
}

/// A webhook isolation not carried out yet: at once when it waits for no backup Job, else once its Jobs ended or at
/// the deadline.
fn pending(
    label: &str,
    pod: &Pod,
    jobs: &str,
    webhook_ttl: Option<SignedDuration>,
    backup_done: &dyn Fn(&str) -> bool,
    now: Timestamp,
    out: &mut QuarantinePlan,
) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let reason = ann(pod, REASON).unwrap_or_default().to_string();
    let requested_by = ann(pod, REQUESTED_BY).unwrap_or("webhook").to_string();
    let deadline = ts(ann(pod, BACKUP_DEADLINE)).unwrap_or(now);
    let waiting: Vec<&str> = jobs.split(',').filter(|j| !j.is_empty() && !backup_done(j)).collect();
    if waiting.is_empty() || now >= deadline {
        let until = now.checked_add(webhook_ttl.unwrap_or(SignedDuration::from_hours(1))).unwrap_or(Timestamp::MAX);
        let reason = if jobs.is_empty() {
            reason
        } else if waiting.is_empty() {
            format!("{reason} (isolated after backup Job(s) {jobs} ended)")
        } else {
            let waited = waiting.join(",");
            format!(
                "{reason} (isolated without waiting longer for backup Job(s) {waited}: the wait ended at {deadline})"
            )
        };
        let annotations = BTreeMap::from([
            (BY.to_string(), label.to_string()),
            (REASON.to_string(), reason.clone()),
            (REQUESTED_BY.to_string(), requested_by.clone()),
            (SINCE.to_string(), now.to_string()),
            (UNTIL.to_string(), until.to_string()),
        ]);
        out.changes.push(Change::Isolate { pod: name.clone(), annotations });
        out.records.push(QuarantineRecord {
            pod: name,
            reason,
            requested_by,
            since: Some(Time(now)),
            until: Some(Time(until)),
        });
        out.active += 1;
        out.next_expiry = Some(out.next_expiry.map_or(until, |n| n.min(until)));
    } else {
        out.records.push(QuarantineRecord {
            pod: name,
            reason: format!("{reason} (waiting for backup Job(s) {} until {deadline})", waiting.join(",")),
            requested_by,
            since: None,
            until: None,
        });
        let poll = now.checked_add(SignedDuration::try_from(BACKUP_POLL).unwrap_or_default()).unwrap_or(deadline);
        let next = poll.min(deadline);
        out.next_expiry = Some(out.next_expiry.map_or(next, |n| n.min(next)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(reason: &str) -> Quarantine {
        serde_json::from_value(json!({"podSelector": {"matchLabels": {"app": "web"}}, "reason": reason, "ttl": "1h"}))
            .unwrap()
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    /// Applies a plan's changes to pods, as the controller's patches do.
    fn apply(pods: &mut [Pod], p: &QuarantinePlan) {
        for c in &p.changes {
            let (name, isolate, anns, served) = match c {
                Change::Isolate { pod, annotations } => (pod, true, annotations.clone(), None),
                Change::Release { pod, served } => (pod, false, BTreeMap::new(), served.clone()),
            };
            let pod = pods.iter_mut().find(|x| x.metadata.name.as_ref() == Some(name)).unwrap();
            let labels = pod.metadata.labels.get_or_insert_with(Default::default);
            if isolate {
                labels.insert(QUARANTINE_LABEL.into(), "g".into());
            } else {
                labels.remove(QUARANTINE_LABEL);
            }
            let a = pod.metadata.annotations.get_or_insert_with(Default::default);
            a.extend(anns);
            if !isolate {
                a.retain(|k, _| !ISOLATION_ANNOTATIONS.contains(&k.as_str()));
                a.extend(served.map(|r| (SERVED.to_string(), r)));
            }
        }
    }

    fn pods() -> Vec<Pod> {
        ["web-1", "db-1"]
            .iter()
            .map(|n| {
                let app = if n.starts_with("web") { "web" } else { "db" };
                serde_json::from_value(json!({"metadata": {"name": n, "labels": {"app": app}}})).unwrap()
            })
            .collect()
    }

    /// The webhook answers "already isolated" (and writes nothing) for exactly the pods the plan keeps isolated.
    #[test]
    fn what_the_webhook_counts_as_held_is_what_the_plan_keeps_isolated() {
        let now = t("2026-12-01T00:00:00Z");
        let pod = |label: Option<&str>, annotations: &[(&str, &str)]| -> Pod {
            let mut labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
            labels.extend(label.map(|l| (QUARANTINE_LABEL.to_string(), l.to_string())));
            let annotations: BTreeMap<String, String> =
                annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            serde_json::from_value(json!({"metadata": {"name": "web-1", "labels": labels, "annotations": annotations}}))
                .unwrap()
        };
        let live = [(BY, "g"), (REQUESTED_BY, "alertmanager"), (UNTIL, "2026-12-01T01:00:00Z")];
        let by_spec = [(BY, "g"), (REQUESTED_BY, "spec"), (REASON, "falco"), (UNTIL, "2026-12-01T01:00:00Z")];
        let expired = [(BY, "g"), (REQUESTED_BY, "alertmanager"), (UNTIL, "2026-11-30T23:00:00Z")];
        let cases = [
            ("a request waiting for no backup", pod(None, &[(BY, "g"), (AFTER_BACKUP, "")]), true),
            ("a request waiting for a backup", pod(None, &[(BY, "g"), (AFTER_BACKUP, "job-1")]), true),
            ("isolated until later", pod(Some("g"), &live), true),
            ("isolated until later, its label removed", pod(None, &live), true),
            ("expired", pod(Some("g"), &expired), false),
            ("another guard's", pod(Some("other"), &[(BY, "other"), (UNTIL, "2026-12-01T01:00:00Z")]), false),
            ("never isolated", pod(None, &[]), false),
        ];
        let asked = q("falco");
        let elsewhere: Quarantine = serde_json::from_value(
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "reason": "other", "ttl": "1h"}),
        )
        .unwrap();
        let spec_cases = [
            ("isolated by the spec, still asked for", Some(&asked), pod(Some("g"), &by_spec), true),
            ("isolated by the spec, no longer asked for", None, pod(Some("g"), &by_spec), false),
            ("isolated by the spec, which now asks for other pods", Some(&elsewhere), pod(Some("g"), &by_spec), false),
        ];
        let all = cases.into_iter().map(|(what, p, held)| (what, None, p, held)).chain(spec_cases);
        for (what, spec, p, held) in all {
            assert_eq!(holds(&p, "g", spec.map(|q| q.reason.as_str()), now), held, "{what}");
            let spec = spec.map(|q| (q, HOUR));
            let planned = plan("g", spec, Some(HOUR), &|_| false, std::slice::from_ref(&p), now);
            let released = planned.changes.iter().any(|c| matches!(c, Change::Release { .. }));
            let kept = !released && (planned.active == 1 || ann(&p, AFTER_BACKUP) == Some("job-1"));
            assert_eq!(kept, held, "{what}: the plan keeps it isolated (or waiting): {planned:?}");
        }
    }

    #[test]
    fn isolates_then_releases_after_the_ttl_and_not_again_for_the_same_reason() {
        let mut pods = pods();
        let quarantine = q("falco: shell in container");
        let p1 = plan("g", Some((&quarantine, HOUR)), None, &|_| true, &pods, t("2026-11-29T10:00:00Z"));
        assert!(matches!(&p1.changes[..], [Change::Isolate { pod, .. }] if pod == "web-1"), "{:?}", p1.changes);
        assert_eq!((p1.active, p1.next_expiry), (1, Some(t("2026-11-29T11:00:00Z"))));
        apply(&mut pods, &p1);

        let p2 = plan("g", Some((&quarantine, HOUR)), None, &|_| true, &pods, t("2026-11-29T10:30:00Z"));
        assert!(p2.changes.is_empty(), "steady: nothing to do");
        assert_eq!(p2.records, p1.records, "the TTL does not restart");

        let p3 = plan("g", Some((&quarantine, HOUR)), None, &|_| true, &pods, t("2026-11-29T11:00:01Z"));
        assert_eq!(
            p3.changes,
            [Change::Release { pod: "web-1".into(), served: Some("falco: shell in container".into()) }]
        );
        assert_eq!((p3.active, p3.next_expiry), (0, None));
        apply(&mut pods, &p3);
        assert!(
            plan("g", Some((&quarantine, HOUR)), None, &|_| true, &pods, t("2026-11-29T11:05:00Z")).changes.is_empty()
        );
        let p5 = plan("g", Some((&q("new alert"), HOUR)), None, &|_| true, &pods, t("2026-11-29T11:06:00Z"));
        assert!(matches!(&p5.changes[..], [Change::Isolate { .. }]), "a new reason isolates anew");
    }

    fn alerted(pod: &str, jobs: &str, deadline: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": pod, "labels": {"app": "web"}, "annotations": {
            BY: "g", REASON: "alertmanager: CrmShell", REQUESTED_BY: "alertmanager",
            AFTER_BACKUP: jobs, BACKUP_DEADLINE: deadline}}}))
        .unwrap()
    }

    #[test]
    fn a_backup_first_isolation_waits_for_its_jobs_or_its_deadline() {
        let pods = [alerted("web-1", "b1,b2", "2026-11-29T10:10:00Z")];
        let now = t("2026-11-29T10:00:00Z");
        let running = |j: &str| j != "b2";
        let p = plan("g", None, Some(HOUR), &running, &pods, now);
        assert!(p.changes.is_empty(), "b2 still runs: {:?}", p.changes);
        assert_eq!(p.active, 0);
        assert!(p.records[0].reason.contains("waiting for backup Job(s) b2"), "{:?}", p.records);
        assert_eq!(p.next_expiry, Some(t("2026-11-29T10:00:05Z")), "polls while waiting");

        let p = plan("g", None, Some(HOUR), &|_| true, &pods, now);
        match &p.changes[..] {
            [Change::Isolate { annotations, .. }] => {
                assert_eq!(annotations[UNTIL], "2026-11-29T11:00:00Z");
                assert!(annotations[REASON].ends_with("(isolated after backup Job(s) b1,b2 ended)"), "{annotations:?}");
            }
            other => panic!("{other:?}"),
        }
        let late = plan("g", None, Some(HOUR), &running, &pods, t("2026-11-29T10:10:00Z"));
        match &late.changes[..] {
            [Change::Isolate { annotations, .. }] => {
                assert!(annotations[REASON].contains("without waiting longer for backup Job(s) b2"), "{annotations:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_webhook_request_without_backup_is_isolated_at_once_with_its_reason_and_the_guards_ttl() {
        let pods = [alerted("web-1", "", "")];
        let p = plan("g", None, Some(HOUR), &|_| false, &pods, t("2026-11-29T10:00:00Z"));
        match &p.changes[..] {
            [Change::Isolate { pod, annotations }] => {
                assert_eq!(pod, "web-1");
                assert_eq!(annotations[REASON], "alertmanager: CrmShell", "no backup to mention");
                assert_eq!(annotations[REQUESTED_BY], "alertmanager");
                assert_eq!(
                    (annotations[SINCE].as_str(), annotations[UNTIL].as_str()),
                    ("2026-11-29T10:00:00Z", "2026-11-29T11:00:00Z")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((p.active, p.next_expiry), (1, Some(t("2026-11-29T11:00:00Z"))));
    }

    #[test]
    fn removing_the_quarantine_releases_at_once() {
        let mut pods = pods();
        let p1 = plan("g", Some((&q("x"), HOUR)), None, &|_| true, &pods, t("2026-11-29T10:00:00Z"));
        apply(&mut pods, &p1);
        let p2 = plan("g", None, None, &|_| true, &pods, t("2026-11-29T10:10:00Z"));
        assert_eq!(p2.changes, [Change::Release { pod: "web-1".into(), served: Some("x".into()) }]);
        assert!(p2.records.is_empty(), "a released pod leaves status");
    }

    #[test]
    fn many_pods_are_all_isolated_and_status_stays_bounded() {
        let pods: Vec<Pod> = (0..50)
            .map(|i| {
                serde_json::from_value(json!({"metadata": {"name": format!("web-{i}"), "labels": {"app": "web"}}}))
                    .unwrap()
            })
            .collect();
        let p = plan("g", Some((&q("x"), HOUR)), None, &|_| true, &pods, t("2026-11-29T10:00:00Z"));
        assert_eq!(p.changes.len(), 50);
        assert_eq!(p.active, 50);
        assert_eq!(p.records.len(), MAX_RECORDS);
    }
}
