#!/usr/bin/env bash
# Backup and restore throughput and peak memory: crmguard against restic (the engine K8up uses) and rclone, all
# writing the same PostgreSQL dump into the same SeaweedFS server, plus the server's raw PUT rate as the ceiling.
#
#   bench/backup.sh [--size-mib 2048] [--dataset crm|random] [--live] [--level N] [--runs 3] [--keep] [--hold]
#
# --dataset crm (default): CRM-like rows that compress about 4.8x. --dataset random: contacts whose notes are
# random text (base64 of random bytes) and whose attachments are random bytes, as real notes and uploaded files
# are: it compresses about 1.3x, so storage and encryption, not compression, set the pace.
#
# --live: every tool reads a real `pg_dump` of the running database (crmguard runs it itself; restic and rclone
# read it from a pipe), and `pg_dump` alone to /dev/null is measured as the ceiling. Without it every tool reads
# the same dump file.
#
# --runs N: each tool backs up and restores N times (restic into a fresh repository each time, so nothing is
# deduplicated against an earlier run); the report shows the median time and CPU and the highest peak RSS.
#
# --hold: after the report, keep the servers running and write $work/env.sh (source it to run crmguard, restic
# or a profiler against the same data by hand); Ctrl-C ends it.
#
# Needs the shipped build (`--profile dist`: LTO, built here; about 10 minutes the first time), scripts/install-services, and restic + rclone (apt-get install restic
# rclone). Everything runs on this machine: PostgreSQL and SeaweedFS share the CPU with the tool under test,
# as they would share a node. Not run in CI.
#
# Fairness: every tool reads the same dump. crmguard runs its real pipeline (pg_dump stand-in = `cat dump`,
# zstd at --level (the policy default, 1, unless given), AES-256-GCM, multipart upload, then its full verification: re-read, sha256, decrypt,
# decompress; the pg_dump archive structure check alongside) and is timed end to end, verification included. restic backs up the dump
# from stdin into an encrypted, compressed (auto) repository. rclone uploads it as is (no compression, no
# encryption). Restore = download, decrypt, decompress to /dev/null (crmguard `backup fetch`, `restic dump`,
# `rclone cat`).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=2048
level=
keep=0
hold=0
runs=3
dataset=crm
live=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --dataset) dataset=$2; shift 2 ;;
    --live) live=1; shift ;;
    --level) level=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --hold) hold=1; shift ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--size-mib N] [--dataset crm|random] [--live] [--level N] [--runs N] [--keep] [--hold]" >&2; exit 2 ;;
  esac
done
for tool in restic rclone /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install -y restic rclone time" >&2; exit 1; }
done
scripts/install-services >/dev/null
cargo build --profile dist -p crmguard >&2
bin=${CARGO_TARGET_DIR:-$PWD/target}/dist/crmguard
weed=$PWD/.ci/venv/bin/weed
pgbin=$(dirname "$(readlink -f "$(command -v initdb || echo /usr/lib/postgresql/15/bin/initdb)")")

