#!/usr/bin/env python3
"""Writes a synthetic PostgreSQL 15 + pgaudit log as `kubectl logs --timestamps` prints it (the kubelet's RFC 3339
time, a space, the line), for bench/monitor.sh, with the AccessMonitor and AccessPolicy it is replayed with.

The mix (fixed seed): 62 % READ and 18 % WRITE audit entries (log_relation on: one entry per table) by three teams'
users and the application's user on six tables, 6 % of them multi-line statements (continuation lines behind a
tab), 2 % DDL by the DBA, 2 % refused statements (ERROR + STATEMENT lines), 1 % failed logins (FATAL + DETAIL), the
rest the server's own lines (connections, checkpoints)."""

import argparse
import datetime
import random

TEAMS = {"sales": "v-k8s-sales-7Qx", "finance": "v-k8s-finance-2Lp", "support": "v-k8s-support-9Zt"}
TABLES = ["contacts", "accounts", "deals", "invoices", "payments", "tickets"]
GRANTS = {"sales": ["contacts", "accounts", "deals"], "finance": ["invoices", "payments"], "support": ["tickets", "contacts"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--monitor", required=True)
    ap.add_argument("--policy", required=True)
    a = ap.parse_args()
    rnd = random.Random(18)
    t = datetime.datetime(2026, 12, 3, 9, 0, 0, tzinfo=datetime.timezone.utc)
    users = list(TEAMS.values()) + ["crm_app"] * 3
    written = 0
    stmt = 0
    with open(a.out, "w") as f:
        def emit(text):
            nonlocal t, written
            t += datetime.timedelta(microseconds=rnd.randint(20, 120))
            f.write(t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z " + text + "\n")
            written += 1

        while written < a.lines:
            pg = t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d} UTC"
            pid = rnd.randint(1000, 9999)
            r = rnd.random()
            stmt += 1
            if r < 0.80:
                user = rnd.choice(users)
                team = next((k for k, v in TEAMS.items() if v == user), None)
                table = rnd.choice(GRANTS[team]) if team and rnd.random() < 0.97 else rnd.choice(TABLES)
                read = r < 0.62
                cls, cmd = ("READ", "SELECT") if read else ("WRITE", rnd.choice(["INSERT", "UPDATE", "DELETE"]))
                if read:
                    sql = f"SELECT id, name, email FROM public.{table} WHERE id = {rnd.randint(1, 10**6)} AND note = 'x, y'"
                else:
                    sql = f"UPDATE public.{table} SET note = 'customer {rnd.randint(1, 10**6)}' WHERE id = {rnd.randint(1, 10**6)}"
                if rnd.random() < 0.06:
                    head, tail = sql.split(" WHERE ", 1)
                    emit(f"{pg} [{pid}] {user}@crm LOG:  AUDIT: SESSION,{stmt},1,{cls},{cmd},TABLE,public.{table},\"{head}")
                    emit(f"\tWHERE {tail}\",<not logged>")
                else:
                    emit(f"{pg} [{pid}] {user}@crm LOG:  AUDIT: SESSION,{stmt},1,{cls},{cmd},TABLE,public.{table},\"{sql}\",<not logged>")
            elif r < 0.82:
                emit(f"{pg} [{pid}] postgres@crm LOG:  AUDIT: SESSION,{stmt},1,DDL,ALTER TABLE,TABLE,public.{rnd.choice(TABLES)},ALTER TABLE x ADD COLUMN c{stmt} text,<not logged>")
            elif r < 0.84:
                user = rnd.choice(list(TEAMS.values()))
                emit(f"{pg} [{pid}] {user}@crm ERROR:  permission denied for table payroll")
                emit(f"{pg} [{pid}] {user}@crm STATEMENT:  SELECT * FROM payroll WHERE salary > {rnd.randint(1, 10**6)}")
            elif r < 0.85:
                emit(f"{pg} [{pid}] mallory@crm FATAL:  password authentication failed for user \"mallory\"")
                emit(f"{pg} [{pid}] mallory@crm DETAIL:  Role \"mallory\" does not exist.")
            elif r < 0.95:
                emit(f"{pg} [{pid}] crm_app@crm LOG:  connection authorized: user=crm_app database=crm application_name=psql")
            else:
                emit(f"{pg} [{pid}] LOG:  checkpoint complete: wrote {rnd.randint(1, 999)} buffers (0.1%)")
    grants = "\n".join(
        f"""  - name: {team}
    subjects: [{{kind: Group, name: crm-{team}}}]
    credentials: {{}}
    database:
      connection: crm
      grants:
      - {{schema: public, tables: [{", ".join(tables)}], privileges: [SELECT, INSERT, UPDATE, DELETE]}}"""
        for team, tables in GRANTS.items()
    )
    open(a.policy, "w").write(
        f"""apiVersion: crmguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: crm-teams, namespace: crm}}
spec:
  vault: {{}}
  teams:
{grants}
"""
    )
    open(a.monitor, "w").write(
        """apiVersion: crmguard.io/v1alpha1
kind: AccessMonitor
metadata: {name: crm-db, namespace: crm}
spec:
  database: {engine: postgres, podSelector: {matchLabels: {app: crm-db}}}
  identities:
  - {user: crm_app, name: crm-web}
  - {user: postgres, name: dba}
  rules:
    ddl: {changeWindows: [{schedule: "0 2 * * 6", duration: 2h}]}
    readVolume: [{tables: [public.invoices, public.payments], maxPerMinute: 120}]
    failedLogins: {maxPerMinute: 10}
    baseline: {}
"""
    )


if __name__ == "__main__":
    main()
