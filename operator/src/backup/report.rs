//! Reports a backup or drill job can prove it wrote. The job signs its termination message with the policy's
//! report key (a Secret the operator creates, handed to the policy's own jobs only) bound to its pod's UID, so a
//! report is worth something only when it comes from a pod that could read that key, and cannot be replayed
//! by another pod. The message is the report's JSON, a newline, and the hex HMAC-SHA256 of
//! `crmguard-report-v1\n<pod uid>\n<json>`.

use ring::hmac;

use crate::api::job::JobReport;

/// Environment variable holding the report key (hex) in backup and drill jobs.
pub const KEY_ENV: &str = "CRMGUARD_REPORT_KEY";
/// Environment variable holding the job pod's UID (downward API).
pub const POD_UID_ENV: &str = "CRMGUARD_POD_UID";
/// Key of the report key in its Secret.
pub const SECRET_KEY: &str = "key";

/// Why a termination message does not count as a report of the policy's own job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unproven {
    #[error("the report is not signed with the policy's report key")]
    Unsigned,
    #[error("the report's signature does not match the policy's report key and the pod")]
    BadSignature,
    #[error("the signed report cannot be read")]
    Unreadable,
}

fn tag(key: &[u8], pod_uid: &str, json: &str) -> hmac::Tag {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(b"crmguard-report-v1\n");
    ctx.update(pod_uid.as_bytes());
    ctx.update(b"\n");
    ctx.update(json.as_bytes());
    ctx.sign()
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string, or `None` when it is not one.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The termination message for `json` signed with `key` for the pod `pod_uid`.
pub fn sign(json: &str, key: &[u8], pod_uid: &str) -> String {
    format!("{json}\n{}", hex(tag(key, pod_uid, json).as_ref()))
}

/// The report in `message` if it carries a valid signature of `key` for the pod `pod_uid`.
pub fn verify(message: &str, key: &[u8], pod_uid: &str) -> Result<JobReport, Unproven> {
    let message = message.trim_end();
    let Some((json, mac)) = message.rsplit_once('\n') else {
        return Err(Unproven::Unsigned);
    };
    let mac = unhex(mac.trim()).ok_or(Unproven::Unsigned)?;
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut signed = Vec::with_capacity(json.len() + pod_uid.len() + 20);
    signed.extend_from_slice(b"crmguard-report-v1\n");
    signed.extend_from_slice(pod_uid.as_bytes());
    signed.push(b'\n');
    signed.extend_from_slice(json.as_bytes());
    hmac::verify(&k, &signed, &mac).map_err(|_| Unproven::BadSignature)?;
    serde_json::from_str(json).map_err(|_| Unproven::Unreadable)
}

/// A new random report key, hex-encoded (32 bytes).
pub fn new_key() -> Result<String, String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for the report key: {e}"))?;
    Ok(hex(&key))
}

/// The key and pod UID of this job, when both are set (the jobs the operator builds).
pub fn from_env() -> Option<(Vec<u8>, String)> {
    let key = std::env::var(KEY_ENV).ok().filter(|k| !k.is_empty())?;
    let uid = std::env::var(POD_UID_ENV).ok().filter(|u| !u.is_empty())?;
    Some((key.into_bytes(), uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"ok":true,"kind":"backup","backupId":"20261201T000000Z"}"#;

    #[test]
    fn a_signed_report_verifies_only_with_its_key_and_pod() {
        let msg = sign(JSON, b"k1", "uid-1");
        assert_eq!(verify(&msg, b"k1", "uid-1").expect("valid").backup_id.as_deref(), Some("20261201T000000Z"));
        assert_eq!(verify(&msg, b"k2", "uid-1"), Err(Unproven::BadSignature), "another key");
        assert_eq!(verify(&msg, b"k1", "uid-2"), Err(Unproven::BadSignature), "replayed by another pod");
        let forged = msg.replace("20261201T000000Z", "20261201T000000Z-fake");
        assert_eq!(verify(&forged, b"k1", "uid-1"), Err(Unproven::BadSignature), "changed report");
    }

    #[test]
    fn an_unsigned_or_garbled_message_is_not_a_report() {
        assert_eq!(verify(JSON, b"k1", "uid-1"), Err(Unproven::Unsigned));
        assert_eq!(verify(&format!("{JSON}\nnot-hex"), b"k1", "uid-1"), Err(Unproven::Unsigned));
        assert_eq!(verify("", b"k1", "uid-1"), Err(Unproven::Unsigned));
        let signed_garbage = sign("{not json", b"k1", "uid-1");
        assert_eq!(verify(&signed_garbage, b"k1", "uid-1"), Err(Unproven::Unreadable));
    }

    #[test]
    fn keys_are_random_and_long() {
        let (a, b) = (new_key().expect("key"), new_key().expect("key"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