work=$(mktemp -d /tmp/crmguard-bench-XXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -f "$work/pg/data/postmaster.pid" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true
  sleep 1
  rm -f /tmp/seaweedfs-*-"$s3port".sock
  [ "$keep" = 1 ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- servers ---------------------------------------------------------------------------------------------
pgport=$(freeport); s3port=$(freeport)
mkdir -p "$work/pg" "$work/s3"
chown postgres "$work/pg"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg/data" -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start \
  -o "-c listen_addresses=127.0.0.1 -p $pgport -k $work/pg -c fsync=off -c wal_level=minimal -c max_wal_senders=0" >/dev/null
cat >"$work/s3.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret-key"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
args=(mini -dir="$work/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$work/s3.json" -master.telemetry=false
  -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -s3.port="$s3port" -s3.port.grpc="$(freeport)")
for f in master.port volume.port filer.port admin.port; do args+=(-"$f"="$(freeport)" -"$f".grpc="$(freeport)"); done
"$weed" "${args[@]}" >"$work/weed.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$s3port") 2>/dev/null && break; sleep 0.1; done
export RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=SeaweedFS RCLONE_CONFIG_S3_ACCESS_KEY_ID=bench \
  RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=bench-secret-key RCLONE_CONFIG_S3_ENDPOINT="http://127.0.0.1:$s3port" \
  RCLONE_CONFIG_S3_REGION=us-east-1
unset AWS_CA_BUNDLE
touch "$work/rclone.conf"
export RCLONE_CONFIG="$work/rclone.conf"
for b in crmguard restic rclone raw; do
  for _ in $(seq 50); do rclone mkdir "s3:$b" 2>/dev/null && break; sleep 0.2; done
done

# --- data: a CRM-like database of about the requested dump size --------------------------------------------
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pgport" -U postgres)
"${psql[@]}" -c "CREATE DATABASE crm" >/dev/null
if [ "$dataset" = random ]; then
  # About 1 KiB per contact: 600 bytes of random text (notes) and 256 random bytes (an attachment), loaded by COPY.
  rows=$(( size_mib * 1024 * 1024 / 1130 ))
  echo "generating ~${size_mib} MiB of poorly compressible CRM data ($rows contacts)..." >&2
  "${psql[@]}" -d crm -c "CREATE UNLOGGED TABLE contacts (id bigint PRIMARY KEY, name text, email text, notes text, attachment bytea)" >/dev/null
  python3 - "$rows" <<'PY' | "${psql[@]}" -d crm -c "COPY contacts FROM STDIN" >/dev/null
import base64, os, sys
out = sys.stdout.buffer
for i in range(1, int(sys.argv[1]) + 1):
    notes = base64.b64encode(os.urandom(450)).decode()
    out.write(f"{i}\tContact {i}\tcontact{i}@example.com\t{notes}\t\\\\x{os.urandom(256).hex()}\n".encode())
PY
elif [ "$dataset" = crm ]; then
  rows=$(( size_mib * 1024 * 1024 / 330 ))
  echo "generating ~${size_mib} MiB of CRM data ($rows contacts)..." >&2
  "${psql[@]}" -d crm >/dev/null <<SQL
CREATE UNLOGGED TABLE contacts (id bigint PRIMARY KEY, name text, email text, company text, phone text, notes text,
  created timestamptz, score int);
INSERT INTO contacts
  SELECT i, 'Contact ' || i, 'contact' || i || '@' || (ARRAY['example.com','acme.io','corp.net'])[1 + i % 3],
         'Company ' || (i % 5000), '+49 30 ' || lpad((i * 7919 % 10000000)::text, 7, '0'),
         'Met at ' || (ARRAY['fair','call','demo','webinar'])[1 + i % 4] || ' about ' || md5(i::text) || '; follow up '
           || md5((i * 31)::text) || ' ' || repeat(chr(97 + (i % 26)::int), 40 + (i % 60)::int),
         '2020-01-01'::timestamptz + (i % 100000) * interval '17 minutes', (i * 7) % 100
  FROM generate_series(1::bigint, $rows) i;
SQL
else
  echo "--dataset is crm or random, not $dataset" >&2; exit 2
fi
"$pgbin/pg_dump" -h 127.0.0.1 -p "$pgport" -U postgres --format=custom --compress=0 crm >"$work/crm.dump"
dump_bytes=$(stat -c %s "$work/crm.dump")
dump_mib=$(( dump_bytes / 1048576 ))
echo "dump: $dump_mib MiB" >&2

mkdir -p "$work/bin"
if [ "$live" = 1 ]; then
  # Every tool reads a live pg_dump, as crmguard runs it (custom format, no compression of its own).
  ln -s "$pgbin/pg_dump" "$work/bin/pg_dump"
  source_cmd="'$pgbin/pg_dump' -h 127.0.0.1 -p $pgport -U postgres --format=custom --compress=0 crm"
else
  # crmguard reads the same dump: a pg_dump that prints it; psql and pg_restore are the real ones.
  printf '#!/bin/sh\n[ "$1" = --version ] && exec %s --version\nexec cat %s\n' "$pgbin/pg_dump" "$work/crm.dump" >"$work/bin/pg_dump"
  chmod +x "$work/bin/pg_dump"
  source_cmd="cat '$work/crm.dump'"
fi
ln -s "$pgbin/psql" "$work/bin/psql"; ln -s "$pgbin/pg_restore" "$work/bin/pg_restore"
cat >"$work/policy.yaml" <<EOF
apiVersion: crmguard.io/v1alpha1
kind: CrmBackupPolicy
metadata: {name: bench, namespace: bench}
spec:
  source: {engine: postgres, host: 127.0.0.1, port: $pgport, database: crm, tlsMode: disable, credentials: {secretRef: {name: db}}}
  schedule: {cron: '@daily'}
  destination: {bucket: crmguard, endpoint: 'http://127.0.0.1:$s3port', forcePathStyle: true, credentials: {secretRef: {name: s3}}}
  encryption: {key: {secretRef: {name: k, key: key}}}
EOF
[ -n "$level" ] && echo "  compression: {level: $level}" >>"$work/policy.yaml"
export CRMGUARD_DB_USERNAME=postgres CRMGUARD_DB_BIN_DIR="$work/bin" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key
CRMGUARD_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64)
export CRMGUARD_ENCRYPTION_KEY CRMGUARD_LOG_LEVEL=warn
export RESTIC_PASSWORD=bench-password
restic_base="s3:http://127.0.0.1:$s3port/restic"

