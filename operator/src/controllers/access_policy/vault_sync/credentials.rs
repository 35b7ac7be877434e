//! Each team's database credentials: leases issued, renewed, rotated and revoked, delivered into the team's
//! Secret; Secrets of teams that no longer have grants removed with their leases.

use std::collections::BTreeMap;

use super::*;
use crate::api::condition::VaultFailure;
use crate::controllers::access_policy::lease::Delivery;

/// Issues, renews, rotates and revokes each team's credentials; builds the Secrets and restart patches.
#[allow(clippy::too_many_arguments)]
pub(super) async fn issue_credentials(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    api: &impl VaultOps,
    s: &VaultSettings,
    objects: &VaultObjects,
    engines: &BTreeMap<String, Result<Engine, String>>,
    secrets: &impl SecretOps,
    now: Timestamp,
    out: &mut Outcome,
) -> Result<(), Error> {
    let owner = &v.owner;
    let db = mount(&s.database_mount);
    let mut issued = Vec::new();
    let mut failed: Vec<(String, CredentialsIssued)> = Vec::new();
    let mut wanted_secrets = BTreeSet::new();
    let mut holds: Vec<String> = Vec::new();
    for team in &p.spec.teams {
        let Some(role) = objects.teams.iter().find(|t| t.team == team.name).and_then(|t| t.db_role.as_ref()) else {
            continue;
        };
        let name = secret_name(&owner.name, team);
        let failed_before = failed.len();
        wanted_secrets.insert(name.clone());
        out.teams.entry(team.name.clone()).or_default().secret_name = Some(name.clone());
        if let Err(e) = vault_objects::check_identifiers(role) {
            failed.push((format!("{}: {e}", team.name), CredentialsIssued::InvalidGrant));
            continue;
        }
        match engines.get(&role.connection) {
            Some(Ok(_)) => {}
            Some(Err(msg)) => {
                failed.push((format!("{}: {msg}", team.name), CredentialsIssued::DatabaseConnectionMissing));
                continue;
            }
            None => continue,
        }
        let current = secrets.get(&name).await?;
        if let Some(c) = &current
            && !c.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid)
        {
            failed.push((
                format!(
                    "{}: Secret {name:?} exists and is not managed by this AccessPolicy; delete it or set \
                     credentials.secretName to another name",
                    team.name
                ),
                CredentialsIssued::SecretConflict,
            ));
            continue;
        }
        let d = v.delivery(&team.name);
        let grants = role.grants.iter().cloned().collect::<Vec<_>>().join(",");
        let annotations = current.as_ref().and_then(|c| c.metadata.annotations.clone()).unwrap_or_default();
        let held = current.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
        if let Some(hold) = v.holds.get(&team.name) {
            // An AccessMonitor's incident: every recorded lease revoked, the Secret emptied, nothing issued until
            // the hold is lifted. A revocation that fails leaves the Secret as it is, and is retried.
            let state = State::from_annotations(&annotations);
            let leases = state.current.iter().map(|l| &l.lease_id).chain(state.previous.iter().map(|p| &p.lease_id));
            let path = format!("{db}/creds/{}", role.name);
            let mut revoked = true;
            for lease_id in leases {
                match api.revoke(lease_id).await {
                    Ok(()) => {
                        out.audit(VaultAction::LeaseRevoke, path.clone(), format!("team {}: held by {hold}", team.name))
                    }
                    Err(e) => {
                        revoked = false;
                        let m = format!("{}: revoking the held credential failed, retrying: {e}", team.name);
                        failed.push((m, e.reason().into()));
                    }
                }
            }
            if !revoked {
                continue;
            }
            if state.current.is_some() || state.previous.is_some() || held.values().any(|v| !v.0.is_empty()) {
                let note =
                    format!("team {}: credentials held by {hold}: leases revoked, Secret {name} emptied", team.name);
                out.events.push(Note::warning(Event::CredentialsHeld, note));
            }
            let mut meta = owner.child_meta(name.clone(), &format!("credentials-{}", team.name));
            meta.annotations = Some(lease::blank_annotations());
            let data = json!({"username": "", "password": ""});
            out.secrets
                .push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}));
            holds.push(format!(
                "{}: held by {hold}; acknowledge it (kubectl annotate accessmonitor <name> \
                 crmguard.io/acknowledge=<incident id>) to issue new credentials",
                team.name
            ));
            continue;
        }
        let lease = TeamLease { team, secret: &name, path: format!("{db}/creds/{}", role.name), grants, delivery: d };
        let Some((state, data)) = lease
            .step(api, State::from_annotations(&annotations), held, current.is_some(), now, out, &mut failed)
            .await
        else {
            continue;
        };
        let Some(l) = state.current.clone() else { continue };
        if let Some(due) = lease::next_due(&state, &d) {
            out.note(due);
        }
        out.teams.entry(team.name.clone()).or_default().expires_at = Some(l.expires_at);
        if failed.len() == failed_before {
            issued.push(format!("{} (Secret {name}, lease until {})", team.name, l.expires_at));
        }
        let mut meta = owner.child_meta(name.clone(), &format!("credentials-{}", team.name));
        let mut recorded = state.annotations();
        let user = data.get("username").map(|u| String::from_utf8_lossy(&u.0).into_owned()).unwrap_or_default();
        if !user.is_empty() {
            recorded.extend(lease::usernames(&annotations, &user, &state));
        }
        meta.annotations = Some(recorded);
        let b64 = base64::engine::general_purpose::STANDARD;
        let data_json: serde_json::Map<String, Value> =
            data.iter().map(|(k, v)| (k.clone(), Value::String(b64.encode(&v.0)))).collect();
        out.secrets.push(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data_json,
        }));
        // One rolling restart per credential generation: the annotation carries the issue time, so the same
        // credential (e.g. after an operator restart) patches nothing new.
        for w in team.credentials.iter().flat_map(|c| c.restart_workloads.iter()) {
            let kind = match w.kind {
                WorkloadKind::Deployment => "Deployment",
                WorkloadKind::StatefulSet => "StatefulSet",
                WorkloadKind::DaemonSet => "DaemonSet",
            };
            out.patches.push(ObjectPatch {
                api_version: "apps/v1",
                kind,
                name: w.name.clone(),
                patch: json!({"spec": {"template": {"metadata": {"annotations": {
                    restart_annotation(&owner.name, &team.name): l.issued_at.to_string()
                }}}}}),
            });
        }
    }
    out.credentials = if let Some((_, reason)) = failed.first() {
        out.retry = Some(VAULT_RETRY);
        Cond::new(*reason, Status::False, failed.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join("; "))
    } else if !holds.is_empty() {
        // An acknowledgement ends a hold without touching this policy: look again soon.
        out.retry = Some(VAULT_RETRY);
        Cond::new(CredentialsIssued::CredentialsHeld, Status::False, holds.join("; "))
    } else if issued.is_empty() {
        Cond::new(CredentialsIssued::NotRequested, Status::True, "no team has live database grants")
    } else {
        Cond::new(CredentialsIssued::Issued, Status::True, issued.join("; "))
    };
    remove_stale_secrets(p, v, secrets, Some(api), &wanted_secrets, out).await
}

