//! Pure builder: validated CrmRestore -> the restore Job.

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::EnvVar;

use super::validate::ValidatedRestore;
use crate::api::job::{CONFIG_DIR, CONFIG_FILE};
use crate::controllers::BuildContext;
use crate::controllers::backup_policy::build::{JobPod, attachments_volume, job_env, job_volumes, names, uses_vault};
use crate::k8s::meta::{LABEL_NAME_MAX, child_name};

/// Builds the Job that performs the restore. It runs as the policy's ServiceAccount with the policy's config.
pub fn build(v: &ValidatedRestore, ctx: &BuildContext) -> Job {
    let owner = &v.owner;
    let policy_names = names(&v.policy.owner);
    let spec = &v.restore.spec;
    let mut args = vec![
        "restore".to_string(),
        "run".into(),
        "--config".into(),
        format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        "--target-host".into(),
        v.target_host.clone(),
        "--target-port".into(),
        v.target_port.to_string(),
        "--target-database".into(),
        spec.target.database.clone(),
    ];
    if let Some(id) = &spec.backup.id {
        args.extend(["--backup".into(), id.clone()]);
    } else if let Some(before) = &spec.backup.before {
        args.extend(["--before".into(), before.0.to_string()]);
    } else {
        args.extend(["--backup".into(), "latest".into()]);
    }
    for (flag, on) in [
        ("--create-database", spec.options.create_database),
        ("--clean", spec.options.clean),
        ("--verify-row-counts", spec.options.verify_row_counts),
        ("--restore-attachments", spec.options.restore_attachments),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    // Target credentials: the restore's own when given, else the policy's. A Secret arrives through the same
    // environment variables; a Vault source is named on the command line (the mounted config is the policy's).
    let mut cred_spec = v.policy.spec.clone();
    if let Some(c) = &spec.target.credentials {
        cred_spec.source.credentials = c.clone();
        if let Some(vault) = &c.vault {
            args.extend([
                "--target-vault-path".into(),
                vault.path.clone(),
                "--target-vault-role".into(),
                vault.auth_role.clone(),
                "--target-vault-mount".into(),
                vault.auth_mount.clone(),
            ]);
        }
    }
    let mut env: Vec<EnvVar> = job_env(&cred_spec, ctx);
    env.sort_by(|a, b| a.name.cmp(&b.name));
    let (mut volumes, mut mounts) = job_volumes(&policy_names.config_map, uses_vault(&cred_spec));
    if let (true, Some(att)) = (spec.options.restore_attachments, &v.policy.spec.source.attachments) {
        let (vol, mount) = attachments_volume(att, false);
        volumes.push(vol);
        mounts.push(mount);
    }
    let labels = owner.labels("restore");
    Job {
        metadata: owner.child_meta(child_name(&owner.name, "restore", LABEL_NAME_MAX), "restore"),
        spec: Some(JobSpec {
            // A restore is not retried blindly: a failure is reported and a new CrmRestore decides.
            backoff_limit: Some(0),
            template: JobPod {
                container: "restore".into(),
                service_account: policy_names.service_account,
                labels,
                args,
                env,
                resources: v.policy.spec.job_resources.clone(),
                volumes,
                mounts,
            }
            .template(ctx),
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}
