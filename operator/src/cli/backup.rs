//! `crmguard backup run|list|verify` and `crmguard restore run`: the commands the CronJobs and Jobs run, and
//! that people run by hand (with a policy file and their own credentials in the environment).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use jiff::Timestamp;

use crate::api::backup_policy::CrmBackupPolicy;
use crate::api::job::{ATTACHMENTS_DIR, JobConfig, JobKind, JobReport, Reclaimed};
use crate::backup::pipeline::{PipelineOptions, human_bytes};
use crate::backup::store::{S3Settings, Store};
use crate::backup::{BackupError, Runtime, Selector};

/// Where the policy comes from and where backups go.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Job configuration as mounted by the operator (`/etc/crmguard/policy.json`).
    #[arg(long, conflicts_with = "policy")]
    pub config: Option<PathBuf>,
    /// A CrmBackupPolicy manifest (YAML or JSON), for running by hand outside Kubernetes.
    #[arg(short = 'f', long = "policy")]
    pub policy: Option<PathBuf>,
    /// Store backups in this local directory instead of the policy's S3 bucket (same layout; for trying
    /// crmguard out and for air-gapped copies).
    #[arg(long)]
    pub store_dir: Option<PathBuf>,
    /// Size of the first multipart parts in MiB (at least 5); memory use is about (parts in flight + 1) x this.
    #[arg(long, default_value_t = 5)]
    pub part_size_mib: usize,
    /// Parts uploaded at the same time.
    #[arg(long, default_value_t = 2)]
    pub parts_in_flight: usize,
    /// Parts per S3 object (at most 10 000, S3's limit): a longer backup continues in further objects
    /// (`<key>.0001`, ...), so memory stays the same whatever the backup's size.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub parts_per_object: u32,
    /// zstd compression threads (default: the CPUs available, at most 4).
    #[arg(long)]
    pub compress_threads: Option<u32>,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10)]
    pub progress_seconds: u64,
    /// Verify or restore an encrypted backup whose manifest carries no MAC (made by a crmguard before manifests
    /// were authenticated). Without it such a backup is refused: the MAC is what proves no field was edited.
    #[arg(long)]
    pub allow_unauthenticated_manifest: bool,
    /// An unfinished upload of the policy that received no part for this many seconds was left by a run that
    /// died; a backup aborts such uploads when it starts and after it committed, and reports what it reclaimed.
    #[arg(long, default_value_t = 120)]
    pub reclaim_idle_seconds: u64,
}

