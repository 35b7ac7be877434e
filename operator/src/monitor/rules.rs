//! The monitor's rules, checked against attributed accesses; what breaks one is a finding. Pure: the accesses, who
//! their users are and the counts of the current minute go in, findings come out.

use std::collections::{BTreeMap, BTreeSet};

use croner::Cron;
use jiff::{SignedDuration, Timestamp};

use super::access::{Access, Kind};
use super::attribution::{Identities, Who};
use super::sessions::Origins;
use crate::api::access_monitor::{self, FindingRule};
use crate::api::access_policy::SqlPrivilege;
use crate::validation::FieldError;

/// A change window: opens at each of the schedule's times (UTC), stays open for `open`.
#[derive(Clone, Debug)]
pub struct Window {
    pub cron: Cron,
    pub open: SignedDuration,
}

impl Window {
    /// Whether `at` lies in a window: the schedule fired within `open` before it.
    pub fn contains(&self, at: Timestamp) -> bool {
        let from = at.checked_sub(self.open).unwrap_or(at);
        crate::controllers::schedule::next_run(&self.cron, None, from).is_some_and(|t| t <= at)
    }
}

/// The spec's rules, checked.
#[derive(Clone, Debug)]
pub struct Rules {
    pub outside_grants: bool,
    pub unknown_identity: bool,
    /// `None`: DDL not checked; empty: every DDL statement is a finding.
    pub ddl: Option<Vec<Window>>,
    /// (tables, read statements allowed per minute).
    pub read_volume: Vec<(Vec<String>, u64)>,
    pub failed_logins: Option<u64>,
    pub baseline: Option<super::baseline::Settings>,
    /// (tables, rows allowed per minute).
    pub row_volume: Vec<(Vec<String>, u64)>,
    pub foreign_workload: bool,
}

impl Rules {
    /// Checks `spec.rules`; a bad schedule or duration is a field error.
    pub fn parse(r: &access_monitor::Rules, errors: &mut Vec<FieldError>) -> Rules {
        let ddl = r.ddl.as_ref().map(|d| {
            d.change_windows
                .iter()
                .enumerate()
                .filter_map(|(i, w)| {
                    let field = format!("spec.rules.ddl.changeWindows[{i}]");
                    let cron = crate::controllers::schedule::parse_cron(&w.schedule)
                        .map_err(|e| errors.push(FieldError::new(format!("{field}.schedule"), e)))
                        .ok();
                    let open = crate::validation::duration_field(format!("{field}.duration"), &w.duration, errors);
                    Some(Window { cron: cron?, open: SignedDuration::try_from(open?).ok()? })
                })
                .collect()
        });
        Rules {
            outside_grants: r.outside_grants,
            unknown_identity: r.unknown_identity,
            ddl,
            read_volume: r.read_volume.iter().map(|v| (v.tables.clone(), v.max_per_minute.max(1) as u64)).collect(),
            failed_logins: r.failed_logins.as_ref().map(|f| f.max_per_minute.max(1) as u64),
            baseline: r.baseline.as_ref().map(super::baseline::Settings::of),
            row_volume: r.row_volume.iter().map(|v| (v.tables.clone(), v.max_rows_per_minute.max(1) as u64)).collect(),
            foreign_workload: r.foreign_workload,
        }
    }
}

/// A finding, before it is put into status, Events and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub rule: FindingRule,
    pub user: String,
    /// Who the user is ([`Who::describe`]).
    pub identity: String,
    pub object: Option<String>,
    /// Without any value: the rule, the count, the command(s).
    pub message: String,
    /// The first access of the finding.
    pub at: Timestamp,
    /// Where its statements came from: the accesses it counted (of this read) whose clients were placed.
    pub origins: Origins,
}

/// Counts of the current minute, carried from one read of the log to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the epoch.
    pub minute: i64,
    /// Read statements per (user, table).
    pub reads: BTreeMap<(String, String), u64>,
    /// Failed logins per user.
    pub failed_logins: BTreeMap<String, u64>,
    /// Volume findings made this minute (one per user and table).
    pub flagged: BTreeSet<(FindingRule, String, String)>,
}

