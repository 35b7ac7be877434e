//! One folder per custom resource. Each reconcile is resolve -> validate (pure) -> build (pure) -> apply ->
//! status; the pure steps live here and are shared with `crmguard plan`.

pub mod access_policy;
pub mod backup_policy;
pub mod network_guard;
pub mod restore;
pub mod schedule;

use crate::k8s::meta::Owner;
use crate::validation::FieldError;

/// Settings of the operator installation that shape the children (not part of any custom resource).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildContext {
    /// Image of the backup/restore jobs (the operator image itself).
    pub image: String,
    /// Image pull policy of the jobs.
    pub image_pull_policy: String,
    /// Vault address given to jobs that use Vault (`VAULT_ADDR`).
    pub vault_addr: Option<String>,
    /// PEM of the CA that signed Vault's certificate (the operator's `VAULT_CACERT`), handed to jobs through
    /// their ConfigMap (a CA certificate is public) so they trust the same Vault.
    pub vault_ca_pem: Option<String>,
}

impl Default for BuildContext {
    fn default() -> Self {
        BuildContext {
            image: format!("ghcr.io/crmguard/crmguard:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            vault_addr: None,
            vault_ca_pem: None,
        }
    }
}

/// The owner of children, from a custom resource's metadata.
pub fn owner_of<K>(obj: &K) -> Result<Owner, Vec<FieldError>>
where
    K: kube::Resource<DynamicType = ()>,
{
    let meta = obj.meta();
    let name = meta.name.clone().ok_or_else(|| vec![FieldError::new("metadata.name", "Required value")])?;
    let namespace = meta.namespace.clone().ok_or_else(|| {
        vec![FieldError::new("metadata.namespace", "Required value: crmguard resources are namespaced")]
    })?;
    Ok(Owner {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name,
        namespace,
        uid: meta.uid.clone().unwrap_or_default(),
    })
}
