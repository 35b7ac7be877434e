#!/usr/bin/env bash
# Controller benchmark (issue 19): N custom resources of the four kinds across M namespaces on the real control
# plane (e2e/kube), created before the shipped build (`--profile dist`, as bench/backup.sh) of `crmguard run`
# starts. Prints the cold-start time until every resource has Ready for its generation, the idle API load
# (requests/s by verb, writes) over a window of at least one resync, the time a spec change takes under churn,
# and peak/idle RSS per watched object. The driver is a debug build (it only lists and patches). Not part of CI.
#   bench/controllers.sh [--resources 1000] [--namespaces 100] [--resync-seconds 60] [--idle-seconds N] [--concurrency 4]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile dist -q -p crmguard
cargo build -q -p e2e --bin bench-controllers
target=${CARGO_TARGET_DIR:-target}
CRMGUARD_BIN=$target/dist/crmguard "$target/debug/bench-controllers" "$@"
