//! The executors: what the Vault half asks of Vault ([`VaultOps`]) and of the policy's namespace ([`SecretOps`]).
//! The operator passes [`VaultApi`] and `Api<Secret>`; the unit tests pass the in-memory doubles of `fake`.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use serde_json::Value;

use crate::vault::admin::{ApiError, Leased, VaultApi};

/// Vault as the Vault half uses it: paths read, written, listed and deleted, and leases issued, renewed, revoked.
pub(crate) trait VaultOps: Sync {
    /// The server's address (for messages).
    fn addr(&self) -> &str;
    /// Reads a path; `None` when it does not exist.
    fn read(&self, path: &str) -> impl Future<Output = Result<Option<Value>, ApiError>> + Send;
    /// Writes a path.
    fn write(&self, path: &str, body: &Value) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The keys under a path; empty when nothing is there.
    fn list(&self, path: &str) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
    /// Deletes a path; one already gone is fine.
    fn delete(&self, path: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Reads a path that issues a lease (a database role's `creds/`).
    fn read_leased(&self, path: &str) -> impl Future<Output = Result<Leased, ApiError>> + Send;
    /// Renews a lease by `increment`; the duration Vault granted.
    fn renew(&self, lease_id: &str, increment: Duration) -> impl Future<Output = Result<Duration, ApiError>> + Send;
    /// Revokes a lease (an unknown one counts as revoked).
    fn revoke(&self, lease_id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
}

impl VaultOps for VaultApi {
    fn addr(&self) -> &str {
        VaultApi::addr(self)
    }

    async fn read(&self, path: &str) -> Result<Option<Value>, ApiError> {
        VaultApi::read(self, path).await
    }

    async fn write(&self, path: &str, body: &Value) -> Result<(), ApiError> {
        VaultApi::write(self, path, body).await.map(drop)
    }

    async fn list(&self, path: &str) -> Result<Vec<String>, ApiError> {
        VaultApi::list(self, path).await
    }

    async fn delete(&self, path: &str) -> Result<(), ApiError> {
        VaultApi::delete(self, path).await
    }

    async fn read_leased(&self, path: &str) -> Result<Leased, ApiError> {
        VaultApi::read_leased(self, path).await
    }

    async fn renew(&self, lease_id: &str, increment: Duration) -> Result<Duration, ApiError> {
        VaultApi::renew(self, lease_id, increment).await
    }

    async fn revoke(&self, lease_id: &str) -> Result<(), ApiError> {
        VaultApi::revoke(self, lease_id).await
    }
}

/// The Secrets of the policy's namespace that the Vault half reads (credentials, the database connection) and
/// deletes (credentials of teams without grants).
pub(crate) trait SecretOps: Sync {
    /// Reads a Secret; `None` when it does not exist.
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Secret>, kube::Error>> + Send;
    /// Deletes a Secret; one already gone is fine.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

impl SecretOps for Api<Secret> {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.get_opt(name).await
    }

    async fn delete(&self, name: &str) -> Result<(), kube::Error> {
        match Api::delete(self, name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
