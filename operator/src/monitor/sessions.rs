//! Where a statement came from. PostgreSQL's audit entries name the server process (`%p` of the log line prefix),
//! one per session, but not the client: a session's client address comes from the log's own connection lines
//! (`log_connections = on`: `connection received: host=... port=...`, then `connection authorized: user=...`) and
//! from `pg_stat_activity`, sampled with the statistics (`spec.database.statistics`: every session's `client_addr`
//! and `backend_start`). MariaDB's audit events carry the client's host themselves. An address is then matched to a
//! pod of the monitor's namespace (its pod IPs) by the controller.
//!
//! A session's own statements cannot forge its origin: any session can write a log line of its choosing (`RAISE LOG`
//! in a `DO` block), but behind its own prefix (its process, its user): a `connection received` line is taken only
//! behind the prefix PostgreSQL writes before the login (`[unknown]@[unknown]`), a login only for a session that has
//! none yet and by the prefix's own user, the host only when it is an address; `disconnection` lines are not read (a
//! session's process id given again is a new `connection received`, or a new `backend_start` in the sample).

use std::collections::{BTreeSet, HashMap};

use jiff::Timestamp;

use super::access::{Access, Kind};

/// A connection on the database server's own socket (`[local]` in PostgreSQL's log; no `client_addr`): someone on
/// the database pod itself (`kubectl exec`).
pub const LOCAL: &str = "[local]";
/// What PostgreSQL writes for `%u` and `%d` before the login.
pub const UNKNOWN: &str = "[unknown]";
/// Sessions remembered at most; the ones seen longest ago go first.
const KEPT: usize = 4096;

/// Where a statement came from, as far as known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// The session: PostgreSQL's server process, MariaDB's connection id.
    pub session: Option<u64>,
    /// The client's address: an IP, [`LOCAL`], or the host MariaDB names (`localhost` for its socket, a host name
    /// when it resolves names).
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
    /// When it began: its statements are not before.
    since: Timestamp,
    /// Known from a sample (it ended when the next sample no longer lists it), not from the log.
    sampled: bool,
    seen: Timestamp,
}

/// PostgreSQL's sessions: server process -> client address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    by_pid: HashMap<u64, Session>,
}

/// A session listed by `pg_stat_activity`: process, user, address, `backend_start`.
pub type Sampled = (u64, String, String, Timestamp);

impl Sessions {
    /// A session began at `at` (a new one on a reused process id replaces the old one).
    pub fn connected(&mut self, pid: u64, address: &str, at: Timestamp) {
        let s = Session { user: None, address: address.into(), since: at, sampled: false, seen: at };
        self.by_pid.insert(pid, s);
        self.trim();
    }

    /// The session's user logged in (once: a later line of the session's own making is not a login).
    pub fn authorized(&mut self, pid: u64, user: &str, at: Timestamp) {
        if let Some(s) = self.by_pid.get_mut(&pid).filter(|s| s.user.is_none()) {
            s.user = Some(user.into());
            s.seen = at;
        }
    }

    /// The sessions `pg_stat_activity` lists at `at`. Sessions known from an earlier sample that it no longer lists
    /// have ended (their statements up to the sample were read before it).
    pub fn sampled(&mut self, sessions: &[Sampled], at: Timestamp) {
        let listed: BTreeSet<u64> = sessions.iter().map(|s| s.0).collect();
        self.by_pid.retain(|pid, s| !s.sampled || listed.contains(pid));
        for (pid, user, address, since) in sessions {
            let same = self.by_pid.get(pid).is_some_and(|s| s.since == *since && s.user.as_deref() == Some(user));
            if !same && valid_address(address) {
                let s = Session {
                    user: Some(user.clone()),
                    address: address.clone(),
                    since: *since,
                    sampled: true,
                    seen: at,
                };
                self.by_pid.insert(*pid, s);
            }
        }
        self.trim();
    }

