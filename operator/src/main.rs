//! The `crmguard` binary: the operator and the commands people run around it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crmguard::controllers::BuildContext;
use k8s_openapi::jiff::Timestamp;

#[derive(Parser, Debug)]
#[command(
    name = "crmguard",
    version,
    about = "Protects a CRM application running in Kubernetes: verified encrypted backups, least-privilege access, network guard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: reconcile every crmguard resource in the watched namespaces.
    Run(Box<RunArgs>),
    /// Print every CustomResourceDefinition as YAML, or write one file per CRD into each --out-dir.
    Crd {
        /// Directory to write `<plural>.<group>.yaml` files into (repeatable). Prints to stdout when absent.
        #[arg(long = "out-dir")]
        out_dirs: Vec<PathBuf>,
    },
    /// Back up a policy's database now, list its backups, or verify one (what the backup CronJob runs).
    Backup {
        #[command(subcommand)]
        command: crmguard::cli::backup::BackupCommand,
    },
    /// Restore a backup into a database (what the restore Job and the restore drill run).
    Restore {
        #[command(subcommand)]
        command: crmguard::cli::backup::RestoreCommand,
    },
    /// Database access monitoring without a cluster: replay a database's log through an AccessMonitor's rules.
    Monitor {
        #[command(subcommand)]
        command: crmguard::cli::monitor::MonitorCommand,
    },
    /// The audit trail of the operator's writes.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The security posture of CRM namespaces: findings with severities and a score, from files (-f) or from
    /// the cluster of the current kubeconfig (--namespace), as text or as the PolicyReport the operator writes.
    Report {
        /// Files or directories with crmguard resources; without them the cluster is asked.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Namespace to assess (required without -f; with -f, the namespace of resources that name none).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// `text`, or `policyreport` (wgpolicyk8s.io/v1alpha2 YAML).
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "policyreport"])]
        output: String,
    },
    /// Show, without a cluster, every object the operator would create for the given custom resources, and
    /// every validation error the API server or the operator would report.
    Plan {
        /// Files or directories with crmguard resources (YAML or JSON, multi-document allowed). Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Namespace for resources that do not name one.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Image used by backup and restore jobs.
        #[arg(long, env = "CRMGUARD_IMAGE")]
        image: Option<String>,
        /// Also print the flow matrix: which connections between the Pods in the input files (and the addresses
        /// the policies name) the planned NetworkPolicies allow, and why.
        #[arg(long)]
        explain: bool,
    },
}

/// Where the audit trail's hash-chained segments are kept (every record is also logged, target crmguard::audit).
#[derive(clap::Args, Debug, Clone)]
struct AuditArgs {
    /// S3 bucket for the audit segments (keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else the ambient
    /// AWS chain). Without it (and without --audit-dir) the audit trail is the log only.
    #[arg(long, env = "CRMGUARD_AUDIT_BUCKET")]
    audit_bucket: Option<String>,
    /// A local directory instead of a bucket (development, or a mounted volume).
    #[arg(long, env = "CRMGUARD_AUDIT_DIR", conflicts_with = "audit_bucket")]
    audit_dir: Option<PathBuf>,
    /// Key prefix of the segments.
    #[arg(long, env = "CRMGUARD_AUDIT_PREFIX", default_value = "crmguard-audit")]
    audit_prefix: String,
    /// Name of the chain (one per operator installation).
    #[arg(long, env = "CRMGUARD_AUDIT_STREAM", default_value = "operator")]
    audit_stream: String,
    /// S3 endpoint for S3-compatible storage, e.g. https://minio.example:9000.
    #[arg(long, env = "CRMGUARD_AUDIT_ENDPOINT")]
    audit_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "CRMGUARD_AUDIT_REGION", default_value = "us-east-1")]
    audit_region: String,
    /// Path-style S3 addressing (most S3-compatible servers).
    #[arg(long, env = "CRMGUARD_AUDIT_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set)]
    audit_force_path_style: bool,
}

