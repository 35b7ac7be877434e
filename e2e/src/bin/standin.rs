//! Runs the API-server stand-in on 127.0.0.1 and prints a kubeconfig for it, so that kubectl, Helm or a local
//! `crmguard run` can be pointed at it by hand: `cargo run -p e2e --bin standin > /tmp/standin.kubeconfig`.
//! Stops on Ctrl-C. Installs crmguard's CRDs unless `--no-crds` is given.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a developer tool

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = e2e::apiserver::ApiServer::start().await.expect("start the stand-in");
    if !std::env::args().any(|a| a == "--no-crds") {
        let crds: Api<CustomResourceDefinition> = Api::all(server.client());
        for crd in crmguard::api::crds() {
            crds.create(&PostParams::default(), &crd).await.expect("install CRD");
        }
    }
    print!("{}", server.kubeconfig());
    eprintln!("stand-in listening on {}; Ctrl-C stops it", server.url());
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
}