/// One team's credentials: who, into which Secret, from which Vault path, for which grants and settings.
struct TeamLease<'a> {
    team: &'a Team,
    secret: &'a str,
    /// The database role's `creds/` path.
    path: String,
    /// The grants the credential carries (a change means a new credential).
    grants: String,
    delivery: Delivery,
}

impl TeamLease<'_> {
    /// One pass at `now` over the lease recorded in `state`: the previous credential revoked once its grace
    /// period is over, the current one renewed when due, a new one issued when needed (none yet, expired, grants
    /// changed, maximum TTL near). Returns the state to record and the credentials to deliver (`held`, the
    /// Secret's, unless new ones were issued); `None` when nothing can be delivered (issuing failed and there is no
    /// Secret yet). Failures go to `failed`, Events and audit records to `out`.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        api: &impl VaultOps,
        mut state: State,
        mut data: BTreeMap<String, k8s_openapi::ByteString>,
        had_secret: bool,
        now: Timestamp,
        out: &mut Outcome,
        failed: &mut Vec<(String, CredentialsIssued)>,
    ) -> Option<(State, BTreeMap<String, k8s_openapi::ByteString>)> {
        let (team, name, d) = (self.team, self.secret, self.delivery);
        // Why revoking the previous credential failed in this pass, if it did.
        let mut revoke_failure: Option<(VaultFailure, String)> = None;
        // A replaced credential whose grace period is over.
        if let Some(prev) = state.previous.clone()
            && now >= prev.revoke_at
        {
            match api.revoke(&prev.lease_id).await {
                Ok(()) => {
                    state.previous = None;
                    out.audit(
                        VaultAction::LeaseRevoke,
                        self.path.clone(),
                        format!("team {}: previous credential, grace period over", team.name),
                    );
                    out.events.push(Note::normal(
                        Event::CredentialsRevoked,
                        format!("team {}: the previous database credential was revoked", team.name),
                    ));
                }
                Err(e) => {
                    revoke_failure = Some((e.reason(), e.to_string()));
                    out.events.push(Note::warning(
                        Event::RevokeFailed,
                        format!("team {}: revoking the previous credential failed, retrying: {e}", team.name),
                    ));
                }
            }
        }
        let mut step = lease::decide(now, &state, &self.grants, &d);
        if step == Step::Renew {
            let lease_id = state.current.as_ref().map(|l| l.lease_id.clone()).unwrap_or_default();
            match api.renew(&lease_id, d.ttl).await {
                Ok(dur) if dur > Duration::ZERO => {
                    if let Some(l) = state.current.as_mut() {
                        l.renewed_at = now;
                        l.expires_at =
                            now.checked_add(SignedDuration::try_from(dur).unwrap_or_default()).unwrap_or(l.expires_at);
                    }
                    tracing::info!(team = %team.name, expires_at = %state.current.as_ref().map(|l| l.expires_at.to_string()).unwrap_or_default(), "database credential lease renewed");
                    out.audit(VaultAction::LeaseRenew, self.path.clone(), format!("team {}", team.name));
                }
                Ok(_) | Err(ApiError::Status { code: 400, .. }) => step = Step::Issue(IssueReason::Expired),
                Err(e) => {
                    failed.push((format!("{}: renewing the lease failed: {e}", team.name), e.reason().into()));
                }
            }
        }
        if let Step::Issue(reason) = step {
            // A still older credential waiting for revocation would lose its bookkeeping: revoke it first, and
            // when that fails keep everything as it is (that credential stays recorded) and retry at the next pass.
            if let Some(prev) = state.previous.clone() {
                let failure = match revoke_failure.take() {
                    Some(f) => Some(f),
                    None => match api.revoke(&prev.lease_id).await {
                        Ok(()) => {
                            state.previous = None;
                            let why = format!("team {}: an older credential, before issuing a new one", team.name);
                            out.audit(VaultAction::LeaseRevoke, self.path.clone(), why);
                            None
                        }
                        Err(e) => {
                            let note =
                                format!("team {}: revoking an older credential failed, retrying: {e}", team.name);
                            out.events.push(Note::warning(Event::RevokeFailed, note));
                            Some((e.reason(), e.to_string()))
                        }
                    },
                };
                if let Some((reason, message)) = failure {
                    let msg =
                        format!("{}: a new credential waits until the older one is revoked: {message}", team.name);
                    failed.push((msg, reason.into()));
                    return had_secret.then_some((state, data));
                }
            }
            match api.read_leased(&self.path).await {
                Ok(leased) => {
                    let first = state.current.is_none();
                    let lease_duration = leased.lease_duration;
                    state = lease::issued(
                        now,
                        &state,
                        reason,
                        lease::NewLease {
                            lease_id: leased.lease_id,
                            duration: lease_duration,
                            renewable: leased.renewable,
                        },
                        &self.grants,
                        &d,
                    );
                    data.clear();
                    for k in ["username", "password"] {
                        let val = leased.data.get(k).and_then(Value::as_str).unwrap_or_default();
                        data.insert(k.to_string(), k8s_openapi::ByteString(val.as_bytes().to_vec()));
                    }
                    let until = state.current.as_ref().map(|l| l.expires_at.to_string()).unwrap_or_default();
                    let restarts: Vec<String> = team
                        .credentials
                        .iter()
                        .flat_map(|c| c.restart_workloads.iter())
                        .map(|w| format!("{:?}/{}", w.kind, w.name))
                        .collect();
                    let restarts = if restarts.is_empty() {
                        String::new()
                    } else {
                        format!("; restarting {}", restarts.join(", "))
                    };
                    out.events.push(if first {
                        Note::normal(Event::CredentialsIssued, format!("team {}: database credentials issued into Secret {name}, lease until {until}{restarts}", team.name))
                    } else {
                        Note::normal(Event::CredentialsRotated, format!("team {}: new database credentials in Secret {name} ({}), lease until {until}; the previous one is revoked {}{restarts}", team.name, reason.describe(), if reason.revoke_at_once() { "as soon as the new Secret is written".to_string() } else { format!("after the grace period ({})", team.credentials.as_ref().map(|c| c.revoke_grace_period.as_str()).unwrap_or("5m")) }))
                    });
                    tracing::info!(team = %team.name, secret = %name, reason = reason.describe(), "database credentials issued");
                    out.audit(
                        VaultAction::LeaseIssue,
                        self.path.clone(),
                        format!("team {}: {} into Secret {name}", team.name, reason.describe()),
                    );
                }
                Err(e) => {
                    failed.push((format!("{}: issuing credentials failed: {e}", team.name), e.reason().into()));
                    if !had_secret {
                        return None;
                    }
                }
            }
        }
        Some((state, data))
    }
}

