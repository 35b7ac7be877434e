//! Lease bookkeeping of a team's database credentials, kept in annotations of the Secret that holds them (so an
//! operator restart knows every lease without asking Vault), and the pure decision of what to do at `now`:
//! keep, renew at a fraction of the TTL, or issue new credentials (first time, grants changed, expiry, or
//! before the maximum TTL), and when to revoke the previous credential.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

pub const LEASE_ID: &str = "crmguard.io/lease-id";
pub const ISSUED_AT: &str = "crmguard.io/issued-at";
pub const RENEWED_AT: &str = "crmguard.io/renewed-at";
pub const EXPIRES_AT: &str = "crmguard.io/expires-at";
pub const MAX_EXPIRES_AT: &str = "crmguard.io/max-expires-at";
pub const RENEWABLE: &str = "crmguard.io/renewable";
pub const GRANTS: &str = "crmguard.io/grants";
pub const PREVIOUS_LEASE_ID: &str = "crmguard.io/previous-lease-id";
pub const REVOKE_PREVIOUS_AT: &str = "crmguard.io/revoke-previous-at";
/// The database user of the current credential (not a secret: the AccessMonitor attributes statements by it).
pub const USERNAME: &str = "crmguard.io/username";
/// The database user of the replaced credential while it waits for revocation.
pub const PREVIOUS_USERNAME: &str = "crmguard.io/previous-username";

/// The annotations of a Secret whose credentials are held: every lease and user annotation present and empty (a
/// child is rewritten only when it differs from what is live, so the keys are blanked rather than left out).
pub fn blank_annotations() -> BTreeMap<String, String> {
    [
        LEASE_ID,
        ISSUED_AT,
        RENEWED_AT,
        EXPIRES_AT,
        MAX_EXPIRES_AT,
        RENEWABLE,
        GRANTS,
        PREVIOUS_LEASE_ID,
        REVOKE_PREVIOUS_AT,
        USERNAME,
        PREVIOUS_USERNAME,
    ]
    .into_iter()
    .map(|k| (k.to_string(), String::new()))
    .collect()
}

/// The user annotations of a team's Secret: `user` is the current credential's; the previous user is kept while a
/// replaced credential waits for revocation (`previous` lease recorded), taken from `old` (the Secret's annotations
/// before this pass) when the user changed in it.
pub fn usernames(old: &BTreeMap<String, String>, user: &str, state: &State) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(USERNAME.to_string(), user.to_string())]);
    if state.previous.is_some() {
        let previous = match old.get(USERNAME) {
            Some(u) if u != user => Some(u),
            _ => old.get(PREVIOUS_USERNAME),
        };
        if let Some(p) = previous {
            a.insert(PREVIOUS_USERNAME.into(), p.clone());
        }
    }
    a
}

/// The current credential's lease.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: String,
    pub issued_at: Timestamp,
    pub renewed_at: Timestamp,
    pub expires_at: Timestamp,
    pub max_expires_at: Timestamp,
    pub renewable: bool,
    /// The grants the credential was created with (`DbRole::grants`, joined by `,`).
    pub grants: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("max_expires_at", &self.max_expires_at)
            .finish_non_exhaustive()
    }
}

/// A replaced credential that is revoked at `revoke_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Previous {
    pub lease_id: String,
    pub revoke_at: Timestamp,
}

/// Lease state as stored on the Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub current: Option<Lease>,
    pub previous: Option<Previous>,
}

fn ts(a: &BTreeMap<String, String>, k: &str) -> Option<Timestamp> {
    a.get(k)?.parse().ok()
}

impl State {
    /// Reads the annotations; anything missing or unreadable means "no usable lease".
    pub fn from_annotations(a: &BTreeMap<String, String>) -> State {
        let current = (|| {
            Some(Lease {
                lease_id: a.get(LEASE_ID)?.clone(),
                issued_at: ts(a, ISSUED_AT)?,
                renewed_at: ts(a, RENEWED_AT)?,
                expires_at: ts(a, EXPIRES_AT)?,
                max_expires_at: ts(a, MAX_EXPIRES_AT)?,
                renewable: a.get(RENEWABLE).is_some_and(|v| v == "true"),
                grants: a.get(GRANTS).cloned().unwrap_or_default(),
            })
        })();
        let previous =
            (|| Some(Previous { lease_id: a.get(PREVIOUS_LEASE_ID)?.clone(), revoke_at: ts(a, REVOKE_PREVIOUS_AT)? }))(
            );
        State { current, previous }
    }