impl AuditArgs {
    async fn store(&self) -> Result<Option<crmguard::backup::store::Store>, String> {
        use crmguard::backup::store::{S3Settings, Store};
        if let Some(dir) = &self.audit_dir {
            return Ok(Some(Store::dir(dir)));
        }
        let Some(bucket) = &self.audit_bucket else { return Ok(None) };
        let settings =
            S3Settings::from_env(bucket, &self.audit_region, self.audit_endpoint.clone(), self.audit_force_path_style);
        Store::s3(&settings).await.map(Some).map_err(|e| format!("audit bucket: {e}"))
    }
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Check the audit chain: every segment present, in order and unmodified. Exits 1 and names the segment
    /// when one was modified, removed or moved.
    Verify {
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Who touched which customer data: the access records AccessMonitors wrote (stream `<audit-stream>-access`),
    /// filtered, with the findings among them. The chain is checked first; a broken chain exits 1 after the list.
    Access {
        #[command(flatten)]
        audit: AuditArgs,
        /// Only accesses by this team's credentials.
        #[arg(long)]
        team: Option<String>,
        /// Only this database user.
        #[arg(long)]
        user: Option<String>,
        /// Only this table, as `schema.table` (`database.table` on MariaDB), e.g. public.invoices.
        #[arg(long)]
        table: Option<String>,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only accesses within this long before now (e.g. 24h, 90m) or since this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only findings.
        #[arg(long)]
        findings: bool,
        /// Only statements that came from this pod (placed by the client's address).
        #[arg(long)]
        pod: Option<String>,
        /// `text` (a table) or `json` (one record per line).
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace to watch (repeatable, or comma-separated). All namespaces when absent.
    #[arg(long = "namespace", env = "CRMGUARD_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Reconciles running at once per controller.
    #[arg(long, env = "CRMGUARD_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "CRMGUARD_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// Log format.
    #[arg(long, env = "CRMGUARD_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    /// Log level or tracing filter (e.g. `info`, `crmguard=debug,kube=info`).
    #[arg(long, env = "CRMGUARD_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Elect a leader with a Lease so that several replicas are safe. Turn off only for a single replica.
    #[arg(long, env = "CRMGUARD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (defaults to the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "crmguard-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "crmguard-leader")]
    lease_name: String,
    /// Identity of this replica in the Lease (defaults to the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Image used by backup and restore jobs.
    #[arg(long, env = "CRMGUARD_IMAGE")]
    image: Option<String>,
    /// Vault address: used by AccessPolicies that do not name their own, and handed to backup and restore jobs
    /// that use Vault (credentials or Transit keys).
    #[arg(long, env = "CRMGUARD_VAULT_ADDR")]
    vault_addr: Option<String>,
    /// Mount of Vault's Kubernetes auth method the operator logs in with (ignored when VAULT_TOKEN is set).
    #[arg(long, env = "CRMGUARD_VAULT_AUTH_MOUNT", default_value = "kubernetes")]
    vault_auth_mount: String,
    /// Vault role the operator logs in as.
    #[arg(long, env = "CRMGUARD_VAULT_ROLE", default_value = "crmguard-operator")]
    vault_role: String,
    /// ServiceAccount token presented to Vault's Kubernetes auth.
    #[arg(
        long,
        env = "CRMGUARD_VAULT_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    vault_token_file: String,
    /// ClusterRole whose rules every AccessPolicy's Kubernetes grants must be covered by (the grant ceiling). The
    /// operator is bound to it and holds no escalate/bind, so the API server enforces it too.
    #[arg(long, env = "CRMGUARD_GRANT_CEILING", default_value = crmguard::controllers::access_policy::ceiling::DEFAULT_GRANT_CEILING)]
    grant_ceiling: String,
    /// Prefix an AccessPolicy's vault[].path must start with (repeatable or comma-separated; `{namespace}` is the
    /// policy's namespace; each ends in '/'). An empty value allows no vault[] grants.
    #[arg(
        long = "vault-path-prefix",
        env = "CRMGUARD_VAULT_PATH_PREFIXES",
        value_delimiter = ',',
        default_values_t = crmguard::controllers::access_policy::ceiling::DEFAULT_VAULT_PATH_PREFIXES.map(String::from)
    )]
    vault_path_prefixes: Vec<String>,
    /// Vault address an AccessPolicy's spec.vault.address may name besides --vault-addr (repeatable or
    /// comma-separated): the operator presents its own credentials there.
    #[arg(long = "vault-allowed-address", env = "CRMGUARD_VAULT_ALLOWED_ADDRESSES", value_delimiter = ',')]
    vault_allowed_addresses: Vec<String>,
    /// Steady-state resync interval in seconds.
    #[arg(long, default_value_t = 600)]
    resync_seconds: u64,
    /// S3 endpoint for backup policies whose destination names none (a platform's S3-compatible store).
    #[arg(long, env = "CRMGUARD_DEFAULT_S3_ENDPOINT")]
    default_s3_endpoint: Option<String>,
    /// Region used with --default-s3-endpoint (replaces the policy's region).
    #[arg(long, env = "CRMGUARD_DEFAULT_S3_REGION")]
    default_s3_region: Option<String>,
    /// Path-style addressing with --default-s3-endpoint.
    #[arg(long, env = "CRMGUARD_DEFAULT_S3_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set)]
    default_s3_force_path_style: bool,
    #[command(flatten)]
    audit: AuditArgs,
    /// How often audit segments are written (seconds); a segment also closes at 1000 records.
    #[arg(long, env = "CRMGUARD_AUDIT_FLUSH_SECONDS", default_value_t = 60)]
    audit_flush_seconds: u64,
    /// Alertmanager base URL AccessMonitors' findings and incidents are posted to (`/api/v2/alerts`), e.g.
    /// http://alertmanager-operated.monitoring:9093 (repeatable or comma-separated: each of an HA set). None: no
    /// alerts (findings are still in status, Events, metrics and the findings report).
    #[arg(long = "alertmanager-url", env = "CRMGUARD_ALERTMANAGER_URLS", value_delimiter = ',')]
    alertmanager_urls: Vec<String>,
    /// How often the posture PolicyReports (one per namespace) are recomputed, in seconds.
    #[arg(long, env = "CRMGUARD_POSTURE_SECONDS", default_value_t = 60)]
    posture_seconds: u64,
}

