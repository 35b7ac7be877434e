//! The audit trail: the real operator logs every write as an audit line and ships hash-chained segments to real
//! S3 (SeaweedFS); `crmguard audit verify` passes on the untouched chain and names the segment when one is
//! modified, removed or swapped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use bytes::Bytes;
use crmguard::api::NetworkGuard;
use e2e::services::SeaweedFs;
use e2e::{Cluster, Operator, eventually};
use kube::api::{Api, PostParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_chained_into_s3_and_tampering_is_named() {
    let cluster = Cluster::start("audit").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let s3 = SeaweedFs::shared();
    let store = s3.store("audit").await;
    let stream = format!("e2e-{}", std::process::id());
    let location: Vec<String> = [
        "--audit-bucket",
        "audit",
        "--audit-endpoint",
        &s3.endpoint(),
        "--audit-force-path-style",
        "true",
        "--audit-prefix",
        "trail",
        "--audit-stream",
        &stream,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut args: Vec<&str> = vec!["--leader-election=false", "--namespace", &ns, "--audit-flush-seconds", "1"];
    args.extend(location.iter().map(String::as_str));
    let env = [("AWS_ACCESS_KEY_ID", s3.access_key.as_str()), ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str())];
    let op = Operator::start_with_env(&cluster.kubeconfig, &args, &env);
    op.wait_ready(60).await;

    // Three rounds of writes, each in its own segment (segments close every second).
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), &ns);
    guards.create(&PostParams::default(), &e2e::example("network-guard.yaml", &ns)).await.unwrap();
    let dir = format!("trail/{stream}/");
    let segments = || async {
        let mut keys: Vec<String> = store.list(&dir).await.unwrap().into_iter().map(|o| o.key).collect();
        keys.sort();
        keys
    };
    for round in 1..=3usize {
        eventually(30, &format!("segment {round}"), || async {
            let n = segments().await.len();
            if n >= round { Ok(()) } else { Err(format!("{n} segments")) }
        })
        .await;
        if round < 3 {
            // Move the SMTP rule's port: one NetworkPolicy rewritten per round.
            let mut g = guards.get("crm-firewall").await.unwrap();
            g.spec.egress[2].ports[0].port =
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(587 + round as i32);
            guards.replace("crm-firewall", &Default::default(), &g).await.unwrap();
        }
    }
    let logs = op.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("crmguard::audit") && l.contains("action=apply") && l.contains("kind=NetworkPolicy")),
        "every write is an audit log line:\n{logs}"
    );
    drop(op); // the chain stays still while we tamper with it
    let keys = segments().await;
    let first = String::from_utf8(store.get(&keys[0]).await.unwrap().to_vec()).unwrap();
    assert!(first.contains("\"kind\":\"NetworkPolicy\"") && first.contains("\"action\":\"apply\""), "{first}");

    let verify = || {
        let mut cmd = std::process::Command::new(e2e::crmguard_bin());
        cmd.args(["audit", "verify"]).args(&location).envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("the chain is intact"), "{text}");

    // Modified: one record in the first segment.
    let original: Vec<Bytes> = futures_bytes(&store, &keys).await;
    let forged = first.replacen("\"action\":\"apply\"", "\"action\":\"noop!\"", 1);
    store.put(&keys[0], Bytes::from(forged)).await.unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("000000000001.jsonl") && text.contains("modified"), "{text}");
    store.put(&keys[0], original[0].clone()).await.unwrap();

    // Removed: the middle segment.
    store.delete(std::slice::from_ref(&keys[1])).await.unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("2..2 are missing"), "{text}");
    store.put(&keys[1], original[1].clone()).await.unwrap();

    // Reordered: the first two segments swap places.
    store.put(&keys[0], original[1].clone()).await.unwrap();
    store.put(&keys[1], original[0].clone()).await.unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("reordered"), "{text}");
    store.put(&keys[0], original[0].clone()).await.unwrap();
    store.put(&keys[1], original[1].clone()).await.unwrap();
    assert_eq!(verify().0, Some(0), "restored, the chain verifies again");
}

async fn futures_bytes(store: &crmguard::backup::store::Store, keys: &[String]) -> Vec<Bytes> {
    let mut out = Vec::new();
    for k in keys {
        out.push(store.get(k).await.unwrap());
    }
    out
}
