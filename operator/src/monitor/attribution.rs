//! Who a database user is. crmguard issues every team's database identity itself: the user Vault created for a
//! team's lease is recorded on the team's Secret (`crmguard.io/username`, and `crmguard.io/previous-username` while
//! a replaced credential is in its grace period), so a statement is attributed to the team, its AccessPolicy and
//! the grants it holds. Users crmguard does not issue are named by the monitor's spec; any other is unknown, and a
//! team's user that is no longer on its Secret was revoked (remembered in the monitor's status for 30 days).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::access_monitor::{KnownIdentity, RevokedUser};
use crate::api::access_policy::{AccessPolicy, SqlPrivilege, SubjectKind};

/// A team's privileges on one table (`schema.table`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub table: String,
    pub privileges: Vec<SqlPrivilege>,
}

/// Who a database user is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// A credential crmguard issued to a team, with the team's grants and the ServiceAccounts of the policy's
    /// namespace it is issued to (its workloads run as them).
    Team { team: String, policy: String, grants: Vec<Grant>, accounts: Vec<String> },
    /// A team's credential that is no longer on its Secret: its lease was revoked.
    Revoked { team: String, policy: String },
    /// A user the monitor's spec names.
    Known { name: String, tables: Vec<String> },
    /// Nobody crmguard knows.
    Unknown,
}

impl Who {
    /// How records, findings and Events name it.
    pub fn describe(&self) -> String {
        match self {
            Who::Team { team, policy, .. } => format!("team {team} (AccessPolicy {policy})"),
            Who::Revoked { team, policy } => format!("revoked credential of team {team} (AccessPolicy {policy})"),
            Who::Known { name, .. } => name.clone(),
            Who::Unknown => "unknown".into(),
        }
    }

    /// The team and its AccessPolicy, for a team's credential (current or revoked).
    pub fn team(&self) -> Option<(&str, &str)> {
        match self {
            Who::Team { team, policy, .. } | Who::Revoked { team, policy } => Some((team, policy)),
            _ => None,
        }
    }
}

/// A team's users as its Secret records them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamUsers {
    pub policy: String,
    pub team: String,
    /// The current credential's user and, during a rotation's grace period, the previous one's.
    pub users: Vec<String>,
}

/// Database users and who they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identities {
    users: BTreeMap<String, Who>,
    /// The first grant expiry after the build: who may do what changes then.
    pub valid_until: Option<Timestamp>,
}

/// The ServiceAccounts of `policy`'s namespace that team `team`'s subjects name (its workloads run as them).
pub fn team_accounts(policy: &AccessPolicy, team: &str) -> BTreeSet<String> {
    let ns = policy.metadata.namespace.as_deref();
    policy
        .spec
        .teams
        .iter()
        .filter(|x| x.name == team)
        .flat_map(|x| x.subjects.iter())
        .filter(|s| s.kind == SubjectKind::ServiceAccount && s.namespace.as_deref().is_none_or(|n| Some(n) == ns))
        .map(|s| s.name.clone())
        .collect()
}

impl Identities {
    /// From the attributed AccessPolicies, the users their teams' Secrets record, the users the spec names, and
    /// what was known before (a team's user known before and no longer recorded was revoked). Grants that expired
    /// by `now` are not held.
    pub fn build(
        policies: &[AccessPolicy],
        teams: &[TeamUsers],
        known: &[KnownIdentity],
        before: &Identities,
        now: Timestamp,
    ) -> Identities {
        let mut users = BTreeMap::new();
        // A team's user known before and no longer on its Secret was revoked (only for policies still attributed:
        // the users of a policy the monitor no longer attributes are simply not known).
        let attributed = |p: &str| policies.iter().any(|x| x.metadata.name.as_deref() == Some(p));
        for (user, who) in &before.users {
            if let Some((team, policy)) = who.team().filter(|(_, p)| attributed(p)) {
                users.insert(user.clone(), Who::Revoked { team: team.into(), policy: policy.into() });
            }
        }
        let mut valid_until: Option<Timestamp> = None;
        for k in known {
            users.insert(k.user.clone(), Who::Known { name: k.name.clone(), tables: k.tables.clone() });
        }
        for t in teams {
            let grants = policies
                .iter()
                .filter(|p| p.metadata.name.as_deref() == Some(t.policy.as_str()))
                .flat_map(|p| p.spec.teams.iter().filter(|x| x.name == t.team))
                .flat_map(|x| x.database.iter().flat_map(|d| d.grants.iter()))
                .filter(|g| g.expires_at.as_ref().is_none_or(|e| e.0 > now))
                .inspect(|g| {
                    if let Some(e) = &g.expires_at {
                        valid_until = Some(valid_until.map_or(e.0, |v| v.min(e.0)));
                    }
                })
                .flat_map(|g| {
                    g.tables
                        .iter()
                        .map(|table| Grant { table: format!("{}.{table}", g.schema), privileges: g.privileges.clone() })
                })
                .collect::<Vec<_>>();
            let accounts: Vec<String> = policies
                .iter()
                .filter(|p| p.metadata.name.as_deref() == Some(t.policy.as_str()))
                .flat_map(|p| team_accounts(p, &t.team))
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect();
            for user in &t.users {
                let who = Who::Team {
                    team: t.team.clone(),
                    policy: t.policy.clone(),
                    grants: grants.clone(),
                    accounts: accounts.clone(),
                };
                users.insert(user.clone(), who);
            }
        }
        Identities { users, valid_until }
    }

