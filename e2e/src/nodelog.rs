//! The log half of a node: a Node object whose kubelet endpoint is a TLS server on this machine that serves
//! containers' logs as a kubelet does (`GET /containerLogs/<namespace>/<pod>/<container>` with `sinceTime`,
//! `timestamps`, `limitBytes` and `previous`), so that `kubectl logs` and the operator's `pods/log` reads go through the real API
//! server to it. A container's log is what a process on this machine writes to a file (e.g. a real PostgreSQL's
//! stderr): a tailer reads the file as it grows and stamps each line with the time it was read, as a container
//! runtime stamps what a container writes (CRI log format).
//!
//! The API server reaches a kubelet at the Node's address and `daemonEndpoints.kubeletEndpoint.Port` over HTTPS; the
//! test control plane sets no `--kubelet-certificate-authority`, so a self-signed certificate serves.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Seek as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::TempDir;

/// A container's log: (time read, line).
type Log = Arc<Mutex<Vec<(Timestamp, String)>>>;
/// The logs of previous containers, by `<namespace>/<pod>/<container>`.
type Previous = Arc<Mutex<BTreeMap<String, Vec<(Timestamp, String)>>>>;

/// A Node that serves container logs. The tailers and the server stop with the process.
#[derive(Debug)]
pub struct LogNode {
    pub name: String,
    logs: Arc<Mutex<BTreeMap<String, Log>>>,
    /// The previous container's log, after a [`LogNode::restart`].
    previous: Previous,
    _dir: TempDir,
}

impl LogNode {
    /// Registers Node `name` (Ready, at 127.0.0.1) with a log server of its own.
    pub async fn start(client: &kube::Client, name: &str) -> LogNode {
        let dir = TempDir::new("node");
        let d = &dir.path;
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(d).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.der",
            "-outform",
            "DER",
            "-subj",
            "/CN=test-node",
            "-days",
            "30",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]);
        run(&["pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der"]);
        let cert = rustls::pki_types::CertificateDer::from(std::fs::read(d.join("cert.der")).expect("cert"));
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            std::fs::read(d.join("key.der")).expect("key"),
        ));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("TLS config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let logs: Arc<Mutex<BTreeMap<String, Log>>> = Arc::default();
        let previous: Previous = Arc::default();
        let (served, served_previous) = (logs.clone(), previous.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (config, logs, previous) = (config.clone(), served.clone(), served_previous.clone());
                std::thread::spawn(move || serve(conn, config, &logs, &previous));
            }
        });
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).expect("node");
        nodes.create(&PostParams::default(), &node).await.expect("create the Node");
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test node",
                            "lastHeartbeatTime": Timestamp::now().to_string(), "lastTransitionTime": Timestamp::now().to_string()}],
        }});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("Node status");
        LogNode { name: name.to_string(), logs, previous, _dir: dir }
    }

    /// Creates a running Pod on this node with one container whose log is the file `log` (read from its current
    /// end: what the process writes from now on).
    pub async fn pod(
        &self,
        client: &kube::Client,
        ns: &str,
        pod: &str,
        labels: &[(&str, &str)],
        container: &str,
        log: &Path,
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod, "namespace": ns, "labels": labels},
            "spec": {"nodeName": self.name, "containers": [{"name": container, "image": "postgres:15"}]},
        }))
        .expect("pod");
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(&PostParams::default(), &p).await.expect("create the Pod");
        running(&pods, pod, container).await;
        let lines: Log = Arc::default();
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(format!("{ns}/{pod}/{container}"), lines.clone());
        tail(log.to_path_buf(), lines);
    }

    /// Whether the container's current log holds a line containing `needle` (the tailer stamps lines as it reads
    /// them).
    pub fn holds(&self, ns: &str, pod: &str, container: &str, needle: &str) -> bool {
        let key = format!("{ns}/{pod}/{container}");
        let Some(log) = self.logs.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned() else {
            return false;
        };
        log.lock().unwrap_or_else(PoisonError::into_inner).iter().any(|(_, l)| l.contains(needle))
    }

    /// The container restarts, as a kubelet shows it: what its log held becomes the previous container's log
    /// (`previous=true`; the one before is gone), what the process writes from now on is the new container's, and
    /// the pod's status says `restartCount` + 1 with a new start time.
    pub async fn restart(&self, client: &kube::Client, ns: &str, pod: &str, container: &str) {
        let key = format!("{ns}/{pod}/{container}");
        let log =
            self.logs.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned().expect("a container's log");
        let old = std::mem::take(&mut *log.lock().unwrap_or_else(PoisonError::into_inner));
        self.previous.lock().unwrap_or_else(PoisonError::into_inner).insert(key, old);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let p = pods.get(pod).await.expect("the Pod");
        let count = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().find(|c| c.name == container))
            .map_or(0, |c| c.restart_count);
        let now = Timestamp::now().to_string();
        let status = json!({"status": {"containerStatuses": [{"name": container, "image": "postgres:15", "imageID": "",
            "ready": true, "restartCount": count + 1, "started": true, "state": {"running": {"startedAt": now}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": now}}}]}});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await.expect("Pod status");
    }
}

impl LogNode {
    /// The pod is deleted and created again under its name, as a StatefulSet's controller does: a new UID, restart
    /// count 0, and a new log (the old pod's log goes with it; what the process writes from now on is the new pod's).
    pub async fn replace(&self, client: &kube::Client, ns: &str, pod: &str, container: &str) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let old = pods.get(pod).await.expect("the Pod");
        // Without a kubelet to confirm it, a pod bound to a node goes only when deleted without a grace period.
        let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..kube::api::DeleteParams::default() };
        pods.delete(pod, &dp).await.expect("delete the Pod");
        for _ in 0..300 {
            if pods.get_opt(pod).await.expect("read the Pod").is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key = format!("{ns}/{pod}/{container}");
        if let Some(log) = self.logs.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            log.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        self.previous.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod, "namespace": ns, "labels": old.metadata.labels},
            "spec": old.spec,
        }))
        .expect("pod");
        let made = pods.create(&PostParams::default(), &p).await.expect("create the Pod again");
        assert_ne!(made.metadata.uid, old.metadata.uid, "a new pod");
        running(&pods, pod, container).await;
    }
}

