//! The CRDs on the real API server, and offline admission that agrees with it.
//!
//! `crmguard plan` claims to refuse exactly what the API server refuses (its `validation::admit` step: the
//! CRD's OpenAPI schema with strict field validation, then the CEL rules). This is checked differentially: every
//! case of the invalid-spec corpus (`operator/tests/support/invalid_cases.rs`) and a corpus generated from the
//! examples (every field removed, nulled, given another JSON type; unknown fields at every level, under
//! `metadata` and `status`; duplicate keys in keyed lists; `3.0` for integers) goes through `admit` and through
//! the real API server (`dryRun=All`, `fieldValidation=Strict`, as kubectl sends it). Every disagreement fails the
//! test. The operator-level checks of `plan` (cron syntax, time zones, references, selectors) are not part of
//! `admit`, so they are not compared.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

#[path = "../../operator/tests/support/mod.rs"]
mod support;

use e2e::Cluster;
use serde_json::{Value, json};

/// What the API server answered to a dry-run create: None when it accepted, else its message.
async fn server_verdict(client: &kube::Client, ns: &str, doc: &Value) -> Option<String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "CrmBackupPolicy" => "crmbackuppolicies",
        "CrmRestore" => "crmrestores",
        "AccessPolicy" => "accesspolicies",
        "NetworkGuard" => "networkguards",
        "AccessMonitor" => "accessmonitors",
        other => panic!("not a crmguard kind: {other}"),
    };
    let api_version = doc["apiVersion"].as_str().unwrap_or("crmguard.io/v1alpha1");
    let mut doc = doc.clone();
    if doc["metadata"].is_object() {
        doc["metadata"]["namespace"] = json!(ns);
    }
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("/apis/{api_version}/namespaces/{ns}/{plural}?dryRun=All&fieldValidation=Strict"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&doc).unwrap())
        .unwrap();
    // A refusal is 400 (strict decoding) or 422 (validation); anything else is a broken test bed, not a verdict.
    match client.request_text(req).await {
        Ok(_) => None,
        Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Some(format!("{} {}", s.code, s.message)),
        // A version the server does not serve: the document is refused as kubectl would find it refused.
        Err(kube::Error::Api(s)) if s.code == 404 && api_version != "crmguard.io/v1alpha1" => {
            Some(format!("{} {api_version} is not served", s.code))
        }
        Err(e) => panic!("the API server did not give a verdict: {e}"),
    }
}

fn offline_verdict(doc: &Value) -> Option<String> {
    let errors = crmguard::validation::admit(doc);
    (!errors.is_empty()).then(|| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
}

/// Every JSON pointer below `root` in `v` (objects and arrays included).
fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        _ => {}
    }
}

