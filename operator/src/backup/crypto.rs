//! Client-side encryption of backup streams: a chunked STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizár, "Online authenticated-encryption and its nonce-reuse misuse-resistance") over AES-256-GCM or
//! XChaCha20-Poly1305.
//!
//! Layout of an encrypted object:
//!
//! ```text
//! header (32 bytes): magic "CRMGBK01" | algorithm (1) | log2(chunk size) (1) | reserved (2) | nonce prefix (19) | 0 (1)
//! chunk 0 .. n-1:    ciphertext of exactly `chunk size` plaintext bytes + 16-byte tag   (last flag 0)
//! final chunk:       ciphertext of 0 .. chunk size - 1 plaintext bytes + 16-byte tag    (last flag 1)
//! ```
//!
//! The nonce of chunk `i` is `prefix || be32(i) || last`, where `prefix` is the first 7 (AES-GCM) or 19
//! (XChaCha20) bytes of the header's random nonce prefix. Every chunk authenticates the whole header plus a
//! purpose label (`database`, `attachments`) as associated data. So a flipped bit anywhere, reordered or
//! dropped chunks, a truncated stream (the final chunk is missing), bytes appended after the final chunk, and a
//! swap of one object of a backup for another are all detected.
//!
//! Each backup has its own random 256-bit data key; it is stored only wrapped (see `keys`).

use std::io::{self, Read, Write};

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::api::backup_policy::Algorithm;

/// Magic bytes at the start of every encrypted object (format version 1).
pub const MAGIC: &[u8; 8] = b"CRMGBK01";
/// Length of the header.
pub const HEADER_LEN: usize = 32;
/// Length of an authentication tag.
pub const TAG_LEN: usize = 16;
/// Default plaintext chunk size: 1 MiB (2^20).
pub const DEFAULT_CHUNK_LOG2: u8 = 20;
/// Length of a data key.
pub const KEY_LEN: usize = 32;

/// A 256-bit data key. Its bytes are never printed: `Debug` shows a placeholder.
#[derive(Clone)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| CryptoError::Random(e.to_string()))?;
        Ok(DataKey(k))
    }

    /// A key from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let k: [u8; KEY_LEN] = bytes.try_into().map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        Ok(DataKey(k))
    }

    /// The key bytes (for wrapping only).
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        // Best effort: overwrite the key material before the memory is released.
        self.0 = [0u8; KEY_LEN];
    }
}

/// What can go wrong while encrypting or decrypting. Messages never contain key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the random number generator failed: {0}")]
    Random(String),
    #[error("a data key must be 32 bytes, got {0}")]
    KeyLength(usize),
    #[error("not a crmguard encrypted backup (bad magic bytes); the object was replaced or is not a backup")]
    BadMagic,
    #[error("unsupported encryption header: {0}")]
    BadHeader(String),
    #[error(
        "authentication failed at chunk {chunk}: the backup was modified, corrupted or decrypted with the wrong key"
    )]
    Authentication { chunk: u64 },
    #[error("the backup is truncated: it ends after chunk {chunks} without its final chunk")]
    Truncated { chunks: u64 },
    #[error("the backup has too many chunks for its nonce space")]
    TooManyChunks,
}

impl From<CryptoError> for io::Error {
    fn from(e: CryptoError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Algorithm id in the header.
fn algorithm_id(a: Algorithm) -> u8 {
    match a {
        Algorithm::Aes256Gcm => 1,
        Algorithm::Xchacha20Poly1305 => 2,
    }
}

fn algorithm_from_id(id: u8) -> Result<Algorithm, CryptoError> {
    match id {
        1 => Ok(Algorithm::Aes256Gcm),
        2 => Ok(Algorithm::Xchacha20Poly1305),
        other => Err(CryptoError::BadHeader(format!("unknown algorithm id {other}"))),
    }
}

/// The parsed header of an encrypted object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub algorithm: Algorithm,
    pub chunk_log2: u8,
    pub nonce_prefix: [u8; 19],
}

impl Header {
    /// A header with a fresh random nonce prefix.
    pub fn new(algorithm: Algorithm, chunk_log2: u8) -> Result<Self, CryptoError> {
        let mut nonce_prefix = [0u8; 19];
        getrandom::fill(&mut nonce_prefix).map_err(|e| CryptoError::Random(e.to_string()))?;
        Ok(Header { algorithm, chunk_log2, nonce_prefix })
    }

