//! The catalog: one `manifest.json` per backup, written last. A backup without a manifest does not exist for
//! listing, retention or restore; its leftovers (objects, unfinished multipart uploads) are removed later.
//!
//! Key layout under the policy's prefix:
//!
//! ```text
//! <prefix>/<id>/database.dump.zst.enc     the database dump (zstd, then encrypted; `.zst` when unencrypted)
//! <prefix>/<id>/attachments.tar.zst.enc   the attachments volume as a tar stream (optional)
//! <prefix>/<id>/manifest.json             the commit record, written only after verification passed
//! ```

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use ring::{hkdf, hmac};

use super::crypto::DataKey;
use super::keys::WrappedKey;
use super::store::{Store, StoreError};
use crate::api::backup_policy::{Algorithm, Engine, VerificationMode};

/// Manifest format version. 2: an encrypted backup's manifest carries `mac`, its authentication under the
/// backup's data key.
pub const FORMAT: u32 = 2;
/// File name of the commit record.
pub const MANIFEST: &str = "manifest.json";

/// Purpose labels (bound into the encryption) and object names.
pub const DATABASE: &str = "database";
pub const ATTACHMENTS: &str = "attachments";

/// One stored object of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredObject {
    /// `database` or `attachments`.
    pub purpose: String,
    /// Full key in the bucket.
    pub key: String,
    /// Bytes produced by the source (dump or tar stream).
    pub raw_bytes: u64,
    /// Bytes after zstd.
    pub compressed_bytes: u64,
    /// Bytes stored (after encryption).
    pub stored_bytes: u64,
    /// sha256 of the stored bytes (hex).
    pub sha256: String,
    /// Encryption chunks (0 when unencrypted).
    pub chunks: u64,
    /// Multipart upload parts.
    pub parts: u32,
    /// Objects the stored stream is split into, every one a multipart upload of at most 10 000 parts (S3's
    /// limit): 1 except for huge backups. The first is `key`, the next `key.0001`, `key.0002`, ...; their
    /// concatenation is the stored stream that `sha256` and `stored_bytes` describe.
    #[serde(default = "one_segment", skip_serializing_if = "is_one_segment")]
    pub segments: u32,
}

fn one_segment() -> u32 {
    1
}

fn is_one_segment(n: &u32) -> bool {
    *n == 1
}

/// The key of segment `index` of an object stored at `key`.
pub fn segment_key(key: &str, index: u32) -> String {
    if index == 0 { key.to_string() } else { format!("{key}.{index:04}") }
}

impl StoredObject {
    /// Every key the object occupies, in stream order.
    pub fn segment_keys(&self) -> Vec<String> {
        (0..self.segments.max(1)).map(|i| segment_key(&self.key, i)).collect()
    }
}

/// Encryption facts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionInfo {
    pub algorithm: Algorithm,
    /// Plaintext bytes per chunk.
    pub chunk_size: u64,
    /// The data key, wrapped, and what wrapped it.
    pub key: WrappedKey,
}

/// Result of the verification that preceded the commit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationRecord {
    pub mode: VerificationMode,
    pub time: Timestamp,
    /// Chunks decrypted and authenticated, per object, out of `chunks`.
    pub decrypted_chunks: u64,
    /// Whether the whole stream was decompressed (zstd's content checksum and the raw size checked).
    pub raw_checked: bool,
    /// Seconds spent verifying.
    #[serde(default)]
    pub seconds: f64,
}

/// The commit record of one backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub policy: String,
    pub namespace: String,
    pub engine: Engine,
    pub database: String,
    pub started: Timestamp,
    pub completed: Timestamp,
    /// `crmguard <version>`.
    pub tool: String,
    /// Version line of the dump tool, e.g. `pg_dump (PostgreSQL) 15.18`.
    pub dump_tool: String,
    pub compression: Compression,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
    pub objects: Vec<StoredObject>,
    /// Rows per table (`schema.table`), counted in the dump's own snapshot.
    #[serde(default)]
    pub tables: BTreeMap<String, u64>,
    pub verification: VerificationRecord,
    /// HMAC-SHA256 (hex) of this manifest without `mac` (compact JSON, fields in this order, maps sorted) under a
    /// key derived from the backup's data key (HKDF-SHA256, salt `crmguard manifest mac v1`, info the backup id):
    /// no field can be changed, added or removed without the key. Absent when the backup is not encrypted (there
    /// is no key to bind it to) and in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Compression facts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

