//! AccessMonitor: validate -> the database pod -> its log since the last line read (`pods/log`, `timestamps=true`)
//! -> accesses attributed -> access records in the audit trail, rules checked -> findings in status, Events and the
//! audit trail. Requeued at the spec's interval.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, LogParams};

use super::{clients, notify, respond, statistics, validate};
use crate::api::access_monitor::conditions::{Clean, Collecting, RowsCounted, Settled};
use crate::api::access_monitor::{AccessMonitorEvent, AccessMonitorStatus, Finding, KnownIdentity, MonitoredEngine};
use crate::api::condition::Status;
use crate::api::{AccessMonitor, AccessPolicy};
use crate::controllers::access_policy::lease::{PREVIOUS_USERNAME, USERNAME};
use crate::controllers::contract::{Cond, Context, Desired, Error, Note, Reconcilable, Watch};
use crate::monitor::access::{self, Access};
use crate::monitor::attribution::{Identities, TeamUsers, keep_revoked, mask_unknown_logins};
use crate::monitor::baseline::{self, Baseline};
use crate::monitor::rules::{self, Found, Minute};
use crate::netpol::selector_matches;
use crate::validation::FieldError;

/// The most a read of the log takes (the rest is read right after).
pub const READ_LIMIT: i64 = 4 << 20;
/// Findings kept in status.
pub const FINDINGS_KEPT: usize = 20;
/// The one "table" the statistics role is expected to touch.
const STATISTICS_VIEW: &str = "public.pg_stat_statements";

/// What the controller keeps of a monitor between reads (in this process).
#[derive(Clone, Debug, Default)]
struct State {
    minute: Minute,
    identities: Identities,
    /// The inputs `identities` was built from (the policies' and the monitor's versions).
    identities_of: u64,
    /// Users not known when `identities` was built from those inputs.
    looked_up: BTreeSet<String>,
    /// The alerts and report sent.
    sent: notify::Sent,
    /// The learned volumes (`rules.baseline`), once loaded from the monitor's ConfigMap.
    baseline: Option<Baseline>,
    /// The connection to the database's statistics, their last counters, what the statements read, and the rows
    /// read this minute.
    db: Option<statistics::Db>,
    /// The monitoring role's name (the Secret's `username`), kept while the connection is down.
    statistics_user: Option<String>,
    /// When the counters were sampled last: a longer gap than the interval allows is not compared across.
    sampled_at: Option<Timestamp>,
    counters: crate::monitor::statistics::Counters,
    /// MariaDB's counters, and the tables each user read by the audit log lately (table -> user -> last read).
    summaries: crate::monitor::statistics::Summaries,
    unplaced: crate::monitor::statistics::Unplaced,
    readers: BTreeMap<String, BTreeMap<String, Timestamp>>,
    /// The last pass's outcome, its trigger and when the next pass is due: see [`Paced`].
    paced: Option<Paced>,
    statements: statistics::Statements,
    rows: crate::monitor::statistics::RowMinute,
    /// PostgreSQL's sessions and their clients, and the pods client addresses were placed at.
    sessions: crate::monitor::sessions::Sessions,
    placements: clients::Placements,
}

/// A pass reads the log (and the statistics) at the spec's interval, not at every change of the monitor: its own
/// status write is a change, and a pass that finds new lines writes status, so a database that logs faster than the
/// interval (or the monitoring role's own sampling, which pgaudit logs) would have the monitor read without pause.
/// Within the interval a reconcile gives the last pass's outcome again (without its Events); a change of the spec
/// or of the acknowledgement annotation passes at once.
#[derive(Clone, Debug)]
struct Paced {
    next: std::time::Instant,
    trigger: u64,
    outcome: Desired<AccessMonitorStatus>,
}

impl Paced {
    fn of(m: &AccessMonitor) -> u64 {
        let ack = m.metadata.annotations.as_ref().and_then(|a| a.get(respond::ACKNOWLEDGE)).cloned();
        crate::k8s::cache::digest_of(&[
            &m.metadata.generation.unwrap_or_default().to_string(),
            ack.as_deref().unwrap_or_default(),
        ])
    }