    /// The annotations that record this state.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        if let Some(l) = &self.current {
            a.insert(LEASE_ID.into(), l.lease_id.clone());
            a.insert(ISSUED_AT.into(), l.issued_at.to_string());
            a.insert(RENEWED_AT.into(), l.renewed_at.to_string());
            a.insert(EXPIRES_AT.into(), l.expires_at.to_string());
            a.insert(MAX_EXPIRES_AT.into(), l.max_expires_at.to_string());
            a.insert(RENEWABLE.into(), l.renewable.to_string());
            a.insert(GRANTS.into(), l.grants.clone());
        }
        if let Some(p) = &self.previous {
            a.insert(PREVIOUS_LEASE_ID.into(), p.lease_id.clone());
            a.insert(REVOKE_PREVIOUS_AT.into(), p.revoke_at.to_string());
        }
        a
    }
}

/// Rotation settings of a team.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delivery {
    pub ttl: Duration,
    pub max_ttl: Duration,
    /// Fraction of the lease after which it is renewed (0.1-0.9).
    pub renew_fraction: f64,
    pub grace: Duration,
}

impl Delivery {
    /// The CRD's defaults (`credentials` left out).
    pub const DEFAULT: Delivery = Delivery {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
        renew_fraction: 0.67,
        grace: Duration::from_secs(300),
    };

    /// The settings of team `i` (its `credentials`, or the CRD's defaults); a duration that does not parse is a
    /// field error.
    pub fn parse(
        team: &crate::api::access_policy::Team,
        i: usize,
        errors: &mut Vec<crate::validation::FieldError>,
    ) -> Option<Delivery> {
        let c = team.credentials.clone().unwrap_or_default();
        let mut d = |field: &str, value: &str| {
            crate::validation::duration_field(format!("spec.teams[{i}].credentials.{field}"), value, errors)
        };
        let (ttl, max_ttl, grace) =
            (d("ttl", &c.ttl), d("maxTtl", &c.max_ttl), d("revokeGracePeriod", &c.revoke_grace_period));
        Some(Delivery {
            ttl: ttl?,
            max_ttl: max_ttl?,
            renew_fraction: f64::from(c.renew_at_percent.clamp(10, 90)) / 100.0,
            grace: grace?,
        })
    }

    /// Whole seconds of a duration, at least 1 (Vault's TTL fields).
    pub fn secs(d: Duration) -> u64 {
        d.as_secs().max(1)
    }
}

/// Why new credentials are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// None yet (or the Secret's bookkeeping is unreadable).
    First,
    /// The team's grants changed; `reduced` when a privilege was taken away.
    GrantsChanged { reduced: bool },
    /// The lease expired (or cannot be renewed).
    Expired,
    /// The credential approaches its maximum TTL.
    MaxTtl,
}

impl IssueReason {
    pub fn describe(self) -> &'static str {
        match self {
            IssueReason::First => "first issue",
            IssueReason::GrantsChanged { reduced: true } => "grants reduced",
            IssueReason::GrantsChanged { reduced: false } => "grants changed",
            IssueReason::Expired => "lease expired",
            IssueReason::MaxTtl => "maximum TTL approaching",
        }
    }

    /// The old credential must stop working at once (privileges were taken away, or it is dead anyway).
    pub fn revoke_at_once(self) -> bool {
        matches!(self, IssueReason::GrantsChanged { reduced: true } | IssueReason::Expired)
    }
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Keep,
    Renew,
    Issue(IssueReason),
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)).unwrap_or(Timestamp::MAX)
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)).unwrap_or(Timestamp::MIN)
}

fn scaled(d: Duration, f: f64) -> Duration {
    Duration::from_secs_f64(d.as_secs_f64() * f.clamp(0.0, 1.0))
}

/// When the current lease must be replaced: `(1 - renew fraction)` of a TTL before its maximum lifetime, so
/// the new credential is in place well before the old one dies.
pub fn rotate_at(l: &Lease, d: &Delivery) -> Timestamp {
    sub(l.max_expires_at, scaled(d.ttl, 1.0 - d.renew_fraction))
}

/// When the current lease is renewed: at the renew fraction of its current term.
pub fn renew_at(l: &Lease, d: &Delivery) -> Timestamp {
    let term = l.expires_at.duration_since(l.renewed_at);
    let term = Duration::try_from(term).unwrap_or_default();
    add(l.renewed_at, scaled(term, d.renew_fraction))
}