impl Minute {
    fn at(&mut self, t: Timestamp) {
        let m = t.as_second().div_euclid(60);
        if m != self.minute {
            *self = Minute { minute: m, ..Minute::default() };
        }
    }
}

/// The privilege a team needs for an access, `None` when no table privilege allows it (DDL, roles).
fn needed(a: &Access) -> Option<&'static [SqlPrivilege]> {
    match (a.kind, a.command.as_str()) {
        (Kind::Read, _) => Some(&[SqlPrivilege::Select]),
        (Kind::Write, "INSERT" | "COPY") => Some(&[SqlPrivilege::Insert]),
        (Kind::Write, "UPDATE") => Some(&[SqlPrivilege::Update]),
        (Kind::Write, "DELETE") => Some(&[SqlPrivilege::Delete]),
        // MariaDB's WRITE names no command: any change privilege on the table.
        (Kind::Write, "WRITE") => Some(&[SqlPrivilege::Insert, SqlPrivilege::Update, SqlPrivilege::Delete]),
        _ => None,
    }
}

/// Whether `object` is a table of the server's own catalog, which the server reads on a statement's behalf (MariaDB's
/// statistics tables) and which no grant names: such reads are recorded, never outside a grant.
fn catalog(object: &str) -> bool {
    let schema = object.split_once('.').map_or("", |(s, _)| s);
    ["pg_catalog", "information_schema", "mysql", "performance_schema", "sys"].contains(&schema)
}

/// Whether `a` lies outside what `who` may do.
fn outside(who: &Who, a: &Access) -> bool {
    match (who, a.kind) {
        (_, Kind::Denied) => true,
        (_, Kind::LoginFailed | Kind::Other) => false,
        (Who::Team { .. }, Kind::Ddl | Kind::Role) => true,
        (Who::Team { grants, .. }, _) => {
            // A statement on no table (`SELECT 1`, `SELECT now()`) needs no table privilege.
            let Some(object) = a.object.as_deref().filter(|o| !(a.kind == Kind::Read && catalog(o))) else {
                return false;
            };
            let Some(need) = needed(a) else { return true };
            !grants.iter().any(|g| g.table == object && g.privileges.iter().any(|p| need.contains(p)))
        }
        (Who::Known { tables, .. }, Kind::Read | Kind::Write) => match a.object.as_deref() {
            Some(o) if a.kind == Kind::Read && catalog(o) => false,
            Some(o) => !tables.is_empty() && !tables.iter().any(|t| t == o),
            None => false,
        },
        _ => false,
    }
}

/// A finding per call: (rule, user, object).
type FindingKey = (FindingRule, String, Option<String>);

