//! `AccessPolicy`: least-privilege Kubernetes RBAC per team, and Vault-managed, short-lived, per-team database
//! credentials.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeySelector;

/// Who may do what with the CRM: one entry per team. For each team crmguard creates a Role and RoleBinding,
/// a Vault policy, a Vault Kubernetes-auth role and a database role whose grants are exactly the team's, and
/// keeps short-lived database credentials in a Secret, renewed and rotated.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "crmguard.io",
    version = "v1alpha1",
    kind = "AccessPolicy",
    doc = "Per-team least-privilege access to the CRM: Kubernetes RBAC, Vault policies and short-lived database credentials delivered into Secrets.",
    plural = "accesspolicies",
    singular = "accesspolicy",
    shortname = "ap",
    category = "crmguard",
    namespaced,
    status = "AccessPolicyStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Teams", type_ = "integer", json_path = ".status.teamCount"),
    printcolumn(name = "Next Expiry", type_ = "string", json_path = ".status.nextExpiry"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.vault) || self.teams.all(t, !has(t.vault) && !has(t.database))").message("teams with vault or database grants need spec.vault (at least vault: {} to use the operator's Vault address and default mounts)"))]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// The teams and their grants. Team names are unique.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub teams: Vec<Team>,
    /// Vault settings shared by all teams. Required when any team has `vault` or `database` grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSettings>,
    /// AccessMonitors (this namespace) whose open incidents may hold a team's database credentials (their
    /// `spec.response.revokeCredentials`): the team's leases are revoked and none is issued until the incident is
    /// acknowledged or the monitor deleted. Empty: no monitor may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub accept_holds_from: Vec<String>,
}

/// One team.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.database) || has(self.credentials)").message("a team with database grants needs credentials (at least credentials: {} to use the defaults) so crmguard knows where to deliver them"))]
pub struct Team {
    /// Team name, a DNS label such as `sales`; used in the names of everything created for the team.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"))]
    pub name: String,
    /// Members: users, groups and service accounts.
    #[schemars(length(min = 1, max = 256))]
    pub subjects: Vec<Subject>,
    /// Kubernetes permissions in this namespace. Each must lie within the grant ceiling ClusterRole (Helm value
    /// accessPolicy.grantCeiling.rules), else the policy is refused (Ready=False, BeyondGrantCeiling), and with the
    /// chart's admission policy the author must hold them (or may bind the ceiling). Wildcards (`*`) are honoured
    /// within the ceiling but reported as a warning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub kubernetes: Vec<KubernetesGrant>,
    /// Vault paths the team may use. Each must start with a prefix the operator allows (by default
    /// `secret/data/<namespace>/` or `secret/metadata/<namespace>/`; Helm value accessPolicy.vaultPathPrefixes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub vault: Vec<VaultGrant>,
    /// Database privileges, issued as short-lived credentials by Vault's database secrets engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseAccess>,
    /// How database credentials are delivered and rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialDelivery>,
}

/// Kind of an RBAC subject.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SubjectKind {
    /// A user as the cluster's authenticator names it.
    User,
    /// A group as the cluster's authenticator names it.
    Group,
    /// A ServiceAccount.
    ServiceAccount,
}

/// A member of a team.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'ServiceAccount' || !has(self.__namespace__)").message("namespace is only meaningful for kind ServiceAccount"))]
pub struct Subject {
    /// User, Group or ServiceAccount.
    pub kind: SubjectKind,
    /// Name of the user, group or service account.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of a ServiceAccount; defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Kubernetes permissions on resources in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesGrant {
    /// API groups, `""` for the core group (pods, secrets, configmaps, ...).
    #[serde(default = "core_group")]
    pub api_groups: Vec<String>,
    /// Resources, e.g. `pods`, `pods/log`, `deployments`.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 253)))]
    pub resources: Vec<String>,
    /// Verbs, e.g. `get`, `list`, `watch`.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 32)))]
    #[x_kube(validation = Rule::new("self.all(v, v in ['get', 'list', 'watch', 'create', 'update', 'patch', 'delete', 'deletecollection', '*'])").message("verbs must be among get, list, watch, create, update, patch, delete, deletecollection or '*'"))]
    pub verbs: Vec<String>,
    /// Restrict the grant to these object names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    /// The grant is removed at this time (RFC 3339), e.g. for break-glass access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

fn core_group() -> Vec<String> {
    vec![String::new()]
}

/// Capabilities on a Vault path.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VaultCapability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Deny,
}

