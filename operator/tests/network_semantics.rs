//! The NetworkPolicies crmguard plans for the example CRM, driven through the NetworkPolicy evaluator with a
//! truth table of flows (examples/topology/ models the pods around the CRM).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod support;

use crmguard::controllers::BuildContext;
use crmguard::netpol::{Endpoint, Flow, World};
use crmguard::plan::{plan, world};

fn example_world() -> World {
    let docs = support::examples();
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    let plans = plan(&docs, None, &BuildContext::default(), now);
    world(&docs, &plans)
}

fn ep(s: &str) -> Endpoint {
    match s.parse() {
        Ok(ip) => Endpoint::External(ip),
        Err(_) => {
            let (ns, name) = s.split_once('/').unwrap();
            Endpoint::Pod { namespace: ns.into(), name: name.into() }
        }
    }
}

fn flow(from: &str, to: &str, port: u16, protocol: &str) -> Flow {
    Flow { from: ep(from), to: ep(to), port, protocol: protocol.into() }
}

const ALLOW: bool = true;
const DENY: bool = false;

#[test]
fn the_example_firewall_allows_exactly_the_intended_flows() {
    let w = example_world();
    assert_eq!(w.policies.len(), 9);
    let table = [
        // The way in: only the ingress controller reaches the web pods, on 8080 only.
        ("ingress-nginx/controller", "crm/web", 8080, "TCP", ALLOW),
        ("ingress-nginx/controller", "crm/web", 9090, "TCP", DENY),
        ("ingress-nginx/controller", "crm/db", 5432, "TCP", DENY),
        ("ingress-nginx/controller", "crm/worker", 8081, "TCP", DENY),
        ("shop/storefront", "crm/web", 8080, "TCP", DENY),
        // The database: web and worker on 5432/TCP, nobody else, nothing else.
        ("crm/web", "crm/db", 5432, "TCP", ALLOW),
        ("crm/worker", "crm/db", 5432, "TCP", ALLOW),
        ("crm/web", "crm/db", 5433, "TCP", DENY),
        ("crm/web", "crm/db", 5432, "UDP", DENY),
        ("crm/debug-shell", "crm/db", 5432, "TCP", DENY),
        ("shop/storefront", "crm/db", 5432, "TCP", DENY),
        ("vault/vault-0", "crm/db", 5432, "TCP", DENY),
        ("monitoring/prometheus", "crm/db", 5432, "TCP", DENY),
        // The database talks to nobody but DNS.
        ("crm/db", "8.8.8.8", 443, "TCP", DENY),
        ("crm/db", "crm/web", 8080, "TCP", DENY),
        ("crm/db", "vault/vault-0", 8200, "TCP", DENY),
        ("crm/db", "kube-system/coredns", 53, "UDP", ALLOW),
        // DNS for every CRM pod, UDP and TCP.
        ("crm/web", "kube-system/coredns", 53, "UDP", ALLOW),
        ("crm/web", "kube-system/coredns", 53, "TCP", ALLOW),
        ("crm/worker", "kube-system/coredns", 53, "UDP", ALLOW),
        // Metrics: Prometheus scrapes the named `metrics` port; pods without one expose nothing.
        ("monitoring/prometheus", "crm/web", 9090, "TCP", ALLOW),
        ("monitoring/prometheus", "crm/web", 8080, "TCP", DENY),
        ("monitoring/prometheus", "crm/worker", 8081, "TCP", DENY),
        // Vault: web and worker only.
        ("crm/web", "vault/vault-0", 8200, "TCP", ALLOW),
        ("crm/worker", "vault/vault-0", 8200, "TCP", ALLOW),
        // The internet: only the worker's mail relay range, minus the excepted half, on 587.
        ("crm/worker", "203.0.113.10", 587, "TCP", ALLOW),
        ("crm/worker", "203.0.113.200", 587, "TCP", DENY),
        ("crm/worker", "203.0.113.10", 25, "TCP", DENY),
        ("crm/web", "203.0.113.10", 587, "TCP", DENY),
        ("crm/web", "8.8.8.8", 443, "TCP", DENY),
        ("crm/worker", "8.8.8.8", 443, "TCP", DENY),
        // Lateral movement inside the CRM is denied.
        ("crm/web", "crm/worker", 8081, "TCP", DENY),
        ("crm/worker", "crm/web", 8080, "TCP", DENY),
        ("crm/web", "crm/debug-shell", 2222, "TCP", DENY),
        // A pod outside the guard is not protected: this is what the Covered condition reports.
        ("crm/debug-shell", "8.8.8.8", 443, "TCP", ALLOW),
        ("shop/storefront", "crm/debug-shell", 2222, "TCP", ALLOW),
    ];
    assert!(table.len() >= 30);
    let mut wrong = vec![];
    for (from, to, port, proto, expected) in table {
        let v = w.evaluate(&flow(from, to, port, proto));
        if v.allowed != expected {
            wrong.push(format!("{from} -> {to}:{port}/{proto}: expected {expected}, got {} ({})", v.allowed, v.reason));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_quarantined_pod_is_cut_off_both_ways_despite_the_allow_rules() {
    let mut w = example_world();
    let web = w.pods.iter_mut().find(|p| p.metadata.name.as_deref() == Some("web")).unwrap();
    web.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("crmguard.io/quarantine".into(), "crm-firewall".into());
    for (from, to, port, proto) in [
        ("crm/web", "crm/db", 5432, "TCP"),
        ("crm/web", "kube-system/coredns", 53, "UDP"),
        ("crm/web", "vault/vault-0", 8200, "TCP"),
        ("ingress-nginx/controller", "crm/web", 8080, "TCP"),
        ("monitoring/prometheus", "crm/web", 9090, "TCP"),
    ] {
        let v = w.evaluate(&flow(from, to, port, proto));
        assert!(!v.allowed, "{from} -> {to}:{port} must be cut: {}", v.reason);
    }
    // The others keep working.
    assert!(w.evaluate(&flow("crm/worker", "crm/db", 5432, "TCP")).allowed);
}

#[test]
fn targets_expand_into_the_rules_the_database_vault_and_s3_need() {
    let docs = support::examples();
    let mut guard = support::example("NetworkGuard");
    guard["metadata"]["name"] = serde_json::json!("targets");
    guard["spec"]["ingress"] = serde_json::json!([]);
    guard["spec"]["egress"] = serde_json::json!([]);
    guard["spec"]["targets"] = serde_json::json!({
        "database": {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "db"}},
                     "clients": {"matchLabels": {"app.kubernetes.io/component": "web"}}},
        "vault": {"namespace": "vault"},
        "s3": {"cidr": "198.51.100.0/24"}
    });
    let mut inputs: Vec<crmguard::document::Document> =
        docs.into_iter().filter(|d| d.value["kind"] == "Namespace" || d.value["kind"] == "Pod").collect();
    inputs.push(crmguard::document::Document { source: "targets".into(), value: guard });
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    let plans = plan(&inputs, None, &BuildContext::default(), now);
    let guard_plan = plans.iter().find(|p| p.resource.contains("targets")).unwrap();
    assert!(guard_plan.errors.is_empty(), "{:?}", guard_plan.errors);
    let w = world(&inputs, &plans);
    for (from, to, port, expected) in [
        ("crm/web", "crm/db", 5432, ALLOW),
        ("crm/worker", "crm/db", 5432, DENY),
        ("crm/debug-shell", "crm/db", 5432, DENY),
        ("crm/web", "vault/vault-0", 8200, ALLOW),
        ("crm/db", "vault/vault-0", 8200, ALLOW),
        ("crm/web", "vault/vault-0", 8201, DENY),
        ("crm/web", "198.51.100.7", 443, ALLOW),
        ("crm/web", "198.51.100.7", 80, DENY),
        ("crm/web", "8.8.8.8", 443, DENY),
    ] {
        let v = w.evaluate(&flow(from, to, port, "TCP"));
        assert_eq!(v.allowed, expected, "{from} -> {to}:{port}: {}", v.reason);
    }
}
