//! Kubernetes helpers shared by the controllers: standard labels, owner references and child names.

pub mod apply;
pub mod cache;
pub mod meta;
