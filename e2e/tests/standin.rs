//! The API-server stand-in behaves like the real API server where the operator depends on it, as seen
//! through kube::Client (the same client the operator uses).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::api::{NetworkGuard, crds};
use e2e::apiserver::ApiServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

async fn server_with_crds() -> (ApiServer, kube::Client) {
    let server = ApiServer::start().await.unwrap();
    let client = server.client();
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        crd_api.create(&PostParams::default(), &crd).await.unwrap();
    }
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "crm"}})).unwrap())
        .await
        .unwrap();
    (server, client)
}

fn guard() -> NetworkGuard {
    let doc = e2e::repo_root().join("examples/crm/network-guard.yaml");
    serde_saphyr::from_str(&std::fs::read_to_string(doc).unwrap()).unwrap()
}

#[tokio::test]
async fn crud_selectors_and_optimistic_concurrency() {
    let (_server, client) = server_with_crds().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "crm");
    for (name, tier) in [("a", "web"), ("b", "db")] {
        let cm =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier}}, "data": {"k": "v"}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let dup = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
    let err = cms.create(&PostParams::default(), &dup).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err}");
    let web = cms.list(&ListParams::default().labels("tier=web")).await.unwrap();
    assert_eq!(web.items.len(), 1);
    let not_web = cms.list(&ListParams::default().labels("tier notin (web)")).await.unwrap();
    assert_eq!(not_web.items[0].metadata.name.as_deref(), Some("b"));

    let mut a = cms.get("a").await.unwrap();
    let stale = a.clone();
    a.data = Some([("k".to_string(), "v2".to_string())].into());
    cms.replace("a", &PostParams::default(), &a).await.unwrap();
    let err = cms.replace("a", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "stale resourceVersion must conflict: {err}");

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let err = cms.get("a").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 404));
}

#[tokio::test]
async fn generation_moves_with_spec_only_and_status_is_a_subresource() {
    let (_server, client) = server_with_crds().await;
    let guards: Api<NetworkGuard> = Api::namespaced(client, "crm");
    let created = guards.create(&PostParams::default(), &guard()).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let status = json!({"status": {"observedGeneration": 1, "coveredPods": 3}});
    let after = guards.patch_status("crm-firewall", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(after.metadata.generation, Some(1), "a status write does not bump generation");
    assert_eq!(after.status.unwrap().covered_pods, Some(3));
    // Status sent to the main resource is ignored.
    let sneaky = json!({"status": {"coveredPods": 99}, "metadata": {"labels": {"x": "y"}}});
    let after = guards.patch("crm-firewall", &PatchParams::default(), &Patch::Merge(&sneaky)).await.unwrap();
    assert_eq!(after.status.as_ref().unwrap().covered_pods, Some(3));
    assert_eq!(after.metadata.generation, Some(1), "a metadata change does not bump generation");
    let spec = json!({"spec": {"dns": {"allow": true, "acknowledgeNoDns": true}}});
    let after = guards.patch("crm-firewall", &PatchParams::default(), &Patch::Merge(&spec)).await.unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(after.labels()["x"], "y", "a merge patch without metadata keeps the labels");
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owners_take_their_children() {
    let (_server, client) = server_with_crds().await;
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), "crm");
    let cms: Api<ConfigMap> = Api::namespaced(client, "crm");
    let mut g = guard();
    g.metadata.finalizers = Some(vec!["crmguard.io/cleanup".into()]);
    let g = guards.create(&PostParams::default(), &g).await.unwrap();
    let child = json!({"metadata": {"name": "child", "ownerReferences": [{"apiVersion": "crmguard.io/v1alpha1",
        "kind": "NetworkGuard", "name": "crm-firewall", "uid": g.metadata.uid.clone().unwrap(), "controller": true}]}});
    cms.create(&PostParams::default(), &serde_json::from_value(child).unwrap()).await.unwrap();

    guards.delete("crm-firewall", &DeleteParams::default()).await.unwrap();
    let held = guards.get("crm-firewall").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some(), "a finalizer holds the object with a deletionTimestamp");
    assert!(cms.get("child").await.is_ok(), "children stay while the owner is held");

    let clear = json!({"metadata": {"finalizers": null}});
    guards.patch("crm-firewall", &PatchParams::default(), &Patch::Merge(&clear)).await.unwrap();
    assert!(guards.get("crm-firewall").await.is_err(), "gone once the last finalizer is removed");
    assert!(cms.get("child").await.is_err(), "owner-reference garbage collection removed the child");
}

#[tokio::test]
async fn server_side_apply_creates_then_updates() {
    let (_server, client) = server_with_crds().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "crm");
    let pp = PatchParams::apply("crmguard/test").force();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1"}});
    let created = cms.patch("applied", &pp, &Patch::Apply(&cm)).await.unwrap();
    let rv = created.metadata.resource_version.clone();
    let same = cms.patch("applied", &pp, &Patch::Apply(&cm)).await.unwrap();
    assert_eq!(same.metadata.resource_version, rv, "an identical apply is a no-op");
    let cm2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "2"}});
    let updated = cms.patch("applied", &pp, &Patch::Apply(&cm2)).await.unwrap();
    assert_eq!(updated.data.unwrap()["a"], "2");
    let no_manager = cms.patch("applied", &PatchParams::default(), &Patch::Apply(&cm2)).await.unwrap_err();
    assert!(matches!(no_manager, kube::Error::Api(ref s) if s.code == 422), "{no_manager}");
}