    /// Plaintext bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        1usize << self.chunk_log2
    }

    /// Serialised header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = algorithm_id(self.algorithm);
        h[9] = self.chunk_log2;
        h[12..31].copy_from_slice(&self.nonce_prefix);
        h
    }

    /// Parses a header.
    pub fn parse(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() < HEADER_LEN {
            return Err(CryptoError::Truncated { chunks: 0 });
        }
        if &bytes[..8] != MAGIC {
            return Err(CryptoError::BadMagic);
        }
        let algorithm = algorithm_from_id(bytes[8])?;
        let chunk_log2 = bytes[9];
        if !(10..=24).contains(&chunk_log2) {
            return Err(CryptoError::BadHeader(format!("chunk size 2^{chunk_log2} out of range")));
        }
        if bytes[10..12] != [0, 0] || bytes[31] != 0 {
            return Err(CryptoError::BadHeader("reserved bytes are not zero".into()));
        }
        let mut nonce_prefix = [0u8; 19];
        nonce_prefix.copy_from_slice(&bytes[12..31]);
        Ok(Header { algorithm, chunk_log2, nonce_prefix })
    }

    /// Size of the encrypted object for `plaintext` bytes.
    pub fn encrypted_len(&self, plaintext: u64) -> u64 {
        let cs = self.chunk_size() as u64;
        let chunks = plaintext / cs + 1;
        HEADER_LEN as u64 + plaintext + chunks * TAG_LEN as u64
    }
}

enum Cipher {
    /// ring's AES-256-GCM (AES-NI/VAES and carry-less multiplication where the CPU has them).
    Aes(Box<LessSafeKey>),
    XChaCha(Box<XChaCha20Poly1305>),
}

fn aes256gcm(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, CryptoError> {
    // ring refuses only a key of the wrong length, which the type rules out.
    UnboundKey::new(&AES_256_GCM, key).map(LessSafeKey::new).map_err(|_| CryptoError::KeyLength(key.len()))
}

/// AES-256-GCM of `msg` under `key` with a 96-bit nonce: ciphertext followed by the 16-byte tag. (Key wrapping.)
pub(crate) fn aes256gcm_seal(
    key: &[u8; KEY_LEN],
    nonce: [u8; 12],
    aad: &[u8],
    msg: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(msg.len() + TAG_LEN);
    out.extend_from_slice(msg);
    aes256gcm(key)?
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out)
        .map_err(|_| CryptoError::BadHeader("AES-GCM refused to seal the message".into()))?;
    Ok(out)
}

/// Opens what [`aes256gcm_seal`] produced; `None` when authentication fails.
pub(crate) fn aes256gcm_open(key: &[u8; KEY_LEN], nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let mut buf = sealed.to_vec();
    let n =
        aes256gcm(key).ok()?.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf).ok()?.len();
    buf.truncate(n);
    Some(buf)
}

/// Seals and opens the chunks of one object.
pub struct ChunkCipher {
    cipher: Cipher,
    header: Header,
    aad: Vec<u8>,
}

impl std::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCipher").field("header", &self.header).finish_non_exhaustive()
    }
}

impl ChunkCipher {
    /// A cipher for the object with this header and purpose label.
    pub fn new(key: &DataKey, header: Header, purpose: &str) -> Result<Self, CryptoError> {
        let cipher = match header.algorithm {
            Algorithm::Aes256Gcm => Cipher::Aes(Box::new(aes256gcm(key.expose())?)),
            Algorithm::Xchacha20Poly1305 => Cipher::XChaCha(Box::new(XChaCha20Poly1305::new(key.expose().into()))),
        };
        let mut aad = header.to_bytes().to_vec();
        aad.extend_from_slice(purpose.as_bytes());
        Ok(ChunkCipher { cipher, header, aad })
    }

