//! The backup and restore builders, fixtures in and exact objects out: schedule, command, environment (secret
//! references, never values), volumes, the restricted pod, the policy annotation the status depends on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crmguard::api::{CrmBackupPolicy, CrmRestore};
use crmguard::controllers::BuildContext;
use crmguard::controllers::backup_policy::{build, validate};
use serde_json::json;

fn policy(mut v: serde_json::Value) -> CrmBackupPolicy {
    v["metadata"]["uid"] = json!("uid-1");
    let v = crmguard::validation::with_defaults(&v);
    assert!(crmguard::validation::admit(&v).is_empty(), "{:?}", crmguard::validation::admit(&v));
    crmguard::validation::read_typed(&v).unwrap()
}

fn ctx() -> BuildContext {
    BuildContext { vault_addr: Some("https://vault.vault.svc:8200".into()), ..BuildContext::default() }
}

#[test]
fn the_backup_cron_job_runs_the_backup_command_restricted_without_api_rights_and_with_secret_references_only() {
    let mut v = support::example("CrmBackupPolicy");
    support::set(&mut v, "/spec/destination/caSecretRef", json!({"name": "s3-ca", "key": "ca.crt"}));
    let p = policy(v);
    let children = build::build(&validate::validate(&p).unwrap(), &ctx());
    let cj = children.backup;
    let spec = cj.spec.as_ref().unwrap();
    assert_eq!(cj.metadata.name.as_deref(), Some("crm-db-backup"));
    assert_eq!(spec.schedule, "15 2 * * *");
    assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    assert_eq!(spec.starting_deadline_seconds, Some(600));
    assert_eq!((spec.successful_jobs_history_limit, spec.failed_jobs_history_limit), (Some(3), Some(3)));
    let tmpl = &spec.job_template;
    assert_eq!(tmpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[build::POLICY_ANNOTATION], "crm-db");
    let pod = tmpl.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.service_account_name.as_deref(), Some("crm-db-backup"));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!((psc.run_as_non_root, psc.run_as_user), (Some(true), Some(build::RUN_AS)));
    let c = &pod.containers[0];
    assert_eq!(c.args.as_ref().unwrap(), &["backup", "run", "--config", "/etc/crmguard/policy.json"]);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
    let env = c.env.as_ref().unwrap();
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "VAULT_ADDR",
            "CRMGUARD_DB_CA_CERT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "CRMGUARD_S3_CA_CERT",
            "CRMGUARD_REPORT_KEY",
            "CRMGUARD_POD_UID"
        ]
    );
    for e in env.iter().filter(|e| e.name != "VAULT_ADDR" && e.name != "CRMGUARD_POD_UID") {
        let r = e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).unwrap();
        assert!(e.value.is_none() && r.optional == Some(false), "{e:?}");
    }
    assert_eq!(env[4].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "s3-ca");
    // The report is signed with the policy's report key, bound to the pod's UID (downward API).
    assert_eq!(env[5].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "crmguard-report-key-crm-db");
    assert_eq!(env[6].value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.uid");
    let mounts: Vec<(&str, &str, Option<bool>)> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("config", "/etc/crmguard", Some(true)),
            ("tmp", "/tmp", None),
            ("vault-token", "/var/run/secrets/vault", Some(true)),
            ("attachments", "/data/attachments", Some(true)),
        ]
    );
    let token = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "vault-token").unwrap();
    let proj = &token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
    assert_eq!(proj.service_account_token.as_ref().unwrap().audience.as_deref(), Some("vault"));
    // The drill runs the restore command into the scratch database, without the attachments volume.
    let drill = children.drill.unwrap();
    let dpod = drill.spec.unwrap().job_template.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        dpod.containers[0].args.as_ref().unwrap(),
        &[
            "restore",
            "run",
            "--config",
            "/etc/crmguard/policy.json",
            "--drill",
            "--target-database",
            "crm_restore_drill"
        ]
    );
    assert!(dpod.volumes.unwrap().iter().all(|v| v.name != "attachments"));
    // The mounted configuration carries the spec (references only), never a secret value.
    let config = &children.config_map.data.unwrap()[crmguard::api::job::CONFIG_FILE];
    let parsed: crmguard::api::job::JobConfig = serde_json::from_str(config).unwrap();
    assert_eq!((parsed.policy.as_str(), parsed.prefix.as_str(), parsed.port), ("crm-db", "prod/crm", 5432));
}

