//! The database side: connection settings (credentials from the job's environment or from Vault), the dump and
//! restore tools as child processes, and per-table row counts.
//!
//! PostgreSQL: the row counts and `pg_dump` see the same data. A `psql` session opens a REPEATABLE READ
//! transaction, exports its snapshot, counts the rows of every table in it and stays open while
//! `pg_dump --snapshot` dumps exactly that snapshot.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::pgarchive::{Feed, PgArchiveCheck};
use crate::api::backup_policy::{Engine, TlsMode};
use crate::api::common::DatabaseCredentials;
use crate::vault::{VaultError, describe};

/// What can go wrong on the database side.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot start {program}: {message} (is it installed and on PATH? set CRMGUARD_DB_BIN_DIR to its directory)"
    )]
    Spawn { program: String, message: String },
    #[error("{program} failed ({status}): {stderr}")]
    Failed { program: String, status: String, stderr: String },
    #[error("database credentials: {0}")]
    Credentials(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Protocol(String),
}

/// How to reach one database.
#[derive(Clone)]
pub struct DbConn {
    pub engine: Engine,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub username: String,
    password: Option<String>,
    pub tls_mode: TlsMode,
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for DbConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConn")
            .field("engine", &self.engine)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_mode", &self.tls_mode)
            .finish()
    }
}

/// Directory of the database tools, when not on PATH.
fn program(name: &str) -> String {
    match std::env::var("CRMGUARD_DB_BIN_DIR") {
        Ok(dir) if !dir.is_empty() => format!("{}/{name}", dir.trim_end_matches('/')),
        _ => name.to_string(),
    }
}

