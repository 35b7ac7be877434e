//! The streaming data path. Backup: source (dump child process or tar of a directory) -> sha256 of the raw
//! stream -> zstd -> chunked AEAD -> sha256 of the stored bytes -> multipart parts, a bounded number in flight.
//! Verification and restore run the same layers backwards. Nothing ever holds a whole backup in memory or on
//! disk: memory is bounded by (parts in flight + 1) x part size plus the codec windows.
//!
//! `upload`: the backup's chain and its multipart uploads; `read`: the chain backwards, for verification and
//! restore; `archive`: a directory as a tar stream.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::crypto;
use super::store::StoreError;

mod archive;
mod read;
mod upload;

pub use archive::{read_tar, write_tar};
pub(crate) use read::BlockReader;
pub use read::{Verified, read_object, sampled, verify_object, verify_sampled};
pub use upload::{Protection, StreamStats, upload_stream};

/// Tuning of the data path.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Size of the multipart parts (5 MiB, the S3 minimum, by default). Parts held at once: `parts_in_flight`
    /// + 1, whatever the size of the backup.
    pub part_size: usize,
    /// Parts uploaded concurrently.
    pub parts_in_flight: usize,
    /// log2 of the encryption chunk size.
    pub chunk_log2: u8,
    /// How often progress is logged.
    pub progress_every: Duration,
    /// zstd worker threads (1 = compress on the pipeline's own thread).
    pub compress_threads: u32,
    /// Parts per S3 object (S3 allows 10 000): a longer stream continues in the next segment object, so the
    /// part size, and with it memory, never has to grow (10 000 x 5 MiB = 48.8 GiB per segment).
    pub parts_per_object: u32,
}

/// S3's limit of parts per multipart upload.
pub const MAX_PARTS_PER_OBJECT: u32 = 10_000;

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            part_size: 5 << 20,
            parts_in_flight: 2,
            chunk_log2: crypto::DEFAULT_CHUNK_LOG2,
            progress_every: Duration::from_secs(10),
            compress_threads: std::thread::available_parallelism().map(|n| n.get().min(4) as u32).unwrap_or(1),
            parts_per_object: MAX_PARTS_PER_OBJECT,
        }
    }
}

/// Failure of the data path.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Stream(String),
    /// The source (dump tool, tar) failed.
    #[error("{0}")]
    Source(String),
    #[error("verification of {key} failed: {reason}")]
    Verify { key: String, reason: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counts (and, when asked, hashes) everything written through it.
struct HashingWriter<W> {
    inner: W,
    sha: Option<Sha256>,
    bytes: u64,
    progress: Option<Arc<AtomicU64>>,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W, progress: Option<Arc<AtomicU64>>) -> Self {
        HashingWriter { inner, sha: Some(Sha256::new()), bytes: 0, progress }
    }
    fn counting(inner: W) -> Self {
        HashingWriter { inner, sha: None, bytes: 0, progress: None }
    }
    fn finish(self) -> (W, String, u64) {
        (self.inner, self.sha.map(|h| hex(&h.finalize())).unwrap_or_default(), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        self.bytes += n as u64;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts and hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
    progress: Option<Arc<AtomicU64>>,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R, progress: Option<Arc<AtomicU64>>) -> Self {
        HashingReader { inner, sha: Sha256::new(), bytes: 0, progress }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// Logs progress (bytes and rate) until dropped.
struct Progress(tokio::task::JoinHandle<()>);

impl Progress {
    fn start(what: String, counter: Arc<AtomicU64>, every: Duration) -> Progress {
        Progress(tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let bytes = counter.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    "{what}: {} so far, {}/s",
                    human_bytes(bytes),
                    human_bytes((bytes as f64 / secs) as u64)
                );
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `1.5 GiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
