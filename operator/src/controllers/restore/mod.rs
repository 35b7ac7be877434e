//! CrmRestore controller: a Job running `crmguard restore run`.

pub mod build;
pub mod reconcile;
pub mod validate;
