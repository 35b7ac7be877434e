//! The examples are the product's front door: every one must be accepted exactly as the API server would
//! accept it, round-trip through the typed API, and plan into the expected children.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod support;

use crmguard::api::{AccessPolicy, CrmBackupPolicy, CrmRestore, NetworkGuard};
use crmguard::controllers::BuildContext;
use crmguard::plan::{plan, render};
use crmguard::validation::{admit, with_defaults};
use serde_json::Value;
use support::examples;

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
    let typed: T = serde_json::from_value(v.clone()).expect("deserialises");
    let back = serde_json::to_value(&typed).expect("serialises");
    let again: T = serde_json::from_value(back.clone()).expect("deserialises again");
    assert_eq!(serde_json::to_value(&again).unwrap(), back, "serialisation is stable");
    // Everything the user wrote survives the round trip (serialisation only adds defaults).
    assert_subset(v, &back, "");
}

fn assert_subset(written: &Value, stored: &Value, path: &str) {
    match (written, stored) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let child = format!("{path}.{k}");
                let other = b.get(k).unwrap_or_else(|| panic!("{child} was dropped by the typed API"));
                assert_subset(v, other, &child);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

#[test]
fn every_example_is_admitted_and_round_trips() {
    let docs = examples();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d.value["kind"].as_str()).collect();
    for kind in crmguard::api::KINDS {
        assert!(kinds.contains(&kind), "examples/ lacks a {kind}");
    }
    for d in docs.iter().filter(|d| crmguard::validation::crmguard_kind(&d.value).is_some()) {
        let errors = admit(&d.value);
        assert!(errors.is_empty(), "{}: {errors:?}", d.source);
        let defaulted = with_defaults(&d.value);
        match d.value["kind"].as_str().unwrap() {
            "CrmBackupPolicy" => roundtrip::<CrmBackupPolicy>(&defaulted),
            "CrmRestore" => roundtrip::<CrmRestore>(&defaulted),
            "AccessPolicy" => roundtrip::<AccessPolicy>(&defaulted),
            "NetworkGuard" => roundtrip::<NetworkGuard>(&defaulted),
            "AccessMonitor" => roundtrip::<crmguard::api::AccessMonitor>(&defaulted),
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[test]
fn defaults_match_the_typed_defaults() {
    // The API server fills schema defaults; the operator's serde defaults must agree with them.
    let policy = support::example("CrmBackupPolicy");
    let defaulted = with_defaults(&policy);
    let typed: CrmBackupPolicy = serde_json::from_value(policy).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap()["spec"], defaulted["spec"]);
}

fn now() -> jiff::Timestamp {
    "2026-11-29T12:00:00Z".parse().unwrap()
}

#[test]
fn plan_of_the_examples_creates_the_expected_objects() {
    let plans = plan(&examples(), None, &BuildContext::default(), now());
    let mut names: Vec<String> = plans
        .iter()
        .flat_map(|p| {
            assert!(p.errors.is_empty(), "{}: {:?}", p.resource, p.errors);
            p.children
                .iter()
                .map(|c| format!("{}/{}", c["kind"].as_str().unwrap(), c["metadata"]["name"].as_str().unwrap()))
        })
        .collect();
    names.sort();
    let expected = [
        "ConfigMap/crm-db-backup-config",
        "CronJob/crm-db-backup",
        "CronJob/crm-db-drill",
        "Job/crm-db-check-restore",
        "NetworkPolicy/crm-firewall.default-deny",
        "NetworkPolicy/crm-firewall.dns",
        "NetworkPolicy/crm-firewall.in-ingress-to-web",
        "NetworkPolicy/crm-firewall.in-monitoring",
        "NetworkPolicy/crm-firewall.in-web-to-db",
        "NetworkPolicy/crm-firewall.out-to-db",
        "NetworkPolicy/crm-firewall.out-to-smtp",
        "NetworkPolicy/crm-firewall.out-to-vault",
        "NetworkPolicy/crm-firewall.quarantine",
        "Role/crm-teams-finance",
        "Role/crm-teams-oncall",
        "Role/crm-teams-sales",
        "RoleBinding/crm-teams-finance",
        "RoleBinding/crm-teams-oncall",
        "RoleBinding/crm-teams-sales",
        "ServiceAccount/crm-db-backup",
    ];
    assert_eq!(names, expected);
}

#[test]
fn every_child_has_owner_reference_and_standard_labels() {
    for p in plan(&examples(), None, &BuildContext::default(), now()) {
        for c in &p.children {
            let meta = &c["metadata"];
            let owner = &meta["ownerReferences"][0];
            assert_eq!(owner["controller"], true, "{}", meta["name"]);
            assert_eq!(owner["apiVersion"], "crmguard.io/v1alpha1");
            assert_eq!(meta["namespace"], "crm");
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
                "crmguard.io/owner",
            ] {
                assert!(meta["labels"][label].is_string(), "{} lacks {label}", meta["name"]);
            }
            assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "crmguard");
        }
    }
}

#[test]
fn expired_grants_are_left_out_of_rbac() {
    let later: jiff::Timestamp = "2031-01-01T00:00:00Z".parse().unwrap();
    let plans = plan(&examples(), None, &BuildContext::default(), later);
    let ap = plans.iter().find(|p| p.resource.starts_with("AccessPolicy")).unwrap();
    let roles: Vec<&str> =
        ap.children.iter().filter(|c| c["kind"] == "Role").map(|c| c["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(roles, ["crm-teams-sales", "crm-teams-finance"], "oncall's break-glass grant expired in 2030");
    assert!(ap.warnings.iter().any(|w| w.contains("oncall") && w.contains("expired")), "{:?}", ap.warnings);
}

#[test]
fn the_plan_shows_each_teams_vault_objects_with_only_its_tables() {
    let now: jiff::Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
    let plans = plan(&examples(), None, &BuildContext::default(), now);
    let ap = plans.iter().find(|p| p.resource.starts_with("AccessPolicy")).unwrap();
    let paths: Vec<&str> = ap.vault.iter().map(|(p, _)| p.as_str()).collect();
    assert!(paths.contains(&"sys/policies/acl/crmguard_crm_crm-teams_sales"), "{paths:?}");
    assert!(paths.contains(&"auth/kubernetes/role/crmguard_crm_crm-teams_sales"), "{paths:?}");
    let role = |team: &str| {
        let path = format!("database/roles/crmguard_crm_crm-teams_{team}");
        let (_, body) = ap.vault.iter().find(|(p, _)| *p == path).unwrap_or_else(|| panic!("{path} in {paths:?}"));
        body["creation_statements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (sales, finance) = (role("sales"), role("finance"));
    assert!(sales.contains("\"public\".\"accounts\"") && !sales.contains("invoices"), "{sales}");
    assert!(finance.contains("invoices") && !finance.contains("accounts"), "{finance}");
    assert!(render(&plans).contains("#   database/roles/crmguard_crm_crm-teams_sales:"));
}
