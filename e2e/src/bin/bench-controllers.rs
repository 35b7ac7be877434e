//! Controller benchmark: N NetworkGuards and N AccessPolicies across M namespaces on a real control plane (e2e/kube),
//! reconciled by a real `crmguard run` process. Reports time until all are Ready, write requests per
//! steady-state reconcile (expected 0) and the operator's peak RSS. Run it through bench/controllers.sh.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark driver

use std::time::{Duration, Instant};

use crmguard::api::{AccessPolicy, NetworkGuard};
use e2e::Operator;
use e2e::{ControlPlane, OPERATOR_USER};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn is_ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conds.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn ready_count(client: &kube::Client) -> usize {
    let g: Api<NetworkGuard> = Api::all(client.clone());
    let a: Api<AccessPolicy> = Api::all(client.clone());
    let gs = g.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let aps = a.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    gs.iter().filter(|x| x.status.as_ref().is_some_and(|s| is_ready(&s.conditions))).count()
        + aps.iter().filter(|x| x.status.as_ref().is_some_and(|s| is_ready(&s.conditions))).count()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = arg("--resources", 1000);
    let namespaces = arg("--namespaces", 100).max(1);
    let per_kind = total / 2;
    let cp = ControlPlane::shared();
    let client = ControlPlane::client_for(&cp.admin_kubeconfig()).await;
    e2e::install_crds(&client).await;
    for i in 0..namespaces {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("bench-{i}")}})).unwrap();
        Api::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    }
    // A guard that selects no pod is not Ready: one CRM pod per namespace (the namespaces' default
    // ServiceAccounts must exist first).
    for i in 0..namespaces {
        let ns = format!("bench-{i}");
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
        e2e::eventually(60, "the default ServiceAccount", || async {
            sas.get_opt("default").await.map_err(|e| e.to_string())?.map(drop).ok_or_else(|| "absent".to_string())
        })
        .await;
        e2e::crm_pod(&client, &ns, "web-0").await;
    }
    let operator_writes = || cp.writes_by(OPERATOR_USER).len() as u64;
    let guard_path = e2e::repo_root().join("examples/crm/network-guard.yaml");
    let guard: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(guard_path).unwrap()).unwrap();
    for i in 0..per_kind {
        let ns = format!("bench-{}", i % namespaces);
        let mut g = guard.clone();
        g["metadata"] = json!({"name": format!("guard-{i}"), "namespace": ns});
        let g: NetworkGuard = serde_json::from_value(g).unwrap();
        Api::<NetworkGuard>::namespaced(client.clone(), &ns).create(&PostParams::default(), &g).await.unwrap();
        let ap: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": format!("access-{i}"), "namespace": ns},
            "spec": {"teams": [
                {"name": "sales", "subjects": [{"kind": "Group", "name": "sales"}],
                 "kubernetes": [{"resources": ["pods"], "verbs": ["get", "list"]}]},
                {"name": "finance", "subjects": [{"kind": "Group", "name": "finance"}],
                 "kubernetes": [{"resources": ["configmaps"], "verbs": ["get"]}]}]}
        }))
        .unwrap();
        Api::<AccessPolicy>::namespaced(client.clone(), &ns).create(&PostParams::default(), &ap).await.unwrap();
    }
    let want = per_kind * 2;
    eprintln!("created {want} resources");
    let started = Instant::now();
    let mut op = Operator::start(
        &cp.kubeconfig_for(OPERATOR_USER, &["system:masters"]),
        &["--leader-election=false", "--concurrency", "8"],
    );
    let mut last_report = Instant::now();
    loop {
        let n = ready_count(&client).await;
        if n == want {
            break;
        }
        if let Ok(Some(status)) = op.child.try_wait() {
            panic!("the operator exited ({status}):\n{}", op.logs());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("{n} of {want} Ready after {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "only {n} of {want} Ready after 30 min:\n{}", op.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let to_ready = started.elapsed();
    let writes_to_ready = operator_writes();

    // Steady state: touch every resource's labels (one write each by the driver), wait until the operator has
    // reconciled each of them, and count the operator's own writes.
    let series = |c: &str| format!("crmguard_reconcile_total{{controller=\"{c}\"}}");
    let done = |c: &str| format!("crmguard_reconcile_duration_seconds_count{{controller=\"{c}\"}}");
    let before: f64 = ["networkguard", "accesspolicy"].iter().map(|c| op.metric(&series(c)).unwrap_or(0.0)).sum();
    let writes_before = operator_writes();
    for i in 0..per_kind {
        let ns = format!("bench-{}", i % namespaces);
        let p = Patch::Merge(json!({"metadata": {"labels": {"bench": "touched"}}}));
        Api::<NetworkGuard>::namespaced(client.clone(), &ns)
            .patch(&format!("guard-{i}"), &PatchParams::default(), &p)
            .await
            .unwrap();
        Api::<AccessPolicy>::namespaced(client.clone(), &ns)
            .patch(&format!("access-{i}"), &PatchParams::default(), &p)
            .await
            .unwrap();
    }
    let steady_started = Instant::now();
    loop {
        let started_n: f64 =
            ["networkguard", "accesspolicy"].iter().map(|c| op.metric(&series(c)).unwrap_or(0.0)).sum();
        let done_n: f64 = ["networkguard", "accesspolicy"].iter().map(|c| op.metric(&done(c)).unwrap_or(0.0)).sum();
        if started_n - before >= want as f64 && done_n >= started_n {
            break;
        }
        assert!(steady_started.elapsed() < Duration::from_secs(600), "steady-state reconciles did not finish");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reconciles: f64 =
        ["networkguard", "accesspolicy"].iter().map(|c| op.metric(&series(c)).unwrap_or(0.0)).sum::<f64>() - before;
    let operator_writes = operator_writes() - writes_before;
    let rss = peak_rss_kib(op.child.id());
    println!("resources: {want} ({per_kind} NetworkGuards + {per_kind} AccessPolicies) across {namespaces} namespaces");
    println!("time until all Ready: {:.1} s ({writes_to_ready} operator writes)", to_ready.as_secs_f64());
    println!(
        "steady state: {reconciles} reconciles, {operator_writes} operator writes = {:.3} writes per reconcile",
        operator_writes as f64 / reconciles.max(1.0)
    );
    println!("operator peak RSS: {:.1} MiB", rss as f64 / 1024.0);
}
