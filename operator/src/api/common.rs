//! Types shared by several custom resources: references to Secrets, Vault sources, S3 locations and durations.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every crmguard custom resource.
pub const GROUP: &str = "crmguard.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// Pattern of a Go-style duration as Kubernetes and Vault accept it, e.g. `90s`, `15m`, `26h`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A key inside a Secret in the same namespace as the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret (same namespace as this resource).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret holding a database user name and password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSecretRef {
    /// Name of the Secret (same namespace as this resource).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the user name in the Secret.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// Where a workload reads a secret from Vault. The job logs in with Vault's Kubernetes auth method using its
/// ServiceAccount token, so no Vault token is ever stored in the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultSource {
    /// Vault path to read. A database secrets engine path such as `database/creds/crm-backup` issues
    /// short-lived credentials (preferred); a KV v2 path such as `secret/data/crm/db` must hold the keys
    /// `username` and `password` (or `access_key`/`secret_key` for S3).
    #[schemars(length(min = 1, max = 512))]
    pub path: String,
    /// Role of Vault's Kubernetes auth method that the job's ServiceAccount logs in as.
    #[schemars(length(min = 1, max = 128))]
    pub auth_role: String,
    /// Mount path of the Kubernetes auth method in Vault.
    #[serde(default = "default_kubernetes_auth_mount")]
    pub auth_mount: String,
}

pub(crate) fn default_kubernetes_auth_mount() -> String {
    "kubernetes".into()
}

/// Credentials of the database: exactly one of `secretRef` or `vault`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.vault)").message("set exactly one of credentials.secretRef (a Secret with username/password) or credentials.vault (a Vault path)"))]
pub struct DatabaseCredentials {
    /// A Secret in this namespace with the user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<DatabaseSecretRef>,
    /// Read the credentials from Vault at backup time (dynamic database credentials recommended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSource>,
}

/// A Secret holding S3 access keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3SecretRef {
    /// Name of the Secret (same namespace as this resource).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the access key id in the Secret.
    #[serde(default = "default_access_key_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key in the Secret.
    #[serde(default = "default_secret_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_key() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

/// Credentials for S3: at most one of `secretRef` or `vault`; with neither, the ambient AWS credential chain
/// of the job's pod is used (for example IRSA or EKS Pod Identity on the job's ServiceAccount).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.secretRef) && has(self.vault))").message("set at most one of credentials.secretRef or credentials.vault; omit both to use the pod's ambient AWS credentials"))]
pub struct S3Credentials {
    /// A Secret in this namespace with the access key id and secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<S3SecretRef>,
    /// Read the keys from Vault at backup time (KV v2 with `access_key`/`secret_key`, or an AWS secrets engine
    /// path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSource>,
}

/// An S3-compatible bucket and prefix where backups are written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Location {
    /// Bucket name (3-63 characters: lower-case letters, digits, dots and hyphens).
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"))]
    pub bucket: String,
    /// Key prefix inside the bucket, without a leading slash. Defaults to `<namespace>/<policy name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("prefix must not start with '/' or contain '..'; write it like 'crm/prod'"))]
    #[schemars(length(max = 512))]
    pub prefix: Option<String>,
    /// Region of the bucket. Any value works for most S3-compatible servers.
    #[serde(default = "default_region")]
    pub region: String,
    /// Endpoint URL of an S3-compatible server, e.g. `https://minio.storage.svc:9000`. Omit for AWS S3.
    /// A plain `http://` endpoint works but is reported as a warning: backups are encrypted, yet the
    /// transfer and the S3 credentials are not protected in transit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("endpoint must be a URL starting with https:// (or http://), e.g. https://s3.example.com"))]
    #[x_kube(validation = Rule::new("isURL(self)").message("endpoint is not a valid URL"))]
    pub endpoint: Option<String>,
    /// Address buckets as `<endpoint>/<bucket>` instead of `<bucket>.<endpoint>` (needed by MinIO, SeaweedFS,
    /// Ceph RGW and most S3-compatible servers).
    #[serde(default)]
    pub force_path_style: bool,
    /// How the job authenticates to S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Secret key holding the CA certificate (PEM) of an S3 endpoint signed by a private CA; trusted in addition
    /// to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeySelector>,
    /// How long one transfer (an upload part, a download, the manifest) may keep retrying through failures of
    /// the endpoint (connection refused or reset, timeouts, 5xx, throttling) before the job fails, e.g. `5m`.
    /// Retries wait 0.5 s doubling to 15 s with jitter; an interrupted download resumes where it stopped and a
    /// failed part is sent again into the same multipart upload, so a restarting endpoint costs seconds, not the
    /// backup. Errors that retrying cannot fix (credentials, a missing bucket) fail at once.
    #[serde(default = "default_transfer_deadline")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("transferDeadline must be a duration of at least 1s such as 5m"))]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub transfer_deadline: String,
}

fn default_transfer_deadline() -> String {
    "5m".into()
}

fn default_region() -> String {
    "us-east-1".into()
}

/// A reference to an object by name in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Error from parsing a Go-style duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: write it like 90s, 15m, 26h or 1h30m (units ns, us, ms, s, m, h)")]
pub struct DurationError {
    input: String,
}

/// Parses a Go-style duration (`1h30m`, `90s`, `1.5h`), the syntax Kubernetes' CEL `duration()` and Vault use.
pub fn parse_duration(input: &str) -> Result<std::time::Duration, DurationError> {
    let err = || DurationError { input: input.to_string() };
    if input.is_empty() {
        return Err(err());
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = input;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total_nanos += value * scale;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return Err(err());
    }
    Ok(std::time::Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_malformed_durations_with_a_hint() {
        for bad in ["", "h", "10", "10d", "1h-5m", "abc", "1..5h"] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("write it like 90s"), "{bad}: {err}");
        }
    }
}
