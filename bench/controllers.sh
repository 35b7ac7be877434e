#!/usr/bin/env bash
# Controller benchmark (issue 3): N custom resources across M namespaces on the real control plane (e2e/kube), reconciled
# by a release build of `crmguard run`. Prints time until all Ready, writes per steady-state reconcile and peak
# RSS. Release builds take minutes on 2 cores; not part of CI.
#   bench/controllers.sh [--resources 1000] [--namespaces 100]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p crmguard -p e2e --bin crmguard --bin bench-controllers
target=${CARGO_TARGET_DIR:-target}
CRMGUARD_BIN=$target/release/crmguard "$target/release/bench-controllers" "$@"
