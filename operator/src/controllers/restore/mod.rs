//! CrmRestore controller: a Job running `crmguard restore run`.

pub mod build;
pub mod validate;
