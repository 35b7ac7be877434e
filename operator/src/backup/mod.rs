//! The data path of backup and restore jobs (`crmguard backup run|list|verify`, `crmguard restore run`): usable
//! in the CronJob's pod and by people outside Kubernetes.
//!
//! A backup: row counts + dump in one snapshot -> zstd -> AEAD -> multipart upload -> verification (re-read)
//! -> manifest (commit) -> retention and cleanup of leftovers. A backup is complete only once its manifest is
//! written, and the manifest is written only after verification passed.

pub mod crypto;
pub mod keys;
pub mod manifest;
pub mod pgarchive;
pub mod pipeline;
pub mod report;
pub mod retention;
pub mod source;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::Timestamp;
use serde::Serialize;

use self::crypto::DataKey;
use self::keys::{Kek, KeyError};
use self::manifest::{
    ATTACHMENTS, Catalog, Compression, DATABASE, EncryptionInfo, FORMAT, MANIFEST, Manifest, StoredObject,
    VerificationRecord, object_key,
};
use self::pipeline::{PipelineError, PipelineOptions, Protection, human_bytes};
use self::source::{DbConn, SourceError};
use self::store::{Store, StoreError};
use crate::api::backup_policy::{Engine, VerificationMode};
use crate::api::job::{JobConfig, JobReason, Reclaimed};

