//! The backup data path against real servers: PostgreSQL, SeaweedFS (S3) and OpenBao (Vault Transit). Every
//! test runs the real `crmguard backup|restore` commands as the CronJob's pod would, with its own database and
//! bucket prefix.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::services::{OpenBao, Postgres, SeaweedFs, pg_bin_dir};
use e2e::{TempDir, crmguard_bin};

const BUCKET: &str = "crm-backups";
const KEY_A: &str = "q0ZV5ZcTzr1sYkP0bGm4mPpU7oZ4iEYb3dn3Kfx5mUI=";
const KEY_B: &str = "6m1cN5b5W3hXy8fQJx0vq3yYkq7h8sL2pHf0aZc9JtE=";

/// The environment a backup job's pod gets from its Secrets: database login, S3 keys, the encryption key.
fn job_env(db_user: &str, db_password: &str) -> BTreeMap<String, String> {
    let s3 = SeaweedFs::shared();
    [
        ("CRMGUARD_DB_USERNAME", db_user.to_string()),
        ("CRMGUARD_DB_PASSWORD", db_password.to_string()),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("CRMGUARD_ENCRYPTION_KEY", KEY_A.to_string()),
        ("CRMGUARD_LOG_FORMAT", "text".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// One test's world: a database with CRM data, a policy file, the environment of the backup job.
struct Case {
    name: String,
    dir: TempDir,
    policy: PathBuf,
    env: BTreeMap<String, String>,
}

fn unique(name: &str) -> String {
    format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 100000
    )
}

/// Creates a CRM-like database: contacts, deals in another schema, binary attachments metadata.
fn seed(pg: &Postgres, db: &str, contacts: u32) {
    pg.sql("postgres", &format!("CREATE DATABASE {db}"));
    pg.sql(
        db,
        &format!(
            "CREATE TABLE contacts (id serial PRIMARY KEY, name text NOT NULL, email text, notes text);
             INSERT INTO contacts (name, email, notes)
               SELECT 'Contact ' || i, 'c' || i || '@example.com', repeat(md5(i::text), 3) FROM generate_series(1, {contacts}) i;
             CREATE SCHEMA finance;
             CREATE TABLE finance.deals (id int PRIMARY KEY, contact_id int REFERENCES contacts(id), amount numeric(12,2), stage text);
             INSERT INTO finance.deals SELECT i, 1 + i % {contacts}, i * 10.25, (ARRAY['lead','won','lost'])[1 + i % 3] FROM generate_series(1, 777) i;
             CREATE TABLE files (id int PRIMARY KEY, blob bytea);
             INSERT INTO files SELECT i, decode(md5(i::text) || md5((i*7)::text), 'hex') FROM generate_series(1, 100) i;"
        ),
    );
}

/// Per-table row count and content checksum.
fn fingerprint(pg: &Postgres, db: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in ["public.contacts", "finance.deals", "public.files"] {
        let v = pg.sql(
            db,
            &format!(
                "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {t} t"
            ),
        );
        out.insert(t.to_string(), v);
    }
    out
}

impl Case {
    fn new(name: &str, encryption: &str, extra_spec: &str) -> Case {
        let pg = Postgres::shared();
        let s3 = SeaweedFs::shared();
        let db = unique(name);
        let dir = TempDir::new(name);
        let policy = dir.path.join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "apiVersion: crmguard.io/v1alpha1
kind: CrmBackupPolicy
metadata: {{name: {name}, namespace: crm}}
spec:
  source:
    engine: postgres
    host: 127.0.0.1
    port: {port}
    database: {db}
    tlsMode: disable
    credentials: {{secretRef: {{name: crm-db}}}}
  schedule: {{cron: '15 2 * * *'}}
  destination:
    bucket: {BUCKET}
    prefix: tests/{db}
    endpoint: {endpoint}
    forcePathStyle: true
    credentials: {{secretRef: {{name: s3}}}}
  encryption: {encryption}
{extra_spec}",
                port = pg.port,
                endpoint = s3.endpoint(),
            ),
        )
        .unwrap();
        let mut env = job_env(&pg.user, &pg.password);
        env.insert("CRMGUARD_DB_BIN_DIR".into(), pg_bin_dir().display().to_string());
        env.insert("CRMGUARD_TERMINATION_LOG".into(), dir.path.join("termination-log").display().to_string());
        seed(pg, &db, 5000);
        Case { name: db, dir, policy, env }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crmguard_bin());
        c.args(args).arg("-f").arg(&self.policy).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        c.envs(&self.env);
        c
    }

    /// Runs a crmguard command; asserts that no secret appears in anything it printed.
    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run crmguard");
        self.assert_no_secrets(&out);
        out
    }

    fn assert_no_secrets(&self, out: &Output) {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for secret in
            [&Postgres::shared().password, &SeaweedFs::shared().secret_key, &KEY_A.to_string(), &KEY_B.to_string()]
        {
            assert!(!text.contains(secret.as_str()), "a secret appeared in crmguard's output:\n{text}");
        }
    }

    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "crmguard {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null)
    }

    fn fails(&self, args: &[&str]) -> (serde_json::Value, String) {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "crmguard {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null);
        (report, String::from_utf8_lossy(&out.stderr).to_string())
    }

    fn prefix(&self) -> String {
        format!("tests/{}", self.name)
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["backup", "list", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("list json")
    }
}

impl Case {
    /// Restores backup `id` into `<name>_restored` (created) with the row counts checked; returns that database.
    fn restore_verified(&self, id: &str) -> String {
        let target = format!("{}_restored", self.name);
        let args = [
            "restore",
            "run",
            "--backup",
            id,
            "--target-database",
            &target,
            "--create-database",
            "--verify-row-counts",
        ];
        let r = self.ok(&args);
        assert_eq!(r["rowCountsVerified"], true, "{r}");
        target
    }

    /// The same policy, database and environment, reaching S3 at `endpoint` instead.
    fn through(&self, endpoint: &str) -> Case {
        self.through_with(endpoint, "5m")
    }

    /// [`Case::through`] with a transfer deadline (`destination.transferDeadline`).
    fn through_with(&self, endpoint: &str, deadline: &str) -> Case {
        let old = format!("endpoint: {}", SeaweedFs::shared().endpoint());
        let new = format!("endpoint: {endpoint}\n    transferDeadline: {deadline}");
        let text = std::fs::read_to_string(&self.policy).unwrap().replace(&old, &new);
        let dir = TempDir::new("through");
        let policy = dir.path.join("policy.yaml");
        std::fs::write(&policy, text).unwrap();
        Case { name: self.name.clone(), dir, policy, env: self.env.clone() }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn get(store: &crmguard::backup::store::Store, key: &str) -> Vec<u8> {
    store.get(key).await.expect("get").to_vec()
}

#[test]
fn backup_list_verify_restore_brings_back_the_same_rows_and_bytes() {
    let case = Case::new("roundtrip", "{key: {secretRef: {name: k, key: key}}}", "  retention: {keepLast: 2}\n");
    let pg = Postgres::shared();
    let before = fingerprint(pg, &case.name);

    let report = case.ok(&["backup", "run"]);
    assert_eq!(report["ok"], true, "{report}");
    let id = report["backupId"].as_str().unwrap().to_string();
    // The pod's termination message carries the same report for the operator.
    let term: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.dir.path.join("termination-log")).unwrap()).unwrap();
    assert_eq!(term["backupId"], id.as_str());
    assert_eq!(term["backupCount"], 1);