impl DbConn {
    /// A connection with explicit credentials.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Engine,
        host: &str,
        port: u16,
        database: &str,
        username: &str,
        password: Option<String>,
        tls_mode: TlsMode,
        ca_file: Option<PathBuf>,
    ) -> Self {
        DbConn {
            engine,
            host: host.to_string(),
            port,
            database: database.to_string(),
            username: username.to_string(),
            password,
            tls_mode,
            ca_file,
        }
    }

    /// Resolves credentials as the job sees them: `CRMGUARD_DB_USERNAME`/`CRMGUARD_DB_PASSWORD` (from the
    /// policy's Secret) or a Vault read (dynamic database credentials or KV v2).
    pub async fn resolve_credentials(
        creds: &DatabaseCredentials,
        env_prefix: &str,
    ) -> Result<(String, Option<String>), SourceError> {
        if let Some(v) = &creds.vault {
            let client = crate::vault::login(&v.auth_mount, &v.auth_role).await?;
            let path = v.path.trim_matches('/');
            if let Some((mount, role)) = path.split_once("/creds/") {
                let c = vaultrs::database::role::creds(&client, mount, role)
                    .await
                    .map_err(|e| VaultError::Request { op: format!("read {path}"), message: describe(&e) })?;
                return Ok((c.username, Some(c.password)));
            }
            if let Some((mount, rest)) = path.split_once("/data/") {
                let data: std::collections::HashMap<String, String> = vaultrs::kv2::read(&client, mount, rest)
                    .await
                    .map_err(|e| VaultError::Request { op: format!("read {path}"), message: describe(&e) })?;
                let user = data
                    .get("username")
                    .cloned()
                    .ok_or_else(|| SourceError::Credentials(format!("Vault secret {path} has no key `username`")))?;
                return Ok((user, data.get("password").cloned()));
            }
            return Err(SourceError::Credentials(format!(
                "Vault path {path:?} is neither a database secrets engine path (<mount>/creds/<role>) nor a KV v2 \
                 path (<mount>/data/<path>)"
            )));
        }
        let user = std::env::var(format!("{env_prefix}_USERNAME")).map_err(|_| {
            SourceError::Credentials(format!(
                "{env_prefix}_USERNAME is not set (the job sets it from credentials.secretRef; outside Kubernetes \
                 export it yourself)"
            ))
        })?;
        Ok((user, std::env::var(format!("{env_prefix}_PASSWORD")).ok().filter(|p| !p.is_empty())))
    }

    /// The same server, another database.
    pub fn with_database(&self, database: &str) -> DbConn {
        DbConn { database: database.to_string(), ..self.clone() }
    }

    /// Another server and database, same credentials.
    pub fn with_target(&self, host: &str, port: u16, database: &str) -> DbConn {
        DbConn { host: host.to_string(), port, database: database.to_string(), ..self.clone() }
    }

    /// A command for a PostgreSQL tool, with the connection in the environment (never on the command line).
    fn pg(&self, tool: &str, database: &str) -> Command {
        let mut c = Command::new(program(tool));
        c.env("PGHOST", &self.host)
            .env("PGPORT", self.port.to_string())
            .env("PGDATABASE", database)
            .env("PGUSER", &self.username)
            .env("PGAPPNAME", "crmguard")
            .env("PGCONNECT_TIMEOUT", "15")
            .env(
                "PGSSLMODE",
                match self.tls_mode {
                    TlsMode::Disable => "disable",
                    TlsMode::Prefer => "prefer",
                    TlsMode::Require => "require",
                    TlsMode::VerifyCa => "verify-ca",
                    TlsMode::VerifyFull => "verify-full",
                },
            )
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        if let Some(p) = &self.password {
            c.env("PGPASSWORD", p);
        }
        if let Some(ca) = &self.ca_file {
            c.env("PGSSLROOTCERT", ca);
        }
        c
    }

    /// A command for a MySQL/MariaDB tool. The password goes through `MYSQL_PWD` (never the command line).
    fn my(&self, tool: &str) -> Command {
        let mut c = Command::new(program(tool));
        c.arg("--no-defaults")
            .arg(format!("--host={}", self.host))
            .arg(format!("--port={}", self.port))
            .arg("--protocol=TCP")
            .arg(format!("--user={}", self.username));
        let ssl = match self.tls_mode {
            TlsMode::Disable => "--skip-ssl".to_string(),
            TlsMode::Prefer => String::new(),
            TlsMode::Require => "--ssl".to_string(),
            TlsMode::VerifyCa | TlsMode::VerifyFull => "--ssl-verify-server-cert".to_string(),
        };
        if !ssl.is_empty() {
            c.arg(ssl);
        }
        if let Some(ca) = &self.ca_file {
            c.arg(format!("--ssl-ca={}", ca.display()));
        }
        c.env_remove("MYSQL_PWD");
        if let Some(p) = &self.password {
            c.env("MYSQL_PWD", p);
        }
        c
    }

    /// Removes the password from text that came back from a tool, in case a tool ever echoes it.
    pub fn redact(&self, text: &str) -> String {
        match &self.password {
            Some(p) if p.len() >= 4 => text.replace(p.as_str(), "<redacted>"),
            _ => text.to_string(),
        }
    }

    /// Version line of the dump tool.
    pub fn dump_tool_version(&self) -> String {
        let tool = match self.engine {
            Engine::Postgres => "pg_dump",
            Engine::Mysql => "mysqldump",
        };
        // Read at most one short line: this goes into the manifest, whatever the tool prints.
        let first_line = || -> Option<String> {
            let mut child = Command::new(program(tool))
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let mut buf = vec![0u8; 200];
            let n = child.stdout.take().map(|mut o| o.read(&mut buf).unwrap_or(0)).unwrap_or(0);
            let _ = child.kill();
            let _ = child.wait();
            let text = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().trim().to_string();
            (!text.is_empty()).then_some(text)
        };
        first_line().unwrap_or_else(|| format!("{tool} (version unknown)"))
    }
}

