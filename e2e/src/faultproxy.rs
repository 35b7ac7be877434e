//! Faults in front of the real API server: a plain-HTTP proxy on loopback that forwards every request to the
//! control plane (as the admin, impersonating the identity it was started for) and, on demand, fails the next
//! writes with 500, delays every request, or ends every open watch at once. An operator pointed at
//! [`FaultProxy::kubeconfig`] sees exactly what a flaky API server would show it. [`FaultProxy::hold_requests`]
//! cuts the path to the server only (a one-way partition): responses already streaming (watches) go on, new
//! requests wait and are delivered when [`FaultProxy::release_requests`] heals it, unless their sender gave up
//! (closed the connection) meanwhile.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use tokio::sync::{Mutex, watch};

use crate::ControlPlane;

#[derive(Debug, Default)]
struct Faults {
    /// Writes still to fail, and the resource path segment they must touch (None: any).
    fail_writes: Mutex<(u32, Option<String>)>,
    latency_ms: AtomicU64,
    /// Bumped to end every open streaming response.
    generation: AtomicU64,
    /// Requests that came while requests were held and are neither answered nor given up by their sender yet.
    held: AtomicU64,
}

/// Counts one held request in [`Faults::held`] until it is answered or dropped.
struct Held(Arc<Faults>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running proxy; stops on drop.
#[derive(Debug)]
pub struct FaultProxy {
    pub url: String,
    faults: Arc<Faults>,
    drop_watches: watch::Sender<u64>,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Out = UnsyncBoxBody<Bytes, std::io::Error>;

fn status(code: u16, reason: &str, message: &str) -> http::Response<Out> {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
        "reason": reason, "code": code});
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).map_err(|e: Infallible| match e {}).boxed_unsync())
        .unwrap_or_else(|_| {
            http::Response::new(Full::new(Bytes::new()).map_err(|e: Infallible| match e {}).boxed_unsync())
        })
}

impl FaultProxy {
    /// Starts a proxy that forwards as `user` in `groups` (impersonated by the admin).
    pub async fn start(cp: &ControlPlane, user: &str, groups: &[&str]) -> FaultProxy {
        let mut cfg = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&cp.admin_kubeconfig()).expect("kubeconfig"),
            &Default::default(),
        )
        .await
        .expect("config");
        // Watches stay open as long as the API server keeps them.
        cfg.read_timeout = None;
        let upstream = kube::Client::try_from(cfg).expect("client");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let faults = Arc::new(Faults::default());
        let (drop_watches, drop_rx) = watch::channel(0u64);
        let (hold, hold_rx) = watch::channel(false);
        let (f, user, groups) = (faults.clone(), user.to_string(), groups.iter().map(|g| g.to_string()).collect());
        let identity: Arc<(String, Vec<String>)> = Arc::new((user, groups));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (upstream, f, rx, identity) = (upstream.clone(), f.clone(), drop_rx.clone(), identity.clone());
                let held = hold_rx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (upstream, f, rx, identity) = (upstream.clone(), f.clone(), rx.clone(), identity.clone());
                        let mut held = held.clone();
                        async move {
                            // Dropped with the connection when the sender closes it: a held request then never
                            // reaches the server.
                            let counted = (*held.borrow()).then(|| {
                                f.held.fetch_add(1, Ordering::SeqCst);
                                Held(f.clone())
                            });
                            let _ = held.wait_for(|h| !h).await;
                            let answer = forward(upstream, f, rx, &identity, req).await;
                            drop(counted);
                            Ok::<_, Infallible>(answer)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultProxy { url, faults, drop_watches, hold, task }
    }

    /// A kubeconfig that reaches the API server through this proxy (no credentials of its own: the proxy
    /// supplies the identity).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {}\nusers:\n- name: proxy\n  \
             user: {{}}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\ncurrent-context: proxy\n",
            self.url
        )
    }

    /// The next `n` write requests (to a path containing `/<resource>` when given) fail with 500.
    pub async fn fail_next_writes(&self, n: u32, resource: Option<&str>) {
        *self.faults.fail_writes.lock().await = (n, resource.map(|r| format!("/{r}")));
    }

    /// Every request waits this long before it is forwarded.
    pub fn set_latency_ms(&self, ms: u64) {
        self.faults.latency_ms.store(ms, Ordering::Relaxed);
    }

    /// New requests wait (a one-way partition towards the API server) until [`FaultProxy::release_requests`].
    pub fn hold_requests(&self) {
        let _ = self.hold.send(true);
    }

    /// Delivers the held requests whose senders still wait, and lets new ones through.
    pub fn release_requests(&self) {
        let _ = self.hold.send(false);
    }

    /// How many requests that came while requests were held are still on their way: neither answered by the API
    /// server nor given up by their sender.
    pub fn held_in_transit(&self) -> u64 {
        self.faults.held.load(Ordering::SeqCst)
    }

    /// Ends every watch (and any other streaming response) that is open now.
    pub fn drop_watches(&self) {
        let g = self.faults.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.drop_watches.send(g);
    }
}

async fn forward(
    upstream: kube::Client,
    f: Arc<Faults>,
    mut drop_rx: watch::Receiver<u64>,
    identity: &(String, Vec<String>),
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Out> {
    let latency = f.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let write = !matches!(*req.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
    if write {
        let mut fail = f.fail_writes.lock().await;
        if fail.0 > 0 && fail.1.as_ref().is_none_or(|r| req.uri().path().contains(r.as_str())) {
            fail.0 -= 1;
            return status(500, "InternalError", "Internal error occurred: injected by the e2e fault proxy");
        }
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return status(400, "BadRequest", "the request body could not be read");
    };
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()));
    for (k, v) in &parts.headers {
        if k != http::header::HOST && k != http::header::AUTHORIZATION && !k.as_str().starts_with("impersonate-") {
            out = out.header(k, v);
        }
    }
    out = out.header("Impersonate-User", identity.0.as_str());
    for g in &identity.1 {
        out = out.header("Impersonate-Group", g.as_str());
    }
    let Ok(out) = out.body(kube::client::Body::from(body)) else {
        return status(400, "BadRequest", "the request could not be rebuilt");
    };
    let seen = *drop_rx.borrow_and_update();
    match upstream.send(out).await {
        Err(e) => {
            status(502, "ServiceUnavailable", &format!("the e2e fault proxy could not reach the API server: {e}"))
        }
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let ended = async move {
                while drop_rx.changed().await.is_ok() {
                    if *drop_rx.borrow() != seen {
                        return;
                    }
                }
            };
            let stream = body
                .into_data_stream()
                .take_until(Box::pin(ended))
                .map(|r| r.map(Frame::data).map_err(std::io::Error::other));
            http::Response::from_parts(parts, BodyExt::boxed_unsync(StreamBody::new(stream)))
        }
    }
}
