//! A backup run: dump, compress, encrypt, upload, verify by re-reading, then commit the manifest.

use super::*;

/// Runs one backup of the policy's database (and attachments): the whole protocol up to the commit.
pub async fn run_backup(
    config: &JobConfig,
    conn: &DbConn,
    kek: Option<&Kek>,
    rt: &Runtime,
) -> Result<Manifest, BackupError> {
    let started = (rt.clock)();
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
    let completed = (rt.clock)();
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
