//! The operator runs with exactly the RBAC the Helm chart grants (taken from manifests/crmguard.yaml, which is the
//! chart rendered by Helm), and everything it does still works; without those grants it is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::api::{AccessPolicy, CrmBackupPolicy, NetworkGuard};
use e2e::{Cluster, Operator, eventually};
use k8s_openapi::api::rbac::v1::Role;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_works_with_exactly_the_charts_rbac() {
    let cluster = Cluster::start("chart-rbac").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.as_str());
    let kubeconfig = e2e::install_chart_rbac(&cluster).await;
    let op = Operator::start(
        &kubeconfig,
        &[
            "--leader-election=true",
            "--lease-namespace",
            "crmguard-system",
            "--lease-name",
            "crmguard-leader",
            "--identity",
            "pod-0",
        ],
    );
    op.wait_ready(60).await;

    // Pods for coverage and the webhook, the webhook's token Secret.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let pod = json!({"metadata": {"name": "web-0", "labels": {"app.kubernetes.io/part-of": "crm"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    let secret = json!({"metadata": {"name": "crmguard-webhook"}, "data": {"token": "dG9rZW4tZm9yLXJiYWMtdGVzdA=="}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(secret).unwrap())
        .await
        .unwrap();

    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), ns);
    guards.create(&PostParams::default(), &e2e::example("network-guard.yaml", ns)).await.unwrap();
    let policies: Api<CrmBackupPolicy> = Api::namespaced(client.clone(), ns);
    policies.create(&PostParams::default(), &e2e::example("backup-policy.yaml", ns)).await.unwrap();
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), ns);
    aps.create(&PostParams::default(), &e2e::example("access-policy.yaml", ns)).await.unwrap();

    eventually(60, "every controller to have done its work under the chart's RBAC", || async {
        let g = guards.get("crm-firewall").await.map_err(|e| e.to_string())?;
        let p = policies.get("crm-db").await.map_err(|e| e.to_string())?;
        let a = aps.get("crm-teams").await.map_err(|e| e.to_string())?;
        let ready = |c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>, t: &str| {
            c.is_some_and(|c| c.iter().any(|x| x.type_ == t && x.status == "True"))
        };
        let ok = ready(g.status.as_ref().map(|s| &s.conditions), "Ready")
            && ready(p.status.as_ref().map(|s| &s.conditions), "ScheduleReady")
            && ready(a.status.as_ref().map(|s| &s.conditions), "RbacApplied");
        if ok { Ok(()) } else { Err(format!("logs:\n{}", op.logs())) }
    })
    .await;
    assert!(!op.logs().contains("forbidden"), "no request was refused:\n{}", op.logs());
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    assert_eq!(roles.list(&ListParams::default()).await.unwrap().items.len(), 3);

    // The teams' Roles take effect for real users (client certificates; groups as the authenticator names them).
    // Expected from the example and the RBAC docs: sales (group crm-sales) may get/list/watch pods and pods/log
    // and nothing else; a user in no team's group may do nothing in the namespace.
    let user = |name: &str, group: &str| {
        let kc = cluster.cp.kubeconfig_for(name, &[group]);
        async move { e2e::ControlPlane::client_for(&kc).await }
    };
    let sales = user("alice", "crm-sales").await;
    let stranger = user("mallory", "crm-visitors").await;
    let forbidden = |r: Result<kube::core::ObjectList<k8s_openapi::api::core::v1::Secret>, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    let sales_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(sales.clone(), ns);
    assert_eq!(sales_pods.list(&ListParams::default()).await.unwrap().items.len(), 1, "sales lists pods");
    let sales_secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(sales.clone(), ns);
    assert!(forbidden(sales_secrets.list(&ListParams::default()).await), "sales may not list secrets");
    let pod_delete = sales_pods.delete("web-0", &Default::default()).await;
    assert!(
        matches!(pod_delete, Err(kube::Error::Api(ref s)) if s.code == 403),
        "sales may not delete pods: {pod_delete:?}"
    );
    let stranger_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(stranger, ns);
    let r = stranger_pods.list(&ListParams::default()).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "a user of no team may not list pods: {r:?}");

    // The webhook reads the token Secret and labels the pod, also within the chart's grants.
    let alert =
        json!({"alerts": [{"status": "firing", "labels": {"alertname": "X", "namespace": ns, "pod": "web-0"}}]})
            .to_string();
    let (code, body) =
        op.http_post(&format!("/webhook/quarantine/{ns}/crm-firewall"), Some("token-for-rbac-test"), &alert).unwrap();
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        pods.get("web-0").await.unwrap().labels().get("crmguard.io/quarantine").map(String::as_str),
        Some("crm-firewall")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_charts_rbac_the_operator_is_refused() {
    let cluster = Cluster::start("no-rbac").await;
    // A ServiceAccount that no RoleBinding names, with a real token.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "nobody"}})).unwrap())
        .await
        .unwrap();
    let token = e2e::ControlPlane::token_for(&cluster.client, &cluster.namespace, "nobody", &[]).await;
    let mut op = Operator::start(&cluster.cp.kubeconfig_with_token("nobody", &token), &["--leader-election=false"]);
    let code = eventually(30, "the operator to exit", || {
        let r = op.child.try_wait();
        async move {
            match r {
                Ok(Some(s)) => Ok(s.code()),
                _ => Err("running".to_string()),
            }
        }
    })
    .await;
    assert_eq!(code, Some(2));
    let who = format!("is forbidden: User \"system:serviceaccount:{}:nobody\"", cluster.namespace);
    assert!(op.logs().contains(&who), "{}", op.logs());
}
