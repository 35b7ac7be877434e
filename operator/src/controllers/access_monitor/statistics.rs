//! `spec.database.statistics`: a monitoring role's connection to the database (from its Secret, kept open between
//! reads) and one sample of its statement statistics per read.
//!
//! PostgreSQL: `pg_stat_statements`, of the connection's database only. Statement texts are asked for only for
//! reads the server normalized (its literals replaced by `$1`, ...: SELECT, VALUES, TABLE, WITH) and, of `COPY x
//! TO`, only the table's name: utility statements keep their literals (a `CREATE ROLE ... PASSWORD` too), so their
//! texts are never fetched. Only the tables a statement reads are kept.
//!
//! MariaDB: performance_schema's summaries by digest and by user (see `monitor::statistics`). Digest texts hold no
//! literal (the server replaces every one by `?`); they too are asked for only for reads.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, TlsConnect};

use mysql_async::prelude::Queryable;

use crate::api::access_monitor::{DatabaseStatistics, MonitoredEngine, SslMode};
use crate::controllers::contract::Context;
use crate::monitor::statistics::{ANY_TABLE, Counted, DigestCounted, Statement, UserCounted, statement, statement_in};

/// How long connecting (TCP, TLS, login) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a query may take; a connection that does not answer in time (half-open after a failover) is dropped.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the Secret's version is compared with the one connected with (a rotated password, a new CA).
const SECRET_RECHECK: Duration = Duration::from_secs(60);

/// The counters of the connection's database, per role and statement (the role's OID: its name changes when the
/// role is dropped).
const SAMPLE: &str = "SELECT userid, pg_catalog.pg_get_userbyid(userid)::text, queryid, calls, rows \
    FROM pg_stat_statements(false) \
    WHERE queryid IS NOT NULL AND dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())";

/// The sessions of the connection's database and their clients (`client_port` -1: the server's own socket; without
/// pg_read_all_stats another role's client is not shown, and its session is left out).
const SESSIONS: &str = "SELECT pid, usename::text, \
    CASE WHEN client_port = -1 THEN '[local]' ELSE host(client_addr) END, \
    extract(epoch FROM backend_start)::float8 \
    FROM pg_stat_activity \
    WHERE datname = current_database() AND backend_type = 'client backend' AND usename IS NOT NULL \
      AND (client_addr IS NOT NULL OR client_port = -1) AND pid <> pg_backend_pid()";

/// The texts of new statements: whole for a read the server normalized, only `COPY <table>` of an export, nothing of
/// any other (a utility statement's text keeps its literals).
const TEXTS: &str = "SELECT DISTINCT queryid, \
    CASE WHEN query ~* '^[[:space:](]*copy[[:space:]]' \
      THEN 'COPY ' || substring(query from '(?i)^[[:space:]]*copy[[:space:]]+([[:alnum:]_.\"$]+)') || ' TO' \
      ELSE query END \
    FROM pg_stat_statements(true) \
    WHERE queryid = ANY($1) \
      AND dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
      AND (query ~* '^[[:space:](]*(select|with|table|values)[[:space:](]' \
           OR query ~* '^[[:space:]]*copy[[:space:]]+[[:alnum:]_.\"$]+[[:space:](].*[[:space:]]to[[:space:]]')";

/// MariaDB: whether performance_schema is on and counts digests (both settings of the server), and whether table
/// names are stored in lower case (`lower_case_table_names`: a digest keeps the case the statement was typed in).
const MARIADB_CHECK: &str = "SELECT CAST(@@performance_schema AS SIGNED), \
    (SELECT ENABLED FROM performance_schema.setup_consumers WHERE NAME = 'statements_digest'), \
    CAST(@@lower_case_table_names AS SIGNED)";

/// MariaDB: rows sent per default database and digest (to every user; the digest '' counts the statements the
/// server had no room left for) and per user (of every statement), in one statement.
const MARIADB_SAMPLE: &str = "SELECT 'd', IFNULL(SCHEMA_NAME, ''), IFNULL(DIGEST, ''), CAST(COUNT_STAR AS SIGNED), \
    CAST(SUM_ROWS_SENT AS SIGNED) FROM performance_schema.events_statements_summary_by_digest \
    UNION ALL SELECT 'u', USER, '', CAST(SUM(COUNT_STAR) AS SIGNED), CAST(SUM(SUM_ROWS_SENT) AS SIGNED) \
    FROM performance_schema.events_statements_summary_by_user_by_event_name WHERE USER IS NOT NULL GROUP BY USER";

