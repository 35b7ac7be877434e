//! The stand-in's object store: JSON objects keyed by group/version/resource, namespace and name, with one
//! global resourceVersion counter, an event log for watches, generation, finalizers and owner-reference
//! garbage collection.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

/// A served resource type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a status subresource (writes to the main resource ignore status, /status writes only status).
    pub status_subresource: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }
}

/// Identity of a stored object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// A watch event as the API sends it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub type_: &'static str,
    pub object: Value,
}

/// Errors with the HTTP status and reason the real API server uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into() }
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found"))
    }
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// How many events the log keeps; a watch from an older resourceVersion gets 410 Gone.
pub const EVENT_LOG: usize = 10_000;

#[derive(Debug, Default)]
pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    pub events: VecDeque<Event>,
    pub types: Vec<ResourceType>,
    uid_counter: u64,
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

fn spec_like(obj: &Value) -> Value {
    // Everything but metadata and status: a change here bumps metadata.generation.
    let mut v = obj.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

impl Store {
    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types.iter().find(|t| t.group == group && t.version == version && t.plural == plural).cloned()
    }

    pub fn register(&mut self, t: ResourceType) {
        self.types.retain(|x| !(x.group == t.group && x.version == t.version && x.plural == t.plural));
        self.types.push(t);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// The oldest resourceVersion a watch can resume from.
    pub fn oldest_watchable(&self) -> u64 {
        self.events.front().map_or(self.rv, |e| e.rv.saturating_sub(1))
    }

    fn record(&mut self, t: &ResourceType, type_: &'static str, object: Value, rv: u64) -> Event {
        let ev = Event {
            rv,
            group: t.group.clone(),
            plural: t.plural.clone(),
            namespace: object["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            type_,
            object,
        };
        self.events.push_back(ev.clone());
        while self.events.len() > EVENT_LOG {
            self.events.pop_front();
        }
        ev
    }

    /// Forgets the event log (as etcd compaction does), so that watches from older versions get 410.
    pub fn compact(&mut self) {
        self.events.clear();
    }

    pub fn key(t: &ResourceType, namespace: &str, name: &str) -> Key {
        Key {
            group: t.group.clone(),
            plural: t.plural.clone(),
            namespace: if t.namespaced { namespace.to_string() } else { String::new() },
            name: name.to_string(),
        }
    }

    pub fn get(&self, t: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(t, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&format!("{}.{}", t.plural, t.group), name))
    }

    pub fn list(&self, t: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.group == t.group && k.plural == t.plural && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates an object. Returns the stored object and its event.
    pub fn create(&mut self, t: &ResourceType, namespace: &str, mut obj: Value) -> Result<(Value, Event), ApiError> {
        let name = match meta(&obj)["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta(&obj)["generateName"].as_str() {
                Some(prefix) => {
                    self.uid_counter += 1;
                    format!("{prefix}{:05x}", self.uid_counter)
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        let key = Self::key(t, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", t.plural, t.group),
            ));
        }
        if t.namespaced && namespace.is_empty() {
            return Err(ApiError::new(422, "Invalid", "metadata.namespace: Required value"));
        }
        let rv = self.next_rv();
        self.uid_counter += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid_counter);
        let o = obj.as_object_mut().ok_or_else(|| ApiError::new(400, "BadRequest", "body is not a JSON object"))?;
        o.insert("apiVersion".into(), json!(t.api_version()));
        o.insert("kind".into(), json!(t.kind));
        if t.status_subresource {
            o.remove("status");
        }
        let m = o.entry("metadata").or_insert_with(|| json!({}));
        m["name"] = json!(name);
        if t.namespaced {
            m["namespace"] = json!(namespace);
        } else if let Some(mm) = m.as_object_mut() {
            mm.remove("namespace");
        }
        m["uid"] = json!(uid);
        m["resourceVersion"] = json!(rv.to_string());
        m["generation"] = json!(1);
        m["creationTimestamp"] = json!(now());
        if let Some(mm) = m.as_object_mut() {
            mm.remove("deletionTimestamp");
        }
        self.objects.insert(key, obj.clone());
        let ev = self.record(t, "ADDED", obj.clone(), rv);
        Ok((obj, ev))
    }

    /// Replaces an object (update or patch result). `subresource` is "" or "status".
    /// Enforces optimistic concurrency when the new object carries a resourceVersion.
    pub fn replace(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        mut new: Value,
        subresource: &str,
    ) -> Result<(Value, Vec<Event>), ApiError> {
        let key = Self::key(t, namespace, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&format!("{}.{}", t.plural, t.group), name))?;
        let current = old["metadata"]["resourceVersion"].as_str().unwrap_or_default();
        if new["metadata"]["resourceVersion"].as_str().is_some_and(|rv| !rv.is_empty() && rv != current) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    t.plural, t.group
                ),
            ));
        }
        let o = new.as_object_mut().ok_or_else(|| ApiError::new(400, "BadRequest", "body is not a JSON object"))?;
        o.insert("apiVersion".into(), json!(t.api_version()));
        o.insert("kind".into(), json!(t.kind));
        match (t.status_subresource, subresource) {
            (true, "status") => {
                // Only status changes through /status.
                let status = o.remove("status");
                let mut merged = old.clone();
                match status {
                    Some(s) => merged["status"] = s,
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                new = merged;
            }
            (true, _) => {
                // The main resource ignores status.
                match old.get("status") {
                    Some(s) => {
                        o.insert("status".into(), s.clone());
                    }
                    None => {
                        o.remove("status");
                    }
                }
            }
            _ => {}
        }
        // Immutable and server-owned metadata.
        for f in ["uid", "creationTimestamp", "deletionTimestamp", "generation", "name", "namespace"] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        let mut generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        if spec_like(&new) != spec_like(&old) {
            generation += 1;
        }
        new["metadata"]["generation"] = json!(generation);
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == old {
            // A no-op write does not bump the resourceVersion, as in the real API server.
            return Ok((old, vec![]));
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let deleting = new["metadata"]["deletionTimestamp"].is_string();
        let finalizers_empty = new["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
        if deleting && finalizers_empty {
            // The last finalizer went away: the object is deleted now.
            self.objects.remove(&key);
            let ev = self.record(t, "DELETED", new.clone(), rv);
            let mut events = vec![ev];
            events.extend(self.collect_garbage(&new));
            return Ok((new, events));
        }
        self.objects.insert(key, new.clone());
        let ev = self.record(t, "MODIFIED", new.clone(), rv);
        Ok((new, vec![ev]))
    }

    /// Deletes an object: with finalizers it only gets a deletionTimestamp; otherwise it goes, and its
    /// dependents (by ownerReference uid) are deleted in the background.
    pub fn delete(&mut self, t: &ResourceType, namespace: &str, name: &str) -> Result<(Value, Vec<Event>), ApiError> {
        let key = Self::key(t, namespace, name);
        let mut obj = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&format!("{}.{}", t.plural, t.group), name))?;
        let has_finalizers = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_string() {
                return Ok((obj, vec![]));
            }
            let rv = self.next_rv();
            obj["metadata"]["deletionTimestamp"] = json!(now());
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.objects.insert(key, obj.clone());
            let ev = self.record(t, "MODIFIED", obj.clone(), rv);
            return Ok((obj, vec![ev]));
        }
        self.objects.remove(&key);
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let mut events = vec![self.record(t, "DELETED", obj.clone(), rv)];
        events.extend(self.collect_garbage(&obj));
        Ok((obj, events))
    }

    /// Background cascading deletion of everything owned by `owner`.
    fn collect_garbage(&mut self, owner: &Value) -> Vec<Event> {
        let Some(uid) = owner["metadata"]["uid"].as_str().map(str::to_string) else { return vec![] };
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut events = Vec::new();
        for k in dependents {
            let Some(t) = self.types.iter().find(|t| t.group == k.group && t.plural == k.plural).cloned() else {
                continue;
            };
            if let Ok((_, evs)) = self.delete(&t, &k.namespace, &k.name) {
                events.extend(evs);
            }
        }
        events
    }
}

/// Current time in the API's format (RFC 3339, seconds).
pub fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}
