//! The chain backwards: stored object -> sha256 of the stored bytes -> AEAD chunks authenticated -> zstd ->
//! sha256 and size of the raw stream, for verification (whole or sampled) and restore.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use sha2::Digest;

use super::{HashingReader, HashingWriter, PipelineError, Progress, hex};
use crate::api::backup_policy::VerificationMode;
use crate::backup::crypto::{self, ChunkCipher, DataKey, DecryptReader, Header, TAG_LEN};
use crate::backup::manifest::StoredObject;
use crate::backup::store::{Store, StoreError};

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
