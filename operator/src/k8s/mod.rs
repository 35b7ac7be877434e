//! Kubernetes helpers shared by the controllers: standard labels, owner references and child names, the
//! children's cache, server-side apply and the Event recorder.

pub mod apply;
pub mod cache;
pub mod events;
pub mod managed_fields;
pub mod meta;
pub mod reports;
