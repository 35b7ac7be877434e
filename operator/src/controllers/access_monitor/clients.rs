//! Client addresses placed at pods of the monitor's namespace (by their pod IPs). The pods' addresses are read from
//! the server (the controller's pod watch keeps metadata only) when an address is not placed yet: a placement holds
//! while its pod (by UID) is among the namespace's unfinished pods, and an address no pod has is looked for again
//! when the watch shows a pod the last read did not have, or after a minute. Pods on the host's network (their
//! address is the node's, which other clients share) and addresses several pods have are no pod's; a statement is
//! placed only at a pod created before it (a pod's address may be given again after it is gone).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::controllers::contract::Context;
use crate::monitor::access::Access;

/// How long an address no pod had stays unplaced before the pods are read again.
const UNPLACED_RECHECK: Duration = Duration::from_secs(60);
/// Addresses remembered at most.
const KEPT: usize = 4096;

/// A pod an address was placed at.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placed {
    name: String,
    uid: String,
    account: String,
    created: Option<jiff::Timestamp>,
}

/// Address -> (the pod, or none; when it was looked up).
#[derive(Clone, Debug, Default)]
pub struct Placements {
    by_address: HashMap<String, (Option<Placed>, Instant)>,
    /// The pods the last read of the server had.
    listed: BTreeSet<String>,
}

/// An address as a pod's: an IPv4 address MariaDB shows mapped into IPv6 (`::ffff:10.0.0.7`) is the IPv4 one.
fn normal(address: &str) -> Option<String> {
    match address.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V6(v6) => Some(v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string())),
        v4 => Some(v4.to_string()),
    }
}

/// Sets the pod of every access whose client address a pod of `ns` has. A failed read of the pods leaves them
/// unplaced (said in the operator's log; the findings still count).
pub async fn place(ctx: &Context, ns: &str, placements: &mut Placements, accesses: &mut [Access]) {
    let addresses: BTreeSet<String> =
        accesses.iter().filter_map(|a| a.client.address.as_deref()).filter_map(normal).collect();
    if addresses.is_empty() {
        return;
    }
    let live: BTreeSet<String> = match ctx.unfinished_pods(ns).await {
        Ok(pods) => pods.into_iter().filter_map(|p| p.metadata.uid).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "the pods of the namespace could not be read: clients not placed at pods");
            return;
        }
    };
    // A pod the last read did not have may have any address no pod had.
    let new_pods = live.iter().any(|uid| !placements.listed.contains(uid));
    let stale = |a: &str| match placements.by_address.get(a) {
        None => true,
        Some((Some(p), _)) => !live.contains(&p.uid),
        Some((None, at)) => new_pods || at.elapsed() >= UNPLACED_RECHECK,
    };
    let missing: Vec<String> = addresses.iter().filter(|a| stale(a)).cloned().collect();
    if !missing.is_empty() {
        let lp = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        match Api::<Pod>::namespaced(ctx.client.clone(), ns).list(&lp).await {
            Ok(list) => {
                placements.listed = list.items.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                let by_ip = pod_ips(&list.items);
                if placements.by_address.len() + missing.len() > KEPT {
                    placements.by_address.clear();
                }
                for a in missing {
                    let pod = by_ip.get(a.as_str()).filter(|p| p.len() == 1).map(|p| p[0].clone());
                    placements.by_address.insert(a, (pod, Instant::now()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the pods of the namespace could not be read: clients not placed at pods");
            }
        }
    }
    for a in accesses.iter_mut() {
        let placed = a.client.address.as_deref().and_then(normal).and_then(|x| placements.by_address.get(&x));
        let pod = placed
            .and_then(|(p, _)| p.as_ref())
            .filter(|p| live.contains(&p.uid) && p.created.is_none_or(|c| c <= a.at));
        a.client.pod = pod.map(|p| p.name.clone());
        a.client.account = pod.map(|p| p.account.clone());
    }
}

/// Pod IP -> the pods that have it.
fn pod_ips(pods: &[Pod]) -> BTreeMap<&str, Vec<Placed>> {
    let mut by_ip: BTreeMap<&str, Vec<Placed>> = BTreeMap::new();
    for p in pods {
        let (Some(name), Some(uid)) = (&p.metadata.name, &p.metadata.uid) else { continue };
        let Some(s) = &p.status else { continue };
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // A pod that names none runs as the namespace's `default`.
        let account = p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let mut ips: BTreeSet<&str> = s.pod_ips.iter().flatten().map(|i| i.ip.as_str()).collect();
        ips.extend(s.pod_ip.as_deref());
        for ip in ips {
            let placed = Placed { name: name.clone(), uid: uid.clone(), account: account.clone(), created };
            by_ip.entry(ip).or_default().push(placed);
        }
    }
    by_ip
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's IPs (status.podIP and status.podIPs) are its; an IP two pods share is neither's, a pod on the host's
    /// network has none of its own.
    #[test]
    fn pods_are_found_by_their_ips() {
        let pod = |name: &str, ip: &str, more: &[&str]| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "uid": format!("uid-{name}")},
                "spec": {"serviceAccountName": format!("sa-{name}"), "containers": []},
                "status": {"podIP": ip, "podIPs": more.iter().map(|i| serde_json::json!({"ip": i})).collect::<Vec<_>>()},
            }))
            .unwrap()
        };
        let mut host: Pod = pod("host-agent", "192.168.1.6", &[]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let pods = [
            pod("a", "10.0.0.1", &["10.0.0.1", "fd00::1"]),
            pod("b", "10.0.0.2", &[]),
            pod("node-agent", "192.168.1.5", &[]),
            pod("node-agent-2", "192.168.1.5", &[]),
            host,
        ];
        let by_ip = pod_ips(&pods);
        let a = Placed { name: "a".into(), uid: "uid-a".into(), account: "sa-a".into(), created: None };
        assert_eq!(by_ip["fd00::1"], std::slice::from_ref(&a));
        assert_eq!(by_ip["10.0.0.1"], [a]);
        assert_eq!(by_ip["10.0.0.2"][0].name, "b");
        assert_eq!(by_ip["192.168.1.5"].len(), 2);
        assert!(!by_ip.contains_key("192.168.1.6"), "a pod on the host's network has the node's address");
        assert_eq!(normal("::ffff:10.0.0.7").as_deref(), Some("10.0.0.7"));
        assert_eq!(normal("fd00::1").as_deref(), Some("fd00::1"));
        assert_eq!(normal("localhost"), None);
    }
}