/// Why a backup, verification or restore failed; `reason()` is what the job reports and the operator's
/// condition shows.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    NotFound(String),
    #[error("row counts differ from those recorded at backup time: {0}")]
    RowCounts(String),
    #[error(transparent)]
    Manifest(#[from] manifest::Unauthenticated),
    #[error("the target database cannot be reached, so nothing was downloaded: {0}")]
    TargetUnreachable(#[source] SourceError),
}

impl BackupError {
    /// Stable reason for conditions, Events and metrics.
    pub fn reason(&self) -> JobReason {
        match self {
            BackupError::Config(_) => JobReason::InvalidConfiguration,
            BackupError::Source(SourceError::Credentials(_) | SourceError::Vault(_)) => {
                JobReason::CredentialsUnavailable
            }
            BackupError::Source(_) => JobReason::DatabaseToolFailed,
            BackupError::Store(StoreError::Credentials(_)) => JobReason::CredentialsUnavailable,
            BackupError::Store(_) => JobReason::StorageError,
            BackupError::TargetUnreachable(_) => JobReason::DatabaseUnreachable,
            BackupError::Key(KeyError::WrongKey { .. } | KeyError::Mismatch { .. }) => JobReason::WrongKey,
            BackupError::Key(KeyError::Damaged(_) | KeyError::Relabelled { .. }) => JobReason::ManifestTampered,
            BackupError::Manifest(manifest::Unauthenticated::Internal(_)) => JobReason::InvalidConfiguration,
            BackupError::Manifest(_) => JobReason::ManifestTampered,
            BackupError::Key(_) => JobReason::KeyUnavailable,
            BackupError::Pipeline(PipelineError::Verify { .. }) => JobReason::VerificationFailed,
            BackupError::Pipeline(PipelineError::Store(StoreError::Credentials(_))) => {
                JobReason::CredentialsUnavailable
            }
            BackupError::Pipeline(PipelineError::Store(_)) => JobReason::StorageError,
            BackupError::Pipeline(PipelineError::Stream(_)) => JobReason::BackupStreamFailed,
            BackupError::Pipeline(PipelineError::Source(_)) => JobReason::DatabaseToolFailed,
            BackupError::NotFound(_) => JobReason::BackupNotFound,
            BackupError::RowCounts(_) => JobReason::RowCountMismatch,
        }
    }
}

/// Everything a job needs besides the policy: where to store, the data path tuning, the clock.
#[derive(Debug)]
pub struct Runtime {
    pub store: Store,
    pub options: PipelineOptions,
    /// Directory of the attachments volume (mounted read-only in the backup pod).
    pub attachments_dir: Option<PathBuf>,
    /// Accept encrypted backups whose manifest carries no MAC (made before manifests were authenticated).
    pub allow_unauthenticated_manifest: bool,
    /// An unfinished multipart upload that received no part for this long belongs to a run that died: it is
    /// aborted when a backup starts and after it committed.
    pub reclaim_idle: std::time::Duration,
}

/// The policy's encryption, resolved: the key-encryption key, or `None` when encryption is off.
pub async fn kek_for(config: &JobConfig) -> Result<Option<Kek>, BackupError> {
    let enc = &config.spec.encryption;
    if !enc.enabled {
        return Ok(None);
    }
    let key = enc
        .key
        .as_ref()
        .ok_or_else(|| BackupError::Config("encryption is enabled but no key is named (encryption.key)".into()))?;
    Ok(Some(Kek::from_policy(key).await?))
}

/// Connection to the policy's source database, credentials resolved.
pub async fn source_conn(config: &JobConfig) -> Result<DbConn, BackupError> {
    let s = &config.spec.source;
    let (user, password) = DbConn::resolve_credentials(&s.credentials, "CRMGUARD_DB").await?;
    Ok(DbConn::new(
        s.engine,
        &s.host,
        config.port,
        &s.database,
        &user,
        password,
        s.tls_mode,
        ca_file("CRMGUARD_DB_CA_CERT")?,
    ))
}

/// Writes a CA certificate given in an environment variable to a private temporary file for the database tools.
pub fn ca_file(var: &str) -> Result<Option<PathBuf>, BackupError> {
    let Ok(pem) = std::env::var(var) else { return Ok(None) };
    if pem.trim().is_empty() {
        return Ok(None);
    }
    let path = std::env::temp_dir().join(format!("crmguard-{}-{}.pem", var.to_lowercase(), std::process::id()));
    std::fs::write(&path, pem).map_err(|e| BackupError::Config(format!("cannot write {}: {e}", path.display())))?;
    Ok(Some(path))
}

/// Runs one backup of the policy's database (and attachments): the whole protocol up to the commit.
pub async fn run_backup(
    config: &JobConfig,
    conn: &DbConn,
    kek: Option<&Kek>,
    rt: &Runtime,
) -> Result<Manifest, BackupError> {
    let started = Timestamp::now();
    let id = manifest::new_id(started);
    let spec = &config.spec;
    let span = tracing::info_span!("backup", policy = %config.policy, id = %id);
    let _guard = span.enter();
    tracing::info!(
        "backup {id} of {}://{}:{}/{} to {}",
        match conn.engine {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        },
        conn.host,
        conn.port,
        conn.database,
        rt.store.describe(&object_key(&config.prefix, &id, ""))
    );
    let dek = match kek {
        Some(_) => Some(DataKey::generate().map_err(|e| BackupError::Config(e.to_string()))?),
        None => None,
    };
    // Wrap first: a key that cannot be used fails the backup before anything is dumped or uploaded.
    let wrapped = match (kek, &dek) {
        (Some(k), Some(d)) => Some(k.wrap(d, &id).await?),
        _ => None,
    };
    let protection =
        Protection { level: spec.compression.level, encryption: dek.clone().map(|d| (spec.encryption.algorithm, d)) };
    let suffix = if dek.is_some() { ".zst.enc" } else { ".zst" };
    let mut objects = Vec::new();
    let mut uploaded_keys = Vec::new();

    // Database: for PostgreSQL, row counts and dump in one exported snapshot; the count query runs in its
    // session while pg_dump streams. Checks on the raw stream run as it passes (archive check, MySQL counts).
    let db_key = object_key(&config.prefix, &id, &format!("database.dump{suffix}"));
    let snapshot = match conn.engine {
        Engine::Postgres => {
            let c = conn.clone();
            let s = tokio::task::spawn_blocking(move || -> Result<_, SourceError> {
                let mut s = source::PgSnapshot::open(&c)?;
                s.send_count_rows()?;
                Ok(s)
            })
            .await
            .map_err(|e| BackupError::Config(e.to_string()))??;
            Some(s)
        }
        // mysqldump --single-transaction takes its own snapshot; rows are counted in the stream.
        Engine::Mysql => None,
    };
    let mut checks = source::StreamChecks::start(conn)?;
    let mut dump = source::start_dump(conn, snapshot.as_ref().map(|s| s.id.as_str()))?;
    let stdout = dump.stdout().ok_or_else(|| BackupError::Config("the dump tool has no stdout".into()))?;
    let dump = std::sync::Arc::new(std::sync::Mutex::new(Some(dump)));
    let (d1, d2) = (dump.clone(), dump.clone());
    let checks_out = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (checks_in, tables_slot) = (checks_out.clone(), checks_out.clone());
    let stats = pipeline::upload_stream(
        &rt.store,
        &db_key,
        DATABASE,
        protection.clone(),
        &rt.options,
        move |w| {
            let mut stdout = stdout;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = std::io::Read::read(&mut stdout, &mut buf)?;
                if n == 0 {
                    break;
                }
                checks.feed(&buf[..n]);
                w.write_all(&buf[..n])?;
            }
            if let Ok(mut slot) = checks_in.lock() {
                *slot = Some(checks);
            }
            Ok(())
        },
        move || {
            // First the dump's own verdict (exit status), then what the stream checks saw.
            let tool = d1.lock().ok().and_then(|mut g| g.take());
            tool.map(|t| t.finish().map(|_| ())).unwrap_or(Ok(())).map_err(|e| PipelineError::Source(e.to_string()))?;
            let checks = checks_out.lock().ok().and_then(|mut g| g.take());
            let mut counted = match checks {
                Some(c) => c.finish().map_err(|reason| PipelineError::Verify { key: "the dump".into(), reason })?,
                None => BTreeMap::new(),
            };
            if let Some(mut s) = snapshot {
                counted = s.read_count_rows().map_err(|e| PipelineError::Source(e.to_string()))?;
                // The snapshot session ends after the dump (its transaction kept the snapshot alive).
                s.close().map_err(|e| PipelineError::Source(e.to_string()))?;
            }
            if let Ok(mut slot) = checks_out.lock() {
                *slot = Some(source::StreamChecks::counted(counted));
            }
            Ok(())
        },
        move || {
            if let Some(t) = d2.lock().ok().as_mut().and_then(|g| g.as_mut()) {
                t.kill();
            }
        },
    )
    .await;
    let stats = stats?;
    let tables = tables_slot.lock().ok().and_then(|mut g| g.take()).map(|c| c.into_counts()).unwrap_or_default();
    uploaded_keys.push(db_key.clone());
    objects.push(stored(DATABASE, db_key, &stats));
    tracing::info!(
        "database: {} dumped, {} compressed, {} stored",
        human_bytes(stats.raw_bytes),
        human_bytes(stats.compressed_bytes),
        human_bytes(stats.stored_bytes)
    );

    if let Some(dir) = &rt.attachments_dir {
        let key = object_key(&config.prefix, &id, &format!("attachments.tar{suffix}"));
        let dir = dir.clone();
        let result = pipeline::upload_stream(
            &rt.store,
            &key,
            ATTACHMENTS,
            protection.clone(),
            &rt.options,
            move |w| pipeline::write_tar(&dir, w),
            || Ok(()),
            || {},
        )
        .await;
        match result {
            Ok(stats) => {
                uploaded_keys.push(key.clone());
                objects.push(stored(ATTACHMENTS, key, &stats));
            }
            Err(e) => {
                discard(&rt.store, &uploaded_keys).await;
                return Err(e.into());
            }
        }
    }

    let verify_started = std::time::Instant::now();
    // Verify before committing: the manifest is the proof that the backup is readable.
    let mode = spec.verification.mode;
    let percent = spec.verification.sample_percent.unwrap_or(100).clamp(1, 100) as u32;
    let mut decrypted = 0;
    let mut raw_checked = true;
    for o in &objects {
        // The dump itself was checked as it streamed; zstd's content checksum ties what is read back to it.
        match pipeline::verify_object(&rt.store, o, dek.clone(), mode, percent, rt.options.progress_every).await {
            Ok(v) => {
                decrypted += v.decrypted_chunks;
                raw_checked &= v.raw_checked;
            }
            Err(e) => {
                discard(&rt.store, &uploaded_keys).await;
                return Err(e.into());
            }
        }
    }
    let completed = Timestamp::now();
    let mut manifest = Manifest {
        format: FORMAT,
        id: id.clone(),
        policy: config.policy.clone(),
        namespace: config.namespace.clone(),
        engine: conn.engine,
        database: conn.database.clone(),
        started,
        completed,
        tool: format!("crmguard {}", env!("CARGO_PKG_VERSION")),
        dump_tool: conn.dump_tool_version(),
        compression: Compression { algorithm: "zstd".into(), level: spec.compression.level },
        encryption: wrapped.map(|key| EncryptionInfo {
            algorithm: spec.encryption.algorithm,
            chunk_size: 1u64 << rt.options.chunk_log2,
            key,
        }),
        objects,
        tables,
        verification: VerificationRecord {
            mode,
            time: completed,
            decrypted_chunks: decrypted,
            raw_checked,
            seconds: verify_started.elapsed().as_secs_f64(),
        },
        mac: None,
    };
    if let Some(dek) = &dek {
        manifest.seal(dek)?;
    }
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Config(e.to_string()))?;
    rt.store.put(&object_key(&config.prefix, &id, MANIFEST), body.into()).await?;
    tracing::info!(
        "backup {id} committed: {} stored in {}s, verified ({:?})",
        human_bytes(manifest.stored_bytes()),
        manifest.duration_seconds(),
        mode
    );
    Ok(manifest)
}