/// Checks `accesses` (in log order) against the rules; `minute` carries the per-minute counts between reads. One
/// finding per rule, user and object per call (with the number of accesses), and per minute for the volume rules.
pub fn check(rules: &Rules, ids: &Identities, accesses: &[Access], minute: &mut Minute) -> Vec<Found> {
    // (rule, user, object) -> (first access, count, commands, where they came from)
    let mut found: BTreeMap<FindingKey, (Timestamp, u64, BTreeSet<String>, Origins)> = BTreeMap::new();
    let mut volume: Vec<Found> = Vec::new();
    let mut add = |rule, a: &Access| {
        let e = found.entry((rule, a.user.clone(), a.object.clone())).or_insert((
            a.at,
            0,
            BTreeSet::new(),
            Origins::default(),
        ));
        e.1 += 1;
        e.2.insert(format!("{} {}", a.kind.as_str(), a.command));
        e.3.add(&a.client);
    };
    for a in accesses {
        minute.at(a.at);
        let who = ids.who(&a.user);
        match who {
            Who::Unknown if rules.unknown_identity && a.kind != Kind::LoginFailed => {
                add(FindingRule::UnknownIdentity, a)
            }
            Who::Revoked { .. } if rules.unknown_identity => add(FindingRule::RevokedCredential, a),
            _ => {}
        }
        if rules.outside_grants && !matches!(who, Who::Unknown | Who::Revoked { .. }) && outside(who, a) {
            add(FindingRule::OutsideGrants, a);
        }
        if a.kind == Kind::Ddl
            && let Some(windows) = &rules.ddl
            && !windows.iter().any(|w| w.contains(a.at))
        {
            add(FindingRule::DdlOutsideWindow, a);
        }
        if a.kind == Kind::Read
            && let Some(table) = &a.object
            && let Some((_, max)) = rules.read_volume.iter().find(|(tables, _)| tables.contains(table))
        {
            let n = minute.reads.entry((a.user.clone(), table.clone())).or_default();
            *n += 1;
            if *n > *max && minute.flagged.insert((FindingRule::ReadVolume, a.user.clone(), table.clone())) {
                volume.push(Found {
                    rule: FindingRule::ReadVolume,
                    user: a.user.clone(),
                    identity: who.describe(),
                    origins: Default::default(),
                    object: Some(table.clone()),
                    message: format!("more than {max} reads of {table} within a minute by {}", who.describe()),
                    at: a.at,
                });
            }
        }
        // Once per user, pod and minute.
        if rules.foreign_workload
            && a.kind != Kind::LoginFailed
            && let Who::Team { accounts, .. } = who
            && !accounts.is_empty()
            && let (Some(pod), Some(account)) = (&a.client.pod, &a.client.account)
            && !accounts.contains(account)
            && minute.flagged.insert((FindingRule::ForeignWorkload, a.user.clone(), pod.clone()))
        {
            volume.push(Found {
                rule: FindingRule::ForeignWorkload,
                user: a.user.clone(),
                identity: who.describe(),
                origins: Origins { pods: [pod.clone()].into(), addresses: BTreeSet::new() },
                object: None,
                message: format!(
                    "a credential of {} used from pod {pod}, which runs as ServiceAccount {account}, not as one of \
                     the team's ({})",
                    who.describe(),
                    accounts.join(", ")
                ),
                at: a.at,
            });
        }
        if a.kind == Kind::LoginFailed
            && let Some(max) = rules.failed_logins
        {
            let n = minute.failed_logins.entry(a.user.clone()).or_default();
            *n += 1;
            if *n > max && minute.flagged.insert((FindingRule::FailedLogins, a.user.clone(), String::new())) {
                volume.push(Found {
                    rule: FindingRule::FailedLogins,
                    user: a.user.clone(),
                    identity: who.describe(),
                    origins: Default::default(),
                    object: None,
                    message: format!("more than {max} failed logins of user {} within a minute", a.user),
                    at: a.at,
                });
            }
        }
    }
    let mut out: Vec<Found> = found
        .into_iter()
        .map(|((rule, user, object), (at, n, commands, origins))| {
            let identity = ids.who(&user).describe();
            let on = object.as_deref().map(|o| format!(" on {o}")).unwrap_or_default();
            let what = commands.into_iter().collect::<Vec<_>>().join(", ");
            let message = match rule {
                FindingRule::OutsideGrants => format!("{n} access(es) outside the grants of {identity}{on}: {what}"),
                FindingRule::UnknownIdentity => {
                    let on = object.as_deref().map(|o| format!(", on {o}")).unwrap_or_default();
                    format!("{n} access(es) by database user {user}, whom no AccessPolicy issued and the spec does not name{on}: {what}")
                }
                FindingRule::RevokedCredential => format!("{n} use(s) of the {identity}{on}: {what}"),
                FindingRule::DdlOutsideWindow => format!("{n} DDL statement(s) outside the change windows by {identity}{on}: {what}"),
                FindingRule::ReadVolume
                | FindingRule::FailedLogins
                | FindingRule::UnusualVolume
                | FindingRule::RowVolume
                | FindingRule::ForeignWorkload => what,
            };
            Found { rule, user, identity, object, message, at, origins }
        })
        .chain(volume.into_iter().map(|mut f| {
            // The volumes' origins: the accesses of this read they counted.
            if f.origins == Origins::default() {
                for a in accesses.iter().filter(|a| a.user == f.user) {
                    let counted = match f.rule {
                        FindingRule::ReadVolume => a.kind == Kind::Read && a.object == f.object,
                        FindingRule::FailedLogins => a.kind == Kind::LoginFailed,
                        _ => false,
                    };
                    if counted {
                        f.origins.add(&a.client);
                    }
                }
            }
            f
        }))
        .collect();
    out.sort_by_key(|f| (f.at, f.rule));
    out
}