#[tokio::test]
async fn watches_stream_changes_and_refuse_compacted_versions() {
    let (server, client) = server_with_crds().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "crm");
    let list = cms.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = cms.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    cms.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "w"}})).unwrap())
        .await
        .unwrap();
    cms.delete("w", &DeleteParams::default()).await.unwrap();
    let mut seen = vec![];
    while seen.len() < 2 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(b) => assert!(!b.metadata.resource_version.is_empty()),
            other => seen.push(other),
        }
    }
    assert!(matches!(seen[0], WatchEvent::Added(ref cm) if cm.metadata.name.as_deref() == Some("w")), "{seen:?}");
    assert!(matches!(seen[1], WatchEvent::Deleted(_)), "{seen:?}");

    server.compact();
    let mut old = cms.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn the_watcher_of_kube_runtime_sees_objects_appear() {
    let (_server, client) = server_with_crds().await;
    let guards: Api<NetworkGuard> = Api::namespaced(client, "crm");
    let mut events = kube::runtime::watcher(guards.clone(), kube::runtime::watcher::Config::default()).boxed();
    guards.create(&PostParams::default(), &guard()).await.unwrap();
    let found = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(ev) = events.try_next().await.unwrap() {
            if let kube::runtime::watcher::Event::Apply(g) | kube::runtime::watcher::Event::InitApply(g) = ev {
                return g.metadata.name;
            }
        }
        None
    })
    .await
    .expect("the watcher saw the object within 20s");
    assert_eq!(found.as_deref(), Some("crm-firewall"));
}

#[tokio::test]
async fn invalid_custom_resources_are_refused_with_422_and_defaults_are_stored() {
    let (_server, client) = server_with_crds().await;
    let guards: Api<NetworkGuard> = Api::namespaced(client, "crm");
    let mut bad = guard();
    bad.spec.egress[2].peers[0].ip_block.as_mut().unwrap().cidr = "203.0.113.0/33".into();
    let err = guards.create(&PostParams::default(), &bad).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.egress[2].peers[0].ipBlock.cidr: cidr must be a CIDR"), "{}", s.message);
        }
        other => panic!("expected 422, got {other}"),
    }
    let raw = json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "NetworkGuard",
        "metadata": {"name": "minimal"}, "spec": {"podSelector": {}}});
    // Sent untyped, so that only the server can have filled in the defaults.
    let ar = kube::core::ApiResource::erase::<NetworkGuard>(&());
    let raw_api: Api<kube::core::DynamicObject> = Api::namespaced_with(guards.into_client(), "crm", &ar);
    let created = raw_api.create(&PostParams::default(), &serde_json::from_value(raw).unwrap()).await.unwrap();
    assert_eq!(created.data["spec"]["defaultDeny"], json!({"ingress": true, "egress": true}), "defaults are stored");
    assert_eq!(created.data["spec"]["dns"]["namespace"], "kube-system");
}

#[tokio::test]
async fn updates_are_admitted_too_with_transition_rules() {
    let (_server, client) = server_with_crds().await;
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), "crm");
    guards.create(&PostParams::default(), &guard()).await.unwrap();
    let bad = json!({"spec": {"egress": [{"name": "x", "peers": [{"ipBlock": {"cidr": "300.0.0.0/8"}}]}]}});
    let err = guards.patch("crm-firewall", &PatchParams::default(), &Patch::Merge(&bad)).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("cidr must be a CIDR")),
        "{err}"
    );

    let path = e2e::repo_root().join("examples/crm/restore.yaml");
    let restore: crmguard::api::CrmRestore = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let restores: Api<crmguard::api::CrmRestore> = Api::namespaced(client, "crm");
    restores.create(&PostParams::default(), &restore).await.unwrap();
    let edit = json!({"spec": {"target": {"database": "elsewhere"}}});
    let err = restores.patch("crm-db-check", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("one-shot request")), "{err}");
}

#[tokio::test]
async fn server_side_apply_tracks_field_owners() {
    let (_server, client) = server_with_crds().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "crm");
    let cm = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data});
    cms.patch("shared", &PatchParams::apply("team-a"), &Patch::Apply(cm(json!({"x": "1", "y": "1"})))).await.unwrap();
    let err =
        cms.patch("shared", &PatchParams::apply("team-b"), &Patch::Apply(cm(json!({"x": "2"})))).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.message.contains(".data.x")), "{err}");
    let forced =
        cms.patch("shared", &PatchParams::apply("team-b").force(), &Patch::Apply(cm(json!({"x": "2"})))).await.unwrap();
    let managers: Vec<String> = forced.metadata.managed_fields.unwrap().into_iter().filter_map(|m| m.manager).collect();
    assert_eq!(managers, ["team-a", "team-b"]);
    // team-a stops applying y: it is removed, as no one else owns it.
    let after = cms.patch("shared", &PatchParams::apply("team-a"), &Patch::Apply(cm(json!({})))).await.unwrap();
    assert_eq!(after.data.unwrap(), [("x".to_string(), "2".to_string())].into());
}

#[tokio::test]
async fn discovery_lists_groups_and_resources_like_the_api_server() {
    let (_server, client) = server_with_crds().await;
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let (ar, caps) =
        discovery.resolve_gvk(&kube::core::GroupVersionKind::gvk("crmguard.io", "v1alpha1", "NetworkGuard")).unwrap();
    assert_eq!(ar.plural, "networkguards");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    for (g, v, k) in [
        ("", "v1", "Pod"),
        ("batch", "v1", "CronJob"),
        ("networking.k8s.io", "v1", "NetworkPolicy"),
        ("coordination.k8s.io", "v1", "Lease"),
    ] {
        assert!(discovery.resolve_gvk(&kube::core::GroupVersionKind::gvk(g, v, k)).is_some(), "{g}/{v} {k}");
    }
}