/// The last bytes a child wrote to stderr, collected by a thread.
#[derive(Clone, Debug, Default)]
pub struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    const MAX: usize = 16 * 1024;

    fn collect(child: &mut Child) -> StderrTail {
        let tail = StderrTail::default();
        if let Some(mut err) = child.stderr.take() {
            let t = tail.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut v) = t.0.lock() {
                        v.extend_from_slice(&buf[..n]);
                        let excess = v.len().saturating_sub(Self::MAX);
                        v.drain(..excess);
                    }
                }
            });
        }
        tail
    }

    /// The collected text.
    pub fn text(&self) -> String {
        self.0.lock().map(|v| String::from_utf8_lossy(&v).trim().to_string()).unwrap_or_default()
    }
}

/// A running child process whose stdout is read (dump) or whose stdin is written (restore).
#[derive(Debug)]
pub struct Tool {
    pub program: String,
    child: Child,
    stderr: StderrTail,
    redact: Option<DbConn>,
}

impl Tool {
    fn spawn(mut cmd: Command, program: &str, stdin: bool, stdout: bool, conn: &DbConn) -> Result<Tool, SourceError> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(if stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped());
        let mut child =
            cmd.spawn().map_err(|e| SourceError::Spawn { program: program.to_string(), message: e.to_string() })?;
        let stderr = StderrTail::collect(&mut child);
        Ok(Tool { program: program.to_string(), child, stderr, redact: Some(conn.clone()) })
    }

    /// The child's stdout (once).
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stdin (once).
    pub fn stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Stops the child (used when the other side of the pipeline failed).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child; anything but exit status 0 is an error carrying the end of its stderr.
    pub fn finish(mut self) -> Result<String, SourceError> {
        drop(self.child.stdin.take());
        let status = self
            .child
            .wait()
            .map_err(|e| SourceError::Spawn { program: self.program.clone(), message: e.to_string() })?;
        // Give the stderr thread a moment to drain the pipe after exit.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let stderr = self.stderr.text();
        let stderr = self.redact.as_ref().map(|c| c.redact(&stderr)).unwrap_or(stderr);
        if status.success() {
            Ok(stderr)
        } else {
            let status = match status.code() {
                Some(code) => format!("exit status {code}"),
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    format!("killed by signal {}", status.signal().unwrap_or(0))
                }
            };
            Err(SourceError::Failed {
                program: self.program,
                status,
                stderr: if stderr.is_empty() { "no error output".into() } else { stderr },
            })
        }
    }
}

/// SQL that counts the rows of every ordinary and partitioned table, one `schema.table<US>count` line each.
const PG_COUNT_ROWS: &str = "SELECT n.nspname || '.' || c.relname, \
    (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text \
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
    ORDER BY 1;";

/// SQL for MySQL/MariaDB: the base tables of the current database (counted one by one afterwards).
const MY_LIST_TABLES: &str = "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' ORDER BY 1;";

const END_MARKER: &str = "__crmguard_end__";
const SEP: char = '\u{1f}';

/// An open `psql` session holding an exported snapshot.
#[derive(Debug)]
pub struct PgSnapshot {
    tool: Option<Tool>,
    stdin: ChildStdin,
    lines: BufReader<ChildStdout>,
    pub id: String,
}

impl PgSnapshot {
    /// Opens the session, exports the snapshot.
    pub fn open(conn: &DbConn) -> Result<PgSnapshot, SourceError> {
        let mut cmd = conn.pg("psql", &conn.database);
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F"]).arg(SEP.to_string());
        let mut tool = Tool::spawn(cmd, "psql", true, true, conn)?;
        let stdin = tool.stdin().ok_or_else(|| SourceError::Protocol("psql has no stdin".into()))?;
        let stdout = tool.stdout().ok_or_else(|| SourceError::Protocol("psql has no stdout".into()))?;
        let mut s = PgSnapshot { tool: Some(tool), stdin, lines: BufReader::new(stdout), id: String::new() };
        let lines = s.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\nSELECT pg_export_snapshot();")?;
        s.id = lines.into_iter().next().ok_or_else(|| SourceError::Protocol("no snapshot id".into()))?;
        Ok(s)
    }