/// Mutations of a valid document, each with a description.
fn generated(doc: &Value) -> Vec<(String, Value)> {
    let mut out = vec![];
    let mut ptrs = vec![];
    pointers(&doc["spec"], "/spec", &mut ptrs);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut d = doc.clone();
        f(&mut d);
        d
    };
    for p in &ptrs {
        let cur = doc.pointer(p).unwrap().clone();
        let in_array = p.rsplit('/').next().is_some_and(|s| s.chars().all(|c| c.is_ascii_digit()));
        if !in_array {
            out.push((format!("remove {p}"), with(&|d| support::remove(d, p))));
        }
        out.push((format!("{p} = null"), with(&|d| *d.pointer_mut(p).unwrap() = Value::Null)));
        let others: Vec<Value> = match &cur {
            Value::String(_) => vec![json!(7), json!(true), json!(["x"])],
            Value::Number(n) if n.is_i64() => {
                let i = n.as_i64().unwrap();
                vec![json!(format!("{i}")), json!(i as f64), json!(i as f64 + 0.5), json!(-1), json!(i64::MAX)]
            }
            Value::Number(_) => vec![json!("1.5")],
            Value::Bool(b) => vec![json!(b.to_string()), json!(1)],
            Value::Object(_) => vec![json!([]), json!("x"), json!({"bogusField": 1})],
            Value::Array(a) => {
                let mut v = vec![json!({}), json!("x"), json!([])];
                if let Some(first) = a.first() {
                    // A duplicate entry: for lists keyed by name the server refuses it.
                    let mut dup = a.clone();
                    dup.push(first.clone());
                    v.push(Value::Array(dup));
                }
                v
            }
            Value::Null => vec![],
        };
        for o in others {
            let desc = format!("{p} = {o}");
            out.push((desc, with(&|d| *d.pointer_mut(p).unwrap() = o.clone())));
        }
        if cur.is_object() {
            out.push((format!("{p}/bogusField = 1"), with(&|d| d.pointer_mut(p).unwrap()["bogusField"] = json!(1))));
        }
    }
    for (desc, f) in [
        ("top-level unknown field", &(|d: &mut Value| d["bogus"] = json!(1)) as &dyn Fn(&mut Value)),
        ("metadata unknown field", &|d: &mut Value| d["metadata"]["bogus"] = json!(1)),
        ("status unknown field", &|d: &mut Value| d["status"] = json!({"bogus": 1})),
        ("status with a wrong type", &|d: &mut Value| d["status"] = json!({"conditions": "x"})),
        ("spec = null", &|d: &mut Value| d["spec"] = Value::Null),
        ("spec unknown field", &|d: &mut Value| d["spec"]["bogus"] = json!(1)),
        ("metadata.name with upper case", &|d: &mut Value| d["metadata"]["name"] = json!("Bad_Name")),
        ("metadata.labels with a bad key", &|d: &mut Value| d["metadata"]["labels"] = json!({"a b": "c"})),
    ] {
        out.push((desc.to_string(), with(f)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_admission_agrees_with_the_api_server() {
    let cluster = Cluster::start("admission").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let mut corpus: Vec<(String, Value)> = vec![];
    for d in support::examples() {
        if crmguard::validation::crmguard_kind(&d.value).is_some() {
            corpus.push((format!("example {}", d.source), d.value.clone()));
            for (desc, v) in generated(&d.value) {
                corpus.push((format!("{} {}: {desc}", d.value["kind"].as_str().unwrap(), d.source), v));
            }
        }
    }
    for c in support::invalid_cases::cases() {
        corpus.push((format!("invalid case {} {:?}: {}", c.kind, c.field, c.message), c.document()));
    }
    // The guards of the docs-only NetworkGuard truth tables (operator/tests/network_truth), valid and invalid.
    let truth = e2e::repo_root().join("operator/tests/network_truth");
    for entry in std::fs::read_dir(&truth).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "yaml") {
            let t: Value = serde_saphyr::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            let file = entry.file_name().to_string_lossy().into_owned();
            for g in t["guards"].as_array().into_iter().flatten() {
                corpus.push((format!("truth table {file}: {}", g["metadata"]["name"]), g.clone()));
            }
            for c in t["invalid"].as_array().into_iter().flatten() {
                corpus.push((
                    format!("truth table {file} invalid: {}", c["guard"]["metadata"]["name"]),
                    c["guard"].clone(),
                ));
            }
        }
    }
    assert!(corpus.len() > 300, "the corpus is {} documents", corpus.len());
    let mut disagreements = vec![];
    let (mut refused, mut accepted) = (0, 0);
    for (desc, doc) in &corpus {
        let server = server_verdict(&client, &ns, doc).await;
        let offline = offline_verdict(doc);
        match (&server, &offline) {
            (None, None) => accepted += 1,
            (Some(_), Some(_)) => refused += 1,
            _ => disagreements.push(format!("{desc}\n    server: {server:?}\n    plan:   {offline:?}")),
        }
    }
    eprintln!("{} documents: {accepted} accepted and {refused} refused by both", corpus.len());
    assert!(
        disagreements.is_empty(),
        "{} of {} documents got different verdicts:\n{}",
        disagreements.len(),
        corpus.len(),
        disagreements.join("\n")
    );
    assert!(refused > 100 && accepted > 10, "{accepted} accepted, {refused} refused");
}

/// The real API server accepts every CRD (its schema, defaults, CEL rules and their cost) and serves it with the
/// names, short names and categories declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crds_are_established_with_their_names_and_columns() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let cluster = Cluster::start("crds").await;
    // The control plane is the version e2e/kube pins (CRMGUARD_KUBE selects newest or oldest).
    let which = std::env::var("CRMGUARD_KUBE").unwrap_or_else(|_| "newest".into());
    let gomod = std::fs::read_to_string(e2e::repo_root().join("e2e/kube").join(&which).join("go.mod")).unwrap();
    let pinned = gomod.lines().find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes ")).unwrap();
    let pinned = pinned.split_whitespace().next().unwrap();
    assert_eq!(cluster.cp.version, pinned, "the API server's /version");
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(cluster.client.clone());
    for ours in crmguard::api::crds() {
        let name = ours.metadata.name.clone().unwrap();
        let served = crds.get(&name).await.unwrap();
        let conds = served.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
        for t in ["Established", "NamesAccepted"] {
            assert!(conds.iter().any(|c| c.type_ == t && c.status == "True"), "{name}: {t}: {conds:?}");
        }
        let accepted = served.status.unwrap().accepted_names.unwrap();
        assert_eq!(accepted.short_names, ours.spec.names.short_names, "{name}");
        assert_eq!(accepted.categories, ours.spec.names.categories, "{name}");
    }
}

