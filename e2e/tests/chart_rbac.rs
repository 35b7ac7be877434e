//! The operator runs with exactly the RBAC the Helm chart grants (taken from manifests/crmguard.yaml, which is the
//! chart rendered by Helm), and everything it does still works; without those grants it is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::api::{AccessPolicy, CrmBackupPolicy, NetworkGuard};
use e2e::{Cluster, Operator, eventually};
use k8s_openapi::api::rbac::v1::Role;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// Log lines of requests the API server refused, except writes into a namespace being deleted (this operator
/// watches every namespace, and other tests' namespaces go away while it works).
fn refused(op: &Operator) -> Vec<String> {
    op.logs()
        .lines()
        .filter(|l| l.contains("forbidden") && !l.contains("because it is being terminated"))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_works_with_exactly_the_charts_rbac() {
    let cluster = Cluster::start("chart-rbac").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.as_str());
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithPolicy).await;
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
    assert!(refused(&op).is_empty(), "no request was refused:\n{}", op.logs());
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

    // The webhook reads the token Secret, starts the backup Job (backupFirst: with the report key, which the
    // report-key admission policy lets the operator use) and marks the pod, within the chart's grants; once the
    // Job is gone the guard's controller isolates the pod.
    let alert =
        json!({"alerts": [{"status": "firing", "labels": {"alertname": "X", "namespace": ns, "pod": "web-0"}}]})
            .to_string();
    let (code, body) =
        op.http_post(&format!("/webhook/quarantine/{ns}/crm-firewall"), Some("token-for-rbac-test"), &alert).unwrap();
    assert_eq!(code, 202, "{body}");
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), ns);
    let started =
        jobs.list(&ListParams::default().labels("crmguard.io/pre-quarantine-for=crm-firewall")).await.unwrap();
    assert_eq!(started.items.len(), 1, "{body}");
    jobs.delete(&started.items[0].name_any(), &kube::api::DeleteParams::background()).await.unwrap();
    eventually(30, "web-0 isolated", || async {
        let p = pods.get("web-0").await.map_err(|e| e.to_string())?;
        match p.labels().get("crmguard.io/quarantine").map(String::as_str) {
            Some("crm-firewall") => Ok(()),
            other => Err(format!("{other:?}\n{}", op.logs())),
        }
    })
    .await;
    assert!(refused(&op).is_empty(), "no request was refused:\n{}", op.logs());
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