    /// The address of `user`'s session `pid` at `at`: none when the process is unknown, was another user's, or its
    /// session began after `at` (a process id the system gave again).
    pub fn address(&mut self, pid: u64, user: &str, at: Timestamp) -> Option<String> {
        let s = self.by_pid.get_mut(&pid).filter(|s| s.user.as_deref().is_none_or(|u| u == user) && s.since <= at)?;
        s.seen = s.seen.max(at);
        Some(s.address.clone())
    }

    /// Gives the accesses whose session's address was not known when they were read the address known now (a
    /// session the sample lists).
    pub fn fill(&mut self, accesses: &mut [Access]) {
        for a in accesses.iter_mut().filter(|a| a.client.address.is_none()) {
            if let Some(pid) = a.client.session {
                a.client.address = self.address(pid, &a.user, a.at);
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

/// Whether `host` is a client address as PostgreSQL writes one: an IP or [`LOCAL`] (`log_hostname` off).
fn valid_address(host: &str) -> bool {
    host == LOCAL || host.parse::<std::net::IpAddr>().is_ok()
}

/// The connection lines of PostgreSQL's log (`log_connections`; src/backend/tcop/backend_startup.c and
/// utils/init/postinit.c): a session's start with the client's address, its login. Other messages: `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection<'a> {
    Received { host: &'a str },
    Authorized { user: &'a str },
}

impl<'a> Connection<'a> {
    pub fn parse(message: &'a str) -> Option<Connection<'a>> {
        if let Some(rest) = message.strip_prefix("connection received: host=") {
            let host = rest.split_once(' ').map_or(rest, |(h, _)| h).trim_end();
            return valid_address(host).then_some(Connection::Received { host });
        }
        let rest = message.strip_prefix("connection authorized: user=")?;
        Some(Connection::Authorized { user: rest.split_once(' ').map_or(rest, |(u, _)| u).trim_end() })
    }
}

/// Where a finding's statements came from: the pods, and the addresses no pod of the namespace has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origins {
    pub pods: BTreeSet<String>,
    pub addresses: BTreeSet<String>,
}

impl Origins {
    /// Adds where `c` came from (nothing when that is not known).
    pub fn add(&mut self, c: &Client) {
        match (&c.pod, &c.address) {
            (Some(p), _) => self.pods.insert(p.clone()),
            (None, Some(a)) => self.addresses.insert(a.clone()),
            (None, None) => false,
        };
    }

    /// Of `user`'s reads of `table` among `accesses` (the volumes the statistics and the baseline count).
    pub fn of_reads(user: &str, table: &str, accesses: &[Access]) -> Origins {
        let mut o = Origins::default();
        let reads = accesses.iter().filter(|a| a.user == user && a.kind == Kind::Read);
        for a in reads.filter(|a| a.object.as_deref() == Some(table)) {
            o.add(&a.client);
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

    /// As PostgreSQL 15 writes them (`log_connections`); a host that is no address (a forged line's) is none.
    #[test]
    fn connection_lines_are_read() {
        let host = |m| match Connection::parse(m) {
            Some(Connection::Received { host }) => Some(host),
            _ => None,
        };
        assert_eq!(host("connection received: host=10.244.1.7 port=51234"), Some("10.244.1.7"));
        assert_eq!(host("connection received: host=fd00::7 port=51234"), Some("fd00::7"));
        assert_eq!(host("connection received: host=[local]"), Some(LOCAL));
        assert_eq!(host(&format!("connection received: host={} port=1", "x".repeat(10_000))), None);
        assert!(matches!(
            Connection::parse("connection authorized: user=v-sales-1 database=crm application_name=psql"),
            Some(Connection::Authorized { user: "v-sales-1" })
        ));
        let ended = "disconnection: session time: 0:00:00.012 user=v-sales-1 database=crm host=10.244.1.7 port=51234";
        assert!(Connection::parse(ended).is_none(), "disconnections are not read");
        assert!(Connection::parse("checkpoint starting: time").is_none());
    }

    /// A session's address is its user's, from its start: a process id the system gave again (to a session not
    /// seen) is not taken for the old one's; a second login line (the session's own making) changes nothing; the
    /// sample places sessions the log did not show beginning, from their backend_start, and forgets those it no
    /// longer lists.
    #[test]
    fn a_sessions_address_is_its_users_from_its_start() {
        let mut s = Sessions::default();
        s.connected(41, "10.0.0.7", t(0));
        // Before the login line: any user (the entries of the session follow its login).
        assert_eq!(s.address(41, "v-sales-1", t(1)).as_deref(), Some("10.0.0.7"));
        s.authorized(41, "v-sales-1", t(1));
        s.authorized(41, "mallory", t(2));
        assert_eq!(s.address(41, "v-sales-1", t(2)).as_deref(), Some("10.0.0.7"));
        assert_eq!(s.address(41, "mallory", t(2)), None);
        assert_eq!(s.address(41, "v-sales-1", t(-1)), None, "before the session began");
        assert_eq!(s.address(42, "v-sales-1", t(2)), None);
        let sampled = |pid, user: &str, address: &str, since| (pid, user.to_string(), address.to_string(), t(since));
        s.sampled(&[sampled(41, "mallory", "10.0.0.9", 3), sampled(43, "v-sales-1", "10.0.0.8", -10)], t(4));
        assert_eq!(s.address(41, "mallory", t(4)).as_deref(), Some("10.0.0.9"));
        assert_eq!(s.address(41, "v-sales-1", t(2)), None, "the process's earlier session is not the sampled one");
        assert_eq!(s.address(43, "v-sales-1", t(-5)).as_deref(), Some("10.0.0.8"));
        // Ended by the next sample; a session from the log stays until its process id begins another.
        s.sampled(&[], t(5));
        assert_eq!(s.address(43, "v-sales-1", t(5)), None);
        s.connected(44, "10.0.0.5", t(5));
        s.sampled(&[], t(6));
        assert_eq!(s.address(44, "v-sales-1", t(6)).as_deref(), Some("10.0.0.5"));
    }

    /// A volume's origins are the user's reads of its table.
    #[test]
    fn a_volumes_origins_are_the_users_reads_of_the_table() {
        let a = |user: &str, kind, object: Option<&str>, address: Option<&str>, pod: Option<&str>| Access {
            at: t(0),
            user: user.into(),
            kind,
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
            a("v-sales-1", Kind::Read, Some("crm.invoices"), Some("10.0.0.9"), Some("intruder-0")),
            a("v-sales-1", Kind::Read, Some("crm.invoices"), Some("192.0.2.1"), None),
            a("v-sales-1", Kind::Read, Some("crm.contacts"), Some("10.0.0.7"), Some("sales-app-0")),
            a("v-sales-1", Kind::Write, Some("crm.invoices"), Some("10.0.0.6"), Some("writer-0")),
            a("v-sales-1", Kind::Read, Some("crm.invoices"), None, None),
            a("mallory", Kind::Read, Some("crm.invoices"), Some("10.0.0.8"), Some("other-0")),
        ];
        let o = Origins::of_reads("v-sales-1", "crm.invoices", &accesses);
        assert_eq!(o.pods, BTreeSet::from(["intruder-0".to_string()]));
        assert_eq!(o.addresses, BTreeSet::from(["192.0.2.1".to_string()]));
        assert_eq!(o.describe().as_deref(), Some("from pod(s) intruder-0 and address(es) of no pod 192.0.2.1"));
        assert_eq!(Origins::of_reads("v-sales-1", "crm.payroll", &accesses).describe(), None);
    }

    /// Bounded: the sessions seen longest ago are forgotten first.
    #[test]
    fn sessions_are_bounded() {
        let mut s = Sessions::default();
        for pid in 0..(KEPT as u64 + 10) {
            s.connected(pid, "10.0.0.1", t(pid as i64));
        }
        assert_eq!(s.by_pid.len(), KEPT);
        assert_eq!(s.address(9, "x", t(100_000)), None);
        assert!(s.address(10, "x", t(100_000)).is_some());
    }
}
