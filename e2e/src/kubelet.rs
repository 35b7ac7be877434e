//! A test kubelet: the piece of a node that the control plane lacks here. It watches the Pods of one namespace
//! (those the Job controller creates for crmguard's CronJobs and Jobs), and for each new one does what a kubelet
//! does with a container, on this machine:
//! - volumes: ConfigMaps, Secrets and projected ServiceAccount tokens (TokenRequest, bound to the Pod, with the
//!   audience the volume names) are read from the API and written to files; emptyDirs are fresh directories;
//!   a PersistentVolumeClaim is the `hostPath`/`local` path of the PersistentVolume it names;
//! - environment: `value`, `valueFrom` (Secret and ConfigMap keys, the Pod's own fields) and `envFrom`;
//! - the container's command (the image's entrypoint when `command` is empty: [`image`]) runs in a private
//!   mount namespace (`unshare -m`) in which every volume is bind-mounted at its `mountPath` (read-only where
//!   the mount says so), a fresh file at `terminationMessagePath`, the root read-only when the container's
//!   `readOnlyRootFilesystem` says so, as the user and groups of its securityContext (else the image's user;
//!   `runAsNonRoot` enforced), with emptyDirs writable by all and projected tokens readable by that user and
//!   fsGroup only;
//! - status: Running with a start time, then Succeeded or Failed with the exit code and the termination message
//!   (or, with `FallbackToLogsOnError`, the log's tail), written through the Pod's status subresource.
//!
//! A mount point that this machine lacks (e.g. `/etc/crmguard`) is created as an empty directory, as the image
//! would have it; the container's /dev is a fresh tmpfs, so its termination-log file never touches the machine's.
//!
//! What it does not do: pull images (the crmguard image is this workspace's binary; the database tools are this
//! machine's), enforce resources, capabilities, seccomp or network policy, restart containers (crmguard's Pods use
//! `restartPolicy: Never`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Volume,
};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use tokio::sync::Mutex;

use crate::{TempDir, crmguard_bin};

/// What the test kubelet knows of an image: its entrypoint and the user it runs as (the Dockerfile's `USER`).
#[derive(Clone, Debug)]
pub struct Image {
    pub entrypoint: Vec<String>,
    pub user: i64,
}

/// The crmguard image is this workspace's binary (a copy at `crmguard`, where any user may run it); `busybox`
/// (a shell and core utilities, as root unless the pod says otherwise) is this machine's `/bin/sh`, for tests
/// that play someone running their own container. The test kubelet knows no other image.
pub fn image(image: &str, crmguard: &Path) -> Option<Image> {
    let repo = image.split('@').next().unwrap_or(image);
    let repo = repo.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(repo, |(r, _)| r);
    if repo == "busybox" || repo.ends_with("library/busybox") {
        return Some(Image { entrypoint: vec!["/bin/sh".into()], user: 0 });
    }
    repo.ends_with("crmguard/crmguard").then(|| Image { entrypoint: vec![crmguard.display().to_string()], user: 65532 })
}

