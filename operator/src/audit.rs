//! The audit trail: every write the operator makes (Kubernetes objects, status, finalizers, Vault objects and
//! leases) is one structured log line (target `crmguard::audit`), and, when a bucket is configured, part of an
//! append-only chain of segments in S3: each segment's header carries its sequence number, the SHA-256 of its
//! records and the SHA-256 of the whole previous segment. `crmguard audit verify` walks the chain and names the
//! segment that was modified, removed or moved. (The newest segment has no successor to vouch for it: its hash is
//! logged when it is written, and bucket versioning / object lock protect it further.)
//!
//! Who touched which customer data (`AccessMonitor`) is a stream of its own, `<stream>-access`, chained the same
//! way: one [`AccessRecord`] per user, kind of access and table for each read of a database's audit log, and one
//! per finding. `crmguard audit access` asks it.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backup::store::{Store, StoreError};

/// One write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339.
    pub time: String,
    pub controller: String,
    /// apply, prune, patch, status, finalizer, delete, vault-write, vault-delete, lease-issue, lease-renew, lease-revoke.
    pub action: String,
    /// Kind of the object written (`Vault` for Vault paths).
    pub kind: String,
    pub namespace: String,
    /// Name of the object (a Vault path for Vault writes; never a secret value).
    pub name: String,
    pub reason: String,
}

/// Who touched which data: accesses of one user, of one kind, on one object, within one read of a database's audit
/// log; or a finding (`finding` set). Never a value of a statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRecord {
    /// The first access (RFC 3339, the kubelet's time of the log line).
    pub time: String,
    /// The last access.
    pub until: String,
    /// The AccessMonitor's namespace and name.
    pub namespace: String,
    pub monitor: String,
    /// The database user.
    pub user: String,
    /// Who that is: `team sales (AccessPolicy crm-access)`, a named identity, `unknown`.
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// read, write, ddl, role, denied, login-failed, other; `finding` for a finding.
    pub access: String,
    /// `schema.table` (`database.table` on MariaDB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// How many accesses (1 for a finding).
    pub count: u64,
    /// The rule a finding broke, and what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The pods the statements came from (by their client addresses), and the addresses no pod of the namespace has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// First line of a segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub format: u32,
    pub stream: String,
    pub seq: u64,
    /// SHA-256 (hex) of the previous segment's bytes; 64 zeros for the first.
    pub prev: String,
    pub records: usize,
    /// SHA-256 (hex) of the record lines that follow the header.
    pub body_sha256: String,
}

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (hex) of a whole segment.
pub fn segment_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The stream of access records that goes with the operator's stream `stream`.
pub fn access_stream(stream: &str) -> String {
    format!("{stream}-access")
}

/// Object key of segment `seq` of `stream`.
pub fn segment_key(prefix: &str, stream: &str, seq: u64) -> String {
    format!("{}/{stream}/{seq:012}.jsonl", prefix.trim_end_matches('/'))
}

/// Encodes a segment: the header line, then one JSON line per record.
pub fn encode<R: Serialize>(stream: &str, seq: u64, prev: &str, records: &[R]) -> Vec<u8> {
    let mut body = Vec::new();
    for r in records {
        body.extend(serde_json::to_vec(r).unwrap_or_default());
        body.push(b'\n');
    }
    let header = Header {
        format: 1,
        stream: stream.to_string(),
        seq,
        prev: prev.to_string(),
        records: records.len(),
        body_sha256: hex(&Sha256::digest(&body)),
    };
    let mut out = serde_json::to_vec(&header).unwrap_or_default();
    out.push(b'\n');
    out.extend(body);
    out
}

fn split(bytes: &[u8]) -> Option<(Header, &[u8])> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let header = serde_json::from_slice(&bytes[..nl]).ok()?;
    Some((header, &bytes[nl + 1..]))
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub segments: usize,
    pub records: usize,
    /// Hash of the newest segment (compare with the one the operator logged).
    pub head: Option<String>,
    /// Every break in the chain, naming the segment.
    pub problems: Vec<String>,
}