/// MariaDB: the texts of new digests that are reads (`{}`: one `?` per digest).
const MARIADB_TEXTS: &str = "SELECT IFNULL(SCHEMA_NAME, ''), DIGEST, DIGEST_TEXT \
    FROM performance_schema.events_statements_summary_by_digest \
    WHERE DIGEST IN ({}) AND DIGEST_TEXT REGEXP '^[[:space:](]*(SELECT|WITH|VALUES)[[:space:](]'";

/// The performance_schema tables the MariaDB monitoring role reads (its own entries in the audit log).
pub const MARIADB_VIEWS: [&str; 3] = [
    "performance_schema.events_statements_summary_by_digest",
    "performance_schema.events_statements_summary_by_user_by_event_name",
    "performance_schema.setup_consumers",
];

/// An open connection, for the spec and the Secret's version it was made with.
#[derive(Clone, Debug)]
pub struct Db {
    conn: Conn,
    of: DatabaseStatistics,
    secret_version: String,
    checked: Instant,
}

#[derive(Clone)]
enum Conn {
    Postgres(Arc<tokio_postgres::Client>),
    /// The connection, and whether table names are folded to lower case.
    Mariadb(Arc<tokio::sync::Mutex<mysql_async::Conn>>, bool),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Postgres(_) => "Postgres",
            Conn::Mariadb(..) => "Mariadb",
        })
    }
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::Postgres(c) => c.is_closed(),
            // A dead connection fails its next query, which drops it.
            Conn::Mariadb(..) => false,
        }
    }
}

/// What a statement reads, known from its text: PostgreSQL's by queryid, MariaDB's by (default database, digest).
#[derive(Clone, Debug, Default)]
pub struct Statements {
    pub postgres: HashMap<i64, Statement>,
    pub mariadb: HashMap<(String, String), Statement>,
}

/// The counters of a sample.
#[derive(Debug)]
pub enum Counts {
    Postgres(Vec<Counted>),
    Mariadb { digests: Vec<DigestCounted>, users: Vec<UserCounted> },
}

/// A sample: the counters, and whether the connection is new (its counters are not to be compared with another
/// connection's: a failover, another host).
#[derive(Debug)]
pub struct Sample {
    pub counts: Counts,
    pub fresh: bool,
    /// PostgreSQL's sessions.
    pub sessions: Vec<crate::monitor::sessions::Sampled>,
}

/// Why a sample could not be taken, said in the `RowsCounted` condition (never a password or a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// The Secret is missing or lacks a key; the message says which.
    Secret(String),
    /// Connecting or logging in failed.
    Connect(String),
    /// The query failed (the extension is missing, the role lacks `pg_read_all_stats`).
    Query(String),
    /// The database did not answer in time.
    Timeout(String),
}

/// The connection's settings, the CA's PEM for verify-full, and the Secret's version.
struct Settings {
    config: Config,
    host: String,
    port: u16,
    ca: Option<String>,
    version: String,
    user: String,
}

/// The Secret's resourceVersion (its metadata only).
async fn secret_version(ctx: &Context, ns: &str, s: &DatabaseStatistics) -> Result<Option<String>, Failed> {
    let meta = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_metadata_opt(&s.secret_name)
        .await
        .map_err(|e| Failed::Secret(format!("Secret {} could not be read: {e}", s.secret_name)))?;
    Ok(meta.map(|m| m.metadata.resource_version.unwrap_or_default()))
}

