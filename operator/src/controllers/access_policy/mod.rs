//! AccessPolicy controller: per-team Roles and RoleBindings (Vault objects land with the access issue).

pub mod build;
pub mod reconcile;
pub mod validate;
