//! `CrmBackupPolicy`: scheduled, compressed, client-side encrypted and verified backups of the CRM database
//! (and optionally its attachments volume) to S3-compatible storage.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DatabaseCredentials, LocalObjectReference, S3Location, SecretKeySelector};

/// Desired backups of one CRM database: what to back up, when, where to, how it is protected, how long it is
/// kept and how it is verified. A backup counts only once it is verified.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "crmguard.io",
    version = "v1alpha1",
    kind = "CrmBackupPolicy",
    doc = "Scheduled, encrypted, verified backups of a CRM database (and its attachments) to S3-compatible storage. See spec for what is backed up, when, where, and how long it is kept.",
    plural = "crmbackuppolicies",
    singular = "crmbackuppolicy",
    shortname = "cbp",
    category = "crmguard",
    namespaced,
    status = "CrmBackupPolicyStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule.cron"),
    printcolumn(name = "Last Backup", type_ = "date", json_path = ".status.lastSuccessfulBackup.completionTime"),
    printcolumn(name = "Backups", type_ = "integer", json_path = ".status.backupCount"),
    printcolumn(
        name = "Healthy",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"BackupHealthy\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.encryption)").message("encryption is required: backups are encrypted by default and need a key, so set encryption.key.vaultTransit or encryption.key.secretRef, or opt out with encryption.enabled: false"))]
pub struct CrmBackupPolicySpec {
    /// The database to back up (and optionally the attachments volume).
    pub source: BackupSource,
    /// When backups run. The operator creates a CronJob with this schedule.
    pub schedule: BackupSchedule,
    /// S3-compatible bucket that receives the backups.
    pub destination: S3Location,
    /// Client-side encryption of every backup. On by default, so it needs a key (`key.vaultTransit` or
    /// `key.secretRef`) unless it is explicitly turned off with `enabled: false`; omitting it is refused.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub encryption: Encryption,
    /// zstd compression of the dump before encryption.
    #[serde(default)]
    pub compression: Compression,
    /// Which backups to keep. Omit to keep every backup. Retention never deletes the newest verified backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// How each backup is verified after upload, and optional scheduled restore drills.
    #[serde(default)]
    pub verification: Verification,
    /// Recovery point objective: the maximum age of the newest verified backup, e.g. `26h`. When the newest
    /// verified backup is older, the `BackupHealthy` condition turns False.
    #[serde(default = "default_rpo")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("rpo must be a positive duration such as 26h"))]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub rpo: String,
    /// Pause scheduling new backups (running backups finish; existing backups are untouched).
    #[serde(default)]
    pub suspend: bool,
    /// Compute resources of the backup job's container. Quantities are checked as the API server would check them
    /// in the pod template (e.g. `500m`, `1Gi`; a request not above its limit): a bad one is Ready=False, InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_resources: Option<ResourceRequirements>,
}

fn default_rpo() -> String {
    "26h".into()
}

/// Database engines crmguard can dump and restore.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL, dumped with `pg_dump` and restored with `pg_restore`.
    Postgres,
    /// MySQL or MariaDB, dumped with `mysqldump` and restored with `mysql`.
    Mysql,
}

impl Engine {
    /// The engine's default TCP port.
    pub fn default_port(self) -> u16 {
        match self {
            Engine::Postgres => 5432,
            Engine::Mysql => 3306,
        }
    }
}

/// TLS to the database, in libpq's terms (mapped to the equivalent MySQL `--ssl-mode`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// No TLS. Credentials and data cross the network in clear; reported as a warning.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; reported as a warning.
    #[default]
    Prefer,
    /// TLS required, server certificate not checked.
    Require,
    /// TLS required, server certificate checked against the CA.
    VerifyCa,
    /// TLS required, certificate checked against the CA and the host name.
    VerifyFull,
}

/// The database (and optional files) to back up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.tlsMode in ['verify-ca', 'verify-full']) || has(self.caSecretRef)").message("tlsMode verify-ca and verify-full need caSecretRef: name the Secret key that holds the database server's CA certificate"))]
pub struct BackupSource {
    /// Database engine.
    pub engine: Engine,
    /// Host name of the database server, e.g. `crm-db.crm.svc`.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port. Defaults to 5432 for postgres and 3306 for mysql.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Name of the database to back up.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// TLS to the database.
    #[serde(default)]
    pub tls_mode: TlsMode,
    /// Secret key holding the CA certificate (PEM) used to verify the database server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeySelector>,
    /// How the backup job logs in to the database.
    pub credentials: DatabaseCredentials,
    /// A PersistentVolumeClaim with the CRM's attachments, backed up as a tar stream next to the dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<AttachmentsSource>,
}

/// The CRM's attachments volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentsSource {
    /// Name of the PersistentVolumeClaim (same namespace), mounted read-only into the backup job.
    #[schemars(length(min = 1, max = 253))]
    pub pvc_name: String,
    /// Sub-directory of the volume to back up; the whole volume when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("subPath must be relative and must not contain '..'"))]
    pub sub_path: Option<String>,
}

