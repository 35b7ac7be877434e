//! A pure evaluator of Kubernetes NetworkPolicy semantics: given pods, namespaces and policies, is a flow
//! `source -> destination:port/protocol` allowed?
//!
//! The rules (networking.k8s.io/v1): policies are additive allow-lists. A pod selected by no policy of a
//! direction is not isolated in that direction and allows everything. A pod selected by at least one policy
//! with that direction in `policyTypes` is isolated, and only traffic some such policy allows passes. A flow
//! between pods needs both the source's egress and the destination's ingress to allow it.
//! `policyTypes` defaults to `Ingress`, plus `Egress` when the policy has egress rules. An empty peer list
//! means any peer; an empty port list means any port. `ipBlock` peers match by IP (for pods, their pod IP).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// True when `labels` satisfy `sel` (an empty selector matches everything).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// A rule's peers and ports, whichever direction it is for.
type RuleView<'a> = (Option<&'a Vec<NetworkPolicyPeer>>, Option<&'a Vec<NetworkPolicyPort>>);

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A pod, by namespace and name.
    Pod { namespace: String, name: String },
    /// An address outside the cluster.
    External(IpAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::External(ip) => write!(f, "{ip}"),
        }
    }
}

/// A connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// The pods, namespaces and policies of a cluster.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
}

/// The answer, with the reason a person needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: String,
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

