//! The newcomer's path, through the real binary: `crmguard plan -f examples/`, `crmguard report` and `crmguard crd`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use e2e::crmguard;

#[test]
fn plan_of_the_examples_succeeds_and_prints_the_children() {
    let out = crmguard(&["plan", "-f", "examples/"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("5 resource(s) accepted, 0 refused, 20 object(s) to create"), "{stderr}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&stdout).expect("plan prints YAML");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["CronJob", "ConfigMap", "ServiceAccount", "Job", "Role", "RoleBinding", "NetworkPolicy"] {
        assert!(kinds.contains(&kind), "plan lacks a {kind}: {kinds:?}");
    }
}

#[test]
fn plan_of_an_invalid_file_fails_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("crmguard-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: crmguard.io/v1alpha1\nkind: CrmRestore\nmetadata: {name: r, namespace: crm}\n\
         spec: {policyRef: {name: p}, backup: {latest: true, id: x}, target: {database: d}}\n",
    )
    .unwrap();
    let out = crmguard(&["plan", "-f", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("spec.backup: name exactly one backup"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plan_of_a_missing_path_says_so() {
    let out = crmguard(&["plan", "-f", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/dir"));
}

#[test]
fn crd_prints_five_crds() {
    let out = crmguard(&["crd"]);
    assert!(out.status.success());
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let names: Vec<&str> = docs.iter().filter_map(|d| d["metadata"]["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "crmbackuppolicies.crmguard.io",
            "crmrestores.crmguard.io",
            "accesspolicies.crmguard.io",
            "networkguards.crmguard.io",
            "accessmonitors.crmguard.io"
        ]
    );
}

#[test]
fn plan_explain_prints_the_flow_matrix() {
    let out = crmguard(&["plan", "-f", "examples/", "--explain"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |from: &str, to: &str, port: &str| {
        stdout
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[0] == from && f[1] == to && f[2] == port
            })
            .unwrap_or_else(|| panic!("no row {from} -> {to} {port} in:\n{stdout}"))
            .to_string()
    };
    assert!(line("crm/web", "crm/db", "5432/TCP").contains("ALLOW"));
    assert!(line("crm/db", "8.8.8.8", "443/TCP").contains("deny"));
    assert!(stdout.contains("# flow matrix: 9 pods, 9 policies"), "{stdout}");
}

#[test]
fn report_of_the_examples_scores_them_offline() {
    let out = crmguard(&["report", "-f", "examples/"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The example's S3 keys are a long-lived Secret: a low warning, so the score is 99 and the exit code 3.
    assert_eq!(out.status.code(), Some(3), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("namespace crm: score 99/100"), "{stdout}");
    assert!(
        stdout.contains("SKIP critical backup-within-rpo"),
        "status checks are skipped offline, not passed: {stdout}"
    );
    let out = crmguard(&["report", "-f", "examples/", "-o", "policyreport"]);
    let report: serde_json::Value =
        serde_saphyr::from_str(String::from_utf8_lossy(&out.stdout).trim_start_matches("---\n")).unwrap();
    assert_eq!(report["kind"], "PolicyReport");
    assert_eq!(report["summary"]["warn"], 1);
}

/// `crmguard monitor replay`: a log as `kubectl logs --timestamps` prints it, run through the example
/// AccessMonitor's rules offline. Expected from the rules' documentation: finance reading invoices is within its
/// grants; 130 reads of public.invoices within one minute by one identity break `readVolume` (120) once; an
/// `ALTER TABLE` on a Tuesday is outside the Saturday change window; `mallory` is nobody crmguard issued or named.
#[test]
fn monitor_replay_runs_a_log_through_the_rules() {
    let dir = e2e::TempDir::new("replay");
    let mut log = String::new();
    let mut at = 0;
    let mut line = |text: &str| {
        at += 1;
        log.push_str(&format!("2026-12-01T09:00:{:02}.{:06}Z {text}\n", at / 1000, at % 1000));
    };
    for i in 0..130 {
        line(&format!(
            "2026-12-01 09:00:00.000 UTC [7] v-finance-1@crm LOG:  AUDIT: SESSION,{i},1,READ,SELECT,TABLE,public.invoices,\"SELECT * FROM invoices WHERE customer = 'ACME'\",<not logged>"
        ));
    }
    line(
        "2026-12-01 09:00:01.000 UTC [8] crm_app@crm LOG:  AUDIT: SESSION,1,1,DDL,ALTER TABLE,TABLE,public.contacts,ALTER TABLE contacts ADD COLUMN x text,<not logged>",
    );
    line(
        "2026-12-01 09:00:01.000 UTC [9] mallory@crm LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.contacts,SELECT 1,<not logged>",
    );
    let path = dir.path.join("db.log");
    std::fs::write(&path, log).unwrap();
    let audit = dir.path.join("audit");
    let out = crmguard(&[
        "monitor",
        "replay",
        "-f",
        "examples/crm/access-monitor.yaml",
        "--policy",
        "examples/crm/access-policy.yaml",
        "--team-user",
        "crm-teams/finance=v-finance-1",
        "--log",
        path.to_str().unwrap(),
        "--audit-dir",
        audit.to_str().unwrap(),
        "--findings",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("132 line(s), 132 access(es)"), "{stdout}");
    assert!(stdout.contains("findings: DdlOutsideWindow 1, ReadVolume 1, UnknownIdentity 1;"), "{stdout}");
    assert!(stdout.contains("ReadVolume v-finance-1: more than 120 reads of public.invoices"), "{stdout}");
    assert!(!stdout.contains("ACME"), "no value of a statement: {stdout}");
    let verify =
        crmguard(&["audit", "verify", "--audit-dir", audit.to_str().unwrap(), "--audit-stream", "replay-access"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

/// `crmguard monitor replay` over five weeks of a pgaudit log (as `kubectl logs --timestamps` prints it): team
/// finance reads the invoices at Tuesday 02:00 every week (3, 4, 5, 2 times; the monitor's first hour, week 0, is
/// partial and not learned), then 13 times. Expected from the baseline's documentation (api::access_monitor::
/// BaselineRule), worked by hand: median 3.5, MAD 1, robust spread 1.4826, limit 3.5 + 6 × 1.4826 = 12.4, so the
/// 13th read is one UnusualVolume finding that shows that baseline; 12 reads in week 5 would be none.
#[test]
fn monitor_replay_learns_an_hour_of_the_week_and_flags_what_is_far_above_it() {
    let dir = e2e::TempDir::new("replay-baseline");
    let monitor = dir.path.join("monitor.yaml");
    std::fs::write(
        &monitor,
        "apiVersion: crmguard.io/v1alpha1\nkind: AccessMonitor\nmetadata: {name: crm-db, namespace: crm}\nspec:\n  \
         database: {engine: postgres, podSelector: {}}\n  accessPolicies: [crm-teams]\n  rules:\n    baseline: \
         {tables: [public.invoices], weeks: 4, minWeeks: 3, spreads: 6, minReads: 10}\n",
    )
    .unwrap();
    let run = |last_week: usize| {
        let mut log = String::new();
        let tuesday_2am: i64 = 1_796_090_400;
        for (week, n) in [(0, 2), (1, 3), (2, 4), (3, 5), (4, 2), (5, last_week)] {
            for i in 0..n {
                let t = jiff::Timestamp::from_second(tuesday_2am + week * 7 * 86_400 + 600 + i as i64).unwrap();
                log.push_str(&format!(
                    "{t} 2026-12-01 02:10:00.000 UTC [7] v-finance-1@crm LOG:  AUDIT: SESSION,{i},1,READ,SELECT,TABLE,public.invoices,\"SELECT * FROM invoices\",<not logged>\n"
                ));
            }
        }
        let path = dir.path.join(format!("db-{last_week}.log"));
        std::fs::write(&path, log).unwrap();
        let out = crmguard(&[
            "monitor",
            "replay",
            "-f",
            monitor.to_str().unwrap(),
            "--policy",
            "examples/crm/access-policy.yaml",
            "--team-user",
            "crm-teams/finance=v-finance-1",
            "--log",
            path.to_str().unwrap(),
            "--findings",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let flagged = run(13);
    assert!(flagged.contains("findings: UnusualVolume 1;"), "{flagged}");
    assert!(
        flagged.contains(
            "UnusualVolume v-finance-1: 13 reads of public.invoices by team finance (AccessPolicy crm-teams) in the hour \
             from 2027-01-05T02:00:00Z, above its baseline for Tuesday 02:00 UTC: median 3.5, robust spread 1.5, limit \
             12.4 (4 weeks: 3, 4, 5, 2)"
        ),
        "{flagged}"
    );
    let quiet = run(12);
    assert!(!quiet.contains("UnusualVolume"), "{quiet}");
}
