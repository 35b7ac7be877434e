//! `crmguard plan`: reads custom resources from files and shows every object the operator would create for
//! them, plus every validation error, without a cluster.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::api::{AccessPolicy, CrmBackupPolicy, CrmRestore, NetworkGuard};
use crate::controllers::{BuildContext, access_policy, backup_policy, network_guard, restore};
use crate::document::Document;
use crate::validation::{FieldError, admit, crmguard_kind, with_defaults};

/// The outcome for one input document.
#[derive(Clone, Debug)]
pub struct Planned {
    pub source: String,
    /// `Kind namespace/name` of the input.
    pub resource: String,
    /// Objects the operator would create (apiVersion/kind included).
    pub children: Vec<Value>,
    /// Why the input would be refused (by the API server or by the operator).
    pub errors: Vec<FieldError>,
    /// Accepted, but worth attention.
    pub warnings: Vec<String>,
    /// True when the document is not a crmguard resource and was ignored.
    pub skipped: bool,
    /// What the operator would write to Vault (AccessPolicy): `(path, body)`.
    pub vault: Vec<(String, Value)>,
}

fn describe(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v.get("kind").and_then(Value::as_str).unwrap_or("<no kind>"),
        v.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("<no namespace>"),
        v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<no name>")
    )
}

fn to_values<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<Value> {
    items.into_iter().filter_map(|i| serde_json::to_value(i).ok()).collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, Vec<FieldError>> {
    crate::validation::read_typed(v).map_err(|e| vec![e])
}

/// Plans every document. `namespace` fills in resources without one (like `kubectl apply -n`).
pub fn plan(docs: &[Document], namespace: Option<&str>, ctx: &BuildContext, now: Timestamp) -> Vec<Planned> {
    // Default namespaces and schema defaults first, so that restores can find their policies.
    let prepared: Vec<(String, Value)> = docs
        .iter()
        .map(|d| {
            let mut v = d.value.clone();
            if let (Some(ns), Some(meta)) = (namespace, v.get_mut("metadata").and_then(Value::as_object_mut)) {
                meta.entry("namespace").or_insert_with(|| Value::String(ns.to_string()));
            }
            (d.source.clone(), v)
        })
        .collect();
    let policies: Vec<CrmBackupPolicy> = prepared
        .iter()
        .filter(|(_, v)| crmguard_kind(v) == Some("CrmBackupPolicy") && admit(v).is_empty())
        .filter_map(|(_, v)| serde_json::from_value(with_defaults(v)).ok())
        .collect();

    prepared
        .iter()
        .map(|(source, v)| {
            let mut planned = Planned {
                source: source.clone(),
                resource: describe(v),
                children: vec![],
                errors: vec![],
                warnings: vec![],
                skipped: false,
                vault: vec![],
            };
            let ours = v.get("apiVersion").and_then(Value::as_str).is_some_and(|a| a.starts_with("crmguard.io/"));
            let Some(kind) = crmguard_kind(v) else {
                // Another group is none of our business; our group with an unknown version or kind is a mistake.
                if ours {
                    planned.errors = admit(v);
                } else {
                    planned.skipped = true;
                }
                return planned;
            };
            planned.errors = admit(v);
            if !planned.errors.is_empty() {
                return planned;
            }
            let v = with_defaults(v);
            let result = match kind {
                "CrmBackupPolicy" => {
                    typed::<CrmBackupPolicy>(&v).and_then(|p| backup_policy::validate::validate(&p)).map(|p| {
                        let c = backup_policy::build::build(&p, ctx);
                        let mut out = to_values([c.service_account]);
                        out.extend(to_values([c.config_map]));
                        out.extend(to_values([c.backup]));
                        out.extend(to_values(c.drill));
                        (out, vec![])
                    })
                }
                "CrmRestore" => typed::<CrmRestore>(&v).and_then(|r| {
                    let policy = policies.iter().find(|p| {
                        p.metadata.name.as_deref() == Some(r.spec.policy_ref.name.as_str())
                            && p.metadata.namespace == r.metadata.namespace
                    });
                    restore::validate::validate(&r, policy)
                        .map(|r| (to_values([restore::build::build(&r, ctx)]), vec![]))
                }),
                "AccessPolicy" => {
                    typed::<AccessPolicy>(&v).and_then(|p| access_policy::validate::validate(&p, ctx)).map(|p| {
                        planned.vault = vault_plan(&p, now);
                        let rbac = access_policy::build::build(&p, now);
                        let mut warnings = p.warnings.clone();
                        warnings.extend(rbac.expired.iter().map(|e| format!("grant expired and left out: {e}")));
                        let mut out = Vec::new();
                        for t in rbac.teams {
                            out.extend(to_values([t.role]));
                            out.extend(to_values([t.binding]));
                        }
                        (out, warnings)
                    })
                }
                "NetworkGuard" => typed::<NetworkGuard>(&v)
                    .and_then(|g| network_guard::validate::validate(&g))
                    .map(|g| (to_values(network_guard::build::build(&g)), vec![])),
                // An AccessMonitor creates no object: it reads a log and writes status, Events and audit records.
                "AccessMonitor" => typed::<crate::api::AccessMonitor>(&v)
                    .and_then(|m| crate::controllers::access_monitor::validate::validate(&m))
                    .map(|_| (vec![], vec![])),
                _ => Ok((vec![], vec![])),
            };
            match result {
                Ok((children, warnings)) => {
                    planned.children = children;
                    planned.warnings = warnings;
                }
                Err(errors) => planned.errors = errors,
            }
            planned
        })
        .collect()
}

/// Renders a plan as YAML: the children as documents, with comments naming their source, errors and warnings.
pub fn render(plans: &[Planned]) -> String {
    let mut out = String::from(
        "# crmguard plan: objects the operator would create. ownerReferences carry the uid the API server assigns to\n\
         # each custom resource; offline it is empty.\n",
    );
    for p in plans {
        if p.skipped {
            let _ = writeln!(out, "# {}: {} is not a crmguard resource; skipped", p.source, p.resource);
            continue;
        }
        if !p.errors.is_empty() {
            let _ = writeln!(out, "# {}: {} would be refused:", p.source, p.resource);
            for e in &p.errors {
                let _ = writeln!(out, "#   - {e}");
            }
            continue;
        }
        let _ = writeln!(out, "# {}: {} -> {} object(s)", p.source, p.resource, p.children.len());
        for w in &p.warnings {
            let _ = writeln!(out, "#   warning: {w}");
        }
        for child in &p.children {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(child).unwrap_or_default());
        }
        if !p.vault.is_empty() {
            let _ = writeln!(
                out,
                "# {}: written to Vault through its HTTP API (database statements shown for PostgreSQL; a MySQL \
                 connection gets MySQL ones), plus short-lived credentials read from <mount>/creds/<role> into a \
                 Secret per team:",
                p.resource
            );
            for (path, body) in &p.vault {
                let _ = writeln!(out, "#   {path}:");
                for line in serde_saphyr::to_string(body).unwrap_or_default().lines() {
                    let _ = writeln!(out, "#     {line}");
                }
            }
        }
    }
    out
}

