//! Pure builders: validated CrmBackupPolicy -> ServiceAccount, job ConfigMap, backup CronJob and (when drills
//! are configured) restore-drill CronJob. The job needs no Kubernetes API rights: its configuration is mounted,
//! Secrets arrive as environment variables resolved by the kubelet, and Vault is reached with a projected
//! ServiceAccount token. So no Role is created, and the API token is not mounted.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, ProjectedVolumeSource, SeccompProfile, SecretKeySelector,
    SecurityContext, ServiceAccount, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::validate::ValidatedBackupPolicy;
use crate::api::backup_policy::CrmBackupPolicySpec;
use crate::api::job::{ATTACHMENTS_DIR, CONFIG_DIR, CONFIG_FILE, JobConfig, VAULT_CA_FILE, VAULT_TOKEN_DIR};
use crate::controllers::BuildContext;
use crate::k8s::meta::{CRONJOB_NAME_MAX, NAME_MAX, Owner, child_name};

/// Annotation on backup and drill Jobs naming their CrmBackupPolicy.
pub const POLICY_ANNOTATION: &str = "crmguard.io/policy";
/// UID/GID the jobs run as (non-root).
pub const RUN_AS: i64 = 65532;

/// Names of the children of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub service_account: String,
    pub config_map: String,
    pub backup_cron_job: String,
    pub drill_cron_job: String,
    /// The Secret holding the key the policy's jobs sign their reports with (created by the operator, not
    /// applied: its value is random). Named with a fixed prefix so the chart's admission policy recognises it.
    pub report_key: String,
}

/// Prefix of every report-key Secret's name.
pub const REPORT_KEY_PREFIX: &str = "crmguard-report-key";

/// Child names for a policy.
pub fn names(owner: &Owner) -> Names {
    Names {
        service_account: child_name(&owner.name, "backup", NAME_MAX),
        config_map: child_name(&owner.name, "backup-config", NAME_MAX),
        backup_cron_job: child_name(&owner.name, "backup", CRONJOB_NAME_MAX),
        drill_cron_job: child_name(&owner.name, "drill", CRONJOB_NAME_MAX),
        report_key: child_name(REPORT_KEY_PREFIX, &owner.name, NAME_MAX),
    }
}

/// Everything a policy creates.
#[derive(Clone, Debug)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub backup: CronJob,
    pub drill: Option<CronJob>,
}

/// Builds the children of a validated policy.
pub fn build(policy: &ValidatedBackupPolicy, ctx: &BuildContext) -> Children {
    let owner = &policy.owner;
    let n = names(owner);
    let config = JobConfig {
        policy: owner.name.clone(),
        namespace: owner.namespace.clone(),
        prefix: policy.prefix.clone(),
        port: policy.port,
        spec: {
            let mut spec = policy.spec.clone();
            spec.destination = ctx.destination(&spec.destination);
            spec
        },
    };
    // Serialising plain data structures cannot fail; fall back to an empty document rather than panic.
    let config_json = serde_json::to_string_pretty(&config).unwrap_or_default();
    let config_map = ConfigMap {
        metadata: owner.child_meta(n.config_map.clone(), "backup"),
        data: Some(
            [(CONFIG_FILE.to_string(), config_json)]
                .into_iter()
                .chain(ctx.vault_ca_pem.clone().map(|pem| (VAULT_CA_FILE.to_string(), pem)))
                .collect(),
        ),
        ..ConfigMap::default()
    };
    let service_account = ServiceAccount {
        metadata: owner.child_meta(n.service_account.clone(), "backup"),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    let backup = cron_job(
        policy,
        ctx,
        &n,
        n.backup_cron_job.clone(),
        "backup",
        policy.spec.schedule.cron.clone(),
        vec!["backup".into(), "run".into(), "--config".into(), format!("{CONFIG_DIR}/{CONFIG_FILE}")],
    );
    let drill = policy.spec.verification.restore_drill.as_ref().map(|d| {
        cron_job(
            policy,
            ctx,
            &n,
            n.drill_cron_job.clone(),
            "restore-drill",
            d.cron.clone(),
            vec![
                "restore".into(),
                "run".into(),
                "--config".into(),
                format!("{CONFIG_DIR}/{CONFIG_FILE}"),
                "--drill".into(),
                "--target-database".into(),
                d.scratch_database.clone(),
            ],
        )
    });
    Children { service_account, config_map, backup, drill }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Environment of the job: secret references only (resolved by the kubelet), never values.
pub fn job_env(spec: &CrmBackupPolicySpec, ctx: &BuildContext) -> Vec<EnvVar> {
    let mut env = Vec::new();
    if let (true, Some(addr)) = (uses_vault(spec), &ctx.vault_addr) {
        env.push(EnvVar { name: "VAULT_ADDR".into(), value: Some(addr.clone()), ..EnvVar::default() });
        if ctx.vault_ca_pem.is_some() {
            let path = format!("{CONFIG_DIR}/{VAULT_CA_FILE}");
            env.push(EnvVar { name: "VAULT_CACERT".into(), value: Some(path), ..EnvVar::default() });
        }
    }
    if let Some(s) = &spec.source.credentials.secret_ref {
        env.push(secret_env("CRMGUARD_DB_USERNAME", &s.name, &s.username_key));
        env.push(secret_env("CRMGUARD_DB_PASSWORD", &s.name, &s.password_key));
    }
    if let Some(ca) = &spec.source.ca_secret_ref {
        env.push(secret_env("CRMGUARD_DB_CA_CERT", &ca.name, &ca.key));
    }
    if let Some(s) = spec.destination.credentials.as_ref().and_then(|c| c.secret_ref.as_ref()) {
        env.push(secret_env("AWS_ACCESS_KEY_ID", &s.name, &s.access_key_id_key));
        env.push(secret_env("AWS_SECRET_ACCESS_KEY", &s.name, &s.secret_access_key_key));
    }
    if let Some(ca) = &spec.destination.ca_secret_ref {
        env.push(secret_env("CRMGUARD_S3_CA_CERT", &ca.name, &ca.key));
    }
    if let Some(k) = spec.encryption.key.as_ref().and_then(|k| k.secret_ref.as_ref()) {
        env.push(secret_env("CRMGUARD_ENCRYPTION_KEY", &k.name, &k.key));
    }
    env
}

/// True when the job talks to Vault (and so needs a projected ServiceAccount token).
/// The report key and the pod's UID, which the job signs its report with (`backup::report`).
fn report_env(secret: &str) -> [EnvVar; 2] {
    use crate::backup::report::{KEY_ENV, POD_UID_ENV, SECRET_KEY};
    let uid = EnvVarSource {
        field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
            field_path: "metadata.uid".into(),
            api_version: None,
        }),
        ..EnvVarSource::default()
    };
    [
        secret_env(KEY_ENV, secret, SECRET_KEY),
        EnvVar { name: POD_UID_ENV.into(), value_from: Some(uid), ..EnvVar::default() },
    ]
}

