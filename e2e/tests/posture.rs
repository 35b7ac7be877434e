//! The posture PolicyReport: without its CRD the operator does not ask for reports; once the CRD is installed the
//! real operator writes one `wgpolicyk8s.io/v1alpha2` PolicyReport per CRM namespace, findings follow the resources
//! (raised, then cleared), nothing is rewritten while nothing changes, the score is on /metrics too, and the report
//! goes with the namespace's last crmguard resource.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::api::{CrmBackupPolicy, NetworkGuard};
use e2e::{Cluster, Operator, eventually};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

fn result(report: &Value, policy: &str) -> Option<String> {
    report["results"]
        .as_array()?
        .iter()
        .find(|r| r["policy"] == policy)
        .and_then(|r| r["result"].as_str())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_policy_report_per_namespace_follows_the_resources() {
    let cluster = Cluster::start("posture").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let op = Operator::start(
        &cluster.kubeconfig,
        &["--leader-election=false", "--namespace", &ns, "--posture-seconds", "1"],
    );
    op.wait_ready(60).await;

    // A backup policy and no firewall, and no PolicyReport CRD yet: the operator says so once, asks discovery (one
    // request per pass for every namespace) and never the reports themselves.
    let backups: Api<CrmBackupPolicy> = Api::namespaced(client.clone(), &ns);
    backups.create(&PostParams::default(), &e2e::example("backup-policy.yaml", &ns)).await.unwrap();
    eventually(30, "the missing PolicyReport CRD in the log", || async {
        let logs = op.logs();
        if logs.contains("no policy report CRD is installed") {
            Ok(())
        } else {
            Err(logs.lines().filter(|l| l.contains("PolicyReport")).collect::<Vec<_>>().join("\n"))
        }
    })
    .await;
    let asked: Vec<String> = cluster
        .writes_by(e2e::OPERATOR_USER)
        .into_iter()
        .chain(cluster.cp.operator_reads())
        .filter(|r| r.resource == "policyreports" || r.resource == "reports")
        .map(|r| format!("{} {}/{} {}", r.verb, r.namespace, r.name, r.code))
        .collect();
    assert!(asked.is_empty(), "reports asked for without their CRD: {asked:?}");
    {
        // The wg-policy CRD, as Kyverno or policy-reporter install it (its schema is not ours to test, so it keeps every field).
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "policyreports.wgpolicyk8s.io"},
            "spec": {"group": "wgpolicyk8s.io", "scope": "Namespaced",
                "names": {"plural": "policyreports", "kind": "PolicyReport", "singular": "policyreport"},
                "versions": [{"name": "v1alpha2", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
        });
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        crds.patch("policyreports.wgpolicyk8s.io", &PatchParams::apply("e2e").force(), &Patch::Apply(&crd))
            .await
            .unwrap();
    }
    let gvk = GroupVersionKind::gvk("wgpolicyk8s.io", "v1alpha2", "PolicyReport");
    let reports: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk_with_plural(&gvk, "policyreports"));
    let report = || async {
        let r = reports.get_opt("crmguard").await.map_err(|e| e.to_string())?.ok_or_else(|| "no report".to_string())?;
        Ok::<Value, String>(serde_json::to_value(r).unwrap())
    };

    // Once the CRD is there, the report is written: no firewall, so default deny is a failed finding.
    let r = eventually(60, "a report with the missing firewall", || async {
        let r = report().await?;
        match result(&r, "crmguard-network-default-deny").as_deref() {
            Some("fail") => Ok(r),
            other => Err(format!("{other:?}: {r}")),
        }
    })
    .await;
    assert_eq!(result(&r, "crmguard-backup-encrypted").as_deref(), Some("pass"));
    let score: f64 = r["metadata"]["annotations"]["crmguard.io/score"].as_str().unwrap().parse().unwrap();
    assert!(score < 100.0, "{r}");
    assert_eq!(
        r["summary"]["fail"],
        json!(r["results"].as_array().unwrap().iter().filter(|x| x["result"] == "fail").count())
    );
    let series = format!("crmguard_posture_score{{namespace=\"{ns}\",name=\"crmguard\"}}");
    eventually(10, "the score on /metrics", || async {
        match op.metric(&series) {
            Some(v) if v == score => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Nothing changes: nothing is rewritten (three more passes, counted by the operator).
    let version = r["metadata"]["resourceVersion"].clone();
    let passes = || op.metric("crmguard_reconcile_total{controller=\"posture\"}").unwrap_or_default();
    let before = passes();
    eventually(30, "three more posture passes", || async {
        if passes() >= before + 3.0 { Ok(()) } else { Err(format!("{} passes", passes() - before)) }
    })
    .await;
    assert_eq!(
        report().await.unwrap()["metadata"]["resourceVersion"],
        version,
        "an unchanged posture is not rewritten"
    );

    // A NetworkGuard with default deny clears the finding.
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), &ns);
    guards.create(&PostParams::default(), &e2e::example("network-guard.yaml", &ns)).await.unwrap();
    eventually(60, "the finding to clear", || async {
        let r = report().await?;
        match result(&r, "crmguard-network-default-deny").as_deref() {
            Some("pass") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // `crmguard report` asks the same cluster and agrees with the operator's report.
    let dir = e2e::TempDir::new("report");
    let kc = dir.path.join("kubeconfig");
    std::fs::write(&kc, &cluster.kubeconfig).unwrap();
    let out = std::process::Command::new(e2e::crmguard_bin())
        .args(["report", "-n", &ns, "-o", "policyreport"])
        .env("KUBECONFIG", &kc)
        .output()
        .unwrap();
    let printed: Value =
        serde_saphyr::from_str(String::from_utf8_lossy(&out.stdout).trim_start_matches("---\n")).unwrap();
    let operators = report().await.unwrap();
    assert_eq!(printed["summary"], operators["summary"], "{printed}");
    assert_eq!(result(&printed, "crmguard-network-default-deny").as_deref(), Some("pass"));
    let expected_code = if printed["metadata"]["annotations"]["crmguard.io/score"] == "100" { 0 } else { 3 };
    assert_eq!(out.status.code(), Some(expected_code), "{}", String::from_utf8_lossy(&out.stderr));

    // The namespace's last crmguard resource goes: so does its report.
    backups.delete("crm-db", &DeleteParams::default()).await.unwrap();
    guards.delete("crm-firewall", &DeleteParams::default()).await.unwrap();
    eventually(60, "the report to be removed", || async {
        match reports.get_opt("crmguard").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
}
