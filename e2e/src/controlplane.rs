//! A real Kubernetes control plane for the e2e tests: etcd, kube-apiserver and kube-controller-manager of the
//! version pinned in `e2e/kube/<newest|oldest>/go.mod`, built by `e2e/kube/build` (cached outside the work tree),
//! started once per test binary on free loopback ports.
//!
//! What a test gets is the real thing: schema and CEL admission, server-side apply, RBAC (client certificates for
//! users, TokenRequest tokens for ServiceAccounts), garbage collection, namespaces that really terminate,
//! CronJob -> Job -> Pod by the real controllers. There is no kubelet and no scheduler: Pods stay Pending unless
//! a test runs [`crate::kubelet`]. Every write is recorded in an audit log ([`ControlPlane::writes_by`]).
//!
//! `CRMGUARD_KUBE=oldest` selects the oldest supported version instead of the newest; `CRMGUARD_KUBE_BIN_DIR`
//! names a directory that already holds the three binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::services::{spawn_watched, text_output};
use crate::{TempDir, free_port, repo_root};

/// The user the tests' own client is: a member of `system:masters`.
pub const ADMIN_USER: &str = "e2e-admin";

/// A running control plane; its processes stop when the test process exits.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// PEM of the CA that signed the serving certificate and every client certificate.
    pub ca_pem: String,
    /// `git version` the API server reports, e.g. `v1.37.2`.
    pub version: String,
    /// JSON lines of the audit log: one line per write (create, update, patch, delete) at level Metadata, and
    /// per get or list of the tests' operator user.
    pub audit_log: PathBuf,
    /// kube-apiserver's flags, to start it again after [`ControlPlane::restart_apiserver`] stopped it.
    apiserver_args: Vec<String>,
    dir: TempDir,
}

/// One request (a write, or a read of the operator's user) as the audit log recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditWrite {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    /// The request's User-Agent header (crmguard's names the replica).
    pub user_agent: String,
    /// When the API server received the request.
    pub received: Option<jiff::Timestamp>,
    /// The request's path and query.
    pub request_uri: String,
}

/// Directory holding `etcd`, `kube-apiserver` and `kube-controller-manager`, building them when needed.
pub fn binaries() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("CRMGUARD_KUBE_BIN_DIR") {
            return PathBuf::from(d);
        }
        let which = std::env::var("CRMGUARD_KUBE").unwrap_or_else(|_| "newest".into());
        let script = repo_root().join("e2e/kube/build");
        let out = Command::new(&script)
            .arg(&which)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(out.status.success(), "{} {which} failed ({})", script.display(), out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(text.lines().last().unwrap_or_default().trim())
    })
    .clone()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `<name>.key` (EC P-256, PKCS#8) and `<name>.crt` signed by `<ca>.crt`/`<ca>.key`.
pub(crate) fn issue(dir: &Path, ca: &str, name: &str, subject: &str, ext: &str) {
    new_key(dir, name);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            subject,
            "-addext",
            ext,
            "-out",
            &format!("{name}.csr"),
        ],
    );
    // A serial of its own, not `-CAcreateserial`: tests issuing from the same CA at once raced on its serial file
    // ("Unable to load number from ca.srl").
    static ISSUED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let serial = format!(
        "0x{nanos:x}{:04x}{:04x}",
        std::process::id() & 0xffff,
        ISSUED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xffff
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &serial,
            "-days",
            "30",
            "-copy_extensions",
            "copy",
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// Writes `<name>.key`: an EC P-256 key (PKCS#8).
fn new_key(dir: &Path, name: &str) {
    openssl(
        dir,
        &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &format!("{name}.key")],
    );
}

