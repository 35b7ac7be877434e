//! The operator's own Vault (or OpenBao) client for administrative work: policies, Kubernetes-auth roles,
//! database roles and connections, and dynamic credentials with their leases.
//!
//! Requests go through the HTTP client vaultrs builds (so `VAULT_CACERT` / `VAULT_CAPATH` / `VAULT_SKIP_VERIFY`
//! apply as for jobs), but the JSON is handled here: vaultrs drops the lease metadata (`lease_id`,
//! `lease_duration`, `renewable`) of dynamic secrets, which credential rotation depends on. Tokens, passwords and
//! request bodies never appear in errors or logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

use crate::api::condition::VaultFailure;

/// A failed Vault call, classified so that conditions can say what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("Vault is not configured: {0}")]
    Config(String),
    #[error("Vault at {addr} is sealed; unseal it (crmguard retries by itself)")]
    Sealed { addr: String },
    #[error("cannot reach Vault at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error(
        "Vault denied {op} {path} (HTTP 403): the operator's Vault policy must allow it (see the README's Vault section)"
    )]
    Forbidden { op: String, path: String },
    #[error("Vault login failed: {0}")]
    Login(String),
    #[error("Vault {op} {path} failed with HTTP {code}: {message}")]
    Status { op: String, path: String, code: u16, message: String },
    #[error("Vault {op} {path} returned an unexpected answer: {message}")]
    Decode { op: String, path: String, message: String },
}

impl ApiError {
    /// Condition reason for this error.
    pub fn reason(&self) -> VaultFailure {
        match self {
            ApiError::Config(_) => VaultFailure::VaultAddressMissing,
            ApiError::Sealed { .. } => VaultFailure::VaultSealed,
            ApiError::Unreachable { .. } => VaultFailure::VaultUnreachable,
            ApiError::Forbidden { .. } | ApiError::Login(_) => VaultFailure::VaultPermissionDenied,
            ApiError::Status { .. } | ApiError::Decode { .. } => VaultFailure::VaultRequestFailed,
        }
    }

    /// HTTP status of a request that Vault answered, if any.
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Forbidden { .. } => Some(403),
            ApiError::Sealed { .. } => Some(503),
            _ => None,
        }
    }
}

/// A dynamic secret with its lease.
#[derive(Clone, PartialEq, Eq)]
pub struct Leased {
    pub lease_id: String,
    pub lease_duration: Duration,
    pub renewable: bool,
    pub data: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("lease_duration", &self.lease_duration)
            .field("renewable", &self.renewable)
            .field("data", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A logged-in connection to one Vault server.
#[derive(Clone)]
pub struct VaultApi {
    http: reqwest::Client,
    addr: String,
    token: Arc<str>,
}

impl std::fmt::Debug for VaultApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultApi").field("addr", &self.addr).field("token", &"<redacted>").finish()
    }
}

/// Request timeout: a hung Vault must not stall reconciles.
const TIMEOUT: Duration = Duration::from_secs(10);