/// A connection's settings from the Secret `s.secret_name` of `ns`.
async fn settings(
    ctx: &Context,
    ns: &str,
    engine: MonitoredEngine,
    s: &DatabaseStatistics,
) -> Result<Settings, Failed> {
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&s.secret_name)
        .await
        .map_err(|e| Failed::Secret(format!("Secret {} could not be read: {e}", s.secret_name)))?
        .ok_or_else(|| Failed::Secret(format!("Secret {} does not exist in namespace {ns}", s.secret_name)))?;
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).trim().to_string()).filter(|v| !v.is_empty());
    let need = |k: &str| {
        get(k).ok_or_else(|| {
            Failed::Secret(format!("Secret {} has no key {k:?} (needed: host, username, password)", s.secret_name))
        })
    };
    let host = need("host")?;
    let port = match get("port") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| Failed::Secret(format!("Secret {}: key \"port\" is not a port number", s.secret_name)))?,
        None => match engine {
            MonitoredEngine::Postgres => 5432,
            MonitoredEngine::Mysql => 3306,
        },
    };
    let user = need("username")?;
    let password = need("password")?;
    let ca = match s.ssl_mode {
        SslMode::Disable => None,
        SslMode::VerifyFull => Some(get("ca.crt").ok_or_else(|| {
            Failed::Secret(format!(
                "Secret {} has no key \"ca.crt\": sslMode verify-full checks the server's certificate against it",
                s.secret_name
            ))
        })?),
    };
    let config = match engine {
        MonitoredEngine::Postgres => {
            let mut config = tokio_postgres::Config::new();
            config
                .user(&user)
                .password(password)
                .dbname(get("dbname").unwrap_or_else(|| "postgres".into()))
                .application_name("crmguard-access-monitor")
                // pg_stat_statements is looked up in the extension's usual schema, not one the role's search_path adds.
                .options("-c search_path=public")
                .ssl_mode(if ca.is_some() {
                    tokio_postgres::config::SslMode::Require
                } else {
                    tokio_postgres::config::SslMode::Disable
                });
            Config::Postgres(Box::new(config))
        }
        MonitoredEngine::Mysql => {
            let ssl = ca.as_ref().map(|pem| {
                mysql_async::SslOpts::default()
                    .with_root_certs(vec![pem.clone().into_bytes().into()])
                    .with_disable_built_in_roots(true)
            });
            Config::Mariadb(
                mysql_async::OptsBuilder::default()
                    .ip_or_hostname(host.clone())
                    .tcp_port(port)
                    .user(Some(user.clone()))
                    .pass(Some(password))
                    // The address given, not a local socket the server names.
                    .prefer_socket(false)
                    .ssl_opts(ssl)
                    .into(),
            )
        }
    };
    Ok(Settings { config, host, port, ca, version, user })
}

/// How to log in, per engine.
enum Config {
    Postgres(Box<tokio_postgres::Config>),
    Mariadb(mysql_async::Opts),
}

/// An error with its causes, each on one line ("error performing TLS handshake" alone does not say that the
/// certificate was not trusted; a server's DETAIL and HINT lines are left out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    for text in crate::error_chain(e).map(|t| t.lines().next().unwrap_or_default().to_string()) {
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
    }
    out
}

/// `f` within `limit`, its error said by `failed`; past the limit, `late` (e.g. "no answer", "no login").
async fn within<T, E>(
    limit: Duration,
    late: fn(String) -> Failed,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
    failed: impl FnOnce(E) -> Failed,
) -> Result<T, Failed> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(late(format!("no {what} within {}s", limit.as_secs()))),
    }
}

