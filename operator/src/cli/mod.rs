//! The commands of the `crmguard` binary besides `run`, `plan` and `report` (which `main.rs` drives from the
//! library's `runtime`, `plan` and `posture`): the backup and restore jobs' own commands, and the AccessMonitor's offline replay.

pub mod backup;
pub mod monitor;