    /// Remembers `d` as the outcome of a pass of `m`.
    fn set(state: &mut State, m: &AccessMonitor, d: &Desired<AccessMonitorStatus>) {
        let after = d.requeue_after.unwrap_or(Duration::from_secs(5));
        let outcome = Desired { events: vec![], audit: vec![], patches: vec![], ..d.clone() };
        state.paced = Some(Paced { next: std::time::Instant::now() + after, trigger: Paced::of(m), outcome });
    }
}

impl Reconcilable for AccessMonitor {
    const CONTROLLER: &'static str = "accessmonitor";
    type Status = AccessMonitorStatus;
    /// A database pod that comes or goes (or is relabelled) is read at the next pass (within the interval).
    const WATCHES: &'static [Watch] = &[Watch::Pods];

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let ns = v.owner.namespace.clone();
        let uid = v.owner.uid.clone();
        let mut state: State = ctx.cache.last_memo(Self::CONTROLLER, &uid).unwrap_or_default();
        if let Some(p) = &state.paced
            && p.trigger == Paced::of(self)
            && let Some(left) = p.next.checked_duration_since(std::time::Instant::now())
        {
            return Ok(Ok(Desired { requeue_after: Some(left), ..p.outcome.clone() }));
        }
        let before = self.status.clone().unwrap_or_default();
        let mut d = Desired::<Self::Status> { requeue_after: Some(v.interval), ..Desired::default() };
        match &v.rules.baseline {
            Some(s) if state.baseline.is_none() => {
                state.baseline = Some(load_baseline(ctx, self, &ns, &uid, s, (ctx.now)()).await?);
            }
            Some(_) => {}
            None => state.baseline = None,
        }
        d.status = AccessMonitorStatus { observed_generation: None, conditions: vec![], ..before.clone() };
        let Some(pod) = database_pod(ctx, self, &ns).await? else {
            d.conditions.push(Cond::new(
                Collecting::PodNotFound,
                Status::False,
                "no pod of this namespace that has not finished matches spec.database.podSelector: check it against \
                 the database pod's labels (kubectl get pods --show-labels)",
            ));
            settle(ctx, self, &v, &mut state, &mut d).await?;
            Paced::set(&mut state, self, &d);
            ctx.cache.remember(Self::CONTROLLER, &uid, 0, state);
            return Ok(Ok(d));
        };
        // Resume after the last line read, as the status records it: a pass whose status write failed is read
        // again (its findings and incidents are not lost); the first read starts when the monitor was created.
        let after = before.read_until.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
        let created = self.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(ctx.now);
        let since = after.unwrap_or(created);
        // A container that restarted since the last read left the lines after it in the previous container's log
        // (the kubelet keeps one): that log is read first, to its end, then the current one.
        let (uid_now, restarts) = container_restarts(ctx, &ns, &pod, self.spec.database.container.as_deref()).await?;
        // The pod's UID as recorded: the one read now, or, when the pod could not be read (gone from the server while
        // the watch still shows it), the one recorded before for a pod of this name (an unknown UID must not make the
        // next pod of the name look like the same log).
        let uid_recorded =
            uid_now.clone().or_else(|| before.pod_uid.clone().filter(|_| before.pod.as_deref() == Some(pod.as_str())));
        // Another pod than the one read before (by name, or by UID: a StatefulSet's pod re-created under its name) is
        // another log: what the one before wrote after readUntil is not read.
        let replaced = match (&before.pod, &before.pod_uid) {
            (Some(p), _) if *p != pod => Some(format!("the monitor now reads pod {pod} instead of pod {p}")),
            (Some(_), Some(u)) if uid_now.as_ref().is_some_and(|n| n != u) => {
                Some(format!("pod {pod} was replaced by a new pod of the same name"))
            }
            _ => None,
        };
        if let Some(what) = &replaced {
            if let Some(b) = state.baseline.as_mut() {
                b.interrupted();
            }
            // Another server: its process ids are not the old one's sessions.
            state.sessions = Default::default();
            d.events.push(Note::warning(
                AccessMonitorEvent::LinesSkipped,
                format!(
                    "{what}: lines the pod read before wrote after {since} were not read (its log is not read again)"
                ),
            ));
        }
        let restarted = match (replaced.is_none(), before.restart_count, restarts) {
            (true, Some(was), Some(now)) if now > was => Some((was, now)),
            _ => None,
        };
        let params = LogParams {
            container: self.spec.database.container.clone(),
            timestamps: true,
            // The API takes whole seconds: lines of that second already read are skipped below.
            since_time: Some(Timestamp::from_second(since.as_second()).unwrap_or(since)),
            limit_bytes: Some(READ_LIMIT),
            previous: restarted.is_some(),
            ..LogParams::default()
        };
        let mut gone = None;
        let log = match read_log(ctx, &ns, &pod, &params).await {
            Ok(log) => log,
            Err(kube::Error::Api(s)) if s.code == 400 && restarted.is_some() => {
                // The previous container's log is gone (another restart since, or the kubelet removed it).
                gone = Some(s.message);
                String::new()
            }
            Err(kube::Error::Api(s)) if s.code < 500 => {
                let reason = if s.message.contains("container") && s.message.contains("not valid") {
                    Collecting::ContainerNotFound
                } else {
                    Collecting::LogUnreadable
                };
                d.status.pod = Some(pod.clone());
                d.status.pod_uid = uid_recorded;
                if replaced.is_some() {
                    // Another pod's container: its restarts are counted from its own.
                    d.status.restart_count = restarts;
                }
                d.conditions.push(Cond::new(
                    reason,
                    Status::False,
                    format!("the log of pod {pod} could not be read: {} (HTTP {})", s.message, s.code),
                ));
                settle(ctx, self, &v, &mut state, &mut d).await?;
                Paced::set(&mut state, self, &d);
                ctx.cache.remember(Self::CONTROLLER, &uid, 0, state);
                return Ok(Ok(d));
            }
            Err(e) => return Err(e.into()),
        };
        // A read cut at the limit may end inside a line: that line is read again next time, right away.
        let cut = log.len() as i64 >= READ_LIMIT;
        let whole = if cut { log.rsplit_once('\n').map_or("", |(w, _)| w) } else { log.as_str() };
        let new = |t: &Timestamp| match after {
            Some(a) => *t > a,
            None => *t >= created,
        };
        let lines: Vec<(Timestamp, &str)> = access::timed(whole).into_iter().filter(|(t, _)| new(t)).collect();
        // A cut read that brings no new whole line would bring the same again: a line longer than the limit, or
        // more than the limit within the second the API resumes at. What cannot be read is skipped, and said.
        let mut skipped = None;
        if cut && lines.is_empty() {
            let first_new = access::timed(&log).into_iter().map(|(t, _)| t).find(|t| new(t));
            let past = first_new.unwrap_or_else(|| {
                let s = since.as_second() + 1;
                Timestamp::from_second(s)
                    .unwrap_or(since)
                    .checked_sub(jiff::SignedDuration::from_nanos(1))
                    .unwrap_or(since)
            });
            skipped = Some(past);
        }
        let mut accesses = match self.spec.database.engine {
            MonitoredEngine::Postgres => access::postgres(&lines, &mut state.sessions),
            MonitoredEngine::Mysql => access::mariadb(&lines),
        };
        let now = (ctx.now)();
        // Sampled before the identities are built: the monitoring role it logs in as is one of them.
        let sampled = match &self.spec.database.statistics {
            Some(s) => Some(
                statistics::sample(
                    ctx,
                    &ns,
                    self.spec.database.engine,
                    s,
                    &mut state.db,
                    &mut state.statistics_user,
                    &mut state.statements,
                )
                .await,
            ),
            None => None,
        };
        // The sessions the sample lists place the statements of sessions the log did not show beginning.
        if let Some(Ok(sample)) = &sampled {
            state.sessions.sampled(&sample.sessions, now);
            state.sessions.fill(&mut accesses);
        }
        clients::place(ctx, &ns, &mut state.placements, &mut accesses).await;
        state.identities = identities(ctx, self, &ns, &mut state, &accesses, now).await?;
        d.status.revoked_users = keep_revoked(&before.revoked_users, &mut state.identities, now);
        mask_unknown_logins(&mut accesses, &state.identities);
        let mut found = rules::check(&v.rules, &state.identities, &accesses, &mut state.minute);
        if let (Some(settings), Some(b)) = (&v.rules.baseline, state.baseline.as_mut()) {
            found = rules::with_baseline(found, b, settings, &state.identities, &accesses);
            // The log is read up to now: an hour that ended a minute ago (lines come late) without a line is a
            // quiet hour.
            if !cut {
                b.advance((now.as_second() - 60).div_euclid(3600), settings.weeks);
            }
        }
        if let (Some(s), Some(sampled)) = (&self.spec.database.statistics, sampled) {
            found.extend(rows_read(s, sampled, &v, &accesses, &mut state, &mut d, now));
        }
        rules::volume_origins(&mut found, &accesses);
        // The response first: a read that fails there is made again, from the same position (its actions are
        // idempotent), and only a pass that gets through records its accesses, so nothing is recorded twice.
        let response = self.spec.response.as_ref();
        let o = respond::respond(ctx, self, response, &found, &state.identities, &mut d.status.incidents).await?;
        d.events.extend(o.events);
        record(ctx, self, &ns, &state.identities, &accesses, &found);
        if let Some(t) = lines.last().map(|(t, _)| *t).or(skipped) {
            d.status.read_until = Some(t.to_string());
        }
        match restarted {
            // The previous container's log read to its end: the current one's next, at once.
            Some((was, now)) if !cut => {
                d.status.restart_count = Some(now);
                // The new container's server numbers its sessions anew.
                state.sessions = Default::default();
                d.requeue_after = Some(Duration::from_millis(200));
                let lost = now - was - 1;
                if lost > 0 || gone.is_some() {
                    if let Some(b) = state.baseline.as_mut() {
                        b.interrupted();
                    }
                    let what = match &gone {
                        Some(why) => format!("the previous container's log could not be read ({why})"),
                        None => format!("the logs of {lost} container(s) between are gone (the kubelet keeps one)"),
                    };
                    d.events.push(Note::warning(
                        AccessMonitorEvent::LinesSkipped,
                        format!(
                            "container of pod {pod} restarted {} time(s) since the log was read up to {since}: {what}",
                            now - was
                        ),
                    ));
                }
            }
            // More of the previous container's log to read.
            Some(_) => {}
            None => d.status.restart_count = restarts,
        }
        if let Some(t) = skipped {
            d.events.push(Note::warning(
                AccessMonitorEvent::LinesSkipped,
                format!(
                    "the log of pod {pod} could not be read past {since}: a line, or the lines of one second, exceed {} \
                     MiB; skipped up to {t}",
                    READ_LIMIT >> 20
                ),
            ));
        }
        d.status.pod = Some(pod.clone());
        d.status.pod_uid = uid_recorded;
        d.status.entries = Some(before.entries.unwrap_or(0) + accesses.len() as i64);
        if !found.is_empty() {
            d.status.finding_count = Some(before.finding_count.unwrap_or(0) + found.len() as i64);
            let mut findings: Vec<Finding> = found.iter().rev().map(finding).collect();
            findings.extend(before.findings.iter().cloned());
            findings.truncate(FINDINGS_KEPT);
            d.status.findings = findings;
        }
        for f in &found {
            let from = f.origins.describe().map(|o| format!(" ({o})")).unwrap_or_default();
            d.events
                .push(Note::warning(AccessMonitorEvent::AccessFinding, format!("{:?}: {}{from}", f.rule, f.message)));
        }
        let container = self.spec.database.container.as_deref().map(|c| format!(", container {c}")).unwrap_or_default();
        d.conditions.push(Cond::new(
            Collecting::Reading,
            Status::True,
            format!("reading the log of pod {pod}{container} every {}", self.spec.interval),
        ));
        summary(self, &mut d);
        notified(ctx, self, &v, &found, &mut state, &mut d).await;
        if cut {
            d.requeue_after = Some(Duration::from_millis(200));
        }
        Paced::set(&mut state, self, &d);
        ctx.cache.remember(Self::CONTROLLER, &uid, 0, state);
        Ok(Ok(d))
    }
}

