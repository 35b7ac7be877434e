//! Starts the test bed's real control plane (etcd, kube-apiserver, kube-controller-manager of the version in
//! e2e/kube/newest, or `CRMGUARD_KUBE=oldest`) on 127.0.0.1 and prints an admin kubeconfig for it, so that
//! kubectl, Helm or a local `crmguard run` can be pointed at it by hand:
//!   cargo run -p e2e --bin controlplane > /tmp/kubeconfig && KUBECONFIG=/tmp/kubeconfig kubectl get ns
//! Installs crmguard's CRDs unless `--no-crds` is given. Ctrl-C or SIGTERM stops it and everything it started.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a developer tool

use std::io::Write as _;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cp = e2e::ControlPlane::shared();
    if !std::env::args().any(|a| a == "--no-crds") {
        let client = e2e::ControlPlane::client_for(&cp.admin_kubeconfig()).await;
        e2e::install_crds(&client).await;
    }
    print!("{}", cp.admin_kubeconfig());
    std::io::stdout().flush().expect("stdout");
    eprintln!("Kubernetes {} listening on {}; logs in {}; Ctrl-C stops it", cp.version, cp.server, cp.dir().display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
