//! Who touched which customer data: audit entries read from the databases' own audit logs, attributed to the
//! identity that ran them, with every literal value removed before anything is kept, and checked against the
//! AccessMonitor's rules.
//!
//! `redact`: SQL without its values; `pgaudit`: PostgreSQL's pgaudit entries; `server_audit`: MariaDB's audit plugin
//! events; `access`: a pod's timestamped log lines as accesses; `attribution`: who a database user is; `rules`:
//! findings and the summaries the audit trail keeps; `baseline`: learned volumes per team, table and hour of the week;
//! `statistics`: rows read, from PostgreSQL's pg_stat_statements and MariaDB's performance_schema; `sessions`: which
//! client a statement came from.

pub mod access;
pub mod attribution;
pub mod baseline;
pub mod pgaudit;
pub mod redact;
pub mod rules;
pub mod server_audit;
pub mod sessions;
pub mod statistics;
