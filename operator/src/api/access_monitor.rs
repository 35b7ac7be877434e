//! `AccessMonitor`: who touched which customer data. The database's own audit log (PostgreSQL's pgaudit, MariaDB's
//! server_audit) is read from the database pod's log through the API, every statement attributed to the team whose
//! short-lived credential ran it (or to an identity the spec names), kept as access records in the audit trail
//! without any literal value, and checked against declarative rules; what breaks a rule is a finding.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Watch a CRM database's audit log: attribute every statement to a team's credential or a named identity, record
/// who touched which table in the audit trail, and report findings (a team outside its grants, an identity nobody
/// issued or named, DDL outside a change window, bulk reads of a sensitive table, bursts of failed logins).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "crmguard.io",
    version = "v1alpha1",
    kind = "AccessMonitor",
    doc = "Database access monitoring for the CRM: statements from the database's audit log attributed to teams and identities, recorded in the audit trail, and checked against rules.",
    plural = "accessmonitors",
    singular = "accessmonitor",
    shortname = "am",
    category = "crmguard",
    namespaced,
    status = "AccessMonitorStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Engine", type_ = "string", json_path = ".spec.database.engine"),
    printcolumn(name = "Entries", type_ = "integer", json_path = ".status.entries"),
    printcolumn(name = "Findings", type_ = "integer", json_path = ".status.findingCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.rules) || !has(self.rules.rowVolume) || size(self.rules.rowVolume) == 0 || has(self.database.statistics)").message("rules.rowVolume counts rows from the database's statistics: set spec.database.statistics (a monitoring role's connection Secret and sslMode)"))]
#[x_kube(validation = Rule::new("!has(self.rules) || !has(self.rules.rowVolume) || size(self.rules.rowVolume) == 0 || !has(self.interval) || duration(self.interval) <= duration('1m')").message("rules.rowVolume limits rows per minute: the interval must be at most 1m"))]
pub struct AccessMonitorSpec {
    /// The database whose audit log is read.
    pub database: MonitoredDatabase,
    /// AccessPolicies (this namespace) whose teams' database credentials are attributed; empty: every AccessPolicy
    /// of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub access_policies: Vec<String>,
    /// Database users crmguard does not issue (e.g. the CRM application's own) and who they are. A user that is
    /// neither issued by an attributed AccessPolicy nor listed here is an unknown identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["user"]))]
    pub identities: Vec<KnownIdentity>,
    /// What makes a finding.
    #[serde(default)]
    pub rules: Rules,
    /// What crmguard does about findings on its own: nothing unless asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    /// How often the log is read, e.g. `5s` (at least 1s, at most 5m).
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('5m')").message("interval must be between 1s and 5m, e.g. 5s"))]
    pub interval: String,
}

fn default_interval() -> String {
    "5s".into()
}

impl AccessMonitor {
    /// The teams whose credentials this monitor's open incidents hold for AccessPolicy `policy`: team -> the hold,
    /// as the AccessPolicy's condition names it (`AccessMonitor <namespace>/<name>: incident <id>`).
    pub fn holds(&self, policy: &str) -> std::collections::BTreeMap<String, String> {
        let ns = self.metadata.namespace.as_deref().unwrap_or_default();
        let name = self.metadata.name.as_deref().unwrap_or_default();
        self.status
            .iter()
            .flat_map(|s| s.incidents.iter())
            .filter(|i| i.acknowledged.is_none() && !i.dry_run && i.holds_credentials && i.access_policy == policy)
            .map(|i| (i.team.clone(), format!("AccessMonitor {ns}/{name}: incident {}", i.id)))
            .collect()
    }
}

