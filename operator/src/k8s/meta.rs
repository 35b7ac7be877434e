//! Standard labels, controller owner references and Kubernetes-safe child names.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};

/// `app.kubernetes.io/managed-by` value on every child.
pub const MANAGED_BY: &str = "crmguard";
/// Label naming the owning custom resource (`<kind>.<name>`, hashed when too long); used to prune children.
pub const OWNER_LABEL: &str = "crmguard.io/owner";

/// The owner of a set of children: kind, name, namespace and uid of the custom resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

impl Owner {
    /// Controller owner reference (with blockOwnerDeletion so foreground deletion waits for children).
    pub fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Value of [`OWNER_LABEL`]: identifies every child of this owner, for pruning.
    pub fn owner_label_value(&self) -> String {
        label_value(&format!("{}.{}", self.kind.to_lowercase(), self.name))
    }

    /// Standard labels of a child with the given component.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "crmguard".to_string()),
            ("app.kubernetes.io/instance".to_string(), label_value(&self.name)),
            ("app.kubernetes.io/component".to_string(), label_value(component)),
            ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
            (OWNER_LABEL.to_string(), self.owner_label_value()),
        ])
    }

    /// Metadata of a child: name, namespace, standard labels, controller owner reference.
    pub fn child_meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner_reference()]),
            ..ObjectMeta::default()
        }
    }
}

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// `<owner>-<suffix>`, truncated to `max` characters with a short hash of the full name, so that distinct
/// long names stay distinct and valid (CronJob names: 52, most objects: 253, labels: 63).
pub fn child_name(owner: &str, suffix: &str, max: usize) -> String {
    let full = if suffix.is_empty() { owner.to_string() } else { format!("{owner}-{suffix}") };
    if full.len() <= max {
        return full;
    }
    let hash = short_hash(&full);
    let keep = max.saturating_sub(hash.len() + 1);
    let head: String = full.chars().take(keep).collect();
    format!("{}-{hash}", head.trim_end_matches(['-', '.']))
}

/// A label value (at most 63 characters, alphanumeric at both ends), truncated with a hash when needed.
pub fn label_value(s: &str) -> String {
    let cleaned: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    let cleaned = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string();
    if cleaned.len() <= 63 && cleaned == s {
        return cleaned;
    }
    child_name(&cleaned, "", 63).trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}

/// Maximum length of a CronJob name (the controller appends an 11-character suffix to its Jobs).
pub const CRONJOB_NAME_MAX: usize = 52;
/// Maximum length of most object names (DNS subdomain).
pub const NAME_MAX: usize = 253;
/// Maximum length of names that must also be DNS labels (Services, Jobs' pods, ...).
pub const LABEL_NAME_MAX: usize = 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept() {
        assert_eq!(child_name("crm-db", "backup", CRONJOB_NAME_MAX), "crm-db-backup");
    }

    #[test]
    fn long_names_are_truncated_with_a_hash_and_stay_distinct() {
        let a = child_name(&"a".repeat(60), "backup", CRONJOB_NAME_MAX);
        let b = child_name(&format!("{}b", "a".repeat(59)), "backup", CRONJOB_NAME_MAX);
        assert_eq!(a.len(), CRONJOB_NAME_MAX);
        assert_ne!(a, b);
        assert!(a.chars().last().unwrap().is_ascii_alphanumeric());
    }

    #[test]
    fn label_values_fit_63() {
        let v = label_value(&"x".repeat(100));
        assert!(v.len() <= 63, "{v}");
        assert_eq!(label_value("crm-db"), "crm-db");
        assert_eq!(label_value("a/b"), label_value("a/b"));
        assert!(label_value("a/b").len() <= 63);
    }
}
