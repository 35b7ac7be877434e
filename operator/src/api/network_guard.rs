//! `NetworkGuard`: the CRM's firewall as NetworkPolicies: default deny, explicit allow-lists, DNS, and
//! reversible quarantine of a compromised workload.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeySelector;

/// A firewall for the CRM's pods: everything not allowed here is denied, in both directions.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "crmguard.io",
    version = "v1alpha1",
    kind = "NetworkGuard",
    doc = "Default-deny NetworkPolicies with explicit allow-lists for the CRM pods, and reversible quarantine of compromised pods.",
    plural = "networkguards",
    singular = "networkguard",
    shortname = "ng",
    category = "crmguard",
    namespaced,
    status = "NetworkGuardStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Covered", type_ = "integer", json_path = ".status.coveredPods"),
    printcolumn(name = "Quarantined", type_ = "integer", json_path = ".status.quarantinedPods"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!self.defaultDeny.egress || self.dns.allow || self.dns.acknowledgeNoDns").message("egress is denied and DNS is not allowed, so the protected pods cannot resolve names: keep dns.allow: true, or set dns.acknowledgeNoDns: true if that is intended"))]
#[x_kube(validation = Rule::new("self.defaultDeny.ingress || !has(self.ingress) || size(self.ingress) == 0").message("defaultDeny.ingress is false, so nothing inbound is denied and ingress rules would have no effect: remove spec.ingress, or set defaultDeny.ingress: true to allow only what they list"))]
#[x_kube(validation = Rule::new("self.defaultDeny.egress || !has(self.egress) || size(self.egress) == 0").message("defaultDeny.egress is false, so nothing outbound is denied and egress rules would have no effect: remove spec.egress, or set defaultDeny.egress: true to allow only what they list"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkGuardSpec {
    /// The protected pods. An empty selector (`{}`) protects every pod in the namespace.
    pub pod_selector: LabelSelector,
    /// Deny all traffic of the protected pods that no rule allows.
    #[serde(default)]
    pub default_deny: DefaultDeny,
    /// Allowed inbound traffic to the protected pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub ingress: Vec<TrafficRule>,
    /// Allowed outbound traffic from the protected pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub egress: Vec<TrafficRule>,
    /// DNS egress to the cluster DNS.
    #[serde(default)]
    pub dns: DnsEgress,
    /// Pods to isolate now (a deny-all policy applies to them until the TTL passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// Alert-driven quarantine through the operator's authenticated webhook (Alertmanager, Falcosidekick).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<QuarantineWebhook>,
    /// Shorthands for the CRM's usual destinations (database, Vault, S3); each expands into the allow rules it
    /// needs, named `target-database`, `target-vault`, `target-s3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
}

/// Well-known destinations of a CRM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// The CRM's database pods in this namespace: ingress to them from `clients` only, and egress from `clients`
    /// to them, on `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseTarget>,
    /// Vault (default port 8200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<ServiceTarget>,
    /// The S3 endpoint (default port 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<ServiceTarget>,
}

/// The database pods of the CRM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseTarget {
    /// The database pods (in this namespace).
    pub pod_selector: LabelSelector,
    /// Database port.
    #[serde(default = "default_db_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The protected pods allowed to connect; all protected pods when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<LabelSelector>,
}

fn default_db_port() -> i32 {
    5432
}

/// A service reached by namespace (optionally narrowed to pods) or by CIDR.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.__namespace__) != has(self.cidr)").message("a target names exactly one of namespace (in-cluster) or cidr (outside the cluster)"))]
pub struct ServiceTarget {
    /// Namespace of the service in the cluster, e.g. `vault`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pods of the service inside `namespace`; all its pods when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Address range of a service outside the cluster, e.g. `198.51.100.0/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 198.51.100.0/24"))]
    pub cidr: Option<String>,
    /// Port; defaults to 8200 for Vault and 443 for S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// The protected pods allowed to connect; all protected pods when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<LabelSelector>,
}