/// Database servers whose audit log crmguard reads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MonitoredEngine {
    /// PostgreSQL with pgaudit: `shared_preload_libraries = 'pgaudit'`, `pgaudit.log = 'read, write, ddl, role'`,
    /// `log_line_prefix = '%m [%p] %q%u@%d '`, `CREATE EXTENSION pgaudit`, the log on the container's stderr.
    Postgres,
    /// MariaDB with its audit plugin: `plugin_load_add = server_audit`, `server_audit_logging = ON`,
    /// `server_audit_events = CONNECT,QUERY,TABLE`, and the plugin's file on the container's output
    /// (`server_audit_file_path = /dev/stderr`).
    Mysql,
}

/// The database pod and the container whose log carries the audit entries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoredDatabase {
    /// `postgres` (pgaudit) or `mysql` (MariaDB's server_audit).
    pub engine: MonitoredEngine,
    /// The database pod (this namespace). When several pods that have not finished match, the first by name is
    /// read (a StatefulSet's `-0`); the others are not.
    pub pod_selector: LabelSelector,
    /// The container whose log is read; the pod's first container when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,
    /// Where the rows read come from (`rules.rowVolume`): the database's own statement statistics, sampled at every
    /// interval through a read-only monitoring role: PostgreSQL's pg_stat_statements, MariaDB's performance_schema.
    /// Absent: rows are not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<DatabaseStatistics>,
}

/// A monitoring role's connection to the database, for its statement statistics. PostgreSQL: the role needs
/// `pg_read_all_stats` (nothing else: it reads no table), the server `shared_preload_libraries` with
/// `pg_stat_statements` and the database `CREATE EXTENSION pg_stat_statements` (in schema public); only the Secret's
/// database is counted; a statement's text is fetched only for reads the server normalized (SELECT, VALUES, TABLE,
/// WITH) and, of `COPY x TO`, the table's name: other texts can hold literals. MariaDB: the server
/// `performance_schema=ON` (a restart), the role `GRANT SELECT ON performance_schema.*`; it counts rows per
/// statement and per user, not per user and table, so a user's rows of a table are at most the lesser of the two,
/// for the users the audit log places at the table. The operator must be able to reach the database's port (chart:
/// `networkPolicy.extraEgressPorts`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatistics {
    /// A Secret of this namespace with the connection, under the key names CloudNativePG uses: `host` (resolved
    /// from the operator's namespace: give a Service as `<name>.<namespace>.svc`), `port` (5432 when absent, 3306
    /// for MariaDB), `username`, `password`, `dbname` (PostgreSQL; `postgres` when absent), and `ca.crt` (PEM) for
    /// `sslMode: verify-full`.
    /// A Secret of its own for the monitoring role (a CloudNativePG app Secret's role lacks `pg_read_all_stats`).
    /// Writing a monitor that names it requires `get` on it (the chart's admission policy).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// `verify-full`: TLS, the server's certificate checked against the Secret's `ca.crt` and its name against
    /// `host`, before anything else is sent; `disable`: no TLS, only for a trusted network (a server that is not the
    /// database but answers on its address gets the login: a cleartext or MD5 password if it asks for one, on
    /// MariaDB the password encrypted to a key of its choosing).
    pub ssl_mode: SslMode,
}

/// TLS to the database.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SslMode {
    /// No TLS.
    #[serde(rename = "disable")]
    Disable,
    /// TLS with the server's certificate and name verified.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

/// A database user crmguard does not issue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KnownIdentity {
    /// The database user, e.g. `crm_app`.
    #[schemars(length(min = 1, max = 128))]
    pub user: String,
    /// Who it is, e.g. `crm-web (the CRM application)`: shown in records and findings.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Tables it is expected to touch (`schema.table`, `database.table` on MariaDB); a statement on another is
    /// outside its grants. Empty: any table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,
}

