//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz` (caches
//! synced and, with leader election, the lease outcome known), and `POST /webhook/quarantine/<ns>/<guard>`.

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
    client: Option<kube::Client>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            let health = health.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let health = health.clone();
                    let client = client.clone();
                    async move {
                        if req.uri().path().starts_with("/webhook/") {
                            return Ok::<_, Infallible>(webhook(req, client).await);
                        }
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

async fn webhook(req: Request<hyper::body::Incoming>, client: Option<kube::Client>) -> Response<Full<Bytes>> {
    use http_body_util::{BodyExt, Limited};
    let json = |code: u16, v: serde_json::Value| {
        reply(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/json",
            v.to_string(),
        )
    };
    let Some(client) = client else { return json(404, serde_json::json!({"error": "webhook disabled"})) };
    if req.method() != hyper::Method::POST {
        return json(405, serde_json::json!({"error": "use POST"}));
    }
    let path = req.uri().path().to_string();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match Limited::new(req.into_body(), super::webhook::MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(413, serde_json::json!({"error": "body too large or unreadable"})),
    };
    let (code, v) = super::webhook::handle(&client, &path, auth.as_deref(), &body, jiff::Timestamp::now()).await;
    json(code, v)
}
