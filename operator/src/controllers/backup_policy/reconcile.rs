//! CrmBackupPolicy: validate -> CronJobs, ServiceAccount, config -> applied; status with the next run.
//! Backup health from the S3 catalog arrives with the backup data path; until then it is reported Unknown.

use serde_json::json;

use super::{build, validate};
use crate::api::CrmBackupPolicy;
use crate::api::backup_policy::TlsMode;
use crate::api::condition::Status;
use crate::controllers::schedule::next_run;
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

impl Reconcilable for CrmBackupPolicy {
    const CONTROLLER: &'static str = "backuppolicy";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let c = build::build(&v, &ctx.build);
        let cron_job = c.backup.metadata.name.clone().unwrap_or_default();
        let mut d = Desired {
            owner: Some(v.owner.clone()),
            prune: vec![("batch/v1", "CronJob"), ("v1", "ConfigMap"), ("v1", "ServiceAccount")],
            required: vec!["ScheduleReady", "BackupHealthy"],
            ..Desired::default()
        };
        d.children.extend(serde_json::to_value(&c.service_account).ok());
        d.children.extend(serde_json::to_value(&c.config_map).ok());
        d.children.extend(serde_json::to_value(&c.backup).ok());
        d.children.extend(c.drill.as_ref().and_then(|j| serde_json::to_value(j).ok()));
        let tz = self.spec.schedule.time_zone.clone().unwrap_or_else(|| "UTC".into());
        if self.spec.suspend {
            d.conditions.push(Cond::new(
                "ScheduleReady",
                Status::False,
                "Suspended",
                "spec.suspend is true: no new backups start",
            ));
        } else {
            d.conditions.push(Cond::new(
                "ScheduleReady",
                Status::True,
                "Scheduled",
                format!("CronJob {cron_job} runs {:?} ({tz})", self.spec.schedule.cron),
            ));
            if let Some(next) = next_run(&v.cron, v.time_zone.as_ref(), (ctx.now)()) {
                d.status.insert("nextScheduleTime".into(), json!(next.to_string()));
            }
        }
        d.conditions.push(Cond::new(
            "BackupHealthy",
            Status::Unknown,
            "CatalogNotRead",
            "this crmguard build does not read the S3 catalog yet, so backup age and verification are unknown",
        ));
        let plaintext_s3 = self.spec.destination.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        let plaintext_db = matches!(self.spec.source.tls_mode, TlsMode::Disable | TlsMode::Prefer);
        d.conditions.push(match (plaintext_s3, plaintext_db) {
            (false, false) => {
                Cond::new("EncryptedInTransit", Status::True, "TlsEverywhere", "database and S3 are reached over TLS")
            }
            _ => Cond::new(
                "EncryptedInTransit",
                Status::False,
                "PlaintextEndpoint",
                format!(
                    "{}{}",
                    if plaintext_s3 { "the S3 endpoint is plain http; " } else { "" },
                    if plaintext_db {
                        "the database tlsMode does not require TLS (use require, verify-ca or verify-full)"
                    } else {
                        ""
                    }
                ),
            ),
        });
        d.status.insert("cronJobName".into(), json!(cron_job));
        Ok(Ok(d))
    }
}