/// Writes `<name>.key` and a self-signed CA certificate `<name>.crt`.
pub(crate) fn new_ca(dir: &Path, name: &str, cn: &str) {
    new_key(dir, name);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "30",
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
# The operator's reads too (not its watches, which stay open): what it asks the server, counted by the server.
- level: Metadata
  users: [e2e-operator]
  verbs: [get, list]
- level: None
  verbs: [get, list, watch]
- level: None
  resources:
  - group: coordination.k8s.io
    resources: [leases]
- level: Metadata
";

impl ControlPlane {
    /// The control plane shared by the tests of this binary, started on first use.
    pub fn shared() -> &'static ControlPlane {
        static CP: OnceLock<ControlPlane> = OnceLock::new();
        CP.get_or_init(ControlPlane::start_private)
    }

    /// A control plane of the caller's own (e.g. one without crmguard's CRDs); it stops when dropped.
    pub fn start_private() -> ControlPlane {
        let bin = binaries();
        let dir = TempDir::new("kube");
        let dpath = dir.path.clone();
        let d = dpath.as_path();
        new_ca(d, "ca", "crmguard-e2e-ca");
        new_ca(d, "front-proxy-ca", "crmguard-e2e-front-proxy-ca");
        issue(
            d,
            "ca",
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth",
        );
        issue(d, "front-proxy-ca", "front-proxy-client", "/CN=front-proxy-client", "extendedKeyUsage=clientAuth");
        issue(d, "ca", "controller-manager", "/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth");
        new_key(d, "sa");
        openssl(d, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(d.join("audit-policy.yaml"), AUDIT_POLICY).expect("audit policy");
        let ca_pem = std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");

        // etcd, on tmpfs-speed settings: no fsync (test data only).
        let (etcd_port, peer_port) = (free_port(), free_port());
        let etcd_log = d.join("etcd.log");
        let etcd_args: Vec<String> = vec![
            "--name=e2e".into(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=e2e=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        // etcd's watchdog removes the directory (certificates, data, logs) once etcd has stopped; a private control
        // plane stops when it is dropped (its directory, with the logs the watchdogs watch, is removed).
        let cleanup = format!("sleep 2; rm -rf {}", d.display());
        spawn_watched(&bin.join("etcd"), &etcd_args, &etcd_log, None, "kill -TERM $child", &cleanup);

        let port = free_port();
        let p = |f: &str| d.join(f).display().to_string();
        let audit_log = d.join("audit.log");
        let apiserver_log = d.join("kube-apiserver.log");
        let args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            // A loopback advertise address cannot go into the `kubernetes` Endpoints object.
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
            format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            format!("--audit-policy-file={}", p("audit-policy.yaml")),
            format!("--audit-log-path={}", audit_log.display()),
            "--audit-log-maxsize=0".into(),
            // `CRMGUARD_E2E_PROFILING=1`: /debug/pprof served (to see where the API server's CPU goes in a bench).
            format!("--profiling={}", std::env::var("CRMGUARD_E2E_PROFILING").is_ok_and(|v| v == "1")),
            "--v=0".into(),
        ];
        spawn_watched(&bin.join("kube-apiserver"), &args, &apiserver_log, None, "kill -TERM $child", "");

        let server = format!("https://127.0.0.1:{port}");
        let cp = ControlPlane { server, ca_pem, version: String::new(), audit_log, apiserver_args: args, dir };
        issue(d, "ca", "admin", &format!("/CN={ADMIN_USER}/O=system:masters"), "extendedKeyUsage=clientAuth");
        let admin = cp.kubeconfig_from_files(ADMIN_USER, "admin");
        std::fs::write(d.join("admin.kubeconfig"), &admin).expect("admin kubeconfig");
        let version = cp.wait_ready(&apiserver_log, &etcd_log);

        // kube-controller-manager: each controller with its own ServiceAccount and the bootstrap RBAC the API
        // server creates for it (system:controller:*), as in a real cluster.
        let kcm_kubeconfig = cp.kubeconfig_from_files("system:kube-controller-manager", "controller-manager");
        std::fs::write(d.join("controller-manager.kubeconfig"), kcm_kubeconfig).expect("kcm kubeconfig");
        let kcm_args: Vec<String> = vec![
            format!("--kubeconfig={}", p("controller-manager.kubeconfig")),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--controllers=job-controller,cronjob-controller,garbage-collector-controller,namespace-controller,\
             serviceaccount-controller,serviceaccount-token-controller,ttl-after-finished-controller,\
             clusterrole-aggregation-controller,root-ca-certificate-publisher-controller,\
             deployment-controller,replicaset-controller"
                .into(),
            "--concurrent-gc-syncs=5".into(),
            "--v=0".into(),
        ];
        spawn_watched(
            &bin.join("kube-controller-manager"),
            &kcm_args,
            &d.join("kube-controller-manager.log"),
            None,
            "kill -TERM $child",
            "",
        );
        ControlPlane { version, ..cp }
    }

    /// Stops kube-apiserver as a kubelet stops its static pod for an upgrade (SIGTERM, and SIGKILL if it is still
    /// there after `grace`: with watches open over HTTP/1.1 it waits up to its 60 s request timeout), keeps it down
    /// for `down`, starts it again with the same flags on the same port and etcd, and waits until it is ready.
    /// etcd and kube-controller-manager keep running. Only for a private control plane: the shared one serves the
    /// other tests of the binary.
    pub fn restart_apiserver(&self, grace: Duration, down: Duration) {
        let bin = binaries().join("kube-apiserver");
        let port = self.server.rsplit(':').next().unwrap_or_default();
        // The process itself, not its watchdog (`sh -c ... watchdog <program> <flags>`).
        let pattern = format!("^{} .*--secure-port={port}( |$)", bin.display());
        let running = || Command::new("pgrep").args(["-f", &pattern]).output().is_ok_and(|o| o.status.success());
        let stop = Command::new("pkill").args(["-TERM", "-f", &pattern]).status().expect("pkill");
        assert!(stop.success(), "no kube-apiserver matched {pattern}");
        let killed = Instant::now() + grace;
        while running() && Instant::now() < killed {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("pkill").args(["-KILL", "-f", &pattern]).status();
        while running() {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(down);
        let log = self.dir.path.join("kube-apiserver.log");
        spawn_watched(&bin, &self.apiserver_args, &log, None, "kill -TERM $child", "");
        self.wait_ready(&log, &self.dir.path.join("etcd.log"));
    }

    /// Polls `/readyz` with the admin identity; returns the server's git version.
    fn wait_ready(&self, apiserver_log: &Path, etcd_log: &Path) -> String {
        let d = &self.dir.path;
        let get = |path: &str| {
            text_output(
                Command::new("curl")
                    .args(["-sSf", "--max-time", "5", "--cacert"])
                    .arg(d.join("ca.crt"))
                    .arg("--cert")
                    .arg(d.join("admin.crt"))
                    .arg("--key")
                    .arg(d.join("admin.key"))
                    .arg(format!("{}{path}", self.server)),
            )
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = get("/readyz");
            if out.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-apiserver did not become ready in 90 s: {out:?}\nits log:\n{}\netcd's log:\n{}",
                    tail(apiserver_log),
                    tail(etcd_log)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let v: serde_json::Value = serde_json::from_str(&get("/version").expect("GET /version")).expect("version JSON");
        v["gitVersion"].as_str().unwrap_or_default().to_string()
    }

    /// Kubeconfig of the tests' own client (system:masters).
    pub fn admin_kubeconfig(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("admin.kubeconfig")).expect("admin kubeconfig")
    }

    /// Kubeconfig authenticating with a fresh client certificate for `user` in `groups`: an ordinary user whom
    /// only RBAC objects authorize (unless a group such as `system:masters` says otherwise).
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("user-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut subject = format!("/CN={user}");
        for g in groups {
            subject.push_str(&format!("/O={g}"));
        }
        issue(&self.dir.path, "ca", &name, &subject, "extendedKeyUsage=clientAuth");
        self.kubeconfig_from_files(user, &name)
    }

    fn kubeconfig_from_files(&self, user: &str, name: &str) -> String {
        let read = |f: String| std::fs::read(self.dir.path.join(f)).expect("certificate file");
        self.kubeconfig_with(
            user,
            &format!(
                "client-certificate-data: {}\n    client-key-data: {}",
                b64(&read(format!("{name}.crt"))),
                b64(&read(format!("{name}.key")))
            ),
        )
    }

    /// Kubeconfig authenticating with a bearer token (e.g. a ServiceAccount's, from [`Self::token_for`]).
    pub fn kubeconfig_with_token(&self, user: &str, token: &str) -> String {
        self.kubeconfig_with(user, &format!("token: {token}"))
    }

    /// Kubeconfig for this API server with the given user entry's credentials (YAML lines).
    fn kubeconfig_with(&self, user: &str, credentials: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    {credentials}\ncontexts:\n\
             - name: e2e\n  context:\n    cluster: e2e\n    user: {user}\ncurrent-context: e2e\n",
            server = self.server,
            ca = b64(self.ca_pem.as_bytes()),
        )
    }

    /// A token of ServiceAccount `namespace/name` from the TokenRequest API (the account must exist).
    pub async fn token_for(client: &kube::Client, namespace: &str, name: &str, audiences: &[&str]) -> String {
        let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client.clone(), namespace);
        let req: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(serde_json::json!({
            "spec": {"audiences": audiences, "expirationSeconds": 3600}
        }))
        .expect("TokenRequest");
        let tr = api
            .create_token_request(name, &Default::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"));
        tr.status.map(|s| s.token).unwrap_or_default()
    }

    /// A client from kubeconfig text.
    pub async fn client_for(kubeconfig: &str) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("client config");
        kube::Client::try_from(cfg).expect("client")
    }

    /// Every write the audit log holds, made by `user` (or by someone impersonating `user`).
    pub fn writes_by(&self, user: &str) -> Vec<AuditWrite> {
        self.requests_by(user).into_iter().filter(|r| r.verb != "get" && r.verb != "list").collect()
    }

    /// Every get and list of [`crate::OPERATOR_USER`] the audit log holds (other users' reads are not logged).
    pub fn operator_reads(&self) -> Vec<AuditWrite> {
        self.requests_by(crate::OPERATOR_USER).into_iter().filter(|r| r.verb == "get" || r.verb == "list").collect()
    }

    fn requests_by(&self, user: &str) -> Vec<AuditWrite> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        let quoted = format!("\"{user}\"");
        text.lines()
            // Only lines that name the user anywhere are parsed (a 10,000-resource bench's log is large).
            .filter(|l| l.contains(&quoted))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            // Whoever a request acted as: the impersonated user when there is one (the fault proxy's requests).
            .filter(|e| {
                let acting = if e["impersonatedUser"].is_object() { &e["impersonatedUser"] } else { &e["user"] };
                acting["username"] == user
            })
            .map(|e| {
                let o = &e["objectRef"];
                let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                AuditWrite {
                    user: user.to_string(),
                    verb: s(&e["verb"]),
                    resource: s(&o["resource"]),
                    subresource: s(&o["subresource"]),
                    namespace: s(&o["namespace"]),
                    name: s(&o["name"]),
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                    user_agent: s(&e["userAgent"]),
                    received: e["requestReceivedTimestamp"].as_str().and_then(|t| t.parse().ok()),
                    request_uri: s(&e["requestURI"]),
                }
            })
            .collect()
    }

    /// The directory of this control plane's certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
