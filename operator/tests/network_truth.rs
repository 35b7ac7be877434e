//! NetworkGuard semantics against truth tables written from the documentation alone (issue 16): a helper
//! session that read only the CRD, the README, the example and Kubernetes' NetworkPolicy docs wrote the flows in
//! `network_truth/*.yaml` with the verdict and the reason for each (and listed what the docs left open in
//! `network_truth/AMBIGUITIES.md`). Here every file's guards go through `crmguard plan`, the NetworkPolicies it
//! generates go through the NetworkPolicy evaluator that `plan --explain` uses, and every flow must get the
//! table's verdict; every guard of an `invalid` section must be refused. The tables are the oracle: when one
//! disagrees, the product or the docs are wrong, never the table silently.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;
use std::path::PathBuf;

use crmguard::controllers::BuildContext;
use crmguard::document::Document;
use crmguard::netpol::{Endpoint, Flow};
use crmguard::plan::{plan, world};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Table {
    description: String,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    pods: Vec<Pod>,
    #[serde(default)]
    guards: Vec<Value>,
    #[serde(default)]
    quarantined: Vec<Quarantined>,
    #[serde(default)]
    flows: Vec<TruthFlow>,
    #[serde(default)]
    invalid: Vec<Invalid>,
}

#[derive(Deserialize)]
struct Namespace {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Pod {
    name: String,
    namespace: String,
    ip: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<Value>,
}

#[derive(Deserialize)]
struct Quarantined {
    pod: String,
    guard: String,
}

#[derive(Deserialize)]
struct TruthFlow {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    expect: String,
    why: String,
}

#[derive(Deserialize)]
struct Invalid {
    guard: Value,
    field: String,
    reason: String,
}

fn tables() -> Vec<(String, Table)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/network_truth");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let table: Table =
                serde_saphyr::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, table)
        })
        .collect()
}

fn endpoint(s: &str) -> Endpoint {
    match s.parse() {
        Ok(ip) => Endpoint::External(ip),
        Err(_) => {
            let (ns, name) = s.split_once('/').unwrap_or_else(|| panic!("{s}: namespace/pod or an IP"));
            Endpoint::Pod { namespace: ns.into(), name: name.into() }
        }
    }
}

fn documents(t: &Table) -> Vec<Document> {
    let doc = |value: Value| Document { source: "table.yaml".into(), value };
    let mut docs = Vec::new();
    for n in &t.namespaces {
        docs.push(doc(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n.name, "labels": n.labels}}),
        ));
    }
    for p in &t.pods {
        let mut labels = p.labels.clone();
        let key = format!("{}/{}", p.namespace, p.name);
        if let Some(q) = t.quarantined.iter().find(|q| q.pod == key) {
            labels.insert("crmguard.io/quarantine".into(), q.guard.clone());
        }
        docs.push(doc(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": p.ports}]},
            "status": {"podIP": p.ip}})));
    }
    docs.extend(t.guards.iter().cloned().map(doc));
    docs
}

fn now() -> jiff::Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

#[test]
fn every_flow_of_the_documentation_truth_tables_gets_its_verdict() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (file, t) in tables() {
        let docs = documents(&t);
        let plans = plan(&docs, None, &BuildContext::default(), now());
        for p in plans.iter().filter(|p| !p.errors.is_empty()) {
            wrong.push(format!("{file}: {} was refused: {:?}", p.resource, p.errors));
        }
        let w = world(&docs, &plans);
        for f in &t.flows {
            let flow =
                Flow { from: endpoint(&f.from), to: endpoint(&f.to), port: f.port, protocol: f.protocol.clone() };
            let verdict = w.evaluate(&flow);
            let expected = match f.expect.as_str() {
                "allow" => true,
                "deny" => false,
                other => panic!("{file}: expect {other:?}"),
            };
            checked += 1;
            if verdict.allowed != expected {
                wrong.push(format!(
                    "{file} ({}): {} -> {}:{}/{} expected {} ({}), got {}: {}",
                    t.description,
                    f.from,
                    f.to,
                    f.port,
                    f.protocol,
                    f.expect,
                    f.why,
                    if verdict.allowed { "allow" } else { "deny" },
                    verdict.reason
                ));
            }
        }
    }
    assert!(checked >= 250, "{checked} flows");
    assert!(wrong.is_empty(), "{} of {checked} flows disagree with the tables:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn every_invalid_guard_of_the_truth_tables_is_refused_naming_a_field() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (file, t) in tables() {
        for case in &t.invalid {
            let name = case.guard["metadata"]["name"].as_str().unwrap_or("?").to_string();
            let docs = vec![Document { source: "invalid.yaml".into(), value: case.guard.clone() }];
            let plans = plan(&docs, None, &BuildContext::default(), now());
            checked += 1;
            let errors: Vec<String> = plans[0].errors.iter().map(ToString::to_string).collect();
            if errors.is_empty() || !errors.iter().any(|e| e.starts_with("spec")) {
                wrong.push(format!(
                    "{file}: {name} ({} / {}) was not refused naming a field: {errors:?}",
                    case.field, case.reason
                ));
            }
        }
    }
    assert!(checked >= 30, "{checked} invalid guards");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
