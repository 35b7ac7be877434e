//! Properties of NetworkGuard over generated guards (issue 16), each stated from the documentation: with
//! `defaultDeny` off in a direction nothing in that direction is denied; every flow a rule names is allowed;
//! adding a rule never denies more; a quarantined pod talks only to its forensics peers, both ways. Guards go
//! through `crmguard plan`, flows through the NetworkPolicy evaluator of `plan --explain`, in a small world of
//! pods in the guard's namespace, another namespace, a forensics namespace and two addresses outside.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::controllers::BuildContext;
use crmguard::document::Document;
use crmguard::netpol::{Endpoint, Flow, World};
use crmguard::plan::{plan, world};
use proptest::prelude::*;
use serde_json::{Value, json};

const PODS: [(&str, &str, &str, &str, &str); 7] = [
    ("crm", "web-0", "web", "a", "10.0.0.10"),
    ("crm", "web-1", "web", "b", "10.0.0.11"),
    ("crm", "db-0", "db", "a", "10.0.0.20"),
    ("crm", "worker-0", "worker", "b", "10.0.0.30"),
    ("other", "client-0", "web", "a", "10.0.1.10"),
    ("other", "db-9", "db", "b", "10.0.1.20"),
    ("forensics", "collector-0", "collector", "a", "10.0.2.10"),
];
/// Inside 203.0.113.0/24 (not in its /28 exception), inside the exception, and elsewhere.
const EXTERNAL: [&str; 3] = ["203.0.113.200", "203.0.113.5", "198.51.100.9"];
const PORTS: [(u16, &str); 4] = [(53, "UDP"), (80, "TCP"), (8080, "TCP"), (8050, "TCP")];

fn docs(guard: &Value, quarantined: Option<&str>) -> Vec<Document> {
    let doc = |value: Value| Document { source: "generated.yaml".into(), value };
    let mut out = vec![];
    for ns in ["crm", "other", "forensics"] {
        out.push(doc(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
            "labels": {"kubernetes.io/metadata.name": ns}}})));
    }
    for (ns, name, app, tier, ip) in PODS {
        let mut labels = json!({"app": app, "tier": tier});
        if quarantined == Some(name) && ns == "crm" {
            labels["crmguard.io/quarantine"] = json!("g");
        }
        out.push(doc(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip}})));
    }
    out.push(doc(guard.clone()));
    out
}

/// The world of a guard, or None when `plan` refuses it (generated combinations may conflict).
fn world_of(guard: &Value, quarantined: Option<&str>) -> Option<World> {
    let d = docs(guard, quarantined);
    let plans = plan(&d, None, &BuildContext::default(), "2026-12-01T12:00:00Z".parse().unwrap());
    if plans.iter().any(|p| !p.errors.is_empty()) {
        return None;
    }
    Some(world(&d, &plans))
}

fn endpoints() -> Vec<Endpoint> {
    PODS.iter()
        .map(|(ns, name, ..)| Endpoint::Pod { namespace: (*ns).into(), name: (*name).into() })
        .chain(EXTERNAL.iter().map(|ip| Endpoint::External(ip.parse().unwrap())))
        .collect()
}

fn flows() -> Vec<Flow> {
    let eps = endpoints();
    let mut out = vec![];
    for from in &eps {
        for to in eps.iter().filter(|t| *t != from) {
            if matches!((from, to), (Endpoint::External(_), Endpoint::External(_))) {
                continue;
            }
            for (port, proto) in PORTS {
                out.push(Flow { from: from.clone(), to: to.clone(), port, protocol: proto.into() });
            }
        }
    }
    out
}

fn in_crm(e: &Endpoint) -> bool {
    matches!(e, Endpoint::Pod { namespace, .. } if namespace == "crm")
}

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        Just(json!({"matchLabels": {"app": "web"}})),
        Just(json!({"matchLabels": {"tier": "a"}})),
        Just(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]})),
        Just(json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["worker"]}]})),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]})),
    ]
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        Just(json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}})),
        selector().prop_map(|s| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}, "podSelector": s})),
        Just(json!({"ipBlock": {"cidr": "203.0.113.0/24"}})),
        Just(json!({"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/28"]}})),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"port": 80})),
        Just(json!({"port": 53, "protocol": "UDP"})),
        Just(json!({"port": 8000, "endPort": 8100})),
        Just(json!({"port": "http"})),
    ]
}

fn rule(name: String) -> impl Strategy<Value = Value> {
    (proptest::option::of(selector()), proptest::collection::vec(peer(), 0..3), proptest::collection::vec(port(), 0..3))
        .prop_map(move |(applies_to, peers, ports)| {
            let mut r = json!({"name": name.clone(), "peers": peers, "ports": ports});
            if let Some(a) = applies_to {
                r["appliesTo"] = a;
            }
            r
        })
}

fn rules(prefix: &'static str) -> impl Strategy<Value = Vec<Value>> {
    (0..4usize).prop_flat_map(move |n| (0..n).map(|i| rule(format!("{prefix}{i}"))).collect::<Vec<_>>())
}