/// A sample of the database's statistics: `rules.rowVolume` checked against the rows read since the previous one,
/// and `RowsCounted` said. A failed sample is no error of the pass (the log's findings still count): the condition
/// says why. The counters are compared only with the previous sample of the same connection taken within two
/// intervals (and 10 s): rows read over a longer gap (a failed sample, passes without a pod, an operator restart)
/// or on another server (a failover) are not counted, rather than counted into one minute.
fn rows_read(
    s: &crate::api::access_monitor::DatabaseStatistics,
    sampled: Result<statistics::Sample, statistics::Failed>,
    v: &validate::ValidatedAccessMonitor,
    accesses: &[Access],
    state: &mut State,
    d: &mut Desired<AccessMonitorStatus>,
    now: Timestamp,
) -> Vec<Found> {
    use crate::monitor::statistics as stats;
    let gap = jiff::SignedDuration::try_from(v.interval * 2).unwrap_or_default() + jiff::SignedDuration::from_secs(10);
    let recent = state.sampled_at.is_some_and(|t| now.duration_since(t) <= gap);
    // MariaDB: who read which table lately, by the audit log (a statement's entry and its rows can fall on either
    // side of a sample); PostgreSQL counts per user and statement and needs none.
    if v.engine == MonitoredEngine::Mysql {
        for a in accesses.iter().filter(|a| a.kind == access::Kind::Read) {
            if let Some(table) = &a.object {
                state.readers.entry(table.clone()).or_default().insert(a.user.clone(), a.at);
            }
        }
        // Kept an hour: a statement's rows are counted when it ends, which can be long after its READ entry.
        let kept = jiff::SignedDuration::from_hours(1);
        for users in state.readers.values_mut() {
            users.retain(|_, at| now.duration_since(*at) <= kept);
        }
        state.readers.retain(|_, users| !users.is_empty());
    }
    match sampled {
        Ok(sample) => {
            if sample.fresh || !recent {
                state.counters = stats::Counters::default();
                state.summaries = stats::Summaries::default();
                state.unplaced = stats::Unplaced::default();
            }
            state.sampled_at = Some(now);
            let (source, read, counted_by) = match sample.counts {
                statistics::Counts::Postgres(counted) => {
                    let deltas = state.counters.deltas(&counted);
                    let read = stats::rows_read(&deltas, &state.statements.postgres);
                    (stats::Source::PgStatStatements, read, "pg_stat_statements is sampled")
                }
                statistics::Counts::Mariadb { digests, users } => {
                    let deltas = state.summaries.deltas(&digests, &users);
                    let recent = now.checked_sub(gap).unwrap_or(now);
                    let read = stats::rows_read_bounded(
                        &deltas,
                        &state.statements.mariadb,
                        &state.readers,
                        recent,
                        &mut state.unplaced,
                    );
                    (
                        stats::Source::PerformanceSchema,
                        read,
                        "performance_schema's summaries by digest and user are sampled",
                    )
                }
            };
            d.conditions.push(Cond::new(
                RowsCounted::Sampling,
                Status::True,
                format!("{counted_by} at every read (spec.interval) through Secret {}", s.secret_name),
            ));
            stats::check(source, &v.rules.row_volume, &state.identities, &read, now, &mut state.rows)
        }
        Err(failed) => {
            state.counters = stats::Counters::default();
            state.summaries = stats::Summaries::default();
            state.unplaced = stats::Unplaced::default();
            let (reason, message) = match failed {
                statistics::Failed::Secret(m) => (RowsCounted::SecretUnusable, m),
                statistics::Failed::Connect(m) => (
                    RowsCounted::DatabaseUnreachable,
                    format!("the database of Secret {} could not be reached: {m}", s.secret_name),
                ),
                statistics::Failed::Timeout(m) => (
                    RowsCounted::DatabaseUnreachable,
                    format!("the database of Secret {} did not answer: {m}; connecting again", s.secret_name),
                ),
                statistics::Failed::Query(m) => (RowsCounted::StatisticsUnreadable, m),
            };
            tracing::warn!(%message, "the database's statistics could not be sampled");
            d.conditions.push(Cond::new(reason, Status::False, message));
            vec![]
        }
    }
}