    fn query(&mut self, sql: &str) -> Result<Vec<String>, SourceError> {
        let sent = self.send(sql);
        self.read_until_marker(sent.is_ok())
    }

    fn send(&mut self, sql: &str) -> std::io::Result<()> {
        writeln!(self.stdin, "{sql}\n\\echo {END_MARKER}").and_then(|_| self.stdin.flush())
    }

    fn read_until_marker(&mut self, sent: bool) -> Result<Vec<String>, SourceError> {
        let sent: Result<(), ()> = if sent { Ok(()) } else { Err(()) };
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = if sent.is_ok() { self.lines.read_line(&mut line).unwrap_or(0) } else { 0 };
            if n == 0 {
                // psql ended: report why.
                return Err(match self.tool.take().map(Tool::finish) {
                    Some(Err(e)) => e,
                    _ => SourceError::Protocol("psql ended unexpectedly".into()),
                });
            }
            let l = line.trim_end_matches(['\n', '\r']);
            if l == END_MARKER {
                return Ok(out);
            }
            if !l.is_empty() {
                out.push(l.to_string());
            }
        }
    }

    /// Rows per table in the snapshot.
    pub fn count_rows(&mut self) -> Result<BTreeMap<String, u64>, SourceError> {
        parse_counts(self.query(PG_COUNT_ROWS)?)
    }

    /// Starts counting rows in the snapshot (the server works while the caller streams the dump).
    pub fn send_count_rows(&mut self) -> Result<(), SourceError> {
        self.send(PG_COUNT_ROWS).map_err(|e| SourceError::Protocol(format!("psql: {e}")))
    }

    /// The result of [`PgSnapshot::send_count_rows`].
    pub fn read_count_rows(&mut self) -> Result<BTreeMap<String, u64>, SourceError> {
        parse_counts(self.read_until_marker(true)?)
    }

    /// Ends the transaction and the session.
    pub fn close(mut self) -> Result<(), SourceError> {
        let _ = writeln!(self.stdin, "COMMIT;\n\\q");
        drop(self.stdin);
        match self.tool.take() {
            Some(t) => t.finish().map(|_| ()),
            None => Ok(()),
        }
    }
}

fn parse_counts(lines: Vec<String>) -> Result<BTreeMap<String, u64>, SourceError> {
    lines
        .into_iter()
        .map(|l| {
            let (t, c) = l.split_once(SEP).ok_or_else(|| SourceError::Protocol(format!("unexpected row {l:?}")))?;
            let n = c.trim().parse::<u64>().map_err(|_| SourceError::Protocol(format!("bad count in {l:?}")))?;
            Ok((t.to_string(), n))
        })
        .collect()
}

/// Starts the dump. For PostgreSQL, of the snapshot `snapshot`.
pub fn start_dump(conn: &DbConn, snapshot: Option<&str>) -> Result<Tool, SourceError> {
    match conn.engine {
        Engine::Postgres => {
            let mut cmd = conn.pg("pg_dump", &conn.database);
            // Custom format (restorable selectively, with --clean), uncompressed: zstd compresses better and faster.
            cmd.args(["--format=custom", "--compress=0", "--no-password"]);
            if let Some(s) = snapshot {
                cmd.arg(format!("--snapshot={s}"));
            }
            Tool::spawn(cmd, "pg_dump", false, true, conn)
        }
        Engine::Mysql => {
            let mut cmd = conn.my("mysqldump");
            cmd.args([
                "--single-transaction",
                "--quick",
                "--routines",
                "--triggers",
                "--events",
                "--hex-blob",
                "--default-character-set=utf8mb4",
                "--skip-lock-tables",
            ]);
            cmd.arg(&conn.database);
            Tool::spawn(cmd, "mysqldump", false, true, conn)
        }
    }
}

