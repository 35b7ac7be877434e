//! The streaming data path. Backup: source (dump child process or tar of a directory) -> sha256 of the raw
//! stream -> zstd -> chunked AEAD -> sha256 of the stored bytes -> multipart parts, a bounded number in flight.
//! Verification and restore run the same layers backwards. Nothing ever holds a whole backup in memory or on
//! disk: memory is bounded by (parts in flight + 1) x part size plus the codec windows.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::crypto::{self, ChunkCipher, DataKey, DecryptReader, EncryptWriter, Header, TAG_LEN};
use super::manifest::{StoredObject, segment_key};
use super::store::{Store, StoreError, Upload};
use crate::api::backup_policy::{Algorithm, VerificationMode};

/// Bytes per zstd worker job when compressing on several threads.
const JOB_SIZE: u32 = 1 << 20;
/// log2 of zstd's window (match distance); 20 = 1 MiB.
const WINDOW_LOG: u32 = 20;

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

/// Part buffers that may exist at once (being filled, queued or uploading): the memory bound of the upload.
struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
    /// How many are waiting for a slot.
    waiting: AtomicUsize,
}

/// One part buffer's place; given back when dropped (after its upload, or when the upload is abandoned).
struct Slot(Arc<Slots>);

impl Slots {
    fn new(n: usize) -> Arc<Slots> {
        let waiting = AtomicUsize::new(0);
        Arc::new(Slots { free: std::sync::Mutex::new(n), freed: std::sync::Condvar::new(), waiting })
    }

    /// Blocks until a part buffer may be started.
    fn acquire(self: &Arc<Self>) -> Slot {
        let mut free = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *free == 0 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            free = self.freed.wait(free).unwrap_or_else(std::sync::PoisonError::into_inner);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        *free -= 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// A part on its way to S3, holding its slot.
type Part = (Bytes, Slot);

/// Collects the stored stream into parts and hands them to the uploader. A part buffer is started only when
/// one of `parts_in_flight + 1` slots is free, so at most that many parts exist at once.
struct PartSink {
    tx: tokio::sync::mpsc::Sender<Part>,
    buf: Vec<u8>,
    part_size: usize,
    sent: u32,
    slots: Arc<Slots>,
    slot: Option<Slot>,
}

impl PartSink {
    fn new(tx: tokio::sync::mpsc::Sender<Part>, part_size: usize, in_flight: usize) -> PartSink {
        let slots = Slots::new(in_flight + 1);
        PartSink { tx, buf: Vec::new(), part_size: part_size.max(5 << 20), sent: 0, slots, slot: None }
    }

    fn start(&mut self) {
        if self.slot.is_none() {
            self.slot = Some(self.slots.acquire());
            self.buf.reserve_exact(self.part_size);
        }
    }

    fn send(&mut self) -> io::Result<()> {
        self.start();
        let part = std::mem::take(&mut self.buf);
        let slot = self.slot.take().ok_or_else(|| io::Error::other("part without a slot"))?;
        self.tx
            .blocking_send((Bytes::from(part), slot))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))?;
        self.sent += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<u32> {
        if !self.buf.is_empty() || self.sent == 0 {
            self.send()?;
        }
        Ok(self.sent)
    }
}

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.start();
        let room = self.part_size - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part_size {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The encryption layer, or none.
enum Sealer {
    Plain(HashingWriter<PartSink>),
    Sealed(EncryptWriter<HashingWriter<PartSink>>),
}

impl Write for Sealer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(buf),
            Sealer::Sealed(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Sealed(w) => w.flush(),
        }
    }
}

/// How one object is protected.
#[derive(Clone, Debug)]
pub struct Protection {
    pub level: i32,
    /// Algorithm and data key; `None` stores the compressed stream unencrypted.
    pub encryption: Option<(Algorithm, DataKey)>,
}

/// What the producer measured.
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    pub chunks: u64,
    pub parts: u32,
    pub segments: u32,
}

