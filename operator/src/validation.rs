//! Offline admission: checks a custom resource the way the API server would (OpenAPI schema of the generated
//! CRD with strict field validation, then the CRD's CEL `x-kubernetes-validations` rules), so that
//! `crmguard plan` and the tests refuse exactly what `kubectl apply` would refuse.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use kube::core::cel::{CompiledSchema, Validator as CelValidator, compile_schema};
use serde_json::Value;

use crate::api::common::{GROUP, VERSION};

/// One problem with one field, phrased for the person who wrote the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.retention`. Empty for the whole object.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

struct KindSchema {
    /// Root openAPIV3Schema, as served (used for CEL and defaults).
    root: Value,
    cel: CompiledSchema,
    /// Draft-4 validator of `spec` with OpenAPI `nullable` and strict unknown-field checks translated.
    spec: jsonschema::Validator,
}

fn schemas() -> &'static BTreeMap<String, KindSchema> {
    static SCHEMAS: OnceLock<BTreeMap<String, KindSchema>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        crate::api::crds()
            .into_iter()
            .filter_map(|crd| {
                let kind = crd.spec.names.kind.clone();
                let root =
                    serde_json::to_value(crd.spec.versions.first()?.schema.as_ref()?.open_api_v3_schema.as_ref()?)
                        .ok()?;
                let mut spec_schema = root.get("properties")?.get("spec")?.clone();
                to_strict_draft4(&mut spec_schema);
                let spec = jsonschema::draft4::new(&spec_schema).ok()?;
                let cel = compile_schema(&root);
                Some((kind, KindSchema { root, cel, spec }))
            })
            .collect()
    })
}

/// Translates an OpenAPI v3 structural schema into a draft-4 JSON schema with the API server's semantics:
/// `nullable: true` admits null, `x-kubernetes-int-or-string` admits exactly an integer or a string, and objects with declared properties refuse unknown fields (kubectl's
/// default `--validate=strict`), unless `x-kubernetes-preserve-unknown-fields` is set.
fn to_strict_draft4(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else { return };
    if let (Some(Value::Bool(true)), Some(Value::String(t))) = (obj.get("nullable"), obj.get("type").cloned()) {
        obj.insert("type".into(), serde_json::json!([t, "null"]));
    }
    if obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) && !obj.contains_key("type") {
        let nullable = obj.get("nullable") == Some(&Value::Bool(true));
        let mut types = vec![serde_json::json!({"type": "integer"}), serde_json::json!({"type": "string"})];
        if nullable {
            types.push(serde_json::json!({"type": "null"}));
        }
        obj.insert("anyOf".into(), Value::Array(types));
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") && !preserve {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    // Kubernetes formats such as int32/int64/byte are not JSON-schema formats; keep date-time only.
    if obj.get("format").is_some_and(|f| f != "date-time") {
        obj.remove("format");
    }
    for (key, child) in obj.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Some(props) = child.as_object_mut() {
                    props.values_mut().for_each(to_strict_draft4);
                }
            }
            "items" | "additionalProperties" | "not" => to_strict_draft4(child),
            "anyOf" | "allOf" | "oneOf" => {
                if let Some(list) = child.as_array_mut() {
                    list.iter_mut().for_each(to_strict_draft4);
                }
            }
            _ => {}
        }
    }
}