/// The origins of the volumes the statistics and the baseline found: the user's reads of the table in this read.
pub fn volume_origins(found: &mut [Found], accesses: &[Access]) {
    for f in found.iter_mut().filter(|f| matches!(f.rule, FindingRule::RowVolume | FindingRule::UnusualVolume)) {
        if let Some(table) = &f.object {
            f.origins = Origins::of_reads(&f.user, table, accesses);
        }
    }
}

/// `found` and the findings of the learned baseline over the same accesses, in order (the controller's and the
/// replay's way alike).
pub fn with_baseline(
    mut found: Vec<Found>,
    baseline: &mut super::baseline::Baseline,
    settings: &super::baseline::Settings,
    ids: &Identities,
    accesses: &[Access],
) -> Vec<Found> {
    found.extend(baseline.check(settings, ids, accesses));
    found.sort_by_key(|f| (f.at, f.rule));
    found
}

/// The access stream's records of one read of the log: one per user, kind of access and object (how many, when),
/// then one per finding; `namespace` and `monitor` name the AccessMonitor.
pub fn access_records(
    namespace: &str,
    monitor: &str,
    ids: &Identities,
    accesses: &[Access],
    found: &[Found],
) -> Vec<crate::audit::AccessRecord> {
    let record = |user: &str, time: Timestamp, until: Timestamp| {
        let who = ids.who(user);
        let (team, policy) = who.team().map_or((None, None), |(t, p)| (Some(t.to_string()), Some(p.to_string())));
        crate::audit::AccessRecord {
            time: time.to_string(),
            until: until.to_string(),
            namespace: namespace.into(),
            monitor: monitor.into(),
            user: user.into(),
            identity: who.describe(),
            team,
            policy,
            access: String::new(),
            object: None,
            count: 1,
            finding: None,
            message: None,
            pods: vec![],
            addresses: vec![],
        }
    };
    let accessed = summarize(accesses).into_iter().map(|s| crate::audit::AccessRecord {
        access: s.kind.as_str().into(),
        object: s.object.clone(),
        count: s.count,
        pods: s.origins.pods.iter().cloned().collect(),
        addresses: s.origins.addresses.iter().cloned().collect(),
        ..record(&s.user, s.first, s.last)
    });
    let findings = found.iter().map(|f| crate::audit::AccessRecord {
        access: "finding".into(),
        object: f.object.clone(),
        finding: Some(format!("{:?}", f.rule)),
        message: Some(f.message.clone()),
        pods: f.origins.pods.iter().cloned().collect(),
        addresses: f.origins.addresses.iter().cloned().collect(),
        ..record(&f.user, f.at, f.at)
    });
    accessed.chain(findings).collect()
}

/// What the audit trail keeps of a read of the log: per user, kind of access and object, how many and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub user: String,
    pub kind: Kind,
    pub object: Option<String>,
    pub first: Timestamp,
    pub last: Timestamp,
    pub count: u64,
    /// Where the accesses came from.
    pub origins: Origins,
}