/// Runs the compress/encrypt/split chain over what `fill` writes. Blocking; runs on its own thread.
fn produce(
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    protection: &Protection,
    (chunk_log2, threads): (u8, u32),
    purpose: &str,
    sink: PartSink,
    progress: Arc<AtomicU64>,
) -> io::Result<StreamStats> {
    let stored = HashingWriter::new(sink, None);
    let sealer = match &protection.encryption {
        Some((alg, key)) => {
            let header = Header::new(*alg, chunk_log2)?;
            Sealer::Sealed(EncryptWriter::new(stored, key, header, purpose)?)
        }
        None => Sealer::Plain(stored),
    };
    let compressed = HashingWriter::counting(sealer);
    let mut encoder = zstd::stream::write::Encoder::new(compressed, protection.level)?;
    // zstd's own XXH64 content checksum: decompression checks it too.
    encoder.include_checksum(true)?;
    // A 1 MiB window whatever the level: with 1 MiB jobs this holds the workers' buffers to about 15 MiB
    // (measured: peak RSS 64 -> 50-54 MiB on a 2 GiB dump, same speed, 1 % smaller output).
    encoder.set_parameter(zstd::stream::raw::CParameter::WindowLog(WINDOW_LOG))?;
    if threads > 1 {
        // Compression in zstd's worker threads; this thread hashes and feeds them. Small jobs keep the workers'
        // buffers (input and output per job) within the memory budget; the window still spans jobs.
        encoder.multithread(threads)?;
        encoder.set_parameter(zstd::stream::raw::CParameter::JobSize(JOB_SIZE))?;
    }
    // The raw stream is only counted: zstd's content checksum (XXH64 of exactly these bytes, checked on every
    // decompression) protects it, and the AEAD protects what zstd produced.
    let mut raw = HashingWriter::counting(encoder);
    raw.progress = Some(progress);
    fill(&mut raw)?;
    let (encoder, _, raw_bytes) = raw.finish();
    let compressed = encoder.finish()?;
    let (sealer, _, compressed_bytes) = compressed.finish();
    let (stored, chunks) = match sealer {
        Sealer::Plain(w) => (w, 0),
        Sealer::Sealed(w) => w.finish()?,
    };
    let (sink, sha256, stored_bytes) = stored.finish();
    let parts = sink.finish()?;
    // Segments are the uploader's business; it fills them in.
    Ok(StreamStats { raw_bytes, compressed_bytes, stored_bytes, sha256, chunks, parts, segments: 0 })
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

/// Streams what `fill` writes (on a blocking thread) into a multipart upload of `key`. `finish_source` runs on
/// the same thread after the stream ends and decides whether the source succeeded (e.g. the dump's exit status);
/// `on_abort` runs when the upload side failed first (e.g. to kill the dump). The upload is completed only when
/// both the source and every part succeeded; otherwise it is aborted and nothing is left to list.
#[allow(clippy::too_many_arguments)]
pub async fn upload_stream<F, D, A>(
    store: &Store,
    key: &str,
    purpose: &'static str,
    protection: Protection,
    opts: &PipelineOptions,
    fill: F,
    finish_source: D,
    on_abort: A,
) -> Result<StreamStats, PipelineError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
    D: FnOnce() -> Result<(), PipelineError> + Send + 'static,
    A: FnOnce() + Send + 'static,
{
    let mut segments =
        Segments { key: key.to_string(), current: Some(store.start_upload(key).await?), ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel::<Part>(1);
    let counter = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(format!("{purpose} backup"), counter.clone(), opts.progress_every);
    let sink = PartSink::new(tx, opts.part_size, opts.parts_in_flight.max(1));
    let tuning = (opts.chunk_log2, opts.compress_threads);
    let producer = tokio::task::spawn_blocking(move || {
        let produced = produce(fill, &protection, tuning, purpose, sink, counter);
        match produced {
            Ok(stats) => finish_source().map(|()| stats),
            Err(e) => {
                on_abort();
                // Let the source report its own failure (e.g. a dump that died) in preference to the pipe error.
                Err(match finish_source() {
                    Err(source) => source,
                    Ok(()) => PipelineError::Stream(e.to_string()),
                })
            }
        }
    });
    let per_object = opts.parts_per_object.clamp(1, MAX_PARTS_PER_OBJECT);
    let uploaded = upload_parts(store, &mut segments, rx, opts.parts_in_flight.max(1), per_object).await;
    let produced = producer.await.map_err(|e| PipelineError::Stream(format!("backup thread failed: {e}")));
    let outcome = match (produced, uploaded) {
        (Ok(Ok(stats)), Ok(())) if segments.total == stats.parts => match segments.current.take() {
            Some(last) => match last.clone().complete(std::mem::take(&mut segments.parts)).await {
                Ok(()) => Ok(StreamStats { segments: segments.completed.len() as u32 + 1, ..stats }),
                Err(e) => {
                    segments.current = Some(last);
                    Err(e.into())
                }
            },
            None => Err(PipelineError::Stream("no upload to complete".into())),
        },
        // A failed upload stops the stream (and so the source, which is killed): it is the cause. A source that
        // fails first only ends the stream, and the upload itself succeeds.
        (_, Err(e)) => Err(e.into()),
        (Ok(Err(e)), _) => Err(e),
        (Err(e), _) => Err(e),
        (Ok(Ok(stats)), Ok(())) => {
            Err(PipelineError::Stream(format!("{} parts produced but {} uploaded", stats.parts, segments.total)))
        }
    };
    if outcome.is_err() {
        if let Some(upload) = segments.current.take()
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(error = %e, "could not abort the multipart upload; it is removed by the next cleanup");
        }
        if !segments.completed.is_empty()
            && let Err(e) = store.delete(&segments.completed).await
        {
            tracing::warn!(error = %e, "could not remove the segments already stored; the next cleanup removes them");
        }
    }
    outcome
}

/// The multipart uploads of one stored stream: the segments completed so far and the one being filled.
#[derive(Default)]
struct Segments {
    key: String,
    completed: Vec<String>,
    current: Option<Upload>,
    /// Parts of the current segment that are done.
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
    /// Parts uploaded in all.
    total: u32,
}

async fn upload_parts(
    store: &Store,
    seg: &mut Segments,
    mut rx: tokio::sync::mpsc::Receiver<Part>,
    in_flight: usize,
    per_object: u32,
) -> Result<(), StoreError> {
    let mut running = tokio::task::JoinSet::new();
    let mut number = 0u32;
    let join = |key: &str, r: Result<Result<_, StoreError>, tokio::task::JoinError>| {
        r.map_err(|e| StoreError::S3 { op: "PUT part", key: key.to_string(), message: e.to_string() })?
    };
    loop {
        while running.len() >= in_flight {
            if let Some(r) = running.join_next().await {
                seg.parts.push(join(&seg.key, r)?);
                seg.total += 1;
            }
        }
        let Some((part, slot)) = rx.recv().await else { break };
        if number == per_object {
            // This segment is full: finish it and continue in the next object.
            while let Some(r) = running.join_next().await {
                seg.parts.push(join(&seg.key, r)?);
                seg.total += 1;
            }
            let Some(full) = seg.current.take() else { break };
            if let Err(e) = full.clone().complete(std::mem::take(&mut seg.parts)).await {
                seg.current = Some(full);
                return Err(e);
            }
            seg.completed.push(full.key);
            let next = segment_key(&seg.key, seg.completed.len() as u32);
            tracing::info!(key = next, "continuing in the next segment object");
            seg.current = Some(store.start_upload(&next).await?);
            number = 0;
        }
        let Some(upload) = seg.current.clone() else { break };
        number += 1;
        let n = number as i32;
        running.spawn(async move {
            let done = upload.part(n, part).await;
            drop(slot); // the buffer is free once the request is done with it
            done
        });
    }
    while let Some(r) = running.join_next().await {
        seg.parts.push(join(&seg.key, r)?);
        seg.total += 1;
    }
    Ok(())
}

/// Reads `Bytes` pieces from a channel as a blocking `Read`.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    piece: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(p) => self.piece = p,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        Ok(n)
    }
}

