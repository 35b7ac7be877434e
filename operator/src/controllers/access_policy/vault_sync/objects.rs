//! Vault's objects for the policy: policies, Kubernetes-auth roles, the database connection and roles, written
//! when they differ and removed when stale.

use super::*;

/// Writes policies, auth roles, database connection and roles; deletes what is stale under the prefix.
/// Returns the SQL dialect of every connection the teams use.
pub(super) async fn sync_objects(
    p: &AccessPolicy,
    api: &impl VaultOps,
    s: &VaultSettings,
    objects: &VaultObjects,
    secrets: &impl SecretOps,
    out: &mut Outcome,
) -> Result<BTreeMap<String, Result<Engine, String>>, ApiError> {
    let (auth, db) = (mount(&s.kubernetes_auth_mount), mount(&s.database_mount));
    let mut written = 0;
    for t in &objects.teams {
        let path = format!("sys/policies/acl/{}", t.policy_name);
        let text = t.policy.to_string();
        let current = api.read(&path).await?;
        if current.as_ref().and_then(|c| c["data"]["policy"].as_str()) != Some(text.as_str()) {
            api.write(&path, &json!({ "policy": text })).await?;
            written += 1;
            out.audit(VaultAction::Write, path, format!("policy of team {}", t.team));
        }
        for r in &t.auth_roles {
            let path = format!("auth/{auth}/role/{}", r.name);
            if write_if_changed(api, &path, &r.body).await? == 1 {
                written += 1;
                out.audit(VaultAction::Write, path, format!("Kubernetes-auth role of team {}", t.team));
            }
        }
    }
    // Connections: configured from the referenced Secret when asked, else read to learn their engine.
    let mut engines = BTreeMap::new();
    let connections: BTreeSet<&str> =
        objects.teams.iter().filter_map(|t| t.db_role.as_ref()).map(|r| r.connection.as_str()).collect();
    for conn in &connections {
        if let Some(sel) = &s.connection_secret_ref {
            let roles: Vec<&str> = objects
                .teams
                .iter()
                .filter_map(|t| t.db_role.as_ref())
                .filter(|r| r.connection == *conn)
                .map(|r| r.name.as_str())
                .collect();
            match configure_connection(api, db, conn, &sel.name, &roles, p, secrets).await {
                Ok((version, n)) => {
                    out.connection_secret_version = Some(version);
                    written += n;
                    if n > 0 {
                        out.audit(
                            VaultAction::Write,
                            format!("{db}/config/{conn}"),
                            "database connection from spec.vault.connectionSecretRef",
                        );
                    }
                }
                Err(ConnError::Vault(e)) => return Err(e),
                Err(ConnError::Secret(msg)) => {
                    engines.insert(conn.to_string(), Err(msg));
                    continue;
                }
            }
        }
        let engine = match api.read(&format!("{db}/config/{conn}")).await? {
            Some(c) => Ok(Engine::from_plugin(c["data"]["plugin_name"].as_str().unwrap_or_default())),
            None => Err(format!(
                "Vault has no database connection {conn:?} at {db}/config/{conn}: configure it in Vault, or set \
                 spec.vault.connectionSecretRef so crmguard configures it"
            )),
        };
        engines.insert(conn.to_string(), engine);
    }
    for t in &objects.teams {
        let Some(role) = &t.db_role else { continue };
        let Some(Ok(engine)) = engines.get(&role.connection) else { continue };
        if vault_objects::check_identifiers(role).is_err() {
            continue; // reported with the team's credentials
        }
        let body = vault_objects::db_role_body(*engine, role);
        let path = format!("{db}/roles/{}", role.name);
        if write_if_changed(api, &path, &body).await? == 1 {
            written += 1;
            out.audit(
                VaultAction::Write,
                path,
                format!(
                    "database role of team {}: {}",
                    t.team,
                    role.grants.iter().cloned().collect::<Vec<_>>().join(",")
                ),
            );
        }
    }
    // Anything else under this policy's prefix is stale (a removed team, a namespace no longer bound).
    let want_policies: BTreeSet<&str> = objects.teams.iter().map(|t| t.policy_name.as_str()).collect();
    let want_auth: BTreeSet<&str> =
        objects.teams.iter().flat_map(|t| t.auth_roles.iter().map(|r| r.name.as_str())).collect();
    let want_db: BTreeSet<&str> =
        objects.teams.iter().filter_map(|t| t.db_role.as_ref().map(|r| r.name.as_str())).collect();
    let removed = remove_under_prefix(api, s, &objects.prefix, &want_policies, &want_auth, &want_db).await?;
    for path in &removed {
        out.audit(VaultAction::Delete, path.clone(), "stale: no longer in the policy");
    }
    let removed = removed.len();
    let (np, na, nd) = (want_policies.len(), want_auth.len(), want_db.len());
    let mut msg = format!(
        "Vault at {}: {np} policies, {na} Kubernetes-auth roles (mount {auth}), {nd} database roles (mount {db})",
        api.addr()
    );
    if written + removed > 0 {
        msg.push_str(&format!("; {written} written and {removed} stale removed in this pass"));
    }
    let missing: Vec<String> = engines.values().filter_map(|e| e.as_ref().err().cloned()).collect();
    out.vault = if missing.is_empty() {
        Cond::new(VaultConfigured::Synced, Status::True, msg)
    } else {
        out.retry = Some(VAULT_RETRY);
        Cond::new(VaultConfigured::DatabaseConnectionMissing, Status::False, missing.join("; "))
    };
    for t in &objects.teams {
        let team = out.teams.entry(t.team.clone()).or_default();
        team.vault_policy = Some(t.policy_name.clone());
        team.vault_roles = t.auth_roles.iter().map(|r| r.name.clone()).collect();
    }
    Ok(engines)
}

