//! `spec.database.statistics`: a monitoring role's connection to the database (from its Secret, kept open between
//! reads) and one sample of `pg_stat_statements` per read, of the connection's database only. Statement texts are
//! asked for only for reads the server normalized (its literals replaced by `$1`, ...: SELECT, VALUES, TABLE, WITH)
//! and, of `COPY x TO`, only the table's name: utility statements keep their literals (a `CREATE ROLE ... PASSWORD`
//! too), so their texts are never fetched. Only the tables a statement reads are kept.

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

use crate::api::access_monitor::{DatabaseStatistics, SslMode};
use crate::controllers::contract::Context;
use crate::monitor::statistics::{Counted, Statement, statement};

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

/// An open connection, for the spec and the Secret's version it was made with.
#[derive(Clone, Debug)]
pub struct Db {
    client: Arc<tokio_postgres::Client>,
    of: DatabaseStatistics,
    secret_version: String,
    checked: Instant,
}

/// A sample: the counters, and whether the connection is new (its counters are not to be compared with another
/// connection's: a failover, another host).
#[derive(Debug)]
pub struct Sample {
    pub counted: Vec<Counted>,
    pub fresh: bool,
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
    config: tokio_postgres::Config,
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
async fn settings(ctx: &Context, ns: &str, s: &DatabaseStatistics) -> Result<Settings, Failed> {
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
        None => 5432,
    };
    let user = need("username")?;
    let mut config = tokio_postgres::Config::new();
    config
        .user(&user)
        .password(need("password")?)
        .dbname(get("dbname").unwrap_or_else(|| "postgres".into()))
        .application_name("crmguard-access-monitor")
        // pg_stat_statements is looked up in the extension's usual schema, not one the role's search_path adds.
        .options("-c search_path=public");
    let ca = match s.ssl_mode {
        SslMode::Disable => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
        SslMode::VerifyFull => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(get("ca.crt").ok_or_else(|| {
                Failed::Secret(format!(
                    "Secret {} has no key \"ca.crt\": sslMode verify-full checks the server's certificate against it",
                    s.secret_name
                ))
            })?)
        }
    };
    Ok(Settings { config, host, port, ca, version, user })
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

/// Logs in over `tcp` with `tls`; the connection is driven by a task of its own.
async fn login<T>(config: &tokio_postgres::Config, tcp: TcpStream, tls: T) -> Result<tokio_postgres::Client, Failed>
where
    T: TlsConnect<TcpStream>,
    T::Stream: Send + 'static,
{
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect_raw(tcp, tls))
        .await
        .map_err(|_| Failed::Connect(format!("no login within {}s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| Failed::Connect(chain(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects as `s` says: TCP, then TLS when the CA is given.
async fn connect(s: &Settings) -> Result<tokio_postgres::Client, Failed> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((s.host.as_str(), s.port)))
        .await
        .map_err(|_| Failed::Connect(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| Failed::Connect(e.to_string()))?;
    match &s.ca {
        None => login(&s.config, tcp, tokio_postgres::NoTls).await,
        Some(pem) => login(&s.config, tcp, Rustls::new(&s.host, pem).map_err(Failed::Secret)?).await,
    }
}

/// A query on `db`'s connection within [`QUERY_TIMEOUT`]; a failure or timeout drops the connection (the next
/// sample connects again).
async fn query(
    db: &mut Option<Db>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, Failed> {
    let Some(d) = db.as_ref() else { return Err(Failed::Connect("not connected".into())) };
    let result = tokio::time::timeout(QUERY_TIMEOUT, d.client.query(sql, params)).await;
    let failed = match result {
        Ok(Ok(rows)) => return Ok(rows),
        Ok(Err(e)) => Failed::Query(e.as_db_error().map_or_else(|| chain(&e), |d| d.message().to_string())),
        Err(_) => Failed::Timeout(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())),
    };
    *db = None;
    Err(failed)
}

/// One sample of `pg_stat_statements`, connecting first (as `user`, set from the Secret) when `db` is not open for
/// `s` or its Secret changed; the texts of statements not seen before are read and their tables kept in
/// `statements` (forgetting statements the view no longer has).
pub async fn sample(
    ctx: &Context,
    ns: &str,
    s: &DatabaseStatistics,
    db: &mut Option<Db>,
    user: &mut Option<String>,
    statements: &mut HashMap<i64, Statement>,
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
    if db.as_ref().is_none_or(|d| d.client.is_closed() || &d.of != s) {
        *db = None;
        let settings = settings(ctx, ns, s).await?;
        *user = Some(settings.user.clone());
        let client = connect(&settings).await?;
        *db = Some(Db {
            client: Arc::new(client),
            of: s.clone(),
            secret_version: settings.version,
            checked: Instant::now(),
        });
        fresh = true;
    }
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
    Ok(Sample { counted, fresh })
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