/// The learned baseline as it was saved in the monitor's ConfigMap, or a new one (none saved, not this monitor's,
/// unreadable, or out of its window: said in the log).
async fn load_baseline(
    ctx: &Context,
    m: &AccessMonitor,
    ns: &str,
    uid: &str,
    settings: &baseline::Settings,
    now: Timestamp,
) -> Result<Baseline, Error> {
    let name = notify::baseline_name(m);
    let Some(cm) = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns).get_opt(&name).await? else {
        return Ok(Baseline::default());
    };
    let ours = cm.metadata.owner_references.iter().flatten().any(|r| r.uid == uid && r.controller == Some(true));
    let Some(saved) = cm.data.as_ref().and_then(|d| d.get(notify::BASELINE_KEY)).filter(|_| ours) else {
        return Ok(Baseline::default());
    };
    match Baseline::load(saved, now.as_second().div_euclid(3600), settings.weeks) {
        Ok(b) => Ok(b),
        Err(e) => {
            tracing::warn!(configmap = %name, error = %e, "the saved baseline is not used; learning starts again");
            Ok(Baseline::default())
        }
    }
}

/// Alerts, the report and the baseline's ConfigMap; while an incident is open and alerted, passes come at least
/// as often as its alert is sent again.
async fn notified(
    ctx: &Context,
    m: &AccessMonitor,
    v: &validate::ValidatedAccessMonitor,
    found: &[Found],
    state: &mut State,
    d: &mut Desired<AccessMonitorStatus>,
) {
    let notes = notify::notify(ctx, m, v, &d.status, found, state.baseline.as_ref(), &mut state.sent).await;
    d.events.extend(notes);
    let open = d.status.incidents.iter().any(|i| i.acknowledged.is_none() && !i.dry_run);
    if open && ctx.alertmanagers.is_some() {
        d.requeue_after = d.requeue_after.map(|r| r.min(notify::RESEND));
    }
}

