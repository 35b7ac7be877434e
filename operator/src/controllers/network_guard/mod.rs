//! NetworkGuard controller: default-deny, allow-list, DNS and quarantine NetworkPolicies.

pub mod build;
pub mod quarantine;
pub mod reconcile;
pub mod request;
pub mod validate;
