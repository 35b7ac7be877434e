//! One folder per custom resource. Each reconcile is resolve -> validate (pure) -> build (pure) -> apply ->
//! status; the pure steps live here and are shared with `crmguard plan`.

pub mod access_monitor;
pub mod access_policy;
pub mod backup_policy;
pub mod contract;
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
    /// The platform's S3 endpoint for policies whose destination names none (`--default-s3-endpoint`).
    pub default_s3: Option<DefaultS3>,
    /// What AccessPolicies may grant at all (grant ceiling, Vault path prefixes and addresses).
    pub access: access_policy::ceiling::AccessLimits,
}

/// Operator-wide S3 defaults, applied to a policy's destination when it has no `endpoint` of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultS3 {
    pub endpoint: String,
    /// Replaces the destination's region when set.
    pub region: Option<String>,
    pub force_path_style: bool,
}

impl BuildContext {
    /// The destination a policy's jobs use: its own, or with the operator's default endpoint filled in.
    pub fn destination(&self, d: &crate::api::common::S3Location) -> crate::api::common::S3Location {
        let mut d = d.clone();
        if let (None, Some(def)) = (&d.endpoint, &self.default_s3) {
            d.endpoint = Some(def.endpoint.clone());
            if let Some(r) = &def.region {
                d.region = r.clone();
            }
            d.force_path_style |= def.force_path_style;
        }
        d
    }
}

impl Default for BuildContext {
    fn default() -> Self {
        BuildContext {
            image: format!("ghcr.io/crmguard/crmguard:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            vault_addr: None,
            vault_ca_pem: None,
            default_s3: None,
            access: access_policy::ceiling::AccessLimits::default(),
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