/// The Vault writes of an AccessPolicy, as `(path, body)`.
fn vault_plan(p: &access_policy::validate::ValidatedAccessPolicy, now: Timestamp) -> Vec<(String, Value)> {
    use access_policy::vault_objects::{self, Engine};
    let settings = p.policy.spec.vault.clone().unwrap_or_default();
    let (auth, db) = (settings.kubernetes_auth_mount.trim_matches('/'), settings.database_mount.trim_matches('/'));
    let mut out = Vec::new();
    for t in vault_objects::build(p, now).teams {
        out.push((format!("sys/policies/acl/{}", t.policy_name), serde_json::json!({"policy": t.policy})));
        for r in t.auth_roles {
            out.push((format!("auth/{auth}/role/{}", r.name), r.body));
        }
        if let Some(role) = t.db_role {
            out.push((format!("{db}/roles/{}", role.name), vault_objects::db_role_body(Engine::Postgres, &role)));
        }
    }
    out
}

/// The world of an `--explain`: Namespaces and Pods from the input files, NetworkPolicies from the input and
/// from the plan.
pub fn world(docs: &[Document], plans: &[Planned]) -> crate::netpol::World {
    let mut w = crate::netpol::World::default();
    let inputs = docs.iter().map(|d| &d.value);
    let children = plans.iter().flat_map(|p| p.children.iter());
    for v in inputs.chain(children) {
        match (v.get("apiVersion").and_then(Value::as_str), v.get("kind").and_then(Value::as_str)) {
            (Some("v1"), Some("Namespace")) => w.namespaces.extend(serde_json::from_value(v.clone()).ok()),
            (Some("v1"), Some("Pod")) => w.pods.extend(serde_json::from_value(v.clone()).ok()),
            (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => {
                w.policies.extend(serde_json::from_value(v.clone()).ok())
            }
            _ => {}
        }
    }
    w
}

/// The flows `--explain` shows: every pod to every container port of every other pod, and every pod to the
/// addresses the policies name (the first address of each ipBlock and of each exception, on the rule's ports)
/// plus one internet address (8.8.8.8:443).
pub fn probe_flows(w: &crate::netpol::World) -> Vec<crate::netpol::Flow> {
    use crate::netpol::{Endpoint, Flow};
    let ep = |p: &k8s_openapi::api::core::v1::Pod| Endpoint::Pod {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    let mut externals: Vec<(std::net::IpAddr, u16, String)> = vec![([8, 8, 8, 8].into(), 443, "TCP".into())];
    for np in &w.policies {
        for rule in np.spec.iter().flat_map(|s| s.egress.iter().flatten()) {
            let ports: Vec<(u16, String)> = rule
                .ports
                .iter()
                .flatten()
                .filter_map(|p| match &p.port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        Some((u16::try_from(*n).ok()?, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
                    }
                    _ => None,
                })
                .collect();
            for block in rule.to.iter().flatten().filter_map(|p| p.ip_block.as_ref()) {
                for cidr in std::iter::once(&block.cidr).chain(block.except.iter().flatten()) {
                    let Ok(net) = cidr.parse::<ipnet::IpNet>() else { continue };
                    let Some(addr) = net.hosts().next() else { continue };
                    for (port, proto) in &ports {
                        if !externals.iter().any(|e| e.0 == addr && e.1 == *port) {
                            externals.push((addr, *port, proto.clone()));
                        }
                    }
                }
            }
        }
    }
    let mut flows = vec![];
    for src in &w.pods {
        for dst in w.pods.iter().filter(|d| d.metadata != src.metadata) {
            for c in dst.spec.iter().flat_map(|s| s.containers.iter()) {
                for cp in c.ports.iter().flatten() {
                    flows.push(Flow {
                        from: ep(src),
                        to: ep(dst),
                        port: u16::try_from(cp.container_port).unwrap_or(0),
                        protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    });
                }
            }
        }
        for (ip, port, proto) in &externals {
            flows.push(Flow { from: ep(src), to: Endpoint::External(*ip), port: *port, protocol: proto.clone() });
        }
    }
    flows
}

/// Renders the flow matrix of `--explain`.
pub fn explain(docs: &[Document], plans: &[Planned]) -> String {
    let w = world(docs, plans);
    let mut out = String::new();
    if w.pods.is_empty() {
        out.push_str("# --explain: no Pods in the input files; add a topology (see examples/topology/) to see flows\n");
        return out;
    }
    let flows = probe_flows(&w);
    let allowed = flows.iter().filter(|f| w.evaluate(f).allowed).count();
    let _ = writeln!(
        out,
        "# flow matrix: {} pods, {} policies; {allowed} of {} flows allowed",
        w.pods.len(),
        w.policies.len(),
        flows.len()
    );
    let _ = writeln!(out, "# {:<26} {:<28} {:<10} {:<7} why", "from", "to", "port", "verdict");
    for f in &flows {
        let v = w.evaluate(f);
        let port = format!("{}/{}", f.port, f.protocol);
        let verdict = if v.allowed { "ALLOW" } else { "deny" };
        let _ = writeln!(
            out,
            "  {:<26} {:<28} {:<10} {:<7} {}",
            f.from.to_string(),
            f.to.to_string(),
            port,
            verdict,
            v.reason
        );
    }
    out
}