/// A running test kubelet for one namespace; stops watching on drop (the containers it started end with the
/// test's runtime, which kills them).
#[derive(Debug)]
pub struct TestKubelet {
    task: tokio::task::JoinHandle<()>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Pods started (by uid) and the logs of their containers.
    started: BTreeMap<String, PathBuf>,
    dir: Option<TempDir>,
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestKubelet {
    /// Starts running the Pods of `namespace` as they appear.
    pub fn start(client: kube::Client, namespace: &str) -> TestKubelet {
        // Like a kubelet's /var/lib/kubelet: outside /tmp, which pods mount over with an emptyDir.
        let base = Path::new("/var/lib/crmguard-e2e-kubelet");
        let _ = std::fs::create_dir_all(base);
        let dir = TempDir::new_in(base, "pods");
        // The image's binary, where a non-root user may run it (a target directory under /root is not).
        let bin = dir.path.join("crmguard");
        let copied = std::fs::copy(crmguard_bin(), &bin)
            .and_then(|_| std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)));
        if let Err(e) = copied {
            panic!("cannot copy {} for the test kubelet: {e}", crmguard_bin().display());
        }
        let state = Arc::new(Mutex::new(State { dir: Some(dir), ..State::default() }));
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let st = state.clone();
        let task = tokio::spawn(async move {
            // With backoff, as kube-runtime's controllers watch: an API server that errors is not hammered.
            let mut events = std::pin::pin!(watcher(pods.clone(), watcher::Config::default()).default_backoff());
            while let Some(ev) = events.next().await {
                let list = match ev {
                    Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                for pod in list {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    if pod.metadata.deletion_timestamp.is_some() || !(phase.is_empty() || phase == "Pending") {
                        continue;
                    }
                    let root = {
                        let mut s = st.lock().await;
                        if s.started.contains_key(&uid) {
                            continue;
                        }
                        let root = s.dir.as_ref().map(|d| d.path.join(&uid)).unwrap_or_default();
                        s.started.insert(uid.clone(), root.join("log"));
                        root
                    };
                    let client = client.clone();
                    let bin = root.parent().map(|p| p.join("crmguard")).unwrap_or_default();
                    tokio::spawn(async move {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        if let Err(e) = run_pod(&client, &pod, &root, &bin).await {
                            // As a kubelet: a container that cannot be created leaves the Pod Pending, waiting
                            // with the reason (`CreateContainerConfigError: ...`, `ErrImagePull: ...`).
                            let pods: Api<Pod> =
                                Api::namespaced(client.clone(), pod.metadata.namespace.as_deref().unwrap_or_default());
                            let (reason, message) = e.split_once(": ").unwrap_or(("CreateContainerError", &e));
                            let waiting = Outcome::Waiting { reason: reason.to_string(), message: message.to_string() };
                            let _ = set_status(&pods, &name, &pod, waiting).await;
                        }
                    });
                }
            }
        });
        TestKubelet { task, state }
    }

    /// The combined stdout and stderr of every container started so far, for a failed test's message.
    pub async fn logs(&self) -> String {
        let s = self.state.lock().await;
        s.started.values().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect::<Vec<_>>().join("\n---\n")
    }
}

enum Outcome {
    Waiting { reason: String, message: String },
    Running,
    Finished { code: i32, message: String },
}

