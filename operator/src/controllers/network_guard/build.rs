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

/// Builds every NetworkPolicy of a guard, in a stable order.
pub fn build(v: &ValidatedNetworkGuard) -> Vec<NetworkPolicy> {
    let owner = &v.owner;
    let spec = &v.guard.spec;
    let mut out = Vec::new();
    let policy = |suffix: &str, component: &str, spec: NetworkPolicySpec| NetworkPolicy {
        metadata: owner.child_meta(child_name(&owner.name, suffix, NAME_MAX), component),
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
    for rule in &spec.ingress {
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
    for rule in &spec.egress {
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
                .then(|| vec![NetworkPolicyIngressRule { from: Some(forensics), ports: None }]),
            ..NetworkPolicySpec::default()
        },
    ));
    out
}
