//! `spec.database.statistics`: a monitoring role's connection to the database (from its Secret, kept open between
//! reads) and one sample of `pg_stat_statements` per read. The statements' texts (normalized by the server: no
//! literal in them) are read once per statement and only the tables they read are kept.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, TlsConnect};

use crate::api::access_monitor::{DatabaseStatistics, SslMode};
use crate::controllers::contract::Context;
use crate::monitor::statistics::{Counted, Statement, statement};

/// How long connecting (TCP, TLS, login) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a sample may take.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// An open connection, for the spec it was made for.
#[derive(Clone, Debug)]
pub struct Db {
    client: Arc<tokio_postgres::Client>,
    of: DatabaseStatistics,
    /// The monitoring role (the Secret's `username`): a known identity of the monitor, expected to read no table.
    pub user: String,
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
}

/// A connection's settings from the Secret `s.secret_name` of `ns`.
async fn config(
    ctx: &Context,
    ns: &str,
    s: &DatabaseStatistics,
) -> Result<(tokio_postgres::Config, Option<String>), Failed> {
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&s.secret_name)
        .await
        .map_err(|e| Failed::Secret(format!("Secret {} could not be read: {e}", s.secret_name)))?
        .ok_or_else(|| Failed::Secret(format!("Secret {} does not exist in namespace {ns}", s.secret_name)))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).trim().to_string()).filter(|v| !v.is_empty());
    let need = |k: &str| {
        get(k).ok_or_else(|| {
            Failed::Secret(format!("Secret {} has no key {k:?} (needed: host, username, password)", s.secret_name))
        })
    };
    let mut c = tokio_postgres::Config::new();
    let host = need("host")?;
    let port = match get("port") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| Failed::Secret(format!("Secret {}: key \"port\" is not a port number", s.secret_name)))?,
        None => 5432,
    };
    c.host(&host)
        .port(port)
        .user(need("username")?)
        .password(need("password")?)
        .dbname(get("dbname").unwrap_or_else(|| "postgres".into()))
        .application_name("crmguard-access-monitor")
        .connect_timeout(CONNECT_TIMEOUT);
    let ca = match s.ssl_mode {
        SslMode::Disable => {
            c.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
        SslMode::VerifyFull => {
            c.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(get("ca.crt").ok_or_else(|| {
                Failed::Secret(format!(
                    "Secret {} has no key \"ca.crt\": sslMode verify-full checks the server's certificate against it",
                    s.secret_name
                ))
            })?)
        }
    };
    Ok((c, ca))
}

/// Connects with `c` over TCP, with TLS when the CA's PEM `ca` is given.
async fn connect(c: &tokio_postgres::Config, ca: Option<String>) -> Result<tokio_postgres::Client, Failed> {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err(Failed::Connect("no host".into())),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| Failed::Connect(format!("{host}:{port} did not answer within {}s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| Failed::Connect(format!("{host}:{port}: {e}")))?;
    let login = |e: tokio_postgres::Error| Failed::Connect(format!("{host}:{port}: {}", chain(&e)));
    let client = match ca {
        None => {
            let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, c.connect_raw(tcp, tokio_postgres::NoTls))
                .await
                .map_err(|_| Failed::Connect(format!("{host}:{port}: no login within {}s", CONNECT_TIMEOUT.as_secs())))?
                .map_err(login)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(pem) => {
            let tls = Rustls::new(&host, &pem).map_err(Failed::Secret)?;
            let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, c.connect_raw(tcp, tls))
                .await
                .map_err(|_| Failed::Connect(format!("{host}:{port}: no login within {}s", CONNECT_TIMEOUT.as_secs())))?
                .map_err(login)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}

/// An error with its causes ("error performing TLS handshake" alone does not say that the certificate was not
/// trusted).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// One sample of `pg_stat_statements`, connecting first when `db` is not open for `s`; the texts of statements not
/// seen before are read and their tables kept in `statements` (forgetting statements the view no longer has).
pub async fn sample(
    ctx: &Context,
    ns: &str,
    s: &DatabaseStatistics,
    db: &mut Option<Db>,
    statements: &mut HashMap<i64, Statement>,
) -> Result<Vec<Counted>, Failed> {
    if db.as_ref().is_none_or(|d| d.client.is_closed() || &d.of != s) {
        *db = None;
        let (c, ca) = config(ctx, ns, s).await?;
        let client = connect(&c, ca).await?;
        let user = c.get_user().unwrap_or_default().to_string();
        *db = Some(Db { client: Arc::new(client), of: s.clone(), user });
    }
    let Some(d) = db.as_ref() else { return Err(Failed::Connect("not connected".into())) };
    let query = |e: tokio_postgres::Error| {
        let message = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
        Failed::Query(message)
    };
    let rows = tokio::time::timeout(
        QUERY_TIMEOUT,
        d.client.query(
            // The role's name as the audit log writes it (regrole's text would quote `v-token-...`).
            "SELECT pg_get_userbyid(userid)::text, dbid, queryid, calls, rows FROM pg_stat_statements(false) \
             WHERE queryid IS NOT NULL",
            &[],
        ),
    )
    .await
    .map_err(|_| Failed::Query(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())))?
    .map_err(query)?;
    let counted: Vec<Counted> = rows
        .iter()
        .map(|r| Counted {
            user: r.get::<_, Option<String>>(0).unwrap_or_default(),
            db: r.get(1),
            queryid: r.get(2),
            calls: r.get(3),
            rows: r.get(4),
        })
        .collect();
    let live: std::collections::HashSet<i64> = counted.iter().map(|c| c.queryid).collect();
    statements.retain(|q, _| live.contains(q));
    let new: Vec<i64> = live.iter().copied().filter(|q| !statements.contains_key(q)).collect();
    if !new.is_empty() {
        let texts = tokio::time::timeout(
            QUERY_TIMEOUT,
            d.client
                .query("SELECT DISTINCT queryid, query FROM pg_stat_statements(true) WHERE queryid = ANY($1)", &[&new]),
        )
        .await
        .map_err(|_| Failed::Query(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())))?
        .map_err(query)?;
        for r in texts {
            let text: Option<String> = r.get(1);
            statements.insert(r.get(0), text.map(|t| statement(&t)).unwrap_or_default());
        }
    }
    Ok(counted)
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
