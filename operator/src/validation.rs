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
    // The API server reads an integer as any JSON number without a fractional part (`3.0` is accepted).
    if obj.get("type") == Some(&Value::String("integer".into())) {
        obj.insert("type".into(), Value::String("number".into()));
        obj.insert("multipleOf".into(), serde_json::json!(1));
    }
    if let (Some(Value::Bool(true)), Some(Value::String(t))) = (obj.get("nullable"), obj.get("type").cloned()) {
        // Observed on the real API server (e2e/tests/admission.rs): a nullable date-time also admits an array.
        let types = if obj.get("format") == Some(&Value::String("date-time".into())) {
            serde_json::json!([t, "null", "array"])
        } else {
            serde_json::json!([t, "null"])
        };
        obj.insert("type".into(), types);
    }
    if obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) && !obj.contains_key("type") {
        let nullable = obj.get("nullable") == Some(&Value::Bool(true));
        // An integer is any number without a fractional part (5432.0 is accepted, as JSON numbers are).
        let mut types =
            vec![serde_json::json!({"type": "number", "multipleOf": 1}), serde_json::json!({"type": "string"})];
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

/// A duration field, parsed: its value, or `None` with a field error naming it in `errors`.
pub fn duration_field(
    field: impl Into<String>,
    value: &str,
    errors: &mut Vec<FieldError>,
) -> Option<std::time::Duration> {
    crate::api::common::parse_duration(value).map_err(|e| errors.push(FieldError::new(field, e.to_string()))).ok()
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
    // Strict field validation (kubectl's default, `fieldValidation=Strict`) of what lies outside `spec`.
    if let Some(o) = obj.as_object() {
        for k in o.keys().filter(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str())) {
            errors.push(FieldError::new(
                k.clone(),
                "unknown field: a resource has apiVersion, kind, metadata, spec and status",
            ));
        }
    }
    check_metadata(obj.get("metadata"), &mut errors);
    if let (Some(status), Some(status_schema)) = (obj.get("status"), schema.root.pointer("/properties/status")) {
        unknown_fields(status_schema, status, "status", &mut errors);
    }
    // As the API server decodes: null in a field that is not nullable is dropped, then defaults are applied;
    // the schema and the rules see the result.
    let obj = with_defaults(&prune_nulls(&schema.root, obj));
    let old = old.map(|o| with_defaults(&prune_nulls(&schema.root, o)));
    let Some(spec) = obj.get("spec") else {
        errors.push(FieldError::new("spec", "Required value"));
        return errors;
    };
    for e in schema.spec.iter_errors(spec) {
        errors.push(FieldError::new(json_pointer_to_path("spec", e.instance_path().as_str()), e.to_string()));
    }
    if let Some(spec_schema) = schema.root.pointer("/properties/spec") {
        duplicates(spec_schema, spec, "spec", &mut errors);
    }
    if !errors.is_empty() {
        // CEL rules assume a schema-valid object (as in the API server, which stops here too).
        return errors;
    }
    // The API server's CEL sees a field whose value is null as absent: `has()` is false and its rules do not run.
    let (obj, old) = (without_nulls(&obj), old.map(|o| without_nulls(&o)));
    if let Err(cel_errors) = CelValidator::new().validate_compiled(&schema.cel, &obj, old.as_ref()) {
        for e in cel_errors.into_vec() {
            errors.push(FieldError::new(e.field_path.clone(), e.message.clone()));
        }
    }
    errors
}

/// The fields of `metadata` (ObjectMeta) a client may send.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// A qualified name as label and annotation keys use it: an optional DNS-subdomain prefix and `/`, then a
/// name of at most 63 characters of alphanumerics, `-`, `_` and `.`, starting and ending alphanumeric.
/// The value of a Kubernetes resource quantity (`500m`, `2`, `1.5Gi`, `1e3`), as the API server's grammar
/// defines it: a signed decimal number and an optional binary-SI (`Ki`..`Ei`), decimal-SI (`n`, `u`, `m`, `k`,
/// `M`..`E`) or decimal-exponent (`e3`, `E-2`) suffix. `None` when `s` is not a quantity.
pub fn quantity_value(s: &str) -> Option<f64> {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let split = unsigned.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(split);
    let digits_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !digits_ok {
        return None;
    }
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => {
            let exp = &e[1..];
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            10f64.powi(exp.parse().ok()?)
        }
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    Some(if s.starts_with('-') { -value * scale } else { value * scale })
}

/// A qualified name as label keys use: an optional DNS-subdomain prefix and `/`, then a name of up to 63
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && is_label_value(name) && !name.is_empty()
}

/// A label value: empty, or at most 63 characters of alphanumerics, `-`, `_` and `.`, starting and ending
/// alphanumeric.
pub fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && v.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric))
}

