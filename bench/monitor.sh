#!/usr/bin/env bash
# The AccessMonitor's pipeline: pgaudit log lines parsed, attributed, checked against the rules and chained into
# the audit trail, per second per core and peak RSS, against plain log shippers reading the same log:
# `tail | wc -l` (the floor: read and count lines) and `grep -c` (find the audit entries). Vector and Fluent Bit
# are not installable here (neither in Debian bookworm nor in the package registries this machine reaches).
#
#   bench/monitor.sh [--lines 2000000] [--runs 3] [--keep]
#
# The log is generated once (bench/monitor-log.py): what `kubectl logs --timestamps` prints for a PostgreSQL 15
# with pgaudit (log_relation on) serving a CRM: three teams' short-lived users and the application's user reading
# and writing six tables, multi-line statements, refused statements, failed logins, DDL, and the server's own
# lines. crmguard runs `crmguard monitor replay` (the operator's per-read pipeline, batch by batch, the access
# records written as hash-chained segments into a directory) with the rules bench/monitor-log.py writes (every rule,
# a learned baseline of every table). Each tool's median wall time
# and CPU time and its highest peak RSS are reported; lines/s per core = lines / (user + sys CPU seconds).
#
# Needs the shipped build (`--profile dist`, built here). Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
lines=2000000
runs=3
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --lines) lines="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --profile dist -q -p crmguard --locked
bin="$target/dist/crmguard"
work=$(mktemp -d)
[ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
python3 bench/monitor-log.py --lines "$lines" --out "$work/db.log" --monitor "$work/monitor.yaml" --policy "$work/policy.yaml"
size=$(stat -c %s "$work/db.log")
echo "log: $lines lines, $((size / 1048576)) MiB ($work/db.log)"

# measure <name> <command...>: prints "name wall user sys maxrss_kib" per run into $work/<name>.runs
measure() {
  local name="$1"; shift
  for _ in $(seq "$runs"); do
    rm -rf "$work/audit"
    /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > "$work/$name.out"
    echo "$(cat "$work/time")" >> "$work/$name.runs"
  done
}
measure crmguard "$bin" monitor replay -f "$work/monitor.yaml" --policy "$work/policy.yaml" \
  --team-user crm-teams/sales=v-k8s-sales-7Qx --team-user crm-teams/finance=v-k8s-finance-2Lp \
  --team-user crm-teams/support=v-k8s-support-9Zt --log "$work/db.log" --audit-dir "$work/audit"
measure tail-wc sh -c "tail -c +1 '$work/db.log' | wc -l"
measure grep-c grep -c ' AUDIT: ' "$work/db.log"

echo
printf '%-10s %10s %10s %12s %16s %12s\n' tool "wall s" "cpu s" "lines/s" "lines/s/core" "peak RSS MiB"
for t in crmguard tail-wc grep-c; do
  python3 - "$work/$t.runs" "$lines" "$t" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
lines, tool = int(sys.argv[2]), sys.argv[3]
wall = statistics.median(r[0] for r in rows)
cpu = statistics.median(r[1] + r[2] for r in rows)
rss = max(r[3] for r in rows) / 1024
print(f"{tool:<10} {wall:>10.2f} {cpu:>10.2f} {lines / wall:>12.0f} {lines / max(cpu, 1e-9):>16.0f} {rss:>12.1f}")
EOF
done
echo
echo "crmguard: $(tail -1 "$work/crmguard.out")"
