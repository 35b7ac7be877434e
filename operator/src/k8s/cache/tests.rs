use super::*;
use kube::core::PartialObjectMeta;
use serde_json::json;

fn meta(ns: &str, name: &str, rv: &str, owner: Option<&str>) -> PartialObjectMeta<Pod> {
    let v = json!({"apiVersion": "v1", "kind": "PartialObjectMetadata", "metadata": {
        "namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": rv,
        "labels": {"app": "crm", OWNER_LABEL: "g"},
        "annotations": {"crmguard.io/quarantine-by": "g", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
        "ownerReferences": owner.map(|u| vec![json!({"apiVersion": "v1", "kind": "X", "name": "o", "uid": u, "controller": true})]).unwrap_or_default()
    }});
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_relist_replaces_the_table_only_when_complete() {
    let c = Cache::new(&["NetworkPolicy"], &[]);
    c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed("NetworkPolicy", None, &Event::InitApply(meta("a", "old", "1", Some("u"))));
    assert!(!c.synced("NetworkPolicy") && c.owned_by("NetworkPolicy", "a", "u", "g").is_none());
    c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
    assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["old".to_string()]));
    c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed("NetworkPolicy", None, &Event::InitApply(meta("a", "new", "2", Some("u"))));
    // During the re-list the last complete view holds.
    assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["old".to_string()]));
    c.feed("NetworkPolicy", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
    assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["new".to_string()]));
    assert_eq!(c.owned_by("NetworkPolicy", "a", "other", "g"), Some(vec![]));
    assert_eq!(c.owned_by("NetworkPolicy", "b", "u", "g"), Some(vec![]));
    assert!(c.owned_by("Role", "a", "u", "g").is_none(), "a table nobody feeds knows nothing");
}

#[test]
fn each_namespace_watch_replaces_only_its_own_namespace() {
    let c = Cache::new(&["NetworkPolicy"], &["a".to_string(), "b".to_string()]);
    for (scope, name) in [("a", "pa"), ("b", "pb")] {
        c.feed("NetworkPolicy", Some(scope), &Event::<PartialObjectMeta<Pod>>::Init);
        c.feed("NetworkPolicy", Some(scope), &Event::InitApply(meta(scope, name, "1", Some("u"))));
        c.feed("NetworkPolicy", Some(scope), &Event::<PartialObjectMeta<Pod>>::InitDone);
    }
    assert!(c.synced("NetworkPolicy"));
    // b's watch restarts and lists nothing: a keeps its policy.
    c.feed("NetworkPolicy", Some("b"), &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed("NetworkPolicy", Some("b"), &Event::<PartialObjectMeta<Pod>>::InitDone);
    assert_eq!(c.owned_by("NetworkPolicy", "a", "u", "g"), Some(vec!["pa".to_string()]));
    assert_eq!(c.owned_by("NetworkPolicy", "b", "u", "g"), Some(vec![]));
    assert!(c.claim("NetworkPolicy", Some("a")) && !c.claim("NetworkPolicy", Some("a")));
    assert!(!c.claim("Role", Some("a")), "a table the cache does not have is not fed");
}

#[test]
fn absence_is_known_once_listed_and_a_cluster_wide_table_serves_every_watched_namespace() {
    let c = Cache::new(&["Role", NAMESPACES], &["a".to_string()]);
    assert!(!c.absent("Role", "a", "r"), "not listed yet: absence is unknown");
    c.feed("Role", Some("a"), &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed("Role", Some("a"), &Event::InitApply(meta("a", "there", "1", None)));
    c.feed("Role", Some("a"), &Event::<PartialObjectMeta<Pod>>::InitDone);
    assert!(c.absent("Role", "a", "r") && !c.absent("Role", "a", "there"));
    assert!(!c.absent("Pod", "a", "r"), "a table nobody feeds knows nothing");
    // The namespaces are watched in all namespaces although the tables are watched in "a" only.
    c.feed(NAMESPACES, None, &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed(NAMESPACES, None, &Event::<PartialObjectMeta<Pod>>::InitDone);
    assert!(c.synced(NAMESPACES));
}

#[test]
fn a_watched_job_keeps_its_progress_and_metadata_keeps_none() {
    let c = Cache::new(&["Job"], &[]);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"namespace": "a", "name": "j", "resourceVersion": "3"},
        "status": {"active": 1, "ready": 1, "startTime": "2026-12-01T10:00:00Z"}
    }))
    .unwrap();
    c.feed("Job", None, &Event::Apply(job));
    let kept = c.get("Job", "a", "j").unwrap();
    assert_eq!(kept.resource_version, "3");
    let progress = kept.job.unwrap();
    assert_eq!((progress.active, progress.ready, progress.succeeded, progress.failed), (1, 1, 0, 0));
    assert_eq!(progress.start_time.map(|t| t.to_string()).as_deref(), Some("2026-12-01T10:00:00Z"));
    assert_eq!(progress.completion_time, None);
    c.feed("Job", None, &Event::Apply(meta("a", "m", "4", None)));
    assert_eq!(c.get("Job", "a", "m").unwrap().job, None, "metadata says nothing of progress");
}