/// Logs in over `tcp` with `tls`; the connection is driven by a task of its own.
async fn login<T>(config: &tokio_postgres::Config, tcp: TcpStream, tls: T) -> Result<tokio_postgres::Client, Failed>
where
    T: TlsConnect<TcpStream>,
    T::Stream: Send + 'static,
{
    let (client, conn) =
        within(CONNECT_TIMEOUT, Failed::Connect, "login", config.connect_raw(tcp, tls), |e| Failed::Connect(chain(&e)))
            .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects as `s` says: TCP, then TLS when the CA is given. MariaDB: performance_schema must be on and count
/// digests.
async fn connect(s: &Settings) -> Result<Conn, Failed> {
    let config = match &s.config {
        Config::Postgres(c) => c,
        Config::Mariadb(opts) => return connect_mariadb(opts, s.ca.as_deref(), &s.host).await,
    };
    let tcp = TcpStream::connect((s.host.as_str(), s.port));
    let tcp = within(CONNECT_TIMEOUT, Failed::Connect, "answer", tcp, |e| Failed::Connect(e.to_string())).await?;
    let client = match &s.ca {
        None => login(config, tcp, tokio_postgres::NoTls).await,
        Some(pem) => login(config, tcp, Rustls::new(&s.host, pem).map_err(Failed::Secret)?).await,
    }?;
    Ok(Conn::Postgres(Arc::new(client)))
}

async fn connect_mariadb(opts: &mysql_async::Opts, ca: Option<&str>, host: &str) -> Result<Conn, Failed> {
    if let Some(pem) = ca {
        // The same checks as PostgreSQL's (a PEM with a certificate, a host that is a server name), said the same.
        Rustls::new(host, pem).map_err(Failed::Secret)?;
    }
    let login = mysql_async::Conn::new(opts.clone());
    let mut conn =
        within(CONNECT_TIMEOUT, Failed::Connect, "login", login, |e| Failed::Connect(mariadb_error(&e))).await?;
    let row: Option<mysql_async::Row> =
        within(QUERY_TIMEOUT, Failed::Timeout, "answer", conn.query_first(MARIADB_CHECK), mariadb_failed).await?;
    let on = row.map(mysql_async::from_row_opt::<(Option<i64>, Option<String>, Option<i64>)>).transpose();
    let on = on.map_err(|e| Failed::Query(format!("an unexpected answer: {e}")))?;
    match on {
        Some((Some(1), Some(enabled), lower)) if enabled == "YES" => {
            Ok(Conn::Mariadb(Arc::new(tokio::sync::Mutex::new(conn)), lower.unwrap_or(0) != 0))
        }
        Some((Some(1), _, _)) => {
            Err(Failed::Query("the performance_schema consumer statements_digest is disabled".into()))
        }
        _ => Err(Failed::Query("performance_schema is OFF on the server".into())),
    }
}

/// A MariaDB error as said in the condition: the server's message, or the client's chain.
fn mariadb_error(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => s.message.clone(),
        other => chain(other),
    }
}

/// A failed MariaDB query: the server's refusal is the statistics' (a grant, a setting); a broken connection or the
/// driver's failure is the database's reachability.
fn mariadb_failed(e: mysql_async::Error) -> Failed {
    match e {
        mysql_async::Error::Server(_) => Failed::Query(mariadb_error(&e)),
        other => Failed::Connect(mariadb_error(&other)),
    }
}