    /// Who `user` is.
    pub fn who(&self, user: &str) -> &Who {
        self.users.get(user).unwrap_or(&Who::Unknown)
    }

    /// The revoked team users: (user, team, AccessPolicy).
    pub fn revoked(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.users.iter().filter_map(|(u, w)| match w {
            Who::Revoked { team, policy } => Some((u.as_str(), team.as_str(), policy.as_str())),
            _ => None,
        })
    }

    /// Adds revoked team users remembered elsewhere (the monitor's status, after a restart); known users keep who
    /// they are.
    pub fn remember_revoked<'a>(&mut self, revoked: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) {
        for (user, team, policy) in revoked {
            self.users
                .entry(user.to_string())
                .or_insert_with(|| Who::Revoked { team: team.into(), policy: policy.into() });
        }
    }

    /// Forgets the revoked users not in `keep` (they become unknown: their use is still a finding).
    pub fn forget_revoked_except(&mut self, keep: &BTreeSet<String>) {
        self.users.retain(|u, w| !matches!(w, Who::Revoked { .. }) || keep.contains(u));
    }

    /// Whether `user` is known at all (a team's, revoked or named).
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }
}

/// Revoked team users are remembered this long after they were seen revoked.
pub const REVOKED_KEPT_DAYS: i64 = 30;
/// At most this many.
pub const REVOKED_KEPT: usize = 100;

/// The revoked users `ids` knows, as the monitor's status keeps them: since when (from `previous`, else `now`),
/// newest first, at most [`REVOKED_KEPT`], none older than [`REVOKED_KEPT_DAYS`]; `ids` forgets the others.
pub fn keep_revoked(previous: &[RevokedUser], ids: &mut Identities, now: Timestamp) -> Vec<RevokedUser> {
    let oldest = now.checked_sub(jiff::SignedDuration::from_hours(24 * REVOKED_KEPT_DAYS)).unwrap_or(now);
    let mut kept: Vec<RevokedUser> = ids
        .revoked()
        .map(|(user, team, policy)| RevokedUser {
            user: user.into(),
            team: team.into(),
            access_policy: policy.into(),
            since: previous.iter().find(|p| p.user == user).map_or(Time(now), |p| p.since.clone()),
        })
        .filter(|r| r.since.0 >= oldest)
        .collect();
    kept.sort_by(|a, b| b.since.0.cmp(&a.since.0).then_with(|| a.user.cmp(&b.user)));
    kept.truncate(REVOKED_KEPT);
    ids.forget_revoked_except(&kept.iter().map(|r| r.user.clone()).collect());
    kept
}

