//! Alerts in Alertmanager's format, posted to its API (`POST /api/v2/alerts`, as Prometheus does): labels name
//! the alert (Alertmanager groups, silences and deduplicates by them), annotations describe it. An alert whose
//! `endsAt` has passed is resolved; one sent without `endsAt` is resolved after Alertmanager's `resolve_timeout`.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};

/// One alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Timestamp,
    /// `None`: Alertmanager resolves it after its `resolve_timeout` unless it is sent again.
    pub ends_at: Option<Timestamp>,
}

impl Alert {
    /// The alert as Alertmanager's API takes it (labels with an empty value are left out, as Alertmanager drops
    /// them).
    pub fn to_json(&self) -> Value {
        let labels: BTreeMap<&String, &String> = self.labels.iter().filter(|(_, v)| !v.is_empty()).collect();
        let mut a = json!({
            "labels": labels,
            "annotations": self.annotations,
            "startsAt": self.starts_at.to_string(),
        });
        if let Some(end) = self.ends_at {
            a["endsAt"] = end.to_string().into();
        }
        a
    }
}

/// Request timeout: an Alertmanager that hangs must not stall the reconcile that sends.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The Alertmanagers alerts go to (every one of them, as Prometheus sends to each of an HA set).
#[derive(Clone, Debug)]
pub struct Alertmanagers {
    urls: Vec<url::Url>,
    http: reqwest::Client,
}

impl Alertmanagers {
    /// Alertmanagers at these base URLs (`http://alertmanager.monitoring:9093`); an empty list is `None`.
    pub fn new(urls: &[String]) -> Result<Option<Alertmanagers>, String> {
        if urls.is_empty() {
            return Ok(None);
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut parsed = Vec::new();
        for u in urls {
            let url = url::Url::parse(u)
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
                .ok_or_else(|| {
                    format!(
                        "--alertmanager-url {u:?} is not an http(s) URL such as http://alertmanager.monitoring:9093"
                    )
                })?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(format!(
                    "--alertmanager-url {}: credentials in the URL would be logged; put the Alertmanager behind a \
                     NetworkPolicy instead",
                    url.host_str().unwrap_or_default()
                ));
            }
            parsed.push(url);
        }
        let http = reqwest::Client::builder().timeout(TIMEOUT).build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Some(Alertmanagers { urls: parsed, http }))
    }

    /// Posts `alerts` to every Alertmanager. Delivered when one of them accepted them (they share alerts among
    /// themselves); otherwise the error of each.
    pub async fn send(&self, alerts: &[Alert]) -> Result<(), String> {
        if alerts.is_empty() {
            return Ok(());
        }
        let body = Value::Array(alerts.iter().map(Alert::to_json).collect()).to_string();
        let mut errors = Vec::new();
        let mut delivered = false;
        for base in &self.urls {
            let Ok(url) = base.join("api/v2/alerts") else { continue };
            let sent = self
                .http
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => delivered = true,
                Ok(r) => {
                    let status = r.status();
                    let text: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                    errors.push(format!("{url}: HTTP {status}: {}", text.trim()));
                }
                Err(e) => errors.push(format!("{url}: {}", chain(&e))),
            }
        }
        if delivered { Ok(()) } else { Err(errors.join("; ")) }
    }
}

/// An error with its causes (reqwest's own message does not say "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e).collect::<Vec<_>>().join(": ").chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_checked_and_empty_labels_left_out() {
        assert!(Alertmanagers::new(&[]).unwrap().is_none());
        assert!(Alertmanagers::new(&["alertmanager:9093".into()]).unwrap_err().contains("not an http(s) URL"));
        let creds = Alertmanagers::new(&["http://u:p4ss@am:9093".into()]).unwrap_err();
        assert!(creds.contains("credentials") && !creds.contains("p4ss"), "{creds}");
        assert!(Alertmanagers::new(&["http://am.monitoring:9093/".into()]).unwrap().is_some());
        let a = Alert {
            labels: [("alertname", "X"), ("object", "")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            annotations: BTreeMap::new(),
            starts_at: "2026-12-03T10:00:00Z".parse().unwrap(),
            ends_at: None,
        };
        assert_eq!(
            a.to_json(),
            json!({"labels": {"alertname": "X"}, "annotations": {}, "startsAt": "2026-12-03T10:00:00Z"})
        );
    }

    /// A loopback server that answers every request with `status` and tells what it was asked.
    async fn answering(status: &'static str) -> (String, tokio::sync::mpsc::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                // The whole request: the head, then as many bytes as its content-length says.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    let done = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                        let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).map(str::trim);
                        len.and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| body.len() >= l)
                    });
                    if n == 0 || done {
                        break;
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned()).await;
                let body = "refused: bad alert";
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (url, rx)
    }

    /// Delivered when one Alertmanager takes the alerts (a refusing or absent one is passed over); when none
    /// does, the error names each and its answer.
    #[tokio::test]
    async fn delivered_when_one_alertmanager_takes_them() {
        let a = Alert {
            labels: [("alertname", "X")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            annotations: BTreeMap::new(),
            starts_at: "2026-12-03T10:00:00Z".parse().unwrap(),
            ends_at: None,
        };
        let (refusing, _) = answering("500 Internal Server Error").await;
        let (taking, mut asked) = answering("200 OK").await;
        let closed = format!("http://127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let ams = Alertmanagers::new(&[closed.clone(), refusing.clone(), taking]).unwrap().unwrap();
        ams.send(std::slice::from_ref(&a)).await.unwrap();
        let request = asked.recv().await.unwrap();
        assert!(request.starts_with("POST /api/v2/alerts "), "{request}");
        assert!(
            request.contains(r#"[{"annotations":{},"labels":{"alertname":"X"},"startsAt":"2026-12-03T10:00:00Z"}]"#)
        );
        let none = Alertmanagers::new(&[closed, refusing]).unwrap().unwrap();
        let e = none.send(&[a]).await.unwrap_err();
        assert!(e.contains("HTTP 500 Internal Server Error: refused: bad alert"), "{e}");
        assert!(e.contains("Connection refused") || e.contains("connection refused"), "{e}");
    }
}