#[tokio::test]
async fn reconciles_wait_for_the_watches_to_list_but_not_past_the_limit() {
    let c = Cache::new(&["Role"], &[]);
    let limit = Duration::from_millis(500);
    let started = Instant::now();
    c.until_synced(limit).await;
    assert!(started.elapsed() >= limit - Duration::from_millis(50), "it waited for the list");
    // The limit counts from the start, not per reconcile (a per-call limit would wait 500 ms again).
    let again = Instant::now();
    c.until_synced(limit).await;
    assert!(again.elapsed() < Duration::from_millis(400), "past the limit nobody waits");
}

#[test]
fn a_child_is_verified_only_at_the_version_it_was_verified_at_and_for_the_same_desire() {
    let c = Cache::new(&["NetworkPolicy"], &[]);
    let desired = json!({"spec": {"a": 1}});
    c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "5", Some("u"))));
    assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
    c.verified("NetworkPolicy", "a", "p", "5", &desired, &desired);
    assert!(c.is_verified("NetworkPolicy", "a", "p", &desired));
    assert!(!c.is_verified("NetworkPolicy", "a", "p", &json!({"spec": {"a": 2}})), "the desire changed");
    // Someone else's edit: a new resourceVersion.
    c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "6", Some("u"))));
    assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
    c.verified("NetworkPolicy", "a", "p", "6", &desired, &desired);
    c.feed("NetworkPolicy", None, &Event::Delete(meta("a", "p", "6", Some("u"))));
    assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired));
    c.feed("NetworkPolicy", None, &Event::Apply(meta("a", "p", "6", Some("u"))));
    assert!(!c.is_verified("NetworkPolicy", "a", "p", &desired), "a deleted child's verification is forgotten");
}

#[test]
fn a_job_stays_verified_through_status_updates_but_not_through_someone_elses_edit() {
    let c = Cache::new(&["Job"], &[]);
    let desired = json!({"metadata": {"name": "j", "labels": {"a": "1"}}, "spec": {"backoffLimit": 0}});
    let job = |rv: &str, labels: Value, status: Value| -> Job {
        serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "j", "resourceVersion": rv, "labels": labels},
            "spec": {"backoffLimit": 0, "template": {"spec": {"containers": []}}},
            "status": status
        }))
        .unwrap()
    };
    let created = job("5", json!({"a": "1"}), json!({}));
    c.feed("Job", None, &Event::Apply(created.clone()));
    c.verified("Job", "a", "j", "5", &desired, &created);
    assert!(c.is_verified("Job", "a", "j", &desired));
    // The Job controller reports progress: a new resourceVersion, the same Job.
    c.feed("Job", None, &Event::Apply(job("6", json!({"a": "1"}), json!({"active": 1}))));
    assert!(c.is_verified("Job", "a", "j", &desired), "a status update changes nothing crmguard wants");
    // Someone relabels it.
    c.feed("Job", None, &Event::Apply(job("7", json!({"a": "2"}), json!({"active": 1}))));
    assert!(!c.is_verified("Job", "a", "j", &desired), "a changed label is read and compared again");
    // Other kinds are verified at their resourceVersion only.
    assert_eq!(content_of("NetworkPolicy", &desired), None);
}

