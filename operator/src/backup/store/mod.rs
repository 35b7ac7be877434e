//! Where backups are stored: an S3-compatible bucket (aws-sdk-s3 over rustls + ring) or, for trying crmguard
//! out without S3 and for tests of the pure pipeline, a local directory with the same key layout.
//!
//! `settings`: where the bucket is and the credentials to reach it; `retry`: which failures are retried and for
//! how long; `multipart`: uploads in parts, and the unfinished ones a failed run leaves.
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use jiff::Timestamp;

mod multipart;
mod retry;
mod settings;

pub use multipart::{PendingUpload, Upload, UploadUsage};
use retry::retry_delay;
pub use retry::{DEFAULT_TRANSFER_DEADLINE, with_retries};
pub use settings::S3Settings;

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
}
