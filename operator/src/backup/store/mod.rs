//! Where backups are stored: an S3-compatible bucket (aws-sdk-s3 over rustls + ring) or, for trying crmguard
//! out without S3 and for tests of the pure pipeline, a local directory with the same key layout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use jiff::Timestamp;

use crate::api::common::S3Location;

/// A failed storage operation. Messages name the bucket/key and the server's answer, never credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {key}: {message}")]
    S3 { op: &'static str, key: String, message: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("invalid storage configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Credentials(String),
    /// The consumer of a download stopped reading (it failed first; its error is the one to report).
    #[error("GET {0}: the reader stopped")]
    ReaderStopped(String),
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: Option<Timestamp>,
}

/// An unfinished multipart upload found under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<Timestamp>,
}

/// What an unfinished multipart upload holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadUsage {
    pub parts: u64,
    pub bytes: u64,
    /// When its newest part arrived (`None` without parts).
    pub newest: Option<Timestamp>,
}

/// S3 connection settings resolved from the policy and the environment.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    /// Static keys (from a Secret via the environment, or from Vault). `None` uses the ambient AWS chain.
    pub static_keys: Option<(String, String, Option<String>)>,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    pub ca_pem: Option<Vec<u8>>,
    /// Attempts per request inside the SDK (its standard retry mode); [`with_retries`] retries on top of that
    /// until `transfer_deadline`.
    pub max_attempts: u32,
    /// How long one transfer may keep retrying through failures of the endpoint (`destination.transferDeadline`).
    pub transfer_deadline: Duration,
}

impl S3Settings {
    /// Settings from a policy's destination; keys come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (set
    /// from the policy's Secret by the job) or the ambient chain.
    pub fn from_location(loc: &S3Location) -> Self {
        let mut settings = Self::from_env(&loc.bucket, &loc.region, loc.endpoint.clone(), loc.force_path_style);
        // The CRD admits only durations of at least 1s.
        if let Ok(d) = crate::api::common::parse_duration(&loc.transfer_deadline) {
            settings.transfer_deadline = d;
        }
        settings
    }

    /// Settings for a bucket, with keys and CA from the environment as described at [`Self::from_location`].
    pub fn from_env(bucket: &str, region: &str, endpoint: Option<String>, force_path_style: bool) -> Self {
        let static_keys = match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(a), Ok(s)) if !a.is_empty() && !s.is_empty() => Some((a, s, std::env::var("AWS_SESSION_TOKEN").ok())),
            _ => None,
        };
        // The CA from destination.caSecretRef (PEM in the environment), or a file for runs by hand.
        let ca_pem = std::env::var("CRMGUARD_S3_CA_CERT")
            .ok()
            .filter(|p| !p.trim().is_empty())
            .map(String::into_bytes)
            .or_else(|| std::env::var("CRMGUARD_S3_CA_FILE").ok().and_then(|p| std::fs::read(p).ok()));
        S3Settings {
            bucket: bucket.to_string(),
            region: region.to_string(),
            endpoint,
            force_path_style,
            static_keys,
            ca_pem,
            max_attempts: 2,
            transfer_deadline: DEFAULT_TRANSFER_DEADLINE,
        }
    }
}