/// The chart's ValidatingAdmissionPolicy, on the real API server: an AccessPolicy author gains nothing through
/// crmguard. Expected from the issue and the RBAC docs ("you can only create/update a role binding if you
/// already have all the permissions contained in the referenced role ... or you have been authorized to perform
/// the bind verb"): refused when it grants beyond the ceiling (whoever writes it), when the author does not hold
/// a granted permission and may not bind the ceiling, when a Vault path leaves the namespace's prefixes, or when
/// it names a Vault address the operator may not log in to; accepted from an author who holds the permissions,
/// or who may bind the ceiling ClusterRole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_policy_author_gains_nothing_through_crmguard() {
    use k8s_openapi::api::core::v1::Secret;
    let cluster = Cluster::start("ap-authors").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithPolicy).await;
    // mallory, alice and carol may write AccessPolicies and nothing else; alice also lists pods; carol may bind
    // the ceiling ClusterRole (the administrator's delegation).
    let admin_objects = json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "ap-authors"},
         "rules": [{"apiGroups": ["crmguard.io"], "resources": ["accesspolicies"], "verbs": ["get", "list", "create", "update", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "ap-authors"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ap-authors"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"},
                      {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"},
                      {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-readers"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pod-readers"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-readers"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]},
    ]);
    for o in admin_objects.as_array().unwrap() {
        let kind = o["kind"].as_str().unwrap();
        let ar = kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
            &format!("{}s", kind.to_ascii_lowercase()),
        );
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        api.create(&PostParams::default(), &serde_json::from_value(o.clone()).unwrap()).await.unwrap();
    }
    let crole = json!({"metadata": {"name": format!("bind-ceiling-{ns}")}, "rules": [{"apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["clusterroles"], "resourceNames": ["crmguard-grantable"], "verbs": ["bind"]}]});
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(crole).unwrap())
        .await
        .unwrap();
    let crb = json!({"metadata": {"name": format!("bind-ceiling-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("bind-ceiling-{ns}")},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}]});
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(crb).unwrap())
        .await
        .unwrap();
    let as_user = |name: &str| {
        let kc = cluster.cp.kubeconfig_for(name, &["crm-authors"]);
        async move { e2e::ControlPlane::client_for(&kc).await }
    };
    let (mallory, alice, carol) = (as_user("mallory").await, as_user("alice").await, as_user("carol").await);
    let subjects = json!([{"kind": "User", "name": "mallory"}, {"kind": "Group", "name": "crm-sales"}]);
    let policy = |name: &str, team: serde_json::Value, vault: Option<serde_json::Value>| {
        e2e::one_team_policy(&ns, name, "t", subjects.clone(), team, vault)
    };
    let pods = json!({"kubernetes": [{"resources": ["pods"], "verbs": ["get", "list"]}]});
    let refused = [
        (
            &mallory,
            policy(
                "everything",
                json!({"kubernetes": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
                None,
            ),
            "beyond the grant ceiling (ClusterRole crmguard-grantable)",
        ),
        (
            &alice,
            policy("secrets", json!({"kubernetes": [{"resources": ["secrets"], "verbs": ["get"]}]}), None),
            "beyond the grant ceiling",
        ),
        (
            &mallory,
            policy("pods", pods.clone(), None),
            "grants Kubernetes permissions that mallory does not hold in namespace",
        ),
        (
            &alice,
            policy("pod-delete", json!({"kubernetes": [{"resources": ["pods"], "verbs": ["delete"]}]}), None),
            "beyond the grant ceiling",
        ),
        (
            &alice,
            policy("logs", json!({"kubernetes": [{"resources": ["pods/log"], "verbs": ["get"]}]}), None),
            "that alice does not hold",
        ),
        (
            &alice,
            policy("vault-sys", json!({"vault": [{"path": "sys/*", "capabilities": ["read"]}]}), Some(json!({}))),
            "grant Vault paths outside secret/data/",
        ),
        (
            &alice,
            policy(
                "vault-other-ns",
                json!({"vault": [{"path": "secret/data/kube-system/x", "capabilities": ["read"]}]}),
                Some(json!({})),
            ),
            "grant Vault paths outside",
        ),
        (
            &alice,
            policy("vault-addr", json!({}), Some(json!({"address": "http://vault.attacker.example:8200"}))),
            "spec.vault.address: http://vault.attacker.example:8200 is not a Vault the operator may log in to",
        ),
    ];
    for (who, ap, want) in &refused {
        let name = ap.metadata.name.clone().unwrap();
        let r = Api::<AccessPolicy>::namespaced((*who).clone(), &ns).create(&PostParams::default(), ap).await;
        match r {
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                assert!(s.message.contains(want), "{name}: {}\nwants: {want}", s.message);
            }
            other => panic!("{name} must be refused at admission: {other:?}"),
        }
    }
    // Accepted: alice holds what she grants; carol holds nothing but may bind the ceiling.
    let aps: Api<AccessPolicy> = Api::namespaced(alice, &ns);
    aps.create(&PostParams::default(), &policy("alice-pods", pods.clone(), None)).await.unwrap();
    Api::<AccessPolicy>::namespaced(carol, &ns)
        .create(
            &PostParams::default(),
            &policy("carol-logs", json!({"kubernetes": [{"resources": ["pods/log"], "verbs": ["get"]}]}), None),
        )
        .await
        .unwrap();
    // An update by an author who does not hold the grant is refused too; a metadata-only one is not checked.
    let mut edit = aps.get("alice-pods").await.unwrap();
    edit.spec.teams[0].kubernetes[0].verbs.push("watch".into());
    let r = Api::<AccessPolicy>::namespaced(mallory.clone(), &ns)
        .replace("alice-pods", &PostParams::default(), &edit)
        .await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403 || s.code == 422), "mallory's edit: {r:?}");
    let mut labelled = aps.get("alice-pods").await.unwrap();
    labelled.metadata.labels = Some([("team".to_string(), "sales".to_string())].into());
    Api::<AccessPolicy>::namespaced(mallory.clone(), &ns)
        .replace("alice-pods", &PostParams::default(), &labelled)
        .await
        .unwrap();

    // The operator (chart RBAC: no escalate, no bind) applies the accepted ones; mallory, bound by them, reads
    // pods and logs but still no Secret.
    let op = Operator::start(&kubeconfig, &["--leader-election=false", "--namespace", &ns]);
    op.wait_ready(60).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    eventually(60, "both policies' Roles", || async {
        let names: Vec<String> = roles
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .filter(|n| n.starts_with("alice-pods") || n.starts_with("carol-logs"))
            .collect();
        if names.len() == 2 { Ok(()) } else { Err(format!("{names:?}\n{}", op.logs())) }
    })
    .await;
    let m_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(mallory.clone(), &ns);
    eventually(30, "mallory to list pods through the team", || async {
        m_pods.list(&ListParams::default()).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    let r = Api::<Secret>::namespaced(mallory, &ns).list(&ListParams::default()).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "mallory reads no Secret: {r:?}");
    assert!(!op.logs().contains("forbidden"), "the operator was refused nothing:\n{}", op.logs());
}

/// The chart's `access-monitors` ValidatingAdmissionPolicy on the real API server: an AccessMonitor makes the
/// operator read a database pod's log and report who touched which table, so writing one must need what reading
/// that log needs. Expected, from the policy's documentation and the Kubernetes authorizer (`get` on `pods/log` in
/// the namespace): dan (may write AccessMonitors, may not read logs) is refused a new monitor and a change of an
/// existing one's spec, but may acknowledge an incident (an annotation); erin (may also get pods/log) may create and
/// change one. Naming the statistics' connection Secret needs `get` on that Secret (resourceNames are honoured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_monitor_author_must_be_able_to_read_the_pods_logs() {
    use crmguard::api::AccessMonitor;
    use kube::api::{Patch, PatchParams};
    let cluster = Cluster::start("am-authors").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    e2e::install_chart_rbac(&cluster, e2e::Admission::WithPolicy).await;
    let grants = [
        (
            "monitor-authors",
            json!([{"apiGroups": ["crmguard.io"], "resources": ["accessmonitors"],
            "verbs": ["get", "create", "update", "patch"]}]),
            vec!["dan", "erin", "frank"],
        ),
        (
            "log-readers",
            json!([{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]),
            vec!["erin", "frank"],
        ),
        (
            "monitor-secret",
            json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["crm-db-monitor"], "verbs": ["get"]}]),
            vec!["frank"],
        ),
    ];
    for (name, rules, users) in grants {
        let role = json!({"metadata": {"name": name}, "rules": rules});
        Api::<Role>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &serde_json::from_value(role).unwrap())
            .await
            .unwrap();
        let subjects: Vec<_> =
            users.iter().map(|u| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u})).collect();
        let binding = json!({"metadata": {"name": name}, "subjects": subjects,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}});
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &serde_json::from_value(binding).unwrap())
            .await
            .unwrap();
    }
    let as_user = |name: &str| {
        let (kc, ns) = (cluster.cp.kubeconfig_for(name, &[]), ns.clone());
        async move { Api::<AccessMonitor>::namespaced(e2e::ControlPlane::client_for(&kc).await, &ns) }
    };
    let (dan, erin) = (as_user("dan").await, as_user("erin").await);
    let monitor = |name: &str| -> AccessMonitor {
        serde_json::from_value(json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
            "metadata": {"name": name},
            "spec": {"database": {"engine": "postgres", "podSelector": {"matchLabels": {"app": "crm-db"}}}}}))
        .unwrap()
    };
    // The API server compiles a new policy asynchronously: a dry run until it refuses.
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let refusal = eventually(30, "the access-monitors admission policy to be in effect", || async {
        match dan.create(&dry, &monitor("dans")).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Ok(s.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(refusal.contains(&format!("only those who may get pods/log in namespace {ns}")), "{refusal}");
    assert!(refusal.contains("and dan may not"), "{refusal}");
    let r = dan.create(&PostParams::default(), &monitor("dans")).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "dan's monitor: {r:?}");
    erin.create(&PostParams::default(), &monitor("crm-db")).await.unwrap();
    let spec = json!({"spec": {"interval": "10s"}});
    let r = dan.patch("crm-db", &PatchParams::default(), &Patch::Merge(&spec)).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "dan's change of the spec: {r:?}");
    let ack = json!({"metadata": {"annotations": {"crmguard.io/acknowledge": "sales-1796290714"}}});
    dan.patch("crm-db", &PatchParams::default(), &Patch::Merge(&ack)).await.unwrap();
    let changed = erin.patch("crm-db", &PatchParams::default(), &Patch::Merge(&spec)).await.unwrap();
    assert_eq!(changed.spec.interval, "10s");

    // spec.database.statistics names a Secret the operator logs in with: erin (no get on Secrets) may not name one;
    // frank (get on Secret crm-db-monitor only) may name that one and no other.
    let frank = as_user("frank").await;
    let stats =
        |secret: &str| json!({"spec": {"database": {"statistics": {"secretName": secret, "sslMode": "verify-full"}}}});
    let r = erin.patch("crm-db", &PatchParams::default(), &Patch::Merge(&stats("crm-db-monitor"))).await;
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {
            assert!(s.message.contains("only those who may get Secret crm-db-monitor"), "{}", s.message);
            assert!(s.message.contains("and erin may not"), "{}", s.message);
        }
        other => panic!("erin named a Secret she may not read: {other:?}"),
    }
    let r = frank.patch("crm-db", &PatchParams::default(), &Patch::Merge(&stats("crm-db-admin"))).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "frank named another Secret: {r:?}");
    let named = frank.patch("crm-db", &PatchParams::default(), &Patch::Merge(&stats("crm-db-monitor"))).await.unwrap();
    assert_eq!(named.spec.database.statistics.map(|s| s.secret_name).as_deref(), Some("crm-db-monitor"));
}