/// Checks a stream's segments (key, bytes), in any order.
pub fn verify(mut segments: Vec<(String, Vec<u8>)>) -> Verification {
    segments.sort_by(|a, b| a.0.cmp(&b.0));
    let mut v = Verification::default();
    let mut prev_hash: Option<String> = None;
    let mut expected: u64 = 1;
    for (key, bytes) in &segments {
        v.segments += 1;
        let key_seq = key.rsplit('/').next().and_then(|f| f.strip_suffix(".jsonl")).and_then(|s| s.parse::<u64>().ok());
        let Some((header, body)) = split(bytes) else {
            v.problems.push(format!("{key}: the header is unreadable (the segment was modified)"));
            prev_hash = Some(segment_hash(bytes));
            expected += 1;
            continue;
        };
        let body_ok = hex(&Sha256::digest(body)) == header.body_sha256
            && body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() == header.records;
        if !body_ok {
            v.problems.push(format!("{key}: its records do not match its header (the segment was modified)"));
        }
        if key_seq != Some(header.seq) {
            v.problems
                .push(format!("{key}: its header says segment {} (segments were renamed or reordered)", header.seq));
        } else if header.seq > expected {
            v.problems.push(format!("{key}: segment(s) {expected}..{} are missing (removed)", header.seq - 1));
        } else if header.prev != prev_hash.clone().unwrap_or_else(|| GENESIS.to_string()) {
            v.problems.push(if header.seq == 1 {
                format!("{key}: the first segment does not start the chain")
            } else {
                format!(
                    "{key}: does not follow segment {} (that segment was modified, or the order changed)",
                    header.seq - 1
                )
            });
        }
        v.records += header.records;
        prev_hash = Some(segment_hash(bytes));
        expected = key_seq.unwrap_or(header.seq).max(expected) + 1;
    }
    v.head = prev_hash;
    v
}

/// The records of a segment (after its header); lines that are not records of type `R` are skipped.
pub fn records_of<R: serde::de::DeserializeOwned>(segment: &[u8]) -> Vec<R> {
    let Some((_, body)) = split(segment) else { return vec![] };
    body.split(|b| *b == b'\n').filter_map(|l| serde_json::from_slice(l).ok()).collect()
}

/// What `crmguard audit access` asks of the access stream; an empty field matches everything.
#[derive(Clone, Debug, Default)]
pub struct AccessQuery {
    pub team: Option<String>,
    pub user: Option<String>,
    /// `schema.table`.
    pub table: Option<String>,
    pub namespace: Option<String>,
    /// Records whose last access is at or after this.
    pub since: Option<jiff::Timestamp>,
    pub findings_only: bool,
    /// Records of statements that came from this pod.
    pub pod: Option<String>,
}

impl AccessQuery {
    pub fn matches(&self, r: &AccessRecord) -> bool {
        let is = |want: &Option<String>, have: Option<&str>| want.as_deref().is_none_or(|w| have == Some(w));
        is(&self.team, r.team.as_deref())
            && is(&self.user, Some(&r.user))
            && is(&self.table, r.object.as_deref())
            && is(&self.namespace, Some(&r.namespace))
            && self.since.is_none_or(|s| r.until.parse::<jiff::Timestamp>().is_ok_and(|u| u >= s))
            && (!self.findings_only || r.finding.is_some())
            && self.pod.as_ref().is_none_or(|p| r.pods.contains(p))
    }
}

/// Records writes: a log line each, and (when shipping) into the segment writer's queue.
#[derive(Clone, Debug, Default)]
pub struct Auditor {
    tx: Option<tokio::sync::mpsc::Sender<Record>>,
    access: Option<tokio::sync::mpsc::Sender<AccessRecord>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The records' clock (`None`: the system's).
    clock: Option<fn() -> jiff::Timestamp>,
}

/// Records waiting for the segment writer at most (a stalled bucket must not grow memory without bound).
pub const QUEUE: usize = 50_000;

