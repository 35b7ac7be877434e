//! Events about our resources (events.k8s.io/v1). An Event repeated within six minutes (the same object, type,
//! reason, action, note and related object) becomes a series on the first one: its count and last-seen time are
//! patched, as client-go's recorder does, so a retry loop does not flood the namespace. Only a digest of each
//! Event's key, its name and its series are kept between publications (about 100 bytes; kube's recorder keeps
//! every Event whole and scans them all on every publication, which was the largest single holder of memory at
//! 1,000 resources).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// How long a repeat joins the series of an earlier Event (client-go's and kube's recorders: 6 minutes).
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Normal or Warning.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// One Event to publish about an object.
#[derive(Clone, Debug)]
pub struct Event {
    pub type_: EventType,
    /// PascalCase, e.g. `Reconciled`.
    pub reason: String,
    /// What happened and what to do; cut to 1 KiB (the API server's limit) when longer.
    pub note: String,
    /// What was done, e.g. `Reconcile`.
    pub action: String,
    /// A second object the Event is about (e.g. the pod a guard quarantined).
    pub related: Option<ObjectReference>,
}

/// The API server refuses an Event whose note is longer than this many bytes.
pub const NOTE_LIMIT: usize = 1024;

/// `note` cut to at most `NOTE_LIMIT` bytes, on a character boundary, ending in "..." when cut.
fn fit(note: &str) -> String {
    if note.len() <= NOTE_LIMIT {
        return note.to_string();
    }
    let mut end = NOTE_LIMIT - "...".len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

/// Publishes Events, folding repeats into series.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("controller", &self.controller).field("instance", &self.instance).finish()
    }
}

/// What to send for an Event.
#[derive(Debug, PartialEq, Eq)]
enum Send {
    /// A new Event.
    Create,
    /// The `count`-th occurrence of the Event named `name`.
    Series { name: Box<str>, count: i32 },
}

#[derive(Debug)]
struct Series {
    name: Box<str>,
    count: i32,
    last: Timestamp,
}

/// The series published in the last six minutes, by key digest.
#[derive(Debug, Default)]
struct Seen {
    series: HashMap<u64, Series>,
    swept: Option<Timestamp>,
}

impl Seen {
    fn next(&mut self, key: u64, now: Timestamp) -> Send {
        // Expired series go at most once a minute, not on every publication.
        if self.swept.is_none_or(|s| now.duration_since(s) > SignedDuration::from_mins(1)) {
            self.series.retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
            self.swept = Some(now);
        }
        match self.series.get(&key) {
            Some(s) if now.duration_since(s.last) < SERIES_WINDOW => {
                Send::Series { name: s.name.clone(), count: s.count.saturating_add(1) }
            }
            _ => Send::Create,
        }
    }

    fn sent(&mut self, key: u64, name: Box<str>, count: i32, now: Timestamp) {
        self.series.insert(key, Series { name, count, last: now });
    }
}

/// The digest of what makes two Events the same occurrence (client-go's event key: everything but the time).
fn key(ev: &Event, regarding: &ObjectReference) -> u64 {
    fn reference(h: &mut impl Hasher, r: &ObjectReference) {
        (&r.api_version, &r.kind, &r.namespace, &r.name, &r.uid, &r.field_path).hash(h);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ev.type_, &ev.reason, &ev.action, &ev.note).hash(&mut h);
    reference(&mut h, regarding);
    if let Some(r) = &ev.related {
        reference(&mut h, r);
    }
    h.finish()
}

impl Recorder {
    /// `controller` is the reporting controller; `instance` this replica (the controller's name when absent).
    pub fn new(client: Client, controller: &str, instance: Option<&str>) -> Self {
        Recorder {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or(controller).to_string(),
            seen: Mutex::default(),
        }
    }

