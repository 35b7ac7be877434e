//! The contract between the operator and the jobs it starts (`crmguard backup|restore ...` in the operator image):
//! the configuration the operator mounts and where, and the report a job leaves as its pod's termination message,
//! which the operator turns into the policy's or restore's status.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::backup_policy::CrmBackupPolicySpec;
use super::condition::{Described, ReasonSet};

/// Where the job's configuration is mounted.
pub const CONFIG_DIR: &str = "/etc/crmguard";
/// File name of the job configuration inside [`CONFIG_DIR`].
pub const CONFIG_FILE: &str = "policy.json";
/// Key (and file in [`CONFIG_DIR`]) of Vault's CA certificate in the job ConfigMap.
pub const VAULT_CA_FILE: &str = "vault-ca.crt";
/// Where Vault's projected ServiceAccount token is mounted.
pub const VAULT_TOKEN_DIR: &str = "/var/run/secrets/vault";
/// Where the attachments volume is mounted (read-only) in backup jobs.
pub const ATTACHMENTS_DIR: &str = "/data/attachments";

/// Configuration of a backup or restore job, mounted from the ConfigMap. Holds references to secrets, never
/// secret values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobConfig {
    /// Name of the policy.
    pub policy: String,
    /// Namespace of the policy.
    pub namespace: String,
    /// Resolved key prefix in the bucket.
    pub prefix: String,
    /// Resolved database port.
    pub port: u16,
    /// The policy's spec.
    pub spec: CrmBackupPolicySpec,
}

/// What a job did.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A backup run (with its verification and retention).
    Backup,
    /// A restore of a CrmRestore.
    Restore,
    /// A restore drill of a CrmBackupPolicy (into a scratch database).
    Drill,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Drill => "drill",
        }
    }
}

/// Why a backup, verification or restore job failed: the reason of the condition and Event it leads to. A
/// reason this operator does not know (a newer job image) reads as [`JobReason::JobFailed`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobReason {
    InvalidConfiguration,
    CredentialsUnavailable,
    DatabaseToolFailed,
    StorageError,
    WrongKey,
    KeyUnavailable,
    VerificationFailed,
    BackupStreamFailed,
    BackupNotFound,
    RowCountMismatch,
    ManifestTampered,
    DatabaseUnreachable,
    /// The job failed without a known reason, or left no report (e.g. killed for memory).
    #[serde(other)]
    JobFailed,
}

impl JobReason {
    /// Every reason, in a stable order.
    pub const ALL: [JobReason; 13] = [
        JobReason::InvalidConfiguration,
        JobReason::CredentialsUnavailable,
        JobReason::DatabaseToolFailed,
        JobReason::StorageError,
        JobReason::WrongKey,
        JobReason::KeyUnavailable,
        JobReason::VerificationFailed,
        JobReason::BackupStreamFailed,
        JobReason::BackupNotFound,
        JobReason::RowCountMismatch,
        JobReason::ManifestTampered,
        JobReason::DatabaseUnreachable,
        JobReason::JobFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobReason::InvalidConfiguration => "InvalidConfiguration",
            JobReason::CredentialsUnavailable => "CredentialsUnavailable",
            JobReason::DatabaseToolFailed => "DatabaseToolFailed",
            JobReason::StorageError => "StorageError",
            JobReason::WrongKey => "WrongKey",
            JobReason::KeyUnavailable => "KeyUnavailable",
            JobReason::VerificationFailed => "VerificationFailed",
            JobReason::BackupStreamFailed => "BackupStreamFailed",
            JobReason::BackupNotFound => "BackupNotFound",
            JobReason::RowCountMismatch => "RowCountMismatch",
            JobReason::ManifestTampered => "ManifestTampered",
            JobReason::DatabaseUnreachable => "DatabaseUnreachable",
            JobReason::JobFailed => "JobFailed",
        }
    }

    /// The reason named `s` (as a condition holds it); [`JobReason::JobFailed`] when it names none.
    pub fn parse(s: &str) -> JobReason {
        JobReason::ALL.into_iter().find(|r| r.as_str() == s).unwrap_or(JobReason::JobFailed)
    }
}

