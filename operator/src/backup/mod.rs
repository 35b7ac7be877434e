//! The data path of backup and restore jobs (`crmguard backup run|list|verify`, `crmguard restore run`): usable
//! in the CronJob's pod and by people outside Kubernetes.
//!
//! A backup: row counts + dump in one snapshot -> zstd -> AEAD -> multipart upload -> verification (re-read)
//! -> manifest (commit) -> retention and cleanup of leftovers. A backup is complete only once its manifest is
//! written, and the manifest is written only after verification passed.
//!
//! Here: the errors and the job's settings (keys, database connection, CA files); `run`: a backup run and its
//! verification; `restore`: choosing, verifying and restoring a backup; `housekeeping`: retention and leftovers.

mod housekeeping;
mod restore;
mod run;

pub mod crypto;
pub mod keys;
pub mod manifest;
pub mod pgarchive;
pub mod pipeline;
pub mod report;
pub mod retention;
pub mod source;
pub mod store;

pub use housekeeping::{Housekeeping, housekeeping, reclaim_uploads};
pub use restore::{
    RestoreReport, RestoreRequest, Selector, VerifyReport, compare_counts, data_key, restore, select, verify_backup,
};
pub use run::{run_backup, verify_archive};

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::Timestamp;
use serde::Serialize;

use self::crypto::DataKey;
use self::keys::{Kek, KeyError};
use self::manifest::{
    ATTACHMENTS, Catalog, Compression, DATABASE, EncryptionInfo, FORMAT, MANIFEST, Manifest, StoredObject,
    VerificationRecord, object_key,
};
use self::pipeline::{PipelineError, PipelineOptions, Protection, human_bytes};
use self::source::{DbConn, SourceError};
use self::store::{Store, StoreError};
use crate::api::backup_policy::{Engine, VerificationMode};
use crate::api::job::{JobConfig, JobReason, Reclaimed};

/// Why a backup, verification or restore failed; `reason()` is what the job reports and the operator's
/// condition shows.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    NotFound(String),
    #[error("row counts differ from those recorded at backup time: {0}")]
    RowCounts(String),
    #[error(transparent)]
    Manifest(#[from] manifest::Unauthenticated),
    #[error("the target database cannot be reached, so nothing was downloaded: {0}")]
    TargetUnreachable(#[source] SourceError),
}

impl BackupError {
    /// Stable reason for conditions, Events and metrics.
    pub fn reason(&self) -> JobReason {
        match self {
            BackupError::Config(_) => JobReason::InvalidConfiguration,
            BackupError::Source(SourceError::Credentials(_) | SourceError::Vault(_)) => {
                JobReason::CredentialsUnavailable
            }
            BackupError::Source(_) => JobReason::DatabaseToolFailed,
            BackupError::Store(StoreError::Credentials(_)) => JobReason::CredentialsUnavailable,
            BackupError::Store(_) => JobReason::StorageError,
            BackupError::TargetUnreachable(_) => JobReason::DatabaseUnreachable,
            BackupError::Key(KeyError::WrongKey { .. } | KeyError::Mismatch { .. }) => JobReason::WrongKey,
            BackupError::Key(KeyError::Damaged(_) | KeyError::Relabelled { .. }) => JobReason::ManifestTampered,
            BackupError::Manifest(manifest::Unauthenticated::Internal(_)) => JobReason::InvalidConfiguration,
            BackupError::Manifest(_) => JobReason::ManifestTampered,
            BackupError::Key(_) => JobReason::KeyUnavailable,
            BackupError::Pipeline(PipelineError::Verify { .. }) => JobReason::VerificationFailed,
            BackupError::Pipeline(PipelineError::Store(StoreError::Credentials(_))) => {
                JobReason::CredentialsUnavailable
            }
            BackupError::Pipeline(PipelineError::Store(_)) => JobReason::StorageError,
            BackupError::Pipeline(PipelineError::Stream(_)) => JobReason::BackupStreamFailed,
            BackupError::Pipeline(PipelineError::Source(_)) => JobReason::DatabaseToolFailed,
            BackupError::NotFound(_) => JobReason::BackupNotFound,
            BackupError::RowCounts(_) => JobReason::RowCountMismatch,
        }
    }
}

/// Everything a job needs besides the policy: where to store, the data path tuning, the clock.
#[derive(Debug)]
pub struct Runtime {
    pub store: Store,
    pub options: PipelineOptions,
    /// Directory of the attachments volume (mounted read-only in the backup pod).
    pub attachments_dir: Option<PathBuf>,
    /// Accept encrypted backups whose manifest carries no MAC (made before manifests were authenticated).
    pub allow_unauthenticated_manifest: bool,
    /// An unfinished multipart upload that received no part for this long belongs to a run that died: it is
    /// aborted when a backup starts and after it committed.
    pub reclaim_idle: std::time::Duration,
    /// The clock: when a run starts and completes, what retention and reclaiming count from.
    pub clock: fn() -> Timestamp,
}

/// The policy's encryption, resolved: the key-encryption key, or `None` when encryption is off.
pub async fn kek_for(config: &JobConfig) -> Result<Option<Kek>, BackupError> {
    let enc = &config.spec.encryption;
    if !enc.enabled {
        return Ok(None);
    }
    let key = enc
        .key
        .as_ref()
        .ok_or_else(|| BackupError::Config("encryption is enabled but no key is named (encryption.key)".into()))?;
    Ok(Some(Kek::from_policy(key).await?))
}

/// Connection to the policy's source database, credentials resolved.
pub async fn source_conn(config: &JobConfig) -> Result<DbConn, BackupError> {
    let s = &config.spec.source;
    let (user, password) = DbConn::resolve_credentials(&s.credentials, "CRMGUARD_DB").await?;
    Ok(DbConn::new(
        s.engine,
        &s.host,
        config.port,
        &s.database,
        &user,
        password,
        s.tls_mode,
        ca_file("CRMGUARD_DB_CA_CERT")?,
    ))
}

/// Writes a CA certificate given in an environment variable to a private temporary file for the database tools.
pub fn ca_file(var: &str) -> Result<Option<PathBuf>, BackupError> {
    let Ok(pem) = std::env::var(var) else { return Ok(None) };
    if pem.trim().is_empty() {
        return Ok(None);
    }
    let path = std::env::temp_dir().join(format!("crmguard-{}-{}.pem", var.to_lowercase(), std::process::id()));
    std::fs::write(&path, pem).map_err(|e| BackupError::Config(format!("cannot write {}: {e}", path.display())))?;
    Ok(Some(path))
}