/// Why no S3 credentials can be found without asking a cloud metadata service, or `None` when some source is
/// there. The SDK's chain would otherwise end at the instance metadata address (169.254.169.254), which exists
/// only on a cloud VM, and fail after timeouts with a message about the endpoint. That last resort is kept only
/// for AWS itself (no custom endpoint) when `AWS_EC2_METADATA_DISABLED` is not `true`.
fn missing_credentials(custom_endpoint: bool) -> Option<String> {
    let set = |v: &str| std::env::var(v).is_ok_and(|x| !x.trim().is_empty());
    let (access, secret) = (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY"));
    if access != secret {
        let (have, lack) = if access {
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        } else {
            ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        };
        return Some(format!(
            "S3 credentials are incomplete: {have} is set but {lack} is not. The Secret named in \
             destination.credentials.secretRef must hold both keys"
        ));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let files = home.is_some_and(|h| h.join(".aws/credentials").exists() || h.join(".aws/config").exists());
    let ambient = files
        || [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_PROFILE",
        ]
        .into_iter()
        .any(set)
        || set("AWS_SHARED_CREDENTIALS_FILE")
        || set("AWS_CONFIG_FILE");
    let metadata = !custom_endpoint && std::env::var("AWS_EC2_METADATA_DISABLED").map_or(true, |v| v != "true");
    (!ambient && !metadata).then(|| {
        "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and no other source is \
         configured (web identity, container credentials, an AWS profile). Name a Secret holding both keys in the \
         policy's destination.credentials.secretRef (the job gets them as environment variables), or Vault KV \
         credentials in destination.credentials.vault; by hand, export the two variables"
            .to_string()
    })
}

/// The transfer deadline when the policy names none.
pub const DEFAULT_TRANSFER_DEADLINE: Duration = Duration::from_secs(300);

/// Whether retrying can fix a failed request: the endpoint could not be reached or timed out, the connection
/// broke, or it answered 5xx, 429 or 408. Credentials, permissions and missing buckets cannot be retried away.
fn transient<E>(e: &aws_sdk_s3::error::SdkError<E>) -> bool {
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(d) => {
            use aws_smithy_types::retry::ErrorKind;
            d.is_io()
                || d.is_timeout()
                || matches!(
                    d.as_other(),
                    Some(ErrorKind::TransientError | ErrorKind::ServerError | ErrorKind::ThrottlingError)
                )
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            status >= 500 || status == 429 || status == 408
        }
        _ => false,
    }
}

/// The wait before retry `n` (0-based): 0.5 s doubling up to 15 s, shortened at random by up to half so that
/// parts and jobs do not retry in step.
fn retry_delay(n: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << n.min(5)).min(Duration::from_secs(15));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    base.mul_f64(1.0 - f64::from(nanos % 500) / 1000.0)
}

/// Runs `attempt` until it succeeds, fails in a way retrying cannot fix, or `deadline` has passed since its
/// first failure.
pub async fn with_retries<T, E, F, Fut>(
    deadline: Duration,
    op: &'static str,
    key: &str,
    mut attempt: F,
) -> Result<T, aws_sdk_s3::error::SdkError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, aws_sdk_s3::error::SdkError<E>>>,
    E: std::fmt::Debug + std::fmt::Display,
{
    let mut first_failure: Option<std::time::Instant> = None;
    let mut n = 0;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) => {
                let since = *first_failure.get_or_insert_with(std::time::Instant::now);
                let wait = retry_delay(n);
                if since.elapsed() + wait > deadline {
                    return Err(e);
                }
                if let StoreError::S3 { message, .. } = s3_err(op, key, &e) {
                    tracing::warn!(
                        op,
                        key,
                        retry_in_ms = wait.as_millis() as u64,
                        "S3 request failed, retrying: {message}"
                    );
                }
                tokio::time::sleep(wait).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A bucket (or directory) holding backups.
#[derive(Clone, Debug)]
pub enum Store {
    /// `deadline`: how long one transfer may keep retrying through failures of the endpoint.
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        deadline: Duration,
    },
    Dir {
        root: PathBuf,
    },
}

fn s3_err<E: std::fmt::Debug + std::fmt::Display>(
    op: &'static str,
    key: &str,
    e: &aws_sdk_s3::error::SdkError<E>,
) -> StoreError {
    use aws_sdk_s3::error::SdkError;
    let message = match e {
        SdkError::ServiceError(s) => {
            let raw = s.raw();
            let body = raw.body().bytes().map(|b| String::from_utf8_lossy(b).chars().take(300).collect::<String>());
            format!(
                "HTTP {}: {}{}",
                raw.status().as_u16(),
                s.err(),
                body.map(|b| format!(" ({b})")).unwrap_or_default()
            )
        }
        SdkError::DispatchFailure(d) => {
            let why = match d.as_connector_error() {
                Some(c) => aws_sdk_s3::error::DisplayErrorContext(c).to_string(),
                None => format!("{d:?}"),
            };
            format!("cannot reach the S3 endpoint: {why}")
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        other => other.to_string(),
    };
    StoreError::S3 { op, key: key.to_string(), message }
}

/// A failed GetObject: a missing key is `NotFound`, anything else an S3 error.
fn get_err(
    key: &str,
    e: &aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::get_object::GetObjectError>,
) -> StoreError {
    if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
        StoreError::NotFound(key.to_string())
    } else {
        s3_err("GET", key, e)
    }
}