impl ReasonSet for JobReason {
    const SUMMARY: &'static [&'static str] = &["Why a job failed, from its report:"];
    const DOCS: &'static [Described] = &[
        Described {
            name: JobReason::InvalidConfiguration.as_str(),
            doc: &["The job's mounted configuration is missing or invalid."],
        },
        Described {
            name: JobReason::CredentialsUnavailable.as_str(),
            doc: &["The database or S3 credentials could not be read (Secret or Vault)."],
        },
        Described {
            name: JobReason::DatabaseToolFailed.as_str(),
            doc: &["The database's dump or restore tool failed."],
        },
        Described { name: JobReason::StorageError.as_str(), doc: &["An S3 request failed."] },
        Described { name: JobReason::WrongKey.as_str(), doc: &["The encryption key does not open the backup."] },
        Described { name: JobReason::KeyUnavailable.as_str(), doc: &["The encryption key could not be read."] },
        Described {
            name: JobReason::VerificationFailed.as_str(),
            doc: &["The stored backup did not read back as it was written."],
        },
        Described {
            name: JobReason::BackupStreamFailed.as_str(),
            doc: &["The backup stream broke between the database and S3."],
        },
        Described { name: JobReason::BackupNotFound.as_str(), doc: &["The backup to restore does not exist."] },
        Described {
            name: JobReason::RowCountMismatch.as_str(),
            doc: &["Restored row counts differ from those recorded at backup time."],
        },
        Described {
            name: JobReason::ManifestTampered.as_str(),
            doc: &["A backup's manifest or key envelope fails its integrity check."],
        },
        Described { name: JobReason::DatabaseUnreachable.as_str(), doc: &["The database could not be reached."] },
        Described {
            name: JobReason::JobFailed.as_str(),
            doc: &["The job failed without a known reason, or left no report (e.g. killed for memory)."],
        },
    ];

    fn as_str(self) -> &'static str {
        JobReason::as_str(self)
    }
}

/// Unfinished multipart uploads a run aborted: what killed runs of the policy had left in the bucket.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Reclaimed {
    pub uploads: u64,
    pub parts: u64,
    pub bytes: u64,
}

impl Reclaimed {
    pub fn add(&mut self, other: Reclaimed) {
        self.uploads += other.uploads;
        self.parts += other.parts;
        self.bytes += other.bytes;
    }
}

/// Summary a job writes to its pod's termination message (read by the operator for the status, signed with the
/// policy's report key: `backup::report`) and to stdout. Small: the termination message is limited to 4 KiB.
/// `ok` and `kind` are required: a report without them is no report.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobReport {
    pub ok: bool,
    pub kind: JobKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<JobReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newest_backup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newest_completed: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_backups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_counts_verified: Option<bool>,
    /// Unfinished uploads of runs that died, aborted by this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaimed: Option<Reclaimed>,
}

impl JobReport {
    /// A successful report of `kind` with nothing else in it yet.
    pub fn new(kind: JobKind) -> JobReport {
        JobReport {
            ok: true,
            kind,
            reason: None,
            message: None,
            backup_id: None,
            completed: None,
            stored_bytes: None,
            raw_bytes: None,
            sha256: None,
            duration_seconds: None,
            verify_seconds: None,
            backup_count: None,
            newest_backup: None,
            newest_completed: None,
            deleted_backups: Vec::new(),
            row_counts_verified: None,
            reclaimed: None,
        }
    }

    /// A failed report of `kind` for `reason`, with a message cut to fit the termination message.
    pub fn failed(kind: JobKind, reason: JobReason, message: &str) -> JobReport {
        JobReport {
            ok: false,
            reason: Some(reason),
            message: Some(message.chars().take(1500).collect()),
            ..JobReport::new(kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_as_written_and_unknown_ones_as_job_failed() {
        for r in JobReason::ALL {
            assert_eq!(JobReason::parse(r.as_str()), r);
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::json!(r.as_str()));
        }
        assert_eq!(JobReason::parse("SomethingNew"), JobReason::JobFailed);
        let report: JobReport =
            serde_json::from_str(r#"{"ok": false, "kind": "backup", "reason": "SomethingNew"}"#).unwrap();
        assert_eq!(report.reason, Some(JobReason::JobFailed));
    }

    #[test]
    fn a_report_names_what_it_is_and_whether_it_went_well() {
        let r = JobReport::failed(JobKind::Drill, JobReason::RowCountMismatch, &"x".repeat(5000));
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"ok":false,"kind":"drill","reason":"RowCountMismatch","message":"xxx"#), "{text}");
        assert_eq!(serde_json::from_str::<JobReport>(&text).unwrap(), r);
        assert_eq!(r.message.as_deref().map(str::len), Some(1500));
        assert!(serde_json::from_str::<JobReport>(r#"{"ok": true}"#).is_err(), "no kind: no report");
        assert!(serde_json::from_str::<JobReport>(r#"{"kind": "backup"}"#).is_err(), "no outcome: no report");
    }
}
