//! CrmBackupPolicy controller: a CronJob (and a restore-drill CronJob) running `crmguard backup run`.

pub mod build;
pub mod reconcile;
pub mod status;
pub mod validate;
