//! End-to-end test support: locating and running the `crmguard` binary as a user would.

pub mod apiserver;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the `crmguard` binary built by this workspace (debug profile unless `CRMGUARD_BIN` says otherwise).
pub fn crmguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CRMGUARD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join("crmguard")
}

/// Runs `crmguard` with arguments from the repository root.
pub fn crmguard(args: &[&str]) -> Output {
    let bin = crmguard_bin();
    Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (build it with `cargo build -p crmguard`)", bin.display()))
}
