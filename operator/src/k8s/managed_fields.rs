//! Who owns which fields of an object (`metadata.managedFields`), as far as crmguard needs to change it: the status
//! its earlier versions wrote with merge patches (an `Update` operation) is moved to the server-side apply that
//! writes it now. Without the move the apply would never remove a field those updates set: a field is removed
//! when no manager owns it any more, and the `Update` entry would own it forever (Kubernetes' "upgrading from
//! client-side apply to server-side apply" describes the same move for kubectl).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use serde_json::Value;

/// The managers under which earlier versions of crmguard wrote status with merge patches: the API server names a
/// request without `fieldManager` after its User-Agent's product (`crmguard/<version> (<replica>)` -> `crmguard`).
pub const LEGACY_STATUS_MANAGERS: &[&str] = &["crmguard"];

/// `entries` with the fields of the `legacy` managers' `Update` entries of `subresource` moved into `manager`'s
/// `Apply` entry of it (made from them when there is none); `None` when there is no such `Update` entry.
pub fn move_to_apply(
    entries: &[ManagedFieldsEntry],
    manager: &str,
    subresource: &str,
    legacy: &[&str],
) -> Option<Vec<ManagedFieldsEntry>> {
    let of = |e: &ManagedFieldsEntry, op: &str| {
        e.operation.as_deref() == Some(op) && e.subresource.as_deref() == Some(subresource)
    };
    let is_legacy = |e: &ManagedFieldsEntry| of(e, "Update") && legacy.contains(&e.manager.as_deref().unwrap_or(""));
    let moved: Vec<&ManagedFieldsEntry> = entries.iter().filter(|e| is_legacy(e)).collect();
    let first = (*moved.first()?).clone();
    let mut out: Vec<ManagedFieldsEntry> = entries.iter().filter(|e| !is_legacy(e)).cloned().collect();
    let apply = match out.iter().position(|e| of(e, "Apply") && e.manager.as_deref() == Some(manager)) {
        Some(i) => &mut out[i],
        None => {
            out.push(ManagedFieldsEntry {
                manager: Some(manager.to_string()),
                operation: Some("Apply".into()),
                fields_v1: None,
                ..first
            });
            out.last_mut()?
        }
    };
    let fields = apply.fields_v1.get_or_insert_with(|| FieldsV1(Value::Object(Default::default())));
    for e in moved {
        if let Some(f) = &e.fields_v1 {
            union(&mut fields.0, &f.0);
        }
    }
    Some(out)
}

/// Adds the field set `more` to `into` (both in the `FieldsV1` trie form: `{"f:status": {"f:x": {}}}`).
fn union(into: &mut Value, more: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, more) {
        for (k, v) in b {
            union(a.entry(k.clone()).or_insert_with(|| Value::Object(Default::default())), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(manager: &str, op: &str, sub: Option<&str>, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(op.into()),
            subresource: sub.map(str::to_string),
            api_version: Some("crmguard.io/v1alpha1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            time: None,
        }
    }

    #[test]
    fn the_status_an_update_wrote_becomes_the_applys_and_nothing_else_moves() {
        let entries = vec![
            entry("kubectl", "Update", None, json!({"f:spec": {"f:ttl": {}}})),
            entry(
                "crmguard",
                "Update",
                Some("status"),
                json!({"f:status": {"f:policies": {}, "f:observedGeneration": {}}}),
            ),
            entry(
                "crmguard/networkguard",
                "Apply",
                Some("status"),
                json!({"f:status": {"f:observedGeneration": {}, "f:conditions": {}}}),
            ),
            entry("crmguard", "Update", None, json!({"f:metadata": {"f:finalizers": {}}})),
            entry("someone", "Update", Some("status"), json!({"f:status": {"f:note": {}}})),
        ];
        let moved = move_to_apply(&entries, "crmguard/networkguard", "status", LEGACY_STATUS_MANAGERS).unwrap();
        let names: Vec<(String, String, Option<String>)> = moved
            .iter()
            .map(|e| (e.manager.clone().unwrap(), e.operation.clone().unwrap(), e.subresource.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("kubectl".into(), "Update".into(), None),
                ("crmguard/networkguard".into(), "Apply".into(), Some("status".into())),
                ("crmguard".into(), "Update".into(), None),
                ("someone".into(), "Update".into(), Some("status".into())),
            ],
            "only crmguard's own Update of the status goes; another manager's status fields stay theirs"
        );
        assert_eq!(
            moved[1].fields_v1.as_ref().unwrap().0,
            json!({"f:status": {"f:observedGeneration": {}, "f:conditions": {}, "f:policies": {}}})
        );
        assert_eq!(move_to_apply(&moved, "crmguard/networkguard", "status", LEGACY_STATUS_MANAGERS), None, "once");
    }

    #[test]
    fn without_an_apply_entry_the_update_is_turned_into_one() {
        let entries = vec![entry("crmguard", "Update", Some("status"), json!({"f:status": {"f:policies": {}}}))];
        let moved = move_to_apply(&entries, "crmguard/networkguard", "status", LEGACY_STATUS_MANAGERS).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(
            (moved[0].manager.as_deref(), moved[0].operation.as_deref(), moved[0].subresource.as_deref()),
            (Some("crmguard/networkguard"), Some("Apply"), Some("status"))
        );
        assert_eq!(moved[0].fields_v1.as_ref().unwrap().0, json!({"f:status": {"f:policies": {}}}));
    }
}
