//! Pure builder: validated NetworkGuard -> NetworkPolicies.
//!
//! NetworkPolicies are additive, so a deny-all policy cannot take away what another policy allows. Isolation
//! therefore works by exclusion: every allow policy selects only pods *without* the quarantine label, and a
//! separate policy selects the labelled pods and allows nothing but the forensics peers.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::validate::{ValidatedNetworkGuard, intersect};
use crate::api::network_guard::{Peer, PortRule, Protocol, TrafficRule};
use crate::k8s::meta::{NAME_MAX, child_name, label_value};

/// Label put on isolated pods; its value is the guard's name.
pub const QUARANTINE_LABEL: &str = "crmguard.io/quarantine";

fn not_quarantined(sel: &LabelSelector) -> LabelSelector {
    let mut sel = sel.clone();
    sel.match_expressions.get_or_insert_with(Vec::new).push(LabelSelectorRequirement {
        key: QUARANTINE_LABEL.into(),
        operator: "DoesNotExist".into(),
        values: None,
    });
    sel
}

fn peer(p: &Peer) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: p.pod_selector.clone(),
        namespace_selector: p.namespace_selector.clone(),
        ip_block: p
            .ip_block
            .as_ref()
            .map(|b| IPBlock { cidr: b.cidr.clone(), except: (!b.except.is_empty()).then(|| b.except.clone()) }),
    }
}

fn protocol(p: Protocol) -> String {
    match p {
        Protocol::TCP => "TCP",
        Protocol::UDP => "UDP",
        Protocol::SCTP => "SCTP",
    }
    .to_string()
}

fn port(p: &PortRule) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(p.port.clone()), end_port: p.end_port, protocol: Some(protocol(p.protocol)) }
}

fn opt_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// The guard's allow rules with its `targets` expanded: `(ingress, egress)`.
pub fn rules(spec: &crate::api::network_guard::NetworkGuardSpec) -> (Vec<TrafficRule>, Vec<TrafficRule>) {
    let mut ingress = spec.ingress.clone();
    let mut egress = spec.egress.clone();
    let Some(t) = &spec.targets else { return (ingress, egress) };
    let tcp = |port: i32| vec![PortRule { port: IntOrString::Int(port), end_port: None, protocol: Protocol::TCP }];
    let pods = |sel: &LabelSelector| Peer { pod_selector: Some(sel.clone()), namespace_selector: None, ip_block: None };
    if let Some(db) = &t.database {
        let clients = db.clients.clone().unwrap_or_else(|| spec.pod_selector.clone());
        ingress.push(TrafficRule {
            name: "target-database".into(),
            applies_to: Some(db.pod_selector.clone()),
            peers: vec![pods(&clients)],
            ports: tcp(db.port),
        });
        egress.push(TrafficRule {
            name: "target-database".into(),
            applies_to: db.clients.clone(),
            peers: vec![pods(&db.pod_selector)],
            ports: tcp(db.port),
        });
    }
    for (name, target, default_port) in [("target-vault", &t.vault, 8200), ("target-s3", &t.s3, 443)] {
        let Some(target) = target else { continue };
        let peer = match (&target.namespace, &target.cidr) {
            (Some(ns), _) => Peer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.clone())])),
                    ..LabelSelector::default()
                }),
                pod_selector: target.pod_selector.clone(),
                ip_block: None,
            },
            (None, cidr) => Peer {
                pod_selector: None,
                namespace_selector: None,
                ip_block: Some(crate::api::network_guard::IpBlock {
                    cidr: cidr.clone().unwrap_or_default(),
                    except: vec![],
                }),
            },
        };
        egress.push(TrafficRule {
            name: name.into(),
            applies_to: target.clients.clone(),
            peers: vec![peer],
            ports: tcp(target.port.unwrap_or(default_port)),
        });
    }
    (ingress, egress)
}

