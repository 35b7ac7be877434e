//! What the cache keeps of an object (metadata, a Job's progress) and the digests it compares.

use super::*;

/// What the cache keeps of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub uid: String,
    pub resource_version: String,
    /// The uid of the object's controller (owner reference with `controller: true`).
    pub controller: Option<String>,
    /// The value of crmguard's owner label.
    pub owner_label: Option<String>,
    /// Pods only: all labels and crmguard's annotations (`crmguard.io/...`).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Namespaces only: being deleted.
    pub terminating: bool,
    /// Jobs only: the progress its status reports.
    pub job: Option<Box<JobProgress>>,
    /// Objects watched whole (Jobs): a digest of what a status update leaves as it was ([`content_of`]).
    pub content: Option<u64>,
}

/// What a Job's status says of its progress (what a restore reports), kept instead of the Job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    pub active: i32,
    pub ready: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub start_time: Option<jiff::Timestamp>,
    pub completion_time: Option<jiff::Timestamp>,
}

impl From<&JobStatus> for JobProgress {
    fn from(s: &JobStatus) -> JobProgress {
        JobProgress {
            active: s.active.unwrap_or(0),
            ready: s.ready.unwrap_or(0),
            succeeded: s.succeeded.unwrap_or(0),
            failed: s.failed.unwrap_or(0),
            start_time: s.start_time.as_ref().map(|t| t.0),
            completion_time: s.completion_time.as_ref().map(|t| t.0),
        }
    }
}

impl Meta {
    /// What is kept of `o`, an object of `table` (metadata, or a Job).
    pub fn of_object<O: kube::Resource + 'static>(table: Table, o: &O) -> Meta {
        let mut m = Meta::of(table, o.meta());
        if let Some(job) = (o as &dyn std::any::Any).downcast_ref::<Job>() {
            m.job = Some(Box::new(job.status.as_ref().map(JobProgress::from).unwrap_or_default()));
            m.content = Some(job_content(job));
        }
        m
    }

    fn of(table: Table, m: &ObjectMeta) -> Meta {
        let labels = m.labels.clone().unwrap_or_default();
        let pod = table == PODS;
        Meta {
            uid: m.uid.clone().unwrap_or_default(),
            resource_version: m.resource_version.clone().unwrap_or_default(),
            controller: m.owner_references.iter().flatten().find(|r| r.controller == Some(true)).map(|r| r.uid.clone()),
            owner_label: labels.get(OWNER_LABEL).cloned(),
            annotations: if pod {
                m.annotations.iter().flatten().filter(|(k, _)| k.starts_with("crmguard.io/")).map(clone2).collect()
            } else {
                BTreeMap::new()
            },
            labels: if pod { labels } else { BTreeMap::new() },
            terminating: table == NAMESPACES && m.deletion_timestamp.is_some(),
            job: None,
            content: None,
        }
    }
}

fn clone2((k, v): (&String, &String)) -> (String, String) {
    (k.clone(), v.clone())
}

/// A digest of what the cache keeps of a pod (labels, crmguard's annotations).
pub fn pod_digest(m: &ObjectMeta) -> u64 {
    let kept = Meta::of(PODS, m);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kept.labels, kept.annotations).hash(&mut h);
    h.finish()
}

/// A digest of some strings (e.g. resourceVersions), for [`Cache::memo`].
pub fn digest_of(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A digest of a desired object (same value, same digest, within one process).
/// For a Job (the kind watched whole): a digest of its spec, labels, annotations and owner references, which a
/// status update leaves as they were; `None` for the other kinds. Read through the Job type on both sides (the
/// watch's objects and the API server's answers to writes), so that fields one side does not know do not count.
pub fn content_of(table: Table, object: &impl serde::Serialize) -> Option<u64> {
    if table != "Job" {
        return None;
    }
    let job: Job = serde_json::to_value(object).ok().and_then(|v| serde_json::from_value(v).ok())?;
    Some(job_content(&job))
}

fn job_content(job: &Job) -> u64 {
    let m = &job.metadata;
    let kept = serde_json::json!([job.spec, m.labels, m.annotations, m.owner_references]);
    digest(&kept)
}

pub(super) fn digest(v: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}