/// Accesses summed per user, kind and object, in that order.
pub fn summarize(accesses: &[Access]) -> Vec<Summary> {
    let mut by: BTreeMap<(String, Kind, Option<String>), Summary> = BTreeMap::new();
    for a in accesses {
        let s = by.entry((a.user.clone(), a.kind, a.object.clone())).or_insert_with(|| Summary {
            user: a.user.clone(),
            kind: a.kind,
            object: a.object.clone(),
            first: a.at,
            last: a.at,
            count: 0,
            origins: Default::default(),
        });
        s.count += 1;
        s.origins.add(&a.client);
        s.first = s.first.min(a.at);
        s.last = s.last.max(a.at);
    }
    by.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::access_monitor::{ChangeWindow, DdlRule, FailedLoginsRule, ReadVolumeRule};
    use crate::monitor::attribution::TeamUsers;

    fn ids() -> Identities {
        let policy: crate::api::AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": "crm"},
            "spec": {"vault": {}, "teams": [{
                "name": "sales", "subjects": [{"kind": "Group", "name": "sales"}], "credentials": {},
                "database": {"connection": "crm", "grants": [
                    {"schema": "crm", "tables": ["contacts"], "privileges": ["SELECT", "UPDATE"]},
                    {"schema": "crm", "tables": ["invoices"], "privileges": ["SELECT"]}
                ]}
            }]}
        }))
        .unwrap();
        let known = [access_monitor::KnownIdentity {
            user: "crm_app".into(),
            name: "crm-web".into(),
            tables: vec!["crm.contacts".into()],
        }];
        let before = Identities::build(
            std::slice::from_ref(&policy),
            &[TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-old".into()] }],
            &[],
            &Identities::default(),
            Timestamp::UNIX_EPOCH,
        );
        Identities::build(
            &[policy],
            &[TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales".into()] }],
            &known,
            &before,
            Timestamp::UNIX_EPOCH,
        )
    }

    fn a(sec: i64, user: &str, kind: Kind, command: &str, object: Option<&str>) -> Access {
        Access {
            at: Timestamp::from_second(1_796_000_000 + sec).unwrap(),
            user: user.into(),
            kind,
            command: command.into(),
            object: object.map(Into::into),
            client: Default::default(),
        }
    }

    fn rules(spec: serde_json::Value) -> Rules {
        let r: access_monitor::Rules = serde_json::from_value(spec).unwrap();
        let mut errors = vec![];
        let rules = Rules::parse(&r, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        rules
    }

    /// Expected from the rules' documentation (api::access_monitor::Rules): a team may do exactly what its grants
    /// say; DDL and role statements are never a team's; a refusal is always outside; a named identity with tables
    /// stays on them; an unknown user and a revoked credential are findings of their own.
    #[test]
    fn each_access_is_judged_by_who_ran_it() {
        let r = rules(serde_json::json!({}));
        let table = [
            (a(0, "v-sales", Kind::Read, "SELECT", Some("crm.invoices")), None),
            (a(0, "v-sales", Kind::Write, "UPDATE", Some("crm.contacts")), None),
            (a(0, "v-sales", Kind::Write, "UPDATE", Some("crm.invoices")), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::Write, "DELETE", Some("crm.contacts")), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::Read, "SELECT", Some("crm.payroll")), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::Ddl, "DROP TABLE", Some("crm.contacts")), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::Role, "GRANT", None), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::Denied, "TABLE", Some("payroll")), Some(FindingRule::OutsideGrants)),
            (a(0, "v-sales", Kind::LoginFailed, "LOGIN", None), None),
            (a(0, "v-sales", Kind::Read, "SELECT", None), None),
            (a(0, "v-sales", Kind::Read, "READ", Some("mysql.table_stats")), None),
            (a(0, "crm_app", Kind::Read, "READ", Some("mysql.column_stats")), None),
            (a(0, "crm_app", Kind::Read, "SELECT", None), None),
            (a(0, "v-sales", Kind::Write, "TRUNCATE", Some("crm.contacts")), Some(FindingRule::OutsideGrants)),
            (a(0, "crm_app", Kind::Write, "INSERT", Some("crm.contacts")), None),
            (a(0, "crm_app", Kind::Read, "SELECT", Some("crm.invoices")), Some(FindingRule::OutsideGrants)),
            (a(0, "crm_app", Kind::Ddl, "CREATE TABLE", Some("crm.x")), None),
            (a(0, "mallory", Kind::Read, "SELECT", Some("crm.contacts")), Some(FindingRule::UnknownIdentity)),
            (a(0, "mallory", Kind::LoginFailed, "LOGIN", None), None),
            (a(0, "v-old", Kind::LoginFailed, "LOGIN", None), Some(FindingRule::RevokedCredential)),
            (a(0, "v-old", Kind::Read, "SELECT", Some("crm.invoices")), Some(FindingRule::RevokedCredential)),
        ];
        for (access, want) in table {
            let got: Vec<FindingRule> = check(&r, &ids(), std::slice::from_ref(&access), &mut Minute::default())
                .iter()
                .map(|f| f.rule)
                .collect();
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{access:?}");
        }
        // Rules switched off make no finding.
        let off = rules(serde_json::json!({"outsideGrants": false, "unknownIdentity": false}));
        let all: Vec<Access> = [
            a(0, "v-sales", Kind::Ddl, "DROP TABLE", Some("crm.contacts")),
            a(0, "mallory", Kind::Read, "SELECT", Some("crm.contacts")),
            a(0, "v-old", Kind::LoginFailed, "LOGIN", None),
        ]
        .into();
        assert_eq!(check(&off, &ids(), &all, &mut Minute::default()), vec![]);
    }

    #[test]
    fn one_finding_per_rule_user_and_table_names_the_count_and_no_value() {
        let r = rules(serde_json::json!({}));
        let many: Vec<Access> = (0..5).map(|i| a(i, "v-sales", Kind::Read, "SELECT", Some("crm.payroll"))).collect();
        let f = check(&r, &ids(), &many, &mut Minute::default());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            f[0].message,
            "5 access(es) outside the grants of team sales (AccessPolicy crm-access) on crm.payroll: read SELECT"
        );
        assert_eq!(f[0].at, many[0].at);
    }

    #[test]
    fn ddl_is_a_finding_outside_its_windows_only() {
        // 1_796_000_000 is 2026-11-30T00:53:20Z, a Monday.
        let r = rules(serde_json::json!({"ddl": {"changeWindows": [{"schedule": "30 0 * * 1", "duration": "1h"}]}}));
        let inside = a(0, "crm_app", Kind::Ddl, "ALTER TABLE", Some("crm.contacts"));
        assert_eq!(check(&r, &ids(), &[inside], &mut Minute::default()), vec![]);
        let after = a(3600, "crm_app", Kind::Ddl, "ALTER TABLE", Some("crm.contacts"));
        let f = check(&r, &ids(), &[after], &mut Minute::default());
        assert_eq!(f.iter().map(|f| f.rule).collect::<Vec<_>>(), [FindingRule::DdlOutsideWindow]);
        let never = rules(serde_json::json!({"ddl": {}}));
        let any = a(0, "crm_app", Kind::Ddl, "ALTER TABLE", Some("crm.contacts"));
        assert_eq!(check(&never, &ids(), &[any], &mut Minute::default()).len(), 1);
        let mut errors = vec![];
        let bad: access_monitor::Rules = access_monitor::Rules {
            ddl: Some(DdlRule {
                change_windows: vec![ChangeWindow { schedule: "61 * * * *".into(), duration: "2 hours".into() }],
            }),
            ..Default::default()
        };
        Rules::parse(&bad, &mut errors);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.rules.ddl.changeWindows[0].schedule", "spec.rules.ddl.changeWindows[0].duration"]);
    }

    /// As `rules.foreignWorkload` documents it: a team credential's statement placed at a pod that runs as none of
    /// the team's ServiceAccounts (of the policy's namespace) is a finding once per user, pod and minute; the team's
    /// own pod, an unplaced statement and a team without ServiceAccounts are none; the rule is off by default.
    #[test]
    fn a_team_credential_used_from_another_workload_is_found() {
        let policy: crate::api::AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": "crm"},
            "spec": {"vault": {}, "teams": [{
                "name": "sales", "credentials": {},
                "subjects": [{"kind": "ServiceAccount", "name": "sales-app"},
                             {"kind": "ServiceAccount", "name": "intruder", "namespace": "elsewhere"}],
                "database": {"connection": "crm", "grants": [
                    {"schema": "crm", "tables": ["invoices"], "privileges": ["SELECT"]}]}
            }]}
        }))
        .unwrap();
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales".into()] }];
        let workloads = Identities::build(&[policy], &teams, &[], &Identities::default(), Timestamp::UNIX_EPOCH);
        let from = |sec, pod: Option<&str>, account: &str| {
            let mut x = a(sec, "v-sales", Kind::Read, "SELECT", Some("crm.invoices"));
            x.client.pod = pod.map(Into::into);
            x.client.account = pod.map(|_| account.into());
            x
        };
        let on = Rules::parse(&access_monitor::Rules { foreign_workload: true, ..Default::default() }, &mut vec![]);
        let mut minute = Minute::default();
        let accesses = [
            from(0, Some("sales-app-0"), "sales-app"),
            from(1, None, ""),
            from(2, Some("intruder-0"), "intruder"),
            from(3, Some("intruder-0"), "intruder"),
        ];
        let f = check(&on, &workloads, &accesses, &mut minute);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].rule, f[0].at), (FindingRule::ForeignWorkload, accesses[2].at));
        assert_eq!(f[0].origins.pods, BTreeSet::from(["intruder-0".to_string()]));
        assert_eq!(
            f[0].message,
            "a credential of team sales (AccessPolicy crm-access) used from pod intruder-0, which runs as ServiceAccount \
             intruder, not as one of the team's (sales-app)"
        );
        // Off by default; a team of Groups only has no workload to compare with.
        let off = Rules::parse(&access_monitor::Rules::default(), &mut vec![]);
        assert!(check(&off, &workloads, &accesses, &mut Minute::default()).is_empty());
        let mut x = from(2, Some("intruder-0"), "intruder");
        x.user = "v-sales".into();
        assert!(
            check(&on, &ids(), &[x], &mut Minute::default()).iter().all(|f| f.rule != FindingRule::ForeignWorkload)
        );
    }

    #[test]
    fn volumes_count_across_reads_within_the_minute_and_flag_once() {
        let r = access_monitor::Rules {
            read_volume: vec![ReadVolumeRule { tables: vec!["crm.invoices".into()], max_per_minute: 3 }],
            failed_logins: Some(FailedLoginsRule { max_per_minute: 2 }),
            ..Default::default()
        };
        let r = Rules::parse(&r, &mut vec![]);
        let mut minute = Minute::default();
        let read = |s| a(s, "v-sales", Kind::Read, "SELECT", Some("crm.invoices"));
        // 1_796_000_000 is 20 s past a minute: seconds 0-39 are one minute.
        assert_eq!(check(&r, &ids(), &[read(0), read(1), read(2)], &mut minute), vec![]);
        let f = check(&r, &ids(), &[read(3), read(4)], &mut minute);
        assert_eq!(f.iter().map(|f| (f.rule, f.at)).collect::<Vec<_>>(), [(FindingRule::ReadVolume, read(3).at)]);
        assert_eq!(
            f[0].message,
            "more than 3 reads of crm.invoices within a minute by team sales (AccessPolicy crm-access)"
        );
        // A new minute starts counting again.
        assert_eq!(check(&r, &ids(), &[read(40), read(41)], &mut minute), vec![]);
        let fail = |s| a(s, "v-sales", Kind::LoginFailed, "LOGIN", None);
        let f = check(&r, &ids(), &[fail(42), fail(43), fail(44), fail(45)], &mut minute);
        assert_eq!(f.iter().map(|f| f.rule).collect::<Vec<_>>(), [FindingRule::FailedLogins]);
    }

    #[test]
    fn summaries_count_per_user_kind_and_table() {
        let s = summarize(&[
            a(2, "v-sales", Kind::Read, "SELECT", Some("crm.invoices")),
            a(1, "v-sales", Kind::Read, "SELECT", Some("crm.invoices")),
            a(3, "v-sales", Kind::Write, "INSERT", Some("crm.invoices")),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].kind, s[0].count, s[0].first, s[0].last),
            (Kind::Read, 2, a(1, "", Kind::Read, "", None).at, a(2, "", Kind::Read, "", None).at)
        );
    }
}