/// Full verification of a database object plus a structural check of the dump itself: the pg_dump archive must
/// be complete (see `pgarchive`; no database needed), or the mysqldump must end with its completion line. This catches a dump
/// tool that stopped early yet exited 0, which checksums alone cannot (they faithfully protect a short dump).
pub async fn verify_archive(
    store: &Store,
    object: &StoredObject,
    key: Option<DataKey>,
    conn: &DbConn,
    progress_every: std::time::Duration,
) -> Result<pipeline::Verified, PipelineError> {
    let bad = |reason: String| PipelineError::Verify { key: object.key.clone(), reason };
    // The same checks that ran on the outgoing stream at backup time, now on what was read back.
    let checks = source::StreamChecks::start(conn).map_err(|e| bad(e.to_string()))?;
    let (verified, checks) = pipeline::read_object(store, object, key, checks, progress_every).await?;
    tokio::task::spawn_blocking(move || checks.finish()).await.map_err(|e| bad(e.to_string()))?.map_err(bad)?;
    Ok(verified)
}

fn stored(purpose: &str, key: String, s: &pipeline::StreamStats) -> StoredObject {
    StoredObject {
        purpose: purpose.to_string(),
        key,
        raw_bytes: s.raw_bytes,
        compressed_bytes: s.compressed_bytes,
        stored_bytes: s.stored_bytes,
        sha256: s.sha256.clone(),
        chunks: s.chunks,
        parts: s.parts,
        segments: s.segments,
    }
}

