//! Where a statement came from. PostgreSQL's audit entries name the server process (`%p` of the log line prefix),
//! one per session, but not the client: a session's client address comes from the log's own connection lines
//! (`log_connections = on`: `connection received: host=... port=...`; `log_disconnections` ends the session) and from
//! `pg_stat_activity`, sampled with the statistics (`spec.database.statistics`: every session's `client_addr`).
//! MariaDB's audit events carry the client's host themselves. An address is then matched to a pod of the monitor's
//! namespace (its pod IPs) by the controller.

use std::collections::{BTreeSet, HashMap};

use jiff::Timestamp;

use super::access::Access;

/// A connection on the database server's own socket (`[local]` in PostgreSQL's log; no `client_addr`): someone on
/// the database pod itself (`kubectl exec`).
pub const LOCAL: &str = "[local]";
/// Sessions remembered at most; the ones seen longest ago go first.
const KEPT: usize = 4096;

/// Where a statement came from, as far as known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// The session: PostgreSQL's server process, MariaDB's connection id.
    pub session: Option<u64>,
    /// The client's address: an IP, [`LOCAL`], or a host name MariaDB resolved.
    pub address: Option<String>,
    /// The pod of the monitor's namespace that has that address, and the ServiceAccount it runs as.
    pub pod: Option<String>,
    pub account: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    /// The database user, once known (the connection line comes before the login).
    user: Option<String>,
    address: String,
    seen: Timestamp,
}

/// PostgreSQL's sessions: server process -> client address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    by_pid: HashMap<u64, Session>,
}

impl Sessions {
    /// A session began (a new one on a reused process id replaces the old one).
    pub fn connected(&mut self, pid: u64, address: &str, at: Timestamp) {
        self.by_pid.insert(pid, Session { user: None, address: address.into(), seen: at });
        self.trim();
    }

    /// The session's user logged in.
    pub fn authorized(&mut self, pid: u64, user: &str, at: Timestamp) {
        if let Some(s) = self.by_pid.get_mut(&pid) {
            s.user = Some(user.into());
            s.seen = at;
        }
    }

    /// The session ended.
    pub fn disconnected(&mut self, pid: u64) {
        self.by_pid.remove(&pid);
    }

    /// The sessions `pg_stat_activity` lists at `at`: (process, user, address).
    pub fn sampled(&mut self, sessions: &[(u64, String, String)], at: Timestamp) {
        for (pid, user, address) in sessions {
            self.by_pid.insert(*pid, Session { user: Some(user.clone()), address: address.clone(), seen: at });
        }
        self.trim();
    }

    /// The address of `user`'s session `pid`: none when the process is unknown or was another user's (a process id
    /// the system gave again to a session not seen).
    pub fn address(&mut self, pid: u64, user: &str, at: Timestamp) -> Option<String> {
        let s = self.by_pid.get_mut(&pid).filter(|s| s.user.as_deref().is_none_or(|u| u == user))?;
        s.seen = s.seen.max(at);
        Some(s.address.clone())
    }

    /// Gives the accesses whose session's address was not known when they were read the address known now (a
    /// session the sample lists).
    pub fn fill(&mut self, accesses: &mut [Access], at: Timestamp) {
        for a in accesses.iter_mut().filter(|a| a.client.address.is_none()) {
            if let Some(pid) = a.client.session {
                a.client.address = self.address(pid, &a.user, at);
            }
        }
    }

    fn trim(&mut self) {
        if self.by_pid.len() <= KEPT {
            return;
        }
        let mut seen: Vec<(Timestamp, u64)> = self.by_pid.iter().map(|(p, s)| (s.seen, *p)).collect();
        seen.sort();
        for (_, pid) in seen.into_iter().take(self.by_pid.len() - KEPT) {
            self.by_pid.remove(&pid);
        }
    }
}