/// Backup schedule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedule {
    /// Standard 5-field cron expression (minute hour day-of-month month day-of-week) or a macro such as
    /// `@daily`, e.g. `15 2 * * *` for 02:15 every day.
    #[schemars(length(min = 1, max = 128))]
    pub cron: String,
    /// IANA time zone of the schedule, e.g. `Europe/Berlin`. Defaults to UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Seconds after a missed scheduled time during which the backup may still start.
    #[serde(default = "default_starting_deadline")]
    #[schemars(range(min = 10))]
    pub starting_deadline_seconds: i64,
}

fn default_starting_deadline() -> i64 {
    600
}

/// Authenticated encryption algorithm of the backup stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// AES-256-GCM in a chunked STREAM construction (fastest on CPUs with AES instructions).
    #[default]
    Aes256Gcm,
    /// XChaCha20-Poly1305 in a chunked STREAM construction.
    Xchacha20Poly1305,
}

/// Client-side encryption settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.key)").message("backups are encrypted by default and need a key: set encryption.key.vaultTransit or encryption.key.secretRef, or opt out with encryption.enabled: false"))]
pub struct Encryption {
    /// Encrypt backups before they leave the pod. Turning this off is reported by the posture report.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Stream cipher.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Key that wraps each backup's random data key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<EncryptionKey>,
}

impl Default for Encryption {
    fn default() -> Self {
        Encryption { enabled: true, algorithm: Algorithm::default(), key: None }
    }
}

fn default_true() -> bool {
    true
}

/// Leaves a field's schema without a `default`: the API server validates defaults against the schema's rules,
/// and a default that fails them (an enabled encryption without a key) makes the whole CRD invalid.
fn without_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// The key-encryption key: exactly one of `vaultTransit` or `secretRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.vaultTransit) != has(self.secretRef)").message("set exactly one of encryption.key.vaultTransit or encryption.key.secretRef"))]
pub struct EncryptionKey {
    /// A Vault Transit key wraps the data key; the key never leaves Vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_transit: Option<VaultTransitKey>,
    /// A 32-byte key (base64 or raw) in a Secret wraps the data key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeySelector>,
}

/// A named key of Vault's Transit secrets engine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultTransitKey {
    /// Mount path of the Transit engine.
    #[serde(default = "default_transit_mount")]
    pub mount: String,
    /// Name of the Transit key.
    #[schemars(length(min = 1, max = 128))]
    pub key_name: String,
    /// Role of Vault's Kubernetes auth method that the job logs in as.
    #[schemars(length(min = 1, max = 128))]
    pub auth_role: String,
    /// Mount path of Vault's Kubernetes auth method.
    #[serde(default = "super::common::default_kubernetes_auth_mount")]
    pub auth_mount: String,
}

fn default_transit_mount() -> String {
    "transit".into()
}

/// zstd compression.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// zstd level, 1 (fastest, the default) to 19. Measured on CRM-like dumps, level 3 stored slightly more than
    /// level 1 (464 vs 430 MiB of a 2053 MiB dump) in 1.4 to 2 times the time: raise it only after measuring
    /// your own data (`bench/backup.sh --level N`).
    #[serde(default = "default_level")]
    #[schemars(range(min = 1, max = 19))]
    pub level: i32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression { level: default_level() }
    }
}

fn default_level() -> i32 {
    1
}

/// How many backups to keep. Counts combine like restic's `forget`: a backup is kept when any rule keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.keepLast) ? self.keepLast : 0) + (has(self.keepDaily) ? self.keepDaily : 0) + (has(self.keepWeekly) ? self.keepWeekly : 0) + (has(self.keepMonthly) ? self.keepMonthly : 0) > 0").message("retention must keep at least one backup: set keepLast, keepDaily, keepWeekly or keepMonthly above 0, or remove retention to keep everything"))]
pub struct Retention {
    /// Keep the newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_last: Option<i32>,
    /// Keep the newest backup of each of the last N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_daily: Option<i32>,
    /// Keep the newest backup of each of the last N ISO weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_weekly: Option<i32>,
    /// Keep the newest backup of each of the last N months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_monthly: Option<i32>,
}

/// How much of a backup is re-read after upload.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerificationMode {
    /// Re-read everything: sha256 of the stored bytes and a full decrypt + decompress pass.
    #[default]
    Full,
    /// sha256 of all stored bytes, decrypt + decompress of a sample of chunks.
    Sampled,
}

/// Verification of backups.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'sampled' || has(self.samplePercent)").message("verification.mode sampled needs samplePercent (1-100)"))]
pub struct Verification {
    /// Verification after each backup.
    #[serde(default)]
    pub mode: VerificationMode,
    /// Percentage of chunks decrypted when `mode` is `sampled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub sample_percent: Option<i32>,
    /// Scheduled restore drills: the newest backup is restored into a scratch database and its per-table row
    /// counts are compared with those recorded at backup time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_drill: Option<RestoreDrill>,
}

