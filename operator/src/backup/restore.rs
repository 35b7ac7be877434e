//! Restoring: choose a backup, unwrap its data key, verify it, restore it into a database (or files), compare
//! row counts.

use super::*;

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