/// Copies a reader into a channel in blocks; an error is passed on to the receiving side.
fn pump(r: &mut dyn Read, tx: &std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>) -> io::Result<()> {
    loop {
        let mut block = vec![0u8; 256 * 1024];
        let n = match crypto::read_full(r, &mut block) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(());
        }
        block.truncate(n);
        tx.send(Ok(block)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the decompressing side stopped"))?;
    }
}

/// The receiving side of [`pump`] (or any channel of blocks) as a `Read`; an error block is returned as the
/// read's error.
pub(crate) struct BlockReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    block: Vec<u8>,
    pos: usize,
}

impl BlockReader {
    /// Reads the blocks `rx` receives, until its senders are gone.
    pub(crate) fn new(rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        BlockReader { rx, block: Vec::new(), pos: 0 }
    }
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.block.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.block = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len() - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a verification pass established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub stored_bytes: u64,
    pub decrypted_chunks: u64,
    pub raw_checked: bool,
    pub raw_bytes: u64,
}

/// Streams a stored object through the backwards chain into `sink` (on a blocking thread) and checks stored
/// sha256, authentication of every chunk, zstd's content checksum and the raw size against the manifest. `sink` receives
/// decompressed bytes as they are authenticated, so callers that must not touch a target before the whole
/// object is known good run a verification pass first.
pub async fn read_object<S>(
    store: &Store,
    object: &StoredObject,
    key: Option<DataKey>,
    sink: S,
    progress_every: Duration,
) -> Result<(Verified, S), PipelineError>
where
    S: Write + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let counter = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(format!("reading {}", object.key), counter.clone(), progress_every);
    let purpose = object.purpose.clone();
    // Two stages on two threads: (1) stored bytes -> sha256 -> decryption, (2) decompression -> sink.
    let consumer = tokio::task::spawn_blocking(move || -> io::Result<(u64, String, u64, u64, S)> {
        let (btx, brx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
        let stage1 = std::thread::spawn(move || -> io::Result<(u64, String, u64)> {
            let mut stored = HashingReader::new(ChannelReader { rx, piece: Bytes::new() }, Some(counter));
            let chunks = match key {
                Some(key) => {
                    let mut dec = DecryptReader::new(&mut stored, key, &purpose);
                    pump(&mut dec, &btx)?;
                    dec.chunks()
                }
                None => {
                    pump(&mut stored, &btx)?;
                    0
                }
            };
            Ok((stored.bytes, hex(&stored.sha.clone().finalize()), chunks))
        });
        let mut input = BlockReader::new(brx);
        let mut out = HashingWriter::counting(sink);
        let decoded = (|| -> io::Result<()> {
            let mut z = zstd::stream::read::Decoder::new(&mut input)?;
            io::copy(&mut z, &mut out)?;
            drop(z);
            // zstd stops at the end of its frame; the layers below must still see their end (the final chunk).
            let mut rest = Vec::new();
            input.read_to_end(&mut rest)?;
            if !rest.is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "data after the end of the zstd stream"));
            }
            Ok(())
        })();
        drop(input);
        let first = stage1.join().map_err(|_| io::Error::other("reader thread panicked"))?;
        // The first stage's error (authentication, truncation) explains a failed decompression, unless the
        // first stage only stopped because the second one had failed.
        let (stored_bytes, stored_sha, chunks) = match (first, decoded) {
            (Err(e1), Err(e2)) if e1.kind() == io::ErrorKind::BrokenPipe => return Err(e2),
            (Err(e1), _) => return Err(e1),
            (Ok(_), Err(e2)) => return Err(e2),
            (Ok(v), Ok(())) => v,
        };
        let (sink, _, raw_bytes) = out.finish();
        Ok((stored_bytes, stored_sha, raw_bytes, chunks, sink))
    });
    let fetched = get_segments(store, object, tx).await;
    let consumed = consumer.await.map_err(|e| PipelineError::Stream(format!("reader thread failed: {e}")))?;
    let verify = |reason: String| PipelineError::Verify { key: object.key.clone(), reason };
    let (stored_bytes, stored_sha, raw_bytes, chunks, sink) = match (consumed, fetched) {
        (Ok(v), Ok(_)) => v,
        (_, Err(StoreError::NotFound(k))) => return Err(verify(format!("object {k} is missing"))),
        // The download broke off (storage gone, connection lost): the readers saw only a cut stream.
        (_, Err(e)) if !matches!(e, StoreError::ReaderStopped(_)) => return Err(e.into()),
        // A checksum or authentication failure stopped the readers, and with them the download.
        (Err(e), _) => return Err(verify(e.to_string())),
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    if stored_bytes != object.stored_bytes {
        return Err(verify(format!(
            "stored size is {stored_bytes} bytes, the manifest recorded {} (truncated or replaced)",
            object.stored_bytes
        )));
    }
    if stored_sha != object.sha256 {
        return Err(verify(format!(
            "sha256 of the stored bytes is {stored_sha}, the manifest recorded {} (the object was modified)",
            object.sha256
        )));
    }
    if raw_bytes != object.raw_bytes {
        return Err(verify(format!(
            "the restored stream has {raw_bytes} bytes, the backup recorded {} (the zstd checksum matched, so the \
             manifest and the object do not belong together)",
            object.raw_bytes
        )));
    }
    Ok((Verified { stored_bytes, decrypted_chunks: chunks, raw_checked: true, raw_bytes }, sink))
}

