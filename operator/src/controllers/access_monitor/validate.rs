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
    pub interval: Duration,
    pub rules: Rules,
}

pub fn validate(m: &AccessMonitor) -> Result<ValidatedAccessMonitor, Vec<FieldError>> {
    let owner = super::super::owner_of(m)?;
    let mut errors = Vec::new();
    check_selector(&m.spec.database.pod_selector, "spec.database.podSelector", &mut errors);
    let interval = crate::validation::duration_field("spec.interval", &m.spec.interval, &mut errors);
    let rules = Rules::parse(&m.spec.rules, &mut errors);
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
        Some(interval) if errors.is_empty() => Ok(ValidatedAccessMonitor { owner, interval, rules }),
        _ => Err(errors),
    }
}