    let list = case.list();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["tables"]["public.contacts"], 5000);
    assert_eq!(m["tables"]["finance.deals"], 777);
    assert_eq!(m["tables"]["public.files"], 100);
    assert_eq!(m["encryption"]["algorithm"], "aes256-gcm");
    assert_eq!(m["encryption"]["key"]["type"], "secret");
    assert_eq!(m["verification"]["rawChecked"], true);
    let obj = &m["objects"][0];
    assert!(obj["compressedBytes"].as_u64().unwrap() < obj["rawBytes"].as_u64().unwrap() / 2, "zstd compresses: {obj}");

    // What is stored is ciphertext: no contact name is readable in the object.
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let stored = rt.block_on(get(&store, obj["key"].as_str().unwrap()));
    assert_eq!(stored.len() as u64, obj["storedBytes"].as_u64().unwrap());
    assert!(stored.starts_with(b"CRMGBK01"));
    assert!(!stored.windows(10).any(|w| w == b"Contact 42"), "plaintext leaked into the stored object");

    let v = case.ok(&["backup", "verify", "--backup", &id]);
    assert_eq!(v["id"], id.as_str());

    let target = case.restore_verified(&id);
    assert_eq!(fingerprint(pg, &target), before, "restored data differs from the source");

    // Retention (keepLast 2) keeps the two newest after a third backup.
    case.ok(&["backup", "run"]);
    let third = case.ok(&["backup", "run"]);
    assert_eq!(third["deletedBackups"].as_array().map(Vec::len), Some(1), "{third}");
    let ids: Vec<String> = case.list().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&id), "the oldest backup was deleted by retention");
    // Its objects are gone too, not just its manifest.
    let left = rt.block_on(store.list(&format!("{}/{id}/", case.prefix()))).unwrap();
    assert!(left.is_empty(), "objects of a deleted backup remain: {left:?}");
}