#[test]
fn a_memo_holds_while_the_owned_objects_do_not_change() {
    let c = Cache::new(&["Job"], &[]);
    assert_eq!(c.digest_owned("Job", "a", "g"), None, "not synced");
    c.feed("Job", None, &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed("Job", None, &Event::<PartialObjectMeta<Pod>>::InitDone);
    let empty = c.digest_owned("Job", "a", "g").unwrap();
    c.remember("X", "u", empty, 7u32);
    assert_eq!(c.memo::<u32>("X", "u", empty), Some(7));
    assert_eq!(c.memo::<String>("X", "u", empty), None, "another type is not this memo");
    c.feed("Job", None, &Event::Apply(meta("a", "j", "1", Some("u"))));
    let one = c.digest_owned("Job", "a", "g").unwrap();
    assert_ne!(one, empty);
    assert_eq!(c.memo::<u32>("X", "u", one), None, "a job came");
    c.feed("Job", None, &Event::Apply(meta("b", "j", "1", Some("u"))));
    assert_eq!(c.digest_owned("Job", "a", "g"), Some(one), "another namespace's jobs do not matter");
    c.feed("Job", None, &Event::Apply(meta("a", "j", "2", Some("u"))));
    assert_ne!(c.digest_owned("Job", "a", "g"), Some(one), "the job changed");
    c.forget_memo("X", "u");
    assert_eq!(c.memo::<u32>("X", "u", empty), None);
}

#[test]
fn pods_keep_labels_and_only_crmguards_annotations() {
    let c = Cache::new(&[PODS], &[]);
    assert!(c.pods("a").is_none(), "not synced yet");
    c.feed(PODS, None, &Event::<PartialObjectMeta<Pod>>::Init);
    c.feed(PODS, None, &Event::InitApply(meta("a", "web-0", "1", None)));
    c.feed(PODS, None, &Event::<PartialObjectMeta<Pod>>::InitDone);
    let pods = c.pods("a").unwrap();
    assert_eq!(pods.len(), 1);
    let m = &pods[0].metadata;
    assert_eq!(m.labels.as_ref().unwrap().get("app").map(String::as_str), Some("crm"));
    assert_eq!(m.annotations.as_ref().unwrap().keys().collect::<Vec<_>>(), vec!["crmguard.io/quarantine-by"]);
    assert_eq!(c.pods("b").unwrap().len(), 0);
}

#[test]
fn a_remembered_status_serves_only_the_version_it_was_seen_at() {
    let c = Cache::default();
    assert_eq!(c.status("K", "u", "3"), None, "never seen: read it");
    c.remember_status("K", "u", Some("4"), &json!({"observedGeneration": 2}));
    assert_eq!(c.status("K", "u", "4"), Some(json!({"observedGeneration": 2})));
    assert_eq!(c.status("K", "u", "3"), None, "the cached object predates the write");
    assert_eq!(c.status("K", "u", "5"), None, "changed since");
    assert_eq!(c.status("Other", "u", "4"), None);
    c.remember("K", "u", 1, 1u8);
    c.forget_object("K", "u");
    assert_eq!(c.status("K", "u", "4"), None);
    assert_eq!(c.memo::<u8>("K", "u", 1), None);
}

#[test]
fn an_object_from_before_an_own_status_write_waits_for_the_watch_to_show_the_write() {
    let c = Cache::default();
    c.remember_status("K", "u", Some("4"), &json!({}));
    assert!(!c.predates_own_write("K", "u", "3"), "a read status: the object is as the watch shows it");
    c.remember_written_status("K", "u", Some("6"), &json!({"observedGeneration": 2}));
    assert!(c.predates_own_write("K", "u", "5"), "the watch has not shown the write yet");
    assert!(!c.predates_own_write("K", "u", "6"), "the write itself");
    assert!(!c.predates_own_write("Other", "u", "5"));
    let later = Instant::now() + WRITE_LAG;
    assert!(!c.predates_own_write_at("K", "u", "5", later), "the watch is late: read instead");
    c.watched("K", "u", "5");
    assert!(c.predates_own_write("K", "u", "5"), "an older version shown does not count");
    c.watched("K", "u", "6");
    assert!(!c.predates_own_write("K", "u", "7"), "shown after the write: newer than it");
    assert_eq!(c.status("K", "u", "6"), Some(json!({"observedGeneration": 2})));
}

#[test]
fn what_is_remembered_of_deleted_resources_is_swept() {
    let c = Cache::default();
    for uid in ["live", "gone"] {
        c.remember_status("K", uid, Some("1"), &json!({}));
        c.remember("K", uid, 1, 1u8);
    }
    c.remember_status("Other", "gone", Some("1"), &json!({}));
    c.retain("K", &["live".to_string()].into());
    assert!(c.status("K", "live", "1").is_some() && c.memo::<u8>("K", "live", 1).is_some());
    assert!(c.status("K", "gone", "1").is_none() && c.memo::<u8>("K", "gone", 1).is_none());
    assert!(c.status("Other", "gone", "1").is_some(), "another kind's sweep decides for that kind");
}

#[test]
fn the_ceiling_is_known_once_listed_and_a_relist_without_it_means_gone() {
    let c = Cache::default();
    let role: ClusterRole = serde_json::from_value(json!({"metadata": {"name": "g"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}))
    .unwrap();
    assert_eq!(c.ceiling(), None);
    c.feed_ceiling(&Event::Init);
    c.feed_ceiling(&Event::InitApply(role.clone()));
    assert_eq!(c.ceiling(), None, "not until the list is complete");
    c.feed_ceiling(&Event::InitDone);
    assert_eq!(c.ceiling().flatten().map(|r| r.len()), Some(1));
    c.feed_ceiling(&Event::Init);
    c.feed_ceiling(&Event::InitDone);
    assert_eq!(c.ceiling(), Some(None), "deleted while the watch was away");
    c.feed_ceiling(&Event::Apply(role));
    assert!(c.ceiling().flatten().is_some());
}

#[test]
fn namespaces_being_deleted_are_known() {
    let c = Cache::new(&[NAMESPACES], &[]);
    let ns = |deleting: bool| -> PartialObjectMeta<k8s_openapi::api::core::v1::Namespace> {
        let mut m =
            json!({"apiVersion": "v1", "kind": "PartialObjectMetadata", "metadata": {"name": "crm", "uid": "n"}});
        if deleting {
            m["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
        }
        serde_json::from_value(m).unwrap()
    };
    c.feed(NAMESPACES, None, &Event::Apply(ns(false)));
    assert!(!c.terminating("crm"));
    c.feed(NAMESPACES, None, &Event::Apply(ns(true)));
    assert!(c.terminating("crm"));
    assert!(!c.terminating("other"));
}