/// Best-effort removal of objects of a backup that will not be committed.
async fn discard(store: &Store, keys: &[String]) {
    if let Err(e) = store.delete(keys).await {
        tracing::warn!(error = %e, "could not remove the objects of a failed backup; the next cleanup removes them");
    }
}

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

/// Which backup to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Id(String),
    Before(Timestamp),
}

/// Picks a backup from the catalog.
pub fn select<'a>(catalog: &'a Catalog, selector: &Selector) -> Result<&'a Manifest, BackupError> {
    let found = match selector {
        Selector::Latest => catalog.backups.last(),
        Selector::Id(id) => catalog.backups.iter().find(|m| &m.id == id),
        Selector::Before(t) => catalog.backups.iter().rev().find(|m| m.completed < *t),
    };
    found.ok_or_else(|| {
        BackupError::NotFound(match selector {
            Selector::Latest => "there is no committed backup to restore".into(),
            Selector::Id(id) => {
                format!("backup {id} does not exist (or has no manifest); list backups with `crmguard backup list`")
            }
            Selector::Before(t) => format!("there is no committed backup completed before {t}"),
        })
    })
}

/// Unwraps a backup's data key (or `None` for an unencrypted backup) and, before anything else is read, checks
/// the manifest's MAC with it: an edited manifest stops a verification or a restore here.
pub async fn data_key(m: &Manifest, kek: Option<&Kek>, rt: &Runtime) -> Result<Option<DataKey>, BackupError> {
    match (&m.encryption, kek) {
        (None, _) => Ok(None),
        (Some(e), Some(k)) => {
            let dek = k.unwrap(&e.key, &m.id).await?;
            match m.check_seal(&dek) {
                Err(manifest::Unauthenticated::Missing(..)) if rt.allow_unauthenticated_manifest => {
                    tracing::warn!(id = %m.id, "the manifest carries no MAC; accepted as asked (--allow-unauthenticated-manifest)");
                }
                other => other?,
            }
            Ok(Some(dek))
        }
        (Some(_), None) => Err(BackupError::Config(format!(
            "backup {} is encrypted but no key is configured: name the key it was made with in encryption.key",
            m.id
        ))),
    }
}