/// The pod's status as a kubelet reports a pod just started: Running and Ready, its container started, no restart.
async fn running(pods: &Api<Pod>, pod: &str, container: &str) {
    let now = Timestamp::now().to_string();
    let status = json!({"status": {"phase": "Running", "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [{"name": container, "image": "postgres:15", "imageID": "", "ready": true,
            "restartCount": 0, "started": true, "state": {"running": {"startedAt": now}}}]}});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await.expect("Pod status");
}

/// Follows `path` from its current end, stamping each complete line as it is read.
fn tail(path: PathBuf, lines: Log) {
    std::thread::spawn(move || {
        let Ok(mut file) = std::fs::File::open(&path) else { return };
        let mut at = file.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
        let mut partial = Vec::new();
        loop {
            let mut buf = Vec::new();
            if file.seek(std::io::SeekFrom::Start(at)).is_ok() && file.read_to_end(&mut buf).is_ok() && !buf.is_empty()
            {
                at += buf.len() as u64;
                partial.extend(buf);
                let now = Timestamp::now();
                let mut l = lines.lock().unwrap_or_else(PoisonError::into_inner);
                while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=nl).collect();
                    l.push((now, String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// One request: `GET /containerLogs/<ns>/<pod>/<container>?...`.
fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    logs: &Mutex<BTreeMap<String, Log>>,
    previous: &Mutex<BTreeMap<String, Vec<(Timestamp, String)>>>,
) {
    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = String::new();
    {
        let mut reader = std::io::BufReader::new(&mut tls);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push_str(&line),
            }
        }
    }
    let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let key = path.strip_prefix("/containerLogs/").unwrap_or_default();
    let previous_wanted = params.get("previous").is_some_and(|v| v == "true");
    let log = if previous_wanted {
        previous.lock().unwrap_or_else(PoisonError::into_inner).get(key).map(|l| Arc::new(Mutex::new(l.clone())))
    } else {
        logs.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    };
    let (status, body) = match log {
        // The kubelet's answer when no container of that name terminated.
        None if previous_wanted => ("400 Bad Request", format!("previous terminated container {key:?} not found")),
        None => ("404 Not Found", format!("no log of container {key}")),
        Some(log) => {
            let since: Option<Timestamp> = params.get("sinceTime").and_then(|t| t.parse().ok());
            let stamped = params.get("timestamps").is_some_and(|v| v == "true");
            let limit = params.get("limitBytes").and_then(|v| v.parse::<usize>().ok()).unwrap_or(usize::MAX);
            let mut body = String::new();
            for (t, line) in log.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                if since.is_some_and(|s| *t < s) {
                    continue;
                }
                if stamped {
                    body.push_str(&format!("{t} "));
                }
                body.push_str(line);
                body.push('\n');
                if body.len() >= limit {
                    // As a kubelet, cut at the limit even inside a character (the reader must cope).
                    let mut bytes = body.into_bytes();
                    bytes.truncate(limit);
                    body = String::from_utf8_lossy(&bytes).into_owned();
                    break;
                }
            }
            ("200 OK", body)
        }
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(reply.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