/// Which directions are denied by default. `false` in a direction means the guard restricts nothing in that
/// direction: every flow is allowed, no NetworkPolicy of the guard isolates it (so rules for that direction are
/// refused, and the targets' parts in that direction are left out). A quarantined pod is cut off both ways
/// regardless.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDeny {
    /// Deny inbound traffic that no ingress rule allows; `false`: allow all inbound traffic.
    #[serde(default = "default_true")]
    pub ingress: bool,
    /// Deny outbound traffic that no egress rule allows; `false`: allow all outbound traffic.
    #[serde(default = "default_true")]
    pub egress: bool,
}

impl Default for DefaultDeny {
    fn default() -> Self {
        DefaultDeny { ingress: true, egress: true }
    }
}

fn default_true() -> bool {
    true
}

/// One named allow rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRule {
    /// Rule name, a DNS label such as `web-to-db`; becomes part of the NetworkPolicy name.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$"))]
    pub name: String,
    /// Which of the protected pods the rule applies to (e.g. only the database pods for a rule that opens
    /// 5432). All protected pods when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_to: Option<LabelSelector>,
    /// Peers (sources for ingress, destinations for egress). Empty means any peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub peers: Vec<Peer>,
    /// Ports. Empty means all ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortRule>,
}

/// A traffic peer: pods, namespaces or an IP block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ipBlock) != (has(self.podSelector) || has(self.namespaceSelector))").message("a peer is either an ipBlock or pod/namespace selectors, not both and not neither"))]
pub struct Peer {
    /// Pods (in this namespace, or in the namespaces of `namespaceSelector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces by label, e.g. `kubernetes.io/metadata.name: ingress-nginx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// An IP range outside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A CIDR with exceptions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!isCIDR(self.cidr) || !has(self.except) || self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength())").message("every except entry must be a CIDR strictly inside ipBlock.cidr (a smaller range of the same family); an ipBlock without exceptions needs no except"))]
pub struct IpBlock {
    /// CIDR such as `10.20.0.0/16` or `2001:db8::/32`.
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32"))]
    #[schemars(length(min = 1, max = 64))]
    pub cidr: String,
    /// CIDRs inside `cidr` that are excluded (at most 16: each is checked against `cidr` on admission, and the
    /// API server's validation budget bounds that work).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    pub except: Vec<String>,
}

/// Transport protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

/// A port or port range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// Port number (1-65535) or a named container port such as `http` (checked by the operator).
    pub port: IntOrString,
    /// Last port of a range starting at a numeric `port` (must be >= port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// TCP, UDP or SCTP.
    #[serde(default)]
    pub protocol: Protocol,
}

/// DNS egress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsEgress {
    /// Allow DNS (UDP and TCP 53) to the cluster DNS pods.
    #[serde(default = "default_true")]
    pub allow: bool,
    /// Confirms that egress without DNS is intended (otherwise refused).
    #[serde(default)]
    pub acknowledge_no_dns: bool,
    /// Namespace of the cluster DNS (a namespace name such as `kube-system`).
    #[serde(default = "default_dns_namespace")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
    /// Labels of the cluster DNS pods.
    #[serde(default = "default_dns_labels")]
    pub pod_labels: std::collections::BTreeMap<String, String>,
}

impl Default for DnsEgress {
    fn default() -> Self {
        DnsEgress {
            allow: true,
            acknowledge_no_dns: false,
            namespace: default_dns_namespace(),
            pod_labels: default_dns_labels(),
        }
    }
}

fn default_dns_namespace() -> String {
    "kube-system".into()
}
fn default_dns_labels() -> std::collections::BTreeMap<String, String> {
    [("k8s-app".to_string(), "kube-dns".to_string())].into_iter().collect()
}

/// Isolate pods now. An isolated pod carries the label `crmguard.io/quarantine: <guard name>` (the guard's name as
/// a label value: names longer than 63 characters are shortened with a hash); the guard's quarantine policy
/// selects that label, its allow rules skip such pods, and only `forensicsPeers` may talk to it, both ways.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quarantine {
    /// Pods to isolate (in this namespace).
    pub pod_selector: LabelSelector,
    /// Why, recorded in Events and status, e.g. `falco: shell spawned in crm-web`.
    #[schemars(length(min = 1, max = 256))]
    pub reason: String,
    /// How long the isolation lasts, e.g. `4h`; it is lifted automatically afterwards.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("quarantine.ttl must be a positive duration such as 4h"))]
    pub ttl: String,
    /// The only peers the isolated pods may still talk to, in both directions (e.g. a forensics namespace);
    /// nothing else, not even DNS, unless listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub forensics_peers: Vec<Peer>,
    /// Trigger a backup of this namespace's CrmBackupPolicy before isolating.
    #[serde(default)]
    pub backup_first: bool,
}