impl Auditor {
    /// An auditor that also ships to `rx`'s consumer.
    pub fn shipping() -> (Auditor, tokio::sync::mpsc::Receiver<Record>) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        (Auditor { tx: Some(tx), access: None, dropped: Default::default(), clock: None }, rx)
    }

    /// The same auditor, also shipping access records to the returned queue's consumer.
    pub fn with_access_stream(self) -> (Auditor, tokio::sync::mpsc::Receiver<AccessRecord>) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        (Auditor { access: Some(tx), ..self }, rx)
    }

    /// Records who touched which data (a log line each, target `crmguard::access`, and the access stream).
    pub fn access(&self, r: AccessRecord) {
        tracing::info!(
            target: "crmguard::access",
            namespace = %r.namespace, monitor = %r.monitor, user = %r.user, identity = %r.identity,
            access = %r.access, object = %r.object.as_deref().unwrap_or_default(), count = r.count,
            finding = %r.finding.as_deref().unwrap_or_default(), time = %r.time, until = %r.until, "access"
        );
        if let Some(tx) = &self.access
            && tx.try_send(r).is_err()
        {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped = n, "audit records dropped: the audit bucket is not keeping up");
            }
        }
    }

    /// The same auditor, timing its records with `clock`.
    pub fn with_clock(self, clock: fn() -> jiff::Timestamp) -> Auditor {
        Auditor { clock: Some(clock), ..self }
    }

    /// Records one write.
    pub fn record(&self, controller: &str, action: &str, kind: &str, namespace: &str, name: &str, reason: &str) {
        let r = Record {
            time: self.clock.map_or_else(jiff::Timestamp::now, |now| now()).to_string(),
            controller: controller.into(),
            action: action.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            reason: reason.into(),
        };
        tracing::info!(
            target: "crmguard::audit",
            controller = %r.controller, action = %r.action, kind = %r.kind, namespace = %r.namespace,
            name = %r.name, reason = %r.reason, "audit"
        );
        if let Some(tx) = &self.tx
            && tx.try_send(r).is_err()
        {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped = n, "audit records dropped: the audit bucket is not keeping up");
            }
        }
    }

    /// Records a `Kind/name` child string as written by the apply pass.
    pub fn record_child(&self, controller: &str, action: &str, namespace: &str, child: &str, reason: &str) {
        let (kind, name) = child.split_once('/').unwrap_or(("?", child));
        self.record(controller, action, kind, namespace, name, reason);
    }
}

/// Where the segments of one stream go.
#[derive(Clone, Debug)]
pub struct Shipping {
    pub store: Store,
    pub prefix: String,
    pub stream: String,
    pub flush_every: Duration,
    pub max_records: usize,
}

/// The newest segment of a stream: (seq, hash), or (0, genesis).
pub async fn head(store: &Store, prefix: &str, stream: &str) -> Result<(u64, String), StoreError> {
    let dir = format!("{}/{stream}/", prefix.trim_end_matches('/'));
    let mut keys: Vec<String> =
        store.list(&dir).await?.into_iter().map(|o| o.key).filter(|k| k.ends_with(".jsonl")).collect();
    keys.sort();
    let Some(last) = keys.last() else { return Ok((0, GENESIS.to_string())) };
    let bytes = store.get(last).await?;
    let seq = split(&bytes).map(|(h, _)| h.seq).unwrap_or(keys.len() as u64);
    Ok((seq, segment_hash(&bytes)))
}

