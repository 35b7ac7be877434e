//! The test kubelet is no more forgiving than a kubelet: a Pod's container runs as its securityContext's user,
//! cannot write a read-only root, can write its emptyDir, sees its ConfigMap and Secret volumes read-only and
//! its environment resolved from the API, and leaves its termination message in the Pod's status.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use e2e::Cluster;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_as_its_user_with_its_volumes_and_a_read_only_root() {
    let cluster = Cluster::start("kubelet").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.as_str());
    let kubelet = e2e::kubelet::TestKubelet::start(client.clone(), ns);
    let cm = json!({"metadata": {"name": "cfg"}, "data": {"policy.json": "{\"a\": 1}"}});
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    let secret = json!({"metadata": {"name": "db"}, "stringData": {"password": "pw-from-secret"}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(secret).unwrap())
        .await
        .unwrap();
    // Each line of the message is one observation, written by the container itself.
    let script = "out=/dev/termination-log; id -u >> $out; id -g >> $out; \
        touch /tmp/crmguard-e2e-probe-$$ 2>/dev/null && echo root-writable >> $out || echo root-read-only >> $out; \
        touch /mnt/f && echo scratch-writable >> $out; \
        touch /opt/f 2>/dev/null && echo read-only-mount-writable >> $out || echo read-only-mount-refused >> $out; \
        cat /srv/policy.json >> $out; echo >> $out; \
        [ \"$PASSWORD\" = pw-from-secret ] && echo env-from-secret >> $out; \
        echo \"pod=$POD_NAME\" >> $out; exit 3";
    let pod = json!({"metadata": {"name": "probe"}, "spec": {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65533, "runAsNonRoot": true},
        "containers": [{"name": "c", "image": "ghcr.io/crmguard/crmguard:0.1.0", "command": ["sh", "-c", script],
            "securityContext": {"readOnlyRootFilesystem": true},
            "env": [
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            // Mount points this machine has (the kubelet would create missing ones on it). /tmp is world-writable
            // on the root filesystem and the second emptyDir is writable by all: only a read-only root or mount
            // can refuse those writes.
            "volumeMounts": [{"name": "scratch", "mountPath": "/mnt"},
                {"name": "locked", "mountPath": "/opt", "readOnly": true},
                {"name": "cfg", "mountPath": "/srv", "readOnly": true}]}],
        "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "locked", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "cfg"}}]}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    let logs = kubelet.logs().await;
    let terminated = e2e::eventually(60, "the probe pod to fail with exit code 3", || async {
        let p = pods.get("probe").await.map_err(|e| e.to_string())?;
        let st = p.status.unwrap_or_default();
        let p_status = st.container_statuses.clone();
        let t = st.container_statuses.unwrap_or_default().first().and_then(|c| c.state.clone()?.terminated);
        match (st.phase.as_deref(), t) {
            (Some("Failed"), Some(t)) => Ok(t),
            other => Err(format!("{other:?}; logs: {logs}; status: {:?}", p_status)),
        }
    })
    .await;
    assert_eq!(terminated.exit_code, 3);
    let lines: Vec<String> = terminated.message.unwrap_or_default().lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            "65532",
            "65533",
            "root-read-only",
            "scratch-writable",
            "read-only-mount-refused",
            "{\"a\": 1}",
            "env-from-secret",
            "pod=probe"
        ]
    );
    assert!(!std::path::Path::new("/dev/termination-log").exists(), "the machine's /dev was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_non_root_keeps_a_root_container_from_starting() {
    let cluster = Cluster::start("kubelet-root").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.as_str());
    let _kubelet = e2e::kubelet::TestKubelet::start(client.clone(), ns);
    let pod = json!({"metadata": {"name": "root"}, "spec": {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 0, "runAsNonRoot": true},
        "containers": [{"name": "c", "image": "ghcr.io/crmguard/crmguard:0.1.0", "command": ["true"]}]}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    // As a kubelet: the Pod stays Pending, its container waiting with the reason.
    let waiting = e2e::eventually(60, "the container to wait with CreateContainerConfigError", || async {
        let p = pods.get("root").await.map_err(|e| e.to_string())?;
        let st = p.status.unwrap_or_default();
        let w = st.container_statuses.unwrap_or_default().first().and_then(|c| c.state.clone()?.waiting);
        match (st.phase.as_deref(), w) {
            (Some("Pending"), Some(w)) => Ok(w),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(waiting.reason.as_deref(), Some("CreateContainerConfigError"));
    assert!(waiting.message.unwrap_or_default().contains("runAsNonRoot"));
}