/// `crmguard backup ...`
#[derive(clap::Subcommand, Debug)]
pub enum BackupCommand {
    /// Take one backup now: dump, compress, encrypt, upload, verify, commit, then apply retention.
    Run {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Directory with the attachments to back up (default: the job's mount when the policy has attachments).
        #[arg(long)]
        attachments_dir: Option<PathBuf>,
    },
    /// List the committed backups of the policy.
    List {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Download a backup's database dump (decrypted, decompressed, every chunk authenticated) to a file or `-`
    /// for stdout: a pg_dump custom-format archive or a mysqldump script, for pg_restore/mysql by hand.
    Fetch {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Backup id, or `latest`.
        #[arg(long, default_value = "latest")]
        backup: String,
        /// Output file, or `-` for stdout. A file is removed again when the download does not verify.
        #[arg(short = 'o', long)]
        output: PathBuf,
    },
    /// Verify a committed backup again, completely: sha256, every encrypted chunk, decompression.
    Verify {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Backup id, or `latest`.
        #[arg(long, default_value = "latest")]
        backup: String,
    },
}

/// `crmguard restore ...`
#[derive(clap::Subcommand, Debug)]
pub enum RestoreCommand {
    /// Restore a backup into a database: verify first, then restore, then compare row counts.
    Run(RestoreArgs),
}

/// Arguments of `crmguard restore run`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Backup id, or `latest`.
    #[arg(long, conflicts_with = "before")]
    pub backup: Option<String>,
    /// The newest backup completed before this RFC 3339 time.
    #[arg(long)]
    pub before: Option<String>,
    /// Target host (default: the policy's source host).
    #[arg(long)]
    pub target_host: Option<String>,
    /// Target port (default: the policy's source port).
    #[arg(long)]
    pub target_port: Option<u16>,
    /// Target database.
    #[arg(long)]
    pub target_database: String,
    /// Create the target database when missing.
    #[arg(long)]
    pub create_database: bool,
    /// Drop existing objects before restoring them.
    #[arg(long)]
    pub clean: bool,
    /// Compare per-table row counts with the backup's.
    #[arg(long)]
    pub verify_row_counts: bool,
    /// Also restore the attachments (into --attachments-dir, default the job's mount).
    #[arg(long)]
    pub restore_attachments: bool,
    /// Where attachments are unpacked.
    #[arg(long)]
    pub attachments_dir: Option<PathBuf>,
    /// A restore drill: drop and re-create the (scratch) target database, restore the newest backup, compare
    /// row counts.
    #[arg(long)]
    pub drill: bool,
    /// Allow restoring into the policy's own source database.
    #[arg(long)]
    pub allow_overwrite_source: bool,
    /// Read the target's credentials from this Vault path instead of the policy's source credentials.
    #[arg(long, requires = "target_vault_role")]
    pub target_vault_path: Option<String>,
    /// Kubernetes auth role for --target-vault-path.
    #[arg(long)]
    pub target_vault_role: Option<String>,
    /// Kubernetes auth mount for --target-vault-path.
    #[arg(long, default_value = "kubernetes")]
    pub target_vault_mount: String,
}

/// Loads the job configuration from `--config` or a policy manifest.
pub fn load_config(args: &PolicyArgs) -> Result<JobConfig, String> {
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a crmguard job configuration: {e}", path.display()));
    }
    let Some(path) = &args.policy else {
        return Err("name the policy: --config <job config> or -f <CrmBackupPolicy manifest>".into());
    };
    let docs = crate::document::load(std::slice::from_ref(path)).map_err(|e| e.to_string())?;
    let doc = docs
        .iter()
        .find(|d| d.value.get("kind").and_then(|k| k.as_str()) == Some("CrmBackupPolicy"))
        .ok_or_else(|| format!("{}: no CrmBackupPolicy in the file", path.display()))?;
    let errors = crate::validation::admit(&doc.value);
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        return Err(format!("{}: the policy is invalid: {}", doc.source, list.join("; ")));
    }
    let mut value = crate::validation::with_defaults(&doc.value);
    if value.pointer("/metadata/namespace").is_none()
        && let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut())
    {
        meta.insert("namespace".into(), "default".into());
    }
    let policy: CrmBackupPolicy = crate::validation::read_typed(&value).map_err(|e| e.to_string())?;
    let v = crate::controllers::backup_policy::validate::validate(&policy)
        .map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))?;
    Ok(JobConfig { policy: v.owner.name, namespace: v.owner.namespace, prefix: v.prefix, port: v.port, spec: v.spec })
}

async fn runtime(config: &JobConfig, args: &PolicyArgs, attachments: Option<PathBuf>) -> Result<Runtime, BackupError> {
    let store = match &args.store_dir {
        Some(dir) => Store::dir(dir.clone()),
        None => {
            let mut settings = S3Settings::from_location(&config.spec.destination);
            if let Some(v) = config.spec.destination.credentials.as_ref().and_then(|c| c.vault.as_ref()) {
                settings.static_keys = Some(s3_keys_from_vault(v).await.map_err(BackupError::Config)?);
            }
            Store::s3(&settings).await?
        }
    };
    Ok(Runtime {
        store,
        options: PipelineOptions {
            part_size: args.part_size_mib.max(5) << 20,
            parts_in_flight: args.parts_in_flight.max(1),
            parts_per_object: args.parts_per_object,
            progress_every: std::time::Duration::from_secs(args.progress_seconds.max(1)),
            compress_threads: args.compress_threads.unwrap_or(PipelineOptions::default().compress_threads).clamp(1, 16),
            ..PipelineOptions::default()
        },
        attachments_dir: attachments,
        allow_unauthenticated_manifest: args.allow_unauthenticated_manifest,
        reclaim_idle: std::time::Duration::from_secs(args.reclaim_idle_seconds),
        clock: Timestamp::now,
    })
}

async fn s3_keys_from_vault(v: &crate::api::common::VaultSource) -> Result<(String, String, Option<String>), String> {
    let client = crate::vault::login(&v.auth_mount, &v.auth_role).await.map_err(|e| e.to_string())?;
    let path = v.path.trim_matches('/');
    let (mount, rest) = path
        .split_once("/data/")
        .ok_or_else(|| format!("S3 credentials path {path:?} must be a KV v2 path (<mount>/data/<path>)"))?;
    let data: std::collections::HashMap<String, String> = vaultrs::kv2::read(&client, mount, rest)
        .await
        .map_err(|e| format!("Vault read {path}: {}", crate::vault::describe(&e)))?;
    match (data.get("access_key"), data.get("secret_key")) {
        (Some(a), Some(s)) => Ok((a.clone(), s.clone(), data.get("session_token").cloned())),
        _ => Err(format!("Vault secret {path} must hold the keys access_key and secret_key")),
    }
}