/// A pass that read nothing: acknowledgements and pending incidents are still handled (and alerted, reported),
/// the conditions summed up.
async fn settle(
    ctx: &Context,
    m: &AccessMonitor,
    v: &validate::ValidatedAccessMonitor,
    state: &mut State,
    d: &mut Desired<AccessMonitorStatus>,
) -> Result<(), Error> {
    let o = respond::respond(ctx, m, m.spec.response.as_ref(), &[], &state.identities, &mut d.status.incidents).await?;
    d.events.extend(o.events);
    summary(m, d);
    // The log was not read: the hours until the next read are not observed.
    if let Some(b) = state.baseline.as_mut() {
        b.interrupted();
    }
    notified(ctx, m, v, &[], state, d).await;
    Ok(())
}

/// The `Clean` and `Settled` conditions and the per-object gauges, from the status.
fn summary(m: &AccessMonitor, d: &mut Desired<AccessMonitorStatus>) {
    let n = d.status.finding_count.unwrap_or(0);
    d.conditions.push(if n == 0 {
        Cond::new(Clean::NoFindings, Status::True, "no statement broke a rule")
    } else {
        Cond::new(Clean::FindingsMade, Status::False, format!("{n} finding(s); status.findings lists the newest"))
    });
    let name = m.metadata.name.as_deref().unwrap_or_default();
    let failures: Vec<String> = d
        .status
        .incidents
        .iter()
        .filter(|i| i.acknowledged.is_none())
        .filter_map(|i| i.failed.as_ref().map(|f| format!("incident {}: {f}", i.id)))
        .collect();
    let open: Vec<String> = d
        .status
        .incidents
        .iter()
        .filter(|i| i.acknowledged.is_none() && !i.dry_run)
        .map(|i| format!("{} (team {})", i.id, i.team))
        .collect();
    d.conditions.push(if !failures.is_empty() {
        Cond::new(Settled::ResponseFailed, Status::False, failures.join("; "))
    } else if !open.is_empty() {
        Cond::new(
            Settled::IncidentOpen,
            Status::False,
            format!(
                "open: {}; acknowledge with kubectl annotate accessmonitor {name} {}=<incident id>",
                open.join(", "),
                respond::ACKNOWLEDGE
            ),
        )
    } else {
        Cond::new(Settled::NoOpenIncident, Status::True, "no incident is open")
    });
    d.gauges.push(("access_entries", vec![], d.status.entries.unwrap_or(0) as f64));
    d.gauges.push(("access_findings", vec![], n as f64));
}