impl VaultApi {
    /// A client for `addr` with `token` (empty for a login request).
    pub fn new(addr: &str, token: &str) -> Result<VaultApi, ApiError> {
        // The one TLS provider of this binary (main installs it first; this covers library users and tests).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = addr.trim_end_matches('/').to_string();
        if url::Url::parse(&addr).is_err() {
            return Err(ApiError::Config(format!("{addr:?} is not a URL such as https://vault.vault.svc:8200")));
        }
        let settings = VaultClientSettingsBuilder::default()
            .address(&addr)
            .token("")
            .timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| ApiError::Config(e.to_string()))?;
        let client = VaultClient::new(settings).map_err(|e| ApiError::Config(super::describe(&e)))?;
        Ok(VaultApi { http: client.http.http, addr, token: Arc::from(token) })
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>, ApiError> {
        let op = method.to_string();
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ApiError::Config(e.to_string()))?;
        let mut req = self.http.request(m, format!("{}/v1/{}", self.addr, path.trim_start_matches('/')));
        if !self.token.is_empty() {
            req = req.header("X-Vault-Token", &*self.token);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| ApiError::Unreachable {
            addr: self.addr.clone(),
            message: error_chain(&e).chars().take(300).collect(),
        })?;
        let code = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| ApiError::Unreachable {
            addr: self.addr.clone(),
            message: format!("reading the answer: {}", error_chain(&e)),
        })?;
        match code {
            200..=299 if text.trim().is_empty() => Ok(None),
            200..=299 => serde_json::from_str(&text).map(Some).map_err(|e| ApiError::Decode {
                op,
                path: path.to_string(),
                message: e.to_string(),
            }),
            404 => Err(ApiError::Status { op, path: path.to_string(), code, message: vault_errors(&text) }),
            403 => Err(ApiError::Forbidden { op, path: path.to_string() }),
            503 if text.contains("sealed") => Err(ApiError::Sealed { addr: self.addr.clone() }),
            _ => Err(ApiError::Status { op, path: path.to_string(), code, message: vault_errors(&text) }),
        }
    }

    /// GET; `None` when the path does not exist.
    pub async fn read(&self, path: &str) -> Result<Option<Value>, ApiError> {
        match self.call("GET", path, None).await {
            Err(ApiError::Status { code: 404, .. }) => Ok(None),
            other => other,
        }
    }

    /// POST (Vault's write).
    pub async fn write(&self, path: &str, body: &Value) -> Result<Option<Value>, ApiError> {
        self.call("POST", path, Some(body)).await
    }

    /// PUT (some system endpoints, e.g. lease renewal, want it).
    pub async fn put(&self, path: &str, body: &Value) -> Result<Option<Value>, ApiError> {
        self.call("PUT", path, Some(body)).await
    }

    /// LIST; empty when nothing is there.
    pub async fn list(&self, path: &str) -> Result<Vec<String>, ApiError> {
        let answer = match self.call("LIST", path, None).await {
            Err(ApiError::Status { code: 404, .. }) => return Ok(vec![]),
            other => other?,
        };
        Ok(answer
            .as_ref()
            .and_then(|v| v["data"]["keys"].as_array())
            .map(|keys| keys.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// DELETE; a path that is already gone is fine.
    pub async fn delete(&self, path: &str) -> Result<(), ApiError> {
        match self.call("DELETE", path, None).await {
            Ok(_) | Err(ApiError::Status { code: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads a dynamic secret (e.g. `database/creds/<role>`) with its lease.
    pub async fn read_leased(&self, path: &str) -> Result<Leased, ApiError> {
        let v = self.call("GET", path, None).await?.unwrap_or(Value::Null);
        let decode = |message: &str| ApiError::Decode { op: "GET".into(), path: path.into(), message: message.into() };
        let lease_id = v["lease_id"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| decode("no lease_id"))?;
        Ok(Leased {
            lease_id: lease_id.to_string(),
            lease_duration: Duration::from_secs(v["lease_duration"].as_u64().unwrap_or(0)),
            renewable: v["renewable"].as_bool().unwrap_or(false),
            data: v["data"].as_object().cloned().ok_or_else(|| decode("no data"))?,
        })
    }

    /// Renews a lease by `increment`; returns the new lease duration.
    pub async fn renew(&self, lease_id: &str, increment: Duration) -> Result<Duration, ApiError> {
        let v = self
            .put("sys/leases/renew", &json!({"lease_id": lease_id, "increment": increment.as_secs()}))
            .await?
            .unwrap_or(Value::Null);
        Ok(Duration::from_secs(v["lease_duration"].as_u64().unwrap_or(0)))
    }

    /// Revokes a lease; one that is unknown (expired, already revoked) counts as revoked.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), ApiError> {
        match self.put("sys/leases/revoke", &json!({"lease_id": lease_id})).await {
            Ok(_) => Ok(()),
            Err(ApiError::Status { code: 400 | 404, message, .. }) if message.contains("invalid lease") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e).collect::<Vec<_>>().join(": ")
}

/// Vault's `errors` array of an error answer, joined; bodies are never echoed otherwise.
fn vault_errors(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["errors"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; ")))
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect()
}

/// How the operator itself authenticates to Vault.
#[derive(Clone)]
pub enum OperatorAuth {
    /// A fixed token (`VAULT_TOKEN`), for development and tests.
    Token(Arc<str>),
    /// Vault's Kubernetes auth method with the operator pod's ServiceAccount token.
    Kubernetes { mount: String, role: String, jwt_file: String },
}

impl std::fmt::Debug for OperatorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OperatorAuth::Token(_) => f.write_str("Token(<redacted>)"),
            OperatorAuth::Kubernetes { mount, role, jwt_file } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_file", jwt_file)
                .finish(),
        }
    }
}

struct Cached {
    api: VaultApi,
    /// Log in again after this instant (two thirds of the token's TTL); never for a fixed token.
    refresh_after: Option<Instant>,
}

/// Logged-in Vault clients per address, shared by reconciles; tokens are renewed by logging in again.
pub struct Sessions {
    auth: OperatorAuth,
    /// The operator's `--vault-addr`, used when a resource does not name its own.
    pub default_addr: Option<String>,
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("auth", &self.auth).field("default_addr", &self.default_addr).finish()
    }
}

impl Sessions {
    pub fn new(auth: OperatorAuth, default_addr: Option<String>) -> Sessions {
        Sessions { auth, default_addr, cache: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// The address to use: the resource's own, else the operator's.
    pub fn address(&self, own: Option<&str>) -> Result<String, ApiError> {
        own.filter(|a| !a.is_empty()).map(str::to_string).or_else(|| self.default_addr.clone()).ok_or_else(|| {
            ApiError::Config(
                "no Vault address: set spec.vault.address, or the operator's --vault-addr (Helm value vault.address)"
                    .into(),
            )
        })
    }

    /// A logged-in client for `addr`.
    pub async fn api(&self, addr: &str) -> Result<VaultApi, ApiError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(addr)
            && c.refresh_after.is_none_or(|t| Instant::now() < t)
        {
            return Ok(c.api.clone());
        }
        let (api, ttl) = match &self.auth {
            OperatorAuth::Token(t) => (VaultApi::new(addr, t)?, None),
            OperatorAuth::Kubernetes { mount, role, jwt_file } => {
                let jwt = std::fs::read_to_string(jwt_file).map_err(|e| {
                    ApiError::Login(format!(
                        "cannot read the operator's ServiceAccount token at {jwt_file}: {e} (or set VAULT_TOKEN)"
                    ))
                })?;
                let anon = VaultApi::new(addr, "")?;
                let path = format!("auth/{}/login", mount.trim_matches('/'));
                let answer =
                    anon.write(&path, &json!({"role": role, "jwt": jwt.trim()})).await.map_err(|e| match e {
                        ApiError::Status { code, message, .. } => ApiError::Login(format!(
                            "Kubernetes auth at {path} with role {role:?}: HTTP {code}: {message}"
                        )),
                        ApiError::Forbidden { .. } => ApiError::Login(format!(
                            "Kubernetes auth at {path} refused role {role:?} for the operator's ServiceAccount"
                        )),
                        other => other,
                    })?;
                let auth = answer.as_ref().map(|v| &v["auth"]).cloned().unwrap_or(Value::Null);
                let token = auth["client_token"]
                    .as_str()
                    .ok_or_else(|| ApiError::Login(format!("{path} answered without a client token")))?;
                let ttl = Duration::from_secs(auth["lease_duration"].as_u64().unwrap_or(0));
                (VaultApi::new(addr, token)?, (ttl > Duration::ZERO).then_some(ttl))
            }
        };
        let refresh_after = ttl.map(|t| Instant::now() + t * 2 / 3);
        cache.insert(addr.to_string(), Cached { api: api.clone(), refresh_after });
        Ok(api)
    }

    /// Drops the cached token of `addr` (after a 403: it may have been revoked or expired).
    pub async fn forget(&self, addr: &str) {
        if matches!(self.auth, OperatorAuth::Kubernetes { .. }) {
            self.cache.lock().await.remove(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_problem_and_redact() {
        let api = VaultApi::new("http://127.0.0.1:1", "s.very-secret-token").expect("client");
        assert!(!format!("{api:?}").contains("very-secret"));
        assert_eq!(ApiError::Sealed { addr: "x".into() }.reason(), VaultFailure::VaultSealed);
        assert_eq!(vault_errors(r#"{"errors":["permission denied","x"]}"#), "permission denied; x");
        assert_eq!(vault_errors("<html>"), "");
        assert!(VaultApi::new("not a url", "").is_err());
        let auth = OperatorAuth::Token(Arc::from("s.hidden"));
        assert!(!format!("{auth:?}").contains("hidden"));
    }

    #[tokio::test]
    async fn unreachable_vault_is_classified() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let api = VaultApi::new(&format!("http://127.0.0.1:{}", port.unwrap_or(1)), "t").expect("client");
        let e = api.read("sys/health").await.expect_err("nothing listens");
        assert_eq!(e.reason(), VaultFailure::VaultUnreachable, "{e}");
    }
}
