//! The invalid-spec corpus: each case mutates a valid example and names the field and the message a user must
//! see. Used by `operator/tests/invalid_specs.rs` (through `crmguard plan`) and by the e2e differential
//! admission test (through the real API server).

use serde_json::{Value, json};

use super::{example, remove, set};

pub enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
}
pub use Edit::{Remove, Set};

pub struct Case {
    pub kind: &'static str,
    pub edits: Vec<Edit>,
    pub field: &'static str,
    pub message: &'static str,
}

pub fn case(kind: &'static str, edits: Vec<Edit>, field: &'static str, message: &'static str) -> Case {
    Case { kind, edits, field, message }
}

/// Every case.
pub fn cases() -> Vec<Case> {
    vec![
        // --- CrmBackupPolicy: schema ---
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/source/engine", json!("oracle"))],
            "spec.source.engine",
            "is not one of",
        ),
        case(
            "CrmBackupPolicy",
            vec![Remove("/spec/destination/bucket")],
            "spec.destination",
            "\"bucket\" is a required property",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/destination/bucket", json!("Bad_Bucket"))],
            "spec.destination.bucket",
            "does not match",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/compression/level", json!(25))],
            "spec.compression.level",
            "maximum of 19",
        ),
        case("CrmBackupPolicy", vec![Set("/spec/source/port", json!(70000))], "spec.source.port", "maximum of 65535"),
        case("CrmBackupPolicy", vec![Set("/spec/retention/keepLastt", json!(3))], "spec.retention", "keepLastt"),
        case("CrmBackupPolicy", vec![Set("/spec/rpo", json!("1 day"))], "spec.rpo", "does not match"),
        // --- CrmBackupPolicy: CEL ---
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/retention", json!({"keepLast": 0, "keepDaily": 0}))],
            "spec.retention",
            "retention must keep at least one backup",
        ),
        case(
            "CrmBackupPolicy",
            vec![Remove("/spec/encryption/key")],
            "spec.encryption",
            "backups are encrypted by default and need a key",
        ),
        case(
            "CrmBackupPolicy",
            vec![Remove("/spec/encryption")],
            "spec",
            "encryption is required: backups are encrypted by default",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/encryption/key/secretRef", json!({"name": "k", "key": "k"}))],
            "spec.encryption.key",
            "set exactly one of encryption.key.vaultTransit or encryption.key.secretRef",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/source/credentials/secretRef", json!({"name": "db"}))],
            "spec.source.credentials",
            "set exactly one of credentials.secretRef",
        ),
        case(
            "CrmBackupPolicy",
            vec![Remove("/spec/source/caSecretRef")],
            "spec.source",
            "tlsMode verify-ca and verify-full need caSecretRef",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/destination/endpoint", json!("s3.example.com"))],
            "spec.destination.endpoint",
            "must be a URL starting with https://",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/destination/prefix", json!("/prod"))],
            "spec.destination.prefix",
            "must not start with '/'",
        ),
        case("CrmBackupPolicy", vec![Set("/spec/rpo", json!("0s"))], "spec.rpo", "rpo must be a positive duration"),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/verification/mode", json!("sampled"))],
            "spec.verification",
            "needs samplePercent",
        ),
        // --- CrmBackupPolicy: operator checks (CEL cannot parse cron) ---
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/schedule/cron", json!("0 2 * *"))],
            "spec.schedule.cron",
            "write 5 fields",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/schedule/cron", json!("99 2 * * *"))],
            "spec.schedule.cron",
            "not a valid cron expression",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/schedule/timeZone", json!("Europe/Atlantis"))],
            "spec.schedule.timeZone",
            "unknown time zone",
        ),
        case(
            "CrmBackupPolicy",
            vec![Set("/spec/verification/restoreDrill/scratchDatabase", json!("crm"))],
            "spec.verification.restoreDrill.scratchDatabase",
            "must differ from the source database",
        ),
        // --- CrmRestore ---
        case(
            "CrmRestore",
            vec![Set("/spec/backup/id", json!("20261128T021500Z"))],
            "spec.backup",
            "name exactly one backup",
        ),
        case("CrmRestore", vec![Set("/spec/backup", json!({}))], "spec.backup", "name exactly one backup"),
        case(
            "CrmRestore",
            vec![Set("/spec/policyRef/name", json!("nope"))],
            "spec.policyRef.name",
            "CrmBackupPolicy \"nope\" not found",
        ),
        case(
            "CrmRestore",
            vec![Set("/spec/target/database", json!("crm"))],
            "spec.target.database",
            "is the policy's live source database",
        ),
        // --- AccessPolicy ---
        case("AccessPolicy", vec![Set("/spec/teams", json!([]))], "spec.teams", "[] has less than 1 item"),
        case(
            "AccessPolicy",
            vec![Set("/spec/teams/0/name", json!("Sales Team"))],
            "spec.teams[0].name",
            "does not match",
        ),
        case(
            "AccessPolicy",
            vec![Set("/spec/teams/0/kubernetes/0/verbs", json!(["get", "escalate"]))],
            "spec.teams[0].kubernetes[0].verbs",
            "verbs must be among",
        ),
        case(
            "AccessPolicy",
            vec![Remove("/spec/vault")],
            "spec",
            "teams with vault or database grants need spec.vault",
        ),
        case(
            "AccessPolicy",
            vec![Set("/spec/teams/0/credentials/ttl", json!("48h"))],
            "spec.teams[0].credentials",
            "ttl must not exceed maxTtl",
        ),
        case(
            "AccessPolicy",
            vec![Set("/spec/teams/0/database/grants/0/tables", json!(["accounts; DROP TABLE x"]))],
            "spec.teams[0].database.grants[0].tables[0]",
            "does not match \"^[A-Za-z_][A-Za-z0-9_]{0,62}$\"",
        ),
        case(
            "AccessPolicy",
            vec![Set("/spec/teams/0/vault/0/path", json!("/secret/data/x"))],
            "spec.teams[0].vault[0].path",
            "no leading '/'",
        ),
        case(
            "AccessPolicy",
            vec![Remove("/spec/teams/1/credentials")],
            "spec.teams[1]",
            "a team with database grants needs credentials",
        ),
        // --- NetworkGuard ---
        case(
            "NetworkGuard",
            vec![Set("/spec/egress/2/peers/0/ipBlock/cidr", json!("203.0.113.0/33"))],
            "spec.egress[2].peers[0].ipBlock.cidr",
            "cidr must be a CIDR",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/egress/2/peers/0/ipBlock/except", json!(["10.0.0.0/8"]))],
            "spec.egress[2].peers[0].ipBlock",
            "every except entry must be a CIDR strictly inside ipBlock.cidr",
        ),
        // Issue 16, item 3: an exception equal to the range (the API server refuses it in a NetworkPolicy).
        case(
            "NetworkGuard",
            vec![Set("/spec/egress/2/peers/0/ipBlock/except", json!(["203.0.113.0/24"]))],
            "spec.egress[2].peers[0].ipBlock",
            "strictly inside ipBlock.cidr",
        ),
        // Issue 16, item 2: rules in a direction that is not denied would isolate it.
        case(
            "NetworkGuard",
            vec![Set("/spec/defaultDeny", json!({"ingress": false, "egress": true}))],
            "spec",
            "defaultDeny.ingress is false, so nothing inbound is denied and ingress rules would have no effect",
        ),
        // Issue 16, item 6: the DNS namespace is a namespace name.
        case(
            "NetworkGuard",
            vec![Set("/spec/dns/namespace", json!(""))],
            "spec.dns.namespace",
            "is shorter than 1 character",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/dns/namespace", json!("Kube_System"))],
            "spec.dns.namespace",
            "does not match",
        ),
        // Issue 16, item 5: label keys and values the API server refuses in a NetworkPolicy.
        case(
            "NetworkGuard",
            vec![Set("/spec/ingress/0/peers/0/podSelector/matchLabels", json!({"-bad": "x"}))],
            "spec.ingress[0].peers[0].podSelector.matchLabels",
            "\"-bad\" is not a valid label key",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/podSelector/matchLabels/app.kubernetes.io~1part-of", json!("crm!"))],
            "spec.podSelector.matchLabels.app.kubernetes.io/part-of",
            "\"crm!\" is not a valid label value",
        ),
        // Issue 16, item 7: rule names are unique (the list is keyed by name).
        case(
            "NetworkGuard",
            vec![Set("/spec/ingress/1/name", json!("ingress-to-web"))],
            "spec.ingress[1]",
            "Duplicate value",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/dns/allow", json!(false))],
            "spec",
            "egress is denied and DNS is not allowed",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/quarantine", json!({"podSelector": {}, "reason": "x", "ttl": "0s"}))],
            "spec.quarantine.ttl",
            "quarantine.ttl must be a positive duration",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/ingress/0/ports/0/port", json!(0))],
            "spec.ingress[0].ports[0]",
            "outside 1-65535",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/ingress/0/ports/0/port", json!("HTTP_port"))],
            "spec.ingress[0].ports[0]",
            "neither a port number nor a named port",
        ),
        case(
            "NetworkGuard",
            vec![
                Set("/spec/ingress/0/peers/0/podSelector", json!(null)),
                Set("/spec/ingress/0/peers/0/ipBlock", json!({"cidr": "10.0.0.0/8"})),
            ],
            "spec.ingress[0].peers[0]",
            "either an ipBlock or pod/namespace selectors",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/ingress/1/peers/0/podSelector/matchExpressions/0/operator", json!("Like"))],
            "spec.ingress[1].peers[0].podSelector.matchExpressions[0]",
            "unknown operator",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/podSelector/matchLabels/app.kubernetes.io~1component", json!("web"))],
            "spec.ingress[1].appliesTo",
            "would have to be both",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/targets", json!({"vault": {"namespace": "vault", "cidr": "10.0.0.0/8"}}))],
            "spec.targets.vault",
            "exactly one of namespace (in-cluster) or cidr",
        ),
        case(
            "NetworkGuard",
            vec![Set("/spec/egress/0/name", json!("target-db"))],
            "spec.egress[0].name",
            "reserved for spec.targets",
        ),
        // --- AccessMonitor: rows from the database's statistics ---
        case(
            "AccessMonitor",
            vec![Remove("/spec/database/statistics")],
            "spec",
            "rules.rowVolume counts rows from the database's statistics: set spec.database.statistics",
        ),
        case(
            "AccessMonitor",
            vec![Set("/spec/interval", json!("2m"))],
            "spec",
            "rules.rowVolume limits rows per minute: the interval must be at most 1m",
        ),
        case(
            "AccessMonitor",
            vec![Set("/spec/database/statistics/sslMode", json!("prefer"))],
            "spec.database.statistics.sslMode",
            "is not one of",
        ),
        case(
            "AccessMonitor",
            vec![Set("/spec/rules/rowVolume/0/maxRowsPerMinute", json!(0))],
            "spec.rules.rowVolume[0].maxRowsPerMinute",
            "minimum of 1",
        ),
        // --- any kind ---
        case("NetworkGuard", vec![Set("/apiVersion", json!("crmguard.io/v1"))], "", "is not a crmguard resource"),
        case(
            "NetworkGuard",
            vec![Set("/metadata/name", json!("Crm_Firewall"))],
            "metadata.name",
            "use lower-case letters",
        ),
    ]
}

impl Case {
    /// The example of the case's kind with the case's edits applied.
    pub fn document(&self) -> Value {
        let mut doc = example(self.kind);
        for e in &self.edits {
            match e {
                Set(p, v) if v.is_null() => remove(&mut doc, p),
                Set(p, v) => set(&mut doc, p, v.clone()),
                Remove(p) => remove(&mut doc, p),
            }
        }
        doc
    }
}