    /// The header this cipher was made for.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The nonce of chunk `index`: the header's prefix (7 bytes for AES-GCM, 19 for XChaCha20), the
    /// big-endian chunk counter and the last-chunk flag; 12 or 24 bytes, in a 24-byte array.
    fn nonce(&self, index: u64, last: bool) -> Result<([u8; 24], usize), CryptoError> {
        let counter = u32::try_from(index).map_err(|_| CryptoError::TooManyChunks)?;
        let prefix_len = match self.cipher {
            Cipher::Aes(_) => 7,
            Cipher::XChaCha(_) => 19,
        };
        let mut n = [0u8; 24];
        n[..prefix_len].copy_from_slice(&self.header.nonce_prefix[..prefix_len]);
        n[prefix_len..prefix_len + 4].copy_from_slice(&counter.to_be_bytes());
        n[prefix_len + 4] = u8::from(last);
        Ok((n, prefix_len + 5))
    }

    /// Encrypts chunk `index` in place: `buf` holds the plaintext and then the ciphertext and its tag.
    pub fn seal_in_place(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let (nonce, len) = self.nonce(index, last)?;
        let sealed = match &self.cipher {
            Cipher::Aes(c) => {
                let nonce = Nonce::try_assume_unique_for_key(&nonce[..len]).map_err(|_| CryptoError::TooManyChunks)?;
                c.seal_in_place_append_tag(nonce, Aad::from(&self.aad), buf).is_ok()
            }
            Cipher::XChaCha(c) => c.encrypt_in_place(nonce[..len].into(), &self.aad, buf).is_ok(),
        };
        if sealed { Ok(()) } else { Err(CryptoError::Authentication { chunk: index }) }
    }

    /// Decrypts and authenticates chunk `index` in place: `buf` holds the ciphertext and its tag, and then the
    /// plaintext alone. On failure its contents are unspecified.
    pub fn open_in_place(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let (nonce, len) = self.nonce(index, last)?;
        let fail = CryptoError::Authentication { chunk: index };
        match &self.cipher {
            Cipher::Aes(c) => {
                let nonce = Nonce::try_assume_unique_for_key(&nonce[..len]).map_err(|_| CryptoError::TooManyChunks)?;
                let plain = c.open_in_place(nonce, Aad::from(&self.aad), buf).map_err(|_| fail)?.len();
                buf.truncate(plain);
                Ok(())
            }
            Cipher::XChaCha(c) => c.decrypt_in_place(nonce[..len].into(), &self.aad, buf).map_err(|_| fail),
        }
    }

    /// Decrypts and authenticates chunk `index` into a new buffer.
    pub fn open(&self, index: u64, last: bool, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = ciphertext.to_vec();
        self.open_in_place(index, last, &mut buf)?;
        Ok(buf)
    }
}

/// A writer that encrypts everything written to it into `inner`. Call [`EncryptWriter::finish`] to write
/// the final chunk; dropping it without `finish` leaves a truncated (and so detectably incomplete) object.
pub struct EncryptWriter<W: Write> {
    inner: W,
    cipher: ChunkCipher,
    buf: Vec<u8>,
    index: u64,
    header_written: bool,
}

impl<W: Write> std::fmt::Debug for EncryptWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptWriter").field("chunks", &self.index).finish_non_exhaustive()
    }
}