/// A query on `db`'s connection within [`QUERY_TIMEOUT`]; a failure or timeout drops the connection (the next
/// sample connects again).
async fn query(
    db: &mut Option<Db>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, Failed> {
    let Some(Conn::Postgres(client)) = db.as_ref().map(|d| &d.conn) else {
        return Err(Failed::Connect("not connected".into()));
    };
    let failed = |e: tokio_postgres::Error| {
        Failed::Query(e.as_db_error().map_or_else(|| chain(&e), |d| d.message().to_string()))
    };
    let result = within(QUERY_TIMEOUT, Failed::Timeout, "answer", client.query(sql, params), failed).await;
    if result.is_err() {
        *db = None;
    }
    result
}

/// A MariaDB query on `db`'s connection within [`QUERY_TIMEOUT`]; a failure or timeout drops the connection.
/// Rows that do not convert (a NULL, a value of another type) are a failed query, not a panic.
async fn query_mariadb<T>(db: &mut Option<Db>, sql: &str, params: Vec<mysql_async::Value>) -> Result<Vec<T>, Failed>
where
    T: mysql_async::prelude::FromRow + Send + 'static,
{
    let Some(Conn::Mariadb(conn, _)) = db.as_ref().map(|d| d.conn.clone()) else {
        return Err(Failed::Connect("not connected".into()));
    };
    let run = async {
        let mut c = conn.lock().await;
        let rows: Result<Vec<mysql_async::Row>, _> =
            if params.is_empty() { c.query(sql).await } else { c.exec(sql, params).await };
        rows
    };
    let result = within(QUERY_TIMEOUT, Failed::Timeout, "answer", run, mariadb_failed).await.and_then(|rows| {
        let rows = rows.into_iter().map(mysql_async::from_row_opt::<T>).collect::<Result<Vec<T>, _>>();
        rows.map_err(|e| Failed::Query(format!("an unexpected answer: {e}")))
    });
    if result.is_err() {
        *db = None;
    }
    result
}

/// One sample of the statement statistics, connecting first (as `user`, set from the Secret) when `db` is not open
/// for `s` or its Secret changed; the texts of statements not seen before are read and their tables kept in
/// `statements` (forgetting statements the server no longer counts).
pub async fn sample(
    ctx: &Context,
    ns: &str,
    engine: MonitoredEngine,
    s: &DatabaseStatistics,
    db: &mut Option<Db>,
    user: &mut Option<String>,
    statements: &mut Statements,
) -> Result<Sample, Failed> {
    if let Some(d) = db.as_mut()
        && d.checked.elapsed() >= SECRET_RECHECK
    {
        let now = secret_version(ctx, ns, s).await?;
        if now.as_deref() != Some(d.secret_version.as_str()) {
            *db = None;
        } else {
            d.checked = Instant::now();
        }
    }
    let mut fresh = false;
    if db.as_ref().is_none_or(|d| d.conn.is_closed() || &d.of != s) {
        *db = None;
        let settings = settings(ctx, ns, engine, s).await?;
        *user = Some(settings.user.clone());
        let conn = connect(&settings).await.map_err(|e| with_fix(engine, e))?;
        *db = Some(Db { conn, of: s.clone(), secret_version: settings.version, checked: Instant::now() });
        fresh = true;
    }
    let counts = match engine {
        MonitoredEngine::Postgres => sample_postgres(db, &mut statements.postgres).await.map(Counts::Postgres),
        MonitoredEngine::Mysql => sample_mariadb(db, &mut statements.mariadb).await,
    };
    let counts = counts.map_err(|e| with_fix(engine, e))?;
    // MariaDB's audit events carry their client's host. The sessions are a help, not the sample: a failure leaves
    // the statements unplaced (the connection is made again next time).
    let sessions = match engine {
        MonitoredEngine::Postgres => match query(db, SESSIONS, &[]).await {
            Ok(rows) => rows.iter().filter_map(session).collect(),
            Err(e) => {
                tracing::warn!(error = ?e, "pg_stat_activity could not be read: sessions not placed");
                vec![]
            }
        },
        MonitoredEngine::Mysql => vec![],
    };
    Ok(Sample { counts, fresh, sessions })
}

/// A row of [`SESSIONS`].
fn session(r: &tokio_postgres::Row) -> Option<crate::monitor::sessions::Sampled> {
    let since = r.get::<_, Option<f64>>(3)?;
    let since = jiff::Timestamp::from_nanosecond((since * 1e9) as i128).ok()?;
    Some((r.get::<_, i32>(0) as u64, r.get::<_, String>(1), r.get::<_, Option<String>>(2)?, since))
}

/// A query's failure with what to check on the server.
fn with_fix(engine: MonitoredEngine, e: Failed) -> Failed {
    match (engine, e) {
        (MonitoredEngine::Postgres, Failed::Query(m)) => Failed::Query(format!(
            "pg_stat_statements could not be read: {m} (CREATE EXTENSION pg_stat_statements in the Secret's database, \
             shared_preload_libraries with it, GRANT pg_read_all_stats to the role)"
        )),
        (MonitoredEngine::Mysql, Failed::Query(m)) => Failed::Query(format!(
            "performance_schema could not be read: {m} (performance_schema=ON in the server's settings, then a \
             restart; GRANT SELECT ON performance_schema.* to the role)"
        )),
        (_, other) => other,
    }
}

async fn sample_postgres(
    db: &mut Option<Db>,
    statements: &mut HashMap<i64, Statement>,
) -> Result<Vec<Counted>, Failed> {
    let rows = query(db, SAMPLE, &[]).await?;
    let counted: Vec<Counted> = rows
        .iter()
        .map(|r| Counted {
            userid: r.get(0),
            user: r.get::<_, Option<String>>(1).unwrap_or_default(),
            queryid: r.get(2),
            calls: r.get(3),
            rows: r.get(4),
        })
        .collect();
    let live: std::collections::HashSet<i64> = counted.iter().map(|c| c.queryid).collect();
    statements.retain(|q, _| live.contains(q));
    let new: Vec<i64> = live.iter().copied().filter(|q| !statements.contains_key(q)).collect();
    if !new.is_empty() {
        for r in query(db, TEXTS, &[&new]).await? {
            let text: Option<String> = r.get(1);
            statements.insert(r.get(0), text.map(|t| statement(&t)).unwrap_or_default());
        }
        // Statements whose text was not asked for (not reads) are known as such: not asked again.
        for q in new {
            statements.entry(q).or_default();
        }
    }
    Ok(counted)
}

async fn sample_mariadb(
    db: &mut Option<Db>,
    statements: &mut HashMap<(String, String), Statement>,
) -> Result<Counts, Failed> {
    let lower = matches!(db.as_ref().map(|d| &d.conn), Some(Conn::Mariadb(_, true)));
    let rows: Vec<(String, String, String, i64, i64)> = query_mariadb(db, MARIADB_SAMPLE, vec![]).await?;
    let (mut digests, mut users) = (Vec::new(), Vec::new());
    for (kind, name, digest, calls, rows) in rows {
        if kind == "d" {
            digests.push(DigestCounted { schema: name, digest, calls, rows });
        } else {
            users.push(UserCounted { user: name, calls, rows });
        }
    }
    let live: std::collections::HashSet<(String, String)> =
        digests.iter().map(|c| (c.schema.clone(), c.digest.clone())).collect();
    statements.retain(|k, _| live.contains(k));
    let new: Vec<&(String, String)> = live.iter().filter(|k| !statements.contains_key(*k)).collect();
    let asked: std::collections::BTreeSet<&str> =
        new.iter().map(|(_, d)| d.as_str()).filter(|d| !d.is_empty()).collect();
    let mut found: HashMap<(String, String), Statement> = HashMap::new();
    let asked: Vec<&str> = asked.into_iter().collect();
    for chunk in asked.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let params = chunk.iter().map(|d| mysql_async::Value::from(*d)).collect();
        let texts: Vec<(String, String, String)> =
            query_mariadb(db, &MARIADB_TEXTS.replace("{}", &marks), params).await?;
        for (schema, digest, text) in texts {
            let default = (!schema.is_empty()).then_some(schema.as_str());
            let mut st = statement_in(&text, default);
            if lower {
                st.tables = st.tables.iter().map(|t| t.to_lowercase()).collect();
            }
            // A text cut at performance_schema_max_digest_length may name more tables than it shows.
            if text.trim_end().ends_with("...") {
                st.tables.push(ANY_TABLE.into());
            }
            found.insert((schema, digest), st);
        }
    }
    for k in new {
        let st = if k.1.is_empty() {
            // The statements the server had no room left for (performance_schema_digests_size): any table.
            Statement { read: true, tables: vec![ANY_TABLE.into()] }
        } else {
            found.remove(k).unwrap_or_default()
        };
        statements.insert(k.clone(), st);
    }
    Ok(Counts::Mariadb { digests, users })
}

/// TLS through rustls: the server's certificate checked against one CA and the host's name.
struct Rustls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Rustls {
    fn new(host: &str, ca_pem: &str) -> Result<Rustls, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("the Secret's ca.crt is not PEM: {e}"))?;
            roots.add(cert).map_err(|e| format!("the Secret's ca.crt holds an unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the Secret's ca.crt holds no certificate".into());
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("the Secret's host {host:?} is no server name: {e}"))?;
        Ok(Rustls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }
}

impl TlsConnect<TcpStream> for Rustls {
    type Stream = TlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TlsStream>> + Send>>;

    fn connect(self, stream: TcpStream) -> Self::Future {
        Box::pin(async move { self.connector.connect(self.name, stream).await.map(|s| TlsStream(Box::new(s))) })
    }
}

/// The TLS stream a connection runs over.
pub struct TlsStream(Box<tokio_rustls::client::TlsStream<TcpStream>>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}
