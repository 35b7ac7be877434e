//! `CrmRestore`: a one-shot request to restore a backup of a `CrmBackupPolicy` into a database.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DatabaseCredentials, LocalObjectReference};

/// Restore one backup of a CrmBackupPolicy into a target database. A restore is a one-shot request: its spec
/// cannot be changed after creation (create a new CrmRestore instead).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "crmguard.io",
    version = "v1alpha1",
    kind = "CrmRestore",
    doc = "A one-shot restore of a CrmBackupPolicy backup into a database, verified against the row counts recorded at backup time.",
    plural = "crmrestores",
    singular = "crmrestore",
    shortname = "crs",
    category = "crmguard",
    namespaced,
    status = "CrmRestoreStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policyRef.name"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".status.backupId"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a CrmRestore is a one-shot request and its spec cannot change; create a new CrmRestore instead"))]
#[serde(rename_all = "camelCase")]
pub struct CrmRestoreSpec {
    /// The CrmBackupPolicy (same namespace) whose backups, bucket and keys are used.
    pub policy_ref: LocalObjectReference,
    /// Which backup to restore: exactly one of `latest`, `id` or `before`.
    pub backup: BackupSelector,
    /// Database that receives the restore. Restoring into the policy's own source database additionally
    /// requires `options.allowOverwriteSource: true`.
    pub target: RestoreTarget,
    /// Restore options.
    #[serde(default)]
    pub options: RestoreOptions,
}

/// Selects exactly one backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.latest) && self.latest ? 1 : 0) + (has(self.id) ? 1 : 0) + (has(self.before) ? 1 : 0) == 1").message("name exactly one backup: latest: true, id: <backup id>, or before: <RFC 3339 time>"))]
pub struct BackupSelector {
    /// The newest verified backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<bool>,
    /// A backup id as listed by `crmguard backup list` or the policy's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub id: Option<String>,
    /// The newest verified backup completed before this time (point-in-time choice), e.g.
    /// `2026-11-28T09:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Time>,
}

/// Database that receives the restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// Host of the target server; defaults to the policy's source host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// Port of the target server; defaults to the policy's source port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Database to restore into, e.g. a scratch database such as `crm_restore_check`.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// Credentials for the target; defaults to the policy's source credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<DatabaseCredentials>,
}

/// Restore options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOptions {
    /// Create the target database when it does not exist.
    #[serde(default = "default_true")]
    pub create_database: bool,
    /// Drop existing objects in the target before restoring them (`pg_restore --clean`).
    #[serde(default)]
    pub clean: bool,
    /// Compare per-table row counts with the counts recorded at backup time; a mismatch fails the restore.
    #[serde(default = "default_true")]
    pub verify_row_counts: bool,
    /// Also restore the attachments volume (when the backup has one).
    #[serde(default)]
    pub restore_attachments: bool,
    /// Allow restoring into the policy's live source database. Off by default so that a typo cannot overwrite
    /// production.
    #[serde(default)]
    pub allow_overwrite_source: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            create_database: true,
            clean: false,
            verify_row_counts: true,
            restore_attachments: false,
            allow_overwrite_source: false,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Lifecycle of a restore.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    /// Accepted; the job is not running yet.
    Pending,
    /// The restore job runs.
    Running,
    /// Restored and verified.
    Succeeded,
    /// Failed; see the `Ready` condition's message.
    Failed,
}

/// Observed state of a CrmRestore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CrmRestoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions, one per type: `Ready` and those of [`conditions`], whose declaration the CRD's description of this
    /// field is generated from (`api::crds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The backup chosen by the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Name of the restore Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// When the restore's Job started, shown once its Pod runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the restore finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Restore duration in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
    /// Bytes restored (uncompressed dump size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_bytes: Option<i64>,
}

/// A CrmRestore's conditions besides `Ready`.
pub mod conditions {
    use crate::api::job::JobReason;

    crate::api::condition::conditions! {
        for super::CrmRestoreStatus;
        /// The backup was restored and verified.
        Restored: Required {
            /// Restored and verified.
            Succeeded,
            /// The restore Job has not started (or its pod has not).
            Pending,
            /// The restore Job runs.
            Running,
            /// The policy's ServiceAccount does not exist yet; the Job is created once it does.
            WaitingForServiceAccount,
            /// A Job of the restore's name exists that it did not create: delete it, or restore under another name.
            JobNameTaken,
            /// The Job was deleted before it finished. A restore never runs twice: create a new CrmRestore.
            JobDeleted,
        } + JobReason
        /// Row counts after the restore match those recorded at backup time.
        Verified: Warning {
            /// Every table has its recorded row count.
            RowCountsMatch,
            /// Row counts were not compared (options.verifyRowCounts is false, or the backup has none).
            NotChecked,
        }
    }
}
