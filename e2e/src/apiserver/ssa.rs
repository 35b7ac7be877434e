//! Server-side apply, approximated at the granularity of second-level fields (`spec.podSelector`, `data.key`,
//! `metadata.labels.key`): ownership per field manager kept in `metadata.managedFields` (FieldsV1 format),
//! conflicts between managers (409 unless forced), and removal of fields a manager stops applying.
//! Deeper structure is replaced as a whole, where the real API server merges it (documented in README.md).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::store::ApiError;

/// A field at the tracked granularity: (top-level key, second-level key or "").
pub type FieldPath = (String, String);

/// Fields of an object (apiVersion, kind, status and server-owned metadata are not tracked).
pub fn field_paths(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(o) = obj.as_object() else { return out };
    for (k, v) in o {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for sub in ["labels", "annotations"] {
                    for key in v[sub].as_object().into_iter().flat_map(Map::keys) {
                        out.insert((format!("metadata.{sub}"), key.clone()));
                    }
                }
                for sub in ["ownerReferences", "finalizers"] {
                    if v.get(sub).is_some_and(|x| !x.is_null()) {
                        out.insert(("metadata".into(), sub.into()));
                    }
                }
            }
            // An object owns its keys (an empty one owns nothing); anything else is one field.
            _ => match v.as_object() {
                Some(inner) => {
                    for key in inner.keys() {
                        out.insert((k.clone(), key.clone()));
                    }
                }
                None => {
                    out.insert((k.clone(), String::new()));
                }
            },
        }
    }
    out
}

fn parent<'a>(obj: &'a Value, top: &str) -> Option<&'a Value> {
    match top.split_once('.') {
        Some((a, b)) => obj.get(a)?.get(b),
        None => obj.get(top),
    }
}

/// The value at a field path.
pub fn get(obj: &Value, p: &FieldPath) -> Option<Value> {
    let base = parent(obj, &p.0)?;
    if p.1.is_empty() { Some(base.clone()) } else { base.get(&p.1).cloned() }
}

fn parent_mut<'a>(obj: &'a mut Value, top: &str) -> &'a mut Value {
    let slot = match top.split_once('.') {
        Some((a, b)) => &mut obj[a][b],
        None => &mut obj[top],
    };
    if !slot.is_object() {
        *slot = json!({});
    }
    slot
}

/// Sets (or, with None, removes) the value at a field path.
pub fn set(obj: &mut Value, p: &FieldPath, value: Option<Value>) {
    if p.1.is_empty() {
        match value {
            Some(v) => obj[p.0.as_str()] = v,
            None => {
                if let Some(o) = obj.as_object_mut() {
                    o.remove(&p.0);
                }
            }
        }
        return;
    }
    let base = parent_mut(obj, &p.0);
    match value {
        Some(v) => base[p.1.as_str()] = v,
        None => {
            if let Some(o) = base.as_object_mut() {
                o.remove(&p.1);
            }
        }
    }
}

/// Ownership: manager -> (operation, fields).
pub type Managed = BTreeMap<String, (String, BTreeSet<FieldPath>)>;

fn key_of(s: &str) -> String {
    format!("f:{s}")
}

/// Reads `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Managed {
    let mut out = Managed::new();
    for entry in obj["metadata"]["managedFields"].as_array().into_iter().flatten() {
        let manager = entry["manager"].as_str().unwrap_or_default().to_string();
        let op = entry["operation"].as_str().unwrap_or("Update").to_string();
        let mut paths = BTreeSet::new();
        for (top, inner) in entry["fieldsV1"].as_object().into_iter().flatten() {
            let top = top.trim_start_matches("f:");
            if top == "metadata" {
                for (sub, keys) in inner.as_object().into_iter().flatten() {
                    let sub = sub.trim_start_matches("f:");
                    match keys.as_object() {
                        Some(k) if !k.is_empty() && (sub == "labels" || sub == "annotations") => {
                            for key in k.keys() {
                                paths.insert((format!("metadata.{sub}"), key.trim_start_matches("f:").to_string()));
                            }
                        }
                        _ => {
                            paths.insert(("metadata".into(), sub.into()));
                        }
                    }
                }
                continue;
            }
            match inner.as_object() {
                Some(k) if !k.is_empty() => {
                    for key in k.keys() {
                        paths.insert((top.to_string(), key.trim_start_matches("f:").to_string()));
                    }
                }
                _ => {
                    paths.insert((top.to_string(), String::new()));
                }
            }
        }
        out.insert(manager, (op, paths));
    }
    out
}