async fn set_status(pods: &Api<Pod>, name: &str, pod: &Pod, outcome: Outcome) -> Result<(), kube::Error> {
    let container = pod.spec.as_ref().and_then(|s| s.containers.first()).cloned().unwrap_or_default();
    let now = jiff::Timestamp::now().to_string();
    let started = pod.status.as_ref().and_then(|s| s.start_time.clone()).map_or(now.clone(), |t| t.0.to_string());
    let (phase, state, ready) = match outcome {
        Outcome::Waiting { reason, message } => {
            ("Pending", json!({"waiting": {"reason": reason, "message": message}}), false)
        }
        Outcome::Running => ("Running", json!({"running": {"startedAt": now}}), true),
        Outcome::Finished { code, message } => (
            if code == 0 { "Succeeded" } else { "Failed" },
            json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                "message": message, "startedAt": started, "finishedAt": now}}),
            false,
        ),
    };
    let status = json!({"status": {
        "phase": phase,
        "startTime": started,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
        "containerStatuses": [{"name": container.name, "image": container.image.unwrap_or_default(), "imageID": "",
            "ready": ready, "restartCount": 0, "started": ready, "state": state}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.map(drop)
}

/// Writes the files of one volume into `dir`.
async fn materialize(client: &kube::Client, pod: &Pod, v: &Volume, dir: &Path, owner: Owner) -> Result<(), String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), String> {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(p, bytes).map_err(|e| e.to_string())
    };
    if let Some(cm) = &v.config_map {
        write_items(&config_map_files(client, ns, &cm.name).await?, cm.items.as_deref(), write)?;
    } else if let Some(sec) = &v.secret {
        let name = sec.secret_name.clone().unwrap_or_default();
        write_items(&secret_files(client, ns, &name).await?, sec.items.as_deref(), write)?;
    } else if let Some(p) = &v.projected {
        for src in p.sources.iter().flatten() {
            if let Some(t) = &src.service_account_token {
                let token = bound_token(client, pod, t.audience.as_deref(), t.expiration_seconds).await?;
                write(&t.path, token.as_bytes())?;
                // Readable by the container's user and fsGroup only, as a kubelet leaves a projected token.
                let file = dir.join(&t.path);
                std::os::unix::fs::chown(&file, owner.uid, owner.fs_group).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                    .map_err(|e| e.to_string())?;
            } else if let Some(cm) = &src.config_map {
                write_items(&config_map_files(client, ns, &cm.name).await?, cm.items.as_deref(), write)?;
            } else if let Some(sec) = &src.secret {
                write_items(&secret_files(client, ns, &sec.name).await?, sec.items.as_deref(), write)?;
            } else if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    let field = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or_default();
                    let value = match field {
                        "metadata.namespace" => ns.to_string(),
                        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                        other => return Err(format!("downwardAPI {other:?} is not implemented by the test kubelet")),
                    };
                    write(&item.path, value.as_bytes())?;
                }
            }
        }
    } else if v.empty_dir.is_some() {
        // A fresh directory that every user of the pod may write, as a kubelet makes it.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(|e| e.to_string())?;
    } else if let Some(claim) = &v.persistent_volume_claim {
        let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .get(&claim.claim_name)
            .await
            .map_err(|e| e.to_string())?;
        let pv_name = pvc.spec.and_then(|s| s.volume_name).ok_or("the PersistentVolumeClaim is not bound")?;
        let pv = Api::<PersistentVolume>::all(client.clone()).get(&pv_name).await.map_err(|e| e.to_string())?;
        let spec = pv.spec.unwrap_or_default();
        let path = spec
            .host_path
            .map(|h| h.path)
            .or(spec.local.map(|l| l.path))
            .ok_or("the PersistentVolume has no hostPath or local path")?;
        std::fs::remove_dir(dir).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(path, dir).map_err(|e| e.to_string())?;
    } else {
        return Err(format!("volume {} has a kind the test kubelet does not implement", v.name));
    }
    Ok(())
}

/// Who the container runs as, for the files of its volumes.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: Option<u32>,
    fs_group: Option<u32>,
}

/// The files of a ConfigMap: its keys with their values (`data` and `binaryData`).
async fn config_map_files(client: &kube::Client, ns: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let m = Api::<ConfigMap>::namespaced(client.clone(), ns).get(name).await.map_err(|e| e.to_string())?;
    let mut files: BTreeMap<String, Vec<u8>> =
        m.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
    files.extend(m.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
    Ok(files)
}

/// The files of a Secret: its keys with their decoded values.
async fn secret_files(client: &kube::Client, ns: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let m = Api::<Secret>::namespaced(client.clone(), ns).get(name).await.map_err(|e| e.to_string())?;
    Ok(m.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// Writes every key as a file of its name, or only the listed items at their paths.
fn write_items<W>(files: &BTreeMap<String, Vec<u8>>, listed: Option<&[KeyToPath]>, write: W) -> Result<(), String>
where
    W: Fn(&str, &[u8]) -> Result<(), String>,
{
    match listed {
        Some(items) => {
            for i in items.iter().filter(|i| files.contains_key(&i.key)) {
                write(&i.path, &files[&i.key])?;
            }
        }
        None => {
            for (k, v) in files {
                write(k, v)?;
            }
        }
    }
    Ok(())
}

/// A ServiceAccount token bound to the Pod, as a kubelet requests it for a projected volume.
async fn bound_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<&str>,
    secs: Option<i64>,
) -> Result<String, String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
        "expirationSeconds": secs.unwrap_or(3600),
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid},
    }}))
    .map_err(|e| e.to_string())?;
    let tr =
        api.create_token_request(&sa, &Default::default(), &req).await.map_err(|e| format!("TokenRequest: {e}"))?;
    Ok(tr.status.map(|s| s.token).unwrap_or_default())
}

