//! An AccessMonitor's spec, checked: what the schema's CEL cannot (cron schedules, label values).

use std::time::Duration;

use crate::api::AccessMonitor;
use crate::controllers::network_guard::validate::check_selector;
use crate::k8s::meta::Owner;
use crate::monitor::rules::Rules;
use crate::validation::FieldError;

/// A checked AccessMonitor.
#[derive(Clone, Debug)]
pub struct ValidatedAccessMonitor {
    pub owner: Owner,
    pub engine: crate::api::access_monitor::MonitoredEngine,
    pub interval: Duration,
    pub rules: Rules,
}

pub fn validate(m: &AccessMonitor) -> Result<ValidatedAccessMonitor, Vec<FieldError>> {
    let owner = super::super::owner_of(m)?;
    let mut errors = Vec::new();
    check_selector(&m.spec.database.pod_selector, "spec.database.podSelector", &mut errors);
    let interval = crate::validation::duration_field("spec.interval", &m.spec.interval, &mut errors);
    let rules = Rules::parse(&m.spec.rules, &mut errors);
    // Not a CEL rule: the API server's CEL cannot read an integer field a client sent as 3.0, and would refuse it
    // with "invalid data, expected int, got float64".
    if let Some(b) = &m.spec.rules.baseline
        && b.min_weeks > b.weeks
    {
        errors.push(FieldError::new(
            "spec.rules.baseline.minWeeks",
            format!(
                "Invalid value: {}: at most weeks ({}), or nothing could ever be flagged: lower minWeeks or raise weeks",
                b.min_weeks, b.weeks
            ),
        ));
    }
    let mut users = std::collections::BTreeSet::new();
    for (i, k) in m.spec.identities.iter().enumerate() {
        if !users.insert(k.user.as_str()) {
            errors.push(FieldError::new(
                format!("spec.identities[{i}].user"),
                format!("Duplicate value: {:?}: name each database user once", k.user),
            ));
        }
    }
    match interval {
        Some(interval) if errors.is_empty() => {
            Ok(ValidatedAccessMonitor { owner, engine: m.spec.database.engine, interval, rules })
        }
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A baseline that could never flag anything (minWeeks above weeks) is refused naming the field and the fix.
    #[test]
    fn a_baseline_needing_more_weeks_than_it_keeps_is_refused() {
        let m = |min_weeks: i32| -> AccessMonitor {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
                "metadata": {"name": "crm-db", "namespace": "crm", "uid": "u-1"},
                "spec": {"database": {"engine": "postgres", "podSelector": {}},
                         "rules": {"baseline": {"weeks": 2, "minWeeks": min_weeks}}},
            }))
            .unwrap()
        };
        assert!(validate(&m(2)).is_ok());
        let e = validate(&m(3)).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.rules.baseline.minWeeks");
        assert!(e[0].message.contains("at most weeks (2)") && e[0].message.contains("lower minWeeks"), "{e:?}");
    }
}