/// Decides the step at `now` for credentials that should carry `grants`.
pub fn decide(now: Timestamp, state: &State, grants: &str, d: &Delivery) -> Step {
    let Some(l) = &state.current else { return Step::Issue(IssueReason::First) };
    if l.grants != grants {
        let new: std::collections::BTreeSet<&str> = grants.split(',').collect();
        let reduced = l.grants.split(',').any(|g| !g.is_empty() && !new.contains(g));
        return Step::Issue(IssueReason::GrantsChanged { reduced });
    }
    if now >= l.expires_at {
        return Step::Issue(IssueReason::Expired);
    }
    if now >= rotate_at(l, d) {
        return Step::Issue(IssueReason::MaxTtl);
    }
    if now >= renew_at(l, d) {
        return if l.renewable { Step::Renew } else { Step::Issue(IssueReason::Expired) };
    }
    Step::Keep
}

/// The next instant something is due for this state (renewal, rotation, or revoking the previous lease).
pub fn next_due(state: &State, d: &Delivery) -> Option<Timestamp> {
    let mut next: Option<Timestamp> = None;
    let mut note = |t: Timestamp| next = Some(next.map_or(t, |n| n.min(t)));
    if let Some(l) = &state.current {
        note(rotate_at(l, d));
        note(if l.renewable { renew_at(l, d) } else { l.expires_at });
    }
    if let Some(p) = &state.previous {
        note(p.revoke_at);
    }
    next
}

/// A lease Vault just granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLease {
    pub lease_id: String,
    pub duration: Duration,
    pub renewable: bool,
}