/// Writes segments until the queue closes: every `flush_every`, or at `max_records`. A failed write keeps the
/// records and tries again at the next flush.
pub async fn ship<R: Serialize>(s: Shipping, mut rx: tokio::sync::mpsc::Receiver<R>) {
    let (mut seq, mut prev) = loop {
        match head(&s.store, &s.prefix, &s.stream).await {
            Ok(h) => break h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the audit chain's head; retrying");
                tokio::time::sleep(s.flush_every).await;
            }
        }
    };
    let mut pending: Vec<R> = Vec::new();
    let mut open = true;
    while open || !pending.is_empty() {
        let deadline = tokio::time::sleep(s.flush_every);
        tokio::pin!(deadline);
        while open && pending.len() < s.max_records {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => pending.push(r),
                    None => open = false,
                },
                _ = &mut deadline => break,
            }
        }
        if pending.is_empty() {
            continue;
        }
        let bytes = encode(&s.stream, seq + 1, &prev, &pending);
        let key = segment_key(&s.prefix, &s.stream, seq + 1);
        match s.store.put(&key, Bytes::from(bytes.clone())).await {
            Ok(()) => {
                seq += 1;
                prev = segment_hash(&bytes);
                tracing::info!(segment = seq, sha256 = %prev, records = pending.len(), key = %key, "audit segment written");
                pending.clear();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit segment; retrying at the next flush");
                if !open {
                    tokio::time::sleep(s.flush_every).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> Record {
        Record {
            time: format!("2026-01-01T00:00:{i:02}Z"),
            controller: "accesspolicy".into(),
            action: "apply".into(),
            kind: "Role".into(),
            namespace: "crm".into(),
            name: format!("r{i}"),
            reason: "spec".into(),
        }
    }

    fn chain(n: u64) -> Vec<(String, Vec<u8>)> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let bytes = encode("op", seq, &prev, &[rec(seq as usize), rec(seq as usize + 10)]);
                prev = segment_hash(&bytes);
                (segment_key("audit", "op", seq), bytes)
            })
            .collect()
    }

    #[test]
    fn records_are_timed_by_the_auditors_clock() {
        let (auditor, mut rx) = Auditor::shipping();
        let auditor = auditor.with_clock(|| jiff::Timestamp::from_second(1_800_000_000).unwrap_or_default());
        auditor.record("networkguard", "patch", "Pod", "crm", "web-0", "quarantine");
        let r = rx.try_recv().unwrap();
        assert_eq!((r.time.as_str(), r.name.as_str()), ("2027-01-15T08:00:00Z", "web-0"));
    }

    #[tokio::test]
    async fn the_writer_continues_the_chain_after_a_restart() {
        let root = std::env::temp_dir().join(format!("crmguard-audit-test-{}", std::process::id()));
        let store = Store::dir(&root);
        let shipping = Shipping {
            store: store.clone(),
            prefix: "trail".into(),
            stream: "op".into(),
            flush_every: Duration::from_millis(50),
            max_records: 2,
        };
        // Two operator lifetimes, each writing three records, then stopping (the queue closes).
        for round in 0..2 {
            let (auditor, rx) = Auditor::shipping();
            let writer = tokio::spawn(ship(shipping.clone(), rx));
            for i in 0..3 {
                auditor.record("c", "apply", "Role", "crm", &format!("r{round}{i}"), "test");
            }
            drop(auditor);
            writer.await.expect("writer");
        }
        let mut segments = Vec::new();
        for o in store.list("trail/op/").await.expect("list") {
            segments.push((o.key.clone(), store.get(&o.key).await.expect("get").to_vec()));
        }
        let v = verify(segments);
        let _ = std::fs::remove_dir_all(&root);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.records, v.segments), (6, 4), "2 + 1 records per lifetime, the second continuing the first");
    }

    #[test]
    fn an_intact_chain_verifies() {
        let v = verify(chain(5));
        assert_eq!((v.segments, v.records, v.problems.len()), (5, 10, 0), "{:?}", v.problems);
        assert_eq!(v.head, Some(segment_hash(&chain(5)[4].1)));
    }

    #[test]
    fn each_kind_of_tampering_is_caught_and_named() {
        // A record changed in segment 3.
        let mut c = chain(5);
        let text = String::from_utf8(c[2].1.clone()).expect("utf8").replace("\"r3\"", "\"rX\"");
        c[2].1 = text.into_bytes();
        let v = verify(c);
        assert!(
            v.problems.iter().any(|p| p.contains("000000000003.jsonl") && p.contains("modified")),
            "{:?}",
            v.problems
        );
        // Header and body of segment 3 rewritten consistently: segment 4 no longer follows it.
        let mut c = chain(5);
        let (h, _) = split(&c[2].1).expect("segment");
        c[2].1 = encode("op", 3, &h.prev, &[rec(99)]);
        let v = verify(c);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].contains("000000000004.jsonl") && v.problems[0].contains("segment 3"),
            "{:?}",
            v.problems
        );
        // Segment 2 removed.
        let mut c = chain(5);
        c.remove(1);
        let v = verify(c);
        assert!(v.problems.iter().any(|p| p.contains("2..2 are missing")), "{:?}", v.problems);
        // Segments 2 and 4 swapped (keys kept).
        let mut c = chain(5);
        let (b2, b4) = (c[1].1.clone(), c[3].1.clone());
        c[1].1 = b4;
        c[3].1 = b2;
        let v = verify(c);
        assert!(
            v.problems.iter().any(|p| p.contains("000000000002.jsonl") && p.contains("reordered")),
            "{:?}",
            v.problems
        );
        // The first segment removed.
        let mut c = chain(3);
        c.remove(0);
        let v = verify(c);
        assert!(v.problems.iter().any(|p| p.contains("1..1 are missing")), "{:?}", v.problems);
    }
}