/// Streams every segment of `object`, in order, into `tx`; the receiver sees one stream that ends after the last.
async fn get_segments(
    store: &Store,
    object: &StoredObject,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for key in object.segment_keys() {
        total += store.get_stream(&key, tx.clone()).await?;
    }
    Ok(total)
}

/// Deterministic choice of chunks for sampled verification: the first and last chunk always, and about
/// `percent` % of the others.
pub fn sampled(index: u64, count: u64, percent: u32) -> bool {
    if index == 0 || index + 1 == count || percent >= 100 {
        return true;
    }
    // SplitMix64 of the index: spreads the sample evenly without state.
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % 100 < u64::from(percent)
}

/// Sampled verification: sha256 over every stored byte, authentication of a sample of chunks (no
/// decompression, which needs the whole stream).
pub async fn verify_sampled(
    store: &Store,
    object: &StoredObject,
    key: DataKey,
    percent: u32,
) -> Result<Verified, PipelineError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let purpose = object.purpose.clone();
    let expected_stored = object.stored_bytes;
    let consumer = tokio::task::spawn_blocking(move || -> io::Result<(u64, String, u64)> {
        let mut stored = HashingReader::new(ChannelReader { rx, piece: Bytes::new() }, None);
        let mut h = [0u8; crypto::HEADER_LEN];
        stored.read_exact(&mut h)?;
        let header = Header::parse(&h)?;
        let count = crypto::chunk_count(&header, expected_stored)?;
        let cipher = ChunkCipher::new(&key, header.clone(), &purpose)?;
        let full = header.chunk_size() + TAG_LEN;
        let mut buf = Vec::with_capacity(full);
        let mut opened = 0;
        for i in 0..count {
            let last = i + 1 == count;
            let len = if last { (expected_stored - crypto::chunk_offset(&header, i)) as usize } else { full };
            buf.resize(len, 0);
            stored.read_exact(&mut buf)?;
            if sampled(i, count, percent) {
                cipher.open_in_place(i, last, &mut buf)?;
                opened += 1;
            }
        }
        io::copy(&mut stored, &mut io::sink())?;
        Ok((stored.bytes, hex(&stored.sha.clone().finalize()), opened))
    });
    let fetched = get_segments(store, object, tx).await;
    let verify = |reason: String| PipelineError::Verify { key: object.key.clone(), reason };
    let consumed = consumer.await.map_err(|e| PipelineError::Stream(format!("reader thread failed: {e}")))?;
    let (bytes, sha, opened) = match (consumed, fetched) {
        (Ok(v), Ok(_)) => v,
        (Err(e), _) => return Err(verify(e.to_string())),
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    if bytes != object.stored_bytes || sha != object.sha256 {
        return Err(verify(format!(
            "stored bytes ({bytes}, sha256 {sha}) differ from the manifest ({}, sha256 {})",
            object.stored_bytes, object.sha256
        )));
    }
    Ok(Verified { stored_bytes: bytes, decrypted_chunks: opened, raw_checked: false, raw_bytes: object.raw_bytes })
}