/// The state after `new` was issued at `now` for `reason`, replacing `old`.
pub fn issued(now: Timestamp, old: &State, reason: IssueReason, new: NewLease, grants: &str, d: &Delivery) -> State {
    let previous = old.current.as_ref().map(|l| Previous {
        lease_id: l.lease_id.clone(),
        revoke_at: if reason.revoke_at_once() { now } else { add(now, d.grace) },
    });
    State {
        current: Some(Lease {
            lease_id: new.lease_id,
            issued_at: now,
            renewed_at: now,
            expires_at: add(now, new.duration),
            max_expires_at: add(now, d.max_ttl),
            renewable: new.renewable,
            grants: grants.to_string(),
        }),
        // A still older credential waiting for revocation is revoked with this reconcile (see the controller).
        previous: previous.or_else(|| old.previous.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nl(id: impl Into<String>) -> NewLease {
        NewLease { lease_id: id.into(), duration: D.ttl, renewable: true }
    }

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }
    const D: Delivery = Delivery {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(4 * 3600),
        renew_fraction: 0.5,
        grace: Duration::from_secs(300),
    };

    #[test]
    fn settings_are_parsed_once_with_the_crds_defaults_and_a_bad_duration_is_a_field_error() {
        let team: crate::api::access_policy::Team =
            serde_json::from_value(serde_json::json!({"name": "sales", "subjects": []})).unwrap();
        let mut errors = vec![];
        assert_eq!(Delivery::parse(&team, 0, &mut errors), Some(Delivery::DEFAULT));
        assert!(errors.is_empty());
        let team: crate::api::access_policy::Team = serde_json::from_value(serde_json::json!({
            "name": "sales", "subjects": [], "credentials": {"ttl": "2h", "maxTtl": "forever"}}))
        .unwrap();
        assert_eq!(Delivery::parse(&team, 3, &mut errors), None);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.teams[3].credentials.maxTtl");
    }

    #[test]
    fn a_credential_lives_through_renewals_then_rotates_before_max_ttl() {
        let start = t("2026-01-01T00:00:00Z");
        let mut s = State::default();
        assert_eq!(decide(start, &s, "SELECT public.a", &D), Step::Issue(IssueReason::First));
        s = issued(start, &s, IssueReason::First, nl("l1"), "SELECT public.a", &D);
        assert_eq!(s.previous, None);
        // Walk the clock minute by minute: renewals at half of each term, rotation 30 min before the 4 h max.
        let (mut renewals, mut rotations) = (0, 0);
        let mut now = start;
        let mut first_rotation = None;
        while now < t("2026-01-01T09:00:00Z") {
            now = add(now, Duration::from_secs(60));
            match decide(now, &s, "SELECT public.a", &D) {
                Step::Keep => {}
                Step::Renew => {
                    renewals += 1;
                    let l = s.current.as_mut().expect("lease");
                    l.renewed_at = now;
                    // Vault caps a renewal at the maximum TTL.
                    l.expires_at = add(now, D.ttl).min(l.max_expires_at);
                }
                Step::Issue(reason) => {
                    assert_eq!(reason, IssueReason::MaxTtl);
                    rotations += 1;
                    first_rotation.get_or_insert(now);
                    let id = format!("l{}", rotations + 1);
                    s = issued(now, &s, reason, nl(id), "SELECT public.a", &D);
                    let p = s.previous.clone().expect("previous");
                    assert_eq!(p.revoke_at, add(now, D.grace), "old one lives through the grace period");
                }
            }
            let l = s.current.as_ref().expect("lease");
            assert!(now < l.expires_at, "credentials never lapse ({now})");
        }
        assert_eq!(first_rotation, Some(t("2026-01-01T03:30:00Z")));
        assert_eq!(rotations, 2);
        // Every 30 min (half of each 1 h term) except when a rotation is due: 6 + 6 + 4 in 9 hours.
        assert_eq!(renewals, 16);
    }

    #[test]
    fn grants_and_expiry_force_a_new_credential() {
        let now = t("2026-01-01T00:00:00Z");
        let s = issued(now, &State::default(), IssueReason::First, nl("l1"), "SELECT public.a", &D);
        assert_eq!(
            decide(now, &s, "SELECT public.a,SELECT public.b", &D),
            Step::Issue(IssueReason::GrantsChanged { reduced: false })
        );
        assert_eq!(decide(now, &s, "SELECT public.b", &D), Step::Issue(IssueReason::GrantsChanged { reduced: true }));
        let reduced = issued(now, &s, IssueReason::GrantsChanged { reduced: true }, nl("l2"), "SELECT public.b", &D);
        assert_eq!(reduced.previous, Some(Previous { lease_id: "l1".into(), revoke_at: now }), "revoked at once");
        let late = add(now, Duration::from_secs(3601));
        assert_eq!(decide(late, &s, "SELECT public.a", &D), Step::Issue(IssueReason::Expired));
        let mut fixed = s.clone();
        fixed.current.as_mut().expect("lease").renewable = false;
        assert_eq!(
            decide(add(now, Duration::from_secs(1900)), &fixed, "SELECT public.a", &D),
            Step::Issue(IssueReason::Expired)
        );
        assert_eq!(next_due(&fixed, &D), Some(add(now, D.ttl)));
    }

    #[test]
    fn the_previous_user_is_kept_while_its_credential_waits_for_revocation() {
        let old = BTreeMap::from([(USERNAME.to_string(), "v-1".to_string())]);
        let waiting = State {
            current: None,
            previous: Some(Previous { lease_id: "l1".into(), revoke_at: Timestamp::UNIX_EPOCH }),
        };
        let rotated = usernames(&old, "v-2", &waiting);
        assert_eq!(rotated.get(PREVIOUS_USERNAME).map(String::as_str), Some("v-1"));
        // The next pass (same user) keeps it; once revoked it goes.
        let mut old = rotated.clone();
        old.insert(USERNAME.into(), "v-2".into());
        assert_eq!(usernames(&old, "v-2", &waiting), rotated);
        let revoked = usernames(&old, "v-2", &State::default());
        assert_eq!(revoked, BTreeMap::from([(USERNAME.to_string(), "v-2".to_string())]));
    }

    #[test]
    fn blank_annotations_record_no_lease() {
        assert_eq!(State::from_annotations(&blank_annotations()), State::default());
    }

    #[test]
    fn annotations_round_trip_and_garbage_means_no_lease() {
        let now = t("2026-01-01T00:00:00Z");
        let mut s = issued(now, &State::default(), IssueReason::First, nl("l1"), "SELECT public.a", &D);
        s.previous = Some(Previous { lease_id: "l0".into(), revoke_at: now });
        let a = s.annotations();
        assert_eq!(State::from_annotations(&a), s);
        let mut broken = a.clone();
        broken.insert(EXPIRES_AT.into(), "soon".into());
        assert_eq!(State::from_annotations(&broken).current, None);
        assert_eq!(next_due(&s, &D), Some(now), "the previous lease is due");
    }
}
