//! Multipart uploads: started, filled part by part (concurrently), completed or aborted; and the unfinished ones
//! a failed run left behind, found and reclaimed by housekeeping.

use std::path::PathBuf;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use jiff::Timestamp;

use super::retry::with_retries;
use super::{Store, StoreError, io_err, s3_err};

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

impl Store {
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