impl<W: Write> EncryptWriter<W> {
    /// Starts an encrypted object.
    pub fn new(inner: W, key: &DataKey, header: Header, purpose: &str) -> Result<Self, CryptoError> {
        let cs = header.chunk_size();
        Ok(EncryptWriter {
            inner,
            cipher: ChunkCipher::new(key, header, purpose)?,
            // Room for the tag too: chunks are sealed in place.
            buf: Vec::with_capacity(cs + TAG_LEN),
            index: 0,
            header_written: false,
        })
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.inner.write_all(&self.cipher.header().to_bytes())?;
            self.header_written = true;
        }
        Ok(())
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        self.write_header()?;
        self.cipher.seal_in_place(self.index, last, &mut self.buf)?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Writes the final chunk and returns the inner writer and the number of chunks.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.emit(true)?;
        self.inner.flush()?;
        Ok((self.inner, self.index))
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let cs = self.cipher.header().chunk_size();
        let take = data.len().min(cs - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == cs {
            self.emit(false)?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks are only emitted whole; flushing the inner writer is all that can be done.
        self.inner.flush()
    }
}

/// How a decrypting reader learns the key once it has seen the header.
pub type KeyFor<'a> = Box<dyn FnOnce(&Header) -> Result<DataKey, CryptoError> + Send + 'a>;

/// A reader that decrypts and authenticates an encrypted object read from `inner`. It returns an error (never
/// silently short data) on any modification, truncation or trailing data.
pub struct DecryptReader<R: Read> {
    inner: R,
    key: Option<DataKey>,
    purpose: String,
    cipher: Option<ChunkCipher>,
    out: Vec<u8>,
    pos: usize,
    index: u64,
    done: bool,
    /// A chunk failed: nothing more is returned, only errors (its unauthenticated bytes are gone).
    failed: bool,
}

impl<R: Read> std::fmt::Debug for DecryptReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptReader").field("chunks", &self.index).field("done", &self.done).finish_non_exhaustive()
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> DecryptReader<R> {
    /// Decrypts `inner` with `key` for the given purpose label.
    pub fn new(inner: R, key: DataKey, purpose: &str) -> Self {
        DecryptReader {
            inner,
            key: Some(key),
            purpose: purpose.to_string(),
            cipher: None,
            out: Vec::new(),
            pos: 0,
            index: 0,
            done: false,
            failed: false,
        }
    }

    /// Chunks authenticated so far.
    pub fn chunks(&self) -> u64 {
        self.index
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        if self.cipher.is_none() {
            let mut h = [0u8; HEADER_LEN];
            let n = read_full(&mut self.inner, &mut h)?;
            if n < HEADER_LEN {
                return Err(CryptoError::Truncated { chunks: 0 }.into());
            }
            let header = Header::parse(&h)?;
            let key = self.key.take().ok_or(CryptoError::KeyLength(0))?;
            self.out = Vec::with_capacity(header.chunk_size() + TAG_LEN);
            self.cipher = Some(ChunkCipher::new(&key, header, &self.purpose)?);
        }
        let Some(cipher) = &self.cipher else { return Ok(()) };
        let full = cipher.header().chunk_size() + TAG_LEN;
        // A full chunk is never the final one (the final chunk holds 0 .. chunk size - 1 bytes), so a full read
        // is opened as a non-final chunk; a full chunk followed by EOF shows up as a short read of 0 bytes: the
        // final chunk is missing.
        // Each chunk is read into `out` and opened there: no second buffer, no copy.
        self.out.resize(full, 0);
        let n = read_full(&mut self.inner, &mut self.out[..full])?;
        self.out.truncate(n);
        if n == full {
            cipher.open_in_place(self.index, false, &mut self.out)?;
        } else if n < TAG_LEN {
            return Err(CryptoError::Truncated { chunks: self.index }.into());
        } else {
            // `read_full` stopped short, so the input has ended: this is the final chunk. Bytes appended to
            // an object make this chunk fail authentication (as a final or as a full chunk).
            cipher.open_in_place(self.index, true, &mut self.out)?;
            self.done = true;
        }
        self.pos = 0;
        self.index += 1;
        Ok(())
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "an earlier chunk failed"));
            }
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_chunk() {
                self.failed = true;
                self.out.clear();
                self.pos = 0;
                return Err(e);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Where chunk `index` of an object with this header starts, and how long a full chunk is.
pub fn chunk_offset(header: &Header, index: u64) -> u64 {
    HEADER_LEN as u64 + index * (header.chunk_size() + TAG_LEN) as u64
}

/// Number of chunks of an encrypted object of `stored` bytes, or an error when the size cannot be right.
pub fn chunk_count(header: &Header, stored: u64) -> Result<u64, CryptoError> {
    let full = (header.chunk_size() + TAG_LEN) as u64;
    let body = stored.checked_sub(HEADER_LEN as u64).ok_or(CryptoError::Truncated { chunks: 0 })?;
    let last = body % full;
    if last < TAG_LEN as u64 {
        return Err(CryptoError::Truncated { chunks: body / full });
    }
    Ok(body / full + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypt(data: &[u8], key: &DataKey, alg: Algorithm, log2: u8, purpose: &str) -> Vec<u8> {
        let header = Header::new(alg, log2).unwrap();
        let mut w = EncryptWriter::new(Vec::new(), key, header, purpose).unwrap();
        // Uneven writes, to exercise chunk boundaries.
        for piece in data.chunks(777) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap().0
    }

    fn decrypt(data: &[u8], key: &DataKey, purpose: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        DecryptReader::new(data, key.clone(), purpose).read_to_end(&mut out)?;
        Ok(out)
    }

    fn crypto_err(e: io::Error) -> CryptoError {
        e.into_inner().and_then(|e| e.downcast::<CryptoError>().ok()).map(|b| *b).unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_every_size_around_chunk_boundaries_for_both_algorithms() {
        let key = DataKey::generate().unwrap();
        for alg in [Algorithm::Aes256Gcm, Algorithm::Xchacha20Poly1305] {
            for len in [0, 1, 1023, 1024, 1025, 2048, 5000] {
                let data = sample(len);
                let enc = encrypt(&data, &key, alg, 10, "database");
                assert_eq!(enc.len() as u64, Header::new(alg, 10).unwrap().encrypted_len(len as u64));
                assert_eq!(decrypt(&enc, &key, "database").unwrap(), data, "{alg:?} len {len}");
                let header = Header::parse(&enc).unwrap();
                assert_eq!(chunk_count(&header, enc.len() as u64).unwrap(), (len / 1024 + 1) as u64);
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let key = DataKey::generate().unwrap();
        let enc = encrypt(&sample(2500), &key, Algorithm::Aes256Gcm, 10, "database");
        for pos in (0..enc.len()).step_by(7) {
            let mut bad = enc.clone();
            bad[pos] ^= 0x04;
            assert!(decrypt(&bad, &key, "database").is_err(), "flip at byte {pos} went unnoticed");
        }
    }

    #[test]
    fn truncation_at_any_length_is_detected() {
        let key = DataKey::generate().unwrap();
        let enc = encrypt(&sample(3072), &key, Algorithm::Xchacha20Poly1305, 10, "database");
        for cut in 0..enc.len() {
            assert!(decrypt(&enc[..cut], &key, "database").is_err(), "truncated to {cut} bytes went unnoticed");
        }
        // Cut exactly after the third full chunk: the final chunk is missing.
        let header = Header::parse(&enc).unwrap();
        let cut = chunk_offset(&header, 3) as usize;
        assert_eq!(
            crypto_err(decrypt(&enc[..cut], &key, "database").unwrap_err()),
            CryptoError::Truncated { chunks: 3 }
        );
    }

    #[test]
    fn reordered_chunks_appended_data_wrong_key_and_wrong_purpose_are_detected() {
        let key = DataKey::generate().unwrap();
        let enc = encrypt(&sample(3000), &key, Algorithm::Aes256Gcm, 10, "database");
        let header = Header::parse(&enc).unwrap();
        let (a, b) = (chunk_offset(&header, 0) as usize, chunk_offset(&header, 1) as usize);
        let full = b - a;
        let mut swapped = enc.clone();
        swapped[a..b].copy_from_slice(&enc[b..b + full]);
        swapped[b..b + full].copy_from_slice(&enc[a..b]);
        assert_eq!(
            crypto_err(decrypt(&swapped, &key, "database").unwrap_err()),
            CryptoError::Authentication { chunk: 0 }
        );

        let mut appended = enc.clone();
        appended.push(0);
        assert_eq!(
            crypto_err(decrypt(&appended, &key, "database").unwrap_err()),
            CryptoError::Authentication { chunk: 2 }
        );

        let other = DataKey::generate().unwrap();
        assert_eq!(
            crypto_err(decrypt(&enc, &other, "database").unwrap_err()),
            CryptoError::Authentication { chunk: 0 }
        );
        assert!(decrypt(&enc, &key, "attachments").is_err(), "an object is bound to its purpose");

        let mut not_ours = enc.clone();
        not_ours[0] = b'X';
        assert_eq!(crypto_err(decrypt(&not_ours, &key, "database").unwrap_err()), CryptoError::BadMagic);
    }

    #[test]
    fn the_same_plaintext_encrypts_differently_each_time() {
        let key = DataKey::generate().unwrap();
        let a = encrypt(b"same", &key, Algorithm::Aes256Gcm, 10, "database");
        let b = encrypt(b"same", &key, Algorithm::Aes256Gcm, 10, "database");
        assert_ne!(a, b, "random nonce prefix per object");
    }

    #[test]
    fn single_chunks_can_be_opened_by_index_for_sampled_verification() {
        let key = DataKey::generate().unwrap();
        let data = sample(4096 + 10);
        let enc = encrypt(&data, &key, Algorithm::Aes256Gcm, 10, "database");
        let header = Header::parse(&enc).unwrap();
        let cipher = ChunkCipher::new(&key, header.clone(), "database").unwrap();
        let n = chunk_count(&header, enc.len() as u64).unwrap();
        assert_eq!(n, 5);
        let off = chunk_offset(&header, 2) as usize;
        let plain = cipher.open(2, false, &enc[off..off + 1024 + TAG_LEN]).unwrap();
        assert_eq!(plain, &data[2048..3072]);
        let off = chunk_offset(&header, 4) as usize;
        assert_eq!(cipher.open(4, true, &enc[off..]).unwrap(), &data[4096..]);
    }

    /// Objects written before any change to this module must stay readable: fixed key, nonce prefix and data
    /// give exactly these bytes (recorded from the first implementation, RustCrypto's aes-gcm and
    /// chacha20poly1305), and they decrypt.
    #[test]
    fn the_format_is_stable_known_answers_for_both_algorithms() {
        use sha2::Digest;
        let key = DataKey::from_bytes(&[7u8; 32]).unwrap();
        let mut nonce_prefix = [0u8; 19];
        for (i, b) in nonce_prefix.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        for (alg, expected) in [
            (Algorithm::Aes256Gcm, "9b8658255979222430ae7760f875168d9c0e9e47f2ef34b797361b5f18725484"),
            (Algorithm::Xchacha20Poly1305, "c0c7740ddd4469370965b68ca87ba13e7145a911d1e9749e267f7d8996c41943"),
        ] {
            let header = Header { algorithm: alg, chunk_log2: 10, nonce_prefix };
            let data = sample(2500);
            let mut w = EncryptWriter::new(Vec::new(), &key, header, "database").unwrap();
            w.write_all(&data).unwrap();
            let enc = w.finish().unwrap().0;
            assert_eq!(enc.len(), 2580);
            let digest: String = sha2::Sha256::digest(&enc).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(digest, expected, "{alg:?}");
            assert_eq!(decrypt(&enc, &key, "database").unwrap(), data);
        }
    }

    #[test]
    fn reads_after_a_failed_chunk_return_errors_never_data() {
        let key = DataKey::generate().unwrap();
        let mut enc = encrypt(&sample(3000), &key, Algorithm::Aes256Gcm, 10, "database");
        let header = Header::parse(&enc).unwrap();
        enc[chunk_offset(&header, 1) as usize + 5] ^= 1;
        let mut r = DecryptReader::new(enc.as_slice(), key, "database");
        let mut first = vec![0u8; 1024];
        r.read_exact(&mut first).unwrap();
        assert_eq!(first, &sample(3000)[..1024]);
        let mut buf = [0u8; 64];
        assert!(r.read(&mut buf).is_err());
        assert!(r.read(&mut buf).is_err(), "a second read after the failure must not return bytes or EOF");
    }

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let key = DataKey::from_bytes(&[0xAB; 32]).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab"), "{shown}");
    }
}
