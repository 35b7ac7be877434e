//! The database side: connection settings (credentials from the job's environment or from Vault), the dump and
//! restore tools as child processes, and per-table row counts.
//!
//! PostgreSQL: the row counts and `pg_dump` see the same data. A `psql` session opens a REPEATABLE READ
//! transaction, exports its snapshot, counts the rows of every table in it and stays open while
//! `pg_dump --snapshot` dumps exactly that snapshot.
//!
//! `process`: the tools as child processes; `sql`: SQL sessions (snapshot, row counts, databases); `checks`: the
//! checks of a dump stream as it passes (archive structure, completeness, MySQL row counts).

mod checks;
mod process;
mod sql;

pub use checks::{DumpTail, MysqlRowCounter, StreamChecks, start_archive_check};
pub use process::{StderrTail, Tool, start_dump, start_restore};
pub use sql::{PgSnapshot, check_reachable, count_rows, ensure_database, recreate_database, run_sql};

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

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