/// Alert-driven quarantine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineWebhook {
    /// Accept quarantine requests for this guard.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Secret key holding the bearer token callers must present.
    pub token_secret_ref: SecretKeySelector,
    /// How long a webhook-triggered isolation lasts.
    #[serde(default = "default_webhook_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("webhook.ttl must be a positive duration such as 1h"))]
    pub ttl: String,
    /// Back up first: start a backup Job from every CrmBackupPolicy's CronJob in the namespace (one per
    /// incident: not again while an earlier one from this guard is younger than `ttl`) and isolate the pods only
    /// when those Jobs have ended, or when `backupTimeout` has passed; status.quarantines says which.
    #[serde(default)]
    pub backup_first: bool,
    /// With `backupFirst`, how long an isolation waits for the backup at most.
    #[serde(default = "default_backup_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("webhook.backupTimeout must be a positive duration such as 15m"))]
    pub backup_timeout: String,
    /// AccessMonitors (this namespace) whose incidents may isolate pods through this guard (their
    /// `spec.response.quarantineThrough`), with these settings. Empty: no monitor may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub access_monitors: Vec<String>,
}

fn default_backup_timeout() -> String {
    "15m".into()
}

fn default_webhook_ttl() -> String {
    "1h".into()
}

/// One isolation, recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineRecord {
    /// Isolated pod.
    pub pod: String,
    /// Why.
    pub reason: String,
    /// Who asked: `spec` or the webhook caller (e.g. `alertmanager`).
    pub requested_by: String,
    /// Since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
}

/// Observed state of a NetworkGuard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkGuardStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions, one per type: `Ready` and those of [`conditions`], whose declaration the CRD's description of this
    /// field is generated from (`api::crds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// NetworkPolicies in effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Pods in the namespace selected by the guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_pods: Option<i32>,
    /// Pods in the namespace not covered (first 20 names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncovered_pods: Vec<String>,
    /// Number of pods isolated now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_pods: Option<i32>,
    /// Isolations in effect, and webhook isolations waiting for their backup (no `since`/`until` yet), bounded to
    /// 20; a released pod leaves the list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantines: Vec<QuarantineRecord>,
}

/// A NetworkGuard's conditions besides `Ready`.
pub mod conditions {
    crate::api::condition::conditions! {
        for super::NetworkGuardStatus;
        /// The NetworkPolicies the spec asks for are in effect (a write the API server refuses makes Ready False
        /// with reason `ApplyFailed` instead).
        PoliciesApplied: Required {
            /// Every NetworkPolicy of the guard is applied.
            Applied,
        }
        /// The guard protects something: spec.podSelector selects pods of its namespace that have not finished.
        Protecting: Required {
            /// The selector selects at least one pod.
            PodsSelected,
            /// The selector selects no pod, so the guard protects nothing: check it against the CRM pods' labels.
            NoPodsSelected,
        }
        /// Every pod of the namespace that has not finished (crmguard's own job pods aside) is behind the guard.
        Covered: Warning {
            /// Every such pod is selected.
            AllPodsCovered,
            /// Some pods are not selected and not protected; the message names them.
            UncoveredPods,
        }
        /// Pods are isolated by the guard's quarantine (status.quarantines lists them).
        Quarantined: Warning {
            /// At least one pod is isolated.
            Isolated,
            /// No pod is isolated.
            NoneIsolated,
        }
    }
}

crate::api::condition::reasons! {
    /// The reasons of the Events a NetworkGuard's controller records, besides `Ready`'s.
    pub enum NetworkGuardEvent {
        /// A pod was isolated; the note names it, why and until when.
        Quarantined,
        /// A pod was released from quarantine.
        Released,
    }
}

impl crate::api::condition::EventReason for NetworkGuardEvent {
    type Status = NetworkGuardStatus;
}
