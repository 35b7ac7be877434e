//! AccessPolicy controller: per-team Roles and RoleBindings, Vault policies and roles, and short-lived
//! database credentials delivered into Secrets.

pub mod build;
pub mod ceiling;
pub mod lease;
pub mod reconcile;
pub mod validate;
pub mod vault_objects;
pub mod vault_sync;