/// Result of verifying a committed backup again.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub id: String,
    pub objects: usize,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub decrypted_chunks: u64,
}

/// Re-verifies a committed backup completely (sha256, every chunk, decompression with zstd's checksum, the dump).
pub async fn verify_backup(m: &Manifest, kek: Option<&Kek>, rt: &Runtime) -> Result<VerifyReport, BackupError> {
    let key = data_key(m, kek, rt).await?;
    let mut report = VerifyReport { id: m.id.clone(), objects: 0, stored_bytes: 0, raw_bytes: 0, decrypted_chunks: 0 };
    let conn = DbConn::new(m.engine, "", 0, &m.database, "", None, crate::api::backup_policy::TlsMode::Disable, None);
    for o in &m.objects {
        let v = if o.purpose == DATABASE {
            verify_archive(&rt.store, o, key.clone(), &conn, rt.options.progress_every).await?
        } else {
            pipeline::verify_object(&rt.store, o, key.clone(), VerificationMode::Full, 100, rt.options.progress_every)
                .await?
        };
        report.objects += 1;
        report.stored_bytes += v.stored_bytes;
        report.raw_bytes += v.raw_bytes;
        report.decrypted_chunks += v.decrypted_chunks;
    }
    Ok(report)
}

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub target: DbConn,
    pub create_database: bool,
    /// Drop and re-create the target first (drills into a scratch database).
    pub recreate: bool,
    pub clean: bool,
    pub verify_row_counts: bool,
    /// Where to unpack the attachments, when they are restored.
    pub attachments_dir: Option<PathBuf>,
}

/// Result of a restore.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub id: String,
    pub database: String,
    pub restored_bytes: u64,
    pub tables: usize,
    pub rows: u64,
    pub row_counts_verified: bool,
    pub duration_seconds: f64,
}

