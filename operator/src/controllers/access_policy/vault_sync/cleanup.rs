//! What a deleted AccessPolicy leaves in Vault: its leases revoked, its objects removed (the finalizer's work).

use super::credentials::revoke_all;
use super::objects::remove_under_prefix;
use super::*;
use crate::k8s::meta::Owner;

/// Finalizer work: revoke every lease the policy's Secrets record, delete every Vault object under its prefix
/// and the database connection it configured. Idempotent. Every Vault write is audited, also when a later one
/// fails.
pub async fn cleanup(p: &AccessPolicy, ctx: &Context) -> Result<(), Error> {
    let owner = crate::controllers::owner_of(p).map_err(|e| Error::Cleanup(format!("{e:?}")))?;
    if !touched(p) {
        return Ok(());
    }
    let s = settings(p);
    let fail = |e: ApiError| Error::Cleanup(e.to_string());
    let addr = ctx.vault.address(s.address.as_deref()).map_err(fail)?;
    let api = ctx.vault.api(&addr).await.map_err(fail)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let mut done = Vec::new();
    let result = remove_all(p, &owner, &api, &secrets, &mut done).await;
    for w in &done {
        ctx.audit.record("accesspolicy", w.action.as_str(), "Vault", &owner.namespace, &w.path, &w.reason);
    }
    result
}

/// Whether Vault may hold anything of the policy: its status names a Vault policy or a credentials Secret
/// (nothing is created in Vault before the status says so).
pub(super) fn touched(p: &AccessPolicy) -> bool {
    p.status.iter().flat_map(|s| s.teams.iter()).any(|t| t.vault_policy.is_some() || t.secret_name.is_some())
}

/// Revokes the leases of the Secrets the policy owns, removes its objects and the connection it configured; what
/// was done goes to `done`.
pub(super) async fn remove_all(
    p: &AccessPolicy,
    owner: &Owner,
    api: &impl VaultOps,
    secrets: &impl SecretOps,
    done: &mut Vec<VaultWrite>,
) -> Result<(), Error> {
    let s = settings(p);
    let fail = |e: ApiError| Error::Cleanup(e.to_string());
    let deleted = |action: VaultAction, path: String| VaultWrite { action, path, reason: "policy deleted".into() };
    let mut names: BTreeSet<String> = p.spec.teams.iter().map(|t| secret_name(&owner.name, t)).collect();
    names.extend(p.status.iter().flat_map(|s| s.teams.iter()).filter_map(|t| t.secret_name.clone()));
    let mut revoked = 0;
    for name in names {
        let Some(sec) = secrets.get(&name).await? else { continue };
        if sec.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid) {
            revoke_all(api, &sec).await.map_err(fail)?;
            revoked += 1;
            done.push(deleted(VaultAction::LeaseRevoke, format!("Secret {name}")));
        }
    }
    let none = BTreeSet::new();
    let prefix = vault_objects::prefix(&owner.namespace, &owner.name);
    let removed = remove_under_prefix(api, &s, &prefix, &none, &none, &none).await.map_err(fail)?;
    let n = removed.len();
    done.extend(removed.into_iter().map(|path| deleted(VaultAction::Delete, path)));
    if s.connection_secret_ref.is_some() {
        let conns: BTreeSet<&str> =
            p.spec.teams.iter().filter_map(|t| t.database.as_ref()).map(|d| d.connection.as_str()).collect();
        for c in conns {
            let path = format!("{}/config/{c}", mount(&s.database_mount));
            api.delete(&path).await.map_err(fail)?;
            done.push(deleted(VaultAction::Delete, path));
        }
    }
    tracing::info!(revoked_secrets = revoked, removed_objects = n, "Vault cleanup done");
    Ok(())
}