/// Name of a guard's NetworkPolicy: `<guard>.<suffix>`. Suffixes (`default-deny`, `dns`, `quarantine`,
/// `in-<rule>`, `out-<rule>`) hold no dot and rule names are DNS labels, so the last dot separates guard and
/// suffix: distinct guards or rules never share a name (a dash joined `shop` + `in-web-default-deny` and
/// `shop-in-web` + `default-deny` into the same name). Names beyond 253 characters keep a hash of the whole.
pub fn policy_name(guard: &str, suffix: &str) -> String {
    child_name(&format!("{guard}.{suffix}"), "", NAME_MAX)
}

/// Builds every NetworkPolicy of a guard, in a stable order.
pub fn build(v: &ValidatedNetworkGuard) -> Vec<NetworkPolicy> {
    let owner = &v.owner;
    let spec = &v.guard.spec;
    let mut out = Vec::new();
    let policy = |suffix: &str, component: &str, spec: NetworkPolicySpec| NetworkPolicy {
        metadata: owner.child_meta(policy_name(&owner.name, suffix), component),
        spec: Some(spec),
    };

    let mut deny_types = Vec::new();
    if spec.default_deny.ingress {
        deny_types.push("Ingress".to_string());
    }
    if spec.default_deny.egress {
        deny_types.push("Egress".to_string());
    }
    if !deny_types.is_empty() {
        out.push(policy(
            "default-deny",
            "default-deny",
            NetworkPolicySpec {
                pod_selector: Some(spec.pod_selector.clone()),
                policy_types: Some(deny_types),
                ..NetworkPolicySpec::default()
            },
        ));
    }

    let target = |rule: &TrafficRule| {
        let sel = match &rule.applies_to {
            // validate() refused conflicting selectors; fall back to the guard's selector defensively.
            Some(t) => intersect(&spec.pod_selector, t).unwrap_or_else(|_| spec.pod_selector.clone()),
            None => spec.pod_selector.clone(),
        };
        not_quarantined(&sel)
    };
    // A direction that is not denied by default is not isolated by any policy of the guard: its rules (only
    // targets' parts can remain; spec rules are refused) would isolate it, so they are left out.
    let (mut ingress, mut egress) = rules(spec);
    if !spec.default_deny.ingress {
        ingress.clear();
    }
    if !spec.default_deny.egress {
        egress.clear();
    }
    for rule in &ingress {
        out.push(policy(
            &format!("in-{}", rule.name),
            "allow",
            NetworkPolicySpec {
                pod_selector: Some(target(rule)),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: opt_vec(rule.peers.iter().map(peer).collect()),
                    ports: opt_vec(rule.ports.iter().map(port).collect()),
                }]),
                ..NetworkPolicySpec::default()
            },
        ));
    }
    for rule in &egress {
        out.push(policy(
            &format!("out-{}", rule.name),
            "allow",
            NetworkPolicySpec {
                pod_selector: Some(target(rule)),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: opt_vec(rule.peers.iter().map(peer).collect()),
                    ports: opt_vec(rule.ports.iter().map(port).collect()),
                }]),
                ..NetworkPolicySpec::default()
            },
        ));
    }
    if spec.default_deny.egress && spec.dns.allow {
        let dns_peer = NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    spec.dns.namespace.clone(),
                )])),
                ..LabelSelector::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(spec.dns.pod_labels.clone()),
                ..LabelSelector::default()
            }),
            ip_block: None,
        };
        let dns_ports = ["UDP", "TCP"]
            .iter()
            .map(|p| NetworkPolicyPort {
                port: Some(IntOrString::Int(53)),
                end_port: None,
                protocol: Some(p.to_string()),
            })
            .collect();
        out.push(policy(
            "dns",
            "dns",
            NetworkPolicySpec {
                pod_selector: Some(not_quarantined(&spec.pod_selector)),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(vec![NetworkPolicyEgressRule { to: Some(vec![dns_peer]), ports: Some(dns_ports) }]),
                ..NetworkPolicySpec::default()
            },
        ));
    }
    let forensics: Vec<NetworkPolicyPeer> =
        spec.quarantine.as_ref().map(|q| q.forensics_peers.iter().map(peer).collect()).unwrap_or_default();
    out.push(policy(
        "quarantine",
        "quarantine",
        NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(QUARANTINE_LABEL.to_string(), label_value(&owner.name))])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: (!forensics.is_empty())
                .then(|| vec![NetworkPolicyIngressRule { from: Some(forensics.clone()), ports: None }]),
            egress: (!forensics.is_empty()).then(|| vec![NetworkPolicyEgressRule { to: Some(forensics), ports: None }]),
        },
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::network_guard::validate::validate;
    use serde_json::json;

    fn guard(spec: serde_json::Value) -> ValidatedNetworkGuard {
        let g: crate::api::NetworkGuard = serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "NetworkGuard",
            "metadata": {"name": "fw", "namespace": "crm", "uid": "u-1"}, "spec": spec}))
        .unwrap();
        validate(&g).unwrap()
    }

    fn by_name(policies: &[NetworkPolicy]) -> BTreeMap<String, serde_json::Value> {
        policies.iter().map(|p| (p.metadata.name.clone().unwrap(), serde_json::to_value(&p.spec).unwrap())).collect()
    }

    #[test]
    fn default_deny_dns_allow_and_quarantine_policies_are_exact() {
        let g = guard(json!({
            "podSelector": {"matchLabels": {"app": "crm"}},
            "ingress": [{"name": "web", "appliesTo": {"matchLabels": {"tier": "web"}},
                         "peers": [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}],
                         "ports": [{"port": 8080}, {"port": "metrics", "protocol": "TCP"}]}],
            "quarantine": {"podSelector": {}, "reason": "r", "ttl": "1h",
                           "forensicsPeers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "forensics"}}}]}
        }));
        let p = by_name(&build(&g));
        assert_eq!(p.keys().collect::<Vec<_>>(), ["fw.default-deny", "fw.dns", "fw.in-web", "fw.quarantine"]);
        assert_eq!(
            p["fw.default-deny"],
            json!({"podSelector": {"matchLabels": {"app": "crm"}}, "policyTypes": ["Ingress", "Egress"]})
        );
        assert_eq!(
            p["fw.in-web"],
            json!({
                "podSelector": {"matchLabels": {"app": "crm", "tier": "web"},
                                "matchExpressions": [{"key": "crmguard.io/quarantine", "operator": "DoesNotExist"}]},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}],
                             "ports": [{"port": 8080, "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]}]
            })
        );
        assert_eq!(
            p["fw.dns"]["egress"],
            json!([{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}])
        );
        assert_eq!(
            p["fw.quarantine"],
            json!({"podSelector": {"matchLabels": {"crmguard.io/quarantine": "fw"}}, "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "forensics"}}}]}],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "forensics"}}}]}]}),
            "the forensics peers, both ways, and nothing else"
        );
    }

    /// Issue 16, item 4: guard `shop` with ingress rule `web-default-deny` and guard `shop-in-web` both named a
    /// policy `shop-in-web-default-deny`.
    #[test]
    fn policy_names_of_different_guards_and_rules_never_collide() {
        let mut names = std::collections::BTreeSet::new();
        let mut total = 0;
        for guard in ["shop", "shop-in-web", "shop.in-web", "shop-in", "a", "a.in", "a-in"] {
            for suffix in
                ["default-deny", "dns", "quarantine", "in-web-default-deny", "in-web", "out-default-deny", "in-dns"]
            {
                names.insert(policy_name(guard, suffix));
                total += 1;
            }
        }
        assert_eq!(names.len(), total, "{names:?}");
        assert_ne!(policy_name("shop", "in-web-default-deny"), policy_name("shop-in-web", "default-deny"));
        let long = "g".repeat(250);
        assert!(policy_name(&long, "in-web").len() <= 253);
        assert_ne!(policy_name(&long, "in-web"), policy_name(&long, "in-wec"));
    }

    #[test]
    fn opting_out_of_default_deny_and_dns() {
        let g = guard(
            json!({"podSelector": {}, "defaultDeny": {"ingress": true, "egress": false}, "dns": {"allow": false}}),
        );
        let p = by_name(&build(&g));
        assert_eq!(
            p.keys().collect::<Vec<_>>(),
            ["fw.default-deny", "fw.quarantine"],
            "no DNS policy when egress is open"
        );
        assert_eq!(p["fw.default-deny"]["policyTypes"], json!(["Ingress"]));
    }
}
