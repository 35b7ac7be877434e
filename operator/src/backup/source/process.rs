//! The dump and restore tools as child processes.

use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::*;

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
    pub(super) fn spawn(
        mut cmd: Command,
        program: &str,
        stdin: bool,
        stdout: bool,
        conn: &DbConn,
    ) -> Result<Tool, SourceError> {
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
