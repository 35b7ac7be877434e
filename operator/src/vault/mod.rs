//! Vault (or OpenBao) access for jobs and commands: address and CA from the standard `VAULT_ADDR` /
//! `VAULT_CACERT` environment, and a token from `VAULT_TOKEN` or, in a pod, a login with Vault's Kubernetes auth
//! method using the pod's projected ServiceAccount token. Tokens are never logged or put into errors.

pub mod admin;

use std::path::Path;

use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// Where the projected ServiceAccount token for Vault is mounted in job pods.
pub const TOKEN_FILE: &str = "/var/run/secrets/vault/token";

/// A failed Vault operation.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault is not configured: {0}")]
    Config(String),
    #[error("Vault login with Kubernetes auth (mount {mount:?}, role {role:?}) failed: {message}")]
    Login { mount: String, role: String, message: String },
    #[error("Vault {op} failed: {message}")]
    Request { op: String, message: String },
}

/// Describes a vaultrs error without echoing request bodies (which may carry secrets).
pub fn describe(e: &vaultrs::error::ClientError) -> String {
    use vaultrs::error::ClientError;
    match e {
        ClientError::APIError { code, errors } => format!("HTTP {code}: {}", errors.join("; ")),
        ClientError::RestClientError { source } => format!("cannot reach Vault: {source}"),
        other => {
            // Keep only the first line and never more than 200 characters.
            other.to_string().lines().next().unwrap_or_default().chars().take(200).collect()
        }
    }
}

fn client(token: &str) -> Result<VaultClient, VaultError> {
    let addr = std::env::var("VAULT_ADDR").map_err(|_| {
        VaultError::Config(
            "VAULT_ADDR is not set: set it to Vault's address, e.g. https://vault.vault.svc:8200 (the operator passes \
             its --vault-addr to jobs)"
                .into(),
        )
    })?;
    if url::Url::parse(&addr).is_err() {
        return Err(VaultError::Config(format!("VAULT_ADDR {addr:?} is not a URL such as https://vault.example:8200")));
    }
    let settings = VaultClientSettingsBuilder::default()
        .address(&addr)
        .token(token)
        .build()
        .map_err(|e| VaultError::Config(e.to_string()))?;
    VaultClient::new(settings).map_err(|e| VaultError::Config(describe(&e)))
}

/// A client logged in as `role` of the Kubernetes auth method at `mount`, or with `VAULT_TOKEN` when set
/// (for people running commands outside Kubernetes).
pub async fn login(mount: &str, role: &str) -> Result<VaultClient, VaultError> {
    if let Ok(token) = std::env::var("VAULT_TOKEN")
        && !token.is_empty()
    {
        return client(&token);
    }
    let token_file = std::env::var("CRMGUARD_VAULT_TOKEN_FILE").unwrap_or_else(|_| TOKEN_FILE.to_string());
    let jwt = std::fs::read_to_string(Path::new(&token_file)).map_err(|e| {
        VaultError::Config(format!(
            "neither VAULT_TOKEN is set nor is a ServiceAccount token readable at {token_file}: {e}"
        ))
    })?;
    let anonymous = client("")?;
    let auth = vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.trim())
        .await
        .map_err(|e| VaultError::Login { mount: mount.to_string(), role: role.to_string(), message: describe(&e) })?;
    client(&auth.client_token)
}
