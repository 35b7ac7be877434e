//! Status conditions (`meta.v1.Condition`), their types and reasons, and the one helper that sets them.
//!
//! `lastTransitionTime` changes only when a condition's status flips; everything else (reason, message,
//! observedGeneration) is updated in place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Summary condition: the resource is fully in effect.
pub const READY: &str = "Ready";

/// Reasons shared by every kind. Reasons are PascalCase and stable: alerts and scripts match on them.
pub mod reason {
    /// Everything the spec asks for is in place.
    pub const RECONCILED: &str = "Reconciled";
    /// The spec is invalid; the message says which field and how to fix it.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced object (Secret, policy, ...) does not exist yet.
    pub const REFERENCE_NOT_FOUND: &str = "ReferenceNotFound";
    /// Work is in progress.
    pub const PROGRESSING: &str = "Progressing";
    /// A transient failure; the operator retries with backoff.
    pub const TRANSIENT_ERROR: &str = "TransientError";
}

/// Condition status values as the API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// Builds a condition. `now` is injected so callers (and tests) control time.
pub fn new_condition(
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now.clone(),
    }
}

/// Inserts or updates `new` in `conditions` (a list keyed by `type`), keeping the previous
/// `lastTransitionTime` when the status did not change. Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            if *existing == new {
                return false;
            }
            *existing = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = vec![];
        assert!(set_condition(&mut conds, new_condition(READY, Status::False, "A", "m", Some(1), &t(10))));
        // same status, new message: updated, time kept
        assert!(set_condition(&mut conds, new_condition(READY, Status::False, "B", "m2", Some(2), &t(20))));
        assert_eq!(conds[0].last_transition_time, t(10));
        assert_eq!(conds[0].reason, "B");
        // identical apart from time: no change
        assert!(!set_condition(&mut conds, new_condition(READY, Status::False, "B", "m2", Some(2), &t(30))));
        // flip: time moves
        assert!(set_condition(&mut conds, new_condition(READY, Status::True, "C", "ok", Some(2), &t(40))));
        assert_eq!(conds[0].last_transition_time, t(40));
        assert_eq!(conds.len(), 1);
    }
}