# --- measurements ------------------------------------------------------------------------------------------
# run NAME CMD...: wall seconds and peak RSS (KiB) of CMD into $work/NAME.{secs,rss}
run() {
  local name=$1; shift
  local start end
  start=$(date +%s%N)
  /usr/bin/time -f '%M %U %S' -o "$work/$name.rss" "$@" >"$work/$name.out" 2>"$work/$name.err" || {
    echo "$name failed:" >&2; tail -5 "$work/$name.err" >&2; exit 1; }
  end=$(date +%s%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }' >"$work/$name.secs"
}
stored() { rclone size --json "s3:$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])'; }

head -c $((1024 * 1048576)) /dev/urandom >"$work/random.bin"
run raw-put rclone copyto --s3-upload-concurrency 4 --s3-chunk-size 16M "$work/random.bin" s3:raw/random.bin
rm -f "$work/random.bin"
run raw-get rclone cat s3:raw/random.bin
rclone purge s3:raw >/dev/null 2>&1 || true
[ "$live" = 1 ] && run pg-dump-alone sh -c "$source_cmd >/dev/null"
sync
for i in $(seq "$runs"); do
  export RESTIC_REPOSITORY="$restic_base/run-$i"
  restic init --repository-version 2 >/dev/null
  # CRMGUARD_BENCH_ARGS: extra flags for `crmguard backup run`, e.g. "--parts-in-flight 1".
  # shellcheck disable=SC2086
  run "crmguard-backup-$i" "$bin" backup run -f "$work/policy.yaml" ${CRMGUARD_BENCH_ARGS:-}
  run "restic-backup-$i" sh -c "$source_cmd | restic backup --stdin --stdin-filename crm.dump --compression auto -q"
  run "rclone-backup-$i" sh -c "$source_cmd | rclone rcat s3:rclone/crm.dump"
  run "crmguard-restore-$i" "$bin" backup fetch -f "$work/policy.yaml" --backup latest -o /dev/null
  run "restic-restore-$i" restic dump latest /crm.dump
  run "rclone-restore-$i" rclone cat s3:rclone/crm.dump
done
# Stored bytes of one backup each: crmguard's own report, restic's first repository, rclone's object.
crm_stored=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["storedBytes"])' "$work/crmguard-backup-1.out")
echo "$crm_stored $(stored restic/run-1) $(stored rclone)" >"$work/stored"
[ "$keep" = 1 ] && rclone ls s3:crmguard >&2

# --- report ------------------------------------------------------------------------------------------------
BENCH_DATASET=$dataset python3 - "$work" "$dump_bytes" <<'PY'
import sys, pathlib
w, dump = pathlib.Path(sys.argv[1]), int(sys.argv[2])
import statistics
runs = len(list(w.glob("crmguard-backup-*.secs")))
def usage(n): return (w / f"{n}.rss").read_text().split()
def one(n): return float((w / f"{n}.secs").read_text()), int(usage(n)[0]) / 1024
def get(n):
    if (w / f"{n}.secs").exists():
        return one(n)
    samples = [one(f"{n}-{i}") for i in range(1, runs + 1)]
    return statistics.median(s for s, _ in samples), max(r for _, r in samples)