fn json_pointer_to_path(prefix: &str, pointer: &str) -> String {
    let mut out = prefix.to_string();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

/// Returns the kind when `obj` is a crmguard custom resource of a version this build serves.
pub fn crmguard_kind(obj: &Value) -> Option<&str> {
    let api_version = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    (api_version == format!("{GROUP}/{VERSION}") && crate::api::KINDS.contains(&kind)).then_some(kind)
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Validates a crmguard custom resource (as JSON) like the API server's admission would on create.
/// Returns every problem found; an empty list means the object would be accepted.
pub fn admit(obj: &Value) -> Vec<FieldError> {
    admit_update(obj, None)
}

/// Like [`admit`], for an update from `old` (transition rules such as immutability apply).
pub fn admit_update(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Some(kind) = crmguard_kind(obj) else {
        let found = format!(
            "{}/{}",
            obj.get("apiVersion").and_then(Value::as_str).unwrap_or("<no apiVersion>"),
            obj.get("kind").and_then(Value::as_str).unwrap_or("<no kind>")
        );
        errors.push(FieldError::new(
            "",
            format!(
                "{found} is not a crmguard resource: expected apiVersion {GROUP}/{VERSION} and kind one of {}",
                crate::api::KINDS.join(", ")
            ),
        ));
        return errors;
    };
    match obj.pointer("/metadata/name").and_then(Value::as_str) {
        None => errors.push(FieldError::new("metadata.name", "Required value: every resource needs a name")),
        Some(name) if !is_dns_subdomain(name) => errors.push(FieldError::new(
            "metadata.name",
            format!("Invalid value {name:?}: use lower-case letters, digits, '-' and '.', at most 253 characters"),
        )),
        Some(_) => {}
    }
    let Some(schema) = schemas().get(kind) else {
        errors.push(FieldError::new("", format!("no schema for kind {kind}")));
        return errors;
    };
    let Some(spec) = obj.get("spec") else {
        errors.push(FieldError::new("spec", "Required value"));
        return errors;
    };
    for e in schema.spec.iter_errors(spec) {
        errors.push(FieldError::new(json_pointer_to_path("spec", e.instance_path().as_str()), e.to_string()));
    }
    if !errors.is_empty() {
        // CEL rules assume a schema-valid object (as in the API server, which stops here too).
        return errors;
    }
    if let Err(cel_errors) = CelValidator::new().validate_compiled(&schema.cel, obj, old) {
        for e in cel_errors.into_vec() {
            errors.push(FieldError::new(e.field_path.clone(), e.message.clone()));
        }
    }
    errors
}

/// Reads a (defaulted) object into its typed form. The schema admits a few values the typed API cannot hold
/// (e.g. an integer port beyond 32 bits); such an object gets an error naming the field instead of a panic
/// or a broken watch.
pub fn read_typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(if path == "." { String::new() } else { path }, format!("cannot be read: {}", e.inner()))
    })
}

/// Applies the CRD schema's defaults to `obj`, as the API server does on admission.
pub fn with_defaults(obj: &Value) -> Value {
    match crmguard_kind(obj).and_then(|k| schemas().get(k)) {
        Some(schema) => kube::core::cel::apply_defaults(&schema.root, obj),
        None => obj.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_paths_read_like_kubectl() {
        assert_eq!(json_pointer_to_path("spec", "/teams/0/name"), "spec.teams[0].name");
        assert_eq!(json_pointer_to_path("spec", ""), "spec");
        assert_eq!(json_pointer_to_path("spec", "/a~1b"), "spec.a/b");
    }

    #[test]
    fn nullable_and_unknown_fields_are_translated() {
        let mut s = serde_json::json!({"type": "object", "properties": {"a": {"type": "string", "nullable": true}}});
        to_strict_draft4(&mut s);
        assert_eq!(s["additionalProperties"], Value::Bool(false));
        assert_eq!(s["properties"]["a"]["type"], serde_json::json!(["string", "null"]));
    }

    #[test]
    fn int_or_string_admits_only_integers_and_strings() {
        let mut s = serde_json::json!({"x-kubernetes-int-or-string": true});
        to_strict_draft4(&mut s);
        let v = jsonschema::draft4::new(&s).unwrap();
        assert!(v.is_valid(&serde_json::json!(8080)));
        assert!(v.is_valid(&serde_json::json!("http")));
        assert!(!v.is_valid(&serde_json::json!({})));
        assert!(!v.is_valid(&serde_json::json!(true)));
    }

    #[test]
    fn every_kind_has_a_compiled_schema() {
        for kind in crate::api::KINDS {
            assert!(schemas().contains_key(kind), "{kind}");
        }
    }
}