/// A response body that broke off while it was read.
fn body_err(op: &'static str, key: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::S3 { op, key: key.to_string(), message: e.to_string() }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.display().to_string(), source }
}

impl Store {
    /// Connects to S3.
    pub async fn s3(settings: &S3Settings) -> Result<Store, StoreError> {
        use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
        let mut http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
        if let Some(pem) = &settings.ca_pem {
            let trust = TrustStore::empty().with_native_roots(true).with_pem_certificate(pem.clone());
            http = http.tls_context(TlsContext::builder().with_trust_store(trust).build().map_err(|e| {
                StoreError::Config(format!("the S3 CA certificate (CRMGUARD_S3_CA_FILE) cannot be used: {e}"))
            })?);
        }
        if settings.static_keys.is_none()
            && let Some(missing) = missing_credentials(settings.endpoint.is_some())
        {
            return Err(StoreError::Credentials(missing));
        }
        let http = http.build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some((access, secret, session)) = &settings.static_keys {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                access.clone(),
                secret.clone(),
                session.clone(),
                None,
                "crmguard",
            ));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
        if let Some(ep) = &settings.endpoint {
            conf = conf.endpoint_url(ep.trim_end_matches('/'));
        }
        Ok(Store::S3 {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: settings.bucket.clone(),
            deadline: settings.transfer_deadline,
        })
    }

    /// A local directory store.
    pub fn dir(root: impl Into<PathBuf>) -> Store {
        Store::Dir { root: root.into() }
    }

    /// Human-readable location, for messages.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Store::S3 { bucket, .. } => format!("s3://{bucket}/{key}"),
            Store::Dir { root } => root.join(key).display().to_string(),
        }
    }

    fn path(root: &Path, key: &str) -> PathBuf {
        root.join(key)
    }

    /// Writes a small object in one request.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        match self {
            Store::S3 { client, bucket, deadline } => {
                with_retries(*deadline, "PUT", key, || {
                    client.put_object().bucket(bucket).key(key).body(ByteStream::from(body.clone())).send()
                })
                .await
                .map_err(|e| s3_err("PUT", key, &e))?;
                Ok(())
            }
            Store::Dir { root } => {
                let path = Self::path(root, key);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(io_err("mkdir", parent))?;
                }
                // Write to a temporary name and rename, so a reader never sees half an object.
                let tmp = path.with_extension("tmp-put");
                tokio::fs::write(&tmp, &body).await.map_err(io_err("write", &tmp))?;
                tokio::fs::rename(&tmp, &path).await.map_err(io_err("rename", &path))
            }
        }
    }

    /// Reads a whole (small) object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match self {
            Store::S3 { client, bucket, deadline } => {
                let out = with_retries(*deadline, "GET", key, || client.get_object().bucket(bucket).key(key).send())
                    .await
                    .map_err(|e| get_err(key, &e))?;
                let data = out.body.collect().await.map_err(|e| body_err("GET", key, &e))?;
                Ok(data.into_bytes())
            }
            Store::Dir { root } => {
                let path = Self::path(root, key);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Bytes::from(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound(key.to_string())),
                    Err(e) => Err(StoreError::Io { op: "read", path: path.display().to_string(), source: e }),
                }
            }
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        match self {
            Store::S3 { client, bucket, deadline } => {
                let range = format!("bytes={}-{}", offset, offset + len - 1);
                let out = with_retries(*deadline, "GET (range)", key, || {
                    client.get_object().bucket(bucket).key(key).range(range.clone()).send()
                })
                .await
                .map_err(|e| s3_err("GET (range)", key, &e))?;
                let data = out.body.collect().await.map_err(|e| body_err("GET (range)", key, &e))?;
                Ok(data.into_bytes())
            }
            Store::Dir { root } => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let path = Self::path(root, key);
                let mut f = tokio::fs::File::open(&path).await.map_err(io_err("open", &path))?;
                f.seek(std::io::SeekFrom::Start(offset)).await.map_err(io_err("seek", &path))?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact(&mut buf).await.map_err(io_err("read", &path))?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// Streams an object into `tx` in pieces (bounded by the channel), for a blocking consumer.
    pub async fn get_stream(&self, key: &str, tx: tokio::sync::mpsc::Sender<Bytes>) -> Result<u64, StoreError> {
        let mut total = 0u64;
        let closed = || StoreError::ReaderStopped(key.to_string());
        match self {
            Store::S3 { client, bucket, deadline } => {
                // A download that breaks off resumes where it stopped (a range request, pinned to the same object
                // by its ETag), for as long as the transfer deadline allows since the break.
                let mut etag: Option<String> = None;
                let mut broke: Option<std::time::Instant> = None;
                'resume: loop {
                    let out = with_retries(*deadline, "GET", key, || {
                        let mut req = client.get_object().bucket(bucket).key(key);
                        if total > 0 {
                            req = req.range(format!("bytes={total}-")).set_if_match(etag.clone());
                        }
                        req.send()
                    })
                    .await
                    .map_err(|e| get_err(key, &e))?;
                    if etag.is_none() {
                        etag = out.e_tag().map(str::to_string);
                    }
                    let mut body = out.body;
                    loop {
                        match body.try_next().await {
                            Ok(Some(piece)) => {
                                broke = None;
                                total += piece.len() as u64;
                                tx.send(piece).await.map_err(|_| closed())?;
                            }
                            Ok(None) => break 'resume,
                            Err(e) => {
                                let since = *broke.get_or_insert_with(std::time::Instant::now);
                                if since.elapsed() >= *deadline {
                                    return Err(body_err("GET", key, &e));
                                }
                                tracing::warn!(key, offset = total, "download broke off ({e}); resuming");
                                tokio::time::sleep(retry_delay(0)).await;
                                continue 'resume;
                            }
                        }
                    }
                }
            }
            Store::Dir { root } => {
                use tokio::io::AsyncReadExt;
                let path = Self::path(root, key);
                let mut f = tokio::fs::File::open(&path).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        StoreError::NotFound(key.to_string())
                    } else {
                        StoreError::Io { op: "open", path: path.display().to_string(), source: e }
                    }
                })?;
                loop {
                    let mut buf = vec![0u8; 1 << 18];
                    let n = f.read(&mut buf).await.map_err(io_err("read", &path))?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    total += n as u64;
                    tx.send(Bytes::from(buf)).await.map_err(|_| closed())?;
                }
            }
        }
        Ok(total)
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                let mut out = Vec::new();
                let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| s3_err("LIST", prefix, &e))?;
                    for o in page.contents() {
                        out.push(ObjectInfo {
                            key: o.key().unwrap_or_default().to_string(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                            modified: o.last_modified().and_then(|t| Timestamp::from_second(t.secs()).ok()),
                        });
                    }
                }
                Ok(out)
            }
            Store::Dir { root } => {
                let mut out = Vec::new();
                let mut stack = vec![root.clone()];
                while let Some(dir) = stack.pop() {
                    let mut rd = match tokio::fs::read_dir(&dir).await {
                        Ok(rd) => rd,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(StoreError::Io { op: "list", path: dir.display().to_string(), source: e });
                        }
                    };
                    while let Some(entry) = rd.next_entry().await.map_err(io_err("list", &dir))? {
                        let meta = entry.metadata().await.map_err(io_err("stat", &dir))?;
                        let path = entry.path();
                        if meta.is_dir() {
                            stack.push(path);
                            continue;
                        }
                        let key = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
                        if key.starts_with(prefix) {
                            let modified = meta.modified().ok().and_then(|m| Timestamp::try_from(m).ok());
                            out.push(ObjectInfo { key, size: meta.len(), modified });
                        }
                    }
                }
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            }
        }
    }

    /// Deletes objects; objects already gone count as deleted.
    pub async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            match self {
                Store::S3 { client, bucket, .. } => {
                    client
                        .delete_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .map_err(|e| s3_err("DELETE", key, &e))?;
                }
                Store::Dir { root } => {
                    let path = Self::path(root, key);
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(StoreError::Io { op: "delete", path: path.display().to_string(), source: e });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Unfinished multipart uploads under `prefix` (S3 only; a directory store has none worth listing).
    pub async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        let Store::S3 { client, bucket, .. } = self else { return Ok(Vec::new()) };
        let mut found = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let out = client
                .list_multipart_uploads()
                .bucket(bucket)
                .prefix(prefix)
                .set_key_marker(markers.0.clone())
                .set_upload_id_marker(markers.1.clone())
                .send()
                .await
                .map_err(|e| s3_err("LIST uploads", prefix, &e))?;
            found.extend(out.uploads().iter().map(|u| PendingUpload {
                key: u.key().unwrap_or_default().to_string(),
                upload_id: u.upload_id().unwrap_or_default().to_string(),
                initiated: u.initiated().and_then(|t| Timestamp::from_second(t.secs()).ok()),
            }));
            let next = (out.next_key_marker().map(str::to_string), out.next_upload_id_marker().map(str::to_string));
            if out.is_truncated() != Some(true) || next.0.is_none() || next == markers {
                return Ok(found);
            }
            markers = next;
        }
    }

    /// The parts an unfinished multipart upload holds: how many, their bytes, and when the newest arrived.
    pub async fn upload_usage(&self, key: &str, upload_id: &str) -> Result<UploadUsage, StoreError> {
        let Store::S3 { client, bucket, .. } = self else { return Ok(UploadUsage::default()) };
        let mut usage = UploadUsage::default();
        let mut marker: Option<String> = None;
        loop {
            let out = client
                .list_parts()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| s3_err("LIST parts", key, &e))?;
            for p in out.parts() {
                usage.parts += 1;
                usage.bytes += p.size().unwrap_or(0).max(0) as u64;
                let at = p.last_modified().and_then(|t| Timestamp::from_second(t.secs()).ok());
                usage.newest = usage.newest.max(at);
            }
            let next = out.next_part_number_marker().map(str::to_string);
            if out.is_truncated() != Some(true) || next.is_none() || next == marker {
                return Ok(usage);
            }
            marker = next;
        }
    }

    /// Aborts an unfinished multipart upload.
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let Store::S3 { client, bucket, .. } = self else { return Ok(()) };
        client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| s3_err("ABORT upload", key, &e))?;
        Ok(())
    }

    /// Starts a multipart upload of `key`.
    pub async fn start_upload(&self, key: &str) -> Result<Upload, StoreError> {
        match self {
            Store::S3 { client, bucket, deadline } => {
                // A retried create may leave an unused upload behind; the next run reclaims it.
                let out = with_retries(*deadline, "CREATE upload", key, || {
                    client
                        .create_multipart_upload()
                        .bucket(bucket)
                        .key(key)
                        .content_type("application/octet-stream")
                        .send()
                })
                .await
                .map_err(|e| s3_err("CREATE upload", key, &e))?;
                let upload_id = out.upload_id().unwrap_or_default().to_string();
                if upload_id.is_empty() {
                    return Err(StoreError::S3 {
                        op: "CREATE upload",
                        key: key.into(),
                        message: "no upload id".into(),
                    });
                }
                Ok(Upload { store: self.clone(), key: key.to_string(), upload_id })
            }
            Store::Dir { root } => {
                let path = Self::path(root, key);
                let parts = path.with_extension("parts");
                tokio::fs::create_dir_all(&parts).await.map_err(io_err("mkdir", &parts))?;
                Ok(Upload { store: self.clone(), key: key.to_string(), upload_id: parts.display().to_string() })
            }
        }
    }
}

