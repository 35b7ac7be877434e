//! Checks of a CrmRestore against its CrmBackupPolicy.

use crate::api::backup_policy::CrmBackupPolicy;
use crate::api::restore::CrmRestore;
use crate::controllers::backup_policy::validate::{ValidatedBackupPolicy, validate as validate_policy};
use crate::k8s::meta::Owner;
use crate::validation::FieldError;

/// A restore whose policy was found and is valid.
#[derive(Clone, Debug)]
pub struct ValidatedRestore {
    pub owner: Owner,
    pub restore: CrmRestore,
    pub policy: ValidatedBackupPolicy,
    /// Resolved target host and port.
    pub target_host: String,
    pub target_port: u16,
}

/// Validates a restore; `policy` is the CrmBackupPolicy its `policyRef` names, when it exists.
pub fn validate(restore: &CrmRestore, policy: Option<&CrmBackupPolicy>) -> Result<ValidatedRestore, Vec<FieldError>> {
    let owner = super::super::owner_of(restore)?;
    let Some(policy) = policy else {
        return Err(vec![FieldError::new(
            "spec.policyRef.name",
            format!(
                "CrmBackupPolicy {:?} not found in namespace {:?}: create it first or fix policyRef",
                restore.spec.policy_ref.name, owner.namespace
            ),
        )]);
    };
    let policy = validate_policy(policy).map_err(|errs| {
        vec![FieldError::new(
            "spec.policyRef.name",
            format!(
                "CrmBackupPolicy {:?} is invalid ({}); fix the policy first",
                restore.spec.policy_ref.name,
                errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ),
        )]
    })?;
    let target = &restore.spec.target;
    let target_host = target.host.clone().unwrap_or_else(|| policy.spec.source.host.clone());
    let target_port = match target.port {
        Some(p) => u16::try_from(p).map_err(|_| vec![FieldError::new("spec.target.port", "must be 1-65535")])?,
        None => policy.port,
    };
    let overwrites_source = target_host == policy.spec.source.host
        && target_port == policy.port
        && target.database == policy.spec.source.database;
    if overwrites_source && !restore.spec.options.allow_overwrite_source {
        return Err(vec![FieldError::new(
            "spec.target.database",
            format!(
                "{:?} is the policy's live source database; restore into another database, or set \
                 options.allowOverwriteSource: true to overwrite production deliberately",
                target.database
            ),
        )]);
    }
    if restore.spec.options.restore_attachments && policy.spec.source.attachments.is_none() {
        return Err(vec![FieldError::new(
            "spec.options.restoreAttachments",
            format!(
                "CrmBackupPolicy {:?} backs up no attachments volume (spec.source.attachments), so there are none to \
                 restore; set restoreAttachments: false",
                restore.spec.policy_ref.name
            ),
        )]);
    }
    Ok(ValidatedRestore { owner, restore: restore.clone(), policy, target_host, target_port })
}
