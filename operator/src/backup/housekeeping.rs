//! What a run does besides the backup: reclaim the uploads killed runs left, apply retention.

use super::*;

/// Aborts the unfinished multipart uploads under the policy's prefix that received no part for `idle` (or, without
/// parts, were started that long ago). A live run sends parts every few seconds, so what is idle was left by a run
/// that was killed (a crash-looping job, an evicted pod); a run of the policy that is still going, e.g. a backup
/// started before a quarantine, is left alone.
pub async fn reclaim_uploads(
    store: &Store,
    prefix: &str,
    now: Timestamp,
    idle: std::time::Duration,
) -> Result<Reclaimed, StoreError> {
    let root = format!("{}/", prefix.trim_matches('/'));
    let cutoff = jiff::SignedDuration::try_from(idle).ok().and_then(|d| now.checked_sub(d).ok()).unwrap_or(now);
    let mut out = Reclaimed::default();
    for u in store.pending_uploads(&root).await? {
        let usage = store.upload_usage(&u.key, &u.upload_id).await?;
        let last = usage.newest.max(u.initiated);
        if last.is_some_and(|t| t > cutoff) {
            continue;
        }
        store.abort_upload(&u.key, &u.upload_id).await?;
        tracing::info!(key = %u.key, parts = usage.parts, bytes = usage.bytes, "aborted an unfinished upload of a run that died");
        out.add(Reclaimed { uploads: 1, parts: usage.parts, bytes: usage.bytes });
    }
    Ok(out)
}

/// Result of retention and cleanup.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Housekeeping {
    pub deleted_backups: Vec<String>,
    pub removed_leftovers: Vec<String>,
    pub reclaimed: Reclaimed,
}

/// Applies retention (pure decision, then deletes; the manifest goes first so that a half-deleted backup is
/// never listed), removes leftover objects of failed backups older than `leftover_age`, and reclaims idle
/// unfinished uploads (see [`reclaim_uploads`]).
pub async fn housekeeping(
    config: &JobConfig,
    rt: &Runtime,
    catalog: &Catalog,
    now: Timestamp,
    leftover_age: jiff::SignedDuration,
) -> Result<Housekeeping, BackupError> {
    let store = &rt.store;
    let tz = match &config.spec.schedule.time_zone {
        Some(name) => jiff::tz::TimeZone::get(name).unwrap_or(jiff::tz::TimeZone::UTC),
        None => jiff::tz::TimeZone::UTC,
    };
    let candidates: Vec<retention::Candidate> =
        catalog.backups.iter().map(|m| retention::Candidate { id: m.id.clone(), completed: m.completed }).collect();
    let decision = retention::decide(&candidates, config.spec.retention.as_ref(), &tz);
    let mut out = Housekeeping::default();
    for id in &decision.delete {
        let Some(m) = catalog.backups.iter().find(|m| &m.id == id) else { continue };
        let mut keys = vec![object_key(&config.prefix, id, MANIFEST)];
        keys.extend(m.objects.iter().flat_map(StoredObject::segment_keys));
        store.delete(&keys).await?;
        out.deleted_backups.push(id.clone());
    }
    let cutoff = now.checked_sub(leftover_age).unwrap_or(now);
    for (id, keys, modified) in &catalog.uncommitted {
        if modified.is_some_and(|m| m < cutoff) {
            store.delete(keys).await?;
            out.removed_leftovers.push(id.clone());
        }
    }
    out.reclaimed = reclaim_uploads(store, &config.prefix, now, rt.reclaim_idle).await?;
    Ok(out)
}
