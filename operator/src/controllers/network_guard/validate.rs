//! Checks of a NetworkGuard beyond the CRD schema: label selectors and rule targets that select nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use std::time::Duration;

use crate::api::network_guard::{NetworkGuard, PortRule};
use crate::k8s::meta::Owner;
use crate::validation::{FieldError, duration_field};

/// A NetworkGuard that passed every check.
#[derive(Clone, Debug)]
pub struct ValidatedNetworkGuard {
    pub owner: Owner,
    pub guard: NetworkGuard,
    /// spec.quarantine.ttl, parsed.
    pub quarantine_ttl: Option<Duration>,
    /// spec.webhook's ttl and backupTimeout, parsed.
    pub webhook: Option<WebhookTimes>,
}

/// How long a webhook-triggered isolation lasts, and how long one waits for its backup at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WebhookTimes {
    pub ttl: Duration,
    pub backup_timeout: Duration,
}

/// Checks label keys and values the way the API server checks them in a NetworkPolicy (`-bad` is refused there,
/// and the guard would protect nothing while looking configured).
pub fn check_labels(labels: &std::collections::BTreeMap<String, String>, field: &str, errors: &mut Vec<FieldError>) {
    for (k, v) in labels {
        if !crate::validation::is_qualified_name(k) {
            errors.push(FieldError::new(
                field,
                format!(
                    "{k:?} is not a valid label key: an optional DNS-subdomain prefix and '/', then up to 63 \
                     alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
                ),
            ));
        }
        if !crate::validation::is_label_value(v) {
            errors.push(FieldError::new(
                format!("{field}.{k}"),
                format!(
                    "{v:?} is not a valid label value: empty, or up to 63 alphanumerics, '-', '_' or '.', starting \
                     and ending alphanumeric"
                ),
            ));
        }
    }
}

/// Checks a label selector the way the API server checks NetworkPolicy selectors.
pub fn check_selector(sel: &LabelSelector, field: &str, errors: &mut Vec<FieldError>) {
    if let Some(labels) = &sel.match_labels {
        check_labels(labels, &format!("{field}.matchLabels"), errors);
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if !req.key.is_empty() && !crate::validation::is_qualified_name(&req.key) {
            errors.push(FieldError::new(format!("{f}.key"), format!("{:?} is not a valid label key", req.key)));
        }
        for (j, v) in req.values.iter().flatten().enumerate() {
            if !crate::validation::is_label_value(v) {
                errors.push(FieldError::new(format!("{f}.values[{j}]"), format!("{v:?} is not a valid label value")));
            }
        }
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let values = req.values.as_deref().unwrap_or_default();
        let f = format!("{field}.matchExpressions[{i}]");
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                errors.push(FieldError::new(&f, format!("operator {} needs at least one value", req.operator)))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                errors.push(FieldError::new(&f, format!("operator {} takes no values", req.operator)))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push(FieldError::new(
                &f,
                format!("unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"),
            )),
        }
        if req.key.is_empty() {
            errors.push(FieldError::new(&f, "key must not be empty"));
        }
    }
}

/// Checks a port: 1-65535 or an IANA service name as container ports use; `endPort` only after a number.
pub fn check_port(p: &PortRule) -> Result<(), String> {
    match (&p.port, p.end_port) {
        (IntOrString::Int(n), _) if !(1..=65535).contains(n) => Err(format!("port {n} is outside 1-65535")),
        (IntOrString::Int(n), Some(end)) if end < *n => Err(format!("endPort {end} is below port {n}")),
        (IntOrString::String(_), Some(_)) => Err("endPort needs a numeric port, not a named one".into()),
        (IntOrString::String(name), None) => {
            let ok = (1..=15).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && name.bytes().any(|b| b.is_ascii_lowercase())
                && !name.starts_with('-')
                && !name.ends_with('-')
                && !name.contains("--");
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{name:?} is neither a port number nor a named port (up to 15 lower-case letters, digits and '-')"
                ))
            }
        }
        _ => Ok(()),
    }
}