/// Secrets this policy delivered earlier for teams that no longer get credentials: their leases are revoked
/// and the Secrets deleted.
pub(super) async fn remove_stale_secrets<V: VaultOps>(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    api_secrets: &impl SecretOps,
    api: Option<&V>,
    wanted: &BTreeSet<String>,
    out: &mut Outcome,
) -> Result<(), Error> {
    let previous: BTreeSet<String> = p
        .status
        .iter()
        .flat_map(|s| s.teams.iter())
        .filter_map(|t| t.secret_name.clone())
        .filter(|n| !wanted.contains(n))
        .collect();
    for name in previous {
        let Some(sec) = api_secrets.get(&name).await? else { continue };
        if !sec.metadata.owner_references.iter().flatten().any(|r| r.uid == v.owner.uid) {
            continue;
        }
        let leases = if let Some(api) = api {
            revoke_all(api, &sec).await.map_err(|e| Error::Cleanup(e.to_string()))?;
            out.audit(VaultAction::LeaseRevoke, format!("Secret {name}"), "the team no longer has database grants");
            "its leases were revoked"
        } else {
            // Without Vault the leases simply run out; the Secret must not outlive the grant.
            tracing::warn!(secret = %name, "removing credentials without Vault access; their leases expire on their own");
            "its leases run out on their own (the policy no longer uses Vault)"
        };
        api_secrets.delete(&name).await?;
        out.events.push(Note::normal(
            Event::CredentialsRemoved,
            format!("Secret {name}: the team no longer has database grants; {leases}"),
        ));
    }
    Ok(())
}

