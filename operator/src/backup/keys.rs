//! Key-encryption keys: each backup's random data key is stored only wrapped, either by Vault Transit (the key
//! never leaves Vault) or by a 32-byte key from a Kubernetes Secret (AES-256-GCM with the backup id as
//! associated data, so a wrapped key cannot be moved to another backup).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::crypto::{self, DataKey, KEY_LEN};
use crate::api::backup_policy::EncryptionKey;
use crate::vault::{VaultError, describe};

/// The wrapped data key and what wrapped it, as recorded in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum WrappedKey {
    /// Wrapped by a key from a Kubernetes Secret; `fingerprint` identifies that key without revealing it.
    #[serde(rename_all = "camelCase")]
    Secret { fingerprint: String, ciphertext: String },
    /// Wrapped by Vault Transit.
    #[serde(rename_all = "camelCase")]
    VaultTransit { mount: String, key_name: String, ciphertext: String },
}

/// What can go wrong with keys. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the encryption key (CRMGUARD_ENCRYPTION_KEY, from encryption.key.secretRef) is not set: the backup job \
         reads it from the Secret named in the policy"
    )]
    Missing,
    #[error(
        "the encryption key must be 32 random bytes, base64-encoded (44 characters) or hex (64 characters); got a \
         value of {0} bytes. Create one with: head -c 32 /dev/urandom | base64"
    )]
    Format(usize),
    #[error(
        "wrong encryption key: this backup's data key was wrapped by the key with fingerprint {expected}, but the \
         key provided has fingerprint {actual}. Use the key the backup was made with (keys rotated out must be kept \
         to read older backups)"
    )]
    WrongKey { expected: String, actual: String },
    #[error("the wrapped data key in this backup's manifest was changed or damaged: {0}")]
    Damaged(String),
    #[error(
        "the manifest of this backup was edited: it says the data key was wrapped by the key with fingerprint \
         {recorded}, but it was wrapped by the key provided (fingerprint {actual})"
    )]
    Relabelled { recorded: String, actual: String },
    #[error("cannot wrap the data key: {0}")]
    Internal(String),
    #[error(
        "this backup's key was wrapped by {found}, but the policy now names {configured}; restore with the key \
         the backup was made with"
    )]
    Mismatch { found: String, configured: String },
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("random number generator failed: {0}")]
    Random(String),
}

/// A key-encryption key, ready to wrap and unwrap data keys.
pub enum Kek {
    Secret { key: [u8; KEY_LEN] },
    VaultTransit { client: Box<vaultrs::client::VaultClient>, mount: String, key_name: String },
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kek::Secret { key } => write!(f, "Kek::Secret(fingerprint {})", fingerprint(key)),
            Kek::VaultTransit { mount, key_name, .. } => write!(f, "Kek::VaultTransit({mount}/{key_name})"),
        }
    }
}

/// A short public identifier of a secret key: the first 16 hex digits of a domain-separated SHA-256. It lets a
/// wrong key be named as wrong without revealing anything about the key.
pub fn fingerprint(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"crmguard key fingerprint v1\0");
    h.update(key);
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Parses a key given as base64 (standard), 64 hex digits or 32 raw bytes.
pub fn parse_secret_key(value: &[u8]) -> Result<[u8; KEY_LEN], KeyError> {
    let trimmed: Vec<u8> = value.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if trimmed.len() == 64 && trimmed.iter().all(u8::is_ascii_hexdigit) {
        let mut k = [0u8; KEY_LEN];
        for (i, pair) in trimmed.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| KeyError::Format(value.len()))?;
            k[i] = u8::from_str_radix(s, 16).map_err(|_| KeyError::Format(value.len()))?;
        }
        return Ok(k);
    }
    if let Ok(decoded) = B64.decode(&trimmed)
        && decoded.len() == KEY_LEN
    {
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&decoded);
        return Ok(k);
    }
    if value.len() == KEY_LEN {
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(value);
        return Ok(k);
    }
    Err(KeyError::Format(value.len()))
}

fn wrap_aad(backup_id: &str) -> Vec<u8> {
    format!("crmguard data key v1\0{backup_id}").into_bytes()
}