/// A Vault path and what the team may do with it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultGrant {
    /// Vault path (globs as in Vault policies), e.g. `secret/data/crm/sales/*`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("Vault paths have no leading '/': write secret/data/crm/*"))]
    pub path: String,
    /// Capabilities on the path.
    #[schemars(length(min = 1, max = 7))]
    pub capabilities: Vec<VaultCapability>,
    /// The grant is removed at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// SQL privileges a team's database role may hold.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum SqlPrivilege {
    Select,
    Insert,
    Update,
    Delete,
}

/// The team's database access.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseAccess {
    /// Name of the database connection configured in Vault's database secrets engine.
    #[schemars(length(min = 1, max = 128))]
    pub connection: String,
    /// Grants on tables.
    #[schemars(length(min = 1, max = 64))]
    pub grants: Vec<DatabaseGrant>,
}

/// Privileges on named tables of one schema.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseGrant {
    /// Database schema.
    #[serde(default = "default_schema")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"))]
    pub schema: String,
    /// Tables the privileges apply to. Names are plain identifiers: letters, digits and underscores, not
    /// starting with a digit, at most 63 characters (checked by the schema's pattern, which costs no CEL budget).
    #[schemars(
        length(min = 1, max = 256),
        inner(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"))
    )]
    pub tables: Vec<String>,
    /// Privileges on those tables.
    #[schemars(length(min = 1, max = 4))]
    pub privileges: Vec<SqlPrivilege>,
    /// The grant is removed at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

fn default_schema() -> String {
    "public".into()
}

/// Kind of workload restarted after a credential rotation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// A workload in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: WorkloadKind,
    /// Name of the workload.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Delivery and rotation of a team's database credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.ttl) <= duration(self.maxTtl)").message("ttl must not exceed maxTtl"))]
pub struct CredentialDelivery {
    /// Secret that receives `username` and `password`; defaults to `<policy>-<team>-db`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub secret_name: Option<String>,
    /// Lease duration of each credential, e.g. `1h`.
    #[serde(default = "default_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("ttl must be at least 1m"))]
    pub ttl: String,
    /// Maximum lifetime of a credential; it is re-issued before this, e.g. `24h`.
    #[serde(default = "default_max_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub max_ttl: String,
    /// Renew the lease when this percentage of its TTL has passed.
    #[serde(default = "default_renew_percent")]
    #[schemars(range(min = 10, max = 90))]
    pub renew_at_percent: i32,
    /// After a rotation, the previous credential is revoked after this grace period, e.g. `5m`.
    #[serde(default = "default_grace")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub revoke_grace_period: String,
    /// Workloads that get one rolling restart after each rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub restart_workloads: Vec<WorkloadRef>,
}

fn default_ttl() -> String {
    "1h".into()
}
fn default_max_ttl() -> String {
    "24h".into()
}
fn default_renew_percent() -> i32 {
    67
}
fn default_grace() -> String {
    "5m".into()
}

impl Default for CredentialDelivery {
    /// `credentials: {}`: the CRD's defaults.
    fn default() -> Self {
        CredentialDelivery {
            secret_name: None,
            ttl: default_ttl(),
            max_ttl: default_max_ttl(),
            renew_at_percent: default_renew_percent(),
            revoke_grace_period: default_grace(),
            restart_workloads: vec![],
        }
    }
}

/// Vault connection and mounts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultSettings {
    /// Vault address; defaults to the operator's `--vault-addr`. Another address must be allowed by the
    /// administrator (Helm value vault.allowedAddresses): the operator logs in there with its own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("vault.address must be a URL such as https://vault.vault.svc:8200"))]
    pub address: Option<String>,
    /// Mount path of the Kubernetes auth method in which team roles are created.
    #[serde(default = "super::common::default_kubernetes_auth_mount")]
    pub kubernetes_auth_mount: String,
    /// Mount path of the database secrets engine.
    #[serde(default = "default_database_mount")]
    pub database_mount: String,
    /// When set, crmguard configures the database connection in Vault from this Secret (keys
    /// `connection_url`, `username`, `password`, optional `plugin_name`), so nothing is configured by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<SecretKeySelector>,
}

fn default_database_mount() -> String {
    "database".into()
}

impl Default for VaultSettings {
    /// `vault: {}`: the operator's address and the default mounts.
    fn default() -> Self {
        VaultSettings {
            address: None,
            kubernetes_auth_mount: super::common::default_kubernetes_auth_mount(),
            database_mount: default_database_mount(),
            connection_secret_ref: None,
        }
    }
}

