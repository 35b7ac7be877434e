//! Checks of a dump stream as it passes: the archive's structure, its completeness, MySQL row counts.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{ChildStdin, Command};

use super::*;

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