#[test]
fn without_a_vault_address_jobs_get_no_vault_addr_and_secret_keys_arrive_as_references() {
    let mut v = support::example("CrmBackupPolicy");
    support::set(&mut v, "/spec/source/credentials", json!({"secretRef": {"name": "crm-db"}}));
    support::set(&mut v, "/spec/encryption/key", json!({"secretRef": {"name": "crm-key", "key": "key"}}));
    let p = policy(v);
    let spec = &validate::validate(&p).unwrap().spec;
    let env = build::job_env(spec, &BuildContext::default());
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "CRMGUARD_DB_USERNAME",
            "CRMGUARD_DB_PASSWORD",
            "CRMGUARD_DB_CA_CERT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "CRMGUARD_ENCRYPTION_KEY"
        ]
    );
    assert!(!build::uses_vault(spec));
}

#[test]
fn a_restore_job_names_the_backup_target_and_options_and_passes_target_vault_credentials() {
    let p = policy(support::example("CrmBackupPolicy"));
    let mut r = support::example("CrmRestore");
    r["metadata"]["uid"] = json!("uid-2");
    support::set(&mut r, "/spec/backup", json!({"id": "20261129T021500Z-ab12"}));
    support::set(
        &mut r,
        "/spec/target/credentials",
        json!({"vault": {"path": "database/creds/crm-restore", "authRole": "crm-restore"}}),
    );
    support::set(&mut r, "/spec/options/restoreAttachments", json!(true));
    let r = crmguard::validation::with_defaults(&r);
    let r: CrmRestore = crmguard::validation::read_typed(&r).unwrap();
    let v = crmguard::controllers::restore::validate::validate(&r, Some(&p)).unwrap();
    let job = crmguard::controllers::restore::build::build(&v, &ctx());
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    let joined = args.join(" ");
    assert!(
        joined.starts_with(
            "restore run --config /etc/crmguard/policy.json --target-host crm-db.crm.svc --target-port 5432"
        ),
        "{joined}"
    );
    assert!(joined.contains("--backup 20261129T021500Z-ab12"), "{joined}");
    assert!(joined.contains("--restore-attachments"), "{joined}");
    assert!(joined.contains("--target-vault-path database/creds/crm-restore --target-vault-role crm-restore --target-vault-mount kubernetes"), "{joined}");
    assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
    let att = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "attachments").unwrap();
    assert_eq!(att.read_only, Some(false), "a restore writes the attachments back");
}

#[test]
fn vaults_ca_reaches_jobs_through_their_config_map() {
    let p = policy(support::example("CrmBackupPolicy"));
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_string();
    let with_ca = BuildContext { vault_ca_pem: Some(pem.clone()), ..ctx() };
    let v = validate::validate(&p).unwrap();
    let children = build::build(&v, &with_ca);
    assert_eq!(children.config_map.data.as_ref().unwrap()[crmguard::api::job::VAULT_CA_FILE], pem);
    let env = build::job_env(&v.spec, &with_ca);
    let ca = env.iter().find(|e| e.name == "VAULT_CACERT").expect("VAULT_CACERT");
    assert_eq!(ca.value.as_deref(), Some("/etc/crmguard/vault-ca.crt"));
    // Without a CA the jobs trust the system roots and get no VAULT_CACERT.
    let plain = build::job_env(&v.spec, &ctx_plain());
    assert!(plain.iter().all(|e| e.name != "VAULT_CACERT"));
    assert!(!build::build(&v, &ctx_plain()).config_map.data.unwrap().contains_key(crmguard::api::job::VAULT_CA_FILE));
}

fn ctx_plain() -> BuildContext {
    ctx()
}

#[test]
fn the_platforms_default_s3_endpoint_fills_in_only_where_a_policy_names_none() {
    let def = crmguard::controllers::DefaultS3 {
        endpoint: "https://minio.storage:9000".into(),
        region: Some("eu-west-1".into()),
        force_path_style: true,
    };
    let with_default = BuildContext { default_s3: Some(def), ..ctx() };
    let config = |p: &CrmBackupPolicy, c: &BuildContext| -> serde_json::Value {
        let cm = build::build(&validate::validate(p).unwrap(), c).config_map;
        serde_json::from_str(&cm.data.unwrap()["policy.json"]).unwrap()
    };
    let mut v = support::example("CrmBackupPolicy");
    v["spec"]["destination"].as_object_mut().unwrap().remove("endpoint");
    let d = config(&policy(v), &with_default)["spec"]["destination"].clone();
    assert_eq!(
        (&d["endpoint"], &d["region"], &d["forcePathStyle"]),
        (&json!("https://minio.storage:9000"), &json!("eu-west-1"), &json!(true))
    );
    // A policy's own endpoint wins, region and addressing included.
    let mut v = support::example("CrmBackupPolicy");
    support::set(&mut v, "/spec/destination/endpoint", json!("https://s3.own.example"));
    let own = policy(v);
    let d = config(&own, &with_default)["spec"]["destination"].clone();
    assert_eq!(d, serde_json::to_value(&own.spec.destination).unwrap());
}