/// Why a manifest does not prove itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error(
        "the manifest of backup {0} was changed after the backup was made: its MAC does not match under the \
         backup's own key (every field of manifest.json is authenticated). Restore another backup, and find out who \
         can write to the bucket"
    )]
    Changed(String),
    #[error(
        "the manifest of backup {0} carries no MAC although the backup is encrypted (format {1}): it was made before \
         crmguard authenticated manifests, or the MAC was removed. If you know the backup is intact, pass \
         --allow-unauthenticated-manifest"
    )]
    Missing(String, u32),
    #[error("cannot compute the manifest's MAC: {0}")]
    Internal(String),
}

impl Manifest {
    /// The key the MAC is made with: derived from the data key and bound to the backup id.
    fn mac_key(&self, dek: &DataKey) -> Result<hmac::Key, Unauthenticated> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"crmguard manifest mac v1").extract(dek.expose());
        let info = [self.id.as_bytes()];
        let okm = prk.expand(&info, hmac::HMAC_SHA256).map_err(|_| Unauthenticated::Internal("HKDF expand".into()))?;
        Ok(hmac::Key::from(okm))
    }

    /// What the MAC covers: the manifest without `mac`, as compact JSON.
    fn mac_input(&self) -> Result<Vec<u8>, Unauthenticated> {
        let mut m = self.clone();
        m.mac = None;
        serde_json::to_vec(&m).map_err(|e| Unauthenticated::Internal(e.to_string()))
    }

    /// Sets `mac` for the backup's data key.
    pub fn seal(&mut self, dek: &DataKey) -> Result<(), Unauthenticated> {
        let tag = hmac::sign(&self.mac_key(dek)?, &self.mac_input()?);
        self.mac = Some(super::report::hex(tag.as_ref()));
        Ok(())
    }

    /// Checks `mac` against the backup's data key (in constant time).
    pub fn check_seal(&self, dek: &DataKey) -> Result<(), Unauthenticated> {
        let Some(mac) = &self.mac else { return Err(Unauthenticated::Missing(self.id.clone(), self.format)) };
        let bytes = super::report::unhex(mac).ok_or_else(|| Unauthenticated::Changed(self.id.clone()))?;
        hmac::verify(&self.mac_key(dek)?, &self.mac_input()?, &bytes)
            .map_err(|_| Unauthenticated::Changed(self.id.clone()))
    }

    /// The object with this purpose.
    pub fn object(&self, purpose: &str) -> Option<&StoredObject> {
        self.objects.iter().find(|o| o.purpose == purpose)
    }

    /// Total stored bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_bytes).sum()
    }

    /// Duration of the backup in seconds.
    pub fn duration_seconds(&self) -> i64 {
        self.completed.duration_since(self.started).as_secs()
    }
}

/// Key of an object of backup `id`.
pub fn object_key(prefix: &str, id: &str, name: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() { format!("{id}/{name}") } else { format!("{prefix}/{id}/{name}") }
}

/// A new backup id: the UTC start time (sortable) plus 4 random hex digits.
pub fn new_id(now: Timestamp) -> String {
    let mut r = [0u8; 2];
    // A failing RNG only makes the suffix predictable; the timestamp still orders ids.
    let _ = getrandom::fill(&mut r);
    format!("{}-{:02x}{:02x}", now.strftime("%Y%m%dT%H%M%SZ"), r[0], r[1])
}

/// The catalog: every committed backup under a prefix, oldest first, plus what is not committed.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub backups: Vec<Manifest>,
    /// Manifests that could not be read or parsed (key and reason); they are reported, never deleted.
    pub unreadable: Vec<(String, String)>,
    /// Ids that have objects but no manifest (unfinished or failed backups), with their newest object time.
    pub uncommitted: Vec<(String, Vec<String>, Option<Timestamp>)>,
}