/// The connection lines of PostgreSQL's log (`log_connections`, `log_disconnections`; src/backend/utils/init and
/// tcop/postgres.c): a session's start with the client's host, its login, its end. Other messages: `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection<'a> {
    Received { host: &'a str },
    Authorized { user: &'a str },
    Ended,
}

impl<'a> Connection<'a> {
    pub fn parse(message: &'a str) -> Option<Connection<'a>> {
        if let Some(rest) = message.strip_prefix("connection received: host=") {
            let host = rest.split_once(' ').map_or(rest, |(h, _)| h).trim_end();
            return Some(Connection::Received { host });
        }
        if let Some(rest) = message.strip_prefix("connection authorized: user=") {
            return Some(Connection::Authorized { user: rest.split_once(' ').map_or(rest, |(u, _)| u).trim_end() });
        }
        message.starts_with("disconnection: ").then_some(Connection::Ended)
    }
}

/// Where a finding's statements came from: the pods, and the addresses no pod of the namespace has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origins {
    pub pods: BTreeSet<String>,
    pub addresses: BTreeSet<String>,
}

impl Origins {
    /// Of `user`'s accesses among `accesses`: those on `object` when there are such, else all of the user's.
    pub fn of(user: &str, object: Option<&str>, accesses: &[Access]) -> Origins {
        let by_user = || accesses.iter().filter(|a| a.user == user);
        let on_object: Vec<&Access> = by_user().filter(|a| object.is_some() && a.object.as_deref() == object).collect();
        let chosen: Vec<&Access> = if on_object.is_empty() { by_user().collect() } else { on_object };
        let mut o = Origins::default();
        for c in chosen.iter().map(|a| &a.client) {
            match (&c.pod, &c.address) {
                (Some(p), _) => o.pods.insert(p.clone()),
                (None, Some(a)) => o.addresses.insert(a.clone()),
                (None, None) => false,
            };
        }
        o
    }

    /// `from pod(s) a, b and address(es) x`, or nothing when nothing is known.
    pub fn describe(&self) -> Option<String> {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        let parts: Vec<String> = [("pod(s)", &self.pods), ("address(es) of no pod", &self.addresses)]
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(what, s)| format!("{what} {}", list(s)))
            .collect();
        (!parts.is_empty()).then(|| format!("from {}", parts.join(" and ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_796_000_000 + s).unwrap()
    }

    /// As PostgreSQL 15 writes them (`log_connections`, `log_disconnections`).
    #[test]
    fn connection_lines_are_read() {
        let host = |m| match Connection::parse(m) {
            Some(Connection::Received { host }) => Some(host),
            _ => None,
        };
        assert_eq!(host("connection received: host=10.244.1.7 port=51234"), Some("10.244.1.7"));
        assert_eq!(host("connection received: host=[local]"), Some(LOCAL));
        assert!(matches!(
            Connection::parse("connection authorized: user=v-sales-1 database=crm application_name=psql"),
            Some(Connection::Authorized { user: "v-sales-1" })
        ));
        assert!(matches!(
            Connection::parse(
                "disconnection: session time: 0:00:00.012 user=v-sales-1 database=crm host=10.244.1.7 port=51234"
            ),
            Some(Connection::Ended)
        ));
        assert!(Connection::parse("checkpoint starting: time").is_none());
    }

    /// A session's address is its user's only: a process id the system gave again (to a session not seen) is not
    /// taken for the old one's; the sample replaces what the log said; an ended session is forgotten.
    #[test]
    fn a_sessions_address_is_its_users() {
        let mut s = Sessions::default();
        s.connected(41, "10.0.0.7", t(0));
        // Before the login line: any user (the entries of the session follow its login).
        assert_eq!(s.address(41, "v-sales-1", t(1)).as_deref(), Some("10.0.0.7"));
        s.authorized(41, "v-sales-1", t(1));
        assert_eq!(s.address(41, "v-sales-1", t(2)).as_deref(), Some("10.0.0.7"));
        assert_eq!(s.address(41, "mallory", t(2)), None);
        assert_eq!(s.address(42, "v-sales-1", t(2)), None);
        s.sampled(&[(41, "mallory".into(), "10.0.0.9".into()), (43, "v-sales-1".into(), "10.0.0.8".into())], t(3));
        assert_eq!(s.address(41, "mallory", t(4)).as_deref(), Some("10.0.0.9"));
        assert_eq!(s.address(43, "v-sales-1", t(4)).as_deref(), Some("10.0.0.8"));
        s.disconnected(43);
        assert_eq!(s.address(43, "v-sales-1", t(5)), None);
    }

    /// A finding's origins are the accesses of its user on its object (all of the user's when none is on it).
    #[test]
    fn a_findings_origins_are_its_users_clients() {
        let a = |user: &str, object: Option<&str>, address: Option<&str>, pod: Option<&str>| Access {
            at: t(0),
            user: user.into(),
            kind: super::super::access::Kind::Read,
            command: "SELECT".into(),
            object: object.map(Into::into),
            client: Client {
                session: Some(1),
                address: address.map(Into::into),
                pod: pod.map(Into::into),
                account: None,
            },
        };
        let accesses = [
            a("v-sales-1", Some("crm.invoices"), Some("10.0.0.9"), Some("intruder-0")),
            a("v-sales-1", Some("crm.invoices"), Some("192.0.2.1"), None),
            a("v-sales-1", Some("crm.contacts"), Some("10.0.0.7"), Some("sales-app-0")),
            a("v-sales-1", Some("crm.invoices"), None, None),
            a("mallory", Some("crm.invoices"), Some("10.0.0.8"), Some("other-0")),
        ];
        let o = Origins::of("v-sales-1", Some("crm.invoices"), &accesses);
        assert_eq!(o.pods, BTreeSet::from(["intruder-0".to_string()]));
        assert_eq!(o.addresses, BTreeSet::from(["192.0.2.1".to_string()]));
        assert_eq!(o.describe().as_deref(), Some("from pod(s) intruder-0 and address(es) of no pod 192.0.2.1"));
        let all = Origins::of("v-sales-1", Some("crm.payroll"), &accesses);
        assert_eq!(all.pods.len(), 2);
        assert_eq!(Origins::of("nobody", None, &accesses).describe(), None);
    }

    /// Bounded: the sessions seen longest ago are forgotten first.
    #[test]
    fn sessions_are_bounded() {
        let mut s = Sessions::default();
        for pid in 0..(KEPT as u64 + 10) {
            s.connected(pid, "10.0.0.1", t(pid as i64));
        }
        assert_eq!(s.by_pid.len(), KEPT);
        assert_eq!(s.address(9, "x", t(0)), None);
        assert!(s.address(10, "x", t(0)).is_some());
    }
}