/// What makes a finding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rules {
    /// A team's statement on a table its AccessPolicy does not grant it (or with a privilege it does not grant),
    /// any DDL or role statement by a team, a statement the database refused for want of a privilege, and a
    /// named identity's statement on a table it does not list.
    #[serde(default = "default_true")]
    pub outside_grants: bool,
    /// A statement by a database user that no attributed AccessPolicy issued and `identities` does not name, or by
    /// a team credential whose lease was revoked.
    #[serde(default = "default_true")]
    pub unknown_identity: bool,
    /// DDL (CREATE, ALTER, DROP, ...) is a finding outside these change windows. Absent: DDL is not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl: Option<DdlRule>,
    /// Bulk reads: more read statements per minute on the listed tables by one identity than allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub read_volume: Vec<ReadVolumeRule>,
    /// A burst of failed logins for one database user. Absent: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_logins: Option<FailedLoginsRule>,
    /// Learned volumes: an hour's reads of a table by a team far above that hour of the week in past weeks.
    /// Absent: nothing is learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineRule>,
    /// Bulk reads by rows: more rows per minute returned to one identity by statements reading the listed tables
    /// than allowed, counted from the database's statement statistics (needs `spec.database.statistics`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub row_volume: Vec<RowVolumeRule>,
    /// A team's credential used from a pod of this namespace that does not run as one of the team's ServiceAccounts
    /// (its AccessPolicy's subjects): a credential taken into another workload. Only for teams with ServiceAccount
    /// subjects, and only where the statement was placed at a pod (see the README's "Which workload").
    #[serde(default)]
    pub foreign_workload: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            outside_grants: true,
            unknown_identity: true,
            ddl: None,
            read_volume: vec![],
            failed_logins: None,
            baseline: None,
            row_volume: vec![],
            foreign_workload: false,
        }
    }
}

/// A learned baseline of read volumes: the read statements of each team (by AccessPolicy and team; named identities
/// by user) on each table in each hour (UTC), compared with the same hour of the week in the past `weeks` weeks. An
/// hour is unusual when its reads rise above that hour's median by more than `spreads` robust spreads (1.4826 ×
/// the median absolute deviation, at least one read) and reach `minReads`; the finding (`UnusualVolume`, made as
/// soon as the count passes the limit, once per hour) shows the baseline. Nothing is flagged until `minWeeks` of
/// that hour were observed whole (`minWeeks` is at most `weeks`): hours the log was not read through (no pod, an
/// unreadable log, an operator restart) are not observed. What was learned (counts only, at most 200 team and table
/// pairs) is kept in the ConfigMap `<monitor>-baseline`, written when an hour was learned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaselineRule {
    /// Tables learned (`schema.table`, `database.table` on MariaDB); empty: every table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,
    /// Past weeks the baseline is learned from.
    #[serde(default = "default_weeks")]
    #[schemars(range(min = 1, max = 8))]
    pub weeks: i32,
    /// Weeks of an hour that must have been observed before its reads can be unusual.
    #[serde(default = "default_min_weeks")]
    #[schemars(range(min = 1, max = 8))]
    pub min_weeks: i32,
    /// How many robust spreads above the median an hour's reads must rise.
    #[serde(default = "default_spreads")]
    #[schemars(range(min = 1, max = 100))]
    pub spreads: i32,
    /// Fewer reads in an hour are never unusual (quiet tables stay quiet).
    #[serde(default = "default_min_reads")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_reads: i32,
}

fn default_weeks() -> i32 {
    4
}
fn default_min_weeks() -> i32 {
    3
}
fn default_spreads() -> i32 {
    6
}
fn default_min_reads() -> i32 {
    20
}

fn default_true() -> bool {
    true
}

/// When DDL is expected.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DdlRule {
    /// Change windows; none: every DDL statement is a finding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub change_windows: Vec<ChangeWindow>,
}

/// A recurring change window (UTC).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeWindow {
    /// When it opens: a cron expression in UTC, e.g. `0 2 * * 6` (Saturdays at 02:00).
    #[schemars(length(min = 9, max = 128))]
    pub schedule: String,
    /// How long it stays open, e.g. `2h`.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('168h')").message("duration must be positive and at most 168h, e.g. 2h"))]
    pub duration: String,
}