/// Reads the catalog under `prefix`.
pub async fn read_catalog(store: &Store, prefix: &str) -> Result<Catalog, StoreError> {
    let root = format!("{}/", prefix.trim_matches('/'));
    let root = if root == "/" { String::new() } else { root };
    let objects = store.list(&root).await?;
    let mut by_id: BTreeMap<String, (Vec<String>, Option<Timestamp>, bool)> = BTreeMap::new();
    for o in &objects {
        let rest = &o.key[root.len()..];
        let Some((id, name)) = rest.split_once('/') else { continue };
        let e = by_id.entry(id.to_string()).or_default();
        e.0.push(o.key.clone());
        e.1 = e.1.max(o.modified);
        if name == MANIFEST {
            e.2 = true;
        }
    }
    let mut catalog = Catalog::default();
    for (id, (keys, modified, committed)) in by_id {
        if !committed {
            catalog.uncommitted.push((id, keys, modified));
            continue;
        }
        let key = object_key(prefix, &id, MANIFEST);
        match store.get(&key).await {
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if m.id == id => catalog.backups.push(m),
                Ok(m) => catalog.unreadable.push((key, format!("manifest names id {:?}", m.id))),
                Err(e) => catalog.unreadable.push((key, e.to_string())),
            },
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    catalog.backups.sort_by(|a, b| a.completed.cmp(&b.completed).then_with(|| a.id.cmp(&b.id)));
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format": FORMAT, "id": "20261202T010203Z-abcd", "policy": "p", "namespace": "crm", "engine": "postgres",
            "database": "crm", "started": "2026-12-02T01:02:03Z", "completed": "2026-12-02T01:03:04.5Z",
            "tool": "crmguard 0", "dumpTool": "pg_dump 15", "compression": {"algorithm": "zstd", "level": 1},
            "objects": [], "tables": {"public.contacts": 5000, "finance.deals": 777},
            "verification": {"mode": "full", "time": "2026-12-02T01:03:04.5Z", "decryptedChunks": 3,
                             "rawChecked": true, "seconds": 0.123456789}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_sealed_manifest_survives_storage_and_any_edit_or_other_key_breaks_it() {
        let key = DataKey::from_bytes(&[7u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let mut m = sample();
        m.seal(&key).unwrap_or_else(|e| panic!("{e}"));
        // As stored (pretty JSON) and read back.
        let stored = serde_json::to_vec_pretty(&m).unwrap_or_default();
        let read: Manifest = serde_json::from_slice(&stored).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.check_seal(&key), Ok(()));
        let mut edited = read.clone();
        edited.tables.insert("public.contacts".into(), 4999);
        assert_eq!(edited.check_seal(&key), Err(Unauthenticated::Changed(m.id.clone())));
        let mut dropped = read.clone();
        dropped.tables.remove("finance.deals");
        assert!(dropped.check_seal(&key).is_err());
        let other = DataKey::from_bytes(&[8u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        assert!(read.check_seal(&other).is_err());
        // The MAC is bound to the id: the same content under another id does not verify.
        let mut moved = read.clone();
        moved.id = "20261202T010203Z-ffff".into();
        assert!(moved.check_seal(&key).is_err());
        let mut stripped = read;
        stripped.mac = None;
        assert!(matches!(stripped.check_seal(&key), Err(Unauthenticated::Missing(..))));
    }

    #[test]
    fn ids_sort_by_time_and_keys_join_cleanly() {
        let a = new_id("2026-11-29T02:15:00Z".parse().unwrap());
        let b = new_id("2026-11-30T02:15:00Z".parse().unwrap());
        assert!(a.starts_with("20261129T021500Z-") && a.len() == 21, "{a}");
        assert!(a < b);
        assert_eq!(object_key("/crm/prod/", "x", MANIFEST), "crm/prod/x/manifest.json");
        assert_eq!(segment_key("a/database.dump.zst.enc", 0), "a/database.dump.zst.enc");
        assert_eq!(segment_key("a/database.dump.zst.enc", 12), "a/database.dump.zst.enc.0012");
        assert_eq!(object_key("", "x", MANIFEST), "x/manifest.json");
    }
}