/// Observed state of one team.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct TeamStatus {
    /// Team name.
    pub name: String,
    /// Role and RoleBinding name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Vault policy name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_policy: Option<String>,
    /// Vault Kubernetes-auth roles the team's ServiceAccounts log in with (one per ServiceAccount namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vault_roles: Vec<String>,
    /// Secret with the current credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the current credentials expire (never the credentials themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_expire_at: Option<Time>,
    /// Grants that have expired and were removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired_grants: Vec<String>,
}

/// Observed state of an AccessPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions, one per type: `Ready` and those of [`conditions`], whose declaration the CRD's description of this
    /// field is generated from (`api::crds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of teams in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_count: Option<i32>,
    /// Per-team state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<TeamStatus>,
    /// The next instant a grant expires or a credential must be renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_expiry: Option<Time>,
    /// resourceVersion of the `spec.vault.connectionSecretRef` Secret last written to Vault (a change rewrites
    /// the connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_version: Option<String>,
}

/// An AccessPolicy's conditions besides `Ready`.
pub mod conditions {
    use crate::api::condition::VaultFailure;

    crate::api::condition::conditions! {
        for super::AccessPolicyStatus;
        /// The teams' Roles and RoleBindings are applied.
        RbacApplied: Required {
            /// Every team's Role and RoleBinding is in effect.
            Applied,
            /// The grant ceiling ClusterRole does not exist, so no Kubernetes grant is applied: install it with
            /// the Helm chart (accessPolicy.grantCeiling) or name another with --grant-ceiling.
            GrantCeilingMissing,
            /// A grant goes beyond the grant ceiling; nothing of the policy is applied. The message names the
            /// grant.
            BeyondGrantCeiling,
        }
        /// The teams' Vault policies, Kubernetes-auth roles and database roles are written.
        VaultConfigured: Required {
            /// No team has Vault or database grants.
            NotRequested,
            /// Vault holds what the teams need.
            Synced,
            /// A database connection the grants name is not configured in Vault; retried.
            DatabaseConnectionMissing,
        } + VaultFailure
        /// The teams with database grants hold live, short-lived database credentials in their Secrets.
        CredentialsIssued: Required {
            /// No team has live database grants.
            NotRequested,
            /// Every team's credentials are issued or renewed.
            Issued,
            /// A database grant names an identifier that is not a plain SQL name; the message names it.
            InvalidGrant,
            /// The database connection a team's grants name is not configured in Vault; retried.
            DatabaseConnectionMissing,
            /// A Secret of the team's credentials name exists that the policy does not manage: delete it or set
            /// credentials.secretName to another name.
            SecretConflict,
            /// An AccessMonitor's incident holds a team's credentials: its leases are revoked and no new one is issued
            /// until the incident is acknowledged (the message names the monitor and the incident).
            CredentialsHeld,
        } + VaultFailure
        /// Every grant names its verbs and resources.
        LeastPrivilege: Warning {
            /// No grant uses a wildcard.
            NoWildcards,
            /// A grant uses a wildcard verb or resource; the message names it.
            BroadGrant,
        }
    }
}

crate::api::condition::reasons! {
    /// The reasons of the Events an AccessPolicy's controller records, besides `Ready`'s.
    pub enum AccessPolicyEvent {
        /// A grant's `expiresAt` passed; it was removed from RBAC and Vault.
        GrantExpired,
        /// A team's first database credentials were issued into its Secret.
        CredentialsIssued,
        /// A team's credentials were replaced (renewal limit, grants changed, or revoked); the note says when the
        /// previous one is revoked.
        CredentialsRotated,
        /// A replaced credential was revoked: after its grace period, or as soon as the new Secret is written when its
        /// grants were narrowed.
        CredentialsRevoked,
        /// Revoking a credential failed; retried at the next pass (a new credential waits until an older one that
        /// is still recorded is revoked).
        RevokeFailed,
        /// Credentials expired without renewal because Vault could not be used.
        CredentialsExpired,
        /// A team lost its database grants: its Secret was deleted and its leases revoked (without Vault in the policy
        /// any more, they run out on their own).
        CredentialsRemoved,
        /// An AccessMonitor's incident put a hold on a team's credentials: its leases were revoked and its Secret
        /// emptied; new credentials are issued once the incident is acknowledged.
        CredentialsHeld,
    }
}

impl crate::api::condition::EventReason for AccessPolicyEvent {
    type Status = AccessPolicyStatus;
}