/// The conjunction of two selectors, or an error naming the label both pin to different values.
pub fn intersect(a: &LabelSelector, b: &LabelSelector) -> Result<LabelSelector, String> {
    let mut labels = a.match_labels.clone().unwrap_or_default();
    for (k, v) in b.match_labels.iter().flatten() {
        if let Some(existing) = labels.get(k).filter(|e| *e != v) {
            {
                return Err(format!(
                    "label {k} would have to be both {existing:?} and {v:?}, so the rule selects no pod"
                ));
            }
        }
        labels.insert(k.clone(), v.clone());
    }
    let exprs: Vec<LabelSelectorRequirement> =
        a.match_expressions.iter().flatten().chain(b.match_expressions.iter().flatten()).cloned().collect();
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    })
}

/// Validates a NetworkGuard.
pub fn validate(guard: &NetworkGuard) -> Result<ValidatedNetworkGuard, Vec<FieldError>> {
    let owner = super::super::owner_of(guard)?;
    let spec = &guard.spec;
    let mut errors = Vec::new();
    check_selector(&spec.pod_selector, "spec.podSelector", &mut errors);
    check_labels(&spec.dns.pod_labels, "spec.dns.podLabels", &mut errors);
    for (dir, rules) in [("ingress", &spec.ingress), ("egress", &spec.egress)] {
        let mut seen = std::collections::BTreeSet::new();
        for (i, rule) in rules.iter().enumerate() {
            let field = format!("spec.{dir}[{i}]");
            if !seen.insert(rule.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{field}.name"),
                    format!("Duplicate value: {:?}: rule names are unique within spec.{dir}", rule.name),
                ));
            }
            if rule.name.starts_with("target-") {
                errors.push(FieldError::new(
                    format!("{field}.name"),
                    "names starting with target- are reserved for spec.targets; rename the rule",
                ));
            }
            if let Some(target) = &rule.applies_to {
                check_selector(target, &format!("{field}.appliesTo"), &mut errors);
                if let Err(m) = intersect(&spec.pod_selector, target) {
                    errors.push(FieldError::new(format!("{field}.appliesTo"), m));
                }
            }
            for (j, p) in rule.ports.iter().enumerate() {
                if let Err(m) = check_port(p) {
                    errors.push(FieldError::new(format!("{field}.ports[{j}]"), m));
                }
            }
            for (j, peer) in rule.peers.iter().enumerate() {
                for (name, sel) in
                    [("podSelector", &peer.pod_selector), ("namespaceSelector", &peer.namespace_selector)]
                {
                    if let Some(sel) = sel {
                        check_selector(sel, &format!("{field}.peers[{j}].{name}"), &mut errors);
                    }
                }
            }
        }
    }
    if let Some(t) = &spec.targets {
        if let Some(db) = &t.database {
            check_selector(&db.pod_selector, "spec.targets.database.podSelector", &mut errors);
            if let Some(c) = &db.clients {
                check_selector(c, "spec.targets.database.clients", &mut errors);
            }
            if let Err(m) = intersect(&spec.pod_selector, &db.pod_selector) {
                errors.push(FieldError::new("spec.targets.database.podSelector", m));
            }
        }
        for (name, target) in [("vault", &t.vault), ("s3", &t.s3)] {
            for sel in target.iter().flat_map(|t| t.pod_selector.iter().chain(t.clients.iter())) {
                check_selector(sel, &format!("spec.targets.{name}"), &mut errors);
            }
        }
    }
    if let Some(q) = &spec.quarantine {
        check_selector(&q.pod_selector, "spec.quarantine.podSelector", &mut errors);
        for (j, peer) in q.forensics_peers.iter().enumerate() {
            for (name, sel) in [("podSelector", &peer.pod_selector), ("namespaceSelector", &peer.namespace_selector)] {
                if let Some(sel) = sel {
                    check_selector(sel, &format!("spec.quarantine.forensicsPeers[{j}].{name}"), &mut errors);
                }
            }
        }
    }
    let mut duration = |field: &str, value: &str| duration_field(field, value, &mut errors);
    let quarantine_ttl = spec.quarantine.as_ref().and_then(|q| duration("spec.quarantine.ttl", &q.ttl));
    let webhook = spec.webhook.as_ref().and_then(|w| {
        let ttl = duration("spec.webhook.ttl", &w.ttl);
        let backup_timeout = duration("spec.webhook.backupTimeout", &w.backup_timeout);
        Some(WebhookTimes { ttl: ttl?, backup_timeout: backup_timeout? })
    });
    if errors.is_empty() {
        Ok(ValidatedNetworkGuard { owner, guard: guard.clone(), quarantine_ttl, webhook })
    } else {
        Err(errors)
    }
}