/// What `kubectl get` prints for the printer columns: a future expiry shows as a time, not `<invalid>` (kubectl
/// prints a `date` column as the age since that time, which is invalid for a future one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_prints_the_next_expiry_as_a_time() {
    let cluster = Cluster::start("columns").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let aps: kube::Api<crmguard::api::AccessPolicy> = kube::Api::namespaced(client.clone(), &ns);
    aps.create(&Default::default(), &e2e::example("access-policy.yaml", &ns)).await.unwrap();
    let expiry = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(2))
        .unwrap()
        .round(jiff::Unit::Second)
        .unwrap();
    let status = json!({"status": {"nextExpiry": expiry.to_string()}});
    aps.patch_status("crm-teams", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status)).await.unwrap();
    let dir = e2e::TempDir::new("kubectl");
    let kc = dir.path.join("kubeconfig");
    std::fs::write(&kc, cluster.cp.admin_kubeconfig()).unwrap();
    let out = std::process::Command::new(e2e::kubectl())
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--cache-dir")
        .arg(dir.path.join("cache"))
        .args(["get", "accesspolicies", "-n", &ns])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("NEXT EXPIRY"), "{text}");
    assert!(!text.contains("<invalid>") && text.contains(&expiry.to_string()), "{text}");
}

/// Issue 16: every NetworkPolicy crmguard generates for the guards of the documentation truth tables
/// (`operator/tests/network_truth/`) and the examples passes the real API server's own validation (names, label
/// values, CIDRs, ports), dry-run; and every guard the tables call valid is accepted as a NetworkGuard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_network_policy_passes_the_api_servers_validation() {
    let cluster = Cluster::start("np-validation").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let dir = e2e::repo_root().join("operator/tests/network_truth");
    let mut guards: Vec<Value> = vec![];
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "yaml") {
            let t: Value = serde_saphyr::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            guards.extend(t["guards"].as_array().cloned().unwrap_or_default());
        }
    }
    guards.extend(support::examples().into_iter().map(|d| d.value).filter(|v| v["kind"] == "NetworkGuard"));
    assert!(guards.len() >= 20, "{} guards", guards.len());
    let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
    let (mut policies, mut refused) = (0, vec![]);
    for g in &guards {
        let name = format!(
            "{}/{}",
            g["metadata"]["namespace"].as_str().unwrap_or("?"),
            g["metadata"]["name"].as_str().unwrap_or("?")
        );
        if let Some(e) = server_verdict(&client, &ns, g).await {
            refused.push(format!("NetworkGuard {name}: {e}"));
        }
        let docs = vec![crmguard::document::Document { source: name.clone(), value: g.clone() }];
        let plans = crmguard::plan::plan(&docs, None, &crmguard::controllers::BuildContext::default(), now);
        assert!(plans[0].errors.is_empty(), "{name}: {:?}", plans[0].errors);
        for child in &plans[0].children {
            let mut child = child.clone();
            child["metadata"]["namespace"] = json!(ns);
            // Owner references name a uid the dry run cannot resolve; they are not what is validated here.
            child["metadata"].as_object_mut().unwrap().remove("ownerReferences");
            let req = http::Request::builder()
                .method("POST")
                .uri(format!(
                    "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies?dryRun=All&fieldValidation=Strict"
                ))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&child).unwrap())
                .unwrap();
            policies += 1;
            if let Err(e) = client.request_text(req).await {
                refused.push(format!("{name}: NetworkPolicy {}: {e}", child["metadata"]["name"]));
            }
        }
    }
    assert!(refused.is_empty(), "{} refused:\n{}", refused.len(), refused.join("\n"));
    assert!(policies >= 100, "{policies} NetworkPolicies checked");
    eprintln!("{} guards and {policies} generated NetworkPolicies accepted by the API server", guards.len());
}
