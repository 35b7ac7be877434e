//! In-memory doubles of the executors for the unit tests: a Vault that keeps what is written, issues leases with
//! increasing ids and records every call, and a namespace's Secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use super::ops::{SecretOps, VaultOps};
use crate::vault::admin::{ApiError, Leased};

/// Vault: paths hold what was written (read back under `data`, as Vault answers), `creds/` paths issue leases
/// `<path>/<n>` with the username `v-<role>-<n>`, and answers can be made to fail.
#[derive(Default)]
pub struct FakeVault {
    pub calls: Mutex<Vec<String>>,
    /// What each path holds, as Vault would read it back.
    pub paths: Mutex<BTreeMap<String, Value>>,
    /// Every write as it was sent.
    pub written: Mutex<Vec<(String, Value)>>,
    /// Every call fails with this (e.g. a refused token).
    pub fails: Option<ApiError>,
    /// Revoking fails as if Vault were unreachable.
    pub revoke_fails: bool,
    /// Leases issued and not revoked.
    pub live: Mutex<BTreeSet<String>>,
    pub issued: Mutex<u32>,
    /// The answer to the next renewal (granted in full when `None`).
    pub renew_answer: Mutex<Option<ApiError>>,
    /// Issuing fails as if Vault were unreachable.
    pub issue_fails: bool,
}

impl FakeVault {
    /// A Vault that already holds `paths`.
    pub fn holding(paths: &[(&str, Value)]) -> FakeVault {
        let v = FakeVault::default();
        v.paths.lock().unwrap().extend(paths.iter().map(|(p, b)| (p.to_string(), b.clone())));
        v
    }

    fn call(&self, what: String) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push(what);
        match &self.fails {
            Some(ApiError::Forbidden { op, path }) => Err(ApiError::Forbidden { op: op.clone(), path: path.clone() }),
            Some(_) => Err(ApiError::Unreachable { addr: "vault".into(), message: "connection refused".into() }),
            None => Ok(()),
        }
    }

    /// The calls made whose text starts with `prefix`.
    pub fn calls_of(&self, prefix: &str) -> Vec<String> {
        self.calls.lock().unwrap().iter().filter(|c| c.starts_with(prefix)).cloned().collect()
    }

    pub fn holds(&self, path: &str) -> bool {
        self.paths.lock().unwrap().contains_key(path)
    }
}

impl VaultOps for FakeVault {
    fn addr(&self) -> &str {
        "http://vault.test:8200"
    }

    async fn read(&self, path: &str) -> Result<Option<Value>, ApiError> {
        self.call(format!("read {path}"))?;
        Ok(self.paths.lock().unwrap().get(path).map(|b| json!({ "data": b })))
    }

    async fn write(&self, path: &str, body: &Value) -> Result<(), ApiError> {
        self.call(format!("write {path}"))?;
        self.written.lock().unwrap().push((path.to_string(), body.clone()));
        let mut held = body.clone();
        if let Some(b) = held.as_object_mut()
            && b.contains_key("connection_url")
        {
            // A database connection reads back as Vault shows it: the URL and user under `connection_details`,
            // and not the password.
            let details = json!({"connection_url": b.remove("connection_url"), "username": b.remove("username")});
            b.insert("connection_details".into(), details);
            b.remove("password");
        }
        self.paths.lock().unwrap().insert(path.to_string(), held);
        Ok(())
    }

    async fn list(&self, path: &str) -> Result<Vec<String>, ApiError> {
        self.call(format!("list {path}"))?;
        let prefix = format!("{path}/");
        Ok(self
            .paths
            .lock()
            .unwrap()
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).filter(|rest| !rest.contains('/')).map(str::to_string))
            .collect())
    }

    async fn delete(&self, path: &str) -> Result<(), ApiError> {
        self.call(format!("delete {path}"))?;
        self.paths.lock().unwrap().remove(path);
        Ok(())
    }

    async fn read_leased(&self, path: &str) -> Result<Leased, ApiError> {
        self.call(format!("issue {path}"))?;
        if self.issue_fails {
            return Err(ApiError::Unreachable { addr: "vault".into(), message: "connection refused".into() });
        }
        let n = {
            let mut n = self.issued.lock().unwrap();
            *n += 1;
            *n
        };
        let role = path.rsplit('/').next().unwrap_or_default();
        let lease_id = format!("{path}/{n}");
        self.live.lock().unwrap().insert(lease_id.clone());
        let data = json!({"username": format!("v-{role}-{n}"), "password": format!("pw-{n}")});
        Ok(Leased {
            lease_id,
            lease_duration: Duration::from_secs(3600),
            renewable: true,
            data: data.as_object().cloned().unwrap_or_default(),
        })
    }

    async fn renew(&self, lease_id: &str, increment: Duration) -> Result<Duration, ApiError> {
        self.call(format!("renew {lease_id} {}s", increment.as_secs()))?;
        match self.renew_answer.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(increment),
        }
    }

    async fn revoke(&self, lease_id: &str) -> Result<(), ApiError> {
        self.call(format!("revoke {lease_id}"))?;
        if self.revoke_fails {
            return Err(ApiError::Unreachable { addr: "vault".into(), message: "connection refused".into() });
        }
        self.live.lock().unwrap().remove(lease_id);
        Ok(())
    }
}

/// A namespace's Secrets.
#[derive(Default)]
pub struct FakeSecrets {
    pub secrets: Mutex<BTreeMap<String, Secret>>,
}

impl FakeSecrets {
    pub fn holding(secrets: Vec<Secret>) -> FakeSecrets {
        let s = FakeSecrets::default();
        for sec in secrets {
            s.secrets.lock().unwrap().insert(sec.metadata.name.clone().unwrap_or_default(), sec);
        }
        s
    }

    pub fn names(&self) -> Vec<String> {
        self.secrets.lock().unwrap().keys().cloned().collect()
    }
}

impl SecretOps for FakeSecrets {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        Ok(self.secrets.lock().unwrap().get(name).cloned())
    }

    async fn delete(&self, name: &str) -> Result<(), kube::Error> {
        self.secrets.lock().unwrap().remove(name);
        Ok(())
    }
}