#[test]
fn a_flipped_byte_is_detected_before_the_target_is_touched() {
    let case = Case::new("bitflip", "{key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    let id = case.ok(&["backup", "run"])["backupId"].as_str().unwrap().to_string();
    let key = case.list()[0]["objects"][0]["key"].as_str().unwrap().to_string();
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let mut bytes = rt.block_on(get(&store, &key));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    rt.block_on(store.put(&key, bytes.into())).unwrap();

    let target = format!("{}_restored", case.name);
    let (report, stderr) =
        case.fails(&["restore", "run", "--backup", &id, "--target-database", &target, "--create-database"]);
    assert_eq!(report["reason"], "VerificationFailed", "{report}\n{stderr}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("sha256") || msg.contains("authentication failed"), "{msg}");
    assert!(!pg.database_exists(&target), "the target database was created although the backup is corrupt");

    let (_, verify_err) = case.fails(&["backup", "verify", "--backup", &id]);
    assert!(verify_err.contains("verification of") && verify_err.contains(&key), "{verify_err}");
}

#[test]
fn a_wrong_key_is_named_as_such_and_nothing_is_restored() {
    let case = Case::new("wrongkey", "{algorithm: xchacha20-poly1305, key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    case.ok(&["backup", "run"]);
    let mut wrong = Case {
        name: case.name.clone(),
        dir: TempDir::new("wrongkey2"),
        policy: case.policy.clone(),
        env: case.env.clone(),
    };
    wrong.env.insert("CRMGUARD_ENCRYPTION_KEY".into(), KEY_B.into());
    let target = format!("{}_restored", case.name);
    let (report, _) =
        wrong.fails(&["restore", "run", "--backup", "latest", "--target-database", &target, "--create-database"]);
    assert_eq!(report["reason"], "WrongKey", "{report}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("wrong encryption key") && msg.contains("fingerprint"), "{msg}");
    assert!(!pg.database_exists(&target));

    wrong.env.insert("CRMGUARD_ENCRYPTION_KEY".into(), "not-a-key".into());
    let (report, _) = wrong.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "KeyUnavailable", "{report}");
    assert!(report["message"].as_str().unwrap().contains("head -c 32 /dev/urandom | base64"), "{report}");
    assert_eq!(wrong.list().len(), 1, "a failed backup is not listed");
}

/// A `pg_dump` stand-in that runs the real one and then dies in one of two ways: killed by a signal after
/// part of the dump (the classic), or exiting 0 after part of the dump (a broken tool that claims success).
fn broken_pg_dump(dir: &Path, mode: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = pg_bin_dir().join("pg_dump");
    let script = match mode {
        "killed" => format!("#!/bin/sh\n\"{}\" \"$@\" | head -c 60000\nkill -KILL $$\n", real.display()),
        // The archive's minor version byte (the 7th) becomes 17, a version the built-in check does not know.
        "future" => format!(
            "#!/bin/sh\n\"{}\" \"$@\" | {{ dd bs=1 count=6 2>/dev/null; printf '\\021'; dd bs=1 count=1 of=/dev/null \
             2>/dev/null; cat; }}\n",
            real.display()
        ),
        _ => format!("#!/bin/sh\n\"{}\" \"$@\" | head -c 60000\nexit 0\n", real.display()),
    };
    let path = bin.join("pg_dump");
    std::fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    for tool in ["psql", "pg_restore"] {
        std::os::unix::fs::symlink(pg_bin_dir().join(tool), bin.join(tool)).unwrap();
    }
    bin
}

#[test]
fn a_dump_killed_mid_stream_fails_the_backup_and_leaves_nothing_listed() {
    let mut case = Case::new("killeddump", "{key: {secretRef: {name: k, key: key}}}", "");
    case.env.insert("CRMGUARD_DB_BIN_DIR".into(), broken_pg_dump(&case.dir.path, "killed").display().to_string());
    let (report, stderr) = case.fails(&["backup", "run"]);
    assert_eq!(report["ok"], false);
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("pg_dump") && msg.contains("signal 9"), "{msg}\n{stderr}");
    assert!(case.list().is_empty(), "a failed backup must not be listed");
    // The multipart upload was aborted, not left behind.
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let pending = rt.block_on(store.pending_uploads(&format!("{}/", case.prefix()))).unwrap();
    assert!(pending.is_empty(), "unfinished upload left behind: {pending:?}");
}

#[test]
fn a_truncated_dump_that_claims_success_is_caught_by_verification() {
    // An anchor once stored a 343 MB dump as 340 MB and called it a success; here the archive itself is checked.
    let mut case = Case::new("truncdump", "{key: {secretRef: {name: k, key: key}}}", "");
    case.env.insert("CRMGUARD_DB_BIN_DIR".into(), broken_pg_dump(&case.dir.path, "exit0").display().to_string());
    let (report, stderr) = case.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "VerificationFailed", "{report}\n{stderr}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("not a complete pg_dump archive") && msg.contains("truncated"), "{msg}");
    assert!(case.list().is_empty(), "an unverified backup must not be listed");
}

#[test]
fn an_archive_version_the_built_in_check_does_not_know_is_handed_to_pg_restore_from_its_first_byte() {
    // pg_restore 15 does not know version 1.17 either, so the backup fails, with pg_restore's own words: proof that
    // the fallback ran and saw the archive's header.
    let mut case = Case::new("futuredump", "{key: {secretRef: {name: k, key: key}}}", "");
    case.env.insert("CRMGUARD_DB_BIN_DIR".into(), broken_pg_dump(&case.dir.path, "future").display().to_string());
    let (report, stderr) = case.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "VerificationFailed", "{report}\n{stderr}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("pg_restore") && msg.contains("unsupported version (1.17)"), "{msg}");
    assert!(case.list().is_empty());
}

/// Issue 20, item 1: a killed backup leaves an unfinished multipart upload (invisible to `ls`, billed all the
/// same); the policy's next run aborts it when it starts and says in its report what it reclaimed, while an
/// upload that is still receiving parts is left alone. (Before: only uploads a day old were aborted, so a
/// crash-looping job filled the bucket.)
#[test]
fn the_next_run_reclaims_what_a_killed_backup_left_and_reports_it() {
    let case = Case::new("killedupload", "{key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    // Enough poorly compressible data that the upload is still running when it is killed.
    pg.sql(&case.name, "CREATE TABLE bulk AS SELECT i, md5(random()::text) || md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, 400000) i");
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let mut child = case
        .command(&["backup", "run", "--part-size-mib", "5", "--parts-in-flight", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("{}/", case.prefix());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = rt.block_on(store.pending_uploads(&prefix)).unwrap();
        let usage = match pending.first() {
            Some(u) => rt.block_on(store.upload_usage(&u.key, &u.upload_id)).unwrap(),
            None => Default::default(),
        };
        if usage.parts >= 1 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before it could be killed; make the table bigger"
        );
        assert!(Instant::now() < deadline, "no multipart upload with a part appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A live run's upload is not touched.
    let now = jiff::Timestamp::now();
    let live = rt.block_on(crmguard::backup::reclaim_uploads(&store, &case.prefix(), now, Duration::from_secs(60)));
    assert_eq!(live.unwrap().uploads, 0, "the upload of a live run was aborted");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(case.list().is_empty(), "a killed backup must not be listed");
    let left = rt.block_on(store.pending_uploads(&prefix)).unwrap();
    assert_eq!(left.len(), 1, "the killed run left its upload: {left:?}");

    std::thread::sleep(Duration::from_secs(3));
    let report = case.ok(&["backup", "run", "--reclaim-idle-seconds", "2"]);
    assert_eq!(report["reclaimed"]["uploads"], 1, "{report}");
    assert!(report["reclaimed"]["parts"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["reclaimed"]["bytes"].as_u64().unwrap() >= 5 << 20, "{report}");
    assert!(rt.block_on(store.pending_uploads(&prefix)).unwrap().is_empty(), "an unfinished upload is left");
    assert_eq!(case.list().len(), 1);
}

/// Issue 20, item 2: every field of the manifest is authenticated under the backup's own key. An edited row count,
/// a removed table entry and an edited key fingerprint are each named as tampering by `backup verify` and stop a
/// restore before the target database exists. (Before: verify passed, the restore filled the target and only then
/// failed RowCountMismatch, and the fingerprint edit read "wrong encryption key".)
#[test]
fn an_edited_manifest_is_named_as_tampering_and_nothing_is_restored() {
    let case = Case::new("tampered", "{key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    let id = case.ok(&["backup", "run"])["backupId"].as_str().unwrap().to_string();
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let key = format!("{}/{id}/manifest.json", case.prefix());
    let original = rt.block_on(get(&store, &key));
    let put =
        |m: &serde_json::Value| rt.block_on(store.put(&key, serde_json::to_vec_pretty(m).unwrap().into())).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 3] = [
        ("a row count", |m| m["tables"]["public.contacts"] = 4999.into()),
        ("a removed table entry", |m| {
            m["tables"].as_object_mut().unwrap().remove("finance.deals");
        }),
        ("the key fingerprint", |m| m["encryption"]["key"]["fingerprint"] = "0123456789abcdef".into()),
    ];
    for (i, (what, edit)) in edits.iter().enumerate() {
        let mut m: serde_json::Value = serde_json::from_slice(&original).unwrap();
        edit(&mut m);
        put(&m);
        let (_, verify_err) = case.fails(&["backup", "verify", "--backup", &id]);
        assert!(verify_err.contains("edited") || verify_err.contains("changed"), "{what}: {verify_err}");
        let target = format!("{}_restored{i}", case.name);
        let (report, stderr) = case.fails(&[
            "restore",
            "run",
            "--backup",
            &id,
            "--target-database",
            &target,
            "--create-database",
            "--verify-row-counts",
        ]);
        assert_eq!(report["reason"], "ManifestTampered", "{what}: {report}\n{stderr}");
        assert!(!pg.database_exists(&target), "{what}: the target database was created from an edited manifest");
    }
    // A manifest stripped of its MAC (as a format 1 one) is refused, unless the operator of the restore says so.
    let mut stripped: serde_json::Value = serde_json::from_slice(&original).unwrap();
    stripped.as_object_mut().unwrap().remove("mac");
    stripped["format"] = 1.into();
    put(&stripped);
    let (report, _) = case.fails(&[
        "restore",
        "run",
        "--backup",
        &id,
        "--target-database",
        &format!("{}_x", case.name),
        "--create-database",
    ]);
    assert_eq!(report["reason"], "ManifestTampered", "{report}");
    assert!(report["message"].as_str().unwrap().contains("--allow-unauthenticated-manifest"), "{report}");
    case.ok(&["backup", "verify", "--backup", &id, "--allow-unauthenticated-manifest"]);
    // The manifest as written verifies and restores.
    rt.block_on(store.put(&key, original.into())).unwrap();
    case.ok(&["backup", "verify", "--backup", &id]);
    case.restore_verified(&id);
}

#[test]
fn vault_transit_wraps_the_data_key_and_a_drill_restores_into_a_scratch_database() {
    let bao = OpenBao::shared();
    let key_name = unique("crm");
    let _ = bao.cli(&["secrets", "enable", "transit"]);
    bao.cli(&["write", "-f", &format!("transit/keys/{key_name}")]).unwrap();
    let mut case = Case::new(
        "transit",
        &format!("{{key: {{vaultTransit: {{keyName: {key_name}, authRole: crm-backup}}}}}}"),
        "  verification: {mode: sampled, samplePercent: 50, restoreDrill: {cron: '0 5 * * 0', scratchDatabase: drill}}\n",
    );
    case.env.remove("CRMGUARD_ENCRYPTION_KEY");
    case.env.insert("VAULT_ADDR".into(), bao.addr());
    case.env.insert("VAULT_TOKEN".into(), bao.token.clone());
    let pg = Postgres::shared();
    let before = fingerprint(pg, &case.name);
    case.ok(&["backup", "run"]);
    let m = &case.list()[0];
    assert_eq!(m["encryption"]["key"]["type"], "vaultTransit");
    assert!(m["encryption"]["key"]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"), "{m}");
    assert_eq!(m["verification"]["mode"], "sampled");

    let scratch = format!("{}_drill", case.name);
    pg.sql("postgres", &format!("CREATE DATABASE {scratch}"));
    pg.sql(&scratch, "CREATE TABLE leftover_from_last_drill (x int)");
    let r = case.ok(&["restore", "run", "--drill", "--target-database", &scratch]);
    assert_eq!(r["kind"], "drill");
    assert_eq!(r["rowCountsVerified"], true);
    assert_eq!(fingerprint(pg, &scratch), before);
    assert!(
        pg.try_sql(&scratch, "SELECT 1 FROM leftover_from_last_drill").is_err(),
        "a drill starts from an empty scratch database"
    );

    // Without Vault access the key cannot be unwrapped, and the error says so.
    case.env.insert("VAULT_TOKEN".into(), "not-a-token".into());
    let (report, _) =
        case.fails(&["restore", "run", "--backup", "latest", "--target-database", &format!("{scratch}2")]);
    assert_eq!(report["reason"], "KeyUnavailable", "{report}");
    assert!(report["message"].as_str().unwrap().contains("transit decrypt"), "{report}");
}

#[test]
fn unencrypted_backups_with_attachments_restore_files_too_and_refuse_the_live_database() {
    let mut case = Case::new("attach", "{enabled: false}", "");
    let files = TempDir::new("attachments");
    std::fs::create_dir_all(files.path.join("contacts/42")).unwrap();
    std::fs::write(files.path.join("contacts/42/card.vcf"), "BEGIN:VCARD\nFN:Ada\nEND:VCARD\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(files.path.join("scan.pdf"), &big).unwrap();
    let report = case.ok(&["backup", "run", "--attachments-dir", files.path.to_str().unwrap()]);
    assert_eq!(report["ok"], true);
    let m = &case.list()[0];
    assert!(m.get("encryption").is_none());
    assert_eq!(m["objects"].as_array().unwrap().len(), 2);

    let out = TempDir::new("attachments-restored");
    let target = format!("{}_restored", case.name);
    case.ok(&[
        "restore",
        "run",
        "--backup",
        "latest",
        "--target-database",
        &target,
        "--create-database",
        "--restore-attachments",
        "--attachments-dir",
        out.path.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(out.path.join("scan.pdf")).unwrap(), big);
    assert_eq!(
        std::fs::read_to_string(out.path.join("contacts/42/card.vcf")).unwrap(),
        "BEGIN:VCARD\nFN:Ada\nEND:VCARD\n"
    );

    let out = case.run(&["restore", "run", "--backup", "latest", "--target-database", &case.name]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-overwrite-source"));
    case.env.insert("CRMGUARD_DB_PASSWORD".into(), "wrong-password".into());
    let (report, _) = case.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "DatabaseToolFailed", "{report}");
    assert!(report["message"].as_str().unwrap().contains("password authentication failed"), "{report}");
}

/// Starts one run of a backup CronJob now, as `kubectl create job --from=cronjob/<name>` does: a Job from the
/// CronJob's template, owned by the CronJob. The Job controller makes its Pod; the test kubelet runs it.
async fn run_cron_job_now(client: &kube::Client, ns: &str, cron_job: &str, run: &str) -> String {
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use kube::api::{Api, PostParams};
    let cj = Api::<CronJob>::namespaced(client.clone(), ns).get(cron_job).await.unwrap();
    let template = cj.spec.as_ref().unwrap().job_template.clone();
    let job_name = format!("{cron_job}-{run}");
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = Some(job_name.clone());
    meta.annotations.get_or_insert_default().insert("cronjob.kubernetes.io/instantiate".into(), "manual".into());
    meta.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "batch/v1".into(),
        kind: "CronJob".into(),
        name: cron_job.into(),
        uid: cj.metadata.uid.clone().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let job = Job { metadata: meta, spec: template.spec.clone(), status: None };
    Api::<Job>::namespaced(client.clone(), ns).create(&PostParams::default(), &job).await.unwrap();
    job_name
}

/// Waits for a Job to finish (Complete or Failed, as the real Job controller decides); returns whether it
/// completed, with the test kubelet's logs on a timeout.
async fn job_finished(client: &kube::Client, ns: &str, name: &str, kubelet: &e2e::kubelet::TestKubelet) -> bool {
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> = kube::Api::namespaced(client.clone(), ns);
    e2e::eventually(180, &format!("Job {name} to finish"), || async {
        let logs = kubelet.logs().await;
        let j = jobs.get(name).await.map_err(|e| e.to_string())?;
        let conds = j.status.and_then(|s| s.conditions).unwrap_or_default();
        let done = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
        if done("Complete") {
            Ok(true)
        } else if done("Failed") {
            Ok(false)
        } else {
            Err(format!("{conds:?}; container logs so far:\n{logs}"))
        }
    })
    .await
}

/// The Secrets the policy of a [`Case`] names, with the values of its environment.
async fn case_secrets(client: &kube::Client, ns: &str, case: &Case) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let e = &case.env;
    for (name, data) in [
        ("crm-db", serde_json::json!({"username": e["CRMGUARD_DB_USERNAME"], "password": e["CRMGUARD_DB_PASSWORD"]})),
        (
            "s3",
            serde_json::json!({"AWS_ACCESS_KEY_ID": e["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": e["AWS_SECRET_ACCESS_KEY"]}),
        ),
        ("k", serde_json::json!({"key": e["CRMGUARD_ENCRYPTION_KEY"]})),
    ] {
        let secret = serde_json::json!({"metadata": {"name": name}, "stringData": data});
        secrets.create(&PostParams::default(), &serde_json::from_value(secret).unwrap()).await.unwrap();
    }
}

/// A case's policy in its own namespace of the control plane, with the case's Secrets, a test kubelet for the
/// Pods of its Jobs and a running operator; `edit` changes the policy before it is created.
struct InCluster {
    cluster: e2e::Cluster,
    kubelet: e2e::kubelet::TestKubelet,
    op: e2e::Operator,
    policies: kube::Api<crmguard::api::CrmBackupPolicy>,
}

impl InCluster {
    async fn start(case: &Case, test: &str, edit: impl FnOnce(&mut serde_json::Value)) -> InCluster {
        let cluster = e2e::Cluster::start(test).await;
        let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
        case_secrets(&client, &ns, case).await;
        let kubelet = e2e::kubelet::TestKubelet::start(client.clone(), &ns);
        let op = e2e::Operator::start(&cluster.kubeconfig, &["--leader-election=false", "--namespace", &ns]);
        op.wait_ready(60).await;
        let mut policy: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&case.policy).unwrap()).unwrap();
        policy["metadata"]["namespace"] = ns.clone().into();
        edit(&mut policy);
        let policies: kube::Api<crmguard::api::CrmBackupPolicy> = kube::Api::namespaced(client, &ns);
        policies.create(&Default::default(), &serde_json::from_value(policy).unwrap()).await.unwrap();
        InCluster { cluster, kubelet, op, policies }
    }
}

/// The schedule itself: the real CronJob controller starts the backup Job at the next minute, the Job controller
/// its Pod, the test kubelet runs it, and the policy's status shows the backup. Nothing is started by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cronjob_controller_runs_the_backup_on_schedule() {
    use kube::api::{Api, DeleteParams};
    let case = Case::new("scheduled", "{key: {secretRef: {name: k, key: key}}}", "");
    let InCluster { cluster, kubelet, op: _op, policies } =
        InCluster::start(&case, "backup-scheduled", |p| p["spec"]["schedule"]["cron"] = "* * * * *".into()).await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    // The CronJob controller checks schedules every 10 s: the first run starts within about 70 s.
    let logs = || kubelet.logs();
    let id = e2e::eventually(180, "a scheduled backup in the policy's status", || async {
        let st = policies.get("scheduled").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        match st.last_successful_backup {
            Some(b) => Ok(b.id),
            None => Err(format!("{:?}; container logs: {}", st.conditions, logs().await)),
        }
    })
    .await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
    let made_by_cron = jobs.list(&Default::default()).await.unwrap().items.iter().any(|j| {
        j.metadata.owner_references.iter().flatten().any(|o| o.kind == "CronJob" && o.name == "scheduled-backup")
            && !j.metadata.annotations.iter().flatten().any(|(k, _)| k == "cronjob.kubernetes.io/instantiate")
    });
    assert!(made_by_cron, "the Job was created by the CronJob controller");
    assert!(String::from_utf8_lossy(&case.run(&["backup", "list"]).stdout).contains(&id));
    policies.delete("scheduled", &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reports_backup_health_from_what_the_backup_jobs_report() {
    use k8s_openapi::api::batch::v1::CronJob;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};
    let drill_db = unique("drill");
    let extra =
        format!("  rpo: 26h\n  verification:\n    restoreDrill: {{cron: '0 4 * * 0', scratchDatabase: {drill_db}}}\n");
    let case = Case::new("statusflow", "{key: {secretRef: {name: k, key: key}}}", &extra);
    let InCluster { cluster, kubelet, op, policies } = InCluster::start(&case, "backup-status", |_| {}).await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());

    // The operator's children: the job configuration and the CronJob whose command we run for real.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    e2e::eventually(30, "job ConfigMap", || async {
        cms.get("statusflow-backup-config").await.map_err(|e| e.to_string())
    })
    .await;
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), &ns);
    e2e::eventually(30, "the backup CronJob", || async {
        cron_jobs.get("statusflow-backup").await.map_err(|e| e.to_string())
    })
    .await;
    // The status is written after the children (a reconcile's last step).
    let st = e2e::eventually(30, "BackupHealthy=Unknown NoBackupYet", || async {
        let st = policies.get("statusflow").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let healthy = st.conditions.iter().find(|c| c.type_ == "BackupHealthy").map(|c| c.reason.clone());
        if healthy.as_deref() == Some("NoBackupYet") { Ok(st) } else { Err(format!("{:?}", st.conditions)) }
    })
    .await;
    // The test's S3 endpoint is http:// and its database tlsMode is disable: reported, not hidden.
    let transit = st.conditions.iter().find(|c| c.type_ == "EncryptedInTransit").unwrap();
    assert_eq!((transit.status.as_str(), transit.reason.as_str()), ("False", "PlaintextEndpoint"));
    assert!(
        transit.message.contains("S3 endpoint is plain http") && transit.message.contains("tlsMode"),
        "{transit:?}"
    );

    // A run of the CronJob: the Job controller creates the Pod, the test kubelet runs `crmguard backup run` in it
    // with the mounted ConfigMap and the Secrets' values, and the Pod's termination message carries the report.
    let job = run_cron_job_now(&client, &ns, "statusflow-backup", "manual-1").await;
    assert!(job_finished(&client, &ns, &job, &kubelet).await, "{}", kubelet.logs().await);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let statuses: Vec<_> = pods.list(&Default::default()).await.unwrap().items.into_iter().map(|p| p.status).collect();
    let logs = format!("{}\npods: {statuses:?}", kubelet.logs().await);
    let backup_id = e2e::eventually(60, "BackupHealthy=True with the backup recorded", || async {
        let st = policies.get("statusflow").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let cond = |t: &str| st.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()));
        let last = st.last_successful_backup.as_ref().map(|b| b.id.clone());
        match (cond("BackupHealthy"), cond("Ready"), last, st.backup_count) {
            (Some((h, _)), Some((r, _)), Some(id), Some(1)) if h == "True" && r == "True" => Ok(id),
            other => Err(format!("{other:?} {:?}; container logs:\n{logs}", st.conditions)),
        }
    })
    .await;
    // The backup is really there: the same policy, read from S3 outside the cluster, lists it.
    let listed = case.run(&["backup", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&backup_id), "{listed}");
    let st = policies.get("statusflow").await.unwrap().status.unwrap();
    let b = st.last_successful_backup.unwrap();
    assert!(b.stored_bytes.unwrap() > 0 && b.sha256.as_ref().is_some_and(|s| s.len() == 64), "{b:?}");
    // The same facts on /metrics, for alerting (BackupStale compares the age with backup_rpo_seconds).
    let series = |m: &str| format!("crmguard_{m}{{namespace=\"{ns}\",name=\"statusflow\"}}");
    let completed = b.completion_time.as_ref().unwrap().0.as_second() as f64;
    assert_eq!(op.metric(&series("backup_last_success_timestamp_seconds")), Some(completed));
    assert_eq!(op.metric(&series("backup_last_success_size_bytes")), Some(b.stored_bytes.unwrap() as f64));
    assert_eq!(op.metric(&series("backup_healthy")), Some(1.0));
    assert!(op.metric(&series("backup_rpo_seconds")).is_some_and(|v| v > 0.0));

    // Steady state: a reconcile that finds nothing new writes nothing, status included (the API server's audit
    // log counts the operator's writes; the reconcile is forced by a label change).
    let started = r#"crmguard_reconcile_total{controller="backuppolicy"}"#;
    let done = r#"crmguard_reconcile_duration_seconds_count{controller="backuppolicy"}"#;
    let before = op.metric(started).unwrap_or(0.0);
    let writes_before = cluster.writes_by(e2e::OPERATOR_USER).len();
    let touch = serde_json::json!({"metadata": {"labels": {"touched": "1"}}});
    policies.patch("statusflow", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&touch)).await.unwrap();
    e2e::eventually(30, "a reconcile after the label change, finished", || async {
        let (s, d) = (op.metric(started).unwrap_or(0.0), op.metric(done).unwrap_or(0.0));
        if s > before && d >= s { Ok(()) } else { Err(format!("{s} started, {d} done")) }
    })
    .await;
    let writes = cluster.writes_by(e2e::OPERATOR_USER);
    assert_eq!(writes[writes_before..], [], "steady state wrote something");

    // A CrmRestore: the operator creates the Job, the Job controller its Pod, the test kubelet runs it.
    let restores: Api<crmguard::api::CrmRestore> = Api::namespaced(client.clone(), &ns);
    let target = format!("{}_restored", case.name);
    let restore: crmguard::api::CrmRestore = serde_json::from_value(serde_json::json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "CrmRestore",
        "metadata": {"name": "check", "namespace": ns},
        "spec": {"policyRef": {"name": "statusflow"}, "backup": {"latest": true}, "target": {"database": target}}
    }))
    .unwrap();
    restores.create(&PostParams::default(), &restore).await.unwrap();
    e2e::eventually(180, "CrmRestore Succeeded and Verified", || async {
        let logs = kubelet.logs().await;
        let st = restores.get("check").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let verified = st.conditions.iter().find(|c| c.type_ == "Verified").map(|c| c.status.clone());
        match (st.phase, verified, st.backup_id.clone(), st.restored_bytes) {
            (Some(crmguard::api::restore::RestorePhase::Succeeded), Some(v), Some(id), Some(b))
                if v == "True" && id == backup_id && b > 0 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}; container logs:\n{logs}")),
        }
    })
    .await;
    assert_eq!(fingerprint(Postgres::shared(), &target), fingerprint(Postgres::shared(), &case.name));

    // A run of the drill CronJob: `crmguard restore run --drill` in its Pod restores the newest backup into the
    // scratch database and compares row counts; its report becomes RestoreVerified and lastVerifiedRestore.
    let job = run_cron_job_now(&client, &ns, "statusflow-drill", "manual-1").await;
    assert!(job_finished(&client, &ns, &job, &kubelet).await, "{}", kubelet.logs().await);
    e2e::eventually(60, "RestoreVerified=True from the drill", || async {
        let st = policies.get("statusflow").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let c = st.conditions.iter().find(|c| c.type_ == "RestoreVerified").cloned();
        match (c, st.last_verified_restore) {
            (Some(c), Some(v)) if c.status == "True" && c.reason == "DrillPassed" && v.backup_id == backup_id => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(fingerprint(Postgres::shared(), &drill_db), fingerprint(Postgres::shared(), &case.name));

    // The next run fails (the key Secret was replaced by a value that is not a key): BackupHealthy turns
    // False with the job's reason, the last good backup is still shown, and an Event tells the team.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let bad = serde_json::json!({"stringData": {"key": "rotated-by-mistake"}});
    secrets.patch("k", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&bad)).await.unwrap();
    let job = run_cron_job_now(&client, &ns, "statusflow-backup", "manual-2").await;
    assert!(!job_finished(&client, &ns, &job, &kubelet).await);
    e2e::eventually(60, "BackupHealthy=False, reason KeyUnavailable", || async {
        let st = policies.get("statusflow").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let c = st.conditions.iter().find(|c| c.type_ == "BackupHealthy").cloned();
        match c {
            Some(c) if c.status == "False" && c.reason == "KeyUnavailable" && c.message.contains("head -c 32") => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let st = policies.get("statusflow").await.unwrap().status.unwrap();
    assert_eq!(st.last_successful_backup.unwrap().id, backup_id);
    assert!(st.last_failure_time.is_some());
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "KeyUnavailable"));
    drop(op);
}

fn mariadb_case(name: &str) -> (Case, String) {
    let my = e2e::services::MariaDb::shared();
    let s3 = SeaweedFs::shared();
    let db = unique(name);
    my.sql(
        "",
        &format!(
            "CREATE DATABASE {db}; USE {db};
             CREATE TABLE contacts (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(100), notes TEXT, photo BLOB);
             INSERT INTO contacts (name, notes, photo)
               SELECT CONCAT('Contact ', seq), CONCAT('it''s (', seq, '); \\\\ done'), UNHEX(MD5(seq)) FROM seq_1_to_5000;
             CREATE TABLE deals (id INT PRIMARY KEY, amount DECIMAL(12,2));
             INSERT INTO deals SELECT seq, seq * 10.25 FROM seq_1_to_777;
             CREATE TABLE empty_audit (id INT);"
        ),
    );
    let dir = TempDir::new(name);
    let policy = dir.path.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: crmguard.io/v1alpha1
kind: CrmBackupPolicy
metadata: {{name: {name}, namespace: crm}}
spec:
  source: {{engine: mysql, host: 127.0.0.1, port: {port}, database: {db}, tlsMode: disable, credentials: {{secretRef: {{name: crm-db}}}}}}
  schedule: {{cron: '15 2 * * *'}}
  destination: {{bucket: {BUCKET}, prefix: tests/{db}, endpoint: {endpoint}, forcePathStyle: true, credentials: {{secretRef: {{name: s3}}}}}}
  encryption: {{key: {{secretRef: {{name: k, key: key}}}}}}
",
            port = my.port,
            endpoint = s3.endpoint(),
        ),
    )
    .unwrap();
    let env = job_env(&my.user, &my.password);
    (Case { name: db.clone(), dir, policy, env }, db)
}

