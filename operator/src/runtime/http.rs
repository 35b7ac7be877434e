//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz` (caches
//! synced and, with leader election, the lease outcome known), and `POST /webhook/quarantine/<ns>/<guard>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use crate::metrics::Metrics;

/// Readiness shared with the controllers.
#[derive(Debug, Default)]
pub struct Health {
    /// Every controller's cache has synced (set once this replica leads, or at start without leader election).
    pub ready: AtomicBool,
    /// This replica waits for leadership (a healthy standby).
    pub standby: AtomicBool,
    /// When the API server last answered (Unix seconds; 0: never), from [`super::watches::watch_contact`].
    pub last_contact: std::sync::atomic::AtomicI64,
}

/// Without an answer for this long, the replica is not ready (three missed probes and some slack).
pub const CONTACT_STALE_SECONDS: i64 = 20;

impl Health {
    /// `/readyz`: the caches are synced (or this replica is a standby) and the API server answered lately.
    pub fn readiness(&self, now: i64) -> Result<&'static str, String> {
        let last = self.last_contact.load(Ordering::Relaxed);
        if last == 0 || now - last > CONTACT_STALE_SECONDS {
            return Err(if last == 0 {
                "the API server has not answered yet\n".to_string()
            } else {
                format!("no answer from the API server for {}s\n", now - last)
            });
        }
        if self.ready.load(Ordering::Relaxed) {
            Ok("ready\n")
        } else if self.standby.load(Ordering::Relaxed) {
            Ok("standby: waiting for leadership\n")
        } else {
            Err("caches not synced yet\n".to_string())
        }
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

/// The quarantine webhook, once this replica may write (it is the leader and its audit trail runs); until then
/// calls are answered 503 and Alertmanager retries.
pub type WebhookSlot = Arc<std::sync::OnceLock<super::webhook::Webhook>>;

/// Calls per source address: a burst of [`RATE_BURST`], refilled at [`RATE_PER_MINUTE`] a minute.
pub const RATE_BURST: f64 = 20.0;
/// See [`RATE_BURST`].
pub const RATE_PER_MINUTE: f64 = 20.0;

/// A token bucket per caller address, bounded in the callers it remembers.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

impl RateLimiter {
    /// Whether a call from `ip` at `now` may proceed; else the seconds until it may.
    pub fn check(&self, ip: std::net::IpAddr, now: std::time::Instant) -> Result<(), u64> {
        let Ok(mut b) = self.buckets.lock() else { return Ok(()) };
        if b.len() > 10_000 {
            // Forget callers whose bucket is full again.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * RATE_PER_MINUTE / 60.0 < RATE_BURST
            });
        }
        let (tokens, at) = b.entry(ip).or_insert((RATE_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * RATE_PER_MINUTE / 60.0).min(RATE_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) * 60.0 / RATE_PER_MINUTE).ceil() as u64)
        }
    }
}

/// Serves until the task is dropped. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    webhook: WebhookSlot,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let limiter = Arc::new(RateLimiter::default());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            let health = health.clone();
            let webhook = webhook.clone();
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let health = health.clone();
                    let webhook = webhook.clone();
                    let limiter = limiter.clone();
                    async move {
                        if req.uri().path().starts_with("/webhook/") {
                            if let Err(after) = limiter.check(peer.ip(), std::time::Instant::now()) {
                                let mut r = reply(
                                    StatusCode::TOO_MANY_REQUESTS,
                                    "application/json",
                                    serde_json::json!({"error": "too many calls from this address"}).to_string(),
                                );
                                if let Ok(v) = after.to_string().parse() {
                                    r.headers_mut().insert("retry-after", v);
                                }
                                return Ok(r);
                            }
                            return Ok::<_, Infallible>(webhook_call(req, webhook.get().cloned()).await);
                        }
                        Ok::<_, Infallible>(match req.uri().path() {
                            "/metrics" => {
                                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
                            }
                            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                            "/readyz" => match health.readiness(jiff::Timestamp::now().as_second()) {
                                Ok(m) => reply(StatusCode::OK, "text/plain", m.into()),
                                Err(m) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", m),
                            },
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

async fn webhook_call(
    req: Request<hyper::body::Incoming>,
    webhook: Option<super::webhook::Webhook>,
) -> Response<Full<Bytes>> {
    use http_body_util::{BodyExt, Limited};
    let json = |code: u16, v: serde_json::Value| {
        reply(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/json",
            v.to_string(),
        )
    };
    let Some(webhook) = webhook else {
        return json(
            503,
            serde_json::json!({"error": "this replica does not write now (not the leader, or starting)"}),
        );
    };
    if req.method() != hyper::Method::POST {
        return json(405, serde_json::json!({"error": "use POST"}));
    }
    let path = req.uri().path().to_string();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match Limited::new(req.into_body(), super::webhook::MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(413, serde_json::json!({"error": "body too large or unreadable"})),
    };
    let (code, v) = super::webhook::handle(&webhook, &path, auth.as_deref(), &body, jiff::Timestamp::now()).await;
    json(code, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_recent_answer_and_synced_caches_or_standing_by() {
        let h = Health::default();
        assert!(h.readiness(1000).is_err(), "no answer yet");
        h.last_contact.store(1000, Ordering::Relaxed);
        assert_eq!(h.readiness(1005), Err("caches not synced yet\n".to_string()));
        h.standby.store(true, Ordering::Relaxed);
        assert_eq!(h.readiness(1005), Ok("standby: waiting for leadership\n"));
        h.ready.store(true, Ordering::Relaxed);
        assert_eq!(h.readiness(1005), Ok("ready\n"));
        assert_eq!(
            h.readiness(1000 + CONTACT_STALE_SECONDS + 1),
            Err("no answer from the API server for 21s\n".to_string())
        );
    }

    #[test]
    fn each_caller_gets_a_burst_then_the_refill_rate() {
        let l = RateLimiter::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = std::time::Instant::now();
        for _ in 0..RATE_BURST as usize {
            assert!(l.check(a, t0).is_ok());
        }
        assert_eq!(l.check(a, t0), Err(3), "one token comes back every 3 s");
        assert!(l.check(b, t0).is_ok(), "another caller has its own bucket");
        assert!(l.check(a, t0 + std::time::Duration::from_secs(3)).is_ok());
        assert!(l.check(a, t0 + std::time::Duration::from_secs(3)).is_err());
    }
}