/// A guard `g` in namespace `crm`: selector, defaults, rules (only in denied directions), DNS, forensics.
fn guard() -> impl Strategy<Value = Value> {
    (selector(), any::<bool>(), any::<bool>(), rules("in"), rules("out"), any::<bool>()).prop_map(
        |(sel, deny_in, deny_out, ingress, egress, dns)| {
            let mut spec = json!({"podSelector": sel, "defaultDeny": {"ingress": deny_in, "egress": deny_out},
                "dns": {"allow": dns, "acknowledgeNoDns": !dns},
                "quarantine": {"podSelector": {"matchLabels": {"app": "nothing"}}, "reason": "r", "ttl": "1h",
                    "forensicsPeers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "forensics"}}}]}});
            if deny_in {
                spec["ingress"] = json!(ingress);
            }
            if deny_out {
                spec["egress"] = json!(egress);
            }
            json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "NetworkGuard",
                "metadata": {"name": "g", "namespace": "crm"}, "spec": spec})
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// `defaultDeny.egress: false` (`ingress`): nothing the guard's pods send (receive) is denied. Flows to
    /// (from) addresses outside the cluster have no other side that could deny them.
    #[test]
    fn a_direction_that_is_not_denied_denies_nothing(g in guard()) {
        let Some(w) = world_of(&g, None) else { return Ok(()) };
        for f in flows() {
            let outward = in_crm(&f.from) && matches!(f.to, Endpoint::External(_));
            let inward = in_crm(&f.to) && matches!(f.from, Endpoint::External(_));
            if (outward && !g["spec"]["defaultDeny"]["egress"].as_bool().unwrap())
                || (inward && !g["spec"]["defaultDeny"]["ingress"].as_bool().unwrap())
            {
                let v = w.evaluate(&f);
                prop_assert!(v.allowed, "{} -> {}:{}/{} denied: {}\n{g:#}", f.from, f.to, f.port, f.protocol, v.reason);
            }
        }
    }

    /// Adding a rule to a direction never denies a flow that was allowed.
    #[test]
    fn adding_a_rule_never_denies_more(g in guard(), extra in rule("extra".into()), egress in any::<bool>()) {
        let dir = if egress { "egress" } else { "ingress" };
        prop_assume!(g["spec"]["defaultDeny"][dir].as_bool().unwrap());
        let Some(before) = world_of(&g, None) else { return Ok(()) };
        let mut more = g.clone();
        let mut list = more["spec"][dir].as_array().cloned().unwrap_or_default();
        list.push(extra);
        more["spec"][dir] = json!(list);
        let Some(after) = world_of(&more, None) else { return Ok(()) };
        for f in flows() {
            if before.evaluate(&f).allowed {
                let v = after.evaluate(&f);
                prop_assert!(v.allowed, "{} -> {}:{}/{} denied after adding a rule: {}", f.from, f.to, f.port, f.protocol, v.reason);
            }
        }
    }

    /// Every flow an egress rule names to an address outside the cluster is allowed: from a protected pod the rule
    /// applies to, to an address of its ipBlock (not excepted), on one of its numeric ports (or any port).
    #[test]
    fn every_flow_an_egress_rule_names_is_allowed(g in guard()) {
        let Some(w) = world_of(&g, None) else { return Ok(()) };
        let spec = &g["spec"];
        for r in spec["egress"].as_array().cloned().unwrap_or_default() {
            for p in r["peers"].as_array().cloned().unwrap_or_default() {
                let Some(block) = p.get("ipBlock") else { continue };
                let excepted = block.get("except").is_some();
                let to: std::net::IpAddr = if excepted { EXTERNAL[0] } else { EXTERNAL[1] }.parse().unwrap();
                let ports: Vec<(u16, String)> = match r["ports"].as_array() {
                    Some(ps) if !ps.is_empty() => ps.iter().filter_map(|p| {
                        let n = u16::try_from(p["port"].as_u64()?).ok()?;
                        Some((n, p["protocol"].as_str().unwrap_or("TCP").to_string()))
                    }).collect(),
                    _ => vec![(443, "TCP".to_string())],
                };
                for (ns, name, app, tier, _) in PODS.iter().filter(|p| p.0 == "crm") {
                    let labels = [("app".to_string(), app.to_string()), ("tier".to_string(), tier.to_string())].into();
                    let sel = |v: &Value| -> bool {
                        let s: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector = serde_json::from_value(v.clone()).unwrap();
                        crmguard::netpol::selector_matches(&s, &labels)
                    };
                    if !sel(&spec["podSelector"]) || r.get("appliesTo").is_some_and(|a| !sel(a)) {
                        continue;
                    }
                    for (port, proto) in &ports {
                        let f = Flow { from: Endpoint::Pod { namespace: (*ns).into(), name: (*name).into() },
                            to: Endpoint::External(to), port: *port, protocol: proto.clone() };
                        let v = w.evaluate(&f);
                        prop_assert!(v.allowed, "rule {} names {} -> {to}:{port}/{proto}, denied: {}", r["name"], name, v.reason);
                    }
                }
            }
        }
    }

    /// A quarantined pod talks only to its forensics peers, both ways, whatever the guard allows otherwise.
    #[test]
    fn a_quarantined_pod_talks_only_to_its_forensics_peers(g in guard(), which in 0..4usize) {
        let q = PODS[which].1;
        let Some(w) = world_of(&g, Some(q)) else { return Ok(()) };
        for f in flows() {
            let involves = |e: &Endpoint| matches!(e, Endpoint::Pod { namespace, name } if namespace == "crm" && name == q);
            let forensics = |e: &Endpoint| matches!(e, Endpoint::Pod { namespace, .. } if namespace == "forensics");
            if involves(&f.from) || involves(&f.to) {
                let other = if involves(&f.from) { &f.to } else { &f.from };
                let v = w.evaluate(&f);
                prop_assert_eq!(v.allowed, forensics(other), "{} -> {}:{}/{}: {}", f.from, f.to, f.port, f.protocol, v.reason);
            }
        }
    }
}