    /// Creates the Event in the namespace of `regarding` (`default` for a cluster-scoped object), or adds one
    /// to its series. A series whose Event is gone (deleted, or expired on the server) starts a new Event.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = key(ev, regarding);
        let api: Api<K8sEvent> =
            Api::namespaced(self.client.clone(), regarding.namespace.as_deref().unwrap_or("default"));
        let send = self.seen.lock().unwrap_or_else(PoisonError::into_inner).next(key, now);
        let (name, count) = match send {
            Send::Series { name, count } => {
                let series = json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
                match api.patch(&name, &PatchParams::default(), &Patch::Merge(&series)).await {
                    Ok(_) => (name, count),
                    Err(kube::Error::Api(s)) if s.code == 404 => (self.create(&api, ev, regarding, now).await?, 1),
                    Err(e) => return Err(e),
                }
            }
            Send::Create => (self.create(&api, ev, regarding, now).await?, 1),
        };
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).sent(key, name, count, now);
        Ok(())
    }

    async fn create(
        &self,
        api: &Api<K8sEvent>,
        ev: &Event,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Result<Box<str>, kube::Error> {
        let created = api.create(&PostParams::default(), &self.event(ev, regarding, now)).await?;
        Ok(created.name_any().into_boxed_str())
    }

    fn event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(format!("{:?}", ev.type_)),
            reason: Some(ev.reason.clone()),
            note: Some(fit(&ev.note)),
            action: Some(ev.action.clone()),
            regarding: Some(regarding.clone()),
            related: ev.related.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minutes: i64, seconds: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_mins(minutes) + SignedDuration::from_secs(seconds)
    }

    fn guard(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("crmguard.io/v1alpha1".into()),
            kind: Some("NetworkGuard".into()),
            namespace: Some("crm".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        }
    }

    fn failed(note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: "ReconcileFailed".into(),
            note: note.into(),
            action: "Reconcile".into(),
            related: None,
        }
    }

    #[test]
    fn a_long_note_is_cut_to_the_api_servers_limit_on_a_character_boundary() {
        assert_eq!(fit("short"), "short");
        let exact = "x".repeat(NOTE_LIMIT);
        assert_eq!(fit(&exact), exact);
        let cut = fit(&"ä".repeat(NOTE_LIMIT));
        assert!(cut.len() <= NOTE_LIMIT && cut.ends_with("ä..."), "{} bytes", cut.len());
    }

    #[test]
    fn a_repeat_within_six_minutes_joins_the_series_and_a_later_one_starts_anew() {
        let mut seen = Seen::default();
        let k = key(&failed("vault unreachable"), &guard("a"));
        assert_eq!(seen.next(k, at(0, 0)), Send::Create);
        seen.sent(k, "a.1".into(), 1, at(0, 0));
        assert_eq!(seen.next(k, at(5, 59)), Send::Series { name: "a.1".into(), count: 2 });
        seen.sent(k, "a.1".into(), 2, at(5, 59));
        // The window runs from the last occurrence.
        assert_eq!(seen.next(k, at(11, 58)), Send::Series { name: "a.1".into(), count: 3 });
        assert_eq!(seen.next(k, at(11, 59)), Send::Create);
    }

    #[test]
    fn events_differing_in_note_object_type_or_related_object_are_not_one_series() {
        let base = key(&failed("vault unreachable"), &guard("a"));
        let mut warning_to_normal = failed("vault unreachable");
        warning_to_normal.type_ = EventType::Normal;
        let mut related = failed("vault unreachable");
        related.related = Some(guard("b"));
        let mut other_uid = guard("a");
        other_uid.uid = Some("recreated".into());
        for other in [
            key(&failed("vault sealed"), &guard("a")),
            key(&failed("vault unreachable"), &guard("b")),
            key(&failed("vault unreachable"), &other_uid),
            key(&warning_to_normal, &guard("a")),
            key(&related, &guard("a")),
        ] {
            assert_ne!(other, base);
        }
        assert_eq!(key(&failed("vault unreachable"), &guard("a")), base, "the key is stable");
    }

    #[test]
    fn expired_series_are_forgotten_at_most_once_a_minute() {
        let mut seen = Seen::default();
        for i in 0..100 {
            seen.sent(i, format!("e.{i}").into(), 1, at(0, 0));
        }
        assert_eq!(seen.next(1000, at(0, 1)), Send::Create);
        assert_eq!(seen.series.len(), 100, "nothing expired yet");
        assert_eq!(seen.next(1000, at(6, 30)), Send::Create);
        assert!(seen.series.is_empty(), "swept after six minutes: {}", seen.series.len());
        seen.sent(7, "old".into(), 1, at(0, 0));
        assert_eq!(seen.next(1000, at(7, 0)), Send::Create);
        assert_eq!(seen.series.len(), 1, "the last sweep was 30 s ago: none now");
        assert_eq!(seen.next(7, at(7, 0)), Send::Create, "an expired series is not continued before the sweep");
    }
}