impl World {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.metadata.namespace.as_deref() == Some(namespace) && p.metadata.name.as_deref() == Some(name))
    }

    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .map(|n| labels_of(&n.metadata))
            .unwrap_or_default();
        // The API server sets this label on every namespace.
        labels.insert("kubernetes.io/metadata.name".into(), name.into());
        labels
    }

    fn pod_ip(pod: &Pod) -> Option<IpAddr> {
        pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
    }

    /// Does `peer` (of a policy in `policy_ns`) match `ep`?
    fn peer_matches(&self, peer: &NetworkPolicyPeer, policy_ns: &str, ep: &Endpoint) -> bool {
        if let Some(block) = &peer.ip_block {
            let ip = match ep {
                Endpoint::External(ip) => Some(*ip),
                Endpoint::Pod { namespace, name } => self.pod(namespace, name).and_then(Self::pod_ip),
            };
            let Some(ip) = ip else { return false };
            let inside = |c: &str| c.parse::<IpNet>().is_ok_and(|n| n.contains(&ip));
            return inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e));
        }
        let Endpoint::Pod { namespace, name } = ep else { return false };
        let Some(pod) = self.pod(namespace, name) else { return false };
        let ns_ok = match &peer.namespace_selector {
            Some(sel) => selector_matches(sel, &self.namespace_labels(namespace)),
            None => namespace == policy_ns,
        };
        let pod_ok = peer.pod_selector.as_ref().is_none_or(|sel| selector_matches(sel, &labels_of(&pod.metadata)));
        ns_ok && pod_ok
    }

    /// Does a rule's port list admit `port/protocol` on `dest` (named ports resolve against `dest`'s containers)?
    fn ports_match(&self, ports: Option<&Vec<NetworkPolicyPort>>, flow: &Flow, dest: &Endpoint) -> bool {
        let Some(ports) = ports.filter(|p| !p.is_empty()) else { return true };
        ports.iter().any(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            if proto != flow.protocol {
                return false;
            }
            match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    (*n..=end).contains(&i32::from(flow.port))
                }
                Some(IntOrString::String(name)) => {
                    let Endpoint::Pod { namespace, name: pod_name } = dest else { return false };
                    self.pod(namespace, pod_name).is_some_and(|pod| {
                        pod.spec.iter().flat_map(|s| s.containers.iter()).flat_map(|c| c.ports.iter().flatten()).any(
                            |cp| {
                                cp.name.as_deref() == Some(name.as_str())
                                    && cp.container_port == i32::from(flow.port)
                                    && cp.protocol.as_deref().unwrap_or("TCP") == flow.protocol
                            },
                        )
                    })
                }
            }
        })
    }

    fn policy_types(np: &NetworkPolicy) -> (bool, bool) {
        let spec = np.spec.clone().unwrap_or_default();
        match &spec.policy_types {
            Some(types) => (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress")),
            None => (true, spec.egress.is_some()),
        }
    }

    fn selecting<'a>(&'a self, pod: &'a Pod, egress: bool) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let labels = labels_of(&pod.metadata);
        self.policies.iter().filter(move |np| {
            let (ing, eg) = Self::policy_types(np);
            np.metadata.namespace.as_deref() == Some(ns.as_str())
                && (if egress { eg } else { ing })
                && np
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_selector.as_ref())
                    .is_none_or(|sel| selector_matches(sel, &labels))
        })
    }

    fn name(np: &NetworkPolicy) -> String {
        np.metadata.name.clone().unwrap_or_default()
    }

    /// One direction of a flow: `Ok(None)` when the pod at that end is not isolated in that direction,
    /// `Ok(Some(policy))` when `policy` allows it, `Err(verdict)` when it is denied (or the pod is unknown).
    fn direction(&self, flow: &Flow, egress: bool) -> Result<Option<String>, Verdict> {
        let (end, other, dir) =
            if egress { (&flow.from, &flow.to, "egress") } else { (&flow.to, &flow.from, "ingress") };
        let Endpoint::Pod { namespace, name } = end else { return Ok(None) };
        let Some(pod) = self.pod(namespace, name) else {
            return Err(Verdict { allowed: false, reason: format!("unknown pod {end}") });
        };
        let selecting: Vec<&NetworkPolicy> = self.selecting(pod, egress).collect();
        if selecting.is_empty() {
            return Ok(None);
        }
        let allowing = selecting.iter().find(|np| {
            let ns = np.metadata.namespace.clone().unwrap_or_default();
            let spec = np.spec.as_ref();
            let rules: Vec<RuleView<'_>> = if egress {
                spec.iter().flat_map(|s| s.egress.iter().flatten()).map(|r| (r.to.as_ref(), r.ports.as_ref())).collect()
            } else {
                spec.iter()
                    .flat_map(|s| s.ingress.iter().flatten())
                    .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                    .collect()
            };
            rules.into_iter().any(|(peers, ports)| {
                let peer_ok = peers
                    .filter(|p| !p.is_empty())
                    .is_none_or(|p| p.iter().any(|peer| self.peer_matches(peer, &ns, other)));
                peer_ok && self.ports_match(ports, flow, &flow.to)
            })
        });
        match allowing {
            Some(np) => Ok(Some(Self::name(np))),
            None => {
                let names: Vec<String> = selecting.iter().map(|np| Self::name(np)).collect();
                Err(Verdict {
                    allowed: false,
                    reason: format!("{dir} of {end} is isolated by {} and no rule allows it", names.join(", ")),
                })
            }
        }
    }

    /// Evaluates a flow: the source's egress, then the destination's ingress.
    pub fn evaluate(&self, flow: &Flow) -> Verdict {
        let egress_by = match self.direction(flow, true) {
            Ok(by) => by,
            Err(v) => return v,
        };
        let ingress_by = match self.direction(flow, false) {
            Ok(by) => by,
            Err(v) => return v,
        };
        let part = |dir: &str, by: Option<String>| match by {
            Some(np) => format!("{dir} allowed by {np}"),
            None => format!("{dir} not isolated"),
        };
        Verdict { allowed: true, reason: format!("{}; {}", part("egress", egress_by), part("ingress", ingress_by)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn world() -> World {
        let pod = |ns: &str, name: &str, labels: serde_json::Value, ip: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": ip}}))
            .unwrap()
        };
        let np = |v: serde_json::Value| -> NetworkPolicy { serde_json::from_value(v).unwrap() };
        World {
            namespaces: vec![],
            pods: vec![
                pod("a", "web", json!({"app": "web"}), "10.0.0.1"),
                pod("a", "db", json!({"app": "db"}), "10.0.0.2"),
                pod("b", "x", json!({}), "10.0.1.1"),
            ],
            policies: vec![
                np(
                    json!({"metadata": {"name": "deny", "namespace": "a"}, "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}),
                ),
                np(
                    json!({"metadata": {"name": "allow-web", "namespace": "a"}, "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]}]}}),
                ),
            ],
        }
    }

    fn flow(from: (&str, &str), to: (&str, &str), port: u16) -> Flow {
        Flow {
            from: Endpoint::Pod { namespace: from.0.into(), name: from.1.into() },
            to: Endpoint::Pod { namespace: to.0.into(), name: to.1.into() },
            port,
            protocol: "TCP".into(),
        }
    }

    #[test]
    fn additive_allow_lists_with_named_ports() {
        let w = world();
        let v = w.evaluate(&flow(("a", "web"), ("a", "db"), 8080));
        assert!(v.allowed, "{}", v.reason);
        assert!(v.reason.contains("ingress allowed by allow-web"), "{}", v.reason);
        let v = w.evaluate(&flow(("b", "x"), ("a", "db"), 8080));
        assert!(!v.allowed && v.reason.contains("isolated by deny, allow-web"), "{}", v.reason);
        assert!(!w.evaluate(&flow(("a", "web"), ("a", "db"), 8081)).allowed, "named port resolves to 8080 only");
        assert!(w.evaluate(&flow(("a", "db"), ("a", "web"), 1)).allowed, "web is not isolated");
    }

    #[test]
    fn selectors_follow_the_api_semantics() {
        let sel: LabelSelector = serde_json::from_value(json!({"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "x", "operator": "DoesNotExist"}]}))
        .unwrap();
        let l = |v: serde_json::Value| -> BTreeMap<String, String> { serde_json::from_value(v).unwrap() };
        assert!(selector_matches(&sel, &l(json!({"tier": "a"}))));
        assert!(!selector_matches(&sel, &l(json!({"tier": "a", "x": "1"}))));
        assert!(!selector_matches(&sel, &l(json!({"tier": "c"}))));
        assert!(selector_matches(&LabelSelector::default(), &l(json!({}))));
    }
}