/// Restores a backup: verification pass first (nothing touches the target unless every byte is authentic),
/// then download -> decrypt -> decompress -> pg_restore/mysql, then the row counts are compared with the
/// manifest's.
pub async fn restore(
    m: &Manifest,
    kek: Option<&Kek>,
    req: &RestoreRequest,
    rt: &Runtime,
) -> Result<RestoreReport, BackupError> {
    let started = std::time::Instant::now();
    let key = data_key(m, kek, rt).await?;
    let db =
        m.object(DATABASE).ok_or_else(|| BackupError::NotFound(format!("backup {} has no database object", m.id)))?;
    // The target must be reachable before the backup is downloaded and verified (minutes for a big one).
    let (target, maintenance) = (req.target.clone(), req.create_database || req.recreate);
    tokio::task::spawn_blocking(move || source::check_reachable(&target, maintenance))
        .await
        .map_err(|e| BackupError::Config(e.to_string()))?
        .map_err(BackupError::TargetUnreachable)?;
    tracing::info!("restore of backup {} into {}: verifying before touching the target", m.id, req.target.database);
    for o in &m.objects {
        if o.purpose == ATTACHMENTS && req.attachments_dir.is_none() {
            continue;
        }
        pipeline::verify_object(&rt.store, o, key.clone(), VerificationMode::Full, 100, rt.options.progress_every)
            .await?;
    }
    let target = req.target.clone();
    let (create, recreate, clean) = (req.create_database, req.recreate, req.clean);
    let mut tool = tokio::task::spawn_blocking(move || -> Result<source::Tool, SourceError> {
        if recreate {
            source::recreate_database(&target, &target.database)?;
        } else if create {
            source::ensure_database(&target, &target.database)?;
        }
        source::start_restore(&target, &target.database, clean && !recreate)
    })
    .await
    .map_err(|e| BackupError::Config(e.to_string()))??;
    let stdin = tool.stdin().ok_or_else(|| BackupError::Config("the restore tool has no stdin".into()))?;
    let streamed = pipeline::read_object(&rt.store, db, key.clone(), stdin, rt.options.progress_every).await;
    // On a stream failure the tool sees EOF on stdin; with --single-transaction it rolls back.
    let (streamed, tool_result) = tokio::task::spawn_blocking(move || {
        let streamed = streamed.map(|(v, stdin)| {
            drop(stdin);
            v
        });
        (streamed, tool.finish())
    })
    .await
    .map_err(|e| BackupError::Config(e.to_string()))?;
    // A storage failure explains the tool's "unexpected end of file"; otherwise the tool's own error explains a
    // broken pipe better than the pipe does.
    let verified = match (streamed, tool_result) {
        (Err(e @ (PipelineError::Store(_) | PipelineError::Verify { .. })), _) => return Err(e.into()),
        (_, Err(e)) => return Err(e.into()),
        (streamed, Ok(_)) => streamed?,
    };

    if let (Some(dir), Some(o)) = (&req.attachments_dir, m.object(ATTACHMENTS)) {
        let pipe = TarSink::new(dir.clone());
        let (_, sink) = pipeline::read_object(&rt.store, o, key.clone(), pipe, rt.options.progress_every).await?;
        sink.finish().map_err(|e| BackupError::Config(format!("unpacking attachments: {e}")))?;
    }

    let c = req.target.clone();
    let db_name = req.target.database.clone();
    let counts = tokio::task::spawn_blocking(move || source::count_rows(&c, &db_name))
        .await
        .map_err(|e| BackupError::Config(e.to_string()))??;
    let verified_counts = req.verify_row_counts && !m.tables.is_empty();
    if req.verify_row_counts {
        let diff = compare_counts(&m.tables, &counts, m.engine, &m.database, &req.target.database);
        if !diff.is_empty() {
            return Err(BackupError::RowCounts(diff.join("; ")));
        }
    }
    Ok(RestoreReport {
        id: m.id.clone(),
        database: req.target.database.clone(),
        restored_bytes: verified.raw_bytes,
        tables: counts.len(),
        rows: counts.values().sum(),
        row_counts_verified: verified_counts,
        duration_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Differences between recorded and restored row counts (MySQL table names carry the database name, which may
/// differ between source and target).
pub fn compare_counts(
    recorded: &BTreeMap<String, u64>,
    restored: &BTreeMap<String, u64>,
    engine: Engine,
    source_db: &str,
    target_db: &str,
) -> Vec<String> {
    let norm = |t: &str, db: &str| -> String {
        match engine {
            Engine::Mysql => t.strip_prefix(&format!("{db}.")).unwrap_or(t).to_string(),
            Engine::Postgres => t.to_string(),
        }
    };
    let a: BTreeMap<String, u64> = recorded.iter().map(|(t, n)| (norm(t, source_db), *n)).collect();
    let b: BTreeMap<String, u64> = restored.iter().map(|(t, n)| (norm(t, target_db), *n)).collect();
    // A table absent on one side counts as 0 rows (a mysqldump stream names only tables that have rows).
    let tables: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut diff = Vec::new();
    for t in tables {
        let (n, m) = (a.get(t).copied().unwrap_or(0), b.get(t).copied().unwrap_or(0));
        if n != m {
            let restored = if b.contains_key(t) { format!("{m} restored") } else { "the table is missing".into() };
            diff.push(format!("{t}: {n} rows at backup time, {restored}"));
        }
    }
    diff
}

/// A `Write` that unpacks a tar stream on a thread.
struct TarSink {
    tx: Option<std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>>,
    worker: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TarSink {
    fn new(dir: PathBuf) -> TarSink {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let worker = std::thread::spawn(move || pipeline::read_tar(&mut pipeline::BlockReader::new(rx), &dir));
        TarSink { tx: Some(tx), worker: Some(worker) }
    }

    fn finish(mut self) -> std::io::Result<()> {
        drop(self.tx.take());
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("tar thread panicked")),
            None => Ok(()),
        }
    }
}

impl std::io::Write for TarSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let tx = self.tx.as_ref().ok_or_else(|| std::io::Error::other("closed"))?;
        tx.send(Ok(buf.to_vec()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "tar unpacking stopped"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
