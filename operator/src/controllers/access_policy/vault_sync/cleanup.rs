//! What a deleted AccessPolicy leaves in Vault: its leases revoked, its objects removed (the finalizer's work).

use super::credentials::revoke_all;
use super::objects::remove_under_prefix;
use super::*;

/// Finalizer work: revoke every lease the policy's Secrets record, delete every Vault object under its prefix
/// and the database connection it configured. Idempotent.
pub async fn cleanup(p: &AccessPolicy, ctx: &Context) -> Result<(), Error> {
    let owner = crate::controllers::owner_of(p).map_err(|e| Error::Cleanup(format!("{e:?}")))?;
    let touched =
        p.status.iter().flat_map(|s| s.teams.iter()).any(|t| t.vault_policy.is_some() || t.secret_name.is_some());
    if !touched {
        // Nothing was ever created in Vault for this policy (its status would name it).
        return Ok(());
    }
    let s = settings(p);
    let fail = |e: ApiError| Error::Cleanup(e.to_string());
    let addr = ctx.vault.address(s.address.as_deref()).map_err(fail)?;
    let api = ctx.vault.api(&addr).await.map_err(fail)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let mut names: BTreeSet<String> = p.spec.teams.iter().map(|t| secret_name(&owner.name, t)).collect();
    names.extend(p.status.iter().flat_map(|s| s.teams.iter()).filter_map(|t| t.secret_name.clone()));
    let mut revoked = 0;
    for name in names {
        let Some(sec) = secrets.get_opt(&name).await? else { continue };
        if sec.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid) {
            revoke_all(&api, &sec).await.map_err(fail)?;
            revoked += 1;
            ctx.audit.record(
                "accesspolicy",
                VaultAction::LeaseRevoke.as_str(),
                "Vault",
                &owner.namespace,
                &format!("Secret {name}"),
                "policy deleted",
            );
        }
    }
    let none = BTreeSet::new();
    let prefix = vault_objects::prefix(&owner.namespace, &owner.name);
    let removed = remove_under_prefix(&api, &s, &prefix, &none, &none, &none).await.map_err(fail)?;
    for path in &removed {
        ctx.audit.record(
            "accesspolicy",
            VaultAction::Delete.as_str(),
            "Vault",
            &owner.namespace,
            path,
            "policy deleted",
        );
    }
    let removed = removed.len();
    if s.connection_secret_ref.is_some() {
        let conns: BTreeSet<&str> =
            p.spec.teams.iter().filter_map(|t| t.database.as_ref()).map(|d| d.connection.as_str()).collect();
        for c in conns {
            let path = format!("{}/config/{c}", mount(&s.database_mount));
            api.delete(&path).await.map_err(fail)?;
            ctx.audit.record(
                "accesspolicy",
                VaultAction::Delete.as_str(),
                "Vault",
                &owner.namespace,
                &path,
                "policy deleted",
            );
        }
    }
    tracing::info!(revoked_secrets = revoked, removed_objects = removed, "Vault cleanup done");
    Ok(())
}