/// A limit on read statements per minute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadVolumeRule {
    /// Sensitive tables (`schema.table`, `database.table` on MariaDB).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,
    /// Read statements one identity may run on them within a minute.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_per_minute: i32,
}

/// A limit on rows read per minute by one database user (a team's current credential, a named identity). A
/// statement's rows count for every listed table it reads (a join of two counts for both), attributed to the minute
/// of the sample that saw them (so `interval` is at most 1m). PostgreSQL: rows are those pg_stat_statements counts
/// (returned by a SELECT, exported by `COPY x TO`); not counted: rows read through a view or a function
/// (pg_stat_statements tracks top-level statements), `COPY (query) TO`, and an unqualified table under another
/// search_path than public (pgaudit's log records those reads still). MariaDB: at most the lesser of the rows of the
/// reads naming the table and the user's rows, while the audit log places the user at the table (performance_schema
/// counts rows per statement and per user, not per user and table); not counted: rows read through a view or a
/// stored procedure.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RowVolumeRule {
    /// Sensitive tables (`schema.table`; PostgreSQL takes a statement's unqualified table as `public.`, MariaDB as
    /// the statement's default database; MariaDB with `lower_case_table_names` set: in lower case).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,
    /// Rows one identity may read from them within a minute.
    #[schemars(range(min = 1, max = 2_000_000_000))]
    pub max_rows_per_minute: i32,
}

/// A limit on failed logins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedLoginsRule {
    /// Failed logins of one user within a minute that make a finding.
    #[schemars(range(min = 1, max = 100_000))]
    pub max_per_minute: i32,
}

/// An automated, reversible response to findings: each finding of the listed rules by a team's credential opens an
/// incident for that team (later findings join it until it is acknowledged), recorded in status.incidents, Events
/// and the audit trail; the response is carried out at the next read, once the incident is in status, and retried
/// until it is done. Acknowledge an incident with `kubectl annotate accessmonitor <name>
/// crmguard.io/acknowledge=<incident id>`: the team gets new credentials. The targets opt in: the AccessPolicy
/// (`acceptHoldsFrom`) and the NetworkGuard (`webhook.accessMonitors`) name the monitor. Findings of users that are
/// no team's (unknown users) are reported, nothing is revoked or isolated for them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.revokeCredentials || has(self.quarantineThrough)").message("a response does something: set revokeCredentials: true and/or quarantineThrough: <NetworkGuard>"))]
pub struct Response {
    /// The rules whose findings are responded to, e.g. `[ReadVolume, RevokedCredential]`.
    #[schemars(length(min = 1, max = 16))]
    pub triggers: Vec<FindingRule>,
    /// Only record what would be done (status, Events, the audit trail); nothing is revoked or isolated.
    #[serde(default)]
    pub dry_run: bool,
    /// Hold the team's database credentials while the incident is open: the AccessPolicy's controller revokes
    /// every lease the team's Secret records (the credential stops working as soon as Vault has revoked it) and
    /// issues none until the incident is acknowledged or this monitor deleted. The AccessPolicy must accept it:
    /// its `spec.acceptHoldsFrom` names this monitor.
    #[serde(default)]
    pub revoke_credentials: bool,
    /// Isolate the pods that run as the team's ServiceAccounts (its AccessPolicy's ServiceAccount subjects) through
    /// this NetworkGuard (same namespace), as its alert webhook would: with the guard's `webhook` settings (enabled,
    /// and `webhook.accessMonitors` naming this monitor: ttl, backupFirst), released at that ttl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub quarantine_through: Option<String>,
}