pub fn uses_vault(spec: &CrmBackupPolicySpec) -> bool {
    spec.source.credentials.vault.is_some()
        || spec.destination.credentials.as_ref().is_some_and(|c| c.vault.is_some())
        || spec.encryption.key.as_ref().is_some_and(|k| k.vault_transit.is_some())
}

/// Pod securityContext that passes Pod Security "restricted".
pub fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..PodSecurityContext::default()
    }
}

/// Container securityContext that passes Pod Security "restricted".
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

/// Volumes and mounts shared by backup and restore jobs: config, scratch /tmp, Vault token.
pub fn job_volumes(config_map: &str, vault: bool) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.to_string(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(Default::default()), ..Volume::default() },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
    ];
    if vault {
        volumes.push(Volume {
            name: "vault-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("vault".into()),
                        expiration_seconds: Some(600),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "vault-token".into(),
            mount_path: VAULT_TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// The attachments PVC as a volume and its mount at [`ATTACHMENTS_DIR`]: read-only for backups, writable for
/// restores that bring the files back.
pub fn attachments_volume(
    att: &crate::api::backup_policy::AttachmentsSource,
    read_only: bool,
) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "attachments".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: att.pvc_name.clone(),
                read_only: Some(read_only),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "attachments".into(),
            mount_path: ATTACHMENTS_DIR.into(),
            sub_path: att.sub_path.clone(),
            read_only: Some(read_only),
            ..VolumeMount::default()
        },
    )
}

/// The pod of a backup, drill or restore job: non-root, restricted, no API token, config and scratch mounted.
#[derive(Clone, Debug)]
pub struct JobPod {
    pub container: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

impl JobPod {
    /// The pod template.
    pub fn template(self, ctx: &BuildContext) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta { labels: Some(self.labels), ..ObjectMeta::default() }),
            spec: Some(PodSpec {
                service_account_name: Some(self.service_account),
                automount_service_account_token: Some(false),
                restart_policy: Some("Never".into()),
                security_context: Some(restricted_pod_security()),
                containers: vec![Container {
                    name: self.container,
                    image: Some(ctx.image.clone()),
                    image_pull_policy: Some(ctx.image_pull_policy.clone()),
                    args: Some(self.args),
                    env: Some(self.env),
                    resources: self.resources,
                    security_context: Some(restricted_container_security()),
                    volume_mounts: Some(self.mounts),
                    ..Container::default()
                }],
                volumes: Some(self.volumes),
                ..PodSpec::default()
            }),
        }
    }
}

fn cron_job(
    policy: &ValidatedBackupPolicy,
    ctx: &BuildContext,
    n: &Names,
    name: String,
    component: &str,
    schedule: String,
    args: Vec<String>,
) -> CronJob {
    let owner = &policy.owner;
    let spec = &policy.spec;
    let (mut volumes, mut mounts) = job_volumes(&n.config_map, uses_vault(spec));
    if let (true, Some(att)) = (component == "backup", &spec.source.attachments) {
        let (v, m) = attachments_volume(att, true);
        volumes.push(v);
        mounts.push(m);
    }
    let labels = owner.labels(component);
    CronJob {
        metadata: owner.child_meta(name, component),
        spec: Some(CronJobSpec {
            schedule,
            time_zone: spec.schedule.time_zone.clone(),
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(spec.schedule.starting_deadline_seconds),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            suspend: Some(spec.suspend),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    // Jobs are owned by the CronJob; this names the policy whose status they feed.
                    annotations: Some(BTreeMap::from([(POLICY_ANNOTATION.to_string(), owner.name.clone())])),
                    ..ObjectMeta::default()
                }),
                spec: Some(JobSpec {
                    // One retry for a transient failure; a failed run never blocks the next scheduled one.
                    backoff_limit: Some(1),
                    template: JobPod {
                        container: component.to_string(),
                        service_account: n.service_account.clone(),
                        labels,
                        args,
                        env: job_env(spec, ctx).into_iter().chain(report_env(&n.report_key)).collect(),
                        resources: spec.job_resources.clone(),
                        volumes,
                        mounts,
                    }
                    .template(ctx),
                    ..JobSpec::default()
                }),
            },
        }),
        ..CronJob::default()
    }
}