/// An unfinished multipart upload. Parts may be uploaded concurrently.
#[derive(Clone, Debug)]
pub struct Upload {
    store: Store,
    pub key: String,
    pub upload_id: String,
}

impl Upload {
    /// Uploads part `number` (1-based) and returns its completion record.
    pub async fn part(&self, number: i32, body: Bytes) -> Result<CompletedPart, StoreError> {
        match &self.store {
            Store::S3 { client, bucket, deadline } => {
                // A failed part is sent again into the same upload (same number: the server keeps the last).
                let out = with_retries(*deadline, "PUT part", &self.key, || {
                    client
                        .upload_part()
                        .bucket(bucket)
                        .key(&self.key)
                        .upload_id(&self.upload_id)
                        .part_number(number)
                        .body(ByteStream::from(body.clone()))
                        // No SigV4 hash of the payload (a second SHA-256 pass over every byte): each part still
                        // carries a CRC32 checksum the server checks, the stream is AEAD-sealed, and the whole
                        // object is re-read and verified against our own SHA-256 before the backup counts.
                        .customize()
                        .disable_payload_signing()
                        .send()
                })
                .await
                .map_err(|e| s3_err("PUT part", &self.key, &e))?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .build())
            }
            Store::Dir { .. } => {
                let path = PathBuf::from(&self.upload_id).join(format!("{number:05}"));
                tokio::fs::write(&path, &body).await.map_err(io_err("write", &path))?;
                Ok(CompletedPart::builder().part_number(number).build())
            }
        }
    }

    /// Completes the upload from its parts (in any order).
    pub async fn complete(self, mut parts: Vec<CompletedPart>) -> Result<(), StoreError> {
        parts.sort_by_key(|p| p.part_number());
        match &self.store {
            Store::S3 { client, bucket, deadline } => {
                let done = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
                let mut attempts = 0u32;
                let result = with_retries(*deadline, "COMPLETE upload", &self.key, || {
                    attempts += 1;
                    let attempt = client
                        .complete_multipart_upload()
                        .bucket(bucket)
                        .key(&self.key)
                        .upload_id(&self.upload_id)
                        .multipart_upload(done.clone())
                        .send();
                    async move { attempt.await.map(drop) }
                })
                .await;
                match result {
                    Ok(_) => Ok(()),
                    // An earlier attempt completed the upload but its answer was lost: the object is there.
                    Err(e)
                        if attempts > 1
                            && e.as_service_error().and_then(|s| s.meta().code()) == Some("NoSuchUpload")
                            && client.head_object().bucket(bucket).key(&self.key).send().await.is_ok() =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(s3_err("COMPLETE upload", &self.key, &e)),
                }
            }
            Store::Dir { root } => {
                use tokio::io::AsyncWriteExt;
                let path = Store::path(root, &self.key);
                let tmp = path.with_extension("tmp-put");
                let mut out = tokio::fs::File::create(&tmp).await.map_err(io_err("create", &tmp))?;
                for p in &parts {
                    let part = PathBuf::from(&self.upload_id).join(format!("{:05}", p.part_number().unwrap_or(0)));
                    let data = tokio::fs::read(&part).await.map_err(io_err("read", &part))?;
                    out.write_all(&data).await.map_err(io_err("write", &tmp))?;
                }
                out.flush().await.map_err(io_err("flush", &tmp))?;
                drop(out);
                tokio::fs::rename(&tmp, &path).await.map_err(io_err("rename", &path))?;
                let dir = PathBuf::from(&self.upload_id);
                tokio::fs::remove_dir_all(&dir).await.map_err(io_err("remove", &dir))
            }
        }
    }

    /// Aborts the upload, discarding every uploaded part.
    pub async fn abort(self) -> Result<(), StoreError> {
        match &self.store {
            Store::S3 { .. } => self.store.abort_upload(&self.key, &self.upload_id).await,
            Store::Dir { .. } => {
                let dir = PathBuf::from(&self.upload_id);
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(StoreError::Io { op: "remove", path: dir.display().to_string(), source: e }),
                }
            }
        }
    }
}