/// Verifies one object as the policy asks.
pub async fn verify_object(
    store: &Store,
    object: &StoredObject,
    key: Option<DataKey>,
    mode: VerificationMode,
    percent: u32,
    progress_every: Duration,
) -> Result<Verified, PipelineError> {
    match (mode, key) {
        (VerificationMode::Sampled, Some(key)) => verify_sampled(store, object, key, percent).await,
        (_, key) => read_object(store, object, key, io::sink(), progress_every).await.map(|(v, _)| v),
    }
}

/// Writes a directory as a tar stream (no symlinks followed; special files skipped).
pub fn write_tar(dir: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    builder.finish()
}

/// Unpacks a tar stream into a directory.
pub fn read_tar(input: &mut dyn Read, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    archive.unpack(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_parts_in_flight_plus_one_part_buffers_exist() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Part>(1);
        let part = 5 << 20;
        let mut sink = PartSink::new(tx, part, 2);
        let slots = sink.slots.clone();
        let producer = std::thread::spawn(move || {
            let block = vec![7u8; 1 << 20];
            for _ in 0..(10 * 5) {
                sink.write_all(&block)?;
            }
            sink.finish()
        });
        // Hold every part received (as an upload that never finishes would).
        let mut held = Vec::new();
        while held.len() < 3 {
            held.push(rx.blocking_recv().expect("a part"));
        }
        // Three slots are taken: the producer waits for one to start a fourth buffer, and no fourth part exists.
        while slots.waiting.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        assert_eq!(*slots.free.lock().unwrap(), 0);
        assert!(rx.try_recv().is_err(), "a fourth part exists while three are held");
        assert_eq!(held.iter().map(|(b, _)| b.len()).sum::<usize>(), 3 * part);
        drop(held);
        let mut rest = 0;
        while let Some((bytes, _slot)) = rx.blocking_recv() {
            assert_eq!(bytes.len(), part);
            rest += 1;
        }
        assert_eq!(rest, 7);
        assert_eq!(producer.join().expect("producer").expect("sink"), 10);
    }
}
