//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz` (caches
//! synced and, with leader election, the lease outcome known).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use super::metrics::Metrics;

/// Readiness shared with the controllers.
#[derive(Debug, Default)]
pub struct Health {
    pub ready: AtomicBool,
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

/// Serves until the task is dropped. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let health = health.clone();
                    async move {
                        Ok::<_, Infallible>(match req.uri().path() {
                            "/metrics" => {
                                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
                            }
                            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                            "/readyz" if health.ready.load(Ordering::Relaxed) => {
                                reply(StatusCode::OK, "text/plain", "ready\n".into())
                            }
                            "/readyz" => {
                                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "caches not synced yet\n".into())
                            }
                            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                        })
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    Ok((bound, task))
}
