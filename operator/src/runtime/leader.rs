//! Leader election with a coordination.k8s.io/v1 Lease, so that two replicas are safe: only the holder runs
//! the controllers, and a replica that cannot prove it still holds the lease stops at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (pod name, else host name and pid).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub retry: Duration,
}

/// Outcome of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the lease (acquired or renewed).
    Held,
    /// Someone else holds a valid lease, or we lost a race.
    Other,
}

fn expired(spec: &LeaseSpec, now: jiff::Timestamp, fallback: Duration) -> bool {
    let secs = spec.lease_duration_seconds.map_or(fallback.as_secs() as i64, i64::from);
    match &spec.renew_time {
        Some(t) => t.0 + jiff::SignedDuration::from_secs(secs) < now,
        None => true,
    }
}

/// One acquire-or-renew attempt.
pub async fn try_acquire_or_renew(
    client: &Client,
    cfg: &LeaseConfig,
    now: jiff::Timestamp,
) -> Result<Attempt, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let spec_for = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(cfg.name.clone()), ..ObjectMeta::default() },
                spec: Some(spec_for(None, 0)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(e) if conflict(&e) => Ok(Attempt::Other),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !mine && !expired(&spec, now, cfg.duration) {
                return Ok(Attempt::Other);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
            let acquire = if mine { spec.acquire_time.clone() } else { None };
            lease.spec = Some(spec_for(acquire, transitions));
            // PUT with the resourceVersion we read: a concurrent writer makes this a 409, never two holders.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(e) if conflict(&e) => Ok(Attempt::Other),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    loop {
        match try_acquire_or_renew(client, cfg, jiff::Timestamp::now()).await {
            Ok(Attempt::Held) => return,
            Ok(Attempt::Other) => {}
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the lease"),
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// Renews the lease until it is lost; returns the reason. A renewal that fails for two thirds of the lease
/// duration counts as lost, so that this replica stops before another one can take over.
pub async fn hold(client: &Client, cfg: &LeaseConfig) -> String {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.retry).await;
        match try_acquire_or_renew(client, cfg, jiff::Timestamp::now()).await {
            Ok(Attempt::Held) => last = tokio::time::Instant::now(),
            Ok(Attempt::Other) => return format!("lease {}/{} is held by another replica", cfg.namespace, cfg.name),
            Err(e) => {
                if last.elapsed() > cfg.duration * 2 / 3 {
                    return format!("could not renew lease {}/{} in time: {e}", cfg.namespace, cfg.name);
                }
            }
        }
    }
}
