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
            // A released lease (no holder) is free at once.
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
            if !mine && !free && !expired(&spec, now, cfg.duration) {
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

/// How often a standby replica looks at the lease: often enough that a released lease is taken within a
/// second or so.
fn candidate_poll(cfg: &LeaseConfig) -> Duration {
    cfg.retry.min(Duration::from_secs(1))
}

/// Waits until this replica holds the lease. Every attempt has a deadline (a frozen API server must not hang
/// the candidate).
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    loop {
        match tokio::time::timeout(cfg.duration / 3, try_acquire_or_renew(client, cfg, jiff::Timestamp::now())).await {
            Ok(Ok(Attempt::Held)) => return,
            Ok(Ok(Attempt::Other)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: cannot read or write the lease"),
            Err(_) => tracing::warn!("leader election: the API server did not answer in time"),
        }
        tokio::time::sleep(candidate_poll(cfg)).await;
    }
}

/// How long the holder may go without a successful renewal before it must stop: two thirds of the lease, so it
/// stops writing before another replica can take the lease over.
pub fn renew_deadline(cfg: &LeaseConfig) -> Duration {
    cfg.duration * 2 / 3
}

/// Renews the lease until it is lost; returns the reason. Every renewal has a deadline: when none succeeded
/// for [`renew_deadline`] (errors, or an API server that does not answer at all), the lease counts as lost.
pub async fn hold(client: &Client, cfg: &LeaseConfig) -> String {
    let mut last = tokio::time::Instant::now();
    loop {
        let deadline = last + renew_deadline(cfg);
        tokio::time::sleep_until((tokio::time::Instant::now() + cfg.retry).min(deadline)).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let lost = |why: String| {
            format!(
                "could not renew lease {}/{} within {}s (two thirds of its {}s, so before another replica can \
                 take it over): {why}",
                cfg.namespace,
                cfg.name,
                renew_deadline(cfg).as_secs_f32(),
                cfg.duration.as_secs()
            )
        };
        if left.is_zero() {
            return lost("no renewal succeeded".into());
        }
        match tokio::time::timeout(left, try_acquire_or_renew(client, cfg, jiff::Timestamp::now())).await {
            Ok(Ok(Attempt::Held)) => last = tokio::time::Instant::now(),
            Ok(Ok(Attempt::Other)) => {
                return format!("lease {}/{} is held by another replica", cfg.namespace, cfg.name);
            }
            Ok(Err(e)) if last.elapsed() >= renew_deadline(cfg) => return lost(e.to_string()),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewal failed, retrying"),
            Err(_) => return lost("the API server did not answer".into()),
        }
    }
}

/// Gives the lease up on a graceful shutdown (no holder, renewed now), so that a standby replica takes over at
/// once instead of waiting for it to expire, as client-go's `ReleaseOnCancel` does. Best effort, bounded.
pub async fn release(client: &Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let attempt = async {
        let mut lease = api.get(&cfg.name).await?;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        api.replace(&cfg.name, &PostParams::default(), &lease).await.map(|_| true)
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(true)) => tracing::info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), "released the lease"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease; it expires on its own"),
        Err(_) => tracing::warn!("could not release the lease in time; it expires on its own"),
    }
}