fn init_logging(format: &str, level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if format == "json" { builder.json().try_init() } else { builder.with_ansi(false).try_init() };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

/// Logging of backup and restore commands: `CRMGUARD_LOG_FORMAT` (text by default) and `CRMGUARD_LOG_LEVEL`.
fn init_job_logging() -> Result<(), String> {
    let format = std::env::var("CRMGUARD_LOG_FORMAT").unwrap_or_else(|_| "text".into());
    let level = std::env::var("CRMGUARD_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    init_logging(&format, &level)
}

fn run_operator(args: RunArgs) -> Result<ExitCode, String> {
    init_logging(&args.log_format, &args.log_level)?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "crmguard".into());
        format!("{host}-{}", std::process::id())
    });
    let mut build = BuildContext::default();
    if let Some(image) = args.image {
        build.image = image;
    }
    build.vault_addr = args.vault_addr.filter(|a| !a.is_empty());
    build.access = crmguard::controllers::access_policy::ceiling::AccessLimits {
        grant_ceiling: args.grant_ceiling,
        vault_path_prefixes: args.vault_path_prefixes.into_iter().filter(|p| !p.is_empty()).collect(),
        vault_addresses: args.vault_allowed_addresses.into_iter().filter(|a| !a.is_empty()).collect(),
    };
    build.access.check()?;
    build.default_s3 =
        args.default_s3_endpoint.filter(|e| !e.is_empty()).map(|endpoint| crmguard::controllers::DefaultS3 {
            endpoint,
            region: args.default_s3_region.filter(|r| !r.is_empty()),
            force_path_style: args.default_s3_force_path_style,
        });
    // Vault's CA (VAULT_CACERT, as for the Vault CLI): trusted by the operator through vaultrs, and handed to jobs.
    if let Ok(path) = std::env::var("VAULT_CACERT")
        && !path.is_empty()
    {
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| format!("VAULT_CACERT={path}: cannot read Vault's CA certificate: {e}"))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("VAULT_CACERT={path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
        }
        build.vault_ca_pem = Some(pem);
    }
    // VAULT_TOKEN (development, tests) wins over Kubernetes auth, as for the jobs and the Vault CLI.
    let vault_auth = match std::env::var("VAULT_TOKEN") {
        Ok(t) if !t.is_empty() => crmguard::vault::admin::OperatorAuth::Token(t.into()),
        _ => crmguard::vault::admin::OperatorAuth::Kubernetes {
            mount: args.vault_auth_mount,
            role: args.vault_role,
            jwt_file: args.vault_token_file,
        },
    };
    let opts = crmguard::runtime::RunOptions {
        identity: identity.clone(),
        namespaces: args.namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
        concurrency: args.concurrency.max(1),
        http_addr: args.http_addr,
        lease: args.leader_election.then(|| crmguard::runtime::leader::LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: std::time::Duration::from_secs(args.lease_duration_seconds.max(3)),
            retry: std::time::Duration::from_secs((args.lease_duration_seconds / 5).max(1)),
        }),
        build,
        resync: std::time::Duration::from_secs(args.resync_seconds.max(10)),
        posture_every: std::time::Duration::from_secs(args.posture_seconds.max(1)),
        vault_auth,
        audit: None,
        alertmanagers: crmguard::alerting::Alertmanagers::new(
            &args.alertmanager_urls.into_iter().filter(|u| !u.is_empty()).collect::<Vec<_>>(),
        )?,
    };
    let (audit_args, audit_flush) =
        (args.audit.clone(), std::time::Duration::from_secs(args.audit_flush_seconds.max(1)));
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("tokio: {e}"))?;
    let result = runtime.block_on(async move {
        let mut opts = opts;
        opts.audit = audit_args.store().await.map_err(std::io::Error::other)?.map(|store| crmguard::audit::Shipping {
            store,
            prefix: audit_args.audit_prefix.clone(),
            stream: audit_args.audit_stream.clone(),
            flush_every: audit_flush,
            max_records: 1000,
        });
        crmguard::runtime::run(opts).await.map_err(std::io::Error::other)
    });
    match result {
        Ok(()) => {
            // Do not wait for stuck tasks (e.g. watches on an unreachable API server) at shutdown.
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // The one line that says why the operator exits (in the log format chosen); exit code 2.
            tracing::error!(error = %e, "crmguard stopped");
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            Ok(ExitCode::from(2))
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Run(args) => run_operator(*args),
        Command::Backup { command } => {
            init_job_logging()?;
            crmguard::cli::backup::backup(command)
        }
        Command::Restore { command } => {
            init_job_logging()?;
            crmguard::cli::backup::restore(command)
        }
        Command::Crd { out_dirs } => {
            let files = crmguard::api::crd_files().map_err(|e| format!("cannot render CRDs as YAML: {e}"))?;
            if out_dirs.is_empty() {
                for (_, text) in &files {
                    print!("---\n{text}");
                }
            }
            for dir in &out_dirs {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                for (name, text) in &files {
                    let path = dir.join(name);
                    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { files, namespace, output } => report(files, namespace, &output),
        Command::Monitor { command: crmguard::cli::monitor::MonitorCommand::Replay(args) } => {
            crmguard::cli::monitor::replay(args)
        }
        Command::Audit { command: AuditCommand::Verify { audit } } => audit_verify(&audit),
        Command::Audit {
            command: AuditCommand::Access { audit, team, user, table, namespace, since, findings, pod, output },
        } => {
            let since = match since {
                None => None,
                Some(s) => Some(match s.parse::<Timestamp>() {
                    Ok(t) => t,
                    Err(_) => {
                        let d = crmguard::api::common::parse_duration(&s).map_err(|e| format!("--since: {e}"))?;
                        let d = jiff::SignedDuration::try_from(d).map_err(|e| format!("--since: {e}"))?;
                        Timestamp::now().checked_sub(d).map_err(|e| format!("--since: {e}"))?
                    }
                }),
            };
            let q = crmguard::audit::AccessQuery { team, user, table, namespace, since, findings_only: findings, pod };
            audit_access(&audit, &q, output == "json")
        }
        Command::Plan { files, namespace, image, explain } => {
            let docs = crmguard::document::load(&files).map_err(|e| e.to_string())?;
            let mut ctx = BuildContext::default();
            if let Some(image) = image {
                ctx.image = image;
            }
            let plans = crmguard::plan::plan(&docs, namespace.as_deref(), &ctx, Timestamp::now());
            print!("{}", crmguard::plan::render(&plans));
            if explain {
                print!("{}", crmguard::plan::explain(&docs, &plans));
            }
            let refused: Vec<_> = plans.iter().filter(|p| !p.errors.is_empty()).collect();
            let accepted = plans.iter().filter(|p| !p.skipped && p.errors.is_empty()).count();
            let objects: usize = plans.iter().map(|p| p.children.len()).sum();
            eprintln!(
                "plan: {accepted} resource(s) accepted, {} refused, {objects} object(s) to create",
                refused.len()
            );
            for p in &refused {
                for e in &p.errors {
                    eprintln!("error: {} ({}): {e}", p.resource, p.source);
                }
            }
            Ok(if refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn main() -> ExitCode {
    // One TLS provider for every client in the process (kube, S3, Vault): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn report(files: Vec<PathBuf>, namespace: Option<String>, output: &str) -> Result<ExitCode, String> {
    use crmguard::posture;
    let now = Timestamp::now();
    let inputs = if files.is_empty() {
        let ns = namespace.ok_or("give --namespace NS (the cluster of the current kubeconfig is asked) or -f FILES")?;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio: {e}"))?;
        vec![runtime.block_on(async {
            let client = kube::Client::try_default().await.map_err(|e| format!("cannot reach the cluster: {e}"))?;
            posture::inputs_from_cluster(&client, &ns).await.map_err(|e| format!("listing crmguard resources: {e}"))
        })?]
    } else {
        let docs = crmguard::document::load(&files).map_err(|e| e.to_string())?;
        posture::inputs_from_documents(&docs, namespace.as_deref())
    };
    if inputs.is_empty() {
        return Err("no crmguard resources in the input".into());
    }
    let mut worst = 100;
    for i in &inputs {
        let r = posture::assess(i, now);
        worst = worst.min(r.score);
        if output == "policyreport" {
            print!("---\n{}", serde_saphyr::to_string(&posture::policy_report(&r, now)).map_err(|e| e.to_string())?);
        } else {
            print!("{}", posture::render(&r));
        }
    }
    Ok(if worst == 100 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// The segments of `stream` as (key, bytes).
async fn segments(
    store: &crmguard::backup::store::Store,
    args: &AuditArgs,
    stream: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let dir = format!("{}/{stream}/", args.audit_prefix.trim_end_matches('/'));
    let mut segments = Vec::new();
    for o in store.list(&dir).await.map_err(|e| e.to_string())?.into_iter().filter(|o| o.key.ends_with(".jsonl")) {
        let bytes = store.get(&o.key).await.map_err(|e| e.to_string())?;
        segments.push((o.key, bytes.to_vec()));
    }
    if segments.is_empty() {
        return Err(format!("no audit segments under {}", store.describe(&dir)));
    }
    Ok(segments)
}

fn audit_access(args: &AuditArgs, q: &crmguard::audit::AccessQuery, json: bool) -> Result<ExitCode, String> {
    use crmguard::audit::AccessRecord;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio: {e}"))?;
    runtime.block_on(async {
        let store = args.store().await?.ok_or("give --audit-bucket (with --audit-endpoint etc.) or --audit-dir")?;
        let mut segments = segments(&store, args, &crmguard::audit::access_stream(&args.audit_stream)).await?;
        segments.sort();
        let records: Vec<AccessRecord> = segments
            .iter()
            .flat_map(|(_, b)| crmguard::audit::records_of::<AccessRecord>(b))
            .filter(|r| q.matches(r))
            .collect();
        let v = crmguard::audit::verify(segments);
        if json {
            for r in &records {
                println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
            }
        } else {
            println!(
                "{:<30} {:<14} {:<40} {:<12} {:<28} {:>6}  {:<24} FINDING",
                "UNTIL", "NAMESPACE", "WHO", "ACCESS", "TABLE", "COUNT", "FROM"
            );
            for r in &records {
                let who = match &r.team {
                    Some(t) => format!("{t} ({})", r.user),
                    None => format!("{} ({})", r.identity, r.user),
                };
                let finding = match (&r.finding, &r.message) {
                    (Some(f), Some(m)) => format!("{f}: {m}"),
                    (Some(f), None) => f.clone(),
                    _ => String::new(),
                };
                let from: Vec<&str> = r.pods.iter().chain(&r.addresses).map(String::as_str).collect();
                let from = if from.is_empty() { "-".to_string() } else { from.join(",") };
                println!(
                    "{:<30} {:<14} {:<40} {:<12} {:<28} {:>6}  {from:<24} {finding}",
                    r.until,
                    r.namespace,
                    who,
                    r.access,
                    r.object.as_deref().unwrap_or("-"),
                    r.count
                );
            }
            let accesses: u64 = records.iter().filter(|r| r.finding.is_none()).map(|r| r.count).sum();
            let findings = records.iter().filter(|r| r.finding.is_some()).count();
            println!(
                "{accesses} access(es), {findings} finding(s){}",
                if findings == 0 { ": nothing broke a rule" } else { "" }
            );
        }
        if v.problems.is_empty() {
            Ok(ExitCode::SUCCESS)
        } else {
            for p in &v.problems {
                eprintln!("BROKEN: {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    })
}

fn audit_verify(args: &AuditArgs) -> Result<ExitCode, String> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio: {e}"))?;
    runtime.block_on(async {
        let store = args.store().await?.ok_or("give --audit-bucket (with --audit-endpoint etc.) or --audit-dir")?;
        let segments = segments(&store, args, &args.audit_stream).await?;
        let v = crmguard::audit::verify(segments);
        println!(
            "{} segment(s), {} record(s); newest segment sha256 {} (compare with the operator's last \"audit segment written\" log line)",
            v.segments,
            v.records,
            v.head.as_deref().unwrap_or("-")
        );
        if v.problems.is_empty() {
            println!("the chain is intact");
            Ok(ExitCode::SUCCESS)
        } else {
            for p in &v.problems {
                println!("BROKEN: {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    })
}