/// A failed login's user name comes from the client, and is often a password typed into the wrong field: for a
/// user nobody knows it is kept only as a pseudonym (`unknown-` and 12 hex digits of its SHA-256), which still
/// counts repeated failures of the same name.
pub fn mask_unknown_logins(accesses: &mut [super::access::Access], ids: &Identities) {
    use sha2::Digest as _;
    for a in accesses.iter_mut().filter(|a| a.kind == super::access::Kind::LoginFailed && !ids.knows(&a.user)) {
        let digest = sha2::Sha256::digest(a.user.as_bytes());
        a.user = format!("unknown-{}", digest.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AccessPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": "crm"},
            "spec": {"vault": {}, "teams": [{
                "name": "sales", "subjects": [{"kind": "Group", "name": "sales"}], "credentials": {},
                "database": {"connection": "crm", "grants": [
                    {"schema": "crm", "tables": ["contacts", "deals"], "privileges": ["SELECT", "UPDATE"]},
                    {"schema": "crm", "tables": ["invoices"], "privileges": ["SELECT"], "expiresAt": "2026-12-01T00:00:00Z"}
                ]}
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn team_users_carry_their_live_grants_and_a_user_gone_from_the_secret_is_revoked() {
        let now: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales-1".into()] }];
        let known = [KnownIdentity { user: "crm_app".into(), name: "crm-web".into(), tables: vec![] }];
        let first = Identities::build(&[policy()], &teams, &known, &Identities::default(), now);
        let Who::Team { grants, .. } = first.who("v-sales-1") else { panic!("{:?}", first.who("v-sales-1")) };
        let tables: Vec<&str> = grants.iter().map(|g| g.table.as_str()).collect();
        assert_eq!(tables, ["crm.contacts", "crm.deals"], "the expired invoices grant is not held");
        assert_eq!(first.who("crm_app").describe(), "crm-web");
        assert_eq!(first.who("mallory"), &Who::Unknown);
        // The next credential replaced the first on the Secret.
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales-2".into()] }];
        let second = Identities::build(&[policy()], &teams, &known, &first, now);
        assert_eq!(second.who("v-sales-1").describe(), "revoked credential of team sales (AccessPolicy crm-access)");
        assert_eq!(second.who("v-sales-2").describe(), "team sales (AccessPolicy crm-access)");
        // Still revoked one build later.
        let third = Identities::build(&[policy()], &teams, &known, &second, now);
        assert!(matches!(third.who("v-sales-1"), Who::Revoked { .. }));
        // A policy no longer attributed: its users are not known at all (not revoked).
        let dropped = Identities::build(&[], &[], &known, &third, now);
        assert_eq!(dropped.who("v-sales-2"), &Who::Unknown);
        assert_eq!(dropped.who("v-sales-1"), &Who::Unknown);
    }

    /// A revoked user is kept with the time it was first seen revoked, remembered across a restart (built again
    /// from the status), and forgotten after 30 days: then it is unknown, still a finding.
    #[test]
    fn revoked_users_survive_a_restart_through_the_status_for_thirty_days() {
        let now: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let team = |u: &str| [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec![u.into()] }];
        let first = Identities::build(&[policy()], &team("v-sales-1"), &[], &Identities::default(), now);
        let mut second = Identities::build(&[policy()], &team("v-sales-2"), &[], &first, now);
        let status = keep_revoked(&[], &mut second, now);
        assert_eq!(status.len(), 1);
        assert_eq!((status[0].user.as_str(), status[0].since.0), ("v-sales-1", now));
        // A restart: nothing in memory, the status remembered.
        let mut before = Identities::default();
        before.remember_revoked(status.iter().map(|r| (r.user.as_str(), r.team.as_str(), r.access_policy.as_str())));
        let later = now.checked_add(jiff::SignedDuration::from_hours(24)).unwrap();
        let mut restarted = Identities::build(&[policy()], &team("v-sales-2"), &[], &before, later);
        assert!(matches!(restarted.who("v-sales-1"), Who::Revoked { .. }), "{:?}", restarted.who("v-sales-1"));
        let kept = keep_revoked(&status, &mut restarted, later);
        assert_eq!(kept[0].since.0, now, "first seen revoked before the restart");
        let month = now.checked_add(jiff::SignedDuration::from_hours(24 * 31)).unwrap();
        assert_eq!(keep_revoked(&kept, &mut restarted, month), vec![]);
        assert_eq!(restarted.who("v-sales-1"), &Who::Unknown);
    }

    #[test]
    fn identities_are_valid_until_the_first_grant_expires() {
        let before: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales-1".into()] }];
        let ids = Identities::build(&[policy()], &teams, &[], &Identities::default(), before);
        assert_eq!(ids.valid_until, Some("2026-12-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn a_failed_login_of_nobody_known_keeps_no_name() {
        use crate::monitor::access::{Access, Kind};
        let known = [KnownIdentity { user: "crm_app".into(), name: "crm-web".into(), tables: vec![] }];
        let ids = Identities::build(&[], &[], &known, &Identities::default(), Timestamp::UNIX_EPOCH);
        let login = |user: &str| Access {
            at: Timestamp::UNIX_EPOCH,
            user: user.into(),
            kind: Kind::LoginFailed,
            command: "LOGIN".into(),
            object: None,
            client: Default::default(),
        };
        let mut a = vec![login("Sup3r-Secret-typed-as-user"), login("Sup3r-Secret-typed-as-user"), login("crm_app")];
        mask_unknown_logins(&mut a, &ids);
        assert!(a[0].user.starts_with("unknown-") && a[0].user.len() == 20, "{}", a[0].user);
        assert_eq!(a[0].user, a[1].user, "the same name, the same pseudonym");
        assert_eq!(a[2].user, "crm_app");
    }
}
