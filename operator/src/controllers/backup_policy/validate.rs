//! Checks the API server cannot make (cron syntax, time zones, cross-field sense), producing a validated
//! policy that the builders consume.

use std::time::Duration;

use crate::api::backup_policy::{CrmBackupPolicy, CrmBackupPolicySpec};
use crate::controllers::schedule::{check_time_zone, parse_cron};
use crate::k8s::meta::Owner;
use crate::validation::{FieldError, duration_field};

/// A CrmBackupPolicy that passed every check.
#[derive(Clone, Debug)]
pub struct ValidatedBackupPolicy {
    pub owner: Owner,
    pub spec: CrmBackupPolicySpec,
    /// Database port (the engine's default when unset).
    pub port: u16,
    /// Key prefix in the bucket (default `<namespace>/<name>`).
    pub prefix: String,
    pub rpo: Duration,
    pub cron: croner::Cron,
    pub time_zone: Option<jiff::tz::TimeZone>,
}

/// Validates a policy.
pub fn validate(policy: &CrmBackupPolicy) -> Result<ValidatedBackupPolicy, Vec<FieldError>> {
    let owner = super::super::owner_of(policy)?;
    let spec = &policy.spec;
    let mut errors = Vec::new();
    let cron = parse_cron(&spec.schedule.cron).map_err(|m| errors.push(FieldError::new("spec.schedule.cron", m))).ok();
    let time_zone = match &spec.schedule.time_zone {
        Some(tz) => check_time_zone(tz).map_err(|m| errors.push(FieldError::new("spec.schedule.timeZone", m))).ok(),
        None => None,
    };
    let rpo = duration_field("spec.rpo", &spec.rpo, &mut errors);
    if let Some(drill) = &spec.verification.restore_drill {
        if let Err(m) = parse_cron(&drill.cron) {
            errors.push(FieldError::new("spec.verification.restoreDrill.cron", m));
        }
        if drill.scratch_database == spec.source.database {
            errors.push(FieldError::new(
                "spec.verification.restoreDrill.scratchDatabase",
                format!(
                    "the drill database must differ from the source database {:?}: a drill drops and re-creates it",
                    spec.source.database
                ),
            ));
        }
    }
    errors.extend(check_resources(spec.job_resources.as_ref(), "spec.jobResources"));
    let port = spec.source.port.map_or(Ok(spec.source.engine.default_port()), u16::try_from);
    let port = port.map_err(|_| errors.push(FieldError::new("spec.source.port", "must be 1-65535"))).ok();
    match (cron, rpo, port) {
        (Some(cron), Some(rpo), Some(port)) if errors.is_empty() => Ok(ValidatedBackupPolicy {
            prefix: spec.destination.prefix.clone().unwrap_or_else(|| format!("{}/{}", owner.namespace, owner.name)),
            owner,
            spec: spec.clone(),
            port,
            rpo,
            cron,
            time_zone,
        }),
        _ => Err(errors),
    }
}

/// Quantities the API server would refuse in the CronJob's pod template: not a quantity, negative, or a request
/// above its limit.
pub fn check_resources(r: Option<&k8s_openapi::api::core::v1::ResourceRequirements>, field: &str) -> Vec<FieldError> {
    use crate::validation::quantity_value;
    let Some(r) = r else { return Vec::new() };
    let mut errors = Vec::new();
    let mut values = std::collections::BTreeMap::new();
    for (part, map) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (name, q) in map.iter().flatten() {
            match quantity_value(&q.0) {
                None => errors.push(FieldError::new(
                    format!("{field}.{part}.{name}"),
                    format!(
                        "{:?} is not a Kubernetes quantity; write e.g. 500m or 2 (CPU), 256Mi or 1Gi (memory)",
                        q.0
                    ),
                )),
                Some(v) if v < 0.0 => {
                    errors.push(FieldError::new(format!("{field}.{part}.{name}"), "must not be negative"));
                }
                Some(v) => {
                    values.insert((part, name.clone()), (v, q.0.clone()));
                }
            }
        }
    }
    for ((part, name), (req, text)) in &values {
        if *part == "requests"
            && let Some((limit, limit_text)) = values.get(&("limits", name.clone()))
            && req > limit
        {
            errors.push(FieldError::new(
                format!("{field}.requests.{name}"),
                format!("{text} is more than the limit {limit_text}; a request must not exceed its limit"),
            ));
        }
    }
    errors
}