/// An incident: a team's findings that were responded to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Incident {
    /// Names the incident in the acknowledgement annotation, e.g. `sales-1796290714`.
    pub id: String,
    /// The team whose credential the findings were made of.
    pub team: String,
    /// The AccessPolicy that issued the team's credentials.
    pub access_policy: String,
    /// The rules whose findings opened or joined it.
    pub rules: Vec<FindingRule>,
    /// When the first finding was made.
    pub detected: Time,
    /// What was done (or, in a dry run, would have been), e.g. `credentials held (Secret crm-access-sales-db)`.
    pub actions: Vec<String>,
    /// A dry run: nothing was done, `actions` says what would have been.
    #[serde(default)]
    pub dry_run: bool,
    /// When it was acknowledged (the team's credentials are issued again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Time>,
    /// It holds the team's credentials while open (`response.revokeCredentials` when it was opened).
    #[serde(default)]
    pub holds_credentials: bool,
    /// The response is still to be carried out (at the next read: an incident acts once it is in status).
    #[serde(default)]
    pub pending: bool,
    /// Why the response could not be carried out, if it could not (a target refused it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The pods its findings' statements came from (by their client addresses; at most 20): the ones
    /// `quarantineThrough` isolates; a pod a later finding brings is isolated at that read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    /// Client addresses its findings' statements came from that no pod of the namespace has (at most 20). When
    /// neither is known, `quarantineThrough` isolates the pods of the team's ServiceAccounts; when only these are,
    /// no pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// What a finding is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum FindingRule {
    /// `rules.outsideGrants`.
    OutsideGrants,
    /// `rules.unknownIdentity`: a user nobody issued or named.
    UnknownIdentity,
    /// `rules.unknownIdentity`: a team credential used after its lease was revoked.
    RevokedCredential,
    /// `rules.ddl`.
    DdlOutsideWindow,
    /// `rules.readVolume`.
    ReadVolume,
    /// `rules.failedLogins`.
    FailedLogins,
    /// `rules.baseline`: an hour's reads far above what was learned for that hour of the week.
    UnusualVolume,
    /// `rules.rowVolume`.
    RowVolume,
    /// `rules.foreignWorkload`: a team's credential used from a pod that does not run as the team's.
    ForeignWorkload,
}

/// One finding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub rule: FindingRule,
    /// The database user.
    pub user: String,
    /// Who that is: `team sales (AccessPolicy crm-access)`, a named identity, or `unknown`.
    pub identity: String,
    /// The table (or database) concerned, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// What happened, without any literal value, e.g. `12 SELECT on crm.invoices within a minute (limit 5)`.
    pub message: String,
    /// When the database logged the first entry of the finding.
    pub at: Time,
    /// The pods of this namespace the statements came from, by their client addresses (PostgreSQL: the session's
    /// address from `log_connections` or `pg_stat_activity`; MariaDB: the audit event's host); at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    /// Client addresses no pod of this namespace has (`[local]` on PostgreSQL, `localhost` on MariaDB: the database
    /// pod's own socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Observed state of an AccessMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessMonitorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions, one per type: `Ready` and those of [`conditions`], whose declaration the CRD's description of this
    /// field is generated from (`api::crds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The pod whose log is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// That pod's UID: a pod re-created under the same name (a StatefulSet's) has another one, and another log; what
    /// the pod before it wrote after readUntil went with it (a LinesSkipped Event says so).
    #[serde(default, rename = "podUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The time of the last log line read (the kubelet's timestamp): reading resumes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_until: Option<String>,
    /// The database container's restart count when its log was last read. A higher count means the container
    /// restarted since: the lines after readUntil are in the previous container's log (the kubelet keeps one), which
    /// is read first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<i32>,
    /// Audit entries read since the monitor was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<i64>,
    /// Findings since the monitor was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding_count: Option<i64>,
    /// The newest findings, newest first, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
    /// Incidents responded to, newest first: every open one and the newest acknowledged ones, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incidents: Vec<Incident>,
    /// Team credentials seen revoked (gone from the team's Secret), newest first, at most 100, each kept 30 days:
    /// their later use is a `RevokedCredential` finding, also after an operator restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_users: Vec<RevokedUser>,
}