fn mariadb_fingerprint(db: &str) -> String {
    let my = e2e::services::MariaDb::shared();
    ["contacts", "deals", "empty_audit"]
        .iter()
        .map(|t| my.sql(db, &format!("CHECKSUM TABLE {t}")).split('\t').nth(1).unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn mariadb_backups_count_rows_in_the_dumped_snapshot_and_restore_the_same_tables() {
    let (case, db) = mariadb_case("mariadb");
    let report = case.ok(&["backup", "run"]);
    assert_eq!(report["ok"], true);
    let m = &case.list()[0];
    assert_eq!(m["engine"], "mysql");
    assert_eq!(m["tables"][format!("{db}.contacts")], 5000, "{m}");
    assert_eq!(m["tables"][format!("{db}.deals")], 777, "{m}");
    assert!(m["dumpTool"].as_str().unwrap().contains("mysqldump"), "{m}");
    let target = format!("{db}_restored");
    let r = case.ok(&[
        "restore",
        "run",
        "--backup",
        "latest",
        "--target-database",
        &target,
        "--create-database",
        "--verify-row-counts",
    ]);
    assert_eq!(r["rowCountsVerified"], true, "{r}");
    assert_eq!(mariadb_fingerprint(&target), mariadb_fingerprint(&db));

    // A mysqldump that stops early but exits 0 is caught: the dump lacks its completion line.
    let bin = case.dir.path.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = e2e::services::find_program("mysqldump");
    std::fs::write(
        bin.join("mysqldump"),
        format!("#!/bin/sh\n\"{}\" \"$@\" | head -c 20000\nexit 0\n", real.display()),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(bin.join("mysqldump")).status().unwrap();
    std::os::unix::fs::symlink(e2e::services::find_program("mysql"), bin.join("mysql")).unwrap();
    let mut broken = Case {
        name: case.name.clone(),
        dir: TempDir::new("mariadb2"),
        policy: case.policy.clone(),
        env: case.env.clone(),
    };
    broken.env.insert("CRMGUARD_DB_BIN_DIR".into(), bin.display().to_string());
    let (report, _) = broken.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "VerificationFailed", "{report}");
    assert!(report["message"].as_str().unwrap().contains("Dump completed"), "{report}");
    assert_eq!(case.list().len(), 1);
}

/// `pg_restore --file=/dev/null`'s verdict on an archive given on stdin.
fn pg_restore_accepts(bytes: &[u8]) -> bool {
    use std::io::Write;
    let mut child = Command::new(pg_bin_dir().join("pg_restore"))
        .arg("--file=/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(bytes);
    child.wait().unwrap().success()
}

#[test]
fn the_built_in_archive_check_agrees_with_pg_restore_on_real_pg_dump_archives() {
    use crmguard::backup::pgarchive::PgArchiveCheck;
    let pg = Postgres::shared();
    let db = unique("archive");
    seed(pg, &db, 300);
    // Large objects (a BLOBS block) and an empty table (a data block with no chunks).
    pg.sql(
        &db,
        "CREATE TABLE empty (a int);
         SELECT lo_from_bytea(0, 'hello'::bytea);
         SELECT lo_from_bytea(0, decode(repeat('ab', 70000), 'hex'));",
    );
    let out = Command::new(pg_bin_dir().join("pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", &pg.user, "--format=custom", "--compress=0", &db])
        .env("PGPASSWORD", &pg.password)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dump = out.stdout;
    let check = |bytes: &[u8], piece: usize| {
        let mut c = PgArchiveCheck::new();
        for p in bytes.chunks(piece) {
            c.feed(p);
        }
        c.finish()
    };
    let summary = check(&dump, 65536).unwrap();
    // contacts, finance.deals, files, empty, and the large objects.
    assert_eq!(summary.data_blocks, 5, "{summary:?}");
    assert_eq!(summary.bytes, dump.len() as u64);
    assert_eq!(check(&dump, 7).unwrap(), summary, "splitting the stream changes nothing");
    assert!(pg_restore_accepts(&dump));
    // Cut at 60 places across the archive (header, table of contents, inside and between blocks): both refuse.
    for i in 0..60 {
        let cut = dump.len() * i / 60 + i % 7;
        let verdict = check(&dump[..cut], 4096);
        assert!(verdict.is_err(), "the built-in check accepted a dump cut at {cut} of {} bytes", dump.len());
        assert!(!pg_restore_accepts(&dump[..cut]), "pg_restore accepted a dump cut at {cut}");
    }
}

#[test]
fn a_backup_longer_than_one_object_continues_in_segments_that_verify_restore_and_expire_together() {
    // One part per object here (10 000 in production), so a 3-part backup is stored as three objects.
    let case = Case::new("segments", "{key: {secretRef: {name: k, key: key}}}", "  retention: {keepLast: 1}\n");
    let pg = Postgres::shared();
    // About 26 MB of hex that zstd halves at best: at least three 5 MiB parts.
    pg.sql(
        &case.name,
        "CREATE TABLE bulk (id int PRIMARY KEY, v text);
         INSERT INTO bulk SELECT i, md5(random()::text) || md5(random()::text) FROM generate_series(1, 400000) i;",
    );
    let before = fingerprint(pg, &case.name);
    let first = case.ok(&["backup", "run", "--parts-per-object", "1"]);
    let id = first["backupId"].as_str().unwrap().to_string();
    let object = case.list()[0]["objects"][0].clone();
    let segments = object["segments"].as_u64().unwrap();
    assert!(segments >= 3, "{object}");
    assert_eq!(object["parts"].as_u64().unwrap(), segments, "one part per segment");
    let key = object["key"].as_str().unwrap().to_string();
    let rt = runtime();
    let store = rt.block_on(SeaweedFs::shared().store(BUCKET));
    let stored: Vec<String> = rt
        .block_on(store.list(&format!("{}/{id}/", case.prefix())))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.starts_with(&key))
        .collect();
    let expected: Vec<String> =
        (0..segments as u32).map(|i| crmguard::backup::manifest::segment_key(&key, i)).collect();
    assert_eq!(stored, expected);

    case.ok(&["backup", "verify", "--backup", &id]);
    let target = format!("{}_restored", case.name);
    case.ok(&["restore", "run", "--backup", &id, "--target-database", &target, "--create-database"]);
    assert_eq!(fingerprint(pg, &target), before, "the restored tables differ");

    // A flipped byte in the last segment is caught like one in the first.
    let last = expected.last().unwrap();
    let mut bytes = rt.block_on(get(&store, last));
    bytes[10] ^= 0x01;
    rt.block_on(store.put(last, bytes.clone().into())).unwrap();
    let (report, stderr) = case.fails(&["backup", "verify", "--backup", &id]);
    assert!(stderr.contains("verification of") || report["reason"] == "VerificationFailed", "{report}\n{stderr}");
    bytes[10] ^= 0x01;
    rt.block_on(store.put(last, bytes.into())).unwrap();

    // keepLast 1: the next backup expires this one, every segment with it.
    let second = case.ok(&["backup", "run", "--parts-per-object", "1"]);
    assert_ne!(second["backupId"], first["backupId"]);
    let left = rt.block_on(store.list(&format!("{}/{id}/", case.prefix()))).unwrap();
    assert!(
        left.is_empty(),
        "segments of the expired backup are left: {:?}",
        left.iter().map(|o| &o.key).collect::<Vec<_>>()
    );
}

/// Issue 15, item 2: someone who may create Jobs (not read Secrets) fakes a healthy backup. Expected from the
/// issue: a Job that merely carries the policy's label, or one owned by the policy's CronJob and running as its
/// ServiceAccount but with an unsigned report, changes nothing (no `lastSuccessfulBackup`, BackupHealthy stays
/// as it was), raises a `ForgedReport` Event and fails the posture check; a Job that would use the report key is
/// refused at admission. The policy's own run, signed, still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_only_claims_a_backup_changes_nothing_and_is_reported() {
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use kube::api::{Api, PostParams};
    let case = Case::new("forged", "{key: {secretRef: {name: k, key: key}}}", "");
    let InCluster { cluster, kubelet, op, policies } = InCluster::start(&case, "backup-forged", |_| {}).await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    e2e::install_chart_rbac(&cluster, e2e::Admission::WithPolicy).await;
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), &ns);
    let cj = e2e::eventually(30, "the backup CronJob", || async {
        cron_jobs.get("forged-backup").await.map_err(|e| e.to_string())
    })
    .await;
    e2e::eventually(30, "BackupHealthy=Unknown NoBackupYet", || async {
        let st = policies.get("forged").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let healthy = st.conditions.iter().find(|c| c.type_ == "BackupHealthy").map(|c| c.reason.clone());
        if healthy.as_deref() == Some("NoBackupYet") { Ok(()) } else { Err(format!("{:?}", st.conditions)) }
    })
    .await;

    // eve may create Jobs and read Jobs, CronJobs and Pods in the namespace; she may not read Secrets.
    let rbac = serde_json::json!({"metadata": {"name": "job-runner"}, "rules": [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list"]},
        {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(rbac).unwrap())
        .await
        .unwrap();
    let binding = serde_json::json!({"metadata": {"name": "job-runner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "job-runner"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "eve"}]});
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(binding).unwrap())
        .await
        .unwrap();
    let eve = e2e::ControlPlane::client_for(&cluster.cp.kubeconfig_for("eve", &["crm-devs"])).await;
    let eve_jobs: Api<Job> = Api::namespaced(eve, &ns);
    let fake = r#"{"ok":true,"kind":"backup","backupId":"20991231T000000Z-fake","completed":"2099-12-31T00:00:00Z","storedBytes":1,"backupCount":1,"newestBackup":"20991231T000000Z-fake","newestCompleted":"2099-12-31T00:00:00Z"}"#;
    let print_fake = vec!["/bin/sh".to_string(), "-c".into(), format!("printf '%s' '{fake}' > /dev/termination-log")];
    let template = cj.spec.as_ref().unwrap().job_template.clone();

    // 1. The issue's forgery: only the policy's labels, the namespace's default ServiceAccount.
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let only_labels = serde_json::json!({"metadata": {"name": "fake-labels", "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {"restartPolicy": "Never",
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true},
            "containers": [{"name": "backup", "image": "busybox", "command": print_fake}]}}}});
    eve_jobs.create(&PostParams::default(), &serde_json::from_value(only_labels).unwrap()).await.unwrap();
    // 2. Owned by the policy's CronJob, running as its ServiceAccount, but without the report key.
    let mut owned = Job { metadata: template.metadata.clone().unwrap(), spec: template.spec.clone(), status: None };
    owned.metadata.name = Some("fake-owned".into());
    owned.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "batch/v1".into(),
        kind: "CronJob".into(),
        name: "forged-backup".into(),
        uid: cj.metadata.uid.clone().unwrap(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let pod = owned.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    pod.containers[0].image = Some("busybox".into());
    pod.containers[0].command = Some(print_fake.clone());
    pod.containers[0].args = None;
    let mut signing = owned.clone();
    let pod = owned.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    pod.containers[0].env.as_mut().unwrap().retain(|e| !e.name.starts_with("CRMGUARD_REPORT_KEY"));
    eve_jobs.create(&PostParams::default(), &owned).await.unwrap();
    // 3. The same with the report key: refused by the chart's admission policy (eve may not read the Secret).
    // A dry run first, until the API server has compiled the new policy.
    signing.metadata.name = Some("fake-signed".into());
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    e2e::eventually(30, "the report-key admission policy to be in effect", || async {
        match eve_jobs.create(&dry, &signing).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let r = eve_jobs.create(&PostParams::default(), &signing).await;
    assert!(
        matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403 && s.message.contains("crmguard report-key Secret")),
        "a Job using the report key is refused to someone who may not read it: {r:?}"
    );

    for job in ["fake-labels", "fake-owned"] {
        assert!(job_finished(&client, &ns, job, &kubelet).await, "{job} completed: {}", kubelet.logs().await);
    }
    let st = e2e::eventually(60, "both fakes rejected", || async {
        let st = policies.get("forged").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let jobs: Vec<&str> = st.rejected_reports.iter().map(|r| r.job.as_str()).collect();
        if jobs.contains(&"fake-labels") && jobs.contains(&"fake-owned") { Ok(st) } else { Err(format!("{st:?}")) }
    })
    .await;
    assert!(st.last_successful_backup.is_none(), "{st:?}");
    let cond = |t: &str| st.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()));
    assert_eq!(cond("BackupHealthy"), Some(("Unknown".into(), "NoBackupYet".into())));
    assert_eq!(cond("ReportsTrusted"), Some(("False".into(), "ForgedReport".into())));
    let reasons: Vec<(&str, &str)> = st.rejected_reports.iter().map(|r| (r.job.as_str(), r.reason.as_str())).collect();
    assert!(reasons.contains(&("fake-labels", "not created by the policy's CronJobs")), "{reasons:?}");
    assert!(reasons.contains(&("fake-owned", "the report is not signed with the policy's report key")), "{reasons:?}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let forged = e2e::eventually(30, "ForgedReport Events", || async {
        let list = events.list(&Default::default()).await.map_err(|e| e.to_string())?;
        let notes: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("ForgedReport"))
            .filter_map(|e| e.note.clone())
            .collect();
        if notes.len() >= 2 { Ok(notes) } else { Err(format!("{notes:?}")) }
    })
    .await;
    assert!(forged.iter().any(|n| n.starts_with("Job fake-labels:")), "{forged:?}");
    // The posture report, from the cluster: the check fails, naming the Jobs.
    let dir = TempDir::new("forged-report");
    let kubeconfig = dir.path.join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.cp.admin_kubeconfig()).unwrap();
    let out = Command::new(crmguard_bin()).args(["report", "-n", &ns]).env("KUBECONFIG", &kubeconfig).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.lines().any(|l| l.trim_start().starts_with("FAIL high") && l.contains(" backup-reports-authentic ")),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("fake-labels") && report.contains("fake-owned"), "{report}");

    // The policy's own run is signed and counts.
    let job = run_cron_job_now(&client, &ns, "forged-backup", "manual-1").await;
    assert!(job_finished(&client, &ns, &job, &kubelet).await, "{}", kubelet.logs().await);
    let id = e2e::eventually(60, "the real backup in status", || async {
        let st = policies.get("forged").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        st.last_successful_backup.map(|b| b.id).ok_or_else(|| format!("{:?}\n{}", st.conditions, op.logs()))
    })
    .await;
    assert!(!id.ends_with("-fake"), "{id}");
    assert!(String::from_utf8_lossy(&case.run(&["backup", "list"]).stdout).contains(&id));
    assert!(!op.logs().contains(fake), "the fake report is not logged");
}

