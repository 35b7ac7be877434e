//! Controller benchmark: N custom resources of the four kinds (NetworkGuards, AccessPolicies, CrmBackupPolicies,
//! CrmRestores, a quarter each) across M namespaces on a real control plane (e2e/kube), created before a real
//! `crmguard run` process starts. Reports:
//! - cold start: time until every resource has a Ready condition for its generation;
//! - idle: the operator's requests to the API server per second (its `crmguard_api_requests_total`, by verb) and
//!   its writes (the API server's audit log) over a window at least as long as the resync interval;
//! - churn: every resource's labels touched at once while one guard's spec changes, and the time until that
//!   guard's change is in effect;
//! - memory: peak RSS, RSS at idle, and RSS per watched object.
//!
//! Run it through bench/controllers.sh.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark driver

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crmguard::api::{AccessPolicy, CrmBackupPolicy, CrmRestore, NetworkGuard};
use e2e::Operator;
use e2e::{ControlPlane, OPERATOR_USER};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Whether the object's Ready condition speaks of its current generation.
fn settled(generation: Option<i64>, conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == "Ready" && c.observed_generation == generation)
}

/// A watch of one kind that counts its settled resources as their events come: reading the count costs nothing
/// (scanning every resource at every poll had cost the driver more CPU than the operator at 10,000 resources). For
/// the cold start: deleted resources are not counted out.
fn settled_counter<K>(client: &kube::Client, conds: fn(&K) -> Option<&Vec<Condition>>) -> Arc<AtomicUsize>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let mut seen = std::collections::HashMap::<String, bool>::new();
    let events = kube::runtime::watcher(Api::<K>::all(client.clone()), kube::runtime::watcher::Config::default())
        .applied_objects();
    tokio::spawn(events.for_each(move |o| {
        if let Ok(o) = o {
            let now = conds(&o).is_some_and(|c| settled(o.meta().generation, c));
            match (seen.insert(o.meta().uid.clone().unwrap_or_default(), now).unwrap_or(false), now) {
                (false, true) => counter.fetch_add(1, Ordering::SeqCst),
                (true, false) => counter.fetch_sub(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        futures::future::ready(())
    }));
    count
}

/// Settled resources of each kind: NetworkGuards, AccessPolicies, CrmBackupPolicies, CrmRestores.
type Counters = [Arc<AtomicUsize>; 4];

fn settled_counts(c: &Counters) -> [usize; 4] {
    [0, 1, 2, 3].map(|i| c[i].load(Ordering::SeqCst))
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds (user + system) used so far by each process whose command name is one of `names`.
fn cpu_seconds(names: &[&str]) -> Vec<(String, f64)> {
    let tick = 100.0; // USER_HZ
    let mut out: Vec<(String, f64)> = names.iter().map(|n| (n.to_string(), 0.0)).collect();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        // comm is cut at 15 bytes (kube-controller-manager) and a copied binary may be named crmguard-<suffix>.
        let comm = comm.trim();
        let Some(slot) = out.iter_mut().find(|(n, _)| n.starts_with(comm) || comm.starts_with(n.as_str())) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else { continue };
        // Fields after the command (which may hold spaces): state is field 3; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        slot.1 += (ticks(11) + ticks(12)) / tick;
    }
    out
}

/// The processes whose CPU is reported: the servers, the operator, and this driver (its watches and polls cost too).
const SERVERS: [&str; 5] = ["kube-apiserver", "etcd", "kube-controller-manager", "crmguard", "bench-controllers"];

/// The controllers of the four kinds, as the operator's metrics name them.
const CONTROLLERS: [&str; 4] = ["networkguard", "accesspolicy", "backuppolicy", "restore"];
const VERBS: [&str; 8] = ["get", "list", "watch", "create", "update", "patch", "delete", "nonresource"];

fn requests(op: &Operator) -> Vec<(&'static str, f64)> {
    VERBS
        .iter()
        .map(|v| (*v, op.metric(&format!("crmguard_api_requests_total{{verb=\"{v}\"}}")).unwrap_or(0.0)))
        .collect()
}

/// Requests grouped by verb, resource[/subresource] and response code, most frequent first.
fn breakdown(records: impl Iterator<Item = e2e::controlplane::AuditWrite>) -> String {
    let mut n = std::collections::BTreeMap::<String, usize>::new();
    let mut total = 0;
    for r in records {
        let sub = if r.subresource.is_empty() { String::new() } else { format!("/{}", r.subresource) };
        *n.entry(format!("{} {}{} {}", r.verb, r.resource, sub, r.code)).or_default() += 1;
        total += 1;
    }
    let mut v: Vec<_> = n.into_iter().collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    let top: Vec<String> = v.iter().map(|(k, c)| format!("{k}: {c}")).collect();
    format!("{total} in all; {}", top.join(", "))
}

fn example(name: &str) -> serde_json::Value {
    let path = e2e::repo_root().join("examples/crm").join(name);
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn create<K>(client: &kube::Client, ns: &str, name: &str, mut doc: serde_json::Value)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    doc["metadata"] = json!({"name": name, "namespace": ns});
    let obj: K = serde_json::from_value(doc).unwrap();
    Api::<K>::namespaced(client.clone(), ns).create(&PostParams::default(), &obj).await.unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = arg("--resources", 1000);
    let namespaces = arg("--namespaces", 100).max(1);
    let resync = arg("--resync-seconds", 60);
    let idle = arg("--idle-seconds", resync.max(60));
    let per_kind = (total / 4).max(1);
    let want = per_kind * 4;
    let cp = ControlPlane::shared();
    let client = ControlPlane::client_for(&cp.admin_kubeconfig()).await;
    e2e::install_crds(&client).await;
    // The set-up happens before the operator starts (it is not measured): several requests at a time.
    use futures::{StreamExt, stream};
    const AT_ONCE: usize = 16;
    stream::iter(0..namespaces)
        .for_each_concurrent(AT_ONCE, |i| {
            let client = client.clone();
            async move {
                let ns: k8s_openapi::api::core::v1::Namespace =
                    serde_json::from_value(json!({"metadata": {"name": format!("bench-{i}")}})).unwrap();
                Api::all(client).create(&PostParams::default(), &ns).await.unwrap();
            }
        })
        .await;
    // A guard that selects no pod is not Ready: one CRM pod per namespace (the namespaces' default
    // ServiceAccounts must exist first).
    stream::iter(0..namespaces)
        .for_each_concurrent(AT_ONCE, |i| {
            let client = client.clone();
            async move {
                let ns = format!("bench-{i}");
                let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
                e2e::eventually(60, "the default ServiceAccount", || async {
                    sas.get_opt("default")
                        .await
                        .map_err(|e| e.to_string())?
                        .map(drop)
                        .ok_or_else(|| "absent".to_string())
                })
                .await;
                e2e::crm_pod(&client, &ns, "web-0").await;
            }
        })
        .await;
    let (guard, backup, restore) =
        (example("network-guard.yaml"), example("backup-policy.yaml"), example("restore.yaml"));
    let access = json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "spec": {"teams": [
            {"name": "sales", "subjects": [{"kind": "Group", "name": "sales"}],
             "kubernetes": [{"resources": ["pods"], "verbs": ["get", "list"]}]},
            {"name": "finance", "subjects": [{"kind": "Group", "name": "finance"}],
             "kubernetes": [{"resources": ["configmaps"], "verbs": ["get"]}]}]}
    });
    stream::iter(0..per_kind)
        .for_each_concurrent(AT_ONCE, |i| {
            let (client, guard, access, backup) = (client.clone(), guard.clone(), access.clone(), backup.clone());
            let mut r = restore.clone();
            async move {
                let ns = format!("bench-{}", i % namespaces);
                create::<NetworkGuard>(&client, &ns, &format!("guard-{i}"), guard).await;
                create::<AccessPolicy>(&client, &ns, &format!("access-{i}"), access).await;
                create::<CrmBackupPolicy>(&client, &ns, &format!("backup-{i}"), backup).await;
                r["spec"]["policyRef"]["name"] = json!(format!("backup-{i}"));
                create::<CrmRestore>(&client, &ns, &format!("restore-{i}"), r).await;
            }
        })
        .await;
    eprintln!("created {want} resources ({per_kind} of each kind) in {namespaces} namespaces");

    let stores: Counters = [
        settled_counter::<NetworkGuard>(&client, |o| o.status.as_ref().map(|s| &s.conditions)),
        settled_counter::<AccessPolicy>(&client, |o| o.status.as_ref().map(|s| &s.conditions)),
        settled_counter::<CrmBackupPolicy>(&client, |o| o.status.as_ref().map(|s| &s.conditions)),
        settled_counter::<CrmRestore>(&client, |o| o.status.as_ref().map(|s| &s.conditions)),
    ];
    // --- cold start ---
    let cpu_before = cpu_seconds(&SERVERS);
    let audit_before = (cp.writes_by(OPERATOR_USER).len(), cp.operator_reads().len());
    let started = Instant::now();
    let (resync_arg, concurrency) = (resync.to_string(), arg("--concurrency", 4).to_string());
    let mut op = Operator::start(
        &cp.kubeconfig_for(OPERATOR_USER, &["system:masters"]),
        &[
            "--leader-election=false",
            "--resync-seconds",
            &resync_arg,
            "--grant-ceiling",
            "cluster-admin",
            "--concurrency",
            &concurrency,
        ],
    );
    let reconciles = |op: &Operator| -> Vec<f64> {
        CONTROLLERS
            .iter()
            .map(|c| op.metric(&format!("crmguard_reconcile_total{{controller=\"{c}\"}}")).unwrap_or(0.0))
            .collect()
    };
    let mut last_report = Instant::now();
    // When each kind had settled: a kind that ends last alone shows where the cold start's tail comes from.
    let mut kind_done: [Option<Duration>; 4] = [None; 4];
    loop {
        let by_kind = settled_counts(&stores);
        for (done, n) in kind_done.iter_mut().zip(by_kind) {
            if done.is_none() && n == per_kind {
                *done = Some(started.elapsed());
            }
        }
        let n: usize = by_kind.iter().sum();
        if n == want {
            break;
        }
        if let Ok(Some(status)) = op.child.try_wait() {
            panic!("the operator exited ({status}):\n{}", op.logs());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{n} of {want} settled after {:.0} s (guards {}, access {}, backup {}, restore {})",
                started.elapsed().as_secs_f64(),
                by_kind[0],
                by_kind[1],
                by_kind[2],
                by_kind[3]
            );
            last_report = Instant::now();
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "only {n} of {want} settled after 30 min");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let to_ready = started.elapsed();
    let kinds_settled: Vec<String> = ["NetworkGuards", "AccessPolicies", "CrmBackupPolicies", "CrmRestores"]
        .iter()
        .zip(kind_done)
        .map(|(k, t)| format!("{k} {:.1} s", t.unwrap_or(to_ready).as_secs_f64()))
        .collect();
    let cpu_cold: Vec<String> =
        cpu_seconds(&SERVERS).iter().zip(&cpu_before).map(|((n, a), (_, b))| format!("{n} {:.1}", a - b)).collect();
    let cold_requests: f64 = requests(&op).iter().map(|(_, n)| n).sum();
    let cold_breakdown = breakdown(
        cp.writes_by(OPERATOR_USER)
            .into_iter()
            .skip(audit_before.0)
            .chain(cp.operator_reads().into_iter().skip(audit_before.1)),
    );
    let rss_cold_peak = rss_kib(op.child.id(), "VmHWM:");
    let cold_reconciles = reconciles(&op);
    // Watches that started over during the cold start: an API server that did not answer /version in time (every
    // watch lists again), or a watch resumed too late for the server's history (410 Gone: that kind lists again).
    let log = op.logs();
    let (outages, gone) =
        (log.matches("every watch starts over").count(), log.matches("too old resource version").count());

    // --- idle ---
    // Let the reconciles that the status writes triggered finish and the posture loop make its first pass (60 s
    // after the start: it reads every namespace's report once), then count over a window >= the resync.
    tokio::time::sleep(Duration::from_secs(10).max(Duration::from_secs(70).saturating_sub(started.elapsed()))).await;
    // The Job controller goes on creating the restore Jobs' pods (and updating the Jobs, which the restores
    // report) for a while after every resource is Ready: the idle window starts once the operator wrote nothing
    // for 15 s.
    let mut quiet_since = (Instant::now(), cp.writes_by(OPERATOR_USER).len());
    while quiet_since.0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = cp.writes_by(OPERATOR_USER).len();
        if n != quiet_since.1 {
            quiet_since = (Instant::now(), n);
        }
        assert!(started.elapsed() < Duration::from_secs(3600), "the operator kept writing");
    }
    let quiet_after = started.elapsed();
    let (req_before, writes_before, reads_before) =
        (requests(&op), cp.writes_by(OPERATOR_USER).len(), cp.operator_reads().len());
    let rec_before: f64 = reconciles(&op).iter().sum();
    tokio::time::sleep(Duration::from_secs(idle as u64)).await;
    let req_after = requests(&op);
    let idle_writes: Vec<_> = cp.writes_by(OPERATOR_USER).into_iter().skip(writes_before).collect();
    // The API server's own count (its audit log): gets and lists of the operator's user.
    let mut idle_reads = std::collections::BTreeMap::<String, usize>::new();
    for r in cp.operator_reads().into_iter().skip(reads_before) {
        *idle_reads
            .entry(format!(
                "{} {}{}",
                r.verb,
                r.resource,
                if r.subresource.is_empty() { String::new() } else { format!("/{}", r.subresource) }
            ))
            .or_default() += 1;
    }
    let server_reads: usize = idle_reads.values().sum();
    let idle_reconciles = reconciles(&op).iter().sum::<f64>() - rec_before;
    let per_verb: Vec<(&str, f64)> =
        req_after.iter().zip(&req_before).map(|((v, a), (_, b))| (*v, a - b)).filter(|(_, n)| *n > 0.0).collect();
    let idle_total: f64 = per_verb.iter().map(|(_, n)| n).sum();
    let rss_idle = rss_kib(op.child.id(), "VmRSS:");

    // --- churn: every resource touched at once, one guard's spec changed in the middle ---
    let p = Patch::Merge(json!({"metadata": {"labels": {"bench": "touched"}}}));
    let pp = PatchParams::default();
    let changed_ns = format!("bench-{}", (per_kind / 2) % namespaces);
    let changed = format!("guard-{}", per_kind / 2);
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), &changed_ns);
    // The changed guard is watched from the moment of its change, while the other patches go on.
    let mut watcher = None;
    for i in 0..per_kind {
        let ns = format!("bench-{}", i % namespaces);
        Api::<NetworkGuard>::namespaced(client.clone(), &ns).patch(&format!("guard-{i}"), &pp, &p).await.unwrap();
        Api::<AccessPolicy>::namespaced(client.clone(), &ns).patch(&format!("access-{i}"), &pp, &p).await.unwrap();
        Api::<CrmBackupPolicy>::namespaced(client.clone(), &ns).patch(&format!("backup-{i}"), &pp, &p).await.unwrap();
        Api::<CrmRestore>::namespaced(client.clone(), &ns).patch(&format!("restore-{i}"), &pp, &p).await.unwrap();
        if i == per_kind / 2 {
            let spec = Patch::Merge(
                json!({"spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "crm", "tier": "web"}}}}),
            );
            guards.patch(&changed, &pp, &spec).await.unwrap();
            let (guards, changed) = (guards.clone(), changed.clone());
            watcher = Some(tokio::spawn(async move {
                let started = Instant::now();
                loop {
                    let g = guards.get(&changed).await.unwrap();
                    let conds = g.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
                    if settled(g.meta().generation, &conds) {
                        break started.elapsed();
                    }
                    assert!(started.elapsed() < Duration::from_secs(300), "the changed guard was not reconciled");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    let applied = watcher.unwrap().await.unwrap();
    let rss_peak = rss_kib(op.child.id(), "VmHWM:");
    let watched = {
        let lp = ListParams::default().labels("app.kubernetes.io/managed-by=crmguard");
        let mut n = want + namespaces * 2; // the resources, the pods and the namespaces
        for (v, k, _) in crmguard::k8s::apply::CHILD_KINDS.iter().filter(|(_, k, _)| {
            ["CronJob", "ConfigMap", "ServiceAccount", "Job", "Role", "RoleBinding", "NetworkPolicy"].contains(k)
        }) {
            let ar = crmguard::k8s::apply::api_resource(v, k).unwrap();
            let api: Api<kube::core::DynamicObject> = Api::all_with(client.clone(), &ar);
            n += api.list_metadata(&lp).await.map(|l| l.items.len()).unwrap_or(0);
        }
        n
    };
    let _ = op.child.kill();
    if let Ok(path) = std::env::var("CRMGUARD_BENCH_LOG") {
        std::fs::write(&path, op.logs()).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "resources: {want} ({per_kind} NetworkGuards, AccessPolicies, CrmBackupPolicies, CrmRestores) in {namespaces} namespaces; --concurrency {concurrency}"
    );
    println!(
        "cold start: {:.1} s until every resource has Ready for its generation ({cold_requests:.0} API requests, peak RSS {:.1} MiB)",
        to_ready.as_secs_f64(),
        mib(rss_cold_peak)
    );
    println!("  every resource of a kind settled after: {}", kinds_settled.join(", "));
    println!("  CPU seconds during the cold start: {}", cpu_cold.join(", "));
    println!(
        "  reconciles during the cold start: {} ({:.2} per resource); watches started over: {outages} times all (an API server slow to answer /version), {gone} times one kind (410 Gone)",
        CONTROLLERS.iter().zip(&cold_reconciles).map(|(c, n)| format!("{c} {n:.0}")).collect::<Vec<_>>().join(", "),
        cold_reconciles.iter().sum::<f64>() / want as f64
    );
    println!("  requests during the cold start, by the API server's audit log: {cold_breakdown}");
    println!("quiet (no write for 15 s) after {:.0} s", quiet_after.as_secs_f64());
    println!(
        "idle ({idle} s, resync every {resync} s): {:.2} requests/s = {:.2} per 1,000 resources per s ({}), {} writes, {idle_reconciles:.0} reconciles",
        idle_total / idle as f64,
        idle_total / idle as f64 * 1000.0 / want as f64,
        per_verb.iter().map(|(v, n)| format!("{v} {n:.0}")).collect::<Vec<_>>().join(", "),
        idle_writes.len()
    );
    println!(
        "idle, by the API server's audit log: {server_reads} reads = {:.2}/s ({}), {} writes",
        server_reads as f64 / idle as f64,
        idle_reads.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        idle_writes.len()
    );
    for w in idle_writes.iter().take(10) {
        println!("  idle write: {} {} {}/{} {}", w.verb, w.resource, w.namespace, w.name, w.code);
    }
    println!(
        "churn: {} resources touched at once; a guard's spec change in the middle was in effect after {:.2} s",
        want,
        applied.as_secs_f64()
    );
    println!(
        "memory: peak RSS {:.1} MiB, at idle {:.1} MiB; {watched} watched objects = {:.1} KiB of RSS per watched object",
        mib(rss_peak),
        mib(rss_idle),
        rss_idle as f64 / watched as f64
    );
}
