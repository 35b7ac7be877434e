//! Who touched which customer data (issue 18, in progress): audit entries read from the databases' own audit logs,
//! attributed to the identity that ran them, with every literal value removed before anything is kept.
//!
//! `redact`: SQL without its values; `pgaudit`: PostgreSQL's pgaudit entries; `server_audit`: MariaDB's audit plugin
//! events. Not wired into a controller yet.

pub mod pgaudit;
pub mod redact;
pub mod server_audit;