/// Writes `metadata.managedFields` (entries without fields are dropped).
pub fn write_managed(obj: &mut Value, managed: &Managed) {
    let mut entries = vec![];
    for (manager, (op, paths)) in managed.iter().filter(|(_, (_, p))| !p.is_empty()) {
        let mut fields = json!({});
        for (top, sub) in paths {
            let slot = match top.split_once('.') {
                Some((a, b)) => &mut fields[key_of(a)][key_of(b)],
                None => &mut fields[key_of(top)],
            };
            if sub.is_empty() {
                if slot.is_null() {
                    *slot = json!({});
                }
            } else {
                slot[key_of(sub)] = json!({});
            }
        }
        entries.push(json!({"manager": manager, "operation": op, "apiVersion": obj["apiVersion"],
                            "fieldsType": "FieldsV1", "fieldsV1": fields}));
    }
    if entries.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(entries);
    }
}

/// A non-apply write by `manager`: the fields it changed become its own.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str) {
    let mut managed = old.map(read_managed).unwrap_or_default();
    let before = old.map(field_paths).unwrap_or_default();
    let after = field_paths(new);
    let changed: BTreeSet<FieldPath> =
        after.iter().filter(|p| old.and_then(|o| get(o, p)) != get(new, p)).cloned().collect();
    let gone: BTreeSet<FieldPath> = before.difference(&after).cloned().collect();
    for (_, paths) in managed.values_mut() {
        paths.retain(|p| !changed.contains(p) && !gone.contains(p));
    }
    if !changed.is_empty() {
        managed.entry(manager.to_string()).or_insert_with(|| ("Update".into(), BTreeSet::new())).1.extend(changed);
    }
    write_managed(new, &managed);
}

/// Applies `applied` as `manager` onto `current` (None when creating). Returns the new object.
pub fn apply(current: Option<&Value>, applied: &Value, manager: &str, force: bool) -> Result<Value, ApiError> {
    let mut obj = current.cloned().unwrap_or_else(|| json!({}));
    let mut managed = current.map(read_managed).unwrap_or_default();
    let mine = field_paths(applied);
    let mut conflicts = vec![];
    for p in &mine {
        for (other, (_, paths)) in managed.iter().filter(|(m, _)| *m != manager) {
            if paths.contains(p) && get(&obj, p) != get(applied, p) {
                let path = if p.1.is_empty() { format!(".{}", p.0) } else { format!(".{}.{}", p.0, p.1) };
                conflicts.push(format!("conflict with \"{other}\": {path}"));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("Apply failed with {} conflict(s): {}", conflicts.len(), conflicts.join(", ")),
        ));
    }
    for (other, (_, paths)) in managed.iter_mut() {
        if other != manager {
            paths.retain(|p| !mine.contains(p));
        }
    }
    let previously: BTreeSet<FieldPath> = managed.get(manager).map(|(_, p)| p.clone()).unwrap_or_default();
    for p in previously.difference(&mine) {
        let someone_else = managed.iter().any(|(m, (_, paths))| m != manager && paths.contains(p));
        if !someone_else {
            set(&mut obj, p, None);
        }
    }
    for p in &mine {
        set(&mut obj, p, get(applied, p));
    }
    for k in ["apiVersion", "kind"] {
        if let Some(v) = applied.get(k) {
            obj[k] = v.clone();
        }
    }
    if let Some(name) = applied["metadata"].get("name") {
        obj["metadata"]["name"] = name.clone();
    }
    managed.insert(manager.to_string(), ("Apply".into(), mine));
    write_managed(&mut obj, &managed);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_fields_round_trip() {
        let mut obj = json!({"apiVersion": "v1", "metadata": {"name": "x"}});
        let mut m = Managed::new();
        m.insert(
            "a".into(),
            ("Apply".into(), [("data".to_string(), "k".to_string()), ("metadata.labels".into(), "l".into())].into()),
        );
        m.insert("b".into(), ("Update".into(), [("spec".to_string(), String::new())].into()));
        write_managed(&mut obj, &m);
        assert_eq!(read_managed(&obj), m);
    }

    #[test]
    fn apply_conflicts_forces_and_removes_dropped_fields() {
        let a1 =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1", "y": "1"}});
        let obj = apply(None, &a1, "a", false).unwrap();
        let b = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "2"}});
        let err = apply(Some(&obj), &b, "b", false).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains("conflict with \"a\": .data.x"), "{}", err.message);
        // Same value: no conflict, shared ownership.
        let same = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"y": "1"}});
        let obj = apply(Some(&obj), &same, "b", false).unwrap();
        // a stops applying y: b still owns it, so it stays; a stops applying x: x goes.
        let a2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}});
        let obj = apply(Some(&obj), &a2, "a", false).unwrap();
        assert_eq!(obj["data"], json!({"y": "1"}));
        let forced = apply(Some(&obj), &b, "b", true).unwrap();
        assert_eq!(forced["data"]["x"], "2");
    }
}