/// The pod's log, decoded lossily (a cut inside a character, or a byte that is no UTF-8, must not stop the reads).
async fn read_log(ctx: &Context, ns: &str, pod: &str, params: &LogParams) -> Result<String, kube::Error> {
    use futures::AsyncReadExt as _;
    let mut stream = Api::<Pod>::namespaced(ctx.client.clone(), ns).log_stream(pod, params).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.map_err(kube::Error::ReadEvents)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The pod's UID and the restart count of its database container (`container`, else the pod's first); `None` when
/// the pod or its container's status is not there.
async fn container_restarts(
    ctx: &Context,
    ns: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<(Option<String>, Option<i32>), Error> {
    let Some(p) = Api::<Pod>::namespaced(ctx.client.clone(), ns).get_opt(pod).await? else { return Ok((None, None)) };
    let uid = p.metadata.uid.clone();
    let name = match container {
        Some(c) => Some(c.to_string()),
        None => p.spec.as_ref().and_then(|s| s.containers.first()).map(|c| c.name.clone()),
    };
    let statuses = p.status.and_then(|s| s.container_statuses).unwrap_or_default();
    Ok((uid, statuses.into_iter().find(|c| Some(&c.name) == name.as_ref()).map(|c| c.restart_count)))
}

/// The database pod: the first by name of the pods that have not finished and match the selector.
async fn database_pod(ctx: &Context, m: &AccessMonitor, ns: &str) -> Result<Option<String>, Error> {
    let pods = ctx.unfinished_pods(ns).await?;
    let mut names: Vec<String> = pods
        .into_iter()
        .filter(|p| selector_matches(&m.spec.database.pod_selector, &p.metadata.labels.clone().unwrap_or_default()))
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// Who the users are: built again when an attributed AccessPolicy or the monitor changed, or a user appears that
/// is not known (a credential issued since), reading the teams' Secrets' metadata (never their data).
async fn identities(
    ctx: &Context,
    m: &AccessMonitor,
    ns: &str,
    state: &mut State,
    accesses: &[Access],
    now: Timestamp,
) -> Result<Identities, Error> {
    if state.identities_of == 0 {
        // First build in this process: the revoked users the status remembers.
        let saved = m.status.iter().flat_map(|s| s.revoked_users.iter());
        state.identities.remember_revoked(saved.map(|r| (r.user.as_str(), r.team.as_str(), r.access_policy.as_str())));
    }
    let mut policies: Vec<AccessPolicy> = match ctx.watched_access_policies(ns) {
        Some(p) => p,
        None => Api::<AccessPolicy>::namespaced(ctx.client.clone(), ns).list(&ListParams::default()).await?.items,
    };
    policies.retain(|p| {
        m.spec.access_policies.is_empty()
            || p.metadata.name.as_ref().is_some_and(|n| m.spec.access_policies.contains(n))
    });
    let statistics_user = state.statistics_user.clone();
    let mut parts: Vec<String> = vec![m.metadata.generation.unwrap_or_default().to_string()];
    parts.push(statistics_user.clone().unwrap_or_default());
    parts.extend(policies.iter().map(|p| p.metadata.resource_version.clone().unwrap_or_default()));
    let digest = crate::k8s::cache::digest_of(&parts.iter().map(String::as_str).collect::<Vec<_>>());
    let unknown: BTreeSet<String> =
        accesses.iter().filter(|a| !state.identities.knows(&a.user)).map(|a| a.user.clone()).collect();
    let expired = state.identities.valid_until.is_some_and(|t| t <= now);
    if digest == state.identities_of && !expired {
        // Users already looked up at these versions stay unknown until something changes.
        if unknown.is_subset(&state.looked_up) {
            return Ok(state.identities.clone());
        }
    } else {
        state.looked_up.clear();
    }
    state.looked_up.extend(unknown);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut teams = Vec::new();
    for p in &policies {
        let policy = p.metadata.name.clone().unwrap_or_default();
        for t in p.status.iter().flat_map(|s| s.teams.iter()) {
            let Some(secret) = &t.secret_name else { continue };
            let Some(meta) = secrets.get_metadata_opt(secret).await? else { continue };
            let owned =
                meta.metadata.owner_references.iter().flatten().any(|r| Some(&r.uid) == p.metadata.uid.as_ref());
            let a: BTreeMap<String, String> = meta.metadata.annotations.unwrap_or_default();
            let users: Vec<String> = [USERNAME, PREVIOUS_USERNAME]
                .iter()
                .filter_map(|k| a.get(*k).cloned())
                .filter(|u| !u.is_empty())
                .collect();
            if owned && !users.is_empty() {
                teams.push(TeamUsers { policy: policy.clone(), team: t.name.clone(), users });
            }
        }
    }
    let mut known = m.spec.identities.clone();
    if let (Some(user), Some(s)) = (statistics_user, &m.spec.database.statistics)
        && !known.iter().any(|k| k.user == user)
    {
        // It reads the statistics (no table): any table it reads is outside what it is for.
        known.push(KnownIdentity {
            user,
            name: format!("crmguard's statistics role (Secret {})", s.secret_name),
            tables: match m.spec.database.engine {
                MonitoredEngine::Postgres => vec![STATISTICS_VIEW.into()],
                MonitoredEngine::Mysql => statistics::MARIADB_VIEWS.iter().map(ToString::to_string).collect(),
            },
        });
    }
    let ids = Identities::build(&policies, &teams, &known, &state.identities, now);
    state.identities_of = digest;
    Ok(ids)
}

/// The access records and findings of one read, into the audit trail.
fn record(ctx: &Context, m: &AccessMonitor, ns: &str, ids: &Identities, accesses: &[Access], found: &[Found]) {
    let monitor = m.metadata.name.as_deref().unwrap_or_default();
    for r in rules::access_records(ns, monitor, ids, accesses, found) {
        ctx.audit.access(r);
    }
}

fn finding(f: &Found) -> Finding {
    Finding {
        rule: f.rule,
        user: f.user.clone(),
        identity: f.identity.clone(),
        object: f.object.clone(),
        message: f.message.clone(),
        at: Time(f.at),
        pods: f.origins.pods.iter().take(respond::ORIGINS_KEPT).cloned().collect(),
        addresses: f.origins.addresses.iter().take(respond::ORIGINS_KEPT).cloned().collect(),
    }
}