/// The container's environment, resolved as a kubelet does.
async fn environment(client: &kube::Client, pod: &Pod, c: &Container) -> Result<BTreeMap<String, String>, String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            let s = secrets.get_opt(&r.name).await.map_err(|e| e.to_string())?;
            match s {
                Some(s) => env.extend(
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned())),
                ),
                None if r.optional == Some(true) => {}
                None => return Err(format!("Secret {} not found (envFrom)", r.name)),
            }
        }
        if let Some(r) = &from.config_map_ref {
            let m = cms.get_opt(&r.name).await.map_err(|e| e.to_string())?;
            match m {
                Some(m) => env.extend(m.data.unwrap_or_default().into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
                None if r.optional == Some(true) => {}
                None => return Err(format!("ConfigMap {} not found (envFrom)", r.name)),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(v.clone())
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.secret_key_ref {
                let s = secrets.get_opt(&r.name).await.map_err(|e| e.to_string())?;
                match s.and_then(|s| s.data?.get(&r.key).map(|v| String::from_utf8_lossy(&v.0).into_owned())) {
                    Some(v) => Some(v),
                    None if r.optional == Some(true) => None,
                    None => {
                        return Err(format!("CreateContainerConfigError: Secret key {}/{} not found", r.name, r.key));
                    }
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let m = cms.get_opt(&r.name).await.map_err(|e| e.to_string())?;
                match m.and_then(|m| m.data?.get(&r.key).cloned()) {
                    Some(v) => Some(v),
                    None if r.optional == Some(true) => None,
                    None => {
                        return Err(format!(
                            "CreateContainerConfigError: ConfigMap key {}/{} not found",
                            r.name, r.key
                        ));
                    }
                }
            } else if let Some(f) = &from.field_ref {
                let m = &pod.metadata;
                Some(match f.field_path.as_str() {
                    "metadata.name" => m.name.clone().unwrap_or_default(),
                    "metadata.namespace" => ns.to_string(),
                    "metadata.uid" => m.uid.clone().unwrap_or_default(),
                    "spec.serviceAccountName" => {
                        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
                    }
                    "spec.nodeName" => "test-kubelet".into(),
                    "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                    other => return Err(format!("fieldRef {other} is not implemented by the test kubelet")),
                })
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.insert(e.name.clone(), v);
        }
    }
    Ok(env)
}

/// Shell-quotes one word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn run_pod(client: &kube::Client, pod: &Pod, root: &Path, crmguard: &Path) -> Result<(), String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    let c = spec.containers.first().cloned().ok_or("a Pod without containers")?;
    if spec.containers.len() > 1 || spec.init_containers.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err("the test kubelet runs Pods of exactly one container".into());
    }
    let img = image(c.image.as_deref().unwrap_or_default(), crmguard)
        .ok_or_else(|| format!("ErrImagePull: the test kubelet has no image {:?}", c.image))?;
    // The user: the container's securityContext, else the pod's, else the image's; runAsNonRoot is enforced.
    let (psc, csc) =
        (spec.security_context.clone().unwrap_or_default(), c.security_context.clone().unwrap_or_default());
    let uid = csc.run_as_user.or(psc.run_as_user).unwrap_or(img.user);
    let gid = csc.run_as_group.or(psc.run_as_group).unwrap_or(uid);
    if csc.run_as_non_root.or(psc.run_as_non_root) == Some(true) && uid == 0 {
        return Err("CreateContainerConfigError: container has runAsNonRoot and would run as root".into());
    }
    let read_only_root = csc.read_only_root_filesystem == Some(true);
    let as_u32 = |v: i64| u32::try_from(v).map_err(|_| format!("user or group {v} is out of range"));
    let owner = Owner { uid: Some(as_u32(uid)?), fs_group: psc.fs_group.map(as_u32).transpose()? };
    std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
    let mut volumes = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let dir = root.join("volumes").join(&v.name);
        materialize(client, pod, v, &dir, owner).await?;
        volumes.insert(v.name.clone(), dir);
    }
    let env = environment(client, pod, &c).await?;
    let mut argv = match &c.command {
        Some(cmd) if !cmd.is_empty() => cmd.clone(),
        _ => img.entrypoint.clone(),
    };
    argv.extend(c.args.clone().unwrap_or_default());

    // The mount namespace: each volume at its mountPath, and the termination message file.
    let term_path = c.termination_message_path.clone().unwrap_or_else(|| "/dev/termination-log".into());
    let term_file = root.join("termination-log");
    std::fs::write(&term_file, b"").map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(&term_file, owner.uid, owner.fs_group).map_err(|e| e.to_string())?;
    // Mount points first (while the root may still be written), then the mounts.
    let (mut prepare, mut mount) = (String::new(), String::new());
    let mut bind = |src: &Path, dst: &str, ro: bool, file: bool| {
        let make = if file {
            format!("[ -e {d} ] || {{ mkdir -p \"$(dirname {d})\"; : > {d}; }}\n", d = quote(dst))
        } else {
            format!("mkdir -p {}\n", quote(dst))
        };
        prepare.push_str(&make);
        mount.push_str(&format!("mount --bind {} {}\n", quote(&src.display().to_string()), quote(dst)));
        if ro {
            mount.push_str(&format!("mount -o remount,bind,ro {}\n", quote(dst)));
        }
    };
    // Parents before children, as a container runtime mounts them.
    let mut mounts: Vec<_> = c.volume_mounts.iter().flatten().collect();
    mounts.sort_by_key(|m| m.mount_path.matches('/').count());
    for m in mounts {
        let mut src = volumes.get(&m.name).cloned().ok_or_else(|| format!("volumeMount {} names no volume", m.name))?;
        if let Some(sub) = &m.sub_path {
            src = std::fs::canonicalize(&src).map_err(|e| e.to_string())?.join(sub);
        }
        let src = std::fs::canonicalize(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        bind(&src, &m.mount_path, m.read_only == Some(true), src.is_file());
    }
    // A fresh /dev, as a container runtime gives each container: the usual devices from the machine's and the
    // termination message file, so nothing is created in the machine's /dev.
    let host_dev = root.join("host-dev");
    std::fs::create_dir_all(&host_dev).map_err(|e| e.to_string())?;
    let mut script = format!(
        "set -e\nmount --bind /dev {hd}\nmount -t tmpfs -o mode=755,size=1m tmpfs /dev\n\
         for d in null zero full random urandom tty; do : > /dev/$d; mount --bind {hd}/$d /dev/$d; done\n\
         ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; \
         ln -s /proc/self/fd/2 /dev/stderr\n",
        hd = quote(&host_dev.display().to_string())
    );
    bind(&term_file, &term_path, false, true);
    script.push_str(&prepare);
    script.push_str(&mount);
    if read_only_root {
        // Only this namespace's view of the root mount turns read-only (the volumes, mounted on it, stay as
        // they are); the machine's stays as it is.
        script.push_str("mount -o remount,bind,ro /\n");
    }
    let groups = owner.fs_group.map(|g| format!("--groups={g}")).unwrap_or_else(|| "--clear-groups".into());
    script.push_str(&format!("exec setpriv --reuid={uid} --regid={gid} {groups} -- \"$@\"\n"));

    let log = root.join("log");
    let logfile = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let pg_bin = crate::services::pg_bin_dir();
    let path = format!("{}:{}", pg_bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", &script, "container"])
        .args(&argv)
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/tmp")
        .env("HOSTNAME", &name)
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(logfile.try_clone().map_err(|e| e.to_string())?)
        .stderr(logfile)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the container: {e}"))?;
    set_status(&pods, &name, pod, Outcome::Running).await.map_err(|e| e.to_string())?;
    let status = child.wait().await.map_err(|e| e.to_string())?;
    let code = status.code().unwrap_or(137);
    let mut message = std::fs::read_to_string(&term_file).unwrap_or_default();
    if message.is_empty() && code != 0 && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError") {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        message = lines[lines.len().saturating_sub(80)..].join("\n");
    }
    // The kubelet keeps at most 4096 bytes of the message (the tail, for logs).
    if message.len() > 4096 {
        let mut cut = message.len() - 4096;
        while !message.is_char_boundary(cut) {
            cut += 1;
        }
        message = message[cut..].to_string();
    }
    let pod = pods.get(&name).await.map_err(|e| e.to_string())?;
    set_status(&pods, &name, &pod, Outcome::Finished { code, message }).await.map_err(|e| e.to_string())
}