impl Kek {
    /// The key named by a policy: the Secret's key from `CRMGUARD_ENCRYPTION_KEY`, or a Vault Transit key (after a
    /// Vault login).
    pub async fn from_policy(key: &EncryptionKey) -> Result<Kek, KeyError> {
        if let Some(t) = &key.vault_transit {
            let client = crate::vault::login(&t.auth_mount, &t.auth_role).await?;
            return Ok(Kek::VaultTransit {
                client: Box::new(client),
                mount: t.mount.clone(),
                key_name: t.key_name.clone(),
            });
        }
        let value = std::env::var_os("CRMGUARD_ENCRYPTION_KEY").ok_or(KeyError::Missing)?;
        let key = parse_secret_key(value.as_encoded_bytes())?;
        Ok(Kek::Secret { key })
    }

    /// Describes the key for messages (never the key itself).
    pub fn describe(&self) -> String {
        match self {
            Kek::Secret { key } => format!("the Secret key with fingerprint {}", fingerprint(key)),
            Kek::VaultTransit { mount, key_name, .. } => format!("Vault Transit key {mount}/{key_name}"),
        }
    }

    /// Wraps a data key for the backup `backup_id`.
    pub async fn wrap(&self, dek: &DataKey, backup_id: &str) -> Result<WrappedKey, KeyError> {
        match self {
            Kek::Secret { key } => {
                let mut nonce = [0u8; 12];
                getrandom::fill(&mut nonce).map_err(|e| KeyError::Random(e.to_string()))?;
                let ct = crypto::aes256gcm_seal(key, nonce, &wrap_aad(backup_id), dek.expose())
                    .map_err(|_| KeyError::Internal("AES-256-GCM sealing failed".into()))?;
                let mut blob = nonce.to_vec();
                blob.extend_from_slice(&ct);
                Ok(WrappedKey::Secret { fingerprint: fingerprint(key), ciphertext: B64.encode(blob) })
            }
            Kek::VaultTransit { client, mount, key_name } => {
                let out =
                    vaultrs::transit::data::encrypt(client.as_ref(), mount, key_name, &B64.encode(dek.expose()), None)
                        .await
                        .map_err(|e| VaultError::Request {
                            op: format!("transit encrypt with key {mount}/{key_name}"),
                            message: describe(&e),
                        })?;
                Ok(WrappedKey::VaultTransit {
                    mount: mount.clone(),
                    key_name: key_name.clone(),
                    ciphertext: out.ciphertext,
                })
            }
        }
    }