/// A team's database user whose credential was revoked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedUser {
    /// The database user.
    pub user: String,
    /// The team whose credential it was.
    pub team: String,
    /// The AccessPolicy that issued it.
    pub access_policy: String,
    /// When the monitor saw it gone from the team's Secret.
    pub since: Time,
}

/// An AccessMonitor's conditions besides `Ready`.
pub mod conditions {
    crate::api::condition::conditions! {
        for super::AccessMonitorStatus;
        /// The database's audit log is read.
        Collecting: Required {
            /// The log of the database pod is read at every interval.
            Reading,
            /// No running pod matches spec.database.podSelector: check it against the database pod's labels.
            PodNotFound,
            /// The pod has no container of the name spec.database.container gives.
            ContainerNotFound,
            /// The API server did not serve the pod's log (the message has its answer); retried at the next interval.
            LogUnreadable,
        }
        /// The rows read are counted from the database's statistics (only with spec.database.statistics).
        RowsCounted: Required {
            /// The statistics (pg_stat_statements, MariaDB's performance_schema) are sampled at every interval.
            Sampling,
            /// The connection Secret is missing, lacks a key or holds an unusable CA: the message names it.
            SecretUnusable,
            /// The database could not be reached or refused the login (the message has its answer); tried again at
            /// the next interval.
            DatabaseUnreachable,
            /// The statistics could not be read. PostgreSQL: `CREATE EXTENSION pg_stat_statements` in the Secret's
            /// database, `shared_preload_libraries` with it, and `GRANT pg_read_all_stats` to the monitoring role.
            /// MariaDB: `performance_schema=ON` (and its consumer statements_digest), `GRANT SELECT ON
            /// performance_schema.*` to the role.
            StatisticsUnreadable,
        }
        /// Statements since the monitor started broke no rule.
        Clean: Warning {
            /// No finding.
            NoFindings,
            /// Findings were made; status.findings lists the newest, Events and the audit trail every one.
            FindingsMade,
        }
        /// No incident waits for acknowledgement.
        Settled: Warning {
            /// No incident is open.
            NoOpenIncident,
            /// An incident is open: the team's credentials are held and/or its pods isolated until it is
            /// acknowledged (status.incidents).
            IncidentOpen,
            /// A response could not be carried out: a target refused it (the message says which and why).
            ResponseFailed,
        }
    }
}

crate::api::condition::reasons! {
    /// The reasons of the Events an AccessMonitor's controller records, besides `Ready`'s.
    pub enum AccessMonitorEvent {
        /// A statement (or a run of them) broke a rule; the note names the rule, the user, who that is and the table,
        /// never a value.
        AccessFinding,
        /// An incident was opened; the note names the team and the rules (later findings of the team join the open
        /// incident without another Event). Its response is carried out at the next read.
        IncidentOpened,
        /// An incident's response was carried out, or refused by a target; the note says what was done.
        Responded,
        /// A dry run: the note says what the response would have done.
        WouldRespond,
        /// An incident was acknowledged: its hold ends and the team's credentials are issued again.
        IncidentAcknowledged,
        /// Part of the log could not be read (a line, or the lines of one second, longer than a read's limit; the
        /// logs of containers that restarted more than once since the last read, or a previous container's log the
        /// kubelet no longer has; the lines of a pod that was replaced, or no longer read, after readUntil) and was
        /// skipped; the note says what.
        LinesSkipped,
        /// No Alertmanager of the operator's `--alertmanager-url` took the alerts (the note has their answers);
        /// they are posted again at every pass until one does (said once per outage).
        AlertsUndelivered,
        /// The monitor's findings report or baseline ConfigMap could not be written: an object of its name exists
        /// and belongs to someone else, and is left alone (the note names it and its holder; said once).
        NameTaken,
    }
}

impl crate::api::condition::EventReason for AccessMonitorEvent {
    type Status = AccessMonitorStatus;
}