def cpu(n): return statistics.median(float(usage(f"{n}-{i}")[1]) + float(usage(f"{n}-{i}")[2]) for i in range(1, runs + 1))
def spread(n): return [float((w / f"{n}-{i}.secs").read_text()) for i in range(1, runs + 1)]
mib = dump / 1048576
stored = dict(zip(["crmguard", "restic", "rclone"], map(int, (w / "stored").read_text().split())))
import os
mode = "live pg_dump" if (w / "pg-dump-alone.secs").exists() else "the same dump file"
print(f"dump: {mib:.0f} MiB (PostgreSQL custom format, uncompressed), dataset {os.environ.get('BENCH_DATASET', 'crm')}, "
      f"every tool reads {mode}; {runs} run(s) each: median seconds and CPU, highest RSS\n")
print(f"{'':24}{'seconds':>9}{'MiB/s':>9}{'peak RSS MiB':>14}{'stored MiB':>12}{'CPU s':>8}")
s, r = get("raw-put"); print(f"{'S3 raw PUT (1 GiB)':24}{s:9.1f}{1024/s:9.1f}{r:14.1f}{'':>12}")
s, r = get("raw-get"); print(f"{'S3 raw GET (1 GiB)':24}{s:9.1f}{1024/s:9.1f}{r:14.1f}{'':>12}")
if (w / "pg-dump-alone.secs").exists():
    s, r = get("pg-dump-alone"); pg_rate = mib / s
    print(f"{'pg_dump alone':24}{s:9.1f}{pg_rate:9.1f}{r:14.1f}{'':>12}")
res = {}
for op in ["backup", "restore"]:
    for t in ["crmguard", "restic", "rclone"]:
        s, r = get(f"{t}-{op}"); res[(t, op)] = mib / s
        st = f"{stored[t]/1048576:12.0f}" if op == "backup" else f"{'':12}"
        print(f"{t + ' ' + op:24}{s:9.1f}{mib/s:9.1f}{r:14.1f}{st}{cpu(f'{t}-{op}'):8.1f}")
import json
rep = json.loads((w / "crmguard-backup-1.out").read_text().strip().splitlines()[-1])
print(f"\ncrmguard backup phases: {rep['durationSeconds'] - rep['verifySeconds']:.1f} s dump+compress+encrypt+upload "
      f"(row counts and archive check alongside), {rep['verifySeconds']:.1f} s verification (re-read, sha256, decrypt, decompress)")
print()
if (w / "pg-dump-alone.secs").exists():
    print(f"live backup: crmguard at {res[('crmguard', 'backup')] / pg_rate * 100:.0f} % of pg_dump's own rate")
for op in ["backup", "restore"]:
    print(f"{op}: crmguard / restic throughput = {res[('crmguard', op)] / res[('restic', op)]:.2f}x, "
          f"crmguard / rclone = {res[('crmguard', op)] / res[('rclone', op)]:.2f}x")
    for t in ["crmguard", "restic"]:
        print(f"  {t} {op} seconds per run: {', '.join(f'{x:.1f}' for x in spread(f'{t}-{op}'))}")
PY
if [ "$hold" = 1 ]; then
  {
    echo "export work=$work bin=$bin CRMGUARD_DB_USERNAME=postgres CRMGUARD_DB_BIN_DIR=$work/bin"
    echo "export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key CRMGUARD_ENCRYPTION_KEY=$CRMGUARD_ENCRYPTION_KEY"
    echo "export CRMGUARD_LOG_LEVEL=warn RESTIC_REPOSITORY=$restic_base/run-1 RESTIC_PASSWORD=$RESTIC_PASSWORD"
    echo "export RCLONE_CONFIG=$RCLONE_CONFIG $(env | grep '^RCLONE_CONFIG_S3_' | tr '\n' ' ')"
    echo "# e.g.: \$bin backup run -f \$work/policy.yaml"
  } >"$work/env.sh"
  echo "holding: source $work/env.sh (Ctrl-C ends)" >&2
  sleep infinity &
  wait $!  # a signal interrupts wait (not a foreground sleep), so cleanup runs at once
fi