    /// Unwraps the data key of backup `backup_id`.
    pub async fn unwrap(&self, wrapped: &WrappedKey, backup_id: &str) -> Result<DataKey, KeyError> {
        match (self, wrapped) {
            (Kek::Secret { key }, WrappedKey::Secret { fingerprint: expected, ciphertext }) => {
                let actual = fingerprint(key);
                let opened = (|| {
                    let blob = B64.decode(ciphertext).map_err(|e| KeyError::Damaged(e.to_string()))?;
                    let (nonce, sealed) =
                        blob.split_first_chunk::<12>().ok_or(KeyError::Damaged("too short".into()))?;
                    if sealed.len() < 16 {
                        return Err(KeyError::Damaged("too short".into()));
                    }
                    let plain = crypto::aes256gcm_open(key, *nonce, &wrap_aad(backup_id), sealed).ok_or_else(|| {
                        KeyError::Damaged("authentication failed (modified, or moved from another backup)".into())
                    })?;
                    DataKey::from_bytes(&plain).map_err(|e| KeyError::Damaged(e.to_string()))
                })();
                // The fingerprint only names the key; the wrapping itself says whether this key made it.
                match opened {
                    Ok(dek) if &actual == expected => Ok(dek),
                    Ok(_) => Err(KeyError::Relabelled { recorded: expected.clone(), actual }),
                    Err(_) if &actual != expected => Err(KeyError::WrongKey { expected: expected.clone(), actual }),
                    Err(e) => Err(e),
                }
            }
            (
                Kek::VaultTransit { client, mount, key_name },
                WrappedKey::VaultTransit { mount: m, key_name: k, ciphertext },
            ) => {
                if m != mount || k != key_name {
                    return Err(KeyError::Mismatch {
                        found: format!("Vault Transit key {m}/{k}"),
                        configured: format!("Vault Transit key {mount}/{key_name}"),
                    });
                }
                let out = vaultrs::transit::data::decrypt(client.as_ref(), mount, key_name, ciphertext, None)
                    .await
                    .map_err(|e| VaultError::Request {
                        op: format!("transit decrypt with key {mount}/{key_name}"),
                        message: describe(&e),
                    })?;
                let plain = B64.decode(out.plaintext.trim()).map_err(|e| KeyError::Damaged(e.to_string()))?;
                DataKey::from_bytes(&plain).map_err(|e| KeyError::Damaged(e.to_string()))
            }
            (kek, wrapped) => Err(KeyError::Mismatch {
                found: match wrapped {
                    WrappedKey::Secret { fingerprint, .. } => format!("a Secret key (fingerprint {fingerprint})"),
                    WrappedKey::VaultTransit { mount, key_name, .. } => format!("Vault Transit key {mount}/{key_name}"),
                },
                configured: kek.describe(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secret_keys_wrap_and_unwrap_bound_to_the_backup_id() {
        let kek = Kek::Secret { key: [7u8; 32] };
        let dek = DataKey::generate().unwrap();
        let wrapped = kek.wrap(&dek, "b1").await.unwrap();
        assert_eq!(kek.unwrap(&wrapped, "b1").await.unwrap().expose(), dek.expose());
        assert!(matches!(kek.unwrap(&wrapped, "b2").await, Err(KeyError::Damaged(_))));
        let other = Kek::Secret { key: [8u8; 32] };
        let err = other.unwrap(&wrapped, "b1").await.unwrap_err();
        assert!(matches!(err, KeyError::WrongKey { .. }));
        let msg = err.to_string();
        assert!(msg.contains(&fingerprint(&[7u8; 32])) && msg.contains(&fingerprint(&[8u8; 32])), "{msg}");
    }

    /// A data key wrapped by the first implementation (RustCrypto's aes-gcm) still unwraps: fixed KEK, nonce
    /// and data key give exactly this blob.
    #[tokio::test]
    async fn keys_wrapped_by_earlier_versions_still_unwrap() {
        let kek = Kek::Secret { key: [9u8; 32] };
        let mut blob = vec![5u8; 12];
        blob.extend(
            (0..48)
                .map(|i| {
                    u8::from_str_radix(
                        &"cc74b55508db1f4e412756fdde6c6a7602cfb193b6d0b5cf017715a269f4a30c2d1a999198fbe529259ddae14d827b85"
                            [2 * i..2 * i + 2],
                        16,
                    )
                })
                .collect::<Result<Vec<u8>, _>>()
                .unwrap(),
        );
        let wrapped = WrappedKey::Secret { fingerprint: fingerprint(&[9u8; 32]), ciphertext: B64.encode(&blob) };
        assert_eq!(kek.unwrap(&wrapped, "b1").await.unwrap().expose(), &[3u8; 32]);
        assert_eq!(crypto::aes256gcm_seal(&[9u8; 32], [5u8; 12], &wrap_aad("b1"), &[3u8; 32]).unwrap(), blob[12..]);
    }

    #[test]
    fn keys_parse_from_base64_hex_or_raw_and_bad_ones_say_how_to_make_one() {
        let raw = [0x5au8; 32];
        assert_eq!(parse_secret_key(B64.encode(raw).as_bytes()).unwrap(), raw);
        assert_eq!(parse_secret_key(format!("{}\n", B64.encode(raw)).as_bytes()).unwrap(), raw);
        assert_eq!(parse_secret_key("5a".repeat(32).as_bytes()).unwrap(), raw);
        assert_eq!(parse_secret_key(&raw).unwrap(), raw);
        let err = parse_secret_key(b"too-short").unwrap_err().to_string();
        assert!(err.contains("head -c 32 /dev/urandom | base64") && !err.contains("too-short"), "{err}");
    }
}