/// Revokes the current and previous leases recorded on a credentials Secret.
pub(super) async fn revoke_all(api: &impl VaultOps, sec: &Secret) -> Result<(), ApiError> {
    let a = sec.metadata.annotations.clone().unwrap_or_default();
    for k in [lease::LEASE_ID, lease::PREVIOUS_LEASE_ID] {
        if let Some(id) = a.get(k) {
            api.revoke(id).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeVault;
    use super::*;

    fn team() -> Team {
        serde_json::from_value(serde_json::json!({"name": "sales", "subjects": []})).unwrap()
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const D: Delivery = Delivery {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(4 * 3600),
        renew_fraction: 0.5,
        grace: Duration::from_secs(300),
    };

    struct Pass {
        result: Option<(State, BTreeMap<String, k8s_openapi::ByteString>)>,
        out: Outcome,
        failed: Vec<(String, CredentialsIssued)>,
    }

    async fn pass(vault: &FakeVault, state: State, had_secret: bool, now: &str, grants: &str) -> Pass {
        let team = team();
        let lease = TeamLease {
            team: &team,
            secret: "crm-access-sales-db",
            path: "database/creds/sales".into(),
            grants: grants.into(),
            delivery: D,
        };
        let mut out = Outcome::new(VaultObjects::default());
        let mut failed = vec![];
        let held = BTreeMap::from([("username".to_string(), k8s_openapi::ByteString(b"v-sales-old".to_vec()))]);
        let result = lease.step(vault, state, held, had_secret, t(now), &mut out, &mut failed).await;
        Pass { result, out, failed }
    }

    fn username(p: &Pass) -> String {
        let data = &p.result.as_ref().unwrap().1;
        String::from_utf8(data["username"].0.clone()).unwrap()
    }

    fn reasons(out: &Outcome) -> Vec<&'static str> {
        out.events.iter().map(|e| e.reason).collect()
    }

    #[tokio::test]
    async fn a_first_pass_issues_then_renews_at_the_renewal_point_then_rotates_before_the_maximum() {
        let vault = FakeVault::default();
        let first = pass(&vault, State::default(), false, "2026-12-01T00:00:00Z", "SELECT crm.deals").await;
        assert_eq!(username(&first), "v-sales-1");
        assert_eq!(reasons(&first.out), ["CredentialsIssued"]);
        assert_eq!(first.out.audit.iter().map(|a| a.action).collect::<Vec<_>>(), [VaultAction::LeaseIssue]);
        let state = first.result.unwrap().0;
        // Before half the term: nothing asked of Vault.
        let calls = vault.calls.lock().unwrap().len();
        let keep = pass(&vault, state.clone(), true, "2026-12-01T00:29:00Z", "SELECT crm.deals").await;
        assert_eq!(vault.calls.lock().unwrap().len(), calls, "nothing asked of Vault before the renewal point");
        assert_eq!(username(&keep), "v-sales-old", "the Secret's credentials stay");
        // At half the term: renewed, the same credentials, a later expiry.
        let renewed = pass(&vault, state, true, "2026-12-01T00:31:00Z", "SELECT crm.deals").await;
        assert_eq!(vault.calls.lock().unwrap().last().unwrap(), "renew database/creds/sales/1 3600s");
        let state = renewed.result.unwrap().0;
        assert_eq!(state.current.as_ref().unwrap().expires_at, t("2026-12-01T01:31:00Z"));
        assert!(renewed.out.events.is_empty());
        // Renewed every half term until 30 minutes before the maximum TTL (4 h): then a new credential, the old one
        // living through the grace period.
        let mut state = state;
        for at in ["01:01", "01:31", "02:01", "02:31", "03:01"] {
            let calls = vault.calls.lock().unwrap().len();
            let renewed = pass(&vault, state, true, &format!("2026-12-01T{at}:00Z"), "SELECT crm.deals").await;
            assert_eq!(vault.calls.lock().unwrap().len(), calls + 1, "one call at {at}");
            assert!(vault.calls.lock().unwrap().last().unwrap().starts_with("renew database/creds/sales/1"), "{at}");
            state = renewed.result.unwrap().0;
        }
        let rotated = pass(&vault, state, true, "2026-12-01T03:31:00Z", "SELECT crm.deals").await;
        assert_eq!(username(&rotated), "v-sales-2");
        assert_eq!(reasons(&rotated.out), ["CredentialsRotated"]);
        let state = rotated.result.unwrap().0;
        let previous = state.previous.clone().unwrap();
        assert_eq!(
            (previous.lease_id.as_str(), previous.revoke_at),
            ("database/creds/sales/1", t("2026-12-01T03:36:00Z"))
        );
        // After the grace period: the previous lease is revoked, once.
        let later = pass(&vault, state, true, "2026-12-01T03:37:00Z", "SELECT crm.deals").await;
        assert_eq!(vault.calls.lock().unwrap().last().unwrap(), "revoke database/creds/sales/1");
        assert_eq!(reasons(&later.out), ["CredentialsRevoked"]);
        let state = later.result.unwrap().0;
        assert_eq!(state.previous, None);
        let revokes = || vault.calls.lock().unwrap().iter().filter(|c| c.starts_with("revoke")).count();
        let before = revokes();
        pass(&vault, state, true, "2026-12-01T03:38:00Z", "SELECT crm.deals").await;
        assert_eq!(revokes(), before, "revoked once");
    }

    #[tokio::test]
    async fn a_narrowed_grant_replaces_the_credential_and_revokes_the_old_one_at_once() {
        let vault = FakeVault::default();
        let first =
            pass(&vault, State::default(), false, "2026-12-01T00:00:00Z", "SELECT crm.deals,SELECT crm.invoices").await;
        let state = first.result.unwrap().0;
        let narrowed = pass(&vault, state, true, "2026-12-01T00:05:00Z", "SELECT crm.deals").await;
        assert_eq!(username(&narrowed), "v-sales-2");
        let state = narrowed.result.unwrap().0;
        let previous = state.previous.clone().unwrap();
        assert_eq!(previous.revoke_at, t("2026-12-01T00:05:00Z"), "a credential that may read more is revoked now");
        // Revoked at the pass that follows the write of the new Secret (the same instant will do).
        let next = pass(&vault, state, true, "2026-12-01T00:05:00Z", "SELECT crm.deals").await;
        assert_eq!(vault.calls.lock().unwrap().last().unwrap(), "revoke database/creds/sales/1");
        assert_eq!(next.result.unwrap().0.previous, None);
    }

    #[tokio::test]
    async fn a_renewal_vault_refuses_as_expired_issues_a_new_credential() {
        let vault = FakeVault::default();
        let state =
            pass(&vault, State::default(), false, "2026-12-01T00:00:00Z", "SELECT crm.deals").await.result.unwrap().0;
        *vault.renew_answer.lock().unwrap() = Some(ApiError::Status {
            op: "PUT".into(),
            path: "sys/leases/renew".into(),
            code: 400,
            message: "lease not found".into(),
        });
        let p = pass(&vault, state, true, "2026-12-01T00:31:00Z", "SELECT crm.deals").await;
        assert_eq!(username(&p), "v-sales-2");
        assert!(p.failed.is_empty(), "{:?}", p.failed);
    }

    #[tokio::test]
    async fn when_issuing_fails_the_secrets_credentials_stay_and_without_a_secret_nothing_is_delivered() {
        let ok = FakeVault::default();
        let state =
            pass(&ok, State::default(), false, "2026-12-01T00:00:00Z", "SELECT crm.deals").await.result.unwrap().0;
        let down = FakeVault { issue_fails: true, ..FakeVault::default() };
        // Grants changed while Vault is down: the Secret keeps what it has, and the failure is reported.
        let p = pass(&down, state.clone(), true, "2026-12-01T00:05:00Z", "SELECT crm.invoices").await;
        assert_eq!(username(&p), "v-sales-old");
        assert_eq!(p.result.as_ref().unwrap().0.current, state.current);
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.failed[0].1, CredentialsIssued::Of(VaultFailure::VaultUnreachable));
        assert!(p.failed[0].0.starts_with("sales: issuing credentials failed"), "{}", p.failed[0].0);
        // No Secret yet: nothing to deliver.
        let p = pass(&down, State::default(), false, "2026-12-01T00:05:00Z", "SELECT crm.deals").await;
        assert!(p.result.is_none());
        assert_eq!(p.failed.len(), 1);
    }

    #[tokio::test]
    async fn a_new_credential_waits_while_an_older_one_cannot_be_revoked() {
        let ok = FakeVault::default();
        let state =
            pass(&ok, State::default(), false, "2026-12-01T00:00:00Z", "SELECT crm.deals").await.result.unwrap().0;
        // Grants narrowed: a new credential, the first one to be revoked at once (at the next pass).
        let state = pass(&ok, state, true, "2026-12-01T00:05:00Z", "SELECT crm.invoices").await.result.unwrap().0;
        assert_eq!(state.previous.as_ref().unwrap().lease_id, "database/creds/sales/1");
        // Narrowed again before that pass, while revoking fails: nothing is issued, the first lease stays recorded.
        let failing = FakeVault { revoke_fails: true, ..FakeVault::default() };
        let p = pass(&failing, state.clone(), true, "2026-12-01T00:05:00Z", "SELECT crm.contacts").await;
        assert!(failing.calls_of("issue ").is_empty(), "{:?}", failing.calls.lock().unwrap());
        let kept = p.result.unwrap().0;
        assert_eq!(kept, state, "the state is kept as it was");
        assert_eq!(reasons(&p.out), ["RevokeFailed"], "one failure, one Event");
        assert_eq!(p.failed.len(), 1);
    }
}