async fn write_if_changed(api: &impl VaultOps, path: &str, body: &Value) -> Result<usize, ApiError> {
    let current = api.read(path).await?;
    if current.as_ref().is_some_and(|c| is_subset(body, &c["data"])) {
        return Ok(0);
    }
    api.write(path, body).await?;
    Ok(1)
}

/// Deletes the policies and roles under `prefix` that are not wanted; returns their paths.
pub(super) async fn remove_under_prefix(
    api: &impl VaultOps,
    s: &VaultSettings,
    prefix: &str,
    policies: &BTreeSet<&str>,
    auth_roles: &BTreeSet<&str>,
    db_roles: &BTreeSet<&str>,
) -> Result<Vec<String>, ApiError> {
    let (auth, db) = (mount(&s.kubernetes_auth_mount), mount(&s.database_mount));
    let mut removed = Vec::new();
    for (list, item, wanted) in [
        ("sys/policies/acl".to_string(), "sys/policies/acl", policies),
        (format!("auth/{auth}/role"), &*format!("auth/{auth}/role"), auth_roles),
        (format!("{db}/roles"), &*format!("{db}/roles"), db_roles),
    ] {
        for name in api.list(&list).await? {
            if name.starts_with(prefix) && !wanted.contains(name.as_str()) {
                api.delete(&format!("{item}/{name}")).await?;
                tracing::info!(vault_object = %format!("{item}/{name}"), "removed stale Vault object");
                removed.push(format!("{item}/{name}"));
            }
        }
    }
    Ok(removed)
}

enum ConnError {
    Vault(ApiError),
    Secret(String),
}

/// Writes `<db>/config/<conn>` from the Secret when Vault's copy differs or the Secret changed since the last
/// write (its resourceVersion is recorded in the policy's status). Returns (resourceVersion, writes).
async fn configure_connection(
    api: &impl VaultOps,
    db: &str,
    conn: &str,
    secret: &str,
    roles: &[&str],
    p: &AccessPolicy,
    secrets: &impl SecretOps,
) -> Result<(String, usize), ConnError> {
    let missing = |what: String| {
        ConnError::Secret(format!(
            "spec.vault.connectionSecretRef: {what}; the Secret needs connection_url, username and password (and \
             optionally plugin_name)"
        ))
    };
    let sec = secrets
        .get(secret)
        .await
        .map_err(|e| missing(format!("cannot read Secret {secret:?}: {e}")))?
        .ok_or_else(|| missing(format!("Secret {secret:?} not found")))?;
    let data = sec.data.unwrap_or_default();
    let field = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
    let (Some(url), Some(user), Some(pass)) = (field("connection_url"), field("username"), field("password")) else {
        return Err(missing(format!("Secret {secret:?} lacks a key")));
    };
    let plugin = field("plugin_name").unwrap_or_else(|| "postgresql-database-plugin".into());
    let version = sec.metadata.resource_version.unwrap_or_default();
    let visible = json!({
        "plugin_name": plugin,
        "connection_details": {"connection_url": url, "username": user},
        "allowed_roles": roles,
    });
    let path = format!("{db}/config/{conn}");
    let current = api.read(&path).await.map_err(ConnError::Vault)?;
    let recorded = p.status.as_ref().and_then(|s| s.connection_secret_version.as_deref());
    if current.as_ref().is_some_and(|c| is_subset(&visible, &c["data"])) && recorded == Some(version.as_str()) {
        return Ok((version, 0));
    }
    let body = json!({
        "plugin_name": plugin, "connection_url": url, "username": user, "password": pass,
        "allowed_roles": roles, "verify_connection": true,
    });
    api.write(&path, &body).await.map_err(|e| {
        // Vault's message may quote the connection; keep the credentials out of it.
        let scrub = |m: String| m.replace(&pass, "<redacted>").replace(&user, "<user>");
        ConnError::Vault(match e {
            ApiError::Status { op, path, code, message } => {
                ApiError::Status { op, path, code, message: scrub(message) }
            }
            other => other,
        })
    })?;
    tracing::info!(vault_object = %path, "database connection configured from Secret");
    Ok((version, 1))
}