/// Runs a SQL script with the engine's client and returns its output lines.
pub fn run_sql(conn: &DbConn, database: &str, vars: &[(&str, &str)], sql: &str) -> Result<Vec<String>, SourceError> {
    let (mut cmd, program) = match conn.engine {
        Engine::Postgres => {
            let mut c = conn.pg("psql", database);
            c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F"]).arg(SEP.to_string());
            for (k, v) in vars {
                c.arg("-v").arg(format!("{k}={v}"));
            }
            (c, "psql")
        }
        Engine::Mysql => {
            let mut c = conn.my("mysql");
            c.args(["--batch", "--skip-column-names", "--raw"]);
            if !database.is_empty() {
                c.arg(database);
            }
            (c, "mysql")
        }
    };
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| SourceError::Spawn { program: program.into(), message: e.to_string() })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(sql.as_bytes());
    }
    let out =
        child.wait_with_output().map_err(|e| SourceError::Spawn { program: program.into(), message: e.to_string() })?;
    if !out.status.success() {
        return Err(SourceError::Failed {
            program: program.into(),
            status: format!("{}", out.status),
            stderr: conn.redact(String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// Quotes a MySQL identifier.
fn my_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Rows per table of a database, counted now (used after a restore, and for MySQL at backup time).
pub fn count_rows(conn: &DbConn, database: &str) -> Result<BTreeMap<String, u64>, SourceError> {
    match conn.engine {
        Engine::Postgres => parse_counts(run_sql(conn, database, &[], PG_COUNT_ROWS)?),
        Engine::Mysql => {
            let tables = run_sql(conn, database, &[], MY_LIST_TABLES)?;
            if tables.is_empty() {
                return Ok(BTreeMap::new());
            }
            let sql: Vec<String> = tables
                .iter()
                .map(|t| format!("SELECT '{}', COUNT(*) FROM {};", t.replace('\'', "''"), my_ident(t)))
                .collect();
            let lines = run_sql(conn, database, &[], &sql.join("\n"))?;
            lines
                .into_iter()
                .map(|l| {
                    let (t, c) =
                        l.split_once('\t').ok_or_else(|| SourceError::Protocol(format!("unexpected row {l:?}")))?;
                    let n =
                        c.trim().parse::<u64>().map_err(|_| SourceError::Protocol(format!("bad count in {l:?}")))?;
                    Ok((format!("{database}.{t}"), n))
                })
                .collect()
        }
    }
}

/// Connects and runs `SELECT 1`: to the server's maintenance database when the target database is to be
/// created, else to the target database itself.
pub fn check_reachable(conn: &DbConn, maintenance: bool) -> Result<(), SourceError> {
    let database = match (conn.engine, maintenance) {
        (Engine::Postgres, true) => "postgres",
        (Engine::Mysql, true) => "",
        (_, false) => conn.database.as_str(),
    };
    run_sql(conn, database, &[], "SELECT 1;").map(drop)
}

/// Creates `database` on the server when it does not exist. Returns whether it was created.
pub fn ensure_database(conn: &DbConn, database: &str) -> Result<bool, SourceError> {
    match conn.engine {
        Engine::Postgres => {
            let exists =
                run_sql(conn, "postgres", &[("db", database)], "SELECT 1 FROM pg_database WHERE datname = :'db';")?;
            if !exists.is_empty() {
                return Ok(false);
            }
            run_sql(conn, "postgres", &[("db", database)], "CREATE DATABASE :\"db\";")?;
            Ok(true)
        }
        Engine::Mysql => {
            let exists = run_sql(
                conn,
                "",
                &[],
                &format!(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = '{}';",
                    database.replace('\'', "''")
                ),
            )?;
            if !exists.is_empty() {
                return Ok(false);
            }
            run_sql(conn, "", &[], &format!("CREATE DATABASE {};", my_ident(database)))?;
            Ok(true)
        }
    }
}

/// Drops and re-creates `database` (restore drills into a scratch database).
pub fn recreate_database(conn: &DbConn, database: &str) -> Result<(), SourceError> {
    match conn.engine {
        Engine::Postgres => {
            run_sql(conn, "postgres", &[("db", database)], "DROP DATABASE IF EXISTS :\"db\" WITH (FORCE);")?;
            run_sql(conn, "postgres", &[("db", database)], "CREATE DATABASE :\"db\";")?;
        }
        Engine::Mysql => {
            run_sql(conn, "", &[], &format!("DROP DATABASE IF EXISTS {0}; CREATE DATABASE {0};", my_ident(database)))?;
        }
    }
    Ok(())
}

/// Starts `pg_restore --file=/dev/null`, which reads a whole custom-format archive from stdin without a database
/// and fails on a truncated or damaged one: the check for archive versions the built-in one does not know.
pub fn start_archive_check(conn: &DbConn) -> Result<Option<Tool>, SourceError> {
    match conn.engine {
        Engine::Postgres => {
            let mut cmd = Command::new(program("pg_restore"));
            cmd.args(["--file=/dev/null"]);
            Tool::spawn(cmd, "pg_restore (archive check)", true, false, conn).map(Some)
        }
        Engine::Mysql => Ok(None),
    }
}

/// How a PostgreSQL archive is checked as it passes.
#[derive(Debug)]
enum ArchiveCheck {
    /// In this process: the archive's structure, every data block present once (see `pgarchive`).
    Parse(Box<PgArchiveCheck>),
    /// `pg_restore --file=/dev/null`, for archive versions the parser does not know.
    Tool(Tool, Option<ChildStdin>),
}

/// Checks on the raw dump stream as it passes: a PostgreSQL archive must be complete (every block of its table
/// of contents, nothing cut; see [`PgArchiveCheck`]), a mysqldump must end with its completion line, and MySQL
/// rows are counted.
#[derive(Debug)]
pub struct StreamChecks {
    conn: Option<DbConn>,
    archive: Option<ArchiveCheck>,
    archive_error: Option<String>,
    tail: Option<DumpTail>,
    counter: Option<MysqlRowCounter>,
    counts: BTreeMap<String, u64>,
}

impl StreamChecks {
    /// Starts the checks for the engine of `conn`.
    pub fn start(conn: &DbConn) -> Result<StreamChecks, SourceError> {
        let mysql = conn.engine == Engine::Mysql;
        Ok(StreamChecks {
            conn: Some(conn.clone()),
            archive: (!mysql).then(|| ArchiveCheck::Parse(Box::default())),
            archive_error: None,
            tail: mysql.then(DumpTail::default),
            counter: mysql.then(|| MysqlRowCounter::new(&conn.database)),
            counts: BTreeMap::new(),
        })
    }

    /// Only counts (the result after `finish`).
    pub fn counted(counts: BTreeMap<String, u64>) -> StreamChecks {
        StreamChecks { conn: None, archive: None, archive_error: None, tail: None, counter: None, counts }
    }

    /// The counts.
    pub fn into_counts(self) -> BTreeMap<String, u64> {
        self.counts
    }

    /// Feeds raw dump bytes. A check that fails is remembered and reported by `finish`.
    pub fn feed(&mut self, data: &[u8]) {
        // An archive version the parser does not know goes to pg_restore, starting with every byte seen so far.
        let mut handed = None;
        if let Some(ArchiveCheck::Parse(p)) = &mut self.archive
            && let Feed::Unsupported { version, prefix } = p.feed(data)
        {
            tracing::info!(version, "pg_dump archive version unknown to the built-in check: pg_restore checks it");
            self.archive = self.start_pg_restore();
            handed = Some(prefix);
        }
        if let Some(ArchiveCheck::Tool(_, stdin)) = &mut self.archive
            && let Some(s) = stdin
            && let Err(e) = s.write_all(handed.as_deref().unwrap_or(data))
        {
            self.archive_error.get_or_insert_with(|| format!("pg_restore stopped reading: {e}"));
            *stdin = None;
        }
        if let Some(t) = &mut self.tail {
            let _ = t.write_all(data);
        }
        if let Some(c) = &mut self.counter {
            c.feed(data);
        }
    }

    /// Starts `pg_restore --file=/dev/null` as the archive check; a failure to start is the check's error.
    fn start_pg_restore(&mut self) -> Option<ArchiveCheck> {
        match self.conn.as_ref().map(start_archive_check) {
            Some(Ok(Some(mut tool))) => {
                let stdin = tool.stdin();
                Some(ArchiveCheck::Tool(tool, stdin))
            }
            Some(Err(e)) => {
                self.archive_error.get_or_insert_with(|| format!("could not start pg_restore to check the dump: {e}"));
                None
            }
            Some(Ok(None)) | None => None,
        }
    }

    /// The verdict: MySQL row counts (empty for PostgreSQL) or why the dump is not complete.
    pub fn finish(mut self) -> Result<BTreeMap<String, u64>, String> {
        match self.archive.take() {
            Some(ArchiveCheck::Parse(p)) => {
                let summary = p.finish().map_err(|e| format!("the dump is not a complete pg_dump archive: {e}"))?;
                tracing::debug!(
                    version = summary.version,
                    entries = summary.toc_entries,
                    blocks = summary.data_blocks,
                    "pg_dump archive complete"
                );
            }
            Some(ArchiveCheck::Tool(tool, stdin)) => {
                drop(stdin);
                if let Err(e) = tool.finish() {
                    return Err(format!("the dump is not a complete pg_dump archive: {e}"));
                }
            }
            None => {}
        }
        if let Some(e) = self.archive_error {
            return Err(e);
        }
        if let Some(t) = &self.tail
            && !t.complete()
        {
            return Err("the dump does not end with mysqldump's '-- Dump completed' line: it is incomplete".into());
        }
        Ok(self.counter.map(|c| c.counts()).unwrap_or_default())
    }
}

impl Write for StreamChecks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the last bytes of a stream, to check that a mysqldump ended with its completion line.
#[derive(Debug, Default)]
pub struct DumpTail(pub Vec<u8>);

impl Write for DumpTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        let excess = self.0.len().saturating_sub(512);
        self.0.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DumpTail {
    /// Whether the dump ended with mysqldump's `-- Dump completed` line.
    pub fn complete(&self) -> bool {
        String::from_utf8_lossy(&self.0).lines().rev().take(3).any(|l| l.starts_with("-- Dump completed"))
    }
}

/// Starts the restore tool reading the dump on its stdin.
pub fn start_restore(conn: &DbConn, database: &str, clean: bool) -> Result<Tool, SourceError> {
    match conn.engine {
        Engine::Postgres => {
            let mut cmd = conn.pg("pg_restore", database);
            // Ownership and grants are the AccessPolicy's business, and the original roles may not exist on the
            // target: restore objects owned by the restoring user, without ACLs.
            cmd.args(["--no-owner", "--no-acl", "--exit-on-error", "--no-password", "--single-transaction"]);
            cmd.arg(format!("--dbname={database}"));
            if clean {
                cmd.args(["--clean", "--if-exists"]);
            }
            Tool::spawn(cmd, "pg_restore", true, false, conn)
        }
        Engine::Mysql => {
            let mut cmd = conn.my("mysql");
            cmd.arg("--binary-mode").arg(database);
            Tool::spawn(cmd, "mysql", true, false, conn)
        }
    }
}

/// Counts the rows of every table in a mysqldump stream as it passes: each `INSERT INTO `t` VALUES (...),(...);`
/// statement adds its top-level tuples. The counts describe exactly the dumped snapshot (mysqldump's
/// `--single-transaction`), which a separate `COUNT(*)` session could not guarantee.
#[derive(Debug, Default)]
pub struct MysqlRowCounter {
    database: String,
    counts: BTreeMap<String, u64>,
    /// Bytes of the current line while it may still be an INSERT prefix.
    line: Vec<u8>,
    /// Table of the INSERT being scanned.
    table: Option<String>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The current line is not an INSERT; skip to its end.
    skip_line: bool,
}

const INSERT_PREFIX: &[u8] = b"INSERT INTO `";

impl MysqlRowCounter {
    /// A counter for a dump of `database`; tables are reported as `database.table`.
    pub fn new(database: &str) -> Self {
        MysqlRowCounter { database: database.to_string(), ..Self::default() }
    }

    /// Rows per table seen so far (tables without rows are absent).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.clone()
    }

    /// Feeds bytes of the dump.
    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if let Some(table) = &self.table {
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'\'' {
                        self.in_string = false;
                    }
                    continue;
                }
                match b {
                    b'\'' => self.in_string = true,
                    b'(' => {
                        if self.depth == 0 {
                            *self.counts.entry(table.clone()).or_insert(0) += 1;
                        }
                        self.depth += 1;
                    }
                    b')' => self.depth = self.depth.saturating_sub(1),
                    b';' if self.depth == 0 => {
                        self.table = None;
                        self.skip_line = true;
                    }
                    _ => {}
                }
                continue;
            }
            if b == b'\n' {
                self.line.clear();
                self.skip_line = false;
                continue;
            }
            if self.skip_line {
                continue;
            }
            self.line.push(b);
            let n = self.line.len();
            if n <= INSERT_PREFIX.len() {
                if self.line[..] != INSERT_PREFIX[..n] {
                    self.skip_line = true;
                    self.line.clear();
                }
                continue;
            }
            // Inside the table name: `name` with doubled backticks, then " VALUES" (MariaDB's mysqldump puts a
            // newline after it, MySQL's a space).
            let rest = &self.line[INSERT_PREFIX.len()..];
            if let Some(pos) = rest.windows(8).position(|w| w == b"` VALUES") {
                let name = String::from_utf8_lossy(&rest[..pos]).replace("``", "`");
                self.table = Some(format!("{}.{name}", self.database));
                self.depth = 0;
                self.in_string = false;
                self.escaped = false;
                self.line.clear();
            } else if rest.len() > 1024 {
                self.skip_line = true;
                self.line.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysqldump_rows_are_counted_across_any_split_with_quotes_escapes_and_parentheses_in_values() {
        let dump = b"-- MariaDB dump\n/*!40101 SET NAMES utf8mb4 */;\nCREATE TABLE `contacts` (\n  `id` int(11) NOT NULL,\n  PRIMARY KEY (`id`)\n);\n\
INSERT INTO `contacts` VALUES (1,'Ada (CEO)','it''s'),(2,'semi;colon','back\\\\slash \\' quote'),(3,NULL,0x28DEAD29);\n\
INSERT INTO `contacts` VALUES\n(4,'x','y');\nINSERT INTO `we``ird` VALUES (1),\n(2);\n-- INSERT INTO `contacts` VALUES (99);\n\
CREATE TABLE `empty` (`id` int);\n-- Dump completed on 2026-11-29\n";
        for split in [1, 2, 3, 7, 64, dump.len()] {
            let mut c = MysqlRowCounter::new("crm");
            for piece in dump.chunks(split) {
                c.feed(piece);
            }
            let counts = c.counts();
            assert_eq!(counts.get("crm.contacts"), Some(&4), "split {split}: {counts:?}");
            assert_eq!(counts.get("crm.we`ird"), Some(&2), "split {split}: {counts:?}");
            assert_eq!(counts.len(), 2, "split {split}: {counts:?}");
        }
    }
}