/// Issue 20, item 4: storage that goes away during a restore is reported as the storage failure it is, not as
/// pg_restore's "unexpected end of file", and the target keeps nothing (pg_restore runs in one transaction).
/// (Before: reason DatabaseToolFailed with pg_restore's message.)
#[test]
fn storage_lost_during_a_restore_is_named_as_such_and_the_target_keeps_nothing() {
    let case = Case::new("s3gone", "{key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    pg.sql(&case.name, "CREATE TABLE bulk AS SELECT i, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, 200000) i");
    let id = case.ok(&["backup", "run"])["backupId"].as_str().unwrap().to_string();
    let stored = case.list()[0]["objects"][0]["storedBytes"].as_u64().unwrap();
    // The verification pass reads the object once; the endpoint dies halfway through the restore's own read.
    let proxy = e2e::tcpcut::CutProxy::start(SeaweedFs::shared().port, stored + stored / 2);
    // The endpoint stays away: the download gives up after the policy's transfer deadline.
    let cut = case.through_with(&format!("http://127.0.0.1:{}", proxy.port), "3s");
    let target = format!("{}_restored", case.name);
    let (report, stderr) =
        cut.fails(&["restore", "run", "--backup", &id, "--target-database", &target, "--create-database"]);
    assert!(proxy.was_cut(), "the storage did not go away during the restore: {report}");
    assert_eq!(report["reason"], "StorageError", "{report}\n{stderr}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("GET") && !msg.contains("pg_restore"), "{msg}");
    let tables =
        pg.sql(&target, "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')");
    assert_eq!(tables.trim(), "0", "the target kept part of the backup");
}

/// Issue 20, item 4: missing S3 keys are named at once, with where they come from; no cloud metadata address is
/// asked. (Before: the SDK's credential chain ended at the metadata service and the error read "cannot reach the S3
/// endpoint", followed by an internal dump.)
#[test]
fn missing_s3_keys_are_named_with_how_to_provide_them() {
    let mut case = Case::new("nokeys", "{key: {secretRef: {name: k, key: key}}}", "");
    case.env.remove("AWS_ACCESS_KEY_ID");
    case.env.remove("AWS_SECRET_ACCESS_KEY");
    // Whatever the code under test does, this test never lets it reach a metadata address.
    case.env.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
    let (report, stderr) = case.fails(&["backup", "run"]);
    assert_eq!(report["reason"], "CredentialsUnavailable", "{report}\n{stderr}");
    let msg = report["message"].as_str().unwrap();
    assert!(msg.contains("AWS_ACCESS_KEY_ID") && msg.contains("destination.credentials.secretRef"), "{msg}");
    assert!(!stderr.contains("DispatchFailure") && !stderr.contains("169.254"), "{stderr}");
    case.env.insert("AWS_ACCESS_KEY_ID".into(), "only-this-one".into());
    let (report, _) = case.fails(&["backup", "run"]);
    assert!(
        report["message"].as_str().unwrap().contains("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        "{report}"
    );
}

/// Issue 20, item 4: a restore into a database server that cannot be reached fails at once, before the backup is
/// downloaded and verified, with a reason of its own. (Before: the whole backup was read and verified, then the
/// restore tool failed: DatabaseToolFailed.)
#[test]
fn an_unreachable_target_fails_the_restore_before_anything_is_downloaded() {
    let case = Case::new("notarget", "{key: {secretRef: {name: k, key: key}}}", "");
    let id = case.ok(&["backup", "run"])["backupId"].as_str().unwrap().to_string();
    let port = e2e::free_port().to_string();
    let target = format!("{}_restored", case.name);
    let args =
        ["restore", "run", "--backup", &id, "--target-database", &target, "--target-port", &port, "--create-database"];
    let (report, stderr) = case.fails(&args);
    assert_eq!(report["reason"], "DatabaseUnreachable", "{report}\n{stderr}");
    assert!(report["message"].as_str().unwrap().contains("nothing was downloaded"), "{report}");
    assert!(!stderr.contains("verifying before touching the target"), "the backup was read first:\n{stderr}");
}

/// Issue 20, item 3: transfers ride out an endpoint that restarts. The S3 endpoint goes away in the middle of the
/// upload for 20 s (connections cut, new ones refused) and comes back: the backup retries the failed parts into
/// the same multipart upload and commits. Then it goes away in the middle of a restore's download for 3 s: the
/// download resumes where it stopped and the restore completes. (Before: the SDK's five attempts were spent within
/// seconds and the backup failed.)
#[test]
fn transfers_ride_out_an_endpoint_that_restarts() {
    use e2e::tcpcut::{CutProxy, Outage};
    let case = Case::new("s3blip", "{key: {secretRef: {name: k, key: key}}}", "");
    let pg = Postgres::shared();
    pg.sql(&case.name, "CREATE TABLE bulk AS SELECT i, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, 200000) i");
    let before = fingerprint(pg, &case.name);
    let upload = CutProxy::with_outage(
        SeaweedFs::shared().port,
        Outage { after_bytes: 6 << 20, count_client_bytes: true, down: Some(Duration::from_secs(20)) },
    );
    let blip = case.through(&format!("http://127.0.0.1:{}", upload.port));
    let out = blip.run(&["backup", "run", "--part-size-mib", "5", "--parts-in-flight", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(upload.was_cut(), "the endpoint did not go away during the upload");
    assert!(out.status.success(), "the backup did not ride out the outage:\n{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    let list = case.list();
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    let stored = list[0]["objects"][0]["storedBytes"].as_u64().unwrap();

    let download = CutProxy::with_outage(
        SeaweedFs::shared().port,
        Outage { after_bytes: stored + stored / 2, count_client_bytes: false, down: Some(Duration::from_secs(3)) },
    );
    let blip = case.through(&format!("http://127.0.0.1:{}", download.port));
    let target = format!("{}_restored", case.name);
    let out = blip.run(&["restore", "run", "--backup", &id, "--target-database", &target, "--create-database"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(download.was_cut(), "the endpoint did not go away during the download");
    assert!(out.status.success(), "the restore did not ride out the outage:\n{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    assert_eq!(fingerprint(pg, &target), before, "restored data differs from the source");
}
