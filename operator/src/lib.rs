//! crmguard: a Kubernetes operator that protects a CRM application (web app, PostgreSQL/MySQL database and
//! attachments volume) with verified encrypted backups, least-privilege access and a network guard.

pub mod alerting;
pub mod api;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod controllers;
pub mod document;
pub mod k8s;
pub mod metrics;
pub mod monitor;
pub mod netpol;
pub mod plan;
pub mod posture;
pub mod runtime;
pub mod validation;
pub mod vault;

/// An error's message and its causes' (a library's top message often leaves out what went wrong, e.g.
/// "error sending request" without "connection refused"), one string each.
pub fn error_chain(e: &dyn std::error::Error) -> impl Iterator<Item = String> + '_ {
    std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string)
}