fn check_metadata(meta: Option<&Value>, errors: &mut Vec<FieldError>) {
    let Some(meta) = meta.and_then(Value::as_object) else { return };
    for k in meta.keys().filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str())) {
        errors.push(FieldError::new(format!("metadata.{k}"), "unknown field"));
    }
    for (field, values) in [("labels", true), ("annotations", false)] {
        let Some(map) = meta.get(field).and_then(Value::as_object) else { continue };
        for (k, v) in map {
            if !is_qualified_name(k) {
                errors.push(FieldError::new(
                    format!("metadata.{field}"),
                    format!("Invalid value {k:?}: a key is an optional DNS prefix and '/', then at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"),
                ));
            }
            if values && !v.as_str().is_some_and(is_label_value) {
                errors.push(FieldError::new(
                    format!("metadata.{field}.{k}"),
                    format!("Invalid value {v}: a label value is at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"),
                ));
            }
        }
    }
}

/// Drops `null` from every object field whose schema is not nullable, as the API server does before defaulting.
fn prune_nulls(schema: &Value, v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut out = serde_json::Map::new();
            for (k, child) in o {
                let child_schema = props.and_then(|p| p.get(k)).or(additional);
                let nullable = child_schema.is_some_and(|s| s.get("nullable") == Some(&Value::Bool(true)));
                if child.is_null() && child_schema.is_some() && !nullable {
                    continue;
                }
                let pruned = match child_schema {
                    Some(s) => prune_nulls(s, child),
                    None => child.clone(),
                };
                out.insert(k.clone(), pruned);
            }
            Value::Object(out)
        }
        Value::Array(a) => match schema.get("items") {
            Some(items) => Value::Array(a.iter().map(|i| prune_nulls(items, i)).collect()),
            None => v.clone(),
        },
        _ => v.clone(),
    }
}

/// The object without any null-valued field (at any depth).
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            Value::Object(o.iter().filter(|(_, c)| !c.is_null()).map(|(k, c)| (k.clone(), without_nulls(c))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Fields the schema does not declare (strict decoding reports them wherever they are).
fn unknown_fields(schema: &Value, v: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in o {
                match props.and_then(|p| p.get(k)).or(additional) {
                    Some(s) => unknown_fields(s, child, &format!("{path}.{k}"), errors),
                    None if props.is_some() => errors.push(FieldError::new(format!("{path}.{k}"), "unknown field")),
                    None => {}
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, child) in a.iter().enumerate() {
                    unknown_fields(items, child, &format!("{path}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
}

/// Duplicate entries of lists the schema declares as `x-kubernetes-list-type: map` (by their keys) or `set`.
fn duplicates(schema: &Value, v: &Value, path: &str, errors: &mut Vec<FieldError>) {
    match v {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in o {
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    duplicates(s, child, &format!("{path}.{k}"), errors);
                }
            }
        }
        Value::Array(a) => {
            let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen: Vec<Value> = vec![];
            for (i, item) in a.iter().enumerate() {
                let id = match list_type {
                    Some("map") => Value::Object(
                        keys.iter().filter_map(|k| Some((k.to_string(), item.get(*k)?.clone()))).collect(),
                    ),
                    Some("set") => item.clone(),
                    _ => continue,
                };
                if seen.contains(&id) {
                    errors.push(FieldError::new(format!("{path}[{i}]"), format!("Duplicate value: {id}")));
                } else {
                    seen.push(id);
                }
            }
            if let Some(items) = schema.get("items") {
                for (i, child) in a.iter().enumerate() {
                    duplicates(items, child, &format!("{path}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
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

#[cfg(test)]
mod quantity_tests {
    use super::quantity_value;

    /// Expected values from the Kubernetes "Resource units" documentation and the Quantity grammar
    /// (`<signedNumber><suffix>`), not from the code.
    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for (s, want) in [
            ("500m", 0.5),
            ("2", 2.0),
            ("0.1", 0.1),
            ("1Gi", 1073741824.0),
            ("128974848", 128974848.0),
            ("129e6", 129e6),
            ("129M", 129e6),
            ("123Mi", 128974848.0),
            ("+1k", 1000.0),
            ("-1", -1.0),
            (".5", 0.5),
            ("1E-2", 0.01),
        ] {
            let got = quantity_value(s).unwrap_or_else(|| panic!("{s} is a quantity"));
            assert!((got - want).abs() <= want.abs() * 1e-12, "{s}: {got} != {want}");
        }
        for bad in ["lots", "", "1.2.3", "1 Gi", "1gi", "Gi", "1GiB", "0x10", ".", "1e", "1e+", "1m1", "--1"] {
            assert_eq!(quantity_value(bad), None, "{bad:?} is not a quantity");
        }
    }
}