impl Default for Verification {
    fn default() -> Self {
        Verification { mode: VerificationMode::Full, sample_percent: None, restore_drill: None }
    }
}

/// A scheduled restore drill.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDrill {
    /// 5-field cron expression or macro, e.g. `0 4 * * 0` (Sundays 04:00).
    #[schemars(length(min = 1, max = 128))]
    pub cron: String,
    /// Scratch database the drill restores into; it is dropped and re-created by each drill. Must differ from
    /// the source database.
    #[schemars(length(min = 1, max = 63))]
    pub scratch_database: String,
}

/// Facts about one backup as recorded in its manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// Backup id (also its key prefix in the bucket).
    pub id: String,
    /// When the backup finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes stored in S3 (compressed and encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<i64>,
    /// sha256 of the stored bytes (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Duration of the backup in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
}

/// Result of the last restore drill or verified restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedRestore {
    /// Backup that was restored.
    pub backup_id: String,
    /// When the restore finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Measured restore duration in seconds (the recovery time actually achieved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
}

/// Observed state of a CrmBackupPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CrmBackupPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions, one per type: `Ready` and those of [`conditions`], whose declaration the CRD's description of this
    /// field is generated from (`api::crds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Name of the CronJob that runs the backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron_job_name: Option<String>,
    /// The newest verified backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<BackupRecord>,
    /// When the last backup attempt failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Number of complete (manifested) backups in the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_count: Option<i64>,
    /// Next scheduled run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// The last restore that was verified against the backup's recorded row counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_restore: Option<VerifiedRestore>,
    /// Jobs whose reports were ignored because the operator cannot prove they are the policy's own (not created
    /// by its CronJobs, not run as its ServiceAccount, or not signed with its report key): still present, or
    /// seen in the last 7 days. Each raised a `ForgedReport` Event; the posture report fails while any is listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["job"]))]
    pub rejected_reports: Vec<RejectedReport>,
}

/// A Job whose report did not count.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedReport {
    /// Name of the Job.
    pub job: String,
    /// Why its report was ignored.
    pub reason: String,
    /// When the operator first saw it.
    pub time: Time,
}

/// Reference to a policy used by other kinds.
pub type PolicyReference = LocalObjectReference;

/// A CrmBackupPolicy's conditions besides `Ready`.
pub mod conditions {
    use crate::api::job::JobReason;

    crate::api::condition::conditions! {
        for super::CrmBackupPolicyStatus;
        /// Backups run on the schedule.
        ScheduleReady: Required {
            /// The CronJob runs the backups on spec.schedule.
            Scheduled,
            /// spec.suspend is true: no new backups start.
            Suspended,
        }
        /// The newest verified backup is within the RPO and the last run succeeded.
        BackupHealthy: Required {
            /// The newest verified backup is within the RPO.
            BackupVerified,
            /// The newest verified backup is older than the RPO.
            BackupTooOld,
            /// A new policy (younger than its RPO) has no verified backup yet (status Unknown).
            NoBackupYet,
            /// No verified backup exists although the policy is older than its RPO.
            NoBackup,
        } + JobReason
        /// The restore drill (spec.verification.restoreDrill) restored the newest backup with matching row counts.
        RestoreVerified: BlocksWhenFalse {
            /// The last drill passed.
            DrillPassed,
            /// No drill has run yet (status Unknown).
            NoDrillYet,
        } + JobReason
        /// The operator knows Vault's address, from which the policy reads credentials or keys (reported only when
        /// it does not).
        VaultConfigured: Required {
            /// The operator has no Vault address: set vault.address in the Helm values (--vault-addr).
            VaultAddressMissing,
        }
        /// The status comes only from the policy's own jobs, whose reports are signed with its report key.
        ReportsTrusted: Warning {
            /// Every report read was the policy's own.
            OwnJobsOnly,
            /// The report key Secret is not the policy's own; delete it and crmguard creates the policy's own.
            ReportKeyUnusable,
            /// Reports of jobs that are not provably the policy's own were ignored (status.rejectedReports).
            ForgedReport,
        }
        /// The database, S3 and Vault are reached over TLS.
        EncryptedInTransit: Warning {
            /// Every connection uses TLS.
            TlsEverywhere,
            /// Something is reached without TLS; the message says what.
            PlaintextEndpoint,
        }
    }
}

crate::api::condition::reasons! {
    /// The reasons of the Events a CrmBackupPolicy's controller records, besides `Ready`'s.
    pub enum BackupPolicyEvent {
        /// A Job's report was ignored: it is not provably the policy's own (the Event is also about the Job).
        ForgedReport,
    }
}

impl crate::api::condition::EventReason for BackupPolicyEvent {
    type Status = CrmBackupPolicyStatus;
}