/// The report of a job that failed with `e`.
fn failed(kind: JobKind, e: &BackupError) -> JobReport {
    JobReport::failed(kind, e.reason(), &e.to_string())
}

/// Prints the report and writes the termination message, signed with the policy's report key when the job has
/// one (see `report.rs`).
fn emit(report: &JobReport) {
    let json = serde_json::to_string(report).unwrap_or_default();
    println!("{json}");
    let path = std::env::var("CRMGUARD_TERMINATION_LOG").unwrap_or_else(|_| "/dev/termination-log".into());
    let wanted = std::path::Path::new(&path).exists() || std::env::var_os("CRMGUARD_TERMINATION_LOG").is_some();
    let message = match crate::backup::report::from_env() {
        Some((key, pod_uid)) => crate::backup::report::sign(&json, &key, &pod_uid),
        None => json,
    };
    if wanted && let Err(e) = std::fs::write(&path, &message) {
        // The operator reads the result from here: without it the run counts as one without a report.
        tracing::warn!(%path, error = %e, "cannot write the report as the termination message");
    }
}

fn block_on<F: Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    Ok(rt.block_on(f))
}

/// Runs `crmguard backup ...`.
pub fn backup(cmd: BackupCommand) -> Result<ExitCode, String> {
    match cmd {
        BackupCommand::Run { policy, attachments_dir } => {
            let config = load_config(&policy)?;
            let attachments = attachments_dir.or_else(|| {
                let dir = PathBuf::from(ATTACHMENTS_DIR);
                (config.spec.source.attachments.is_some() && policy.config.is_some() && dir.exists()).then_some(dir)
            });
            block_on(async move {
                let report = match backup_run(&config, &policy, attachments).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(reason = e.reason().as_str(), "backup failed: {e}");
                        failed(JobKind::Backup, &e)
                    }
                };
                emit(&report);
                if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
            })
        }
        BackupCommand::List { policy, output } => {
            let config = load_config(&policy)?;
            block_on(async move {
                let rt = runtime(&config, &policy, None).await.map_err(|e| e.to_string())?;
                let catalog = crate::backup::manifest::read_catalog(&rt.store, &config.prefix)
                    .await
                    .map_err(|e| e.to_string())?;
                if output == "json" {
                    println!("{}", serde_json::to_string_pretty(&catalog.backups).unwrap_or_default());
                } else {
                    println!(
                        "{:<22} {:<21} {:>10} {:>10} {:>7} {:>10}  VERIFIED",
                        "ID", "COMPLETED", "STORED", "RAW", "TABLES", "ROWS"
                    );
                    for m in &catalog.backups {
                        let raw: u64 = m.objects.iter().map(|o| o.raw_bytes).sum();
                        println!(
                            "{:<22} {:<21} {:>10} {:>10} {:>7} {:>10}  {:?}",
                            m.id,
                            m.completed.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                            human_bytes(m.stored_bytes()),
                            human_bytes(raw),
                            m.tables.len(),
                            m.tables.values().sum::<u64>(),
                            m.verification.mode
                        );
                    }
                }
                for (key, why) in &catalog.unreadable {
                    eprintln!("warning: manifest {key} cannot be read: {why}");
                }
                if !catalog.uncommitted.is_empty() {
                    eprintln!(
                        "{} uncommitted backup(s) (failed or running; not restorable) are not listed",
                        catalog.uncommitted.len()
                    );
                }
                Ok(ExitCode::SUCCESS)
            })?
        }
        BackupCommand::Fetch { policy, backup, output } => {
            let config = load_config(&policy)?;
            block_on(async move {
                let result = async {
                    let rt = runtime(&config, &policy, None).await?;
                    let catalog = crate::backup::manifest::read_catalog(&rt.store, &config.prefix).await?;
                    let m =
                        crate::backup::select(&catalog, &selector(Some(&backup), None).map_err(BackupError::Config)?)?;
                    let kek = crate::backup::kek_for(&config).await?;
                    let key = crate::backup::data_key(m, kek.as_ref(), &rt).await?;
                    let object = m
                        .object(crate::backup::manifest::DATABASE)
                        .ok_or_else(|| BackupError::NotFound(format!("backup {} has no database object", m.id)))?;
                    let sink: Box<dyn Write + Send> = if output.as_os_str() == "-" {
                        Box::new(std::io::BufWriter::with_capacity(1 << 20, std::io::stdout()))
                    } else {
                        let f = std::fs::File::create(&output)
                            .map_err(|e| BackupError::Config(format!("{}: {e}", output.display())))?;
                        Box::new(std::io::BufWriter::with_capacity(1 << 20, f))
                    };
                    let (v, mut sink) =
                        crate::backup::pipeline::read_object(&rt.store, object, key, sink, rt.options.progress_every)
                            .await?;
                    sink.flush().map_err(|e| BackupError::Config(format!("{}: {e}", output.display())))?;
                    Ok::<_, BackupError>((m.id.clone(), v))
                }
                .await;
                match result {
                    Ok((id, v)) => {
                        eprintln!(
                            "backup {id}: {} written to {}, verified",
                            human_bytes(v.raw_bytes),
                            output.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        if output.as_os_str() != "-" {
                            let _ = std::fs::remove_file(&output);
                        }
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        BackupCommand::Verify { policy, backup } => {
            let config = load_config(&policy)?;
            block_on(async move {
                let result = async {
                    let rt = runtime(&config, &policy, None).await?;
                    let catalog = crate::backup::manifest::read_catalog(&rt.store, &config.prefix).await?;
                    let m =
                        crate::backup::select(&catalog, &selector(Some(&backup), None).map_err(BackupError::Config)?)?;
                    let kek = crate::backup::kek_for(&config).await?;
                    crate::backup::verify_backup(m, kek.as_ref(), &rt).await
                }
                .await;
                match result {
                    Ok(r) => {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                        eprintln!(
                            "backup {} verified: {} stored, {} restored bytes, {} chunks authenticated",
                            r.id,
                            human_bytes(r.stored_bytes),
                            human_bytes(r.raw_bytes),
                            r.decrypted_chunks
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
    }
}

fn selector(backup: Option<&str>, before: Option<&str>) -> Result<Selector, String> {
    match (backup, before) {
        (_, Some(t)) => t
            .parse::<Timestamp>()
            .map(Selector::Before)
            .map_err(|e| format!("--before {t:?} is not an RFC 3339 time such as 2026-11-28T09:00:00Z: {e}")),
        (None | Some("latest"), None) => Ok(Selector::Latest),
        (Some(id), None) => Ok(Selector::Id(id.to_string())),
    }
}

async fn backup_run(
    config: &JobConfig,
    args: &PolicyArgs,
    attachments: Option<PathBuf>,
) -> Result<JobReport, BackupError> {
    let rt = runtime(config, args, attachments).await?;
    let kek = crate::backup::kek_for(config).await?;
    let conn = crate::backup::source_conn(config).await?;
    // First what runs of this policy that died left behind, so that a crash-looping job does not fill the bucket.
    // Cleanup never fails the backup (the bucket may not exist yet, or listing uploads may not be allowed).
    let mut reclaimed = crate::backup::reclaim_uploads(&rt.store, &config.prefix, (rt.clock)(), rt.reclaim_idle)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("could not look for unfinished uploads of earlier runs: {e}");
            Reclaimed::default()
        });
    let m = crate::backup::run_backup(config, &conn, kek.as_ref(), &rt).await?;
    let mut report = JobReport::new(JobKind::Backup);
    report.backup_id = Some(m.id.clone());
    report.completed = Some(m.completed);
    report.stored_bytes = Some(m.stored_bytes());
    report.raw_bytes = Some(m.objects.iter().map(|o| o.raw_bytes).sum());
    report.sha256 = m.object(crate::backup::manifest::DATABASE).map(|o| o.sha256.clone());
    report.duration_seconds = Some(m.completed.duration_since(m.started).as_secs_f64());
    report.verify_seconds = Some(m.verification.seconds);
    // Retention and cleanup run after a successful backup; their failure does not undo the backup.
    let catalog = crate::backup::manifest::read_catalog(&rt.store, &config.prefix).await?;
    match crate::backup::housekeeping(config, &rt, &catalog, (rt.clock)(), jiff::SignedDuration::from_hours(24)).await {
        Ok(h) => {
            reclaimed.add(h.reclaimed);
            if !h.deleted_backups.is_empty() || !h.removed_leftovers.is_empty() {
                tracing::info!(
                    "retention deleted {} backup(s); cleanup removed {} leftover(s)",
                    h.deleted_backups.len(),
                    h.removed_leftovers.len(),
                );
            }
            report.backup_count = Some(catalog.backups.len() - h.deleted_backups.len());
            report.deleted_backups = h.deleted_backups;
        }
        Err(e) => {
            tracing::warn!("retention/cleanup failed (the backup itself is committed): {e}");
            report.backup_count = Some(catalog.backups.len());
        }
    }
    if reclaimed.uploads > 0 {
        tracing::info!(
            "reclaimed {} unfinished upload(s) of runs that died: {} part(s), {}",
            reclaimed.uploads,
            reclaimed.parts,
            human_bytes(reclaimed.bytes)
        );
        report.reclaimed = Some(reclaimed);
    }
    if let Some(newest) = catalog.backups.last() {
        report.newest_backup = Some(newest.id.clone());
        report.newest_completed = Some(newest.completed);
    }
    Ok(report)
}

/// Runs `crmguard restore ...`.
pub fn restore(cmd: RestoreCommand) -> Result<ExitCode, String> {
    let RestoreCommand::Run(args) = cmd;
    let config = load_config(&args.policy)?;
    let source = &config.spec.source;
    let host = args.target_host.clone().unwrap_or_else(|| source.host.clone());
    let port = args.target_port.unwrap_or(config.port);
    if !args.allow_overwrite_source
        && host == source.host
        && port == config.port
        && args.target_database == source.database
    {
        return Err(format!(
            "refusing to restore into the policy's live source database {}/{}: restore into another database, or \
             pass --allow-overwrite-source",
            host, source.database
        ));
    }
    let sel = if args.drill { Selector::Latest } else { selector(args.backup.as_deref(), args.before.as_deref())? };
    let attachments = args
        .restore_attachments
        .then(|| args.attachments_dir.clone().unwrap_or_else(|| PathBuf::from(ATTACHMENTS_DIR)));
    block_on(async move {
        let kind = if args.drill { JobKind::Drill } else { JobKind::Restore };
        let result = async {
            let rt = runtime(&config, &args.policy, None).await?;
            let catalog = crate::backup::manifest::read_catalog(&rt.store, &config.prefix).await?;
            let m = crate::backup::select(&catalog, &sel)?;
            let kek = crate::backup::kek_for(&config).await?;
            let conn = match (&args.target_vault_path, &args.target_vault_role) {
                (Some(path), Some(role)) => {
                    let mut c = config.clone();
                    c.spec.source.credentials = crate::api::common::DatabaseCredentials {
                        secret_ref: None,
                        vault: Some(crate::api::common::VaultSource {
                            path: path.clone(),
                            auth_role: role.clone(),
                            auth_mount: args.target_vault_mount.clone(),
                        }),
                    };
                    crate::backup::source_conn(&c).await?
                }
                _ => crate::backup::source_conn(&config).await?,
            };
            let target = conn.with_target(&host, port, &args.target_database);
            let req = crate::backup::RestoreRequest {
                target,
                create_database: args.create_database || args.drill,
                recreate: args.drill,
                clean: args.clean,
                verify_row_counts: args.verify_row_counts || args.drill,
                attachments_dir: attachments,
            };
            crate::backup::restore(m, kek.as_ref(), &req, &rt).await
        }
        .await;
        let report = match result {
            Ok(r) => {
                tracing::info!(
                    "restored backup {} into {}: {} tables, {} rows, {} in {:.1}s{}",
                    r.id,
                    r.database,
                    r.tables,
                    r.rows,
                    human_bytes(r.restored_bytes),
                    r.duration_seconds,
                    if r.row_counts_verified { ", row counts match the backup" } else { "" }
                );
                let mut j = JobReport::new(kind);
                j.backup_id = Some(r.id);
                j.raw_bytes = Some(r.restored_bytes);
                j.duration_seconds = Some(r.duration_seconds);
                j.completed = Some(Timestamp::now());
                j.row_counts_verified = Some(r.row_counts_verified);
                j
            }
            Err(e) => {
                tracing::error!(reason = e.reason().as_str(), "{} failed: {e}", kind.as_str());
                failed(kind, &e)
            }
        };
        emit(&report);
        if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
    })
}
