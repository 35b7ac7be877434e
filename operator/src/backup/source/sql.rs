//! SQL sessions with the engine's client: the snapshot the dump and the row counts share, row counts, and
//! the target databases of a restore.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Stdio};

use super::*;

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
