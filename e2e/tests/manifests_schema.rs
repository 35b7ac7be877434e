//! Every object the chart renders (manifests/crmguard.yaml, rendered by Helm with default values) is valid against
//! the Kubernetes API schema of its kind: it deserialises into the k8s-openapi type generated from the upstream
//! OpenAPI document (types and required fields), and no field is lost on the way (so no unknown or misspelt field).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn lost_fields(written: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(bv) => lost_fields(v, bv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
    let typed: T = serde_path_to_error::deserialize(v.clone()).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    Ok(serde_json::to_value(typed).unwrap())
}

fn validate(doc: &Value) -> Result<(), String> {
    let typed = match doc["kind"].as_str().unwrap_or_default() {
        "Namespace" => round_trip::<Namespace>(doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "Service" => round_trip::<Service>(doc),
        "Deployment" => round_trip::<Deployment>(doc),
        "NetworkPolicy" => round_trip::<NetworkPolicy>(doc),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "Role" => round_trip::<Role>(doc),
        "RoleBinding" => round_trip::<RoleBinding>(doc),
        "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(doc),
        "ValidatingAdmissionPolicy" => {
            round_trip::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>(doc)
        }
        "ValidatingAdmissionPolicyBinding" => {
            round_trip::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>(doc)
        }
        other => return Err(format!("no schema known for kind {other}: add it here")),
    }?;
    let mut lost = vec![];
    lost_fields(doc, &typed, "", &mut lost);
    if lost.is_empty() { Ok(()) } else { Err(format!("unknown fields {lost:?}")) }
}

#[test]
fn every_rendered_object_matches_its_kubernetes_schema() {
    let root = e2e::repo_root().join("manifests");
    let mut checked = 0;
    let mut problems = vec![];
    for file in [
        "crmguard.yaml",
        "namespace.yaml",
        "crds/networkguards.crmguard.io.yaml",
        "crds/crmbackuppolicies.crmguard.io.yaml",
        "crds/crmrestores.crmguard.io.yaml",
        "crds/accesspolicies.crmguard.io.yaml",
        "crds/accessmonitors.crmguard.io.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().filter(|d| !d.is_null()) {
            checked += 1;
            if let Err(e) = validate(&doc) {
                problems.push(format!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
            }
        }
    }
    assert!(checked >= 13, "{checked}");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_misspelt_field_is_caught() {
    let bad: Value = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "securityContext": {"readOnlyRootFilesytem": true}}]}}}});
    let err = validate(&bad).unwrap_err();
    assert!(err.contains("readOnlyRootFilesytem"), "{err}");
    let wrong_type: Value = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two"}});
    assert!(validate(&wrong_type).unwrap_err().contains("spec.replicas"));
}
